"""Bad input through the real command line (a subprocess per case): one clear line naming the
problem and the fix, a non-zero exit, no traceback, and nothing half-written (no MLflow store or
run, no Optuna storage, no response cache, no study summary).

Each case runs in an empty directory that is its working directory and its ``HOME``; after the
command, that directory must hold exactly the files the case put there, and an MLflow store the
case put there holds no run. Cases about permissions (``MODES``) run the command without root's
permission override (capabilities dropped before exec), so that they mean the same as root as
they do for any user.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai import FakeOpenAI  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

BBEH_TASK_JSON = "bbeh_boolean_expressions/task.json"
GARBAGE = b"\x00\xff\xfe\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
MLFLOW_DB = object()  # stands for a real, empty MLflow SQLite store (made once per module)
CSV = "--task", "csv", "--option", "target=y", "--option", "metric=accuracy", "--data-dir"
ROWS = "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40))
# permissions set after the files are written (the command then runs without root's override)
MODES = {"mlflow-db-read-only": {"mlflow.db": 0o444},
         "mlflow-db-directory-read-only": {"store": 0o555},
         "cache-dir-unwritable": {"cache": 0o555},
         "cache-file-read-only": {"cache/llm-cache.sqlite": 0o444},
         "study-cache-dir-unwritable": {"cache": 0o555}}


def online() -> bool:
    try:
        socket.getaddrinfo("raw.githubusercontent.com", 443)
        return True
    except OSError:
        return False


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


# (id, argv, files to create first, extra environment, substrings the error line must hold)
CASES = [
    # unknown names
    ("unknown-project", ["run", "nosuch"], {}, {},
     ["unknown project 'nosuch'", "available: atari, bbeh, ml_pipeline"]),
    ("unknown-bbeh-task", ["run", "bbeh", "--task", "nosuch"], {}, {},
     ["unknown BBEH task 'nosuch'", "choose one of generated_arithmetic"]),
    ("unknown-atari-game", ["run", "atari", "--task", "NoSuchGame"], {}, {},
     ["unknown Atari game 'NoSuchGame'", "choose one of Pong"]),
    ("unknown-ml-task", ["run", "ml_pipeline", "--task", "nosuch"], {}, {},
     ["unknown ml_pipeline task 'nosuch'", "choose one of", "breast-cancer"]),
    ("unknown-init", ["run", "bbeh", "--init", "nosuch"], {}, {}, ["init", "'nosuch'", "prompt_only"]),
    ("unknown-trainable", ["run", "bbeh", "--trainable", "nosuch"], {}, {}, ["nosuch", "prompt"]),
    ("unknown-task-option", ["run", "bbeh", "--option", "nosuch=1"], {}, {},
     ["task_options", "nosuch", "train_size"]),
    ("unknown-model-spec", ["run", "bbeh", "--optimizer-model", "nosuch:model"], {}, {},
     ["unknown model spec 'nosuch:model'", "'openai:<model>'"]),
    # invalid values
    ("batch-size-zero", ["run", "bbeh", "--batch-size", "0"], {}, {},
     ["batch_size: must be an integer >= 1, got 0"]),
    ("steps-not-a-number", ["run", "bbeh", "--steps", "many"], {}, {}, ["steps: must be an integer"]),
    ("acceptance-unknown", ["run", "bbeh", "--acceptance", "maybe"], {}, {},
     ["acceptance: must be one of always, improve, no_worse"]),
    ("temperature-out-of-range", ["run", "bbeh", "--optimizer-temperature", "9"], {}, {},
     ["optimizer_temperature: must be a number in [0, 2]"]),
    ("option-without-value", ["run", "bbeh", "--option", "train_size"], {}, {},
     ["expected KEY=VALUE"]),
    ("splits-too-large", ["run", "bbeh", "--option", "train_size=100"], {}, {},
     ["train_size 100", "must leave test examples"]),
    ("atari-option-out-of-range", ["run", "atari", "--option", "eval_episodes=0"], {}, {},
     ["task_options.eval_episodes: must be an integer >= 1, got 0"]),
    ("llm-retries-env-invalid", ["run", "bbeh", "--optimizer-model", "openai:fake", "--base-url",
                                 "http://127.0.0.1:9/v1"], {}, {"GENOPT_LLM_MAX_RETRIES": "lots"},
     ["$GENOPT_LLM_MAX_RETRIES: must be an integer >= 0", "'lots'"]),
    # config files
    ("config-file-missing", ["run", "bbeh", "--config", "missing.yaml"], {}, {},
     ["missing.yaml: cannot read config file"]),
    ("config-file-not-yaml", ["run", "bbeh", "--config", "bad.yaml"], {"bad.yaml": "steps: [1, 2\n"}, {},
     ["bad.yaml: not valid YAML/JSON"]),
    ("config-file-not-a-mapping", ["run", "bbeh", "--config", "list.yaml"], {"list.yaml": "- 1\n- 2\n"},
     {}, ["list.yaml: must hold a mapping of loop config fields"]),
    ("config-file-unknown-field", ["run", "bbeh", "--config", "typo.yaml"], {"typo.yaml": "stepz: 3\n"},
     {}, ["stepz: unknown loop config field", "known fields:", "steps"]),
    ("config-file-binary", ["run", "bbeh", "--config", "binary.yaml"], {"binary.yaml": GARBAGE}, {},
     ["binary.yaml: not valid YAML/JSON (not UTF-8 text"]),
    # data files
    ("bbeh-data-dir-missing", ["run", "bbeh", "--task", "boolean_expressions", "--data-dir", "nodir"],
     {}, {}, ["no task.json for boolean_expressions under nodir", "bbeh_boolean_expressions/task.json"]),
    ("bbeh-task-file-not-json", ["run", "bbeh", "--task", "boolean_expressions", "--data-dir", "."],
     {BBEH_TASK_JSON: "{not json"}, {}, ["task.json: not a readable BBEH task.json"]),
    ("bbeh-task-file-truncated", ["run", "bbeh", "--task", "boolean_expressions", "--data-dir", "."],
     {BBEH_TASK_JSON: '{"canary": "x", "examples": [{"input": "not ( True ) and ( True ) is", "target": "Fal'},
     {}, ["bbeh_boolean_expressions/task.json: not a readable BBEH task.json"]),
    ("bbeh-task-file-binary", ["run", "bbeh", "--task", "boolean_expressions", "--data-dir", "."],
     {BBEH_TASK_JSON: GARBAGE}, {}, ["task.json: not a readable BBEH task.json"]),
    ("bbeh-task-file-wrong-shape", ["run", "bbeh", "--task", "boolean_expressions", "--data-dir", "."],
     {BBEH_TASK_JSON: json.dumps({"examples": [{"question": "x"}]})}, {},
     ["task.json: expected", "examples", "input", "target"]),
    ("bbeh-no-data-and-no-network", ["run", "bbeh", "--task", "boolean_expressions"], {}, {},
     ["not found locally and download failed", "--data-dir"]),
    ("ml-data-dir-missing", ["run", "ml_pipeline", "--task", "spaceship-titanic", "--data-dir", "nodir"],
     {}, {}, ["data_dir: nodir does not exist", "train.csv"]),
    ("ml-data-dir-empty", ["run", "ml_pipeline", "--task", "spaceship-titanic", "--data-dir", "empty"],
     {"empty/.keep": ""}, {}, ["empty", "train.csv"]),
    ("ml-csv-binary", ["run", "ml_pipeline", "--task", "csv", "--data-dir", "bad.csv", "--option",
                       "target=y", "--option", "metric=accuracy"], {"bad.csv": GARBAGE}, {},
     ["bad.csv"]),
    ("ml-csv-no-such-target", ["run", "ml_pipeline", "--task", "csv", "--data-dir", "ok.csv", "--option",
                               "target=nosuch", "--option", "metric=accuracy"],
     {"ok.csv": "a,b,y\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40))}, {},
     ["target: column 'nosuch' not in", "columns:"]),
    ("ml-csv-empty", ["run", "ml_pipeline", "--task", "csv", "--data-dir", "empty.csv", "--option",
                      "target=y", "--option", "metric=accuracy"], {"empty.csv": ""}, {},
     ["empty.csv: not a readable CSV file"]),
    ("ml-train-csv-without-target", ["run", "ml_pipeline", "--task", "spaceship-titanic", "--data-dir", "kaggle"],
     {"kaggle/train.csv": "PassengerId,Age\n" + "".join(f"{i},{i}\n" for i in range(40))}, {},
     ["target: column 'Transported' not in kaggle/train.csv", "columns: PassengerId, Age"]),
    ("ml-csv-target-all-nan", ["run", "ml_pipeline", *CSV, "nan.csv"],
     {"nan.csv": "a,b,y\n" + "".join(f"{i},{i % 3},\n" for i in range(40))}, {},
     ["nan.csv: target column 'y' has no values (every row is empty or NaN)", "at least 12"]),
    ("ml-csv-one-row", ["run", "ml_pipeline", *CSV, "one.csv"], {"one.csv": "a,b,y\n1,2,1\n"}, {},
     ["one.csv: target column 'y' has 1 labelled row(s); at least 12 are needed for n_folds=5"]),
    ("ml-csv-not-utf8", ["run", "ml_pipeline", *CSV, "latin1.csv"],
     {"latin1.csv": ("a,b,y\n" + ROWS).replace("1,", "caf\xe9,").encode("latin-1")}, {},
     ["latin1.csv: not a readable CSV file", "'utf-8' codec can't decode byte 0xe9"]),
    # models and endpoints
    ("scripted-model-file-missing", ["run", "bbeh", "--optimizer-model", "scripted:missing.json"], {}, {},
     ["script file missing.json not found", "JSON list of strings"]),
    ("gguf-model-file-missing", ["run", "bbeh", "--optimizer-model", "missing.gguf"], {}, {},
     ["missing.gguf"]),
    ("gguf-model-file-not-gguf", ["run", "bbeh", "--optimizer-model", "weights.gguf"],
     {"weights.gguf": GARBAGE}, {}, ["model file weights.gguf is not a GGUF file"]),
    ("gguf-window-not-a-number", ["run", "bbeh", "--optimizer-model", "smollm2?n_ctx=big"], {}, {},
     ["n_ctx must be a positive integer, got 'big'"]),
    ("gguf-window-above-trained", ["run", "bbeh", "--optimizer-n-ctx", "65536"], {}, {},
     ["65536 exceeds the model's trained context length 8192"]),
    ("optimizer-n-ctx-for-an-endpoint", ["run", "bbeh", "--optimizer-model", "openai:fake",
                                         "--optimizer-n-ctx", "4096"], {}, {},
     ["optimizer_n_ctx: applies to an embedded optimizer model"]),
    # a writable store is there: the error comes before any run is created in it
    ("gguf-not-a-gguf-file", ["run", "bbeh", "--optimizer-model", "model.gguf", "--tracking-uri",
                              "sqlite:///mlflow.db"], {"model.gguf": "not a model\n", "mlflow.db": MLFLOW_DB},
     {}, ["model file model.gguf is not a GGUF file", "pass a .gguf model"]),
    ("gguf-task-model-not-a-gguf-file", ["run", "bbeh", "--task-model", "gguf:model.bin"],
     {"model.bin": GARBAGE}, {}, ["model file model.bin is not a GGUF file"]),
    ("openai-key-missing", ["run", "bbeh", "--optimizer-model", "openai:gpt-4.1-mini"], {},
     {"OPENAI_API_KEY": None, "OPENAI_BASE_URL": None},
     ["OPENAI_API_KEY is not set", "export it"]),
    ("openai-key-rejected", ["run", "bbeh", "--optimizer-model", "openai:fake", "--task-model", "openai:fake",
                             "--base-url", "{fake}"], {}, {"OPENAI_API_KEY": "sk-wrong"},
     ["rejected the API key (401)", "check OPENAI_API_KEY"]),
    # tracking
    ("tracking-server-unreachable", ["run", "bbeh", "--tracking-uri", "http://127.0.0.1:{closed}"], {}, {},
     ["no MLflow tracking server answers at http://127.0.0.1:", "--tracking-uri sqlite:///mlflow.db"]),
    ("tracking-file-store", ["run", "bbeh", "--tracking-uri", "./mlruns"], {}, {},
     ["'./mlruns' is a file store", "sqlite:///"]),
    ("mlflow-db-read-only", ["run", "bbeh", "--tracking-uri", "sqlite:///mlflow.db"], {"mlflow.db": MLFLOW_DB},
     {}, ["tracking_uri: mlflow.db is read-only", "--tracking-uri sqlite:///"]),
    ("mlflow-db-directory-read-only", ["run", "bbeh", "--tracking-uri", "sqlite:///store/mlflow.db"],
     {"store/mlflow.db": MLFLOW_DB}, {}, ["the directory store of mlflow.db is not writable"]),
    ("mlflow-db-is-a-directory", ["run", "bbeh", "--tracking-uri", "sqlite:///db"], {"db/.keep": ""}, {},
     ["tracking_uri: db is not a file"]),
    ("cache-dir-unwritable", ["run", "bbeh", "--cache-dir", "cache/genopt"], {"cache/.keep": ""}, {},
     ["cache_dir: cache/genopt is not writable (cache is not writable)", "--no-cache"]),
    ("cache-file-read-only", ["run", "bbeh", "--cache-dir", "cache"], {"cache/llm-cache.sqlite": ""}, {},
     ["cache_dir: cache/llm-cache.sqlite is read-only"]),
    ("cache-dir-is-a-file", ["run", "bbeh", "--cache-dir", "cache"], {"cache": "x"}, {},
     ["cache_dir: cache is not a directory"]),
    ("study-cache-dir-unwritable", ["study", "bbeh", "--cache-dir", "cache"], {"cache/.keep": ""}, {},
     ["cache_dir: cache is not writable"]),
    ("resume-without-store", ["resume", "0123456789abcdef", "--tracking-uri", "sqlite:///none.db"], {}, {},
     ["no MLflow database at none.db", "pass the --tracking-uri the run was logged to"]),
    # studies
    ("study-budget-zero", ["study", "bbeh", "--study-max-tokens", "0"], {}, {},
     ["max_tokens (study budget): must be an integer >= 1"]),
    ("study-budget-not-a-number", ["study", "bbeh", "--study-max-cost-usd", "lots"], {}, {},
     ["--study-max-cost-usd: must be a number or none"]),
    ("study-unknown-field", ["study", "bbeh", "--param", "nosuch=1,2"], {}, {},
     ["nosuch: not a searchable loop config field", "batch_size"]),
    ("study-unknown-sampler", ["study", "bbeh", "--sampler", "nosuch"], {}, {},
     ["sampler: must be one of auto, grid"]),
    ("study-space-file-binary", ["study", "bbeh", "--space", "space.yaml"], {"space.yaml": GARBAGE}, {},
     ["space.yaml: not valid YAML/JSON"]),
    ("study-space-file-not-a-space", ["study", "bbeh", "--space", "space.yaml"],
     {"space.yaml": "batch_size: {low: 5, high: 1}\n"}, {}, ["batch_size", "high (1) must be >= low (5)"]),
    ("study-bad-storage", ["study", "bbeh", "--storage", "bogus://x"], {}, {}, ["bogus://x"]),
    ("study-tracking-unreachable", ["study", "bbeh", "--tracking-uri", "http://127.0.0.1:{closed}"], {}, {},
     ["no MLflow tracking server answers"]),
]


@pytest.fixture(scope="module")
def fake_endpoint():
    with FakeOpenAI(api_key="sk-right") as server:
        yield server


def empty_mlflow_db(directory: Path) -> bytes:
    """The bytes of a real MLflow SQLite store with no run in it (made in ``directory``)."""
    from mlflow import MlflowClient

    path = directory / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path.read_bytes()


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> bytes:
    return empty_mlflow_db(tmp_path_factory.mktemp("store"))


def _without_permission_override() -> None:
    """In the command's process (before exec): drop CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and
    CAP_FOWNER from the bounding set, so that root obeys file modes like any user (a no-op,
    refused, for a user who has none of them anyway)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):
        libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP


