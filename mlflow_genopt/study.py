"""Studies: Optuna searching the loop's design choices; the only module that talks to Optuna.

A study searches a *search space* over loop-config fields (a case study declares one in
``SimpleProject.search_space``; a YAML file or ``--param`` flags override it). Each trial of the
study is one learning loop, run through :func:`mlflow_genopt.runner.run_loop` and tracked as a
nested MLflow run under one parent run per study. The objective is the loop's best validation
score (optionally also the LLM tokens it used); the test score is recorded, never optimized.

Search space (the plain form that projects, YAML files and flags share)::

    init: [prompt_only, prompt_and_extraction]   # categorical (a list; "none" means None)
    batch_size: [1, 3, 5]
    memory_size: {low: 0, high: 6, step: 2}       # integer range (ints give an IntRange)
    optimizer_temperature: {low: 0.1, high: 1.0, log: true}   # float range
    task_options.train_size: [10, 15]            # a task option

Flags: ``--param batch_size=1,3,5``, ``--param memory_size=0..6:2``,
``--param optimizer_temperature=0.1..1.0:log``.

Guarantees, for every storage that takes part (PostgreSQL, SQLite, a journal file):

* ``n_trials`` counts the *study's* finished trials (complete or pruned), whichever worker ran
  them: every worker runs ``genopt study`` with the same arguments and they stop together once the
  study holds exactly ``n_trials`` of them. Deciding whether to start a trial and creating it
  happen under a per-study lock (a PostgreSQL advisory lock, or an ``flock`` next to a SQLite
  database or journal file), so concurrent workers never overshoot and, with a finite space
  (grid / brute force), never start the same point twice.
* A failed trial (the loop raised, the process was interrupted, or - on RDB storages - its worker
  stopped sending heartbeats for ``grace_period_s``) is marked FAIL in Optuna and in MLflow and is
  queued again with the same parameters up to ``max_retry`` times; FAIL trials do not count
  towards ``n_trials``. A journal file has no heartbeat: a trial whose worker died stays RUNNING
  there, and workers then stop instead of waiting for it.
* Resuming: running the same command again loads the study (``load_if_exists``) and continues
  until ``n_trials`` are finished; a finished study is only summarized again.
* Pruning: a loop reports ``best_val_score`` after every step; a pruned loop ends after that
  step (its MLflow run gets ``genopt.stop_reason=pruned`` and ``genopt.trial_state=PRUNED``), and
  what it spent so far is on the trial and on its run.
* Reproducibility: a study run by one worker from scratch is reproducible with ``sampler_seed``.
  A grid maps trial numbers to points by a shuffle seeded with ``sampler_seed``, so every worker
  of a grid study must use the same seed (it is part of the command they share); random and TPE
  workers that join or resume a study reseed, so that they do not repeat each other's draws.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import importlib
import itertools
import json
import math
import os
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TextIO

import optuna
from optuna.trial import TrialState

from .config import ConfigError, LoopConfig, config_fields
from .events import LoopCallback, LoopStart, StepRecord, StopLoop, VersionRecord
from .llm.base import LLM, LLMCall, LLMError

__all__ = [
    "Categorical", "IntRange", "FloatRange", "Dimension", "StudyConfig", "StudyResult",
    "TrialSummary", "parse_search_space", "parse_param", "load_search_space", "run_study",
    "search_space_to_spec", "DEFAULT_STORAGE", "SAMPLERS", "PRUNERS", "OBJECTIVES",
]

DEFAULT_STORAGE = "sqlite:///optuna.db"
DEFAULT_SUMMARY_ROOT = Path(".genopt") / "studies"
SAMPLERS = ("auto", "grid", "brute_force", "tpe", "random")
PRUNERS = ("auto", "none", "median", "percentile", "wilcoxon")
OBJECTIVES = ("score", "tokens")
AUTO_GRID_LIMIT = 64  # "auto" searches finite spaces up to this size exhaustively, else TPE
DEFAULT_OPEN_TRIALS = 20  # n_trials when the space is not finite and none is given
_NOT_SEARCHABLE = ("project", "task_options")
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"  # on every trial: which worker ran it
_FINISHED_OK = (TrialState.COMPLETE, TrialState.PRUNED)


# --- search space ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Categorical:
    """A list of choices (``None``, booleans, numbers or strings)."""

    choices: tuple[Any, ...]

    def values(self) -> tuple[Any, ...]:
        return self.choices

    def to_spec(self) -> Any:
        return list(self.choices)


@dataclass(frozen=True)
class IntRange:
    """Integers ``low..high`` (inclusive) with ``step``, or log-uniform with ``log`` (step 1)."""

    low: int
    high: int
    step: int = 1
    log: bool = False

    def values(self) -> tuple[int, ...]:
        return tuple(range(self.low, self.high + 1, self.step))

    def to_spec(self) -> Any:
        return {"low": self.low, "high": self.high, "step": self.step, "log": self.log}


@dataclass(frozen=True)
class FloatRange:
    """Floats in ``[low, high]``: continuous, log-uniform with ``log``, or a grid with ``step``."""

    low: float
    high: float
    step: float | None = None
    log: bool = False

    def values(self) -> tuple[float, ...] | None:
        if self.step is None:
            return None  # continuous: no grid
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return tuple(round(self.low + i * self.step, 12) for i in range(count))

    def to_spec(self) -> Any:
        return {"low": self.low, "high": self.high, "step": self.step, "log": self.log}


Dimension = Categorical | IntRange | FloatRange


def _none_like(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return None
    return value


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"search space: parameter names must be strings, got {name!r}")
    if name.startswith("task_options."):
        key = name.split(".", 1)[1]
        if not key.isidentifier():
            raise ConfigError(f"search space: {name}: task option keys must be identifiers")
        return name
    searchable = [f for f in config_fields() if f not in _NOT_SEARCHABLE]
    if name not in searchable:
        raise ConfigError(
            f"search space: {name}: not a searchable loop config field; use one of "
            f"{', '.join(searchable)} or task_options.<key>"
        )
    return name


def _number(name: str, key: str, value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"search space: {name}.{key}: must be a number, got {value!r}")
    return value


def _dimension(name: str, spec: Any) -> Dimension:
    if isinstance(spec, Mapping) and "choices" in spec:
        spec = spec["choices"]
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError(f"search space: {name}: needs at least one choice")
        choices = tuple(_none_like(v) for v in spec)
        for choice in choices:
            if not (choice is None or isinstance(choice, (bool, int, float, str))):
                raise ConfigError(
                    f"search space: {name}: choices must be none, booleans, numbers or strings, "
                    f"got {choice!r} (write lists as a comma-separated string)"
                )
        if len(set(map(_key, choices))) != len(choices):
            raise ConfigError(f"search space: {name}: choices must be distinct, got {list(choices)}")
        return Categorical(choices)
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"low", "high", "step", "log"})
        if unknown or "low" not in spec or "high" not in spec:
            raise ConfigError(
                f"search space: {name}: a range is {{low, high[, step][, log]}}, a categorical a "
                f"list; got {dict(spec)!r}"
            )
        low, high = _number(name, "low", spec["low"]), _number(name, "high", spec["high"])
        step = spec.get("step")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"search space: {name}.log: must be true or false, got {log!r}")
        if step is not None:
            step = _number(name, "step", step)
            if step <= 0:
                raise ConfigError(f"search space: {name}.step: must be > 0, got {step}")
        if high < low:
            raise ConfigError(f"search space: {name}: high ({high}) must be >= low ({low})")
        if log and low <= 0:
            raise ConfigError(f"search space: {name}: a log range needs low > 0, got {low}")
        if all(isinstance(v, int) for v in (low, high)) and (step is None or isinstance(step, int)):
            if log and step not in (None, 1):
                raise ConfigError(f"search space: {name}: a log integer range cannot have a step")
            return IntRange(low, high, step or 1, log)
        if log and step is not None:
            raise ConfigError(f"search space: {name}: a log float range cannot have a step")
        return FloatRange(float(low), float(high), None if step is None else float(step), log)
    return Categorical((_none_like(spec),))  # a single value: the field is fixed


def parse_search_space(spec: Mapping[str, Any] | None) -> dict[str, Dimension]:
    """The plain form (module docstring) -> dimensions; one-line :class:`ConfigError` if bad."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"search space: must be a mapping of field -> choices, got {spec!r}")
    return {_check_name(name): _dimension(name, value) for name, value in spec.items()}


