"""Progress lines on stderr: one per step (scores, decision, tokens, time), and the end."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .events import LoopCallback, LoopResult, StepRecord, VersionRecord


class ProgressPrinter(LoopCallback):
    """One line per step on stderr: scores, decision, tokens, time."""

    def __init__(self, total_steps: int, stream: TextIO | None = None) -> None:
        self.total = total_steps
        self.stream = stream or sys.stderr
        self.started = time.monotonic()

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_version(self, record: VersionRecord) -> None:
        if record.status == "initial":
            self._print(f"[genopt] starting version {record.version.version_id}: "
                        f"val {record.val_score:.3f}")

    def on_step(self, r: StepRecord) -> None:
        if r.valid:
            decision = "accepted" if r.accepted else "rejected"
            detail = f"candidate {r.candidate_batch_score:.3f} {decision}"
        else:
            detail = f"invalid proposal ({r.invalid_reason[:60]})"
        val = f" val {r.val_score:.3f}" if r.val_score is not None else ""
        self._print(
            f"[genopt] step {r.step}/{self.total}  batch {r.batch_score:.3f} -> {detail}{val}  "
            f"best {r.best_val_score:.3f}  tokens {r.prompt_tokens + r.completion_tokens}  "
            f"{r.wall_time_s:.1f}s"
        )

    def on_loop_end(self, result: LoopResult) -> None:
        test = "n/a" if result.test_score is None else f"{result.test_score:.3f}"
        self._print(
            f"[genopt] done ({result.stop_reason}) in {time.monotonic() - self.started:.0f}s: "
            f"selected {result.selected.version_id}, val {result.best_val_score:.3f}, test {test}"
        )


__all__ = ["ProgressPrinter"]
