"""What the loop remembers of every evaluation: per version, per example, the score and error.

The history is part of every checkpoint, so everything derived from it survives resume
unchanged: the feedback notes below, Pareto selection, duplicate detection. It is the core's
answer to tasks that used to keep lineage of their own to write "better than its parent"
feedback: any task opts in with ``feedback_notes`` (see :class:`mlflow_genopt.task.Task`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Sequence

from .artifact import ArtifactVersion
from .task import Trial

NOTES = ("validation", "improvement")
DEFAULT_DIRECTIONS = (
    "try a different approach to the part of the artifact that the feedback points at",
    "undo the last change and make one small, targeted change instead",
    "look at the failing trials' feedback again and address its most common cause",
)
_EPS = 1e-12


@dataclass
class History:
    """Scores and errors by version id and example id, the lineage (parent and children of
    every version that was evaluated) and which examples are validation examples."""

    outcomes: dict[str, dict[str, tuple[float, str | None]]] = field(default_factory=dict)
    parents: dict[str, str | None] = field(default_factory=dict)
    children: dict[str, list[str]] = field(default_factory=dict)
    validated: dict[str, list[str]] = field(default_factory=dict)  # version -> val example ids

    def record(self, version: ArtifactVersion, trials: Sequence[Trial], *,
               validation: bool = False) -> None:
        vid = version.version_id
        if vid not in self.parents:
            self.parents[vid] = version.parent_id
            if version.parent_id is not None:
                self.children.setdefault(version.parent_id, []).append(vid)
        own = self.outcomes.setdefault(vid, {})
        for trial in trials:
            own[trial.example_id] = (float(trial.score), trial.error)
        if validation:
            self.validated[vid] = [t.example_id for t in trials]

    def scores(self, version_id: str) -> dict[str, float]:
        return {e: s for e, (s, _) in self.outcomes.get(version_id, {}).items()}

    def validation(self, version_id: str) -> list[tuple[str, float, str | None]] | None:
        ids = self.validated.get(version_id)
        if ids is None:
            return None
        own = self.outcomes.get(version_id, {})
        return [(e, *own[e]) for e in ids if e in own]

    def failed_children(self, version_id: str) -> list[str]:
        """Children of ``version_id`` that did not beat it on any example both were scored on."""
        own = self.scores(version_id)
        failed = []
        for child in self.children.get(version_id, []):
            theirs = self.scores(child)
            common = [e for e in theirs if e in own]
            if common and not any(theirs[e] > own[e] + _EPS for e in common):
                failed.append(child)
        return failed

    # --- checkpoint form ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"outcomes": {v: {e: list(o) for e, o in ex.items()} for v, ex in self.outcomes.items()},
                "parents": dict(self.parents), "children": {k: list(v) for k, v in self.children.items()},
                "validated": {k: list(v) for k, v in self.validated.items()}}

    @classmethod
    def from_dict(cls, data: Mapping | None) -> "History":
        if not data:
            return cls()
        return cls({v: {e: (float(o[0]), o[1]) for e, o in ex.items()} for v, ex in data["outcomes"].items()},
                   dict(data["parents"]), {k: list(v) for k, v in data["children"].items()},
                   {k: list(v) for k, v in data["validated"].items()})


def annotate(trials: Sequence[Trial], version: ArtifactVersion, history: History,
             notes: Iterable[str], directions: Sequence[str] = DEFAULT_DIRECTIONS) -> list[Trial]:
    """``trials`` of ``version`` with the requested history notes appended to their feedback.

    Uses the history as it stood before these trials were recorded, plus the trials' own
    scores, so the text is a function of the checkpointed history (identical on resume)."""
    notes = tuple(notes)
    if not notes:
        return list(trials)
    directions = tuple(directions) or DEFAULT_DIRECTIONS
    validation = _validation_note(version, history) if "validation" in notes else None
    annotated = []
    for trial in trials:
        lines = [validation] if validation else []
        if "improvement" in notes:
            lines.extend(_improvement_notes(version, trial, history, directions))
        if lines:
            trial = replace(trial, feedback="\n".join([trial.feedback, *lines]) if trial.feedback
                            else "\n".join(lines))
        annotated.append(trial)
    return annotated


def _validation_note(version: ArtifactVersion, history: History) -> str:
    results = history.validation(version.version_id)
    if results is None:
        return ("Validation of this version: not run yet (a version is validated when it is "
                "adopted).")
    if not results:
        return "Validation of this version: no validation examples."
    scores = [s for _, s, _ in results]
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    text = (f"Validation of this version: mean score {mean:.4g} (std {std:.3g}) over "
            f"{len(scores)} example(s).")
    failed = [(e, err) for e, _, err in results if err]
    if failed:
        text += f" It failed on {len(failed)} of them, first: {failed[0][1]}"
    return text


def _improvement_notes(version: ArtifactVersion, trial: Trial, history: History,
                       directions: Sequence[str]) -> list[str]:
    lines = []
    parent = version.parent_id
    parent_score = history.scores(parent).get(trial.example_id) if parent else None
    if parent_score is not None:
        delta = trial.score - parent_score
        if trial.error is not None:
            lines.append(f"No improvement: this version failed where its parent {parent} scored "
                         f"{parent_score:.4f}; fix the error above or undo the change.")
        elif delta > _EPS:
            lines.append(f"Improvement: +{delta:.4f} over its parent {parent} on this example.")
        else:
            failed = len(history.failed_children(parent))  # earlier siblings that failed
            lines.append(f"No improvement: {delta:+.4f} against its parent {parent} on this "
                         f"example; the change did not help. Next, "
                         f"{directions[failed % len(directions)]}.")
    failed = history.failed_children(version.version_id)
    if failed:
        lines.append(f"{len(failed)} proposal(s) made from this version did not improve on it "
                     f"({', '.join(failed[-3:])}). Next, {directions[len(failed) % len(directions)]}.")
    return lines


__all__ = ["DEFAULT_DIRECTIONS", "History", "NOTES", "annotate"]
