"""MlflowTracker, driven with hand-built loop events against a real SQLite MLflow store.

The assertions read the store back through MlflowClient: what a user sees in the MLflow UI.
(conftest.py sets MLFLOW_DISABLE_TELEMETRY.)
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pytest
import yaml
from mlflow import MlflowClient

from mlflow_genopt.artifact import ArtifactSpec, ArtifactVersion, Parameter
from mlflow_genopt.config import LoopConfig
from mlflow_genopt.events import LoopResult, LoopStart, StepRecord, VersionRecord
from mlflow_genopt.llm.base import Completion, LLMCall
from mlflow_genopt.task import Trial
from mlflow_genopt.tracking import MODEL_TYPE, MlflowTracker

CONFIG = LoopConfig(project="demo", task="toy", init="prompt_only", steps=3, batch_size=2, seed=1)
SPEC = ArtifactSpec(
    (
        Parameter("instruction", "prompt", "system prompt", placeholders=("{question}",)),
        Parameter("solve", "code", "post-processing", trainable=False),
    )
)
V0 = ArtifactVersion(
    {"instruction": "Answer {question}", "solve": "def solve(x):\n    return x\n"}, step=0
)
V1 = V0.child({"instruction": "Think, then answer {question}"}, 1)
V3 = V1.child({"instruction": "Answer {question} in one word"}, 3)
OPTIMIZER_MESSAGES = (
    {"role": "system", "content": "You improve artifacts."},
    {"role": "user", "content": "Current instruction: Answer {question}\nScores: 0.5"},
)


def _call(purpose, content, *, error=None, tokens=(10, 5), cached=False):
    start = time.time_ns()
    completion = None
    if error is None:
        completion = Completion(
            text=f"answer to {content}",
            model="scripted",
            prompt_tokens=tokens[0],
            completion_tokens=tokens[1],
            latency_s=0.001,
            cost_usd=0.0,
            cached=cached,
        )
    return LLMCall(
        purpose=purpose,
        model="scripted",
        messages=({"role": "user", "content": content},),
        params={"temperature": 0.0, "max_tokens": 64},
        completion=completion,
        start_time_ns=start,
        end_time_ns=start + 2_000_000,
        error=error,
    )


def _trials(tag, scores):
    return tuple(
        Trial(f"ex{i}", input={"q": f"{tag}{i}"}, output=f"out{i}", score=s, feedback="ok")
        for i, s in enumerate(scores)
    )


def _step(step, *, current, candidate, accepted, val, best, invalid=None, invalid_total=0):
    return StepRecord(
        step=step,
        batch_ids=("ex0", "ex1"),
        current_id=current.version_id,
        batch_score=0.5,
        trials=_trials(f"s{step}-", (0.0, 1.0)),
        context=OPTIMIZER_MESSAGES,
        raw_response=f'{{"instruction": "proposal {step}"}}',
        proposal=None if invalid else {"instruction": f"proposal {step}"},
        reasoning=f"reasoning {step}",
        invalid_reason=invalid,
        candidate_id=candidate.version_id if candidate else None,
        candidate_batch_score=1.0 if candidate else None,
        candidate_trials=_trials(f"c{step}-", (1.0, 1.0)) if candidate else (),
        val_score=val,
        accepted=accepted,
        best_id=V1.version_id if step >= 1 and best > 0.5 else V0.version_id,
        best_val_score=best,
        invalid_total=invalid_total,
        prompt_tokens=100 * step,
        completion_tokens=10 * step,
        cost_usd=0.0,
        llm_latency_s=0.01,
        llm_calls=3,
        cached_calls=0,
        eval_time_s=0.02,
        wall_time_s=0.05,
    )


def _report_task_calls(tracker, contents, **kwargs):
    """Task LLM calls arrive from worker threads, as in a concurrent evaluation."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda c: tracker.on_llm_call(_call("task", c, **kwargs)), contents))


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return [f"{x}!" for x in model_input]


def _export(directory: Path) -> Path:
    """What an exporting task writes for the selected version: a file and an MLflow model."""
    directory.mkdir()
    (directory / "submission.csv").write_text("id,answer\n1,42\n")
    mlflow.pyfunc.save_model(str(directory / "model"), python_model=_Echo())
    return directory


