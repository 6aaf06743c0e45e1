"""MLflow tracking for learning loops: the only module of the library that talks to MLflow.

:class:`MlflowTracker` is a :class:`~mlflow_genopt.events.LoopCallback`. One learning loop
becomes one MLflow run; what a user then finds in the MLflow UI:

Run (``<task>-<init>-b<batch>-s<seed>``)
    params: the loop config (``LoopConfig.to_params``); tags ``genopt.*`` (project, task, init,
    config hash, library version, objective, selected version, stop reason); metrics per step
    (``batch_score``, ``val_score``, ``best_val_score``, ``accepted``, ``valid``, tokens, cost,
    latency, ``llm_retries``, timings) and at the end ``test_score`` and ``totals/<key>`` (also
    when the loop fails: then with tag ``genopt.error``); artifacts
    ``config.yaml``, ``artifact_spec.json``, ``versions/<version_id>/`` (parameter files,
    ``version.json``, ``diff.patch``), ``steps/<step>/`` (learning context, raw response,
    proposal, trials), ``result.json``, ``steps.jsonl``, ``versions.jsonl``,
    ``test_trials.jsonl``, and the task's exported files under ``export/``.
Logged models (the experiment's Models tab)
    one ``genopt-artifact`` LoggedModel per evaluated artifact version (initial, accepted and
    rejected), named by its version id, linked to the run, with the loop config as params,
    lineage tags (``genopt.parent_id``, ``genopt.step``, ``genopt.status``), the metrics
    ``val_score`` (versions the loop adopted) and ``candidate_batch_score`` (``test_score`` for
    the selected version), the version's files as model artifacts, and ``genopt.selected=true``
    on the selected version; when the task exports an MLflow model for the selected version
    (``export_dir/model/MLmodel``), that LoggedModel holds it and ``models:/<model_id>`` loads it.
Traces
    one trace per phase (evaluating the starting version, each step, the final test), linked to
    the run and to the LoggedModel of the version that phase produced, with one ``CHAT_MODEL``
    span per LLM call at its real start and end time (token usage, cost, cache hit, errors).

Guarantees. Writes happen in the order the loop reports events, on one background thread (or
inline with ``asynchronous=False``), so the loop only pays for handing a record over; LLM calls
may be reported from any thread. ``on_loop_end`` and :meth:`MlflowTracker.fail` return only once
every run, model, metric and artifact write has been attempted and the run is terminated; a
write that fails is logged as a warning, counted in :attr:`MlflowTracker.errors` and the run tag
``genopt.tracking_errors``, and does not stop the loop (with ``asynchronous=False`` it raises
instead). If the process exits before either is called, pending writes are flushed and the run
ends ``KILLED``. Traces are handed to MLflow's own asynchronous trace exporter, which stores them
within seconds and always before the process exits; ``tracker.flush(traces=True)`` (or
``mlflow.search_traces(..., flush=True)``) waits for them.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.metadata
import itertools
import json
import logging
import math
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.entities import (
    LiveSpan,
    LoggedModelOutput,
    Metric,
    Param,
    RunStatus,
    RunTag,
    SpanType,
)
from mlflow.exceptions import MlflowException
from mlflow.tracing.constant import SpanAttributeKey, TraceMetadataKey
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL, MLFLOW_PARENT_RUN_ID

from .artifact import ArtifactVersion, diff
from .config import ConfigError, LoopConfig
from .events import LoopCallback, LoopResult, LoopStart, StepRecord, VersionRecord
from .llm.base import LLMCall

STEP_SENTINEL_METRIC = "step_wall_time_s"  # logged with every step's metrics

__all__ = [
    "DEFAULT_TRACKING_URI", "MODEL_TYPE", "MlflowTracker", "check_tracking_uri", "find_resumable_run",
    "load_run_checkpoint",
    "log_study_summary", "start_study_run", "update_run",
]

_logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MODEL_TYPE = "genopt-artifact"
_MAX_TAG_CHARS = 8000  # MLflow's tag value limit
_MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
_MAX_METRICS_PER_BATCH = 1000
_BULKY_STEP_FIELDS = ("trials", "candidate_trials", "context", "raw_response")


def _library_version() -> str:
    try:
        return importlib.metadata.version("mlflow-genopt")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


def _truncate(text: str, limit: int = _MAX_TAG_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value: Any) -> Any:
    """``json.dumps`` fallback: trials may carry arbitrary task inputs and outputs."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (MappingProxyType, Mapping)):
        return dict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return repr(value)


def _dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(value, default=_jsonable, ensure_ascii=False, **kwargs)


def _jsonl(rows: Iterable[Any]) -> str:
    return "".join(_dumps(row) + "\n" for row in rows)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _run_status(stop_reason: str) -> str:
    """How a stop reason ends the run: budgets, pruning and completion are normal endings."""
    reason = stop_reason.lower()
    if reason.startswith(("error", "fail", "exception")):
        return RunStatus.to_string(RunStatus.FAILED)
    if reason.startswith(("interrupt", "kill", "cancel", "abort")):
        return RunStatus.to_string(RunStatus.KILLED)
    return RunStatus.to_string(RunStatus.FINISHED)


