"""Running generated Atari policies: failures become feedback, good policies score, workers parallelize.

Every test here goes through real sandboxed worker processes (``mlflow_genopt.sandbox``) with a
real emulator; nothing is mocked. Horizons are short to keep the file fast on two cores.
"""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("ale_py")

from genopt_projects.atari.policies import STARTING_POLICIES, starting_policy  # noqa: E402
from genopt_projects.atari.policy_runner import EpisodeResult, PolicyRunner, RolloutConfig, replay  # noqa: E402
from genopt_projects.atari.worker import run_episode  # noqa: E402

FOLLOW_BALL = '''
def select_action(obs):
    """Keep the paddle's centre level with the ball, anticipating one step of motion."""
    ball, me = obs["ball"], obs["player"]
    if ball is None:
        return 0
    gap = (ball["y"] + 2 + ball["dy"]) - (me["y"] + 8 + me["dy"])
    if gap < -3:
        return 2  # RIGHT: up
    if gap > 3:
        return 3  # LEFT: down
    return 0
'''
RANDOM = "import random\ndef select_action(obs):\n    return random.randrange(6)\n"


def pong(**overrides) -> RolloutConfig:
    settings = dict(game="Pong", entry="select_action", max_steps=300, trace_head=20, trace_tail=5,
                    episode_timeout_s=5.0, startup_s=5.0)
    settings.update(overrides)
    return RolloutConfig(**settings)


@pytest.fixture(scope="module")
def runner():
    with PolicyRunner(pong(), workers=2) as r:
        yield r


def run_one(runner: PolicyRunner, source: str, seed: int = 0) -> EpisodeResult:
    [result] = runner.run(source, [seed])
    return result


def test_raising_policy_yields_feedback_with_its_traceback(runner):
    result = run_one(runner, "def select_action(obs):\n    return obs['paddle']['y']\n")
    assert result.error == "the policy raised KeyError: 'paddle' at step 0"
    assert 'policy.py", line 2, in select_action' in result.traceback
    assert "KeyError" in result.feedback() and result.episode_return == 0.0
    assert result.trace[-1]["action"] is None and "ball" in result.trace[-1]["obs"]  # what it failed on


def test_policy_failing_mid_episode_keeps_its_return_and_trace(runner):
    source = ("n = 0\ndef select_action(obs):\n    global n\n    n += 1\n"
              "    if n > 150:\n        raise RuntimeError('boom')\n    return 0\n")
    result = run_one(runner, source)
    assert result.error == "the policy raised RuntimeError: boom at step 150" and result.steps == 150
    assert result.episode_return < 0  # the points lost by standing still count
    assert [r["t"] for r in result.trace][:3] == [0, 1, 2] and result.trace[-1]["t"] == 150


def test_hanging_policy_is_stopped_by_the_per_call_limit(runner):
    started = time.monotonic()
    result = run_one(runner, "def select_action(obs):\n    while True:\n        pass\n")
    assert result.error == "policy call exceeded 50 ms at step 0"
    assert time.monotonic() - started < 5


def test_slow_policy_that_swallows_the_timeout_is_reported(runner):
    source = ("import time\ndef select_action(obs):\n    try:\n        time.sleep(0.2)\n"
              "    except BaseException:\n        time.sleep(0.05)\n    return 0\n")
    result = run_one(runner, source)
    assert result.error is not None and "at step 0" in result.error and "ms" in result.error


def test_policy_that_disables_the_timer_is_killed_by_the_parent():
    source = ("import signal\ndef select_action(obs):\n"
              "    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n    while True:\n        pass\n")
    with PolicyRunner(pong(episode_timeout_s=1.0, startup_s=3.0), workers=1) as runner:
        started = time.monotonic()
        [result] = runner.run(source, [0])
    assert "killed after exceeding its wall-clock budget" in result.error
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("value", ["'UP'", "6", "-1", "True", "None", "2.0"])
def test_invalid_action_ends_the_episode_with_the_legal_actions(runner, value):
    result = run_one(runner, f"def select_action(obs):\n    return {value}\n")
    assert result.error.startswith(f"select_action returned {value}")
    assert "expected an int action: 0=NOOP, 1=FIRE, 2=RIGHT, 3=LEFT" in result.error


def test_numpy_integer_actions_are_accepted(runner):
    result = run_one(runner, "import numpy as np\ndef select_action(obs):\n    return np.int64(2)\n")
    assert result.error is None and result.steps == 300


