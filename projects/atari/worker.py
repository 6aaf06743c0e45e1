"""The child side of a rollout: the emulator and the generated policy in one sandboxed process.

:mod:`genopt_projects.atari.policy_runner` starts a sandboxed interpreter
(:func:`mlflow_genopt.sandbox.run_function`) whose trusted entry point, :data:`ENTRY_SOURCE`,
calls :func:`run_episode` once per episode. Nothing here runs in the learning loop's process,
and this module imports neither MLflow nor the library core, so a worker starts in a fraction
of a second.

Per episode: the policy source is executed in a fresh namespace (no state leaks between
episodes), Python's ``random`` is seeded with the episode seed, and each call of the entry
function runs under a real-time interval timer: when it fires, a :class:`PolicyTimeout` is raised
inside the policy (and again every ``call_timeout_s`` if the policy swallows it; the parent kills
the whole process when the batch's wall-clock budget runs out). The first error (exception,
timeout, invalid action, episode wall-clock limit) ends the episode; it is returned as data, never
raised.
"""

from __future__ import annotations

import base64
import linecache
import random
import signal
import sys
import time
import traceback
from typing import Any, Callable, Mapping

from .env import ObjectEnv
from .games import GameSpec

POLICY_FILENAME = "policy.py"
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
TRACEBACK_LINES = 12

# The trusted code the sandbox runs: one call of ``_genopt_atari_episode`` per episode.
ENTRY_FUNCTION = "_genopt_atari_episode"
ENTRY_SOURCE = (
    "from genopt_projects.atari.worker import run_episode as _genopt_run_episode\n"
    f"def {ENTRY_FUNCTION}(job):\n"
    "    return _genopt_run_episode(job)\n"
)


def entry_source() -> str:
    """:data:`ENTRY_SOURCE`, preceded by what makes the worker import what this process
    imports: this process's ``sys.path`` directories (the sandbox's interpreter starts without
    ``PYTHONPATH``; the sandbox exposes these directories anyway), where a plug-in game may be
    installed, and ``genopt_projects`` loaded from the directory this process loaded it from
    (where another copy is installed, e.g. a second checkout next to an editable install, the
    worker would otherwise run that copy and not know the games this process knows)."""
    import os

    root = os.path.realpath(os.path.dirname(sys.modules["genopt_projects"].__file__))
    paths = [p for p in dict.fromkeys(sys.path) if p and os.path.isabs(p) and os.path.isdir(p)]
    return (
        "import importlib.util as _genopt_util, sys as _genopt_sys\n"
        f"_genopt_sys.path.extend(p for p in {paths!r} if p not in _genopt_sys.path)\n"
        "if 'genopt_projects' not in _genopt_sys.modules:\n"
        f"    _spec = _genopt_util.spec_from_file_location('genopt_projects', {os.path.join(root, '__init__.py')!r},\n"
        f"                                                 submodule_search_locations=[{root!r}])\n"
        "    _module = _genopt_util.module_from_spec(_spec)\n"
        "    _genopt_sys.modules['genopt_projects'] = _module\n"
        "    _spec.loader.exec_module(_module)\n"
        + ENTRY_SOURCE
    )


class PolicyTimeout(BaseException):
    """Raised inside a policy call that overran its time limit (a BaseException, so that a
    policy's ``except Exception`` does not swallow it)."""


_envs: dict[tuple, ObjectEnv] = {}


def _env_for(job: Mapping[str, Any]) -> ObjectEnv:
    key = (job["game"], job["frameskip"], job["repeat_action_probability"], job["noop_max"])
    env = _envs.get(key)
    if env is None:
        env = _envs[key] = ObjectEnv(job["game"], frameskip=job["frameskip"],
                                     repeat_action_probability=job["repeat_action_probability"],
                                     noop_max=job["noop_max"])
    env.max_steps = job["max_steps"]
    return env


