"""The learning context: the exact chat messages sent to the optimizer for one update.

It holds the objective, every trainable parameter (its role, constraints and current value),
the frozen parameters for reference, a memory of recent versions with their scores and
feedback, the batch of trials (input, output, score, feedback, and each trace truncated to the
credit horizon), and the answer instructions of the edit format. When a context does not fit
the optimizer's window it is rebuilt at a higher *shrink level*: older memory goes first, then
trace steps are cut from the front (the cut steps summarised in one line), then long fields are
clipped harder; the level used is part of the step's record.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .artifact import ArtifactSpec, ArtifactVersion
from .formats import EditFormat
from .task import TraceStep, Trial

SYSTEM_PROMPT = (
    "You are an optimizer. You improve the trainable parameters of a system (code or prompts) "
    "from execution feedback. Read the objective, the current parameters and the feedback on a "
    "batch of trials, diagnose what went wrong, then propose new values. "
)


@dataclass(frozen=True)
class MemoryEntry:
    """A past version as the optimizer remembers it."""

    version_id: str
    step: int
    status: str  # accepted, rejected, invalid, initial
    batch_score: float | None
    val_score: float | None
    changed: Mapping[str, str]  # parameter values that differ from the then-current version
    feedback: str  # a short digest of the trials' feedback
    note: str = ""


@dataclass(frozen=True)
class Budget:
    """How much of each part a context shows at one shrink level."""

    memory: int | None  # most recent entries kept (None: all)
    trace_share: float  # share of each (horizon-truncated) trace kept, from the end
    field_chars: int  # cap of each input, output and feedback text


SHRINK_LEVELS = (
    Budget(None, 1.0, 1200),
    Budget(None, 0.5, 800),  # half the memory is dropped by ``_memory`` below
    Budget(1, 0.25, 500),
    Budget(0, 0.1, 300),
)


def truncate_trace(trace: Sequence[TraceStep], horizon: int | None) -> tuple[TraceStep, ...]:
    """The last ``horizon`` steps of a trace (all of it when ``horizon`` is None): the steps
    closest to the update are the ones whose credit the optimizer can assign."""
    if horizon is None or len(trace) <= horizon:
        return tuple(trace)
    return tuple(trace[-horizon:])


def clip(text: Any, limit: int) -> str:
    text = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False, default=str)
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit} more characters]"


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _memory(memory: Sequence[MemoryEntry], level: int) -> Sequence[MemoryEntry]:
    limit = SHRINK_LEVELS[level].memory
    if level == 1:
        limit = len(memory) // 2
    return memory if limit is None else memory[len(memory) - limit:] if limit else ()


def _summary(steps: Sequence[TraceStep]) -> str:
    actions = Counter(str(s.action) for s in steps)
    reward = sum(s.reward for s in steps)
    common = ", ".join(f"{a} x{n}" for a, n in actions.most_common(4))
    return f"({len(steps)} earlier steps summarised: total reward {reward:g}; actions {common})"


def build_context(objective: str, spec: ArtifactSpec, current: ArtifactVersion,
                  trials: Sequence[Trial], memory: Sequence[MemoryEntry], edit_format: EditFormat,
                  *, credit_horizon: int | None = None, level: int = 0) -> list[dict[str, str]]:
    """The messages for one update at shrink ``level`` (0: everything within the horizon)."""
    budget = SHRINK_LEVELS[level]
    limit = budget.field_chars
    parts = [f"# Objective\n{objective.strip()}", "# Trainable parameters"]
    for p in spec.trainable:
        label = "source code" if p.kind == "code" else "text"
        parts.append(f"## {p.name} ({p.kind})\nRole: {p.description}\nConstraints: "
                     f"{p.constraints()}\nCurrent {label} of {p.name}:\n{current.values[p.name]}")
    frozen = [p for p in spec.parameters if not p.trainable]
    if frozen:
        parts.append("# Frozen parameters (for reference; do not change)")
        for p in frozen:
            parts.append(f"## {p.name} ({p.kind})\n{p.description}\n{current.values[p.name]}")
    shown_memory = _memory(list(memory), level)
    if shown_memory:
        parts.append(f"# Recent versions (oldest first; current is {current.version_id})")
        for entry in shown_memory:
            scores = f"batch score {fmt(entry.batch_score)}, val score {fmt(entry.val_score)}"
            lines = [f"## {entry.version_id} (step {entry.step}, {entry.status}; {scores})"]
            if entry.note:
                lines.append(entry.note)
            for name, value in entry.changed.items():
                lines.append(f"{name} was:\n{clip(value, limit)}")
            if entry.feedback:
                lines.append(f"Feedback: {clip(entry.feedback, limit)}")
            parts.append("\n".join(lines))
    parts.append(f"# Batch of {len(trials)} trial(s) with the current version")
    for i, trial in enumerate(trials, 1):
        lines = [
            f"## Trial {i}",
            f"Input: {clip(trial.input, limit)}",
            f"Output: {clip(trial.output, limit)}",
            f"Score: {fmt(trial.score)}",
            f"Feedback: {clip(trial.feedback, limit)}",
        ]
        if trial.trace:
            within = truncate_trace(trial.trace, credit_horizon)
            keep = max(1, int(len(within) * budget.trace_share)) if budget.trace_share < 1 else len(within)
            shown, cut = within[len(within) - keep:], within[:len(within) - keep]
            lines.append(f"Trace (last {len(shown)} of {len(trial.trace)} steps: observation -> "
                         "action, reward):")
            if cut:
                lines.append(_summary(cut))
            for step in shown:
                lines.append(f"- {clip(step.observation, 300)} -> {clip(step.action, 80)}, {step.reward:g}")
        parts.append("\n".join(lines))
    parts.append("# Your answer\n" + edit_format.instructions(spec))
    return [{"role": "system", "content": SYSTEM_PROMPT + edit_format.system_text(spec)},
            {"role": "user", "content": "\n\n".join(parts)}]


__all__ = ["Budget", "MemoryEntry", "SHRINK_LEVELS", "SYSTEM_PROMPT", "build_context", "clip",
           "fmt", "truncate_trace"]
