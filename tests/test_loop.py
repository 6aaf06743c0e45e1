"""Loop mechanics with a scripted optimizer LLM and an in-process toy task."""

from __future__ import annotations

import json

import pytest

from mlflow_genopt import (
    ArtifactSpec,
    ArtifactVersion,
    ConfigError,
    LearningLoop,
    LoopCallback,
    LoopConfig,
    Optimizer,
    Parameter,
    StopLoop,
)
from mlflow_genopt.llm.base import ObservedLLM
from mlflow_genopt.llm.cache import CachedLLM
from mlflow_genopt.loop import UsageMeter
from mlflow_genopt.llm.scripted import ScriptedLLM

from toy import WordTask, answer


def make_loop(responses, task=None, callbacks=(), llm=None, initial="start", **config):
    config = LoopConfig(**{"project": "toy", "task": "words", "init": "toy", "steps": len(responses),
                           "batch_size": 2, "acceptance": "always", **config})
    task = task or WordTask()
    llm = llm or ScriptedLLM(responses)
    usage = UsageMeter()
    optimizer = Optimizer.from_config(config, ObservedLLM(llm, "optimizer", [usage.on_llm_call]))
    loop = LearningLoop(config, task, optimizer, {"prompt": initial}, callbacks=callbacks,
                        usage=usage)
    return loop, task, llm


class Recorder(LoopCallback):
    def __init__(self):
        self.events = []

    def on_loop_start(self, start):
        self.events.append(("start", start.initial.version_id))

    def on_version(self, record):
        self.events.append(("version", record.version.version_id, record.status))

    def on_step(self, record):
        self.events.append(("step", record.step))

    def on_loop_end(self, result):
        self.events.append(("end", result.selected.version_id))


def test_checkpoint_selection_picks_best_validation_version_and_tests_it_once():
    loop, task, _ = make_loop([
        answer("india juliet"),             # val 0.5
        answer("india juliet kilo lima"),   # val 1.0
        answer("alpha"),                    # val 0.0, still adopted under "always"
    ])
    result = loop.run()

    assert [s.val_score for s in result.steps] == [0.5, 1.0, 0.0]
    best = result.versions[2].version
    assert result.selected == best
    assert result.best_val_score == 1.0
    assert best.values["prompt"] == "india juliet kilo lima"
    test_ids = {e.id for e in task.examples("test")}
    test_calls = [vid for vid, ids in task.calls if set(ids) & test_ids]
    assert test_calls == [best.version_id]
    assert result.test_score == 0.0  # the test words are not in the selected prompt
    assert [v.status for v in result.versions] == ["initial", "accepted", "accepted", "accepted"]
    assert result.versions[2].version.parent_id == result.versions[1].version.version_id


def test_malformed_proposals_are_counted_and_never_adopted():
    responses = [
        "not json at all",
        json.dumps(["a", "list"]),
        json.dumps({"reasoning": "forgot the parameter"}),
        json.dumps({"reasoning": "no change", "prompt": "start"}),
        json.dumps({"reasoning": "wrong type", "prompt": 42}),
        answer("india"),
    ]
    # the JSON format's own reasons, one answer per step (no repair round)
    loop, _, llm = make_loop(responses, edit_format="json", repair_attempts=0)
    result = loop.run()

    reasons = [s.invalid_reason for s in result.steps]
    assert all(reasons[:5]) and reasons[5] is None
    assert "not JSON" in reasons[0]
    assert "expected an object" in reasons[1]
    assert "none of the trainable parameters" in reasons[2]
    assert "identical" in reasons[3]
    assert "expected a string" in reasons[4]
    assert result.steps[-1].invalid_total == 5
    assert result.totals["invalid_proposals"] == 5
    # only the starting version and the one valid proposal became versions
    assert [v.version.values["prompt"] for v in result.versions] == ["start", "india"]
    assert all(s.candidate_id is None for s in result.steps[:5])
    # the next step reads an invalid proposal as that proposal's problem, not the current
    # version's (Qwen 1.5B spent later steps "fixing" a proposal's crash in the current version)
    second = llm.calls[1]["messages"][1]["content"]
    assert ("## (invalid proposal at step 1) (step 1, invalid; batch score n/a, val score n/a)\n"
            "Rejected without evaluation (a problem of that proposal, not of the current version): "
            "answer is not JSON") in second


