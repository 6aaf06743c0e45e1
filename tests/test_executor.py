"""Evaluations on a Dask cluster: a real ``dask scheduler`` and 2 real ``dask worker`` processes
on loopback (random ports, one thread each, importing this checkout), against ``local``.

What a user sees: the same trials and scores wherever the units ran; a worker SIGKILLed in the
middle of a unit changes nothing (the unit re-runs on the other worker); a scheduler that dies
ends `genopt run` with one line and a run that `genopt run` resumes; hostile programs stay
inside the sandbox on the worker (the workers' environment holds canary secrets); and
`genopt run ... --executor dask://127.0.0.1:PORT` gives the versions and scores of
`--executor local`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("distributed")
sys.path.insert(0, str(Path(__file__).parent))

import genopt_projects  # noqa: E402
import mlflow_genopt  # noqa: E402
from mlflow_genopt.artifact import ArtifactVersion  # noqa: E402
from mlflow_genopt.config import ConfigError, LoopConfig  # noqa: E402
from mlflow_genopt.executor import DaskExecutor, ExecutorError, make_executor  # noqa: E402
from mlflow_genopt.project import load_project  # noqa: E402

PONG = dict(project="atari", task="Pong", init="single", credit_horizon=30,
            task_options={"eval_episodes": 2, "eval_max_steps": 150, "train_episodes": 2,
                          "test_episodes": 1, "video_steps": 20, "workers": 2})
ML = dict(project="ml_pipeline", task="breast-cancer", init="one_function",
          task_options={"max_train_rows": 100, "n_folds": 2, "timeout_s": 60})
from test_atari_task import FOLLOW_BALL  # noqa: E402  (one known-good Pong policy)
SCALED_LOGISTIC = '''def train_model(dataset):
    """Training: scaled logistic regression on every column."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(dataset.X, dataset.y)
