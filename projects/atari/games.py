"""The eight Atari games of the case study, as object-centric observations.

Each game is one :class:`GameSpec` in :data:`GAMES`: which ALE ROM to load, what the game is
about and what its actions mean (text for the optimizer), which object categories an
observation has, and an ``extract`` function that turns the emulator state into those objects.

Observation format
------------------
An observation is a plain ``dict`` keyed by category name (every category of the spec is always
present):

* ``kind="one"``: a single object ``{"x", "y", "w", "h", "dx", "dy", ...}`` or ``None`` when it
  is not on screen (e.g. Pong's ball between points).
* ``kind="many"``: a list of such objects (possibly empty). RAM-based objects have an ``"id"``,
  stable from frame to frame for the same thing (a lane, a brick, an alien's grid slot);
  screen-based ones have none and get ``dx``/``dy`` from the nearest object of the previous
  frame.
* ``kind="value"``: a plain ``int`` (e.g. Seaquest's oxygen).

Coordinates are screen pixels of the 160x210 Atari frame: ``x`` grows to the right, ``y``
downwards, ``(x, y)`` is the top-left corner of the object's box and ``w``/``h`` its size.
``dx``/``dy`` are the change of ``x``/``y`` since the previous observation (one agent step, i.e.
``frameskip`` frames); the wrapper (:class:`~genopt_projects.atari.env.ObjectEnv`) adds them,
extractors never do. Objects may carry extra fields (``"kind"``, ``"lane"``, ``"color"``...).

Where the positions come from
-----------------------------
Extractors read the 128 bytes of console RAM (``source="ram"``), following the layout published
by OCAtari (``ocatari/ram/<game>.py``) where it held, and otherwise a layout found by correlating
RAM bytes with rendered frames and confirmed by writing RAM (``ale.setRAM``) and watching the
frame change. Every RAM mapping below was checked against rendered frames
(``tests/test_atari_objects.py`` re-checks them on real emulator states). Where no RAM layout
could be verified, the category is found in the frame itself (``source="screen"``, palette
indices from ``ale.getScreen()``): Enduro's cars and Qbert's enemies. Objects whose layout could
not be verified either way were left out rather than shipped wrong (see each game's notes).

Adding a game
-------------
1. Write ``_extract_<game>(ram, screen) -> dict`` below. ``ram`` is a sequence of 128 ints (a
   list, for speed); ``screen`` is the ``(210, 160)`` uint8 palette-index frame when the spec
   sets ``needs_screen=True``, else ``None``. Return one entry per category: a dict made with
   :func:`obj` (or ``None``) for ``"one"``, a list of them (each with a stable ``id=`` when
   the RAM gives one) for ``"many"``, an ``int`` for ``"value"``. Keep it cheap: it runs on every agent step.
2. Add one ``GameSpec`` to :data:`GAMES` with the ALE ROM name (``ale_py.roms``), the
   ``env_id``, the minimal action set's meanings in ALE order, the categories and a
   description that tells the optimizer how the game is won.
3. Add the game's colours to ``PIXEL_CHECKS`` in ``tests/test_atari_objects.py`` so that the
   mapping is checked against rendered frames, and a starting policy in ``policies.py``.

Adding a game without touching this file (a plug-in)
----------------------------------------------------
A package of your own registers a :class:`GameSpec` under the entry-point group
:data:`GAME_ENTRY_POINT_GROUP` (``genopt_projects.atari_games``)::

    [project.entry-points."genopt_projects.atari_games"]
    Boxing = "genopt_boxing:GAME"

The spec carries everything a shipped game has: the ROM, the extractor, the categories, the
description, and optionally ``planner`` (the analysis function of ``<Game>.modular``) and
``starting_policy`` (the source of ``select_action(obs)`` that ``<Game>.single`` starts from;
default: a random policy whose docstring describes the game). ``get_game`` and every part of the
case study (``genopt run atari --task Boxing``, the starting artifacts, the rollout workers)
find it next to the shipped eight; :data:`GAMES` stays the shipped eight, :func:`all_games`
has both. The plug-in must be a package (a directory with ``__init__.py``), not a lone module:
rollout workers import it inside the sandbox, which exposes package directories by name.
``examples/atari_boxing`` is a complete one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

CategoryKind = Literal["one", "many", "value"]

SCREEN_HEIGHT, SCREEN_WIDTH = 210, 160


@dataclass(frozen=True)
class Category:
    """One kind of object in an observation (see the module docstring for ``kind``)."""

    name: str
    kind: CategoryKind
    description: str
    source: Literal["ram", "screen"] = "ram"


Extractor = Callable[[Sequence[int], Any], dict]
GAME_ENTRY_POINT_GROUP = "genopt_projects.atari_games"


@dataclass(frozen=True)
class Planner:
    """The analysis function of a game's ``modular`` starting policy: its ``name``, what it
    should compute (``description``, its docstring), the ``stub`` body it starts from, and
    ``plan_doc``, the line of ``select_action``'s docstring that describes its first argument
    (``"<arg>: what <name>(obs) returned ..."``; the text before ``:`` names the argument)."""

    name: str
    description: str
    stub: str = "return None"
    plan_doc: str = "plan: what the analysis function returned"


@dataclass(frozen=True)
class GameSpec:
    """Everything the case study knows about one game.

    ``rom`` is the ``ale_py.roms`` name; ``env_id`` the Gymnasium id of the same game (for
    reference and for users of ``gym.make``); ``action_meanings`` the minimal action set in ALE
    order (action ``i`` of a policy means ``action_meanings[i]``); ``extract`` maps RAM (and the
    palette frame when ``needs_screen``) to the categories' objects, without ``dx``/``dy``.
    """

    name: str
    rom: str
    env_id: str
    description: str
    action_meanings: tuple[str, ...]
    categories: tuple[Category, ...]
    extract: Extractor = field(repr=False)
    needs_screen: bool = False
    notes: str = ""
    planner: Planner | None = None
    starting_policy: str | None = None  # source of select_action(obs) for <Game>.single

    @property
    def n_actions(self) -> int:
        return len(self.action_meanings)

    def category(self, name: str) -> Category:
        for category in self.categories:
            if category.name == name:
                return category
        raise KeyError(f"{self.name} has no category {name!r}; it has {[c.name for c in self.categories]}")

    def describe(self) -> str:
        """The game, its actions and its observation format, as text for the optimizer."""
        actions = ", ".join(f"{i}={name}" for i, name in enumerate(self.action_meanings))
        lines = [f"{self.name}: {self.description}", f"Actions (return an int): {actions}.", "Observation keys:"]
        for category in self.categories:
            shape = {"one": "object or None", "many": "list of objects", "value": "int"}[category.kind]
            lines.append(f"  {category.name!r} ({shape}): {category.description}")
        lines.append(
            "An object is a dict with x, y (top-left corner, pixels; y grows downwards), w, h, and dx, dy "
            "(movement since the previous step); the screen is 160 wide and 210 high."
        )
        return "\n".join(lines)


def obj(x: int, y: int, w: int, h: int, **extra: Any) -> dict:
    """An object dict as extractors return it (the wrapper adds ``dx``/``dy``)."""
    return {"x": x, "y": y, "w": w, "h": h, **extra}


# --------------------------------------------------------------------------------------------
# Pong. OCAtari layout, verified: paddles 4x16, ball 2x4; ram[54] or ram[49] is 0 while the
# ball is out of play.
# --------------------------------------------------------------------------------------------


def _extract_pong(ram: Sequence[int], screen: Any = None) -> dict:
    ball = obj(ram[49] - 49, ram[54] - 14, 2, 4) if ram[54] and ram[49] else None
    return {
        "player": obj(140, ram[51] - 13, 4, 16),
        "enemy": obj(16, ram[50] - 15, 4, 16),
        "ball": ball,
    }


# --------------------------------------------------------------------------------------------
# Breakout. Paddle x ram[72], ball ram[99]/ram[101] (OCAtari), verified. Bricks: 6 rows x 18
# columns in ram[0:36]; byte (group*6 + 5 - row), one bit pair per brick; the column order below
# was found by clearing single bits with ale.setRAM and watching which brick disappears.
# --------------------------------------------------------------------------------------------

# column -> (byte group, lowest bit of its bit pair)
_BRICK_BITS = (
    (5, 6),
    (4, 6), (4, 4), (4, 2), (4, 0),
    (3, 0), (3, 2), (3, 4), (3, 6),
    (2, 4), (2, 6),
    (1, 6), (1, 4), (1, 2), (1, 0),
    (0, 0), (0, 2), (0, 4),
)
_BRICK_ROWS = ("red", "orange", "amber", "yellow", "green", "blue")  # top to bottom
_brick_cache: dict[bytes, list] = {}


def _breakout_bricks(ram: Sequence[int]) -> list:
    key = bytes(ram[0:36])
    bricks = _brick_cache.get(key)
    if bricks is None:
        bricks = []
        for row in range(6):
            for col, (group, bit) in enumerate(_BRICK_BITS):
                if ram[group * 6 + 5 - row] >> bit & 3:
                    bricks.append(obj(8 + 8 * col, 57 + 6 * row, 8, 6, id=row * 18 + col, row=row,
                                      color=_BRICK_ROWS[row]))
        if len(_brick_cache) > 64:
            _brick_cache.clear()
        _brick_cache[key] = bricks
    return [dict(b) for b in bricks]


def _extract_breakout(ram: Sequence[int], screen: Any = None) -> dict:
    ball = obj(ram[99] - 49, ram[101] + 9, 2, 4) if ram[101] and ram[101] < 187 else None
    return {
        "player": obj(ram[72] - 47, 189, 16, 4),
        "ball": ball,
        "bricks": _breakout_bricks(ram),
    }


# --------------------------------------------------------------------------------------------
# Space Invaders. Player x ram[28] (OCAtari). Aliens: 6x6 grid; left edge ram[26], vertical
# offset ram[16] (2 px per unit), row r alive bits in ram[23 - r] (bit c = column c), all found
# by writing RAM. Shots: y in ram[81..82] (enemy bombs) and ram[85] (player laser) at 2 px per
# unit, x in ram[83..84] and ram[87]. With frameskip 4 the game draws bombs on frames the agent
# does not see; the RAM still has them (checked against frameskip-1 frames).
# --------------------------------------------------------------------------------------------


def _space_invaders_shot(y_byte: int, x_byte: int) -> dict | None:
    y = 2 * y_byte + 4
    if not 20 <= y < 190 or not 0 < x_byte < 170:
        return None
    return obj(x_byte - 2, y, 1, 8)


def _extract_space_invaders(ram: Sequence[int], screen: Any = None) -> dict:
    left, top = ram[26] - 1, 31 + 2 * ram[16]
    aliens = []
    for row in range(6):
        alive = ram[23 - row]
        if alive:
            for col in range(6):
                if alive >> col & 1:
                    aliens.append(obj(left + 16 * col, top + 18 * row, 8, 10, id=row * 6 + col, row=row))
    bombs = []
    for slot in range(2):
        shot = _space_invaders_shot(ram[81 + slot], ram[83 + slot])
        if shot is not None:
            shot["id"] = slot
            bombs.append(shot)
    return {
        "player": obj(ram[28] - 1, 185, 7, 10),
        "aliens": aliens,
        "player_laser": _space_invaders_shot(ram[85], ram[87]),
        "enemy_bombs": bombs,
    }


# --------------------------------------------------------------------------------------------
# Asterix. Player x ram[41], y 151 - ram[40]. Eight lanes (y = 26 + 16*lane): object x in
# ram[42 + lane] (+1 on odd lanes), its sprite in ram[18 - lane]: 11 empty, 12 the "50"
# points flash, 204/216 the lyre (enemy, two animation frames), anything else a reward (the
# cauldron, 108, at level 1). Verified at level 1 only: later levels draw other rewards, which
# this classifies as rewards as long as the lyre keeps its sprite (not checked).
# --------------------------------------------------------------------------------------------

_ASTERIX_EMPTY, _ASTERIX_POINTS = 11, 12
_ASTERIX_LYRE = (204, 216)


def _extract_asterix(ram: Sequence[int], screen: Any = None) -> dict:
    enemies, rewards = [], []
    for lane in range(8):
        sprite = ram[18 - lane]
        if sprite == _ASTERIX_EMPTY or sprite == _ASTERIX_POINTS:
            continue
        item = obj(ram[42 + lane] + (lane & 1), 26 + 16 * lane, 8, 11, id=lane, lane=lane)
        (enemies if sprite in _ASTERIX_LYRE else rewards).append(item)
    y = 151 - ram[40]
    return {
        "player": obj(ram[41], y, 8, 11, lane=(y - 26) // 16),
        "enemies": enemies,
        "rewards": rewards,
    }


# --------------------------------------------------------------------------------------------
# Enduro. Screen-based: no RAM layout for the cars' on-screen x could be verified (the player's
# x is kept as a horizontal-motion pair in ram[70] whose decoding depends on more state; enemy
# slots ram[27:34] hold colours per depth band, not positions), so the cars are found in the
# frame: the player's car is the grey (palette 10) 16-pixel-wide body in rows 139-155; other
# cars are clusters of saturated colours on the road (rows 54-155), excluding the grass colour.
# --------------------------------------------------------------------------------------------

_ENDURO_TOP, _ENDURO_BOTTOM = 54, 155
_ENDURO_PLAYER_COLOR = 10


def _mask_indices(region, table: bytes, hide: tuple[int, int, int, int] | None = None):
    """Flat indices of the pixels of ``region`` (palette indices, 160 wide) whose ``table`` byte
    is 1, ignoring the box ``hide`` = (x0, y0, x1, y1); ``bytes.translate`` and ``flatnonzero``
    are ~10x faster than numpy masks and ``nonzero``."""
    import numpy as np

    mask = region.tobytes().translate(table)
    if hide is not None:
        mask = bytearray(mask)
        x0, y0, x1, y1 = max(0, hide[0]), max(0, hide[1]), min(160, hide[2]), min(len(region), hide[3])
        if x1 > x0:
            for row in range(y0, y1):
                mask[row * 160 + x0:row * 160 + x1] = bytes(x1 - x0)
    return np.flatnonzero(np.frombuffer(mask, dtype=np.bool_))


def _palette_table(indices) -> bytes:
    chosen = set(indices)
    return bytes(1 if i in chosen else 0 for i in range(256))


def _clusters(flat, width: int, y_gap: int = 2, x_gap: int = 3, min_pixels: int = 2) -> list[tuple[int, int, int, int]]:
    """Bounding boxes ``(x, y, w, h)`` of groups of pixels given as flat indices (row-major, so
    already sorted by row): split rows at vertical gaps, then columns at horizontal gaps."""
    import numpy as np

    boxes = []
    if len(flat) == 0:
        return boxes
    ys, xs = np.divmod(flat, width)
    row_breaks = np.flatnonzero(np.diff(ys) > y_gap) + 1
    for row_ys, row_xs in zip(np.split(ys, row_breaks), np.split(xs, row_breaks)):
        order = np.argsort(row_xs, kind="stable")
        row_ys, row_xs = row_ys[order], row_xs[order]
        col_breaks = np.flatnonzero(np.diff(row_xs) > x_gap) + 1
        for group_ys, group_xs in zip(np.split(row_ys, col_breaks), np.split(row_xs, col_breaks)):
            if len(group_ys) >= min_pixels:
                x0, y0 = int(group_xs.min()), int(group_ys.min())
                boxes.append((x0, y0, int(group_xs.max()) - x0 + 1, int(group_ys.max()) - y0 + 1))
    return boxes


_SATURATED_EXCEPT: dict[int, bytes] = {}  # grass colour -> table of saturated colours but grass


def _extract_enduro(ram: Sequence[int], screen: Any) -> dict:
    import numpy as np

    body = screen[139:156, 8:] == _ENDURO_PLAYER_COLOR
    # a run of 6 car-coloured pixels in a row: the car body, never the thin road edges
    runs = body[:, :-5] & body[:, 1:-4] & body[:, 2:-3] & body[:, 3:-2] & body[:, 4:-1] & body[:, 5:]
    columns = np.flatnonzero(runs.any(axis=0))
    player = None
    if len(columns):
        rows = np.flatnonzero(runs.any(axis=1))  # the car's outline is one row above and below
        player = obj(int(columns[0]) + 8 - 2, 139 + int(rows[0]) - 1, 16, int(rows[-1] - rows[0]) + 3)

    grass = int(screen[_ENDURO_TOP + 6, 10])
    table = _SATURATED_EXCEPT.get(grass)
    if table is None:
        table = _SATURATED_EXCEPT[grass] = _palette_table(i for i in range(16, 256) if i != grass)
    road = screen[_ENDURO_TOP:_ENDURO_BOTTOM]
    cars = [obj(x, y + _ENDURO_TOP, w, h) for x, y, w, h in _clusters(_mask_indices(road, table), 160) if x >= 8]
    return {"player": player, "cars": cars, "cars_to_pass": _enduro_cars_left(ram)}


def _enduro_cars_left(ram: Sequence[int]) -> int:
    """Cars still to pass today: BCD in ram[43] (tens, ones) and ram[44] (hundreds); it goes
    down by one for each +1 reward and up for each -1 (checked over whole episodes)."""
    low, high = ram[43], ram[44]
    return (high & 15) * 100 + (low >> 4) * 10 + (low & 15)


# --------------------------------------------------------------------------------------------
# Freeway. Chicken y 193 - ram[14] (OCAtari), x fixed at 44. Ten lanes, lane k (top = 0) at
# y = 28 + 16*k; car x from ram[108:118] (lanes mirror each other: top lanes 157 - ram[108+k],
# bottom lanes ram[117-k] - 3), all verified pixel-exact on full-width cars.
# --------------------------------------------------------------------------------------------


def _extract_freeway(ram: Sequence[int], screen: Any = None) -> dict:
    cars = []
    for lane in range(10):
        x = 157 - ram[108 + lane] if lane < 5 else ram[117 - lane] - 3
        cars.append(obj(x, 28 + 16 * lane, 8, 8, id=lane, lane=lane))
    return {"player": obj(44, 193 - ram[14], 7, 8), "cars": cars}


# --------------------------------------------------------------------------------------------
# Qbert. Qbert x ram[43] - 3, y ram[67] - 5 (ram[43] == 0 while he is not on screen). Cube top
# colours (palette index) in the 21 bytes below (OCAtari's list; each byte recolours exactly one
# cube top when written). Enemies are found in the frame: their x sits in ram[44:48] but no
# RAM y could be verified, so they are the purple (Coily, purple ball), green (green ball,
# Slick, Sam) and red (red balls) sprites on the pyramid, away from Qbert.
# --------------------------------------------------------------------------------------------

_QBERT_CUBE_BYTES = (21, 52, 54, 83, 85, 87, 98, 100, 102, 104, 1, 3, 5, 7, 9, 32, 34, 36, 38, 40, 42)
_QBERT_CUBE_TOPS = (
    (68, 34),
    (56, 62), (84, 62),
    (44, 91), (68, 91), (96, 91),
    (32, 120), (56, 120), (84, 120), (108, 120),
    (20, 149), (44, 149), (68, 149), (96, 149), (120, 149),
    (8, 178), (32, 178), (56, 178), (84, 178), (108, 178), (132, 178),
)
_QBERT_CUBE_ROWCOL = tuple((row, col) for row in range(6) for col in range(row + 1))
_QBERT_ENEMY_COLORS = {102: "purple", 196: "green", 52: "red"}
_QBERT_TOP = 30
_QBERT_ENEMY_TABLE = _palette_table(_QBERT_ENEMY_COLORS)


def _extract_qbert(ram: Sequence[int], screen: Any) -> dict:
    player = obj(ram[43] - 3, ram[67] - 5, 8, 18) if ram[43] else None
    cubes = [
        obj(x, y, 20, 5, id=i, row=row, col=col, color=ram[byte])
        for i, ((x, y), (row, col), byte) in enumerate(zip(_QBERT_CUBE_TOPS, _QBERT_CUBE_ROWCOL, _QBERT_CUBE_BYTES))
    ]
    area = screen[_QBERT_TOP:196]
    hide = None
    if player is not None:  # Qbert himself is drawn in the red balls' colour
        px, py = player["x"], player["y"] - _QBERT_TOP
        hide = (px - 3, py - 3, px + 11, py + 22)
    enemies = []
    for x, y, w, h in _clusters(_mask_indices(area, _QBERT_ENEMY_TABLE, hide), 160, min_pixels=6):
        if h < 4:  # the flying discs are 2 px high
            continue
        colors = area[y:y + h, x:x + w]
        color = next((name for index, name in _QBERT_ENEMY_COLORS.items() if (colors == index).any()), "red")
        enemies.append(obj(x, y + _QBERT_TOP, w, h, color=color))
    return {"player": player, "cubes": cubes, "enemies": enemies}


# --------------------------------------------------------------------------------------------
# Seaquest. Submarine x ram[70], y ram[97] + 33 (OCAtari). Four lanes (top = 0): enemy group x
# ram[33 - lane], group shape ram[39 - lane] (bit 4: one at +0, bit 2: +16, bit 1: +32, found by
# writing RAM), sprite ram[47 - lane] (8: enemy submarine, else shark); divers x ram[74 - lane]
# (0: none); divers are drawn on alternate frames only, the RAM always has them. Oxygen
# ram[102] (0-64, the width of the oxygen bar in pixels), rescued divers ram[62]. Sharks bob:
# their y is 65 + 24*lane + ram[93] (0-7), found by correlating with frames.
# Not included (no RAM layout verified): torpedoes (yours and the enemy subs'), the surface
# patrol sub.
# --------------------------------------------------------------------------------------------


def _extract_seaquest(ram: Sequence[int], screen: Any = None) -> dict:
    sharks, subs, divers = [], [], []
    bob = ram[93] & 7
    for lane in range(4):
        group, shape = ram[33 - lane], ram[39 - lane]
        is_sub = ram[47 - lane] == 8
        for bit, offset in ((4, 0), (2, 16), (1, 32)):
            if shape & bit:
                x = (group + offset) & 255
                if x < 160:
                    slot = lane * 3 + offset // 16
                    if is_sub:
                        subs.append(obj(x, 68 + 24 * lane, 8, 11, id=slot, lane=lane))
                    else:
                        sharks.append(obj(x, 65 + 24 * lane + bob, 8, 7, id=slot, lane=lane))
        diver_x = ram[74 - lane]
        if 0 < diver_x < 160:
            divers.append(obj(diver_x, 66 + 24 * lane, 8, 13, id=lane, lane=lane))
    return {
        "player": obj(ram[70], ram[97] + 33, 16, 11),
        "sharks": sharks,
        "enemy_subs": subs,
        "divers": divers,
        "oxygen": ram[102],
        "divers_collected": ram[62],
    }


# --------------------------------------------------------------------------------------------

_PLAYER = "the agent's own"

GAMES: dict[str, GameSpec] = {
    spec.name: spec
    for spec in (
        GameSpec(
            name="Pong",
            rom="pong",
            env_id="ALE/Pong-v5",
            description=(
                "You control the right paddle (green, x=140) and play against the computer's left "
                "paddle. Move your paddle up/down to hit the ball back; you score +1 when the ball "
                "passes the enemy, -1 when it passes you. A game ends when one side reaches 21. "
                "RIGHT moves the paddle up, LEFT moves it down."
            ),
            action_meanings=("NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"),
            categories=(
                Category("player", "one", f"{_PLAYER} paddle (right)"),
                Category("enemy", "one", "the computer's paddle (left, x=16)"),
                Category("ball", "one", "the ball, None between points"),
            ),
            extract=_extract_pong,
        ),
        GameSpec(
            name="Breakout",
            rom="breakout",
            env_id="ALE/Breakout-v5",
            description=(
                "Move the paddle at the bottom left/right to bounce the ball into the bricks; each "
                "brick scores (higher rows score more). Missing the ball costs a life (5 lives). "
                "FIRE launches a new ball at the start and after a lost life."
            ),
            action_meanings=("NOOP", "FIRE", "RIGHT", "LEFT"),
            categories=(
                Category("player", "one", f"{_PLAYER} paddle (y=189)"),
                Category("ball", "one", "the ball, None when not in play"),
                Category("bricks", "many", "remaining bricks, with row (0 = top) and color"),
            ),
            extract=_extract_breakout,
        ),
        GameSpec(
            name="SpaceInvaders",
            rom="space_invaders",
            env_id="ALE/SpaceInvaders-v5",
            description=(
                "Move your laser cannon left/right along the bottom and shoot the 6x6 grid of aliens "
                "that marches sideways and down; aliens drop bombs. Shooting aliens scores; being hit "
                "costs a life (3 lives); aliens reaching the bottom ends the game. FIRE shoots (one "
                "laser on screen at a time)."
            ),
            action_meanings=("NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"),
            categories=(
                Category("player", "one", f"{_PLAYER} laser cannon (y=185)"),
                Category("aliens", "many", "living aliens, with row (0 = top)"),
                Category("player_laser", "one", "your laser shot in flight, or None"),
                Category("enemy_bombs", "many", "aliens' bombs in flight (may be invisible on some frames)"),
            ),
            extract=_extract_space_invaders,
        ),
        GameSpec(
            name="Asterix",
            rom="asterix",
            env_id="ALE/Asterix-v5",
            description=(
                "Move Asterix between 8 horizontal lanes (and left/right) to collect the rewards "
                "(cauldrons and other items, +50 and more) that fly across the lanes, while avoiding "
                "the lyres (enemies), which cost a life. Each lane holds at most one object."
            ),
            action_meanings=("NOOP", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "DOWNRIGHT", "DOWNLEFT"),
            categories=(
                Category("player", "one", f"{_PLAYER} character, with lane (0 = top, 7 = bottom)"),
                Category("enemies", "many", "lyres (touching one costs a life), with lane"),
                Category("rewards", "many", "collectible items, with lane"),
            ),
            extract=_extract_asterix,
        ),
        GameSpec(
            name="Enduro",
            rom="enduro",
            env_id="ALE/Enduro-v5",
            description=(
                "Drive a race car in an endurance race: accelerate (FIRE), steer left/right and brake "
                "(DOWN) to overtake the other cars without hitting them (a crash slows you down). "
                "Each car passed scores +1; the day's quota must be met before the day ends. The "
                "road curves and visibility changes (snow, night, fog)."
            ),
            action_meanings=("NOOP", "FIRE", "RIGHT", "LEFT", "DOWN", "DOWNRIGHT", "DOWNLEFT", "RIGHTFIRE", "LEFTFIRE"),
            categories=(
                Category("player", "one", f"{_PLAYER} car (bottom of the road)", source="screen"),
                Category("cars", "many", "other cars on the road (smaller when far away; only tail "
                         "lights at night)", source="screen"),
                Category("cars_to_pass", "value", "cars still to overtake today"),
            ),
            extract=_extract_enduro,
            needs_screen=True,
            notes="Cars come from the frame (palette colours); the RAM layout of their positions was not verified.",
        ),
        GameSpec(
            name="Freeway",
            rom="freeway",
            env_id="ALE/Freeway-v5",
            description=(
                "Guide the chicken (x=44) up across ten lanes of traffic; each crossing to the top "
                "scores +1 and restarts at the bottom. Being hit pushes the chicken back down. "
                "The game lasts about 2 min 16 s."
            ),
            action_meanings=("NOOP", "UP", "DOWN"),
            categories=(
                Category("player", "one", f"{_PLAYER} chicken"),
                Category("cars", "many", "one car per lane (lane 0 = top); top lanes drive left, bottom lanes right"),
            ),
            extract=_extract_freeway,
        ),
        GameSpec(
            name="Qbert",
            rom="qbert",
            env_id="ALE/Qbert-v5",
            description=(
                "Hop Qbert around a pyramid of 21 cubes; landing on a cube changes its top colour "
                "(+25). Turning every cube to the target colour completes the round. Jumping off the "
                "pyramid (except onto a flying disc) or touching an enemy costs a life. "
                "UP = up-right, RIGHT = down-right, LEFT = up-left, DOWN = down-left."
            ),
            action_meanings=("NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN"),
            categories=(
                Category("player", "one", f"{_PLAYER} character, None while off screen"),
                Category("cubes", "many", "the 21 cubes: row 0-5 (top to bottom), col 0..row, and the "
                         "palette colour of their top"),
                Category("enemies", "many", "creatures on the pyramid, with color purple/green/red", source="screen"),
            ),
            extract=_extract_qbert,
            needs_screen=True,
            notes="Enemies come from the frame (palette colours); their RAM y could not be verified.",
        ),
        GameSpec(
            name="Seaquest",
            rom="seaquest",
            env_id="ALE/Seaquest-v5",
            description=(
                "Steer a submarine underwater, torpedo sharks and enemy submarines (FIRE) and pick up "
                "divers (up to 6). Oxygen runs out: surface (top, y=46) before it does; surfacing with "
                "6 divers scores a bonus, surfacing with none costs a life."
            ),
            action_meanings=(
                "NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "DOWNRIGHT", "DOWNLEFT",
                "UPFIRE", "RIGHTFIRE", "LEFTFIRE", "DOWNFIRE", "UPRIGHTFIRE", "UPLEFTFIRE", "DOWNRIGHTFIRE",
                "DOWNLEFTFIRE",
            ),
            categories=(
                Category("player", "one", f"{_PLAYER} submarine"),
                Category("sharks", "many", "sharks, with lane (0 = top of 4)"),
                Category("enemy_subs", "many", "enemy submarines, with lane"),
                Category("divers", "many", "divers to rescue, with lane"),
                Category("oxygen", "value", "oxygen left, 0-64"),
                Category("divers_collected", "value", "divers on board, 0-6"),
            ),
            extract=_extract_seaquest,
        ),
    )
}


class GamePluginError(ValueError):
    """A registered game plug-in cannot be used (one line naming the entry point)."""


@functools.lru_cache(maxsize=1)
def _plugins() -> tuple[Mapping[str, GameSpec], Mapping[str, str]]:
    from importlib import metadata

    games: dict[str, GameSpec] = {}
    packages: dict[str, str] = {}
    for entry in sorted(metadata.entry_points(group=GAME_ENTRY_POINT_GROUP), key=lambda e: e.name):
        where = f"Atari game plug-in {entry.name!r} ({entry.value}, entry point group {GAME_ENTRY_POINT_GROUP})"
        try:
            spec = entry.load()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in is named, not a traceback
            raise GamePluginError(f"{where}: cannot be loaded: {type(exc).__name__}: {exc}") from None
        if not isinstance(spec, GameSpec):
            raise GamePluginError(f"{where}: is a {type(spec).__name__}, not a "
                                  "genopt_projects.atari.games.GameSpec")
        known = {g.name.lower() for g in (*GAMES.values(), *games.values())}
        if spec.name.lower() in known:
            raise GamePluginError(f"{where}: a game called {spec.name!r} exists already")
        if not spec.name.isidentifier():
            raise GamePluginError(f"{where}: the game name {spec.name!r} must be an identifier")
        if spec.starting_policy is not None and not _defines(spec.starting_policy, "select_action"):
            raise GamePluginError(f"{where}: starting_policy must be Python source that defines "
                                  "select_action(obs)")
        games[spec.name] = spec
        packages[spec.name] = entry.module.split(".")[0]
    return games, packages


def _defines(source: Any, function: str) -> bool:
    import ast

    try:
        tree = ast.parse(source)
    except (SyntaxError, TypeError, ValueError):
        return False
    return any(isinstance(node, ast.FunctionDef) and node.name == function for node in tree.body)


def plugin_games() -> Mapping[str, GameSpec]:
    """The games registered by plug-ins (entry-point group :data:`GAME_ENTRY_POINT_GROUP`)."""
    return _plugins()[0]


def plugin_package(name: str) -> str | None:
    """The top-level package that registered game ``name`` (``None`` for a shipped game): the
    rollout sandbox must expose it to the worker, which imports it."""
    return _plugins()[1].get(get_game(name).name)


def all_games() -> dict[str, GameSpec]:
    """The shipped eight, then the plug-ins' games."""
    return {**GAMES, **plugin_games()}


def get_game(name: str) -> GameSpec:
    """The spec of ``name`` (case-insensitive; ``"ALE/Pong-v5"`` also accepted), shipped or a
    plug-in's."""
    if isinstance(name, GameSpec):
        return name
    key = str(name).split("/")[-1].split("-")[0].lower()
    for spec in GAMES.values():
        if spec.name.lower() == key or spec.rom == key:
            return spec
    for spec in plugin_games().values():
        if spec.name.lower() == key or spec.rom == key:
            return spec
    raise ValueError(f"unknown Atari game {name!r}; known: {sorted(all_games())}")


__all__ = ["Category", "GAME_ENTRY_POINT_GROUP", "GAMES", "GamePluginError", "GameSpec", "Planner",
           "all_games", "get_game", "obj", "plugin_games", "plugin_package"]