def _drive_loop(tracker, export_dir):
    tracker.on_loop_start(LoopStart(CONFIG, "demo/toy", "Answer questions well.", SPEC, V0))
    _report_task_calls(tracker, ["v0-a", "v0-b", "v0-c"])
    tracker.on_version(VersionRecord(V0, "initial", None, 0.5))
    steps = []
    # step 1: accepted
    tracker.on_llm_call(_call("optimizer", "improve step 1"))
    _report_task_calls(tracker, ["v1-a", "v1-b"])
    tracker.on_version(VersionRecord(V1, "accepted", 1.0, 0.6, "more thought"))
    time.sleep(0.005)  # as in a real loop, the step ends later than its version was scored
    steps.append(_step(1, current=V0, candidate=V1, accepted=True, val=0.6, best=0.6))
    tracker.on_step(steps[-1])
    # step 2: invalid proposal, nothing evaluated
    tracker.on_llm_call(_call("optimizer", "improve step 2"))
    steps.append(
        _step(2, current=V1, candidate=None, accepted=False, val=None, best=0.6,
              invalid="missing placeholder {question}", invalid_total=1)
    )
    tracker.on_step(steps[-1])
    # step 3: rejected, and one task call failed
    tracker.on_llm_call(_call("optimizer", "improve step 3"))
    _report_task_calls(tracker, ["v3-a"])
    tracker.on_llm_call(_call("task", "v3-b", error="LLMError: endpoint unreachable"))
    tracker.on_version(VersionRecord(V3, "rejected", 1.0, None))  # rejected: no validation
    steps.append(_step(3, current=V1, candidate=V3, accepted=False, val=None, best=0.6,
                       invalid_total=1))
    tracker.on_step(steps[-1])
    # final test of the selected version
    _report_task_calls(tracker, ["test-a"])
    result = LoopResult(
        config=CONFIG,
        selected=V1,
        best_val_score=0.6,
        test_score=0.55,
        test_trials=_trials("t", (0.5, 0.6)),
        steps=tuple(steps),
        versions=(
            VersionRecord(V0, "initial", None, 0.5),
            VersionRecord(V1, "accepted", 1.0, 0.6),
            VersionRecord(V3, "rejected", 1.0, None),
        ),
        stop_reason="completed",
        totals={"tokens": 660.0, "cost_usd": 0.0},
        export_dir=str(export_dir),
    )
    tracker.on_loop_end(result)
    return result


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one runs MLflow's migrations, ~1 s)."""
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    root = tmp_path_factory.mktemp("mlflow")
    yield f"sqlite:///{root}/mlflow.db", root
    # The tracker sets MLflow's global tracking URI (and with it $MLFLOW_TRACKING_URI).
    mlflow.set_tracking_uri(None)
    if previous_env is not None:
        os.environ["MLFLOW_TRACKING_URI"] = previous_env


@pytest.fixture(scope="module")
def tracked(store):
    uri, root = store
    tracker = MlflowTracker(uri, experiment="tracking-test")
    assert not tracker.active
    result = _drive_loop(tracker, _export(root / "export"))
    assert not tracker.active
    client = MlflowClient(uri)
    return tracker, client, client.get_run(tracker.run_id), result


def _models(client, run):
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
        output_format="list",
    )
    return {m.name: m for m in models}


def _artifact_text(client, run_id, path, tmp_path):
    local = client.download_artifacts(run_id, path, str(tmp_path))
    return Path(local).read_text()


