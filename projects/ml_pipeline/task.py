"""The ML-pipeline task: fit a generated pipeline on training rows, score it on rows it never saw.

What an example is
------------------
The labelled rows are split once, seeded by ``split_seed`` (not the loop seed, so loops with
different seeds compare on the same rows): first a *test holdout* when the source has no labelled
test rows, then a *validation* part (``val_fraction``), and the rest is the *training* part.

* ``train`` split: ``n_folds`` examples, one per cross-validation fold of the training part.
  A trial fits the pipeline on the other folds and scores it on its fold. ``batch_size`` is
  therefore the number of folds (resamples) one update sees.
* ``val`` split: one example: fit on the whole training part, score on the validation part.
  The core loop selects its checkpoint by this score.
* ``test`` split: one example, scored once for the selected version by the core loop: fit on
  every labelled row outside the test rows, score on the held-out test rows. With
  MLAgentBench's layout these are ``env/test.csv`` scored against ``scripts/answer.csv``.
  Kaggle's layout has no test labels, so ``holdout_fraction`` (default 0.2) of ``train.csv`` is
  set aside as an internal holdout and is the test split (``holdout_fraction=0`` leaves the
  test split empty). The same holds for scikit-learn's built-in datasets and single CSV files.

Scores and feedback
-------------------
``Trial.score`` is higher-is-better: the primary metric for accuracy and F1, its negation for
error metrics (e.g. ``-RMSE`` of log SalePrice). Failed trials (exception, timeout, memory,
unusable predictions) score a floor (see :func:`metrics.failure_floor`) and working pipelines
never score below it. ``Trial.output`` and ``Trial.metrics`` hold every reported metric (the
loop logs their validation means as ``val_<metric>``). The feedback text starts with
those metrics, then any error with its traceback tail, then *improvement feedback* (how this
version compares with its parent on the same rows, and how many proposals made from it failed
to improve, with a direction to try next; ``improvement_feedback``) and *staged feedback*
(guidance that depends on the level the metric has reached, ``stage_thresholds``;
``staged_feedback``).

Execution
---------
Generated code runs only in :mod:`mlflow_genopt.sandbox` (own process, clean environment,
scratch directory, wall-clock and memory limits). One sandbox process runs the trials of one
split of one ``evaluate`` call; with ``executor`` naming a Dask cluster, one per fold instead, on
the workers, which receive the split's files once per evaluation (so ``data_dir`` need exist only
where the loop runs). It receives only the CSV files that split needs: the training
rows with their target and, for val/test, the rows to predict *without* their target. The
validation labels, the holdout labels and ``answer.csv`` never enter a sandbox; predictions come
back as JSON and are scored here. (Within the train split, a fold's labels are in the training
file by construction; a pipeline that cheats on them only inflates its batch score, while
checkpoint selection and the test score use labels it never had. The sandbox does not hide
world-readable files, so keep ``answer.csv`` unreadable to other users if generated code might
guess its path; the path itself is never passed.) Results are cached per
(parameter values, example), as ``evaluate`` is deterministic given the task's seed.

Export
------
``export(version, directory)`` refits the selected pipeline in the sandbox exactly as for the test
example, predicts the submission rows (``test.csv``, or the holdout rows when there is none), and
writes ``submission.csv`` (id column and target, Kaggle format) and ``model/``, an MLflow model
that maps raw feature rows to predictions, with a signature and an input example. Its flavor:
``sklearn`` (serialized with cloudpickle: skops refuses generated functions) or ``xgboost``
when ``train_model`` returns such an estimator and the artifact's predictions are exactly
``model.predict(X)`` on raw rows; otherwise ``python_function``, a
``PythonModel`` wrapping the fitted object and the artifact's ``predict``, with the generated
module kept under ``code/`` (and the bare estimator, if any, in ``model_estimator/``). The model
is saved, and reloaded once as a check, inside the sandbox; ``export_info.json`` says which
flavor was used and why. Only plain files are copied out of the sandbox's scratch directory
(links, hard-linked files and special files it planted are skipped and listed). Loading
``model/`` unpickles objects that generated code produced: do it only where you would run that
code.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib
import inspect
import json
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mlflow_genopt.artifact import ArtifactSpec, ArtifactVersion
from mlflow_genopt.config import ConfigError
from mlflow_genopt.executor import Executor, LocalExecutor
from mlflow_genopt.project import TaskOption, TaskSetup
from mlflow_genopt.sandbox import SandboxLimits, SandboxResult, run_function
from mlflow_genopt.task import EvalContext, Example, FixedSplits, Trial
from mlflow_genopt.time_limits import AdaptiveTimeLimit

from .artifacts import MANY_FUNCTION_VALUES
from .data import GENERIC_TASK, TASKS, TabularData, TaskDefinition, generic_definition, load_task_data
from .metrics import METRICS, Metric, canonical_label, failure_floor, score_predictions

HARNESS_SOURCE = (Path(__file__).with_name("sandbox_harness.py")).read_text(encoding="utf-8")
PARAMETER_ORDER = ("preprocess", "select_features", "create_ensemble_model", "train_model", "predict")
# the stages whose results the harness checks against their contract (``_genopt_check_stages``)
CHECKED_STAGES = ("select_features", "preprocess", "create_ensemble_model")

STAGE_GUIDANCE = (
    "Level 1 of 3 (basic): first make the pipeline sound: impute every missing value, encode "
    "every categorical column (cast bool/object columns with .astype(str) first), leave out "
    "identifier and free-text columns, and use a solid default model such as a random forest or "
    "gradient boosting.",
    "Level 2 of 3 (working): improve the inputs and the model: engineer features from structured "
    "columns (split composite strings, sums and ratios of related numbers, counts per group) and "
    "try stronger learners (xgboost.XGBClassifier/XGBRegressor, HistGradientBoosting).",
    "Level 3 of 3 (strong): gains now come from careful tuning (learning rate, depth, number of "
    "trees, regularisation), ensembles of different model families and target transforms; "
    "prefer small, well-founded changes that generalise over ones that fit these rows.",
)
DIRECTIONS = (
    "revisit the features: engineer new ones from the raw columns, or drop noisy ones",
    "try a different model family (gradient boosting instead of random forests, or a linear "
    "model on scaled features) rather than retuning the same one",
    "tune the most important hyperparameters of the current model in small steps",
    "undo the last change and make one small, targeted change instead",
    "combine complementary models (averaging or stacking) instead of replacing one",
)

TIME_ADVICE = ("Make the pipeline faster: fewer or smaller models, fewer features, no "
               "unbounded loops.")

OPTIONS = (
    TaskOption("data_dir", "str", help="Kaggle or MLAgentBench layout directory, or the csv task's file"),
    TaskOption("target", "str", help="csv task: the column to predict"),
    TaskOption("metric", "str", help="primary metric (default: the task's)", choices=tuple(METRICS)),
    TaskOption("id_column", "str", help="csv task: the identifier column"),
    TaskOption("n_folds", "int", 5, "cross-validation folds (training examples)", minimum=2, maximum=50),
    TaskOption("val_fraction", "float", 0.2, "share of labelled rows for validation", minimum=0.05,
               maximum=0.5),
    TaskOption("holdout_fraction", "float", 0.2, "internal test holdout where the source has no "
               "test labels", minimum=0.0, maximum=0.5),
    TaskOption("split_seed", "int", 0, "seed of the row split", minimum=0, maximum=2**32 - 1),
    TaskOption("max_train_rows", "int", None, "seeded subsample of the labelled rows", minimum=20),
    TaskOption("timeout_s", "float", 120.0, "most wall clock per trial", minimum=1.0, maximum=86_400.0),
    TaskOption("timeout_factor", "float", 5.0, "per-trial limit = this x the starting version's "
               "time (0: always timeout_s)", minimum=0.0, maximum=1000.0),
    TaskOption("timeout_floor_s", "float", 20.0, "least per-trial limit", minimum=1.0,
               maximum=86_400.0),
    TaskOption("memory_mb", "int", 4096, "address space of a sandbox process", minimum=256,
               maximum=1 << 20),
    TaskOption("staged_feedback", "bool", True, "guidance by metric level"),
    TaskOption("stage_thresholds", "str", None, "comma-separated levels of the primary metric"),
    TaskOption("improvement_feedback", "bool", True, "compare each version with its parent"),
)

PRECHECK_FIT_ROWS, PRECHECK_SCORED_ROWS = 240, 60  # the sample a candidate's quick run uses


@dataclass(frozen=True)
class _Scope:
    """How one example is run: which rows are fitted and which are scored."""

    kind: str  # cv, val, test
    fit_rows: np.ndarray  # positions in the labelled table
    score_rows: np.ndarray | None  # positions in the labelled table (None: the test file)
    fold: int = 0


@dataclass
class _Outcome:
    """The raw result of running one version on one example (cached)."""

    score: float
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    traceback: str = ""
    problems: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # not shown to the optimizer
    predictions_head: list[Any] = field(default_factory=list)


class TabularTask(FixedSplits):
    """A tabular prediction task (see the module docstring for splits, scores and export).

    Options (``LoopConfig.task_options``): ``data_dir`` (directory in Kaggle or MLAgentBench
    layout, or a CSV file for the ``csv`` task), ``target``/``metric``/``id_column`` (the ``csv``
    task; ``metric`` also overrides a named task's primary metric), ``n_folds`` (5),
    ``val_fraction`` (0.2), ``holdout_fraction`` (0.2; only where the source has no test labels),
    ``split_seed`` (0), ``max_train_rows`` (none: a seeded subsample of the labelled rows, for
    speed), ``timeout_s`` (120, the most wall clock per trial), ``timeout_factor`` (5) and
    ``timeout_floor_s`` (20: a trial may take ``timeout_factor`` x the starting version's measured
    time, at least the floor, at most ``timeout_s``; see :mod:`mlflow_genopt.time_limits`),
    ``memory_mb`` (4096, address space of the sandbox process), ``staged_feedback`` (true), ``stage_thresholds`` (comma-separated values of
    the primary metric; defaults per task), ``improvement_feedback`` (true).
    """

    def __init__(self, definition: TaskDefinition, data: TabularData, spec: ArtifactSpec, *,
                 metric: str | None = None, n_folds: int = 5, val_fraction: float = 0.2,
                 holdout_fraction: float = 0.2, split_seed: int = 0,
                 max_train_rows: int | None = None, timeout_s: float = 120.0,
                 timeout_factor: float = 5.0, timeout_floor_s: float = 20.0,
                 memory_mb: int = 4096, staged_feedback: bool = True,
                 stage_thresholds: str | Sequence[float] | None = None,
                 improvement_feedback: bool = True, seed: int = 0,
                 executor: Executor | None = None) -> None:
        self.definition = definition
        self.spec = spec
        self.seed = seed
        self.executor = executor if executor is not None else LocalExecutor()
        self.metric: Metric = self._primary_metric(metric)
        self.report = (self.metric.name,) + tuple(m for m in definition.report if m != self.metric.name
                                                  and METRICS[m].problem_type == definition.problem_type)
        self.timeout_s = float(timeout_s)
        self.time_limit = AdaptiveTimeLimit(self.timeout_s, float(timeout_factor),
                                            min(float(timeout_floor_s), self.timeout_s))
        self.memory_mb = int(memory_mb)
        self.staged_feedback = bool(staged_feedback)
        # "how this version compares with its parent" is the loop's history note (core)
        self.feedback_notes = ("improvement",) if improvement_feedback else ()
        self.improvement_directions = DIRECTIONS

        split_seed = int(split_seed)
        labeled = data.labeled
        target = definition.target
        if labeled[target].isna().any():
            labeled = labeled[labeled[target].notna()]
        needed = 2 * int(n_folds) + 2  # folds of at least two rows, a validation and a test row
        if len(labeled) < needed:
            what = ("has no values (every row is empty or NaN)" if len(labeled) == 0 and len(data.labeled)
                    else f"has {len(labeled)} labelled row(s)")
            raise ConfigError(f"{data.source}: target column {target!r} {what}; at least {needed} "
                              f"are needed for n_folds={int(n_folds)}, a validation and a test part")
        if max_train_rows is not None:
            rows = int(max_train_rows)
            if rows < len(labeled):
                labeled = labeled.sample(n=rows, random_state=split_seed)
        self.labeled = labeled.reset_index(drop=True)
        if definition.id_column and definition.id_column not in self.labeled.columns:
            raise ConfigError(f"id_column: {definition.id_column!r} is not a column of {data.source}")
        self.layout = data.layout
        self.data_source = data.source
        self.classes = ({canonical_label(v) for v in data.labeled[target].dropna()}  # before subsampling
                        if definition.problem_type == "classification" else None)
        if self.classes is not None and len(self.classes) < 2:
            raise ConfigError(f"target: column {target!r} has a single class; nothing to learn")

        rng = np.random.default_rng(split_seed)
        order = rng.permutation(len(self.labeled))
        n_folds, val_fraction, holdout_fraction = int(n_folds), float(val_fraction), float(holdout_fraction)
        self.test_file: Any = None  # rows to predict for the test example (no target)
        self.test_truth: Any = None
        if data.answers is not None:  # MLAgentBench: labelled test rows of its own
            self.test_file, self.test_truth = data.unlabeled, data.answers
            holdout = np.array([], dtype=int)
        else:
            holdout = order[: int(round(holdout_fraction * len(order)))]
            order = order[len(holdout):]
        n_val = max(1, int(round(val_fraction * len(order))))
        val, train = order[:n_val], order[n_val:]
        if len(train) < 2 * n_folds:
            raise ConfigError(f"task_options: {len(train)} training rows cannot make {n_folds} folds "
                              f"(raise max_train_rows or lower n_folds)")
        folds = np.array_split(train, n_folds)
        self.submission_rows = data.unlabeled if data.unlabeled is not None else None
        self.holdout = holdout

        self.name = f"ml_pipeline/{definition.name}"
        self._scopes: dict[str, _Scope] = {}
        self._splits: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
        for k, fold in enumerate(folds, 1):
            fit = np.concatenate([f for j, f in enumerate(folds, 1) if j != k])
            self._add("train", f"fold-{k}", _Scope("cv", np.sort(fit), np.sort(fold), k),
                      {"split": "train", "resample": f"cross-validation fold {k} of {n_folds}",
                       "fit_rows": len(fit), "scored_rows": len(fold)})
        self._add("val", "val", _Scope("val", np.sort(train), np.sort(val)),
                  {"split": "val", "resample": "fit on the training part, score the validation part",
                   "fit_rows": len(train), "scored_rows": len(val)})
        test_fit = np.sort(np.concatenate([train, val]))
        if self.test_truth is not None:
            self._add("test", "test", _Scope("test", test_fit, None),
                      {"split": "test", "resample": "fit on all labelled rows, score env/test.csv "
                       "against scripts/answer.csv", "fit_rows": len(test_fit),
                       "scored_rows": len(self.test_file)})
        elif len(holdout):
            self._add("test", "test", _Scope("test", test_fit, np.sort(holdout)),
                      {"split": "test", "resample": "fit on all labelled rows outside the internal "
                       "holdout, score the holdout", "fit_rows": len(test_fit),
                       "scored_rows": len(holdout)})
        self.test_description = (
            "MLAgentBench answers" if self.test_truth is not None
            else f"internal holdout ({len(holdout)} rows)" if len(holdout) else "none")

        self.floor = failure_floor(self.metric, self.labeled[target])
        self.thresholds = self._thresholds(stage_thresholds)
        self.objective = self._objective(n_folds) + "\n" + describe_columns(
            self._features(np.sort(train)), definition.id_column)

    # --- construction helpers -----------------------------------------------------------
    def _primary_metric(self, name: str | None) -> Metric:
        name = name or self.definition.metric
        if name not in METRICS:
            raise ConfigError(f"task_options.metric: unknown metric {name!r}; choose one of {', '.join(METRICS)}")
        metric = METRICS[name]
        if metric.problem_type != self.definition.problem_type:
            allowed = [m for m, v in METRICS.items() if v.problem_type == self.definition.problem_type]
            raise ConfigError(f"task_options.metric: {name} is a {metric.problem_type} metric; "
                              f"{self.definition.name} is {self.definition.problem_type}: choose one of {', '.join(allowed)}")
        return metric

    def _thresholds(self, raw: str | Sequence[float] | None) -> tuple[float, ...]:
        if raw is None or raw == "":
            if self.metric.name in self.definition.thresholds:
                return tuple(self.definition.thresholds[self.metric.name])
            return self._relative_thresholds()
        items = raw.replace(",", " ").split() if isinstance(raw, str) else list(raw)
        try:
            values = tuple(float(v) for v in items)
        except (TypeError, ValueError):
            raise ConfigError(f"task_options.stage_thresholds: expected comma-separated numbers, got {raw!r}") from None
        if len(values) != len(STAGE_GUIDANCE) - 1:
            raise ConfigError(f"task_options.stage_thresholds: expected {len(STAGE_GUIDANCE) - 1} "
                              f"values of {self.metric.name} (basic -> working -> strong), got {raw!r}")
        return values

    def _relative_thresholds(self) -> tuple[float, ...]:
        """For a dataset without defaults: relative to predicting the majority class / mean."""
        truth = self.labeled[self.definition.target]
        if self.metric.problem_type == "classification":
            base = max(np.mean([canonical_label(v) == c for v in truth]) for c in self.classes)
            return (base + 0.3 * (1 - base), base + 0.6 * (1 - base)) if self.metric.name == "accuracy" else (0.6, 0.8)
        if self.metric.name == "r2":
            return (0.3, 0.6)
        error = -self.floor / 2  # the error of always predicting the mean
        return (0.8 * error, 0.6 * error)

    def _objective(self, n_folds: int) -> str:
        d, m = self.definition, self.metric
        direction = (f"higher is better; score = {m.name}" if m.higher_is_better
                     else f"lower is better; score = -{m.name}, so that higher scores are better and 0 is perfect")
        return (
            f"Improve a machine-learning pipeline on {d.title}: a {d.problem_type} task that "
            f"predicts the column `{d.target}` from the other columns of a table "
            f"({len(self.labeled)} labelled rows; identifier column `{d.id_column or 'none'}`). "
            f"Metric: {m.name}, the {m.description} on rows the pipeline did not see ({direction}). "
            "The harness calls train_model(dataset), "
            "where dataset.X is a pandas DataFrame of the raw feature columns as read from the CSV "
            "and dataset.y the target Series, then predicts rows the pipeline did not see, with "
            "predict(model, X) when the artifact has a predict function and model.predict(X) "
            f"otherwise. Each training trial is one of {n_folds} cross-validation folds; the "
            f"validation score selects the final version. Metrics shown: {', '.join(self.report)}. "
            "The code runs offline with pandas, numpy, scikit-learn and xgboost, within "
            f"at most {self.timeout_s:g} s and {self.memory_mb} MB per trial (the time limit "
            "follows the starting pipeline's time: a trial over it fails). " + self._pandas_note()
        )

    def _pandas_note(self) -> str:
        """What pandas 3 needs before OneHotEncoder. With a ``preprocess`` function the note says
        that its ``as_text`` step already does it: told only "cast bool and object columns with
        .astype(str)", Qwen 1.5B added ``FunctionTransformer(lambda x: x.astype(str))`` branches
        to preprocess in 4 of 5 many_function steps, and those pass text on to the model."""
        if any(p.name == "preprocess" for p in self.spec.parameters):
            return ("With pandas 3, bool and object columns need .astype(str) before OneHotEncoder: "
                    "the as_text step of preprocess does that; a column that no encoder reads "
                    "reaches the model as text and fails.")
        return "With pandas 3, cast bool and object columns with .astype(str) before making them categorical."

    def _add(self, split: str, example_id: str, scope: _Scope, description: dict) -> None:
        self._scopes[example_id] = scope
        self._splits[split].append(Example(example_id, description))

    # --- Task protocol ------------------------------------------------------------------
    def evaluate(self, version: ArtifactVersion, examples: Sequence[Example],
                 context: EvalContext | None = None) -> list[Trial]:
        if not examples:
            return []
        outcomes: dict[str, _Outcome] = {}
        for kind in ("cv", "val", "test"):
            group = [e for e in examples if self._scopes[e.id].kind == kind]
            if group:
                outcomes.update((e.id, o) for e, o in zip(group, self._run(version, group)))
        return [self._trial(example, outcomes[example.id]) for example in examples]

    def close(self) -> None:
        pass

    def precheck(self, version: ArtifactVersion) -> str | None:
        """Run ``version`` on a small sample of training rows (fit on
        :data:`PRECHECK_FIT_ROWS`, predict :data:`PRECHECK_SCORED_ROWS`) in the sandbox: ``None``
        when it trains and predicts usable values, else the error and its traceback tail. A
        pipeline that crashes (a missing import, a wrong column name) costs a repair round of
        the optimizer, not a scored trial."""
        rows = _union(self._scopes["fold-1"])[: PRECHECK_FIT_ROWS + PRECHECK_SCORED_ROWS]
        scored = max(1, min(PRECHECK_SCORED_ROWS, len(rows) // 5))  # a small table: a fifth
        scope = _Scope("cv", rows[:-scored], rows[-scored:])
        files, where = self._group_files(scope)
        job = self._job(version, **where)
        job["holdout_rows"] = np.searchsorted(_union(scope), scope.score_rows).tolist()
        source = self.module_source(version)
        (result,) = run_trials(source, [([job], {})], files, self._limits(1, scored), HARNESS_SOURCE)
        outcome = self._outcome(scope, result, source=source)
        if outcome.error is None:
            return None
        detail = _tail(_without_harness_frames(outcome.traceback), 8, 900) if outcome.traceback else ""
        return f"{outcome.error}\n{detail}".strip()

    def quick_fix(self, version: ArtifactVersion, problem: str) -> tuple[dict[str, str], str] | None:
        """The mechanical fix of a target encoder used on feature columns (see
        :func:`misuse_hint`), or of an import problem, when this environment has the name (see
        :func:`import_hint`): for a ``NameError`` the import is added at the top of each function
        that reads the name; for a ``ModuleNotFoundError`` or an ``ImportError`` ("cannot import
        name") the failing ``from ... import`` statement is rewritten to the module that has each
        name; an estimator given a keyword it does not take gets the near miss it meant
        (``max_iters`` -> ``max_iter``) or none (see :data:`_UNEXPECTED_KEYWORD`). Qwen 1.5B,
        shown the error with the import to add, did not add it in either repair seen on
        Spaceship Titanic (it searched the current version for the import line, then it reverted
        its change); told that ``sklearn.ensemble.gradient_boosting`` does not exist, it kept
        that import in three answers out of three."""
        encoder = _TARGET_ENCODER.match(problem)
        keyword = _UNEXPECTED_KEYWORD.match(problem)
        name = _NAME_ERROR.match(problem)
        failed = _IMPORT_ERROR.match(problem)
        line = name and _import_line(name.group(1))
        if encoder:
            # each LabelEncoder(...) call replaced by the feature encoder that does what it was
            # put there for, with its import: Qwen 1.5B, told the encoder to use instead, moved
            # its LabelEncoder to another column in both repairs. The caller prechecks the
            # result, so a target encoder also used for the target is not adopted broken.
            replacement, import_line = _FEATURE_ENCODERS[encoder.group(1)]

            def edit(source: str, function: str) -> str | None:
                new = replace_calls(source, encoder.group(1), replacement)
                return new and (add_import(new, function, replacement.split("(")[0], import_line) or new)
        elif keyword:
            # a near miss of a keyword it takes is renamed (max_iters -> max_iter), any other
            # dropped: the estimator's default stands in for it
            estimator, given = keyword.groups()
            near = difflib.get_close_matches(given, _estimator_parameters(estimator), n=1, cutoff=0.8)
            renamed = near[0] if near else None

            def edit(source: str, function: str) -> str | None:
                return edit_keyword(source, estimator, given, renamed)
        elif line:
            def edit(source: str, function: str) -> str | None:
                return add_import(source, function, name.group(1), line)
        elif failed:
            def edit(source: str, function: str) -> str | None:
                return fix_imports(source, failed.group(1) or failed.group(3), failed.group(2))
        else:
            return None
        values, fixed = dict(version.values), []
        for parameter in self.spec.parameters:
            if parameter.kind == "code" and parameter.name in values:
                new = edit(values[parameter.name], parameter.expected_function)
                if new is not None:
                    values[parameter.name] = new
                    fixed.append(parameter.name)
        if not fixed:
            return None
        if encoder:
            return values, (f"replaced {encoder.group(1)}() by {replacement} in {', '.join(fixed)} "
                            f"({encoder.group(1)} encodes a target, not feature columns)")
        if keyword:
            done = f"renamed `{given}=` to `{renamed}=`" if renamed else f"removed `{given}=`"
            return values, (f"{done} in {estimator}(...) in {', '.join(fixed)} ({estimator} "
                            f"takes no argument {given})")
        if line:
            return values, f"added `{line}` to {', '.join(fixed)} (NameError: {name.group(1)})"
        return values, (f"rewrote the import from `{failed.group(1) or failed.group(3)}` in "
                        f"{', '.join(fixed)} ({problem.splitlines()[0].split(' (')[0]})")

    # --- the time limit: the task's state ---------------------------------------------------
    def trial_key(self, example: Example, context: EvalContext | None = None) -> str | None:
        """The example id; ``None`` (not cached) for the starting version's validation while
        its time is unmeasured, so that the time limit is measured in every new loop."""
        if (context is not None and context.phase == "validation" and context.step == 0
                and self.time_limit.needs_measurement):
            return None
        return example.id

    def state_dict(self) -> dict[str, Any]:
        return {"time_limit": self.time_limit.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.time_limit.load_state_dict((state or {}).get("time_limit") or {})

    # --- running in the sandbox -----------------------------------------------------------
    def module_source(self, version: ArtifactVersion) -> str:
        names = [n for n in PARAMETER_ORDER if n in version.values]
        names += sorted(n for n in version.values if n not in PARAMETER_ORDER)
        return "\n\n".join(version.values[n].strip("\n") + "\n" for n in names)

    def _job(self, version: ArtifactVersion, **extra: Any) -> dict[str, Any]:
        d = self.definition
        return {"target": d.target, "problem_type": d.problem_type, "id_column": d.id_column,
                "metric": self.metric.name, "seed": self.seed,
                "use_predict": "predict" in version.values,
                "stages": [n for n in CHECKED_STAGES if n in version.values], **extra}

    def _features(self, rows: np.ndarray):
        return self.labeled.iloc[rows].drop(columns=[self.definition.target])

    def _limits(self, n_calls: int, predicted_rows: int, extra_s: float = 0.0) -> SandboxLimits:
        return SandboxLimits(timeout_s=self.time_limit.limit() * n_calls + extra_s, memory_mb=self.memory_mb,
                             max_output_bytes=max(1_000_000, 64 * predicted_rows + 100_000),
                             max_file_mb=256)

    def _group_files(self, scope: _Scope) -> tuple[dict[str, str], dict[str, Any]]:
        """The files one split's sandbox receives, and the job fields that point at them."""
        if scope.kind == "cv":  # the whole training part; a fold is row positions within it
            files = {"train.csv": self.labeled.iloc[_union(scope)].to_csv(index=False)}
            return files, {"train_file": "train.csv"}
        labeled = self.labeled.iloc[scope.fit_rows].to_csv(index=False)
        if scope.score_rows is not None:
            to_predict = self._features(scope.score_rows)
        else:
            to_predict = self.test_file
        return ({"train.csv": labeled, "predict.csv": to_predict.to_csv(index=False)},
                {"train_file": "train.csv", "predict_file": "predict.csv"})

    def _run(self, version: ArtifactVersion, group: Sequence[Example]) -> list[_Outcome]:
        scopes = [self._scopes[e.id] for e in group]
        first = scopes[0]
        files, where = self._group_files(first)
        calls = []
        for scope in scopes:
            job = self._job(version, **where)
            if scope.kind == "cv":
                job["holdout_rows"] = np.searchsorted(_union(scope), scope.score_rows).tolist()
            calls.append(([job], {}))
        source = self.module_source(version)
        started = time.monotonic()
        if not self.executor.remote:  # one sandbox process runs the whole group, as always
            predicted = sum(self._predicted(s) for s in scopes)
            units = [(source, calls, files, self._limits(len(calls), predicted), HARNESS_SOURCE)]
            per_unit = len(calls)  # trials sharing one sandbox process (and its time limit)
        else:  # one fold (or the val/test example) per unit; the files go to the workers once
            shared = self.executor.share(files)
            units = [(source, [call], shared, self._limits(1, self._predicted(scope)), HARNESS_SOURCE)
                     for call, scope in zip(calls, scopes)]
            per_unit = 1
        results = [r for unit in self.executor.map(run_trials, units) for r in unit]
        if version.parent_id is None and all(r.ok for r in results):  # the starting version
            # its time per trial sets the adaptive limit (time_limits.py): locally the group's
            # wall time per trial; on a cluster, where units run side by side, the slowest
            # unit's own sandbox time
            self.time_limit.observe(max(r.duration_s for r in results) if self.executor.remote
                                    else (time.monotonic() - started) / len(calls))
        return [self._outcome(scope, result, per_unit, source) for scope, result in zip(scopes, results)]

    def _predicted(self, scope: _Scope) -> int:
        return len(scope.score_rows) if scope.score_rows is not None else len(self.test_file)

    def _truth(self, scope: _Scope):
        if scope.score_rows is None:
            return list(self.test_truth)
        return list(self.labeled[self.definition.target].iloc[scope.score_rows])

    def _outcome(self, scope: _Scope, result: SandboxResult, n_calls: int = 1,
                 source: str = "") -> _Outcome:
        if not result.ok and (result.error or "").startswith("timeout after"):
            return _Outcome(self.floor, error=self.time_limit.exceeded(n_calls, TIME_ADVICE))
        if not result.ok:
            return _Outcome(self.floor, error=text_hint(misuse_hint(import_hint(result.error or "failed"),
                                                                    result.traceback_tail or ""),
                                                        self.labeled, self.definition.target, source),
                            traceback=result.traceback_tail or _tail(result.stderr_tail, 8))
        value = result.value if isinstance(result.value, dict) else {}
        predictions = value.get("predictions")
        scored = score_predictions(predictions, self._truth(scope), self.definition.problem_type,
                                   self.report, self.classes)
        info = {k: value[k] for k in ("fit_rows", "predict_rows", "model") if k in value}
        timings = {k: float(value[k]) for k in ("fit_s", "predict_s") if isinstance(value.get(k), (int, float))}
        if scored.error:
            return _Outcome(self.floor, error=f"unusable predictions: {scored.error}", info=info,
                            timings=timings,
                            predictions_head=list(predictions[:5]) if isinstance(predictions, list) else [])
        score = max(self.floor, self.metric.score(scored.metrics[self.metric.name]))
        return _Outcome(score, metrics=scored.metrics, problems=scored.problems, info=info,
                        timings=timings, predictions_head=list(predictions[:5]))

    # --- feedback -------------------------------------------------------------------------
    def _trial(self, example: Example, outcome: _Outcome) -> Trial:
        what = example.input["resample"]
        lines = []
        if outcome.error is None:
            shown = ", ".join(f"{name} {value:.4f}" for name, value in outcome.metrics.items())
            lines.append(f"{what}: {shown} (score {outcome.score:.4f}).")
            lines.extend(outcome.problems)
        else:
            lines.append(f"{what}: FAILED, score {outcome.score:.4f}. Error: {outcome.error}")
            if outcome.traceback:
                lines.append(_tail(_without_harness_frames(outcome.traceback), 10, 900))
        if self.staged_feedback and outcome.error is None:
            lines.append(self._stage(outcome))
        output: dict[str, Any] = {"metrics": outcome.metrics, "score": outcome.score}
        if outcome.error:
            output["error"] = outcome.error
        output.update(outcome.info)
        if outcome.predictions_head:
            output["predictions_head"] = outcome.predictions_head
        # timings go to usage, not output: the learning context must stay byte-identical on replay
        return Trial(example.id, example.input, output, outcome.score, "\n".join(lines),
                     error=outcome.error, usage=dict(outcome.timings), metrics=dict(outcome.metrics))

    def stage(self, value: float) -> int:
        better = (lambda a, b: a >= b) if self.metric.higher_is_better else (lambda a, b: a <= b)
        return sum(1 for threshold in self.thresholds if better(value, threshold))

    def _stage(self, outcome: _Outcome) -> str:
        value = outcome.metrics[self.metric.name]
        level = self.stage(value)
        text = STAGE_GUIDANCE[level]
        if level >= 1 and self.definition.hints:
            text += " About this data: " + self.definition.hints
        return text

    # --- export ---------------------------------------------------------------------------
    def export(self, version: ArtifactVersion, directory: Path) -> None:
        """Write ``submission.csv``, ``model/`` and ``export_info.json`` for ``version``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        val = self._scopes["val"]
        if self.submission_rows is not None:  # Kaggle or MLAgentBench test.csv
            fit_rows, to_predict, kind = _union(val), self.submission_rows, "test.csv"
        elif len(self.holdout):  # the model scored on the test split, predicting its rows
            fit_rows, to_predict, kind = _union(val), self._features(np.sort(self.holdout)), "internal holdout rows"
        else:
            fit_rows, to_predict, kind = val.fit_rows, self._features(val.score_rows), "validation rows"
        files = {"train.csv": self.labeled.iloc[fit_rows].to_csv(index=False),
                 "predict.csv": to_predict.to_csv(index=False)}
        source = self.module_source(version)
        job = self._job(version, train_file="train.csv", predict_file="predict.csv",
                        out_dir="export", source=source)
        started = time.monotonic()
        (result,) = run_function(source, "_genopt_export", [([job], {})], preamble=HARNESS_SOURCE,
                                 files=files, limits=self._limits(1, len(to_predict), extra_s=60.0),
                                 workdir_keep=True,
                                 # the harness imports mlflow, whose entry point loads the mlflow_genopt plugin
                                 expose_packages=("mlflow_genopt",))
        info: dict[str, Any] = {"version_id": version.version_id, "task": self.name,
                                "fit_rows": len(fit_rows), "submission_rows": kind,
                                "test_split": self.test_description}
        try:
            (directory / "pipeline.py").write_text(source, encoding="utf-8")
            value = result.value if result.ok and isinstance(result.value, dict) else None
            if value is None:
                (directory / "export_error.txt").write_text(
                    f"{result.error}\n{result.traceback_tail}\n{_tail(result.stderr_tail, 20)}", encoding="utf-8")
                info["error"] = result.error
                return
            predictions = value.get("predictions")
            if not isinstance(predictions, list) or len(predictions) != len(to_predict):
                (directory / "export_error.txt").write_text(
                    f"unusable predictions for {len(to_predict)} rows", encoding="utf-8")
                info["error"] = "unusable predictions"
                return
            self._write_submission(directory / "submission.csv", to_predict, predictions)
            info.update({k: value.get(k) for k in ("flavor", "notes", "model", "fit_s", "predict_s")})
            if value.get("save_error"):
                info["save_error"] = value["save_error"]
                (directory / "export_error.txt").write_text(
                    f"saving the MLflow model failed: {value['save_error']}\n{value.get('save_traceback', '')}",
                    encoding="utf-8")
            scratch = Path(result.workdir) if result.workdir else None
            skipped: list[str] = []
            for name in ("model", "model_estimator"):
                if scratch is not None:
                    skipped += _copy_written_tree(scratch, Path("export") / name, directory / name)
            if skipped:
                info["skipped_files"] = skipped[:20]
        finally:
            info["export_s"] = round(time.monotonic() - started, 3)
            (directory / "export_info.json").write_text(json.dumps(info, indent=2, default=str),
                                                       encoding="utf-8")
            if result.workdir:
                shutil.rmtree(result.workdir, ignore_errors=True)

    def _write_submission(self, path: Path, rows, predictions: list) -> None:
        import pandas as pd

        d = self.definition
        ids = rows[d.id_column] if d.id_column and d.id_column in rows.columns else pd.Series(
            range(len(rows)), name="id")
        if d.problem_type == "classification":
            originals = {canonical_label(v): v for v in self.labeled[d.target].unique()}
            from .metrics import align_labels

            labels = align_labels([canonical_label(p) for p in predictions], set(originals))
            values = [originals.get(label, label) for label in labels]
        else:
            values = [float(p) for p in predictions]
        pd.DataFrame({ids.name: ids.to_numpy(), d.target: values}).to_csv(path, index=False)


def run_trials(source: str, calls: list, files: Mapping[str, str], limits: SandboxLimits,
               harness: str) -> list[SandboxResult]:
    """The unit of evaluation (see :mod:`mlflow_genopt.executor`): run the pipeline ``source``
    on ``calls`` (one job per fold or example) in ONE sandbox process started here (on a Dask
    worker when the executor is a cluster), with only ``files`` in its scratch dir. Returns the
    raw results (predictions); the task scores them in the loop's process."""
    return run_function(source, "_genopt_trial", calls, preamble=harness, files=files,
                        limits=limits)


def _copy_written_tree(scratch: Path, relative: Path, destination: Path) -> list[str]:
    """Copy what the sandbox wrote under ``scratch/relative``: plain files and directories only.

    The loop may run with more privileges than the sandbox, so nothing the generated code made
    is followed: a symbolic link (to a secret file, say) anywhere on the path, a file with other
    hard links, a device or a FIFO is skipped and reported, never read."""
    source = scratch
    for part in relative.parts:
        source = source / part
        if not source.is_dir() or source.is_symlink():
            return []
    if not (source / "MLmodel").is_file() or (source / "MLmodel").is_symlink():
        return []
    skipped = []
    for root, dirs, files in os.walk(source, followlinks=False):
        here = Path(root)
        target = destination / here.relative_to(source)
        target.mkdir(parents=True, exist_ok=True)
        for name in list(dirs):
            if (here / name).is_symlink():
                dirs.remove(name)
                skipped.append(str((here / name).relative_to(scratch)))
        for name in files:
            info = os.lstat(here / name)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                skipped.append(str((here / name).relative_to(scratch)))
                continue
            with open(here / name, "rb", opener=lambda path, flags: os.open(path, flags | os.O_NOFOLLOW)) as src, \
                    open(target / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return skipped


_IMPORTABLE = {"pd": "import pandas as pd", "np": "import numpy as np",
               "xgb": "import xgboost as xgb", "XGBClassifier": "from xgboost import XGBClassifier",
               "XGBRegressor": "from xgboost import XGBRegressor",
               "make_pipeline": "from sklearn.pipeline import make_pipeline",
               "make_column_transformer": "from sklearn.compose import make_column_transformer",
               "cross_val_score": "from sklearn.model_selection import cross_val_score",
               "train_test_split": "from sklearn.model_selection import train_test_split"}


@functools.lru_cache(maxsize=1)
def _sklearn_estimators() -> dict[str, type]:
    from sklearn.utils import all_estimators

    return dict(all_estimators())


def _estimator_parameters(name: str) -> tuple[str, ...]:
    """The keyword arguments scikit-learn's estimator ``name`` takes (none known: empty)."""
    cls = _sklearn_estimators().get(name)
    try:
        parameters = inspect.signature(cls.__init__).parameters.values() if cls else ()
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in parameters if p.name != "self"
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


@functools.lru_cache(maxsize=1)
def _sklearn_names() -> dict[str, str]:
    names = {}
    for name, cls in _sklearn_estimators().items():
        module = _public_module(cls.__module__, name)
        if module:
            names[name] = f"from {module} import {name}"
    return names


def _public_module(module: str, name: str) -> str | None:
    """The module a user imports ``name`` from: the path of ``module`` up to its first private
    part (``sklearn.ensemble._hist_gradient_boosting.gradient_boosting`` ->
    ``sklearn.ensemble``), or a parent of it, that has ``name``. Dropping the private parts alone
    named a module that does not exist (``sklearn.ensemble.gradient_boosting``), and the import
    this task added to a proposal failed."""
    parts = []
    for part in module.split("."):
        if part.startswith("_"):
            break
        parts.append(part)
    while parts:
        try:
            if hasattr(importlib.import_module(".".join(parts)), name):
                return ".".join(parts)
        except ImportError:
            pass
        parts.pop()
    return None


_NAME_ERROR = re.compile(r"NameError: name '(\w+)' is not defined")
_IMPORT_ERROR = re.compile(r"ModuleNotFoundError: No module named '([\w.]+)'"
                           r"|ImportError: cannot import name '(\w+)' from '([\w.]+)'")
# an estimator given a keyword it does not take: Qwen 1.5B gave HistGradientBoostingClassifier
# the forest's n_estimators in 2 of 3 one_function seeds on Spaceship Titanic, and each repair,
# shown the error and the failed code, broke the code further (a SEARCH of lines it had not
# written, a repeated keyword)
_UNEXPECTED_KEYWORD = re.compile(r"TypeError: (\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'")
_TEXT_VALUE = re.compile(r"ValueError: could not convert string to float: '(.{1,200}?)'(?:$|\s)")


def _import_line(name: str) -> str | None:
    return _IMPORTABLE.get(name) or _sklearn_names().get(name)


# LabelEncoder / LabelBinarizer encode a target: a ColumnTransformer calls fit_transform(X, y)
# (or given a feature encoder's arguments, e.g. LabelEncoder(handle_unknown="ignore"))
_TARGET_ENCODER = re.compile(r"TypeError: (LabelEncoder|LabelBinarizer|MultiLabelBinarizer)"
                             r"(?:\.fit(?:_transform)?\(\) takes 2 positional arguments but 3 were given"
                             r"|\(\) takes no arguments|\.__init__\(\) got an unexpected keyword)")
# what each function of the starting artifacts is given, read from their own `def` lines (a
# NameError of another one's argument inside it gets its signature), and the innermost frame of
# generated code in a traceback
_STAGE_ARGUMENTS = {name: tuple(a.arg for a in ast.parse(source).body[0].args.args)
                    for name, source in MANY_FUNCTION_VALUES.items()}
_ALL_STAGE_ARGUMENTS = {a for args in _STAGE_ARGUMENTS.values() for a in args}
_FRAME = re.compile(r'File "generated\.py", line \d+, in (\w+)')
# a ColumnTransformer entry written as (name, transformer), without its columns
_UNPACK = re.compile(r"ValueError: (?:not enough|too many) values to unpack \(expected 3, got \d\)")


_FEATURE_ENCODERS = {
    "LabelEncoder": ('OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1)',
                     "from sklearn.preprocessing import OrdinalEncoder"),
    "LabelBinarizer": ('OneHotEncoder(handle_unknown="ignore")',
                       "from sklearn.preprocessing import OneHotEncoder"),
    "MultiLabelBinarizer": ('OneHotEncoder(handle_unknown="ignore")',
                            "from sklearn.preprocessing import OneHotEncoder"),
}


def _calls_of(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and ((isinstance(n.func, ast.Name) and n.func.id == name)
                 or (isinstance(n.func, ast.Attribute) and n.func.attr == name))]


def edit_keyword(source: str, name: str, keyword: str, new: str | None) -> str | None:
    """``source`` with the keyword argument ``keyword`` of each call of ``name`` renamed to
    ``new``, or dropped (with its comma) when ``new`` is ``None``; ``None`` when no call has it
    or ``source`` cannot be parsed."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # hostile input: no fix
        return None
    data = source.encode()  # ast offsets count UTF-8 bytes within a line
    starts = [0]
    for line in data.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))

    def at(line: int, col: int) -> int:
        return starts[line - 1] + col

    edits: list[tuple[int, int, bytes]] = []
    for call in _calls_of(tree, name):
        arguments = sorted([*call.args, *call.keywords], key=lambda a: (a.lineno, a.col_offset))
        for i, argument in enumerate(arguments):
            if not (isinstance(argument, ast.keyword) and argument.arg == keyword):
                continue
            begin, end = at(argument.lineno, argument.col_offset), at(argument.end_lineno,
                                                                     argument.end_col_offset)
            if new is not None:
                edits.append((begin, begin + len(keyword), new.encode()))
            elif i + 1 < len(arguments):  # up to the next argument
                nxt = arguments[i + 1]
                edits.append((begin, at(nxt.lineno, nxt.col_offset), b""))
            elif i > 0:  # from the end of the previous one
                prev = arguments[i - 1]
                edits.append((at(prev.end_lineno, prev.end_col_offset), end, b""))
            else:  # the only argument, and a trailing comma if any
                edits.append((begin, at(call.end_lineno, call.end_col_offset) - 1, b""))
    if not edits:
        return None
    for begin, end, text in sorted(edits, reverse=True):
        data = data[:begin] + text + data[end:]
    return data.decode()


def replace_calls(source: str, name: str, replacement: str) -> str | None:
    """``source`` with each call of ``name`` (``name(...)`` or ``module.name(...)``, on one
    line; its arguments dropped) replaced by ``replacement``; ``None`` when there is none or it
    cannot be parsed."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # hostile input: no fix
        return None
    calls = [n for n in _calls_of(tree, name) if n.lineno == n.end_lineno]
    calls = [c for c in calls if not any(o is not c and (o.lineno, o.col_offset) <= (c.lineno, c.col_offset)
                                         and (c.end_lineno, c.end_col_offset) <= (o.end_lineno, o.end_col_offset)
                                         for o in calls)]  # outermost only
    if not calls:
        return None
    lines = source.splitlines(keepends=True)
    for call in sorted(calls, key=lambda c: (c.lineno, c.col_offset), reverse=True):
        text = lines[call.lineno - 1].encode()  # ast offsets count UTF-8 bytes
        lines[call.lineno - 1] = (text[:call.col_offset] + replacement.encode()
                                  + text[call.end_col_offset:]).decode()
    return "".join(lines)


def misuse_hint(error: str, traceback: str = "") -> str:
    """``error`` with what scikit-learn expects when it is a known misuse (and, for a
    ``NameError`` of another stage's argument, what the failing function is given): Qwen 1.5B put
    ``LabelEncoder()`` in a ColumnTransformer and, told only that ``fit_transform`` takes 2
    positional arguments, kept it in its repair; it wrote a ColumnTransformer entry without its
    columns and, told "not enough values to unpack", resent it."""
    name, frames = _NAME_ERROR.match(error), _FRAME.findall(traceback)
    given = _STAGE_ARGUMENTS.get(frames[-1]) if frames else None
    if name and given and name.group(1) in _ALL_STAGE_ARGUMENTS and name.group(1) not in given:
        # Qwen 1.5B read `dataset` in predict and `columns` in select_features, then resent it
        return (f"{error} ({frames[-1]}({', '.join(given)}) is given only "
                f"{' and '.join(f'`{a}`' for a in given)}: `{name.group(1)}` does not exist "
                "there)")
    if _UNPACK.match(error) and "_column_transformer" in traceback:
        return (f"{error} (each entry of a ColumnTransformer's list is a (name, transformer, "
                "columns) triple, e.g. (\"categorical\", OneHotEncoder(handle_unknown=\"ignore\"), "
                "categorical))")
    match = _TARGET_ENCODER.match(error)
    if not match:
        return error
    return (f"{error} ({match.group(1)} encodes a target, not feature columns: in a "
            "ColumnTransformer use OneHotEncoder(handle_unknown='ignore') or "
            "OrdinalEncoder(handle_unknown='use_encoded_value', unknown_value=-1))")


def import_hint(error: str) -> str:
    """``error`` with the import to add when it is a ``NameError`` for a name this environment
    can import (pandas, numpy, xgboost, any scikit-learn estimator): Qwen 1.5B, told only that
    ``XGBClassifier`` is not defined, concluded that xgboost was not installed and reverted."""
    match = _NAME_ERROR.match(error)
    line = match and _import_line(match.group(1))
    if not line:
        return error
    return f"{error} (it is installed: add `{line}` inside the function that uses it)"


def fix_imports(source: str, module: str, name: str | None = None) -> str | None:
    """``source`` with each ``from <module> import ...`` statement (of ``module`` or a module
    under it; with ``name``, only the statements that import it) rewritten so that every name
    comes from the module that has it (:func:`_import_line`); ``None`` when no statement is
    affected or a name has no known module."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # hostile input: no fix
        return None
    lines = source.splitlines(keepends=True)
    edits = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                and (node.module == module or (name is None and node.module.startswith(module + ".")))
                and (name is None or any(a.name == name for a in node.names))):
            continue
        if node.lineno != node.end_lineno or lines[node.lineno - 1].strip().endswith(";"):
            return None  # a statement over several lines, or beside another: left to the optimizer
        new = []
        for alias in node.names:
            known = _import_line(alias.name)  # "from M import X", "import numpy as np" or None
            if known is None and (name is None or alias.name == name):
                return None
            if known is not None and not known.startswith("from "):
                return None
            target = known.split()[1] if known else node.module
            new.append(f"from {target} import {alias.name}" + (f" as {alias.asname}" if alias.asname else ""))
        line = lines[node.lineno - 1]
        indent = line[:len(line) - len(line.lstrip())]
        edits.append((node.lineno - 1, "".join(f"{indent}{n}\n" for n in new)))
    if not edits:
        return None
    for at, text in sorted(edits, reverse=True):
        lines[at] = text
    fixed = "".join(lines)
    return fixed if fixed != source else None


def text_hint(error: str, frame, target: str | None = None, source: str = "") -> str:
    """``error`` with the columns that hold the value when it is "could not convert string to
    float" (a text column reached a numeric model): Qwen 1.5B, shown only the value ``'Earth'``,
    sent the same failing code in three answers out of three. When a line of ``source`` names
    such a column in quotes and no encoder, that line is quoted too: Qwen 1.5B added the column
    to its own ``FunctionTransformer(lambda x: x.astype(str))`` branch, which passes text on."""
    match = _TEXT_VALUE.match(error)
    if not match:
        return error
    import pandas as pd

    value = match.group(1)
    columns = [c for c in frame.columns if c != target and not pd.api.types.is_numeric_dtype(frame[c])
               and (frame[c].astype(str) == value).any()][:3]
    if not columns:
        return error
    quoted = [line.strip() for line in source.splitlines()
              if "Encoder" not in line and any(f'"{c}"' in line or f"'{c}'" in line for c in columns)]
    where = f"; `{quoted[0][:160]}` passes it on as text" if len(quoted) == 1 else ""
    return (f"{error} ('{value}' is a value of the text column {', '.join(columns)} of dataset.X"
            f"{where}: encode text columns as numbers, e.g. with OneHotEncoder(handle_unknown="
            "'ignore') in a ColumnTransformer, before they reach the model)")


def add_import(source: str, function: str, name: str, line: str) -> str | None:
    """``source`` with ``line`` as the first statement of ``function`` (after its docstring), when
    that function reads ``name``; ``None`` when it does not, or the source cannot be edited so."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # hostile input: no fix
        return None
    node = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and n.name == function), None)
    if node is None or not any(isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load)
                               for n in ast.walk(node)):
        return None
    body = node.body
    docstring = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                 and isinstance(body[0].value.value, str))
    first = body[1] if docstring and len(body) > 1 else body[0]
    if first.lineno == node.lineno or (docstring and first is body[0]):
        return None  # a one-line function, or nothing after the docstring
    lines = source.splitlines(keepends=True)
    at = first.lineno - 1
    indent = lines[at][:len(lines[at]) - len(lines[at].lstrip())]
    return "".join(lines[:at] + [f"{indent}{line}\n"] + lines[at:])


