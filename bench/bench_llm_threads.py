"""Benchmark: llama.cpp threads for the embedded backend: llama-cpp-python's default (half the
logical CPUs, assuming SMT) against genopt's default (the physical cores this process may use).

Loads the model once per thread count and times, alternately in one run, a prompt (prompt
processing) and a fixed number of generated tokens. Prints tokens/s per setting and the ratio.

Usage::

    python bench/bench_llm_threads.py [MODEL_SPEC_OR_GGUF] [--rounds 3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from llama_cpp import Llama

from mlflow_genopt.llm.llama_cpp import default_n_threads, locate_smollm2



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    path = str(locate_smollm2()) if args.model == "smollm2" else args.model
    settings = {"llama-cpp-python default": max((os.cpu_count() or 2) // 2, 1),
                "genopt default": default_n_threads()}
    models = {name: Llama(model_path=path, n_ctx=4096, n_threads=n, verbose=False, seed=0)
              for name, n in settings.items()}
    prompt = ("Rewrite this Python function so that it handles missing values:\n"
              + "def f(df):\n    return df.fillna(0)\n" * 60)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, llama in models.items():  # alternate, so drift hits both alike
            llama.reset()
            started = time.perf_counter()
            out = llama.create_completion(prompt, max_tokens=1, temperature=0.0)
            prompt_s = time.perf_counter() - started
            n_prompt = out["usage"]["prompt_tokens"]
            started = time.perf_counter()
            out = llama.create_completion(prompt, max_tokens=args.tokens, temperature=0.0)
            gen_s = time.perf_counter() - started  # prompt is cached: mostly generation
            times[name].append((n_prompt / prompt_s, out["usage"]["completion_tokens"] / gen_s))
    base = None
    for name, n in settings.items():
        pp = statistics.median(t[0] for t in times[name])
        tg = statistics.median(t[1] for t in times[name])
        base = base or (pp, tg)
        print(f"{name:26} n_threads={n}: prompt {pp:7.1f} tok/s ({pp / base[0]:.2f}x)  "
              f"generation {tg:6.1f} tok/s ({tg / base[1]:.2f}x)")


if __name__ == "__main__":
    main()
