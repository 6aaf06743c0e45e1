"""The MLflow plugin: run context tags, prompt registry, optimize_prompts backend, lineage pages.

Everything runs for real against a SQLite MLflow store; LLMs are scripted. The lineage pages
are checked here through Flask's test client (the browser test is test_plugin_browser.py).
"""

from __future__ import annotations

import importlib.metadata
import json
import threading
import time

import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_genopt.config import LoopConfig
from mlflow_genopt.events import LoopCallback
from mlflow_genopt.llm.scripted import ScriptedLLM
from mlflow_genopt.plugin.active import active_config, loop_context
from mlflow_genopt.plugin.prompts import prompt_name, register_prompts, to_mlflow_template
from mlflow_genopt.build import run_loop

pytestmark = pytest.mark.timeout(300)

IMPROVED = "Compute carefully.\n{question}\nEnd with: The answer is <answer>."
SMALL_SPLITS = {"train_size": 6, "val_size": 4, "test_size": 3}


def task_model(messages, i):
    """Answers arithmetic correctly only when the prompt asks for care."""
    question = messages[-1]["content"]
    if "Answer with the integer only" in question and "Compute carefully" in question:
        expression = question.split("What is ")[1].split("?")[0]
        return f"The answer is {eval(expression)}."
    return "I am not sure."


def scripted_bbeh_loop(uri: str, experiment: str = "genopt", *, steps: int = 4, seed: int = 0,
                       improved: str = IMPROVED, callbacks=(), **kwargs):
    """A BBEH loop with scripted models: step 1 invalid (not JSON), step 2 accepted (the prompt
    ``improved``, which makes the task model right), step 3 rejected, step 4 invalid (a
    placeholder the task does not fill in)."""
    from genopt_projects.bbeh import PROJECT

    optimizer = ScriptedLLM([
        "this is not json",
        json.dumps({"reasoning": "ask for care", "prompt": improved}),
        json.dumps({"reasoning": "shorter is better", "prompt": "Be brief.\n{question}"}),
        json.dumps({"reasoning": "an unknown placeholder", "prompt": "{question} {hint}"}),
    ][:steps])
    config = PROJECT.config(task="generated_arithmetic", steps=steps, batch_size=3, seed=seed,
                            max_workers=2, task_options=SMALL_SPLITS,
                            edit_format="json", repair_attempts=0)  # one answer per step
    return run_loop(config, tracking=uri, experiment=experiment, cache_dir=None,
                    optimizer_llm=optimizer, task_llm=ScriptedLLM(task_model),
                    callbacks=callbacks, **kwargs)


