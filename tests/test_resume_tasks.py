"""Resume of stateful case studies equals an uninterrupted run: same contexts, same decisions.

Each case runs a loop once without interruption, then again in a fresh store with a crash
after step 2 (the run ends FAILED with its checkpoint), then calls ``run_loop(config)`` again:
auto-resume continues that run in a new task object. The optimizer is scripted behind a
response cache filled by the uninterrupted run, so a resumed step is answered from the cache
only if its learning context is byte-identical; the test compares every context and decision.

* Atari ``continue_episode``: the games must continue where they stood at the checkpoint
  (``state_dict``), not restart.
* ML pipeline: the parent-vs-child improvement feedback comes from the loop's history, which
  the checkpoint holds.
* BBEH: stateless, the baseline.
"""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from mlflow_genopt import LoopCallback, LoopConfig, run_loop
from mlflow_genopt.llm.cache import CachedLLM
from mlflow_genopt.llm.scripted import ScriptedLLM

STEPS, CRASH_AFTER = 4, 2

FOLLOW = ("def select_action(obs):\n    ball, me = obs['ball'], obs['player']\n    if ball is None or me is None:\n"
          "        return 0\n    gap = ball['y'] - (me['y'] + 8)\n    if gap < -{d}:\n        return 2\n"
          "    if gap > {d}:\n        return 3\n    return 0\n")


class Crash(LoopCallback):
    """Simulates a crash right after step ``at`` was logged."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step(self, record):
        if record.step == self.at:
            raise RuntimeError("simulated crash")


class Steps(LoopCallback):
    def __init__(self) -> None:
        self.records = []

    def on_step(self, record):
        self.records.append(record)


def decisions(records):
    return [(r.step, r.current_id, r.candidate_id, r.accepted, r.batch_score,
             r.candidate_batch_score, r.val_score, r.best_id, [t.feedback for t in r.trials],
             list(r.context)) for r in records]


def run_three_ways(tmp_path, config: LoopConfig, answers: list[str], **kwargs):
    cache = tmp_path / "llm-cache"

    def optimizer():
        return CachedLLM(ScriptedLLM(answers), cache)

    reference = Steps()
    expected = run_loop(config, tracking=f"sqlite:///{tmp_path}/reference.db", cache_dir=None,
                        optimizer_llm=optimizer(), callbacks=[reference], **kwargs)
    uri = f"sqlite:///{tmp_path}/crashed.db"
    before = Steps()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_loop(config, tracking=uri, cache_dir=None, optimizer_llm=optimizer(),
                 callbacks=[before, Crash(CRASH_AFTER)], **kwargs)
    after = Steps()
    llm = optimizer()
    resumed = run_loop(config, tracking=uri, cache_dir=None, optimizer_llm=llm, callbacks=[after],
                       **kwargs)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("genopt").experiment_id])
    assert run.info.status == "FINISHED" and "genopt.error" not in run.data.tags
    assert [r.step for r in after.records] == list(range(CRASH_AFTER + 1, STEPS + 1))
    assert llm.misses == 0, "a resumed step sent a learning context the uninterrupted run never sent"
    assert decisions(before.records + after.records) == decisions(reference.records)
    assert resumed.selected == expected.selected and resumed.test_score == expected.test_score
    return reference.records


@pytest.mark.e2e
def test_atari_continue_episode_resumes_the_same_games(tmp_path):
    config = LoopConfig(project="atari", task="Pong", steps=STEPS, credit_horizon=15, batch_size=1,
                        memory_size=2, max_workers=1,
                        task_options={"continue_episode": True, "eval_episodes": 1,
                                      "eval_max_steps": 60, "test_episodes": 1, "workers": 1,
                                      "video_steps": 4})
    answers = [json.dumps({"reasoning": f"deadband {d}", "select_action": FOLLOW.format(d=d)})
               for d in (2, 4, 6, 8)]
    records = run_three_ways(tmp_path, config, answers)
    game_steps = [r.trials[0].input["game_step"] for r in records]
    assert game_steps == [0, 15, 30, 45]  # one game, continued across updates and the resume


@pytest.mark.e2e
def test_ml_pipeline_resume_sends_the_same_improvement_feedback(tmp_path):
    config = LoopConfig(project="ml_pipeline", task="breast-cancer", steps=STEPS, batch_size=2,
                        memory_size=2, acceptance="improve",
                        task_options={"max_train_rows": 120, "n_folds": 2, "timeout_s": 60,
                                      "memory_mb": 2048})
    from genopt_projects.ml_pipeline import STARTING_ARTIFACTS

    start = STARTING_ARTIFACTS["one_function"].values["train_model"]
    answers = [json.dumps({"reasoning": f"{n} trees", "train_model": start.replace(
        "n_estimators=100", f"n_estimators={n}")}) for n in (3, 5, 7, 9)]
    records = run_three_ways(tmp_path, config, answers)
    notes = [f for r in records for t in r.trials for f in t.feedback.splitlines()
             if "proposal(s) made from this version" in f or "its parent" in f]
    assert notes, "the improvement feedback never appeared: the test would not see a lost history"


def test_bbeh_resume_is_the_baseline(tmp_path):
    config = LoopConfig(project="bbeh", task="generated_arithmetic", steps=STEPS, batch_size=2,
                        acceptance="always", task_model="scripted",
                        task_options={"train_size": 6, "val_size": 3, "test_size": 3})
    answers = [json.dumps({"reasoning": f"r{i}", "prompt": f"Variant {i}. {{question}} The answer is"})
               for i in range(STEPS)]
    # a function of the question, not of the call order: the resumed run asks in another order
    task_llm = ScriptedLLM(lambda messages, _: f"The answer is {len(messages[-1]['content']) % 13}.")
    run_three_ways(tmp_path, config, answers, task_llm=task_llm)