def search_space_to_spec(space: Mapping[str, Dimension]) -> dict[str, Any]:
    return {name: dim.to_spec() for name, dim in space.items()}


def parse_param(text: str) -> tuple[str, Dimension]:
    """One ``--param NAME=SPEC`` flag: ``a,b,c`` (choices), ``LOW..HIGH`` with an optional
    ``:STEP`` or ``:log``, a YAML list/mapping, or a single value."""
    import yaml

    if "=" not in text:
        raise ConfigError(
            f"--param {text!r}: expected NAME=SPEC, e.g. batch_size=1,3,5 or memory_size=0..6:2"
        )
    name, raw = (s.strip() for s in text.split("=", 1))
    name = _check_name(name)

    def scalar(s: str) -> Any:
        try:
            return yaml.safe_load(s) if s.strip() else ""
        except yaml.YAMLError:
            return s

    if raw.startswith(("[", "{")):
        try:
            return name, _dimension(name, yaml.safe_load(raw))
        except yaml.YAMLError as exc:
            raise ConfigError(f"--param {name}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if ".." in raw:
        bounds, _, suffix = raw.partition(":")
        low, _, high = bounds.partition("..")
        spec: dict[str, Any] = {"low": scalar(low), "high": scalar(high)}
        if suffix.strip().lower() == "log":
            spec["log"] = True
        elif suffix.strip():
            spec["step"] = scalar(suffix)
        return name, _dimension(name, spec)
    return name, _dimension(name, [scalar(s) for s in raw.split(",")])


def load_search_space(path: str | Path) -> dict[str, Dimension]:
    """A YAML/JSON file holding a search space mapping (``{}`` or empty: no dimension)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read search space file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid YAML/JSON (not UTF-8 text: byte {exc.start} "
                          "cannot be decoded)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
    return parse_search_space(data or {})


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _apply(base: LoopConfig, params: Mapping[str, Any]) -> LoopConfig:
    fields_, options = {}, dict(base.task_options)
    for name, value in params.items():
        if name.startswith("task_options."):
            options[name.split(".", 1)[1]] = value
        else:
            fields_[name] = value
    return base.replace(**fields_, task_options=options)


def _validate_space(base: LoopConfig, space: Mapping[str, Dimension]) -> None:
    """Every value a trial can get must make a valid LoopConfig: checked before anything runs."""
    for name, dim in space.items():
        # loop-config constraints are bounds, so a range's ends stand for all of it
        values = dim.values() if isinstance(dim, Categorical) else (dim.low, dim.high)
        for value in values:
            try:
                _apply(base, {name: value})
            except ConfigError as exc:
                raise ConfigError(f"search space: {name}={value!r}: {exc}") from None


def _size(dim: Dimension) -> int | None:
    if isinstance(dim, Categorical):
        return len(dim.choices)
    if dim.step is None and isinstance(dim, FloatRange):
        return None
    return int(math.floor((dim.high - dim.low) / dim.step + 1e-9)) + 1


def _finite_points(space: Mapping[str, Dimension]) -> list[dict[str, Any]] | None:
    values = {name: dim.values() for name, dim in sorted(space.items())}
    if any(v is None for v in values.values()):
        return None
    return [dict(zip(values, combo)) for combo in itertools.product(*values.values())]


# --- configuration -----------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyConfig:
    """Everything a study decides, validated at construction.

    ``base``: the loop config every trial starts from; ``search_space``: the searched fields
    (their values replace ``base``'s). ``n_trials``: finished trials the study should hold, over
    all workers (``None``: every point of a finite space, else 20). ``timeout_s``: this worker
    starts no trial after that many seconds. ``sampler``: ``auto`` (grid for finite spaces of at
    most 64 points, else TPE), ``grid``, ``brute_force``, ``tpe`` or ``random``. ``objectives``:
    ``("score",)`` maximizes the best validation score; ``("score", "tokens")`` also minimizes
    the tokens the loop's LLM calls used (cached calls included, so that a replay from the cache
    scores like the original). ``pruner``: ``auto`` (median for one objective; Optuna cannot
    prune multi-objective studies), ``none``, ``median``, ``percentile`` or ``wilcoxon``.
    ``heartbeat_interval_s``/``grace_period_s``: how RDB storages notice a dead worker
    (``grace_period_s=None``: twice the interval). ``max_retry``: how often a failed point is
    queued again. Study budgets (``None``: none): ``max_tokens`` (LLM tokens actually spent,
    i.e. not served from the cache) and ``max_cost_usd``, summed over every trial the study
    holds (all workers, earlier sessions included); ``max_wall_time_s`` since this worker
    started. Reaching one stops the study cleanly: no new trial starts, and the running loop
    stops after its current step (its trial ends PRUNED, without a test evaluation); the study's
    stop reason is ``budget: <field>`` (tag ``genopt.study.budget`` on the parent run).
    """

    base: LoopConfig
    search_space: Mapping[str, Dimension]
    study_name: str | None = None
    storage: str = DEFAULT_STORAGE
    sampler: str = "auto"
    n_trials: int | None = None
    timeout_s: float | None = None
    sampler_seed: int = 0
    objectives: tuple[str, ...] = ("score",)
    pruner: str = "auto"
    pruner_startup_trials: int = 5
    pruner_warmup_steps: int = 0
    pruner_percentile: float = 25.0
    pruner_p_threshold: float = 0.1
    heartbeat_interval_s: int = 60
    grace_period_s: int | None = None
    max_retry: int = 1
    max_tokens: int | None = None
    max_cost_usd: float | None = None
    max_wall_time_s: float | None = None

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        if not isinstance(self.base, LoopConfig):
            raise ConfigError(f"base: must be a LoopConfig, got {type(self.base).__name__}")
        space = self.search_space
        if not all(isinstance(d, (Categorical, IntRange, FloatRange)) for d in space.values()):
            space = parse_search_space(space)
        for name in space:
            _check_name(name)
        set_("search_space", dict(space))
        _validate_space(self.base, self.search_space)
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler: must be one of {', '.join(SAMPLERS)}; got {self.sampler!r}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"pruner: must be one of {', '.join(PRUNERS)}; got {self.pruner!r}")
        objectives = self.objectives
        if isinstance(objectives, str):
            objectives = tuple(s.strip() for s in objectives.split(",") if s.strip())
        if not objectives or objectives[0] != "score" or len(set(objectives)) != len(objectives) \
                or any(o not in OBJECTIVES for o in objectives):
            raise ConfigError(f"objectives: must be 'score' or 'score,tokens'; got {self.objectives!r}")
        set_("objectives", tuple(objectives))
        if len(self.objectives) > 1 and self.pruner not in ("auto", "none"):
            raise ConfigError(
                f"pruner: Optuna cannot prune multi-objective studies; use --pruner none "
                f"(got {self.pruner!r} with objectives {','.join(self.objectives)})"
            )
        for name, minimum in (("pruner_startup_trials", 0), ("pruner_warmup_steps", 0),
                              ("heartbeat_interval_s", 1), ("max_retry", 0), ("sampler_seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name}: must be an integer >= {minimum}, got {value!r}")
        if self.grace_period_s is not None and (
            not isinstance(self.grace_period_s, int) or self.grace_period_s < 1
        ):
            raise ConfigError(f"grace_period_s: must be an integer >= 1 or none, got {self.grace_period_s!r}")
        if self.n_trials is not None and (
            isinstance(self.n_trials, bool) or not isinstance(self.n_trials, int) or self.n_trials < 0
        ):
            raise ConfigError(f"n_trials: must be an integer >= 0 or none, got {self.n_trials!r}")
        if self.timeout_s is not None and not (
            isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0
        ):
            raise ConfigError(f"timeout_s: must be a number > 0 or none, got {self.timeout_s!r}")
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise ConfigError(
                f"max_tokens (study budget): must be an integer >= 1 or none, got {self.max_tokens!r}")
        for name in ("max_cost_usd", "max_wall_time_s"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < math.inf):
                raise ConfigError(f"{name} (study budget): must be a number > 0 or none, got {value!r}")
        if not 0 < self.pruner_percentile < 100:
            raise ConfigError(f"pruner_percentile: must be in (0, 100), got {self.pruner_percentile!r}")
        if not 0 < self.pruner_p_threshold <= 1:
            raise ConfigError(f"pruner_p_threshold: must be in (0, 1], got {self.pruner_p_threshold!r}")
        if self.sampler in ("grid", "brute_force") and self.size() is None:
            continuous = [n for n, d in self.search_space.items() if d.values() is None]
            raise ConfigError(
                f"sampler: {self.sampler} needs a finite space; give {', '.join(continuous)} a "
                f"step or a list of values, or use --sampler tpe/random"
            )
        if self.study_name is not None and not (isinstance(self.study_name, str) and self.study_name.strip()):
            raise ConfigError(f"study_name: must be a non-empty string, got {self.study_name!r}")
        _storage_kind(self.storage)  # a one-line error for an unsupported URL, before anything runs

    # --- derived ---------------------------------------------------------------------------
    def size(self) -> int | None:
        """Number of points of a finite space (``None``: a continuous range)."""
        sizes = [_size(dim) for dim in self.search_space.values()]
        return None if None in sizes else math.prod(sizes)

    def points(self) -> list[dict[str, Any]] | None:
        """Every point of a finite space (sorted by field name, values in the given order)."""
        return _finite_points(self.search_space)

    def resolved_sampler(self) -> str:
        if self.sampler != "auto":
            return self.sampler
        size = self.size()
        return "grid" if size is not None and size <= AUTO_GRID_LIMIT else "tpe"

    def resolved_pruner(self) -> str:
        if self.pruner != "auto":
            return self.pruner
        return "median" if len(self.objectives) == 1 else "none"

    def target_trials(self) -> int:
        size = self.size() if self.resolved_sampler() in ("grid", "brute_force") else None
        if size is None:
            return DEFAULT_OPEN_TRIALS if self.n_trials is None else self.n_trials
        return size if self.n_trials is None else min(self.n_trials, size)

    def definition(self) -> dict[str, Any]:
        """What makes two workers' studies the same study (stored with it, compared on load)."""
        return {
            "base_config": self.base.to_dict(),
            "search_space": search_space_to_spec(self.search_space),
            "objectives": list(self.objectives),
        }

    def resolved_name(self) -> str:
        if self.study_name:
            return self.study_name.strip()
        digest = hashlib.sha256(json.dumps(self.definition(), sort_keys=True).encode()).hexdigest()
        return f"{self.base.project}-{self.base.task}-{digest[:8]}"

    def trial_config(self, params: Mapping[str, Any]) -> LoopConfig:
        return _apply(self.base, params)


# --- results -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialSummary:
    """One trial as the summary shows it (read back from the study storage)."""

    number: int
    state: str
    params: Mapping[str, Any]
    best_val_score: float | None
    test_score: float | None
    tokens: int | None
    tokens_spent: int | None
    llm_calls: int | None
    cost_usd: float | None
    steps_run: int | None
    stop_reason: str | None
    duration_s: float | None
    mlflow_run_id: str | None
    config: Mapping[str, Any] | None
    curve: tuple[tuple[Any, ...], ...] = ()
    retry_of: int | None = None

    def to_row(self, param_names: Sequence[str]) -> dict[str, Any]:
        row: dict[str, Any] = {"trial": self.number, "state": self.state}
        row.update({name: self.params.get(name) for name in param_names})
        row.update(
            best_val_score=self.best_val_score, test_score=self.test_score, tokens=self.tokens,
            tokens_spent=self.tokens_spent, llm_calls=self.llm_calls, cost_usd=self.cost_usd,
            steps_run=self.steps_run, stop_reason=self.stop_reason, duration_s=self.duration_s,
            mlflow_run_id=self.mlflow_run_id,
        )
        return row


@dataclass(frozen=True)
class StudyResult:
    """What one worker's ``run_study`` leaves: the whole study as the storage holds it."""

    study_name: str
    storage: str  # password hidden
    sampler: str
    pruner: str
    objectives: tuple[str, ...]
    target_trials: int
    stop_reason: str
    trials: tuple[TrialSummary, ...]
    recommended: TrialSummary | None
    recommended_config: LoopConfig | None
    pareto: tuple[TrialSummary, ...]
    importances: Mapping[str, float]
    parent_run_id: str | None
    summary_dir: Path | None
    trials_run_here: int = 0
    importance_note: str | None = None  # why importances are missing, when they are

    def count(self, state: str) -> int:
        return sum(t.state == state for t in self.trials)


# --- storage and the per-study lock --------------------------------------------------------------
def _storage_kind(url: str) -> str:
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"storage: must be a URL, got {url!r}")
    if url == "memory":
        return "memory"
    if url.startswith("journal:"):
        if not _journal_path(url):
            raise ConfigError(f"storage: {url!r} names no file; e.g. journal:./study.log")
        return "journal"
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme in ("sqlite", "postgresql", "postgres", "mysql"):
        return scheme if scheme != "postgres" else "postgresql"
    raise ConfigError(
        f"storage: unsupported URL {url!r}; use sqlite:///path.db, postgresql://user:pw@host/db, "
        "journal:path/to/study.log or memory"
    )


