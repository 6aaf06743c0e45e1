"""Model windows on the real path: the embedded SmolLM2 optimizer with a small window set by
`--optimizer-n-ctx`; once the learning context (memory grows every step) no longer fits, the
loop shrinks it and the optimizer still answers, instead of the step being given up."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_a_context_too_long_for_the_window_is_shrunk_and_still_answered(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is a dependency: install the project")
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    completed = subprocess.run(
        [sys.executable, "-m", "mlflow_genopt.cli", "run", "bbeh", "--task", "generated_arithmetic",
         "--steps", "3", "--batch-size", "3", "--acceptance", "always",
         "--optimizer-max-tokens", "128", "--optimizer-n-ctx", "1024",
         # the window's arithmetic below was measured for one JSON answer per step
         "--edit-format", "json", "--repair-attempts", "0",
         "--option", "train_size=6", "--option", "val_size=2", "--option", "test_size=2",
         "--option", "answer_max_tokens=16", "--tracking-uri", uri, "--experiment", "window",
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    steps = [line for line in completed.stderr.splitlines() if line.startswith("[genopt] step ")]
    assert len(steps) == 3 and not any("too long" in line for line in steps), steps

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("window").experiment_id])
    assert run.data.params["optimizer_n_ctx"] == "1024"
    levels = {m.step: m.value for m in client.get_metric_history(run.info.run_id,
                                                                 "context_shrink_level")}
    assert levels[1] == 0 and max(levels.values()) >= 1  # the window forced a shrink
    assert run.data.metrics["totals/optimizer_calls"] >= 3
