"""An on-disk cache of LLM answers, so that re-running or resuming a loop does not pay twice.

The key is the whole request: model, messages, JSON schema, grammar, temperature, max_tokens
and seed.
Two requests that differ in any of them are different entries. Note what that implies for
sampling: identical requests at ``temperature > 0`` without a seed get the *same* cached answer;
callers that want several different samples should pass different seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from mlflow_genopt.llm.base import LLM, Completion, Messages

CACHE_FILENAME = "llm-cache.sqlite"
_COMPLETION_FIELDS = {f.name for f in dataclasses.fields(Completion)}


def request_key(
    model: str,
    messages: Messages,
    json_schema: Mapping[str, Any] | None,
    temperature: float,
    max_tokens: int,
    seed: int | None,
    grammar: str | None = None,
) -> str:
    """sha256 of the request as canonical JSON (sorted keys, no whitespace), so that the key does
    not depend on dict order or on ``0`` vs ``0.0``. ``grammar`` enters the key only when given,
    so that requests without one keep the keys they had before grammars existed."""
    request = {
        "model": model,
        "messages": [dict(m) for m in messages],
        "json_schema": json_schema,
        "temperature": float(temperature),
        "max_tokens": int(max_tokens),
        "seed": seed,
    }
    if grammar is not None:
        request["grammar"] = grammar
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class CachedLLM:
    """Wraps ``inner`` with a response cache in ``cache_dir/llm-cache.sqlite``.

    A hit returns the stored completion with ``cached=True`` and ``latency_s=0.0``; its token
    counts, cost and attempts are those of the original call (check ``cached`` before charging
    them to a budget). Only successful answers are stored; an :class:`LLMError` from ``inner``
    propagates and is asked again next time. The file is SQLite in WAL mode, so several threads
    and processes may share one cache directory; two simultaneous misses on the same key both
    call ``inner`` and the last answer stored wins. ``hits`` and ``misses`` count this instance's
    lookups. The directory and file are created with the first stored answer, so that a run
    that fails before any answer (a bad config, an unreachable endpoint) leaves nothing behind.
    """

    def __init__(self, inner: LLM, cache_dir: Path | str) -> None:
        self.inner = inner
        self.cache_dir = Path(cache_dir)
        self.path = self.cache_dir / CACHE_FILENAME
        self.hits = 0
        self.misses = 0
        self._counter_lock = threading.Lock()
        self._created = False

    def _create(self) -> None:
        with self._counter_lock:
            if self._created:
                return
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            db = self._connect()
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(
                    "CREATE TABLE IF NOT EXISTS completions ("
                    " key TEXT PRIMARY KEY, model TEXT NOT NULL,"
                    " completion TEXT NOT NULL, created_at REAL NOT NULL)"
                )
            finally:
                db.close()
            self._created = True

    @property
    def model(self) -> str:
        return self.inner.model

    def __repr__(self) -> str:
        return f"CachedLLM({self.inner!r}, cache_dir={str(self.cache_dir)!r})"

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
        key = request_key(self.inner.model, messages, json_schema, temperature, max_tokens, seed,
                          grammar)
        stored = self._load(key)
        if stored is not None:
            with self._counter_lock:
                self.hits += 1
            return dataclasses.replace(stored, cached=True, latency_s=0.0)
        with self._counter_lock:
            self.misses += 1
        constraint = {"grammar": grammar} if grammar is not None else {}
        completion = self.inner.complete(
            messages,
            json_schema=json_schema,
            **constraint,
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed,
        )
        self._store(key, completion)
        return completion

    def _connect(self) -> sqlite3.Connection:
        # One short-lived connection per operation: sqlite3 connections must not be shared
        # across threads, and opening one is cheap next to an LLM call.
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.execute("PRAGMA busy_timeout=30000")
        return db

    def _load(self, key: str) -> Completion | None:
        if not self._created:
            if not self.path.is_file():
                return None
            self._create()  # an existing cache: make sure it has the table
        db = self._connect()
        try:
            row = db.execute("SELECT completion FROM completions WHERE key = ?", (key,)).fetchone()
        finally:
            db.close()
        if row is None:
            return None
        fields = json.loads(row[0])
        return Completion(**{k: v for k, v in fields.items() if k in _COMPLETION_FIELDS})

    def _store(self, key: str, completion: Completion) -> None:
        self._create()
        record = dataclasses.asdict(dataclasses.replace(completion, cached=False))
        db = self._connect()
        try:
            db.execute(
                "INSERT OR REPLACE INTO completions (key, model, completion, created_at)"
                " VALUES (?, ?, ?, ?)",
                (key, completion.model, json.dumps(record, ensure_ascii=False), time.time()),
            )
        finally:
            db.close()