def _journal_path(url: str) -> str:
    rest = url[len("journal:"):]
    return rest[2:] if rest.startswith("//") else rest


def hide_password(url: str) -> str:
    if "://" not in url or "@" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("://", 1)[0] + "://***@" + url.rsplit("@", 1)[1]


class _Lock:
    """Serializes "decide whether to start a trial, then create it" over all workers of a study.

    Reentrant-safe ``release`` (the objective releases it as soon as its trial holds its
    parameters; the worker's ``finally`` releases it if that never happened)."""

    def __init__(self) -> None:
        self.held = False

    def acquire(self) -> None:
        self._acquire()
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._release()

    def _acquire(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.release()

    @contextlib.contextmanager
    def hold(self):
        self.acquire()
        try:
            yield
        finally:
            self.release()


class _ThreadLock(_Lock):
    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def _acquire(self) -> None:
        self._lock.acquire()

    def _release(self) -> None:
        self._lock.release()


class _FileLock(_Lock):
    """``flock`` on a file next to the storage; the kernel releases it if the process dies."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._fd: int | None = None

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)  # the storage's folder, made early
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def _release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class _PostgresLock(_Lock):
    """A session-level advisory lock; PostgreSQL releases it when a dead worker's connection
    drops, so a killed worker never blocks the others."""

    def __init__(self, url: str, name: str) -> None:
        super().__init__()
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self._engine = create_engine(url, poolclass=NullPool)
        digest = hashlib.sha256(f"genopt-study:{name}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)
        self._conn = None

    def _acquire(self) -> None:
        from sqlalchemy import text

        conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": self._key})
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _release(self) -> None:
        from sqlalchemy import text

        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
        finally:
            conn.close()

    def close(self) -> None:
        super().close()
        self._engine.dispose()


@contextlib.contextmanager
def _storage_errors(url: str):
    """A storage that cannot be opened (no driver, no server, bad credentials): one line."""
    try:
        yield
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"storage: {hide_password(url)} needs the {exc.name} package; "
            "pip install 'mlflow-genopt[postgres]'"
        ) from None
    except Exception as exc:
        if not type(exc).__module__.startswith(("sqlalchemy", "psycopg", "sqlite3")) \
                and not isinstance(exc, OSError):
            raise
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
        raise ConfigError(f"storage: cannot open {hide_password(url)}: {reason[:300]}") from None


def _make_lock(url: str, kind: str, name: str) -> tuple[_Lock, bool]:
    """The study lock and whether it spans processes."""
    if kind == "postgresql":
        return _PostgresLock(url, name), True
    path: str | None = None
    if kind == "journal":
        path = _journal_path(url)
    elif kind == "sqlite":
        from sqlalchemy.engine import make_url

        database = make_url(url).database
        path = database if database and database != ":memory:" else None
    if path is None:
        return _ThreadLock(), False
    # One lock file per storage file (not the file itself: SQLite and Optuna's journal have
    # their own locks on it, and NFS would map flock onto them).
    return _FileLock(Path(f"{path}.genopt-lock")), True


# --- the study runner ----------------------------------------------------------------------------
class _TrialListener(LoopCallback):
    """Reports a loop to its Optuna trial: per step the score (pruning), the curve and the spend
    so far (so that a pruned, failed or killed loop leaves what it used)."""

    def __init__(self, trial: optuna.Trial, tracker: Any, *, report: bool, prune: bool,
                 budget: Any = None) -> None:
        self.trial = trial
        self.tracker = tracker
        self.report = report
        self.prune = prune
        self.budget = budget  # spend so far -> the study budget reached, or None
        self.pruned_at: int | None = None
        self.budget_stop: str | None = None
        self.curve: list[list[Any]] = []
        self.tokens = 0
        self.tokens_spent = 0
        self.llm_calls = 0
        self.cost_usd = 0.0
        self._lock = threading.Lock()

    def on_loop_start(self, start: LoopStart) -> None:
        if self.tracker is not None and self.tracker.run_id:
            self.trial.set_user_attr("mlflow_run_id", self.tracker.run_id)

    def on_version(self, record: VersionRecord) -> None:
        if record.status == "initial":  # the curve starts at the starting version's score
            self.curve.append([0, record.val_score, record.val_score, self.spend()["tokens"]])

    def on_llm_call(self, call: LLMCall) -> None:
        completion = call.completion
        if completion is None:
            return
        tokens = completion.prompt_tokens + completion.completion_tokens
        with self._lock:
            self.llm_calls += 1
            self.tokens += tokens
            if not completion.cached:
                self.tokens_spent += tokens
                self.cost_usd += completion.cost_usd or 0.0

    def spend(self) -> dict[str, Any]:
        with self._lock:
            return {"tokens": self.tokens, "tokens_spent": self.tokens_spent,
                    "llm_calls": self.llm_calls, "cost_usd": self.cost_usd}

    def on_step(self, record: StepRecord) -> None:
        spend = self.spend()
        self.curve.append([record.step, record.best_val_score, record.val_score, spend["tokens"]])
        self.trial.set_user_attr("curve", self.curve)
        self.trial.set_user_attr("spend", spend)
        reason = self.budget(spend) if self.budget is not None else None
        if reason is not None:
            self.budget_stop = reason
            raise StopLoop(reason, conclude=False)  # a spent budget buys no test evaluation
        if not self.report:
            return
        self.trial.report(record.best_val_score, record.step)
        if self.prune and self.trial.should_prune():
            self.pruned_at = record.step
            raise StopLoop("pruned")


class _StudyRunner:
    def __init__(
        self,
        config: StudyConfig,
        *,
        tracking_uri: str | None,
        experiment: str,
        cache_dir: str | Path | None,
        optimizer_llm: LLM | None,
        task_llm: LLM | None,
        base_url: str | None,
        callbacks: Sequence[LoopCallback],
        stream: TextIO | None,
        summary_dir: str | Path | None,
        run_name: str | None,
    ) -> None:
        self.config = config
        self.name = config.resolved_name()
        self.kind = _storage_kind(config.storage)
        self.sampler_name = config.resolved_sampler()
        self.pruner_name = config.resolved_pruner()
        self.target = config.target_trials()
        self.single = len(config.objectives) == 1
        self.points = config.points() if self.sampler_name in ("grid", "brute_force") else None
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.cache_dir = cache_dir
        self.optimizer_llm = optimizer_llm
        self.task_llm = task_llm
        self.base_url = base_url
        self.callbacks = list(callbacks)
        self.stream = stream
        self.summary_dir = Path(summary_dir) if summary_dir else DEFAULT_SUMMARY_ROOT / self.name
        self.run_name = run_name
        self.parent_run_id: str | None = None
        self.parent_owned = False
        self.fatal: BaseException | None = None
        self.trials_run = 0
        self.started = time.monotonic()
        with _storage_errors(config.storage):
            self.lock, self.shared_lock = _make_lock(config.storage, self.kind, self.name)
        self.heartbeat = self.kind in ("sqlite", "postgresql", "mysql")

    # --- output ----------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if self.stream is not None:
            print(f"[genopt study] {text}", file=self.stream, flush=True)

    # --- storage, study, parent run ---------------------------------------------------------
    def _storage(self) -> Any:
        c = self.config
        if self.kind == "memory":
            return optuna.storages.InMemoryStorage()
        if self.kind == "journal":
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            path = Path(_journal_path(c.storage))
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if self.kind == "sqlite":
            engine_kwargs = {"connect_args": {"timeout": 60}}
            from sqlalchemy.engine import make_url

            database = make_url(c.storage).database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                c.storage,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=c.heartbeat_interval_s,
                grace_period=c.grace_period_s,
                heartbeat_stale_trial_callback=self._on_stale_trial,
            )

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        if self.sampler_name == "grid":
            grid = {name: list(dim.values()) for name, dim in self.config.search_space.items()}
            return optuna.samplers.GridSampler(grid, seed=seed)
        if self.sampler_name == "brute_force":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.samplers.BruteForceSampler(seed=seed)
        if self.sampler_name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)

    def _pruner(self) -> optuna.pruners.BasePruner:
        c = self.config
        if self.pruner_name == "median":
            return optuna.pruners.MedianPruner(
                n_startup_trials=c.pruner_startup_trials, n_warmup_steps=c.pruner_warmup_steps)
        if self.pruner_name == "percentile":
            return optuna.pruners.PercentilePruner(
                c.pruner_percentile, n_startup_trials=c.pruner_startup_trials,
                n_warmup_steps=c.pruner_warmup_steps)
        if self.pruner_name == "wilcoxon":
            return optuna.pruners.WilcoxonPruner(
                p_threshold=c.pruner_p_threshold, n_startup_steps=max(c.pruner_warmup_steps, 1))
        return optuna.pruners.NopPruner()

    def open(self) -> None:
        directions = ["maximize"] + ["minimize"] * (len(self.config.objectives) - 1)
        definition = self.config.definition()
        if self.tracking_uri is not None:
            importlib.import_module(".tracking", __package__)  # import MLflow before the lock
        # Schema creation, the study, its definition and its parent run are one step for the
        # workers: a second worker starting at the same moment waits, then loads all of them.
        with _storage_errors(self.config.storage):
            self.lock.acquire()
        try:
            with _storage_errors(self.config.storage):
                storage = self._storage()
            try:
                study = optuna.create_study(storage=storage, study_name=self.name,
                                            directions=directions, load_if_exists=False)
                created = True
            except optuna.exceptions.DuplicatedStudyError:
                study = optuna.load_study(study_name=self.name, storage=storage)
                created = False
            stored = study.user_attrs.get("definition")
            if stored is None:
                study.set_user_attr("definition", definition)
            elif stored != definition:
                raise ConfigError(_definition_mismatch(self.name, stored, definition))
            if [d.name.lower() for d in study.directions] != directions:
                raise ConfigError(
                    f"objectives: study {self.name!r} optimizes {len(study.directions)} "
                    f"objective(s); use the same --objectives or another --study-name"
                )
            n_existing = len(study.get_trials(deepcopy=False))
            # Workers that join or resume reseed random draws, so that they do not replay each
            # other's; a grid keeps its seed: it maps trial numbers to points by a seeded shuffle.
            seed = self.config.sampler_seed
            if not created and self.sampler_name in ("random", "tpe"):
                seed = (seed + 7919 * (n_existing + 1) + os.getpid()) % (2**31)
            self.study = optuna.load_study(study_name=self.name, storage=storage,
                                           sampler=self._sampler(seed), pruner=self._pruner())
            if self.tracking_uri is not None:
                self._open_parent_run(study.user_attrs.get("mlflow_parent_run_id"))
        finally:
            self.lock.release()
        if not self.shared_lock and self.kind != "memory":
            self.say(f"warning: no cross-process lock for {self.kind} storages: with several "
                     "workers the trial count may overshoot n_trials")
        verb = "created" if created else f"loaded ({n_existing} trials so far)"
        self.say(
            f"study {self.name!r} {verb} in {hide_password(self.config.storage)}: "
            f"{self.sampler_name} sampler, pruner {self.pruner_name}, target {self.target} "
            f"finished trials" + (f", MLflow parent run {self.parent_run_id}" if self.parent_run_id else "")
        )

    def _open_parent_run(self, stored_run_id: str | None) -> None:
        from .tracking import start_study_run

        c = self.config
        tags = {
            "genopt.study": self.name,
            "genopt.study.storage": hide_password(c.storage),
            "genopt.study.sampler": self.sampler_name,
            "genopt.study.pruner": self.pruner_name,
            "genopt.study.objectives": ",".join(c.objectives),
            "genopt.study.n_trials": str(self.target),
            "genopt.study.search_space": json.dumps(search_space_to_spec(c.search_space))[:8000],
            "genopt.project": c.base.project,
            "genopt.task": c.base.task,
        }
        run = start_study_run(self.tracking_uri, self.experiment, run_name=self.run_name or self.name,
                              tags=tags, run_id=stored_run_id)
        self.parent_run_id, self.experiment, self.parent_owned = run
        if stored_run_id is None:
            self.study.set_user_attr("mlflow_parent_run_id", self.parent_run_id)

    # --- deciding ----------------------------------------------------------------------------
    def _decide(self) -> tuple[str, str]:
        """("ask" | "wait" | "stop", reason), under the study lock."""
        trials = self.study.get_trials(deepcopy=False)
        done = sum(t.state in _FINISHED_OK for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        if done >= self.target:
            return "stop", "complete"
        if done + running >= self.target:
            return ("wait", "running trials may still fail") if self.heartbeat else \
                ("stop", "the remaining trials are running in other workers")
        if waiting:
            return "ask", "queued trial"
        if self.points is not None:
            visited = {_params_key(t) for t in trials if t.state != TrialState.WAITING}
            if all(_key(sorted(p.items())) in visited for p in self.points):
                if running and self.heartbeat:
                    return "wait", "every point started"
                lost = self.target - done - running
                return "stop", f"exhausted ({lost} point(s) failed beyond max_retry)"
        return "ask", "new trial"

    # --- one trial ---------------------------------------------------------------------------
    def _suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for name, dim in sorted(self.config.search_space.items()):
            if isinstance(dim, Categorical):
                params[name] = trial.suggest_categorical(name, list(dim.choices))
            elif isinstance(dim, IntRange):
                params[name] = trial.suggest_int(name, dim.low, dim.high, step=dim.step, log=dim.log)
            else:
                params[name] = trial.suggest_float(name, dim.low, dim.high, step=dim.step, log=dim.log)
        return params

    def _objective(self, trial: optuna.Trial) -> float | tuple[float, float]:
        from .runner import run_loop

        try:
            params = self._suggest(trial)
            config = self.config.trial_config(params)
            trial.set_user_attr("config", config.to_dict())
            trial.set_user_attr("worker", WORKER_ID)
        finally:
            self.lock.release()  # the trial holds its point now: others may start theirs
        label = _label(params)
        retry = trial.user_attrs.get("retry_of")
        self.say(f"trial {trial.number} started: {label}" + (f" (retry of {retry})" if retry is not None else ""))

        tracker = None
        if self.tracking_uri is not None:
            from .tracking import MlflowTracker

            tracker = MlflowTracker(
                self.tracking_uri, self.experiment, run_name=f"{self.name}-t{trial.number:03d}",
                nested=True, parent_run_id=self.parent_run_id,
                tags={
                    "genopt.study": self.name,
                    "genopt.trial_number": str(trial.number),
                    "genopt.trial_params": json.dumps(params, sort_keys=True),
                    "genopt.trial_state": "RUNNING",
                    "genopt.searched": ",".join(sorted(params)),
                },
            )
        listener = _TrialListener(trial, tracker, report=self.single,
                                  prune=self.single and self.pruner_name != "none",
                                  budget=lambda spend: self._budget_reason(spend, trial.number))
        callbacks = ([tracker] if tracker is not None else []) + [listener, *self.callbacks]
        try:
            result = run_loop(
                config, tracking_uri=None, callbacks=callbacks, cache_dir=self.cache_dir,
                optimizer_llm=self.optimizer_llm, task_llm=self.task_llm, base_url=self.base_url,
            )
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            if tracker is not None and tracker.active:
                tracker.fail(error)
            trial.set_user_attr("error", error[:2000])
            self._mark_run(tracker.run_id if tracker else None, "FAIL", None)
            (frozen,) = [t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number]
            self._requeue(self.study, frozen)
            if isinstance(exc, (ConfigError, LLMError)):
                self.fatal = exc  # every other trial would fail the same way: stop the study
            raise
        self.trials_run += 1
        spend = listener.spend()
        trial.set_user_attr("result", {
            "best_val_score": result.best_val_score,
            "test_score": result.test_score,
            "stop_reason": result.stop_reason,
            "steps_run": len(result.steps),
            "selected_version": result.selected.version_id,
            "wall_time_s": result.totals.get("wall_time_s"),
            **spend,
        })
        if listener.budget_stop is not None:
            raise optuna.TrialPruned(
                f"stopped by the study {listener.budget_stop} after step {len(result.steps)} of "
                f"{config.steps} ({spend['tokens_spent']} tokens spent)"
            )
        if listener.pruned_at is not None:
            raise optuna.TrialPruned(
                f"pruned after step {listener.pruned_at} of {config.steps} "
                f"(best val {result.best_val_score:.4g}, {spend['tokens']} tokens)"
            )
        if self.single:
            return result.best_val_score
        return result.best_val_score, float(spend["tokens"])

    def _after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        self._mark_run(run_id, trial.state.name, trial.values)
        result = trial.user_attrs.get("result") or {}
        spend = trial.user_attrs.get("spend") or {}
        tokens = result.get("tokens", spend.get("tokens"))
        best = result.get("best_val_score")
        test = result.get("test_score")
        self.say(
            f"trial {trial.number} {trial.state.name}: {_label(trial.params)}  "
            + (f"best val {best:.4f}  " if best is not None else "")
            + (f"test {test:.4f}  " if test is not None else "")
            + (f"tokens {tokens}  " if tokens is not None else "")
            + (f"steps {result['steps_run']}/{self.config.base.steps}" if "steps_run" in result else "")
        )
        if self.parent_run_id is not None and trial.values is not None:
            from .tracking import update_run

            metrics = {"trial_best_val_score": trial.values[0]}
            if tokens is not None:
                metrics["trial_tokens"] = tokens
            try:
                update_run(self.tracking_uri, self.parent_run_id, metrics=metrics, step=trial.number)
            except Exception as exc:  # a tracking hiccup must not stop the study
                self.say(f"warning: could not log trial {trial.number} on the parent run ({exc})")

    def _mark_run(self, run_id: str | None, state: str, values: Sequence[float] | None,
                  status: str | None = None) -> None:
        if run_id is None or self.tracking_uri is None:
            return
        from .tracking import update_run

        tags = {"genopt.trial_state": state}
        if values:
            tags["genopt.trial_values"] = json.dumps(list(values))
        try:
            update_run(self.tracking_uri, run_id, tags=tags, status=status)
        except Exception as exc:
            self.say(f"warning: could not tag MLflow run {run_id} ({exc})")

    def _requeue(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Queue a failed trial's point again, as Optuna's RetryHeartbeatStaleTrialCallback does
        (same params, distributions and system attrs, so that a grid keeps its bookkeeping)."""
        retries = int(trial.user_attrs.get("retries", 0))
        if retries >= self.config.max_retry or not trial.params:
            return
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=dict(trial.params),
            distributions=dict(trial.distributions),
            user_attrs={"retry_of": trial.user_attrs.get("retry_of", trial.number),
                        "retries": retries + 1},
            system_attrs=dict(trial.system_attrs),
        ))
        self.say(f"trial {trial.number} failed: queued again ({retries + 1}/{self.config.max_retry})")

    def _on_stale_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """A worker stopped sending heartbeats: Optuna has just marked its trial FAIL."""
        self.say(f"trial {trial.number} lost its worker (no heartbeat): FAIL")
        self._mark_run(trial.user_attrs.get("mlflow_run_id"), "FAIL", None, status="KILLED")
        self._requeue(study, trial)

    # --- budgets -----------------------------------------------------------------------------
    def _budget_reason(self, live: Mapping[str, Any] | None = None,
                       live_number: int | None = None) -> str | None:
        """``"budget: <field>"`` once a study budget is reached, else ``None``. ``live``: the
        running trial ``live_number``'s spend so far (fresher than what the storage holds)."""
        c = self.config
        if c.max_wall_time_s is not None and time.monotonic() - self.started >= c.max_wall_time_s:
            return "budget: max_wall_time_s"
        if c.max_tokens is None and c.max_cost_usd is None:
            return None
        tokens, cost = 0, 0.0
        for t in self.study.get_trials(deepcopy=False):
            if t.number == live_number and live is not None:
                spend = live
            else:
                spend = t.user_attrs.get("result") or t.user_attrs.get("spend") or {}
            tokens += int(spend.get("tokens_spent") or 0)
            cost += float(spend.get("cost_usd") or 0.0)
        if c.max_tokens is not None and tokens >= c.max_tokens:
            return "budget: max_tokens"
        if c.max_cost_usd is not None and cost >= c.max_cost_usd:
            return "budget: max_cost_usd"
        return None

    # --- the worker loop ---------------------------------------------------------------------
    def work(self) -> str:
        started = self.started = time.monotonic()
        poll = min(float(self.config.heartbeat_interval_s), 1.0)
        while True:
            if self.config.timeout_s is not None and time.monotonic() - started >= self.config.timeout_s:
                return "timeout"
            budget = self._budget_reason()
            if budget is not None:
                self.say(f"{budget} reached: no new trial")
                return budget
            self.lock.acquire()
            try:
                action, reason = self._decide()
                if action == "ask":
                    self.study.optimize(self._objective, n_trials=1, catch=(Exception,),
                                        callbacks=[self._after_trial])
                    if self.fatal is not None:
                        raise self.fatal
                    continue
            finally:
                self.lock.release()
            if action == "stop":
                return reason
            time.sleep(poll)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)

    def finish(self, stop_reason: str, status: str | None) -> StudyResult:
        """Summarize the study as the storage holds it now. Every worker writes the local files;
        the first to see a given state uploads them to the parent run (claimed under the lock)."""
        with self.lock.hold():
            trials = self.study.get_trials(deepcopy=False)
            finished = sum(t.state.is_finished() for t in trials)
            running = any(t.state == TrialState.RUNNING for t in trials)
            stamp = f"{finished}:{status}"
            upload = self.parent_run_id is not None and self.study.user_attrs.get("summary_logged") != stamp
            if upload:
                self.study.set_user_attr("summary_logged", stamp)
        summary = _summarize(self, trials, stop_reason)
        _write_summary(self, summary)
        if upload:
            from .tracking import log_study_summary

            final = status or ("RUNNING" if running else "FINISHED")
            log_study_summary(
                self.tracking_uri, self.parent_run_id, self.summary_dir,
                metrics=_summary_metrics(summary), step=finished,
                tags={"genopt.study.stop_reason": stop_reason,
                      "genopt.study.recommended_trial": str(summary.recommended.number)
                      if summary.recommended else "none",
                      **({"genopt.study.budget": stop_reason.split(": ", 1)[1]}
                         if stop_reason.startswith("budget: ") else {})},
                status=None if final == "RUNNING" or not self.parent_owned else final,
            )
        return summary

    def close(self) -> None:
        self.lock.close()


