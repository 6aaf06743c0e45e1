"""A fake OpenAI-compatible chat endpoint on loopback, for tests and benchmarks.

Real HTTP through the real ``openai`` client: point a loop at it with
``optimizer_model="openai:fake"`` and ``base_url=server.base_url``. What it answers is up to the
test:

* ``optimizer`` / ``task``: how to answer learning contexts (requests whose system prompt is the
  optimizer's) and task-model questions (everything else). Each is a list of answers (used in
  order, the last one repeated) or a callable ``(request_json, index) -> answer``. An answer is a
  ``str`` (the message content), or a :class:`Reply` for control over the HTTP level: raw bytes as
  the body, a status code, headers, ``finish_reason``, token counts.
* Faults, injected into a share ``fault_rate`` of chat requests: ``timeout`` (the answer comes
  after ``timeout_sleep_s``, longer than the client waits), ``429`` (with ``Retry-After``),
  ``500``, ``drop`` (the connection is closed without an answer), taking turns. Every distinct
  request body gets at most ``max_faults_per_request`` faults, so that a client with more
  retries than that always gets through, whatever the interleaving of parallel calls; once a
  body got an answer it always gets one. Whether a request is faulted is drawn from ``seed``
  and the request body, so a rerun injects the same faults.
* ``down=True``: every chat request fails with ``down_status`` (or ``"drop"``), forever.
* ``api_key``: requests whose ``Authorization`` header differs get a 401 in OpenAI's shape.

Everything is counted in :attr:`FakeOpenAI.stats`; requests to any other path (e.g. generated
code that escaped its sandbox's network namespace and called home) are listed in
``stats["other_requests"]``. Nothing is written to disk; request bodies are kept in memory
(``requests``) so that tests can inspect the learning contexts.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

OPTIMIZER_MARKER = "You are an optimizer."
FAULT_KINDS = ("timeout", "429", "500", "drop")


@dataclass
class Reply:
    """One answer with HTTP-level control. ``body`` (bytes) replaces the whole response body
    (then ``content`` is ignored); ``status`` != 200 sends an error in OpenAI's shape unless
    ``body`` is given."""

    content: str = ""
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    finish_reason: str = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    message: str = "fake error"


Answer = Union[str, Reply]
Responder = Union[Sequence[Answer], Callable[[dict, int], Answer], None]


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


class FakeOpenAI:
    """See the module docstring. Use as a context manager, or call :meth:`start`/:meth:`stop`."""

    def __init__(
        self,
        optimizer: Responder = None,
        task: Responder = None,
        *,
        fault_rate: float = 0.0,
        faults: Sequence[str] = FAULT_KINDS,
        max_faults_per_request: int = 2,
        seed: int = 0,
        timeout_sleep_s: float = 2.0,
        retry_after: str = "0.05",
        down: bool = False,
        down_status: int | str = 503,
        api_key: str | None = None,
    ) -> None:
        unknown = set(faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        self.optimizer = optimizer
        self.task = task if task is not None else ["The answer is 0."]
        self.fault_rate = fault_rate
        self.faults = tuple(faults)
        self.max_faults_per_request = max_faults_per_request
        self.seed = seed
        self.timeout_sleep_s = timeout_sleep_s
        self.retry_after = retry_after
        self.down = down
        self.down_status = down_status
        self.api_key = api_key
        self.stats: Counter = Counter()
        self.stats["other_requests"] = 0
        self.other_requests: list[str] = []
        self.requests: list[dict] = []  # every chat request body that was answered (not faulted)
        # (time, sha256 of the request body, "answer" or the fault kind) of every chat request
        self.log: list[tuple[float, str, str]] = []
        self._faults_by_body: Counter = Counter()
        self._index = Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._server is not None, "start() the server first"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FakeOpenAI":
        fake = self

        class Handler(_Handler):
            server_owner = fake

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-openai",
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- decisions ------------------------------------------------------------------------
    @property
    def faults_injected(self) -> int:
        return sum(self.stats[f"fault_{kind}"] for kind in FAULT_KINDS)

    def _fault_for(self, body: bytes) -> str | None:
        digest = hashlib.sha256(body).hexdigest()
        if self.down:
            with self._lock:
                self.stats["down_responses"] += 1
                self.log.append((time.monotonic(), digest, "down"))
            return "drop" if self.down_status == "drop" else f"down_{self.down_status}"
        if not self.fault_rate or not self.faults:
            with self._lock:
                self.log.append((time.monotonic(), digest, "answer"))
            return None
        with self._lock:
            attempt = self._faults_by_body[digest]
            if attempt >= self.max_faults_per_request:
                self.log.append((time.monotonic(), digest, "answer"))
                return None
            rng = random.Random(f"{self.seed}:{digest}:{attempt}")
            if rng.random() >= self.fault_rate:
                self._faults_by_body[digest] = self.max_faults_per_request  # this body succeeds
                self.log.append((time.monotonic(), digest, "answer"))
                return None
            self._faults_by_body[digest] += 1
            kind = self.faults[self.faults_injected % len(self.faults)]  # in turn: every kind shows
            self.stats[f"fault_{kind}"] += 1
            self.log.append((time.monotonic(), digest, kind))
            return kind

    def _answer(self, request: dict) -> tuple[str, Answer]:
        messages = request.get("messages") or []
        first = messages[0].get("content", "") if messages else ""
        purpose = "optimizer" if isinstance(first, str) and first.startswith(OPTIMIZER_MARKER) else "task"
        responder = self.optimizer if purpose == "optimizer" else self.task
        with self._lock:
            index = self._index[purpose]
            self._index[purpose] += 1
            self.stats[f"{purpose}_requests"] += 1
            self.requests.append(request)
        if responder is None:
            return purpose, json.dumps({"reasoning": "no change"})
        if callable(responder):
            return purpose, responder(request, index)
        return purpose, responder[min(index, len(responder) - 1)]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_owner: FakeOpenAI

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _error(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps({"error": {"message": message, "type": "fake_error", "code": status}})
        self._send(status, body.encode(), headers)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        fake = self.server_owner
        if not self.path.rstrip("/").endswith("/models"):
            self._other()
            return
        with fake._lock:
            fake.stats["model_list_requests"] += 1
        if fake.api_key is not None and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
            self._error(401, "Incorrect API key provided.")
            return
        self._send(200, json.dumps({"object": "list", "data": [
            {"id": "fake", "object": "model", "created": 0, "owned_by": "fake"}]}).encode())

    def _other(self) -> None:
        fake = self.server_owner
        with fake._lock:
            fake.stats["other_requests"] += 1
            fake.other_requests.append(f"{self.command} {self.path}")
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:  # noqa: N802
        fake = self.server_owner
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._other()
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with fake._lock:
            fake.stats["chat_requests"] += 1
        if fake.api_key is not None and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
            with fake._lock:
                fake.stats["unauthorized"] += 1
            self._error(401, "Incorrect API key provided.")
            return
        fault = fake._fault_for(body)
        if fault is not None:
            self._inject(fault)
            return
        try:
            request = json.loads(body)
        except ValueError:
            self._error(400, "request body is not JSON")
            return
        purpose, answer = fake._answer(request)
        reply = answer if isinstance(answer, Reply) else Reply(content=answer)
        if reply.body is not None:
            self._send(reply.status, reply.body, reply.headers)
            return
        if reply.status != 200:
            self._error(reply.status, reply.message, reply.headers)
            return
        prompt = "".join(str(m.get("content", "")) for m in request.get("messages") or [])
        prompt_tokens = _tokens(prompt) if reply.prompt_tokens is None else reply.prompt_tokens
        completion_tokens = (_tokens(reply.content) if reply.completion_tokens is None
                             else reply.completion_tokens)
        payload = {
            "id": f"chatcmpl-fake-{purpose}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", "fake"),
            "choices": [{"index": 0, "finish_reason": reply.finish_reason,
                         "message": {"role": "assistant", "content": reply.content}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }
        self._send(200, json.dumps(payload).encode(), reply.headers)

    def _inject(self, fault: str) -> None:
        fake = self.server_owner
        if fault == "timeout":
            fake._stopping.wait(fake.timeout_sleep_s)  # the client has given up by then
            self._drop()
        elif fault == "429":
            self._error(429, "Rate limit reached (fake).", {"Retry-After": fake.retry_after})
        elif fault == "500":
            self._error(500, "The server had an error (fake).")
        elif fault == "drop":
            self._drop()
        elif fault.startswith("down_"):
            self._error(int(fault[5:]), "Service unavailable (fake endpoint is down).")
        else:  # pragma: no cover
            raise AssertionError(fault)


def arithmetic_task_model(request: dict, index: int) -> str:
    """A task model for bbeh's ``generated_arithmetic`` questions that is always right (when the
    prompt still holds the question), so that loops have something to learn from."""
    question = str((request.get("messages") or [{}])[-1].get("content", ""))
    try:
        expression = question.split("What is ")[1].split("?")[0]
    except IndexError:
        return "I do not know."
    if not expression or not set(expression) <= set("0123456789+-*() "):
        return "I do not know."
    return f"The answer is {eval(expression)}."  # noqa: S307 - digits and operators only
