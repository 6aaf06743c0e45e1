"""Tracking URIs and stores: which URIs work, creating SQLite stores, experiments and runs.

Stores are chosen by URI, like Optuna storages: ``sqlite:///path/mlflow.db`` (the default,
:data:`DEFAULT_TRACKING_URI`) or an ``http(s)://`` MLflow tracking server. MLflow's file store
(a bare path or ``file:``) is refused everywhere with the same one-line message.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Mapping
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ..config import ConfigError
from . import layout

_logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_SQLITE = "sqlite:///"


def refuse_file_store(tracking_uri: str, error: type[ValueError] = ValueError) -> None:
    """Raise ``error`` for a file-store URI (a bare path or ``file:``)."""
    if urlparse(tracking_uri).scheme in ("", "file"):
        raise error(
            f"tracking_uri: {tracking_uri!r} is a file store, which is not supported; "
            "use sqlite:///path/mlflow.db or an http(s):// tracking server"
        )


def check_tracking_uri(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Raise :class:`ConfigError` (one line: the problem and the fix) for a tracking URI that
    cannot work: a file store, or an http(s) server that does not answer within ``timeout_s``.
    Checked before anything is created, because MLflow's own client retries an unreachable
    server with exponential backoff for minutes before it fails."""
    import urllib.error
    import urllib.request

    refuse_file_store(tracking_uri, ConfigError)
    if tracking_uri.startswith(_SQLITE):
        _check_sqlite_writable(tracking_uri)
    if urlparse(tracking_uri).scheme not in ("http", "https"):
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


def _check_sqlite_writable(tracking_uri: str) -> None:
    """A SQLite store must be a writable file in a writable directory (SQLite writes its journal
    next to it; the artifacts go to ``mlruns/`` beside it), or be creatable: otherwise MLflow
    fails on its first write with a long traceback, after part of the run was set up."""
    path = Path(tracking_uri[len(_SQLITE):].split("?", 1)[0])
    if not str(path) or str(path) == ":memory:":
        return
    if path.exists():
        if not path.is_file():
            raise ConfigError(f"tracking_uri: {path} is not a file; pass sqlite:///path/to/mlflow.db")
        if not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(f"tracking_uri: {path} is read-only (no write permission); make it "
                              "writable or pass another --tracking-uri sqlite:///path/mlflow.db")
        directory = path.parent
    else:
        directory = path.parent
        while not directory.exists() and directory != directory.parent:
            directory = directory.parent
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"tracking_uri: the directory {directory} of {path.name} is not writable "
                          "(SQLite writes its journal and the run artifacts there); pass another "
                          "--tracking-uri sqlite:///path/mlflow.db")


def create_sqlite_store_atomically(tracking_uri: str) -> None:
    """Create a missing SQLite store under a temporary name, then rename it into place.

    MLflow migrates a new database in many statements; a process killed meanwhile would leave a
    half-migrated file that every later run fails on ("duplicate column name").
    """
    if not tracking_uri.startswith(_SQLITE):
        return
    path = Path(tracking_uri[len(_SQLITE):])
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


def require_existing_sqlite(tracking_uri: str) -> None:
    """Raise ``ValueError`` when a SQLite URI names no database file (reading must not create
    an empty store)."""
    if tracking_uri.startswith(_SQLITE):
        path = Path(tracking_uri[len(_SQLITE):])
        if not path.is_file():
            raise ValueError(f"tracking_uri: no MLflow database at {path}; pass the --tracking-uri "
                             "the run was logged to")


def require_experiment_name(experiment: object) -> None:
    if not isinstance(experiment, str) or not experiment.strip():
        raise ValueError(f"experiment: must be a non-empty name, got {experiment!r}")


def _default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of a new experiment live next to its SQLite database, not in the caller's
    working directory (MLflow's default), so that the store stays one movable folder."""
    if not tracking_uri.startswith(_SQLITE):
        return None
    db_path = tracking_uri[len(_SQLITE) :].split("?", 1)[0]
    if not db_path or db_path == ":memory:":
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (Path(db_path).resolve().parent / "mlruns" / slug).as_uri()


def get_or_create_experiment(client: MlflowClient, tracking_uri: str, experiment: str) -> str:
    """The id of ``experiment``, created if missing (for SQLite stores with its artifacts in
    ``mlruns/<experiment>`` next to the database file). Loop and study runs share it."""
    require_experiment_name(experiment)
    existing = client.get_experiment_by_name(experiment)
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            raise ValueError(
                f"experiment: {experiment!r} is deleted in {tracking_uri}; restore it or "
                "choose another name"
            )
        return existing.experiment_id
    try:
        return client.create_experiment(
            experiment,
            artifact_location=_default_artifact_location(tracking_uri, experiment),
        )
    except MlflowException:
        existing = client.get_experiment_by_name(experiment)  # created concurrently
        if existing is None:
            raise
        return existing.experiment_id


def with_context_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """``tags`` plus the user, source, git and run-context-provider tags that
    ``mlflow.start_run`` would add (``tags`` win); ``tags`` alone if MLflow cannot tell."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return resolve_tags(dict(tags))
    except Exception:
        _logger.debug("could not resolve MLflow context tags", exc_info=True)
        return dict(tags)


def log_export(client: MlflowClient, run_id: str, directory: Path, model_id: str | None) -> None:
    """The task's deliverables for the selected version go under ``export/``; an MLflow model
    among them (``model/MLmodel``) becomes the selected LoggedModel's own artifacts, so that
    ``mlflow.pyfunc.load_model("models:/<model_id>")`` loads it."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

    if not directory.is_dir():
        raise FileNotFoundError(f"export_dir {directory} does not exist")
    client.log_artifacts(run_id, str(directory), layout.EXPORT_DIR)
    model_dir = directory / layout.EXPORTED_MODEL_DIR
    if model_id is not None and (model_dir / layout.MLMODEL_FILE).is_file():
        client.log_model_artifacts(model_id, str(model_dir))  # replaces the stub MLmodel
        client.delete_logged_model_tag(model_id, MLFLOW_MODEL_IS_EXTERNAL)
        client.set_logged_model_tags(model_id, {layout.TAG_EXPORTED_MODEL: "true"})
