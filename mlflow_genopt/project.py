"""Projects: what a case study (or a user's own system) offers the loop, and how they are found.

A :class:`Project` is one declared value: its starting artifacts, its typed task options, its
loop-config defaults, the design choices worth searching, and whether its tasks are multi-step
or call a task LLM. Projects register under the entry-point group ``mlflow_genopt.projects``
(see ``pyproject.toml``), so a third-party package adds one without touching this library; the
core never imports a case study by name.

The core does everything generic once, with the same one-line errors for every project: it
resolves ``init`` to a starting artifact (:meth:`Project.starting_for`), parses and validates
``task_options`` against the declared :class:`TaskOption` list (:meth:`Project.parse_options`),
and only then calls the project's ``make_task`` with a :class:`TaskSetup`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Mapping

from .artifact import ArtifactSpec
from .config import GENERIC_DEFAULTS, ConfigError, LoopConfig, ProjectInfo
from .executor import Executor, LocalExecutor
from .llm.base import LLM
from .task import Task

ENTRY_POINT_GROUP = "mlflow_genopt.projects"
OPTION_KINDS = ("int", "float", "bool", "str")
_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


@dataclass(frozen=True)
class StartingArtifact:
    """A named starting point: the parameters (which are trainable) and their initial values.

    ``tasks``: the tasks of the project it applies to (``None``: every task), e.g. a policy
    written for one Atari game."""

    name: str
    description: str
    spec: ArtifactSpec
    values: Mapping[str, str]
    tasks: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if set(self.values) != set(self.spec.names):
            raise ValueError(f"starting artifact {self.name}: values must match parameters")


@dataclass(frozen=True)
class TaskOption:
    """One typed task option (``--option name=value``, ``LoopConfig.task_options[name]``).

    ``kind``: ``int``, ``float``, ``bool`` or ``str``. ``default`` is used when the option is not
    given (``None``: the task derives it). ``minimum``/``maximum`` bound numbers (inclusive;
    ``exclusive_minimum`` makes the lower bound strict), ``choices`` bounds strings. Values from
    the command line or MLproject arrive as text and are parsed; ``""``, ``none`` and ``null``
    mean "not given".
    """

    name: str
    kind: str
    default: Any = None
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in OPTION_KINDS:
            raise ValueError(f"task option {self.name}: kind {self.kind!r}; allowed: {OPTION_KINDS}")

    def describe(self) -> str:
        """What is accepted, as the error messages say it."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "str":
            return f"one of {', '.join(self.choices)}" if self.choices else "a string"
        what = "an integer" if self.kind == "int" else "a number"
        bounds = []
        if self.minimum is not None:
            bounds.append(f"{'>' if self.exclusive_minimum else '>='} {self.minimum:g}")
        if self.maximum is not None:
            bounds.append(f"<= {self.maximum:g}")
        return what + (" " + " and ".join(bounds) if bounds else "")

    def parse(self, value: Any) -> Any:
        """The typed value, or a one-line :class:`ConfigError` naming the option."""
        try:
            parsed = self._convert(value)
        except (KeyError, TypeError, ValueError):
            parsed = None
            ok = False
        else:
            ok = self._in_bounds(parsed)
        if not ok:
            raise ConfigError(f"task_options.{self.name}: must be {self.describe()}, got {value!r}")
        return parsed

    def _convert(self, value: Any) -> Any:
        if self.kind == "bool":
            return value if isinstance(value, bool) else _BOOL_WORDS[str(value).strip().lower()]
        if self.kind == "str":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
        if self.kind == "int":
            if number != int(number):
                raise ValueError
            return int(number)
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError
        return number

    def _in_bounds(self, value: Any) -> bool:
        if self.kind == "str":
            return not self.choices or value in self.choices
        if self.kind == "bool":
            return True
        if self.minimum is not None and (value <= self.minimum if self.exclusive_minimum
                                         else value < self.minimum):
            return False
        return self.maximum is None or value <= self.maximum


@dataclass(frozen=True)
class TaskSetup:
    """What a project's ``make_task`` receives: everything already resolved and validated.

    ``options`` holds every declared option (given or default); ``starting`` is the starting
    artifact ``config.init`` names; ``task_llm`` is the task LLM (already wrapped for tracking,
    caching and usage counting) for projects with ``needs_task_llm``, else ``None``;
    ``executor`` is where the task submits its units of evaluation (``config.executor``, owned
    and closed by the caller; see :mod:`~mlflow_genopt.executor`)."""

    config: LoopConfig
    options: Mapping[str, Any]
    starting: StartingArtifact
    task_llm: LLM | None = None
    executor: Executor = field(default_factory=LocalExecutor)


def _is_unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null"))


