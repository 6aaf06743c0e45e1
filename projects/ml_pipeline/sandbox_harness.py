"""Trusted harness that runs INSIDE the sandbox, before the generated code (as its preamble).

The loop's process never imports this module: it reads its text and hands it to
:func:`mlflow_genopt.sandbox.run_function` as ``preamble``. The generated functions are then
executed into the same namespace, so ``train_model`` and ``predict`` below resolve to them at
call time. Each call reads only the CSV files the loop copied into the scratch directory
(training rows with their target, rows to predict without it) and returns predictions as JSON;
the loop scores them against labels this process never had.
"""

import json
import os
import random
import time
import warnings

import numpy as np
import pandas as pd

warnings.filterwarnings("ignore")


class Dataset:
    """What ``train_model(dataset)`` receives."""

    def __init__(self, X, y, problem_type, target, id_column, metric):
        self.X = X
        self.y = y
        self.problem_type = problem_type
        self.target = target
        self.id_column = id_column
        self.metric = metric

    def __repr__(self):
        return (f"Dataset({len(self.X)} rows x {self.X.shape[1]} columns, target {self.target!r}, "
                f"{self.problem_type}, metric {self.metric})")


def _genopt_jsonable(values):
    array = np.asarray(values)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(f"predictions have shape {array.shape}; expected one value per row")
    out = []
    for value in array.tolist():
        if hasattr(value, "item"):
            value = value.item()
        if not isinstance(value, (bool, int, float, str)) and value is not None:
            value = str(value)
        out.append(value)
    return out


def _genopt_fit_predict(job):
    seed = job["seed"]
    random.seed(seed)
    np.random.seed(seed)
    target = job["target"]
    labeled = pd.read_csv(job["train_file"])
    if job.get("holdout_rows") is not None:
        mask = np.zeros(len(labeled), dtype=bool)
        mask[job["holdout_rows"]] = True
        to_predict = labeled[mask].drop(columns=[target]).reset_index(drop=True)
        labeled = labeled[~mask].reset_index(drop=True)
    else:
        to_predict = pd.read_csv(job["predict_file"])
    y = labeled.pop(target)
    dataset = Dataset(labeled, y, job["problem_type"], target, job["id_column"], job["metric"])
    _genopt_check_stages(job.get("stages") or ())
    started = time.perf_counter()
    model = train_model(dataset)  # noqa: F821 - defined by the generated code
    fitted = time.perf_counter()
    if model is None:
        raise ValueError("train_model returned None; it must return the fitted model")
    if job["use_predict"]:
        predictions = predict(model, to_predict.copy())  # noqa: F821 - generated code
    else:
        if not hasattr(model, "predict"):
            raise TypeError(f"train_model returned a {type(model).__name__}, which has no .predict(X)")
        predictions = model.predict(to_predict.copy())
    done = time.perf_counter()
    info = {"fit_rows": len(labeled), "predict_rows": len(to_predict),
            "fit_s": round(fitted - started, 3), "predict_s": round(done - fitted, 3),
            "model": _genopt_describe(model)}
    return model, to_predict, predictions, info, labeled


# What each stage function of the five-function artifact returns (its parameter description):
# a stage that returns something else fails here, named, instead of further on. Qwen 1.5B's
# ``preprocess`` returned None, which a Pipeline takes for "passthrough": the raw text columns
# reached the model, and the error it got ("could not convert string to float") sent it to
# re-encode columns that were already encoded.
_GENOPT_STAGE_RETURNS = {
    "select_features": "a list of column names of dataset.X",
    "preprocess": ("an unfitted scikit-learn transformer (with fit and transform), e.g. "
                   "`return ColumnTransformer([...])`"),
    "create_ensemble_model": ("an unfitted scikit-learn compatible estimator (with fit and "
                              "predict), e.g. `return RandomForestClassifier(...)`"),
}


def _genopt_check_stages(names):
    """Wrap the stage functions ``names`` that the generated code defines (``train_model`` reads
    them as globals at call time) so that each result is checked against its contract."""
    import functools

    namespace = globals()
    for name in names:
        function = namespace.get(name)
        if not callable(function) or getattr(function, "_genopt_checked", False):
            continue

        def checked(*args, _name=name, _function=function, **kwargs):
            out = _function(*args, **kwargs)
            problem = _genopt_stage_problem(_name, out, args)
            if problem:
                raise TypeError(f"{_name} returned {problem}; it must return "
                                f"{_GENOPT_STAGE_RETURNS[_name]}")
            return out

        checked = functools.wraps(function)(checked)
        checked._genopt_checked = True
        namespace[name] = checked


def _genopt_stage_problem(name, out, args):
    """Why ``out`` breaks stage ``name``'s contract, or None."""
    what = "None" if out is None else f"a {type(out).__name__}"
    if name == "select_features":
        if isinstance(out, str) or not isinstance(out, (list, tuple, pd.Index, np.ndarray)):
            return what
        columns = getattr(getattr(args[0] if args else None, "X", None), "columns", None)
        missing = [c for c in out if columns is not None and c not in columns]
        return f"{missing[0]!r}, which is not a column of dataset.X" if missing else None
    if name == "preprocess":
        ok = hasattr(out, "fit") and (hasattr(out, "transform") or hasattr(out, "fit_transform"))
        return None if ok else what
    return None if hasattr(out, "fit") else what


