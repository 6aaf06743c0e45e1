"""Crash and resume through the real CLI: SIGKILL at random moments, SIGINT, `genopt resume`.

The optimizer and task model are scripted (answers from files) behind the real response cache;
the sandbox, SQLite store and MLflow tracker are real. A first, uninterrupted run fills the
cache; the interrupted runs replay it, so their histories must equal the uninterrupted one.
Each interrupted run sets a task option that changes no result (``extract_timeout_s``) so that
its evaluations are not served by the evaluation cache the reference run filled: its steps
really run the sandbox, and the signals land inside them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

STEPS = 6
KILLED = ("--option", "extract_timeout_s=9")
INTERRUPTED = ("--option", "extract_timeout_s=8")


def command(tmp_path, db: str, *extra: str) -> list[str]:
    proposals = [json.dumps({"reasoning": f"r{i}", "prompt": f"Variant {i}.\n{{question}}\nThe answer is"})
                 for i in range(4)] + ["not json"]
    (tmp_path / "optimizer.json").write_text(json.dumps(proposals))
    (tmp_path / "task.json").write_text(json.dumps(["The answer is True.", "The answer is False.",
                                                     "I think True", "The answer is False"]))
    return [sys.executable, "-m", "mlflow_genopt.cli", "run", "bbeh", "--steps", str(STEPS),
            "--batch-size", "2", "--acceptance", "always", "--option", "train_size=8",
            "--option", "val_size=4", "--option", "test_size=4",
            "--optimizer-model", f"scripted:{tmp_path / 'optimizer.json'}",
            "--task-model", f"scripted:{tmp_path / 'task.json'}",
            "--cache-dir", str(tmp_path / "cache"), "--tracking-uri", f"sqlite:///{tmp_path / db}",
            "--quiet", *extra]


def checkpoint_step(db_path) -> int:
    if not db_path.exists():
        return -1
    try:
        with sqlite3.connect(db_path, timeout=1) as con:
            row = con.execute(
                "select max(step) from metrics where key = 'step_wall_time_s'").fetchone()
    except sqlite3.Error:
        return -1
    return int(row[0]) if row and row[0] is not None else 0


def history(db: str):
    from mlflow import MlflowClient

    client = MlflowClient(db)
    experiment = client.get_experiment_by_name("genopt")
    (run,) = client.search_runs([experiment.experiment_id])
    per_metric = {}
    for key in ("batch_score", "val_score", "accepted", "valid", "best_val_score"):
        entries = client.get_metric_history(run.info.run_id, key)
        per_metric[key] = sorted((m.step, m.value) for m in entries)
    models = sorted(m.name for m in client.search_logged_models([experiment.experiment_id]))
    return run, per_metric, models


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    done = subprocess.run(command(tmp, "reference.db"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp, history(f"sqlite:///{tmp / 'reference.db'}")


def test_sigkill_at_random_moments_then_rerun_resumes_without_loss_or_duplicates(reference):
    tmp, (ref_run, ref_history, ref_models) = reference
    db = tmp / "killed.db"
    rng = random.Random(int(os.environ.get("GENOPT_TEST_SEED", "7")))
    kills = 0
    for _ in range(2):  # two kills at random moments, each after some progress
        process = subprocess.Popen(command(tmp, "killed.db", *KILLED), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        target = max(checkpoint_step(db), 0) + 1
        deadline = time.monotonic() + 120
        while checkpoint_step(db) < target and process.poll() is None:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.4))  # somewhere inside the next step
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
    assert kills >= 1

    done = subprocess.run(command(tmp, "killed.db", *KILLED), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming unfinished run" in done.stderr
    run, resumed_history, models = history(f"sqlite:///{db}")
    assert run.info.status == "FINISHED"
    assert resumed_history == ref_history  # every step once, same values
    assert [step for step, _ in resumed_history["batch_score"]] == list(range(1, STEPS + 1))
    assert models == ref_models  # no LoggedModel created twice
    assert run.data.metrics["test_score"] == ref_run.data.metrics["test_score"]


def test_sigint_finishes_the_step_exits_130_and_resume_command_continues(reference):
    tmp, (ref_run, ref_history, _) = reference
    db = tmp / "interrupted.db"
    process = subprocess.Popen(command(tmp, "interrupted.db", *INTERRUPTED), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while checkpoint_step(db) < 1 and process.poll() is None:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "finishing the current step" in err

    run, partial, _ = history(f"sqlite:///{db}")
    assert run.info.status == "KILLED"
    logged = [step for step, _ in partial["batch_score"]]
    assert logged == list(range(1, len(logged) + 1)) and len(logged) < STEPS
    assert "test_score" not in run.data.metrics

    done = subprocess.run(
        [sys.executable, "-m", "mlflow_genopt.cli", "resume", run.info.run_id,
         "--tracking-uri", f"sqlite:///{db}", "--cache-dir", str(tmp / "cache"), "--quiet"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    run, resumed_history, _ = history(f"sqlite:///{db}")
    assert run.info.status == "FINISHED" and resumed_history == ref_history


def test_resume_of_an_unknown_or_finished_run_is_a_one_line_error(reference, tmp_path):
    tmp, (ref_run, _, _) = reference
    uri = f"sqlite:///{tmp / 'reference.db'}"
    for run_id, message in ((ref_run.info.run_id, "already finished"),
                            ("0" * 32, "not found")):
        done = subprocess.run([sys.executable, "-m", "mlflow_genopt.cli", "resume", run_id,
                               "--tracking-uri", uri], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2 and message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


# --- traces: every committed phase's LLM calls exactly once, however often the loop is killed --
TRACED = ("--option", "extract_timeout_s=7")  # its own evaluations (see KILLED)


def run_status(db_path) -> str | None:
    """The status of the store's run (None: no run yet, or the store is busy)."""
    try:
        with sqlite3.connect(db_path, timeout=1) as con:
            row = con.execute("select status from runs").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def mean_step_time(db_path) -> float:
    """The mean ``step_wall_time_s`` of the store's steps."""
    with sqlite3.connect(db_path, timeout=5) as con:
        (mean,) = con.execute(
            "select avg(value) from metrics where key = 'step_wall_time_s'").fetchone()
    return float(mean)


