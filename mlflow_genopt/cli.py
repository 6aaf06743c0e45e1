"""The ``genopt`` command line: parses arguments, then calls the library."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from typing import Any, Sequence

from .config import ConfigError, LoopConfig

_CONFIG_FLAGS = [f for f in fields(LoopConfig) if f.name not in ("project", "task_options")]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_option(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise ConfigError(f"--option {text!r}: expected KEY=VALUE, e.g. --option train_size=20")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def build_config(project_name: str, args: argparse.Namespace) -> LoopConfig:
    """Project defaults, then ``--config FILE``, then explicit flags (later wins)."""
    from .project import load_project

    project = load_project(project_name)
    data: dict[str, Any] = {"project": project_name, **project.defaults}
    if args.config:
        file_config = LoopConfig.from_file(args.config).to_dict()
        explicit = _explicit_file_keys(args.config)
        data.update({k: v for k, v in file_config.items() if k in explicit})
    for f in _CONFIG_FLAGS:
        value = getattr(args, f.name, None)
        if value is not None:
            data[f.name] = None if str(value).lower() == "none" else value
    options = dict(data.get("task_options") or {})
    for text in args.option or []:
        key, value = _parse_option(text)
        options[key] = value
    if args.data_dir:
        options["data_dir"] = args.data_dir
    data["task_options"] = options
    return LoopConfig.from_dict(data)


def _explicit_file_keys(path: str) -> set[str]:
    import yaml

    with open(path) as handle:
        return set(yaml.safe_load(handle) or {})


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    loop = parser.add_argument_group("loop config (see README: loop config reference)")
    for f in _CONFIG_FLAGS:
        loop.add_argument(_flag(f.name), dest=f.name, default=None, metavar="VALUE",
                          help=f"default: {f.default if f.default is not None else 'none'}")
    loop.add_argument("--option", action="append", metavar="KEY=VALUE",
                      help="task option, e.g. --option train_size=20 (repeatable)")
    loop.add_argument("--data-dir", help="directory with the task's data files")
    loop.add_argument("--config", help="YAML/JSON file of loop config fields (flags override it)")
    where = parser.add_argument_group("tracking and LLM")
    where.add_argument("--tracking-uri", default="",
                       help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    where.add_argument("--experiment", default="genopt", help="MLflow experiment name")
    where.add_argument("--run-name", default=None, help="MLflow run name")
    where.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    where.add_argument("--cache-dir", default=".genopt/cache", help="LLM response cache directory")
    where.add_argument("--no-cache", action="store_true", help="disable the LLM response cache")
    where.add_argument("--base-url", default=None,
                       help="OpenAI-compatible endpoint for openai:<model> (default: $OPENAI_BASE_URL)")
    where.add_argument("--quiet", action="store_true", help="no progress lines")


def _cmd_run(args: argparse.Namespace) -> int:
    from .runner import default_tracking_uri, run_loop

    config = build_config(args.project, args)
    tracking_uri = None if args.no_tracking else (args.tracking_uri or default_tracking_uri())
    result = run_loop(
        config,
        tracking_uri=tracking_uri,
        experiment=args.experiment,
        run_name=args.run_name,
        cache_dir=None if args.no_cache else args.cache_dir,
        base_url=args.base_url,
        progress=not args.quiet,
    )
    test = "n/a" if result.test_score is None else f"{result.test_score:.4f}"
    print(f"selected version: {result.selected.version_id}")
    print(f"best val score:   {result.best_val_score:.4f}")
    print(f"test score:       {test}")
    if tracking_uri:
        print(f"tracked in:       {tracking_uri} (experiment {args.experiment!r})")
        if tracking_uri.startswith("sqlite:///"):
            print(f"look at it with:  mlflow ui --backend-store-uri {tracking_uri}")
    return 0


def _cmd_projects(args: argparse.Namespace) -> int:
    from .project import available_projects, load_project

    for name in sorted(available_projects()):
        project = load_project(name)
        print(f"{name}: {project.description}")
        for init in project.starting_artifacts.values():
            trainable = ", ".join(p.name for p in init.spec.trainable)
            print(f"  --init {init.name}: {init.description} (trainable: {trainable})")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    print(build_config(args.project, args).to_yaml(), end="")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genopt",
        description="LLM-based generative optimization with explicit, tracked design choices.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run one learning loop",
                         description="Run one learning loop of a project and track it in MLflow.")
    run.add_argument("project", help="case-study project, e.g. bbeh (see `genopt projects`)")
    _add_run_arguments(run)
    run.set_defaults(func=_cmd_run)

    projects = sub.add_parser("projects", help="list projects and their starting artifacts",
                              description="List installed projects and their starting artifacts.")
    projects.set_defaults(func=_cmd_projects)

    config = sub.add_parser("config", help="print the resolved loop config as YAML",
                            description="Print the loop config a `run` with these flags would use.")
    config.add_argument("project")
    _add_run_arguments(config)
    config.set_defaults(func=_cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = make_parser().parse_args(argv)
    from .llm.base import LLMError

    try:
        return args.func(args)
    except (ConfigError, LLMError) as exc:
        print(f"genopt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("genopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
