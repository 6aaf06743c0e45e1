"""A study's parent run: the few writes :mod:`mlflow_genopt.study` needs besides its loops.

The study module (the only one that talks to Optuna) records a study as one parent run with
one nested :class:`~.tracker.MlflowTracker` run per trial; these helpers write the parent run,
so that it never imports MLflow itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from .layout import truncate
from .records import finite, now_ms
from .store import get_or_create_experiment, refuse_file_store, with_context_tags


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
    refuse_file_store(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    run_tags = [RunTag(k, truncate(str(v))) for k, v in tags.items()]
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
    experiment_id = get_or_create_experiment(client, tracking_uri, experiment)
    all_tags = with_context_tags({k: truncate(str(v)) for k, v in tags.items()})
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
    now = now_ms()
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if finite(v)],
        tags=[RunTag(k, truncate(str(v))) for k, v in (tags or {}).items()],
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
