"""Case-study projects: what a project offers the loop, and how projects are found.

A project bundles a task factory and its starting artifacts. Projects register under the entry
point group ``mlflow_genopt.projects`` (see ``pyproject.toml``), so a third-party package can add
one without touching this library; the core never imports a case study by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Mapping, Protocol

from .artifact import ArtifactSpec
from .config import ConfigError, LoopConfig
from .llm.base import LLM
from .task import Task

ENTRY_POINT_GROUP = "mlflow_genopt.projects"


@dataclass(frozen=True)
class StartingArtifact:
    """A named starting point: the parameters (which are trainable) and their initial values."""

    name: str
    description: str
    spec: ArtifactSpec
    values: Mapping[str, str]

    def __post_init__(self) -> None:
        if set(self.values) != set(self.spec.names):
            raise ValueError(f"starting artifact {self.name}: values must match parameters")


class Project(Protocol):
    """What a case study provides.

    ``make_task(config, task_llm)`` builds the task for ``config.task`` (raising
    :class:`ConfigError` with the accepted task names for an unknown one). ``task_llm`` is the
    LLM the task may call (prompt optimization), already wrapped for tracking and caching;
    tasks that do not call an LLM ignore it. ``defaults`` are the project's LoopConfig defaults.
    """

    name: str
    description: str
    starting_artifacts: Mapping[str, StartingArtifact]
    defaults: Mapping[str, Any]

    def make_task(self, config: LoopConfig, task_llm: LLM | None) -> Task: ...


@dataclass(frozen=True)
class SimpleProject:
    """A :class:`Project` assembled from plain values; most case studies need nothing more."""

    name: str
    description: str
    starting_artifacts: Mapping[str, StartingArtifact]
    task_factory: Callable[[LoopConfig, LLM | None], Task]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    uses_task_llm: bool = True
    # The design choices worth searching for this case study, in the plain search-space form of
    # mlflow_genopt.study (``{"batch_size": [1, 3, 5], "memory_size": {"low": 0, "high": 6}}``);
    # `genopt study PROJECT` searches it unless a --space file or --param flags say otherwise.
    search_space: Mapping[str, Any] = field(default_factory=dict)
    # Task-specific starting artifacts (e.g. a game's own policy functions): returns the one for
    # ``config`` or None to fall back to ``starting_artifacts[config.init]``.
    starting_factory: Callable[[LoopConfig], StartingArtifact | None] | None = None

    def make_task(self, config: LoopConfig, task_llm: LLM | None) -> Task:
        return self.task_factory(config, task_llm)

    def starting_artifact(self, init: str) -> StartingArtifact:
        try:
            return self.starting_artifacts[init]
        except KeyError:
            raise ConfigError(
                f"init: unknown starting artifact {init!r} for project {self.name}; "
                f"choose one of {', '.join(self.starting_artifacts)}"
            ) from None

    def starting_for(self, config: LoopConfig) -> StartingArtifact:
        """The starting artifact a loop with ``config`` begins from."""
        if self.starting_factory is not None:
            found = self.starting_factory(config)
            if found is not None:
                return found
        return self.starting_artifact(config.init)

    def config(self, **overrides: Any) -> LoopConfig:
        return LoopConfig.from_dict({"project": self.name, **self.defaults, **overrides})


def available_projects() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load_project(name: str) -> SimpleProject:
    """The registered project called ``name``; a one-line ConfigError lists the known ones."""
    entry_points = available_projects()
    if name not in entry_points:
        known = ", ".join(sorted(entry_points)) or "none installed"
        raise ConfigError(f"project: unknown project {name!r}; available: {known}")
    return entry_points[name].load()
