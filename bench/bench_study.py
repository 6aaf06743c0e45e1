"""Pruning in a study: LLM calls and wall time to find the best loop config, with vs without.

The same small grid (BBEH generated arithmetic task, real sandboxed answer extraction, scripted
LLMs; ``init`` x ``batch_size`` x ``memory_size`` = 12 loops of ``--steps`` steps) is searched
twice with the same sampler seed and loop seeds: once with the median pruner, once without.
The scripted optimizer writes a good prompt only when ``extract_answer`` is trainable and it
sees at least 3 trials per update, so 4 configs reach validation score 1.0 at step 1 and the
other 8 stay at 0: the pruner can stop those after their first step.

Printed: LLM calls (optimizer and task model, the test evaluation of every loop included), loop
steps and wall time of the whole study (a grid has to finish before its best config is known),
as ratios pruned / unpruned; and whether both studies recommend the same config. MLflow
tracking is on (SQLite in a temporary directory, schema created before timing); the scripted
LLMs sleep like a fast endpoint (``--llm-latency-ms`` per optimizer call, a quarter of it per
task call).

Usage: python bench/bench_study.py [--steps 5] [--llm-latency-ms 200] [--no-tracking]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from genopt_projects.bbeh import PROJECT  # noqa: E402
from mlflow_genopt.llm.scripted import ScriptedLLM  # noqa: E402
from mlflow_genopt.study import StudyConfig, parse_search_space, run_study  # noqa: E402

GOOD = "Compute carefully.\n{question}\nEnd with: The answer is <answer>."
BAD = "Guess quickly.\n{question}"
SPACE = {"init": ["prompt_only", "prompt_and_extraction"], "batch_size": [1, 3, 5],
         "memory_size": [0, 3]}


def scripted_llms(latency_s: float):
    def optimizer(messages, i):
        time.sleep(latency_s)
        text = messages[-1]["content"]
        trials = int(text.split("# Batch of ")[1].split(" ")[0])
        good = "# Frozen parameters" not in text and trials >= 3
        return json.dumps({"reasoning": f"attempt {i}", "prompt": GOOD if good else BAD})

    def task_model(messages, i):
        time.sleep(latency_s / 4)
        question = messages[-1]["content"]
        if "Compute carefully" in question:
            return f"The answer is {eval(question.split('What is ')[1].split('?')[0])}."
        return "I am not sure."

    return ScriptedLLM(optimizer, model="scripted-opt"), ScriptedLLM(task_model, model="scripted-task")


def one_study(pruner: str, steps: int, latency_s: float, workdir: Path, tracking_uri: str | None):
    optimizer, task = scripted_llms(latency_s)
    config = StudyConfig(
        PROJECT.config(task="generated_arithmetic", steps=steps, max_workers=4,
                       task_options={"val_size": 5, "test_size": 10}),
        parse_search_space(SPACE), storage=f"sqlite:///{workdir}/optuna-{pruner}.db",
        study_name=f"bench-{pruner}", pruner=pruner, pruner_startup_trials=3, sampler_seed=0,
    )
    started = time.monotonic()
    result = run_study(config, tracking_uri=tracking_uri, experiment=f"bench-{pruner}",
                       cache_dir=None, optimizer_llm=optimizer, task_llm=task,
                       summary_dir=workdir / pruner)
    wall = time.monotonic() - started
    best = result.recommended
    return {
        "calls": len(optimizer.calls) + len(task.calls),
        "optimizer_calls": len(optimizer.calls),
        "wall_s": wall,
        "pruned": result.count("PRUNED"),
        "steps_run": sum(t.steps_run or 0 for t in result.trials),
        "best": dict(best.params),
        "best_val": best.best_val_score,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--llm-latency-ms", type=float, default=200.0)
    parser.add_argument("--no-tracking", action="store_true")
    args = parser.parse_args()
    latency = args.llm_latency_ms / 1000
    logging.getLogger("optuna").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        tracking_uri = None
        if not args.no_tracking:
            from mlflow import MlflowClient

            tracking_uri = f"sqlite:///{workdir}/mlflow.db"
            MlflowClient(tracking_uri).search_experiments()  # schema creation is not timed
        runs = {p: one_study(p, args.steps, latency, workdir, tracking_uri) for p in ("none", "median")}
        if tracking_uri is not None:
            import mlflow

            mlflow.flush_trace_async_logging()  # before the store's folder goes away
    off, on = runs["none"], runs["median"]
    grid = 1
    for values in SPACE.values():
        grid *= len(values)
    print(f"grid of {grid} loops x {args.steps} steps, LLM latency {args.llm_latency_ms:.0f} ms "
          f"(optimizer), tracking {'off' if tracking_uri is None else 'on'}")
    print(f"{'':24}{'no pruning':>12}{'median':>12}{'ratio':>8}")
    for key, label in [("calls", "LLM calls (study)"), ("optimizer_calls", "optimizer calls"),
                       ("steps_run", "loop steps run"), ("wall_s", "wall time s (study)")]:
        print(f"{label:24}{off[key]:>12.1f}{on[key]:>12.1f}{on[key] / off[key]:>8.2f}")
    print(f"pruned loops: {on['pruned']} of {grid}")
    same = off["best"] == on["best"] and off["best_val"] == on["best_val"]
    print(f"best config: {on['best']} (val {on['best_val']:.3f}); same with and without pruning: {same}")


if __name__ == "__main__":
    main()
