"""The run layout: every name genopt writes to MLflow, in one place.

The tracker (:mod:`.tracker`, :mod:`.records`, :mod:`.traces`) writes these names; the resume
readers (:mod:`.resume`) and the plugin's readers (lineage pages, run context provider, prompt
registry) read them. What each one means for a user is described in the package docstring
(:mod:`mlflow_genopt.tracking`).

This module imports neither MLflow nor the rest of the tracking package: MLflow imports the run
context provider, which reads it, on every ``import mlflow``.
"""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Any, Mapping

# --- run tags (``genopt.*``) ------------------------------------------------------------------
# The marker of a learning-loop run: only the tracker sets it (runs that user code starts while
# a loop is active get the context tags below, never this one).
TAG_LOOP_RUN = "genopt.loop_run"
LOOP_RUN_VALUE = "true"
# Context tags: on loop runs, and (from the run context provider) on runs started while a loop
# is active. TAG_TASK is also a LoggedModel tag; TAG_CONFIG_HASH a LoggedModel and prompt tag.
TAG_PROJECT = "genopt.project"
TAG_TASK = "genopt.task"
TAG_INIT = "genopt.init"
TAG_CONFIG_HASH = "genopt.config_hash"
TAG_LIBRARY_VERSION = "genopt.library_version"
# Loop-run tags.
TAG_OBJECTIVE = "genopt.objective"
TAG_CHECKPOINT_STEP = "genopt.checkpoint_step"  # informational; see resume.last_logged_step
TAG_SELECTED_VERSION = "genopt.selected_version"
TAG_STOP_REASON = "genopt.stop_reason"
TAG_ERROR = "genopt.error"  # the run ended FAILED with this one-line error
TAG_PREVIOUS_ERROR = "genopt.previous_error"  # a resumed run's last error (it is not failing now)
TAG_TRACKING_ERRORS = "genopt.tracking_errors"
TAG_REGISTERED_PROMPTS = "genopt.registered_prompts"  # comma-separated prompt URIs
TAG_STUDY = "genopt.study"  # set on a study's runs (mlflow_genopt.study): not resumed alone

# --- LoggedModel tags (one ``MODEL_TYPE`` model per artifact version) -------------------------
MODEL_TYPE = "genopt-artifact"
TAG_VERSION_ID = "genopt.version_id"  # also a prompt-version tag
TAG_PARENT_ID = "genopt.parent_id"
NO_PARENT = "none"  # TAG_PARENT_ID of a starting version
TAG_STEP = "genopt.step"  # also a trace tag: the phase the trace belongs to
TAG_STATUS = "genopt.status"  # initial, accepted, rejected
TAG_CONTENT_HASH = "genopt.content_hash"
TAG_SELECTED = "genopt.selected"  # "true" on the selected version, else "false"
TAG_CANDIDATE = "genopt.candidate"  # index among its step's candidates (siblings share the step)
TAG_EXPORTED_MODEL = "genopt.exported_model"  # "true": the model holds the task's MLflow model

# --- trace and prompt-version tags --------------------------------------------------------------
TAG_RUN_ID = "genopt.run_id"
TAG_PHASE = "genopt.phase"  # a trace's phase: initial, step, test or failed (see tracking.traces)
TAG_VAL_SCORE = "genopt.val_score"
TAG_TEST_SCORE = "genopt.test_score"

# --- metrics --------------------------------------------------------------------------------
# Per step (MLflow step = loop step).
METRIC_BATCH_SCORE = "batch_score"  # the current version on the step's batch
METRIC_CANDIDATE_BATCH_SCORE = "candidate_batch_score"  # also a LoggedModel metric
METRIC_VAL_SCORE = "val_score"  # also a LoggedModel metric
METRIC_BEST_VAL_SCORE = "best_val_score"
METRIC_ACCEPTED = "accepted"
METRIC_VALID = "valid"
METRIC_REJECTED_PROPOSALS = "rejected_proposals"
METRIC_PROMPT_TOKENS = "prompt_tokens"
METRIC_COMPLETION_TOKENS = "completion_tokens"
METRIC_TOTAL_TOKENS = "total_tokens"
METRIC_TOTAL_TOKENS_CUM = "total_tokens_cum"
METRIC_COST_USD = "cost_usd"
METRIC_COST_USD_CUM = "cost_usd_cum"
METRIC_LLM_LATENCY_S = "llm_latency_s"
METRIC_LLM_CALLS = "llm_calls"
METRIC_CACHED_CALLS = "cached_calls"
METRIC_LLM_RETRIES = "llm_retries"
METRIC_EVAL_TIME_S = "eval_time_s"
METRIC_STEP_WALL_TIME_S = "step_wall_time_s"
METRIC_REVERTED = "reverted"
# How the step's candidates fared (LoopConfig.candidates_per_step, repair_attempts).
METRIC_CANDIDATES = "candidates"  # drawn
METRIC_VALID_CANDIDATES = "valid_candidates"  # valid after repairs
METRIC_FIRST_TRY_VALID = "first_try_valid"  # valid at the first answer, before any repair
METRIC_REPAIR_ATTEMPTS = "repair_attempts"  # answers beyond the first
METRIC_CACHE_HITS = "eval_cache_hits"  # trials served by the evaluation cache
METRIC_SHRINK_LEVEL = "context_shrink_level"  # 0: the whole context fit the window
METRIC_LLM_ERRORS = "llm_errors"  # requests that failed for good
METRIC_CACHED_TOKENS = "cached_tokens"  # tokens replayed from the response cache
# LLM usage outside steps: the starting version's validation is logged with the step metrics'
# names at step 0; the final test evaluation as test_<name>; the work of phases that failed (and
# were redone after a resume) as failed_<name>, cumulative. Step 0 + every step + test_ +
# failed_ add up to totals/<name>.
PHASE_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd",
                    "llm_calls", "cached_calls", "llm_errors", "llm_retries")
