"""The one interface every LLM backend implements, and the records it produces."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

Messages = Sequence[Mapping[str, str]]


class LLMError(RuntimeError):
    """The LLM backend itself failed (unreachable endpoint, rejected key, missing model file,
    retry budget spent). The message is one line naming the problem and the fix. Raised only for
    infrastructure failures: a bad *answer* is returned as text, never raised."""


class PromptTooLong(LLMError):
    """The request does not fit the model's context window. Callers treat it as a property of
    this one request (a trial or a proposal fails), not as a broken backend."""


@dataclass(frozen=True)
class Completion:
    """One answer. ``cached`` answers were served from the on-disk cache (no call was made);
    their token counts are those of the original call. ``cost_usd`` is ``None`` when no price is
    known for the model, 0.0 for local models."""

    text: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    cost_usd: float | None = None
    cached: bool = False
    attempts: int = 1
    finish_reason: str | None = None


@runtime_checkable
class LLM(Protocol):
    """A chat model.

    ``complete`` sends ``messages`` (OpenAI chat format) and returns the answer text. With
    ``json_schema`` the backend constrains decoding to that JSON schema where it can (llama.cpp
    grammars, OpenAI ``response_format``); with ``grammar`` (GBNF text, llama.cpp's grammar
    language) to that grammar where it can (embedded llama.cpp; llama.cpp servers), and
    otherwise decodes freely. Callers must validate either way, because small models and some
    servers do not honour constraints fully. ``seed`` is passed through where supported and is part
    of the cache key. Implementations are safe to call from several threads.
    """

    model: str

    def complete(
        self,
        messages: Messages,
        *,
        json_schema: Mapping[str, Any] | None = None,
        grammar: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 512,
        seed: int | None = None,
    ) -> Completion: ...


@dataclass(frozen=True)
class LLMCall:
    """What observers of an LLM see: the request, the answer and when it happened."""

    purpose: str  # "optimizer" or "task"
    model: str
    messages: tuple[Mapping[str, str], ...]
    params: Mapping[str, Any]
    completion: Completion | None
    start_time_ns: int
    end_time_ns: int
    error: str | None = None


CallListener = Callable[[LLMCall], None]


@dataclass
class ObservedLLM:
    """Wraps an LLM so that every call is reported to listeners (tracking, token budgets)."""

    inner: LLM
    purpose: str
    listeners: list[CallListener] = field(default_factory=list)

    @property
    def model(self) -> str:
        return self.inner.model

    def complete(self, messages: Messages, **kwargs: Any) -> Completion:
        start = time.time_ns()
        try:
            completion = self.inner.complete(messages, **kwargs)
        except Exception as exc:
            self._emit(messages, kwargs, None, start, str(exc))
            raise
        self._emit(messages, kwargs, completion, start, None)
        return completion

    def _emit(self, messages, kwargs, completion, start, error) -> None:
        call = LLMCall(
            purpose=self.purpose,
            model=self.inner.model,
            messages=tuple(dict(m) for m in messages),
            params={k: v for k, v in kwargs.items() if k != "json_schema"},
            completion=completion,
            start_time_ns=start,
            end_time_ns=time.time_ns(),
            error=error,
        )
        for listener in self.listeners:
            listener(call)
