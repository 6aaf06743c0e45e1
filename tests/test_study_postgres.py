"""Several `genopt study` worker processes on one study in a real PostgreSQL server.

Optuna's storage and MLflow's tracking store are both PostgreSQL databases (the README's
multi-machine recipe, on one machine). The server comes from $GENOPT_TEST_POSTGRES_URL (set by
scripts/test.sh, which installs and starts PostgreSQL when run as root), or is started here from
an installed Debian cluster; without either the tests skip and say so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

DEFAULT_URL = "postgresql://genopt:genopt@localhost:5432/genopt_test"
WORKER_TIMEOUT_S = 90


def _connect_error(url: str) -> str | None:
    try:
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        engine = create_engine(url, poolclass=NullPool)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # no driver, no server, bad credentials
        return " ".join(str(exc).split())[:200]


def _start_local_cluster() -> str | None:
    """Start an installed Debian PostgreSQL cluster and create the test role and database (what
    scripts/test.sh does). Returns why that was not possible, or None."""
    if os.geteuid() != 0:
        return "not root, cannot start PostgreSQL"
    if not shutil.which("pg_lsclusters"):
        return "PostgreSQL is not installed (scripts/test.sh installs it when run as root)"
    clusters = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True).stdout.split()
    if len(clusters) < 3:
        return "no PostgreSQL cluster to start"
    version, cluster, port = clusters[:3]
    subprocess.run(["pg_ctlcluster", version, cluster, "start"], capture_output=True)

    def psql(sql: str) -> str:
        return subprocess.run(["su", "postgres", "-c", f"psql -p {port} -qtAX -c \"{sql}\""],
                              capture_output=True, text=True).stdout.strip()

    if psql("SELECT 1 FROM pg_roles WHERE rolname='genopt'") != "1":
        psql("CREATE ROLE genopt LOGIN CREATEDB PASSWORD 'genopt'")
    if psql("SELECT 1 FROM pg_database WHERE datname='genopt_test'") != "1":
        psql("CREATE DATABASE genopt_test OWNER genopt")
    return None


@pytest.fixture(scope="module")
def postgres():
    """(Optuna storage URL, MLflow tracking URI), both PostgreSQL, schemas created."""
    url = os.environ.get("GENOPT_TEST_POSTGRES_URL") or DEFAULT_URL
    error = _connect_error(url)
    if error and not os.environ.get("GENOPT_TEST_POSTGRES_URL"):
        why = _start_local_cluster()
        error = why or _connect_error(url)
    if error:
        pytest.skip(f"PostgreSQL not available at {url.split('@')[-1]}: {error}")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    parsed = make_url(url)
    mlflow_db = f"{parsed.database}_mlflow"
    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": mlflow_db}).first()
        if not exists:
            try:
                conn.execute(text(f'CREATE DATABASE "{mlflow_db}"'))
            except Exception as exc:
                pytest.skip(f"cannot create the MLflow test database {mlflow_db}: {exc}")
    engine.dispose()
    mlflow_uri = parsed.set(database=mlflow_db).render_as_string(hide_password=False)
    import optuna
    from mlflow import MlflowClient

    optuna.storages.RDBStorage(url)  # create both schemas once, before workers race for them
    MlflowClient(mlflow_uri).search_experiments()
    return url, mlflow_uri


def _scripts(tmp_path: Path) -> list[str]:
    optimizer = tmp_path / "optimizer.json"
    optimizer.write_text(json.dumps([
        json.dumps({"reasoning": "r", "prompt": "Compute carefully.\n{question}\nThe answer is <answer>."}),
        "not json",
    ]))
    task = tmp_path / "task.json"
    task.write_text(json.dumps(["The answer is 7.", "The answer is 12.", "no idea"]))
    return ["--optimizer-model", f"scripted:{optimizer}", "--task-model", f"scripted:{task}",
            "--edit-format", "json", "--repair-attempts", "0"]  # one scripted answer per step


def _worker(tmp_path: Path, postgres, study: str, experiment: str, *extra: str) -> subprocess.Popen:
    storage, mlflow_uri = postgres
    command = [
        sys.executable, "-m", "mlflow_genopt.cli", "study", "bbeh",
        "--task", "generated_arithmetic", "--max-workers", "2",
        "--option", "val_size=4", "--option", "test_size=4", *_scripts(tmp_path),
        "--pruner", "none", "--storage", storage, "--study-name", study,
        "--tracking-uri", mlflow_uri, "--experiment", experiment, "--no-cache", *extra,
    ]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(workers: list[subprocess.Popen]) -> list[str]:
    outputs = []
    for worker in workers:
        try:
            out, _ = worker.communicate(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for w in workers:
                w.kill()
            pytest.fail("a study worker did not finish in time")
        outputs.append(out)
    return outputs


def _mlflow_children(mlflow_uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return client, parents, {r.info.run_id: r for r in runs if "mlflow.parentRunId" in r.data.tags}


def test_three_workers_finish_one_study_with_exactly_n_trials(tmp_path, postgres):
    """The project's grid (init x batch_size: 6 points), 6 trials, three processes at once."""
    import optuna
    from optuna.trial import TrialState

    study, experiment = f"pg-{uuid.uuid4().hex[:8]}", f"pg-three-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    workers = [_worker(tmp_path, postgres, study, experiment, "--steps", "2", "--n-trials", "6")
               for _ in range(3)]
    outputs = _finish(workers)
    assert [w.returncode for w in workers] == [0, 0, 0], "\n-----\n".join(o[-2000:] for o in outputs)

    trials = optuna.load_study(study_name=study, storage=postgres[0]).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6  # none lost, none extra
    points = {(t.params["init"], t.params["batch_size"]) for t in trials}
    assert points == {(i, b) for i in ("prompt_only", "prompt_and_extraction") for b in (1, 3, 5)}
    ran = [int(o.split("(")[-1].split(" run by")[0]) for o in outputs if "run by this worker" in o]
    assert sum(ran) == 6, outputs

    client, parents, runs = _mlflow_children(postgres[1], experiment)
    assert len(parents) == 1  # one parent run, however many workers
    parent = parents[0]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {parent.info.run_id}
    assert set(runs) == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert all(r.data.tags["genopt.trial_state"] == "COMPLETE" for r in runs.values())
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_complete"] == 6
    names = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"summary", "recommended.yaml"} <= names
    print(f"three workers: {time.monotonic() - started:.1f}s")


