"""One study worker: opens (or joins, or resumes) the study and its MLflow parent run, then
decides under the study lock whether to start a trial, runs each trial as one learning loop,
and summarizes the study at the end. The guarantees are stated in :mod:`mlflow_genopt.study`.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

import optuna
from optuna.trial import TrialState

from ..config import ConfigError
from ..executor import ExecutorError
from ..events import LoopCallback
from ..llm.base import LLM, LLMError
from .config import StudyConfig, StudyResult, definition_mismatch
from .listener import _TrialListener
from .report import summarize, summary_metrics, write_summary
from .samplers import make_pruner, make_sampler
from .space import Categorical, IntRange, point_label, search_space_to_spec, value_key
from .storage import (
    HEARTBEAT_KINDS, hide_password, make_lock, open_storage, storage_errors, storage_kind,
)

DEFAULT_SUMMARY_ROOT = Path(".genopt") / "studies"
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"  # on every trial: which worker ran it
_FINISHED_OK = (TrialState.COMPLETE, TrialState.PRUNED)


class _StudyRunner:
    """One worker of one study: what :func:`run_study` holds between opening and closing it."""

    def __init__(
        self,
        config: StudyConfig,
        *,
        tracking_uri: str | None,
        experiment: str,
        cache_dir: str | Path | None,
        optimizer_llm: LLM | None,
        task_llm: LLM | None,
        base_url: str | None,
        callbacks: Sequence[LoopCallback],
        stream: TextIO | None,
        summary_dir: str | Path | None,
        run_name: str | None,
    ) -> None:
        self.config = config
        self.name = config.resolved_name()
        self.kind = storage_kind(config.storage)
        self.sampler_name = config.resolved_sampler()
        self.pruner_name = config.resolved_pruner()
        self.target = config.target_trials()
        self.single = len(config.objectives) == 1
        self.points = config.points() if self.sampler_name in ("grid", "brute_force") else None
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.cache_dir = cache_dir
        self.optimizer_llm = optimizer_llm
        self.task_llm = task_llm
        self.base_url = base_url
        self.callbacks = list(callbacks)
        self.stream = stream
        self.summary_dir = Path(summary_dir) if summary_dir else DEFAULT_SUMMARY_ROOT / self.name
        self.run_name = run_name
        self.parent_run_id: str | None = None
        self.parent_owned = False
        self.fatal: BaseException | None = None
        self.trials_run = 0
        self.started = time.monotonic()
        with storage_errors(config.storage):
            self.lock, self.shared_lock = make_lock(config.storage, self.kind, self.name)
        self.heartbeat = self.kind in HEARTBEAT_KINDS

    # --- output ----------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if self.stream is not None:
            print(f"[genopt study] {text}", file=self.stream, flush=True)

    # --- storage, study, parent run ---------------------------------------------------------
    def open(self) -> None:
        directions = ["maximize"] + ["minimize"] * (len(self.config.objectives) - 1)
        definition = self.config.definition()
        if self.tracking_uri is not None:
            importlib.import_module("..tracking", __package__)  # import MLflow before the lock
        # Schema creation, the study, its definition and its parent run are one step for the
        # workers: a second worker starting at the same moment waits, then loads all of them.
        with storage_errors(self.config.storage):
            self.lock.acquire()
        try:
            with storage_errors(self.config.storage):
                storage = open_storage(
                    self.config.storage, self.kind,
                    heartbeat_interval_s=self.config.heartbeat_interval_s,
                    grace_period_s=self.config.grace_period_s, on_stale_trial=self._on_stale_trial)
            try:
                study = optuna.create_study(storage=storage, study_name=self.name,
                                            directions=directions, load_if_exists=False)
                created = True
            except optuna.exceptions.DuplicatedStudyError:
                study = optuna.load_study(study_name=self.name, storage=storage)
                created = False
            stored = study.user_attrs.get("definition")
            if stored is None:
                study.set_user_attr("definition", definition)
            elif stored != definition:
                raise ConfigError(definition_mismatch(self.name, stored, definition))
            if [d.name.lower() for d in study.directions] != directions:
                raise ConfigError(
                    f"objectives: study {self.name!r} optimizes {len(study.directions)} "
                    f"objective(s); use the same --objectives or another --study-name"
                )
            n_existing = len(study.get_trials(deepcopy=False))
            # Workers that join or resume reseed random draws, so that they do not replay each
            # other's; a grid keeps its seed: it maps trial numbers to points by a seeded shuffle.
            seed = self.config.sampler_seed
            if not created and self.sampler_name in ("random", "tpe"):
                seed = (seed + 7919 * (n_existing + 1) + os.getpid()) % (2**31)
            sampler = make_sampler(self.sampler_name, self.config.search_space, seed)
            self.study = optuna.load_study(study_name=self.name, storage=storage, sampler=sampler,
                                           pruner=make_pruner(self.pruner_name, self.config))
            if self.tracking_uri is not None:
                self._open_parent_run(study.user_attrs.get("mlflow_parent_run_id"))
        finally:
            self.lock.release()
        if not self.shared_lock and self.kind != "memory":
            self.say(f"warning: no cross-process lock for {self.kind} storages: with several "
                     "workers the trial count may overshoot n_trials")
        verb = "created" if created else f"loaded ({n_existing} trials so far)"
        self.say(
            f"study {self.name!r} {verb} in {hide_password(self.config.storage)}: "
            f"{self.sampler_name} sampler, pruner {self.pruner_name}, target {self.target} "
            f"finished trials" + (f", MLflow parent run {self.parent_run_id}" if self.parent_run_id else "")
        )

    def _open_parent_run(self, stored_run_id: str | None) -> None:
        from ..tracking import start_study_run

        c = self.config
        tags = {
            "genopt.study": self.name,
            "genopt.study.storage": hide_password(c.storage),
            "genopt.study.sampler": self.sampler_name,
            "genopt.study.pruner": self.pruner_name,
            "genopt.study.objectives": ",".join(c.objectives),
            "genopt.study.n_trials": str(self.target),
            "genopt.study.search_space": json.dumps(search_space_to_spec(c.search_space))[:8000],
            "genopt.project": c.base.project,
            "genopt.task": c.base.task,
        }
        run = start_study_run(self.tracking_uri, self.experiment, run_name=self.run_name or self.name,
                              tags=tags, run_id=stored_run_id)
        self.parent_run_id, self.experiment, self.parent_owned = run
        if stored_run_id is None:
            self.study.set_user_attr("mlflow_parent_run_id", self.parent_run_id)

    # --- deciding ----------------------------------------------------------------------------
    def _decide(self) -> tuple[str, str]:
        """("ask" | "wait" | "stop", reason), under the study lock."""
        trials = self.study.get_trials(deepcopy=False)
        done = sum(t.state in _FINISHED_OK for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        if done >= self.target:
            return "stop", "complete"
        if done + running >= self.target:
            return ("wait", "running trials may still fail") if self.heartbeat else \
                ("stop", "the remaining trials are running in other workers")
        if waiting:
            return "ask", "queued trial"
        if self.points is not None:
            visited = {_params_key(t) for t in trials if t.state != TrialState.WAITING}
            if all(value_key(sorted(p.items())) in visited for p in self.points):
                if running and self.heartbeat:
                    return "wait", "every point started"
                lost = self.target - done - running
                return "stop", f"exhausted ({lost} point(s) failed beyond max_retry)"
        return "ask", "new trial"

    # --- one trial ---------------------------------------------------------------------------
    def _suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for name, dim in sorted(self.config.search_space.items()):
            if isinstance(dim, Categorical):
                params[name] = trial.suggest_categorical(name, list(dim.choices))
            elif isinstance(dim, IntRange):
                params[name] = trial.suggest_int(name, dim.low, dim.high, step=dim.step, log=dim.log)
            else:
                params[name] = trial.suggest_float(name, dim.low, dim.high, step=dim.step, log=dim.log)
        return params

    def _objective(self, trial: optuna.Trial) -> float | tuple[float, float]:
        from ..build import run_loop

        try:
            params = self._suggest(trial)
            config = self.config.trial_config(params)
            trial.set_user_attr("config", config.to_dict())
            trial.set_user_attr("worker", WORKER_ID)
        finally:
            self.lock.release()  # the trial holds its point now: others may start theirs
        label = point_label(params)
        retry = trial.user_attrs.get("retry_of")
        self.say(f"trial {trial.number} started: {label}" + (f" (retry of {retry})" if retry is not None else ""))

        tracker = None
        if self.tracking_uri is not None:
            from ..tracking import MlflowTracker

            tracker = MlflowTracker(
                self.tracking_uri, self.experiment, run_name=f"{self.name}-t{trial.number:03d}",
                nested=True, parent_run_id=self.parent_run_id,
                tags={
                    "genopt.study": self.name,
                    "genopt.trial_number": str(trial.number),
                    "genopt.trial_params": json.dumps(params, sort_keys=True),
                    "genopt.trial_state": "RUNNING",
                    "genopt.searched": ",".join(sorted(params)),
                },
            )
        listener = _TrialListener(trial, tracker, report=self.single,
                                  prune=self.single and self.pruner_name != "none",
                                  budget=lambda spend: self._budget_reason(spend, trial.number))
        try:
            # the trial's run is the tracker made above (nested under the study's parent run);
            # Optuna, not auto-resume, decides what is retried
            result = run_loop(
                config, tracking=tracker, resume=None, callbacks=[listener, *self.callbacks],
                usage=listener.usage, cache_dir=self.cache_dir, optimizer_llm=self.optimizer_llm,
                task_llm=self.task_llm, base_url=self.base_url, register_prompts=False,
            )
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("error", error[:2000])
            self._mark_run(tracker.run_id if tracker else None, "FAIL", None)
            (frozen,) = [t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number]
            self._requeue(self.study, frozen)
            if isinstance(exc, (ConfigError, LLMError, ExecutorError)):
                # every other trial would fail the same way (a lost cluster included): stop the
                # study; the trial is requeued, so running the study again retries it
                self.fatal = exc
            raise
        self.trials_run += 1
        spend = listener.spend()
        trial.set_user_attr("result", {
            "best_val_score": result.best_val_score,
            "test_score": result.test_score,
            "stop_reason": result.stop_reason,
            "steps_run": len(result.steps),
            "selected_version": result.selected.version_id,
            "wall_time_s": result.totals.get("wall_time_s"),
            **spend,
        })
        if listener.budget_stop is not None:
            raise optuna.TrialPruned(
                f"stopped by the study {listener.budget_stop} after step {len(result.steps)} of "
                f"{config.steps} ({spend['tokens_spent']} tokens spent)"
            )
        if listener.pruned_at is not None:
            raise optuna.TrialPruned(
                f"pruned after step {listener.pruned_at} of {config.steps} "
                f"(best val {result.best_val_score:.4g}, {spend['tokens']} tokens)"
            )
        if self.single:
            return result.best_val_score
        return result.best_val_score, float(spend["tokens"])

    def _after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        self._mark_run(run_id, trial.state.name, trial.values)
        result = trial.user_attrs.get("result") or {}
        spend = trial.user_attrs.get("spend") or {}
        tokens = result.get("tokens", spend.get("tokens"))
        best = result.get("best_val_score")
        test = result.get("test_score")
        self.say(
            f"trial {trial.number} {trial.state.name}: {point_label(trial.params)}  "
            + (f"best val {best:.4f}  " if best is not None else "")
            + (f"test {test:.4f}  " if test is not None else "")
            + (f"tokens {tokens}  " if tokens is not None else "")
            + (f"steps {result['steps_run']}/{self.config.base.steps}" if "steps_run" in result else "")
        )
        if self.parent_run_id is not None and trial.values is not None:
            from ..tracking import update_run

            metrics = {"trial_best_val_score": trial.values[0]}
            if tokens is not None:
                metrics["trial_tokens"] = tokens
            try:
                update_run(self.tracking_uri, self.parent_run_id, metrics=metrics, step=trial.number)
            except Exception as exc:  # a tracking hiccup must not stop the study
                self.say(f"warning: could not log trial {trial.number} on the parent run ({exc})")

    def _mark_run(self, run_id: str | None, state: str, values: Sequence[float] | None,
                  status: str | None = None) -> None:
        if run_id is None or self.tracking_uri is None:
            return
        from ..tracking import update_run

        tags = {"genopt.trial_state": state}
        if values:
            tags["genopt.trial_values"] = json.dumps(list(values))
        try:
            update_run(self.tracking_uri, run_id, tags=tags, status=status)
        except Exception as exc:
            self.say(f"warning: could not tag MLflow run {run_id} ({exc})")

    def _requeue(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Queue a failed trial's point again, as Optuna's RetryHeartbeatStaleTrialCallback does
        (same params, distributions and system attrs, so that a grid keeps its bookkeeping)."""
        retries = int(trial.user_attrs.get("retries", 0))
        if retries >= self.config.max_retry or not trial.params:
            return
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=dict(trial.params),
            distributions=dict(trial.distributions),
            user_attrs={"retry_of": trial.user_attrs.get("retry_of", trial.number),
                        "retries": retries + 1},
            system_attrs=dict(trial.system_attrs),
        ))
        self.say(f"trial {trial.number} failed: queued again ({retries + 1}/{self.config.max_retry})")

    def _on_stale_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """A worker stopped sending heartbeats: Optuna has just marked its trial FAIL."""
        self.say(f"trial {trial.number} lost its worker (no heartbeat): FAIL")
        self._mark_run(trial.user_attrs.get("mlflow_run_id"), "FAIL", None, status="KILLED")
        self._requeue(study, trial)

    # --- budgets -----------------------------------------------------------------------------
    def _budget_reason(self, live: Mapping[str, Any] | None = None,
                       live_number: int | None = None) -> str | None:
        """``"budget: <field>"`` once a study budget is reached, else ``None``. ``live``: the
        running trial ``live_number``'s spend so far (fresher than what the storage holds)."""
        c = self.config
        if c.max_wall_time_s is not None and time.monotonic() - self.started >= c.max_wall_time_s:
            return "budget: max_wall_time_s"
        if c.max_tokens is None and c.max_cost_usd is None:
            return None
        tokens, cost = 0, 0.0
        for t in self.study.get_trials(deepcopy=False):
            if t.number == live_number and live is not None:
                spend = live
            else:
                spend = t.user_attrs.get("result") or t.user_attrs.get("spend") or {}
            tokens += int(spend.get("tokens_spent") or 0)
            cost += float(spend.get("cost_usd") or 0.0)
        if c.max_tokens is not None and tokens >= c.max_tokens:
            return "budget: max_tokens"
        if c.max_cost_usd is not None and cost >= c.max_cost_usd:
            return "budget: max_cost_usd"
        return None

    # --- the worker loop ---------------------------------------------------------------------
    def work(self) -> str:
        started = self.started = time.monotonic()
        poll = min(float(self.config.heartbeat_interval_s), 1.0)
        while True:
            if self.config.timeout_s is not None and time.monotonic() - started >= self.config.timeout_s:
                return "timeout"
            budget = self._budget_reason()
            if budget is not None:
                self.say(f"{budget} reached: no new trial")
                return budget
            self.lock.acquire()
            try:
                action, reason = self._decide()
                if action == "ask":
                    self.study.optimize(self._objective, n_trials=1, catch=(Exception,),
                                        callbacks=[self._after_trial])
                    if self.fatal is not None:
                        raise self.fatal
                    continue
            finally:
                self.lock.release()
            if action == "stop":
                return reason
            time.sleep(poll)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)

    def finish(self, stop_reason: str, status: str | None) -> StudyResult:
        """Summarize the study as the storage holds it now. Every worker writes the local files;
        the first to see a given state uploads them to the parent run (claimed under the lock)."""
        with self.lock.hold():
            trials = self.study.get_trials(deepcopy=False)
            finished = sum(t.state.is_finished() for t in trials)
            running = any(t.state == TrialState.RUNNING for t in trials)
            stamp = f"{finished}:{status}"
            upload = self.parent_run_id is not None and self.study.user_attrs.get("summary_logged") != stamp
            if upload:
                self.study.set_user_attr("summary_logged", stamp)
        summary = summarize(self, trials, stop_reason)
        write_summary(self, summary)
        if upload:
            from ..tracking import log_study_summary

            final = status or ("RUNNING" if running else "FINISHED")
            log_study_summary(
                self.tracking_uri, self.parent_run_id, self.summary_dir,
                metrics=summary_metrics(summary), step=finished,
                tags={"genopt.study.stop_reason": stop_reason,
                      "genopt.study.recommended_trial": str(summary.recommended.number)
                      if summary.recommended else "none",
                      **({"genopt.study.budget": stop_reason.split(": ", 1)[1]}
                         if stop_reason.startswith("budget: ") else {})},
                status=None if final == "RUNNING" or not self.parent_owned else final,
            )
        return summary

    def close(self) -> None:
        self.lock.close()


