"""A small in-process task for unit tests of loop mechanics (no generated code is executed).

The artifact is one prompt; a trial on word ``w`` scores 1 when the prompt contains ``w``.
Multi-step mode attaches a trace of ``trace_len`` steps to each trial.
"""

from __future__ import annotations

import json
from typing import Sequence

from mlflow_genopt import ArtifactSpec, ArtifactVersion, Example, Parameter, TraceStep, Trial

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike", "november", "oscar", "papa"]


class WordTask:
    name = "toy/words"
    objective = "Make the prompt mention every word the trials ask for."
    spec = ArtifactSpec((Parameter("prompt", "prompt", "A list of words."),))

    def __init__(self, train: Sequence[str] = WORDS[:8], val: Sequence[str] = WORDS[8:12],
                 test: Sequence[str] = WORDS[12:], trace_len: int = 0) -> None:
        self.splits = {
            name: [Example(f"{name}-{w}", w, w) for w in words]
            for name, words in (("train", train), ("val", val), ("test", test))
        }
        self.trace_len = trace_len
        self.calls: list[tuple[str, tuple[str, ...]]] = []  # (version_id, example ids)

    def examples(self, split: str):
        return self.splits[split]

    def evaluate(self, version: ArtifactVersion, examples: Sequence[Example]) -> list[Trial]:
        self.calls.append((version.version_id, tuple(e.id for e in examples)))
        trials = []
        for e in examples:
            hit = e.input in version.values["prompt"].split()
            trace = tuple(
                TraceStep(observation={"t": t, "word": e.input}, action=f"a{t}", reward=float(t))
                for t in range(self.trace_len)
            )
            trials.append(Trial(e.id, e.input, version.values["prompt"], 1.0 if hit else 0.0,
                                "Correct." if hit else f"Wrong, expected {e.input}.", trace))
        return trials

    def close(self) -> None:
        pass


def answer(prompt: str, reasoning: str = "add words") -> str:
    return json.dumps({"reasoning": reasoning, "prompt": prompt})
