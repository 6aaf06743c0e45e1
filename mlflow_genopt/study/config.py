"""What a study is: :class:`StudyConfig` (every setting, validated once) and the result types
:class:`TrialSummary` and :class:`StudyResult` that a study leaves.

Each setting of :class:`StudyConfig` but ``base`` and ``search_space`` carries its
``genopt study`` flag as field metadata (:class:`Flag`), so the command line is generated from
this one table (:mod:`mlflow_genopt.study.flags`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..config import ConfigError, LoopConfig
from .samplers import AUTO_GRID_LIMIT, PRUNERS, SAMPLERS
from .space import (
    Categorical, Dimension, FloatRange, IntRange, apply_params, check_name, dimension_size,
    finite_points, parse_search_space, search_space_to_spec, validate_space,
)
from .storage import DEFAULT_STORAGE, storage_kind

OBJECTIVES = ("score", "tokens")
DEFAULT_OPEN_TRIALS = 20  # n_trials when the space is not finite and none is given


# --- command-line metadata -----------------------------------------------------------------------
@dataclass(frozen=True)
class Flag:
    """How a :class:`StudyConfig` field appears on the command line.

    ``name``: the flag (default ``--<field-name>``, underscores as dashes). ``type``: argparse's
    conversion (a bad value is argparse's usage error). ``parse``: ``(flag, text) -> value`` after
    argparse, for text flags that MLproject always passes (``none`` and empty text mean
    ``None``); raises a one-line :class:`ConfigError`. A flag that is not given leaves the
    field's default."""

    help: str
    name: str | None = None
    type: Callable[[str], Any] | None = None
    parse: Callable[[str, str], Any] | None = None
    metavar: str | None = None


def _flag(default: Any, help: str, **flag: Any) -> Any:
    return field(default=default, metadata={"flag": Flag(help, **flag)})


def optional_number(kind: type) -> Callable[[str, str | None], Any]:
    """A parser for ``--n-trials``-like values: a number of ``kind``, or ``none``/empty."""

    def parse(flag: str, text: str | None) -> Any:
        if text is None or str(text).strip().lower() in ("", "none", "null"):
            return None
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or (kind is int and number != int(number)):
            raise ConfigError(f"{flag}: must be {'an integer' if kind is int else 'a number'} "
                              f"or none, got {text!r}")
        return kind(number)

    return parse


def _text_or_none(flag: str, text: str) -> str | None:
    return text or None  # MLproject passes "" for "not given"


# --- configuration -------------------------------------------------------------------------------
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
    # Every other field is a `genopt study` flag (study/flags.py builds them from this table).
    study_name: str | None = _flag(
        None, "default: <project>-<task>-<hash of base config, space, objectives>",
        parse=_text_or_none)
    storage: str = _flag(
        DEFAULT_STORAGE, "Optuna storage: sqlite:///optuna.db (default), "
        "postgresql://user:pw@host/db, journal:path/study.log, memory")
    sampler: str = _flag(
        "auto", "auto (grid for finite spaces up to 64 points, else tpe), grid, brute_force, "
        "tpe, random (default: auto)")
    n_trials: int | None = _flag(
        None, "finished trials the study should hold, over all workers (default: every point "
        "of a grid, else 20)", parse=optional_number(int))
    timeout_s: float | None = _flag(
        None, "seconds after which this worker starts no new trial", name="--timeout",
        parse=optional_number(float))
    sampler_seed: int = _flag(0, "sampler seed (default: 0)", type=int)
    objectives: tuple[str, ...] = _flag(
        ("score",), "score (maximize best validation score) or score,tokens (also minimize LLM "
        "tokens; multi-objective)")
    pruner: str = _flag(
        "auto", "auto (median; none for score,tokens), none, median, percentile, wilcoxon")
    pruner_startup_trials: int = _flag(
        5, "finished trials before pruning starts (default: 5)", type=int)
    pruner_warmup_steps: int = _flag(
        0, "steps of each loop before it can be pruned (default: 0)", type=int)
    pruner_percentile: float = _flag(
        25.0, "percentile pruner: prune below this percentile (default: 25)", type=float)
    pruner_p_threshold: float = _flag(
        0.1, "wilcoxon pruner: p-value threshold (default: 0.1)", type=float)
    heartbeat_interval_s: int = _flag(
        60, "seconds between a running trial's heartbeats (RDB storages)",
        name="--heartbeat-interval", type=int)
    grace_period_s: int | None = _flag(
        None, "seconds without heartbeat before a trial is failed (default: 2x interval)",
        name="--grace-period", type=int)
    max_retry: int = _flag(1, "how often a failed point is queued again (default: 1)", type=int)
    max_tokens: int | None = _flag(
        None, "study budget: stop once its trials spent N LLM tokens (all workers; --max-tokens "
        "is the per-loop budget)", name="--study-max-tokens", metavar="N",
        parse=optional_number(int))
    max_cost_usd: float | None = _flag(
        None, "study budget: stop once its trials spent this much (list prices)",
        name="--study-max-cost-usd", metavar="USD", parse=optional_number(float))
    max_wall_time_s: float | None = _flag(
        None, "study budget: stop this worker, running loop included, after S seconds",
        name="--study-max-wall-time-s", metavar="S", parse=optional_number(float))

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        if not isinstance(self.base, LoopConfig):
            raise ConfigError(f"base: must be a LoopConfig, got {type(self.base).__name__}")
        space = self.search_space
        if not all(isinstance(d, (Categorical, IntRange, FloatRange)) for d in space.values()):
            space = parse_search_space(space)
        for name in space:
            check_name(name)
        set_("search_space", dict(space))
        validate_space(self.base, self.search_space)
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
        storage_kind(self.storage)  # a one-line error for an unsupported URL, before anything runs

    # --- derived ---------------------------------------------------------------------------
    def size(self) -> int | None:
        """Number of points of a finite space (``None``: a continuous range)."""
        sizes = [dimension_size(dim) for dim in self.search_space.values()]
        return None if None in sizes else math.prod(sizes)

    def points(self) -> list[dict[str, Any]] | None:
        """Every point of a finite space (sorted by field name, values in the given order)."""
        return finite_points(self.search_space)

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
            "base_config": self.base.identity(),  # wherever its trials run
            "search_space": search_space_to_spec(self.search_space),
            "objectives": list(self.objectives),
        }

    def resolved_name(self) -> str:
        if self.study_name:
            return self.study_name.strip()
        digest = hashlib.sha256(json.dumps(self.definition(), sort_keys=True).encode()).hexdigest()
        return f"{self.base.project}-{self.base.task}-{digest[:8]}"

    def trial_config(self, params: Mapping[str, Any]) -> LoopConfig:
        return apply_params(self.base, params)


def definition_mismatch(name: str, stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
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


# --- results -------------------------------------------------------------------------------------
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
