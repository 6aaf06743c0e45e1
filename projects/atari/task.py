"""The Atari task: policy programs play a game; the credit horizon sets what each update sees.

Credit horizon and update frequency
-----------------------------------
``H = update_every or credit_horizon`` (LoopConfig; both ``None``: a whole episode of up to
``eval_max_steps``). Each loop step rolls the current policy out for ``H`` environment steps per
batch member, then updates once: the rollout's trace (per step: a compact observation summary,
the action, the reward, ``life_lost``) is the learning evidence, and the optimizer shows the last
``credit_horizon`` of those steps (:func:`mlflow_genopt.optimizer.truncate_trace`). So the
update happens after exactly those ``H`` steps, by construction.

Splits
------
* ``train``: rollouts of ``H`` steps. By default each example is one seed (``train_episodes``
  of them) and a rollout starts from that seed's reset state (``noop_max`` random no-ops make
  seeds differ): stateless and deterministic. With ``continue_episode=true`` the split holds
  ``batch_size`` games instead, and each step's rollout continues its game from where the
  previous step's rollout of the then-current policy left it (a new episode after game over):
  one uninterrupted game played by a policy updated every ``H`` steps, as in the reference
  study. The candidate of a step replays the same ``H`` steps from the same state, so the two
  batch scores compare like for like. (This mode keeps state between ``evaluate`` calls: a
  version the task has not seen before, made after step 0, is a step's candidate; any other is
  the step's current version, whose call advances the games.)
* ``val``: the full-episode evaluation, ``eval_episodes`` episodes of up to ``eval_max_steps``
  steps (the study: Pong 10 x 4000). The loop logs their mean return as ``val_score`` and the
  standard deviation as ``val_score_std``; also ``val_steps``, ``val_lives_lost``,
  ``val_failed`` (share of episodes the policy broke) and ``val_episode_return`` (the raw
  return, before the forfeit below).
* ``test``: ``test_episodes`` more episodes with other seeds, for the selected version only.

Scores and feedback
-------------------
A trial's score is the game reward collected: the rollout's return (train) or the episode's
return (val, test). A policy that raises, overruns its per-call time limit
(``call_timeout_s``), returns an invalid action or cannot be loaded ends its episode there and
forfeits: the trial scores at most the game's worst return (Pong -21, else 0), so that crashing
never pays. A training trial's feedback combines the rollout's return with the version's latest
full-episode evaluation (mean and std), and shows the error with its traceback; its input is
``{"seed", "horizon", "game_step"}`` and its output a summary (return, steps, lives lost, how it
ended, how often each action was taken).

Execution and export
--------------------
Policies run only in sandboxed worker processes (:class:`~.policy_runner.PolicyRunner`); the
full-episode evaluations are cached per (version content, seed), as they are deterministic.
``export`` writes ``policy.py`` (the selected program), ``selected_policy.gif`` (the selected
version playing its first evaluation episode: its recorded actions replayed in this process by a
trusted emulator, no generated code involved) and ``selected_policy.json``.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from mlflow_genopt.artifact import ArtifactVersion
from mlflow_genopt.config import ConfigError, LoopConfig
from mlflow_genopt.task import Example, TraceStep, Trial

from .games import GAMES, GameSpec, get_game
from .policies import ANY_GAME, StartingPolicy, all_starting_policies, planner_hint
from .policy_runner import EpisodeResult, PolicyRunner, RolloutConfig

# The lowest return of a game: what a trial scores at most when the policy breaks.
FORFEIT_RETURN = {"Pong": -21.0}

# Task options (``--option key=value``) and their defaults; ``None`` means "derived".
OPTIONS: dict[str, Any] = {
    "eval_episodes": 3,
    "eval_max_steps": 2000,
    "test_episodes": None,  # same as eval_episodes
    "train_episodes": 8,
    "continue_episode": False,
    "noop_max": 30,
    "repeat_action_probability": 0.0,
    "frameskip": 4,
    "call_timeout_s": 0.1,
    "episode_timeout_s": 120.0,
    "workers": None,  # min(max_workers, CPUs)
    "split_seed": 0,
    "max_items": 6,
    "video_steps": 600,
    "video_every": 2,
    "video_fps": 15,
}
_TRAIN_SEED, _VAL_SEED, _TEST_SEED = 0, 10_000, 20_000
_NEXT_EPISODE_SEED = 7_919  # continue_episode: the k-th new episode of a game adds k times this


@dataclass
class _Game:
    """continue_episode: where one training game stands."""

    seed: int
    state: str | None = None  # where the next step's rollouts start (None: reset with ``seed``)
    game_step: int = 0  # agent steps played in this episode before ``state``
    episodes: int = 0
    pending: tuple[str | None, int, int] | None = None  # (state, game_step, episodes) after this step


class AtariTask:
    """One game, one starting policy; see the module docstring for splits, scores and feedback.

    ``policy`` gives the program layout (parameter order and frozen entry); ``horizon`` is ``H``,
    the environment steps of a training rollout.
    """

    def __init__(
        self,
        game: str,
        policy: StartingPolicy,
        *,
        horizon: int,
        credit_horizon: int | None = None,
        batch_size: int = 1,
        eval_episodes: int = 3,
        eval_max_steps: int = 2000,
        test_episodes: int | None = None,
        train_episodes: int = 8,
        continue_episode: bool = False,
        noop_max: int = 30,
        repeat_action_probability: float = 0.0,
        frameskip: int = 4,
        call_timeout_s: float = 0.1,
        episode_timeout_s: float = 120.0,
        workers: int = 2,
        split_seed: int = 0,
        max_items: int = 6,
        video_steps: int = 600,
        video_every: int = 2,
        video_fps: int = 15,
    ) -> None:
        self.game: GameSpec = get_game(game)
        self.policy = policy
        self.spec = policy.artifact_spec()
        self.horizon = horizon
        self.credit_horizon = credit_horizon
        self.continue_episode = continue_episode
        self.eval_episodes, self.eval_max_steps = eval_episodes, eval_max_steps
        self.forfeit = FORFEIT_RETURN.get(self.game.name, 0.0)
        self.video_steps, self.video_every, self.video_fps = video_steps, video_every, video_fps
        self.name = f"atari/{self.game.name}"
        common = dict(game=self.game.name, frameskip=frameskip, noop_max=noop_max,
                      repeat_action_probability=repeat_action_probability, entry=policy.entry,
                      call_timeout_s=call_timeout_s, episode_timeout_s=episode_timeout_s,
                      max_items=max_items)
        self.rollout_config = RolloutConfig(max_steps=horizon, trace_every=1, trace_head=horizon,
                                            trace_tail=1, return_states=continue_episode, **common)
        self.episode_config = RolloutConfig(max_steps=eval_max_steps, trace_head=0, trace_tail=0, **common)
        self._rollouts = PolicyRunner(self.rollout_config, workers=workers)
        self._episodes = PolicyRunner(self.episode_config, workers=workers)

        base = split_seed * 100_000
        n_train = batch_size if continue_episode else train_episodes
        prefix = "game" if continue_episode else "rollout"
        train = [Example(f"{prefix}-{base + _TRAIN_SEED + i}", {"seed": base + _TRAIN_SEED + i, "horizon": horizon})
                 for i in range(n_train)]
        val = [Example(f"eval-{base + _VAL_SEED + i}", {"seed": base + _VAL_SEED + i, "max_steps": eval_max_steps})
               for i in range(eval_episodes)]
        n_test = eval_episodes if test_episodes is None else test_episodes
        test = [Example(f"test-{base + _TEST_SEED + i}", {"seed": base + _TEST_SEED + i, "max_steps": eval_max_steps})
                for i in range(n_test)]
        self._splits = {"train": train, "val": val, "test": test}
        self._kind = {e.id: ("rollout" if split == "train" else "episode")
                      for split, examples in self._splits.items() for e in examples}
        self._games = {e.id: _Game(e.input["seed"]) for e in train}
        self._seen_versions: set[str] = set()  # continue_episode: versions evaluated on train
        self._episode_cache: dict[tuple[str, str], EpisodeResult] = {}
        self._val_summary: dict[str, tuple[float, float, int, str | None]] = {}
        self.objective = self._objective()

    # --- Task protocol ----------------------------------------------------------------------

    def examples(self, split: str) -> Sequence[Example]:
        if split not in self._splits:
            raise ValueError(f"split: must be train, val or test, got {split!r}")
        return self._splits[split]

    def evaluate(self, version: ArtifactVersion, examples: Sequence[Example]) -> list[Trial]:
        unknown = [e.id for e in examples if e.id not in self._kind]
        if unknown:
            raise ValueError(f"examples {unknown[:3]} are not examples of task {self.name}")
        program = self.program(version)
        trials: dict[str, Trial] = {}
        rollouts = [e for e in examples if self._kind[e.id] == "rollout"]
        episodes = [e for e in examples if self._kind[e.id] == "episode"]
        if rollouts:
            trials.update(self._run_rollouts(version, program, rollouts))
        if episodes:
            trials.update(self._run_episodes(version, program, episodes))
        return [trials[e.id] for e in examples]

    def close(self) -> None:
        self._rollouts.close()
        self._episodes.close()

    def export(self, version: ArtifactVersion, directory: Path) -> None:
        """Write ``policy.py``, ``selected_policy.gif`` and ``selected_policy.json`` (see the
        module docstring); on failure ``export_error.txt`` instead of the video."""
        from .video import write_gif

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        program = self.program(version)
        (directory / "policy.py").write_text(program)
        try:
            example = (self._splits["val"] or self._splits["test"])[0]
            episode = self._episode_cache.get((version.content_hash, example.id))
            if episode is None:
                [episode] = self._episodes.run(program, [example.input["seed"]])
            actions = episode.action_list[: self.video_steps]
            frames = write_gif(self.episode_config, episode.seed, actions, directory / "selected_policy.gif",
                               every=self.video_every, fps=self.video_fps)
            info = {
                "game": self.game.name, "version_id": version.version_id, "seed": episode.seed,
                "episode_return": episode.episode_return, "episode_steps": episode.steps,
                "error": episode.error, "video": "selected_policy.gif", "video_steps": len(actions),
                "video_frames": frames, "video_fps": self.video_fps, "video_every": self.video_every,
                "frameskip": self.episode_config.frameskip,
            }
            (directory / "selected_policy.json").write_text(json.dumps(info, indent=2))
        except Exception as exc:  # noqa: BLE001 - an export must not fail the loop
            (directory / "export_error.txt").write_text(f"{type(exc).__name__}: {exc}\n")

    # --- programs ---------------------------------------------------------------------------

    def program(self, version: ArtifactVersion) -> str:
        """The source the workers run: header, then the version's functions in policy order."""
        return self.policy.program(
            {name: version.values[name] for name in self.policy.values if name in version.values},
            game=self.game.name)

    def _objective(self) -> str:
        c = self.rollout_config
        if self.continue_episode:
            rollout = (f"a training trial continues one game for {self.horizon} steps from where the "
                       f"previous update left it (a new episode after game over)")
        else:
            rollout = f"a training trial plays the first {self.horizon} steps of an episode"
        shown = "all of its steps" if self.credit_horizon is None or self.credit_horizon >= self.horizon \
            else f"its last {self.credit_horizon} steps"
        text = (
            f"Write a policy program that plays the Atari game {self.game.name} as well as possible. "
            f"The frozen function {self.policy.entry}(obs) is called once per agent step (every "
            f"{c.frameskip} frames) with an observation dict and must return an action index (an int); "
            f"each call may take at most {c.call_timeout_s * 1000:g} ms. The score is the game reward: "
            f"{rollout}, and you see {shown} (observation, action, reward); the version's full-episode "
            f"score is the mean return of {self.eval_episodes} episodes of up to {self.eval_max_steps} "
            f"steps. An exception, a timeout or an invalid action ends the episode, which then scores "
            f"{self.forfeit:g} (the worst). The program imports math and random and defines N_ACTIONS "
            f"and ACTION_NAMES; no other module is needed. In traces an observation reads "
            f"`name x,y dDX,DY key=value` per object (d only when it moves), `name[count]: obj; obj` for "
            f"lists (the first {c.max_items}), `name none` when absent.\n\n{self.game.describe()}"
        )
        if self.policy.game == ANY_GAME and self.policy.variant == "modular":
            text += f"\n\nSuggested job of analyze(obs) in {self.game.name}: {planner_hint(self.game.name)}"
        return text

    # --- rollouts (train) -------------------------------------------------------------------

    def _run_rollouts(self, version: ArtifactVersion, program: str, examples: list[Example]) -> dict[str, Trial]:
        games = [self._games[e.id] for e in examples]
        # continue_episode: the step's current version (any version already seen, or the
        # starting one) moves the games on; a step's candidate replays from the same states.
        advancing = self.continue_episode and not (
            version.step > 0 and version.version_id not in self._seen_versions)
        if self.continue_episode:
            self._seen_versions.add(version.version_id)
            for game in games:
                if advancing and game.pending is not None:
                    game.state, game.game_step, game.episodes = game.pending
                    game.pending = None
        starts = [(game.state, game.game_step, game.episodes) for game in games]
        seeds = [game.seed + episodes * _NEXT_EPISODE_SEED for game, (_, _, episodes) in zip(games, starts)]
        results = self._rollouts.run(program, seeds, start_states=[state for state, _, _ in starts])
        summary = self._val_summary.get(version.content_hash)
        trials = {}
        for example, game, (_, game_step, episodes), result in zip(examples, games, starts, results):
            if advancing:
                if result.terminated:  # game over: the game goes on with a new episode
                    game.pending = (None, 0, episodes + 1)
                elif result.end_state is None:  # the worker died or the policy did not load: stay
                    game.pending = (game.state, game_step, episodes)
                else:
                    game.pending = (result.end_state, game_step + result.steps, episodes)
            trials[example.id] = self._rollout_trial(example, result, game_step, summary)
        return trials

    def _rollout_trial(self, example: Example, r: EpisodeResult, game_step: int,
                       summary: tuple[float, float, int, str | None] | None) -> Trial:
        score = self._score(r)
        names = self.game.action_meanings
        trace = tuple(
            TraceStep(
                observation=observation_text(record["obs"]),
                action=f"{record['action']}={names[record['action']]}" if record["action"] is not None
                else "(none: the policy failed here)",
                reward=float(record["reward"]),
                info={"t": record["t"], "life_lost": bool(record.get("life_lost", False)),
                      **({"error": True} if record["action"] is None else {})},
            )
            for record in r.trace
        )
        where = (f"from game step {game_step}" if game_step else "from the start of an episode")
        lines = [f"Rollout of up to {self.horizon} steps {where} (seed {r.seed}): return "
                 f"{r.episode_return:g} over {r.steps} steps, {_ending(r)}"
                 + (f", {r.lives_lost} li{'fe' if r.lives_lost == 1 else 'ves'} lost" if r.lives_lost else "")
                 + "."]
        lines += self._error_lines(r, score)
        if summary is None:
            lines.append("Full-episode evaluation of this version: not run yet (it runs when the "
                         "version is adopted).")
        else:
            mean, std, n, first_error = summary
            text = (f"Full-episode evaluation of this version: mean return {mean:g} (std {std:.3g}) over "
                    f"{n} episodes of up to {self.eval_max_steps} steps.")
            if first_error:
                text += f" There it failed: {first_error}"
            lines.append(text)
        output = {"return": r.episode_return, "steps": r.steps, "end": _ending(r),
                  "lives_lost": r.lives_lost,
                  "actions": dict(Counter(names[a] for a in r.action_list).most_common())}
        return Trial(
            example_id=example.id,
            input={"seed": r.seed, "horizon": self.horizon, "game_step": game_step},
            output=output,
            score=score,
            feedback="\n".join(lines),
            trace=trace,
            error=r.error,
            metrics={"rollout_return": r.episode_return, "steps": float(r.steps)},
        )

    # --- full episodes (val, test) ----------------------------------------------------------

    def _run_episodes(self, version: ArtifactVersion, program: str, examples: list[Example]) -> dict[str, Trial]:
        key = version.content_hash
        missing = [e for e in examples if (key, e.id) not in self._episode_cache]
        if missing:
            results = self._episodes.run(program, [e.input["seed"] for e in missing])
            for example, result in zip(missing, results):
                self._episode_cache[(key, example.id)] = result
        trials = {}
        for example in examples:
            r = self._episode_cache[(key, example.id)]
            score = self._score(r)
            lines = [r.feedback()] if r.ok else [r.feedback().split("\nERROR:")[0]] + self._error_lines(r, score)
            trials[example.id] = Trial(
                example_id=example.id,
                input={"seed": r.seed, "max_steps": self.eval_max_steps},
                output={"return": r.episode_return, "steps": r.steps, "end": _ending(r),
                        "lives_lost": r.lives_lost, "error": r.error},
                score=score,
                feedback="\n".join(lines),
                error=r.error,
                metrics={"episode_return": r.episode_return, "steps": float(r.steps),
                         "lives_lost": float(r.lives_lost), "failed": 0.0 if r.ok else 1.0},
            )
        val_ids = [e.id for e in self._splits["val"]]
        if val_ids and all((key, i) in self._episode_cache for i in val_ids):
            results = [self._episode_cache[(key, i)] for i in val_ids]
            scores = [self._score(r) for r in results]
            mean = sum(scores) / len(scores)
            std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
            first_error = next((r.error for r in results if r.error), None)
            self._val_summary[key] = (mean, std, len(scores), first_error)
        return trials

    # --- shared -----------------------------------------------------------------------------

    def _score(self, r: EpisodeResult) -> float:
        return r.episode_return if r.ok else min(r.episode_return, self.forfeit)

    def _error_lines(self, r: EpisodeResult, score: float) -> list[str]:
        if r.ok:
            return []
        lines = [f"ERROR: {r.error}"]
        if r.traceback:
            lines.append(r.traceback)
        if r.stdout.strip():
            lines.append("The policy printed: " + r.stdout.strip()[-300:])
        lines.append(f"The episode ended there; the trial scores {score:g} (return before the failure: "
                     f"{r.episode_return:g}).")
        return lines


