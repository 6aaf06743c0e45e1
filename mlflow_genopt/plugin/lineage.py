"""``mlflow.app`` entry point ``genopt``: the MLflow server plus learning-loop lineage pages.

``mlflow server --app-name genopt --backend-store-uri sqlite:///mlflow.db`` serves the normal
MLflow UI and API, and under ``/genopt/`` (after ``--static-prefix``, if one is set):

``/genopt/``                     every loop run in the store, newest first, with a form to
                                 compare two of them;
``/genopt/runs/<run_id>``        one loop: the tree of artifact versions (initial, accepted,
                                 rejected; the selected one starred) with scores, and the step
                                 timeline. ``?version=<id>`` opens a version: its diff against its
                                 parent (``&against=<id>``: any other version), the optimizer's
                                 reasoning, the learning context that produced it, its values.
                                 ``?step=<n>`` opens a step, invalid proposals included;
``/genopt/compare?a=<run>&b=<run>`` two loops' best versions: scores, config differences and
                                 the diff between their selected versions.

Pages are rendered on the server (no build step, no script bundle) and link to the MLflow UI's
run and LoggedModel pages. They read through :class:`~mlflow_genopt.plugin.lineage_data.
LineageReader` with an ``MlflowClient`` on the server's backend store, so they work with any
tracking backend; run artifacts are read the way the server serves them, including proxied
(``mlflow-artifacts:/``) artifact roots.

How MLflow loads it: ``mlflow server --app-name genopt`` looks the name up in the ``mlflow.app``
entry-point group and, as for MLflow's own ``basic-auth`` app, calls the factory
:func:`create_app` in each server worker. The factory adds the pages to MLflow's Flask app
(``mlflow.server.app``) and returns it, wrapped in MLflow's FastAPI app when the server runs
under uvicorn (the default), as ``mlflow.server.auth.create_app`` does.
"""

from __future__ import annotations

import os
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from flask import Blueprint, Flask, Response, request, url_for
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from ..tracking import layout
from . import lineage_templates
from .lineage_data import KEY_PARAMS, LineageReader, is_loop_run
from .prompts import registered_prompts

__all__ = ["create_app", "register", "blueprint"]

URL_PREFIX = "/genopt"

blueprint = Blueprint("genopt", __name__)
_env = lineage_templates.environment()
_reader: LineageReader | None = None
_reader_lock = threading.Lock()
_reader_factory: Callable[[], LineageReader] | None = None


