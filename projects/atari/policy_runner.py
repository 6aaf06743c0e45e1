"""Run a generated Atari policy program on episodes, in sandboxed worker processes.

The learning loop's process never executes the policy. :class:`PolicyRunner` sends
``(policy source, game, seeds, limits)`` to worker processes started by
:func:`mlflow_genopt.sandbox.run_function` (clean environment without API keys or tokens,
dedicated uid, no network, rlimits, process-tree killing; see that module). Each worker owns one
emulator and plays a batch of episodes with the policy in the same process, so an environment
step costs no inter-process round trip. Episodes are spread over ``workers`` processes that run
in parallel.

Limits: each policy call gets ``call_timeout_s`` (enforced inside the worker by an interval
timer), each episode ``episode_timeout_s`` of wall clock (checked by the worker after every
step; the parent kills a worker whose batch overruns the sum of its episodes' budgets plus
``startup_s``). Every failure of the policy (exception, timeout, invalid action, crash of the
worker) becomes an :class:`EpisodeResult` with ``error`` set and the return collected so far;
nothing the policy does raises here.

Continuation: with ``return_states=True`` each result carries its final emulator state, and
``run(..., start_states=...)`` continues episodes from such states, so "roll out H steps,
update the policy, roll out the next H steps" plays one uninterrupted game.

Trust: the return is computed in the worker, next to the policy, so a deliberately hostile
policy could forge it (and its end state). With ``verify_returns=True`` the parent replays the
episode's actions in its own emulator (no policy involved) and uses the replayed return and
state, reporting a mismatch as an error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from mlflow_genopt.executor import Executor, LocalExecutor
from mlflow_genopt.sandbox import SandboxLimits, SandboxResult, run_function

from .games import get_game, plugin_package
from .worker import ENTRY_FUNCTION, entry_source


@dataclass(frozen=True)
class RolloutConfig:
    """How episodes are played. ``max_steps`` is the horizon in agent steps (``None``: until
    game over or the 108,000-frame cap). ``entry`` is the function called with each observation
    (``act`` in programs from :mod:`~genopt_projects.atari.policies`). Trace: the first
    ``trace_head`` recorded steps (one every ``trace_every``) plus the last ``trace_tail`` steps
    of each episode; lists of objects in recorded observations are cut to ``max_items``."""

    game: str
    max_steps: int | None = 1000
    frameskip: int = 4
    repeat_action_probability: float = 0.0
    noop_max: int = 0
    entry: str = "act"
    call_timeout_s: float = 0.05
    episode_timeout_s: float = 60.0
    trace_every: int = 1
    trace_head: int = 50
    trace_tail: int = 20
    max_items: int = 6
    memory_mb: int = 1024
    startup_s: float = 10.0  # wall clock a worker may spend starting (imports, ROM load: ~0.5 s)
    return_states: bool = False  # send back each episode's final emulator state (~10 KB)

    def __post_init__(self) -> None:
        get_game(self.game)  # raises for an unknown game, listing the known ones
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be an int >= 1 or None, got {self.max_steps!r}")
        if not isinstance(self.frameskip, int) or self.frameskip < 1:
            raise ValueError(f"frameskip must be an int >= 1, got {self.frameskip!r}")
        if not 0.0 <= self.repeat_action_probability <= 1.0:
            raise ValueError(f"repeat_action_probability must be in [0, 1], got {self.repeat_action_probability!r}")
        if not self.entry.isidentifier():
            raise ValueError(f"entry must be a function name, got {self.entry!r}")
        for name in ("call_timeout_s", "episode_timeout_s", "startup_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("trace_every", "max_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("trace_head", "trace_tail", "noop_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass
class EpisodeResult:
    """One episode. ``episode_return`` is the summed reward up to the end or the error;
    ``error`` is None for an episode that ran to game over or to the horizon. ``trace`` is a list
    of ``{"t", "obs", "action", "reward"}`` dicts (``"life_lost": True`` where a life was lost;
    after an error, a last record with ``action: None`` shows the observation the policy failed
    on). ``stdout`` is the tail of what the policy printed."""

    seed: int
    episode_return: float
    steps: int
    terminated: bool = False
    truncated: bool = False
    error: str | None = None
    error_step: int | None = None
    traceback: str = ""
    trace: list[dict] = field(default_factory=list)
    lives_lost: int = 0
    duration_s: float = 0.0
    policy_s: float = 0.0
    stdout: str = ""
    actions: str = ""  # every action taken, one letter each ("a" = action 0): see ``action_list``
    start_state: str | None = None  # base64 emulator state the episode started from (None: reset)
    end_state: str | None = None  # where it stopped, when the config asks for it (``return_states``)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def action_list(self) -> list[int]:
        return [ord(letter) - ord("a") for letter in self.actions]

    def feedback(self) -> str:
        """A short text about this episode for the optimizer."""
        end = ("game over" if self.terminated else "horizon reached" if self.truncated else "stopped")
        text = f"Episode (seed {self.seed}): return {self.episode_return:g} over {self.steps} steps, {end}"
        if self.lives_lost:
            text += f", {self.lives_lost} li{'fe' if self.lives_lost == 1 else 'ves'} lost"
        text += "."
        if self.error:
            text += f"\nERROR: {self.error}"
            if self.traceback:
                text += f"\n{self.traceback}"
        return text

    def to_dict(self) -> dict:
        return asdict(self)


class PolicyRunner:
    """Plays policy programs on episodes over a pool of ``workers`` sandboxed processes.

    ``run(source, seeds)`` returns one :class:`EpisodeResult` per seed, in order. It never raises
    for what the policy does. The same source and seeds give the same results (the emulator
    without sticky actions is deterministic; sticky actions and the policy's ``random`` are
    seeded per episode), whatever the number of workers. Batches of episodes are the units of
    evaluation of ``executor`` (default: threads of this process, one per batch; on a Dask
    cluster, one batch per worker thread, each playing in a sandbox on its worker).
    """

    def __init__(self, config: RolloutConfig, *, workers: int = 2, verify_returns: bool = False,
                 executor: Executor | None = None) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        self.config = config
        self.workers = workers
        self.verify_returns = verify_returns
        self._own_executor = executor is None
        self.executor = executor if executor is not None else LocalExecutor(workers)

    def run(self, source: str, seeds: Sequence[int],
            start_states: Sequence[str | None] | None = None) -> list[EpisodeResult]:
        """One episode per seed. ``start_states[i]`` (an ``end_state`` of an earlier result, or
        None) continues episode ``i`` from there instead of from the reset state: "roll out H
        steps, update, roll out the next H steps" with ``max_steps=H``."""
        seeds = [int(seed) for seed in seeds]
        if not seeds:
            return []
        if not isinstance(source, str):
            raise TypeError(f"source must be Python source text, got {type(source).__name__}")
        states = list(start_states) if start_states is not None else [None] * len(seeds)
        if len(states) != len(seeds):
            raise ValueError(f"start_states has {len(states)} entries for {len(seeds)} seeds")
        episodes = list(zip(seeds, states))
        parts = self.workers if not self.executor.remote else (self.executor.slots or self.workers)
        size = math.ceil(len(episodes) / min(parts, len(episodes)))
        batches = [episodes[i:i + size] for i in range(0, len(episodes), size)]
        outcomes = self.executor.map(run_episode_batch,
                                     [(self.config, source, batch) for batch in batches])
        results = [result for batch in outcomes for result in batch]
        if self.verify_returns:
            for result in results:
                self._verify(source, result)
        return results

    def close(self) -> None:
        if self._own_executor:
            self.executor.close()

    def __enter__(self) -> "PolicyRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _verify(self, source: str, result: EpisodeResult) -> None:
        """Replay the episode's actions in the parent's own emulator (no policy involved); the
        replayed return and end state replace the worker's."""
        if len(result.actions) != result.steps:
            result.error = result.error or (
                f"return not verified: {len(result.actions)} actions for {result.steps} steps")
            return
        replayed, end_state = 0.0, None
        for reward, _, state in replay(self.config, result.seed, result.action_list, start_state=result.start_state,
                                       end_state=self.config.return_states):
            replayed += reward
            end_state = state
        if self.config.return_states:
            result.end_state = end_state
        if abs(replayed - result.episode_return) > 1e-6:
            result.error = (f"reported return {result.episode_return:g} differs from the replayed "
                            f"return {replayed:g}")
            result.episode_return = replayed


