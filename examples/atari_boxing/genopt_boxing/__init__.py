"""Boxing (Activision, 1981) as an Atari game plug-in of mlflow-genopt's ``atari`` project.

Three things make a game: an extractor from console RAM to objects, a :class:`GameSpec` (the
ROM that ``ale-py`` ships, the action meanings, the object categories and a description the
optimizer reads), and a starting policy. ``pyproject.toml`` registers :data:`GAME` under the
entry-point group ``genopt_projects.atari_games``; after ``pip install -e examples/atari_boxing``
``genopt run atari --task Boxing`` plays it, with the starting artifacts ``Boxing.single``
(:data:`STARTING_POLICY`, trainable) and ``Boxing.modular`` (:data:`PLANNER`), and the generic
``single``/``modular`` ones.

RAM layout (checked against rendered frames by ``tests/test_atari_plugin.py``): the white boxer
(you) at x ``ram[32]``, y ``ram[34]``, the black boxer at x ``ram[33]``, y ``ram[35]``
(screen offsets +5/+3 and +38); the scores are BCD in ``ram[18]`` (you) and ``ram[19]``
(the reward is the change of their difference, checked too); the clock is minutes in the high
nibble of ``ram[16]`` and BCD seconds in ``ram[17]``.
"""

from __future__ import annotations

from typing import Any, Sequence

from genopt_projects.atari.games import Category, GameSpec, Planner, obj

BOXER_W, BOXER_H = 14, 46  # the body without a stretched arm


def _bcd(byte: int) -> int:
    return (byte >> 4) * 10 + (byte & 0x0F)


def extract(ram: Sequence[int], screen: Any = None) -> dict:
    """Objects of one Boxing frame (called on every agent step: keep it cheap)."""
    return {
        "player": obj(ram[32] + 5, ram[34] + 38, BOXER_W, BOXER_H),
        "enemy": obj(ram[33] + 3, ram[35] + 38, BOXER_W, BOXER_H),
        "player_score": _bcd(ram[18]),
        "enemy_score": _bcd(ram[19]),
        "time_left_s": (ram[16] >> 4) * 60 + _bcd(ram[17]),
    }


PLANNER = Planner(
    "plan_attack",
    "Decide where your boxer should stand to land punches: a dict like {'x': ..., 'y': ...} "
    "(level with the opponent, a fist's length away: punches reach about 28 pixels), or None "
    "to back off.",
    'enemy = obs["enemy"]\n    return {"x": enemy["x"] - 28, "y": enemy["y"]}',
    "target: what plan_attack(obs) returned (a dict with x and y, or None)",
)

STARTING_POLICY = '''def select_action(obs):
    """Return the action (an int in 0..17) for this step of Boxing.

    You are the white boxer (obs["player"]); the black one is obs["enemy"]. A punch (FIRE) lands
    when the opponent is level with you (similar y) and close in x; +1 per landed punch, -1 per
    punch taken, 100 points knock out. Actions: 0 NOOP, 1 FIRE, 2 UP, 3 RIGHT, 4 LEFT, 5 DOWN,
    6 UPRIGHT, 7 UPLEFT, 8 DOWNRIGHT, 9 DOWNLEFT, 10-17 the same moves with FIRE. Objects have
    x, y (top-left, pixels), w, h, dx, dy; obs["time_left_s"] counts down from 120.
    """
    me, enemy = obs["player"], obs["enemy"]
    dx, dy = enemy["x"] - me["x"], enemy["y"] - me["y"]
    if abs(dy) < 6 and abs(dx) < 32:
        return 1  # level and close: punch
    if dy < -3:
        return 2  # the opponent is above: move up
    if dy > 3:
        return 5  # below: move down
    return 3 if dx > 0 else 4  # level but far: step towards them
'''

GAME = GameSpec(
    name="Boxing",
    rom="boxing",
    env_id="ALE/Boxing-v5",
    description=(
        "Box against the computer in a ring seen from above for two minutes. You are the white "
        "boxer. FIRE throws a punch; it lands when the opponent is level with you and within "
        "reach (+1 for a long jab, +2 for a close power punch); punches you take count against "
        "you. The return is your score minus the opponent's; 100 points is a knockout and ends "
        "the bout."
    ),
    action_meanings=(
        "NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "DOWNRIGHT", "DOWNLEFT",
        "UPFIRE", "RIGHTFIRE", "LEFTFIRE", "DOWNFIRE", "UPRIGHTFIRE", "UPLEFTFIRE", "DOWNRIGHTFIRE",
        "DOWNLEFTFIRE",
    ),
    categories=(
        Category("player", "one", "your boxer (white)"),
        Category("enemy", "one", "the opponent (black)"),
        Category("player_score", "value", "punches you landed (points)"),
        Category("enemy_score", "value", "the opponent's points"),
        Category("time_left_s", "value", "seconds left in the bout (120 at the start)"),
    ),
    extract=extract,
    planner=PLANNER,
    starting_policy=STARTING_POLICY,
    notes="RAM layout from AtariARI's annotations, checked against rendered frames.",
)

__all__ = ["GAME", "PLANNER", "STARTING_POLICY", "extract"]
