"""The writer of loop runs: :class:`MlflowTracker`, a loop callback, and its background writer.

What a run contains and what the tracker guarantees (write order, failures, process exit,
resume) is stated once, in the package docstring (:mod:`mlflow_genopt.tracking`). What each
event becomes is built in :mod:`.records`, LLM calls become traces in :mod:`.traces`; this
module owns the run's lifecycle and the order of the MLflow calls.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, Metric, Param, RunStatus, RunTag
from mlflow.tracing.client import TracingClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from ..artifact import ArtifactVersion
from ..config import LoopConfig
from ..events import LoopCallback, LoopResult, LoopStart, StepRecord, VersionRecord
from ..llm.base import LLMCall
from . import layout, records, store
from .resume import last_logged_step
from . import traces
from .write_queue import WriteQueue

__all__ = ["MlflowTracker"]

_logger = logging.getLogger(__name__)


def _run_status(stop_reason: str) -> str:
    """How a stop reason ends the run: budgets, pruning and completion are normal endings."""
    reason = stop_reason.lower()
    if reason.startswith(("error", "fail", "exception")):
        return RunStatus.to_string(RunStatus.FAILED)
    if reason.startswith(("interrupt", "kill", "cancel", "abort")):
        return RunStatus.to_string(RunStatus.KILLED)
    return RunStatus.to_string(RunStatus.FINISHED)


class MlflowTracker(LoopCallback):
    """Records one learning loop as one MLflow run (the layout and the guarantees: see
    :mod:`mlflow_genopt.tracking`).

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
        store.require_experiment_name(experiment)
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
        self._writer: WriteQueue | None = None
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
        self._tracing = None  # mlflow TracingClient: traces are written straight to the store
        self._pending_calls: list[LLMCall] = []
        self._pending_metrics: list[Metric] = []
        self._initial_logged = False  # the starting version's usage metrics (step 0)
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
        """Wait until everything reported so far is written to MLflow (traces included: they
        are written by the same writer; ``traces`` is kept for compatibility)."""
        if self._writer is not None:
            self._writer.flush()

    def fail(self, error: str | BaseException, totals: Mapping[str, float] | None = None,
             failed: Mapping[str, float] | None = None) -> None:
        """End the run ``FAILED`` with tag ``genopt.error`` (and ``totals`` as ``totals/<key>``
        metrics: what the loop spent, LLM retries included; ``failed``: the usage of the work
        that did not commit, cumulative over the run's failures, as ``failed_<key>``), after
        writing what is pending. Harmless before ``on_loop_start`` and after the run ended."""
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}"
        self._finish(RunStatus.to_string(RunStatus.FAILED), error=str(error), totals=totals,
                     failed=failed)

    # --- LoopCallback -----------------------------------------------------------------------
    def on_loop_start(self, start: LoopStart) -> None:
        if self._run_id is not None:
            raise RuntimeError("MlflowTracker: one tracker records one loop; create a new one")
        uri = (self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
               or store.DEFAULT_TRACKING_URI)
        store.refuse_file_store(uri)
        store.create_sqlite_store_atomically(uri)
        mlflow.set_tracking_uri(uri)
        self._client = client = MlflowClient(uri)
        self._tracing = TracingClient(uri)
        attached = client.get_run(self.attach_run_id) if self.attach_run_id else None
        self._experiment_id = (
            attached.info.experiment_id if attached
            else store.get_or_create_experiment(client, uri, self.experiment)
        )
        config = start.config
        self._config = config
        self._task_name = start.task_name
        params = config.to_params()
        self._model_params = params
        self._kinds = {p.name: p.kind for p in start.spec.parameters}

        tags = {**self.tags, **records.run_tags(start)}
        parent = self._parent_run_id()
        if parent is not None:
            tags[MLFLOW_PARENT_RUN_ID] = parent
        tags = store.with_context_tags(tags)  # user, source and git tags, as mlflow.start_run
        if attached is not None:
            self._run_id = attached.info.run_id
            error = attached.data.tags.get(layout.TAG_ERROR)
            if error is not None:  # a resumed run is no longer failing: keep the history visible
                tags[layout.TAG_PREVIOUS_ERROR] = error
            client.log_batch(self._run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
            for stale in (layout.TAG_ERROR, layout.TAG_STOP_REASON):  # it is running again
                if stale in attached.data.tags:
                    client.delete_tag(self._run_id, stale)
            if attached.info.status != "RUNNING":
                client.update_run(self._run_id, status="RUNNING")
            self._preload(client, attached)
            # the traces of phases that never committed are redone: delete them first
            traces.delete_uncommitted(self._tracing, self._experiment_id, self._run_id,
                                      self._last_step)
            # the launcher (e.g. `mlflow run`) may already have logged some params verbatim
            params_to_log = {k: v for k, v in params.items() if k not in attached.data.params}
        else:
            name = self.run_name or layout.run_name(config)
            run = client.create_run(self._experiment_id, run_name=name, tags=tags)
            self._run_id = run.info.run_id
            params_to_log = params
        items = [Param(k, v) for k, v in params_to_log.items()]
        try:
            for i in range(0, len(items), layout.MAX_PARAMS_PER_BATCH):
                client.log_batch(self._run_id, params=items[i : i + layout.MAX_PARAMS_PER_BATCH])
        except Exception:
            client.set_terminated(self._run_id, RunStatus.to_string(RunStatus.FAILED))
            raise

        self._staging = Path(tempfile.mkdtemp(prefix="genopt-mlflow-"))
        self._writer = WriteQueue(self.asynchronous, name=f"genopt-mlflow-{self._run_id[:8]}")
        atexit.register(self._at_exit)
        self._writer.submit(self._write_files, records.start_files(start), None)

    def on_version(self, record: VersionRecord) -> None:
        if self.active:
            self._writer.submit(self._write_version, record, records.now_ms())

    def on_llm_call(self, call: LLMCall) -> None:
        if self.log_traces and self.active:
            self._writer.submit(self._collect_call, call)

    def on_step(self, record: StepRecord) -> None:
        if self.active:
            self._writer.submit(self._write_step, record, records.now_ms())

    def on_loop_end(self, result: LoopResult) -> None:
        if not self.active:
            return
        self._writer.submit(self._write_result, result, records.now_ms())
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
            version_id = model.tags.get(layout.TAG_VERSION_ID)
            if version_id:
                self._model_ids[version_id] = model.model_id
        metrics = run.data.metrics
        self._tokens_cum = int(metrics.get(layout.METRIC_TOTAL_TOKENS_CUM, 0))
        self._cost_cum = float(metrics.get(layout.METRIC_COST_USD_CUM, 0.0))
        checkpoint = last_logged_step(client, run.info.run_id)
        if checkpoint:
            self._last_step = checkpoint
            self._phase = checkpoint + 1
            self._initial_logged = True  # with step 1's metrics

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
                totals: Mapping[str, float] | None = None,
                failed: Mapping[str, float] | None = None) -> None:
        with self._end_lock:
            if self._writer is None or self._ended:
                return
            self._ended = True
        writer = self._writer
        if error is not None or interrupted:
            writer.submit(self._write_abort, error, dict(totals or {}), dict(failed or {}))
        writer.submit(self._log_metrics)  # whatever a last version left queued
        writer.close()
        try:
            if writer.errors:
                self._client.set_tag(
                    self._run_id, layout.TAG_TRACKING_ERRORS, str(len(writer.errors))
                )
            self._client.set_terminated(self._run_id, status)
        finally:
            atexit.unregister(self._at_exit)
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)

    def _at_exit(self) -> None:
        try:
            self._finish(RunStatus.to_string(RunStatus.KILLED), interrupted=True)
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
            if records.finite(value)
        )

    def _log_metrics(self, tags: Mapping[str, str] | None = None) -> None:
        """One ``log_batch`` for everything queued (each store call costs ~20 ms of CPU);
        ``tags`` go into the last batch."""
        entries, self._pending_metrics = self._pending_metrics, []
        size = layout.MAX_METRICS_PER_BATCH
        chunks = [entries[i : i + size] for i in range(0, len(entries), size)] or [[]]
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
        parent = self._versions.get(version.parent_id) if version.parent_id else None
        files = records.version_files(record, self._kinds, parent)
        model_id = self._model_ids.get(version_id)  # logged before an interruption: reuse
        if model_id is None:
            model_id = self._create_model(record)
        self._write_files(files, layout.version_dir(version_id), model_id=model_id)
        metrics = records.version_metrics(record)
        # Written with the step's own metrics (or at the loop's end), in one call.
        self._add_metrics(metrics, version.step, timestamp, model_id=model_id)
        self._version_metrics[version_id] = metrics
        if record.status == "initial":
            self._flush_calls(f"evaluate {version_id}", traces.PHASE_INITIAL, 0, model_id=model_id)
            self._phase = 1

    def _create_model(self, record: VersionRecord) -> str:
        """A LoggedModel for a version the run has not logged yet, listed among its outputs."""
        version = record.version
        model = mlflow.create_external_model(
            name=version.version_id,
            source_run_id=self._run_id,
            model_type=layout.MODEL_TYPE,
            params=self._model_params,
            tags=records.model_tags(record, self._config.config_hash(), self._task_name),
            experiment_id=self._experiment_id,
        )
        self._model_ids[version.version_id] = model.model_id
        # The run produced this version: show it among the run's logged models.
        self._client.log_outputs(self._run_id, [LoggedModelOutput(model.model_id, version.step)])
        return model.model_id

    def _collect_call(self, call: LLMCall) -> None:
        self._pending_calls.append(call)

    def _write_step(self, record: StepRecord, timestamp: int) -> None:
        step = record.step
        candidate_model = self._model_ids.get(record.candidate_id or "")
        # The step's trace is written before the batch that commits the step (see .traces).
        self._flush_calls(f"step {step}", traces.PHASE_STEP, step, model_id=candidate_model,
                          step_record=record)

        self._tokens_cum += record.prompt_tokens + record.completion_tokens
        self._cost_cum += record.cost_usd or 0.0
        logged = self._version_metrics.get(record.candidate_id or "", {})
        metrics = records.step_metrics(record, self._tokens_cum, self._cost_cum, logged)
        self._add_metrics(metrics, step, timestamp)
        if not self._initial_logged:  # the starting version's phase commits with step 1
            initial = (record.checkpoint or {}).get("initial_usage") or {}
            self._add_metrics(records.usage_metrics(initial), 0, timestamp)
            self._initial_logged = True
        self._write_files(records.step_files(record), layout.step_dir(step))
        # The step counts as logged once this batch's metrics land (one transaction, after the
        # checkpoint file); the tag is informational: SQL stores commit tags separately.
        self._log_metrics(
            tags={layout.TAG_CHECKPOINT_STEP: str(step)} if record.checkpoint else None
        )
        self._last_step = step
        self._last_best = record.best_val_score
        self._phase = step + 1

    def _write_result(self, result: LoopResult, timestamp: int) -> None:
        selected_id = result.selected.version_id
        selected_model = self._model_ids.get(selected_id)
        self._flush_calls("test", traces.PHASE_TEST, self._last_step, model_id=selected_model)
        tags = [
            RunTag(layout.TAG_SELECTED_VERSION, selected_id),
            RunTag(layout.TAG_STOP_REASON, layout.truncate(result.stop_reason)),
        ]
        self._client.log_batch(self._run_id, tags=tags)
        if selected_model is not None:
            self._client.set_logged_model_tags(selected_model, {layout.TAG_SELECTED: "true"})
        else:
            _logger.warning("MLflow tracking: selected version %s was never reported", selected_id)

        step = self._last_step
        if result.test_score is not None:
            self._add_metrics(
                {layout.METRIC_TEST_SCORE: result.test_score}, step, timestamp,
                model_id=selected_model,
            )
        final: dict[str, Any] = records.totals_metrics(result.totals)
        if self._last_best is None or self._last_best != result.best_val_score:
            final[layout.METRIC_BEST_VAL_SCORE] = result.best_val_score
        usage = result.phase_usage
        final.update(records.usage_metrics(usage.get("test", {}), layout.test_metric))
        if any(usage.get("failed", {}).values()):
            final.update(records.usage_metrics(usage["failed"], layout.failed_metric))
        self._add_metrics(final, step, timestamp)
        if not self._initial_logged:  # no step committed: the starting version's phase now
            self._add_metrics(records.usage_metrics(usage.get("initial", {})), 0, timestamp)
            self._initial_logged = True
        self._log_metrics()

        self._write_files(records.result_files(result, self._model_ids, selected_model), None)
        if result.export_dir is not None:
            store.log_export(self._client, self._run_id, Path(result.export_dir), selected_model)

    def _write_abort(self, error: str | None, totals: Mapping[str, float] | None = None,
                     failed: Mapping[str, float] | None = None) -> None:
        """The loop failed (``error``) or the process is exiting without a loop end. What is
        pending did not commit: its calls become a ``failed`` trace and ``failed`` says what
        that work cost (a resumed loop redoes it)."""
        reason = "error" if error is not None else "interrupted"
        self._flush_calls(f"step {self._phase} ({reason})", traces.PHASE_FAILED, self._phase,
                          error=error or reason)
        timestamp = records.now_ms()
        if totals:
            self._add_metrics(records.totals_metrics(totals), self._last_step, timestamp)
        if failed:
            self._add_metrics(records.usage_metrics(failed, layout.failed_metric),
                              self._last_step, timestamp)
        tags = [RunTag(layout.TAG_STOP_REASON, reason)]
        if error is not None:
            tags.append(RunTag(layout.TAG_ERROR, layout.truncate(error)))
        self._client.log_batch(self._run_id, tags=tags)

    def _flush_calls(
        self,
        name: str,
        phase: str,
        step: int,
        *,
        model_id: str | None = None,
        step_record: StepRecord | None = None,
        error: str | None = None,
    ) -> None:
        """The trace of the LLM calls reported since the last one, written now (see
        :mod:`.traces`). A store that refuses it costs the trace, not the step's metrics."""
        calls, self._pending_calls = self._pending_calls, []
        try:
            traces.write_trace(
                self._tracing, calls, name, run_id=self._run_id,
                experiment_id=self._experiment_id, phase=phase, step=step, model_id=model_id,
                step_record=step_record, error=error,
            )
        except Exception as exc:
            if not self.asynchronous:
                raise
            message = f"write_trace: {type(exc).__name__}: {exc}"
            self._writer.errors.append(message)
            _logger.warning("MLflow tracking write failed (%s)", message, exc_info=True)
