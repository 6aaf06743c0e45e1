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
  study. A step's candidates replay the same ``H`` steps from the same state, so the batch
  scores compare like for like; the games move on in the loop's episodic hook ``end_step``, from
  where the rollouts of the version that played the step stopped (``Trial.carry``). Where the
  games stand is the task's ``state_dict``, kept in every checkpoint, so a resumed loop continues
  the same games.
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
never pays. A training trial's feedback gives the rollout's return and shows the error with its
traceback; the loop appends the version's full-episode (validation) result
(``feedback_notes``); its input is ``{"seed", "horizon", "game_step"}`` and its output a summary
(return, steps, lives lost, how it ended, how often each action was taken).

Execution and export
--------------------
Policies run only in sandboxed worker processes (:class:`~.policy_runner.PolicyRunner`), on this
machine or, with ``executor`` naming a Dask cluster, on its workers (batches of episodes per
unit; scores are computed here from the returned episode results); the
loop's evaluation cache keeps the deterministic trials (every trial but a ``continue_episode``
rollout is a function of the version and the seed; those are keyed by the game's state too).
``export`` writes ``policy.py`` (the selected program), ``selected_policy.gif`` (the selected
version playing its first evaluation episode: its recorded actions replayed in this process by a
trusted emulator, no generated code involved) and ``selected_policy.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from mlflow_genopt.artifact import ArtifactVersion
from mlflow_genopt.config import ConfigError, env_steps
from mlflow_genopt.executor import Executor
from mlflow_genopt.project import TaskOption, TaskSetup
from mlflow_genopt.task import EvalContext, Example, TraceStep, Trial

from .games import GameSpec, GamePluginError, all_games, get_game
from .policies import ANY_GAME, StartingPolicy, all_starting_policies, planner_hint
from .policy_runner import EpisodeResult, PolicyRunner, RolloutConfig

# The lowest return of a game: what a trial scores at most when the policy breaks.
FORFEIT_RETURN = {"Pong": -21.0}

def _positive(name: str, default: float, help: str) -> TaskOption:
    return TaskOption(name, "float", default, help, minimum=0, exclusive_minimum=True)


# Task options (``--option key=value``) and their defaults; ``None`` means "derived".
OPTIONS = (
    TaskOption("eval_episodes", "int", 3, "full episodes per validation", minimum=1),
    TaskOption("eval_max_steps", "int", 2000, "agent steps per full episode", minimum=1),
    TaskOption("test_episodes", "int", None, "test episodes (default: eval_episodes)", minimum=0),
    TaskOption("train_episodes", "int", 8, "training seeds (rollout examples)", minimum=1),
    TaskOption("continue_episode", "bool", False, "training rollouts continue one game per batch member"),
    TaskOption("noop_max", "int", 30, "random no-ops at reset", minimum=0),
    TaskOption("repeat_action_probability", "float", 0.0, "sticky actions", minimum=0, maximum=1),
    TaskOption("frameskip", "int", 4, "frames per agent step", minimum=1),
    _positive("call_timeout_s", 0.1, "time limit of one policy call"),
    _positive("episode_timeout_s", 120.0, "time limit of one episode"),
    TaskOption("workers", "int", None, "sandboxed worker processes (default: min(max_workers, CPUs))",
               minimum=1),
    TaskOption("split_seed", "int", 0, "offset of every seed", minimum=0),
    TaskOption("max_items", "int", 6, "objects of a list shown per observation", minimum=1),
    TaskOption("video_steps", "int", 600, "agent steps in the exported GIF", minimum=1),
    TaskOption("video_every", "int", 2, "frames per GIF frame", minimum=1),
    TaskOption("video_fps", "int", 15, "GIF frame rate", minimum=1),
)
_TRAIN_SEED, _VAL_SEED, _TEST_SEED = 0, 10_000, 20_000
_NEXT_EPISODE_SEED = 7_919  # continue_episode: the k-th new episode of a game adds k times this


