"""mlflow-genopt: LLM-based generative optimization with every design choice explicit.

The core (artifact, task, config, optimizer, loop) imports neither MLflow nor Optuna; tracking
and studies listen to the loop's events.
"""

from .artifact import ArtifactSpec, ArtifactVersion, Parameter, diff
from .config import ConfigError, LoopConfig
from .events import LoopCallback, LoopResult, StepRecord, StopLoop, VersionRecord
from .loop import LearningLoop
from .optimizer import InvalidProposal, Optimizer
from .task import Example, Task, TraceStep, Trial

try:
    from importlib.metadata import version as _version

    __version__ = _version("mlflow-genopt")
except Exception:  # running from a source tree that is not installed
    __version__ = "0.0.0.dev"


def run_loop(*args, **kwargs):
    """Run one learning loop; see :func:`mlflow_genopt.runner.run_loop`."""
    from .runner import run_loop as _run_loop

    return _run_loop(*args, **kwargs)


def run_study(*args, **kwargs):
    """Run an Optuna study over loop configs; see :func:`mlflow_genopt.study.run_study`."""
    from .study import run_study as _run_study

    return _run_study(*args, **kwargs)


__all__ = [
    "ArtifactSpec", "ArtifactVersion", "ConfigError", "Example", "InvalidProposal",
    "LearningLoop", "LoopCallback", "LoopConfig", "LoopResult", "Optimizer", "Parameter",
    "StepRecord", "StopLoop", "Task", "TraceStep", "Trial", "VersionRecord", "diff", "run_loop",
    "run_study",
]
