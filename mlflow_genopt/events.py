"""What the learning loop reports, and the callback interface listeners implement.

Data flows one way: the loop calls these methods; tracking (MLflow) and studies (Optuna)
listen. The records are plain, JSON-serializable dataclasses so that a listener can persist
them as they are.

Ordering guarantees, for every loop: ``on_loop_start`` first; then the starting version's
``on_version``; then per step, any ``on_llm_call`` of that step, the ``on_version`` of every
valid candidate of the step (in candidate order), and ``on_step``; finally ``on_loop_end``. A listener
that raises :class:`StopLoop` from ``on_step`` ends the loop after that step (pruning, budgets);
any other exception from a listener propagates and aborts the loop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from .artifact import ArtifactSpec, ArtifactVersion
from .config import LoopConfig
from .llm.base import LLMCall
from .task import Trial


class StopLoop(Exception):
    """Raised by a listener's ``on_step`` to end the loop cleanly after the current step.

    ``reason`` is recorded as the loop's stop reason (e.g. ``"pruned"``, ``"budget: max_tokens"``).
    ``conclude=False``: the loop is abandoned, like a pruned one - the test split is not
    evaluated and nothing is exported (a study whose budget is spent must not spend more).
    """

    def __init__(self, reason: str, *, conclude: bool = True):
        super().__init__(reason)
        self.reason = reason
        self.conclude = conclude


@dataclass(frozen=True)
class LoopStart:
    config: LoopConfig
    task_name: str
    objective: str
    spec: ArtifactSpec
    initial: ArtifactVersion


@dataclass(frozen=True)
class VersionRecord:
    """An evaluated artifact version. ``status``: ``initial``, ``accepted`` or ``rejected``.

    ``val_score`` is ``None`` for rejected candidates: only versions the loop adopts are scored
    on the validation split (that is what checkpoint selection compares). ``candidate`` is the
    version's index among the candidates of its step (siblings share the step and the parent);
    ``None`` for the starting version."""

    version: ArtifactVersion
    status: str
    batch_score: float | None
    val_score: float | None
    reasoning: str = ""
    val_metrics: Mapping[str, float] = field(default_factory=dict)
    candidate: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.version.to_dict(),
            "status": self.status,
            "batch_score": self.batch_score,
            "val_score": self.val_score,
            "val_metrics": dict(self.val_metrics),
            "reasoning": self.reasoning,
            "candidate": self.candidate,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VersionRecord":
        return cls(ArtifactVersion.from_dict(data), data["status"], data["batch_score"],
                   data["val_score"], data.get("reasoning", ""), data.get("val_metrics", {}),
                   data.get("candidate"))


@dataclass(frozen=True)
class Attempt:
    """One answer of the optimizer for one candidate: the first one, or a repair.

    ``followup`` holds the messages sent after the step's learning context for this attempt
    (empty for the first: it was the context itself); ``invalid_reason`` is ``None`` for the
    answer that was adopted as the candidate. ``seed`` and ``temperature``: how it was drawn."""

    raw: str
    invalid_reason: str | None
    followup: tuple[Mapping[str, str], ...] = ()
    finish_reason: str | None = None
    seed: int | None = None
    temperature: float | None = None


@dataclass(frozen=True)
class CandidateRecord:
    """One candidate of a step: its attempts, what it proposed, and how it scored on the batch.

    ``repairs`` lists automatic fixes the core applied to a valid answer (e.g. a prompt's missing
    placeholder appended)."""

    index: int
    attempts: tuple[Attempt, ...]
    proposal: Mapping[str, str] | None
    reasoning: str
    invalid_reason: str | None
    version_id: str | None = None
    batch_score: float | None = None
    trials: tuple[Trial, ...] = ()
    repairs: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        return self.invalid_reason is None

    @property
    def first_try_valid(self) -> bool:
        return bool(self.attempts) and self.attempts[0].invalid_reason is None


@dataclass(frozen=True)
class StepRecord:
    """Everything one optimization step saw and decided.

    ``current_id`` is the version the step improved (chosen by ``selection``); ``batch_score``
    and ``trials`` are its trials on the step's batch. ``raw_response``, ``proposal``,
    ``reasoning``, ``invalid_reason`` and ``candidate_*`` describe the step's chosen candidate:
    the valid one with the best batch score (ties: the lowest index), or the first candidate
    when none was valid; ``candidates`` holds all of them. Usage figures (tokens, calls,
    retries) count every LLM call made during the step."""

    step: int
    batch_ids: tuple[str, ...]
    current_id: str
    batch_score: float
    trials: tuple[Trial, ...]
    context: tuple[Mapping[str, str], ...]
    raw_response: str
    proposal: Mapping[str, str] | None
    reasoning: str
    invalid_reason: str | None
    candidate_id: str | None
    candidate_batch_score: float | None
    candidate_trials: tuple[Trial, ...]
    val_score: float | None
    accepted: bool
    best_id: str
    best_val_score: float
    invalid_total: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    llm_latency_s: float
    llm_calls: int
    cached_calls: int
    eval_time_s: float
    wall_time_s: float
    val_metrics: Mapping[str, float] = field(default_factory=dict)
    note: str = ""  # loop decisions beyond accept/reject, e.g. a revert to the best version
    checkpoint: Mapping[str, Any] = field(default_factory=dict)  # LoopState after this step
    llm_retries: int = 0  # failed LLM requests that were retried (timeouts, 429, 5xx, drops)
    candidates: tuple[CandidateRecord, ...] = ()  # every candidate of the step, chosen or not
    selection: str = "current"  # the rule that chose current_id, the version this step improved
    cache_hits: int = 0  # trials served by the evaluation cache during this step
    llm_errors: int = 0  # LLM requests that failed for good during this step
    cached_tokens: int = 0  # tokens replayed from the response cache during this step
    shrink_level: int = 0  # how far the context was shrunk to fit the optimizer's window
    editable: tuple[str, ...] = ()  # the parameters this step could change (parameter_selection)

    @property
    def valid(self) -> bool:
        return self.invalid_reason is None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["valid"] = self.valid
        return data


@dataclass(frozen=True)
class LoopResult:
    config: LoopConfig
    selected: ArtifactVersion
    best_val_score: float
    test_score: float | None
    test_trials: tuple[Trial, ...]
    steps: tuple[StepRecord, ...]
    versions: tuple[VersionRecord, ...]
    stop_reason: str
    totals: Mapping[str, float] = field(default_factory=dict)
    export_dir: str | None = None  # files the task exported for the selected version
    # LLM usage of the phases outside steps ("initial": the starting version's validation,
    # "test": the final evaluation, "failed": failed attempts before a resume); with the
    # steps' usage they add up to ``totals``
    phase_usage: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


class LoopCallback:
    """Base class for listeners; every method is a no-op. Override what you need."""

    def on_loop_start(self, start: LoopStart) -> None:
        pass

    def on_version(self, record: VersionRecord) -> None:
        pass

    def on_llm_call(self, call: LLMCall) -> None:
        pass

    def on_step(self, record: StepRecord) -> None:
        pass

    def on_loop_end(self, result: LoopResult) -> None:
        pass


def dispatch(callbacks: Sequence[LoopCallback], method: str, *args: Any) -> None:
    for callback in callbacks:
        getattr(callback, method)(*args)
