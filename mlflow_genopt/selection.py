"""Selection: which adopted version the next step improves (``LoopConfig.selection``).

* ``current``: the latest adopted version (the study's loops; after a revert, the best one).
* ``best``: the adopted version with the best validation score (ties: the earlier one).
* ``pareto``: GEPA's rule. For every validation example, the adopted versions with the best
  score on it; the versions that are best on at least one example form the frontier. A parent
  is drawn from the frontier with probability proportional to the number of examples it is best
  on (its coverage), with the loop's seeded RNG, so selection is reproducible and resumable.
  Without validation examples it falls back to ``current``.
"""

from __future__ import annotations

import random
from typing import Sequence

from .artifact import ArtifactVersion
from .history import History

SELECTIONS = ("current", "best", "pareto")
_EPS = 1e-12


def pareto_frontier(versions: Sequence[ArtifactVersion], history: History) -> dict[str, int]:
    """Coverage of every frontier version: version id -> number of validation examples on which
    it has the best score (several versions tie on an example: each counts it)."""
    scores = {v.version_id: {e: s for e, s, _ in (history.validation(v.version_id) or [])}
              for v in versions}
    examples = sorted({e for own in scores.values() for e in own})
    coverage: dict[str, int] = {}
    for example in examples:
        values = {vid: own[example] for vid, own in scores.items() if example in own}
        top = max(values.values())
        for vid, value in values.items():
            if value >= top - _EPS:
                coverage[vid] = coverage.get(vid, 0) + 1
    return {v.version_id: coverage[v.version_id] for v in versions if v.version_id in coverage}


def select_parent(rule: str, *, current: ArtifactVersion, best: ArtifactVersion,
                  adopted: Sequence[ArtifactVersion], history: History,
                  rng: random.Random) -> ArtifactVersion:
    """The version the next step improves under ``rule`` (see the module docstring)."""
    if rule == "current":
        return current
    if rule == "best":
        return best
    if rule != "pareto":
        raise ValueError(f"selection: must be one of {', '.join(SELECTIONS)}, got {rule!r}")
    coverage = pareto_frontier(adopted, history)
    if not coverage:
        return current
    by_id = {v.version_id: v for v in adopted}
    ids = list(coverage)
    if len(ids) == 1:
        return by_id[ids[0]]
    (chosen,) = rng.choices(ids, weights=[coverage[i] for i in ids])
    return by_id[chosen]


__all__ = ["SELECTIONS", "pareto_frontier", "select_parent"]