def test_a_killed_worker_leaves_a_failed_trial_and_the_study_continues(tmp_path, postgres):
    import optuna
    from optuna.trial import TrialState

    study, experiment = f"pg-{uuid.uuid4().hex[:8]}", f"pg-kill-{uuid.uuid4().hex[:6]}"
    args = ["--steps", "5", "--param", "batch_size=1,2", "--n-trials", "4",
            "--heartbeat-interval", "1", "--grace-period", "2"]
    victim = _worker(tmp_path, postgres, study, experiment, *args)
    storage = optuna.storages.RDBStorage(postgres[0])
    others: list[subprocess.Popen] = []
    deadline = time.monotonic() + 60
    running = None
    while running is None and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.1)
        try:
            trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
        except KeyError:  # the study does not exist yet
            continue
        if not others:  # the study exists: start the other two while the victim works
            others = [_worker(tmp_path, postgres, study, experiment, *args) for _ in range(2)]
        running = next((t for t in trials if t.state == TrialState.RUNNING
                        and t.user_attrs.get("worker", "").endswith(f":{victim.pid}")
                        and "mlflow_run_id" in t.user_attrs), None)
    assert running is not None, victim.communicate()[0][-3000:]
    victim.send_signal(signal.SIGKILL)  # mid-trial: its loop has a run and is at work
    victim.wait()

    outputs = _finish(others)
    assert [w.returncode for w in others] == [0, 0], "\n-----\n".join(o[-2000:] for o in outputs)

    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    by_number = {t.number: t for t in trials}
    assert by_number[running.number].state == TrialState.FAIL  # heartbeat-stale: failed
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4 and len(trials) == 5
    assert len({(t.params["init"], t.params["batch_size"]) for t in complete}) == 4
    (retry,) = [t for t in complete if t.user_attrs.get("retry_of") == running.number]
    assert retry.params == running.params
    assert any("lost its worker" in o for o in outputs)

    client, parents, runs = _mlflow_children(postgres[1], experiment)
    killed = runs[running.user_attrs["mlflow_run_id"]]
    assert killed.info.status == "KILLED" and killed.data.tags["genopt.trial_state"] == "FAIL"
    assert len(parents) == 1 and len(runs) == 5
