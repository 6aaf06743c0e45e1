"""How the loop evaluates a version: the task's ``evaluate`` with its context, behind a cache.

:class:`Evaluator` is the only caller of ``Task.evaluate``. For each call it builds the
:class:`~mlflow_genopt.task.EvalContext`, serves the trials it has seen before from the
evaluation cache (keyed by version content, ``Task.trial_key`` and the task fingerprint, so
re-scoring an unchanged version, revisiting a parent or resuming costs no evaluation), checks
the task's answer against the contract, records every trial in the loop's
:class:`~mlflow_genopt.history.History`, and appends the history notes the task asked for.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Sequence

from .artifact import ArtifactVersion
from .config import LoopConfig, env_steps
from .history import DEFAULT_DIRECTIONS, NOTES, History, annotate
from .task import EvalContext, Example, Task, Trial

# Loop-config fields that change what a trial is (everything else only steers the optimizer).
FINGERPRINT_FIELDS = ("project", "task", "init", "credit_horizon", "update_every", "task_model",
                      "task_temperature", "seed", "task_options")
CACHE_FILE = "eval-cache.sqlite"


class TaskContractError(RuntimeError):
    """A task broke its contract (wrong number of trials, wrong ids, ...); the message says how,
    one problem per line. The loop stops on it; :func:`~mlflow_genopt.checker.check_task` lists
    every problem at once."""


def task_fingerprint(config: LoopConfig, task: Task) -> str:
    from . import __version__

    data = {name: config.to_dict()[name] for name in FINGERPRINT_FIELDS}
    extra = getattr(task, "fingerprint", None)
    blob = json.dumps([data, __version__, task.name, extra() if callable(extra) else None],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class EvalCache:
    """Trials by key, in memory and (with ``directory``) in ``directory/eval-cache.sqlite``.

    Thread-safe; a corrupt or unreadable entry is a miss. Trials are stored as JSON without the
    history notes (those are added per use)."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self._memory: dict[str, Trial] = {}
        self._lock = threading.Lock()
        self.path = Path(directory) / CACHE_FILE if directory is not None else None
        self._created = False  # the file is made on the first write: bad input leaves nothing

    def _connect(self, create: bool = False) -> sqlite3.Connection:
        if create and not self._created:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with sqlite3.connect(self.path, timeout=30) as db:
                db.execute("CREATE TABLE IF NOT EXISTS trials (key TEXT PRIMARY KEY, trial TEXT)")
            self._created = True
        return sqlite3.connect(self.path, timeout=30)

    def get(self, key: str) -> Trial | None:
        with self._lock:
            if key in self._memory:
                return self._memory[key]
        if self.path is None or not self.path.is_file():
            return None
        try:
            with self._connect() as db:
                row = db.execute("SELECT trial FROM trials WHERE key = ?", (key,)).fetchone()
            trial = Trial.from_dict(json.loads(row[0])) if row else None
        except (sqlite3.Error, ValueError, TypeError, KeyError):
            return None
        if trial is not None:
            with self._lock:
                self._memory[key] = trial
        return trial

    def put(self, key: str, trial: Trial) -> None:
        with self._lock:
            self._memory[key] = trial
        if self.path is None:
            return
        try:
            blob = json.dumps(trial.to_dict(), ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            return  # not JSON-serializable: kept in memory only
        with self._connect(create=True) as db:
            db.execute("INSERT OR REPLACE INTO trials VALUES (?, ?)", (key, blob))


class Evaluator:
    """Evaluates versions of ``task`` for one loop (see the module docstring)."""

    def __init__(self, task: Task, config: LoopConfig, history: History,
                 cache: EvalCache | None = None) -> None:
        self.task = task
        self.config = config
        self.history = history
        self.cache = cache
        self.fingerprint = task_fingerprint(config, task)
        self.env_steps = env_steps(config)
        notes = tuple(getattr(task, "feedback_notes", ()) or ())
        unknown = [n for n in notes if n not in NOTES]
        if unknown:
            raise TaskContractError(f"task {task.name}: feedback_notes {unknown}; allowed: {NOTES}")
        self.notes = notes
        self.directions = tuple(getattr(task, "improvement_directions", ()) or DEFAULT_DIRECTIONS)
        self._takes_context = _accepts_context(task.evaluate)
        self._trial_key = getattr(task, "trial_key", None)
        self.cache_hits = 0  # for the current phase; the loop resets it

    def __call__(self, version: ArtifactVersion, examples: Sequence[Example], phase: str,
                 step: int, parent: ArtifactVersion | None = None) -> list[Trial]:
        examples = list(examples)
        context = EvalContext(phase, step, parent, self.env_steps)
        keys = [self._key(version, e, context) for e in examples]
        found: dict[int, Trial] = {}
        if self.cache is not None:
            for i, key in enumerate(keys):
                if key is not None and (trial := self.cache.get(key)) is not None:
                    found[i] = trial
        missing = [i for i in range(len(examples)) if i not in found]
        if missing:
            fresh = self._evaluate(version, [examples[i] for i in missing], context)
            for i, trial in zip(missing, fresh):
                found[i] = trial
                if self.cache is not None and keys[i] is not None:
                    self.cache.put(keys[i], trial)
        self.cache_hits += len(examples) - len(missing)
        trials = [found[i] for i in range(len(examples))]
        shown = trials
        if phase in ("batch", "candidate"):
            shown = annotate(trials, version, self.history, self.notes, self.directions)
        if phase != "test":  # the test split never reaches anything the optimizer sees
            self.history.record(version, trials, validation=phase == "validation")
        return shown

    def _key(self, version: ArtifactVersion, example: Example, context: EvalContext) -> str | None:
        if self.cache is None:
            return None
        key = self._trial_key(example, context) if callable(self._trial_key) else example.id
        if key is None:
            return None
        blob = json.dumps([version.content_hash, str(key), self.fingerprint])
        return hashlib.sha256(blob.encode()).hexdigest()

    def _evaluate(self, version: ArtifactVersion, examples: list[Example],
                  context: EvalContext) -> list[Trial]:
        if self._takes_context:
            trials = self.task.evaluate(version, examples, context)
        else:
            trials = self.task.evaluate(version, examples)
        trials = list(trials)
        if len(trials) != len(examples):
            raise TaskContractError(
                f"task {self.task.name}: evaluate returned {len(trials)} trials for "
                f"{len(examples)} examples")
        for example, trial in zip(examples, trials):
            if not isinstance(trial, Trial) or trial.example_id != example.id:
                got = trial.example_id if isinstance(trial, Trial) else type(trial).__name__
                raise TaskContractError(
                    f"task {self.task.name}: evaluate must return one Trial per example in order; "
                    f"expected example_id {example.id!r}, got {got!r}")
        return trials


def _accepts_context(method: Any) -> bool:
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return True
    if "context" in parameters:
        return True
    positional = [p for p in parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in parameters.values())


__all__ = ["EvalCache", "Evaluator", "FINGERPRINT_FIELDS", "TaskContractError",
           "task_fingerprint"]
