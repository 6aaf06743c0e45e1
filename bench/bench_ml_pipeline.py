"""Benchmark: what one ML-pipeline step costs besides the LLM call.

For Spaceship Titanic and House Prices (MLAgentBench split, ``../shared/data`` by default) and
both starting artifacts, runs a short learning loop with a scripted optimizer (each step
proposes a new ``n_estimators``, accepted always, so every step evaluates a new candidate on
one fold and on the validation split) and prints:

* evaluation wall time per candidate: one cross-validation fold (a train-batch trial) and the
  validation split, each in its own sandbox process (start, imports, fit, predict, scoring);
* from the loop's step records (``wall_time_s``, ``llm_latency_s``, ``eval_time_s``): the mean
  step time, the LLM's part and the share of the step spent outside the LLM call.

``--llm-latency S`` makes the scripted optimizer sleep S seconds per call, to see the share with
a model of known speed. Usage::

    python bench/bench_ml_pipeline.py [--steps 3] [--max-train-rows N] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from genopt_projects.ml_pipeline import PROJECT, STARTING_ARTIFACTS  # noqa: E402
from mlflow_genopt.build import build_loop  # noqa: E402
from mlflow_genopt.llm.scripted import ScriptedLLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {"spaceship-titanic": "spaceship-titanic", "house-prices": "house-price"}
EDITED = {"one_function": "train_model", "many_function": "create_ensemble_model"}


def time_evaluations(task) -> dict[str, list[float]]:
    """Record the wall time of every evaluate call of ``task``, per split. The loop's evaluation
    cache answers re-evaluations without calling the task, so every call recorded is real."""
    times: dict[str, list[float]] = {"train": [], "val": [], "test": []}
    evaluate = task.evaluate

    def timed(version, examples, context=None):
        started = time.perf_counter()
        trials = evaluate(version, examples, context)
        if examples:
            times[examples[0].input["split"]].append(time.perf_counter() - started)
        return trials

    task.evaluate = timed
    return times


def scripted_optimizer(init: str, latency_s: float) -> ScriptedLLM:
    name = EDITED[init]
    start = STARTING_ARTIFACTS[init].values[name]

    def answer(messages, index):
        time.sleep(latency_s)
        value = start.replace("n_estimators=100", f"n_estimators={110 + 10 * index}")
        return json.dumps({"reasoning": f"more trees ({110 + 10 * index})", name: value})

    return ScriptedLLM(answer)


def bench(task_name: str, init: str, args) -> dict:
    options = {"data_dir": str(Path(args.data_dir) / "mlagentbench" / DATASETS[task_name])}
    if args.max_train_rows:
        options["max_train_rows"] = args.max_train_rows
    config = PROJECT.config(task=task_name, init=init, steps=args.steps, batch_size=1,
                            acceptance="always", task_options=options)
    built = build_loop(config, optimizer_llm=scripted_optimizer(init, args.llm_latency),
                       cache_dir=None)
    times = time_evaluations(built.task)
    with built:
        result = built.loop.run()
    steps = result.steps
    wall = sum(s.wall_time_s for s in steps)
    llm = sum(s.llm_latency_s for s in steps)
    return {
        "task": task_name, "init": init, "rows": len(built.task.labeled),
        "fold_s": statistics.mean(times["train"]),
        "val_s": statistics.mean(times["val"]),
        "step_s": wall / len(steps), "llm_s": llm / len(steps),
        "eval_s": sum(s.eval_time_s for s in steps) / len(steps),
        "outside_llm": (wall - llm) / wall if wall else 0.0,
        "val": result.best_val_score,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-train-rows", type=int, default=None)
    parser.add_argument("--llm-latency", type=float, default=0.0, help="seconds per scripted call")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args(argv)
    if not (Path(args.data_dir) / "mlagentbench").is_dir():
        print(f"bench_ml_pipeline: no MLAgentBench data under {args.data_dir}", file=sys.stderr)
        return 2
    rows = [bench(task, init, args) for task in DATASETS for init in ("one_function", "many_function")]
    header = (f"{'task':<18} {'init':<14} {'rows':>5} {'fold eval s':>11} {'val eval s':>10} "
              f"{'step s':>7} {'LLM s':>6} {'eval s':>7} {'outside LLM':>11} {'best val':>9}")
    print(f"ML pipeline: {args.steps} steps per loop, batch 1 fold, scripted optimizer "
          f"(latency {args.llm_latency:g} s), {os.cpu_count()} CPUs")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['task']:<18} {r['init']:<14} {r['rows']:>5} {r['fold_s']:>11.2f} {r['val_s']:>10.2f} "
              f"{r['step_s']:>7.2f} {r['llm_s']:>6.2f} {r['eval_s']:>7.2f} {r['outside_llm']:>10.1%} "
              f"{r['val']:>9.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