def _params_key(trial: optuna.trial.FrozenTrial) -> str:
    params = trial.params or trial.system_attrs.get("fixed_params") or {}
    return value_key(sorted(params.items()))


def run_study(
    config: StudyConfig,
    *,
    tracking_uri: str | None = "",
    experiment: str = "genopt",
    run_name: str | None = None,
    cache_dir: str | Path | None = Path(".genopt") / "cache",
    optimizer_llm: LLM | None = None,
    task_llm: LLM | None = None,
    base_url: str | None = None,
    callbacks: Sequence[LoopCallback] = (),
    summary_dir: str | Path | None = None,
    progress: bool = False,
    stream: TextIO | None = None,
) -> StudyResult:
    """Run (or join, or resume) the study ``config`` describes, as one worker.

    Returns once the study holds ``target_trials`` finished trials (or this worker's timeout
    passed, or a finite space is exhausted), after writing the summary to ``summary_dir``
    (default ``.genopt/studies/<study_name>``) and to the MLflow parent run.

    ``tracking_uri``: ``""`` uses ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``; ``None``
    turns MLflow off. The parent run is ``$MLFLOW_RUN_ID`` when set (``mlflow run``), else the
    study's own (created by the first worker, reopened on resume). ``optimizer_llm`` /
    ``task_llm`` / ``cache_dir`` / ``base_url`` go to every loop as in
    :func:`~mlflow_genopt.build.run_loop`; ``callbacks`` are added to every loop. Raises
    :class:`ConfigError` / :class:`LLMError` (one line) for bad input or an LLM that cannot work;
    a KeyboardInterrupt marks the running trial FAIL (queued again) and the parent run KILLED.
    """
    from ..build import default_tracking_uri

    if tracking_uri is not None and not tracking_uri:
        tracking_uri = default_tracking_uri()
    if tracking_uri is not None:
        from ..tracking import check_tracking_uri

        check_tracking_uri(tracking_uri)  # before the storage, its lock file or any run exist
    from ..build import check_cache_dir

    check_cache_dir(cache_dir)
    runner = _StudyRunner(
        config, tracking_uri=tracking_uri, experiment=experiment, cache_dir=cache_dir,
        optimizer_llm=optimizer_llm, task_llm=task_llm, base_url=base_url, callbacks=callbacks,
        stream=(stream or sys.stderr) if progress else None, summary_dir=summary_dir,
        run_name=run_name,
    )
    try:
        runner.open()
        try:
            reason = runner.work()
        except KeyboardInterrupt:
            runner.finish("interrupted", "KILLED")
            raise
        except BaseException as exc:
            runner.finish(f"error: {type(exc).__name__}: {exc}", "FAILED")
            raise
        result = runner.finish(reason, None)
    finally:
        runner.close()
    runner.say(
        f"done ({result.stop_reason}): {result.count('COMPLETE')} complete, "
        f"{result.count('PRUNED')} pruned, {result.count('FAIL')} failed; "
        + (f"recommended trial {result.recommended.number} ({point_label(result.recommended.params)}, "
           f"best val {result.recommended.best_val_score:.4f})" if result.recommended else "no recommendation")
    )
    return result
