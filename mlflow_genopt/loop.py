"""The learning loop: select a version, sample a batch, run trials, build the context, propose
candidates, validate, evaluate, accept or reject, checkpoint; at the end, score the selected
version on test once.

Guarantees
----------
* Seeded: with the same config, task and LLM answers, two runs sample the same batches, send
  byte-identical learning contexts and make the same decisions (so the response cache can
  replay a whole loop with no LLM call). A loop resumed from a checkpoint continues exactly as
  the uninterrupted loop would: the checkpoint holds the RNG, the versions, the memory, the
  evaluation history and the task's own state (``Task.state_dict``).
* Never adopts an invalid proposal: an answer that does not parse, breaks a parameter's
  constraints, was cut at the token limit, or equals a version the loop has already evaluated
  is repaired (``repair_attempts``) or counted (``invalid_total``), reported with its reason in
  the step record, and never evaluated.
* Each step draws ``candidates_per_step`` candidates from the version ``selection`` picks (for
  the parameters ``parameter_selection`` lets it change: all, or one in turn); every
  valid candidate is scored on the step's batch and logged as a version; the best of them goes
  through ``acceptance``. Only adopted versions are validated.
* Checkpoint selection: the selected version is the adopted version (the starting one
  included) with the highest validation score; ties keep the earlier version.
* The test split is evaluated once, for the selected version only, after the last step (not
  for loops that end ``interrupted`` — they are resumed later — or ``pruned``, or that a
  listener stopped with ``StopLoop(..., conclude=False)``).
* Listeners see every event in the order documented in :mod:`mlflow_genopt.events`.
"""

from __future__ import annotations

import random
import time
from collections import deque
from pathlib import Path
from typing import Sequence

from .artifact import ArtifactSpec, ArtifactVersion
from .config import ConfigError, LoopConfig
from .evaluation import EvalCache, Evaluator
from .events import (
    CandidateRecord,
    LoopCallback,
    LoopResult,
    LoopStart,
    StepRecord,
    StopLoop,
    VersionRecord,
    dispatch,
)
from .history import History
from .context import MemoryEntry
from .optimizer import Optimizer, Proposal
from .selection import select_parent
from .state import LoopState
from .task import Example, ExportingTask, Task, Trial, mean_score, summarize
from .usage import UsageMeter

# Seeds of the optimizer's calls: one per (step, candidate), spaced so that they never collide.
_STEP_SEED_STRIDE = 100_003
_CANDIDATE_SEED_STRIDE = 1_000_003


def _digest(trials: Sequence[Trial], limit: int = 3) -> str:
    wrong = [t for t in trials if t.score < 1.0] or list(trials)
    return " | ".join(t.feedback.strip().replace("\n", " ")[:200] for t in wrong[:limit])


def accept(rule: str, candidate: float, current: float, margin: float = 0.0) -> bool:
    """The acceptance rule: ``always``; ``improve``: the candidate's batch score must exceed the
    current version's by more than ``margin`` (a tie is rejected); ``no_worse``: it may be lower
    by at most ``margin`` (a tie is accepted)."""
    if rule == "always":
        return True
    if rule == "improve":
        return candidate > current + margin
    return candidate >= current - margin  # no_worse