def _runs(db: Path) -> list[tuple[str, str]]:
    import sqlite3

    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT run_uuid, status FROM runs").fetchall()


def check_case(case, workdir: Path, fake_url: str, mlflow_db: bytes) -> list[str]:
    """Run one case of :data:`CASES` in the empty directory ``workdir``; the promises it broke
    (empty: one line naming the problem, exit != 0, no traceback, nothing written, no run).
    ``bench/bench_reliability.py`` runs the table through this too."""
    name, argv, files, env, expected = case
    for relative, content in files.items():
        path = workdir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        content = mlflow_db if content is MLFLOW_DB else content
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    modes = MODES.get(name, {})
    for relative, mode in modes.items():
        os.chmod(workdir / relative, mode)
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    closed = closed_port()
    argv = [a.format(fake=fake_url, closed=closed) for a in argv]
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("MLFLOW_", "OPENAI_", "GENOPT_"))}
    environment.update(HOME=str(workdir), GENOPT_CACHE_DIR=str(workdir / "genopt-cache"),
                       MLFLOW_DISABLE_TELEMETRY="true")
    for key, value in env.items():
        if value is not None:
            environment[key] = value
    try:
        done = subprocess.run([sys.executable, "-m", "mlflow_genopt.cli", *argv], cwd=workdir,
                              env=environment, capture_output=True, text=True, timeout=120,
                              preexec_fn=_without_permission_override if modes else None)
    finally:
        for relative in modes:
            os.chmod(workdir / relative, 0o755 if (workdir / relative).is_dir() else 0o644)

    broken = []
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    if done.returncode == 0:
        broken.append("exit 0")
    if "Traceback" in done.stderr:
        broken.append("a traceback")
    if len(errors) != 1:
        broken.append(f"{len(errors)} error lines")
    broken += [f"the line lacks {text!r}" for text in expected if errors and text not in errors[0]]
    after = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    if after != before:
        broken.append(f"left behind: {sorted(map(str, set(after) - set(before)))}")
    for relative, content in files.items():  # a store that was there holds no run (RUNNING or other)
        if content is MLFLOW_DB and (runs := _runs(workdir / relative)):
            broken.append(f"runs left in {relative}: {runs}")
    if broken:
        broken.append(f"exit {done.returncode}\nstdout: {done.stdout[-1500:]}\nstderr: {done.stderr[-3000:]}")
    return broken


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_leaves_nothing(tmp_path, fake_endpoint, mlflow_db, case):
    if case[0] == "bbeh-no-data-and-no-network" and online():
        pytest.skip("this machine can download BBEH")
    broken = check_case(case, tmp_path, fake_endpoint.base_url, mlflow_db)
    assert not broken, "\n".join(broken)
