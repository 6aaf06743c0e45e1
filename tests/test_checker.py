"""check_task: the three case studies pass the Task contract; broken tasks are named exactly."""

from __future__ import annotations

import pytest

from mlflow_genopt import ArtifactSpec, Example, LoopConfig, Parameter, Trial, check_task
from mlflow_genopt.checker import TaskContractError
from mlflow_genopt.llm.scripted import ScriptedLLM
from mlflow_genopt.project import load_project

from toy import WordTask


def _check(project: str, **config):
    project_ = load_project(project)
    config = LoopConfig(project=project, **config)
    llm = ScriptedLLM(lambda messages, _: "The answer is 3.") if project_.needs_task_llm else None
    task = project_.build_task(config, llm)
    return check_task(task, project_.starting_for(config), env_steps=config.credit_horizon)


def test_bbeh_passes_the_contract():
    report = _check("bbeh", task="generated_arithmetic", init="prompt_and_extraction",
                    task_options={"train_size": 4, "val_size": 2, "test_size": 2})
    assert report.ok and any("broken version" in c for c in report.checked), report


def test_ml_pipeline_passes_the_contract():
    report = _check("ml_pipeline", task="breast-cancer", init="many_function",
                    task_options={"max_train_rows": 80, "n_folds": 2, "memory_mb": 2048})
    assert report.ok and "precheck" in report.checked and "quick_fix" in report.checked, report


@pytest.mark.parametrize("continue_episode", [False, True])
def test_atari_passes_the_contract(continue_episode):
    report = _check("atari", task="Pong", init="modular", credit_horizon=10, max_workers=1,
                    task_options={"eval_episodes": 1, "eval_max_steps": 30, "test_episodes": 1,
                                  "train_episodes": 2, "workers": 1,
                                  "continue_episode": continue_episode})
    assert report.ok, report
    assert {"end_step", "state_dict/load_state_dict round trip"} <= set(report.checked)


class InProcess(WordTask):
    """Runs 'generated' code in the loop's own process and drops a trial: two violations."""

    spec = ArtifactSpec((Parameter("prompt", "prompt", "words"),
                         Parameter("score", "code", "score(text) -> float")))

    def evaluate(self, version, examples, context=None):
        namespace = {}
        exec(version.values["score"], namespace)  # noqa: S102 - what the checker must catch
        try:
            namespace["score"]("x")
        except RuntimeError:
            pass
        return [Trial(e.id, e.input, "", 0.0, "ok") for e in examples][: max(len(examples) - 1, 0)]


def test_a_broken_task_gets_every_problem_in_one_report():
    values = {"prompt": "alpha", "score": "def score(text):\n    return 1.0\n"}
    with pytest.raises(TaskContractError) as info:
        check_task(InProcess(), values)
    text = str(info.value)
    assert "returned 1 trials for 2 examples" in text
    assert "generated code of score ran in the caller's process" in text
    report = check_task(InProcess(), values, raise_on_problem=False)
    assert not report.ok and len(report.problems) >= 2


class Unstable(WordTask):
    def __init__(self):
        super().__init__()
        self.n = 0

    def evaluate(self, version, examples, context=None):
        self.n += 1
        return [Trial(e.id, e.input, "", float(self.n), "") for e in examples]


def test_nondeterminism_and_bad_splits_are_reported():
    task = Unstable()
    task.splits["val"] = [Example("same", "a"), Example("same", "b")]
    report = check_task(task, {"prompt": "x"}, raise_on_problem=False)
    assert any("ids must be unique" in p for p in report.problems), report
    assert any("must be deterministic" in p for p in report.problems), report


class LenientPrecheck(WordTask):
    """Its precheck passes everything: a broken version would reach scoring unrepaired."""

    spec = ArtifactSpec((Parameter("score", "code", "score(text) -> float"),))

    def evaluate(self, version, examples, context=None):
        return [Trial(e.id, e.input, "", 0.0, "ok") for e in examples]

    def precheck(self, version):
        return None


def test_a_precheck_that_passes_a_raising_version_is_named():
    task = LenientPrecheck()
    with pytest.raises(TaskContractError, match="precheck passed a version whose score raises"):
        check_task(task, {"score": "def score(text):\n    return 1.0\n"})
    report = check_task(task, {"score": "def score(text):\n    return 1.0\n"}, raise_on_problem=False)
    assert any(p.startswith("precheck passed a version whose score raises") for p in report.problems), report


class BadQuickFix(WordTask):
    """Its quick_fix returns the fixed code alone, not every parameter's value and a note."""

    spec = ArtifactSpec((Parameter("score", "code", "score(text) -> float"),))

    def evaluate(self, version, examples, context=None):
        return [Trial(e.id, e.input, "", 0.0, "ok") for e in examples]

    def precheck(self, version):
        return None if "return 1.0" in version.values["score"] else "RuntimeError: broken"

    def quick_fix(self, version, problem):
        return "def score(text):\n    return 1.0\n"


def test_a_quick_fix_that_breaks_its_contract_is_named():
    report = check_task(BadQuickFix(), {"score": "def score(text):\n    return 1.0\n"},
                        raise_on_problem=False)
    assert any(p.startswith("quick_fix: must return None or (values, note)") for p in report.problems), report