def summarize(observation: Mapping[str, Any], max_items: int = 6) -> dict:
    """A compact, JSON-ready copy of an observation for traces: objects keep position, motion
    and their labels (``lane``, ``color``...), not their constant size or id; long lists keep
    ``max_items`` objects (the ones nearest the top-left, in extractor order) and a count."""
    summary: dict[str, Any] = {}
    for name, value in observation.items():
        if value is None or isinstance(value, (int, float, str)):
            summary[name] = value
        elif isinstance(value, Mapping):
            summary[name] = _compact(value)
        else:
            items = [_compact(item) for item in list(value)[:max_items]]
            if len(value) > max_items:
                items.append(f"... {len(value) - max_items} more")
            summary[name] = items
    return summary


def _compact(item: Mapping[str, Any]) -> dict:
    return {key: value for key, value in item.items() if key not in ("w", "h", "id")}


def _policy_traceback(exc: BaseException) -> str:
    """The traceback from the first frame of the policy's own code, without this module's
    frames (the timer's handler)."""
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if frame.filename != __file__]
    while frames and frames[0].filename != POLICY_FILENAME:
        frames.pop(0)
    lines = ["Traceback (most recent call last):\n"] if frames else []
    lines += traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc)
    return "\n".join("".join(lines).rstrip().splitlines()[-TRACEBACK_LINES:])