def trace_audit(uri: str) -> dict:
    """The one run of ``uri``'s experiment and its traces, checked against its metrics: per
    phase (initial, each step, test) the traces found and how many of them hold exactly the
    phase's LLM calls (one span each; ``llm_calls`` + ``llm_errors`` at that step, ``test_*``
    for the test); ``orphans``: traces that do not name the run as their ``mlflow.sourceRun``."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("genopt").experiment_id
    (run,) = client.search_runs([experiment])
    run_id = run.info.run_id
    mlflow.set_tracking_uri(uri)
    traces = mlflow.search_traces(locations=[experiment], return_type="list")
    orphans = sum(t.info.trace_metadata.get("mlflow.sourceRun") != run_id for t in traces)

    def per_step(key: str) -> dict[int, float]:
        history = client.get_metric_history(run_id, key)
        assert len({m.step for m in history}) == len(history), f"{key} logged twice"
        return {m.step: m.value for m in history}

    calls, errors = per_step("llm_calls"), per_step("llm_errors")
    expected = {("initial", 0): calls[0] + errors[0]}
    expected.update({("step", s): calls[s] + errors[s] for s in calls if s > 0})
    metrics = run.data.metrics
    if "test_llm_calls" in metrics:
        expected[("test", max(calls))] = metrics["test_llm_calls"] + metrics["test_llm_errors"]
    found: dict[tuple[str, int], list[int]] = {}
    for t in traces:
        key = (t.info.tags.get("genopt.phase"), int(t.info.tags.get("genopt.step", -1)))
        found.setdefault(key, []).append(len(t.data.spans) - 1)
    phases = {k: v for k, v in expected.items() if v > 0}  # a phase without calls has no trace
    return {
        "status": run.info.status, "traces": len(traces), "orphans": orphans, "phases": len(phases),
        "lost": sum(k not in found for k in phases),
        "duplicated": sum(len(found.get(k, [])) > 1 for k in phases),
        "wrong_calls": sum(found.get(k, [n])[0] != n for k, n in phases.items() if k in found),
        "unexpected": sorted(str(k) for k in found if k not in phases),
        "steps_traced": sum(phase == "step" for phase, _ in found),
    }


def kill_and_resume(tmp_path, db_name: str, kills: int, rng: random.Random, *extra: str,
                    step_s: float = 0.6) -> dict:
    """Run the loop, SIGKILL it ``kills`` times at random moments (the first one before step 1
    commits, the others inside the step after the one that just committed: a random fraction
    of ``step_s``, a step's duration), resume it to the end with the same command, and
    :func:`trace_audit` the run.

    A kill counts only while the run is unfinished: a loop that already marked its run
    FINISHED is done, and a rerun of the same command then rightly starts a new run."""
    db = tmp_path / db_name
    done_kills = 0
    while done_kills < kills:
        process = subprocess.Popen(command(tmp_path, db_name, *TRACED, *extra),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = max(checkpoint_step(db), 0) + (0 if done_kills == 0 else 1)
        deadline = time.monotonic() + 180
        while process.poll() is None and (checkpoint_step(db) < target or not run_status(db)):
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 1.0) if done_kills == 0 else rng.uniform(0, 0.9) * step_s)
        if process.poll() is not None or run_status(db) == "FINISHED":
            break  # finished before this kill: no more steps to kill in
        process.send_signal(signal.SIGKILL)
        process.wait()
        if run_status(db) == "FINISHED":
            break  # the kill landed after the run was done (exiting): it interrupted nothing
        done_kills += 1
    if run_status(db) != "FINISHED":
        done = subprocess.run(command(tmp_path, db_name, *TRACED, *extra), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    audit = trace_audit(f"sqlite:///{db}")
    audit["kills"] = done_kills
    return audit


def test_traces_of_every_committed_phase_survive_sigkills_exactly_once(reference, tmp_path):
    tmp, _ = reference
    rng = random.Random(int(os.environ.get("GENOPT_TEST_SEED", "11")))
    audit = kill_and_resume(tmp, "traced.db", 5, rng, "--steps", "8",
                            step_s=mean_step_time(tmp / "reference.db"))
    assert audit["kills"] == 5, audit  # 8 steps leave room for 5 kills, each after progress
    assert audit["status"] == "FINISHED", audit
    # every step calls the optimizer; the initial and test phases may be served by the
    # evaluation cache (filled by a killed attempt): a phase without calls has no trace
    assert audit["steps_traced"] == 8 and audit["phases"] >= 8, audit
    assert (audit["lost"], audit["duplicated"], audit["wrong_calls"], audit["orphans"]) == \
        (0, 0, 0, 0), audit
    assert audit["unexpected"] == [] and audit["traces"] == audit["phases"], audit


def test_the_uninterrupted_run_has_one_trace_per_phase(reference):
    tmp, _ = reference
    audit = trace_audit(f"sqlite:///{tmp / 'reference.db'}")
    assert audit["phases"] == STEPS + 2 and audit["traces"] == STEPS + 2, audit
    assert (audit["lost"], audit["duplicated"], audit["wrong_calls"], audit["orphans"]) == \
        (0, 0, 0, 0), audit
