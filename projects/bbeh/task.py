"""BBEH prompt optimization: a prompt template plus an answer-extraction function.

Each trial asks the task LLM the question rendered into the prompt template, runs the
``extract_answer`` parameter on the response (in the sandbox: it may be LLM-written code), and
scores the extracted answer by BBEH exact match. Feedback is "Correct." or "Wrong, expected X."
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from mlflow_genopt.artifact import ArtifactSpec, ArtifactVersion, Parameter
from mlflow_genopt.config import ConfigError
from mlflow_genopt.project import TaskSetup
from mlflow_genopt.llm.base import LLM, PromptTooLong
from mlflow_genopt.sandbox import SandboxLimits, run_function
from mlflow_genopt.task import Example, FixedSplits, Trial

from .data import load_examples
from .scoring import DEFAULT_EXTRACTOR, is_correct

PLACEHOLDER = "{question}"
DEFAULT_PROMPT = (
    "Answer the following question.\n\n{question}\n\n"
    "Think briefly, then finish with a line of the form: The answer is <answer>."
)

SPEC = ArtifactSpec((
    Parameter(
        "prompt", "prompt",
        "Prompt template sent to the task model; {question} is replaced by the question.",
        placeholders=(PLACEHOLDER,), max_chars=800,
    ),
    Parameter(
        "extract_answer", "code",
        "extract_answer(response: str) -> str: returns the final answer contained in the task "
        "model's response; the result is compared with the target by BBEH exact match.",
        max_chars=1500,
    ),
))

OBJECTIVE = (
    "Maximise the exact-match accuracy of a small language model on a reasoning task. The "
    "system renders each question into the prompt template, asks the model, and extracts the "
    "final answer from its response with extract_answer. Score 1 means the extracted answer "
    "equals the target, 0 otherwise."
)


class BBEHTask(FixedSplits):
    """One BBEH (or generated BBEH-format) task, split train/val/test with a fixed seed.

    Options (``LoopConfig.task_options``): ``data_dir`` (a BBEH ``benchmark_tasks`` dir),
    ``train_size`` (15), ``val_size`` (10), ``test_size`` (rest, or a number), ``split_seed`` (0;
    kept apart from the loop seed so that loops with different seeds compare on the same
    splits), ``answer_max_tokens`` (64), ``extract_timeout_s`` (10).
    """

    spec = SPEC
    objective = OBJECTIVE

    def __init__(self, task: str, llm: LLM, *, data_dir: str | None = None,
                 train_size: int = 15, val_size: int = 10, test_size: int | None = None,
                 split_seed: int = 0, answer_max_tokens: int = 64, temperature: float = 0.0,
                 max_workers: int = 4, extract_timeout_s: float = 10.0, seed: int = 0) -> None:
        raw = load_examples(task, data_dir)
        order = list(range(len(raw)))
        random.Random(split_seed).shuffle(order)
        if train_size < 1 or val_size < 0 or train_size + val_size >= len(raw):
            raise ConfigError(
                f"task_options: train_size {train_size} + val_size {val_size} must leave test "
                f"examples out of {len(raw)} in {task}"
            )
        examples = [Example(f"{task}-{i}", raw[i]["input"], raw[i]["target"]) for i in order]
        test_end = len(examples) if test_size is None else train_size + val_size + test_size
        self._splits = {
            "train": examples[:train_size],
            "val": examples[train_size : train_size + val_size],
            "test": examples[train_size + val_size : test_end],
        }
        self.name = f"bbeh/{task}"
        self.llm = llm
        self.answer_max_tokens = answer_max_tokens
        self.temperature = temperature
        self.max_workers = max_workers
        self.seed = seed
        self.limits = SandboxLimits(timeout_s=extract_timeout_s, memory_mb=512)

    def _ask(self, prompt: str, example: Example) -> str | PromptTooLong:
        content = prompt.replace(PLACEHOLDER, str(example.input))
        try:
            completion = self.llm.complete(
                [{"role": "user", "content": content}],
                temperature=self.temperature,
                max_tokens=self.answer_max_tokens,
                seed=self.seed,
            )
        except PromptTooLong as exc:  # this question does not fit: a failed trial, not a crash
            return exc
        return completion.text

    def evaluate(self, version: ArtifactVersion, examples: Sequence[Example]) -> list[Trial]:
        if not examples:
            return []
        prompt = version.values["prompt"]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            answers = list(pool.map(lambda e: self._ask(prompt, e), examples))
        responses = [a if isinstance(a, str) else "" for a in answers]
        results = run_function(
            version.values["extract_answer"], "extract_answer",
            [([response], {}) for response in responses], limits=self.limits,
        )
        trials = []
        for example, response, result, raw in zip(examples, responses, results, answers):
            if isinstance(raw, PromptTooLong):
                error = "the rendered prompt does not fit the task model's context window"
                trials.append(Trial(example.id, example.input, "", 0.0,
                                    f"Wrong, expected {example.target}. {error}.", error=error))
                continue
            answer, error = result.value, result.error
            if result.ok and not isinstance(answer, str):
                error = f"extract_answer returned {type(answer).__name__}, expected str"
            if error:
                tail = f"\n{result.traceback_tail}" if result.traceback_tail else ""
                feedback = f"Wrong, expected {example.target}. extract_answer failed: {error}{tail}"
                trials.append(Trial(example.id, example.input, response, 0.0, feedback, error=error))
                continue
            correct = is_correct(answer, example.target)
            feedback = (
                "Correct." if correct
                else f"Wrong, expected {example.target}. The extracted answer was {answer!r}."
            )
            trials.append(Trial(example.id, example.input, {"response": response, "answer": answer},
                                1.0 if correct else 0.0, feedback))
        return trials

    def close(self) -> None:
        pass


def make_task(setup: TaskSetup) -> BBEHTask:
    config, options = setup.config, dict(setup.options)
    return BBEHTask(config.task, setup.task_llm, temperature=config.task_temperature,
                    max_workers=config.max_workers, seed=config.seed, **options)
