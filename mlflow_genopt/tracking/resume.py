"""Reading an interrupted loop run back: which step it reached and the loop state after it.

What makes this safe is the write order of :class:`~.tracker.MlflowTracker` (see the resume
guarantee in :mod:`mlflow_genopt.tracking`): a step's ``checkpoint.json`` is uploaded before the
batch with the step's metrics, so a step whose metrics landed always has its checkpoint.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from . import layout
from .store import require_existing_sqlite


def last_logged_step(client: MlflowClient, run_id: str) -> int:
    """The last step whose metrics landed (0: none). MLflow's SQL store commits a batch's
    metrics in one transaction but its tags in another, so the step's own metrics, not the
    ``genopt.checkpoint_step`` tag, say what was logged; its checkpoint file precedes them."""
    history = client.get_metric_history(run_id, layout.STEP_SENTINEL_METRIC)
    return max((m.step for m in history), default=0)


def load_run_checkpoint(tracking_uri: str, run_id: str) -> tuple[dict[str, str], dict | None, str]:
    """``(params, checkpoint or None, status)`` of a loop run.

    The checkpoint is the loop state after the last step whose metrics landed (see
    :func:`last_logged_step`); ``None`` when no step completed. Raises ``ValueError`` with one
    line when the run does not exist or is not a genopt loop.
    """
    require_existing_sqlite(tracking_uri)
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"run {run_id}: not found in {tracking_uri}") from None
    if not layout.is_loop_run(run.data.tags):
        raise ValueError(
            f"run {run_id}: not a genopt learning loop (no {layout.TAG_LOOP_RUN} tag)"
        )
    step = last_logged_step(client, run_id)
    checkpoint = None
    if step:
        path = f"{layout.step_dir(step)}/{layout.CHECKPOINT_FILE}"
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())
    return dict(run.data.params), checkpoint, run.info.status


def failed_usage(tracking_uri: str, run_id: str) -> dict[str, float]:
    """What the failed attempts of a loop run spent (its latest ``failed_<key>`` metrics,
    cumulative), for the resumed loop to carry into its totals."""
    metrics = MlflowClient(tracking_uri).get_run(run_id).data.metrics
    return {key: metrics[layout.failed_metric(key)] for key in layout.PHASE_USAGE_KEYS
            if layout.failed_metric(key) in metrics}


def find_resumable_run(tracking_uri: str, experiment: str, config_hash: str) -> str | None:
    """The newest unfinished (RUNNING, KILLED or FAILED) loop run with this config hash."""
    try:
        require_existing_sqlite(tracking_uri)
    except ValueError:
        return None  # a new store has nothing to resume
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{layout.TAG_CONFIG_HASH}` = '{config_hash}' "
        "and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    # a study's trials belong to the study (Optuna retries them), never to `genopt run`
    standalone = [r for r in runs
                  if layout.is_loop_run(r.data.tags) and layout.TAG_STUDY not in r.data.tags]
    return standalone[0].info.run_id if standalone else None