def observation_text(summary: Mapping[str, Any]) -> str:
    """One line for a trace: ``name x,y dDX,DY key=value`` per object (``d`` only when it
    moves), ``name[count]: obj; obj; +N more`` for lists, ``name none`` when absent,
    ``name=value`` for numbers; categories separated by `` | ``. A third of the JSON's length,
    so a 100-step trace fits a small model's context."""
    parts = []
    for name, value in summary.items():
        if value is None:
            parts.append(f"{name} none")
        elif isinstance(value, Mapping):
            parts.append(f"{name} {_object_text(value)}")
        elif isinstance(value, (list, tuple)):
            items = [_object_text(v) if isinstance(v, Mapping) else str(v).replace("... ", "+")
                     for v in value]
            more = next((int(str(v).split()[1]) for v in value if isinstance(v, str)), 0)
            parts.append(f"{name}[{len(value) - (1 if more else 0) + more}]" + (": " + "; ".join(items) if items else ""))
        else:
            parts.append(f"{name}={value}")
    return " | ".join(parts)


def _object_text(item: Mapping[str, Any]) -> str:
    text = f"{item.get('x')},{item.get('y')}"
    dx, dy = item.get("dx", 0), item.get("dy", 0)
    if dx or dy:
        text += f" d{dx},{dy}"
    extras = [f"{k}={v}" for k, v in item.items() if k not in ("x", "y", "dx", "dy", "w", "h", "id")]
    return " ".join([text, *extras])


