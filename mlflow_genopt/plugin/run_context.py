"""``mlflow.run_context_provider`` entry point: ``genopt.*`` tags on runs genopt is part of.

MLflow asks every registered provider, each time a run is created through ``mlflow.start_run``
(and genopt's own tracker asks the same registry), whether it is "in context" and, if so, for
tags. This provider is in context when

* a learning loop is active (see :mod:`mlflow_genopt.plugin.active`: ``run_loop`` marks its
  loop; ``with loop_context(config):`` marks user code). The run then gets ``genopt.project``,
  ``genopt.task``, ``genopt.init`` (the starting artifact), ``genopt.config_hash`` and
  ``genopt.library_version``; or
* the process uses genopt's MLflow tracking (``mlflow_genopt.tracking`` is imported): the run
  gets ``genopt.library_version`` only, so that e.g. a notebook's own runs next to genopt loops
  say which genopt version was around.

Explicit tags win: MLflow applies the tags a caller passes after the providers' tags, and
genopt's tracker sets the same keys itself. Both methods are a few dict lookups.
"""

from __future__ import annotations

import importlib.metadata
import sys

from mlflow.tracking.context.abstract_context import RunContextProvider

from .active import active_config

__all__ = ["GenoptRunContext", "library_version"]


def _version() -> str:
    try:
        return importlib.metadata.version("mlflow-genopt")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


_VERSION = _version()


def library_version() -> str:
    """The installed mlflow-genopt version (``dev`` when running from an uninstalled tree)."""
    return _VERSION


class GenoptRunContext(RunContextProvider):
    """Tags for runs started while genopt is in use (see the module docstring)."""

    def in_context(self) -> bool:
        return active_config() is not None or "mlflow_genopt.tracking" in sys.modules

    def tags(self) -> dict[str, str]:
        tags = {"genopt.library_version": _VERSION}
        config = active_config()
        if config is not None:
            tags.update({
                "genopt.project": str(config.project),
                # as the tracker names it: every project's task is "<project>/<task>"
                "genopt.task": f"{config.project}/{config.task}",
                "genopt.init": str(config.init),
                "genopt.config_hash": config.config_hash(),
            })
        return tags
