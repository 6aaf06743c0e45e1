"""Benchmark: the cost of object extraction and a Python policy in the Atari loop.

1. Per game, in one process: agent steps per second of the rollout worker's loop
   (``worker.run_episode``: emulator, object extraction, dx/dy, the per-call timer, a generated
   policy that scans every object, trace recording) against raw ALE stepping of the *same*
   action sequence (``ale.act`` x frameskip, nothing else), and their ratio.
2. Episodes per second of :class:`PolicyRunner` (sandboxed workers, process start included) with
   1 and with 2 workers.
3. What one loop step of the ``atari`` project costs outside the LLM: the training rollout of
   ``H`` = 1 and 100 steps and the full-episode evaluation (``AtariTask.evaluate``), and the
   ratio of the 100-step to the 1-step rollout (close to 1: the worker's start dominates).

Usage::

    python bench/bench_atari.py [--steps 3000] [--episodes 8] [--episode-steps 500] [--games Pong,Breakout]
"""

from __future__ import annotations

import argparse
import os
import time

from genopt_projects.atari.env import ObjectEnv
from genopt_projects.atari.games import GAMES
from genopt_projects.atari.policy_runner import PolicyRunner, RolloutConfig
from genopt_projects.atari.worker import run_episode

# What generated code tends to look like: look at every object, find the nearest threat and
# react; random otherwise (so that episodes keep moving).
POLICY = '''
import random

def select_action(obs):
    me = obs["player"]
    if me is None:
        return random.randrange(N_ACTIONS)
    cx, cy = me["x"] + me["w"] / 2, me["y"] + me["h"] / 2
    nearest, best = None, 1e9
    for name, value in obs.items():
        if name == "player" or value is None or isinstance(value, int):
            continue
        for item in ([value] if isinstance(value, dict) else value):
            d = abs(item["x"] + item["dx"] - cx) + abs(item["y"] + item["dy"] - cy)
            if d < best:
                nearest, best = item, d
    if nearest is not None and best < 20:
        return random.randrange(N_ACTIONS)
    return random.randrange(N_ACTIONS)
'''

FOLLOW_BALL = '''
def select_action(obs):
    ball, me = obs["ball"], obs["player"]
    if ball is None:
        return 0
    gap = (ball["y"] + 2 + ball["dy"]) - (me["y"] + 8 + me["dy"])
    return 2 if gap < -3 else 3 if gap > 3 else 0
'''


def job(game: str, source: str, steps: int, seed: int = 0) -> dict:
    return dict(source=source, entry="select_action", game=game, seed=seed, max_steps=steps, frameskip=4,
                repeat_action_probability=0.0, noop_max=0, call_timeout_s=0.05, episode_timeout_s=600.0,
                trace_every=1, trace_head=50, trace_tail=20, max_items=6)


def loop_vs_raw(game: str, steps: int) -> tuple[float, float, int]:
    source = POLICY.replace("N_ACTIONS", str(GAMES[game].n_actions))
    run_episode(job(game, source, 50))  # warm: emulator built and cached, code paths hot
    done, elapsed, actions = 0, 0.0, []
    seed = 0
    while done < steps:  # episodes that end early are followed by new ones
        started = time.perf_counter()
        result = run_episode(job(game, source, steps - done, seed))
        elapsed += time.perf_counter() - started
        assert result["error"] is None, result["error"]
        done += result["steps"]
        actions.append(result["actions"])
        seed += 1

    env = ObjectEnv(game)
    ale, action_set = env.ale, env._actions  # raw: the ALE alone, same actions
    raw = 0.0
    for letters in actions:
        env.reset(seed=0)
        codes = [action_set[ord(letter) - 97] for letter in letters]
        started = time.perf_counter()
        for code in codes:
            for _ in range(4):
                ale.act(code)
            ale.game_over()
        raw += time.perf_counter() - started
    env.close()
    return done / elapsed, done / raw, done


def episodes_per_second(workers: int, episodes: int, episode_steps: int) -> float:
    config = RolloutConfig("Pong", entry="select_action", max_steps=episode_steps)
    with PolicyRunner(config, workers=workers) as runner:
        started = time.perf_counter()
        results = runner.run(FOLLOW_BALL, list(range(episodes)))
        elapsed = time.perf_counter() - started
    assert all(r.error is None for r in results), [r.error for r in results]
    return episodes / elapsed


def task_step_costs(repeats: int = 3) -> dict[str, float]:
    """Seconds per ``AtariTask.evaluate`` call: one rollout at H=1 and H=100, and the
    validation split (3 episodes of up to 2000 steps, uncached: a new version each time)."""
    from mlflow_genopt.artifact import ArtifactVersion
    from genopt_projects.atari import PROJECT

    costs: dict[str, float] = {}
    for horizon in (1, 100):
        config = PROJECT.config(task="Pong", credit_horizon=horizon)
        task = PROJECT.build_task(config)
        values = dict(PROJECT.starting_artifacts["single"].values)
        try:
            [example] = task.examples("train")[:1]
            started = time.perf_counter()
            for i in range(repeats):
                task.evaluate(ArtifactVersion({**values, "select_action": FOLLOW_BALL + f"# {i}\n"}, i), [example])
            costs[f"rollout H={horizon}"] = (time.perf_counter() - started) / repeats
            if horizon == 1:
                started = time.perf_counter()
                for i in range(repeats):
                    task.evaluate(ArtifactVersion({**values, "select_action": FOLLOW_BALL + f"# v{i}\n"}, i),
                                  task.examples("val"))
                costs["validation 3 x 2000"] = (time.perf_counter() - started) / repeats
        finally:
            task.close()
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="agent steps per game for the loop vs raw ALE")
    parser.add_argument("--games", default=",".join(GAMES), help="comma-separated games")
    parser.add_argument("--episodes", type=int, default=8, help="episodes for the parallel evaluation")
    parser.add_argument("--episode-steps", type=int, default=500, help="horizon of those episodes")
    args = parser.parse_args()

    print(f"{'game':<14} {'loop steps/s':>12} {'raw ALE steps/s':>16} {'ratio':>6}   (frameskip 4, {args.steps} steps)")
    ratios = []
    for game in args.games.split(","):
        loop, raw, _ = loop_vs_raw(game, args.steps)
        ratios.append(loop / raw)
        print(f"{game:<14} {loop:>12.0f} {raw:>16.0f} {loop / raw:>6.2f}")
    print(f"{'min ratio':<14} {'':>12} {'':>16} {min(ratios):>6.2f}")
    print()
    one = episodes_per_second(1, args.episodes, args.episode_steps)
    two = episodes_per_second(2, args.episodes, args.episode_steps)
    print(f"parallel evaluation: Pong, {args.episodes} episodes x {args.episode_steps} steps, sandboxed workers")
    print(f"{'workers':<8} {'episodes/s':>10}")
    print(f"{1:<8} {one:>10.2f}")
    print(f"{2:<8} {two:>10.2f}")
    print(f"speed-up 2 vs 1 workers: {two / one:.2f}x  ({os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}: other processes on the machine lower it)")
    print()
    costs = task_step_costs()
    print("atari project, Pong, per AtariTask.evaluate call (sandboxed workers, process start included)")
    for name, seconds in costs.items():
        print(f"{name:<22} {seconds:>6.2f} s")
    print(f"rollout H=100 / H=1: {costs['rollout H=100'] / costs['rollout H=1']:.2f}x")


if __name__ == "__main__":
    main()
