"""The ``genopt`` command line: parses arguments, then calls the library."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from typing import Any, Sequence

from .config import GENERIC_DEFAULTS, ConfigError, LoopConfig

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
    from .build import resolve_config

    overrides = {f.name: (None if str(value).lower() == "none" else value)
                 for f in _CONFIG_FLAGS if (value := getattr(args, f.name, None)) is not None}
    options = dict(_parse_option(text) for text in args.option or [])
    if args.data_dir:
        options["data_dir"] = args.data_dir
    return resolve_config(project_name, config_file=args.config, overrides=overrides,
                          options=options)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    loop = parser.add_argument_group("loop config (see README: loop config reference)")
    for f in _CONFIG_FLAGS:
        default = GENERIC_DEFAULTS.get(f.name)
        loop.add_argument(_flag(f.name), dest=f.name, default=None, metavar="VALUE",
                          help=f"default: the project's, else {'none' if default is None else default}")
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
    where.add_argument("--fresh", action="store_true",
                       help="start a new run even if an unfinished run with this config exists")


def _cmd_run(args: argparse.Namespace) -> int:
    from .build import default_tracking_uri, run_loop

    config = build_config(args.project, args)
    tracking_uri = None if args.no_tracking else (args.tracking_uri or default_tracking_uri())
    result = run_loop(config, tracking=tracking_uri, run_name=args.run_name,
                      resume=None if args.fresh else "auto", handle_sigint=True,
                      **_shared_options(args))
    return _report(result, tracking_uri, args.experiment)


def _shared_options(args: argparse.Namespace) -> dict:
    """The options `run`, `resume` and `study` pass alike to the library."""
    return {
        "experiment": args.experiment,
        "cache_dir": None if args.no_cache else args.cache_dir,
        "base_url": args.base_url,
        "progress": not args.quiet,
    }


def _cmd_resume(args: argparse.Namespace) -> int:
    from .build import default_tracking_uri, resume_loop

    tracking_uri = args.tracking_uri or default_tracking_uri()
    result = resume_loop(args.run_id, tracking=tracking_uri, handle_sigint=True,
                         executor=args.executor, **_shared_options(args))
    return _report(result, tracking_uri, args.experiment)


def _report(result, tracking_uri: str | None, experiment: str) -> int:
    test = "n/a" if result.test_score is None else f"{result.test_score:.4f}"
    print(f"selected version: {result.selected.version_id}")
    print(f"best val score:   {result.best_val_score:.4f}")
    print(f"test score:       {test}")
    if tracking_uri:
        where = (f"run {os.environ['MLFLOW_RUN_ID']}" if os.environ.get("MLFLOW_RUN_ID")
                 else f"experiment {experiment!r}")
        print(f"tracked in:       {tracking_uri} ({where})")
        if tracking_uri.startswith("sqlite:///"):
            print(f"look at it with:  mlflow ui --backend-store-uri {tracking_uri}")
    if result.stop_reason == "interrupted":
        print("interrupted: the last step is logged; run the same command again, or "
              "`genopt resume RUN_ID`, to continue", file=sys.stderr)
        return 130
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


def build_study_config(project_name: str, args: argparse.Namespace):
    """The study a `genopt study` command describes: the loop config as for `genopt run` (the
    base of every trial), then the search space: the project's, or ``--space FILE`` instead;
    fields given as explicit loop-config flags (``--batch-size 3``, ``--option k=v``) are fixed,
    not searched; ``--param``/``--params`` add or replace dimensions last."""
    from .project import load_project
    from .study import study_config_from_args

    base = build_config(project_name, args)
    fixed = {f.name for f in _CONFIG_FLAGS if getattr(args, f.name, None) is not None}
    fixed |= {f"task_options.{_parse_option(text)[0]}" for text in args.option or []}
    return study_config_from_args(base, load_project(project_name).search_space, args, fixed=fixed)


def _add_study_arguments(parser: argparse.ArgumentParser) -> None:
    from .study import add_study_arguments

    add_study_arguments(parser)


def _cmd_study(args: argparse.Namespace) -> int:
    import logging

    from .build import default_tracking_uri
    from .study import run_study

    config = build_study_config(args.project, args)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    tracking_uri = None if args.no_tracking else (args.tracking_uri or default_tracking_uri())
    result = run_study(config, tracking_uri=tracking_uri, run_name=args.run_name,
                       summary_dir=args.summary_dir, **_shared_options(args))
    print(f"study:            {result.study_name} in {result.storage} ({result.stop_reason})")
    print(f"trials:           {result.count('COMPLETE')} complete, {result.count('PRUNED')} pruned, "
          f"{result.count('FAIL')} failed ({result.trials_run_here} run by this worker)")
    if result.recommended is not None:
        best = result.recommended
        params = " ".join(f"{k}={v}" for k, v in sorted(best.params.items()))
        test = "n/a" if best.test_score is None else f"{best.test_score:.4f}"
        print(f"recommended:      trial {best.number}: {params}")
        print(f"                  best val {best.best_val_score:.4f}, test {test}, tokens {best.tokens}")
    if result.summary_dir is not None:
        print(f"summary:          {result.summary_dir}/summary/trials.md")
        if result.recommended_config is not None:
            path = result.summary_dir / "recommended.yaml"
            print(f"reuse it with:    genopt run {args.project} --config {path}")
    if result.parent_run_id:
        print(f"MLflow:           parent run {result.parent_run_id} in {tracking_uri}")
        if tracking_uri.startswith("sqlite:///"):
            print(f"look at it with:  mlflow ui --backend-store-uri {tracking_uri}")
    from .study import hide_password

    print(f"dashboard:        optuna-dashboard {hide_password(config.storage).removeprefix('journal:')}")
    return 0 if result.count("COMPLETE") or result.target_trials == 0 else 1


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

    resume = sub.add_parser("resume", help="continue an interrupted loop run",
                            description="Continue an interrupted (killed, failed or Ctrl-C'd) "
                                        "loop run from its last logged step, in the same run.")
    resume.add_argument("run_id", help="MLflow run id of the loop")
    resume.add_argument("--tracking-uri", default="",
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    resume.add_argument("--experiment", default="genopt", help=argparse.SUPPRESS)
    resume.add_argument("--cache-dir", default=".genopt/cache", help="LLM response cache directory")
    resume.add_argument("--no-cache", action="store_true", help="disable the LLM response cache")
    resume.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint")
    resume.add_argument("--quiet", action="store_true", help="no progress lines")
    resume.add_argument("--executor", default=None,
                        help="where evaluations run (default: as the run logged it), e.g. local")
    resume.set_defaults(func=_cmd_resume)

    projects = sub.add_parser("projects", help="list projects and their starting artifacts",
                              description="List installed projects and their starting artifacts.")
    projects.set_defaults(func=_cmd_projects)

    config = sub.add_parser("config", help="print the resolved loop config as YAML",
                            description="Print the loop config a `run` with these flags would use.")
    config.add_argument("project")
    _add_run_arguments(config)
    config.set_defaults(func=_cmd_config)

    study = sub.add_parser(
        "study", help="search loop design choices with Optuna (one worker)",
        description="Run, join or resume an Optuna study over the project's loop design choices: "
                    "every trial is one learning loop, a nested MLflow run under the study's "
                    "parent run. Run the same command on several machines to add workers.")
    study.add_argument("project", help="case-study project, e.g. bbeh (see `genopt projects`)")
    _add_run_arguments(study)
    _add_study_arguments(study)
    study.set_defaults(func=_cmd_study)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # keep the progress lines readable
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = make_parser().parse_args(argv)
    from .executor import ExecutorError
    from .llm.base import LLMError

    try:
        return args.func(args)
    except (ConfigError, LLMError) as exc:
        print(f"genopt: error: {exc}", file=sys.stderr)
        return 2
    except ExecutorError as exc:  # infrastructure: the run is failed and resumable
        print(f"genopt: error: {exc}; run the same command again to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("genopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