class PolicyTask(WordTask):
    """Scores the policy's *source text* like WordTask scores a prompt (nothing is executed)."""

    spec = ArtifactSpec((Parameter("policy", "code", "Chooses an action."),))

    def evaluate(self, version, examples):
        as_prompt = ArtifactVersion({"prompt": version.values["policy"]}, version.step)
        return super().evaluate(as_prompt, examples)


def test_code_parameters_must_parse_and_define_the_function():
    good = "def policy(obs):\n    return 'india'\n"
    responses = [
        json.dumps({"reasoning": "", "policy": "def policy(obs:\n    return 1"}),
        json.dumps({"reasoning": "", "policy": "def other(obs):\n    return 1\n"}),
        json.dumps({"reasoning": "", "policy": "```python\n" + good + "```"}),
    ]
    config = LoopConfig(project="toy", task="code", init="toy", steps=3, acceptance="always")
    loop = LearningLoop(config, PolicyTask(), Optimizer(ScriptedLLM(responses)),
                        {"policy": "def policy(obs):\n    return None\n"})
    result = loop.run()
    assert "SyntaxError at line" in result.steps[0].invalid_reason
    assert "does not define function `policy`" in result.steps[1].invalid_reason
    assert result.steps[2].valid
    assert result.versions[-1].version.values["policy"] == good  # fence stripped, ends as the current value


def test_raw_control_characters_and_fenced_json_are_accepted():
    raw = '```json\n{"reasoning": "tab\there", "prompt": "india\tjuliet\nkilo"}\n```'
    loop, _, _ = make_loop([raw])
    result = loop.run()
    assert result.steps[0].valid
    assert result.versions[-1].version.values["prompt"] == "india\tjuliet\nkilo"


def test_improve_rule_rejects_candidates_that_do_not_beat_the_batch_score():
    task = WordTask(train=["alpha", "bravo"], val=["alpha", "bravo"])
    loop, _, _ = make_loop(
        [answer("alpha"), answer("zulu"), answer("alpha bravo")],
        task=task, acceptance="improve", batch_size=2,
    )
    result = loop.run()
    assert [s.accepted for s in result.steps] == [True, False, True]
    assert result.versions[2].status == "rejected" and result.versions[2].val_score is None
    assert [s.val_score for s in result.steps] == [0.5, None, 1.0]
    assert result.selected.values["prompt"] == "alpha bravo"
    # the rejected candidate is shown to the optimizer in the next context, as memory
    assert "zulu" in result.steps[2].context[1]["content"]
    assert result.versions[3].version.parent_id == result.versions[1].version.version_id


def test_batches_are_seeded_and_sized():
    def batches(seed, batch_size):
        loop, _, _ = make_loop([answer(f"w{i}") for i in range(4)], seed=seed,
                               batch_size=batch_size)
        return [s.batch_ids for s in loop.run().steps]

    first = batches(seed=7, batch_size=3)
    assert first == batches(seed=7, batch_size=3)
    assert first != batches(seed=8, batch_size=3)
    assert all(len(ids) == 3 and len(set(ids)) == 3 for ids in first)
    one = batches(seed=7, batch_size=1)
    assert all(len(ids) == 1 for ids in one)


def test_context_shows_every_batch_trial_and_truncates_traces_to_the_credit_horizon():
    task = WordTask(trace_len=10)
    loop, _, llm = make_loop([answer("india")], task=task, credit_horizon=3, batch_size=4)
    result = loop.run()
    user = result.steps[0].context[1]["content"]
    assert user.count("## Trial ") == 4
    assert user.count("Trace (last 3 of 10 steps") == 4
    assert '"t": 9' in user and '"t": 7' in user and '"t": 6' not in user
    assert llm.calls[0]["messages"][1]["content"] == user  # the context is what was sent

    loop, _, _ = make_loop([answer("india")], task=WordTask(trace_len=10), batch_size=1)
    full = loop.run().steps[0].context[1]["content"]
    assert "Trace (last 10 of 10 steps" in full and '"t": 0' in full