def _one_line(exc: BaseException) -> str:
    try:
        message = " ".join(str(exc).split())
    except Exception:  # noqa: BLE001 - a hostile __str__
        message = "<unprintable>"
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _describe_action(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001
        text = "<unprintable>"
    return (text if len(text) <= 60 else text[:57] + "...") + f" ({type(value).__name__})"


def _check_action(value: Any, spec: GameSpec) -> int | None:
    if type(value) is int:
        return value if 0 <= value < spec.n_actions else None
    if isinstance(value, bool):
        return None
    if hasattr(value, "__index__") and type(value).__module__ == "numpy":
        value = int(value)
        return value if 0 <= value < spec.n_actions else None
    return None


def load_policy(source: str, entry: str) -> Callable:
    """Execute ``source`` in a fresh namespace and return its ``entry`` function (raises what the
    source raises, or ``LookupError`` when it defines no such function)."""
    linecache.cache[POLICY_FILENAME] = (len(source), None, source.splitlines(True), POLICY_FILENAME)
    namespace: dict[str, Any] = {"__name__": "policy", "__builtins__": __builtins__}
    exec(compile(source, POLICY_FILENAME, "exec"), namespace)  # noqa: S102 - we are the sandbox
    function = namespace.get(entry)
    if not callable(function):
        defined = sorted(k for k, v in namespace.items() if callable(v) and getattr(v, "__module__", None) == "policy")
        raise LookupError(f"the policy does not define a function {entry!r}"
                          + (f" (it defines: {', '.join(defined)})" if defined else ""))
    return function


def run_episode(job: Mapping[str, Any]) -> dict:
    """Play one episode of ``job["source"]``'s ``job["entry"]`` function. ``job`` keys: source,
    entry, game, seed, max_steps, frameskip, repeat_action_probability, noop_max,
    call_timeout_s, episode_timeout_s, trace_every, trace_head, trace_tail, max_items; optional
    start_state (base64 of :meth:`ObjectEnv.clone_state`: continue from there instead of the
    reset state) and return_state (add ``end_state``). Returns a
    JSON-ready dict (see :class:`~genopt_projects.atari.policy_runner.EpisodeResult`)."""
    started = time.perf_counter()
    result: dict[str, Any] = {"seed": job["seed"], "return": 0.0, "steps": 0, "terminated": False,
                              "truncated": False, "error": None, "error_step": None, "traceback": "",
                              "trace": [], "policy_s": 0.0, "lives_lost": 0}
    random.seed(job["seed"])
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(job["seed"] % 2**32)
    try:
        policy = load_policy(job["source"], job["entry"])
    except BaseException as exc:  # noqa: BLE001 - SyntaxError, SystemExit, anything at import
        result["error"] = f"the policy failed to load: {_one_line(exc)}"
        result["traceback"] = _policy_traceback(exc) if not isinstance(exc, LookupError) else ""
        result["duration_s"] = time.perf_counter() - started
        return result

    env = _env_for(job)
    spec = env.spec
    observation, info = env.reset(seed=job["seed"])
    if job.get("start_state"):
        observation = env.restore_state(base64.b64decode(job["start_state"]))
        info = env._info()
    lives = info["lives"]
    call_timeout = float(job["call_timeout_s"])
    deadline = started + float(job["episode_timeout_s"])
    every, head, tail = max(1, int(job["trace_every"])), int(job["trace_head"]), int(job["trace_tail"])
    max_items = int(job["max_items"])
    trace: list[dict] = []
    actions: list[str] = []  # every action, one letter each ("a" = 0), for replays
    recent: list[dict] = []  # the last ``tail`` steps, whatever ``every`` says
    total = 0.0
    policy_time = 0.0
    step = 0
    setitimer, clock = signal.setitimer, time.perf_counter

    def on_alarm(signum, frame):
        raise PolicyTimeout(f"policy call exceeded {call_timeout * 1000:g} ms")

    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    try:
        while True:
            summary = summarize(observation, max_items)
            t0 = clock()
            try:
                setitimer(signal.ITIMER_REAL, call_timeout, call_timeout)
                try:
                    value = policy(observation)
                finally:
                    setitimer(signal.ITIMER_REAL, 0)
            except PolicyTimeout as exc:
                result["error"] = f"{exc} at step {step}"
                result["traceback"] = _policy_traceback(exc)
                break
            except BaseException as exc:  # noqa: BLE001 - the policy's exceptions are feedback
                result["error"] = f"the policy raised {_one_line(exc)} at step {step}"
                result["traceback"] = _policy_traceback(exc)
                break
            elapsed = clock() - t0
            policy_time += elapsed
            if elapsed > call_timeout * 1.5:  # the policy caught the timeout and went on
                result["error"] = (f"policy call took {elapsed * 1000:.0f} ms at step {step} "
                                   f"(limit {call_timeout * 1000:g} ms)")
                break
            action = _check_action(value, spec)
            if action is None:
                meanings = ", ".join(f"{i}={name}" for i, name in enumerate(spec.action_meanings))
                result["error"] = (f"{job['entry']} returned {_describe_action(value)} at step {step}; "
                                   f"expected an int action: {meanings}")
                break
            observation, reward, terminated, truncated, info = env.step(action)
            actions.append(_LETTERS[action])
            total += reward
            record = {"t": step, "obs": summary, "action": action, "reward": reward}
            if info["lives"] < lives:
                record["life_lost"] = True
                result["lives_lost"] += 1
            lives = info["lives"]
            if step % every == 0 and len(trace) < head:
                trace.append(record)
            recent.append(record)
            if len(recent) > tail:
                del recent[0]
            step += 1
            if terminated or truncated:
                result["terminated"], result["truncated"] = terminated, truncated
                break
            if clock() > deadline:
                result["error"] = (f"episode exceeded its wall-clock limit of {job['episode_timeout_s']:g} s "
                                   f"at step {step}")
                break
    finally:
        setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
    if result["error"] is not None:
        result["error_step"] = step
        recent.append({"t": step, "obs": summarize(observation, max_items), "action": None, "reward": 0.0})
    seen = {record["t"] for record in trace}
    trace.extend(record for record in recent if record["t"] not in seen)
    result.update({"return": total, "steps": step, "trace": trace, "actions": "".join(actions), "policy_s": policy_time,
                   "duration_s": clock() - started})
    if job.get("return_state"):
        result["end_state"] = base64.b64encode(env.clone_state()).decode("ascii")
    return result
