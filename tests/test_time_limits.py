"""Adaptive evaluation timeouts: the per-trial sandbox limit follows the starting version's
measured time (``timeout_factor`` x it, at least ``timeout_floor_s``, at most ``timeout_s``), a
hanging proposal is cut there rather than at the maximum, and its feedback says the limit and
that it was exceeded.

The ML-pipeline test runs the real sandbox on scikit-learn's built-in breast-cancer data (no
file, no network); the sandbox call is observed (not replaced) to read the limit it was given,
so nothing here asserts on wall-clock durations.
"""

from __future__ import annotations

import json

import pytest

from mlflow_genopt.build import run_loop
from mlflow_genopt.config import ConfigError
from mlflow_genopt.llm.scripted import ScriptedLLM
from mlflow_genopt.task import EvalContext, Example
from mlflow_genopt.time_limits import TIMEOUT_PREFIX, AdaptiveTimeLimit

HANGS = "def train_model(dataset):\n    while True:\n        pass\n"


def test_the_limit_is_a_bounded_multiple_of_the_measured_time():
    limit = AdaptiveTimeLimit(maximum_s=120, factor=5, floor_s=20)
    assert limit.limit() == 120 and limit.needs_measurement  # nothing measured yet: the maximum
    limit.observe(6.3)  # 31.5 s, rounded up to whole 5 s
    assert limit.limit() == 35 and not limit.needs_measurement
    limit.observe(1.0)  # only the first observation (the starting version) counts
    assert limit.limit() == 35
    assert AdaptiveTimeLimit(120, 5, 20, measured_s=1.0).limit() == 20  # the floor
    assert AdaptiveTimeLimit(120, 5, 20, measured_s=60.0).limit() == 120  # the maximum
    assert AdaptiveTimeLimit(120, 0, 20, measured_s=1.0).limit() == 120  # factor 0: fixed
    text = limit.exceeded(3, "Be quicker.")
    assert text.startswith(f"{TIMEOUT_PREFIX}: a trial may take 35 s (3 trials ran in one process: 105 s")
    assert "timeout_factor 5 x the starting version's time per trial (rounded up to 5 s)" in text
    assert "6.3" not in text and text.endswith("Be quicker.")  # no measurement: stable contexts
    resumed = AdaptiveTimeLimit(120, 5, 20)
    resumed.load_state_dict(json.loads(json.dumps(limit.state_dict())))
    assert resumed.limit() == 35
    for bad in ({"factor": 0.5}, {"factor": float("nan")}, {"floor_s": 0}, {"maximum_s": -1}):
        with pytest.raises(ValueError):
            AdaptiveTimeLimit(**{"maximum_s": 120, **bad})


@pytest.mark.parametrize("option,value,expected", [
    ("timeout_factor", "-1", "task_options.timeout_factor: must be a number >= 0 and <= 1000"),
    ("timeout_factor", "fast", "task_options.timeout_factor: must be a number"),
    ("timeout_floor_s", "0", "task_options.timeout_floor_s: must be a number >= 1"),
])
def test_timeout_options_are_typed_and_validated(option, value, expected):
    from genopt_projects.ml_pipeline import PROJECT

    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        PROJECT.parse_options({option: value})


def test_a_hanging_proposal_is_cut_at_the_adaptive_limit_and_told_so(monkeypatch):
    from genopt_projects.ml_pipeline import PROJECT
    from genopt_projects.ml_pipeline import task as ml_task

    given: list[float] = []  # the sandbox timeout of every evaluation, in order
    real = ml_task.run_function

    def observed(*args, **kwargs):
        given.append(kwargs["limits"].timeout_s)
        return real(*args, **kwargs)

    monkeypatch.setattr(ml_task, "run_function", observed)
    maximum = 300.0
    # precheck off: the hang must be cut on the scored path, where the limit is measured
    config = PROJECT.config(task="breast-cancer", steps=1, batch_size=2, precheck=False, task_options={
        "n_folds": 2, "timeout_s": maximum, "timeout_factor": 2, "timeout_floor_s": 1})
    answer = json.dumps({"reasoning": "spin", "train_model": HANGS})
    result = run_loop(config, tracking=None, cache_dir=None, optimizer_llm=ScriptedLLM([answer]))

    assert result.stop_reason == "completed" and result.selected.step == 0
    # the starting version's validation (1 trial) at the maximum, then its batch (2 folds), the
    # hanging candidate's batch (2 folds), the selected (starting) version's test split (1 trial)
    # and its export (1 call, 60 s more for saving the model)
    assert len(given) == 5 and given[0] == maximum
    per_trial = given[3]
    assert per_trial < maximum and given[1] == given[2] == 2 * per_trial
    assert given[4] == pytest.approx(per_trial + 60)
    [spin, _] = result.steps[0].candidate_trials
    assert spin.error.startswith(f"{TIMEOUT_PREFIX}: a trial may take {per_trial:g} s (2 trials ran")
    assert "timeout_factor 2 x the starting version's time per trial" in spin.error
    assert f"at most timeout_s={maximum:g} s" in spin.error and "Make the pipeline faster" in spin.error
    assert spin.error in spin.feedback and spin.score < min(t.score for t in result.steps[0].trials)
    assert result.test_score is not None and result.test_score > 0.85  # the starting version was unharmed


def test_the_measurement_is_task_state_and_keeps_the_starting_validation_out_of_the_cache():
    from genopt_projects.ml_pipeline import PROJECT

    config = PROJECT.config(task="breast-cancer", task_options={"n_folds": 2})
    task = PROJECT.build_task(config)
    val = Example("val", None)
    first = EvalContext("validation", 0)
    assert task.trial_key(val, first) is None  # not cached: a new loop measures its limit
    assert task.trial_key(val, EvalContext("validation", 3)) == "val"
    assert task.trial_key(Example("fold-1", None), EvalContext("batch", 1)) == "fold-1"
    task.time_limit.observe(4.0)
    assert task.trial_key(val, first) == "val" and task.time_limit.limit() == 20.0  # the floor
    resumed = PROJECT.build_task(config)
    resumed.load_state_dict(json.loads(json.dumps(task.state_dict())))
    assert resumed.time_limit.measured_s == 4.0 and resumed.time_limit.limit() == 20.0
