"""Studies: Optuna searching loop design choices, every loop a nested MLflow run.

Real BBEH loops (generated task, real sandbox) with scripted LLMs, real SQLite / journal
storages and a real SQLite MLflow store. The PostgreSQL multi-worker tests are in
test_study_postgres.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from genopt_projects.bbeh import PROJECT
from mlflow_genopt import ConfigError, LoopCallback
from mlflow_genopt.cli import build_config, build_study_config, main, make_parser
from mlflow_genopt.llm.scripted import ScriptedLLM
from mlflow_genopt.study import (
    Categorical,
    FloatRange,
    IntRange,
    StudyConfig,
    load_search_space,
    parse_param,
    parse_search_space,
    run_study,
)

GOOD_PROMPT = "Compute carefully.\n{question}\nEnd with: The answer is <answer>."
BAD_PROMPT = "Guess.\n{question}"
SMALL = {"val_size": 4, "test_size": 4}  # keeps every loop around a second


def task_model(messages, i):
    """Right exactly when the prompt asks for care (generated_arithmetic questions)."""
    question = messages[-1]["content"]
    if "Compute carefully" in question:
        return f"The answer is {eval(question.split('What is ')[1].split('?')[0])}."
    return "I am not sure."


def optimizer_model(messages, i):
    """Good rewrites only where extract_answer is trainable (init=prompt_and_extraction)."""
    frozen = "# Frozen parameters" in messages[-1]["content"]
    return json.dumps({"reasoning": "r", "prompt": BAD_PROMPT if frozen else GOOD_PROMPT})


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # summaries and lock files default to the working directory


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One SQLite MLflow store for the module: creating its schema costs seconds."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    MlflowClient(uri).search_experiments()
    return uri


def base(**changes):
    # the scripted optimizers give one JSON answer per step: no repair round
    changes = {"edit_format": "json", "repair_attempts": 0, **changes}
    return PROJECT.config(task="generated_arithmetic", max_workers=2, task_options=SMALL,
                          **changes)


def study_trials(storage, name):
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def children(client, experiment_id, parent_id):
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.info.run_id: r for r in runs}


# --- search space ---------------------------------------------------------------------------------
def test_search_space_forms_flags_and_files(tmp_path):
    assert parse_param("batch_size=1,3,5") == ("batch_size", Categorical((1, 3, 5)))
    assert parse_param("credit_horizon=1,none") == ("credit_horizon", Categorical((1, None)))
    assert parse_param("memory_size=0..6:2") == ("memory_size", IntRange(0, 6, 2))
    assert parse_param("optimizer_temperature=0.1..1.0:log") == (
        "optimizer_temperature", FloatRange(0.1, 1.0, None, True))
    assert parse_param("acceptance=[improve, always]")[1] == Categorical(("improve", "always"))
    assert parse_param("task_options.train_size=10,15")[1].values() == (10, 15)
    assert IntRange(0, 6, 2).values() == (0, 2, 4, 6)
    assert FloatRange(0.0, 1.0, 0.25).values() == (0.0, 0.25, 0.5, 0.75, 1.0)
    path = tmp_path / "space.yaml"
    path.write_text("init: [prompt_only]\nmemory_size: {low: 1, high: 3}\nseed: 7\n")
    assert load_search_space(path) == {"init": Categorical(("prompt_only",)),
                                       "memory_size": IntRange(1, 3), "seed": Categorical((7,))}

    config = StudyConfig(base(), parse_search_space({"batch_size": [1, 2], "init": [
        "prompt_only", "prompt_and_extraction"], "selection": ["current", "best"]}))
    assert config.resolved_sampler() == "grid" and config.target_trials() == 8
    assert config.resolved_pruner() == "median"
    continuous = StudyConfig(base(), {"optimizer_temperature": FloatRange(0.1, 1.0)}, n_trials=7)
    assert continuous.resolved_sampler() == "tpe" and continuous.target_trials() == 7


@pytest.mark.parametrize("spec,message", [
    ({"batch_size": [0, 1]}, "search space: batch_size=0: batch_size: must be an integer >= 1, got 0"),
    ({"acceptance": ["maybe"]}, "search space: acceptance='maybe': acceptance: must be one of"),
    ({"project": ["x"]}, "search space: project: not a searchable loop config field"),
    ({"nope": [1]}, "search space: nope: not a searchable loop config field"),
    ({"memory_size": {"low": 3, "high": 1}}, "memory_size: high (1) must be >= low (3)"),
    ({"memory_size": {"low": 1}}, "memory_size: a range is {low, high[, step][, log]}"),
    ({"trainable": [["prompt"]]}, "write lists as a comma-separated string"),
    ({"credit_horizon": [1, None]}, "search space: credit_horizon=1: credit_horizon: applies to "
                                    "multi-step tasks"),
])
def test_bad_search_spaces_are_one_line_errors_before_anything_runs(spec, message):
    with pytest.raises(ConfigError) as info:
        StudyConfig(base(), parse_search_space(spec))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_study_settings_are_one_line_errors():
    space = {"batch_size": Categorical((1, 2))}
    for kwargs, message in [
        ({"sampler": "annealing"}, "sampler: must be one of auto, grid, brute_force, tpe, random"),
        ({"objectives": ("score", "tokens"), "pruner": "median"}, "pruner: Optuna cannot prune multi-objective"),
        ({"objectives": "tokens"}, "objectives: must be 'score' or 'score,tokens'"),
        ({"storage": "redis://x"}, "storage: unsupported URL 'redis://x'"),
        ({"n_trials": -1}, "n_trials: must be an integer >= 0 or none"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            StudyConfig(base(), space, **kwargs)
    with pytest.raises(ConfigError, match="sampler: grid needs a finite space; give optimizer_temperature a step"):
        StudyConfig(base(), {"optimizer_temperature": FloatRange(0.1, 1.0)}, sampler="grid")


def test_cli_space_is_the_projects_unless_a_file_or_flags_say_otherwise(tmp_path):
    parse = lambda *argv: make_parser().parse_args(["study", "bbeh", *argv])  # noqa: E731
    assert set(build_study_config("bbeh", parse()).search_space) == {"init", "batch_size"}
    # an explicit loop-config flag fixes the field; --param adds or replaces one
    config = build_study_config("bbeh", parse("--batch-size", "3", "--param", "selection=current,best"))
    assert config.search_space == {"init": Categorical(("prompt_only", "prompt_and_extraction")),
                                   "selection": Categorical(("current", "best"))}
    assert config.base.batch_size == 3
    space = tmp_path / "space.yaml"
    space.write_text("memory_size: [0, 3]\n")
    config = build_study_config("bbeh", parse("--space", str(space), "--params",
                                              "acceptance=improve,always; seed=0,1"))
    assert sorted(config.search_space) == ["acceptance", "memory_size", "seed"]
    assert config.target_trials() == 8
    assert main(["study", "bbeh", "--param", "batch_size=0,1"]) == 2  # one line, no run


# --- end to end ---------------------------------------------------------------------------------
def test_one_command_runs_a_grid_study_with_nested_runs_and_a_summary(tmp_path, mlflow_uri, capsys):
    """`genopt study` over init x memory_size x batch_size: parent run, nested loop runs,
    summary artifacts, and a recommended.yaml that `genopt run --config` takes back."""
    answers = tmp_path / "optimizer.json"
    answers.write_text(json.dumps([json.dumps({"reasoning": "r", "prompt": GOOD_PROMPT}),
                                   "not json"]))
    task_answers = tmp_path / "task.json"
    task_answers.write_text(json.dumps(["The answer is 7.", "The answer is 12.", "no idea"]))
    storage = f"sqlite:///{tmp_path}/optuna.db"
    code = main([
        "study", "bbeh", "--task", "generated_arithmetic", "--steps", "2", "--max-workers", "2",
        "--option", "val_size=4", "--option", "test_size=4",
        "--optimizer-model", f"scripted:{answers}", "--task-model", f"scripted:{task_answers}",
        "--edit-format", "json", "--repair-attempts", "0",
        "--param", "init=prompt_only,prompt_and_extraction", "--param", "memory_size=0,2",
        "--param", "batch_size=1,2", "--pruner", "none", "--storage", storage,
        "--study-name", "e2e", "--tracking-uri", mlflow_uri, "--experiment", "study-e2e",
        "--no-cache", "--summary-dir", str(tmp_path / "summary"),
    ])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    assert "trials:           8 complete, 0 pruned, 0 failed" in out.out

    trials = study_trials(storage, "e2e")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8
    points = {(t.params["init"], t.params["memory_size"], t.params["batch_size"]) for t in trials}
    assert len(points) == 8  # the whole grid, each point once
    for t in trials:
        result = t.user_attrs["result"]
        assert t.value == result["best_val_score"]  # the objective is validation, never test
        assert result["test_score"] is not None and result["tokens"] > 0

    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("study-e2e")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`genopt.study` = 'e2e' and "
                                   "tags.`genopt.study.sampler` = 'grid'")
    assert parent.info.status == "FINISHED"
    runs = children(client, experiment.experiment_id, parent.info.run_id)
    assert set(runs) == {t.user_attrs["mlflow_run_id"] for t in trials}
    for t in trials:
        run = runs[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["genopt.trial_number"] == str(t.number)
        assert run.data.tags["genopt.trial_state"] == "COMPLETE"
        assert json.loads(run.data.tags["genopt.trial_params"]) == t.params
        assert run.data.params["batch_size"] == str(t.params["batch_size"])
        assert run.data.metrics["test_score"] == t.user_attrs["result"]["test_score"]

    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/trials.csv", "summary/trials.md", "summary/curves.png",
            "summary/param_importances.json", "summary/study.json"} <= artifacts
    assert parent.data.metrics["n_complete"] == 8
    table = (tmp_path / "summary" / "summary" / "trials.md").read_text()
    assert table.count("| COMPLETE |") == 8 and "(recommended)" in table
    assert (tmp_path / "summary" / "summary" / "curves.png").read_bytes()[:4] == b"\x89PNG"

    recommended = Path(client.download_artifacts(parent.info.run_id, "recommended.yaml", str(tmp_path)))
    args = make_parser().parse_args(["run", "bbeh", "--config", str(recommended)])
    reused = build_config("bbeh", args)
    best = max(trials, key=lambda t: (t.value, -t.user_attrs["result"]["tokens"], -t.number))
    assert reused.to_dict() == best.user_attrs["config"]


def test_pruning_stops_losing_loops_early_and_records_their_spend(tmp_path, mlflow_uri):
    optimizer = ScriptedLLM(optimizer_model)
    config = StudyConfig(
        base(steps=4),
        parse_search_space({"init": ["prompt_only", "prompt_and_extraction"], "batch_size": [1, 2, 3]}),
        storage=f"sqlite:///{tmp_path}/optuna.db", study_name="prune",
        pruner="median", pruner_startup_trials=1, sampler_seed=0,
    )
    result = run_study(config, tracking_uri=mlflow_uri, experiment="study-prune", cache_dir=None,
                       optimizer_llm=optimizer, task_llm=ScriptedLLM(task_model),
                       summary_dir=tmp_path / "summary")
    pruned = [t for t in result.trials if t.state == "PRUNED"]
    complete = [t for t in result.trials if t.state == "COMPLETE"]
    assert pruned and len(pruned) + len(complete) == 6
    assert result.recommended.params["init"] == "prompt_and_extraction"
    client = MlflowClient(mlflow_uri)
    for t in pruned:
        assert t.params["init"] == "prompt_only"
        assert t.steps_run < 4 and t.stop_reason == "pruned"  # stopped early
        assert t.tokens > 0 and t.llm_calls > 0  # what it spent is on the trial...
        run = client.get_run(t.mlflow_run_id)
        assert run.data.tags["genopt.trial_state"] == "PRUNED"
        assert run.data.tags["genopt.stop_reason"] == "pruned"
        assert run.data.metrics["totals/steps_run"] == t.steps_run
        assert run.data.metrics["total_tokens_cum"] > 0  # ...and on its MLflow run
    for t in complete:
        assert t.steps_run == 4
    # fewer optimizer calls than full loops would have made
    assert len(optimizer.calls) == 4 * len(complete) + sum(t.steps_run for t in pruned)
    assert len(optimizer.calls) < 4 * 6


class _InterruptSecondLoop(LoopCallback):
    def __init__(self):
        self.loops = 0

    def on_loop_start(self, start):
        self.loops += 1

    def on_step(self, record):
        if self.loops == 2:
            raise KeyboardInterrupt


def test_an_interrupted_study_resumes_where_it_stopped(tmp_path, mlflow_uri):
    config = StudyConfig(base(steps=2), parse_search_space({"batch_size": [1, 2, 3]}),
                         storage=f"sqlite:///{tmp_path}/optuna.db", study_name="resume",
                         pruner="none")
    llms = dict(optimizer_llm=ScriptedLLM(optimizer_model), task_llm=ScriptedLLM(task_model))
    kwargs = dict(tracking_uri=mlflow_uri, experiment="study-resume", cache_dir=None,
                  summary_dir=tmp_path / "summary", **llms)
    with pytest.raises(KeyboardInterrupt):
        run_study(config, callbacks=[_InterruptSecondLoop()], **kwargs)
    trials = study_trials(config.storage, "resume")
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    client = MlflowClient(mlflow_uri)
    parent_id = optuna.load_study(study_name="resume", storage=config.storage).user_attrs[
        "mlflow_parent_run_id"]
    assert client.get_run(parent_id).info.status == "KILLED"
    failed = client.get_run(trials[1].user_attrs["mlflow_run_id"])
    assert failed.info.status == "FAILED" and failed.data.tags["genopt.trial_state"] == "FAIL"

    result = run_study(config, **kwargs)  # the same command again
    trials = study_trials(config.storage, "resume")
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 3 and sorted(t.params["batch_size"] for t in done) == [1, 2, 3]
    assert trials[2].user_attrs["retry_of"] == 1 and trials[2].params == trials[1].params
    assert result.parent_run_id == parent_id and client.get_run(parent_id).info.status == "FINISHED"
    assert len(children(client, client.get_run(parent_id).info.experiment_id, parent_id)) == 4
    again = run_study(config, **kwargs)  # a finished study is only summarized
    assert again.trials_run_here == 0 and again.count("COMPLETE") == 3


def test_multi_objective_trades_score_against_tokens(tmp_path):
    config = StudyConfig(base(steps=2), parse_search_space({"batch_size": [1, 3],
                                                            "init": ["prompt_only", "prompt_and_extraction"]}),
                         storage=f"sqlite:///{tmp_path}/optuna.db", objectives="score,tokens")
    assert config.resolved_pruner() == "none"
    result = run_study(config, tracking_uri=None, cache_dir=None, summary_dir=tmp_path / "s",
                       optimizer_llm=ScriptedLLM(optimizer_model), task_llm=ScriptedLLM(task_model))
    trials = study_trials(config.storage, config.resolved_name())
    assert all(len(t.values) == 2 and t.values[1] == t.user_attrs["result"]["tokens"] for t in trials)
    assert result.pareto and result.recommended in result.pareto
    assert result.recommended.params["init"] == "prompt_and_extraction"
    # the cheaper of the two perfect configs: batch size 1 spends fewer tokens
    assert result.recommended.params["batch_size"] == 1
    info = json.loads((tmp_path / "s" / "summary" / "study.json").read_text())
    assert info["pareto_trials"] == [t.number for t in result.pareto]


def test_random_and_tpe_samplers_honour_n_trials_and_seed(tmp_path):
    space = parse_search_space({"optimizer_temperature": {"low": 0.0, "high": 1.0},
                                "memory_size": {"low": 0, "high": 4}})
    picks = []
    for name in ("a", "b"):
        config = StudyConfig(base(steps=1), space, storage=f"sqlite:///{tmp_path}/optuna.db",
                             study_name=name, sampler="random", n_trials=2, sampler_seed=3,
                             pruner="none")
        result = run_study(config, tracking_uri=None, cache_dir=None,
                           optimizer_llm=ScriptedLLM(optimizer_model), task_llm=ScriptedLLM(task_model))
        assert result.count("COMPLETE") == 2
        picks.append([t.params for t in result.trials])
    assert picks[0] == picks[1]  # one worker from scratch: reproducible
    config = StudyConfig(base(steps=1), space, storage=f"journal:{tmp_path}/tpe.log",
                         sampler="tpe", n_trials=2, pruner="none")
    result = run_study(config, tracking_uri=None, cache_dir=None,
                       optimizer_llm=ScriptedLLM(optimizer_model), task_llm=ScriptedLLM(task_model))
    assert result.count("COMPLETE") == 2 and result.sampler == "tpe"


def test_journal_storage_resumes_and_refuses_a_different_definition(tmp_path):
    storage = f"journal:{tmp_path}/study.log"
    llms = dict(optimizer_llm=ScriptedLLM(optimizer_model), task_llm=ScriptedLLM(task_model))
    space = parse_search_space({"batch_size": [1, 2, 3]})
    first = run_study(StudyConfig(base(steps=1), space, storage=storage, study_name="j",
                                  n_trials=1, sampler="brute_force"),
                      tracking_uri=None, cache_dir=None, **llms)
    assert first.count("COMPLETE") == 1 and first.sampler == "brute_force"
    more = run_study(StudyConfig(base(steps=1), space, storage=storage, study_name="j",
                                 n_trials=3, sampler="brute_force"),
                     tracking_uri=None, cache_dir=None, **llms)
    assert more.trials_run_here == 2 and more.count("COMPLETE") == 3
    assert sorted(t.params["batch_size"] for t in more.trials) == [1, 2, 3]
    with pytest.raises(ConfigError, match=r"study_name: study 'j' exists with a different definition "
                                          r"\(search_space.batch_size"):
        run_study(StudyConfig(base(steps=1), parse_search_space({"batch_size": [5]}),
                              storage=storage, study_name="j"), tracking_uri=None, **llms)


def _two_inits_study(tmp_path, pruner):
    """A 3-step grid study over ``init``: prompt_and_extraction learns the good prompt at step 1
    (best val 1), prompt_only never does (best val 0). With seed 0 the grid runs the winner
    first, so the losing loop runs second: the one a pruner should stop early."""
    config = StudyConfig(
        base(steps=3), parse_search_space({"init": ["prompt_only", "prompt_and_extraction"]}),
        storage=f"sqlite:///{tmp_path}/{pruner}.db", study_name=pruner, sampler_seed=0,
        pruner=pruner, pruner_startup_trials=1, pruner_percentile=50.0,
        pruner_p_threshold=0.3,  # two steps each losing by 1: exact one-sided Wilcoxon p = 1/4
    )
    result = run_study(config, tracking_uri=None, cache_dir=None, summary_dir=tmp_path / pruner,
                       optimizer_llm=ScriptedLLM(optimizer_model), task_llm=ScriptedLLM(task_model))
    return result, study_trials(config.storage, pruner)


@pytest.mark.parametrize("pruner", ["percentile", "wilcoxon"])
def test_percentile_and_wilcoxon_pruners_stop_a_loop_that_no_pruner_runs_to_the_end(tmp_path, pruner):
    unpruned, unpruned_trials = _two_inits_study(tmp_path, "none")  # optuna's NopPruner
    # the setup the pruner is tested on: the loser runs after the winner, to the end
    assert [t.params["init"] for t in unpruned.trials] == ["prompt_and_extraction", "prompt_only"]
    assert [(t.state, t.steps_run) for t in unpruned.trials] == [("COMPLETE", 3), ("COMPLETE", 3)]
    assert [t.best_val_score for t in unpruned.trials] == [1.0, 0.0]
    assert all(t.intermediate_values for t in unpruned_trials)  # reported, never pruned

    result, trials = _two_inits_study(tmp_path, pruner)
    assert result.pruner == pruner
    assert [t.params for t in result.trials] == [t.params for t in unpruned.trials]  # same order
    winner, loser = result.trials
    assert (winner.state, winner.steps_run) == ("COMPLETE", 3)
    assert loser.state == "PRUNED" and loser.stop_reason == "pruned" and loser.steps_run < 3
    assert loser.tokens < unpruned.trials[1].tokens  # the steps it did not run were not paid for
    assert result.recommended.params["init"] == "prompt_and_extraction"
    assert all(t.intermediate_values for t in trials)  # every step reported to the pruner


def test_storage_urls_hide_passwords_and_huge_spaces_stay_cheap():
    from mlflow_genopt.study import hide_password

    assert hide_password("postgresql://u:secret@db:5432/optuna") == "postgresql://u:***@db:5432/optuna"
    assert hide_password("sqlite:///optuna.db") == "sqlite:///optuna.db"
    huge = StudyConfig(base(), parse_search_space({"seed": {"low": 0, "high": 10**9}}), n_trials=3)
    assert huge.size() == 10**9 + 1 and huge.resolved_sampler() == "tpe" and huge.target_trials() == 3
