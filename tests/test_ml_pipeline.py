"""The ML-pipeline case study: data layouts, splits, scoring, feedback, containment of generated
training code, and scripted loops that end in a Kaggle submission and a saved MLflow model.

Generated code runs only in the sandbox; the tests load the exported MLflow model with
``mlflow.pyfunc.load_model`` in the test process, which unpickles objects that (scripted)
generated code produced. That is acceptable here because the test wrote that code itself; a user
should load such a model only where they would run the generated code.
"""

from __future__ import annotations

import ast
import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from genopt_projects.ml_pipeline import PROJECT, STARTING_ARTIFACTS
from genopt_projects.ml_pipeline.artifacts import ONE_FUNCTION_DOCSTRING, STAGES
from genopt_projects.ml_pipeline.metrics import canonical_label, score_predictions
from genopt_projects.ml_pipeline.task import describe_columns
from mlflow_genopt import ArtifactVersion, ConfigError
from mlflow_genopt.llm.scripted import ScriptedLLM
from mlflow_genopt.optimizer import validate_value
from mlflow_genopt.build import run_loop

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MLAGENTBENCH = SHARED_DATA / "mlagentbench"
DATA_DIRS = {"spaceship-titanic": MLAGENTBENCH / "spaceship-titanic",
             "house-prices": MLAGENTBENCH / "house-price"}
needs_data = pytest.mark.skipif(not MLAGENTBENCH.is_dir(), reason=f"no reference data at {MLAGENTBENCH}")


def _answer(reasoning: str, **values: str) -> str:
    return json.dumps({"reasoning": reasoning, **values})


def _fast(**options):
    """Task options that keep a test's sandbox runs short."""
    return {"n_folds": 3, "timeout_s": 60, **options}


# --- starting artifacts -----------------------------------------------------------------------
def test_starting_artifacts_split_one_docstring_into_five_functions():
    one = STARTING_ARTIFACTS["one_function"]
    many = STARTING_ARTIFACTS["many_function"]
    assert one.spec.names == ("train_model",)
    assert many.spec.names == STAGES == ("preprocess", "select_features", "create_ensemble_model",
                                         "train_model", "predict")

    def docstring(source: str) -> str:
        (function,) = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)]
        return ast.get_docstring(function)

    parts = [docstring(many.values[name]) for name in STAGES]
    assert "\n".join(parts) == docstring(one.values["train_model"]) == ONE_FUNCTION_DOCSTRING
    for starting in (one, many):  # the optimizer would accept them as they are
        for parameter in starting.spec.parameters:
            assert validate_value(parameter, starting.values[parameter.name])
    assert PROJECT.needs_task_llm is False and PROJECT.multi_step is False
    assert PROJECT.defaults["steps"] == 20 and PROJECT.config().init == "one_function"


def test_labels_are_compared_in_canonical_form_and_bad_predictions_are_named():
    assert canonical_label(True) == canonical_label("true") == canonical_label(np.True_) == "True"
    assert canonical_label(1.0) == canonical_label("1") == canonical_label(np.int64(1)) == "1"
    scored = score_predictions([1, 0, "True", "cat"], [True, False, True, False], "classification",
                               ["accuracy", "f1"])
    assert scored.metrics["accuracy"] == 0.75 and "not labels of the target" in scored.problems[0]
    assert score_predictions([1.0], [1.0, 2.0], "regression", ["rmse"]).error == "got 1 predictions for 2 rows"
    assert "NaN" in score_predictions([float("nan")], [1.0], "regression", ["rmse"]).error
    exact = score_predictions([100.0, 200.0], [100.0, 200.0], "regression", ["rmse_log", "mae"])
    assert exact.metrics == {"rmse_log": 0.0, "mae": 0.0}


