"""Starting policy programs for the games: what the optimizer edits and where it starts.

A policy program is a few Python functions; the rollout worker calls its entry function
``act(obs) -> int`` once per agent step (see :mod:`genopt_projects.atari.policy_runner`).
Every game has two starting artifacts (``STARTING_POLICIES[game]`` for the shipped eight,
:func:`starting_policy` for plug-in games too, whose ``GameSpec.planner`` and
``GameSpec.starting_policy`` shape them; and for the project
``--init <Game>.single`` / ``--init <Game>.modular``):

* ``"single"``: one trainable function ``select_action(obs)``, whose docstring explains the game,
  the actions and the observation; it starts by picking a random action. ``act`` calls it.
* ``"modular"``: a trainable *analysis* function (Pong: ``predict_ball_trajectory(obs)``, the
  reference study's decomposition; other games: a game-specific planner such as
  ``choose_lane(obs)``) that starts as a stub, and a trainable ``select_action(<plan>, obs)``
  that starts random. A frozen ``act(obs)`` wires them together.

Two more, ``GENERIC_POLICIES`` (``--init single`` / ``--init modular``), have the same parameter
names and texts for every game, so that one starting artifact serves whichever game ``--task``
picks: their docstrings point to the task objective, which describes the game, and the modular
one names its analysis function ``analyze(obs)``. (The project API keys starting artifacts by
name alone, so a game-specific artifact needs a game-qualified name.)

``program(values, game)`` joins a header (``import math, random`` and the game's ``N_ACTIONS``
and ``ACTION_NAMES``), the parameter values and the frozen entry into the source the runner
executes; ``artifact_spec()`` gives the matching :class:`~mlflow_genopt.artifact.ArtifactSpec`
(the entry is a frozen parameter, so the optimizer sees how its functions are called).
"""

from __future__ import annotations

import functools
import textwrap
from dataclasses import dataclass
from typing import Mapping

from .games import GAMES, GameSpec, Planner, get_game, plugin_games

ENTRY = "act"
HEADER = "import math\nimport random\n"
VARIANTS = ("single", "modular")
ANY_GAME = "*"  # the game of a generic starting policy
# Longest value the optimizer may propose for one function. Generic policies keep the game out of
# their text, so most of their budget is logic; game-specific ones repeat the game description
# in their docstrings. (Limits above mlflow_genopt.optimizer.SCHEMA_MAX_LENGTH are validated
# after the answer but not put in its JSON schema, which llama.cpp could not compile.)
MAX_CHARS_GENERIC = 2000
MAX_CHARS_GAME = 4000


def program_header(game: str | GameSpec) -> str:
    """What every policy program starts with: the imports and the game's action constants."""
    spec = get_game(game)
    return HEADER + f"N_ACTIONS = {spec.n_actions}\nACTION_NAMES = {spec.action_meanings!r}\n"


@dataclass(frozen=True)
class PolicyFunction:
    name: str
    source: str
    description: str
    trainable: bool = True


@dataclass(frozen=True)
class StartingPolicy:
    """One starting artifact of one game: its functions (in program order) and which are
    trainable. The runner's entry function is ``act``."""

    game: str
    variant: str
    description: str
    functions: tuple[PolicyFunction, ...]
    entry: str = ENTRY

    @property
    def values(self) -> dict[str, str]:
        return {f.name: f.source for f in self.functions}

    @property
    def init_name(self) -> str:
        """The project's name for this starting artifact (``single``, ``Pong.modular``...)."""
        return self.variant if self.game == ANY_GAME else f"{self.game}.{self.variant}"

    def program(self, values: Mapping[str, str] | None = None, game: str | None = None) -> str:
        """The full policy source: header, then each function (``values`` override the starting
        sources by name). ``game`` is required for a generic policy (it sets the header)."""
        values = {**self.values, **(values or {})}
        unknown = sorted(set(values) - {f.name for f in self.functions})
        if unknown:
            raise ValueError(f"{self.game}/{self.variant}: unknown function(s) {unknown}; "
                             f"this policy has {[f.name for f in self.functions]}")
        game = game or self.game
        if game == ANY_GAME:
            raise ValueError(f"the generic {self.variant!r} policy needs game= to build a program")
        return program_header(game) + "\n\n" + "\n\n".join(values[f.name].strip() + "\n" for f in self.functions)

    def artifact_spec(self):
        """The :class:`~mlflow_genopt.artifact.ArtifactSpec` of this starting artifact."""
        from mlflow_genopt.artifact import ArtifactSpec, Parameter

        limit = MAX_CHARS_GENERIC if self.game == ANY_GAME else MAX_CHARS_GAME
        return ArtifactSpec(tuple(
            Parameter(name=f.name, kind="code", description=f.description, trainable=f.trainable,
                      max_chars=limit)
            for f in self.functions
        ))