class StartsUserRuns(LoopCallback):
    """What user code around a loop does: start MLflow runs of its own while the loop runs, in
    the loop's thread and in a worker thread."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.run_ids: list[str] = []

    def _start(self, name: str) -> None:
        client = MlflowClient(self.uri)
        experiment = client.get_experiment_by_name("user-runs") or client.get_experiment(
            client.create_experiment("user-runs"))
        with mlflow.start_run(experiment_id=experiment.experiment_id, run_name=name,
                              nested=mlflow.active_run() is not None) as run:
            self.run_ids.append(run.info.run_id)

    def on_step(self, record) -> None:
        if record.step == 1:
            self._start("in-loop-thread")
            worker = threading.Thread(target=self._start, args=("in-worker-thread",))
            worker.start()
            worker.join(30)


@pytest.fixture(scope="module")
def loop_store(tmp_path_factory):
    """One scripted BBEH loop tracked into a fresh SQLite store, with user runs started mid-loop."""
    previous = mlflow.get_tracking_uri()
    folder = tmp_path_factory.mktemp("plugin-store")
    uri = f"sqlite:///{folder}/mlflow.db"
    user_runs = StartsUserRuns(uri)
    started = time.monotonic()
    result = scripted_bbeh_loop(uri, callbacks=[user_runs])
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("genopt").experiment_id])
    yield {"uri": uri, "result": result, "run": run, "client": client, "folder": folder,
           "user_runs": user_runs.run_ids, "loop_s": time.monotonic() - started}
    mlflow.set_tracking_uri(previous)


# --- entry points -------------------------------------------------------------------------------
def test_the_package_declares_both_mlflow_entry_points_and_mlflow_loads_them():
    groups = {
        group: {ep.name: ep.value for ep in importlib.metadata.entry_points(group=group)}
        for group in ("mlflow.app", "mlflow.run_context_provider")
    }
    assert groups["mlflow.app"]["genopt"] == "mlflow_genopt.plugin.lineage:create_app"
    assert groups["mlflow.run_context_provider"]["genopt"] == (
        "mlflow_genopt.plugin.run_context:GenoptRunContext")

    from mlflow.server import _find_app, _is_factory
    from mlflow.tracking.context.registry import _run_context_provider_registry

    assert _is_factory(_find_app("genopt"))  # called once per server worker, like basic-auth
    assert any(type(p).__name__ == "GenoptRunContext" for p in _run_context_provider_registry)


# --- run context provider -----------------------------------------------------------------------
def test_runs_started_while_a_loop_is_active_carry_its_genopt_tags(loop_store):
    client, result = loop_store["client"], loop_store["result"]
    config = result.config
    assert len(loop_store["user_runs"]) == 2  # one in the loop's thread, one in a worker thread
    for run_id in loop_store["user_runs"]:
        tags = client.get_run(run_id).data.tags
        assert tags["genopt.project"] == "bbeh"
        assert tags["genopt.task"] == "bbeh/generated_arithmetic"
        assert tags["genopt.init"] == "prompt_only"
        assert tags["genopt.config_hash"] == config.config_hash()
        assert tags["genopt.library_version"] == importlib.metadata.version("mlflow-genopt")
    # the loop's own run gets the provider's tags too (resolved with the tracker's own)
    loop_tags = loop_store["run"].data.tags
    assert loop_tags["genopt.library_version"] == importlib.metadata.version("mlflow-genopt")
    assert loop_tags["genopt.config_hash"] == config.config_hash()


def test_user_code_marks_its_own_runs_with_loop_context_and_nothing_leaks_after(tmp_path):
    import mlflow_genopt.tracking.tracker  # noqa: F401  (genopt's tracking in use in this process)

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    config = LoopConfig(project="bbeh", task="generated_boolean", init="prompt_and_extraction",
                        batch_size=5)
    try:
        with loop_context(config):
            assert active_config() is config
            with mlflow.start_run() as inside:
                pass
        assert active_config() is None
        with mlflow.start_run() as after:
            pass
        # explicit tags win over the provider's
        with loop_context(config), mlflow.start_run(tags={"genopt.task": "mine"}) as explicit:
            pass
    finally:
        mlflow.set_tracking_uri(previous)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    inside_tags = client.get_run(inside.info.run_id).data.tags
    after_tags = client.get_run(after.info.run_id).data.tags
    assert inside_tags["genopt.init"] == "prompt_and_extraction"
    assert inside_tags["genopt.config_hash"] == config.config_hash()
    assert "genopt.config_hash" not in after_tags and "genopt.project" not in after_tags
    assert after_tags["genopt.library_version"] == inside_tags["genopt.library_version"]
    assert client.get_run(explicit.info.run_id).data.tags["genopt.task"] == "mine"


def test_concurrent_loops_in_threads_each_see_their_own_config():
    from mlflow_genopt.plugin.run_context import GenoptRunContext

    provider, seen, barrier = GenoptRunContext(), {}, threading.Barrier(2, timeout=10)

    def work(batch_size):
        with loop_context(LoopConfig(project="bbeh", batch_size=batch_size)):
            barrier.wait()  # both loops active at once
            seen[batch_size] = provider.tags()["genopt.config_hash"]
            barrier.wait()

    threads = [threading.Thread(target=work, args=(b,)) for b in (1, 5)]
    [t.start() for t in threads]
    [t.join(20) for t in threads]
    assert seen == {b: LoopConfig(project="bbeh", batch_size=b).config_hash() for b in (1, 5)}
    # code outside both loops, while two are active, cannot tell which: no loop tags
    with loop_context(LoopConfig(project="bbeh", batch_size=1)), loop_context(LoopConfig(project="bbeh", batch_size=2)):
        pass
    assert active_config() is None


# --- prompt registry ----------------------------------------------------------------------------
def test_selected_prompt_is_registered_with_the_run_linked_and_loads_back_by_uri(loop_store):
    client, result, run = loop_store["client"], loop_store["result"], loop_store["run"]
    assert result.selected.values["prompt"] == IMPROVED
    name = "genopt-bbeh-generated_arithmetic-prompt"
    uri = run.data.tags["genopt.registered_prompts"]
    assert uri == f"prompts:/{name}/1"  # extract_answer is frozen code: not a prompt, not registered

    mlflow.set_tracking_uri(loop_store["uri"])
    prompt = mlflow.genai.load_prompt(uri)
    assert prompt.template == IMPROVED.replace("{question}", "{{question}}")
    question = "What is 3 * 4 + 1? Answer with the integer only."
    # MLflow renders exactly the text the loop sent to the task model
    assert prompt.format(question=question) == IMPROVED.replace("{question}", question)
    assert prompt.tags["genopt.run_id"] == run.info.run_id
    assert prompt.tags["genopt.version_id"] == result.selected.version_id
    linked = json.loads(client.get_run(run.info.run_id).data.tags["mlflow.linkedPrompts"])
    assert {"name": name, "version": "1"} in linked

    # registering the same text again (e.g. a second loop that found it) adds no version
    again = register_prompts(client, result, _bbeh_spec(), run_id=run.info.run_id)
    assert again == [uri]
    assert [int(v.version) for v in client.search_prompt_versions(name)] == [1]


def _bbeh_spec():
    from genopt_projects.bbeh import PROJECT

    return PROJECT.starting_artifacts["prompt_only"].spec


def test_placeholder_conversion_touches_only_declared_placeholders():
    text = 'Reply as JSON like {"answer": 1}.\n{question}\nKeep {question} and {other}.'
    template = to_mlflow_template(text, ("{question}",))
    assert template == 'Reply as JSON like {"answer": 1}.\n{{question}}\nKeep {{question}} and {other}.'
    from mlflow.entities.model_registry import PromptVersion

    rendered = PromptVersion("p", 1, template).format(question="Q?")
    assert rendered == text.replace("{question}", "Q?")
    assert prompt_name("bbeh", "word sorting/v2", "prompt") == "genopt-bbeh-word-sorting-v2-prompt"


def test_register_prompts_false_registers_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    scripted_bbeh_loop(uri, steps=2, register_prompts=False)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("genopt").experiment_id])
    assert "genopt.registered_prompts" not in run.data.tags
    assert client.get_prompt("genopt-bbeh-generated_arithmetic-prompt") is None


# --- mlflow.genai.optimize_prompts backend ------------------------------------------------------
def test_optimize_prompts_runs_a_genopt_loop_as_its_optimizer(tmp_path):
    from mlflow.genai.scorers import scorer

    from mlflow_genopt.plugin.optimizer import GenoptPromptOptimizer

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment_id = MlflowClient(uri).create_experiment("prompt-opt")
        base = mlflow.genai.register_prompt(name="qa", template="Q: {{question}}")

        def predict_fn(question: str) -> str:
            text = mlflow.genai.load_prompt("prompts:/qa/1").format(question=question)
            # a deterministic "model": right only when the prompt asks to compute carefully
            if "Compute carefully" in text:
                return str(eval(question.split("What is ")[1].split("?")[0]))
            return "not sure"

        @scorer
        def exact_match(outputs, expectations) -> float:
            return 1.0 if str(outputs) == str(expectations["expected_response"]) else 0.0

        data = [{"inputs": {"question": f"What is {a} + {b}?"}, "outputs": str(a + b)}
                for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
        improved = "Compute carefully. Q: {{question}}"
        llm = ScriptedLLM([
            json.dumps({"reasoning": "a variable the app does not fill", "qa": "Compute carefully. {{topic}}"}),
            json.dumps({"reasoning": "ask for care", "qa": improved}),
        ])
        optimizer = GenoptPromptOptimizer(llm, steps=2, batch_size=2, memory_size=2,
                                          acceptance="improve",  # one JSON answer per step:
                                          loop_options={"edit_format": "json", "repair_attempts": 0})
        with mlflow.start_run(experiment_id=experiment_id):  # optimize_prompts logs into it
            result = mlflow.genai.optimize_prompts(
                predict_fn=predict_fn, train_data=data, prompt_uris=[base.uri],
                optimizer=optimizer, scorers=[exact_match],
            )
    finally:
        mlflow.set_tracking_uri(previous)

    assert result.optimizer_name == "GenoptPromptOptimizer"
    (optimized,) = result.optimized_prompts
    assert optimized.name == "qa" and int(optimized.version) == 2
    assert optimized.template == improved
    assert (result.initial_eval_score, result.final_eval_score) == (0.0, 1.0)
    # the optimizer saw the scorer's feedback, and was told the placeholder must stay
    context = llm.calls[0]["messages"][-1]["content"]
    assert "Feedback: Score 0. Expected: " in context and "Output: not sure" in context
    assert "must keep these placeholders verbatim: {{question}}" in context

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("prompt-opt")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "genopt.loop_run_id" in r.data.tags]
    loop_run = client.get_run(parent.data.tags["genopt.loop_run_id"])
    assert loop_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert loop_run.data.params["batch_size"] == "2" and loop_run.data.params["acceptance"] == "improve"
    assert loop_run.data.tags["genopt.project"] == "optimize_prompts"
    models = client.search_logged_models([experiment.experiment_id])
    assert sorted(m.tags["genopt.status"] for m in models) == ["accepted", "initial"]


def test_optimizer_rejects_bad_settings_before_optimizing():
    from mlflow_genopt.config import ConfigError
    from mlflow_genopt.plugin.optimizer import GenoptPromptOptimizer

    with pytest.raises(ConfigError, match="acceptance"):
        GenoptPromptOptimizer(ScriptedLLM([]), acceptance="sometimes")
    with pytest.raises(ConfigError, match="batch_size"):
        GenoptPromptOptimizer(ScriptedLLM([]), batch_size=0)
    assert GenoptPromptOptimizer("openai:/gpt-4o").optimizer_model == "openai:gpt-4o"


# --- lineage pages (Flask test client; the browser test drives a real server) -------------------
@pytest.fixture(scope="module")
def pages(loop_store):
    from flask import Flask

    from mlflow_genopt.plugin import lineage
    from mlflow_genopt.plugin.lineage_data import LineageReader

    app = Flask("genopt-test")
    lineage.register(app, reader_factory=lambda: LineageReader(MlflowClient(loop_store["uri"])))
    return app.test_client()


def test_loop_page_shows_the_version_tree_and_the_selected_version_by_default(pages, loop_store):
    result, run_id = loop_store["result"], loop_store["run"].info.run_id
    page = pages.get(f"/genopt/runs/{run_id}")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    ids = [v.version.version_id for v in result.versions]
    assert all(f'data-version="{vid}"' in html for vid in ids)
    assert html.count('class="badge rejected"') >= 1 and "&#9733; selected" in html
    assert f'<code data-testid="detail-version">{result.selected.version_id}</code>' in html
    assert '<span class="add">+Compute carefully.</span>' in html  # diff against its parent
    assert "ask for care" in html  # the optimizer's reasoning
    assert "# Objective" in html  # the learning context
    assert f"#/experiments/{loop_store['run'].info.experiment_id}/runs/{run_id}" in html


def test_a_version_diffs_against_any_other_and_invalid_steps_show_why(pages, loop_store):
    result, run_id = loop_store["result"], loop_store["run"].info.run_id
    rejected = next(v.version for v in result.versions if v.status == "rejected")
    initial = result.versions[0].version
    html = pages.get(f"/genopt/runs/{run_id}?version={rejected.version_id}"
                     f"&against={initial.version_id}").get_data(as_text=True)
    assert f"--- {initial.version_id}/prompt" in html and "+Be brief." in html
    html = pages.get(f"/genopt/runs/{run_id}?step=1").get_data(as_text=True)
    assert "answer is not JSON" in html and "this is not json" in html
    assert pages.get(f"/genopt/runs/{run_id}?version=v9-nothere").status_code == 404
    assert pages.get("/genopt/runs/0123456789abcdef").status_code == 404


def test_index_lists_loop_runs_only_and_compare_diffs_two_best_versions(pages, loop_store):
    run_id = loop_store["run"].info.run_id
    html = pages.get("/genopt/").get_data(as_text=True)
    assert f"/genopt/runs/{run_id}" in html
    assert not any(f"/genopt/runs/{r}" in html for r in loop_store["user_runs"])
    page = pages.get(f"/genopt/compare?a={run_id}&b={run_id}")
    assert page.status_code == 200 and "No difference" in page.get_data(as_text=True)
    assert pages.get(f"/genopt/compare?a={run_id}").status_code == 400
    # a run that is not a loop run is refused with a reason
    assert pages.get(f"/genopt/runs/{loop_store['user_runs'][0]}").status_code == 404
