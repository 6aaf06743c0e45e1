"""The Atari project: credit horizon and update timing, the full-episode evaluation, continuation,
and a scripted-LLM loop on Pong that survives broken policies and leaves versions and a video
in MLflow.

Real sandboxed rollout workers and a real emulator throughout; only the optimizer LLM is
scripted. Horizons and episodes are short so that the file stays fast on two cores.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

pytest.importorskip("ale_py")

from mlflow_genopt.artifact import ArtifactVersion  # noqa: E402
from mlflow_genopt.config import ConfigError  # noqa: E402
from mlflow_genopt.llm.scripted import ScriptedLLM  # noqa: E402
from mlflow_genopt.evaluation import Evaluator  # noqa: E402
from mlflow_genopt.history import History  # noqa: E402
from mlflow_genopt.loop import LearningLoop  # noqa: E402
from mlflow_genopt.optimizer import Optimizer  # noqa: E402

from genopt_projects.atari import PROJECT  # noqa: E402
from genopt_projects.atari.games import GAMES  # noqa: E402
from genopt_projects.atari.task import observation_text  # noqa: E402
from genopt_projects.atari.worker import run_episode  # noqa: E402

FOLLOW_BALL = '''def select_action(obs):
    """Keep the paddle's centre level with the ball."""
    ball, me = obs["ball"], obs["player"]
    if ball is None or me is None:
        return 0
    gap = (ball["y"] + 2 + ball["dy"]) - (me["y"] + 8 + me["dy"])
    if gap < -3:
        return 2
    if gap > 3:
        return 3
    return 0
