"""Which learning loop is running, for MLflow's run context provider (no MLflow import here).

:func:`loop_context` marks a loop config as active for the code it wraps: ``build.run_loop``
wraps every loop in it, and users may wrap their own code (a notebook cell, a study script) so
that runs they start with ``mlflow.start_run`` carry the loop's ``genopt.*`` tags.

The active config is looked up in this order: the calling context (a :mod:`contextvars`
variable, so concurrent loops in different threads or tasks each see their own), else the only
loop active in the process (code a loop runs in worker threads, which do not inherit context
variables), else none (several loops at once and none in this context: ambiguous). Lookups
are a context-variable read and a dict length check, so MLflow can call them on every run start.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import threading
from typing import Any, Iterator

_current: contextvars.ContextVar[Any] = contextvars.ContextVar("genopt_active_loop", default=None)
_process_wide: dict[int, Any] = {}
_lock = threading.Lock()
_tokens = itertools.count()


@contextlib.contextmanager
def loop_context(config: Any) -> Iterator[Any]:
    """Mark ``config`` (a :class:`~mlflow_genopt.config.LoopConfig`) as the active loop config
    while the block runs. Nests and is safe to use from several threads at once."""
    key = next(_tokens)
    with _lock:
        _process_wide[key] = config
    token = _current.set(config)
    try:
        yield config
    finally:
        _current.reset(token)
        with _lock:
            _process_wide.pop(key, None)


def active_config() -> Any | None:
    """The active loop config (see the module docstring for the lookup order), or ``None``."""
    config = _current.get()
    if config is not None:
        return config
    if len(_process_wide) == 1:
        try:
            return next(iter(_process_wide.values()))
        except (StopIteration, RuntimeError):  # changed while we looked: treat as ambiguous
            return None
    return None
