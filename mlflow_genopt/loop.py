"""The learning loop: sample a batch, run trials, build the context, propose, validate,
evaluate, accept or reject, checkpoint; at the end, score the selected version on test once.

Guarantees
----------
* Seeded: with the same config, task and LLM answers, two runs sample the same batches, send
  byte-identical learning contexts and make the same decisions (so the response cache can
  replay a whole loop with no LLM call).
* Never adopts an invalid proposal: a proposal that does not parse, breaks a parameter's
  constraints or changes nothing is counted (``invalid_total``), reported with its reason in the
  step record, and the loop goes on with the current version.
* Checkpoint selection: the selected version is the adopted version (the starting one
  included) with the highest validation score; ties keep the earlier version.
* The test split is evaluated once, for the selected version only, after the last step (not
  for loops that end ``interrupted`` — they are resumed later — or ``pruned``, or that a
  listener stopped with ``StopLoop(..., conclude=False)``).
* Listeners see every event in the order documented in :mod:`mlflow_genopt.events`.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from .artifact import ArtifactSpec, ArtifactVersion
from .config import ConfigError, LoopConfig
from .events import (
    LoopCallback,
    LoopResult,
    LoopStart,
    StepRecord,
    StopLoop,
    VersionRecord,
    dispatch,
)
from .llm.base import LLMCall
from .optimizer import MemoryEntry, Optimizer
from .task import Example, ExportingTask, Task, Trial, mean_score, summarize


@dataclass
class UsageMeter(LoopCallback):
    """Thread-safe LLM usage counters: per step (reset by the loop) and for the whole loop."""

    step: dict[str, float] = field(default_factory=dict)
    total: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    KEYS = ("prompt_tokens", "completion_tokens", "cost_usd", "llm_calls", "cached_calls",
            "optimizer_latency_s", "llm_errors", "llm_retries")

    def __post_init__(self) -> None:
        self.step = dict.fromkeys(self.KEYS, 0.0)
        self.total = dict.fromkeys(self.KEYS, 0.0)

    def on_llm_call(self, call: LLMCall) -> None:
        c = call.completion
        delta = dict.fromkeys(self.KEYS, 0.0)
        if c is None:
            delta["llm_errors"] = 1
        else:
            delta["llm_calls"] = 1
            delta["cached_calls"] = 1 if c.cached else 0
            if not c.cached:
                delta["prompt_tokens"] = c.prompt_tokens
                delta["completion_tokens"] = c.completion_tokens
                delta["cost_usd"] = c.cost_usd or 0.0
            if call.purpose == "optimizer":
                delta["optimizer_latency_s"] = (call.end_time_ns - call.start_time_ns) / 1e9
        with self._lock:
            for key, value in delta.items():
                self.step[key] += value
                self.total[key] += value

    def count_retry(self, attempt: int, error: str, sleep_s: float) -> None:
        """An LLM backend's ``on_retry`` hook: one failed attempt that will be retried."""
        with self._lock:
            self.step["llm_retries"] += 1
            self.total["llm_retries"] += 1

    def reset_step(self) -> None:
        with self._lock:
            self.step = dict.fromkeys(self.KEYS, 0.0)

    def restore(self, total: dict[str, float]) -> None:
        with self._lock:
            self.total = {**dict.fromkeys(self.KEYS, 0.0), **total}


def _digest(trials: Sequence[Trial], limit: int = 3) -> str:
    wrong = [t for t in trials if t.score < 1.0] or list(trials)
    return " | ".join(t.feedback.strip().replace("\n", " ")[:200] for t in wrong[:limit])


