"""Tabular datasets of the ML-pipeline case study: where the rows come from.

Sources, in the order they are tried for a named Kaggle task:

1. ``data_dir`` (a task option, ``--data-dir``) in one of two layouts:
   *Kaggle*: ``train.csv`` (with the target) and ``test.csv`` (without);
   *MLAgentBench*: ``env/train.csv``, ``env/test.csv`` (target removed) and
   ``scripts/answer.csv`` (the held-out targets, read only by the loop's process).
2. The download cache (``$GENOPT_CACHE_DIR``, default ``~/.cache/mlflow-genopt``) under
   ``kaggle/<competition>``.
3. ``kaggle competitions download -c <competition> -p <cache dir>`` plus unzip, when the
   ``kaggle`` command and Kaggle credentials exist. Otherwise a one-line :class:`ConfigError`
   says how to get the files.

Built-in tasks on datasets that ship inside scikit-learn (``breast-cancer``, ``wine``,
``diabetes``) need no file and no network. The generic ``csv`` task reads any CSV file (or a
directory in one of the layouts above) given a target column and a metric name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mlflow_genopt.config import ConfigError

from .metrics import DEFAULT_REPORT, METRICS


@dataclass(frozen=True)
class TaskDefinition:
    """What a named task is: its target, identifier, kind of problem and metrics.

    ``metric`` is the primary metric (the score); ``report`` are all metrics shown and logged.
    ``thresholds`` are the default stage boundaries of the staged feedback, in the primary
    metric's units, from basic to advanced. ``hints`` is task-specific advice that the staged
    feedback adds once the pipeline works.
    """

    name: str
    title: str
    target: str
    id_column: str | None
    problem_type: str
    metric: str
    report: tuple[str, ...]
    kaggle_slug: str | None = None
    sklearn_loader: str | None = None
    thresholds: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    hints: str = ""


TASKS: dict[str, TaskDefinition] = {
    "spaceship-titanic": TaskDefinition(
        "spaceship-titanic", "Spaceship Titanic", "Transported", "PassengerId", "classification",
        "accuracy", ("accuracy", "f1"), kaggle_slug="spaceship-titanic",
        thresholds={"accuracy": (0.78, 0.805), "f1": (0.78, 0.805)},
        hints=("PassengerId is gggg_pp (travel group and number within it); Cabin is "
               "deck/number/side; passengers in CryoSleep spend nothing (RoomService, FoodCourt, "
               "ShoppingMall, Spa, VRDeck)."),
    ),
    "house-prices": TaskDefinition(
        "house-prices", "House Prices (Ames)", "SalePrice", "Id", "regression", "rmse_log",
        ("rmse_log", "mae", "rmse"), kaggle_slug="house-prices-advanced-regression-techniques",
        thresholds={"rmse_log": (0.17, 0.135), "mae": (25000.0, 17000.0), "rmse": (40000.0, 28000.0)},
        hints=("SalePrice is right-skewed (fit on log1p and invert with expm1); a missing value "
               "in many columns (Alley, PoolQC, Fence, garage and basement columns) means 'none'; "
               "total floor area and overall quality are the strongest signals."),
    ),
    "breast-cancer": TaskDefinition(
        "breast-cancer", "Breast cancer Wisconsin (scikit-learn built-in)", "target", "id",
        "classification", "accuracy", ("accuracy", "f1"), sklearn_loader="load_breast_cancer",
        thresholds={"accuracy": (0.93, 0.965), "f1": (0.94, 0.97)},
        hints="All 30 features are numeric measurements; scaling helps linear models.",
    ),
    "wine": TaskDefinition(
        "wine", "Wine cultivars (scikit-learn built-in)", "target", "id", "classification",
        "accuracy", ("accuracy", "f1"), sklearn_loader="load_wine",
        thresholds={"accuracy": (0.9, 0.96)},
    ),
    "diabetes": TaskDefinition(
        "diabetes", "Diabetes progression (scikit-learn built-in)", "target", "id", "regression",
        "rmse", ("rmse", "mae", "r2"), sklearn_loader="load_diabetes",
        thresholds={"rmse": (62.0, 56.0), "mae": (50.0, 45.0)},
        hints="Ten standardized numeric features; linear models are strong here.",
    ),
}
GENERIC_TASK = "csv"


@dataclass
class TabularData:
    """Labelled rows, and the rows to predict for a submission.

    ``labeled`` holds the features and the target. ``unlabeled`` holds the rows of the
    submission (Kaggle's or MLAgentBench's ``test.csv``), ``None`` when the source has none.
    ``answers`` are the targets of ``unlabeled`` when known (MLAgentBench's ``answer.csv``),
    aligned row by row; they never leave the loop's process.
    """

    labeled: Any  # pandas.DataFrame
    unlabeled: Any | None
    answers: Any | None  # pandas.Series
    layout: str  # kaggle, mlagentbench, sklearn, csv
    source: str


def cache_root() -> Path:
    return Path(os.environ.get("GENOPT_CACHE_DIR", Path.home() / ".cache" / "mlflow-genopt"))


def _read_csv(path: Path):
    import pandas as pd

    try:
        return pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise ConfigError(f"{path}: not a readable CSV file ({type(exc).__name__}: {reason})") from None


def _layout_help() -> str:
    return ("train.csv and test.csv (Kaggle layout) or env/train.csv, env/test.csv and "
            "scripts/answer.csv (MLAgentBench layout)")


def detect_layout(directory: Path) -> str | None:
    if (directory / "env" / "train.csv").is_file():
        return "mlagentbench"
    if (directory / "train.csv").is_file():
        return "kaggle"
    return None


def load_directory(directory: Path, target: str, id_column: str | None) -> TabularData:
    """Read a directory in Kaggle or MLAgentBench layout."""
    layout = detect_layout(directory)
    if layout is None:
        raise ConfigError(f"data_dir: {directory} holds neither {_layout_help()}")
    base = directory / "env" if layout == "mlagentbench" else directory
    labeled = _read_csv(base / "train.csv")
    if target not in labeled.columns:
        raise ConfigError(
            f"target: column {target!r} not in {base / 'train.csv'} (columns: "
            f"{', '.join(map(str, labeled.columns[:30]))})"
        )
    unlabeled = _read_csv(base / "test.csv") if (base / "test.csv").is_file() else None
    if unlabeled is not None and target in unlabeled.columns:
        unlabeled = unlabeled.drop(columns=[target])
    answers = None
    if layout == "mlagentbench":
        answer_file = directory / "scripts" / "answer.csv"
        if unlabeled is None or not answer_file.is_file():
            raise ConfigError(f"data_dir: {directory} looks like MLAgentBench's layout but lacks "
                              "env/test.csv or scripts/answer.csv")
        answers = _align_answers(_read_csv(answer_file), unlabeled, target, id_column, answer_file)
    return TabularData(labeled, unlabeled, answers, layout, str(directory))


def _align_answers(answer_frame, unlabeled, target: str, id_column: str | None, path: Path):
    if target not in answer_frame.columns:
        raise ConfigError(f"{path}: no {target!r} column")
    if id_column and id_column in answer_frame.columns and id_column in unlabeled.columns:
        by_id = answer_frame.set_index(id_column)[target]
        missing = ~unlabeled[id_column].isin(by_id.index)
        if missing.any():
            raise ConfigError(f"{path}: no answer for {int(missing.sum())} test rows "
                              f"(e.g. {id_column}={unlabeled[id_column][missing].iloc[0]!r})")
        return by_id.loc[unlabeled[id_column]].reset_index(drop=True)
    if len(answer_frame) != len(unlabeled):
        raise ConfigError(f"{path}: {len(answer_frame)} answers for {len(unlabeled)} test rows")
    return answer_frame[target].reset_index(drop=True)


def load_sklearn(definition: TaskDefinition) -> TabularData:
    """A dataset bundled with scikit-learn (no download), with an ``id`` column added."""
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, definition.sklearn_loader)(as_frame=True)
    frame = bunch.frame.copy()
    frame.columns = [str(c) for c in frame.columns]
    frame.insert(0, "id", range(len(frame)))
    return TabularData(frame, None, None, "sklearn", f"sklearn.datasets.{definition.sklearn_loader}")


# --- Kaggle ---------------------------------------------------------------------------------
def kaggle_credentials_found() -> bool:
    """Whether the Kaggle CLI would find credentials (environment or its config files)."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    if os.environ.get("KAGGLE_API_TOKEN"):
        return True
    dirs = [Path(os.environ["KAGGLE_CONFIG_DIR"])] if os.environ.get("KAGGLE_CONFIG_DIR") else []
    dirs += [Path.home() / ".kaggle", Path.home() / ".config" / "kaggle"]
    return any((d / name).is_file() for d in dirs for name in ("kaggle.json", "access_token"))


def _missing_data_message(definition: TaskDefinition) -> str:
    slug = definition.kaggle_slug
    return (
        f"task {definition.name}: no data; pass --data-dir DIR holding {_layout_help()}, or install "
        f"the Kaggle CLI (pip install kaggle), put your API token in ~/.kaggle/kaggle.json and "
        f"accept the rules at https://www.kaggle.com/competitions/{slug}/rules so that "
        f"`kaggle competitions download -c {slug}` works"
    )


def _safe_extract(archive: Path, destination: Path) -> None:
    with zipfile.ZipFile(archive) as handle:
        for member in handle.namelist():
            target = (destination / member).resolve()
            if not str(target).startswith(str(destination.resolve()) + os.sep):
                raise ConfigError(f"{archive}: refusing to extract {member!r} outside {destination}")
        handle.extractall(destination)


def download_kaggle(slug: str, destination: Path, timeout_s: float = 900.0) -> Path:
    """``kaggle competitions download -c <slug> -p <destination>``, then unzip every archive.

    Files land in a temporary folder first and are moved into place at the end, so a failed
    download never leaves a half-filled cache behind."""
    executable = shutil.which("kaggle")
    if executable is None:
        raise ConfigError(f"kaggle: command not found (pip install kaggle) to download {slug}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.with_name(destination.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        try:
            done = subprocess.run(
                [executable, "competitions", "download", "-c", slug, "-p", str(staging)],
                capture_output=True, text=True, timeout=timeout_s, check=False,
            )
        except subprocess.TimeoutExpired:
            raise ConfigError(f"kaggle: download of {slug} took longer than {timeout_s:g}s") from None
        if done.returncode != 0:
            lines = (done.stderr or done.stdout or "").strip().splitlines()
            reason = lines[-1].strip() if lines else f"exit code {done.returncode}"
            raise ConfigError(f"kaggle: `kaggle competitions download -c {slug}` failed: {reason[:300]}")
        for archive in sorted(staging.glob("*.zip")):
            _safe_extract(archive, staging)
            archive.unlink()
        if detect_layout(staging) is None:
            raise ConfigError(f"kaggle: the download of {slug} holds no train.csv")
        shutil.rmtree(destination, ignore_errors=True)
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def locate_kaggle_data(definition: TaskDefinition) -> Path:
    """The cached competition files, downloaded first when the Kaggle CLI can do it."""
    cached = cache_root() / "kaggle" / definition.kaggle_slug
    if detect_layout(cached) is not None:
        return cached
    if shutil.which("kaggle") is None or not kaggle_credentials_found():
        raise ConfigError(_missing_data_message(definition))
    return download_kaggle(definition.kaggle_slug, cached)


def generic_definition(options: Mapping[str, Any]) -> TaskDefinition:
    """The ``csv`` task: target, metric and (optionally) id column from task options."""
    target, metric = options.get("target"), options.get("metric")
    if not target:
        raise ConfigError("task_options.target: the csv task needs the target column, e.g. --option target=price")
    if not metric:
        raise ConfigError(f"task_options.metric: the csv task needs a metric, one of {', '.join(METRICS)}")
    if metric not in METRICS:
        raise ConfigError(f"task_options.metric: unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    problem_type = METRICS[metric].problem_type
    report = (metric,) + tuple(m for m in DEFAULT_REPORT[problem_type] if m != metric)
    return TaskDefinition(GENERIC_TASK, f"tabular data ({target})", str(target),
                          options.get("id_column") or None, problem_type, metric, report)


def load_task_data(definition: TaskDefinition, data_dir: str | None) -> TabularData:
    """The rows of ``definition``, from ``data_dir``, the built-in datasets, the cache or Kaggle."""
    if data_dir:
        path = Path(data_dir).expanduser()
        if not path.exists():
            raise ConfigError(f"data_dir: {data_dir} does not exist (expected a directory with {_layout_help()})")
        if path.is_file():
            if definition.name != GENERIC_TASK:
                raise ConfigError(f"data_dir: {data_dir} is a file; task {definition.name} reads a "
                                  f"directory with {_layout_help()} (a single CSV file is the csv task)")
            labeled = _read_csv(path)
            if definition.target not in labeled.columns:
                raise ConfigError(f"target: column {definition.target!r} not in {path} (columns: "
                                  f"{', '.join(map(str, labeled.columns[:30]))})")
            return TabularData(labeled, None, None, "csv", str(path))
        return load_directory(path, definition.target, definition.id_column)
    if definition.sklearn_loader:
        return load_sklearn(definition)
    if definition.kaggle_slug:
        directory = locate_kaggle_data(definition)
        return load_directory(directory, definition.target, definition.id_column)
    raise ConfigError(f"data_dir: task {definition.name} needs --data-dir (a CSV file or a directory with {_layout_help()})")
