"""Starting artifacts of the ML-pipeline case study: one function, or five.

``one_function``: a single trainable ``train_model(dataset) -> model`` that builds, fits and
returns the whole pipeline; predictions are ``model.predict(X)``.

``many_function``: ``preprocess``, ``select_features``, ``create_ensemble_model``,
``train_model`` and ``predict``; predictions are ``predict(model, X)``. Their docstrings,
joined with newlines, are exactly the docstring of the single function, and the two starting
versions build the same pipeline (impute, one-hot encode, random forest), so they start from the
same score: only the structure the optimizer edits differs, as in the reference study. Freezing
some of the five (e.g. ``--trainable select_features,create_ensemble_model,train_model,predict``
keeps ``preprocess`` fixed) is the loop config's ``trainable``.
"""

from __future__ import annotations

import textwrap

from mlflow_genopt.artifact import ArtifactSpec, Parameter

STAGE_DOCSTRINGS: dict[str, str] = {
    "preprocess": (
        "Preprocessing: turn the raw feature columns into numbers the model can use (impute\n"
        "missing values, encode categorical columns, engineer features); it is learned on the\n"
        "training rows only and applied unchanged to the rows to predict."
    ),
    "select_features": (
        "Feature selection: choose the raw columns the pipeline uses; identifiers and free-text\n"
        "columns with many distinct values are left out."
    ),
    "create_ensemble_model": (
        "Model: a scikit-learn compatible classifier or regressor, as dataset.problem_type says;\n"
        "it may be an ensemble of several models."
    ),
    "train_model": (
        "Training: fit the whole pipeline on dataset.X (a pandas DataFrame of raw features) and\n"
        "dataset.y (the target Series) and return the fitted model."
    ),
    "predict": (
        "Prediction: the fitted model maps raw feature rows (the columns of dataset.X) to one\n"
        "prediction per row: a class label for classification, a number for regression."
    ),
}
STAGES = tuple(STAGE_DOCSTRINGS)
ONE_FUNCTION_DOCSTRING = "\n".join(STAGE_DOCSTRINGS[name] for name in STAGES)


def _docstring(text: str) -> str:
    return textwrap.indent(f'"""{text}"""', "    ")


_DATASET = (
    "`dataset` has X (pandas DataFrame of the raw feature columns as read from the CSV, "
    "identifier column included), y (target Series), problem_type ('classification' or "
    "'regression'), target, id_column and metric."
)
_IMPORTS = "Import what you use inside the function: pandas, numpy, scikit-learn and xgboost are installed."

ONE_FUNCTION_SPEC = ArtifactSpec((
    Parameter(
        "train_model", "code",
        "train_model(dataset) -> model: the whole ML pipeline in one function. " + _DATASET
        + " Return a fitted model whose .predict(X) takes raw feature rows with the columns of "
        "dataset.X and returns one prediction per row (class labels as in dataset.y, or "
        "numbers). " + _IMPORTS,
    ),
))

MANY_FUNCTION_SPEC = ArtifactSpec((
    Parameter(
        "preprocess", "code",
        "preprocess(dataset, columns) -> transformer: an unfitted scikit-learn transformer (e.g. "
        "a ColumnTransformer) that maps the raw `columns` of dataset.X to a numeric matrix. "
        "train_model fits it on training rows; the fitted transformer is then applied to the "
        "rows to predict. " + _IMPORTS,
    ),
    Parameter(
        "select_features", "code",
        "select_features(dataset) -> list of the column names of dataset.X that the pipeline "
        "uses. " + _DATASET,
    ),
    Parameter(
        "create_ensemble_model", "code",
        "create_ensemble_model(dataset) -> an unfitted scikit-learn compatible estimator, a "
        "classifier or a regressor according to dataset.problem_type; may be an ensemble "
        "(VotingClassifier, StackingRegressor, ...) or an xgboost model. " + _IMPORTS,
    ),
    Parameter(
        "train_model", "code",
        "train_model(dataset) -> model: combines select_features, preprocess and "
        "create_ensemble_model, fits them on dataset.X and dataset.y, and returns the fitted "
        "model that predict receives. " + _DATASET,
    ),
    Parameter(
        "predict", "code",
        "predict(model, X) -> predictions: one prediction per row of X (raw feature rows with "
        "the columns of dataset.X, not seen in training), in order: class labels as in "
        "dataset.y for classification, numbers for regression.",
    ),
))

