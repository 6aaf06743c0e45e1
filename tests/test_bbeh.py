"""The BBEH case study: data, scoring, splits and a scripted loop through the real sandbox."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED_DATA
from genopt_projects.bbeh import PROJECT
from genopt_projects.bbeh.data import BBEH_TASKS, generate_task, load_examples
from genopt_projects.bbeh.scoring import is_correct
from genopt_projects.bbeh.task import BBEHTask
from mlflow_genopt import ArtifactVersion, ConfigError
from mlflow_genopt.llm.scripted import ScriptedLLM
from mlflow_genopt.build import run_loop

BBEH_DIR = SHARED_DATA / "bbeh" / "benchmark_tasks"
needs_bbeh = pytest.mark.skipif(not BBEH_DIR.is_dir(), reason=f"BBEH data not found at {BBEH_DIR}")


@pytest.mark.parametrize("answer,target,expected", [
    ("(A)", "a", True), ("A", "(a)", True), ("3.0", "3", True), ("True.", "true", True),
    ("**False**", "false", True), ("$\\boxed{42}$", "42", True), ("'x', 'y'", "x,y", True),
    ("7", "8", False), ("yes", "no", False),
])
def test_bbeh_style_normalisation(answer, target, expected):
    assert is_correct(answer, target) is expected


def test_generated_tasks_are_seeded_distinct_and_exact():
    first = generate_task("generated_arithmetic", 60, seed=0)
    assert first == generate_task("generated_arithmetic", 60, seed=0)
    assert first != generate_task("generated_arithmetic", 60, seed=1)
    assert len({e["input"] for e in first}) == 60
    for example in first:
        expression = example["input"].removeprefix("What is ").split("?")[0]
        assert str(eval(expression)) == example["target"]
    booleans = generate_task("generated_boolean", 40)
    assert {e["target"] for e in booleans} == {"True", "False"}


@needs_bbeh
def test_real_bbeh_tasks_load_from_a_benchmark_tasks_directory():
    for task in ("boolean_expressions", "disambiguation_qa", "word_sorting"):
        examples = load_examples(task, str(BBEH_DIR))
        assert len(examples) in (120, 200)
        assert all(e["input"] and e["target"] for e in examples)
    assert len(BBEH_TASKS) == 23


def test_unknown_task_and_missing_data_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="task: unknown BBEH task 'nope'; choose one of"):
        load_examples("nope")
    with pytest.raises(ConfigError, match=r"data_dir: no task.json for word_sorting under"):
        load_examples("word_sorting", str(tmp_path))
    bad = tmp_path / "bbeh_word_sorting"
    bad.mkdir()
    (bad / "task.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable BBEH task.json"):
        load_examples("word_sorting", str(tmp_path))


@needs_bbeh
def test_splits_follow_the_study_and_ignore_the_loop_seed():
    llm = ScriptedLLM([])
    a = BBEHTask("boolean_expressions", llm, data_dir=str(BBEH_DIR), seed=1)
    b = BBEHTask("boolean_expressions", llm, data_dir=str(BBEH_DIR), seed=2)
    sizes = [len(a.examples(s)) for s in ("train", "val", "test")]
    assert sizes == [15, 10, 175]
    assert [e.id for e in a.examples("val")] == [e.id for e in b.examples("val")]
    ids = [e.id for s in ("train", "val", "test") for e in a.examples(s)]
    assert len(set(ids)) == 200


def test_trainable_extraction_runs_sandboxed_and_failures_become_feedback():
    task = BBEHTask("generated_arithmetic", ScriptedLLM(lambda messages, i: "The answer is 5."))
    examples = task.examples("train")[:3]
    base = {"prompt": "Q: {question}", "extract_answer": PROJECT.starting_artifacts[
        "prompt_only"].values["extract_answer"]}
    trials = task.evaluate(ArtifactVersion(base, 0), examples)
    assert [t.output["answer"] for t in trials] == ["5", "5", "5"]
    assert all(t.score == (1.0 if e.target == "5" else 0.0) for t, e in zip(trials, examples))

    leaky = "import os\ndef extract_answer(response):\n    return os.environ.get('OPENAI_API_KEY', 'absent')\n"
    raising = "def extract_answer(response):\n    return 1 / 0\n"
    import os

    os.environ["OPENAI_API_KEY"] = "sk-test-secret"
    try:
        leaked = task.evaluate(ArtifactVersion({**base, "extract_answer": leaky}, 1), examples)
    finally:
        del os.environ["OPENAI_API_KEY"]
    assert all(t.output["answer"] == "absent" for t in leaked)
    failed = task.evaluate(ArtifactVersion({**base, "extract_answer": raising}, 2), examples)
    assert all(t.score == 0.0 and "ZeroDivisionError" in t.feedback for t in failed)


def test_scripted_loop_on_the_generated_task_tracks_into_mlflow(tmp_path):
    """The whole path a user runs, with scripted LLMs: versions, contexts and scores in MLflow."""
    from mlflow import MlflowClient

    def task_model(messages, i):
        question = messages[-1]["content"]
        if "Answer with the integer only" in question and "Compute carefully" in question:
            expression = question.split("What is ")[1].split("?")[0]
            return f"The answer is {eval(expression)}."
        return "I am not sure."

    improved = "Compute carefully.\n{question}\nEnd with: The answer is <answer>."
    optimizer = ScriptedLLM([
        "this is not json",
        json.dumps({"reasoning": "ask for care", "prompt": improved}),
        json.dumps({"reasoning": "drop the placeholder", "prompt": "no placeholder"}),
        json.dumps({"reasoning": "a template variable", "prompt": "{question} -> {answer}"}),
    ])
    config = PROJECT.config(task="generated_arithmetic", steps=4, batch_size=3,
                            acceptance="improve", max_workers=2,
                            edit_format="json", repair_attempts=0)  # one scripted answer per step
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_loop(config, tracking=uri, experiment="bbeh-test", cache_dir=None,
                      optimizer_llm=optimizer, task_llm=ScriptedLLM(task_model))

    assert result.best_val_score == 1.0 and result.test_score == 1.0
    assert result.selected.values["prompt"] == improved
    assert [s.valid for s in result.steps] == [False, True, True, False]
    # an instruction without the input gets the input appended (the repair is recorded) ...
    assert result.steps[2].proposal["prompt"] == "no placeholder\n\n{question}"
    assert result.steps[2].candidates[0].repairs == (
        "prompt: appended the missing placeholder(s) {question}",)
    # ... a placeholder the task does not fill in is refused
    assert "unknown placeholder(s) {answer}; only {question} are filled in" in result.steps[3].invalid_reason

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("bbeh-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["batch_size"] == "3" and run.data.params["init"] == "prompt_only"
    assert run.data.metrics["test_score"] == 1.0
    history = client.get_metric_history(run.info.run_id, "rejected_proposals")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [1, 1, 1, 2]
    models = client.search_logged_models([experiment.experiment_id])
    assert len(models) == 3  # the starting version and the two valid proposals
    selected = [m for m in models if m.tags.get("genopt.selected") == "true"]
    assert len(selected) == 1 and selected[0].name == result.selected.version_id
    context_path = client.download_artifacts(run.info.run_id, "steps/002/context.json",
                                             str(tmp_path))
    messages = json.loads(open(context_path).read())
    assert messages == list(result.steps[1].context)


def test_a_question_too_long_for_the_task_model_is_a_failed_trial_not_a_crash():
    from mlflow_genopt.llm.base import PromptTooLong

    def model(messages, i):
        if "not" in messages[-1]["content"]:
            raise PromptTooLong("too many tokens")
        return "The answer is True."

    task = BBEHTask("generated_boolean", ScriptedLLM(model))
    version = ArtifactVersion(dict(PROJECT.starting_artifacts["prompt_only"].values), 0)
    examples = task.examples("train")
    trials = task.evaluate(version, examples)
    too_long = [t for t, e in zip(trials, examples) if "not" in e.input]
    assert too_long and all(t.score == 0.0 and "context window" in t.error for t in too_long)
    assert any(t.score == 1.0 for t in trials)
