"""Assemble and run one learning loop: project + LLMs + tracking + listeners.

This is the library's main entry point (``mlflow_genopt.run_loop``); the CLI, MLproject entry
points and studies all go through it. Everything that can be checked before a run starts is
checked before the MLflow run is created, so bad input leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence, TextIO

from .config import ConfigError, LoopConfig
from .events import LoopCallback, LoopResult, StepRecord, VersionRecord, dispatch
from .llm import check_key, make_llm
from .llm.base import LLM, ObservedLLM
from .loop import LearningLoop, LoopState, UsageMeter
from .optimizer import Optimizer
from .plugin.active import loop_context
from .project import load_project

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_CACHE_DIR = Path(".genopt") / "cache"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


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


def run_loop(
    config: LoopConfig,
    *,
    resume_run_id: str | None = None,
    handle_sigint: bool = False,
    tracking_uri: str | None = "",
    experiment: str = "genopt",
    run_name: str | None = None,
    nested: bool = False,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    callbacks: Sequence[LoopCallback] = (),
    optimizer_llm: LLM | None = None,
    task_llm: LLM | None = None,
    base_url: str | None = None,
    progress: bool = False,
    register_prompts: bool = True,
) -> LoopResult:
    """Run one learning loop with ``config``.

    ``tracking_uri``: ``""`` (default) uses ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``;
    ``None`` turns tracking off. ``cache_dir``: the on-disk LLM response cache (``None`` disables
    it). ``optimizer_llm`` / ``task_llm`` override the models named in the config (tests pass a
    scripted LLM here). ``register_prompts``: with tracking on, register the selected version's
    trainable prompt parameters in the MLflow Prompt Registry
    (:mod:`mlflow_genopt.plugin.prompts`). Raises :class:`~mlflow_genopt.config.ConfigError` or
    :class:`~mlflow_genopt.llm.LLMError` with a one-line message for bad input.
    """
    project = load_project(config.project)
    starting = project.starting_for(config)

    usage = UsageMeter()
    listeners: list[LoopCallback] = [usage]
    tracker = None
    resume_state = None
    if tracking_uri is not None:
        # only tracking imports MLflow
        from .tracking import MlflowTracker, check_tracking_uri, load_run_checkpoint

        uri = tracking_uri or default_tracking_uri()
        check_tracking_uri(uri)
        resume_versions = []
        if resume_run_id is not None:
            try:
                _, checkpoint, _ = load_run_checkpoint(uri, resume_run_id)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if checkpoint is not None:
                resume_state = LoopState.from_dict(checkpoint)
                resume_versions = [v.version for v in resume_state.versions]
        tracker = MlflowTracker(uri, experiment, run_name=run_name, nested=nested,
                                run_id=resume_run_id, resume_versions=resume_versions)
        listeners.append(tracker)
        if register_prompts:
            from .plugin.prompts import PromptRegistrar  # after the tracker: its run is written

            listeners.append(PromptRegistrar(tracker))
    elif resume_run_id is not None:
        raise ConfigError("resume: needs tracking (the checkpoint lives in the MLflow run)")
    if progress:
        listeners.append(ProgressPrinter(config.steps))
    listeners.extend(callbacks)

    def report(call) -> None:
        dispatch(listeners, "on_llm_call", call)

    def on_retry(attempt: int, error: str, sleep_s: float) -> None:
        usage.count_retry(attempt, error, sleep_s)  # metric llm_retries, per step and in totals
        if progress:
            print(f"[genopt] LLM request failed ({error}); retry {attempt} in {sleep_s:.1f}s",
                  file=sys.stderr, flush=True)

    cache = Path(cache_dir) if cache_dir is not None else None
    opt_llm = optimizer_llm or make_llm(config.optimizer_model, cache_dir=cache, base_url=base_url,
                                        on_retry=on_retry)
    made = [] if optimizer_llm is not None else [opt_llm]  # the backends built here
    task = None
    try:
        if getattr(project, "uses_task_llm", True):
            inner_task_llm = task_llm or (
                opt_llm if config.task_model == config.optimizer_model and optimizer_llm is None
                else make_llm(config.task_model, cache_dir=cache, base_url=base_url,
                              on_retry=on_retry)
            )
            if task_llm is None and inner_task_llm is not opt_llm:
                made.append(inner_task_llm)
            task = project.make_task(config, ObservedLLM(inner_task_llm, "task", [report]))
        else:
            task = project.make_task(config, None)
        for llm in made:
            check_key(llm)  # a rejected API key fails here, before the MLflow run exists
        optimizer = Optimizer(
            ObservedLLM(opt_llm, "optimizer", [report]),
            temperature=config.optimizer_temperature,
            max_tokens=config.optimizer_max_tokens,
            credit_horizon=config.credit_horizon,
        )
        loop = LearningLoop(config, task, optimizer, dict(starting.values), spec=starting.spec,
                            callbacks=listeners, usage=usage)
        try:
            with loop_context(config), _finish_step_on_sigint(loop, handle_sigint):
                # loop_context: MLflow's run context provider reads it
                return loop.run(resume=resume_state)
        except BaseException as exc:
            if tracker is not None and tracker.active:
                tracker.fail(f"{type(exc).__name__}: {exc}", totals=usage.total)
            raise
    finally:
        if task is not None:
            task.close()


@contextlib.contextmanager
def _finish_step_on_sigint(loop: LearningLoop, enabled: bool):
    """First SIGINT: let the current step finish and be logged, then stop. Second: abort."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if loop.interrupted:
            raise KeyboardInterrupt
        loop.interrupted = True
        print("[genopt] interrupt: finishing the current step (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def resume_loop(run_id: str, *, tracking_uri: str | None = "", **kwargs) -> LoopResult:
    """Continue the interrupted loop run ``run_id`` with the config it logged."""
    from .tracking import check_tracking_uri, load_run_checkpoint

    uri = tracking_uri or default_tracking_uri()
    check_tracking_uri(uri)
    try:
        params, _, status = load_run_checkpoint(uri, run_id)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if status == "FINISHED":
        raise ConfigError(f"run {run_id}: already finished; nothing to resume")
    return run_loop(LoopConfig.from_params(params), tracking_uri=uri, resume_run_id=run_id,
                    **kwargs)