# --- data and splits ---------------------------------------------------------------------------
@needs_data
def test_mlagentbench_layout_keeps_answers_in_the_loop_process():
    config = PROJECT.config(task="spaceship-titanic", init="many_function",
                            task_options={"data_dir": str(DATA_DIRS["spaceship-titanic"])})
    task = PROJECT.build_task(config)
    sizes = {split: len(task.examples(split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 5, "val": 1, "test": 1}
    assert len(task.labeled) == 6954 and task.test_description == "MLAgentBench answers"
    assert task.examples("test")[0].input["scored_rows"] == 1739
    folds = [set(task._scopes[e.id].score_rows) for e in task.examples("train")]
    assert sum(map(len, folds)) == len(set().union(*folds))  # disjoint folds
    val_rows = set(task._scopes["val"].score_rows)
    assert not val_rows & set().union(*folds)
    files, _ = task._group_files(task._scopes["val"])
    predict_columns = files["predict.csv"].splitlines()[0].split(",")
    assert "Transported" not in predict_columns and "PassengerId" in predict_columns
    assert "lower is better" not in task.objective and "score = accuracy" in task.objective
    # the optimizer sees every feature column of the training rows, never the target
    columns = task.objective.split("Columns of dataset.X (5563 training rows):\n")[1].splitlines()
    assert len(columns) == 13 and "Transported" not in task.objective.split("Columns of")[1]
    assert "- HomePlanet (text: Earth, Europa, Mars, 2% missing)" in columns
    assert any(c.startswith("- Cabin (text, ") and "distinct values, e.g. " in c for c in columns)
    assert any(c.startswith("- Age (number, 0 to 79") for c in columns)
    assert any(c.startswith("- PassengerId (identifier, e.g. ") for c in columns)
    assert "- CryoSleep (true/false, 3% missing)" in columns
    assert describe_columns(pd.DataFrame({"flag": [0, 1, 1, 0]})).endswith("- flag (number, 0 to 1)")
    # the split ignores the loop seed, and follows split_seed
    again = PROJECT.build_task(config.replace(seed=7))
    assert (again._scopes["val"].score_rows == task._scopes["val"].score_rows).all()


def _write_kaggle_copy(directory: Path, rows: int = 300) -> None:
    directory.mkdir(parents=True)
    source = SHARED_DATA / "spaceship-titanic"
    pd.read_csv(source / "train.csv").head(rows).to_csv(directory / "train.csv", index=False)
    pd.read_csv(source / "test.csv").head(40).to_csv(directory / "test.csv", index=False)


@pytest.mark.skipif(not (SHARED_DATA / "spaceship-titanic").is_dir(), reason="no Kaggle data copy")
def test_kaggle_layout_downloads_with_the_kaggle_cli_and_holds_out_a_test_split(tmp_path, monkeypatch):
    """The real download path (subprocess + unzip), with a stand-in `kaggle` command."""
    files = tmp_path / "files"
    _write_kaggle_copy(files)
    archive = tmp_path / "spaceship-titanic.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for name in ("train.csv", "test.csv"):
            handle.write(files / name, name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    fake = bin_dir / "kaggle"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        'while [ "$#" -gt 0 ]; do [ "$1" = "-p" ] && dest="$2"; shift; done\n'
        f'cp {archive} "$dest/"\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("GENOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "not-a-real-key")

    config = PROJECT.config(task="spaceship-titanic", task_options={"holdout_fraction": 0.2})
    task = PROJECT.build_task(config)
    cached = tmp_path / "cache" / "kaggle" / "spaceship-titanic"
    assert calls.read_text().split() == ["competitions", "download", "-c", "spaceship-titanic",
                                         "-p", str(cached.with_name("spaceship-titanic.partial"))]
    assert sorted(p.name for p in cached.iterdir()) == ["test.csv", "train.csv"]
    assert task.layout == "kaggle" and task.test_description == "internal holdout (60 rows)"
    test_scope = task._scopes["test"]
    assert len(test_scope.score_rows) == 60 and not set(test_scope.score_rows) & set(test_scope.fit_rows)
    PROJECT.build_task(config, None)  # the second time comes from the cache
    assert len(calls.read_text().splitlines()) == 1
    empty = PROJECT.build_task(config.replace(task_options={"holdout_fraction": 0}))
    assert empty.examples("test") == [] and empty.test_description == "none"


def test_missing_data_is_a_one_line_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GENOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no kaggle command
    for task, options, message in [
        ("spaceship-titanic", {}, "task spaceship-titanic: no data; pass --data-dir DIR"),
        ("house-prices", {"data_dir": str(tmp_path / "nowhere")}, "data_dir: .*nowhere does not exist"),
        ("house-prices", {"data_dir": str(tmp_path)}, "data_dir: .* holds neither train.csv"),
        ("csv", {"data_dir": str(tmp_path)}, "task_options.target: the csv task needs"),
        ("titanic", {}, "task: unknown ml_pipeline task 'titanic'; choose one of"),
        ("diabetes", {"metric": "accuracy"}, "accuracy is a classification metric"),
        ("diabetes", {"folds": 3}, "task_options.folds: unknown option"),
    ]:
        with pytest.raises(ConfigError, match=message) as caught:
            PROJECT.build_task(PROJECT.config(task=task, task_options=options))
        assert "\n" not in str(caught.value)
    assert "kaggle competitions download -c spaceship-titanic" in _error("spaceship-titanic")


def _error(task: str) -> str:
    try:
        PROJECT.build_task(PROJECT.config(task=task))
    except ConfigError as exc:
        return str(exc)
    raise AssertionError("no error")


def test_staged_and_improvement_feedback_are_configurable():
    task = PROJECT.build_task(PROJECT.config(task="diabetes"))
    assert task.metric.name == "rmse" and task.thresholds == (62.0, 56.0)
    assert [task.stage(v) for v in (70.0, 60.0, 50.0)] == [0, 1, 2]  # lower error, higher level
    assert task.floor < -100 and "lower is better; score = -rmse" in task.objective
    custom = PROJECT.build_task(PROJECT.config(task="breast-cancer", task_options={
        "stage_thresholds": "0.5, 0.99", "staged_feedback": False, "improvement_feedback": "false"}))
    assert custom.thresholds == (0.5, 0.99) and not custom.staged_feedback
    assert custom.feedback_notes == () and PROJECT.build_task(PROJECT.config(task="wine")).feedback_notes == ("improvement",)
    with pytest.raises(ConfigError, match="stage_thresholds: expected 2 values"):
        PROJECT.build_task(PROJECT.config(task="wine", task_options={"stage_thresholds": "0.9"}))


# --- loops ------------------------------------------------------------------------------------
LOG_TARGET_TRAIN = '''def train_model(dataset):
    """Training: fit on log1p(SalePrice)."""
    import numpy as np
    from sklearn.pipeline import Pipeline

    columns = select_features(dataset)
    pipeline = Pipeline([("preprocess", preprocess(dataset, columns)),
                         ("model", create_ensemble_model(dataset))])
    return pipeline.fit(dataset.X, np.log1p(dataset.y))
'''
LOG_TARGET_PREDICT = '''def predict(model, X):
    """Prediction: invert the log transform."""
    import numpy as np

    return np.expm1(model.predict(X))
'''
GRADIENT_BOOSTING_ONE = STARTING_ARTIFACTS["one_function"].values["train_model"].replace(
    "import RandomForestClassifier,", "import GradientBoostingClassifier, RandomForestClassifier,").replace(
    "RandomForestClassifier(n_estimators=100, min_samples_leaf=2, random_state=0)",
    "GradientBoostingClassifier(random_state=0)")
RAISING = 'def train_model(dataset):\n    raise ValueError("no model today: " + str(len(dataset.X)))\n'


@needs_data
@pytest.mark.parametrize("task_name,init", [("spaceship-titanic", "one_function"),
                                            ("house-prices", "many_function")])
def test_scripted_loop_on_mlagentbench_data_writes_submission_and_model(tmp_path, task_name, init):
    import mlflow.pyfunc
    from mlflow import MlflowClient

    if init == "one_function":
        improved = {"train_model": GRADIENT_BOOSTING_ONE}
        frozen = None
    else:  # preprocess stays frozen: the loop config's `trainable`
        improved = {"train_model": LOG_TARGET_TRAIN, "predict": LOG_TARGET_PREDICT,
                    "preprocess": "def preprocess(dataset, columns):\n    return None\n"}
        frozen = ("select_features", "create_ensemble_model", "train_model", "predict")
    optimizer = ScriptedLLM([_answer("a better model", **improved),
                             _answer("break it", train_model=RAISING)])
    rows = 600 if task_name == "spaceship-titanic" else 400
    # precheck off: the raising version is scored (its error reaches the feedback and MLflow)
    config = PROJECT.config(task=task_name, init=init, steps=2, batch_size=1, acceptance="always",
                            trainable=frozen, precheck=False,
                            task_options=_fast(data_dir=str(DATA_DIRS[task_name]), max_train_rows=rows))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_loop(config, tracking=uri, experiment="ml", cache_dir=None, optimizer_llm=optimizer,
                      export_dir=tmp_path / "export")

    first, second = result.steps
    assert first.valid and second.valid
    assert second.candidate_trials[0].error and "no model today" in second.candidate_trials[0].feedback
    adopted = {v.version.version_id: v.val_score for v in result.versions if v.val_score is not None}
    assert result.best_val_score == max(adopted.values())
    assert result.selected.version_id == max(adopted, key=lambda k: (adopted[k], -int(k[1])))
    if frozen:
        assert "# Frozen parameters" in first.context[1]["content"]
        assert all(v.version.values["preprocess"] == STARTING_ARTIFACTS[init].values["preprocess"]
                   for v in result.versions)
    test_trial = result.test_trials[0]
    assert result.test_score == test_trial.score and test_trial.error is None
    if task_name == "spaceship-titanic":
        assert 0.65 < test_trial.output["metrics"]["accuracy"] <= 1
    else:
        assert 0 < test_trial.output["metrics"]["rmse_log"] < 0.35 and result.test_score < 0

    export = Path(result.export_dir)
    info = json.loads((export / "export_info.json").read_text())
    assert info["version_id"] == result.selected.version_id and "error" not in info
    custom_predict = result.selected.values.get("predict", "").find("expm1") >= 0
    assert info["flavor"] == ("python_function" if custom_predict else "sklearn")
    assert (export / "model" / "MLmodel").is_file() and (export / "pipeline.py").is_file()
    assert (export / "model_estimator" / "MLmodel").is_file() == custom_predict

    target = "Transported" if task_name == "spaceship-titanic" else "SalePrice"
    id_column = "PassengerId" if task_name == "spaceship-titanic" else "Id"
    test_rows = pd.read_csv(DATA_DIRS[task_name] / "env" / "test.csv")
    submission = pd.read_csv(export / "submission.csv")
    assert list(submission.columns) == [id_column, target]
    assert submission[id_column].tolist() == test_rows[id_column].tolist()
    model = mlflow.pyfunc.load_model(str(export / "model"))  # see the module docstring
    assert model.metadata.signature is not None
    predicted = np.asarray(model.predict(test_rows)).ravel()
    if task_name == "spaceship-titanic":
        assert submission[target].dtype == bool
        assert [canonical_label(p) for p in predicted] == [canonical_label(v) for v in submission[target]]
    else:
        assert np.allclose(predicted, submission[target], rtol=1e-6)

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ml").experiment_id])
    assert run.data.params["init"] == init and run.data.params["task"] == task_name
    history = client.get_metric_history(run.info.run_id, "test_score")
    assert [m.value for m in history] == [pytest.approx(result.test_score)]
    metric = "accuracy" if task_name == "spaceship-titanic" else "rmse_log"
    logged = [m.value for m in client.get_metric_history(run.info.run_id, f"val_{metric}")]
    assert pytest.approx(abs(result.versions[0].val_score)) in logged  # the starting version's


@needs_data
def test_export_wraps_a_custom_predict_in_a_python_function_model(tmp_path):
    import mlflow.pyfunc

    task = PROJECT.build_task(PROJECT.config(task="house-prices", init="many_function", task_options=_fast(
        data_dir=str(DATA_DIRS["house-prices"]), max_train_rows=300)), None)
    values = {**STARTING_ARTIFACTS["many_function"].values, "train_model": LOG_TARGET_TRAIN,
              "predict": LOG_TARGET_PREDICT}
    task.export(ArtifactVersion(values, 1), tmp_path / "good")
    info = json.loads((tmp_path / "good" / "export_info.json").read_text())
    assert info["flavor"] == "python_function" and "differs from model.predict" in info["notes"][0]
    assert (tmp_path / "good" / "model" / "code" / "genopt_pipeline.py").is_file()
    test_rows = pd.read_csv(DATA_DIRS["house-prices"] / "env" / "test.csv")
    submission = pd.read_csv(tmp_path / "good" / "submission.csv")
    model = mlflow.pyfunc.load_model(str(tmp_path / "good" / "model"))  # see the module docstring
    predicted = np.asarray(model.predict(test_rows)).ravel()
    assert np.allclose(predicted, submission["SalePrice"]) and predicted.min() > 1000  # dollars
    estimator = mlflow.pyfunc.load_model(str(tmp_path / "good" / "model_estimator"))
    assert np.allclose(np.expm1(estimator.predict(test_rows)), predicted)  # its own flavor, log scale

    task.export(ArtifactVersion({"train_model": RAISING}, 2), tmp_path / "bad")
    assert "no model today" in (tmp_path / "bad" / "export_error.txt").read_text()
    assert not (tmp_path / "bad" / "submission.csv").exists()
    assert json.loads((tmp_path / "bad" / "export_info.json").read_text())["error"].startswith("ValueError")


XGBOOST_ONE = '''def train_model(dataset):
    """Training: xgboost on every raw column (all numeric here)."""
    from xgboost import XGBClassifier

    model = XGBClassifier(n_estimators=60, max_depth=3, learning_rate=0.2, random_state=0)
    return model.fit(dataset.X, dataset.y)
'''
SCALED_LOGISTIC_ONE = '''def train_model(dataset):
    """Training: scaled logistic regression on every column but the identifier."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    columns = [c for c in dataset.X.columns if c != dataset.id_column]
    model = make_pipeline(ColumnTransformer([("features", StandardScaler(), columns)]),
                          LogisticRegression(max_iter=2000))
    return model.fit(dataset.X, dataset.y)
'''


def test_offline_builtin_task_runs_the_whole_loop(tmp_path):
    """breast-cancer ships with scikit-learn: the whole loop runs with no file and no network."""
    import mlflow.pyfunc

    config = PROJECT.config(task="breast-cancer", steps=1, acceptance="always", task_options=_fast())
    result = run_loop(config, tracking=None, cache_dir=None,
                      optimizer_llm=ScriptedLLM([_answer("linear", train_model=SCALED_LOGISTIC_ONE)]), export_dir=tmp_path / "export")
    assert [v.status for v in result.versions] == ["initial", "accepted"]
    assert all(v.val_score > 0.88 for v in result.versions) and result.test_score > 0.88
    trial = result.steps[0].trials[0]
    assert set(trial.output["metrics"]) == {"accuracy", "f1"} and "fit_s" in trial.usage
    assert trial.feedback.startswith(f"cross-validation fold {trial.example_id[-1]} of 3: accuracy ")
    export = Path(result.export_dir)
    info = json.loads((export / "export_info.json").read_text())
    assert info["flavor"] == "sklearn" and info["submission_rows"] == "internal holdout rows"
    submission = pd.read_csv(export / "submission.csv")
    assert list(submission.columns) == ["id", "target"] and len(submission) == 114
    task = PROJECT.build_task(config)
    rows = task._features(np.sort(task.holdout))
    assert submission["id"].tolist() == rows["id"].tolist()
    model = mlflow.pyfunc.load_model(str(export / "model"))  # see the module docstring
    assert np.asarray(model.predict(rows)).ravel().tolist() == submission["target"].tolist()


def test_an_xgboost_model_is_saved_with_its_own_flavor(tmp_path):
    pytest.importorskip("xgboost")
    import mlflow.pyfunc

    task = PROJECT.build_task(PROJECT.config(task="breast-cancer", task_options=_fast()))
    task.export(ArtifactVersion({"train_model": XGBOOST_ONE}, 1), tmp_path)
    info = json.loads((tmp_path / "export_info.json").read_text())
    assert info["flavor"] == "xgboost" and "xgboost" in (tmp_path / "model" / "MLmodel").read_text()
    rows = task._features(np.sort(task.holdout))
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))  # see the module docstring
    predicted = np.asarray(model.predict(rows)).ravel().tolist()
    assert predicted == pd.read_csv(tmp_path / "submission.csv")["target"].tolist()


def test_any_csv_with_a_target_and_a_metric_is_a_task(tmp_path):
    rng = np.random.default_rng(0)
    n = 240
    frame = pd.DataFrame({
        "row": [f"r{i}" for i in range(n)],
        "size": rng.uniform(20, 200, n),
        "rooms": rng.integers(1, 6, n),
        "city": rng.choice(["north", "south", None], n),
    })
    frame["price"] = 1000 * frame["size"] + 5000 * frame["rooms"] + np.where(frame["city"] == "north", 30000, 0)
    path = tmp_path / "homes.csv"
    frame.to_csv(path, index=False)
    config = PROJECT.config(task="csv", init="many_function", steps=1, repair_attempts=0,
                            task_options=_fast(data_dir=str(path), target="price", metric="mae",
                                               id_column="row"))  # one unusable answer, no repair
    result = run_loop(config, tracking=None, cache_dir=None,
                      optimizer_llm=ScriptedLLM(["not json"]), export_dir=tmp_path / "export")
    spread = float(frame["price"].std())
    assert -spread < result.best_val_score < 0 and -spread < result.test_score < 0
    assert result.steps[0].trials[0].output["metrics"].keys() == {"mae", "rmse", "r2"}
    assert "lower is better; score = -mae" in result.steps[0].context[1]["content"]
    submission = pd.read_csv(Path(result.export_dir) / "submission.csv")
    assert list(submission.columns) == ["row", "price"] and len(submission) == 48
    assert set(submission["row"]) <= set(frame["row"])


# --- containment -------------------------------------------------------------------------------
LEAKY_MODEL = '''def train_model(dataset):
    class Leaky:
        def predict(self, X):
            import os
            if len(X) <= 5 and os.path.isdir("export/model"):  # the reload check after saving
                os.symlink("SECRET_PATH", "export/model/leak.txt")
                os.makedirs("export/model/sub")
                os.symlink("SECRET_DIR", "export/model/sub/linked_dir")
            return [dataset.y.iloc[0]] * len(X)

    return Leaky()
'''


def test_export_never_follows_links_the_generated_code_planted(tmp_path):
    secret = tmp_path / "secret" / "key.txt"
    secret.parent.mkdir()
    secret.write_text("top-secret")
    secret.chmod(0o600)
    source = LEAKY_MODEL.replace("SECRET_PATH", str(secret)).replace("SECRET_DIR", str(secret.parent))
    task = PROJECT.build_task(PROJECT.config(task="breast-cancer", task_options=_fast()))
    task.export(ArtifactVersion({"train_model": source}, 1), tmp_path / "export")
    info = json.loads((tmp_path / "export" / "export_info.json").read_text())
    assert info["flavor"] == "python_function"
    assert sorted(info["skipped_files"]) == ["export/model/leak.txt", "export/model/sub/linked_dir"]
    copied = [p for p in (tmp_path / "export").rglob("*")]
    assert not any(p.is_symlink() or p.name in ("leak.txt", "linked_dir") for p in copied)
    assert all("top-secret" not in p.read_text(errors="ignore") for p in copied if p.is_file())
    assert (tmp_path / "export" / "model" / "MLmodel").is_file()

LOOPS_FOREVER = "def train_model(dataset):\n    while True:\n        pass\n"
ALLOCATES_50_GB = ("def train_model(dataset):\n    import numpy as np\n"
                   "    return np.ones(50 * 2**30 // 8)\n")
SNOOPS = '''def train_model(dataset):
    import os
    files = sorted(os.listdir("."))
    header = open("predict.csv").readline().strip().split(",") if "predict.csv" in files else []
    raise RuntimeError(f"key={os.environ.get('OPENAI_API_KEY')} files={files} "
                       f"target_in_predict={dataset.target in header} "
                       f"id_in_predict={dataset.id_column in header}")
'''


@needs_data
def test_misbehaving_training_code_is_contained_and_the_loop_finishes(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-loop-secret-123")
    optimizer = ScriptedLLM([_answer("spin", train_model=LOOPS_FOREVER),
                             _answer("hog", train_model=ALLOCATES_50_GB),
                             _answer("snoop", train_model=SNOOPS),
                             _answer("raise", train_model=RAISING)])
    # precheck off: the scored path itself must contain them (the quick run is tested below)
    config = PROJECT.config(task="spaceship-titanic", steps=4, batch_size=1, precheck=False, task_options=_fast(
        data_dir=str(DATA_DIRS["spaceship-titanic"]), max_train_rows=300, timeout_s=60,
        timeout_factor=3, timeout_floor_s=8, memory_mb=2048))  # the limit follows the machine's speed
    result = run_loop(config, tracking=None, cache_dir=None, optimizer_llm=optimizer, export_dir=tmp_path / "export")

    assert result.stop_reason == "completed" and result.selected.step == 0
    assert [s.accepted for s in result.steps] == [False] * 4
    spin, hog, snoop, raising = (s.candidate_trials[0] for s in result.steps)
    assert spin.error.startswith("time limit exceeded: a trial may take ")
    assert "timeout_factor 3 x the starting version's time per trial" in spin.error
    assert "memory limit 2048 MB exceeded" in hog.error
    assert "key=None" in snoop.error and "sk-loop-secret" not in snoop.feedback
    assert "files=['train.csv']" in snoop.error  # a cross-validation fold needs one file
    assert "no model today" in raising.feedback and "Traceback" in raising.feedback
    assert all(t.score == 0.0 and "No improvement" in t.feedback for t in (spin, hog, snoop, raising))
    # the current version's feedback counts the failed proposals made from it
    assert "proposal(s) made from this version did not improve" in result.steps[-1].trials[0].feedback
    assert result.test_score > 0.6 and (Path(result.export_dir) / "submission.csv").is_file()


MISSING_IMPORT = SCALED_LOGISTIC_ONE.replace("    from sklearn.linear_model import LogisticRegression\n", "")
WRONG_VALUE = SCALED_LOGISTIC_ONE.replace("max_iter=2000", "max_iter='many'")


def test_a_missing_import_is_added_and_a_crash_goes_back_as_a_repair_never_scored(tmp_path):
    task = PROJECT.build_task(PROJECT.config(task="breast-cancer", task_options=_fast()))
    start = ArtifactVersion(dict(STARTING_ARTIFACTS["one_function"].values), 0)
    assert task.precheck(start) is None
    broken = ArtifactVersion({"train_model": MISSING_IMPORT}, 1, parent_id="v0")
    problem = task.precheck(broken)
    assert problem.splitlines()[0] == (
        "NameError: name 'LogisticRegression' is not defined (it is installed: add "
        "`from sklearn.linear_model import LogisticRegression` inside the function that uses it)")
    assert "LogisticRegression(max_iter" in problem  # the offending line, from the traceback
    values, note = task.quick_fix(broken, problem)
    assert note == ("added `from sklearn.linear_model import LogisticRegression` to train_model "
                    "(NameError: LogisticRegression)")
    assert values["train_model"].startswith(
        'def train_model(dataset):\n    """Training: scaled logistic regression on every column but '
        'the identifier."""\n    from sklearn.linear_model import LogisticRegression\n')
    assert task.precheck(ArtifactVersion(values, 1, parent_id="v0")) is None
    assert task.quick_fix(ArtifactVersion({"train_model": WRONG_VALUE}, 1), "TypeError: x") is None

    # step 1: the missing import is added (a repair of the candidate, no optimizer call); step 2:
    # a crash no fix knows goes back to the optimizer with the traceback and the failed code
    optimizer = ScriptedLLM([_answer("drop", train_model=MISSING_IMPORT),
                             _answer("typo", train_model=WRONG_VALUE),
                             _answer("fixed", train_model=SCALED_LOGISTIC_ONE)])
    config = PROJECT.config(task="breast-cancer", steps=2, acceptance="always", edit_format="json",
                            task_options=_fast())
    result = run_loop(config, tracking=None, cache_dir=None, optimizer_llm=optimizer,
                      export_dir=tmp_path / "export")
    [fixed], [crashed] = (step.candidates for step in result.steps)
    assert fixed.first_try_valid and fixed.repairs == (note,)
    assert fixed.proposal["train_model"] == values["train_model"]
    first, repaired = crashed.attempts
    assert first.invalid_reason.startswith("the new version fails a quick run: InvalidParameterError")
    assert "'max_iter' parameter of LogisticRegression" in first.invalid_reason
    assert repaired.invalid_reason is None and crashed.valid and not crashed.first_try_valid
    followup = optimizer.calls[2]["messages"][-1]["content"]
    assert "fails a quick run: InvalidParameterError" in followup
    assert "LogisticRegression(max_iter='many')" in followup  # the offending line
    assert "<train_model>\n" + WRONG_VALUE.rstrip() + "\n</train_model>" in followup
    assert len(optimizer.calls) == 3
    assert result.versions[-1].status == "accepted" and result.versions[-1].val_score > 0.88
    # scored trials: the starting version's and the two valid candidates' only
    assert all(t.error is None for step in result.steps for t in step.candidate_trials)


FOREST_KEYWORDS = SCALED_LOGISTIC_ONE.replace(
    "from sklearn.linear_model import LogisticRegression",
    "from sklearn.ensemble import HistGradientBoostingClassifier").replace(
    "LogisticRegression(max_iter=2000)",
    "HistGradientBoostingClassifier(\n        n_estimators=50, max_iters=30,\n        random_state=0)")


def test_an_estimator_keyword_it_does_not_take_is_renamed_to_the_near_miss_or_removed(tmp_path):
    """Qwen 1.5B gave HistGradientBoostingClassifier the forest's ``n_estimators`` (2 of 3 seeds
    on Spaceship Titanic) and broke the code in each repair: the quick run's TypeError is fixed
    one keyword at a time, each fix checked by a real quick run."""
    task = PROJECT.build_task(PROJECT.config(task="breast-cancer", task_options=_fast()))
    broken = ArtifactVersion({"train_model": FOREST_KEYWORDS}, 1, parent_id="v0")
    problem = task.precheck(broken)
    assert problem.splitlines()[0] == ("TypeError: HistGradientBoostingClassifier.__init__() got an "
                                       "unexpected keyword argument 'n_estimators'")
    values, note = task.quick_fix(broken, problem)
    assert note == ("removed `n_estimators=` in HistGradientBoostingClassifier(...) in train_model "
                    "(HistGradientBoostingClassifier takes no argument n_estimators)")
    assert "HistGradientBoostingClassifier(\n        max_iters=30,\n        random_state=0)" in values["train_model"]
    problem = task.precheck(ArtifactVersion(values, 1, parent_id="v0"))
    assert "unexpected keyword argument 'max_iters'" in problem.splitlines()[0]
    values, note = task.quick_fix(ArtifactVersion(values, 1, parent_id="v0"), problem)
    assert note.startswith("renamed `max_iters=` to `max_iter=` in HistGradientBoostingClassifier(...)")
    assert "HistGradientBoostingClassifier(\n        max_iter=30,\n        random_state=0)" in values["train_model"]
    assert task.precheck(ArtifactVersion(values, 1, parent_id="v0")) is None
    # the loop applies both fixes to one answer, and the candidate is valid on its first try
    optimizer = ScriptedLLM([_answer("boosting", train_model=FOREST_KEYWORDS)])
    config = PROJECT.config(task="breast-cancer", steps=1, acceptance="always", edit_format="json",
                            task_options=_fast())
    result = run_loop(config, tracking=None, cache_dir=None, optimizer_llm=optimizer,
                      export_dir=tmp_path / "export")
    [candidate] = result.steps[0].candidates
    assert candidate.first_try_valid and len(candidate.repairs) == 2
    assert candidate.proposal["train_model"] == values["train_model"] and len(optimizer.calls) == 1
    # a call it cannot find is no fix
    assert task.quick_fix(ArtifactVersion({"train_model": SCALED_LOGISTIC_ONE}, 1), problem) is None


LEGACY_MODULE = SCALED_LOGISTIC_ONE.replace(
    "    from sklearn.linear_model import LogisticRegression\n",
    "    from sklearn.ensemble.gradient_boosting import HistGradientBoostingClassifier as HGB\n").replace(
    "LogisticRegression(max_iter=2000)", "HGB(max_iter=50)")
WRONG_MODULE = SCALED_LOGISTIC_ONE.replace("from sklearn.linear_model import LogisticRegression",
                                           "from sklearn.ensemble import LogisticRegression, StandardScaler as S")


def test_an_import_from_a_module_that_lacks_the_name_is_rewritten_to_the_one_that_has_it():
    """sklearn's private module paths without their private parts (what Qwen 1.5B wrote, and what
    this task's own NameError fix once wrote) do not exist: the statement is rewritten."""
    from genopt_projects.ml_pipeline.task import _sklearn_names

    task = PROJECT.build_task(PROJECT.config(task="breast-cancer", task_options=_fast()))
    for name in ("HistGradientBoostingClassifier", "HistGradientBoostingRegressor", "PoissonRegressor"):
        assert _sklearn_names()[name].split()[1] in ("sklearn.ensemble", "sklearn.linear_model")
    for line in _sklearn_names().values():  # every import this task would add works
        exec(line, {})
    broken = ArtifactVersion({"train_model": LEGACY_MODULE}, 1, parent_id="v0")
    problem = task.precheck(broken)
    assert problem.startswith("ModuleNotFoundError: No module named 'sklearn.ensemble.gradient_boosting'")
    values, note = task.quick_fix(broken, problem)
    assert note == ("rewrote the import from `sklearn.ensemble.gradient_boosting` in train_model "
                    "(ModuleNotFoundError: No module named 'sklearn.ensemble.gradient_boosting')")
    assert "    from sklearn.ensemble import HistGradientBoostingClassifier as HGB\n" in values["train_model"]
    assert task.precheck(ArtifactVersion(values, 1, parent_id="v0")) is None

    wrong = ArtifactVersion({"train_model": WRONG_MODULE}, 1, parent_id="v0")
    problem = task.precheck(wrong)
    assert problem.startswith("ImportError: cannot import name 'LogisticRegression' from 'sklearn.ensemble'")
    values, _ = task.quick_fix(wrong, problem)
    assert ("    from sklearn.linear_model import LogisticRegression\n"
            "    from sklearn.preprocessing import StandardScaler as S\n") in values["train_model"]
    assert task.precheck(ArtifactVersion(values, 1, parent_id="v0")) is None
    # a module this environment does not have, with names it does not know: left to the optimizer
    unknown = ArtifactVersion({"train_model": SCALED_LOGISTIC_ONE.replace(
        "from sklearn.linear_model import LogisticRegression", "from lightgbm import LGBMClassifier")}, 1)
    assert task.quick_fix(unknown, "ModuleNotFoundError: No module named 'lightgbm'") is None


@needs_data
def test_a_text_column_reaching_a_numeric_model_is_named_in_the_quick_run_error():
    task = PROJECT.build_task(PROJECT.config(task="spaceship-titanic", task_options=_fast(
        data_dir=str(DATA_DIRS["spaceship-titanic"]), max_train_rows=300)))
    raw = ArtifactVersion({"train_model": SCALED_LOGISTIC_ONE}, 1, parent_id="v0")
    problem = task.precheck(raw)
    first = problem.splitlines()[0]
    assert first.startswith("ValueError: could not convert string to float: '"), problem
    value = first.split("float: '")[1].split("'")[0]
    column = first.split("is a value of the text column ")[1].split(" of dataset.X")[0]
    assert (task.labeled[column].astype(str) == value).any()
    assert first.endswith("encode text columns as numbers, e.g. with OneHotEncoder(handle_unknown="
                          "'ignore') in a ColumnTransformer, before they reach the model)")
    # a branch of the artifact's own that passes the column on as text is quoted
    many = PROJECT.build_task(PROJECT.config(task="spaceship-titanic", init="many_function", task_options=_fast(
        data_dir=str(DATA_DIRS["spaceship-titanic"]), max_train_rows=300)))
    start = STARTING_ARTIFACTS["many_function"].values
    branch = '        ("text", FunctionTransformer(lambda x: x.astype(str)), ["HomePlanet"]),\n    ])'
    passes = start["preprocess"].replace("\n    ])", "\n" + branch)
    problem = many.precheck(ArtifactVersion({**start, "preprocess": passes}, 1, parent_id="v0"))
    assert ("is a value of the text column HomePlanet of dataset.X; `(\"text\", FunctionTransformer("
            "lambda x: x.astype(str)), [\"HomePlanet\"]),` passes it on as text: encode text columns"
            in problem.splitlines()[0]), problem


def test_a_stage_that_returns_the_wrong_kind_of_thing_is_named_in_the_quick_run_error():
    """A Pipeline takes a ``preprocess`` that returns None for "passthrough": Qwen 1.5B's did, and
    the error it then got from the model sent it to re-encode columns already encoded."""
    task = PROJECT.build_task(PROJECT.config(task="breast-cancer", init="many_function",
                                             task_options=_fast()))
    start = STARTING_ARTIFACTS["many_function"].values
    assert task.precheck(ArtifactVersion(dict(start), 1, parent_id="v0")) is None
    none = start["preprocess"].replace("    return ColumnTransformer(", "    transformer = ColumnTransformer(")
    problem = task.precheck(ArtifactVersion({**start, "preprocess": none}, 1, parent_id="v0"))
    assert problem.splitlines()[0] == (
        "TypeError: preprocess returned None; it must return an unfitted scikit-learn transformer "
        "(with fit and transform), e.g. `return ColumnTransformer([...])`"), problem
    typo = start["select_features"].replace("    return [", "    return ['mean radiuss'] + [")
    problem = task.precheck(ArtifactVersion({**start, "select_features": typo}, 1, parent_id="v0"))
    assert problem.splitlines()[0] == ("TypeError: select_features returned 'mean radiuss', which is "
                                       "not a column of dataset.X; it must return a list of column "
                                       "names of dataset.X"), problem
    model = start["create_ensemble_model"].replace("return RandomForest", "RandomForest")
    problem = task.precheck(ArtifactVersion({**start, "create_ensemble_model": model}, 1, parent_id="v0"))
    assert problem.splitlines()[0].startswith("TypeError: create_ensemble_model returned None; it must "
                                              "return an unfitted scikit-learn compatible estimator"), problem
    # a target encoder among the feature transformers (Qwen 1.5B kept it through a repair)
    label = start["preprocess"].replace(
        '        ("numeric", SimpleImputer(strategy="median"), numeric),\n',
        '        ("numeric", SimpleImputer(strategy="median"), numeric),\n'
        '        ("label", __import__("sklearn.preprocessing").preprocessing.LabelEncoder(), numeric[:1]),\n')
    assert label != start["preprocess"]
    problem = task.precheck(ArtifactVersion({**start, "preprocess": label}, 1, parent_id="v0"))
    assert problem.splitlines()[0] == (
        "TypeError: LabelEncoder.fit_transform() takes 2 positional arguments but 3 were given "
        "(LabelEncoder encodes a target, not feature columns: in a ColumnTransformer use "
        "OneHotEncoder(handle_unknown='ignore') or OrdinalEncoder(handle_unknown="
        "'use_encoded_value', unknown_value=-1))"), problem
    # ... and it is replaced mechanically (the model moved it to another column when told): the
    # fixed version passes the same quick run
    values, note = task.quick_fix(ArtifactVersion({**start, "preprocess": label}, 1, parent_id="v0"),
                                  problem)
    assert note == ('replaced LabelEncoder() by OrdinalEncoder(handle_unknown="use_encoded_value", '
                    'unknown_value=-1) in preprocess (LabelEncoder encodes a target, not feature columns)')
    assert "from sklearn.preprocessing import OrdinalEncoder" in values["preprocess"]
    assert task.precheck(ArtifactVersion(values, 1, parent_id="v0")) is None
    # given a feature encoder's arguments it fails earlier, and is replaced the same way
    keyword = label.replace("LabelEncoder()", "LabelEncoder(handle_unknown='ignore')")
    problem = task.precheck(ArtifactVersion({**start, "preprocess": keyword}, 1, parent_id="v0"))
    assert problem.startswith("TypeError: LabelEncoder() takes no arguments"), problem
    values, _ = task.quick_fix(ArtifactVersion({**start, "preprocess": keyword}, 1, parent_id="v0"),
                               problem)
    assert "handle_unknown='ignore'" not in values["preprocess"]
    assert task.precheck(ArtifactVersion(values, 1, parent_id="v0")) is None
    multi = ArtifactVersion({**start, "preprocess": label.replace("LabelEncoder", "MultiLabelBinarizer")},
                            1, parent_id="v0")
    values, note = task.quick_fix(multi, "TypeError: MultiLabelBinarizer.fit_transform() takes 2 "
                                         "positional arguments but 3 were given")
    assert note.startswith("replaced MultiLabelBinarizer() by OneHotEncoder(")
    # another function's argument read where it is not given (Qwen 1.5B: `dataset` in predict)
    scope = start["predict"].replace("    return model.predict(X)",
                                     "    X = X[dataset.X.columns]\n    return model.predict(X)")
    problem = task.precheck(ArtifactVersion({**start, "predict": scope}, 1, parent_id="v0"))
    assert problem.splitlines()[0] == ("NameError: name 'dataset' is not defined (predict(model, X) "
                                       "is given only `model` and `X`: `dataset` does not exist there)")
    scope = start["select_features"].replace("    X = dataset.X\n", "    X = dataset.X[columns]\n")
    problem = task.precheck(ArtifactVersion({**start, "select_features": scope}, 1, parent_id="v0"))
    assert problem.splitlines()[0].endswith("(select_features(dataset) is given only `dataset`: "
                                            "`columns` does not exist there)"), problem
    # a ColumnTransformer entry without its columns: what an entry is
    pair = start["preprocess"].replace('SimpleImputer(strategy="median"), numeric)',
                                       'SimpleImputer(strategy="median"))')
    assert pair != start["preprocess"]
    problem = task.precheck(ArtifactVersion({**start, "preprocess": pair}, 1, parent_id="v0"))
    assert problem.splitlines()[0].endswith(
        "(each entry of a ColumnTransformer's list is a (name, transformer, columns) triple, e.g. "
        '("categorical", OneHotEncoder(handle_unknown="ignore"), categorical))'), problem


@needs_data
def test_validation_rows_reach_the_sandbox_without_their_labels():
    task = PROJECT.build_task(PROJECT.config(task="house-prices", task_options=_fast(
        data_dir=str(DATA_DIRS["house-prices"]), max_train_rows=200)), None)
    snoop = ArtifactVersion({"train_model": SNOOPS}, 0)
    for split in ("val", "test"):
        (trial,) = task.evaluate(snoop, task.examples(split))
        assert trial.error.endswith("files=['predict.csv', 'train.csv'] target_in_predict=False "
                                    "id_in_predict=True"), trial.error