def _default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of a new experiment live next to its SQLite database, not in the caller's
    working directory (MLflow's default), so that the store stays one movable folder."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db_path = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
    if not db_path or db_path == ":memory:":
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (Path(db_path).resolve().parent / "mlruns" / slug).as_uri()


class _Writer:
    """Runs MLflow writes one at a time, in submission order; after ``close`` it drops them.

    Asynchronous: on one daemon thread; a failed write is logged and recorded in ``errors``.
    Synchronous: inline in the caller's thread under a lock; a failed write raises.
    """

    def __init__(self, asynchronous: bool, name: str):
        self.errors: list[str] = []
        self._asynchronous = asynchronous
        self._closed = False
        self._state_lock = threading.Lock()  # orders submit against close
        self._inline_lock = threading.Lock()  # serializes synchronous writes
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        if asynchronous:
            self._thread = threading.Thread(target=self._drain, name=name, daemon=True)
            self._thread.start()

    def submit(self, write: Callable[..., None], *args: Any) -> None:
        if self._asynchronous:
            with self._state_lock:
                if not self._closed:
                    self._queue.put((write, args))
            return
        with self._inline_lock:
            if not self._closed:
                write(*args)

    def flush(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.join()

    def close(self) -> None:
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        if self._thread is not None:
            self._thread.join()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                write, args = item
                try:
                    write(*args)
                except Exception as exc:  # keep tracking the rest of the loop
                    message = f"{write.__name__.lstrip('_')}: {type(exc).__name__}: {exc}"
                    self.errors.append(message)
                    _logger.warning("MLflow tracking write failed (%s)", message, exc_info=True)
            finally:
                self._queue.task_done()


class MlflowTracker(LoopCallback):
    """Records one learning loop as one MLflow run (see the module docstring for the layout).

    Parameters
    ----------
    tracking_uri:
        Where to track, as an MLflow tracking URI (``sqlite:///path/mlflow.db``,
        ``http://host:5000``, ...). ``None``: ``$MLFLOW_TRACKING_URI`` if set, else
        ``sqlite:///mlflow.db``. The URI is also set as MLflow's global tracking URI (MLflow's
        tracing and LoggedModel creation use that one), so trackers that run at the same time
        in one process must share it.
    experiment:
        Experiment name; created if missing (for SQLite stores with its artifacts in
        ``mlruns/<experiment>`` next to the database file).
    run_name:
        ``None``: ``<task>-<init>-b<batch_size>-s<seed>`` from the loop config.
    log_traces:
        Record every LLM call as a span of an MLflow trace.
    nested:
        Start the run as a child of ``parent_run_id``, or else of the run that is active in the
        calling thread (e.g. a study's parent run). ``False``: a top-level run, whatever is active.
    tags:
        Extra run tags.
    parent_run_id:
        Explicit parent for ``nested=True`` (for loops run in worker threads, where MLflow's
        thread-local active run is not visible).
    asynchronous:
        Write on a background thread (default). ``False`` writes inline and raises on failure.
    resume_versions:
        When continuing an interrupted loop in ``run_id``: the versions it already logged (from
        its checkpoint), so that diffs find their parents and no LoggedModel is created twice.
    run_id:
        Log into this existing run instead of creating one. ``None`` (and not nested): the run
        named by ``$MLFLOW_RUN_ID`` if set, which is how ``mlflow run`` hands its run to the
        entry point's command.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "genopt",
        run_name: str | None = None,
        *,
        log_traces: bool = True,
        nested: bool = False,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        asynchronous: bool = True,
        run_id: str | None = None,
        resume_versions: Iterable[ArtifactVersion] = (),
    ):
        if not isinstance(experiment, str) or not experiment.strip():
            raise ValueError(f"experiment: must be a non-empty name, got {experiment!r}")
        if parent_run_id is not None and not nested:
            raise ValueError("parent_run_id: only meaningful with nested=True")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.log_traces = log_traces
        self.nested = nested
        self.tags = dict(tags or {})
        self.parent_run_id = parent_run_id
        self.asynchronous = asynchronous
        self.attach_run_id = run_id or (None if nested else os.environ.get("MLFLOW_RUN_ID"))
        self._resume_versions = list(resume_versions)

        self._client: MlflowClient | None = None
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._writer: _Writer | None = None
        self._staging: Path | None = None
        self._staging_counter = itertools.count()
        self._ended = False
        self._end_lock = threading.Lock()
        # State below is touched only by writes, which the writer serializes.
        self._config: LoopConfig | None = None
        self._task_name = ""
        self._model_params: dict[str, str] = {}
        self._kinds: dict[str, str] = {}
        self._versions: dict[str, ArtifactVersion] = {}
        self._model_ids: dict[str, str] = {}
        self._version_metrics: dict[str, dict[str, float]] = {}
        self._pending_calls: list[LLMCall] = []
        self._pending_metrics: list[Metric] = []
        self._phase = 0  # the step whose LLM calls are arriving (0: the starting version)
        self._tokens_cum = 0
        self._cost_cum = 0.0
        self._last_step = 0
        self._last_best: float | None = None

    # --- public -----------------------------------------------------------------------------
    @property
    def run_id(self) -> str | None:
        """The MLflow run id, once ``on_loop_start`` has run."""
        return self._run_id

    @property
    def active(self) -> bool:
        """True from ``on_loop_start`` until the run has ended."""
        return self._writer is not None and not self._ended

    @property
    def experiment_id(self) -> str | None:
        return self._experiment_id

    @property
    def model_ids(self) -> Mapping[str, str]:
        """version_id -> LoggedModel id of every version written so far (call :meth:`flush`
        first for an up-to-date view)."""
        return MappingProxyType(self._model_ids)

    @property
    def errors(self) -> tuple[str, ...]:
        """One line per MLflow write that failed (asynchronous mode)."""
        return tuple(self._writer.errors) if self._writer else ()

    def flush(self, traces: bool = False) -> None:
        """Wait until everything reported so far is written to MLflow; with ``traces``, also
        until MLflow's trace exporter has stored every trace (this costs ~1-2 s: MLflow's
        export queue polls with a 1 s timeout)."""
        if self._writer is not None:
            self._writer.flush()
        if traces:
            mlflow.flush_trace_async_logging()

    def fail(self, error: str | BaseException, totals: Mapping[str, float] | None = None) -> None:
        """End the run ``FAILED`` with tag ``genopt.error`` (and ``totals`` as ``totals/<key>``
        metrics: what the loop spent, LLM retries included), after writing what is pending.
        Harmless before ``on_loop_start`` and after the run has ended."""
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}"
        self._finish(RunStatus.to_string(RunStatus.FAILED), error=str(error), totals=totals)

    # --- LoopCallback -----------------------------------------------------------------------
    def on_loop_start(self, start: LoopStart) -> None:
        if self._run_id is not None:
            raise RuntimeError("MlflowTracker: one tracker records one loop; create a new one")
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        if urlparse(uri).scheme in ("", "file"):
            raise ValueError(
                f"tracking_uri: {uri!r} is a file store, which is not supported; "
                "use sqlite:///path/mlflow.db or an http(s):// tracking server"
            )
        _create_sqlite_store_atomically(uri)
        mlflow.set_tracking_uri(uri)
        self._client = client = MlflowClient(uri)
        attached = client.get_run(self.attach_run_id) if self.attach_run_id else None
        self._experiment_id = (
            attached.info.experiment_id if attached
            else self._get_or_create_experiment(client, uri)
        )
        config = start.config
        self._config = config
        self._task_name = start.task_name
        params = config.to_params()
        self._model_params = params
        self._kinds = {p.name: p.kind for p in start.spec.parameters}

        tags = {
            **self.tags,
            "genopt.loop_run": "true",  # only the tracker sets it: marks a learning-loop run
            "genopt.project": config.project,
            "genopt.task": start.task_name,
            "genopt.init": config.init,
            "genopt.config_hash": config.config_hash(),
            "genopt.version": _library_version(),
            "genopt.objective": _truncate(start.objective, 1000),
        }
        parent = self._parent_run_id()
        if parent is not None:
            tags[MLFLOW_PARENT_RUN_ID] = parent
        try:  # user, source and git tags, as mlflow.start_run would add them
            from mlflow.tracking.context.registry import resolve_tags

            tags = resolve_tags(tags)
        except Exception:
            _logger.debug("could not resolve MLflow context tags", exc_info=True)
        horizon = f"-h{config.credit_horizon}" if config.credit_horizon is not None else ""
        name = self.run_name or (
            f"{config.task}-{config.init}-b{config.batch_size}{horizon}-s{config.seed}"
        )
        if attached is not None:
            self._run_id = attached.info.run_id
            client.log_batch(self._run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
            if attached.info.status != "RUNNING":
                client.update_run(self._run_id, status="RUNNING")
            self._preload(client, attached)
            # the launcher (e.g. `mlflow run`) may already have logged some params verbatim
            params_to_log = {k: v for k, v in params.items() if k not in attached.data.params}
        else:
            run = client.create_run(self._experiment_id, run_name=name, tags=tags)
            self._run_id = run.info.run_id
            params_to_log = params
        items = [Param(k, v) for k, v in params_to_log.items()]
        try:
            for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
                client.log_batch(self._run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])
        except Exception:
            client.set_terminated(self._run_id, RunStatus.to_string(RunStatus.FAILED))
            raise

        self._staging = Path(tempfile.mkdtemp(prefix="genopt-mlflow-"))
        self._writer = _Writer(self.asynchronous, name=f"genopt-mlflow-{self._run_id[:8]}")
        atexit.register(self._at_exit)
        spec = {
            "parameters": [
                {
                    "name": p.name,
                    "kind": p.kind,
                    "description": p.description,
                    "trainable": p.trainable,
                    "function_name": p.expected_function,
                    "placeholders": list(p.placeholders),
                }
                for p in start.spec.parameters
            ]
        }
        files = {"config.yaml": config.to_yaml(), "artifact_spec.json": _dumps(spec, indent=2)}
        self._writer.submit(self._write_files, files, None)

    def on_version(self, record: VersionRecord) -> None:
        if self.active:
            self._writer.submit(self._write_version, record, _now_ms())

    def on_llm_call(self, call: LLMCall) -> None:
        if self.log_traces and self.active:
            self._writer.submit(self._collect_call, call)

    def on_step(self, record: StepRecord) -> None:
        if self.active:
            self._writer.submit(self._write_step, record, _now_ms())

    def on_loop_end(self, result: LoopResult) -> None:
        if not self.active:
            return
        self._writer.submit(self._write_result, result, _now_ms())
        self._finish(_run_status(result.stop_reason))

    # --- run lifecycle ----------------------------------------------------------------------

    def _preload(self, client: MlflowClient, run) -> None:
        """Continue a run: know the versions and LoggedModels it has, and its cumulative sums."""
        for version in self._resume_versions:
            self._versions[version.version_id] = version
        for model in client.search_logged_models(
            experiment_ids=[self._experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}'",
        ):
            version_id = model.tags.get("genopt.version_id")
            if version_id:
                self._model_ids[version_id] = model.model_id
        metrics = run.data.metrics
        self._tokens_cum = int(metrics.get("total_tokens_cum", 0))
        self._cost_cum = float(metrics.get("cost_usd_cum", 0.0))
        checkpoint = last_logged_step(client, run.info.run_id)
        if checkpoint:
            self._last_step = checkpoint
            self._phase = checkpoint + 1

    def _get_or_create_experiment(self, client: MlflowClient, uri: str) -> str:
        existing = client.get_experiment_by_name(self.experiment)
        if existing is not None:
            if existing.lifecycle_stage == "deleted":
                raise ValueError(
                    f"experiment: {self.experiment!r} is deleted in {uri}; restore it or "
                    "choose another name"
                )
            return existing.experiment_id
        try:
            return client.create_experiment(
                self.experiment,
                artifact_location=_default_artifact_location(uri, self.experiment),
            )
        except MlflowException:
            existing = client.get_experiment_by_name(self.experiment)  # created concurrently
            if existing is None:
                raise
            return existing.experiment_id

    def _parent_run_id(self) -> str | None:
        if not self.nested:
            return None
        if self.parent_run_id is not None:
            return self.parent_run_id
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError(
                "MlflowTracker(nested=True): no active MLflow run in this thread to nest under; "
                "start one with mlflow.start_run() or pass parent_run_id="
            )
        return active.info.run_id

    def _finish(self, status: str, *, error: str | None = None, interrupted: bool = False,
                totals: Mapping[str, float] | None = None) -> None:
        with self._end_lock:
            if self._writer is None or self._ended:
                return
            self._ended = True
        writer = self._writer
        if error is not None or interrupted:
            writer.submit(self._write_abort, error, dict(totals or {}))
        writer.submit(self._log_metrics)  # whatever a last version left queued
        writer.close()
        try:
            if writer.errors:
                self._client.set_tag(
                    self._run_id, "genopt.tracking_errors", str(len(writer.errors))
                )
            self._client.set_terminated(self._run_id, status)
        finally:
            atexit.unregister(self._at_exit)
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)

    def _at_exit(self) -> None:
        try:
            self._finish(RunStatus.to_string(RunStatus.KILLED), interrupted=True)
            # MLflow's own exit flush may already have run (it registers when the first span
            # is made, after this hook), so the spans written just now need one more.
            mlflow.flush_trace_async_logging(terminate=True)
        except Exception:
            _logger.warning("MLflow tracking: could not end run %s at exit", self._run_id)

    # --- writes (run one at a time, in order) -------------------------------------------------
    def _write_files(
        self, files: Mapping[str, str], artifact_path: str | None, model_id: str | None = None
    ) -> None:
        """Log ``files`` (relative path -> text) as run artifacts under ``artifact_path``, and as
        the LoggedModel's artifacts too with ``model_id``: one staging folder, one upload each."""
        folder = self._staging / f"{next(self._staging_counter):05d}"
        folder.mkdir()
        try:
            for relative, text in files.items():
                path = folder / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
            self._client.log_artifacts(self._run_id, str(folder), artifact_path)
            if model_id is not None:
                self._client.log_model_artifacts(model_id, str(folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _add_metrics(
        self, metrics: Mapping[str, Any], step: int, timestamp: int, model_id: str | None = None
    ) -> None:
        """Queue metrics for the next :meth:`_log_metrics`; with ``model_id`` they are the
        LoggedModel's metrics too (MLflow then also adds them to the run's history)."""
        self._pending_metrics.extend(
            Metric(key, float(value), timestamp, step, model_id=model_id, run_id=self._run_id)
            for key, value in metrics.items()
            if _finite(value)
        )

    def _log_metrics(self, tags: Mapping[str, str] | None = None) -> None:
        """One ``log_batch`` for everything queued (each store call costs ~20 ms of CPU);
        ``tags`` go into the last batch."""
        entries, self._pending_metrics = self._pending_metrics, []
        chunks = [entries[i : i + _MAX_METRICS_PER_BATCH]
                  for i in range(0, len(entries), _MAX_METRICS_PER_BATCH)] or [[]]
        run_tags = [RunTag(k, v) for k, v in (tags or {}).items()]
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            if chunk or (last and run_tags):
                self._client.log_batch(self._run_id, metrics=chunk,
                                       tags=run_tags if last else [])

    def _write_version(self, record: VersionRecord, timestamp: int) -> None:
        version = record.version
        version_id = version.version_id
        self._versions[version_id] = version
        files = {"version.json": _dumps(record.to_dict(), indent=2)}
        for name, text in version.values.items():
            suffix = ".py" if self._kinds.get(name) == "code" else ".txt"
            files[f"{name}{suffix}"] = text
        parent = self._versions.get(version.parent_id) if version.parent_id else None
        if parent is not None:
            files["diff.patch"] = diff(parent, version)
        model_id = self._model_ids.get(version_id)  # logged before an interruption: reuse
        if model_id is None:
            model_id = self._create_model(record)
        self._write_files(files, f"versions/{version_id}", model_id=model_id)
        metrics = {"val_score": record.val_score}
        metrics.update({f"val_{k}": v for k, v in record.val_metrics.items()})
        if record.batch_score is not None:
            metrics["candidate_batch_score"] = record.batch_score
        # Written with the step's own metrics (or at the loop's end), in one call.
        self._add_metrics(metrics, version.step, timestamp, model_id=model_id)
        self._version_metrics[version_id] = metrics
        if record.status == "initial":
            self._flush_calls(f"evaluate {version_id}", model_id=model_id)
            self._phase = 1

    def _create_model(self, record: VersionRecord) -> str:
        """A LoggedModel for a version the run has not logged yet, listed among its outputs."""
        version = record.version
        version_id = version.version_id
        model = mlflow.create_external_model(
            name=version_id,
            source_run_id=self._run_id,
            model_type=MODEL_TYPE,
            params=self._model_params,
            tags={
                "genopt.version_id": version_id,
                "genopt.parent_id": version.parent_id or "none",
                "genopt.step": str(version.step),
                "genopt.status": record.status,
                "genopt.content_hash": version.content_hash,
                "genopt.selected": "false",
                "genopt.config_hash": self._config.config_hash(),
                "genopt.task": self._task_name,
            },
            experiment_id=self._experiment_id,
        )
        self._model_ids[version_id] = model.model_id
        # The run produced this version: show it among the run's logged models.
        self._client.log_outputs(self._run_id, [LoggedModelOutput(model.model_id, version.step)])
        return model.model_id

    def _collect_call(self, call: LLMCall) -> None:
        self._pending_calls.append(call)

    def _write_step(self, record: StepRecord, timestamp: int) -> None:
        step = record.step
        candidate_model = self._model_ids.get(record.candidate_id or "")
        self._flush_calls(f"step {step}", model_id=candidate_model, step_record=record)

        step_tokens = record.prompt_tokens + record.completion_tokens
        self._tokens_cum += step_tokens
        self._cost_cum += record.cost_usd or 0.0
        metrics: dict[str, Any] = {
            "batch_score": record.batch_score,
            "best_val_score": record.best_val_score,
            "accepted": int(record.accepted),
            "valid": int(record.valid),
            "rejected_proposals": record.invalid_total,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "total_tokens": step_tokens,
            "total_tokens_cum": self._tokens_cum,
            "cost_usd": record.cost_usd,
            "cost_usd_cum": self._cost_cum,
            "llm_latency_s": record.llm_latency_s,
            "llm_calls": record.llm_calls,
            "cached_calls": record.cached_calls,
            "llm_retries": record.llm_retries,
            "eval_time_s": record.eval_time_s,
            "step_wall_time_s": record.wall_time_s,
        }
        # The candidate's scores are already in the history when its version was logged at
        # this step; log them here only if they were not (or differ), never twice.
        logged = self._version_metrics.get(record.candidate_id or "", {})
        if record.val_score is not None and logged.get("val_score") != record.val_score:
            metrics["val_score"] = record.val_score
            metrics.update({f"val_{k}": v for k, v in record.val_metrics.items()})
        if record.note:
            metrics["reverted"] = 1
        if (
            record.candidate_batch_score is not None
            and logged.get("candidate_batch_score") != record.candidate_batch_score
        ):
            metrics["candidate_batch_score"] = record.candidate_batch_score
        self._add_metrics(metrics, step, timestamp)

        proposal = {
            "candidate_id": record.candidate_id,
            "proposal": dict(record.proposal) if record.proposal is not None else None,
            "reasoning": record.reasoning,
            "invalid_reason": record.invalid_reason,
            "accepted": record.accepted,
            "note": record.note,
        }
        files = {
            "context.json": _dumps([dict(m) for m in record.context], indent=2),
            "response.txt": record.raw_response,
            "proposal.json": _dumps(proposal, indent=2),
            "trials.jsonl": _jsonl(t.to_dict() for t in record.trials),
        }
        if record.candidate_trials:
            files["candidate_trials.jsonl"] = _jsonl(t.to_dict() for t in record.candidate_trials)
        if record.checkpoint:
            files["checkpoint.json"] = _dumps(record.checkpoint)
        self._write_files(files, f"steps/{step:03d}")
        # The step counts as logged once this batch's metrics land (one transaction, after the
        # checkpoint file); the tag is informational: SQL stores commit tags separately.
        self._log_metrics(tags={"genopt.checkpoint_step": str(step)} if record.checkpoint else None)
        self._last_step = step
        self._last_best = record.best_val_score
        self._phase = step + 1

    def _write_result(self, result: LoopResult, timestamp: int) -> None:
        selected_id = result.selected.version_id
        selected_model = self._model_ids.get(selected_id)
        self._flush_calls("test", model_id=selected_model)
        tags = [
            RunTag("genopt.selected_version", selected_id),
            RunTag("genopt.stop_reason", _truncate(result.stop_reason)),
        ]
        self._client.log_batch(self._run_id, tags=tags)
        if selected_model is not None:
            self._client.set_logged_model_tags(selected_model, {"genopt.selected": "true"})
        else:
            _logger.warning("MLflow tracking: selected version %s was never reported", selected_id)

        step = self._last_step
        if result.test_score is not None:
            self._add_metrics(
                {"test_score": result.test_score}, step, timestamp, model_id=selected_model
            )
        final: dict[str, Any] = {f"totals/{k}": v for k, v in result.totals.items()}
        if self._last_best is None or self._last_best != result.best_val_score:
            final["best_val_score"] = result.best_val_score
        self._add_metrics(final, step, timestamp)
        self._log_metrics()

        summary = {
            "selected_version": selected_id,
            "selected_model_id": selected_model,
            "best_val_score": result.best_val_score,
            "test_score": result.test_score,
            "stop_reason": result.stop_reason,
            "steps": len(result.steps),
            "totals": dict(result.totals),
            "config": result.config.to_dict(),
        }
        history = []
        for record in result.steps:
            row = record.to_dict()
            for key in _BULKY_STEP_FIELDS:  # they have their own files under steps/
                row.pop(key, None)
            history.append(row)
        versions = [
            {
                "version_id": v.version.version_id,
                "parent_id": v.version.parent_id,
                "step": v.version.step,
                "status": v.status,
                "batch_score": v.batch_score,
                "val_score": v.val_score,
                "model_id": self._model_ids.get(v.version.version_id),
                "selected": v.version.version_id == selected_id,
            }
            for v in result.versions
        ]
        files = {
            "result.json": _dumps(summary, indent=2),
            "steps.jsonl": _jsonl(history),
            "versions.jsonl": _jsonl(versions),
        }
        if result.test_trials:
            files["test_trials.jsonl"] = _jsonl(t.to_dict() for t in result.test_trials)
        self._write_files(files, None)
        if result.export_dir is not None:
            self._write_export(Path(result.export_dir), selected_model)

    def _write_export(self, directory: Path, model_id: str | None) -> None:
        """The task's deliverables for the selected version go under ``export/``; an MLflow model
        among them (``model/MLmodel``) becomes the selected LoggedModel's own artifacts, so that
        ``mlflow.pyfunc.load_model("models:/<model_id>")`` loads it."""
        if not directory.is_dir():
            raise FileNotFoundError(f"export_dir {directory} does not exist")
        self._client.log_artifacts(self._run_id, str(directory), "export")
        model_dir = directory / "model"
        if model_id is not None and (model_dir / "MLmodel").is_file():
            self._client.log_model_artifacts(model_id, str(model_dir))  # replaces the stub MLmodel
            self._client.delete_logged_model_tag(model_id, MLFLOW_MODEL_IS_EXTERNAL)
            self._client.set_logged_model_tags(model_id, {"genopt.exported_model": "true"})

    def _write_abort(self, error: str | None, totals: Mapping[str, float] | None = None) -> None:
        """The loop failed (``error``) or the process is exiting without a loop end."""
        reason = "error" if error is not None else "interrupted"
        self._flush_calls(f"step {self._phase} ({reason})", error=error or reason)
        if totals:
            self._add_metrics({f"totals/{k}": v for k, v in totals.items()}, self._last_step,
                              _now_ms())
        tags = [RunTag("genopt.stop_reason", reason)]
        if error is not None:
            tags.append(RunTag("genopt.error", _truncate(error)))
        self._client.log_batch(self._run_id, tags=tags)

    # --- traces -------------------------------------------------------------------------------
    def _flush_calls(
        self,
        name: str,
        *,
        model_id: str | None = None,
        step_record: StepRecord | None = None,
        error: str | None = None,
    ) -> None:
        """One trace for the LLM calls of one phase: a root span over them, a child per call."""
        calls, self._pending_calls = sorted(self._pending_calls, key=lambda c: c.start_time_ns), []
        if not calls:
            return
        metadata = {TraceMetadataKey.SOURCE_RUN: self._run_id}
        if model_id is not None:
            metadata[TraceMetadataKey.MODEL_ID] = model_id
        phase = step_record.step if step_record is not None else self._phase
        trace_tags = {"genopt.step": str(phase), "genopt.run_id": self._run_id}
        inputs: dict[str, Any] = {"step": phase, "llm_calls": len(calls)}
        outputs: dict[str, Any] = {}
        if step_record is not None:
            inputs.update(current_id=step_record.current_id, batch_ids=list(step_record.batch_ids))
            outputs = {
                "candidate_id": step_record.candidate_id,
                "invalid_reason": step_record.invalid_reason,
                "accepted": step_record.accepted,
                "val_score": step_record.val_score,
            }
        with mlflow.tracing.context(metadata=metadata, tags=trace_tags):
            root = mlflow.start_span_no_context(
                name=name,
                span_type=SpanType.CHAIN,
                inputs=inputs,
                experiment_id=self._experiment_id,
                start_time_ns=calls[0].start_time_ns,
            )
        failed = error is not None
        for call in calls:
            failed |= call.error is not None
            self._trace_call(root, call)
        end = max(c.end_time_ns for c in calls)
        if error is not None:
            outputs["error"] = error
        root.end(outputs=outputs or None, status="ERROR" if failed else "OK", end_time_ns=end)

    def _trace_call(self, root: LiveSpan, call: LLMCall) -> None:
        completion = call.completion
        attributes: dict[str, Any] = {
            "purpose": call.purpose,
            "model": call.model,
            "params": dict(call.params),
            SpanAttributeKey.MODEL: call.model,
        }
        if completion is not None:
            total = completion.prompt_tokens + completion.completion_tokens
            attributes.update(
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
                cached=completion.cached,
                attempts=completion.attempts,
                latency_s=completion.latency_s,
                cost_usd=completion.cost_usd,
            )
            attributes[SpanAttributeKey.CHAT_USAGE] = {
                "input_tokens": completion.prompt_tokens,
                "output_tokens": completion.completion_tokens,
                "total_tokens": total,
            }
            if completion.cost_usd is not None:
                attributes[SpanAttributeKey.LLM_COST] = {"total_cost": completion.cost_usd}
        span = mlflow.start_span_no_context(
            name=f"{call.purpose} llm",
            span_type=SpanType.CHAT_MODEL,
            parent_span=root,
            inputs={"messages": [dict(m) for m in call.messages], **dict(call.params)},
            attributes=attributes,
            start_time_ns=call.start_time_ns,
        )
        if call.error is not None:
            span.record_exception(call.error)
            span.end(status="ERROR", end_time_ns=call.end_time_ns)
            return
        outputs = None
        if completion is not None:
            outputs = {
                "model": completion.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": completion.text},
                        "finish_reason": completion.finish_reason,
                    }
                ],
                "usage": attributes[SpanAttributeKey.CHAT_USAGE],
            }
        span.end(outputs=outputs, end_time_ns=call.end_time_ns)


# --- studies ----------------------------------------------------------------------------------
# mlflow_genopt.study (the only module that talks to Optuna) records a study as one parent run
# with one nested MlflowTracker run per trial; these helpers are the few parent-run writes it
# needs, so that it never imports MLflow itself.


def start_study_run(
    tracking_uri: str,
    experiment: str,
    *,
    run_name: str,
    tags: Mapping[str, str],
    run_id: str | None = None,
) -> tuple[str, str, bool]:
    """The parent run of a study: ``$MLFLOW_RUN_ID`` when set (``mlflow run`` made it), else
    ``run_id`` reopened (status back to RUNNING; a resumed study), else a new run in
    ``experiment``. Returns ``(run_id, experiment name, owned)``; ``owned`` is False for the
    ``mlflow run`` run, whose launcher ends it."""
    if urlparse(tracking_uri).scheme in ("", "file"):
        raise ValueError(
            f"tracking_uri: {tracking_uri!r} is a file store, which is not supported; "
            "use sqlite:///path/mlflow.db or an http(s):// tracking server"
        )
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    run_tags = [RunTag(k, _truncate(str(v))) for k, v in tags.items()]
    attach = os.environ.get("MLFLOW_RUN_ID")
    owned = attach is None
    existing = None
    for candidate in (attach, run_id):
        if not candidate:
            continue
        try:
            existing = client.get_run(candidate)
        except MlflowException:
            existing = None
        if existing is not None and existing.info.lifecycle_stage != "deleted":
            owned = candidate != attach
            break
        existing = None
    if existing is not None:
        found = existing.info.run_id
        client.log_batch(found, tags=run_tags)
        if owned and existing.info.status != RunStatus.to_string(RunStatus.RUNNING):
            client.update_run(found, status=RunStatus.to_string(RunStatus.RUNNING))
        return found, client.get_experiment(existing.info.experiment_id).name, owned
    # the same experiment (and SQLite artifact location) a loop's tracker would create
    experiment_id = MlflowTracker(tracking_uri, experiment)._get_or_create_experiment(
        client, tracking_uri
    )
    all_tags = {k: _truncate(str(v)) for k, v in tags.items()}
    try:
        from mlflow.tracking.context.registry import resolve_tags

        all_tags = resolve_tags(all_tags)
    except Exception:
        _logger.debug("could not resolve MLflow context tags", exc_info=True)
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return run.info.run_id, experiment, True


def update_run(
    tracking_uri: str,
    run_id: str,
    *,
    tags: Mapping[str, str] | None = None,
    metrics: Mapping[str, float] | None = None,
    step: int = 0,
    status: str | None = None,
) -> None:
    """Tags, metrics (at ``step``) and optionally a terminal ``status`` (``FINISHED``,
    ``FAILED``, ``KILLED``) for an existing run, in one ``log_batch``."""
    client = MlflowClient(tracking_uri)
    now = _now_ms()
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if _finite(v)],
        tags=[RunTag(k, _truncate(str(v))) for k, v in (tags or {}).items()],
    )
    if status is not None:
        client.set_terminated(run_id, status)


