"""The composition root: one place builds loops; config layering, applicability, auto-resume,
a user's own Task object, and what a loop leaves behind."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mlflow_genopt import (
    ConfigError,
    LoopCallback,
    LoopConfig,
    StartingArtifact,
    build_loop,
    resolve_config,
    run_loop,
)
from mlflow_genopt.evaluation import TaskContractError
from mlflow_genopt.llm.scripted import ScriptedLLM

from toy import WordTask, answer

ROOT = Path(__file__).resolve().parents[1]


def test_one_place_builds_an_optimizer_and_one_builds_a_learning_loop():
    """Outside the tests of those classes, only mlflow_genopt/build.py constructs them."""
    found = {"Optimizer": [], "LearningLoop": []}
    for folder in ("mlflow_genopt", "projects", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            for name in found:
                for match in re.finditer(rf"\b{name}(\.from_config)?\(", text):
                    line = text[: match.start()].count("\n") + 1
                    if not text[text.rfind("\n", 0, match.start()) + 1: match.start()].lstrip().startswith(("class ", "def ", "#")):
                        found[name].append(f"{path.relative_to(ROOT)}:{line}")
    assert [p.split(":")[0] for p in found["Optimizer"]] == ["mlflow_genopt/build.py"], found
    assert [p.split(":")[0] for p in found["LearningLoop"]] == ["mlflow_genopt/build.py"], found


def test_a_config_takes_the_project_defaults_for_every_field_not_given():
    atari = LoopConfig(project="atari")
    assert (atari.task, atari.steps, atari.credit_horizon, atari.acceptance) == ("Pong", 30, 100, "always")
    assert LoopConfig(project="atari", steps=3).credit_horizon == 100
    ml = LoopConfig(project="ml_pipeline")
    assert (ml.task, ml.init, ml.steps, ml.task_model) == ("breast-cancer", "one_function", 20, None)
    # one fold gates, validation decides (measured: bench/bench_learning.py, README Benchmarks)
    assert (ml.acceptance, ml.acceptance_margin, ml.selection) == ("no_worse", 0.005, "best")
    mine = LoopConfig(project="not-registered")  # a task object's loop: generic defaults
    assert (mine.task, mine.init, mine.steps, mine.batch_size) == ("default", "default", 5, 3)
    with pytest.raises(ConfigError, match=r"^project: required"):
        LoopConfig(steps=3)


@pytest.mark.parametrize("project,field,value,message", [
    ("bbeh", "credit_horizon", 5, "credit_horizon: applies to multi-step tasks"),
    ("ml_pipeline", "update_every", 5, "update_every: applies to multi-step tasks"),
    ("atari", "task_model", "smollm2", "task_model: project atari does not call a task LLM"),
    ("ml_pipeline", "task_temperature", 0.5, "task_temperature: project ml_pipeline does not call"),
])
def test_a_field_that_does_not_apply_is_refused_not_logged_and_ignored(project, field, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        LoopConfig(project=project, **{field: value})
    assert getattr(LoopConfig(project=project, **{field: None}), field) is None


def test_layering_project_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\nbatch_size: 2\ntask_options: {eval_episodes: 2}\n")
    config = resolve_config("atari", config_file=path, overrides={"batch_size": 4},
                            options={"eval_max_steps": 50})
    assert (config.steps, config.batch_size, config.memory_size) == (7, 4, 5)  # 5: atari's
    assert config.task_options == {"eval_episodes": 2, "eval_max_steps": 50}
    path.write_text("stepz: 7\n")
    with pytest.raises(ConfigError, match=r"c.yaml: stepz: unknown loop config field"):
        resolve_config("atari", config_file=path)


class CrashAt(LoopCallback):
    def __init__(self, step):
        self.step = step

    def on_step(self, record):
        if record.step == self.step:
            raise RuntimeError("power cut")


def test_run_loop_from_python_resumes_an_interrupted_run_like_the_cli(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = LoopConfig(project="bbeh", task="generated_arithmetic", steps=3, batch_size=1,
                        acceptance="always", task_options={"train_size": 4, "val_size": 2, "test_size": 2})
    prompts = [answer(f"Try {i}: {{question}} The answer is") for i in range(3)]
    task_llm = ScriptedLLM(lambda messages, _: "The answer is 3.")
    with pytest.raises(RuntimeError, match="power cut"):
        run_loop(config, tracking=uri, cache_dir=tmp_path / "cache", optimizer_llm=ScriptedLLM(prompts),
                 task_llm=task_llm, callbacks=[CrashAt(2)])
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("genopt").experiment_id
    (failed,) = client.search_runs([experiment])
    assert failed.info.status == "FAILED"
    result = run_loop(config, tracking=uri, cache_dir=tmp_path / "cache",
                      optimizer_llm=ScriptedLLM(prompts[2:]), task_llm=task_llm)
    (run,) = client.search_runs([experiment])  # the same run, continued
    assert run.info.run_id == failed.info.run_id and run.info.status == "FINISHED"
    assert [s.step for s in result.steps] == [3]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "batch_score")) == [1, 2, 3]
    fresh = run_loop(config, tracking=uri, resume=None, cache_dir=tmp_path / "cache",
                     optimizer_llm=ScriptedLLM(prompts), task_llm=task_llm)
    assert len(client.search_runs([experiment])) == 2 and len(fresh.steps) == 3


def test_a_task_object_runs_directly_with_its_starting_values():
    config = LoopConfig(project="mine", steps=2, batch_size=2, acceptance="always")
    result = run_loop(config, task=WordTask(), starting={"prompt": "start"}, tracking=None,
                      cache_dir=None, optimizer_llm=ScriptedLLM([answer("india juliet"), answer("kilo")]))
    assert [v.status for v in result.versions] == ["initial", "accepted", "accepted"]
    assert result.best_val_score == 0.5
    with pytest.raises(ConfigError, match="starting: a task object needs its starting artifact"):
        build_loop(config, task=WordTask(), cache_dir=None, optimizer_llm=ScriptedLLM([]))
    spec_start = StartingArtifact("words", "a list", WordTask.spec, {"prompt": "alpha"})
    assert build_loop(config, task=WordTask(), starting=spec_start, cache_dir=None,
                      optimizer_llm=ScriptedLLM([])).loop.initial.values["prompt"] == "alpha"


class WrongCount(WordTask):
    def evaluate(self, version, examples, context=None):
        return super().evaluate(version, examples)[:-1]


def test_a_task_that_breaks_the_contract_stops_the_loop_with_its_name():
    config = LoopConfig(project="mine", steps=1, batch_size=2)
    with pytest.raises(TaskContractError, match="task toy/words: evaluate returned 3 trials for 4"):
        run_loop(config, task=WrongCount(), starting={"prompt": "x"}, tracking=None, cache_dir=None,
                 optimizer_llm=ScriptedLLM([answer("y")]))


def test_no_temporary_directory_outlives_a_loop(tmp_path, monkeypatch):
    """Exported files live in a temporary directory until tracking has logged them."""
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        from genopt_projects.ml_pipeline import STARTING_ARTIFACTS

        start = STARTING_ARTIFACTS["one_function"].values["train_model"]
        config = LoopConfig(project="ml_pipeline", task="breast-cancer", steps=1, batch_size=1,
                            task_options={"max_train_rows": 80, "n_folds": 2, "memory_mb": 2048})
        result = run_loop(config, tracking=f"sqlite:///{tmp_path}/mlflow.db", cache_dir=None,
                          optimizer_llm=ScriptedLLM([json.dumps({"reasoning": "r", "train_model": start.replace(
                              "n_estimators=100", "n_estimators=20")})]))
        assert result.export_dir is None  # the files are in the run, under export/
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        (run,) = client.search_runs([client.get_experiment_by_name("genopt").experiment_id])
        assert {a.path for a in client.list_artifacts(run.info.run_id, "export")} >= {
            "export/submission.csv", "export/pipeline.py"}
        assert list((tmp_path / "tmp").iterdir()) == []
    finally:
        tempfile.tempdir = None