@dataclass
class _Game:
    """continue_episode: where one training game stands."""

    seed: int
    state: str | None = None  # where the next step's rollouts start (None: reset with ``seed``)
    game_step: int = 0  # agent steps played in this episode before ``state``
    episodes: int = 0


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
        executor: Executor | None = None,
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
        self._rollouts = PolicyRunner(self.rollout_config, workers=workers, executor=executor)
        self._episodes = PolicyRunner(self.episode_config, workers=workers, executor=executor)

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
        self.objective = self._objective()

    multi_step = True
    # the loop appends each training trial's version's full-episode (validation) result
    feedback_notes = ("validation",)

    # --- Task protocol ----------------------------------------------------------------------

    def examples(self, split: str) -> Sequence[Example]:
        if split not in self._splits:
            raise ValueError(f"split: must be train, val or test, got {split!r}")
        return self._splits[split]

    def evaluate(self, version: ArtifactVersion, examples: Sequence[Example],
                 context: EvalContext | None = None) -> list[Trial]:
        unknown = [e.id for e in examples if e.id not in self._kind]
        if unknown:
            raise ValueError(f"examples {unknown[:3]} are not examples of task {self.name}")
        program = self.program(version)
        trials: dict[str, Trial] = {}
        rollouts = [e for e in examples if self._kind[e.id] == "rollout"]
        episodes = [e for e in examples if self._kind[e.id] == "episode"]
        if rollouts:
            trials.update(self._run_rollouts(program, rollouts))
        if episodes:
            trials.update(self._run_episodes(program, episodes))
        return [trials[e.id] for e in examples]

    # --- state across steps (continue_episode) -----------------------------------------------
    def end_step(self, step: int, version: ArtifactVersion, trials: Sequence[Trial]) -> None:
        """The episodic hook: the step's ``H`` environment steps were played by ``version``
        (``trials`` are its rollouts); its games continue from where they stopped."""
        if not self.continue_episode:
            return
        for trial in trials:
            game = self._games.get(trial.example_id)
            carry = trial.carry
            if game is None or "episodes" not in carry:
                continue
            if carry["terminated"]:  # game over: the game goes on with a new episode
                game.state, game.game_step, game.episodes = None, 0, carry["episodes"] + 1
            elif carry["end_state"] is not None:  # else the worker died or the policy did not load
                game.state = carry["end_state"]
                game.game_step = carry["game_step"] + carry["steps"]
                game.episodes = carry["episodes"]

    def state_dict(self) -> dict[str, Any]:
        """Where every training game stands (``continue_episode``; empty otherwise)."""
        if not self.continue_episode:
            return {}
        return {"games": {gid: {"seed": g.seed, "state": g.state, "game_step": g.game_step,
                                "episodes": g.episodes} for gid, g in self._games.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for gid, game in (state or {}).get("games", {}).items():
            if gid in self._games:
                self._games[gid] = _Game(**game)

    def trial_key(self, example: Example, context: EvalContext | None = None) -> str:
        """A continue_episode rollout depends on where its game stands, not only on the seed."""
        game = self._games.get(example.id) if self.continue_episode else None
        if game is None:
            return example.id
        where = hashlib.sha256((game.state or "reset").encode()).hexdigest()[:16]
        return f"{example.id}@{game.episodes}:{game.game_step}:{where}"

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
            [episode] = self._episodes.run(program, [example.input["seed"]])  # deterministic
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

    def _run_rollouts(self, program: str, examples: list[Example]) -> dict[str, Trial]:
        games = [self._games[e.id] for e in examples]
        seeds = [game.seed + game.episodes * _NEXT_EPISODE_SEED for game in games]
        results = self._rollouts.run(program, seeds, start_states=[game.state for game in games])
        trials = {}
        for example, game, result in zip(examples, games, results):
            trial = self._rollout_trial(example, result, game.game_step)
            if self.continue_episode:  # what end_step needs to move this game on
                trial = replace(trial, carry={"end_state": result.end_state, "steps": result.steps,
                                              "terminated": result.terminated,
                                              "game_step": game.game_step, "episodes": game.episodes})
            trials[example.id] = trial
        return trials

    def _rollout_trial(self, example: Example, r: EpisodeResult, game_step: int) -> Trial:
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

    def _run_episodes(self, program: str, examples: list[Example]) -> dict[str, Trial]:
        results = self._episodes.run(program, [e.input["seed"] for e in examples])
        trials = {}
        for example, r in zip(examples, results):
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

def make_task(setup: TaskSetup) -> AtariTask:
    """The task of ``setup.config``: ``config.task`` names the game, the starting artifact the
    policy (``single``, ``modular``, or a game-specific ``<Game>.single`` / ``<Game>.modular``).
    The training rollouts run ``env_steps(config)`` steps (a whole episode when unset)."""
    config, settings = setup.config, dict(setup.options)
    try:
        game = get_game(config.task)
    except GamePluginError as exc:
        raise ConfigError(str(exc)) from None
    except ValueError:
        raise ConfigError(f"task: unknown Atari game {config.task!r}; choose one of "
                          f"{', '.join(all_games())}") from None
    policy = all_starting_policies()[setup.starting.name]
    if settings["workers"] is None:
        settings["workers"] = max(1, min(config.max_workers, os.cpu_count() or 1))
    horizon = env_steps(config) or settings["eval_max_steps"]
    return AtariTask(game.name, policy, horizon=horizon, credit_horizon=config.credit_horizon,
                     batch_size=config.batch_size, executor=setup.executor, **settings)


def starting_artifacts() -> Mapping[str, Any]:
    """The project's starting artifacts, by ``--init`` name (see :mod:`.policies`)."""
    from mlflow_genopt.project import StartingArtifact

    return {name: StartingArtifact(name, policy.description + ("" if policy.game == ANY_GAME else
                                                               f" ({policy.game} only)"),
                                   policy.artifact_spec(), policy.values,
                                   tasks=None if policy.game == ANY_GAME else (policy.game,))
            for name, policy in all_starting_policies().items()}


__all__ = ["AtariTask", "FORFEIT_RETURN", "OPTIONS", "make_task", "starting_artifacts"]