def log_study_summary(
    tracking_uri: str,
    run_id: str,
    directory: str | Path,
    *,
    metrics: Mapping[str, float],
    tags: Mapping[str, str] | None = None,
    step: int = 0,
    status: str | None = None,
) -> None:
    """Log a study's summary folder (tables, plots, ``recommended.yaml``) as the parent run's
    artifacts, with its metrics (at ``step``: the number of finished trials, so that a resumed
    study adds to the history) and tags; end the run with ``status`` when given."""
    MlflowClient(tracking_uri).log_artifacts(run_id, str(directory))
    update_run(tracking_uri, run_id, tags=tags, metrics=metrics, step=step, status=status)


# --- resuming interrupted loops ---------------------------------------------------------------
def load_run_checkpoint(tracking_uri: str, run_id: str) -> tuple[dict[str, str], dict | None, str]:
    """``(params, checkpoint or None, status)`` of a loop run.

    The checkpoint is the loop state after the last step whose metrics landed (tag
    ``genopt.checkpoint_step``); ``None`` when no step completed. Raises ``ValueError`` with one
    line when the run does not exist or is not a genopt loop.
    """
    _require_existing_sqlite(tracking_uri)
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"run {run_id}: not found in {tracking_uri}") from None
    if run.data.tags.get("genopt.loop_run") != "true":
        raise ValueError(f"run {run_id}: not a genopt learning loop (no genopt.loop_run tag)")
    step = last_logged_step(client, run_id)
    checkpoint = None
    if step:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, f"steps/{int(step):03d}/checkpoint.json", tmp)
            checkpoint = json.loads(Path(path).read_text())
    return dict(run.data.params), checkpoint, run.info.status


