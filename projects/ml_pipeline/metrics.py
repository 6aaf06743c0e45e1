"""Metrics of the ML-pipeline case study, computed in the loop's process (never in the sandbox).

Every metric has a natural direction; a trial's *score* is always higher-is-better: the metric
itself for accuracy, F1, balanced accuracy and R², its negation for error metrics (RMSE, MAE,
RMSE of log values), so that ``-0.13`` means an RMSE of 0.13 and 0 is perfect.

Predictions come back from the sandbox as JSON values and are compared with labels the
generated code never saw. Class labels are compared in a canonical text form, so that ``True``,
``"True"``, ``1`` and ``1.0`` are the same label of a boolean target, and ``0``/``"0"`` the same
label of an integer target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

PROBLEM_TYPES = ("classification", "regression")


@dataclass(frozen=True)
class Metric:
    name: str
    problem_type: str
    higher_is_better: bool
    description: str
    compute: Callable[..., float]

    def score(self, value: float) -> float:
        """The higher-is-better score of a metric value."""
        return value if self.higher_is_better else -value


# --- classification ------------------------------------------------------------------------
def canonical_label(value: Any) -> str:
    """A label as comparable text: booleans ``"True"``/``"False"``, integral numbers without
    a decimal part, everything else stripped text."""
    if isinstance(value, (bool, np.bool_)):
        return "True" if value else "False"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isfinite(number) and number.is_integer():
            return str(int(number))
        return repr(number)
    text = str(value).strip()
    if text.lower() in ("true", "false"):
        return text.capitalize()
    try:
        number = float(text)
    except ValueError:
        return text
    if math.isfinite(number) and number.is_integer() and text.lstrip("+-").replace(".", "", 1).isdigit():
        return str(int(number))
    return text


def align_labels(predictions: Sequence[str], classes: set[str]) -> list[str]:
    """Map 1/0 predictions onto a boolean target's True/False (a common, harmless encoding)."""
    if classes == {"True", "False"}:
        mapping = {"1": "True", "0": "False"}
        return [mapping.get(p, p) for p in predictions]
    return list(predictions)


def positive_label(classes: set[str]) -> str:
    return "True" if "True" in classes else sorted(classes)[-1]


def accuracy(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    return float(np.mean(np.asarray(y_true, dtype=object) == np.asarray(y_pred, dtype=object)))


def f1(y_true: Sequence[str], y_pred: Sequence[str], classes: set[str] | None = None) -> float:
    """Binary F1 of the positive class (``True``, or the largest label) for two classes, macro
    F1 otherwise."""
    classes = set(classes or y_true)
    true, pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)

    def f1_of(label: str) -> float:
        tp = float(np.sum((pred == label) & (true == label)))
        fp = float(np.sum((pred == label) & (true != label)))
        fn = float(np.sum((pred != label) & (true == label)))
        return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)

    if len(classes) <= 2:
        return f1_of(positive_label(classes))
    return float(np.mean([f1_of(label) for label in sorted(classes)]))


def balanced_accuracy(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    true, pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    recalls = [float(np.mean(pred[true == label] == label)) for label in sorted(set(y_true))]
    return float(np.mean(recalls))


# --- regression ----------------------------------------------------------------------------
def rmse(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    diff = np.asarray(y_true, float) - np.asarray(y_pred, float)
    return float(np.sqrt(np.mean(diff**2)))


def mae(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    return float(np.mean(np.abs(np.asarray(y_true, float) - np.asarray(y_pred, float))))


def rmse_log(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    """RMSE between log(1 + value) of truth and prediction (Kaggle House Prices' metric, with
    log1p so that a zero is defined); negative predictions count as 0."""
    true = np.log1p(np.clip(np.asarray(y_true, float), 0, None))
    pred = np.log1p(np.clip(np.asarray(y_pred, float), 0, None))
    return float(np.sqrt(np.mean((true - pred) ** 2)))


def r2(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    true, pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    total = float(np.sum((true - true.mean()) ** 2))
    return 0.0 if total == 0 else 1.0 - float(np.sum((true - pred) ** 2)) / total


METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", "classification", True, "accuracy", accuracy),
    "f1": Metric("f1", "classification", True, "F1 score (of the positive class; macro for >2 classes)",
                 lambda t, p, classes=None: f1(t, p, classes)),
    "balanced_accuracy": Metric("balanced_accuracy", "classification", True, "balanced accuracy",
                                balanced_accuracy),
    "rmse": Metric("rmse", "regression", False, "root mean squared error", rmse),
    "mae": Metric("mae", "regression", False, "mean absolute error", mae),
    "rmse_log": Metric("rmse_log", "regression", False, "RMSE between log(1 + value) of truth and prediction",
                       rmse_log),
    "r2": Metric("r2", "regression", True, "coefficient of determination R²", r2),
}

DEFAULT_REPORT = {
    "classification": ("accuracy", "f1"),
    "regression": ("rmse", "mae", "r2"),
}


@dataclass(frozen=True)
class Scored:
    """The metrics of one set of predictions, or why they could not be scored."""

    metrics: dict[str, float]
    problems: tuple[str, ...] = ()  # e.g. "12 predictions are not known labels"
    error: str | None = None  # the predictions are unusable (wrong length, not numbers)


def score_predictions(predictions: Any, truth: Sequence[Any], problem_type: str,
                      metric_names: Sequence[str], classes: set[str] | None = None) -> Scored:
    """Compare predictions with the truth; never raises for bad predictions."""
    if not isinstance(predictions, list):
        return Scored({}, error=f"predictions must be a list, got {type(predictions).__name__}")
    if len(predictions) != len(truth):
        return Scored({}, error=f"got {len(predictions)} predictions for {len(truth)} rows")
    if problem_type == "classification":
        true = [canonical_label(v) for v in truth]
        known = set(classes) if classes else set(true)
        pred = align_labels([canonical_label(v) for v in predictions], known)
        unknown = [p for p in pred if p not in known]
        problems = ()
        if unknown:
            problems = (f"{len(unknown)} of {len(pred)} predictions are not labels of the target "
                        f"(expected one of {', '.join(sorted(known))}; got e.g. {unknown[0]!r}) "
                        "and count as wrong",)
        metrics = {}
        for name in metric_names:
            metric = METRICS[name]
            metrics[name] = (metric.compute(true, pred, known) if name == "f1"
                             else metric.compute(true, pred))
        return Scored(metrics, problems)
    values = []
    for value in predictions:
        try:
            number = float(value)
        except (TypeError, ValueError):
            return Scored({}, error=f"prediction {value!r} is not a number")
        values.append(number)
    bad = sum(1 for v in values if not math.isfinite(v))
    if bad:
        return Scored({}, error=f"{bad} of {len(values)} predictions are NaN or infinite")
    true_values = [float(v) for v in truth]
    return Scored({name: METRICS[name].compute(true_values, values) for name in metric_names})


def failure_floor(metric: Metric, truth: Sequence[Any]) -> float:
    """The score of a failed trial: 0 for classification metrics, -1 for R², and for error
    metrics twice the error of always predicting the mean (negated). Scores of working
    pipelines are clipped to it, so a crash never beats a terrible model and vice versa."""
    if metric.problem_type == "classification":
        return 0.0
    if metric.name == "r2":
        return -1.0
    values = np.asarray([float(v) for v in truth], float)
    constant = [float(values.mean())] * len(values)
    return -2.0 * metric.compute(values, constant)
