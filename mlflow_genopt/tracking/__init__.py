"""MLflow tracking for learning loops: the only part of the library that writes loop runs.

This docstring is the one place where the run layout and the tracking and resume guarantees are
stated; the names themselves live in :mod:`.layout`.

:class:`MlflowTracker` is a :class:`~mlflow_genopt.events.LoopCallback`. One learning loop
becomes one MLflow run; what a user then finds in the MLflow UI:

Run (``<task>-<init>-b<batch>-s<seed>``)
    params: the loop config (``LoopConfig.to_params``); tags ``genopt.*`` (the loop-run marker
    ``genopt.loop_run``, project, task, init, config hash, library version, objective, selected
    version, stop reason); metrics per step
    (``batch_score``, ``val_score``, ``best_val_score``, ``accepted``, ``valid``, tokens, cost,
    latency, ``llm_retries``, timings) and at the end ``test_score`` and ``totals/<key>`` (also
    when the loop fails: then with tag ``genopt.error``; a resumed run moves it to
    ``genopt.previous_error``), LLM usage by phase (step 0: the starting version; ``test_*``;
    ``failed_*``: phases that failed before they committed), adding up to ``totals/*``; artifacts
    ``config.yaml``, ``artifact_spec.json``, ``versions/<version_id>/`` (parameter files,
    ``version.json``, ``diff.patch``), ``steps/<step>/`` (learning context, raw response,
    proposal, trials, checkpoint), ``result.json``, ``steps.jsonl``, ``versions.jsonl``,
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
    one trace per phase (evaluating the starting version, each step, the final test, a phase a
    failure cut short), tagged ``genopt.phase`` and ``genopt.step``, linked to the run and to the
    LoggedModel of the version that phase produced, with one ``CHAT_MODEL`` span per LLM call at
    its real start and end time (token usage, cost, cache hit, errors).

Guarantees. Writes happen in the order the loop reports events, on one background thread (or
inline with ``asynchronous=False``), so the loop only pays for handing a record over; LLM calls
may be reported from any thread. ``on_loop_end`` and :meth:`MlflowTracker.fail` return only once
every run, model, metric and artifact write has been attempted and the run is terminated; a
write that fails is logged as a warning, counted in :attr:`MlflowTracker.errors` and the run tag
``genopt.tracking_errors``, and does not stop the loop (with ``asynchronous=False`` it raises
instead). If the process exits before either is called, pending writes are flushed and the run
ends ``KILLED``. A phase's trace is written by the same writer, straight to the store, before
the batch that commits the phase (see :mod:`.traces`), never by MLflow's background exporter.

Resume. A step counts as logged once its metrics land: they are written in one ``log_batch``
(one transaction on SQL stores) after the step's files, ``checkpoint.json`` included, have
been uploaded. :func:`last_logged_step` is the last step with a ``step_wall_time_s`` value,
:func:`load_run_checkpoint` reads that step's checkpoint, and a resumed tracker
(``run_id=``, ``resume_versions=``) continues the run after it, reusing the LoggedModels and
cumulative metrics already written, after deleting the traces of phases that never committed
(so each committed phase has exactly one). :func:`find_resumable_run` offers only unfinished loop runs
that are not a study's trials.

Imports. The names below are loaded on first use (PEP 562), so that ``import
mlflow_genopt.tracking.layout``, which the MLflow plugin does whenever MLflow loads it, costs no
MLflow import; they are the modules' own objects, not wrappers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .layout import MODEL_TYPE, library_version

if TYPE_CHECKING:
    from .resume import find_resumable_run, last_logged_step, load_run_checkpoint
    from .store import DEFAULT_TRACKING_URI, check_tracking_uri
    from .study_runs import log_study_summary, start_study_run, update_run
    from .tracker import MlflowTracker

__all__ = [
    "DEFAULT_TRACKING_URI", "MODEL_TYPE", "MlflowTracker", "check_tracking_uri",
    "find_resumable_run", "last_logged_step", "library_version", "load_run_checkpoint",
    "log_study_summary", "start_study_run", "update_run",
]

_LAZY = {
    "MlflowTracker": "tracker",
    "DEFAULT_TRACKING_URI": "store",
    "check_tracking_uri": "store",
    "find_resumable_run": "resume",
    "last_logged_step": "resume",
    "load_run_checkpoint": "resume",
    "log_study_summary": "study_runs",
    "start_study_run": "study_runs",
    "update_run": "study_runs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
