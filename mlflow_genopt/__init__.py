"""mlflow-genopt: LLM-based generative optimization with every design choice explicit.

The core (artifact, task, config, optimizer, loop) imports neither MLflow nor Optuna; tracking
and studies listen to the loop's events. :func:`run_loop` (in :mod:`mlflow_genopt.build`, the
one composition root) runs a loop; :func:`run_study` (in :mod:`mlflow_genopt.study`, loaded on
first use because it imports Optuna) searches loop configs.
"""

from .artifact import ArtifactSpec, ArtifactVersion, Parameter, diff
from .build import build_loop, resolve_config, resume_loop, run_loop
from .checker import TaskCheck, check_task
from .config import ConfigError, LoopConfig
from .events import LoopCallback, LoopResult, StepRecord, StopLoop, VersionRecord
from .loop import LearningLoop
from .optimizer import InvalidProposal, Optimizer
from .project import Project, StartingArtifact, TaskOption, TaskSetup
from .task import EvalContext, Example, Task, TraceStep, Trial

try:
    from importlib.metadata import version as _version

    __version__ = _version("mlflow-genopt")
except Exception:  # running from a source tree that is not installed
    __version__ = "0.0.0.dev"


def __getattr__(name: str):
    # run_study is the study package's own function (its signature is the real one); it is
    # imported on first access so that `import mlflow_genopt` (done by MLflow's run context
    # provider on every `import mlflow`) does not import Optuna.
    if name == "run_study":
        from .study import run_study

        return run_study
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ArtifactSpec", "ArtifactVersion", "ConfigError", "EvalContext", "Example", "InvalidProposal",
    "LearningLoop", "LoopCallback", "LoopConfig", "LoopResult", "Optimizer", "Parameter",
    "Project", "StartingArtifact", "StepRecord", "StopLoop", "Task", "TaskCheck", "TaskOption",
    "TaskSetup", "TraceStep", "Trial", "VersionRecord", "build_loop", "check_task", "diff",
    "resolve_config", "resume_loop", "run_loop", "run_study",
]