def test_events_arrive_in_documented_order_and_stoploop_ends_cleanly():
    class StopAtTwo(Recorder):
        def on_step(self, record):
            super().on_step(record)
            if record.step == 2:
                raise StopLoop("pruned")

    recorder = StopAtTwo()
    loop, _, _ = make_loop([answer("india"), answer("india juliet"), answer("kilo")],
                           callbacks=[recorder])
    result = loop.run()
    kinds = [e[0] for e in recorder.events]
    assert kinds == ["start", "version", "version", "step", "version", "step", "end"]
    assert result.stop_reason == "pruned" and len(result.steps) == 2


def test_identical_rerun_through_the_cache_makes_no_llm_call(tmp_path):
    responses = [answer("india"), answer("india juliet"), answer("kilo")]
    first_llm = ScriptedLLM(responses)
    first, _, _ = make_loop(responses, llm=CachedLLM(first_llm, tmp_path))
    first_result = first.run()
    assert len(first_llm.calls) == 3

    rerun_llm = ScriptedLLM([])  # would raise if called
    rerun, _, _ = make_loop(responses, llm=CachedLLM(rerun_llm, tmp_path))
    rerun_result = rerun.run()
    assert rerun_llm.calls == []
    assert [s.llm_calls for s in rerun_result.steps] == [1, 1, 1]
    assert [s.cached_calls for s in rerun_result.steps] == [1, 1, 1]
    assert [s.cached_calls for s in first_result.steps] == [0, 0, 0]
    assert [v.version.version_id for v in rerun_result.versions] == [
        v.version.version_id for v in first_result.versions]


def test_budget_on_wall_time_stops_before_the_next_step():
    loop, _, _ = make_loop([answer("india"), answer("juliet")], max_wall_time_s=0)
    result = loop.run()
    assert result.stop_reason == "budget: max_wall_time_s" and result.steps == ()


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", 0, "batch_size: must be an integer >= 1, got 0"),
    ("acceptance", "sometimes", "acceptance: must be one of always, improve, no_worse; got 'sometimes'"),
    ("credit_horizon", "abc", "credit_horizon: must be an integer >= 1 or none, got 'abc'"),
    ("optimizer_temperature", 3, "optimizer_temperature: must be a number in [0, 2], got 3"),
    ("repeat_temperature", -1, "repeat_temperature: must be a number in [0, 2], got -1"),
    ("trainable", [""], "trainable: must be a non-empty list of parameter names or none"),
])
def test_invalid_config_values_give_one_line_errors(field, value, message):
    with pytest.raises(ConfigError) as info:
        LoopConfig(project="toy", **{field: value})
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_config_round_trips_through_mlflow_params_and_yaml(tmp_path):
    config = LoopConfig(project="toy", trainable=("prompt",), credit_horizon=5, batch_size=4,
                        task_options={"data_dir": "/x", "train_size": 12})
    params = config.to_params()
    assert params["batch_size"] == "4" and params["credit_horizon"] == "5"
    assert params["task_options.train_size"] == "12"
    assert LoopConfig.from_params(params) == config
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml())
    assert LoopConfig.from_file(path) == config
    with pytest.raises(ConfigError, match="batchsize: unknown loop config field"):
        LoopConfig.from_dict({"batchsize": 3})


def test_unknown_trainable_parameter_is_a_config_error():
    with pytest.raises(ConfigError, match=r"trainable: unknown parameter\(s\) \['nope'\]"):
        make_loop([answer("x")], trainable=("nope",))


def test_revert_to_best_after_patience_steps_below_the_ratio():
    # val words: india juliet kilo lima; "always" adopts the bad rewrites
    loop, _, _ = make_loop(
        [answer("india juliet kilo lima"), answer("x1"), answer("x2"), answer("x3"),
         answer("india y")],
        revert_ratio=0.8, revert_patience=2,
    )
    result = loop.run()
    best_id = result.versions[1].version.version_id
    assert [s.val_score for s in result.steps] == [1.0, 0.0, 0.0, 0.0, 0.25]
    assert [bool(s.note) for s in result.steps] == [False, False, False, True, False]
    assert result.steps[3].note.startswith(f"reverted to {best_id}")
    # the step after the revert starts from the best version again
    assert result.steps[4].current_id == best_id
    assert result.versions[-1].version.parent_id == best_id


def test_target_score_stops_early_and_val_metrics_summarise_trials():
    loop, _, _ = make_loop([answer("india juliet"), answer("india juliet kilo lima"),
                            answer("never reached")], target_score=1.0)
    result = loop.run()
    assert result.stop_reason == "target_score reached" and len(result.steps) == 2
    assert result.steps[0].val_metrics == {"score_std": 0.5}
    assert result.versions[0].val_metrics == {"score_std": 0.0}


