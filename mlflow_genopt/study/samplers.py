"""Samplers and pruners, chosen by name (``--sampler``, ``--pruner``), built as Optuna objects."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Mapping

import optuna

if TYPE_CHECKING:
    from .config import StudyConfig

SAMPLERS = ("auto", "grid", "brute_force", "tpe", "random")
PRUNERS = ("auto", "none", "median", "percentile", "wilcoxon")
AUTO_GRID_LIMIT = 64  # "auto" searches finite spaces up to this size exhaustively, else TPE


def make_sampler(name: str, space: Mapping[str, Any], seed: int) -> optuna.samplers.BaseSampler:
    """The sampler ``name`` (resolved: not ``auto``) over the search space ``space``."""
    if name == "grid":
        grid = {field: list(dim.values()) for field, dim in space.items()}
        return optuna.samplers.GridSampler(grid, seed=seed)
    if name == "brute_force":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.BruteForceSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def make_pruner(name: str, config: StudyConfig) -> optuna.pruners.BasePruner:
    """The pruner ``name`` (resolved: not ``auto``) with ``config``'s pruner settings."""
    c = config
    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=c.pruner_startup_trials, n_warmup_steps=c.pruner_warmup_steps)
    if name == "percentile":
        return optuna.pruners.PercentilePruner(
            c.pruner_percentile, n_startup_trials=c.pruner_startup_trials,
            n_warmup_steps=c.pruner_warmup_steps)
    if name == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(
            p_threshold=c.pruner_p_threshold, n_startup_steps=max(c.pruner_warmup_steps, 1))
    return optuna.pruners.NopPruner()
