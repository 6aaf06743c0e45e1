"""The tracker's background writer: MLflow writes run one at a time, in the order handed over.

The loop only pays for handing a write over; in asynchronous mode a write that fails is counted
and logged, never raised into the loop, so that tracking cannot end a long loop.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable

__all__ = ["WriteQueue"]

_logger = logging.getLogger(__name__)


class WriteQueue:
    """Runs MLflow writes one at a time, in submission order; after ``close`` it drops them.

    Asynchronous: on one daemon thread; a failed write is logged and recorded in ``errors``.
    Synchronous: inline in the caller's thread under a lock; a failed write raises.
    """

    def __init__(self, asynchronous: bool, name: str):
        self.errors: list[str] = []
        self._asynchronous = asynchronous
        self._closed = False
        self._state_lock = threading.Lock()  # orders submit against close
        self._inline_lock = threading.Lock()  # serializes synchronous writes
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        if asynchronous:
            self._thread = threading.Thread(target=self._drain, name=name, daemon=True)
            self._thread.start()

    def submit(self, write: Callable[..., None], *args: Any) -> None:
        if self._asynchronous:
            with self._state_lock:
                if not self._closed:
                    self._queue.put((write, args))
            return
        with self._inline_lock:
            if not self._closed:
                write(*args)

    def flush(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.join()

    def close(self) -> None:
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        if self._thread is not None:
            self._thread.join()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                write, args = item
                try:
                    write(*args)
                except Exception as exc:  # keep tracking the rest of the loop
                    message = f"{write.__name__.lstrip('_')}: {type(exc).__name__}: {exc}"
                    self.errors.append(message)
                    _logger.warning("MLflow tracking write failed (%s)", message, exc_info=True)
            finally:
                self._queue.task_done()
