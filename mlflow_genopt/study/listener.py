"""What a running loop reports to its Optuna trial, step by step (the loop-callback side of a
trial; :mod:`.runner` owns the trial itself)."""

from __future__ import annotations

from typing import Any

import optuna

from ..events import LoopCallback, LoopStart, StepRecord, StopLoop, VersionRecord
from ..usage import UsageMeter


class _TrialListener(LoopCallback):
    """Reports a loop to its Optuna trial: per step the score (pruning), the curve and the spend
    so far (so that a pruned, failed or killed loop leaves what it used)."""

    def __init__(self, trial: optuna.Trial, tracker: Any, *, report: bool, prune: bool,
                 budget: Any = None) -> None:
        self.trial = trial
        self.tracker = tracker
        self.report = report
        self.prune = prune
        self.budget = budget  # spend so far -> the study budget reached, or None
        self.pruned_at: int | None = None
        self.budget_stop: str | None = None
        self.curve: list[list[Any]] = []
        self.usage = UsageMeter()  # the loop's one meter: run_loop counts into it

    def on_loop_start(self, start: LoopStart) -> None:
        if self.tracker is not None and self.tracker.run_id:
            self.trial.set_user_attr("mlflow_run_id", self.tracker.run_id)

    def on_version(self, record: VersionRecord) -> None:
        if record.status == "initial":  # the curve starts at the starting version's score
            self.curve.append([0, record.val_score, record.val_score, self.spend()["tokens"]])

    def spend(self) -> dict[str, Any]:
        """Tokens of every call (cache hits included), tokens spent, calls and cost so far."""
        usage = self.usage
        return {"tokens": usage.tokens, "tokens_spent": usage.tokens_spent,
                "llm_calls": int(usage.total["llm_calls"]), "cost_usd": usage.total["cost_usd"]}

    def on_step(self, record: StepRecord) -> None:
        spend = self.spend()
        self.curve.append([record.step, record.best_val_score, record.val_score, spend["tokens"]])
        self.trial.set_user_attr("curve", self.curve)
        self.trial.set_user_attr("spend", spend)
        reason = self.budget(spend) if self.budget is not None else None
        if reason is not None:
            self.budget_stop = reason
            raise StopLoop(reason, conclude=False)  # a spent budget buys no test evaluation
        if not self.report:
            return
        self.trial.report(record.best_val_score, record.step)
        if self.prune and self.trial.should_prune():
            self.pruned_at = record.step
            raise StopLoop("pruned")
