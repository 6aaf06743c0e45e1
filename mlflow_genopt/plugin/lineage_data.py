"""What the lineage pages show, read from MLflow through its client API (any tracking backend).

The data comes from what :class:`~mlflow_genopt.tracking.MlflowTracker` writes, read by the
names in :mod:`mlflow_genopt.tracking.layout`:

* loop runs: runs with the tag ``genopt.loop_run=true``, which only the tracker sets (runs that
  user code starts while a loop is active also get ``genopt.config_hash``, from the run context
  provider, but are not loop runs; runs logged before that marker existed are recognised by
  their ``genopt.objective`` tag when opened, but not listed); their params are the loop config;
* versions: the run's ``genopt-artifact`` LoggedModels, named by version id, with tags
  ``genopt.parent_id`` / ``genopt.step`` / ``genopt.status`` / ``genopt.selected`` and metrics
  ``val_score``, ``candidate_batch_score``, ``test_score`` (``versions.jsonl`` when a store has
  no LoggedModels);
* per version, the artifacts ``versions/<id>/version.json`` (values, reasoning) and
  ``diff.patch``; per step, ``steps/NNN/context.json`` (the learning context),
  ``response.txt``, ``proposal.json`` and ``candidate_trials.jsonl``;
* the step timeline: the run's metric histories (``batch_score``, ``valid``, ``accepted``, ...).

Artifacts are read with an ``ArtifactReader`` (``(run, path) -> bytes or None``): by default
``MlflowClient.download_artifacts``; inside ``mlflow server`` the lineage app passes one that
also reads proxied (``mlflow-artifacts:/``) run artifacts the way the server itself does.
Artifacts of finished runs never change and are cached (bounded).
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from mlflow import MlflowClient
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException

from ..artifact import diff
from ..tracking import layout

__all__ = ["ArtifactReader", "LineageReader", "LoopView", "VersionNode", "StepRow", "is_loop_run"]

ArtifactReader = Callable[[Run, str], "bytes | None"]

_TERMINAL = {"FINISHED", "FAILED", "KILLED"}
_STEP_METRICS = (layout.METRIC_BATCH_SCORE, layout.METRIC_CANDIDATE_BATCH_SCORE,
                 layout.METRIC_VAL_SCORE, layout.METRIC_BEST_VAL_SCORE, layout.METRIC_VALID,
                 layout.METRIC_ACCEPTED, layout.METRIC_TOTAL_TOKENS,
                 layout.METRIC_STEP_WALL_TIME_S)
# Loop-config params worth a glance in headers and the run list, in this order.
KEY_PARAMS = ("batch_size", "credit_horizon", "memory_size", "acceptance", "steps",
              "optimizer_model", "task_model", "seed")


@dataclass
class VersionNode:
    """One artifact version of a loop, as the tree shows it."""

    version_id: str
    parent_id: str | None
    step: int
    status: str  # initial, accepted, rejected
    selected: bool
    val_score: float | None
    batch_score: float | None  # the candidate's score on its step's batch
    test_score: float | None
    model_id: str | None
    children: list["VersionNode"] = field(default_factory=list)


@dataclass
class StepRow:
    """One optimization step on the timeline."""

    step: int
    batch_score: float | None
    candidate_batch_score: float | None
    val_score: float | None
    best_val_score: float | None
    valid: bool | None
    accepted: bool | None
    candidate_id: str | None
    tokens: float | None
    wall_time_s: float | None

    @property
    def decision(self) -> str:
        if self.valid is False:
            return "invalid"
        if self.accepted:
            return "accepted"
        if self.valid:
            return "rejected"
        return "?"


@dataclass
class LoopView:
    """A loop run with its versions (flat, by step, and as a tree) and its step timeline."""

    run: Run
    versions: list[VersionNode]
    roots: list[VersionNode]
    steps: list[StepRow]
    experiment_name: str

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def is_loop_run(self) -> bool:
        return is_loop_run(self.run)

    @property
    def name(self) -> str:
        return self.run.info.run_name or self.run_id

    @property
    def tags(self) -> dict[str, str]:
        return self.run.data.tags

    @property
    def params(self) -> dict[str, str]:
        return self.run.data.params

    @property
    def metrics(self) -> dict[str, float]:
        return self.run.data.metrics

    @property
    def selected(self) -> VersionNode | None:
        chosen = self.tags.get(layout.TAG_SELECTED_VERSION)
        for node in self.versions:
            if node.selected or node.version_id == chosen:
                return node
        return None

    def version(self, version_id: str) -> VersionNode | None:
        return next((v for v in self.versions if v.version_id == version_id), None)

    def step_row(self, step: int) -> StepRow | None:
        return next((s for s in self.steps if s.step == step), None)


def is_loop_run(run: Run) -> bool:
    """Whether ``run`` is a learning loop logged by the tracker (or by a tracker from before the
    ``genopt.loop_run`` marker, which set only ``genopt.objective``)."""
    tags = run.data.tags
    return layout.is_loop_run(tags) or (layout.TAG_OBJECTIVE in tags
                                        and layout.TAG_LOOP_RUN not in tags)


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class LineageReader:
    """Reads loop runs, their version trees and per-version evidence through ``client``."""

    def __init__(self, client: MlflowClient, read_artifact: ArtifactReader | None = None,
                 cache_size: int = 512) -> None:
        self.client = client
        self._read_artifact = read_artifact or self._download
        self._cache: OrderedDict[tuple[str, str], bytes | None] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    # --- runs -------------------------------------------------------------------------------
    def loop_runs(self, max_results: int = 300) -> list[Run]:
        """The most recent loop runs of every active experiment, newest first."""
        experiments = self.client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
        if not experiments:
            return []
        return list(self.client.search_runs(
            [e.experiment_id for e in experiments], filter_string=layout.LOOP_RUN_FILTER,
            run_view_type=ViewType.ACTIVE_ONLY, max_results=max_results,
            order_by=["attributes.start_time DESC"],
        ))

    def experiment_names(self) -> dict[str, str]:
        return {e.experiment_id: e.name
                for e in self.client.search_experiments(view_type=ViewType.ALL)}

    def run(self, run_id: str) -> Run:
        return self.client.get_run(run_id)

    def loop(self, run: str | Run) -> LoopView:
        """The loop run ``run`` (a run or its id) with its versions and steps."""
        run = self.client.get_run(run) if isinstance(run, str) else run
        versions = self._versions(run)
        by_id = {v.version_id: v for v in versions}
        roots: list[VersionNode] = []
        for node in versions:
            parent = by_id.get(node.parent_id or "")
            (parent.children if parent is not None else roots).append(node)
        try:
            experiment_name = self.client.get_experiment(run.info.experiment_id).name
        except MlflowException:
            experiment_name = run.info.experiment_id
        return LoopView(run, versions, roots, self._steps(run, versions), experiment_name)

    def _versions(self, run: Run) -> list[VersionNode]:
        nodes = [self._node(model) for model in self._logged_models(run)]
        if not nodes:  # a store without LoggedModels: the run's own summary, once it has ended
            nodes = self._versions_from_artifact(run)
        return sorted(nodes, key=lambda n: (n.step, n.version_id))

    def _logged_models(self, run: Run) -> list[Any]:
        models, token = [], None
        try:
            while True:
                page = self.client.search_logged_models(
                    experiment_ids=[run.info.experiment_id],
                    filter_string=f"source_run_id = '{run.info.run_id}'",
                    max_results=100, page_token=token,
                )
                models.extend(m for m in page if m.model_type in (None, layout.MODEL_TYPE))
                token = page.token
                if not token:
                    return models
        except MlflowException:
            return models

    @staticmethod
    def _node(model: Any) -> VersionNode:
        tags = model.tags or {}
        latest: dict[str, Any] = {}  # metric key -> its last value (by step, then time)
        for metric in sorted(model.metrics or [], key=lambda m: (m.step, m.timestamp)):
            latest[metric.key] = metric.value
        parent = tags.get(layout.TAG_PARENT_ID)
        return VersionNode(
            version_id=tags.get(layout.TAG_VERSION_ID, model.name),
            parent_id=None if parent in (None, "", layout.NO_PARENT) else parent,
            step=int(tags.get(layout.TAG_STEP, "0") or 0),
            status=tags.get(layout.TAG_STATUS, "?"),
            selected=tags.get(layout.TAG_SELECTED) == "true",
            val_score=_float(latest.get(layout.METRIC_VAL_SCORE)),
            batch_score=_float(latest.get(layout.METRIC_CANDIDATE_BATCH_SCORE)),
            test_score=_float(latest.get(layout.METRIC_TEST_SCORE)),
            model_id=model.model_id,
        )

    def _versions_from_artifact(self, run: Run) -> list[VersionNode]:
        nodes = []
        for row in self.jsonl(run, layout.VERSIONS_FILE):
            nodes.append(VersionNode(
                version_id=row["version_id"], parent_id=row.get("parent_id"),
                step=int(row.get("step", 0)), status=row.get("status", "?"),
                selected=bool(row.get("selected")), val_score=_float(row.get("val_score")),
                batch_score=_float(row.get("batch_score")), test_score=None,
                model_id=row.get("model_id"),
            ))
        return nodes

    def _steps(self, run: Run, versions: list[VersionNode]) -> list[StepRow]:
        histories: dict[str, dict[int, float]] = {}
        for key in _STEP_METRICS:
            if key not in run.data.metrics:
                continue
            points = sorted(self.client.get_metric_history(run.info.run_id, key),
                            key=lambda m: (m.step, m.timestamp))
            histories[key] = {m.step: m.value for m in points}
        candidates = {v.step: v.version_id for v in versions if v.step > 0}
        steps = sorted(histories.get(layout.METRIC_VALID, {})
                       or histories.get(layout.METRIC_BATCH_SCORE, {}))
        get = lambda key, step: _float(histories.get(key, {}).get(step))  # noqa: E731
        flag = lambda key, step: (None if get(key, step) is None  # noqa: E731
                                  else bool(get(key, step)))
        return [
            StepRow(step=step, batch_score=get(layout.METRIC_BATCH_SCORE, step),
                    candidate_batch_score=get(layout.METRIC_CANDIDATE_BATCH_SCORE, step),
                    val_score=get(layout.METRIC_VAL_SCORE, step),
                    best_val_score=get(layout.METRIC_BEST_VAL_SCORE, step),
                    valid=flag(layout.METRIC_VALID, step),
                    accepted=flag(layout.METRIC_ACCEPTED, step),
                    candidate_id=candidates.get(step),
                    tokens=get(layout.METRIC_TOTAL_TOKENS, step),
                    wall_time_s=get(layout.METRIC_STEP_WALL_TIME_S, step))
            for step in steps
        ]

    # --- evidence ---------------------------------------------------------------------------
    def version_record(self, run: Run, version_id: str) -> dict[str, Any] | None:
        """``versions/<id>/version.json``: values, lineage, scores and the optimizer's reasoning."""
        record = self.json(run, f"{layout.version_dir(version_id)}/{layout.VERSION_FILE}")
        return record if isinstance(record, dict) else None

    def version_values(self, run: Run, version_id: str) -> dict[str, str] | None:
        values = (self.version_record(run, version_id) or {}).get("values")
        return dict(values) if isinstance(values, dict) else None

    def step_evidence(self, run: Run, step: int) -> dict[str, Any]:
        """What the optimizer saw and said at ``step``: the learning context (a list of chat
        messages), its raw response, the parsed proposal (reasoning, invalid reason) and the
        trials of the current version (``trials``) and of the candidate (``candidate_trials``)."""
        folder = layout.step_dir(step)
        return {
            "context": self.json(run, f"{folder}/{layout.CONTEXT_FILE}"),
            "response": self.text(run, f"{folder}/{layout.RESPONSE_FILE}"),
            "proposal": self.json(run, f"{folder}/{layout.PROPOSAL_FILE}"),
            "trials": self.jsonl(run, f"{folder}/{layout.TRIALS_FILE}"),
            "candidate_trials": self.jsonl(run, f"{folder}/{layout.CANDIDATE_TRIALS_FILE}"),
        }

    def diff(self, old_run: Run, old_id: str, new_run: Run, new_id: str) -> str | None:
        """Unified diff between two versions (of one run or of two runs); ``None`` when either
        version's values cannot be read."""
        old = self.version_values(old_run, old_id)
        new = self.version_values(new_run, new_id)
        if old is None or new is None:
            return None
        # diff() reads only ``values`` and ``version_id``: label each side by its version id.
        # A final line without "\n" would run into the next diff line: end every value with one.
        old, new = ({k: v if v.endswith("\n") else v + "\n" for k, v in values.items()}
                    for values in (old, new))
        return diff(SimpleNamespace(values=old, version_id=old_id),  # type: ignore[arg-type]
                    SimpleNamespace(values=new, version_id=new_id))

    # --- artifacts --------------------------------------------------------------------------
    def raw(self, run: Run, path: str) -> bytes | None:
        key = (run.info.run_id, path)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = self._read_artifact(run, path)
        if run.info.status in _TERMINAL:
            with self._lock:
                self._cache[key] = data
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return data

    def text(self, run: Run, path: str) -> str | None:
        data = self.raw(run, path)
        return None if data is None else data.decode("utf-8", errors="replace")

    def json(self, run: Run, path: str) -> Any:
        text = self.text(run, path)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return None

    def jsonl(self, run: Run, path: str) -> list[dict[str, Any]]:
        text = self.text(run, path)
        rows = []
        for line in (text or "").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def _download(self, run: Run, path: str) -> bytes | None:
        with tempfile.TemporaryDirectory(prefix="genopt-lineage-") as tmp:
            try:
                local = self.client.download_artifacts(run.info.run_id, path, tmp)
            except (MlflowException, OSError):
                return None
            target = Path(local)
            return target.read_bytes() if target.is_file() else None
