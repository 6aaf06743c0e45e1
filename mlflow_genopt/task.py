"""The task protocol: where trials come from and how an artifact version is scored.

A task is the single integration point between a user's system and the learning loop (like
GEPA's adapter or Gymnasium's ``Env``). It is four things: a name and an objective, the
example splits, an ``evaluate`` method, and ``close``. Everything the loop knows about a
case study passes through this interface.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from .artifact import ArtifactSpec, ArtifactVersion

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Example:
    """One input a trial runs on. ``target`` is never shown to the optimizer by the core; the
    task decides what its feedback reveals. ``id`` must be unique within a split."""

    id: str
    input: Any
    target: Any = None


@dataclass(frozen=True)
class TraceStep:
    """One step of a multi-step trial: what was observed, what the artifact did, what it earned."""

    observation: Any
    action: Any
    reward: float = 0.0
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Trial:
    """One run of an artifact version on one example.

    ``score`` is higher-is-better and finite (a failed run scores the task's worst value, it does
    not raise). ``feedback`` is the text the optimizer sees about this trial. ``error`` holds a
    short description when the run itself failed (exception, timeout, bad output); such a trial
    still has a score and feedback. ``trace`` is empty for single-step tasks. ``metrics`` holds
    task-specific numbers (e.g. ``accuracy``, ``f1``, ``episode_return``); the loop averages them
    over the validation split and tracking logs them as ``val_<name>``.
    """

    example_id: str
    input: Any
    output: Any
    score: float
    feedback: str
    trace: tuple[TraceStep, ...] = ()
    error: str | None = None
    usage: Mapping[str, float] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class Task(Protocol):
    """A source of trials for a learning loop.

    Attributes
    ----------
    name:
        Short identifier, used in run names and tags (e.g. ``"bbeh/boolean_expressions"``).
    objective:
        The instruction the optimizer reads first: what the artifact is for and what a higher
        score means.
    spec:
        The default :class:`ArtifactSpec` (parameters, kinds, descriptions). The loop may make a
        different subset trainable; the task must work with any subset.

    Contracts
    ---------
    * ``examples(split)`` returns the same sequence (same order, same ids) every time it is called
      on the same task object; the split sizes are fixed at construction. ``split`` is one of
      ``"train"``, ``"val"``, ``"test"``. The loop never shows ``"test"`` examples to the
      optimizer and evaluates on them once, for the selected version only.
    * ``evaluate(version, examples)`` returns exactly one :class:`Trial` per example, in the
      same order. It must not raise because the artifact misbehaves: exceptions, timeouts and
      invalid outputs of the artifact become low-scoring trials with feedback. It may raise for
      failures of the infrastructure itself (e.g. the task LLM endpoint is unreachable).
      Generated code must never run in the caller's process.
    * ``evaluate`` may run trials concurrently, and must be deterministic given the version, the
      examples and the task's seed, up to the nondeterminism of an LLM it calls.
    * ``close()`` releases processes, emulators and connections; calling it twice is harmless.
    """

    name: str
    objective: str
    spec: ArtifactSpec

    def examples(self, split: str) -> Sequence[Example]: ...

    def evaluate(self, version: ArtifactVersion, examples: Sequence[Example]) -> list[Trial]: ...

    def close(self) -> None: ...


class FixedSplits:
    """Mixin for tasks whose splits are fixed at construction: set ``self._splits`` to
    ``{"train": [...], "val": [...], "test": [...]}`` and ``examples`` honours the contract."""

    _splits: Mapping[str, Sequence[Example]]

    def examples(self, split: str) -> Sequence[Example]:
        if split not in SPLITS:
            raise ValueError(f"split: must be train, val or test, got {split!r}")
        return self._splits.get(split, ())


@runtime_checkable
class ExportingTask(Task, Protocol):
    """A task that can also write deliverables of the selected version.

    ``export(version, directory)`` is called once, after the test evaluation, for the selected
    version only. It writes files into ``directory`` (e.g. ``submission.csv``; an MLflow model
    saved with its own flavor under ``model/``, whose ``MLmodel`` file tracking recognises).
    Generated code still runs only in the sandbox; the task must not raise because the
    artifact misbehaves (write nothing, or an ``export_error.txt``, instead).
    """

    def export(self, version: ArtifactVersion, directory: Path) -> None: ...


def mean_score(trials: Sequence[Trial]) -> float:
    """Mean trial score; an empty batch scores 0.0 so that metrics stay finite."""
    return sum(t.score for t in trials) / len(trials) if trials else 0.0


def summarize(trials: Sequence[Trial]) -> dict[str, float]:
    """``score_std`` plus the mean of every task metric that all trials report."""
    if not trials:
        return {}
    mean = mean_score(trials)
    summary = {"score_std": (sum((t.score - mean) ** 2 for t in trials) / len(trials)) ** 0.5}
    shared = set.intersection(*(set(t.metrics) for t in trials))
    for name in sorted(shared):
        summary[name] = sum(float(t.metrics[name]) for t in trials) / len(trials)
    return summary