# --- formatting ---------------------------------------------------------------------------------
def _score(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return "–"
    try:
        return f"{float(value):.3g}"
    except (TypeError, ValueError):
        return str(value)


def _when(ms: Any) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _diff_lines(text: str) -> list[tuple[str, str]]:
    lines = []
    for line in text.splitlines():
        if line.startswith(("+++", "---")):
            cls = "file"
        elif line.startswith("@@"):
            cls = "hunk"
        elif line.startswith("+"):
            cls = "add"
        elif line.startswith("-"):
            cls = "del"
        else:
            cls = "ctx"
        lines.append((cls, line or " "))
    return lines


def _ui_root() -> str:
    from mlflow.server.handlers import _add_static_prefix

    return _add_static_prefix("/")


def _mlflow_run_url(run: Run) -> str:
    return f"{_ui_root()}#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def _mlflow_model_url(run: Run, model_id: str) -> str:
    return f"{_ui_root()}#/experiments/{run.info.experiment_id}/models/{model_id}"


_env.filters.update(score=_score, when=_when, diff_lines=_diff_lines)
_env.globals.update(url_for=url_for, mlflow_run_url=_mlflow_run_url,
                    mlflow_model_url=_mlflow_model_url, library_version=layout.library_version(),
                    key_params=KEY_PARAMS)


def _render(template: str, status: int = 200, **context: Any) -> Response:
    html = _env.get_template(template).render(mlflow_ui=_ui_root(), **context)
    return Response(html, status=status, mimetype="text/html")


def _error(title: str, message: str, status: int) -> Response:
    return _render("error.html", status=status, title=title, message=message)


# --- data access --------------------------------------------------------------------------------
def _server_artifact_reader(client: MlflowClient) -> Callable[[Run, str], bytes | None]:
    """Reads a run artifact as ``mlflow server`` serves it (``handlers.get_artifact_handler``):
    proxied artifact roots (``mlflow-artifacts:/``) from the server's artifact destination,
    others from the run's own artifact repository."""

    def read(run: Run, path: str) -> bytes | None:
        try:
            from mlflow.server import handlers
            from mlflow.store.artifact.artifact_repository_registry import (
                get_artifact_repository,
            )

            root = run.info.artifact_uri
            if handlers._is_servable_proxied_run_artifact_root(root):
                repo = handlers._get_artifact_repo_mlflow_artifacts()
                target = handlers._get_proxied_run_artifact_destination_path(
                    proxied_artifact_root=root, relative_path=path)
                scope = getattr(handlers, "_get_workspace_scoped_repo_path_if_enabled", None)
                target = scope(target) if scope is not None else target
            else:
                repo, target = get_artifact_repository(root), path
        except (ImportError, AttributeError, KeyError):  # another MLflow layout: the client API
            return _client_download(client, run, path)
        with tempfile.TemporaryDirectory(prefix="genopt-lineage-") as tmp:
            try:
                local = Path(repo.download_artifacts(target, dst_path=tmp))
            except (MlflowException, OSError):
                return None
            return local.read_bytes() if local.is_file() else None

    return read


def _client_download(client: MlflowClient, run: Run, path: str) -> bytes | None:
    with tempfile.TemporaryDirectory(prefix="genopt-lineage-") as tmp:
        try:
            local = Path(client.download_artifacts(run.info.run_id, path, tmp))
        except (MlflowException, OSError):
            return None
        return local.read_bytes() if local.is_file() else None


def _default_reader() -> LineageReader:
    from mlflow.server import BACKEND_STORE_URI_ENV_VAR

    import mlflow

    uri = os.environ.get(BACKEND_STORE_URI_ENV_VAR) or mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    return LineageReader(client, _server_artifact_reader(client))


def reader() -> LineageReader:
    global _reader
    with _reader_lock:
        if _reader is None:
            _reader = (_reader_factory or _default_reader)()
        return _reader


# --- pages --------------------------------------------------------------------------------------
@blueprint.route("/")
def index() -> Response:
    data = reader()
    return _render("index.html", runs=data.loop_runs(), experiments=data.experiment_names())


def _load_loop(run_id: str):
    data = reader()
    try:
        run = data.run(run_id)
    except MlflowException:
        return None, _error("Run not found", f"No run {run_id!r} in this tracking server.", 404)
    if not is_loop_run(run):
        return None, _error(
            "Not a learning loop",
            f"Run {run_id} was not logged by an mlflow-genopt learning loop "
            f"(it has no {layout.TAG_LOOP_RUN} tag).", 404)
    return data.loop(run), None


@blueprint.route("/runs/<run_id>")
def loop_page(run_id: str) -> Response:
    view, error = _load_loop(run_id)
    if error is not None:
        return error
    data = reader()
    version = step_row = None
    evidence: dict[str, Any] = {}
    values = diff_text = reasoning = against = None
    step_arg = request.args.get("step", type=int)
    version_arg = request.args.get("version")
    if step_arg is not None and version_arg is None:
        step_row = view.step_row(step_arg)
        if step_row is None:
            return _error("No such step", f"Run {run_id} has no step {step_arg}.", 404)
        evidence = data.step_evidence(view.run, step_arg)
    else:
        version = view.version(version_arg) if version_arg else view.selected
        if version_arg and version is None:
            return _error("No such version", f"Run {run_id} has no version {version_arg!r}.", 404)
        if version is None and view.versions:
            version = view.versions[-1]
    if version is not None:
        record = data.version_record(view.run, version.version_id) or {}
        values = record.get("values")
        against = request.args.get("against") or version.parent_id
        if against is not None and view.version(against) is None:
            return _error("No such version", f"Run {run_id} has no version {against!r}.", 404)
        if against is not None:
            diff_text = data.diff(view.run, against, view.run, version.version_id)
        if version.step > 0:
            evidence = data.step_evidence(view.run, version.step)
            proposal = evidence.get("proposal") or {}
            reasoning = record.get("reasoning") or proposal.get("reasoning")
    others = [r for r in data.loop_runs(max_results=100) if r.info.run_id != view.run_id]
    return _render(
        "loop.html", view=view, version=version, step_row=step_row, evidence=evidence,
        values=values, diff_text=diff_text, reasoning=reasoning, against=against,
        focus_id=version.version_id if version else None,
        focus_step=step_row.step if step_row else (version.step if version else None),
        other_runs=others, prompts=registered_prompts(view.tags),
    )


@blueprint.route("/compare")
def compare() -> Response:
    ids = [request.args.get("a", ""), request.args.get("b", "")]
    if not all(ids):
        return _error("Two runs needed", "Pass two loop runs: /genopt/compare?a=<run_id>&b=<run_id>.",
                      400)
    views = []
    for run_id in ids:
        view, error = _load_loop(run_id)
        if error is not None:
            return error
        views.append(view)
    left, right = views
    keys = sorted(set(left.params) | set(right.params))
    param_diff = [(k, left.params.get(k, "–"), right.params.get(k, "–")) for k in keys
                  if left.params.get(k) != right.params.get(k)]
    diff_text = None
    if left.selected and right.selected:
        diff_text = reader().diff(left.run, left.selected.version_id,
                                  right.run, right.selected.version_id)
    return _render("compare.html", views=views, param_diff=param_diff, diff_text=diff_text)


# --- the app ------------------------------------------------------------------------------------
def register(app: Flask, reader_factory: Callable[[], LineageReader] | None = None) -> Flask:
    """Add the lineage pages to ``app`` (MLflow's Flask app) under ``/genopt`` (after the
    server's static prefix). Idempotent. ``reader_factory`` replaces how the pages read the store
    (tests; default: the server's backend store)."""
    global _reader_factory, _reader
    if reader_factory is not None:
        with _reader_lock:
            _reader_factory, _reader = reader_factory, None
    if blueprint.name not in app.blueprints:
        from mlflow.server.handlers import _add_static_prefix

        app.register_blueprint(blueprint, url_prefix=_add_static_prefix(URL_PREFIX))
    return app


def create_app():
    """The ``mlflow.app`` factory: MLflow's server app with the lineage pages added."""
    from mlflow.server import app as flask_app

    register(flask_app)
    try:
        from mlflow.environment_variables import _MLFLOW_SGI_NAME

        server = _MLFLOW_SGI_NAME.get()
    except ImportError:
        server = os.environ.get("_MLFLOW_SGI_NAME")
    if server == "uvicorn":
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(flask_app)
    return flask_app
