"""Counting LLM usage: the one meter every caller reads (loops, studies, budgets).

Every LLM call of a loop, whichever phase made it (the starting version's validation, a step,
the final test evaluation), is counted once in the loop's totals and once in the bucket of
the phase that made it, so that the per-phase figures add up to the totals. A phase that fails
before it commits is counted too: the loop reports it as failed usage, which a resumed loop
carries into its totals (:meth:`LearningLoop.failed_usage`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .events import LoopCallback
from .llm.base import LLMCall

KEYS = ("prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd", "llm_calls",
        "cached_calls", "optimizer_calls", "optimizer_latency_s", "llm_errors", "llm_retries")


@dataclass
class UsageMeter(LoopCallback):
    """Thread-safe LLM usage counters: for the current phase (``step``: reset by the loop when a
    step, the initial validation or the test evaluation begins) and for the whole loop
    (``total``). ``prompt_tokens``/``completion_tokens``/``cost_usd`` count what was spent
    (cache hits excluded); ``cached_tokens`` what cache hits replayed."""

    step: dict[str, float] = field(default_factory=dict)
    total: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    KEYS = KEYS

    def __post_init__(self) -> None:
        self.step = dict.fromkeys(KEYS, 0.0)
        self.total = dict.fromkeys(KEYS, 0.0)

    def on_llm_call(self, call: LLMCall) -> None:
        c = call.completion
        delta = dict.fromkeys(KEYS, 0.0)
        if c is None:
            delta["llm_errors"] = 1
        else:
            delta["llm_calls"] = 1
            if c.cached:
                delta["cached_calls"] = 1
                delta["cached_tokens"] = c.prompt_tokens + c.completion_tokens
            else:
                delta["prompt_tokens"] = c.prompt_tokens
                delta["completion_tokens"] = c.completion_tokens
                delta["cost_usd"] = c.cost_usd or 0.0
            if call.purpose == "optimizer":
                delta["optimizer_calls"] = 1
                delta["optimizer_latency_s"] = (call.end_time_ns - call.start_time_ns) / 1e9
        self._add(delta)

    def count_retry(self, attempt: int, error: str, sleep_s: float) -> None:
        """An LLM backend's ``on_retry`` hook: one failed attempt that will be retried."""
        self._add({"llm_retries": 1})

    def _add(self, delta: dict[str, float]) -> None:
        with self._lock:
            for key, value in delta.items():
                if value:
                    self.step[key] += value
                    self.total[key] += value

    def reset_step(self) -> None:
        with self._lock:
            self.step = dict.fromkeys(KEYS, 0.0)

    def restore(self, total: dict[str, float]) -> None:
        with self._lock:
            self.total = {**dict.fromkeys(KEYS, 0.0), **total}

    def carry(self, usage: dict[str, float]) -> None:
        """Add usage spent before this meter existed (e.g. by a failed attempt of a resumed
        loop) to the totals only."""
        with self._lock:
            for key, value in usage.items():
                if key in self.total:
                    self.total[key] += value

    @property
    def tokens(self) -> int:
        """Tokens of every call, cache hits included."""
        with self._lock:
            t = self.total
            return int(t["prompt_tokens"] + t["completion_tokens"] + t["cached_tokens"])

    @property
    def tokens_spent(self) -> int:
        with self._lock:
            return int(self.total["prompt_tokens"] + self.total["completion_tokens"])


__all__ = ["KEYS", "UsageMeter"]
