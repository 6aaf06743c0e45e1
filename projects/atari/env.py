"""A Gymnasium-style Atari environment whose observations are objects, never pixels.

:class:`ObjectEnv` drives the Arcade Learning Environment (``ale_py.ALEInterface``) directly,
with the semantics of Gymnasium's ``ALE/<Game>-v5`` (minimal action set, episodes capped at
108,000 frames, the ALE seeded from ``numpy.random.SeedSequence(seed)`` like ``AtariEnv``) except
for two defaults of the case study: ``frameskip=4`` and no sticky actions
(``repeat_action_probability=0.0``). Without sticky actions the emulator is deterministic: the
same actions from the same reset give the same episode. Episodes that should differ need sticky
actions, ``noop_max`` (a random number of no-op steps after reset, drawn from the seed), or a
stochastic policy.

Each step repeats the action for ``frameskip`` frames, sums the rewards, reads RAM (and the
palette frame for games that need it) and asks the game's extractor for objects; the wrapper adds
``dx``/``dy`` from the previous observation.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .games import GameSpec, get_game

MAX_FRAMES_PER_EPISODE = 108_000  # Gymnasium's v5 default: 30 minutes of play at 60 Hz
_STATE_MAGIC = b"genopt-atari-state/1\n"
_MATCH_RADIUS = 16  # pixels (|dx| + |dy|) within which an unlabelled object counts as the same


def _load_ale():
    import ale_py

    return ale_py


class ObjectEnv:
    """One Atari game with object observations (see :mod:`genopt_projects.atari.games`).

    Parameters
    ----------
    game:
        A name in :data:`~genopt_projects.atari.games.GAMES` (``"Pong"``), an ALE id
        (``"ALE/Pong-v5"``) or a :class:`GameSpec`.
    frameskip:
        Emulator frames per agent step (the action is repeated, rewards are summed).
    repeat_action_probability:
        ALE sticky actions: each frame, the previous action is repeated with this probability.
    max_steps:
        Agent steps after which ``step`` returns ``truncated=True`` (``None``: only the 108,000
        frame cap).
    seed:
        Default seed for the first ``reset`` (``None``: 0).
    noop_max:
        After each reset, take a random number in ``[0, noop_max]`` of NOOP steps (drawn from the
        seed), so that a deterministic policy sees different episodes for different seeds.

    Attributes: ``spec`` (the GameSpec), ``action_names``, ``n_actions``, ``steps`` (agent steps
    in the current episode).
    """

    def __init__(
        self,
        game: str | GameSpec,
        *,
        frameskip: int = 4,
        repeat_action_probability: float = 0.0,
        max_steps: int | None = None,
        seed: int | None = None,
        noop_max: int = 0,
    ) -> None:
        self.spec = get_game(game)
        if not isinstance(frameskip, int) or frameskip < 1:
            raise ValueError(f"frameskip must be an int >= 1, got {frameskip!r}")
        if not 0.0 <= float(repeat_action_probability) <= 1.0:
            raise ValueError(f"repeat_action_probability must be in [0, 1], got {repeat_action_probability!r}")
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps must be an int >= 1 or None, got {max_steps!r}")
        if not isinstance(noop_max, int) or noop_max < 0:
            raise ValueError(f"noop_max must be an int >= 0, got {noop_max!r}")
        self.frameskip = frameskip
        self.repeat_action_probability = float(repeat_action_probability)
        self.max_steps = max_steps
        self.noop_max = noop_max
        self._default_seed = 0 if seed is None else int(seed)
        ale_py = _load_ale()
        ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # no banner on stderr
        self._ale = ale_py.ALEInterface()
        self._ale.setFloat("repeat_action_probability", self.repeat_action_probability)
        self._ale.setInt("frame_skip", 1)
        self._ale.setInt("max_num_frames_per_episode", MAX_FRAMES_PER_EPISODE)
        self._rom_path = str(ale_py.roms.get_rom_path(self.spec.rom))
        self._seeded: int | None = None
        self._seed_game(self._default_seed)
        self._actions = list(self._ale.getMinimalActionSet())
        names = tuple(action.name for action in self._actions)
        if names != self.spec.action_meanings:
            raise RuntimeError(
                f"{self.spec.name}: the ALE's minimal action set {names} differs from the spec's "
                f"{self.spec.action_meanings}; fix GAMES[{self.spec.name!r}].action_meanings"
            )
        self._ram = np.empty(128, dtype=np.uint8)
        self._screen = np.empty((210, 160), dtype=np.uint8) if self.spec.needs_screen else None
        self._extract = self.spec.extract
        self._previous: dict[tuple[str, Any], Any] = {}  # positions in the last observation
        self._basis: dict[tuple[str, Any], Any] = {}  # positions the last observation's dx/dy used
        self._rng = np.random.default_rng(self._default_seed)
        self.steps = 0
        self._closed = False

    # -- Gymnasium-style API -------------------------------------------------------------------

    @property
    def action_names(self) -> tuple[str, ...]:
        return self.spec.action_meanings

    @property
    def n_actions(self) -> int:
        return len(self._actions)

    def reset(self, seed: int | None = None) -> tuple[dict, dict]:
        """Start an episode; returns ``(observation, info)``. With ``seed``, the ALE (sticky
        actions) and the no-op draw are reseeded, exactly as a fresh env with that seed."""
        if seed is not None:
            self._seed_game(int(seed))
            self._rng = np.random.default_rng(int(seed))
        self._ale.reset_game()
        self._previous = {}
        self.steps = 0
        noops = int(self._rng.integers(0, self.noop_max + 1)) if self.noop_max else 0
        for _ in range(noops * self.frameskip):
            self._ale.act(self._actions[0])
            if self._ale.game_over():
                self._ale.reset_game()
        return self._observe(), self._info()

    def step(self, action: int) -> tuple[dict, float, bool, bool, dict]:
        """Repeat ``action`` (an index into ``action_names``) for ``frameskip`` frames. Returns
        ``(observation, reward, terminated, truncated, info)``; ``terminated`` is game over,
        ``truncated`` is the ``max_steps`` or frame cap. Raises ``ValueError`` for an action that
        is not an int in ``range(n_actions)``."""
        if type(action) is not int:  # noqa: E721 - bool and numpy ints are checked below
            if isinstance(action, (bool, np.bool_)) or not isinstance(action, (int, np.integer)):
                raise ValueError(f"action must be an int in 0..{self.n_actions - 1}, got {action!r}")
            action = int(action)
        if not 0 <= action < len(self._actions):
            raise ValueError(f"action must be an int in 0..{self.n_actions - 1}, got {action}")
        ale_action, act = self._actions[action], self._ale.act
        reward = 0
        for _ in range(self.frameskip):
            reward += act(ale_action)
        self.steps += 1
        terminated = self._ale.game_over(with_truncation=False)
        truncated = not terminated and (
            self._ale.game_truncated() or (self.max_steps is not None and self.steps >= self.max_steps)
        )
        return self._observe(), float(reward), terminated, truncated, self._info()

    def clone_state(self) -> bytes:
        """The emulator state (including the sticky-action RNG) and the positions the current
        observation's ``dx``/``dy`` were computed from, as bytes for :meth:`restore_state`: a
        rollout can continue exactly where an earlier one stopped."""
        basis = [[name, key, value] for (name, key), value in self._basis.items()]
        header = json.dumps(basis, separators=(",", ":")).encode()
        return _STATE_MAGIC + len(header).to_bytes(4, "big") + header + bytes(
            self._ale.cloneState(include_rng=True).serialize())

    def restore_state(self, state: bytes) -> dict:
        """Continue from a :meth:`clone_state` snapshot of the same game; returns the same
        observation as at the snapshot. ``steps`` restarts at 0, so ``max_steps`` counts from here."""
        state = bytes(state)
        if not state.startswith(_STATE_MAGIC):
            raise ValueError("not a state made by ObjectEnv.clone_state")
        start = len(_STATE_MAGIC) + 4
        end = start + int.from_bytes(state[len(_STATE_MAGIC):start], "big")
        self._ale.restoreState(_load_ale().ALEState(state[end:]))
        self._previous = {
            (name, key): [tuple(position) for position in value] if key == "*" else tuple(value)
            for name, key, value in json.loads(state[start:end])
        }
        self.steps = 0
        return self._observe()

    def render_rgb(self) -> np.ndarray:
        """The current frame as a ``(210, 160, 3)`` uint8 RGB array (for videos and checks)."""
        return self._ale.getScreenRGB()

    def close(self) -> None:
        """Release the emulator; harmless to call twice."""
        if not self._closed:
            self._closed = True
            self._ale = None  # type: ignore[assignment]

    def __enter__(self) -> "ObjectEnv":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    @property
    def ale(self):
        """The underlying ``ale_py.ALEInterface`` (for tests and tools; policies never see it)."""
        return self._ale

    def ram(self) -> np.ndarray:
        return self._ale.getRAM()

    def _seed_game(self, seed: int) -> None:
        # Without sticky actions the ALE's RNG is never used, so the ROM (160 ms to load) is only
        # reloaded when it matters; with sticky actions every seeded reset reloads it, as
        # Gymnasium's AtariEnv does, so that a seed always means the same episode.
        if self._seeded is not None and (self.repeat_action_probability == 0.0):
            return
        # as Gymnasium's AtariEnv.seed_game, so that seeds mean the same in both
        _, ale_seed = np.random.SeedSequence(seed).generate_state(n_words=2)
        self._ale.setInt("random_seed", int(np.int32(ale_seed)))
        self._ale.loadROM(self._rom_path)
        self._seeded = seed

    def _info(self) -> dict:
        return {"lives": self._ale.lives(), "step": self.steps, "frame": self._ale.getEpisodeFrameNumber()}

    def _observe(self) -> dict:
        self._ale.getRAM(self._ram)
        screen = None
        if self._screen is not None:
            self._ale.getScreen(self._screen)
            screen = self._screen
        objects = self._extract(self._ram.tolist(), screen)
        previous, current = self._previous, {}
        for name, value in objects.items():
            if value is None or type(value) is int:
                continue
            if type(value) is dict:
                key = (name, None)
                last = previous.get(key)
                value["dx"], value["dy"] = (value["x"] - last[0], value["y"] - last[1]) if last else (0, 0)
                current[key] = (value["x"], value["y"])
            elif value and "id" in value[0]:
                for item in value:
                    key = (name, item["id"])
                    last = previous.get(key)
                    item["dx"], item["dy"] = (item["x"] - last[0], item["y"] - last[1]) if last else (0, 0)
                    current[key] = (item["x"], item["y"])
            else:  # objects found in the frame have no identity: match the nearest previous one
                before = previous.get((name, "*"), ())
                for item in value:
                    x, y = item["x"], item["y"]
                    best, best_distance = None, _MATCH_RADIUS + 1
                    for px, py in before:
                        distance = abs(px - x) + abs(py - y)
                        if distance < best_distance:
                            best, best_distance = (px, py), distance
                    item["dx"], item["dy"] = (x - best[0], y - best[1]) if best else (0, 0)
                current[(name, "*")] = [(item["x"], item["y"]) for item in value]
        self._basis, self._previous = previous, current
        return objects


def make(game: str | GameSpec, **kwargs: Any) -> ObjectEnv:
    """``ObjectEnv(game, **kwargs)``, for symmetry with ``gymnasium.make``."""
    return ObjectEnv(game, **kwargs)
