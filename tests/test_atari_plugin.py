"""Atari games as plug-ins: ``examples/atari_boxing`` is pip-installed the way a user installs it
(into a temporary prefix, so that the shared environment is left alone) and found through its
entry point (group ``genopt_projects.atari_games``) next to the shipped eight.

Real emulator, real sandboxed rollout workers (which find the plug-in through the parent's
``sys.path``), real SQLite MLflow store; the optimizer is a scripted LLM (``scripted:FILE``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytest.importorskip("ale_py")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "atari_boxing"

PUNCHER = '''def select_action(obs):
    """Walk towards the opponent until level with them, then punch."""
    me, enemy = obs["player"], obs["enemy"]
    dy = enemy["y"] - me["y"]
    if abs(dy) > 4:
        return 2 if dy < 0 else 5
    return 1 if abs(enemy["x"] - me["x"]) < 30 else (3 if enemy["x"] > me["x"] else 4)
'''


def pip_install(package: Path, prefix: Path) -> Path:
    """``pip install --no-deps --prefix PREFIX PACKAGE``; returns the site-packages directory."""
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                           "--prefix", str(prefix), str(package)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    site = Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))
    assert site.is_dir(), site
    return site


def with_path(site: Path) -> str:
    """``$PYTHONPATH`` with ``site`` in front (a prefix install is found like this)."""
    return os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])


@pytest.fixture(scope="module")
def boxing_site(tmp_path_factory):
    """The example installed into a temporary prefix, on this process's path while the module
    runs (the game registry is re-read with it, and again without it afterwards)."""
    from genopt_projects.atari import games, policies

    site = pip_install(EXAMPLE, tmp_path_factory.mktemp("prefix"))
    sys.path.insert(0, str(site))
    games._plugins.cache_clear()
    policies._plugin_policies.cache_clear()
    yield site
    sys.path.remove(str(site))
    for name in [m for m in sys.modules if m == "genopt_boxing" or m.startswith("genopt_boxing.")]:
        del sys.modules[name]
    games._plugins.cache_clear()
    policies._plugin_policies.cache_clear()


def test_the_plugin_game_sits_next_to_the_shipped_eight(boxing_site):
    from genopt_projects.atari.games import GAMES, all_games, get_game, plugin_package
    from genopt_projects.atari.task import starting_artifacts

    assert "Boxing" not in GAMES and len(GAMES) == 8  # the shipped games are untouched
    assert list(all_games())[-1] == "Boxing" and get_game("ALE/Boxing-v5") is get_game("boxing")
    assert plugin_package("Boxing") == "genopt_boxing" and plugin_package("Pong") is None
    starting = starting_artifacts()
    single, modular = starting["Boxing.single"], starting["Boxing.modular"]
    assert single.tasks == ("Boxing",) and "level and close: punch" in single.values["select_action"]
    assert [p.name for p in modular.spec.trainable] == ["plan_attack", "select_action"]
    assert "def select_action(target, obs):" in modular.values["select_action"]


def test_boxing_ram_layout_matches_the_rendered_frame_and_the_reward(boxing_site):
    """The boxers' boxes hold their torsos' pixels (white: you, black: the opponent), and the
    BCD scores' difference is the summed reward, on real emulator states."""
    import numpy as np

    from genopt_projects.atari.env import ObjectEnv

    white, black = 12, 0  # palette indices of the two boxers
    rng = np.random.default_rng(0)
    checked, total = 0, 0.0
    with ObjectEnv("Boxing", max_steps=None) as env:
        obs, _ = env.reset(seed=0)
        for step in range(400):
            obs, reward, terminated, truncated, _ = env.step(int(rng.integers(env.n_actions)))
            total += reward
            assert obs["player_score"] - obs["enemy_score"] == total
            assert 0 <= obs["time_left_s"] <= 120
            if step % 20:
                continue
            screen = env._ale.getScreen()
            for name, colour in (("player", white), ("enemy", black)):
                box = obs[name]
                torso = screen[box["y"] + 14: box["y"] + 30, 25:135] == colour  # below the head, above the legs
                xs = np.nonzero(torso.any(axis=0))[0] + 25
                inside = ((xs >= box["x"] - 1) & (xs < box["x"] + box["w"] + 1)).mean()
                assert inside > 0.9, (step, name, box, xs.tolist())
                checked += 1
    assert checked == 40


def test_genopt_run_atari_task_boxing_completes_and_logs_versions(boxing_site, tmp_path):
    from mlflow import MlflowClient

    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps([json.dumps({"reasoning": "close in, then punch",
                                               "select_action": PUNCHER})]))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONPATH": with_path(boxing_site)}
    done = subprocess.run(
        [sys.executable, "-m", "mlflow_genopt.cli", "run", "atari", "--task", "Boxing",
         "--init", "Boxing.single", "--steps", "2", "--credit-horizon", "20",
         "--optimizer-model", f"scripted:{answers}", "--option", "eval_episodes=1",
         "--option", "eval_max_steps=150", "--option", "train_episodes=2",
         "--option", "video_steps=20", "--tracking-uri", uri, "--experiment", "boxing",
         "--no-cache"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("boxing")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["task"] == "Boxing" and run.data.params["init"] == "Boxing.single"
    models = client.search_logged_models([experiment.experiment_id])
    statuses = sorted(m.tags["genopt.status"] for m in models)
    assert statuses == ["accepted", "initial"]  # step 2 proposed the same policy again: refused
    exported = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert "export/policy.py" in exported


def test_a_broken_plugin_is_one_line_naming_its_entry_point(tmp_path):
    """A plug-in whose entry point does not load stops `genopt run atari` with one line."""
    package = tmp_path / "broken"
    (package / "genopt_broken_game").mkdir(parents=True)
    (package / "genopt_broken_game" / "__init__.py").write_text("GAME = 'not a GameSpec'\n")
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "genopt-broken-game"\nversion = "0.1"\n'
        '[project.entry-points."genopt_projects.atari_games"]\nBroken = "genopt_broken_game:GAME"\n'
        '[tool.setuptools]\npackages = ["genopt_broken_game"]\n')
    site = pip_install(package, tmp_path / "prefix")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONPATH": with_path(site)}
    done = subprocess.run([sys.executable, "-m", "mlflow_genopt.cli", "run", "atari", "--no-tracking"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    [line] = [line for line in done.stderr.splitlines() if "error:" in line]
    assert "Atari game plug-in 'Broken' (genopt_broken_game:GAME" in line and "not a" in line
