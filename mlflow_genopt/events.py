"""What the learning loop reports, and the callback interface listeners implement.

Data flows one way: the loop calls these methods; tracking (MLflow) and studies (Optuna)
listen. The records are plain, JSON-serializable dataclasses so that a listener can persist
them as they are.

Ordering guarantees, for every loop: ``on_loop_start`` first; then the starting version's
``on_version``; then per step, any ``on_llm_call`` of that step, the candidate's
``on_version`` (if the proposal was valid), and ``on_step``; finally ``on_loop_end``. A listener
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
    on the validation split (that is what checkpoint selection compares)."""

    version: ArtifactVersion
    status: str
    batch_score: float | None
    val_score: float | None
    reasoning: str = ""
    val_metrics: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.version.to_dict(),
            "status": self.status,
            "batch_score": self.batch_score,
            "val_score": self.val_score,
            "val_metrics": dict(self.val_metrics),
            "reasoning": self.reasoning,
        }


@dataclass(frozen=True)
class StepRecord:
    """Everything one optimization step saw and decided."""

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
