"""Tracking overhead and cache replay, measured side by side in one run.

1. Per-step wall time of the same loop (BBEH generated task, real sandboxed answer extraction,
   scripted optimizer and task LLMs) with full MLflow tracking (SQLite store, LoggedModels,
   artifacts, traces) vs tracking off. Runs alternate on/off to share the machine's noise; the
   tracked time includes draining the tracker at the end of the loop. Goal: ratio <= 1.05.
2. An identical rerun through the on-disk response cache vs the first run: LLM calls made by
   each (goal: 0 on the rerun) and wall time.

The overhead is measured twice: with zero-latency scripted LLMs (the worst case: MLflow's
SQLite writes cost ~100 ms of CPU per step, which a step of ~0.2 s of pure sandbox work cannot
hide on 2 cores) and with scripted LLMs that sleep like a fast endpoint (``--llm-latency-ms``,
default 1000 ms per optimizer call and a quarter of it per task call; the embedded SmolLM2
takes 10-40 s per optimizer call and 1-3 s per task call here, so this is still conservative).

Usage: python bench/bench_tracking.py [--steps 8] [--repeats 3] [--llm-latency-ms 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from genopt_projects.bbeh import PROJECT  # noqa: E402
from mlflow_genopt.llm.cache import CachedLLM  # noqa: E402
from mlflow_genopt.llm.scripted import ScriptedLLM  # noqa: E402
from mlflow_genopt.build import run_loop  # noqa: E402


def scripted_llms(latency_s: float):
    prompts = [
        "Evaluate carefully.\n{question}\nThe answer is",
        "{question}\nThink step by step. The answer is",
        "Question: {question}\nReply with True or False. The answer is",
    ]

    def optimizer(messages, i):
        time.sleep(latency_s)
        return json.dumps({"reasoning": f"variant {i}", "prompt": prompts[i % 3] + " " * (i // 3)})

    def task_model(messages, i):
        time.sleep(latency_s / 4)
        return "The answer is True." if "True" in messages[-1]["content"][-40:] else "The answer is False."

    return ScriptedLLM(optimizer, model="scripted-opt"), ScriptedLLM(task_model, model="scripted-task")


def one_loop(steps: int, tracking: bool, workdir: Path, latency_s: float,
             cache: Path | None = None):
    optimizer, task = scripted_llms(latency_s)
    opt_llm = CachedLLM(optimizer, cache) if cache else optimizer
    task_llm = CachedLLM(task, cache) if cache else task
    config = PROJECT.config(steps=steps, batch_size=3, acceptance="always", max_workers=2)
    started = time.perf_counter()
    result = run_loop(
        config,
        tracking=f"sqlite:///{workdir}/mlflow.db" if tracking else None,
        experiment="bench", cache_dir=None, optimizer_llm=opt_llm, task_llm=task_llm,
    )
    wall = time.perf_counter() - started
    return wall / steps, len(optimizer.calls) + len(task.calls), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llm-latency-ms", type=float, default=1000.0,
                        help="simulated latency per optimizer call (task calls get a quarter)")
    args = parser.parse_args()
    latency = args.llm_latency_ms / 1000

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one_loop(2, True, tmp, 0.0)  # warm imports, SQLite schema, sandbox probe
        for label, delay in (("zero-latency LLMs", 0.0),
                             (f"{args.llm_latency_ms:g} ms/optimizer call", latency)):
            on, off = [], []
            for _ in range(args.repeats):
                off.append(one_loop(args.steps, False, tmp, delay)[0])
                on.append(one_loop(args.steps, True, tmp, delay)[0])
            rows.append((label, statistics.median(off), statistics.median(on)))

        cache = tmp / "cache"
        first_t, first_calls, first = one_loop(args.steps, True, tmp, 0.0, cache)
        again_t, again_calls, again = one_loop(args.steps, True, tmp, 0.0, cache)
        same = [v.version.version_id for v in first.versions] == [
            v.version.version_id for v in again.versions]
        import mlflow

        mlflow.flush_trace_async_logging()  # traces are written in the background

    print(f"loop: BBEH generated_boolean, {args.steps} steps x {args.repeats} repeats, "
          "batch 3, real sandbox, scripted LLMs")
    print(f"{'scripted LLM latency':28s} {'off s/step':>11s} {'on s/step':>10s} "
          f"{'on/off (goal <= 1.05)':>22s}")
    for label, t_off, t_on in rows:
        print(f"{label:28s} {t_off:11.3f} {t_on:10.3f} {t_on / t_off:22.3f}")
    print()
    print(f"{'measure':44s} {'value':>12s}")
    print(f"{'LLM calls, first run':44s} {first_calls:12d}")
    print(f"{'LLM calls, cached rerun (goal 0)':44s} {again_calls:12d}")
    print(f"{'per-step wall, rerun / first':44s} {again_t / first_t:12.3f}")
    print(f"{'rerun reproduces the same versions':44s} {str(same):>12s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