def test_one_run_with_config_params_and_tags(tracked, store):
    tracker, client, run, _ = tracked
    experiment = client.get_experiment_by_name("tracking-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [tracker.run_id]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "toy-prompt_only-b2-s1"
    assert run.data.params == CONFIG.to_params()
    tags = run.data.tags
    assert tags["genopt.project"] == "demo"
    assert tags["genopt.task"] == "demo/toy"
    assert tags["genopt.init"] == "prompt_only"
    assert tags["genopt.config_hash"] == CONFIG.config_hash()
    assert tags["genopt.objective"] == "Answer questions well."
    assert tags["genopt.library_version"]
    assert tags["genopt.selected_version"] == V1.version_id
    assert tags["genopt.stop_reason"] == "completed"
    assert "genopt.tracking_errors" not in tags and tracker.errors == ()
    # artifacts sit next to the database, not in the working directory
    assert Path(experiment.artifact_location.removeprefix("file://")).is_relative_to(store[1])


def test_every_version_is_a_logged_model_of_the_run(tracked):
    tracker, client, run, _ = tracked
    models = _models(client, run)
    assert set(models) == {V0.version_id, V1.version_id, V3.version_id}
    expected = ((V0, "initial", 0.5), (V1, "accepted", 0.6), (V3, "rejected", None))
    for version, status, val in expected:
        model = models[version.version_id]
        assert model.model_type == MODEL_TYPE
        assert model.source_run_id == run.info.run_id
        assert model.tags["genopt.parent_id"] == (version.parent_id or "none")
        assert model.tags["genopt.status"] == status
        assert model.tags["genopt.step"] == str(version.step)
        assert model.tags["genopt.content_hash"] == version.content_hash
        assert model.params == CONFIG.to_params()
        assert {m.key: m.value for m in model.metrics}.get("val_score") == val
        assert tracker.model_ids[version.version_id] == model.model_id
    selected = [m for m in models.values() if m.tags.get("genopt.selected") == "true"]
    assert [m.name for m in selected] == [V1.version_id]
    assert {m.key: m.value for m in selected[0].metrics}["test_score"] == 0.55
    assert "test_score" not in {m.key for m in models[V3.version_id].metrics}
    # the run lists the versions it produced among its logged models
    assert {o.model_id for o in run.outputs.model_outputs} == {m.model_id for m in models.values()}


def test_version_files_diffs_and_model_artifacts(tracked, tmp_path):
    tracker, client, run, _ = tracked
    rid = run.info.run_id
    v1 = f"versions/{V1.version_id}"
    instruction = _artifact_text(client, rid, f"{v1}/instruction.txt", tmp_path)
    assert instruction == V1.values["instruction"]
    assert _artifact_text(client, rid, f"{v1}/solve.py", tmp_path) == V1.values["solve"]
    record = json.loads(_artifact_text(client, rid, f"{v1}/version.json", tmp_path))
    assert record["parent_id"] == V0.version_id and record["reasoning"] == "more thought"
    patch = _artifact_text(client, rid, f"{v1}/diff.patch", tmp_path)
    assert "-Answer {question}" in patch and "+Think, then answer {question}" in patch
    v0_listing = client.list_artifacts(rid, f"versions/{V0.version_id}")
    v0_files = {f.path.rsplit("/", 1)[-1] for f in v0_listing}
    assert v0_files == {"instruction.txt", "solve.py", "version.json"}
    model_listing = client.list_logged_model_artifacts(tracker.model_ids[V1.version_id])
    model_files = {f.path for f in model_listing}
    assert {"instruction.txt", "solve.py", "version.json", "diff.patch"} <= model_files


def test_step_artifacts_hold_the_exact_learning_context(tracked, tmp_path):
    _, client, run, _ = tracked
    rid = run.info.run_id
    context = json.loads(_artifact_text(client, rid, "steps/001/context.json", tmp_path))
    assert context == [dict(m) for m in OPTIMIZER_MESSAGES]
    assert _artifact_text(client, rid, "steps/002/response.txt", tmp_path) == (
        '{"instruction": "proposal 2"}'
    )
    proposal = json.loads(_artifact_text(client, rid, "steps/002/proposal.json", tmp_path))
    assert proposal["invalid_reason"] == "missing placeholder {question}"
    assert proposal["proposal"] is None
    trials = _artifact_text(client, rid, "steps/001/trials.jsonl", tmp_path).splitlines()
    assert [json.loads(line)["input"] for line in trials] == [{"q": "s1-0"}, {"q": "s1-1"}]
    candidates = _artifact_text(client, rid, "steps/001/candidate_trials.jsonl", tmp_path)
    assert len(candidates.splitlines()) == 2
    step2 = {f.path.rsplit("/", 1)[-1] for f in client.list_artifacts(rid, "steps/002")}
    assert "candidate_trials.jsonl" not in step2


def test_metric_history_per_step(tracked):
    _, client, run, _ = tracked
    rid = run.info.run_id

    def history(key):
        points = sorted(client.get_metric_history(rid, key), key=lambda m: m.step)
        return [(m.step, m.value) for m in points]

    assert history("batch_score") == [(1, 0.5), (2, 0.5), (3, 0.5)]
    assert history("accepted") == [(1, 1), (2, 0), (3, 0)]
    assert history("valid") == [(1, 1), (2, 0), (3, 1)]
    assert history("rejected_proposals") == [(1, 0), (2, 1), (3, 1)]
    assert history("best_val_score") == [(1, 0.6), (2, 0.6), (3, 0.6)]
    # each evaluated version's validation score exactly once, at the step that made it
    assert history("val_score") == [(0, 0.5), (1, 0.6)]
    assert history("candidate_batch_score") == [(1, 1.0), (3, 1.0)]
    assert history("total_tokens") == [(1, 110), (2, 220), (3, 330)]
    assert history("total_tokens_cum") == [(1, 110), (2, 330), (3, 660)]
    assert history("totals/tokens") == [(3, 660)]


def test_test_score_logged_once_with_result_files(tracked, tmp_path):
    _, client, run, _ = tracked
    rid = run.info.run_id
    assert [m.value for m in client.get_metric_history(rid, "test_score")] == [0.55]
    summary = json.loads(_artifact_text(client, rid, "result.json", tmp_path))
    assert summary["selected_version"] == V1.version_id
    assert summary["stop_reason"] == "completed" and summary["test_score"] == 0.55
    lines = _artifact_text(client, rid, "steps.jsonl", tmp_path).splitlines()
    steps = [json.loads(line) for line in lines]
    assert [s["step"] for s in steps] == [1, 2, 3] and "context" not in steps[0]
    config = _artifact_text(client, rid, "config.yaml", tmp_path)
    assert LoopConfig.from_dict(yaml.safe_load(config)) == CONFIG
    spec = json.loads(_artifact_text(client, rid, "artifact_spec.json", tmp_path))
    assert [(p["name"], p["kind"], p["trainable"]) for p in spec["parameters"]] == [
        ("instruction", "prompt", True),
        ("solve", "code", False),
    ]


def test_llm_calls_are_traced_for_the_run(tracked):
    tracker, _, run, _ = tracked
    experiments = [run.info.experiment_id]  # search_traces needs them with run_id
    tracker.flush(traces=True)  # traces are exported asynchronously by MLflow
    traces = mlflow.search_traces(locations=experiments, run_id=run.info.run_id, return_type="list")
    by_name = {t.info.tags["mlflow.traceName"]: t for t in traces}
    assert set(by_name) == {f"evaluate {V0.version_id}", "step 1", "step 2", "step 3", "test"}
    counts = {name: len(t.data.spans) - 1 for name, t in by_name.items()}
    assert counts == {
        f"evaluate {V0.version_id}": 3, "step 1": 3, "step 2": 1, "step 3": 3, "test": 1
    }
    step2 = by_name["step 2"]
    (llm,) = [s for s in step2.data.spans if s.parent_id is not None]
    assert llm.name == "optimizer llm" and llm.span_type == "CHAT_MODEL"
    assert llm.inputs["messages"] == [{"role": "user", "content": "improve step 2"}]
    assert llm.outputs["choices"][0]["message"]["content"] == "answer to improve step 2"
    assert llm.end_time_ns - llm.start_time_ns == 2_000_000  # the call's own timing
    assert step2.info.token_usage["total_tokens"] == 15
    # a failed call is an error span, and its phase an error trace
    step3 = by_name["step 3"]
    failed = [s for s in step3.data.spans if s.status.status_code == "ERROR" and s.parent_id]
    assert [s.name for s in failed] == ["task llm"]
    assert step3.info.state.value == "ERROR" and by_name["step 1"].info.state.value == "OK"
    # each phase's trace is linked to the version it produced (the test: to the selected one)
    v1_traces = mlflow.search_traces(
        locations=experiments, model_id=tracker.model_ids[V1.version_id], return_type="list"
    )
    assert sorted(t.info.tags["mlflow.traceName"] for t in v1_traces) == ["step 1", "test"]


def test_fail_ends_the_run_failed_with_what_was_reported(store):
    uri, _ = store
    tracker = MlflowTracker(uri, experiment="tracking-test-fail", log_traces=False,
                            asynchronous=False)
    tracker.on_loop_start(LoopStart(CONFIG, "demo/toy", "objective", SPEC, V0))
    tracker.on_llm_call(_call("task", "ignored: traces are off"))
    tracker.on_version(VersionRecord(V0, "initial", None, 0.5))
    tracker.fail(RuntimeError("sandbox crashed"))
    tracker.fail("second call is harmless")
    tracker.on_step(_step(1, current=V0, candidate=None, accepted=False, val=None, best=0.5))
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["genopt.error"] == "RuntimeError: sandbox crashed"
    assert run.data.tags["genopt.stop_reason"] == "error"
    assert "batch_score" not in run.data.metrics  # nothing is written after the end
    assert set(_models(client, run)) == {V0.version_id}
    traces = mlflow.search_traces(
        locations=[run.info.experiment_id], run_id=tracker.run_id, return_type="list"
    )
    assert traces == []


def test_a_failed_write_is_counted_and_the_rest_is_still_tracked(store, monkeypatch):
    uri, _ = store
    real = MlflowClient.log_artifacts

    def failing(self, run_id, local_dir, artifact_path=None):
        if artifact_path == "steps/001":
            raise OSError("disk full")
        return real(self, run_id, local_dir, artifact_path)

    monkeypatch.setattr(MlflowClient, "log_artifacts", failing)
    tracker = MlflowTracker(uri, experiment="tracking-test-errors", log_traces=False)
    tracker.on_loop_start(LoopStart(CONFIG, "demo/toy", "objective", SPEC, V0))
    tracker.on_version(VersionRecord(V0, "initial", None, 0.5))
    tracker.on_version(VersionRecord(V1, "accepted", 1.0, 0.6))
    step = _step(1, current=V0, candidate=V1, accepted=True, val=0.6, best=0.6)
    tracker.on_step(step)
    tracker.on_loop_end(LoopResult(CONFIG, V1, 0.6, None, (), (step,), (), "steps", {}))
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert [e.split(":")[0] for e in tracker.errors] == ["write_step"]
    assert "disk full" in tracker.errors[0]
    assert run.info.status == "FINISHED" and run.data.tags["genopt.tracking_errors"] == "1"
    assert run.data.metrics["batch_score"] == 0.5  # written before the failing upload
    assert run.data.tags["genopt.selected_version"] == V1.version_id
    assert "test_score" not in run.data.metrics


def test_nested_runs_follow_the_active_run_only_when_asked(store):
    uri, _ = store
    start = LoopStart(CONFIG, "demo/toy", "objective", SPEC, V0)
    top = MlflowTracker(uri, experiment="tracking-test-nested", run_name="alone")
    top.on_loop_start(start)  # creates the experiment, with its artifacts next to the store
    top.fail("stop")
    with mlflow.start_run(experiment_id=top.experiment_id) as parent:
        child = MlflowTracker(uri, experiment="tracking-test-nested", nested=True, tags={"k": "v"})
        child.on_loop_start(start)
        child.fail("stop")
        sibling = MlflowTracker(uri, experiment="tracking-test-nested")
        sibling.on_loop_start(start)
        sibling.fail("stop")
        assert mlflow.active_run().info.run_id == parent.info.run_id
    client = MlflowClient(uri)
    child_run, top_run = client.get_run(child.run_id), client.get_run(top.run_id)
    assert child_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child_run.data.tags["k"] == "v"
    assert "mlflow.parentRunId" not in top_run.data.tags
    assert "mlflow.parentRunId" not in client.get_run(sibling.run_id).data.tags
    assert top_run.info.run_name == "alone"


def test_bad_arguments_are_named(store):
    start = LoopStart(CONFIG, "demo/toy", "objective", SPEC, V0)
    with pytest.raises(ValueError, match="file store"):
        MlflowTracker("/tmp/mlruns").on_loop_start(start)
    with pytest.raises(ValueError, match="parent_run_id"):
        MlflowTracker(parent_run_id="abc")
    assert mlflow.active_run() is None
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        MlflowTracker(store[0], experiment="tracking-test-nested", nested=True).on_loop_start(start)


def test_exported_model_is_the_selected_logged_model(tracked, tmp_path):
    tracker, client, run, _ = tracked
    rid = run.info.run_id
    assert _artifact_text(client, rid, "export/submission.csv", tmp_path) == "id,answer\n1,42\n"
    model_id = tracker.model_ids[V1.version_id]
    model = client.get_logged_model(model_id)
    assert model.tags["genopt.exported_model"] == "true"
    assert "mlflow.model.isExternal" not in model.tags
    loaded = mlflow.pyfunc.load_model(f"models:/{model_id}")
    assert list(loaded.predict(["a"])) == ["a!"]
    # the other versions keep their external placeholder
    assert client.get_logged_model(tracker.model_ids[V0.version_id]).tags[
        "mlflow.model.isExternal"] == "true"