def test_broken_source_and_missing_entry_are_feedback(runner):
    result = run_one(runner, "def select_action(obs)\n    return 0\n")
    assert result.error.startswith("the policy failed to load: SyntaxError")
    result = run_one(runner, "def choose(obs):\n    return 0\n")
    assert result.error == ("the policy failed to load: LookupError: the policy does not define a function "
                            "'select_action' (it defines: choose)")


def test_a_crashing_worker_fails_only_its_own_episodes(runner):
    source = "import os\ndef select_action(obs):\n    os._exit(3)\n"
    results = runner.run(source, [0, 1])
    assert [r.seed for r in results] == [0, 1]
    assert all("the worker process failed" in r.error for r in results)


def test_secrets_do_not_reach_the_policy(runner, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    source = ("import os\ndef select_action(obs):\n"
              "    leaked = [k for k in os.environ if k.endswith(('_KEY', '_TOKEN')) or 'secret' in os.environ[k]]\n"
              "    if leaked:\n        raise RuntimeError(f'leaked {leaked}')\n    return 0\n")
    assert os.environ["OPENAI_API_KEY"] == "sk-secret"
    assert run_one(runner, source).error is None


def test_following_the_ball_beats_random_play(runner):
    follow = runner.run(FOLLOW_BALL, [0, 1])
    random_play = runner.run(RANDOM, [0, 1])
    assert all(r.error is None and r.steps == 300 for r in follow + random_play)
    follow_mean = sum(r.episode_return for r in follow) / 2
    random_mean = sum(r.episode_return for r in random_play) / 2
    assert follow_mean >= random_mean + 4, (follow_mean, random_mean)


def test_parallel_evaluation_returns_one_result_per_episode_in_order():
    seeds = [5, 3, 8, 1, 4]
    with PolicyRunner(pong(max_steps=60), workers=2) as two, PolicyRunner(pong(max_steps=60), workers=1) as one:
        parallel, serial = two.run(RANDOM, seeds), one.run(RANDOM, seeds)
    assert [r.seed for r in parallel] == seeds
    assert [(r.episode_return, r.actions) for r in parallel] == [(r.episode_return, r.actions) for r in serial]
    assert len({r.actions for r in parallel}) > 1  # the seed drives the policy's random module


def test_replaying_the_actions_reproduces_the_return(runner):
    [result] = runner.run(FOLLOW_BALL, [0])
    assert len(result.action_list) == result.steps == 300
    assert sum(reward for reward, _, _ in replay(runner.config, 0, result.action_list)) == result.episode_return
    with PolicyRunner(pong(), workers=1, verify_returns=True) as verifying:
        [verified] = verifying.run(FOLLOW_BALL, [0])
    assert verified.error is None and verified.episode_return == result.episode_return


@pytest.mark.parametrize("game", sorted(STARTING_POLICIES))
def test_starting_policies_run(game):
    """Both starting artifacts of every game load and play (in-process: they are our own code)."""
    for variant, policy in STARTING_POLICIES[game].items():
        job = dict(source=policy.program(), entry=policy.entry, game=game, seed=0, max_steps=20, frameskip=4,
                   repeat_action_probability=0.0, noop_max=0, call_timeout_s=0.5, episode_timeout_s=10.0,
                   trace_every=1, trace_head=5, trace_tail=2, max_items=6)
        result = run_episode(job)
        assert result["error"] is None and result["steps"] == 20, (game, variant, result["error"])
        names = [p.name for p in policy.artifact_spec().trainable]
        assert names == (["select_action"] if variant == "single" else [names[0], "select_action"])


def test_modular_pong_starts_from_the_reference_decomposition():
    policy = starting_policy("ALE/Pong-v5", "modular")
    assert [f.name for f in policy.functions] == ["predict_ball_trajectory", "select_action", "act"]
    assert "def select_action(predicted_ball_y, obs):" in policy.program()
    with pytest.raises(ValueError, match="unknown function"):
        policy.program({"nope": "def nope(): pass"})


def test_rollouts_continue_from_the_previous_end_state():
    """Two 150-step rollouts, the second continuing from the first's end state, play exactly
    the 300-step episode (what "roll out H steps, update, roll out H more" relies on)."""
    with PolicyRunner(pong(max_steps=150, return_states=True), workers=1) as runner:
        [first] = runner.run(FOLLOW_BALL, [0])
        [second] = runner.run(FOLLOW_BALL, [0], start_states=[first.end_state])
    with PolicyRunner(pong(max_steps=300), workers=1) as runner:
        [whole] = runner.run(FOLLOW_BALL, [0])
    assert first.steps == second.steps == 150 and second.start_state == first.end_state
    assert first.actions + second.actions == whole.actions
    assert first.episode_return + second.episode_return == whole.episode_return