# Logged with every step's metrics, in the same batch: its history says which steps landed.
STEP_SENTINEL_METRIC = METRIC_STEP_WALL_TIME_S
# At the end (the selected version's LoggedModel has it too).
METRIC_TEST_SCORE = "test_score"


def test_metric(key: str) -> str:
    """The name of the final test evaluation's usage metric ``key``."""
    return f"test_{key}"


def failed_metric(key: str) -> str:
    """The name of the usage metric ``key`` of phases that failed before they committed
    (cumulative over the run's failures)."""
    return f"failed_{key}"


def val_metric(key: str) -> str:
    """The metric of one of the task's extra validation metrics (``val_<key>``)."""
    return f"val_{key}"


def totals_metric(key: str) -> str:
    """The metric of one of the loop's totals (``totals/<key>``: tokens, cost, retries, ...)."""
    return f"totals/{key}"


# --- artifacts ------------------------------------------------------------------------------
CONFIG_FILE = "config.yaml"
SPEC_FILE = "artifact_spec.json"
RESULT_FILE = "result.json"
STEPS_FILE = "steps.jsonl"
VERSIONS_FILE = "versions.jsonl"  # also read by the lineage pages when a store has no models
TEST_TRIALS_FILE = "test_trials.jsonl"
EXPORT_DIR = "export"  # the task's files for the selected version
EXPORTED_MODEL_DIR = "model"  # under EXPORT_DIR: an MLflow model (with an MLmodel file)
MLMODEL_FILE = "MLmodel"
# Under version_dir(version_id), and among that version's LoggedModel artifacts.
VERSION_FILE = "version.json"
DIFF_FILE = "diff.patch"
# Under step_dir(step).
CONTEXT_FILE = "context.json"
RESPONSE_FILE = "response.txt"
PROPOSAL_FILE = "proposal.json"
TRIALS_FILE = "trials.jsonl"
CANDIDATE_TRIALS_FILE = "candidate_trials.jsonl"
CANDIDATES_FILE = "candidates.json"  # every candidate: attempts (repairs included), outcome


def sibling_trials_file(index: int) -> str:
    """The batch trials of candidate ``index`` of a step (the chosen one's are also in
    ``CANDIDATE_TRIALS_FILE``)."""
    return f"candidate_{index}_trials.jsonl"
CHECKPOINT_FILE = "checkpoint.json"  # the loop state after the step, for resuming


def version_dir(version_id: str) -> str:
    """``versions/<version_id>``: one artifact version's files."""
    return f"versions/{version_id}"


def step_dir(step: int) -> str:
    """``steps/NNN``: one step's learning context, response, proposal, trials and checkpoint."""
    return f"steps/{int(step):03d}"


def parameter_file(name: str, kind: str) -> str:
    """The file of one parameter's value in a version's folder: ``<name>.py`` for code."""
    return f"{name}{'.py' if kind == 'code' else '.txt'}"


def run_name(config: Any) -> str:
    """The default run name of a loop: ``<task>-<init>-b<batch_size>[-h<horizon>]-s<seed>``."""
    horizon = f"-h{config.credit_horizon}" if config.credit_horizon is not None else ""
    return f"{config.task}-{config.init}-b{config.batch_size}{horizon}-s{config.seed}"


def is_loop_run(tags: Mapping[str, str]) -> bool:
    """Whether a run's tags mark it as a learning loop logged by the tracker."""
    return tags.get(TAG_LOOP_RUN) == LOOP_RUN_VALUE


LOOP_RUN_FILTER = f"tags.`{TAG_LOOP_RUN}` = '{LOOP_RUN_VALUE}'"  # for MlflowClient.search_runs

# --- limits ---------------------------------------------------------------------------------
MAX_TAG_CHARS = 8000  # MLflow's tag value limit
MAX_OBJECTIVE_CHARS = 1000
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
MAX_METRICS_PER_BATCH = 1000


def truncate(text: str, limit: int = MAX_TAG_CHARS) -> str:
    """``text`` cut to ``limit`` characters (ending in ``...``), so that MLflow accepts it."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


@functools.cache
def library_version() -> str:
    """The installed mlflow-genopt version (``dev`` when running from an uninstalled tree):
    the value of :data:`TAG_LIBRARY_VERSION`."""
    try:
        return importlib.metadata.version("mlflow-genopt")
    except importlib.metadata.PackageNotFoundError:
        return "dev"