def describe_columns(X, id_column: str | None = None, limit: int = 100) -> str:
    """One line per feature column of ``X`` (the training rows as the pipeline reads them): its
    kind, its range or values (an example of free text), and the share missing. Without it the
    optimizer knows the columns only by name: Qwen 1.5B proposed to "consider" columns the
    pipeline already used and edited features it could not see."""
    import pandas as pd

    lines = []
    for name in list(X.columns)[:limit]:
        column = X[name]
        present = column.dropna()
        if name == id_column:
            kind = f"identifier, e.g. {present.astype(str).iloc[0]}" if len(present) else "identifier"
        elif pd.api.types.is_bool_dtype(column) or (
                len(present) and all(isinstance(v, (bool, np.bool_)) for v in present.unique())):
            kind = "true/false"
        elif pd.api.types.is_numeric_dtype(column):
            kind = f"number, {present.min():g} to {present.max():g}" if len(present) else "number"
        else:
            values = present.astype(str).value_counts()
            kind = (f"text: {', '.join(values.index)}" if len(values) <= 6
                    else f"text, {len(values)} distinct values, e.g. {values.index[0]}")
        missing = f", {column.isna().mean():.0%} missing" if column.isna().any() else ""
        lines.append(f"- {name} ({kind}{missing})")
    more = f"\n- ... and {len(X.columns) - limit} more columns" if len(X.columns) > limit else ""
    return f"Columns of dataset.X ({len(X)} training rows):\n" + "\n".join(lines) + more


