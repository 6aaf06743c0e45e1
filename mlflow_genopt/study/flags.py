"""``genopt study``'s command line: one flag per :class:`StudyConfig` setting, generated from the
field's :class:`~mlflow_genopt.study.config.Flag` metadata, plus the flags that build the search
space (``--space``, ``--param``, ``--params``) and ``--summary-dir`` (where ``run_study`` writes).
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any, Iterable, Iterator, Mapping

from ..config import LoopConfig
from .config import Flag, StudyConfig
from .space import load_search_space, parse_param, parse_search_space


def _setting_flags() -> Iterator[tuple[str, str, Flag]]:
    """``(field name, flag, metadata)`` for every :class:`StudyConfig` field that is a flag."""
    for f in fields(StudyConfig):
        flag = f.metadata.get("flag")
        if flag is not None:
            yield f.name, flag.name or "--" + f.name.replace("_", "-"), flag


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the group of study flags to ``parser`` (the loop-config flags are the caller's)."""
    study = parser.add_argument_group("study (see README: Studies)")
    study.add_argument("--space", metavar="FILE",
                       help="YAML file with the search space (replaces the project's)")
    study.add_argument("--param", action="append", metavar="NAME=SPEC",
                       help="search a field: batch_size=1,3,5 | memory_size=0..6:2 | "
                            "optimizer_temperature=0.1..1.0:log (repeatable; replaces that field)")
    study.add_argument("--params", metavar="SPECS",
                       help="several --param specs separated by ';' (for MLproject)")
    for _, flag, meta in _setting_flags():
        # default None: a flag that is not given leaves StudyConfig's default
        study.add_argument(flag, dest=_dest(flag), type=meta.type, default=None,
                           metavar=meta.metavar, help=meta.help)
    study.add_argument("--summary-dir", default=None,
                       help="where the summary files go (default: .genopt/studies/<study name>)")


def study_config_from_args(base: LoopConfig, space: Mapping[str, Any] | None,
                           args: argparse.Namespace, *, fixed: Iterable[str] = ()) -> StudyConfig:
    """The study that :func:`add_study_arguments`' flags in ``args`` describe, over ``base``.

    The search space is ``space`` (a project's, in the plain form), or the ``--space FILE``
    instead; fields named in ``fixed`` (given as explicit loop-config flags) are not searched;
    ``--param``/``--params`` add or replace dimensions last. Raises a one-line
    :class:`~mlflow_genopt.config.ConfigError` for any bad value.
    """
    dimensions = load_search_space(args.space) if args.space else parse_search_space(space or {})
    fixed = set(fixed)
    dimensions = {name: dim for name, dim in dimensions.items() if name not in fixed}
    specs = list(args.param or [])
    specs += [s.strip() for s in (args.params or "").split(";") if s.strip()]
    for text in specs:
        name, dim = parse_param(text)
        dimensions[name] = dim
    settings: dict[str, Any] = {}
    for name, flag, meta in _setting_flags():
        value = getattr(args, _dest(flag))
        if value is not None:
            settings[name] = meta.parse(flag, value) if meta.parse else value
    return StudyConfig(base=base, search_space=dimensions, **settings)
