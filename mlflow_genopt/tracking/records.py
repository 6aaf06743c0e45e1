"""What each loop event becomes in a run: its tags, metrics and files (pure, no MLflow calls).

:class:`~.tracker.MlflowTracker` turns every event into the values built here and writes them;
the names come from :mod:`.layout`. Files are ``{relative path: text}``; metrics are
``{key: value}`` (the tracker drops values that are not finite numbers).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from ..artifact import ArtifactVersion, diff
from ..events import LoopResult, LoopStart, StepRecord, VersionRecord
from . import layout

# StepRecord fields that have their own files under steps/ and stay out of steps.jsonl.
_BULKY_STEP_FIELDS = ("trials", "candidate_trials", "context", "raw_response", "candidates",
                      "checkpoint")


# --- encoding -------------------------------------------------------------------------------
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


def dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(value, default=_jsonable, ensure_ascii=False, **kwargs)


def jsonl(rows: Iterable[Any]) -> str:
    return "".join(dumps(row) + "\n" for row in rows)


def now_ms() -> int:
    return int(time.time() * 1000)


def finite(value: Any) -> bool:
    """Whether ``value`` can be an MLflow metric value (a finite int or float, not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- loop start -----------------------------------------------------------------------------
def run_tags(start: LoopStart) -> dict[str, str]:
    """The tags of a loop run (the marker, the context tags, the objective)."""
    config = start.config
    return {
        layout.TAG_LOOP_RUN: layout.LOOP_RUN_VALUE,
        layout.TAG_PROJECT: config.project,
        layout.TAG_TASK: start.task_name,
        layout.TAG_INIT: config.init,
        layout.TAG_CONFIG_HASH: config.config_hash(),
        layout.TAG_LIBRARY_VERSION: layout.library_version(),
        layout.TAG_OBJECTIVE: layout.truncate(start.objective, layout.MAX_OBJECTIVE_CHARS),
    }


def start_files(start: LoopStart) -> dict[str, str]:
    """The loop config and the artifact spec, at the run's root."""
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
    return {layout.CONFIG_FILE: start.config.to_yaml(), layout.SPEC_FILE: dumps(spec, indent=2)}


# --- versions -------------------------------------------------------------------------------
def version_files(
    record: VersionRecord, kinds: Mapping[str, str], parent: ArtifactVersion | None
) -> dict[str, str]:
    """A version's folder: ``version.json``, one file per parameter, the diff to ``parent``."""
    version = record.version
    files = {layout.VERSION_FILE: dumps(record.to_dict(), indent=2)}
    for name, text in version.values.items():
        files[layout.parameter_file(name, kinds.get(name, ""))] = text
    if parent is not None:
        files[layout.DIFF_FILE] = diff(parent, version)
    return files


def version_metrics(record: VersionRecord) -> dict[str, Any]:
    """A version's scores: the run's and its LoggedModel's metrics at the version's step."""
    metrics = {layout.METRIC_VAL_SCORE: record.val_score}
    metrics.update({layout.val_metric(k): v for k, v in record.val_metrics.items()})
    if record.batch_score is not None:
        metrics[layout.METRIC_CANDIDATE_BATCH_SCORE] = record.batch_score
    return metrics


def model_tags(record: VersionRecord, config_hash: str, task_name: str) -> dict[str, str]:
    """The lineage tags of a version's LoggedModel."""
    version = record.version
    return {
        layout.TAG_VERSION_ID: version.version_id,
        layout.TAG_PARENT_ID: version.parent_id or layout.NO_PARENT,
        layout.TAG_STEP: str(version.step),
        layout.TAG_STATUS: record.status,
        layout.TAG_CONTENT_HASH: version.content_hash,
        layout.TAG_SELECTED: "false",
        layout.TAG_CONFIG_HASH: config_hash,
        layout.TAG_TASK: task_name,
        **({layout.TAG_CANDIDATE: str(record.candidate)} if record.candidate is not None else {}),
    }


# --- steps ----------------------------------------------------------------------------------
def step_metrics(
    record: StepRecord, tokens_cum: int, cost_cum: float, logged: Mapping[str, Any]
) -> dict[str, Any]:
    """A step's metrics; ``tokens_cum`` / ``cost_cum`` include this step. ``logged``: the
    metrics of the step's candidate version already written with it (not written twice)."""
    metrics: dict[str, Any] = {
        layout.METRIC_BATCH_SCORE: record.batch_score,
        layout.METRIC_BEST_VAL_SCORE: record.best_val_score,
        layout.METRIC_ACCEPTED: int(record.accepted),
        layout.METRIC_VALID: int(record.valid),
        layout.METRIC_REJECTED_PROPOSALS: record.invalid_total,
        layout.METRIC_PROMPT_TOKENS: record.prompt_tokens,
        layout.METRIC_COMPLETION_TOKENS: record.completion_tokens,
        layout.METRIC_TOTAL_TOKENS: record.prompt_tokens + record.completion_tokens,
        layout.METRIC_TOTAL_TOKENS_CUM: tokens_cum,
        layout.METRIC_COST_USD: record.cost_usd,
        layout.METRIC_COST_USD_CUM: cost_cum,
        layout.METRIC_LLM_LATENCY_S: record.llm_latency_s,
        layout.METRIC_LLM_CALLS: record.llm_calls,
        layout.METRIC_CACHED_CALLS: record.cached_calls,
        layout.METRIC_LLM_RETRIES: record.llm_retries,
        layout.METRIC_EVAL_TIME_S: record.eval_time_s,
        layout.METRIC_STEP_WALL_TIME_S: record.wall_time_s,
        layout.METRIC_CANDIDATES: len(record.candidates),
        layout.METRIC_VALID_CANDIDATES: sum(c.valid for c in record.candidates),
        layout.METRIC_FIRST_TRY_VALID: sum(c.first_try_valid for c in record.candidates),
        layout.METRIC_REPAIR_ATTEMPTS: sum(max(len(c.attempts) - 1, 0) for c in record.candidates),
        layout.METRIC_CACHE_HITS: record.cache_hits,
        layout.METRIC_SHRINK_LEVEL: record.shrink_level,
        layout.METRIC_LLM_ERRORS: record.llm_errors,
        layout.METRIC_CACHED_TOKENS: record.cached_tokens,
    }
    # The candidate's scores are already in the history when its version was logged at this
    # step; log them here only if they were not (or differ), never twice.
    if record.val_score is not None and logged.get(layout.METRIC_VAL_SCORE) != record.val_score:
        metrics[layout.METRIC_VAL_SCORE] = record.val_score
        metrics.update({layout.val_metric(k): v for k, v in record.val_metrics.items()})
    if record.note:
        metrics[layout.METRIC_REVERTED] = 1
    if (
        record.candidate_batch_score is not None
        and logged.get(layout.METRIC_CANDIDATE_BATCH_SCORE) != record.candidate_batch_score
    ):
        metrics[layout.METRIC_CANDIDATE_BATCH_SCORE] = record.candidate_batch_score
    return metrics


def step_files(record: StepRecord) -> dict[str, str]:
    """A step's folder: learning context, raw response, proposal, trials, checkpoint."""
    proposal = {
        "candidate_id": record.candidate_id,
        "proposal": dict(record.proposal) if record.proposal is not None else None,
        "reasoning": record.reasoning,
        "invalid_reason": record.invalid_reason,
        "accepted": record.accepted,
        "note": record.note,
    }
    files = {
        layout.CONTEXT_FILE: dumps([dict(m) for m in record.context], indent=2),
        layout.RESPONSE_FILE: record.raw_response,
        layout.PROPOSAL_FILE: dumps(proposal, indent=2),
        layout.TRIALS_FILE: jsonl(t.to_dict() for t in record.trials),
    }
    if record.candidate_trials:
        files[layout.CANDIDATE_TRIALS_FILE] = jsonl(t.to_dict() for t in record.candidate_trials)
    if record.candidates:
        files[layout.CANDIDATES_FILE] = dumps([{
            "index": c.index, "version_id": c.version_id, "batch_score": c.batch_score,
            "proposal": dict(c.proposal) if c.proposal is not None else None,
            "reasoning": c.reasoning, "invalid_reason": c.invalid_reason,
            "first_try_valid": c.first_try_valid, "repairs": list(c.repairs),
            "attempts": [dataclasses.asdict(a) for a in c.attempts],
        } for c in record.candidates], indent=2)
        for c in record.candidates:
            if c.trials and c.version_id != record.candidate_id:
                files[layout.sibling_trials_file(c.index)] = jsonl(t.to_dict() for t in c.trials)
    if record.checkpoint:
        files[layout.CHECKPOINT_FILE] = dumps(record.checkpoint)
    return files


# --- loop end -------------------------------------------------------------------------------
def result_files(
    result: LoopResult, model_ids: Mapping[str, str], selected_model: str | None
) -> dict[str, str]:
    """The run's summary files: ``result.json``, ``steps.jsonl``, ``versions.jsonl`` and the
    selected version's ``test_trials.jsonl``."""
    selected_id = result.selected.version_id
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
            "model_id": model_ids.get(v.version.version_id),
            "selected": v.version.version_id == selected_id,
        }
        for v in result.versions
    ]
    files = {
        layout.RESULT_FILE: dumps(summary, indent=2),
        layout.STEPS_FILE: jsonl(history),
        layout.VERSIONS_FILE: jsonl(versions),
    }
    if result.test_trials:
        files[layout.TEST_TRIALS_FILE] = jsonl(t.to_dict() for t in result.test_trials)
    return files


def totals_metrics(totals: Mapping[str, float]) -> dict[str, float]:
    return {layout.totals_metric(k): v for k, v in totals.items()}


def usage_metrics(usage: Mapping[str, float], name=lambda key: key) -> dict[str, float]:
    """The usage keys of one phase (:data:`layout.PHASE_USAGE_KEYS`) as metrics, named by
    ``name`` (the step metrics' own names for step 0, ``layout.test_metric``, ...)."""
    return {name(k): float(usage.get(k, 0.0)) for k in layout.PHASE_USAGE_KEYS}