class LearningLoop:
    """One learning loop over ``task`` with the design choices of ``config``.

    ``optimizer`` wraps the optimizer LLM; ``usage`` (optional) is the meter that the LLM
    wrappers report to, so that per-step token counts land in step records.
    """

    def __init__(
        self,
        config: LoopConfig,
        task: Task,
        optimizer: Optimizer,
        initial_values: dict[str, str] | None = None,
        *,
        spec: ArtifactSpec | None = None,
        callbacks: Sequence[LoopCallback] = (),
        usage: UsageMeter | None = None,
    ) -> None:
        self.config = config
        self.task = task
        self.optimizer = optimizer
        try:
            self.spec = (spec or task.spec).with_trainable(config.trainable)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not self.spec.trainable:
            raise ConfigError("trainable: the starting artifact has no trainable parameter")
        values = dict(initial_values) if initial_values is not None else None
        if values is None or set(values) != set(self.spec.names):
            raise ConfigError(
                f"init: starting values must give exactly the parameters {list(self.spec.names)}"
            )
        self.initial = ArtifactVersion(values=values, step=0)
        self.callbacks = list(callbacks)
        self.usage = usage or UsageMeter()
        self.interrupted = False  # set (e.g. by a SIGINT handler) to stop after this step
        if self.usage not in self.callbacks:
            self.callbacks.insert(0, self.usage)

    def _emit(self, method: str, *args) -> None:
        dispatch(self.callbacks, method, *args)

    def _evaluate(self, version: ArtifactVersion, examples: Sequence[Example]) -> list[Trial]:
        trials = self.task.evaluate(version, examples)
        if len(trials) != len(examples):
            raise RuntimeError(
                f"task {self.task.name}: evaluate returned {len(trials)} trials for "
                f"{len(examples)} examples"
            )
        return trials

    def _validate(self, version: ArtifactVersion, val: Sequence[Example]):
        if not val:
            return 0.0, {}
        trials = self._evaluate(version, val)
        return mean_score(trials), summarize(trials)

    def _budget_exhausted(self, started: float) -> str | None:
        c, total = self.config, self.usage.total
        if c.max_tokens is not None and total["prompt_tokens"] + total["completion_tokens"] >= c.max_tokens:
            return "budget: max_tokens"
        if c.max_cost_usd is not None and total["cost_usd"] >= c.max_cost_usd:
            return "budget: max_cost_usd"
        if c.max_wall_time_s is not None and time.monotonic() - started >= c.max_wall_time_s:
            return "budget: max_wall_time_s"
        return None

    def run(self, resume: "LoopState | None" = None) -> LoopResult:
        """Run the loop; with ``resume`` (a checkpoint from :attr:`StepRecord.checkpoint`),
        continue after its step with the same RNG state, versions and memory."""
        config = self.config
        started = time.monotonic()
        train = list(self.task.examples("train"))
        val = list(self.task.examples("val"))
        if not train:
            raise ConfigError(f"task {self.task.name}: the train split is empty")

        self._emit("on_loop_start", LoopStart(config, self.task.name, self.task.objective,
                                              self.spec, self.initial))
        if resume is None:
            rng = random.Random(config.seed)
            value, metrics = self._validate(self.initial, val)
            initial_record = VersionRecord(self.initial, "initial", None, value,
                                           val_metrics=metrics)
            self._emit("on_version", initial_record)
            state = LoopState.start(self.initial, value, initial_record, rng)
        else:
            state = resume
            rng = random.Random()
            rng.setstate(state.rng_state())
            self.usage.restore(state.usage_total)
            started -= state.elapsed_s
        memory: deque[MemoryEntry] = deque(state.memory, maxlen=max(config.memory_size, 1))
        steps: list[StepRecord] = []
        stop_reason = "completed"
        conclude = True

        for step in range(state.step + 1, config.steps + 1):
            reason = self._budget_exhausted(started)
            if reason:
                stop_reason = reason
                break
            record = self._step(step, state, memory, rng, train, val, started)
            steps.append(record)
            try:
                self._emit("on_step", record)
            except StopLoop as stop:
                stop_reason, conclude = stop.reason, stop.conclude
                break
            if self.interrupted:
                stop_reason = "interrupted"
                break
            if config.target_score is not None and state.best_val >= config.target_score:
                stop_reason = "target_score reached"
                break

        best = state.best
        test_trials: list[Trial] = []
        export_dir = None
        # an interrupted loop is resumed later, a pruned one is abandoned: neither is concluded
        if conclude and stop_reason not in ("interrupted", "pruned"):
            test = list(self.task.examples("test"))
            test_trials = self._evaluate(best, test) if test else []
            if isinstance(self.task, ExportingTask):
                export_dir = tempfile.mkdtemp(prefix="genopt-export-")
                self.task.export(best, Path(export_dir))
        totals = dict(self.usage.total)
        totals.update(
            steps_run=state.step,
            invalid_proposals=state.invalid_total,
            accepted_proposals=sum(v.status == "accepted" for v in state.versions),
            wall_time_s=time.monotonic() - started,
        )
        result = LoopResult(
            config=config,
            selected=best,
            best_val_score=state.best_val,
            test_score=mean_score(test_trials) if test_trials else None,
            test_trials=tuple(test_trials),
            steps=tuple(steps),
            versions=tuple(state.versions),
            stop_reason=stop_reason,
            totals=totals,
            export_dir=export_dir,
        )
        self._emit("on_loop_end", result)
        return result

    def _step(self, step: int, state: "LoopState", memory: deque, rng: random.Random,
              train: Sequence[Example], val: Sequence[Example], started: float) -> StepRecord:
        """One optimization step; updates ``state`` and ``memory`` in place."""
        config = self.config
        step_start = time.monotonic()
        self.usage.reset_step()
        current = state.current
        batch = rng.sample(train, min(config.batch_size, len(train)))
        eval_time = 0.0

        t = time.monotonic()
        trials = self._evaluate(current, batch)
        eval_time += time.monotonic() - t
        batch_score = mean_score(trials)

        context = self.optimizer.build_context(
            self.task.objective, self.spec, current, trials,
            list(memory) if config.memory_size else [],
        )
        proposal = self.optimizer.propose(
            context, self.spec, current, seed=config.seed * 100_003 + step
        )

        candidate: ArtifactVersion | None = None
        candidate_trials: list[Trial] = []
        candidate_batch: float | None = None
        val_score: float | None = None
        val_metrics: dict[str, float] = {}
        note = ""
        accepted = False
        if not proposal.valid:
            state.invalid_total += 1
            memory.append(MemoryEntry(
                f"(invalid proposal at step {step})", step, "invalid", None, None, {}, "",
                note=f"Rejected without evaluation: {proposal.invalid_reason}",
            ))
        else:
            candidate = current.child(proposal.values, step)
            t = time.monotonic()
            candidate_trials = self._evaluate(candidate, batch)
            candidate_batch = mean_score(candidate_trials)
            accepted = _accept(config.acceptance, candidate_batch, batch_score)
            if accepted:
                if val:
                    val_score, val_metrics = self._validate(candidate, val)
                else:
                    val_score = candidate_batch
            eval_time += time.monotonic() - t
            record = VersionRecord(candidate, "accepted" if accepted else "rejected",
                                   candidate_batch, val_score, proposal.reasoning,
                                   val_metrics=val_metrics)
            state.versions.append(record)
            self._emit("on_version", record)
            memory.append(MemoryEntry(
                candidate.version_id, step, record.status, candidate_batch, val_score,
                {} if accepted else dict(proposal.values),
                _digest(candidate_trials),
                note="" if accepted else f"Rejected: batch score {candidate_batch:.4g} vs "
                                         f"{batch_score:.4g} of {current.version_id}.",
            ))
            if accepted:
                state.current, state.current_val = candidate, val_score
                if val_score > state.best_val:
                    state.best, state.best_val = candidate, val_score

        if config.revert_ratio is not None:
            threshold = state.best_val - (1 - config.revert_ratio) * abs(state.best_val)
            below = state.current is not state.best and state.current_val < threshold
            state.steps_below_best = state.steps_below_best + 1 if below else 0
            if state.steps_below_best > config.revert_patience:
                note = (f"reverted to {state.best.version_id}: val score below {threshold:.4g} "
                        f"for {state.steps_below_best} steps")
                state.current, state.current_val = state.best, state.best_val
                state.steps_below_best = 0

        state.step = step
        state.memory = list(memory)
        state.set_rng(rng)
        state.usage_total = dict(self.usage.total)
        state.elapsed_s = time.monotonic() - started
        usage = self.usage.step
        return StepRecord(
            step=step,
            batch_ids=tuple(e.id for e in batch),
            current_id=current.version_id,
            batch_score=batch_score,
            trials=tuple(trials),
            context=tuple(context),
            raw_response=proposal.raw,
            proposal=dict(proposal.values) if proposal.values is not None else None,
            reasoning=proposal.reasoning,
            invalid_reason=proposal.invalid_reason,
            candidate_id=candidate.version_id if candidate is not None else None,
            candidate_batch_score=candidate_batch,
            candidate_trials=tuple(candidate_trials),
            val_score=val_score,
            accepted=accepted,
            best_id=state.best.version_id,
            best_val_score=state.best_val,
            invalid_total=state.invalid_total,
            prompt_tokens=int(usage["prompt_tokens"]),
            completion_tokens=int(usage["completion_tokens"]),
            cost_usd=usage["cost_usd"],
            llm_latency_s=usage["optimizer_latency_s"],
            llm_calls=int(usage["llm_calls"]),
            cached_calls=int(usage["cached_calls"]),
            llm_retries=int(usage["llm_retries"]),
            eval_time_s=eval_time,
            wall_time_s=time.monotonic() - step_start,
            val_metrics=val_metrics,
            note=note,
            checkpoint=state.to_dict(),
        )


@dataclass
class LoopState:
    """Everything the loop needs to continue after ``step``: a checkpoint, JSON-serializable
    through :meth:`to_dict` / :meth:`from_dict`."""

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

    @classmethod
    def start(cls, initial: ArtifactVersion, value: float, record: VersionRecord,
              rng: random.Random) -> "LoopState":
        state = cls(0, initial, value, initial, value, [record], [], [])
        state.set_rng(rng)
        return state

    def set_rng(self, rng: random.Random) -> None:
        version, internal, gauss = rng.getstate()
        self.rng = [version, list(internal), gauss]

    def rng_state(self) -> tuple:
        version, internal, gauss = self.rng
        return (version, tuple(internal), gauss)

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
        }

    @classmethod
    def from_dict(cls, data: dict) -> "LoopState":
        versions = [
            VersionRecord(ArtifactVersion.from_dict(v), v["status"], v["batch_score"],
                          v["val_score"], v.get("reasoning", ""), v.get("val_metrics", {}))
            for v in data["versions"]
        ]
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
        )


def _accept(rule: str, candidate: float, current: float) -> bool:
    if rule == "always":
        return True
    if rule == "improve":
        return candidate > current
    return candidate >= current  # no_worse