def _union(scope: _Scope) -> np.ndarray:
    return np.sort(np.concatenate([scope.fit_rows, scope.score_rows]))


def _without_harness_frames(traceback: str) -> str:
    """Drop the harness's own frames (file ``preamble.py``): the optimizer cannot change them."""
    kept, skipping = [], False
    for line in traceback.splitlines():
        if line.startswith("  File "):
            skipping = line.startswith('  File "preamble.py"')
        elif not line.startswith("    "):
            skipping = False
        if not skipping:
            kept.append(line)
    return "\n".join(kept)


def _tail(text: str, lines: int, limit: int = 2000) -> str:
    kept = "\n".join((text or "").strip().splitlines()[-lines:])
    return kept if len(kept) <= limit else "..." + kept[-limit:]


def make_task(setup: TaskSetup) -> TabularTask:
    """The task of ``setup.config`` (``config.task`` names a built-in task, or ``csv``)."""
    config, options = setup.config, dict(setup.options)
    if config.task == GENERIC_TASK:
        definition = generic_definition(options)
    elif config.task in TASKS:
        definition = TASKS[config.task]
        for key in ("target", "id_column"):
            if options.get(key) is not None:
                raise ConfigError(f"task_options.{key}: only the csv task takes it; {config.task} "
                                  f"predicts {definition.target}")
    else:
        raise ConfigError(f"task: unknown ml_pipeline task {config.task!r}; choose one of "
                          f"{', '.join(TASKS)}, {GENERIC_TASK}")
    data = load_task_data(definition, options.pop("data_dir", None))
    for key in ("target", "id_column"):
        options.pop(key, None)
    return TabularTask(definition, data, setup.starting.spec, seed=config.seed,
                       executor=setup.executor, **options)
