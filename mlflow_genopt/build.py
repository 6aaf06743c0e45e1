"""The composition root: the one place where a learning loop is assembled and run.

:func:`build_loop` turns a config (and optionally a user's own :class:`~mlflow_genopt.task.Task`
object) into a ready :class:`~mlflow_genopt.loop.LearningLoop`: the project's task with its
validated options, the LLMs (optimizer and task model, cached, observed, counted by one
:class:`~mlflow_genopt.usage.UsageMeter`), the optimizer and the evaluation cache.
:func:`run_loop` adds the policy every entry point shares: config layering
(:func:`resolve_config`), MLflow tracking, auto-resume of an interrupted run with the same
config, Ctrl-C handling, prompt registration, and cleanup. The CLI, studies, the MLflow
``optimize_prompts`` backend, the benchmarks and the tests all go through here. Everything that
can be checked before a run starts is checked before the MLflow run is created, so bad input
leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import ConfigError, LoopConfig
from .evaluation import EvalCache
from .executor import Executor, make_executor
from .events import LoopCallback, LoopResult, dispatch
from .llm import check_key, make_llm
from .llm.base import LLM, ObservedLLM
from .loop import LearningLoop
from .optimizer import Optimizer
from .plugin.active import loop_context
from .progress import ProgressPrinter
from .project import Project, StartingArtifact, load_project, task_project
from .state import LoopState
from .task import Task
from .usage import UsageMeter

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_CACHE_DIR = Path(".genopt") / "cache"
DEFAULT_EXPERIMENT = "genopt"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_cache_dir(cache_dir: str | Path | None) -> None:
    """A one-line :class:`ConfigError` when the response and evaluation caches could not be
    written under ``cache_dir`` (checked before anything is created: the caches themselves are
    made on first use, mid-loop)."""
    if cache_dir is None:
        return
    from .evaluation import CACHE_FILE
    from .llm.cache import CACHE_FILENAME

    cache = Path(cache_dir)
    existing = cache
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    fix = "pass another --cache-dir, or --no-cache"
    if not existing.is_dir():
        raise ConfigError(f"cache_dir: {existing} is not a directory; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == cache else f" ({existing} is not writable)"
        raise ConfigError(f"cache_dir: {cache} is not writable{where}; {fix}")
    for name in (CACHE_FILENAME, CACHE_FILE):
        if (cache / name).exists() and not os.access(cache / name, os.R_OK | os.W_OK):
            raise ConfigError(f"cache_dir: {cache / name} is read-only; {fix}")


def resolve_config(project: str, *, config_file: str | Path | None = None,
                   overrides: Mapping[str, Any] | None = None,
                   options: Mapping[str, Any] | None = None) -> LoopConfig:
    """The loop config of ``project`` with layering: the project's defaults, then the fields
    written in ``config_file`` (YAML/JSON; only the keys it names), then ``overrides`` (e.g.
    command-line flags), later winning; ``options`` are merged into ``task_options`` last."""
    data: dict[str, Any] = {}
    if config_file is not None:
        data.update(LoopConfig.file_fields(config_file))
        if data.get("project", project) != project:
            raise ConfigError(f"{config_file}: is a config of project {data['project']!r}, "
                              f"not {project!r}")
    data.update({k: v for k, v in dict(overrides or {}).items() if k != "task_options"})
    task_options = dict(data.get("task_options") or {})
    task_options.update((overrides or {}).get("task_options") or {})
    task_options.update(options or {})
    data["task_options"] = task_options
    data["project"] = project
    return LoopConfig.from_dict(data)


@dataclass
class BuiltLoop:
    """A loop ready to run, and what it owns (close it, or use it as a context manager)."""

    loop: LearningLoop
    task: Task
    project: Project
    usage: UsageMeter
    llms: list[LLM] = field(default_factory=list)
    executor: Executor | None = None

    def close(self) -> None:
        try:
            self.task.close()
        finally:
            if self.executor is not None:
                self.executor.close()

    def __enter__(self) -> "BuiltLoop":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_loop(
    config: LoopConfig,
    *,
    task: Task | None = None,
    starting: StartingArtifact | Mapping[str, str] | None = None,
    listeners: Sequence[LoopCallback] = (),
    optimizer_llm: LLM | None = None,
    task_llm: LLM | None = None,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    base_url: str | None = None,
    usage: UsageMeter | None = None,
    on_retry: Any = None,
    export_dir: str | Path | None = None,
) -> BuiltLoop:
    """Assemble the loop of ``config`` (nothing is run or contacted yet, except an endpoint's
    key check).

    ``task``/``starting``: a user's own task object and its starting artifact (or starting
    values for ``task.spec``), instead of the registered project ``config.project``.
    ``listeners`` receive the loop's events (LLM calls included). ``optimizer_llm`` /
    ``task_llm`` replace the models the config names (tests pass scripted LLMs). ``cache_dir``
    holds the LLM response cache and the evaluation cache (``None``: neither persists).
    ``usage``: the meter to count into (the caller reads it live, e.g. a study's budget).
    ``on_retry(attempt, error, sleep_s)`` hears every retried endpoint request.
    """
    check_cache_dir(cache_dir)
    if task is not None:
        if starting is None:
            raise ConfigError("starting: a task object needs its starting artifact (a "
                              "StartingArtifact or the starting values of task.spec)")
        project = task_project(task, starting, name=config.project, init=config.init)
    else:
        project = load_project(config.project)
    usage = usage if usage is not None else UsageMeter()
    callbacks: list[LoopCallback] = [usage, *[cb for cb in listeners if cb is not usage]]

    def report(call) -> None:
        dispatch(callbacks, "on_llm_call", call)

    def retried(attempt: int, error: str, sleep_s: float) -> None:
        usage.count_retry(attempt, error, sleep_s)  # metric llm_retries, per phase and in totals
        if on_retry is not None:
            on_retry(attempt, error, sleep_s)

    cache = Path(cache_dir) if cache_dir is not None else None
    made: list[LLM] = []

    def model(spec: str, n_ctx: int | None = None) -> LLM:
        llm = make_llm(spec, cache_dir=cache, base_url=base_url, on_retry=retried, n_ctx=n_ctx)
        made.append(llm)
        return llm

    opt_llm = optimizer_llm or model(config.optimizer_model, config.optimizer_n_ctx)
    inner_task_llm = None
    if project.needs_task_llm:
        if task_llm is not None:
            inner_task_llm = task_llm
        elif config.task_model == config.optimizer_model and optimizer_llm is None:
            inner_task_llm = opt_llm
        else:
            inner_task_llm = model(config.task_model)
    executor = make_executor(config.executor)  # a scheduler it cannot reach fails here
    try:
        setup = project.setup(config, ObservedLLM(inner_task_llm, "task", [report])
                              if inner_task_llm is not None else None, executor)
        built_task = project.make_task(setup)
    except BaseException:
        executor.close()
        raise
    try:
        for llm in made:
            check_key(llm)  # a rejected API key fails here, before the MLflow run exists
        optimizer = Optimizer.from_config(config, ObservedLLM(opt_llm, "optimizer", [report]))
        loop = LearningLoop(config, built_task, optimizer, dict(setup.starting.values),
                            spec=setup.starting.spec, callbacks=callbacks, usage=usage,
                            eval_cache=EvalCache(cache), export_dir=export_dir)
    except BaseException:
        built_task.close()
        executor.close()
        raise
    return BuiltLoop(loop, built_task, project, usage, made, executor)


def run_loop(
    config: LoopConfig,
    *,
    task: Task | None = None,
    starting: StartingArtifact | Mapping[str, str] | None = None,
    tracking: Any = "",
    resume: str | None = "auto",
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    nested: bool = False,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    callbacks: Sequence[LoopCallback] = (),
    optimizer_llm: LLM | None = None,
    task_llm: LLM | None = None,
    base_url: str | None = None,
    progress: bool = False,
    register_prompts: bool = True,
    handle_sigint: bool = False,
    usage: UsageMeter | None = None,
    export_dir: str | Path | None = None,
) -> LoopResult:
    """Run one learning loop with ``config`` and return its result.

    ``tracking``: ``""`` (default) tracks to ``$MLFLOW_TRACKING_URI`` or
    ``sqlite:///mlflow.db``; a URI string tracks there; ``None`` turns tracking off; an
    :class:`~mlflow_genopt.tracking.MlflowTracker` object is used as it is (studies and the
    ``optimize_prompts`` backend make their own, nested under a parent run).
    ``resume``: ``"auto"`` continues the newest unfinished (killed, failed or interrupted) run of
    ``experiment`` with the same config hash, as running the same `genopt run` command again
    does (not inside an ``mlflow run``, whose run is given); a run id continues that run; ``None``
    always starts a new run. ``task``/``starting``: see :func:`build_loop`. ``export_dir``: keep
    the selected version's exported files there (default: a temporary directory, removed after
    tracking has logged the files under ``export/``). ``register_prompts``: with tracking on,
    register the selected version's trainable prompt parameters in the MLflow Prompt Registry.
    Raises :class:`~mlflow_genopt.config.ConfigError` or :class:`~mlflow_genopt.llm.LLMError`
    with a one-line message for bad input, and :class:`~mlflow_genopt.executor.ExecutorError`
    when ``config.executor``'s cluster fails (the run is then marked failed and resumable).
    """
    check_cache_dir(cache_dir)  # before the run exists
    tracker, resume_state, carried = _tracking(config, tracking, resume, experiment, run_name,
                                               nested, progress)
    listeners: list[LoopCallback] = []
    if tracker is not None:
        listeners.append(tracker)
        if register_prompts:
            from .plugin.prompts import PromptRegistrar  # after the tracker: its run is written

            listeners.append(PromptRegistrar(tracker))
    if progress:
        listeners.append(ProgressPrinter(config.steps))
    listeners.extend(callbacks)

    def say_retry(attempt: int, error: str, sleep_s: float) -> None:
        if progress:
            print(f"[genopt] LLM request failed ({error}); retry {attempt} in {sleep_s:.1f}s",
                  file=sys.stderr, flush=True)

    temporary = None if export_dir is not None else tempfile.mkdtemp(prefix="genopt-export-")
    try:
        built = build_loop(config, task=task, starting=starting, listeners=listeners,
                           optimizer_llm=optimizer_llm, task_llm=task_llm, cache_dir=cache_dir,
                           base_url=base_url, usage=usage, on_retry=say_retry,
                           export_dir=export_dir or Path(temporary) / "export")
        with built:
            try:
                with loop_context(config), _finish_step_on_sigint(built.loop, handle_sigint):
                    # loop_context: MLflow's run context provider reads it
                    result = built.loop.run(resume=resume_state, failed_usage=carried)
            except BaseException as exc:
                if tracker is not None and tracker.active:
                    tracker.fail(f"{type(exc).__name__}: {exc}", totals=built.usage.total,
                                 failed=built.loop.failed_usage())
                raise
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    return replace(result, export_dir=None) if temporary is not None else result


def _tracking(config: LoopConfig, tracking: Any, resume: str | None, experiment: str,
              run_name: str | None, nested: bool, progress: bool):
    """The tracker of a run (or None), the checkpoint to resume from, and what the run's
    failed attempts spent (``failed_<key>`` metrics)."""
    if tracking is None:
        if resume not in (None, "auto"):
            raise ConfigError("resume: needs tracking (the checkpoint lives in the MLflow run)")
        return None, None, None
    from .tracking import MlflowTracker, check_tracking_uri, find_resumable_run, load_run_checkpoint
    from .tracking.resume import failed_usage

    if isinstance(tracking, MlflowTracker):
        if resume not in (None, "auto"):
            raise ConfigError("resume: give a tracking URI, not a tracker, to resume a run")
        return tracking, None, {}
    if not isinstance(tracking, str):
        raise ConfigError(f"tracking: a tracking URI, None or an MlflowTracker, got {tracking!r}")
    uri = tracking or default_tracking_uri()
    check_tracking_uri(uri)
    run_id = None
    if resume == "auto":
        if not os.environ.get("MLFLOW_RUN_ID"):
            run_id = find_resumable_run(uri, experiment, config.config_hash())
            if run_id:  # said even with progress off: the run continues an earlier one
                print(f"[genopt] resuming unfinished run {run_id} with the same config "
                      "(--fresh starts a new run)", file=sys.stderr, flush=True)
    elif resume is not None:
        run_id = resume
    resume_state, resume_versions, carried = None, [], {}
    if run_id is not None:
        try:
            _, checkpoint, _ = load_run_checkpoint(uri, run_id)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        carried = failed_usage(uri, run_id)
        if checkpoint is not None:
            resume_state = LoopState.from_dict(checkpoint)
            resume_versions = [v.version for v in resume_state.versions]
    tracker = MlflowTracker(uri, experiment, run_name=run_name, nested=nested, run_id=run_id,
                            resume_versions=resume_versions)
    return tracker, resume_state, carried


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


def resume_loop(run_id: str, *, tracking: str = "", executor: str | None = None,
                **kwargs: Any) -> LoopResult:
    """Continue the interrupted loop run ``run_id`` with the config it logged; ``executor``
    replaces the logged one (where a loop runs is not part of its identity)."""
    from .tracking import check_tracking_uri, load_run_checkpoint

    uri = tracking or default_tracking_uri()
    check_tracking_uri(uri)
    try:
        params, _, status = load_run_checkpoint(uri, run_id)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if status == "FINISHED":
        raise ConfigError(f"run {run_id}: already finished; nothing to resume")
    config = LoopConfig.from_params(params)
    if executor is not None:
        config = config.replace(executor=executor)
    return run_loop(config, tracking=uri, resume=run_id, **kwargs)


__all__ = ["BuiltLoop", "DEFAULT_CACHE_DIR", "DEFAULT_EXPERIMENT", "DEFAULT_TRACKING_URI",
           "build_loop", "default_tracking_uri", "resolve_config", "resume_loop", "run_loop"]
