"""Benchmark: evaluation throughput by executor, and the executor's per-unit overhead.

1. Atari episodes per second of :class:`PolicyRunner` (Pong, a ball-following policy,
   ``--episodes`` x ``--episode-steps``) and ML-pipeline cross-validation folds per second of
   :class:`TabularTask` (breast-cancer, ``--folds`` folds), each with ``local`` (today: 2
   sandboxed processes for Atari, one sandbox running every fold for the pipeline),
   ``dask:local[2]`` (an in-process LocalCluster of 2 worker processes) and a ``dask scheduler``
   with 2 ``dask worker`` processes on loopback; printed as ratios to ``local``, all measured in
   this one run (after one warm-up evaluation per executor: workers import on first use).
2. Per-unit overhead of the cluster executor: the round trip of one unit that carries an Atari
   batch's real arguments and results but does no work (submit, ship, run, ship back), as a
   share of one Atari episode's time in its sandbox. Goal: <= 5 %.

Usage::

    python bench/bench_executor.py [--episodes 8] [--episode-steps 500] [--folds 4] [--rows 400]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import genopt_projects
import mlflow_genopt
from genopt_projects.atari.policy_runner import PolicyRunner, RolloutConfig
from mlflow_genopt.artifact import ArtifactVersion
from mlflow_genopt.config import LoopConfig
from mlflow_genopt.executor import make_executor
from mlflow_genopt.project import load_project

FOLLOW_BALL = '''
def select_action(obs):
    ball, me = obs["ball"], obs["player"]
    if ball is None or me is None:
        return 0
    gap = (ball["y"] + 2 + ball["dy"]) - (me["y"] + 8 + me["dy"])
    return 2 if gap < -3 else 3 if gap > 3 else 0
'''


def echo(payload):
    """A unit that does nothing but carry its payload there and back."""
    return payload


@contextlib.contextmanager
def scheduler_with_workers(workers: int = 2):
    """``dask scheduler`` and ``workers`` x ``dask worker --nthreads 1`` on loopback, importing
    the code this process imports; yields the executor string."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="genopt-bench-dask-") as tmp:
        for module in (mlflow_genopt, genopt_projects):
            (Path(tmp) / module.__name__).symlink_to(Path(module.__file__).parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tmp, os.environ.get("PYTHONPATH")]))}
        dask = [sys.executable, "-m", "dask"]
        quiet = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes = [subprocess.Popen(dask + ["scheduler", "--host", "127.0.0.1", "--port", str(port),
                                              "--no-dashboard"], **quiet)]
        processes += [subprocess.Popen(dask + ["worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1",
                                               "--no-dashboard", "--local-directory", f"{tmp}/w{i}"], **quiet)
                      for i in range(workers)]
        try:
            from distributed import Client

            deadline = time.monotonic() + 120
            while True:
                try:
                    with Client(f"tcp://127.0.0.1:{port}", timeout=5) as client:
                        client.wait_for_workers(workers, timeout=60)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            yield f"dask://127.0.0.1:{port}"
        finally:
            for process in processes:
                process.kill()
                process.wait()


def runner_config(steps: int = 500) -> RolloutConfig:
    return RolloutConfig(game="Pong", max_steps=steps, trace_head=0, trace_tail=0,
                         entry="select_action", episode_timeout_s=300)


def atari_rate(executor, episodes: int, steps: int) -> tuple[float, list]:
    runner = PolicyRunner(runner_config(steps), workers=2, executor=executor)
    runner.run(FOLLOW_BALL, [999])  # warm-up: the workers import the emulator once
    started = time.perf_counter()
    results = runner.run(FOLLOW_BALL, list(range(episodes)))
    elapsed = time.perf_counter() - started
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    return episodes / elapsed, results


def ml_rate(executor, folds: int, rows: int) -> float:
    config = LoopConfig(project="ml_pipeline", task="breast-cancer", init="one_function",
                        task_options={"n_folds": folds, "max_train_rows": rows, "timeout_s": 300})
    project = load_project("ml_pipeline")
    task = project.build_task(config, executor=executor)
    version = ArtifactVersion(dict(project.starting_for(config).values), 0)
    examples = list(task.examples("train"))
    task.evaluate(ArtifactVersion({**version.values, "train_model": version.values["train_model"] + "\n# warm"}, 0),
                  examples[:1])
    started = time.perf_counter()
    trials = task.evaluate(version, examples)
    elapsed = time.perf_counter() - started
    assert all(t.error is None for t in trials), [t.error for t in trials]
    return folds / elapsed


def unit_overhead_s(executor, payload, repeats: int = 30) -> float:
    """Median round trip of one empty unit (the median: other load on the machine adds spikes)."""
    executor.map(echo, [(payload,)])  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        executor.map(echo, [(payload,)])
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--episode-steps", type=int, default=500)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--rows", type=int, default=400)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.1f}. Atari: Pong, {args.episodes} episodes x {args.episode_steps} steps; ML pipeline: "
          f"breast-cancer, {args.folds} folds of {args.rows} rows; {os.cpu_count()} CPUs")
    rates: dict[str, tuple[float, float]] = {}
    overheads: dict[str, float] = {}
    episode_s = None
    with scheduler_with_workers(2) as remote:
        for name, spec in (("local", "local"), ("dask:local[2]", "dask:local[2]"),
                           ("scheduler + 2 workers", remote)):
            with make_executor(spec) as executor:
                atari, results = atari_rate(executor, args.episodes, args.episode_steps)
                ml = ml_rate(executor, args.folds, args.rows)
                rates[name] = (atari, ml)
                if spec == "local":
                    episode_s = sum(r.duration_s for r in results) / len(results)
                    batch = [(r.seed, None) for r in results[: len(results) // 2]]
                    payload = (runner_config(args.episode_steps), FOLLOW_BALL, batch, results[: len(results) // 2])
                    local_unit = unit_overhead_s(executor, payload)
                else:
                    overheads[name] = unit_overhead_s(executor, payload) - local_unit
            print(f"  {name:<22} {atari:6.2f} episodes/s   {ml:6.2f} folds/s", flush=True)
    base_atari, base_ml = rates["local"]
    print("\nthroughput relative to local (Atari episodes/s, ML folds/s):")
    for name, (atari, ml) in rates.items():
        print(f"  {name:<22} {atari / base_atari:5.2f}x   {ml / base_ml:5.2f}x")
    print(f"\nper-unit executor overhead (a unit carrying {len(payload[3])} episodes' arguments and "
          f"results), against one episode's {episode_s:.2f} s in its sandbox:")
    for name, seconds in overheads.items():
        print(f"  {name:<22} {seconds * 1000:7.1f} ms = {100 * seconds / episode_s:5.2f} % of an episode"
              f" (goal <= 5 %)")


if __name__ == "__main__":
    main()