@dataclass(frozen=True)
class Project:
    """What a case study provides; the single declared type of the project contract.

    ``make_task(setup)`` builds the task for ``setup.config.task`` (raising
    :class:`ConfigError` with the accepted names for an unknown one). ``defaults`` are the
    project's :class:`LoopConfig` defaults. ``options`` declares its task options.
    ``search_space`` holds the design choices worth searching, in the plain search-space form of
    :mod:`mlflow_genopt.study` (``{"batch_size": [1, 3, 5]}``): `genopt study PROJECT` searches it
    unless a ``--space`` file or ``--param`` flags say otherwise. ``multi_step``: trials carry
    execution traces, so ``credit_horizon`` and ``update_every`` apply. ``needs_task_llm``: the
    task calls an LLM (``task_model``). ``uses_executor``: its tasks run their units of
    evaluation through ``TaskSetup.executor``, so ``executor`` may name a cluster (otherwise
    a non-local executor is refused).
    """

    name: str
    description: str
    starting_artifacts: Mapping[str, StartingArtifact]
    make_task: Callable[[TaskSetup], Task]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    options: tuple[TaskOption, ...] = ()
    search_space: Mapping[str, Any] = field(default_factory=dict)
    multi_step: bool = False
    needs_task_llm: bool = False
    uses_executor: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.defaults) - set(GENERIC_DEFAULTS) - {"project"})
        if unknown:
            raise ValueError(f"project {self.name}: defaults name unknown loop config fields {unknown}")
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"project {self.name}: task option names must be unique, got {names}")
        object.__setattr__(self, "options", tuple(self.options))
        for option in self.options:  # a declared default must be a value the option accepts
            if option.default is not None:
                option.parse(option.default)

    def info(self) -> ProjectInfo:
        return ProjectInfo(dict(self.defaults), self.multi_step, self.needs_task_llm,
                           self.uses_executor)

    def starting_for(self, config: LoopConfig) -> StartingArtifact:
        """The starting artifact ``config.init`` names, for ``config.task``."""
        starting = self.starting_artifacts.get(config.init)
        usable = [name for name, s in self.starting_artifacts.items()
                  if s.tasks is None or config.task in s.tasks]
        if starting is None:
            raise ConfigError(f"init: unknown starting artifact {config.init!r} for project "
                              f"{self.name}; choose one of {', '.join(usable)}")
        if starting.tasks is not None and config.task not in starting.tasks:
            raise ConfigError(f"init: {config.init} is a starting artifact of "
                              f"{', '.join(starting.tasks)}, not of {config.task}; choose one of "
                              f"{', '.join(usable)}")
        return starting

    def parse_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every declared option, typed: the given value, else the default. Unknown names and
        bad values are one-line :class:`ConfigError`\\ s."""
        declared = {o.name: o for o in self.options}
        values = {name: value for name, value in dict(given).items() if not _is_unset(value)}
        unknown = sorted(set(values) - set(declared))
        if unknown:
            known = ", ".join(declared) or "none"
            raise ConfigError(f"task_options.{unknown[0]}: unknown option for {self.name}; known: {known}")
        return {name: option.parse(values[name]) if name in values else option.default
                for name, option in declared.items()}

    def setup(self, config: LoopConfig, task_llm: LLM | None = None,
              executor: Executor | None = None) -> TaskSetup:
        """Resolve and validate everything generic about ``config`` (before any task is built).
        ``executor``: the one made from ``config.executor`` (default: a local one; a caller that
        runs on a cluster makes, passes and closes it, as :func:`~mlflow_genopt.build.build_loop`
        does)."""
        if config.project != self.name:
            raise ConfigError(f"project: config is for {config.project!r}, not {self.name!r}")
        if executor is not None and executor.spec != "local" and not self.uses_executor:
            raise ConfigError(f"executor: project {self.name} runs its evaluations in this "
                              f"process, so it must be local, got {executor.spec!r}")
        return TaskSetup(config, self.parse_options(config.task_options), self.starting_for(config),
                         task_llm if self.needs_task_llm else None,
                         executor if executor is not None else LocalExecutor())

    def build_task(self, config: LoopConfig, task_llm: LLM | None = None,
                   executor: Executor | None = None) -> Task:
        """The task of ``config``: :meth:`setup`, then the project's ``make_task``."""
        return self.make_task(self.setup(config, task_llm, executor))

    def config(self, **overrides: Any) -> LoopConfig:
        return LoopConfig.from_dict({"project": self.name, **overrides})


def task_project(task: Task, starting: StartingArtifact | Mapping[str, str], *, name: str,
                 init: str = "default") -> Project:
    """A :class:`Project` around a :class:`Task` object a user hands to the loop directly
    (``run_loop(config, task=..., starting=...)``): no options, no registry entry."""
    if not isinstance(starting, StartingArtifact):
        starting = StartingArtifact(init, "the starting values given with the task", task.spec,
                                    dict(starting))
    return Project(name=name, description=getattr(task, "objective", ""),
                   starting_artifacts={init: starting}, make_task=lambda setup: task,
                   multi_step=bool(getattr(task, "multi_step", False)))


@functools.lru_cache(maxsize=1)
def available_projects() -> dict[str, metadata.EntryPoint]:
    """The registered projects by name (read once per process)."""
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


@functools.lru_cache(maxsize=None)
def load_project(name: str) -> Project:
    """The registered project called ``name``; a one-line ConfigError lists the known ones."""
    entry_points = available_projects()
    if name not in entry_points:
        known = ", ".join(sorted(entry_points)) or "none installed"
        raise ConfigError(f"project: unknown project {name!r}; available: {known}")
    project = entry_points[name].load()
    if not isinstance(project, Project):
        raise ConfigError(f"project: entry point {name!r} ({entry_points[name].value}) is a "
                          f"{type(project).__name__}, not a mlflow_genopt.project.Project")
    return project


def registered_project_info(name: str) -> ProjectInfo | None:
    """:class:`ProjectInfo` of a registered project, ``None`` for any other name (a task object
    handed to the loop directly, a test's toy project)."""
    if name not in available_projects():
        return None
    return load_project(name).info()


__all__ = ["ENTRY_POINT_GROUP", "Project", "StartingArtifact", "TaskOption", "TaskSetup",
           "available_projects", "load_project", "registered_project_info", "task_project"]
