"""Any OpenAI-compatible chat endpoint: OpenAI itself, or a local server (llama.cpp server, vLLM,
Ollama, LM Studio) reached through ``base_url``.

Structured output, and what happens when a server does not support it: a JSON schema is sent as
``response_format: json_schema`` (OpenAI, vLLM, Ollama, LM Studio, llama.cpp's ``llama-server``).
A server that refuses it with any 4xx or 5xx whose body names ``response_format``, ``json_schema``
or ``schema`` (llama-cpp-python's ``python -m llama_cpp.server`` answers 500: its request model
knows only ``text`` and ``json_object``) gets the next weaker form at once, without counting a
retry: ``json_object`` carrying the schema (llama-cpp-python's server constrains decoding to it),
then plain ``json_object``, then no ``response_format`` at all. Each client remembers how far it
had to go, so later calls pay no failed request. A GBNF ``grammar`` (the ``tagged`` and ``diff``
edit formats) is sent as a ``grammar`` body field to servers not on api.openai.com: llama.cpp's
servers (``llama-server``, ``llama_cpp.server``) constrain decoding with it; most other servers
ignore unknown fields, and one that refuses it (an error naming ``grammar``) is asked again
without it, also remembered. Answers are validated by the caller either way.

Retries are ours, not the ``openai`` client's (it is built with ``max_retries=0``), so that every
retry is visible to the caller through ``on_retry`` and counted in ``Completion.attempts``, and so
that the final error names the endpoint and the fix in one line.
"""

from __future__ import annotations

import email.utils
import json
import os
import random
import re
import time
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

import openai

from mlflow_genopt.llm.base import Completion, LLMError, Messages, PromptTooLong
from mlflow_genopt.llm.pricing import cost_usd

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"

RetryCallback = Callable[[int, str, float], None]
"""``on_retry(attempt, error, sleep_s)``: attempt ``attempt`` failed with ``error`` (one line)
and the next one starts after ``sleep_s`` seconds."""

_MAX_BACKOFF_S = 30.0
_MAX_RETRY_AFTER_S = 120.0
# Reasoning models reject ``temperature`` and want ``max_completion_tokens`` instead of
# ``max_tokens``; local servers only know ``max_tokens``, so the switch is by model name.
_REASONING_MODEL = re.compile(r"^(openai/)?(o\d|gpt-5)")


