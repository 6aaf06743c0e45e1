"""``mlflow.run_context_provider`` entry point: ``genopt.*`` tags on runs genopt is part of.

MLflow asks every registered provider, each time a run is created through ``mlflow.start_run``
(and genopt's own tracker asks the same registry), whether it is "in context" and, if so, for
tags. This provider is in context when

* a learning loop is active (see :mod:`mlflow_genopt.plugin.active`: ``run_loop`` marks its
  loop; ``with loop_context(config):`` marks user code). The run then gets ``genopt.project``,
  ``genopt.task``, ``genopt.init`` (the starting artifact), ``genopt.config_hash`` and
  ``genopt.library_version``; or
* the process uses genopt's MLflow tracking (anything of :mod:`mlflow_genopt.tracking` that talks
  to MLflow is imported; its :mod:`~mlflow_genopt.tracking.layout`, which this module reads,
  does not count): the run gets ``genopt.library_version`` only, so that e.g. a notebook's own
  runs next to genopt loops say which genopt version was around.

Explicit tags win: MLflow applies the tags a caller passes after the providers' tags, and
genopt's tracker sets the same keys itself. Both methods are a few dict lookups.
"""

from __future__ import annotations

import sys

from mlflow.tracking.context.abstract_context import RunContextProvider

from ..tracking import layout
from ..tracking.layout import library_version
from .active import active_config

__all__ = ["GenoptRunContext", "library_version"]

# Every tracking module that talks to MLflow (the tracker, the resume readers, the study-run
# helpers, the URI checks) imports this one; the layout alone does not.
_TRACKING_IN_USE = "mlflow_genopt.tracking.store"


class GenoptRunContext(RunContextProvider):
    """Tags for runs started while genopt is in use (see the module docstring)."""

    def in_context(self) -> bool:
        return active_config() is not None or _TRACKING_IN_USE in sys.modules

    def tags(self) -> dict[str, str]:
        tags = {layout.TAG_LIBRARY_VERSION: library_version()}
        config = active_config()
        if config is not None:
            tags.update({
                layout.TAG_PROJECT: str(config.project),
                # as the tracker names it: every project's task is "<project>/<task>"
                layout.TAG_TASK: f"{config.project}/{config.task}",
                layout.TAG_INIT: str(config.init),
                layout.TAG_CONFIG_HASH: config.config_hash(),
            })
        return tags