def _create_sqlite_store_atomically(tracking_uri: str) -> None:
    """Create a missing SQLite store under a temporary name, then rename it into place.

    MLflow migrates a new database in many statements; a process killed meanwhile would leave a
    half-migrated file that every later run fails on ("duplicate column name").
    """
    if not tracking_uri.startswith("sqlite:///"):
        return
    path = Path(tracking_uri[len("sqlite:///"):])
    if path.exists() or str(path) == ":memory:":
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.creating")
    try:
        MlflowClient(f"sqlite:///{partial}").search_experiments(max_results=1)
        try:
            os.link(partial, path)  # fails if another process created it meanwhile: keep theirs
        except FileExistsError:
            pass
    finally:
        partial.unlink(missing_ok=True)


def last_logged_step(client: MlflowClient, run_id: str) -> int:
    """The last step whose metrics landed (0: none). MLflow's SQL store commits a batch's
    metrics in one transaction but its tags in another, so the step's own metrics, not the
    ``genopt.checkpoint_step`` tag, say what was logged; its checkpoint file precedes them."""
    history = client.get_metric_history(run_id, STEP_SENTINEL_METRIC)
    return max((m.step for m in history), default=0)


def check_tracking_uri(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Raise :class:`ConfigError` (one line: the problem and the fix) for a tracking URI that
    cannot work: a file store, or an http(s) server that does not answer within ``timeout_s``.
    Checked before anything is created, because MLflow's own client retries an unreachable
    server with exponential backoff for minutes before it fails."""
    import urllib.error
    import urllib.request

    scheme = urlparse(tracking_uri).scheme
    if scheme in ("", "file"):
        raise ConfigError(
            f"tracking_uri: {tracking_uri!r} is a file store, which is not supported; use "
            "sqlite:///path/mlflow.db or an http(s):// tracking server"
        )
    if scheme not in ("http", "https"):
        return
    try:
        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answered (a proxy may refuse /health): reachable
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"tracking_uri: no MLflow tracking server answers at {tracking_uri} ({reason}); start "
            "one (mlflow server ...), or use --tracking-uri sqlite:///mlflow.db or --no-tracking"
        ) from None


def _require_existing_sqlite(tracking_uri: str) -> None:
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):])
        if not path.is_file():
            raise ValueError(f"tracking_uri: no MLflow database at {path}; pass the --tracking-uri "
                             "the run was logged to")


def find_resumable_run(tracking_uri: str, experiment: str, config_hash: str) -> str | None:
    """The newest unfinished (RUNNING, KILLED or FAILED) loop run with this config hash."""
    try:
        _require_existing_sqlite(tracking_uri)
    except ValueError:
        return None  # a new store has nothing to resume
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`genopt.config_hash` = '{config_hash}' "
        "and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    # a study's trials belong to the study (Optuna retries them), never to `genopt run`
    standalone = [r for r in runs
                  if r.data.tags.get("genopt.loop_run") == "true" and "genopt.study" not in r.data.tags]
    return standalone[0].info.run_id if standalone else None
