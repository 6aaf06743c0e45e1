"""The task protocol: where trials come from and how an artifact version is scored.

A task is the single integration point between a user's system and the learning loop (like
GEPA's adapter or Gymnasium's ``Env``). It is four things: a name and an objective, the
example splits, an ``evaluate`` method, and ``close``; a few optional hooks let multi-step and
stateful tasks keep what matters across steps and across resume. Everything the loop knows
about a case study passes through this interface; :func:`mlflow_genopt.checker.check_task`
runs any task through its contract.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from .artifact import ArtifactSpec, ArtifactVersion

SPLITS = ("train", "val", "test")
# Why the loop evaluates a version (EvalContext.phase): the step's batch with the version the
# step improves, a proposed candidate on the same batch, the validation split (a version that
# was adopted, or the starting one), the test split (the selected version, once).
PHASES = ("batch", "candidate", "validation", "test")


@dataclass(frozen=True)
class EvalContext:
    """Why the loop is evaluating, handed to :meth:`Task.evaluate`.

    ``phase`` is one of :data:`PHASES`; ``step`` the optimization step (0 for the starting
    version's validation; the last step run for ``test``);
    ``parent`` the version a ``candidate`` was made from (``None`` otherwise); ``env_steps`` how
    many environment steps a training rollout of a multi-step task runs before the next update
    (:func:`mlflow_genopt.config.env_steps`; ``None``: a whole episode).
    """

    phase: str
    step: int
    parent: ArtifactVersion | None = None
    env_steps: int | None = None

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase: must be one of {', '.join(PHASES)}, got {self.phase!r}")


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
    over the validation split and tracking logs them as ``val_<name>``. ``carry`` is what a
    multi-step trial hands on to the task's ``end_step`` hook (e.g. the emulator state where a
    rollout stopped); it is never shown to the optimizer nor logged as feedback, and must be
    JSON-serializable (it is kept in the evaluation cache).
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
    carry: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Trial":
        trace = tuple(TraceStep(**step) for step in data.get("trace") or ())
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{**{k: v for k, v in data.items() if k in known}, "trace": trace})


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
    * ``evaluate(version, examples, context)`` returns exactly one :class:`Trial` per example, in
      the same order, with ``example_id`` set to the example's id. ``context``
      (:class:`EvalContext`) says why the loop evaluates: the phase, the step, the parent of a
      candidate, the environment steps of a rollout. It must not raise because the artifact
      misbehaves: exceptions, timeouts and invalid outputs of the artifact become low-scoring
      trials with feedback. It may raise for failures of the infrastructure itself (e.g. the
      task LLM endpoint is unreachable). Generated code must never run in the caller's process.
      A task written before ``context`` existed (``evaluate(version, examples)``) still works.
    * ``evaluate`` may run trials concurrently, and must be a function of the version, the
      examples, the context and the task's state (below), up to the nondeterminism of an LLM it
      calls: the loop caches trials by (version content, :meth:`trial_key`, task fingerprint), so
      a trial must not depend on which other evaluations ran before it. Feedback that depends on
      the loop's history (how a version compares with its parent, its validation result) is
      added by the loop, see ``feedback_notes``.
    * ``close()`` releases processes, emulators and connections; calling it twice is harmless.

    Optional hooks (looked up with ``getattr``; a task defines only what it needs)
    ------------------------------------------------------------------------------
    * ``multi_step: bool`` -- trials carry traces; ``credit_horizon``/``update_every`` apply.
    * ``end_step(step, version, trials)`` -- the episodic hook: called once per step, after the
      step's decision, with the batch trials of the version that played the step's environment
      steps (``trials`` of phase ``batch``). A task whose episodes continue across updates moves
      its environments on here (from ``Trial.carry``), never inside ``evaluate``.
    * ``state_dict() -> dict`` / ``load_state_dict(state)`` -- task state that the next step
      depends on (JSON-serializable). The loop stores it in every step's checkpoint (after
      ``end_step``) and restores it on resume, so a resumed loop sends the same learning
      contexts as an uninterrupted one (GEPA's ``get_adapter_state``/``set_adapter_state``).
    * ``trial_key(example, context) -> str | None`` -- what identifies the trial's input beyond
      the version (default: ``example.id``); ``None`` means "do not cache this trial".
    * ``feedback_notes: tuple[str, ...]`` -- history notes the loop appends to the feedback of
      ``batch`` and ``candidate`` trials: ``"validation"`` (the version's validation result)
      and ``"improvement"`` (how it compares with its parent on the same example, and how many
      proposals made from it did not improve on it, with ``improvement_directions``).
    * ``fingerprint() -> str`` -- anything beyond the loop config that changes trials (data
      version, say); part of the evaluation-cache key.
    * ``precheck(version) -> str | None`` -- a cheap run of a candidate before it is scored
      (OpenEvolve's evaluation cascade): ``None`` when it works, else the error on its first
      line and detail (a traceback tail) after it. A failure is sent back to the optimizer as a
      repair instead of costing a scored trial (loop config ``precheck``, default true). It
      must run generated code the way ``evaluate`` does (in the sandbox), never in-process.
    * ``quick_fix(version, problem) -> tuple[dict[str, str], str] | None`` -- a mechanical fix
      of a ``precheck`` problem (e.g. the import of a name the environment has): the complete
      new values and a one-line note, or ``None``. The fixed values are prechecked again and,
      when they work, adopted in place of the answer's with the note recorded as a repair (the
      optimizer's answer is never run in-process to make the fix).
    """

    name: str
    objective: str
    spec: ArtifactSpec

    def examples(self, split: str) -> Sequence[Example]: ...

    def evaluate(self, version: ArtifactVersion, examples: Sequence[Example],
                 context: EvalContext | None = None) -> list[Trial]: ...

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
