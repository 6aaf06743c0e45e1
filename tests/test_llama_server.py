"""Against a server users run every day: llama-cpp-python's own OpenAI-compatible server
(`python -m llama_cpp.server`) on loopback, serving the embedded SmolLM2 GGUF. It answers
`response_format: json_schema` with HTTP 500 (its request model knows only `text` and
`json_object`); genopt falls back at once, remembers, and completes a loop through it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

pytestmark = pytest.mark.e2e

ALIAS = "smol"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is a dependency: install the project")
    for module in ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings"):
        pytest.importorskip(module, reason="llama_cpp.server needs the test extra: pip install -e '.[test]'")
    from mlflow_genopt.llm import locate_smollm2

    port = _free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(locate_smollm2()),
             "--model_alias", ALIAS, "--n_ctx", "4096", "--n_threads", "2",
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120  # readiness only: loading a 135M model takes seconds
        while True:
            if process.poll() is not None:
                pytest.fail(f"llama_cpp.server exited {process.returncode}: "
                            f"{log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not come up: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_server_refuses_json_schema_with_500_and_genopt_falls_back(llama_server: str) -> None:
    import openai

    from mlflow_genopt.llm import OpenAICompatibleLLM

    schema = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"]}
    messages = [{"role": "user", "content": "Name one city as JSON."}]

    # What the server itself does with json_schema, asked directly: HTTP 500 naming the field.
    raw = openai.OpenAI(base_url=llama_server, api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as refused:
        raw.chat.completions.create(model=ALIAS, messages=messages, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    assert "response_format" in str(refused.value.body)

    retries: list[tuple] = []
    llm = OpenAICompatibleLLM(ALIAS, base_url=llama_server, max_retries=0, timeout_s=60,
                              on_retry=lambda *a: retries.append(a))
    first = llm.complete(messages, json_schema=schema, max_tokens=48, seed=0)
    assert first.attempts == 2 and retries == []  # one refusal, no retry spent on it
    assert llm.response_format == "json_object+schema"  # the server's own schema form
    assert isinstance(json.loads(first.text, strict=False)["city"], str)  # schema-constrained
    second = llm.complete(messages, json_schema=schema, max_tokens=48, seed=1)
    assert second.attempts == 1  # remembered


def test_server_constrains_decoding_with_a_grammar(llama_server: str) -> None:
    from mlflow_genopt.artifact import ArtifactSpec, Parameter
    from mlflow_genopt.formats import tagged_grammar
    from mlflow_genopt.llm import OpenAICompatibleLLM

    spec = ArtifactSpec((Parameter("prompt", "prompt", "the instruction"),))
    llm = OpenAICompatibleLLM(ALIAS, base_url=llama_server, max_retries=0, timeout_s=60)
    answer = llm.complete([{"role": "user", "content": "Why is the sky blue?"}],
                          grammar=tagged_grammar(spec), max_tokens=32, seed=0)
    assert answer.attempts == 1 and answer.text.startswith("<reasoning>\n")


def test_server_context_overflow_is_prompt_too_long(llama_server: str) -> None:
    from mlflow_genopt.llm import OpenAICompatibleLLM, PromptTooLong

    llm = OpenAICompatibleLLM(ALIAS, base_url=llama_server, max_retries=0, timeout_s=60)
    with pytest.raises(PromptTooLong, match="request too long"):
        llm.complete([{"role": "user", "content": "word " * 6000}], max_tokens=8)


def test_genopt_run_completes_a_loop_through_the_server(llama_server: str, tmp_path: Path) -> None:
    # The json edit format sends json_schema, which this server refuses with a 500; with
    # GENOPT_LLM_MAX_RETRIES=0 the run can only complete if that refusal is a fallback, not a
    # retry. (The tagged/diff formats' grammars over HTTP: the test above.)
    edit_format = "json"
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command = [
        sys.executable, "-m", "mlflow_genopt.cli", "run", "bbeh", "--task", "generated_arithmetic",
        "--optimizer-model", f"openai:{ALIAS}", "--base-url", llama_server,
        "--edit-format", edit_format, "--steps", "2", "--batch-size", "2",
        "--acceptance", "always", "--optimizer-max-tokens", "160",
        "--option", "train_size=4", "--option", "val_size=2", "--option", "test_size=2",
        "--option", "answer_max_tokens=16", "--tracking-uri", uri, "--experiment", "server",
        "--cache-dir", str(tmp_path / "cache"),
    ]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "GENOPT_LLM_MAX_RETRIES": "0",
           "GENOPT_LLM_TIMEOUT_S": "300"}  # a loaded 2-core machine: slow, not dead
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600,
                               cwd=tmp_path, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "[genopt] step 2/2" in completed.stderr

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("server")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer_model"] == f"openai:{ALIAS}"
    assert run.data.params["edit_format"] == edit_format
    proposed = {m.step for m in client.get_metric_history(run.info.run_id, "valid")}
    assert proposed == {1, 2}  # the optimizer behind the server answered at every step