class OpenAICompatibleLLM:
    """A chat model behind an OpenAI-compatible HTTP API.

    ``base_url`` and ``api_key`` default to ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY``. A local
    server (any ``base_url`` not on api.openai.com) needs no key. Transient failures (connection
    errors, timeouts, 408, 429, 5xx) are retried up to ``max_retries`` times with exponential
    backoff and jitter starting at ``backoff_s``; a 429's ``Retry-After`` header, when present,
    sets the wait instead. A body that is not a chat completion (not JSON, not UTF-8, no
    choices) counts as a transient failure too. Everything else (rejected key, unknown model, bad
    request) raises :class:`LLMError` at once. ``timeout_s`` (60), ``max_retries`` (4) and
    ``backoff_s`` (1) default to the environment variables ``GENOPT_LLM_TIMEOUT_S``,
    ``GENOPT_LLM_MAX_RETRIES`` and ``GENOPT_LLM_BACKOFF_S`` when set, so that a command line can
    bound how long an unreachable endpoint is waited for. Answers never hold lone surrogates
    (replaced by U+FFFD). Safe to call from several threads: the ``openai`` client is, and the
    only mutable state is what the server refused (the structured-output level and the grammar
    flag, see the module docstring), which only ever grows. A refusal naming the
    response format or the grammar is not a transient failure: the request is resent at once in
    the weaker form and no retry is counted.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float | None = None,
        max_retries: int | None = None,
        backoff_s: float | None = None,
        on_retry: RetryCallback | None = None,
    ) -> None:
        if not model:
            raise LLMError("no model name given: pass e.g. 'openai:gpt-4.1-mini'")
        timeout_s = _setting("timeout_s", timeout_s, 60.0, float, 0.001)
        max_retries = _setting("max_retries", max_retries, 4, int, 0)
        backoff_s = _setting("backoff_s", backoff_s, 1.0, float, 0.0)
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or None
        if api_key is None:
            if base_url is None or _is_openai_host(base_url):
                raise LLMError(
                    "OPENAI_API_KEY is not set: export it, or set OPENAI_BASE_URL for a local "
                    "OpenAI-compatible server"
                )
            api_key = "not-needed"  # local servers ignore the key, but the client demands one
        self.model = model
        self.base_url = (base_url or OPENAI_DEFAULT_BASE_URL).rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.on_retry = on_retry
        # How far down _FORMAT_LEVELS this server made us go, and whether it refused grammars;
        # both only ever grow, so later calls skip forms already refused (see the module doc).
        self._format_level = 0
        self._grammar_refused = _is_openai_host(self.base_url)
        self._client = openai.OpenAI(
            base_url=self.base_url, api_key=api_key, timeout=timeout_s, max_retries=0
        )

    def __repr__(self) -> str:
        return f"OpenAICompatibleLLM(model={self.model!r}, base_url={self.base_url!r})"

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
        """One chat completion. ``latency_s`` is the wall time the caller waited, retries and
        backoff included; ``attempts`` counts the HTTP requests made."""
        request: dict[str, Any] = {
            "model": self.model,
            "messages": [{k: _valid_unicode(v) if isinstance(v, str) else v for k, v in m.items()}
                         for m in messages],
        }
        if _REASONING_MODEL.match(self.model.lower()):
            request["max_completion_tokens"] = max_tokens
        else:
            request["temperature"] = temperature
            request["max_tokens"] = max_tokens
        if seed is not None:
            request["seed"] = seed
        level = self._format_level
        if json_schema is not None:
            self._set_response_format(request, json_schema, level)
        elif grammar is not None and not self._grammar_refused:
            request["extra_body"] = {"grammar": grammar}

        start = time.perf_counter()
        attempts = 0
        transient_failures = 0
        while True:
            attempts += 1
            try:
                response = self._client.chat.completions.create(**request)
                text, finish_reason, usage = _read_response(response)
                break
            except _MALFORMED as exc:  # an answer, but not an OpenAI-shaped JSON body
                error = f"malformed response ({_one_line(f'{type(exc).__name__}: {exc}', 120)})"
                if transient_failures >= self.max_retries:
                    raise LLMError(
                        f"LLM endpoint {self.base_url} sent no usable answer after {attempts} "
                        f"attempts: {error}; check that it is an OpenAI-compatible chat endpoint"
                    ) from None
                sleep_s = self._backoff(transient_failures)
            except openai.APIConnectionError as exc:  # includes APITimeoutError
                error = _connection_reason(exc, self.timeout_s)
                if transient_failures >= self.max_retries:
                    raise LLMError(
                        f"cannot reach LLM endpoint {self.base_url} after {attempts} attempts: "
                        f"{error}; check OPENAI_BASE_URL / that the server is running"
                    ) from None
                sleep_s = self._backoff(transient_failures)
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status in (401, 403):
                    raise LLMError(
                        f"LLM endpoint {self.base_url} rejected the API key ({status}): "
                        "check OPENAI_API_KEY"
                    ) from None
                if status == 404:
                    raise LLMError(
                        f"LLM endpoint {self.base_url} does not serve model {self.model!r} (404): "
                        f"check the model name; {_status_reason(exc)}"
                    ) from None
                if status >= 400 and json_schema is not None and level < len(_FORMAT_LEVELS) - 1 \
                        and _mentions(exc, ("response_format", "json_schema", "schema",
                                            "response format")):
                    level += 1  # a weaker form at once: not a transient failure
                    self._format_level = max(self._format_level, level)
                    self._set_response_format(request, json_schema, level)
                    continue
                if status >= 400 and "extra_body" in request and _mentions(exc, ("grammar",)):
                    self._grammar_refused = True
                    del request["extra_body"]
                    continue
                if status == 400 and "context" in _status_reason(exc).lower() and (
                    "length" in _status_reason(exc).lower() or "window" in _status_reason(exc).lower()
                ):
                    raise PromptTooLong(
                        f"LLM endpoint {self.base_url}: request too long for {self.model!r}: "
                        f"{_status_reason(exc)}"
                    ) from None
                if not (status in (408, 429) or status >= 500):
                    raise LLMError(
                        f"LLM endpoint {self.base_url} refused the request for model "
                        f"{self.model!r}: {_status_reason(exc)}"
                    ) from None
                error = _status_reason(exc)
                if transient_failures >= self.max_retries:
                    raise LLMError(
                        f"LLM endpoint {self.base_url} still failing after {attempts} attempts: "
                        f"{error}"
                    ) from None
                retry_after = _retry_after_s(exc.response.headers) if status == 429 else None
                if retry_after is not None:
                    sleep_s = retry_after
                else:
                    sleep_s = self._backoff(transient_failures)
            transient_failures += 1
            if self.on_retry is not None:
                self.on_retry(attempts, error, sleep_s)
            time.sleep(sleep_s)

        latency_s = time.perf_counter() - start
        prompt_tokens, completion_tokens = usage
        return Completion(
            text=text,
            model=self.model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_s=latency_s,
            cost_usd=cost_usd(self.model, prompt_tokens, completion_tokens),
            attempts=attempts,
            finish_reason=finish_reason,
        )

    def check_key(self, timeout_s: float = 5.0) -> None:
        """Raise :class:`LLMError` at once if the endpoint rejects the API key (401/403 on
        ``GET /models``), so that a run with a wrong key fails before it creates anything.
        Anything else (unreachable, no such route) is left to the first real request, so that
        a loop replayed from the response cache needs no endpoint at all."""
        try:
            self._client.with_options(timeout=min(self.timeout_s, timeout_s)).models.list()
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise LLMError(
                f"LLM endpoint {self.base_url} rejected the API key ({exc.status_code}): "
                "check OPENAI_API_KEY"
            ) from None
        except Exception:  # noqa: BLE001 - not a verdict on the key
            return

    @staticmethod
    def _set_response_format(request: dict[str, Any], json_schema: Mapping[str, Any],
                             level: int) -> None:
        form = _FORMAT_LEVELS[level]
        if form == "json_schema":
            # strict=False: strict mode rejects common schemas (optional fields, free-form objects).
            request["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "proposal", "schema": dict(json_schema), "strict": False},
            }
        elif form == "json_object+schema":
            request["response_format"] = {"type": "json_object", "schema": dict(json_schema)}
        elif form == "json_object":
            request["response_format"] = {"type": "json_object"}
        else:
            request.pop("response_format", None)

    @property
    def response_format(self) -> str:
        """The strongest structured-output form this server has not refused (see the module
        docstring): ``json_schema``, ``json_object+schema``, ``json_object`` or ``none``."""
        return _FORMAT_LEVELS[self._format_level]

    def _backoff(self, failures_so_far: int) -> float:
        base = min(self.backoff_s * 2**failures_so_far, _MAX_BACKOFF_S)
        return base * random.uniform(0.5, 1.5)


def _setting(name: str, value: Any, default: Any, kind: type, minimum: float) -> Any:
    """``value``, else ``$GENOPT_LLM_<NAME>``, else ``default``; one-line :class:`LLMError` if
    it is not a ``kind`` >= ``minimum``."""
    variable = f"GENOPT_LLM_{name.upper()}"
    source = name
    if value is None:
        raw = os.environ.get(variable, "").strip()
        if not raw:
            return default
        value, source = raw, f"${variable}"
    try:
        number = kind(value)
        if kind is int and number != float(value):
            raise ValueError
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool) or not number >= minimum:
        what = "an integer" if kind is int else "a number"
        raise LLMError(f"{source}: must be {what} >= {minimum:g}, got {value!r}")
    return number


class _MalformedResponse(ValueError):
    """The body parsed, but is not a chat completion (no choices, no message, wrong types)."""


# A body that is not UTF-8 JSON, or not shaped like a chat completion: the endpoint (or a proxy
# in front of it) misbehaved for this attempt; retried like a 5xx, never a crash of the caller.
_MALFORMED = (_MalformedResponse, UnicodeDecodeError, json.JSONDecodeError, RecursionError,
              openai.APIResponseValidationError)


def _read_response(response: Any) -> tuple[str, str | None, tuple[int, int]]:
    """``(text, finish_reason, (prompt_tokens, completion_tokens))`` of a chat completion, or
    :class:`_MalformedResponse`. The text has no lone surrogates (see :func:`_valid_unicode`)."""
    try:
        choice = response.choices[0]
        content = choice.message.content
        finish_reason = choice.finish_reason
        usage = response.usage
        tokens = ((usage.prompt_tokens or 0), (usage.completion_tokens or 0)) if usage else (0, 0)
    except (AttributeError, IndexError, KeyError, TypeError) as exc:
        raise _MalformedResponse(f"not a chat completion: {type(exc).__name__}") from None
    if content is not None and not isinstance(content, str):
        raise _MalformedResponse(f"message content is {type(content).__name__}, not a string")
    if not all(isinstance(t, int) and t >= 0 for t in tokens):
        tokens = (0, 0)  # a server's odd usage block must not break token budgets
    if finish_reason is not None and not isinstance(finish_reason, str):
        finish_reason = str(finish_reason)
    return _valid_unicode(content or ""), finish_reason, tokens


def _valid_unicode(text: str) -> str:
    """``text`` with lone surrogates (a JSON body may escape them, ``"\\udc80"``) replaced by
    U+FFFD: such strings cannot be encoded as UTF-8, so the cache, MLflow and the next request
    would all fail on them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _is_openai_host(base_url: str) -> bool:
    host = urlparse(base_url).hostname or ""
    return host == "openai.com" or host.endswith(".openai.com")


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _connection_reason(exc: openai.APIConnectionError, timeout_s: float) -> str:
    if isinstance(exc, openai.APITimeoutError):
        return f"request timed out after {timeout_s:g}s"
    cause = exc.__cause__ or exc.__context__
    return _one_line(str(cause) if cause and str(cause) else exc.message)


def _status_reason(exc: openai.APIStatusError) -> str:
    """``<status> <server's message>``, preferring the OpenAI-shaped ``error.message`` field."""
    body = exc.body
    message: Any = None
    if isinstance(body, Mapping):
        error = body.get("error", body)
        message = error.get("message") if isinstance(error, Mapping) else error
    return _one_line(f"{exc.status_code} {message or exc.message}")


_FORMAT_LEVELS = ("json_schema", "json_object+schema", "json_object", "none")


def _mentions(exc: openai.APIStatusError, words: tuple[str, ...]) -> bool:
    """Whether the error's message or body names one of ``words`` (what the server refused)."""
    text = f"{exc.message} {exc.body}".lower()
    return any(word in text for word in words)


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait as the server asked (``retry-after-ms`` or ``retry-after``, in seconds or
    as an HTTP date), capped; ``None`` when absent or unreadable."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return min(max(float(value) / 1000.0, 0.0), _MAX_RETRY_AFTER_S)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER_S)