def _job(c: RolloutConfig, source: str, seed: int, start_state: str | None) -> dict:
    return {"source": source, "entry": c.entry, "game": get_game(c.game).name, "seed": seed,
            "start_state": start_state, "return_state": c.return_states,
            "max_steps": c.max_steps, "frameskip": c.frameskip,
            "repeat_action_probability": c.repeat_action_probability, "noop_max": c.noop_max,
            "call_timeout_s": c.call_timeout_s, "episode_timeout_s": c.episode_timeout_s,
            "trace_every": c.trace_every, "trace_head": c.trace_head, "trace_tail": c.trace_tail,
            "max_items": c.max_items}

def run_episode_batch(c: RolloutConfig, source: str,
                      episodes: Sequence[tuple[int, str | None]]) -> list[EpisodeResult]:
    """The unit of evaluation (see :mod:`mlflow_genopt.executor`): play ``episodes`` (seed,
    start state) with ``source`` in ONE sandboxed worker process started here (on a Dask worker
    when the executor is a cluster), and return their raw results. A pure function of its
    arguments; never raises for what the policy does."""
    limits = SandboxLimits(
        timeout_s=c.startup_s + len(episodes) * (c.episode_timeout_s + 1.0),
        memory_mb=c.memory_mb,
        max_output_bytes=4_000_000,
    )
    calls = [([_job(c, source, seed, state)], {}) for seed, state in episodes]
    # the entry point imports genopt_projects.atari.worker, which an editable install finds
    # only through its import hook: the sandbox must expose the package to the dedicated uid
    # a plug-in game's package is exposed to the sandbox's uid next to genopt_projects
    plugin = plugin_package(c.game)
    outcomes = run_function(entry_source(), ENTRY_FUNCTION, calls, limits=limits,
                            expose_packages=("genopt_projects",) + ((plugin,) if plugin else ()))
    results = [_result(c, seed, outcome) for (seed, _), outcome in zip(episodes, outcomes)]
    for result, (_, state) in zip(results, episodes):
        result.start_state = state
    return results