class LearningLoop:
    """One learning loop over ``task`` with the design choices of ``config``.

    Built by :func:`mlflow_genopt.build.build_loop` (the one composition root); ``optimizer``
    wraps the optimizer LLM; ``usage`` is the meter that the LLM wrappers report to;
    ``eval_cache`` serves trials seen before; ``export_dir`` is where an exporting task writes
    the selected version's deliverables (created by the caller, which owns it).
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
        eval_cache: EvalCache | None = None,
        export_dir: str | Path | None = None,
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
        self.eval_cache = eval_cache if eval_cache is not None else EvalCache()
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.interrupted = False  # set (e.g. by a SIGINT handler) to stop after this step
        # usage accounting across failures (see failed_usage)
        self._failed_base: dict[str, float] = {}
        self._committed: dict[str, float] = dict(self.usage.total)
        if self.usage not in self.callbacks:
            self.callbacks.insert(0, self.usage)
        self._end_step = getattr(task, "end_step", None)
        self._state_dict = getattr(task, "state_dict", None)
        self._load_state_dict = getattr(task, "load_state_dict", None)
        hook = getattr(task, "precheck", None)
        self._precheck = hook if callable(hook) and config.precheck else None
        fix = getattr(task, "quick_fix", None)
        self._quick_fix = fix if callable(fix) else None

    def _emit(self, method: str, *args) -> None:
        dispatch(self.callbacks, method, *args)

    def _validate(self, evaluate: Evaluator, version: ArtifactVersion, val: Sequence[Example],
                  step: int) -> tuple[float, dict[str, float]]:
        if not val:
            return 0.0, {}
        trials = evaluate(version, val, "validation", step)
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

    def failed_usage(self) -> dict[str, float]:
        """The LLM usage of work that did not commit (the phase running now, and the starting
        version's validation until step 1 commits), plus what earlier failed attempts of this
        loop spent: after a failure, what the run's ``failed_<key>`` metrics say, so that the
        committed phases and this add up to the totals."""
        total = self.usage.total
        return {k: self._failed_base.get(k, 0.0) + total.get(k, 0.0) - self._committed.get(k, 0.0)
                for k in total}

    def run(self, resume: LoopState | None = None,
            failed_usage: dict[str, float] | None = None) -> LoopResult:
        """Run the loop; with ``resume`` (a checkpoint from :attr:`StepRecord.checkpoint`),
        continue after its step with the same RNG state, versions, memory, history and task
        state. ``failed_usage``: what earlier failed attempts of this loop spent (cumulative;
        counted into the totals)."""
        config = self.config
        started = time.monotonic()
        train = list(self.task.examples("train"))
        val = list(self.task.examples("val"))
        if not train:
            raise ConfigError(f"task {self.task.name}: the train split is empty")

        self._emit("on_loop_start", LoopStart(config, self.task.name, self.task.objective,
                                              self.spec, self.initial))
        carried = dict(failed_usage or {})
        if resume is None:
            self.usage.carry(carried)
            self._failed_base, self._committed = carried, dict(self.usage.total)
            rng = random.Random(config.seed)
            history = History()
            evaluate = Evaluator(self.task, config, history, self.eval_cache)
            self.usage.reset_step()
            value, metrics = self._validate(evaluate, self.initial, val, 0)
            initial_record = VersionRecord(self.initial, "initial", None, value,
                                           val_metrics=metrics)
            state = LoopState.start(self.initial, value, initial_record, rng, history)
            state.initial_usage = dict(self.usage.step)
            state.failed_usage = carried
            self._emit("on_version", initial_record)
        else:
            state = resume
            rng = random.Random()
            rng.setstate(state.rng_state())
            self.usage.restore({k: v + carried.get(k, 0.0) - state.failed_usage.get(k, 0.0)
                                for k, v in state.usage_total.items()})
            state.failed_usage = carried
            self._failed_base, self._committed = carried, dict(self.usage.total)
            started -= state.elapsed_s
            evaluate = Evaluator(self.task, config, state.history, self.eval_cache)
            if state.task_state is not None and callable(self._load_state_dict):
                self._load_state_dict(state.task_state)
        memory: deque[MemoryEntry] = deque(state.memory, maxlen=max(config.memory_size, 1))
        steps: list[StepRecord] = []
        stop_reason = "completed"
        conclude = True

        for step in range(state.step + 1, config.steps + 1):
            reason = self._budget_exhausted(started)
            if reason:
                stop_reason = reason
                break
            record = self._step(step, state, memory, rng, train, val, started, evaluate)
            steps.append(record)
            self._committed = dict(state.usage_total)  # handed to the tracker just below
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
        self.usage.reset_step()
        # an interrupted loop is resumed later, a pruned one is abandoned: neither is concluded
        if conclude and stop_reason not in ("interrupted", "pruned"):
            test = list(self.task.examples("test"))
            test_trials = evaluate(best, test, "test", state.step) if test else []
            if isinstance(self.task, ExportingTask) and self.export_dir is not None:
                self.export_dir.mkdir(parents=True, exist_ok=True)
                self.task.export(best, self.export_dir)
                export_dir = str(self.export_dir)
        phase_usage = {"initial": dict(state.initial_usage), "test": dict(self.usage.step),
                       "failed": dict(state.failed_usage)}
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
            phase_usage=phase_usage,
        )
        self._emit("on_loop_end", result)
        return result

    # --- one step ---------------------------------------------------------------------------
    def _step(self, step: int, state: LoopState, memory: deque, rng: random.Random,
              train: Sequence[Example], val: Sequence[Example], started: float,
              evaluate: Evaluator) -> StepRecord:
        """One optimization step; updates ``state`` and ``memory`` in place."""
        config = self.config
        step_start = time.monotonic()
        self.usage.reset_step()
        evaluate.cache_hits = 0
        parent = select_parent(config.selection, current=state.current, best=state.best,
                               adopted=[v.version for v in state.adopted], history=state.history,
                               rng=rng)
        batch = rng.sample(train, min(config.batch_size, len(train)))
        eval_time = 0.0

        t = time.monotonic()
        trials = evaluate(parent, batch, "batch", step)
        eval_time += time.monotonic() - t
        batch_score = mean_score(trials)

        seeds = [config.seed * _STEP_SEED_STRIDE + step + i * _CANDIDATE_SEED_STRIDE
                 for i in range(config.candidates_per_step)]
        known = {h: f"{v.version.version_id} ({v.status} at step {v.version.step})"
                 for h, v in state.known().items()}
        precheck = quick_fix = None
        if self._precheck is not None:
            def precheck(values, hook=self._precheck, parent=parent, step=step):
                return hook(parent.child(values, step))
            if self._quick_fix is not None:
                def quick_fix(values, problem, hook=self._quick_fix, parent=parent, step=step):
                    return hook(parent.child(values, step), problem)
        spec = self.step_spec(step)
        draft = self.optimizer.step(self.task.objective, spec, parent, trials,
                                    list(memory) if config.memory_size else [], seeds=seeds,
                                    known=known, precheck=precheck, quick_fix=quick_fix)
        context, proposals = draft.context, draft.proposals

        candidates: list[CandidateRecord] = []
        scored: list[tuple[float, int, ArtifactVersion, list[Trial]]] = []
        t = time.monotonic()
        for index, proposal in enumerate(proposals):
            if not proposal.valid:
                state.invalid_total += 1
                candidates.append(_candidate_record(index, proposal))
                memory.append(MemoryEntry(
                    f"(invalid proposal at step {step})", step, "invalid", None, None, {}, "",
                    # whose problem it was: Qwen 1.5B, shown a proposal's crash, spent 3 later
                    # steps "fixing" it in a current version that never had it
                    note=("Rejected without evaluation (a problem of that proposal, not of the "
                          f"current version): {proposal.invalid_reason}"),
                ))
                continue
            candidate = parent.child(proposal.values, step)
            candidate_trials = evaluate(candidate, batch, "candidate", step, parent=parent)
            score = mean_score(candidate_trials)
            scored.append((score, index, candidate, candidate_trials))
            candidates.append(_candidate_record(index, proposal, candidate, score, candidate_trials))
        eval_time += time.monotonic() - t

        chosen = max(scored, key=lambda item: (item[0], -item[1])) if scored else None
        accepted = chosen is not None and accept(config.acceptance, chosen[0], batch_score,
                                                 config.acceptance_margin)
        val_score: float | None = None
        val_metrics: dict[str, float] = {}
        if accepted:
            t = time.monotonic()
            if val:
                val_score, val_metrics = self._validate(evaluate, chosen[2], val, step)
            else:
                val_score = chosen[0]
            eval_time += time.monotonic() - t
        for score, index, candidate, candidate_trials in scored:
            adopted = accepted and candidate is chosen[2]
            proposal = proposals[index]
            record = VersionRecord(candidate, "accepted" if adopted else "rejected", score,
                                   val_score if adopted else None, proposal.reasoning,
                                   val_metrics=val_metrics if adopted else {}, candidate=index)
            state.versions.append(record)
            self._emit("on_version", record)
            if adopted:
                note = ""
            elif chosen is not None and candidate is chosen[2]:
                note = f"Rejected: batch score {score:.4g} vs {batch_score:.4g} of {parent.version_id}."
            else:
                note = (f"Rejected: batch score {score:.4g}; a sibling scored "
                        f"{chosen[0]:.4g} on the same batch.")
            memory.append(MemoryEntry(
                candidate.version_id, step, record.status, score, record.val_score,
                {} if adopted else dict(proposal.values), _digest(candidate_trials), note=note,
            ))
        if accepted:
            state.current, state.current_val = chosen[2], val_score
            if val_score > state.best_val:
                state.best, state.best_val = chosen[2], val_score

        note = ""
        if config.revert_ratio is not None:
            threshold = state.best_val - (1 - config.revert_ratio) * abs(state.best_val)
            below = state.current is not state.best and state.current_val < threshold
            state.steps_below_best = state.steps_below_best + 1 if below else 0
            if state.steps_below_best > config.revert_patience:
                note = (f"reverted to {state.best.version_id}: val score below {threshold:.4g} "
                        f"for {state.steps_below_best} steps")
                state.current, state.current_val = state.best, state.best_val
                state.steps_below_best = 0

        if callable(self._end_step):  # the environment steps between updates are over
            self._end_step(step, parent, trials)
        state.task_state = self._state_dict() if callable(self._state_dict) else None
        state.step = step
        state.memory = list(memory)
        state.set_rng(rng)
        state.usage_total = dict(self.usage.total)
        state.elapsed_s = time.monotonic() - started
        shown = _shown_candidate(candidates, chosen)
        usage = self.usage.step
        return StepRecord(
            step=step,
            batch_ids=tuple(e.id for e in batch),
            current_id=parent.version_id,
            batch_score=batch_score,
            trials=tuple(trials),
            context=tuple(context),
            raw_response=shown.attempts[-1].raw if shown.attempts else "",
            proposal=dict(shown.proposal) if shown.proposal is not None else None,
            reasoning=shown.reasoning,
            invalid_reason=shown.invalid_reason,
            candidate_id=shown.version_id,
            candidate_batch_score=shown.batch_score,
            candidate_trials=shown.trials,
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
            llm_errors=int(usage["llm_errors"]),
            cached_tokens=int(usage["cached_tokens"]),
            eval_time_s=eval_time,
            wall_time_s=time.monotonic() - step_start,
            val_metrics=val_metrics,
            note=note,
            checkpoint=state.to_dict(),
            candidates=tuple(candidates),
            selection=config.selection,
            cache_hits=evaluate.cache_hits,
            shrink_level=draft.level,
            editable=tuple(p.name for p in spec.trainable),
        )

    def step_spec(self, step: int) -> ArtifactSpec:
        """The spec step ``step`` edits: every trainable parameter, or with ``parameter_selection:
        round_robin`` the ``(step - 1) mod n``-th one (the others frozen for that step)."""
        trainable = [p.name for p in self.spec.trainable]
        if self.config.parameter_selection != "round_robin" or len(trainable) == 1:
            return self.spec
        return self.spec.with_trainable((trainable[(step - 1) % len(trainable)],))


def _candidate_record(index: int, proposal: Proposal, version: ArtifactVersion | None = None,
                      score: float | None = None, trials: Sequence[Trial] = ()) -> CandidateRecord:
    return CandidateRecord(
        index=index, attempts=tuple(proposal.attempts),
        proposal=dict(proposal.values) if proposal.values is not None else None,
        reasoning=proposal.reasoning, invalid_reason=proposal.invalid_reason,
        version_id=version.version_id if version is not None else None,
        batch_score=score, trials=tuple(trials), repairs=tuple(proposal.repairs),
    )


def _shown_candidate(candidates: list[CandidateRecord], chosen) -> CandidateRecord:
    """The candidate a step record summarises: the chosen one, else the first."""
    if chosen is not None:
        return next(c for c in candidates if c.index == chosen[1])
    return candidates[0]


__all__ = ["LearningLoop", "LoopState", "UsageMeter", "accept"]
