"""Nothing left behind: no temporary directory or file outlives its loop or study, whether the
loop finished, failed, was interrupted (KeyboardInterrupt, or SIGINT's finish-the-step stop), or
ran as a study's trials.

Real BBEH loops (generated task, real sandbox, real SQLite MLflow store) with scripted LLMs;
``TMPDIR`` points at a fresh, empty directory for each test, so everything this library,
MLflow and the sandbox create with :mod:`tempfile` lands there.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile

import pytest

from mlflow_genopt import LoopCallback, LoopConfig, run_loop
from mlflow_genopt.llm.scripted import ScriptedLLM

GOOD_PROMPT = "Compute carefully.\n{question}\nEnd with: The answer is <answer>."


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    """A fresh, empty TMPDIR (and :mod:`tempfile`'s cached choice reset to it)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.chdir(tmp_path)
    tempfile.tempdir = None
    try:
        yield folder
    finally:
        tempfile.tempdir = None


def leftovers(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def config(**changes) -> LoopConfig:
    fields = dict(project="bbeh", task="generated_arithmetic", init="prompt_and_extraction",
                  steps=3, batch_size=1, acceptance="always", max_workers=2,
                  task_options={"train_size": 4, "val_size": 2, "test_size": 2})
    return LoopConfig(**{**fields, **changes})


def llms():
    optimizer = ScriptedLLM(lambda messages, i: json.dumps(
        {"reasoning": "r", "prompt": f"Try {i}. " + GOOD_PROMPT}))
    task = ScriptedLLM(lambda messages, i: "The answer is 3.")
    return {"optimizer_llm": optimizer, "task_llm": task}


class At(LoopCallback):
    """Does ``action`` when step ``step`` has been reported."""

    def __init__(self, step: int, action) -> None:
        self.step, self.action = step, action

    def on_step(self, record) -> None:
        if record.step == self.step:
            self.action()


def _raise(exc: BaseException):
    def action():
        raise exc
    return action


def _sigint():
    os.kill(os.getpid(), signal.SIGINT)  # the handler asks the loop to stop after this step


@pytest.mark.parametrize("ending", ["finished", "failed", "keyboard_interrupt", "sigint"])
def test_no_temporary_file_outlives_a_loop_however_it_ends(tmp_path, temp_dir, ending):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    callbacks = {"finished": [], "failed": [At(1, _raise(RuntimeError("power cut")))],
                 "keyboard_interrupt": [At(2, _raise(KeyboardInterrupt()))],
                 "sigint": [At(1, _sigint)]}[ending]
    expected = {"finished": None, "failed": RuntimeError, "keyboard_interrupt": KeyboardInterrupt,
                "sigint": None}[ending]
    if expected is None:
        result = run_loop(config(), tracking=uri, cache_dir=tmp_path / "cache",
                          callbacks=callbacks, handle_sigint=True, **llms())
        assert result.stop_reason == ("interrupted" if ending == "sigint" else "completed")
    else:
        with pytest.raises(expected):
            run_loop(config(), tracking=uri, cache_dir=tmp_path / "cache", callbacks=callbacks,
                     handle_sigint=True, **llms())
    assert leftovers(temp_dir) == []


def test_no_temporary_file_outlives_a_study(tmp_path, temp_dir):
    from mlflow_genopt.study import StudyConfig, run_study

    study = StudyConfig(base=config(steps=2), search_space={"batch_size": [1, 2]},
                        sampler="grid", storage=f"sqlite:///{tmp_path}/optuna.db", pruner="none")
    result = run_study(study, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                       cache_dir=tmp_path / "cache", summary_dir=tmp_path / "summary", **llms())
    assert len(result.trials) == 2
    assert leftovers(temp_dir) == []
