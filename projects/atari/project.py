"""The ``atari`` project: eight games, policy programs, and the study's loop defaults.

Defaults follow the reference study's Atari setup: 30 optimization steps, a memory of 5
versions, every valid proposal adopted (``acceptance=always``), a revert to the best version
when the validation score stays below 0.8 x best for more than 5 steps, one rollout per update
(``batch_size=1``) and a credit horizon of 100 steps. ``--credit-horizon 1`` is the other end
of the study's comparison; ``--update-every`` decouples how many steps pass between updates
from how many the optimizer sees.
"""

from __future__ import annotations

from mlflow_genopt.config import ConfigError
from mlflow_genopt.project import Project

from .games import GamePluginError
from .task import OPTIONS, make_task, starting_artifacts

DEFAULTS = {
    "task": "Pong",
    "init": "single",
    "steps": 30,
    "memory_size": 5,
    "revert_ratio": 0.8,
    "revert_patience": 5,
    "acceptance": "always",
    "credit_horizon": 100,
    "batch_size": 1,
    "optimizer_max_tokens": 2048,
}

try:  # includes the starting policies of plug-in games (entry-point group genopt_projects.atari_games)
    _STARTING = starting_artifacts()
except GamePluginError as exc:
    raise ConfigError(str(exc)) from None


PROJECT = Project(
    name="atari",
    description="Atari games (--task Pong, Breakout, SpaceInvaders, Asterix, Enduro, Freeway, Qbert, "
                "Seaquest, and plug-in games): policy programs; credit horizon and update frequency",
    starting_artifacts=_STARTING,
    make_task=make_task,
    defaults=DEFAULTS,
    options=OPTIONS,
    multi_step=True,
    uses_executor=True,  # on a cluster, batches of episodes per unit
    # The study's Atari comparison: a one-step against a 100-step credit horizon.
    search_space={"credit_horizon": [1, 100]},
)

__all__ = ["DEFAULTS", "PROJECT"]