def _result(c: RolloutConfig, seed: int, outcome: SandboxResult) -> EpisodeResult:
    stdout = outcome.stdout_tail[-2000:]
    if outcome.ok and isinstance(outcome.value, dict):
        value = outcome.value
        return EpisodeResult(
            seed=seed, episode_return=float(value["return"]), steps=int(value["steps"]),
            terminated=bool(value["terminated"]), truncated=bool(value["truncated"]),
            error=value["error"], error_step=value["error_step"], traceback=value["traceback"],
            trace=value["trace"], lives_lost=int(value["lives_lost"]),
            duration_s=float(value.get("duration_s", outcome.duration_s)), policy_s=float(value["policy_s"]),
            stdout=stdout, actions=str(value.get("actions", "")), end_state=value.get("end_state"),
        )
    error = outcome.error or "the worker returned no result"
    if error.startswith("timeout"):
        error = (f"the worker was killed after exceeding its wall-clock budget ({error}); the policy "
                 f"ignored its {c.call_timeout_s * 1000:g} ms per-call limit")
    else:
        error = f"the worker process failed: {error}"
    tail = (outcome.stderr_tail or "").strip().splitlines()[-5:]
    return EpisodeResult(seed=seed, episode_return=0.0, steps=0, error=error,
                         traceback="\n".join(tail), duration_s=outcome.duration_s, stdout=stdout)


def replay(config: RolloutConfig, seed: int, actions: Sequence[int], *, start_state: str | None = None,
           frames: bool = False, end_state: bool = False):
    """Yield ``(reward, rgb_frame_or_None, state_or_None)`` for each action, replayed from
    ``reset(seed)`` (or ``start_state``) with the rollout's settings, in this process: trusted
    returns and states, and videos (``frames=True``). ``end_state=True`` adds the base64 state
    after the last action."""
    import base64

    from .env import ObjectEnv

    with ObjectEnv(config.game, frameskip=config.frameskip, max_steps=None, noop_max=config.noop_max,
                   repeat_action_probability=config.repeat_action_probability) as env:
        env.reset(seed=seed)
        if start_state:
            env.restore_state(base64.b64decode(start_state))
        for index, action in enumerate(actions):
            _, reward, _, _, _ = env.step(action)
            last = end_state and index == len(actions) - 1
            yield reward, (env.render_rgb() if frames else None), (
                base64.b64encode(env.clone_state()).decode("ascii") if last else None)


def evaluate_policy(source: str, game: str, seeds: Sequence[int], *, workers: int = 2,
                    **config: Any) -> list[EpisodeResult]:
    """One-shot convenience: ``PolicyRunner(RolloutConfig(game, **config), workers=workers).run(source, seeds)``."""
    with PolicyRunner(RolloutConfig(game=game, **config), workers=workers) as runner:
        return runner.run(source, seeds)


__all__ = ["EpisodeResult", "PolicyRunner", "RolloutConfig", "evaluate_policy", "replay",
           "run_episode_batch"]
