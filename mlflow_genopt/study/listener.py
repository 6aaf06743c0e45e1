"""What a running loop reports to its Optuna trial, step by step (the loop-callback side of a
trial; :mod:`.runner` owns the trial itself)."""

from __future__ import annotations

import threading
from typing import Any

import optuna

from ..events import LoopCallback, LoopStart, StepRecord, StopLoop, VersionRecord
from ..llm.base import LLMCall


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
        self.tokens = 0
        self.tokens_spent = 0
        self.llm_calls = 0
        self.cost_usd = 0.0
        self._lock = threading.Lock()

    def on_loop_start(self, start: LoopStart) -> None:
        if self.tracker is not None and self.tracker.run_id:
            self.trial.set_user_attr("mlflow_run_id", self.tracker.run_id)

    def on_version(self, record: VersionRecord) -> None:
        if record.status == "initial":  # the curve starts at the starting version's score
            self.curve.append([0, record.val_score, record.val_score, self.spend()["tokens"]])

    def on_llm_call(self, call: LLMCall) -> None:
        completion = call.completion
        if completion is None:
            return
        tokens = completion.prompt_tokens + completion.completion_tokens
        with self._lock:
            self.llm_calls += 1
            self.tokens += tokens
            if not completion.cached:
                self.tokens_spent += tokens
                self.cost_usd += completion.cost_usd or 0.0

    def spend(self) -> dict[str, Any]:
        with self._lock:
            return {"tokens": self.tokens, "tokens_spent": self.tokens_spent,
                    "llm_calls": self.llm_calls, "cost_usd": self.cost_usd}

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
