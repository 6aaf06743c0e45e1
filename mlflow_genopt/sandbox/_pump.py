"""Reading the child's pipes on the loop side: the output pump, stdout/stderr split into per-call
tails (``_SegmentedTail``), capped JSON-lines channels for results and control records
(``_LineChannel``), and the cleaning of lone surrogates out of what the child sent."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import time
from typing import Any, Callable


class _SegmentedTail:
    """One output stream, split at the runner's per-call markers; keeps each segment's tail.

    Segment -1 is what was printed before the first call (preamble and module level)."""

    def __init__(self, nonce: str, cap: int) -> None:
        self._prefix = f"\x1egenopt-{nonce}:".encode()
        self._hold = len(self._prefix) + 12
        self._pending = b""
        self._cap = cap
        self.current = -1
        self.segments: dict[int, bytearray] = {}
        self.dropped: dict[int, int] = {}
        self.started: dict[int, float] = {}

    def feed(self, data: bytes) -> None:
        buf = self._pending + data
        while True:
            start = buf.find(self._prefix)
            if start < 0:
                cut = max(0, len(buf) - self._hold)  # a marker may straddle two reads
                self._append(buf[:cut])
                self._pending = buf[cut:]
                return
            end = buf.find(b"\x1e", start + len(self._prefix), start + self._hold)
            if end < 0:
                if len(buf) - start < self._hold:
                    self._append(buf[:start])
                    self._pending = buf[start:]
                    return
                self._append(buf[: start + 1])  # not a marker after all
                buf = buf[start + 1 :]
                continue
            self._append(buf[:start])
            index = buf[start + len(self._prefix) : end]
            if index.isdigit():
                self.current = int(index)
                self.started.setdefault(self.current, time.monotonic())
            else:
                self._append(buf[start : end + 1])
            buf = buf[end + 1 :]

    def finish(self) -> None:
        self._append(self._pending)
        self._pending = b""

    def _append(self, data: bytes) -> None:
        if not data:
            return
        segment = self.segments.setdefault(self.current, bytearray())
        segment += data
        excess = len(segment) - self._cap
        if excess > 0:
            del segment[:excess]
            self.dropped[self.current] = self.dropped.get(self.current, 0) + excess

    def text(self, index: int) -> str:
        body = bytes(self.segments.get(index, b"")).decode("utf-8", errors="replace")
        dropped = self.dropped.get(index, 0)
        return f"[... {dropped} bytes truncated ...]\n{body}" if dropped else body


class _LineChannel:
    """JSON-lines reader with a byte cap; anything beyond the cap is discarded."""

    def __init__(self, cap: int) -> None:
        self._buf = bytearray()
        self._cap = cap
        self._seen = 0
        self.records: list[dict] = []
        self.overflow = False

    def feed(self, data: bytes) -> None:
        self._seen += len(data)
        if self._seen > self._cap:
            self.overflow = True
            data = data[: max(0, len(data) - (self._seen - self._cap))]
        self._buf += data
        while True:
            newline = self._buf.find(b"\n")
            if newline < 0:
                return
            line = bytes(self._buf[:newline])
            del self._buf[: newline + 1]
            try:
                record = _valid_unicode(json.loads(line.decode("utf-8", errors="replace")))
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict):
                self.records.append(record)


def _valid_unicode(value: Any) -> Any:
    """``value`` (parsed JSON) with lone surrogates in its strings replaced by U+FFFD. The child
    escapes them as ``"\\udc80"``; left in, they make every later UTF-8 encode fail (MLflow
    artifacts, the response cache, the next LLM request)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_valid_unicode(item) for item in value]
    if isinstance(value, dict):
        return {_valid_unicode(k): _valid_unicode(v) for k, v in value.items()}
    return value


def _pump(proc: subprocess.Popen, sinks: dict, control: _LineChannel, info: dict, *, deadline: float,
          on_exit: Callable[[], None]) -> bool:
    """Feed the child's pipes to their sinks until all close; returns True on timeout. Control
    records go into ``info`` as they arrive; ``on_exit`` (which kills the process tree) is called
    once, as soon as the code's main process has ended."""
    reaped_at = None
    selector = selectors.DefaultSelector()
    try:
        for fd in sinks:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            now = time.monotonic()
            if now >= deadline:
                return True
            if reaped_at is not None and now - reaped_at > 1.0:
                return False  # the tree is dead; a pipe still open belongs to an escaped process
            for key, _ in selector.select(timeout=min(deadline - now, 0.1)):
                try:
                    data = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if data:
                    sinks[key.fd](data)
                else:
                    selector.unregister(key.fd)
            for record in control.records:
                info.update(record)
            control.records.clear()
            if reaped_at is None and ("status" in info or proc.poll() is not None):
                # The code's main process has ended: nothing it started may outlive it.
                on_exit()
                reaped_at = time.monotonic()
        return False
    finally:
        selector.close()
