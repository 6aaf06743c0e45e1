"""GEPA 0.1.4 on a BBEH task, for ``bench/bench_learning.py`` (run in its separate venv).

Same task, splits, exact-match scorer, seed prompt, answer extraction and task model as genopt's
BBEH loop (it evaluates through ``genopt_projects.bbeh.BBEHTask`` itself); the reflection model is
the one named by ``--reflection-model`` (a genopt model spec, cached like genopt's calls) and GEPA
gets ``--reflection-calls`` reflection (proposal) calls. Prints one JSON line: test accuracy of
GEPA's best candidate, validation before/after, task calls, reflection calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import gepa  # noqa: E402
from gepa.core.adapter import EvaluationBatch  # noqa: E402

from genopt_projects.bbeh.task import DEFAULT_EXTRACTOR, DEFAULT_PROMPT, SPEC, BBEHTask  # noqa: E402
from mlflow_genopt.artifact import ArtifactVersion  # noqa: E402
from mlflow_genopt.llm import make_llm  # noqa: E402


class CountingLLM:
    """Counts the calls that reach a model (a cached replay counts too: it stands for a call)."""

    def __init__(self, llm):
        self.llm, self.calls, self.cached = llm, 0, 0

    def complete(self, messages, **kwargs):
        self.calls += 1
        completion = self.llm.complete(messages, **kwargs)
        self.cached += bool(getattr(completion, "cached", False))  # a replay: no cost
        return completion


class BBEHAdapter:
    """GEPA's adapter protocol over genopt's BBEH task: the candidate is the prompt template."""

    propose_new_texts = None  # GEPA's own reflection prompt proposes the new texts

    def __init__(self, task: BBEHTask):
        self.task = task

    def evaluate(self, batch, candidate, capture_traces=False):
        prompt = candidate["prompt"]
        if "{question}" not in prompt:  # GEPA has no placeholder rule: the input goes last
            prompt = prompt.rstrip() + "\n\n{question}"
        version = ArtifactVersion({"prompt": prompt, "extract_answer": DEFAULT_EXTRACTOR}, step=0)
        trials = self.task.evaluate(version, batch)
        outputs = [t.output for t in trials]
        scores = [float(t.score) for t in trials]
        trajectories = None
        if capture_traces:
            trajectories = [{"input": e.input, "output": t.output, "feedback": t.feedback}
                            for e, t in zip(batch, trials)]
        return EvaluationBatch(outputs=outputs, scores=scores, trajectories=trajectories)

    def make_reflective_dataset(self, candidate, eval_batch, components_to_update):
        rows = [{"Inputs": str(t["input"]),
                 "Generated Outputs": json.dumps(t["output"], default=str)[:1500],
                 "Feedback": t["feedback"]} for t in (eval_batch.trajectories or [])]
        return {name: rows for name in components_to_update}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reflection-model", required=True)
    parser.add_argument("--task-model", default="smollm2")
    parser.add_argument("--task", default="boolean_expressions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reflection-calls", type=int, default=5)
    parser.add_argument("--options", default="{}")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    options = json.loads(args.options)

    task_llm = CountingLLM(make_llm(args.task_model, cache_dir=args.cache_dir))
    reflection = CountingLLM(make_llm(args.reflection_model, cache_dir=args.cache_dir))
    task = BBEHTask(args.task, task_llm, seed=args.seed, **options)
    train, val, test = task.examples("train"), task.examples("val"), task.examples("test")

    def reflection_lm(prompt: str) -> str:
        return reflection.complete([{"role": "user", "content": prompt}], temperature=0.7,
                                   max_tokens=1024, seed=args.seed + reflection.calls).text

    adapter = BBEHAdapter(task)
    seed_val = adapter.evaluate(val, {"prompt": DEFAULT_PROMPT})
    start_val = sum(seed_val.scores) / len(seed_val.scores)
    # GEPA's budget is in metric calls: the seed's validation, then per iteration one minibatch
    # for the parent, one for the child and (if it improves) a full validation. Stop at the
    # requested number of reflection calls with a generous metric budget.
    budget = len(val) * (args.reflection_calls + 1) + 2 * 3 * args.reflection_calls

    class StopAfterReflections:
        iterations = 0

        def __call__(self, state) -> bool:  # gepa's StopperProtocol, asked once per iteration
            self.iterations += 1  # a bound too, should reflections keep failing
            return (reflection.calls >= args.reflection_calls
                    or self.iterations > 3 * args.reflection_calls + 3)

    result = gepa.optimize(
        seed_candidate={"prompt": DEFAULT_PROMPT}, trainset=train, valset=val, adapter=adapter,
        reflection_lm=reflection_lm, candidate_selection_strategy="pareto",
        reflection_minibatch_size=3, max_metric_calls=budget, seed=args.seed,
        stop_callbacks=[StopAfterReflections()], display_progress_bar=False,
    )
    best = result.best_candidate
    task_calls_before_test = task_llm.calls
    test_batch = adapter.evaluate(test, best)
    row = {
        "start_val": start_val,
        "best_val": max(result.val_aggregate_scores),
        "val_gain": max(result.val_aggregate_scores) - start_val,
        "test": sum(test_batch.scores) / len(test_batch.scores),
        "candidates": len(result.candidates) - 1,
        "accepted": len(result.candidates) - 1,
        "optimizer_calls": reflection.calls,
        "task_calls": task_calls_before_test + len(test),
        "llm_calls": task_llm.calls + reflection.calls,
        "cached_calls": task_llm.cached + reflection.cached,
        "best_prompt": best["prompt"][:400],
    }
    print(json.dumps(row))


if __name__ == "__main__":
    sys.exit(main())
