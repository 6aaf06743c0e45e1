"""Adaptive time limits: a sandbox timeout that follows the starting version's measured time.

A fixed per-trial timeout has to be generous enough for any reasonable artifact (the ML
pipeline's is 120 s), so a proposal that hangs (``while True: pass``) costs that much on every
trial of every evaluation. :class:`AdaptiveTimeLimit` measures how long the *starting version*
takes per trial and allows a multiple of it instead::

    limit = min(maximum_s, max(floor_s, factor * measured_s rounded up to granularity_s))

Before anything is measured (and with ``factor=0``) the limit is ``maximum_s``. The measurement
is the task's state (``state_dict``), so a resumed loop uses the limit the interrupted one had.
:meth:`exceeded` is the feedback a timed-out trial gets: the limit, how it was set, and that it
was exceeded, so the optimizer knows to make the code faster rather than guess. The measured
time itself is not in that text, and the limit is rounded up to whole ``granularity_s`` (5 s),
so that the same loop run again usually sends the same learning contexts (the response cache
then answers them) although no two measurements are equal.

A task uses it like this (see ``genopt_projects.ml_pipeline.task``)::

    self.time_limit = AdaptiveTimeLimit(maximum_s=120, factor=5, floor_s=20)
    limit = self.time_limit.limit()               # seconds per trial for this evaluation
    started = time.monotonic()
    results = run_function(..., limits=SandboxLimits(timeout_s=limit * len(calls)))
    if version.parent_id is None and all(r.ok for r in results):   # the starting version
        self.time_limit.observe((time.monotonic() - started) / len(calls))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

TIMEOUT_PREFIX = "time limit exceeded"


@dataclass
class AdaptiveTimeLimit:
    """Seconds one trial may take: ``factor`` x the starting version's measured seconds per
    trial rounded up to a multiple of ``granularity_s``, at least ``floor_s``, at most
    ``maximum_s`` (``factor=0``: always ``maximum_s``). ``measured_s`` is the first observation
    (``None`` until then)."""

    maximum_s: float
    factor: float = 5.0
    floor_s: float = 20.0
    measured_s: float | None = None
    granularity_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("maximum_s", "floor_s", "granularity_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a number > 0, got {value!r}")
        if not (isinstance(self.factor, (int, float)) and math.isfinite(self.factor)
                and (self.factor == 0 or self.factor >= 1)):
            raise ValueError(f"factor: must be 0 (off) or a number >= 1, got {self.factor!r}")

    @property
    def adaptive(self) -> bool:
        return self.factor > 0

    @property
    def needs_measurement(self) -> bool:
        return self.adaptive and self.measured_s is None

    def limit(self) -> float:
        """Seconds per trial now."""
        if not self.adaptive or self.measured_s is None:
            return float(self.maximum_s)
        raw = math.ceil(self.factor * self.measured_s / self.granularity_s - 1e-9) * self.granularity_s
        return float(min(self.maximum_s, max(self.floor_s, raw)))

    def observe(self, seconds_per_trial: float) -> None:
        """Record the starting version's seconds per trial (the first observation counts)."""
        if self.measured_s is None and math.isfinite(seconds_per_trial) and seconds_per_trial >= 0:
            self.measured_s = round(float(seconds_per_trial), 3)

    def describe(self) -> str:
        """How the current limit was set, in words."""
        if not self.adaptive:
            return f"the fixed limit timeout_s={self.maximum_s:g} s (timeout_factor=0)"
        if self.measured_s is None:
            return (f"the maximum timeout_s={self.maximum_s:g} s, until the starting version's "
                    "time is measured")
        return (f"timeout_factor {self.factor:g} x the starting version's time per trial (rounded "
                f"up to {self.granularity_s:g} s), at least timeout_floor_s={self.floor_s:g} s, at "
                f"most timeout_s={self.maximum_s:g} s")

    def exceeded(self, trials: int = 1, advice: str = "Make the code faster.") -> str:
        """The error of a trial that was stopped at the limit (one line, for the optimizer);
        ``trials``: how many trials shared the sandbox process (and its summed budget)."""
        limit = self.limit()
        together = f" ({trials} trials ran in one process: {trials * limit:g} s together)" if trials > 1 else ""
        return (f"{TIMEOUT_PREFIX}: a trial may take {limit:g} s{together}, and this one did not "
                f"finish in time; the limit is {self.describe()}. {advice}")

    def state_dict(self) -> dict[str, Any]:
        return {"measured_s": self.measured_s}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        measured = (state or {}).get("measured_s")
        self.measured_s = float(measured) if isinstance(measured, (int, float)) else None


__all__ = ["AdaptiveTimeLimit", "TIMEOUT_PREFIX"]
