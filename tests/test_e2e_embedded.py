"""End to end on the real path: the `genopt` CLI, the embedded SmolLM2 model through llama.cpp,
the subprocess sandbox and an SQLite MLflow store; then an identical rerun served by the cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

COMMAND = [
    "run", "bbeh", "--task", "generated_arithmetic", "--steps", "2", "--batch-size", "2",
    "--acceptance", "always", "--optimizer-max-tokens", "200", "--option", "train_size=6",
    "--option", "val_size=3", "--option", "test_size=3", "--option", "answer_max_tokens=32",
    "--experiment", "e2e",
]


def genopt(tmp_path, *extra):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    completed = subprocess.run(
        [sys.executable, "-m", "mlflow_genopt.cli", *COMMAND, "--tracking-uri", uri,
         "--cache-dir", str(tmp_path / "cache"), *extra],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return uri, completed


def test_embedded_model_loop_lands_in_mlflow_and_reruns_from_cache(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is a dependency: install the project")
    from mlflow import MlflowClient

    uri, completed = genopt(tmp_path)
    assert "selected version: v" in completed.stdout
    assert "[genopt] step 2/2" in completed.stderr

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("e2e")
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer_model"] == "smollm2"
    valid = {m.step: m.value for m in client.get_metric_history(run_id, "valid")}
    assert sorted(valid) == [1, 2]
    models = client.search_logged_models([experiment.experiment_id])
    assert len(models) == 1 + int(sum(valid.values()))  # starting version + valid proposals
    assert all(m.source_run_id == run_id for m in models)
    assert sum(m.tags.get("genopt.selected") == "true" for m in models) == 1
    for step in (1, 2):
        path = client.download_artifacts(run_id, f"steps/{step:03d}/context.json", str(tmp_path))
        messages = json.loads(open(path).read())
        assert messages[0]["role"] == "system" and "# Objective" in messages[1]["content"]
    assert {"batch_score", "best_val_score", "total_tokens", "llm_latency_s"} <= set(run.data.metrics)
    assert run.data.metrics["total_tokens"] > 0
    assert "test_score" in run.data.metrics

    # identical rerun: every LLM call is a cache hit, and the same versions come out
    _, again = genopt(tmp_path)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    rerun = runs[0]
    calls = sum(m.value for m in client.get_metric_history(rerun.info.run_id, "llm_calls"))
    cached = sum(m.value for m in client.get_metric_history(rerun.info.run_id, "cached_calls"))
    assert calls > 0 and cached == calls
    assert again.stdout.splitlines()[0] == completed.stdout.splitlines()[0]