'''
RAISES_AT_IMPORT = "raise RuntimeError('broken at import')\n\ndef select_action(obs):\n    return 0\n"
HANGS = "def select_action(obs):\n    while True:\n        pass\n"
INVALID_ACTION = "def select_action(obs):\n    return 'UP'\n"

SMALL = {"eval_episodes": 1, "eval_max_steps": 120, "train_episodes": 3}


def answer(code: str) -> str:
    return json.dumps({"reasoning": "try this", "select_action": code})


def make(init: str = "single", task: str = "Pong", **overrides):
    options = {**SMALL, **overrides.pop("task_options", {})}
    config = PROJECT.config(task=task, init=init, task_options=options, **overrides)
    return config, PROJECT.build_task(config)


def version(config, step: int = 0, **values) -> ArtifactVersion:
    return ArtifactVersion({**PROJECT.starting_for(config).values, **values}, step)


def trace_lines(context) -> list[int]:
    """Per trial of the learning context: how many trace lines it shows."""
    text = context[-1]["content"]
    counts = []
    for block in text.split("## Trial ")[1:]:
        counts.append(sum(1 for line in block.splitlines() if line.startswith("- ") and " -> " in line))
    return counts


def one_step(config, task, response: str):
    llm = ScriptedLLM([response])
    optimizer = Optimizer(llm, credit_horizon=config.credit_horizon)
    starting = PROJECT.starting_for(config)
    loop = LearningLoop(config, task, optimizer, dict(starting.values), spec=starting.spec)
    return loop.run()


# --- credit horizon and update timing ------------------------------------------------------


def test_each_rollout_is_exactly_the_horizon_and_the_update_follows_it():
    config, task = make(credit_horizon=7, steps=2)
    try:
        result = one_step(config.replace(steps=1), task, answer(FOLLOW_BALL))
        [step] = result.steps
        for trial in step.trials + step.candidate_trials:  # the rollouts before the update
            assert len(trial.trace) == 7 and trial.output["steps"] == 7, trial.feedback
            assert trial.input == {"seed": trial.input["seed"], "horizon": 7, "game_step": 0}
            assert [s.info["t"] for s in trial.trace] == list(range(7))
        assert step.accepted and step.val_score is not None
        # update_every decouples the environment steps between updates from what is shown
        config, task = make(credit_horizon=3, update_every=12)
        trials = task.evaluate(version(config), task.examples("train")[:2])
        assert [len(t.trace) for t in trials] == [12, 12]
        assert "you see its last 3 steps" in task.objective
    finally:
        task.close()


def test_credit_horizon_truncates_the_trace_in_the_learning_context():
    shown = {}
    for horizon in (1, 100):
        config, task = make(credit_horizon=horizon, steps=1)
        try:
            result = one_step(config, task, answer(FOLLOW_BALL))
        finally:
            task.close()
        [step] = result.steps
        shown[horizon] = trace_lines(step.context)
        assert f"Trace (last {shown[horizon][0]} of {len(step.trials[0].trace)} steps" in step.context[-1]["content"]
    assert shown[1] == [1]
    assert shown[100] == [100]  # Pong does not end within 100 steps
    # longer rollouts than the horizon: only the last credit_horizon steps reach the optimizer
    config, task = make(credit_horizon=1, update_every=30, steps=1)
    try:
        result = one_step(config, task, answer(FOLLOW_BALL))
    finally:
        task.close()
    [step] = result.steps
    assert trace_lines(step.context) == [1]
    assert "Trace (last 1 of 30 steps" in step.context[-1]["content"]
    assert step.trials[0].trace[-1].info["t"] == 29  # the step right before the update


def test_feedback_combines_the_rollout_with_the_full_episode_evaluation():
    config, task = make(credit_horizon=5)
    try:
        start = version(config)
        evaluate = Evaluator(task, config, History())  # the loop's evaluator adds the note
        [before] = evaluate(start, task.examples("train")[:1], "batch", 1)
        assert "Validation of this version: not run yet" in before.feedback
        [episode] = evaluate(start, task.examples("val"), "validation", 0)
        assert episode.metrics["steps"] == 120 and episode.metrics["failed"] == 0.0
        [after] = evaluate(start, task.examples("train")[:1], "batch", 1)
        assert (f"Validation of this version: mean score {episode.score:.4g} (std 0) over 1 "
                "example(s)") in after.feedback
        assert after.feedback.startswith("Rollout of up to 5 steps from the start of an episode")
        assert after.score == after.output["return"] and set(after.output) >= {"steps", "end", "actions"}
        assert isinstance(after.trace[0].observation, str) and "ball" in after.trace[0].observation
        # seeds differ through the no-op starts
        trials = task.evaluate(start, task.examples("train"))
        assert len({t.trace[0].observation for t in trials}) > 1
    finally:
        task.close()


def test_broken_policies_forfeit_with_their_error_as_feedback():
    config, task = make(credit_horizon=5)
    try:
        for code, error in [(RAISES_AT_IMPORT, "the policy failed to load: RuntimeError: broken at import"),
                            (HANGS, "policy call exceeded 100 ms at step 0"),
                            (INVALID_ACTION, "act returned 'UP' (str) at step 0")]:
            broken = version(config, 1, select_action=code)
            [rollout] = task.evaluate(broken, task.examples("train")[:1])
            [episode] = task.evaluate(broken, task.examples("val"))
            for trial in (rollout, episode):
                assert trial.score == -21 and trial.error.startswith(error), trial.error
                assert f"ERROR: {error}" in trial.feedback and "the trial scores -21" in trial.feedback
            assert episode.metrics["failed"] == 1.0
    finally:
        task.close()


def test_continue_episode_plays_one_game_across_updates():
    config, task = make(credit_horizon=40, batch_size=1, task_options={"continue_episode": True})
    try:
        [game] = task.examples("train")
        start = version(config, 0, select_action=FOLLOW_BALL)
        candidate = version(config, 1, select_action=FOLLOW_BALL + "\n# same play, new version\n")
        [first] = task.evaluate(start, [game])  # step 1: current version, from reset
        [replayed] = task.evaluate(candidate, [game])  # step 1: the candidate, from the same state
        task.end_step(1, start, [first])  # the loop's episodic hook: the game moves on
        [second] = task.evaluate(candidate, [game])  # step 2: the adopted candidate moves on
        [again] = task.evaluate(version(config, 2, select_action=INVALID_ACTION), [game])  # its candidate
        assert [t.input["game_step"] for t in (first, replayed, second, again)] == [0, 0, 40, 40]
        assert task.state_dict()["games"][game.id]["game_step"] == 40
        assert first.trace[-1].observation == replayed.trace[-1].observation
        assert "from game step 40" in second.feedback
        assert "continues one game" in task.objective
        # the two 40-step rollouts play exactly the first 80 steps of the episode
        config80, whole_task = make(credit_horizon=80)
        try:
            [whole] = whole_task.evaluate(version(config80, 0, select_action=FOLLOW_BALL), [
                e for e in whole_task.examples("train") if e.input["seed"] == game.input["seed"]])
        finally:
            whole_task.close()
        assert [s.observation for s in first.trace + second.trace] == [s.observation for s in whole.trace]
        assert first.score + second.score == whole.score
    finally:
        task.close()


# --- starting artifacts and configuration --------------------------------------------------


@pytest.mark.parametrize("game", sorted(GAMES))
def test_every_game_plays_both_generic_starting_policies(game):
    """In-process (our own starting code): the programs the task builds load and play."""
    for init in ("single", "modular"):
        config, task = make(init, game)
        try:
            job = dict(source=task.program(version(config)), entry="act", game=game, seed=0, max_steps=15,
                       frameskip=4, repeat_action_probability=0.0, noop_max=30, call_timeout_s=0.5,
                       episode_timeout_s=10.0, trace_every=1, trace_head=3, trace_tail=1, max_items=6)
            result = run_episode(job)
            assert result["error"] is None and result["steps"] == 15, (game, init, result["error"])
            assert observation_text(result["trace"][0]["obs"]).startswith("player")
            assert game in task.objective and "Actions (return an int)" in task.objective
        finally:
            task.close()
    _, modular = make("modular", game)
    modular.close()
    assert "Suggested job of analyze(obs)" in modular.objective


def test_starting_artifacts_and_bad_configs():
    names = list(PROJECT.starting_artifacts)
    assert names[:2] == ["single", "modular"] and "Pong.modular" in names and len(names) == 18
    assert [p.name for p in PROJECT.starting_artifacts["Pong.modular"].spec.trainable] == [
        "predict_ball_trajectory", "select_action"]
    defaults = PROJECT.config()
    assert (defaults.steps, defaults.memory_size, defaults.revert_ratio, defaults.revert_patience,
            defaults.acceptance, defaults.credit_horizon, defaults.batch_size) == (30, 5, 0.8, 5, "always", 100, 1)
    for overrides, message in [
        ({"task": "Tetris"}, "task: unknown Atari game 'Tetris'"),
        ({"init": "Breakout.single"}, "init: Breakout.single is a starting artifact of Breakout, not of Pong"),
        ({"task_options": {"eval_epsiodes": 2}}, "task_options.eval_epsiodes: unknown option for atari"),
        ({"task_options": {"eval_episodes": 0}}, "task_options.eval_episodes: must be an integer >= 1, got 0"),
        ({"task_options": {"continue_episode": "maybe"}}, "task_options.continue_episode: must be true or false"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            PROJECT.build_task(PROJECT.config(**{"task": "Pong", **overrides}))


# --- the whole loop, tracked -----------------------------------------------------------------


def test_scripted_loop_on_pong_logs_versions_and_a_video_despite_broken_policies(tmp_path):
    from mlflow import MlflowClient

    from mlflow_genopt.build import run_loop

    script = [answer(FOLLOW_BALL), answer(RAISES_AT_IMPORT), answer(HANGS), "this is not JSON {",
              answer(INVALID_ACTION)]
    llm = ScriptedLLM(script)
    # one scripted JSON answer per step, the malformed one included (no repair round)
    config = PROJECT.config(task="Pong", steps=5, credit_horizon=5, revert_patience=1,
                            edit_format="json", repair_attempts=0,
                            task_options={"eval_episodes": 2, "eval_max_steps": 150, "test_episodes": 1,
                                          "video_steps": 60})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_loop(config, tracking=uri, cache_dir=None, optimizer_llm=llm, experiment="atari")

    assert result.stop_reason == "completed" and len(result.steps) == 5 and len(llm.calls) == 5
    good = result.steps[0].candidate_id
    assert result.selected.version_id == good and result.selected.values["select_action"].startswith(
        "def select_action(obs):\n    \"\"\"Keep")
    statuses = [(v.status, v.val_score) for v in result.versions]
    assert statuses[0][0] == "initial" and len(statuses) == 5  # the invalid JSON made no version
    assert [s for s in statuses[2:]] == [("accepted", -21.0)] * 3  # the broken ones forfeit
    assert not result.steps[3].valid and "not JSON" in result.steps[3].invalid_reason
    assert any(s.note.startswith("reverted to " + good) for s in result.steps)
    # the step after adopting a broken policy shows the optimizer its error
    assert "the policy failed to load: RuntimeError: broken at import" in result.steps[2].context[-1]["content"]
    assert result.test_score is not None

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("atari")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["credit_horizon"] == "5" and run.data.params["task"] == "Pong"
    assert {"val_score", "val_score_std", "val_steps", "val_failed", "best_val_score"} <= set(run.data.metrics)
    models = client.search_logged_models([experiment.experiment_id])
    assert len(models) == 5 and sum(m.tags["genopt.selected"] == "true" for m in models) == 1
    exported = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert {"export/selected_policy.gif", "export/policy.py", "export/selected_policy.json"} <= exported
    gif = client.download_artifacts(run.info.run_id, "export/selected_policy.gif", str(tmp_path))
    with open(gif, "rb") as handle:
        assert handle.read(6) == b"GIF89a"
    import imageio.v3 as iio

    frames = iio.imread(gif, index=None)
    assert frames.shape[0] > 10 and frames.shape[1:3] == (210, 160)  # (identical frames are merged)
    info = json.loads(open(client.download_artifacts(run.info.run_id, "export/selected_policy.json",
                                                     str(tmp_path))).read())
    assert info["version_id"] == good and info["video_steps"] == 60
    assert info["video_frames"] == 31  # the reset frame, then every 2nd of 60 steps


@pytest.mark.e2e
def test_cli_runs_the_real_path_with_the_embedded_model(tmp_path):
    """`genopt run atari` with the embedded SmolLM2 model, a real SQLite store, a short horizon."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is a dependency: install the project")
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    completed = subprocess.run(
        [sys.executable, "-m", "mlflow_genopt.cli", "run", "atari", "--task", "Pong", "--credit-horizon", "1",
         "--steps", "1", "--optimizer-max-tokens", "150", "--option", "eval_episodes=1",
         "--option", "eval_max_steps=100", "--option", "video_steps=20", "--tracking-uri", uri,
         "--experiment", "e2e-atari", "--no-cache"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "[genopt] step 1/1" in completed.stderr and "selected version: v" in completed.stdout
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("e2e-atari").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["credit_horizon"] == "1"
    assert "export/selected_policy.gif" in {a.path for a in client.list_artifacts(run.info.run_id, "export")}