def _genopt_describe(model):
    """A short, deterministic description of the fitted model (no memory addresses)."""
    import re

    def text(obj, limit):
        flat = re.sub(r" at 0x[0-9a-fA-F]+", "", " ".join(repr(obj).split()))
        return flat if len(flat) <= limit else flat[: limit - 3] + "..."

    try:
        steps = getattr(model, "steps", None)
        if isinstance(steps, list) and steps:
            names = ", ".join(f"{name}={type(step).__name__}" for name, step in steps)
            return f"Pipeline({names}); final step: {text(steps[-1][1], 200)}"
        return text(model, 300)
    except Exception:  # noqa: BLE001 - a hostile __repr__
        return type(model).__name__


def _genopt_trial(job):
    """Fit on the training rows of ``job``, predict its other rows; JSON back to the loop."""
    model, _, predictions, info, _ = _genopt_fit_predict(job)
    return {"predictions": _genopt_jsonable(predictions), **info}


def _genopt_estimator_flavor(model):
    try:
        import xgboost

        if isinstance(model, (xgboost.XGBModel, xgboost.Booster)):
            return "xgboost"
    except ImportError:
        pass
    try:
        from sklearn.base import BaseEstimator

        if isinstance(model, BaseEstimator):
            return "sklearn"
    except ImportError:
        pass
    return None


def _genopt_requirements():
    import sys
    from importlib import metadata

    names = ["mlflow", "numpy", "pandas", "scikit-learn", "cloudpickle"]
    if "xgboost" in sys.modules:
        names.append("xgboost")
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def _genopt_same(a, b):
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        try:
            return bool(np.allclose(a.astype(float), b.astype(float), rtol=1e-6, atol=1e-9, equal_nan=True))
        except (TypeError, ValueError):
            return False
    return bool((a == b).all())


def _genopt_save_models(model, X, predictions, job, X_train):
    """Save the fitted pipeline as an MLflow model under ``<out_dir>/model`` (see task.py)."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    out_dir = job["out_dir"]
    os.makedirs(out_dir, exist_ok=True)
    predictions = np.asarray(predictions)
    if predictions.ndim == 2 and predictions.shape[1] == 1:
        predictions = predictions[:, 0]
    example = X.head(5)
    # the schema from training and submission rows together: columns that have missing values in
    # either are optional
    signature = infer_signature(pd.concat([X_train, X], ignore_index=True), predictions)
    requirements = _genopt_requirements()
    flavor = _genopt_estimator_flavor(model)
    notes = []
    faithful = flavor is not None
    if flavor is not None and job["use_predict"]:
        try:
            faithful = _genopt_same(model.predict(X.copy()), predictions)
        except Exception as exc:  # noqa: BLE001 - the generated predict() is what counts
            faithful = False
            notes.append(f"model.predict(X) fails on raw rows ({type(exc).__name__}); the artifact's predict() is needed")
        if not faithful and not notes:
            notes.append("the artifact's predict(model, X) differs from model.predict(X)")
    path = os.path.join(out_dir, "model")
    common = {"signature": signature, "input_example": example, "pip_requirements": requirements}
    if faithful and flavor == "xgboost":
        import mlflow.xgboost

        mlflow.xgboost.save_model(model, path, **common)
        saved = "xgboost"
    elif faithful:
        import mlflow.sklearn

        # cloudpickle, not skops: the pipeline may hold generated functions (FunctionTransformer)
        mlflow.sklearn.save_model(model, path, serialization_format="cloudpickle", **common)
        saved = "sklearn"
    else:
        generated_predict = predict if job["use_predict"] else None  # noqa: F821 - generated code

        class GeneratedPipelineModel(mlflow.pyfunc.PythonModel):
            """Raw feature rows -> predictions, through the artifact's own predict()."""

            def __init__(self, fitted, predict_function):
                self.fitted = fitted
                self.predict_function = predict_function

            def predict(self, context, model_input, params=None):
                if self.predict_function is not None:
                    return self.predict_function(self.fitted, model_input)
                return self.fitted.predict(model_input)

        with open("genopt_pipeline.py", "w", encoding="utf-8") as handle:
            handle.write(job["source"])
        mlflow.pyfunc.save_model(path, python_model=GeneratedPipelineModel(model, generated_predict),
                                 code_paths=["genopt_pipeline.py"], **common)
        saved = "python_function"
        if flavor is not None:
            estimator_path = os.path.join(out_dir, "model_estimator")
            try:
                if flavor == "xgboost":
                    import mlflow.xgboost

                    mlflow.xgboost.save_model(model, estimator_path, pip_requirements=requirements)
                else:
                    import mlflow.sklearn

                    mlflow.sklearn.save_model(model, estimator_path, serialization_format="cloudpickle",
                                              pip_requirements=requirements)
                notes.append("model_estimator/ holds the bare estimator (its own flavor, no signature): "
                             "its input is what the artifact's predict() passes to it, not raw rows")
            except Exception as exc:  # noqa: BLE001
                notes.append(f"the bare estimator could not be saved: {type(exc).__name__}: {exc}"[:300])
    reloaded = mlflow.pyfunc.load_model(path).predict(example.copy())
    if not _genopt_same(reloaded, predictions[: len(example)]):
        notes.append("the reloaded model's predictions on the input example differ from the pipeline's")
    return {"flavor": saved, "notes": notes}


def _genopt_export(job):
    """Fit, predict the submission rows, save the MLflow model; JSON summary back."""
    model, to_predict, predictions, info, X_train = _genopt_fit_predict(job)
    values = _genopt_jsonable(predictions)
    try:
        saved = _genopt_save_models(model, to_predict, predictions, job, X_train)
    except Exception as exc:  # noqa: BLE001 - predictions are still worth a submission
        import traceback

        saved = {"flavor": None, "notes": [], "save_error": f"{type(exc).__name__}: {exc}"[:500],
                 "save_traceback": "".join(traceback.format_exc().splitlines(True)[-12:])}
    return {"predictions": values, **info, **saved}
