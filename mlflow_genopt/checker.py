"""``check_task``: run any task through the :class:`~mlflow_genopt.task.Task` contract.

Like Gymnasium's ``check_env``: before a user's own task meets a real optimizer, this calls
every method the loop will call, the way the loop calls it, and reports each broken promise in
one line. It evaluates the starting version on a few examples of every split (twice, to check
determinism), an empty batch, and a deliberately broken version of every trainable code
parameter (the broken code also tries to leave a mark in the caller's environment: generated
code must never run in the loop's process); it round-trips the optional hooks
(``state_dict``/``load_state_dict``, ``end_step``, ``trial_key``), runs ``precheck`` on the
starting and the broken version (and ``quick_fix`` on the broken one's problem), and calls
``close`` twice.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .artifact import ArtifactSpec, ArtifactVersion
from .evaluation import TaskContractError, _accepts_context
from .project import StartingArtifact
from .task import SPLITS, EvalContext, Example, Trial

_MARKER = "GENOPT_CHECK_TASK_RAN_IN_PROCESS"
_BROKEN = (
    "def {name}(*args, **kwargs):\n"
    "    import os\n"
    f"    os.environ[{_MARKER!r}] = '1'\n"
    "    raise RuntimeError('check_task: deliberately broken {name}')\n"
)


@dataclass
class TaskCheck:
    """What :func:`check_task` found: ``problems`` (contract violations), ``checked`` (what was
    exercised) and ``notes`` (what was not applicable)."""

    task: str
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        lines = [f"check_task({self.task}): {'ok' if self.ok else f'{len(self.problems)} problem(s)'}"]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  checked: {c}" for c in self.checked]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def check_task(task: Any, starting: StartingArtifact | Mapping[str, str], *,
               examples_per_split: int = 2, env_steps: int | None = None,
               raise_on_problem: bool = True) -> TaskCheck:
    """Check ``task`` against the contract, starting from ``starting`` (a starting artifact or
    the starting values of ``task.spec``). Evaluates up to ``examples_per_split`` examples per
    split; ``env_steps`` is the rollout length a multi-step task is checked with. Raises
    :class:`TaskContractError` listing every problem (or returns the report with
    ``raise_on_problem=False``)."""
    report = TaskCheck(str(getattr(task, "name", type(task).__name__)))
    problem = report.problems.append
    for attribute in ("name", "objective"):
        value = getattr(task, attribute, None)
        if not isinstance(value, str) or not value.strip():
            problem(f"task.{attribute}: must be a non-empty string, got {value!r}")
    spec = starting.spec if isinstance(starting, StartingArtifact) else getattr(task, "spec", None)
    if not isinstance(spec, ArtifactSpec):
        problem(f"task.spec: must be an ArtifactSpec, got {type(spec).__name__}")
        return _finish(report, raise_on_problem)
    values = dict(starting.values if isinstance(starting, StartingArtifact) else starting)
    if set(values) != set(spec.names):
        problem(f"starting values: must give exactly the parameters {list(spec.names)}, got {sorted(values)}")
        return _finish(report, raise_on_problem)
    initial = ArtifactVersion(values, 0)

    splits = {split: _examples(task, split, problem) for split in SPLITS}
    report.checked.append("examples(split): " + ", ".join(f"{s} {len(e)}" for s, e in splits.items()))
    if not splits["train"]:
        problem("examples('train'): the train split is empty; the loop needs training examples")
    takes_context = _accepts_context(task.evaluate)
    if not takes_context:
        report.notes.append("evaluate(version, examples) takes no context: it cannot tell phases apart")

    def evaluate(version: ArtifactVersion, examples: Sequence[Example], context: EvalContext,
                 what: str) -> list[Trial] | None:
        try:
            trials = (task.evaluate(version, list(examples), context) if takes_context
                      else task.evaluate(version, list(examples)))
        except Exception as exc:  # noqa: BLE001 - the report names it
            problem(f"evaluate ({what}) raised {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            return None
        return _check_trials(trials, examples, what, problem)

    steps = env_steps
    first: dict[str, list[Trial] | None] = {}
    for split, phase in (("train", "batch"), ("val", "validation"), ("test", "test")):
        examples = list(splits[split][:examples_per_split])
        if examples:
            first[split] = evaluate(initial, examples, EvalContext(phase, 1, None, steps),
                                    f"starting version on {split}")
    report.checked.append("evaluate: starting version on every split")
    empty = evaluate(initial, [], EvalContext("batch", 1, None, steps), "an empty list")
    if empty not in (None, []):
        problem(f"evaluate([]): must return [], got {len(empty)} trials")

    train = list(splits["train"][:examples_per_split])
    if train and first.get("train") is not None and not callable(getattr(task, "end_step", None)):
        again = evaluate(initial, train, EvalContext("batch", 1, None, steps), "starting version again")
        if again is not None and [t.score for t in again] != [t.score for t in first["train"]]:
            problem("evaluate: the same version on the same examples scored "
                    f"{[t.score for t in first['train']]} then {[t.score for t in again]}; it must be "
                    "deterministic (the loop caches trials)")
        report.checked.append("evaluate: deterministic on a repeat")

    if train:
        _check_broken_code(task, spec, initial, train, steps, evaluate, report)
    _check_hooks(task, initial, train, first.get("train"), steps, report)
    for attempt in (1, 2):
        try:
            task.close()
        except Exception as exc:  # noqa: BLE001
            problem(f"close() (call {attempt}) raised {type(exc).__name__}: {exc}")
            break
    report.checked.append("close() twice")
    return _finish(report, raise_on_problem)


def _examples(task: Any, split: str, problem) -> list[Example]:
    try:
        first = list(task.examples(split))
        second = list(task.examples(split))
    except Exception as exc:  # noqa: BLE001
        problem(f"examples({split!r}) raised {type(exc).__name__}: {exc}")
        return []
    bad = [e for e in first if not isinstance(e, Example)]
    if bad:
        problem(f"examples({split!r}): must hold Example objects, got {type(bad[0]).__name__}")
        return []
    ids = [e.id for e in first]
    if len(set(ids)) != len(ids):
        problem(f"examples({split!r}): ids must be unique within a split")
    if ids != [e.id for e in second]:
        problem(f"examples({split!r}): must return the same examples in the same order every time")
    return first


def _check_trials(trials: Any, examples: Sequence[Example], what: str, problem) -> list[Trial] | None:
    trials = list(trials) if isinstance(trials, (list, tuple)) else trials
    if not isinstance(trials, list):
        problem(f"evaluate ({what}): must return a list of Trial, got {type(trials).__name__}")
        return None
    if len(trials) != len(examples):
        problem(f"evaluate ({what}): returned {len(trials)} trials for {len(examples)} examples")
        return None
    for example, trial in zip(examples, trials):
        if not isinstance(trial, Trial):
            problem(f"evaluate ({what}): must return Trial objects, got {type(trial).__name__}")
            return None
        where = f"evaluate ({what}), example {example.id!r}"
        if trial.example_id != example.id:
            problem(f"{where}: trial.example_id is {trial.example_id!r}; trials must follow the examples' order")
        if not isinstance(trial.score, (int, float)) or not math.isfinite(trial.score):
            problem(f"{where}: score must be a finite number, got {trial.score!r}")
        if not isinstance(trial.feedback, str):
            problem(f"{where}: feedback must be a string, got {type(trial.feedback).__name__}")
        bad = [k for k, v in dict(trial.metrics).items()
               if not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            problem(f"{where}: metrics {bad} must be finite numbers")
        try:
            json.dumps(dict(trial.carry))
        except (TypeError, ValueError):
            problem(f"{where}: carry must be JSON-serializable")
    return trials


def _check_broken_code(task: Any, spec: ArtifactSpec, initial: ArtifactVersion, train: list[Example],
                       steps: int | None, evaluate, report: TaskCheck) -> None:
    code = [p for p in spec.trainable if p.kind == "code"]
    if not code:
        report.notes.append("no trainable code parameter: broken-code checks do not apply")
        return
    os.environ.pop(_MARKER, None)
    for parameter in code:
        name = parameter.expected_function
        broken = initial.child({parameter.name: _BROKEN.format(name=name)}, 1)
        trials = evaluate(broken, train, EvalContext("candidate", 1, initial, steps),
                          f"a version whose {parameter.name} raises")
        if os.environ.pop(_MARKER, None):
            report.problems.append(f"generated code of {parameter.name} ran in the caller's process; "
                                   "it must run in a sandbox (mlflow_genopt.sandbox)")
        if trials is not None and all(t.error is None for t in trials):
            report.notes.append(f"a raising {parameter.name} gave no trial an error: check that "
                                "failures are reported in Trial.error")
        _check_precheck(task, initial, broken, parameter.name, report)
    report.checked.append("evaluate: a broken version of every trainable code parameter")


def _check_precheck(task: Any, initial: ArtifactVersion, broken: ArtifactVersion, name: str,
                    report: TaskCheck) -> None:
    precheck = getattr(task, "precheck", None)
    if not callable(precheck):
        return
    try:
        works, fails = precheck(initial), precheck(broken)
    except Exception as exc:  # noqa: BLE001 - a hook that raises is the finding
        report.problems.append(f"precheck raised {type(exc).__name__}: {exc}; it must return None "
                               "or the error as a string")
        return
    if os.environ.pop(_MARKER, None):
        report.problems.append(f"precheck ran the generated code of {name} in the caller's "
                               "process; it must run in a sandbox (mlflow_genopt.sandbox)")
    if works is not None:
        report.problems.append(f"precheck fails the starting version: {str(works).splitlines()[0]}")
    if not (isinstance(fails, str) and fails.strip()):
        report.problems.append(f"precheck passed a version whose {name} raises; it must return "
                               "the error as a string")
    if "precheck" not in report.checked:
        report.checked.append("precheck")
    quick_fix = getattr(task, "quick_fix", None)
    if callable(quick_fix) and isinstance(fails, str):
        try:
            fix = quick_fix(broken, fails)
        except Exception as exc:  # noqa: BLE001 - a hook that raises is the finding
            report.problems.append(f"quick_fix raised {type(exc).__name__}: {exc}; it must return "
                                   "None or (values, note)")
            return
        if fix is not None and not (
                isinstance(fix, tuple) and len(fix) == 2 and isinstance(fix[0], Mapping)
                and set(fix[0]) == set(broken.values) and isinstance(fix[1], str)):
            report.problems.append("quick_fix: must return None or (values, note): every "
                                   f"parameter's value and a one-line note, got {fix!r:.120}")
        if "quick_fix" not in report.checked:
            report.checked.append("quick_fix")


def _check_hooks(task: Any, initial: ArtifactVersion, train: list[Example],
                 trials: list[Trial] | None, steps: int | None, report: TaskCheck) -> None:
    problem = report.problems.append
    trial_key = getattr(task, "trial_key", None)
    if callable(trial_key) and train:
        for example in train:
            key = trial_key(example, EvalContext("batch", 1, None, steps))
            if key is not None and not isinstance(key, str):
                problem(f"trial_key({example.id!r}): must return a string or None, got {key!r}")
        report.checked.append("trial_key")
    end_step = getattr(task, "end_step", None)
    if callable(end_step) and trials is not None:
        try:
            end_step(1, initial, trials)
        except Exception as exc:  # noqa: BLE001
            problem(f"end_step raised {type(exc).__name__}: {exc}")
        report.checked.append("end_step")
    state_dict, load = getattr(task, "state_dict", None), getattr(task, "load_state_dict", None)
    if callable(state_dict) != callable(load):
        problem("state_dict and load_state_dict: define both or neither")
    elif callable(state_dict):
        try:
            state = state_dict()
            blob = json.dumps(state, sort_keys=True)
            load(json.loads(blob))
            if json.dumps(state_dict(), sort_keys=True) != blob:
                problem("load_state_dict(state_dict()) does not give the same state back")
        except (TypeError, ValueError) as exc:
            problem(f"state_dict(): must be JSON-serializable and load back ({exc})")
        report.checked.append("state_dict/load_state_dict round trip")
    notes = getattr(task, "feedback_notes", ())
    from .history import NOTES

    if any(n not in NOTES for n in notes or ()):
        problem(f"feedback_notes: {tuple(notes)}; allowed: {NOTES}")


def _finish(report: TaskCheck, raise_on_problem: bool) -> TaskCheck:
    if raise_on_problem and report.problems:
        raise TaskContractError(str(report))
    return report


__all__ = ["TaskCheck", "TaskContractError", "check_task"]