def _ending(r: EpisodeResult) -> str:
    if r.error:
        return "policy failed"
    return "game over" if r.terminated else "horizon reached" if r.truncated else "stopped"


# --- factory ---------------------------------------------------------------------------------

_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _option(name: str, value: Any, default: Any) -> Any:
    kind = type(default) if default is not None else int
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            return _BOOL_WORDS[str(value).strip().lower()]
        if kind is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        return float(value)
    except (KeyError, TypeError, ValueError):
        expected = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise ConfigError(f"task_options.{name}: must be {expected}, got {value!r}") from None


def make_task(config: LoopConfig, llm: Any = None) -> AtariTask:
    """The task of ``config``: ``config.task`` names the game, ``config.init`` the starting policy
    (``single``, ``modular``, or a game-specific ``<Game>.single`` / ``<Game>.modular``)."""
    try:
        game = get_game(config.task)
    except ValueError:
        raise ConfigError(f"task: unknown Atari game {config.task!r}; choose one of {', '.join(GAMES)}") from None
    policies = all_starting_policies()
    policy = policies.get(config.init)
    if policy is None:
        raise ConfigError(f"init: unknown starting artifact {config.init!r} for project atari; "
                          f"choose one of {', '.join(policies)}")
    if policy.game not in (ANY_GAME, game.name):
        raise ConfigError(f"init: {config.init} is a starting artifact of {policy.game}, not of {game.name}; "
                          f"use single, modular, {game.name}.single or {game.name}.modular")
    # unset options arrive as "" or "none" from MLproject parameters
    given = {k: v for k, v in dict(config.task_options).items()
             if not (v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "null")))}
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"task_options.{unknown[0]}: unknown option for atari; known: {', '.join(OPTIONS)}")
    options = {name: _option(name, value, OPTIONS[name]) for name, value in given.items()}
    settings = {**{k: v for k, v in OPTIONS.items() if v is not None}, **options}
    minimums = {"eval_episodes": 1, "eval_max_steps": 1, "test_episodes": 0, "train_episodes": 1, "noop_max": 0,
                "frameskip": 1, "split_seed": 0, "max_items": 1, "video_steps": 1, "video_every": 1,
                "video_fps": 1, "workers": 1}
    for name, low in minimums.items():
        if name in settings and settings[name] < low:
            raise ConfigError(f"task_options.{name}: must be >= {low}, got {settings[name]!r}")
    for name in ("call_timeout_s", "episode_timeout_s"):
        if not settings[name] > 0:
            raise ConfigError(f"task_options.{name}: must be > 0, got {settings[name]!r}")
    if not 0.0 <= settings["repeat_action_probability"] <= 1.0:
        raise ConfigError(f"task_options.repeat_action_probability: must be in [0, 1], "
                          f"got {settings['repeat_action_probability']!r}")
    settings.setdefault("workers", max(1, min(config.max_workers, os.cpu_count() or 1)))
    horizon = config.update_every or config.credit_horizon or settings["eval_max_steps"]
    return AtariTask(game.name, policy, horizon=horizon, credit_horizon=config.credit_horizon,
                     batch_size=config.batch_size, **settings)


def starting_artifacts() -> Mapping[str, Any]:
    """The project's starting artifacts, by ``--init`` name (see :mod:`.policies`)."""
    from mlflow_genopt.project import StartingArtifact

    return {name: StartingArtifact(name, policy.description + ("" if policy.game == ANY_GAME else
                                                               f" ({policy.game} only)"),
                                   policy.artifact_spec(), policy.values)
            for name, policy in all_starting_policies().items()}


__all__ = ["AtariTask", "FORFEIT_RETURN", "OPTIONS", "make_task", "starting_artifacts"]