'''


# --- a real cluster on loopback ----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_path(directory: Path) -> str:
    """A PYTHONPATH under which workers import the very code this test process imports (the
    projects package is installed from ``projects/`` under another name, hence the links)."""
    directory.mkdir(parents=True, exist_ok=True)
    for module in (mlflow_genopt, genopt_projects):
        link = directory / module.__name__
        if not link.exists():
            link.symlink_to(Path(module.__file__).parent, target_is_directory=True)
    return os.pathsep.join([str(directory), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


class Cluster:
    """``dask scheduler`` + ``workers`` x ``dask worker --nthreads 1 --no-nanny`` (a killed
    worker stays dead), each a subprocess; ``env`` is the workers' environment."""

    def __init__(self, directory: Path, env: dict[str, str], workers: int = 2) -> None:
        self.port = _free_port()
        self.spec = f"dask://127.0.0.1:{self.port}"
        self.env = {**env, "PYTHONPATH": import_path(directory / "path"),
                    "MLFLOW_DISABLE_TELEMETRY": "true"}
        logs = directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        dask = [sys.executable, "-m", "dask"]
        self.scheduler = subprocess.Popen(
            dask + ["scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=open(logs / "scheduler.log", "w"))
        self.workers = [subprocess.Popen(
            dask + ["worker", f"tcp://127.0.0.1:{self.port}", "--nthreads", "1", "--no-nanny",
                    "--no-dashboard", "--name", f"w{i}", "--local-directory", str(directory / f"w{i}")],
            env=self.env, stdout=subprocess.DEVNULL, stderr=open(logs / f"w{i}.log", "w"))
            for i in range(workers)]
        from distributed import Client

        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(OSError, TimeoutError):
                with Client(f"tcp://127.0.0.1:{self.port}", timeout=5) as client:
                    client.wait_for_workers(workers, timeout=max(1, deadline - time.monotonic()))
                    break
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"cluster did not start; see {logs}")
            time.sleep(0.5)

    def busy_worker(self, timeout_s: float = 60) -> subprocess.Popen:
        """The first worker seen running a sandbox (a child process): it is mid-unit."""
        import psutil

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for worker in self.workers:
                with contextlib.suppress(psutil.Error):
                    if worker.poll() is None and psutil.Process(worker.pid).children():
                        return worker
            time.sleep(0.02)
        raise AssertionError("no worker started a unit")

    def close(self) -> None:
        for process in [*self.workers, self.scheduler]:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def hostile_cluster(tmp_path_factory):
    """2 workers whose environment holds canary secrets (and a 0600 canary file on disk). One
    cluster for the whole file, to keep it fast: the tests that kill a worker, then the
    scheduler, come last (in file order)."""
    from test_hostile import hostile_environment

    directory = tmp_path_factory.mktemp("cluster")
    with hostile_environment(directory) as canaries:
        cluster = Cluster(directory, dict(os.environ))
        try:
            yield cluster, canaries
        finally:
            cluster.close()


def starting(config: LoopConfig, step: int = 0, **values: str) -> ArtifactVersion:
    project = load_project(config.project)
    return ArtifactVersion({**project.starting_for(config).values, **values}, step)


def evaluate(config: LoopConfig, spec: str, version: ArtifactVersion, splits=("train", "val")):
    """The trials of ``version`` on ``splits``, evaluated through the executor ``spec``."""
    project = load_project(config.project)
    with make_executor(spec) as executor:
        task = project.build_task(config, executor=executor)
        try:
            examples = [e for split in splits for e in task.examples(split)]
            # usage holds wall-clock timings (never shown to the optimizer): all else must match
            return [{k: v for k, v in t.to_dict().items() if k != "usage"}
                    for t in task.evaluate(version, examples)]
        finally:
            task.close()


# --- the string and the identity ---------------------------------------------------------------
def test_executor_strings_are_validated_and_do_not_change_a_loops_identity():
    for bad in ("dask", "dask://", "dask://host", "dask://host:0", "dask:local[0]", "ray://h:1", 3):
        with pytest.raises(ConfigError, match=r"^executor: must be local, dask://HOST:PORT .*dask:local\[N\]"):
            LoopConfig(project="atari", executor=bad)
    with pytest.raises(ConfigError, match="^executor: project bbeh runs its evaluations in this process"):
        LoopConfig(project="bbeh", executor="dask:local[2]")
    local = LoopConfig(project="atari")
    remote = LoopConfig(project="atari", executor="dask://127.0.0.1:8786")
    assert local.executor == "local" and remote.to_params()["executor"] == "dask://127.0.0.1:8786"
    assert LoopConfig.from_params(remote.to_params()) == remote
    assert local.config_hash() == remote.config_hash()  # resume matching and the cache ignore it
    assert local.config_hash() != local.replace(seed=1).config_hash()
    with pytest.raises(ExecutorError, match=r"^executor: cannot reach the Dask scheduler of dask://127\.0\.0\.1:"):
        DaskExecutor(f"dask://127.0.0.1:1", address="tcp://127.0.0.1:1", connect_timeout_s=1)


def test_bad_executor_on_the_command_line_is_one_line_and_writes_nothing(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mlflow_genopt.cli", "run", "bbeh", "--executor",
                          "dask://127.0.0.1:1", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "genopt: error: executor: project bbeh runs its evaluations in this process (its tasks do "
        "not submit units to an executor), so it must be local, got 'dask://127.0.0.1:1'"]
    assert list(tmp_path.iterdir()) == []


# --- the same trials ---------------------------------------------------------------------------
@pytest.mark.e2e
def test_atari_and_ml_pipeline_trials_on_the_cluster_equal_local(hostile_cluster):
    cluster, _ = hostile_cluster
    pong = LoopConfig(**PONG)
    version = starting(pong, 1, select_action=FOLLOW_BALL)
    local = evaluate(pong, "local", version)
    assert evaluate(pong, cluster.spec, version) == local
    assert len(local) == 4 and len({t["score"] for t in local}) > 1  # distinct seeds, real play

    ml = LoopConfig(**ML)
    version = starting(ml, 1, train_model=SCALED_LOGISTIC)
    local = evaluate(ml, "local", version, ("train", "val", "test"))
    assert evaluate(ml, cluster.spec, version, ("train", "val", "test")) == local
    assert [t["example_id"] for t in local] == ["fold-1", "fold-2", "val", "test"]
    assert all(t["error"] is None and 0.8 < t["score"] <= 1 for t in local)


@pytest.mark.e2e
def test_hostile_programs_stay_in_the_sandbox_on_a_worker(hostile_cluster):
    from test_hostile import TARGETS, _probe_read, _probe_write_net, _program

    cluster, c = hostile_cluster
    probe = _probe_read(c.nonce, c) + ["_R1 = R"] + _probe_write_net(c.nonce, c, _free_port()) + [
        "R = _R1 + ' ' + R"]
    config = LoopConfig(**{**PONG, "task_options": {**PONG["task_options"], "eval_max_steps": 20}})
    version = starting(config, 1, select_action=_program(TARGETS["atari"], probe, "probe", c.nonce))
    trials = evaluate(config, cluster.spec, version)
    text = json.dumps(trials)
    assert f"PROBE-{c.nonce}" in text and c.public_text in text  # it ran, and read what it may
    for name, secret in c.secrets.items():  # the workers' environment and the 0600 file
        assert secret not in text, name
    assert "WROTE" not in text and "CONNECTED" not in text
    for target in c.write_targets:
        if Path(target) != c.public_file:
            assert not Path(target).exists(), target
    assert c.public_file.read_text() == c.public_text
    assert all(t["score"] == -21.0 for t in trials)  # a program that raises forfeits


def _cli(tmp_path: Path, project: dict, executor: str, answers: list[str], name: str, *extra: str):
    script = tmp_path / f"{name}-answers.json"
    script.write_text(json.dumps(answers))
    flags = ["--task", project["task"], "--init", project["init"], "--steps", "1", "--batch-size", "2",
             "--acceptance", "always", "--optimizer-model", f"scripted:{script}", "--executor", executor,
             "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--experiment", name,
             "--cache-dir", str(tmp_path / f"cache-{name}"), "--quiet", *extra]
    if project.get("credit_horizon"):
        flags += ["--credit-horizon", str(project["credit_horizon"])]
    for key, value in project["task_options"].items():
        flags += ["--option", f"{key}={value}"]
    return [sys.executable, "-m", "mlflow_genopt.cli", "run", project["project"], *flags]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": import_path(tmp_path / "path"), "MLFLOW_DISABLE_TELEMETRY": "true"}


def _val_history(tmp_path: Path, experiment: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_score")]


def _answer(**values: str) -> str:
    return json.dumps({"reasoning": "try this", **values})


@pytest.mark.e2e
@pytest.mark.parametrize("project,answers", [
    (PONG, [_answer(select_action=FOLLOW_BALL), _answer(select_action="def select_action(obs):\n    return 2\n")]),
    (ML, [_answer(train_model=SCALED_LOGISTIC), _answer(train_model="def train_model(dataset):\n    raise ValueError('no')\n")]),
], ids=["atari", "ml_pipeline"])
def test_cli_on_a_scheduler_gives_the_versions_and_scores_of_local(hostile_cluster, tmp_path,
                                                                    project, answers):
    cluster, _ = hostile_cluster
    runs = {}
    for executor in ("local", cluster.spec):
        name = "local" if executor == "local" else "dask"
        done = subprocess.run(_cli(tmp_path, project, executor, answers, name), capture_output=True,
                              text=True, env=_env(tmp_path), cwd=tmp_path, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = (done.stdout.splitlines()[:3], _val_history(tmp_path, name))
    assert runs["dask"] == runs["local"]
    assert runs["local"][0][0].startswith("selected version: v") and len(runs["local"][1]) == 2


# --- failures ----------------------------------------------------------------------------------
@pytest.mark.e2e
def test_a_worker_killed_mid_evaluation_changes_nothing(hostile_cluster):
    cluster, _ = hostile_cluster
    config = LoopConfig(**{**PONG, "task_options": {**PONG["task_options"], "eval_episodes": 4,
                                                    "eval_max_steps": 400}})
    version = starting(config, 1, select_action=FOLLOW_BALL)
    local = evaluate(config, "local", version, ("val",))
    assert sum(w.poll() is None for w in cluster.workers) == 2
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        remote = pool.submit(evaluate, config, cluster.spec, version, ("val",))
        victim = cluster.busy_worker()
        victim.send_signal(signal.SIGKILL)
        assert remote.result(timeout=300) == local
    assert victim.wait(timeout=10) == -signal.SIGKILL
    assert sum(w.poll() is None for w in cluster.workers) == 1


@pytest.mark.e2e
def test_a_lost_scheduler_ends_the_run_with_one_line_and_it_resumes(hostile_cluster, tmp_path):
    cluster, _ = hostile_cluster  # its last test: the scheduler dies here
    answers = [_answer(train_model=SCALED_LOGISTIC)]
    command = _cli(tmp_path, ML, cluster.spec, answers, "ml")
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=_env(tmp_path), cwd=tmp_path)
    try:
        cluster.busy_worker(timeout_s=120)
    finally:
        cluster.scheduler.send_signal(signal.SIGKILL)
    stdout, stderr = run.communicate(timeout=180)
    assert run.returncode == 1, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"genopt: error: executor: ") and \
        lines[0].endswith("run the same command again to resume"), stderr[-3000:]
    assert stdout == ""
    local = [*command[:command.index("--executor") + 1], "local", *command[command.index("--executor") + 2:]]
    again = subprocess.run(local, capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming unfinished run" in again.stderr
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [resumed] = client.search_runs([client.get_experiment_by_name("ml").experiment_id])
    assert resumed.info.status == "FINISHED"  # the same run, finished by this machine
    assert resumed.data.params["executor"] == cluster.spec  # where it was started