def test_a_context_too_long_is_shrunk_before_the_step_is_given_up():
    from mlflow_genopt.llm.base import PromptTooLong

    probe, _, probe_llm = make_loop([answer("india 0")], memory_size=3, steps=1)
    probe.run()
    window = sum(len(m["content"]) for m in probe_llm.calls[0]["messages"]) + 10

    def fits(messages, i):  # a model whose window holds a context without memory, not more
        if sum(len(m["content"]) for m in messages) > window:
            raise PromptTooLong("smollm2 (n_ctx=8192) could not complete: too many tokens")
        return answer(f"india {i}")

    loop, _, _ = make_loop([], llm=ScriptedLLM(fits), steps=3, memory_size=3)
    result = loop.run()
    assert [s.valid for s in result.steps] == [True, True, True]
    assert result.steps[0].shrink_level == 0
    assert all(s.shrink_level >= 1 for s in result.steps[1:])  # the memory had to go
    assert all(sum(len(m["content"]) for m in s.context) <= window for s in result.steps)

    never = ScriptedLLM(lambda m, i: (_ for _ in ()).throw(PromptTooLong("far too long")))
    loop, _, _ = make_loop([], llm=never, steps=1)
    [step] = loop.run().steps
    assert step.invalid_reason.startswith("learning context too long for the optimizer")
    assert step.shrink_level == 3 and len(never.calls) == 4  # every level was tried once


def test_resume_from_a_checkpoint_continues_exactly_like_an_uninterrupted_loop():
    import json as _json

    from mlflow_genopt.loop import LoopState

    responses = [answer("india"), answer("zulu"), answer("india juliet"), answer("kilo"),
                 answer("india juliet kilo")]
    full, _, _ = make_loop(responses, acceptance="improve", seed=3, memory_size=2)
    uninterrupted = full.run()

    class CrashAfterTwo(LoopCallback):
        def on_step(self, record):
            if record.step == 2:
                raise StopLoop("simulated crash")

    first, _, _ = make_loop(responses, acceptance="improve", seed=3, memory_size=2,
                            callbacks=[CrashAfterTwo()])
    crashed = first.run()
    checkpoint = _json.loads(_json.dumps(crashed.steps[-1].checkpoint))  # through JSON
    second, _, llm = make_loop(responses[2:], acceptance="improve", seed=3, memory_size=2,
                               steps=5)
    resumed = second.run(resume=LoopState.from_dict(checkpoint))

    assert [s.step for s in resumed.steps] == [3, 4, 5]
    assert [s.batch_ids for s in crashed.steps + resumed.steps] == [
        s.batch_ids for s in uninterrupted.steps]
    assert [s.context for s in resumed.steps] == [s.context for s in uninterrupted.steps[2:]]
    assert [v.version.version_id for v in resumed.versions] == [
        v.version.version_id for v in uninterrupted.versions]
    assert resumed.selected == uninterrupted.selected
    assert resumed.test_score == uninterrupted.test_score


def test_interrupted_loop_stops_after_the_step_and_skips_the_final_test():
    class Interrupt(LoopCallback):
        def __init__(self):
            self.loop = None

        def on_step(self, record):
            self.loop.interrupted = True

    interrupt = Interrupt()
    loop, task, _ = make_loop([answer("india"), answer("juliet")], callbacks=[interrupt])
    interrupt.loop = loop
    result = loop.run()
    assert result.stop_reason == "interrupted" and len(result.steps) == 1
    assert result.test_score is None
    test_ids = {e.id for e in task.examples("test")}
    assert not any(set(ids) & test_ids for _, ids in task.calls)


def test_diff_of_a_changed_last_line_without_newline_keeps_lines_apart():
    from mlflow_genopt import diff

    old = ArtifactVersion({"prompt": "Think.\nThe answer is <answer>."}, 0)
    new = old.child({"prompt": "Think.\nEnd with: The answer is X."}, 1)
    patch = diff(old, new)
    assert "-The answer is <answer>.\n+End with: The answer is X.\n" in patch
    assert patch.splitlines()[0] == f"--- {old.version_id}/prompt"
