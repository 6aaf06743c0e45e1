"""The loop's checkpoint: everything a loop needs to continue after a step, JSON-serializable.

A step's checkpoint is written with the step (``StepRecord.checkpoint``); resuming from it
restores the RNG, the versions and their scores, the memory, the evaluation history and the
task's own state (``Task.state_dict``), so the resumed loop sends the same learning contexts and
makes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

from .artifact import ArtifactVersion
from .events import VersionRecord
from .history import History
from .context import MemoryEntry


@dataclass
class LoopState:
    """After ``step``: the current version (the latest adopted one, or the best after a revert)
    and its validation score, the best version, every evaluated version, the memory shown to
    the optimizer, the RNG, counters, the evaluation history and the task's state."""

    step: int
    current: ArtifactVersion
    current_val: float
    best: ArtifactVersion
    best_val: float
    versions: list[VersionRecord]
    memory: list[MemoryEntry]
    rng: list
    invalid_total: int = 0
    steps_below_best: int = 0
    usage_total: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    history: History = field(default_factory=History)
    task_state: Any = None
    initial_usage: dict[str, float] = field(default_factory=dict)  # the starting version's phase
    # LLM usage of phases that failed before they committed (redone since), cumulative;
    # included in usage_total
    failed_usage: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(cls, initial: ArtifactVersion, value: float, record: VersionRecord,
              rng: random.Random, history: History) -> "LoopState":
        state = cls(0, initial, value, initial, value, [record], [], [], history=history)
        state.set_rng(rng)
        return state

    def set_rng(self, rng: random.Random) -> None:
        version, internal, gauss = rng.getstate()
        self.rng = [version, list(internal), gauss]

    def rng_state(self) -> tuple:
        version, internal, gauss = self.rng
        return (version, tuple(internal), gauss)

    @property
    def adopted(self) -> list[VersionRecord]:
        """Versions the loop adopted (the starting one included), oldest first."""
        return [v for v in self.versions if v.status in ("initial", "accepted")]

    def known(self) -> dict[str, VersionRecord]:
        """Every evaluated version by content hash: a proposal equal to one of them is refused."""
        return {v.version.content_hash: v for v in self.versions}

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "current": self.current.to_dict(), "current_val": self.current_val,
            "best": self.best.to_dict(), "best_val": self.best_val,
            "versions": [v.to_dict() for v in self.versions],
            "memory": [asdict(m) for m in self.memory],
            "rng": self.rng,
            "invalid_total": self.invalid_total,
            "steps_below_best": self.steps_below_best,
            "usage_total": dict(self.usage_total),
            "elapsed_s": self.elapsed_s,
            "history": self.history.to_dict(),
            "task_state": self.task_state,
            "initial_usage": dict(self.initial_usage),
            "failed_usage": dict(self.failed_usage),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "LoopState":
        versions = [VersionRecord.from_dict(v) for v in data["versions"]]
        by_id = {v.version.version_id: v.version for v in versions}
        current = ArtifactVersion.from_dict(data["current"])
        best = ArtifactVersion.from_dict(data["best"])
        return cls(
            step=data["step"],
            # identity matters (``current is not best``): share the objects with ``versions``
            current=by_id.get(current.version_id, current), current_val=data["current_val"],
            best=by_id.get(best.version_id, best), best_val=data["best_val"],
            versions=versions,
            memory=[MemoryEntry(**m) for m in data["memory"]],
            rng=data["rng"],
            invalid_total=data["invalid_total"],
            steps_below_best=data["steps_below_best"],
            usage_total=data["usage_total"],
            elapsed_s=data["elapsed_s"],
            history=History.from_dict(data.get("history")),
            task_state=data.get("task_state"),
            initial_usage=data.get("initial_usage") or {},
            failed_usage=data.get("failed_usage") or {},
        )


__all__ = ["LoopState"]