def _params_key(trial: optuna.trial.FrozenTrial) -> str:
    params = trial.params or trial.system_attrs.get("fixed_params") or {}
    return _key(sorted(params.items()))


def _label(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(params.items()))


def _definition_mismatch(name: str, stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    for part in ("objectives", "search_space", "base_config"):
        a, b = stored.get(part), wanted.get(part)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            where = f"{part}.{diff[0]}: stored {a.get(diff[0])!r}, given {b.get(diff[0])!r}"
        else:
            where = f"{part}: stored {a!r}, given {b!r}"
        return (f"study_name: study {name!r} exists with a different definition ({where}); "
                "pass the same settings or choose another --study-name")
    return f"study_name: study {name!r} exists with a different definition"


# --- summary -------------------------------------------------------------------------------------
def _trial_summary(t: optuna.trial.FrozenTrial) -> TrialSummary:
    result = t.user_attrs.get("result") or {}
    spend = {**(t.user_attrs.get("spend") or {}), **{k: v for k, v in result.items()
                                                      if k in ("tokens", "tokens_spent", "llm_calls", "cost_usd")}}
    curve = tuple(tuple(p) for p in t.user_attrs.get("curve") or ())
    best = result.get("best_val_score")
    if best is None and curve:
        best = curve[-1][1]
    duration = (t.datetime_complete - t.datetime_start).total_seconds() \
        if t.datetime_complete and t.datetime_start else None
    return TrialSummary(
        number=t.number, state=t.state.name, params=dict(t.params), best_val_score=best,
        test_score=result.get("test_score"), tokens=spend.get("tokens"),
        tokens_spent=spend.get("tokens_spent"), llm_calls=spend.get("llm_calls"),
        cost_usd=spend.get("cost_usd"),
        steps_run=result.get("steps_run", len(curve) if curve else None),
        stop_reason=result.get("stop_reason") or (t.user_attrs.get("error") and "error"),
        duration_s=duration, mlflow_run_id=t.user_attrs.get("mlflow_run_id"),
        config=t.user_attrs.get("config"), curve=curve, retry_of=t.user_attrs.get("retry_of"),
    )


def _pick(candidates: Iterable[TrialSummary]) -> TrialSummary | None:
    """Highest best validation score; ties: fewer tokens, then the earlier trial."""
    ranked = sorted(
        (t for t in candidates if t.best_val_score is not None),
        key=lambda t: (-t.best_val_score, t.tokens if t.tokens is not None else math.inf, t.number),
    )
    return ranked[0] if ranked else None


def _importances(study: optuna.Study, complete: int) -> tuple[dict[str, float], str | None]:
    if complete < 2:
        return {}, f"needs at least 2 complete trials, has {complete}"
    target = None if len(study.directions) == 1 else (lambda t: t.values[0])
    errors = []
    for evaluator in (None, optuna.importance.FanovaImportanceEvaluator(seed=0)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                values = optuna.importance.get_param_importances(study, evaluator=evaluator, target=target)
            return {k: float(v) for k, v in values.items()}, None
        except Exception as exc:  # too few distinct values, a single-point space, ...
            errors.append(f"{type(exc).__name__}: {exc}")
    return {}, "; ".join(errors)


def _summarize(runner: _StudyRunner, trials: Sequence[optuna.trial.FrozenTrial], stop_reason: str) -> StudyResult:
    summaries = tuple(_trial_summary(t) for t in trials)
    complete = [s for s in summaries if s.state == "COMPLETE"]
    pareto: tuple[TrialSummary, ...] = ()
    if runner.single:
        recommended = _pick(complete)
    else:
        front = {t.number for t in runner.study.best_trials} if complete else set()
        pareto = tuple(s for s in complete if s.number in front)
        recommended = _pick(pareto)
    importances, note = _importances(runner.study, len(complete))
    recommended_config = None
    if recommended is not None and recommended.config is not None:
        recommended_config = LoopConfig.from_dict(recommended.config)
    return StudyResult(
        study_name=runner.name, storage=hide_password(runner.config.storage),
        sampler=runner.sampler_name, pruner=runner.pruner_name,
        objectives=runner.config.objectives, target_trials=runner.target, stop_reason=stop_reason,
        trials=summaries, recommended=recommended, recommended_config=recommended_config,
        pareto=pareto, importances=importances, parent_run_id=runner.parent_run_id,
        summary_dir=runner.summary_dir, trials_run_here=runner.trials_run, importance_note=note,
    )


def _summary_metrics(summary: StudyResult) -> dict[str, float]:
    metrics: dict[str, float] = {
        "n_complete": summary.count("COMPLETE"), "n_pruned": summary.count("PRUNED"),
        "n_failed": summary.count("FAIL"),
        "study_tokens": sum(t.tokens or 0 for t in summary.trials),
        "study_llm_calls": sum(t.llm_calls or 0 for t in summary.trials),
    }
    best = summary.recommended
    if best is not None:
        metrics["best_val_score"] = best.best_val_score
        if best.test_score is not None:
            metrics["best_test_score"] = best.test_score
        if best.tokens is not None:
            metrics["best_tokens"] = best.tokens
    metrics.update({f"importance/{k}": v for k, v in summary.importances.items()})
    return metrics


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _write_summary(runner: _StudyRunner, summary: StudyResult) -> None:
    """Files of the summary (also logged to the parent run): ``summary/trials.csv`` and
    ``trials.md`` (configs vs best validation / test scores and tokens), ``summary/curves.png``
    (best validation score vs step and vs tokens, per trial), ``summary/param_importances.json``
    (+ ``.png``), ``summary/study.json`` and ``recommended.yaml``."""
    root = summary.summary_dir
    folder = root / "summary"
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(runner.config.search_space)
    rows = [t.to_row(names) for t in summary.trials]
    columns = list(rows[0]) if rows else ["trial", "state", *names]
    with open(folder / "trials.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    shown = ["trial", "state", *names, "best_val_score", "test_score", "tokens", "steps_run"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    best = summary.recommended.number if summary.recommended else None
    for row in sorted(rows, key=lambda r: (-(r["best_val_score"] or -math.inf), r["trial"])):
        cells = [_fmt(row[c]) for c in shown]
        if row["trial"] == best:
            cells[0] += " (recommended)"
        lines.append("| " + " | ".join(cells) + " |")
    (folder / "trials.md").write_text("\n".join(lines) + "\n")

    importances = {"importances": summary.importances}
    if summary.importance_note:
        importances["note"] = summary.importance_note
    (folder / "param_importances.json").write_text(json.dumps(importances, indent=2))
    info = {
        "study_name": summary.study_name, "storage": summary.storage, "sampler": summary.sampler,
        "pruner": summary.pruner, "objectives": list(summary.objectives),
        "target_trials": summary.target_trials, "stop_reason": summary.stop_reason,
        "counts": {s.name: summary.count(s.name) for s in TrialState},
        "recommended_trial": best,
        "pareto_trials": [t.number for t in summary.pareto],
        "parent_run_id": summary.parent_run_id,
        "definition": runner.config.definition(),
    }
    (folder / "study.json").write_text(json.dumps(info, indent=2, default=str))
    recommended = root / "recommended.yaml"
    if summary.recommended_config is not None:
        header = (f"# recommended by study {summary.study_name} (trial {best}); reuse with:\n"
                  f"#   genopt run {summary.recommended_config.project} --config recommended.yaml\n")
        recommended.write_text(header + summary.recommended_config.to_yaml())
    elif recommended.exists():
        recommended.unlink()
    _plot(summary, folder)


def _plot(summary: StudyResult, folder: Path) -> None:
    try:
        from matplotlib.figure import Figure  # Agg canvas, no pyplot state
    except ImportError:  # pragma: no cover - matplotlib comes with MLflow
        return
    curves = [t for t in summary.trials if t.curve]
    if curves:
        fig = Figure(figsize=(13, 5), layout="constrained")
        by_step, by_tokens = fig.subplots(1, 2)
        best = summary.recommended.number if summary.recommended else None
        for t in curves:
            steps = [p[0] for p in t.curve]
            scores = [p[1] for p in t.curve]
            tokens = [p[3] for p in t.curve]
            style = {"linestyle": "--", "alpha": 0.6} if t.state == "PRUNED" else {}
            if t.state == "FAIL":
                style = {"linestyle": ":", "alpha": 0.5}
            width = 3 if t.number == best else 1.3
            label = f"#{t.number} {_label(t.params)} ({t.state.lower()})"
            by_step.plot(steps, scores, marker="o", markersize=3, linewidth=width, label=label, **style)
            by_tokens.plot(tokens, scores, marker="o", markersize=3, linewidth=width, **style)
        by_step.xaxis.get_major_locator().set_params(integer=True)
        by_step.set(xlabel="step", ylabel="best validation score", title="score vs step per config")
        by_tokens.set(xlabel="LLM tokens (cumulative)", ylabel="best validation score",
                      title="score vs tokens per config")
        by_step.legend(fontsize=7, loc="best")
        fig.suptitle(f"study {summary.study_name}: pruned dashed, failed dotted, recommended thick")
        fig.savefig(folder / "curves.png", dpi=110)
    if summary.importances:
        fig = Figure(figsize=(7, 0.5 + 0.45 * len(summary.importances)), layout="constrained")
        ax = fig.subplots()
        items = sorted(summary.importances.items(), key=lambda kv: kv[1])
        ax.barh([k for k, _ in items], [v for _, v in items])
        ax.set(xlabel="importance (normalized)", title="parameter importances")
        fig.savefig(folder / "param_importances.png", dpi=110)


# --- entry point ---------------------------------------------------------------------------------
def run_study(
    config: StudyConfig,
    *,
    tracking_uri: str | None = "",
    experiment: str = "genopt",
    run_name: str | None = None,
    cache_dir: str | Path | None = Path(".genopt") / "cache",
    optimizer_llm: LLM | None = None,
    task_llm: LLM | None = None,
    base_url: str | None = None,
    callbacks: Sequence[LoopCallback] = (),
    summary_dir: str | Path | None = None,
    progress: bool = False,
    stream: TextIO | None = None,
) -> StudyResult:
    """Run (or join, or resume) the study ``config`` describes, as one worker.

    Returns once the study holds ``target_trials`` finished trials (or this worker's timeout
    passed, or a finite space is exhausted), after writing the summary to ``summary_dir``
    (default ``.genopt/studies/<study_name>``) and to the MLflow parent run.

    ``tracking_uri``: ``""`` uses ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``; ``None``
    turns MLflow off. The parent run is ``$MLFLOW_RUN_ID`` when set (``mlflow run``), else the
    study's own (created by the first worker, reopened on resume). ``optimizer_llm`` /
    ``task_llm`` / ``cache_dir`` / ``base_url`` go to every loop as in
    :func:`~mlflow_genopt.runner.run_loop`; ``callbacks`` are added to every loop. Raises
    :class:`ConfigError` / :class:`LLMError` (one line) for bad input or an LLM that cannot work;
    a KeyboardInterrupt marks the running trial FAIL (queued again) and the parent run KILLED.
    """
    from .runner import default_tracking_uri

    if tracking_uri is not None and not tracking_uri:
        tracking_uri = default_tracking_uri()
    if tracking_uri is not None:
        from .tracking import check_tracking_uri

        check_tracking_uri(tracking_uri)  # before the storage, its lock file or any run exist
    runner = _StudyRunner(
        config, tracking_uri=tracking_uri, experiment=experiment, cache_dir=cache_dir,
        optimizer_llm=optimizer_llm, task_llm=task_llm, base_url=base_url, callbacks=callbacks,
        stream=(stream or sys.stderr) if progress else None, summary_dir=summary_dir,
        run_name=run_name,
    )
    try:
        runner.open()
        try:
            reason = runner.work()
        except KeyboardInterrupt:
            runner.finish("interrupted", "KILLED")
            raise
        except BaseException as exc:
            runner.finish(f"error: {type(exc).__name__}: {exc}", "FAILED")
            raise
        result = runner.finish(reason, None)
    finally:
        runner.close()
    runner.say(
        f"done ({result.stop_reason}): {result.count('COMPLETE')} complete, "
        f"{result.count('PRUNED')} pruned, {result.count('FAIL')} failed; "
        + (f"recommended trial {result.recommended.number} ({_label(result.recommended.params)}, "
           f"best val {result.recommended.best_val_score:.4f})" if result.recommended else "no recommendation")
    )
    return result
