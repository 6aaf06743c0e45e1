"""Endpoint faults and budgets, through real HTTP to the fake endpoint (:mod:`fake_openai`).

* Timeouts, 429 with ``Retry-After``, 500s and dropped connections at a set rate: the loop
  completes with the same history as without faults, and every retry is counted (step metric
  ``llm_retries``, ``totals/llm_retries`` on the MLflow run).
* An endpoint that stays down (5xx, dropped connections, hanging, nothing listening): the retry
  budget (``GENOPT_LLM_MAX_RETRIES``/``_TIMEOUT_S``) ends the loop within seconds with one
  :class:`LLMError` line; the MLflow run ends FAILED with that line; the CLI exits 2 with it;
  nothing is cached.
* Budgets: a loop's ``max_tokens``/``max_cost_usd`` (tokens and prices as the endpoint reports
  them), and a study's ``max_tokens``/``max_cost_usd``/``max_wall_time_s``, which stop the
  running loop after its step and start no new trial.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai import FakeOpenAI, Reply, arithmetic_task_model  # noqa: E402

from mlflow_genopt.config import LoopConfig  # noqa: E402
from mlflow_genopt.events import LoopCallback  # noqa: E402
from mlflow_genopt.llm.base import LLMError  # noqa: E402
from mlflow_genopt.build import run_loop  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def bbeh_config(**changes) -> LoopConfig:
    options = {"train_size": 3, "val_size": 2, "test_size": 2, "extract_timeout_s": 5,
               **changes.pop("task_options", {})}
    base = dict(project="bbeh", task="generated_arithmetic", init="prompt_only", steps=4,
                batch_size=2, acceptance="improve", memory_size=2, optimizer_model="openai:fake",
                task_model="openai:fake", max_workers=2, task_options=options)
    return LoopConfig(**{**base, **changes})


def prompts(request: dict, index: int) -> str:
    """Optimizer answers: a new, valid prompt each time (every other one loses the question)."""
    if index % 2:
        return json.dumps({"reasoning": "shorter", "prompt": f"Reply {index}: just a number."})
    return json.dumps({"reasoning": "ask for care",
                       "prompt": f"Try {index}. {{question}}\nEnd with: The answer is <answer>."})


def run_of(uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def cache_rows(cache_dir: Path) -> int:
    path = cache_dir / "llm-cache.sqlite"
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setenv("GENOPT_LLM_BACKOFF_S", "0.01")
    monkeypatch.setenv("GENOPT_LLM_TIMEOUT_S", "2")
    monkeypatch.setenv("GENOPT_LLM_MAX_RETRIES", "4")


# --- faults at a set rate -----------------------------------------------------------------------
def test_faults_are_retried_logged_and_change_nothing(tmp_path, fast_retries):
    config = bbeh_config()
    with FakeOpenAI(prompts, arithmetic_task_model) as clean:
        expected = run_loop(config, tracking=None, cache_dir=None, base_url=clean.base_url)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with FakeOpenAI(prompts, arithmetic_task_model, fault_rate=0.4, max_faults_per_request=2,
                    timeout_sleep_s=3.0, retry_after="0.3", seed=3) as server:
        result = run_loop(config, tracking=uri, experiment="faults", cache_dir=tmp_path / "cache",
                          base_url=server.base_url)

    kinds = {kind: server.stats[f"fault_{kind}"] for kind in ("timeout", "429", "500", "drop")}
    assert all(kinds.values()), kinds  # every kind of fault happened
    assert result.stop_reason == "completed" and len(result.steps) == config.steps
    assert result.totals["llm_retries"] == server.faults_injected
    # the faults are invisible to the learning: same decisions and scores as the clean run
    assert [(s.batch_score, s.valid, s.accepted, s.candidate_batch_score) for s in result.steps] == \
        [(s.batch_score, s.valid, s.accepted, s.candidate_batch_score) for s in expected.steps]
    assert result.selected.values == expected.selected.values
    # a 429's Retry-After (0.3 s) is waited for; backoff alone would be ~0.01 s
    for i, (at, digest, kind) in enumerate(server.log):
        if kind == "429":
            later = next(t for t, d, _ in server.log[i + 1:] if d == digest)
            assert later - at >= 0.25

    client, run = run_of(uri, "faults")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["totals/llm_retries"] == server.faults_injected
    # every retry is counted in the phase that made it: the starting version's validation
    # (step 0), the steps, and the test evaluation; the parts add up to the total
    per_step = client.get_metric_history(run.info.run_id, "llm_retries")
    assert sorted(m.step for m in per_step) == list(range(config.steps + 1))
    test_retries = run.data.metrics["test_llm_retries"]
    assert sum(m.value for m in per_step) + test_retries == server.faults_injected


# --- every LLM call accounted, whichever phase made it --------------------------------------------
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd", "llm_calls",
              "cached_calls", "llm_errors", "llm_retries")


class GoDownAfter(LoopCallback):
    """Takes the endpoint down once step ``step`` has been reported: the next phase fails."""

    def __init__(self, server: FakeOpenAI, step: int) -> None:
        self.server, self.step = server, step

    def on_step(self, record) -> None:
        if record.step == self.step:
            self.server.down = True


def usage_parts(client, run_id: str) -> tuple[dict, dict]:
    """(sum of the parts, totals/) per usage key of a run: step 0 (the starting version's
    validation) + every step + test_<key> + failed_<key>."""
    metrics = client.get_run(run_id).data.metrics
    parts = {}
    for key in USAGE_KEYS:
        history = client.get_metric_history(run_id, key)
        assert len({m.step for m in history}) == len(history), f"{key}: a step logged twice"
        parts[key] = sum(m.value for m in history) + metrics.get(f"test_{key}", 0.0) \
            + metrics.get(f"failed_{key}", 0.0)
    return parts, {key: metrics[f"totals/{key}"] for key in USAGE_KEYS}


def test_every_llm_call_is_accounted_in_one_phase_across_faults_a_failure_and_resume(
        tmp_path, fast_retries):
    """30 % endpoint faults, then the endpoint goes down mid-loop (the run fails), comes back,
    and the loop is resumed: the parts add up to the totals at the failure and at the end,
    and the totals account for every request the endpoint received."""
    config = bbeh_config(steps=4)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with FakeOpenAI(prompts, arithmetic_task_model, fault_rate=0.3, max_faults_per_request=2,
                    timeout_sleep_s=3.0, retry_after="0.05", seed=5) as server:
        with pytest.raises(LLMError):
            run_loop(config, tracking=uri, experiment="usage", cache_dir=None,
                     base_url=server.base_url, callbacks=[GoDownAfter(server, 2)])
        client, failed = run_of(uri, "usage")
        assert failed.info.status == "FAILED"
        parts, totals = usage_parts(client, failed.info.run_id)
        assert parts == pytest.approx(totals) and totals["llm_errors"] >= 1
        assert failed.data.metrics["failed_llm_errors"] == totals["llm_errors"]
        server.down = False
        result = run_loop(config, tracking=uri, experiment="usage", cache_dir=None,
                          base_url=server.base_url)
    assert result.stop_reason == "completed"
    client, run = run_of(uri, "usage")  # the same run, resumed after step 2
    assert run.info.run_id == failed.info.run_id and run.info.status == "FINISHED"
    parts, totals = usage_parts(client, run.info.run_id)
    assert parts == pytest.approx(totals), (parts, totals)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "llm_retries")) == \
        list(range(config.steps + 1))
    # each fault and each "down" answer was retried once, or ended a call that failed for good
    assert totals["llm_retries"] + totals["llm_errors"] == \
        server.faults_injected + server.stats["down_responses"]
    assert server.faults_injected > 0
    # every request the endpoint got: an answer (a call not served by a cache), a retried
    # failure, or the last attempt of a call that failed for good
    assert server.stats["chat_requests"] == \
        totals["llm_calls"] - totals["cached_calls"] + totals["llm_retries"] + totals["llm_errors"]
    assert run.data.metrics["test_llm_calls"] > 0
    assert totals == pytest.approx({k: v for k, v in result.totals.items() if k in USAGE_KEYS})


def test_a_failed_then_resumed_run_carries_no_stale_error_tag(tmp_path, fast_retries):
    config = bbeh_config(steps=2)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with FakeOpenAI(prompts, arithmetic_task_model) as server:
        with pytest.raises(LLMError) as caught:
            run_loop(config, tracking=uri, experiment="tags", cache_dir=None,
                     base_url=server.base_url, callbacks=[GoDownAfter(server, 1)])
        client, failed = run_of(uri, "tags")
        assert failed.info.status == "FAILED"
        assert failed.data.tags["genopt.error"] == f"LLMError: {caught.value}"
        server.down = False
        run_loop(config, tracking=uri, experiment="tags", cache_dir=None, base_url=server.base_url)
    _, run = run_of(uri, "tags")
    assert run.info.run_id == failed.info.run_id and run.info.status == "FINISHED"
    assert "genopt.error" not in run.data.tags  # the state and the tags agree
    assert run.data.tags["genopt.previous_error"] == f"LLMError: {caught.value}"
    assert run.data.tags["genopt.stop_reason"] == "completed"


# --- an endpoint that stays down ----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["503", "drop", "hang", "nothing_listening"])
def test_an_endpoint_that_stays_down_ends_the_loop_with_one_line(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("GENOPT_LLM_BACKOFF_S", "0.01")
    monkeypatch.setenv("GENOPT_LLM_TIMEOUT_S", "0.5")
    monkeypatch.setenv("GENOPT_LLM_MAX_RETRIES", "2")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    options = dict(fault_rate=1.0, faults=("timeout",), max_faults_per_request=99,
                   timeout_sleep_s=5.0) if mode == "hang" else dict(down=mode != "hang", down_status=
                                                                     "drop" if mode == "drop" else 503)
    server = FakeOpenAI(prompts, arithmetic_task_model, **options).start()
    base_url = server.base_url
    if mode == "nothing_listening":
        server.stop()
    try:
        with pytest.raises(LLMError) as caught:
            run_loop(bbeh_config(), tracking=uri, experiment="down", cache_dir=tmp_path / "cache",
                     base_url=base_url)
    finally:
        server.stop()
    message = str(caught.value)
    assert "\n" not in message and base_url in message and "after 3 attempts" in message, message
    client, run = run_of(uri, "down")
    assert run.info.status == "FAILED"
    assert run.data.tags["genopt.error"] == f"LLMError: {message}"
    assert run.data.metrics["totals/llm_retries"] >= 2  # the retries are on the failed run too
    assert cache_rows(tmp_path / "cache") == 0


def test_the_cli_reports_a_dead_endpoint_in_one_line_and_exits_2(tmp_path):
    with FakeOpenAI(down=True) as server:
        base_url = server.base_url
        env = {**os.environ, "GENOPT_LLM_MAX_RETRIES": "1", "GENOPT_LLM_BACKOFF_S": "0.01",
               "MLFLOW_DISABLE_TELEMETRY": "true"}
        done = subprocess.run(
            [sys.executable, "-m", "mlflow_genopt.cli", "run", "bbeh", "--task", "generated_arithmetic",
             "--optimizer-model", "openai:fake", "--task-model", "openai:fake", "--base-url",
             base_url, "--steps", "1", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
             "--cache-dir", str(tmp_path / "cache"), "--quiet"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in done.stderr.splitlines() if line.startswith("genopt: error:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert errors == [f"genopt: error: LLM endpoint {base_url} still failing after 2 attempts: "
                      "503 Service unavailable (fake endpoint is down)."], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert cache_rows(tmp_path / "cache") == 0


# --- budgets ----------------------------------------------------------------------------------
def priced_answers(request: dict, index: int) -> Reply:
    """Optimizer answers that report 1000 prompt + 100 completion tokens each."""
    return Reply(content=prompts(request, index), prompt_tokens=1000, completion_tokens=100)


def small_task_answers(request: dict, index: int) -> Reply:
    return Reply(content=arithmetic_task_model(request, index), prompt_tokens=10, completion_tokens=5)


@pytest.mark.parametrize("budget,limit", [("max_tokens", 2500), ("max_cost_usd", 0.001)])
def test_loop_budgets_stop_the_loop_after_the_step_that_reaches_them(tmp_path, fast_retries, budget, limit):
    # gpt-4.1-mini is priced (0.40 / 1.60 USD per million tokens): 0.00056 USD per optimizer call
    config = bbeh_config(steps=10, optimizer_model="openai:gpt-4.1-mini", **{budget: limit})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with FakeOpenAI(priced_answers, small_task_answers) as server:
        result = run_loop(config, tracking=uri, experiment="budget", cache_dir=None,
                          base_url=server.base_url)
    assert result.stop_reason == f"budget: {budget}"
    assert 1 <= len(result.steps) < config.steps
    spent = {"max_tokens": result.totals["prompt_tokens"] + result.totals["completion_tokens"],
             "max_cost_usd": result.totals["cost_usd"]}[budget]
    last = result.steps[-1]
    last_step = {"max_tokens": last.prompt_tokens + last.completion_tokens, "max_cost_usd": last.cost_usd}[budget]
    assert spent >= limit > spent - last_step  # stopped at the first step that reached it
    _, run = run_of(uri, "budget")
    assert run.info.status == "FINISHED" and run.data.tags["genopt.stop_reason"] == f"budget: {budget}"


def test_study_budget_flags_reach_the_study_config():
    from mlflow_genopt.cli import build_study_config, make_parser

    args = make_parser().parse_args([
        "study", "bbeh", "--max-tokens", "500", "--study-max-tokens", "20000",
        "--study-max-cost-usd", "1.5", "--study-max-wall-time-s", "600"])
    config = build_study_config("bbeh", args)
    assert (config.max_tokens, config.max_cost_usd, config.max_wall_time_s) == (20000, 1.5, 600.0)
    assert config.base.max_tokens == 500  # --max-tokens stays the per-loop budget


@pytest.mark.parametrize("budget,limit", [("max_tokens", 3000), ("max_cost_usd", 0.0015),
                                          ("max_wall_time_s", 4.0)])
def test_a_study_budget_stops_the_running_loop_and_starts_no_new_trial(tmp_path, fast_retries,
                                                                       budget, limit):
    from mlflow import MlflowClient

    from mlflow_genopt.study import StudyConfig, run_study

    base = bbeh_config(steps=6, batch_size=1, optimizer_model="openai:gpt-4.1-mini",
                       task_options={"train_size": 2, "val_size": 1, "test_size": 1})
    config = StudyConfig(base=base, search_space={"memory_size": [0, 1, 2, 3]}, sampler="grid",
                         storage=f"sqlite:///{tmp_path}/optuna.db", pruner="none", **{budget: limit})
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def slow_answers(request, index):  # ~1 s per step, so that 4 s of wall time is mid-loop
        time.sleep(0.8 if budget == "max_wall_time_s" else 0)
        return priced_answers(request, index)

    with FakeOpenAI(slow_answers, small_task_answers) as server:
        result = run_study(config, tracking_uri=uri, experiment="study-budget", cache_dir=None,
                           base_url=server.base_url, summary_dir=tmp_path / "summary")

    assert result.stop_reason == f"budget: {budget}"
    states = [t.state for t in sorted(result.trials, key=lambda t: t.number)]
    # the trial that reached the budget was stopped mid-loop (PRUNED); none started after it
    assert states[-1] == "PRUNED" and all(s == "COMPLETE" for s in states[:-1]), states
    stopped = max(result.trials, key=lambda t: t.number)
    assert stopped.stop_reason == f"budget: {budget}" and stopped.steps_run < base.steps
    assert len(states) < 4
    parent = MlflowClient(uri).get_run(result.parent_run_id)
    assert parent.data.tags["genopt.study.budget"] == budget
    assert parent.data.tags["genopt.study.stop_reason"] == f"budget: {budget}"
    if budget != "max_wall_time_s":
        spent = sum((t.tokens_spent if budget == "max_tokens" else t.cost_usd) or 0 for t in result.trials)
        assert spent >= limit
