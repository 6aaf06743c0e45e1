"""Studies: Optuna searching the loop's design choices; the only package that talks to Optuna.

A study searches a *search space* over loop-config fields (a case study declares one in
``SimpleProject.search_space``; a YAML file or ``--param`` flags override it; the language is
in :mod:`.space`). Each trial of the study is one learning loop, run through
:func:`mlflow_genopt.build.run_loop` and tracked as a nested MLflow run under one parent run
per study. The objective is the loop's best validation score (optionally also the LLM tokens it
used); the test score is recorded, never optimized. :func:`run_study` runs one *worker*; every
worker of a study runs the same command (or call) against the same storage.

This package is the API; its modules are one concept each: :mod:`.space` (search-space
language), :mod:`.config` (:class:`StudyConfig` and the result types), :mod:`.storage`
(storage URLs, the per-study lock, storage errors), :mod:`.samplers` (samplers and pruners by
name), :mod:`.runner` (the worker and :func:`run_study`), :mod:`.listener` (what a loop reports
to its trial), :mod:`.report` (summary files, plots, importances) and :mod:`.flags`
(``genopt study``'s flags, generated from :class:`StudyConfig`'s fields).

Guarantees, for every storage that takes part (PostgreSQL, SQLite, a journal file):

* ``n_trials`` counts the *study's* finished trials (complete or pruned), whichever worker ran
  them: every worker runs ``genopt study`` with the same arguments and they stop together once the
  study holds exactly ``n_trials`` of them. Deciding whether to start a trial and creating it
  happen under a per-study lock (a PostgreSQL advisory lock, or an ``flock`` next to a SQLite
  database or journal file), so concurrent workers never overshoot and, with a finite space
  (grid / brute force), never start the same point twice.
* Who owns a RUNNING trial: the worker that created it (or took its queued WAITING retry) under
  the lock. Only that worker runs its loop and writes its attributes, reported values and final
  state; the others only read it. The one exception is a dead owner: on RDB storages (SQLite,
  PostgreSQL) the owner's Optuna heartbeat thread writes a heartbeat every
  ``heartbeat_interval_s`` while the loop runs, and a trial whose last heartbeat is older than
  ``grace_period_s`` is failed by whichever worker checks first (Optuna checks before each new
  trial; a worker waiting for running trials checks about every second), which also marks its
  MLflow run KILLED and queues its point again.
* A failed trial (the loop raised, the process was interrupted, or - on RDB storages - its worker
  stopped sending heartbeats for ``grace_period_s``) is marked FAIL in Optuna and in MLflow and is
  queued again with the same parameters up to ``max_retry`` times; FAIL trials do not count
  towards ``n_trials``. A journal file has no heartbeat: a trial whose worker died stays RUNNING
  there, and workers then stop instead of waiting for it.
* What is persistent when (each write goes to the storage at once, in this order):

  - before the lock is released for the next decision: the trial's parameters (so its grid point
    is taken) and its ``config`` and ``worker`` attributes;
  - when its loop starts: ``mlflow_run_id`` (with MLflow);
  - after every step: the ``curve`` and ``spend`` attributes and, with one objective, the
    reported ``best_val_score``, so that a pruned, failed or killed loop leaves what it used up
    to its last completed step;
  - at the end: ``result``, then the state (COMPLETE with its values, or PRUNED), and only then
    its MLflow run's ``genopt.trial_state`` tag and the parent run's per-trial metrics. A loop
    that raises leaves ``error``, its run FAILED and its queued retry before Optuna stores FAIL.

  The study's definition and parent run id are stored with the study, under the lock, by the
  first worker that opens it (the parent run id: the first worker with MLflow).
* Resuming: running the same command again loads the study (``load_if_exists``) and continues
  until ``n_trials`` are finished; a finished study is only summarized again.
* Pruning: a loop reports ``best_val_score`` after every step; a pruned loop ends after that
  step (its MLflow run gets ``genopt.stop_reason=pruned`` and ``genopt.trial_state=PRUNED``), and
  what it spent so far is on the trial and on its run.
* Study budgets (:class:`StudyConfig`) are checked before every trial and after every step of
  the running loop.
* Reproducibility: a study run by one worker from scratch is reproducible with ``sampler_seed``.
  A grid maps trial numbers to points by a shuffle seeded with ``sampler_seed``, so every worker
  of a grid study must use the same seed (it is part of the command they share); random and TPE
  workers that join or resume a study reseed, so that they do not repeat each other's draws.
* Summaries: every worker writes the summary files when it stops; the first worker to see a
  given state of the study (finished trials, status) logs them to the parent run.
"""

from __future__ import annotations

from .config import DEFAULT_OPEN_TRIALS, OBJECTIVES, Flag, StudyConfig, StudyResult, TrialSummary
from .flags import add_study_arguments, study_config_from_args
from .runner import DEFAULT_SUMMARY_ROOT, WORKER_ID, run_study
from .samplers import AUTO_GRID_LIMIT, PRUNERS, SAMPLERS
from .space import (
    Categorical,
    Dimension,
    FloatRange,
    IntRange,
    load_search_space,
    parse_param,
    parse_search_space,
    search_space_to_spec,
)
from .storage import DEFAULT_STORAGE, hide_password

__all__ = [
    "Categorical", "IntRange", "FloatRange", "Dimension", "StudyConfig", "StudyResult",
    "TrialSummary", "parse_search_space", "parse_param", "load_search_space", "run_study",
    "search_space_to_spec", "DEFAULT_STORAGE", "SAMPLERS", "PRUNERS", "OBJECTIVES",
    "hide_password", "add_study_arguments", "study_config_from_args", "Flag",
    "AUTO_GRID_LIMIT", "DEFAULT_OPEN_TRIALS", "DEFAULT_SUMMARY_ROOT", "WORKER_ID",
]
