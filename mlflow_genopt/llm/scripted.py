"""A fake LLM that answers from a script, for tests of loop mechanics (no model, no network)."""

from __future__ import annotations

import threading
from typing import Any, Callable, Mapping, Sequence

from mlflow_genopt.llm.base import Completion, LLMError, Messages

ScriptFunction = Callable[[Messages, int], str]


class ScriptedLLM:
    """Answers with ``responses`` in order: a list of strings, or a function
    ``(messages, call_index) -> str`` called once per request (``call_index`` counts from 0).

    A list that runs out raises :class:`LLMError` (a test that makes more calls than it scripted
    has a bug worth seeing) unless ``cycle=True``, which starts over from the first answer.
    Every request is recorded in ``calls`` as a dict with ``messages``, ``json_schema``,
    ``temperature``, ``max_tokens`` and ``seed``. Token counts are word counts, so that token
    budgets can be exercised. Safe to call from several threads: answers are handed out in the
    order calls acquire the lock.
    """

    def __init__(
        self,
        responses: Sequence[str] | ScriptFunction,
        model: str = "scripted",
        *,
        cycle: bool = False,
    ) -> None:
        if not callable(responses):
            responses = list(responses)
            if cycle and not responses:
                raise LLMError("scripted LLM with cycle=True needs at least one response")
            bad = [r for r in responses if not isinstance(r, str)]
            if bad:
                raise LLMError(f"scripted responses must be strings, got {type(bad[0]).__name__}")
        self.model = model
        self.cycle = cycle
        self.calls: list[dict[str, Any]] = []
        self._responses = responses
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ScriptedLLM(model={self.model!r}, calls={len(self.calls)})"

    def complete(
        self,
        messages: Messages,
        *,
        json_schema: Mapping[str, Any] | None = None,
        grammar: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 512,
        seed: int | None = None,
    ) -> Completion:
        with self._lock:
            index = len(self.calls)
            self.calls.append(
                {
                    "messages": [dict(m) for m in messages],
                    "json_schema": json_schema,
                    "grammar": grammar,
                    "temperature": temperature,
                    "max_tokens": max_tokens,
                    "seed": seed,
                }
            )
            if callable(self._responses):
                text = self._responses(messages, index)
            elif index < len(self._responses):
                text = self._responses[index]
            elif self.cycle:
                text = self._responses[index % len(self._responses)]
            else:
                raise LLMError(
                    f"scripted LLM ran out of responses: call {index + 1} but only "
                    f"{len(self._responses)} scripted"
                )
        prompt_words = sum(len(str(m.get("content", "")).split()) for m in messages)
        return Completion(
            text=text,
            model=self.model,
            prompt_tokens=prompt_words,
            completion_tokens=len(text.split()),
            cost_usd=0.0,
            finish_reason="stop",
        )