def _doc(spec: GameSpec) -> str:
    lines = []
    for line in spec.describe().splitlines():
        indent = " " * (len(line) - len(line.lstrip()))
        lines.extend(textwrap.wrap(line, 92, initial_indent="    ", subsequent_indent="    " + indent + "  ")
                     if len(line) > 92 else ["    " + line])
    return "\n".join(lines)


def _random_select(spec: GameSpec, signature: str, plan_doc: str = "") -> str:
    return (
        f"def select_action({signature}):\n"
        f'    """Return the action (an int in 0..{spec.n_actions - 1}) for this step.\n\n'
        f"{_doc(spec)}\n"
        f"{plan_doc}"
        f'    """\n'
        f"    return random.randrange({spec.n_actions})\n"
    )


# Per game: the analysis function of the modular variant: (name, docstring, stub body, plan doc)
_PLANNERS: dict[str, tuple[str, str, str, str]] = {
    "Pong": (
        "predict_ball_trajectory",
        "Predict the y coordinate at which the ball will reach your paddle (x=140), or None when "
        "there is no ball. Use the ball's position and velocity (dx, dy); it bounces off the top "
        "and bottom walls (y=34 and y=194).",
        'ball = obs["ball"]\n    return None if ball is None else ball["y"]',
        "predicted_ball_y: what predict_ball_trajectory(obs) returned (a y coordinate or None)",
    ),
    "Breakout": (
        "predict_ball_landing",
        "Predict the x coordinate at which the ball will come down to the paddle's height (y=189), "
        "or None when there is no ball. The ball bounces off the side walls (x=8 and x=152).",
        'ball = obs["ball"]\n    return None if ball is None else ball["x"]',
        "predicted_x: what predict_ball_landing(obs) returned (an x coordinate or None)",
    ),
    "SpaceInvaders": (
        "choose_target",
        "Choose the x coordinate the cannon should move to (e.g. under an alien to shoot, away from "
        "falling bombs), or None to stay.",
        "return None",
        "target_x: what choose_target(obs) returned (an x coordinate or None)",
    ),
    "Asterix": (
        "choose_lane",
        "Choose the lane (0 = top .. 7 = bottom) Asterix should move to, e.g. towards a reward and "
        "away from lyres, or None to stay.",
        "return None",
        "target_lane: what choose_lane(obs) returned (a lane or None)",
    ),
    "Enduro": (
        "choose_target_x",
        "Choose the x coordinate the car should steer to in order to pass the cars ahead without "
        "hitting them, or None to keep the current line.",
        "return None",
        "target_x: what choose_target_x(obs) returned (an x coordinate or None)",
    ),
    "Freeway": (
        "assess_danger",
        "Decide whether moving up now is safe: return True when a car in the next lane up would hit "
        "the chicken, False otherwise.",
        "return False",
        "danger: what assess_danger(obs) returned (True when moving up is dangerous)",
    ),
    "Qbert": (
        "choose_next_cube",
        "Choose the cube (a (row, col) pair) Qbert should hop to next: a neighbour on the pyramid "
        "whose top does not have the target colour yet and that no enemy is about to reach; or "
        "None.",
        "return None",
        "target_cube: what choose_next_cube(obs) returned (a (row, col) pair or None)",
    ),
    "Seaquest": (
        "choose_goal",
        "Choose where the submarine should go: a dict like {'x': ..., 'y': ...} (e.g. towards a "
        "diver, away from sharks, up to the surface when oxygen is low), or None.",
        "return None",
        "goal: what choose_goal(obs) returned (a dict with x and y, or None)",
    ),
}


_DEFAULT_PLANNER = Planner(
    "analyze", "Work out what select_action needs from this observation (where a moving object "
    "will be, which target to go for, which danger to avoid); return any value, or None.")


def _planner(spec: GameSpec) -> tuple[str, str, str, str]:
    """(name, docstring, stub body, plan doc) of the game's analysis function: the spec's own
    (plug-ins), the shipped table's, else a generic ``analyze``."""
    planner = spec.planner or (None if spec.name in _PLANNERS else _DEFAULT_PLANNER)
    if planner is None:
        return _PLANNERS[spec.name]
    return planner.name, planner.description, planner.stub, planner.plan_doc