_NUMERIC = "pd.api.types.is_numeric_dtype(X[c]) and not pd.api.types.is_bool_dtype(X[c])"

ONE_FUNCTION_VALUES = {
    "train_model": f'''def train_model(dataset):
{_docstring(ONE_FUNCTION_DOCSTRING)}
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import FunctionTransformer, OneHotEncoder

    X = dataset.X
    usable = [c for c in X.columns if c != dataset.id_column and X[c].notna().any()]
    numeric = [c for c in usable if {_NUMERIC}]
    categorical = [c for c in usable if c not in numeric and X[c].nunique() <= 50]
    as_text = FunctionTransformer(pd.DataFrame.astype, kw_args={{"dtype": str}})
    preprocess = ColumnTransformer([
        ("numeric", SimpleImputer(strategy="median"), numeric),
        ("categorical", make_pipeline(as_text, SimpleImputer(strategy="most_frequent"),
                                      OneHotEncoder(handle_unknown="ignore")), categorical),
    ])
    if dataset.problem_type == "classification":
        model = RandomForestClassifier(n_estimators=100, min_samples_leaf=2, random_state=0)
    else:
        model = RandomForestRegressor(n_estimators=100, min_samples_leaf=2, random_state=0)
    pipeline = Pipeline([("preprocess", preprocess), ("model", model)])
    return pipeline.fit(X, dataset.y)
''',
}

MANY_FUNCTION_VALUES = {
    "preprocess": f'''def preprocess(dataset, columns):
{_docstring(STAGE_DOCSTRINGS["preprocess"])}
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, OneHotEncoder

    X = dataset.X
    numeric = [c for c in columns if {_NUMERIC}]
    categorical = [c for c in columns if c not in numeric]
    as_text = FunctionTransformer(pd.DataFrame.astype, kw_args={{"dtype": str}})
    return ColumnTransformer([
        ("numeric", SimpleImputer(strategy="median"), numeric),
        ("categorical", make_pipeline(as_text, SimpleImputer(strategy="most_frequent"),
                                      OneHotEncoder(handle_unknown="ignore")), categorical),
    ])
''',
    "select_features": f'''def select_features(dataset):
{_docstring(STAGE_DOCSTRINGS["select_features"])}
    import pandas as pd

    X = dataset.X
    return [c for c in X.columns if c != dataset.id_column and X[c].notna().any()
            and (({_NUMERIC}) or X[c].nunique() <= 50)]
''',
    "create_ensemble_model": f'''def create_ensemble_model(dataset):
{_docstring(STAGE_DOCSTRINGS["create_ensemble_model"])}
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    if dataset.problem_type == "classification":
        return RandomForestClassifier(n_estimators=100, min_samples_leaf=2, random_state=0)
    return RandomForestRegressor(n_estimators=100, min_samples_leaf=2, random_state=0)
''',
    "train_model": f'''def train_model(dataset):
{_docstring(STAGE_DOCSTRINGS["train_model"])}
    from sklearn.pipeline import Pipeline

    columns = select_features(dataset)
    pipeline = Pipeline([("preprocess", preprocess(dataset, columns)),
                         ("model", create_ensemble_model(dataset))])
    return pipeline.fit(dataset.X, dataset.y)
''',
    "predict": f'''def predict(model, X):
{_docstring(STAGE_DOCSTRINGS["predict"])}
    return model.predict(X)
''',
}