def _build(spec: GameSpec) -> dict[str, StartingPolicy]:
    select_single = PolicyFunction(
        "select_action", spec.starting_policy or _random_select(spec, "obs"),
        f"{spec.name} policy: maps one observation (a dict of objects) to an action index.")
    single = StartingPolicy(
        spec.name, "single", "One trainable select_action(obs), starting as "
        + ("the game's own starting policy." if spec.starting_policy else "a random policy."),
        (select_single,
         PolicyFunction(ENTRY, f"def {ENTRY}(obs):\n    return select_action(obs)\n",
                        "Entry point called once per step (frozen).", trainable=False)))
    planner, planner_doc, stub, plan_doc = _planner(spec)
    plan_arg = plan_doc.split(":")[0]
    analysis = PolicyFunction(
        planner,
        f"def {planner}(obs):\n"
        f'    """{textwrap.fill(planner_doc, 92, subsequent_indent="    ")}\n\n'
        f'    obs: the observation dict (see select_action\'s docstring).\n    """\n'
        f"    {stub}\n",
        planner_doc)
    select_modular = PolicyFunction(
        "select_action", _random_select(spec, f"{plan_arg}, obs", f"\n    {plan_doc}\n"),
        f"{spec.name} policy: maps the analysis result and the observation to an action index.")
    modular = StartingPolicy(
        spec.name, "modular",
        f"Trainable {planner}(obs) (a stub) and select_action({plan_arg}, obs) (random).",
        (analysis, select_modular,
         PolicyFunction(ENTRY, f"def {ENTRY}(obs):\n    return select_action({planner}(obs), obs)\n",
                        "Entry point called once per step (frozen).", trainable=False)))
    return {"single": single, "modular": modular}


STARTING_POLICIES: dict[str, dict[str, StartingPolicy]] = {name: _build(spec) for name, spec in GAMES.items()}

_GENERIC_OBS = (
    "    obs: a dict of the game's objects; the objective describes the game, its actions and\n"
    "    every observation key. N_ACTIONS and ACTION_NAMES (action index -> name) are defined by\n"
    "    the program; math and random are imported.\n"
)
_GENERIC_ANALYZE = (
    "def analyze(obs):\n"
    '    """Work out what select_action needs from this observation: e.g. where a moving object\n'
    "    will be, which target to go for, which danger to avoid. Return any value (a number, a\n"
    "    dict, None); the objective suggests what is useful in this game.\n\n"
    f"{_GENERIC_OBS}"
    '    """\n'
    "    return None\n"
)


def _generic_select(signature: str, plan_doc: str = "") -> str:
    return (
        f"def select_action({signature}):\n"
        '    """Return the action for this step: an int in range(N_ACTIONS).\n\n'
        f"{plan_doc}{_GENERIC_OBS}"
        '    """\n'
        "    return random.randrange(N_ACTIONS)\n"
    )


GENERIC_POLICIES: dict[str, StartingPolicy] = {
    "single": StartingPolicy(
        ANY_GAME, "single",
        "One trainable select_action(obs), starting random; the same text for every game "
        "(the objective describes the game).",
        (PolicyFunction("select_action", _generic_select("obs"),
                        "Policy: maps one observation (a dict of objects) to an action index."),
         PolicyFunction(ENTRY, f"def {ENTRY}(obs):\n    return select_action(obs)\n",
                        "Entry point called once per step (frozen).", trainable=False))),
    "modular": StartingPolicy(
        ANY_GAME, "modular",
        "Trainable analyze(obs) (a stub) and select_action(plan, obs) (random); the same text "
        "for every game (the objective suggests what analyze should compute).",
        (PolicyFunction("analyze", _GENERIC_ANALYZE,
                        "Analysis: extracts what the decision needs (a prediction, a target) from "
                        "the observation."),
         PolicyFunction("select_action",
                        _generic_select("plan, obs", "    plan: what analyze(obs) returned.\n"),
                        "Policy: maps the analysis result and the observation to an action index."),
         PolicyFunction(ENTRY, f"def {ENTRY}(obs):\n    return select_action(analyze(obs), obs)\n",
                        "Entry point called once per step (frozen).", trainable=False))),
}


@functools.lru_cache(maxsize=None)
def _plugin_policies(name: str) -> dict[str, StartingPolicy]:
    return _build(plugin_games()[name])


def planner_hint(game: str) -> str:
    """What the game-specific modular policy's analysis function computes (a suggestion for the
    generic ``analyze``)."""
    name, doc, _, _ = _planner(get_game(game))
    return f"{doc} (In the {get_game(game).name}-specific starting artifact it is called {name}.)"


def all_starting_policies() -> dict[str, StartingPolicy]:
    """Every starting policy by its project name: ``single``, ``modular``, then
    ``<Game>.single`` and ``<Game>.modular`` for each game."""
    policies = dict(GENERIC_POLICIES)
    for variants in (*STARTING_POLICIES.values(), *map(_plugin_policies, plugin_games())):
        for policy in variants.values():
            policies[policy.init_name] = policy
    return policies


def starting_policy(game: str, variant: str = "single") -> StartingPolicy:
    """The starting artifact ``variant`` (``"single"`` or ``"modular"``) of ``game``."""
    spec = get_game(game)
    try:
        return (STARTING_POLICIES.get(spec.name) or _plugin_policies(spec.name))[variant]
    except KeyError:
        raise ValueError(f"unknown variant {variant!r} for {spec.name}; known: {list(VARIANTS)}") from None


__all__ = ["ENTRY", "GENERIC_POLICIES", "STARTING_POLICIES", "StartingPolicy", "PolicyFunction",
           "all_starting_policies", "planner_hint", "program_header", "starting_policy"]
