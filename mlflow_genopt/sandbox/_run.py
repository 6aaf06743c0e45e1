"""One sandboxed batch, from the loop's side: the limits and result types, ``run_function`` and
``run_script``, the isolation probe, and ``_execute``, which writes the job, starts the child
(``_child.py``, by path), pumps its pipes, kills its process tree and turns what it reported
into one :class:`SandboxResult` per call."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from . import _child
from ._isolation import _is_namespace_init, _pids_of_uid, _signal
from ._pump import _LineChannel, _pump, _SegmentedTail

_RUNNER_FILE = os.path.abspath(_child.__file__)
_CHILD_FLAG = _child._CHILD_FLAG
_EXIT_CPU_LIMIT = _child._EXIT_CPU_LIMIT


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one sandboxed run. ``timeout_s`` is wall clock for the whole call (process
    start to last result); ``memory_mb`` is the address-space limit of each process;
    ``max_output_bytes`` bounds each captured stream (shared between the calls of a batch,
    each keeping its tail) and each returned value; ``max_processes`` bounds processes and
    threads (``None``: no limit); ``cpu_s`` bounds CPU seconds per process (``None``: no limit);
    ``max_file_mb`` bounds the size of any file written; ``allow_network`` lifts the network
    block."""

    timeout_s: float = 10.0
    memory_mb: int | None = 1024
    max_output_bytes: int = 1_000_000
    max_processes: int | None = 64
    cpu_s: float | None = None
    allow_network: bool = False
    max_file_mb: int | None = 64

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if self.memory_mb is not None and self.memory_mb < 32:
            raise ValueError(f"memory_mb must be >= 32 (the interpreter needs it) or None, got {self.memory_mb!r}")
        if self.max_output_bytes < 1024:
            raise ValueError(f"max_output_bytes must be >= 1024, got {self.max_output_bytes!r}")
        if self.max_processes is not None and self.max_processes < 1:
            raise ValueError(f"max_processes must be >= 1 or None, got {self.max_processes!r}")
        if self.cpu_s is not None and not self.cpu_s > 0:
            raise ValueError(f"cpu_s must be > 0 or None, got {self.cpu_s!r}")
        if self.max_file_mb is not None and self.max_file_mb < 1:
            raise ValueError(f"max_file_mb must be >= 1 or None, got {self.max_file_mb!r}")


@dataclass
class SandboxResult:
    """The outcome of one call. ``ok`` is True when the call returned a JSON-serializable value,
    which is then in ``value`` (decoded). Otherwise ``error`` is a one-line description such as
    ``"timeout after 10s"``, ``"memory limit 1024 MB exceeded (MemoryError)"``,
    ``"NameError: name 'x' is not defined"`` or ``"killed by signal 9 (SIGKILL)"``, and
    ``traceback_tail`` holds the last lines of the traceback without sandbox internals.
    ``stdout_tail``/``stderr_tail`` are what this call printed (the first call also gets what
    the module printed while loading), truncated from the front. ``workdir`` is the scratch
    directory when it was kept (``workdir_keep=True``), else None."""

    ok: bool
    value: Any = None
    error: str | None = None
    traceback_tail: str = ""
    stdout_tail: str = ""
    stderr_tail: str = ""
    duration_s: float = 0.0
    workdir: str | None = None



# --------------------------------------------------------------------------------------------
# Public API (loop side)
# --------------------------------------------------------------------------------------------


def run_function(
    source: str,
    function_name: str,
    calls: Sequence[tuple[Sequence[Any], Mapping[str, Any]]],
    *,
    limits: SandboxLimits = SandboxLimits(),
    preamble: str = "",
    files: Mapping[str, bytes | str] | None = None,
    workdir_keep: bool = False,
    expose_packages: Sequence[str] = (),
) -> list[SandboxResult]:
    """Run ``source`` in one sandboxed child process and call ``function_name(*args, **kwargs)``
    for each ``(args, kwargs)`` in ``calls``, in order. Returns one result per call.

    ``preamble`` is trusted code run before ``source`` in the same namespace (typically
    imports). ``files`` maps relative paths to contents written into the scratch dir before the
    code runs. Arguments must be JSON-serializable; so must return values (otherwise that
    call's result is an error). Never raises for anything the generated code does; raises
    ``TypeError``/``ValueError`` for bad arguments of this function.

    ``expose_packages`` names importable packages (e.g. ``("mypkg",)``; a dotted name stands
    for its top-level package) that trusted code in the sandbox imports: the ``preamble``, or
    a trusted ``source`` such as a worker's entry point. The Python installation and every
    ``sys.path`` directory are always readable to the code; a package found only through an
    import hook (as an editable install maps a package to its source checkout) is not, when
    the code runs under a dedicated uid and the checkout is under a directory other users
    cannot enter. Naming it makes the sandbox expose that package's directories too (by the
    same private bind mounts as the Python installation). Generated code can then read them as
    well, so name only what the trusted code imports. A name that cannot be found is ignored
    (the import then fails inside the sandbox with the usual ``ModuleNotFoundError``)."""
    if not isinstance(function_name, str) or not function_name.isidentifier():
        raise ValueError(f"function_name must be a Python identifier, got {function_name!r}")
    packages = _package_names(expose_packages)
    call_list = []
    for index, call in enumerate(calls):
        try:
            args, kwargs = call
        except (TypeError, ValueError):
            raise TypeError(f"calls[{index}] must be an (args, kwargs) pair, got {call!r}") from None
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs, Mapping):
            raise TypeError(f"calls[{index}] must be (list, dict), got ({type(args).__name__}, {type(kwargs).__name__})")
        call_list.append([list(args), dict(kwargs)])
    if not call_list:
        return []
    job = {"mode": "function", "source": source, "preamble": preamble, "function_name": function_name,
           "calls": call_list, "expose_packages": packages}
    results, _ = _execute(job, len(call_list), limits, files, workdir_keep)
    return results


def run_script(
    source: str,
    *,
    limits: SandboxLimits = SandboxLimits(),
    preamble: str = "",
    files: Mapping[str, bytes | str] | None = None,
    workdir_keep: bool = False,
    expose_packages: Sequence[str] = (),
) -> SandboxResult:
    """Run ``source`` as a whole module in the sandbox. ``ok`` is True when it ran to the end
    without an exception; ``value`` is always None; output is in ``stdout_tail``/``stderr_tail``.
    The other arguments are those of :func:`run_function`."""
    job = {"mode": "script", "source": source, "preamble": preamble, "function_name": None, "calls": None,
           "expose_packages": _package_names(expose_packages)}
    results, _ = _execute(job, 1, limits, files, workdir_keep)
    return results[0]


def _package_names(expose_packages: Sequence[str]) -> list[str]:
    """The distinct top-level package names of ``expose_packages``, validated."""
    if isinstance(expose_packages, (str, bytes)):
        raise TypeError(f"expose_packages must be a sequence of package names, got the string {expose_packages!r} "
                        f"(write ({expose_packages!r},) for one package)")
    names: list[str] = []
    for name in expose_packages:
        if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(f"expose_packages entries must be importable package names such as 'mypkg' or "
                             f"'mypkg.sub', got {name!r}")
        top = name.split(".")[0]
        if top not in names:
            names.append(top)
    return names


# --------------------------------------------------------------------------------------------
# What this machine enforces
# --------------------------------------------------------------------------------------------

_ISOLATION_CONSTANTS = {
    "NETWORK_ISOLATION": "network",
    "PRIVILEGE_DROP": "privilege",
    "PROCESS_CONTAINMENT": "processes",
    "PROC_VISIBILITY": "proc",
}
_isolation_cache: dict[str, str] | None = None
# Mechanisms to skip, so tests can exercise the fallbacks: "namespaces", "mount", "uid".
_DISABLED_MECHANISMS: frozenset[str] = frozenset()


def isolation_report() -> dict[str, str]:
    """Which mechanisms the sandbox uses on this machine, as found by one probe run with the
    default limits (cached): ``network`` ("netns" or "python-guard"), ``privilege``
    ("dedicated-uid", "dedicated-uid+dac_read_search" or "none"), ``processes``
    ("pid-namespace", "uid-kill", "subreaper" or "process-group"), ``proc`` ("private" or
    "host"). See the docstring of :mod:`mlflow_genopt.sandbox` for what each means."""
    global _isolation_cache
    if _isolation_cache is None:
        job = {"mode": "function", "source": "def probe():\n    return 1\n", "preamble": "",
               "function_name": "probe", "calls": [[[], {}]], "expose_packages": []}
        results, isolation = _execute(job, 1, SandboxLimits(timeout_s=60.0), None, False)
        if not results[0].ok or results[0].value != 1:
            raise RuntimeError(f"sandbox probe failed: {results[0].error}\n{results[0].stderr_tail}")
        _isolation_cache = {key: isolation.get(key, "unknown") for key in _ISOLATION_CONSTANTS.values()}
    return dict(_isolation_cache)


# --------------------------------------------------------------------------------------------
# Loop side: spawning, reading, killing
# --------------------------------------------------------------------------------------------


def _child_env(scratch: str) -> dict[str, str]:
    env = {
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": scratch,
        "TMPDIR": scratch,
        "USER": "sandbox",
        "LOGNAME": "sandbox",
        "PYTHONHASHSEED": "0",
        "PYTHONUTF8": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "NUMEXPR_NUM_THREADS": "1",
        "VECLIB_MAXIMUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }
    # Some interpreters (conda, custom builds) cannot start without it; it holds no secret.
    if os.environ.get("LD_LIBRARY_PATH"):
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    return env


def _write_files(scratch: str, files: Mapping[str, bytes | str] | None) -> None:
    for name, content in (files or {}).items():
        parts = name.replace("\\", "/").split("/")
        if not name or os.path.isabs(name) or any(part in ("", ".", "..") for part in parts) or "\0" in name:
            raise ValueError(f"files keys must be relative paths inside the scratch dir, got {name!r}")
        path = os.path.join(scratch, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
        with open(path, "wb") as handle:
            handle.write(data)


def _execute(job: dict, n_results: int, limits: SandboxLimits, files, workdir_keep: bool):
    if not isinstance(limits, SandboxLimits):
        raise TypeError(f"limits must be a SandboxLimits, got {type(limits).__name__}")
    scratch = tempfile.mkdtemp(prefix="genopt-sandbox-")
    proc = None
    fds: list[int] = []
    try:
        _write_files(scratch, files)
        nonce = secrets.token_hex(8)
        result_r, result_w = os.pipe()
        control_r, control_w = os.pipe()
        fds += [result_r, result_w, control_r, control_w]
        job = dict(job, nonce=nonce, result_fd=result_w, control_fd=control_w, scratch=scratch, limits=asdict(limits),
                   disabled=sorted(_DISABLED_MECHANISMS))
        job_path = os.path.join(scratch, ".genopt-job.json")
        try:
            payload = json.dumps(job, allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"call arguments must be JSON-serializable: {exc}") from None
        with open(os.open(job_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as handle:
            handle.write(payload)

        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-s", "-P", _RUNNER_FILE, _CHILD_FLAG, job_path],
            cwd=scratch,
            env=_child_env(scratch),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(result_w, control_w),
            start_new_session=True,
            close_fds=True,
        )
        for fd in (result_w, control_w):
            os.close(fd)
            fds.remove(fd)

        segment_cap = max(min(limits.max_output_bytes, 4096), limits.max_output_bytes // (n_results + 1))
        out = _SegmentedTail(nonce, segment_cap)
        err = _SegmentedTail(nonce, segment_cap)
        results = _LineChannel(limits.max_output_bytes * (n_results + 1) + 65536)
        control = _LineChannel(65536)
        sinks = {proc.stdout.fileno(): out.feed, proc.stderr.fileno(): err.feed, result_r: results.feed, control_r: control.feed}
        info: dict[str, Any] = {}
        try:
            timed_out = _pump(proc, sinks, control, info, deadline=started + limits.timeout_s,
                              on_exit=lambda: _kill_tree(proc, info, pid1_alive="status" not in info))
        finally:
            _kill_tree(proc, info, pid1_alive="status" not in info)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            ended = time.monotonic()
        for record in control.records:
            info.update(record)
        out.finish()
        err.finish()
        isolation = dict(info.get("isolation", {}))
        outcome = _collect(results, out, err, info, n_results, limits, timed_out, ended, isolation)
        if workdir_keep:
            for result in outcome:
                result.workdir = scratch
        return outcome, isolation
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        if proc is not None:
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        if not workdir_keep:
            shutil.rmtree(scratch, ignore_errors=True)


def _collect(results, out, err, info, n, limits, timed_out, ended, isolation) -> list[SandboxResult]:
    by_index: dict[int, dict] = {}
    fatal = None
    for record in results.records:
        kind = record.get("kind")
        if kind == "setup":
            isolation.update(record.get("isolation", {}))
        elif kind == "fatal" and fatal is None:
            fatal = record
        elif kind == "call" and isinstance(record.get("i"), int) and 0 <= record["i"] < n:
            by_index.setdefault(record["i"], record)  # first record wins

    if timed_out:
        crash = f"timeout after {limits.timeout_s:g}s"
    elif fatal is not None:
        crash = str(fatal.get("error", "sandbox setup failed"))
    else:
        crash = _describe_exit(info.get("status"), float(info.get("cpu_s", 0.0)), limits, results.overflow)

    outcome = []
    setup_out, setup_err = out.text(-1), err.text(-1)
    for i in range(n):
        shared = i == 0 or not by_index  # loading output goes to the first call, or to all if none ran
        prefix_out, prefix_err = (setup_out, setup_err) if shared else ("", "")
        stdout_tail = _tail_join(prefix_out, out.text(i), limits.max_output_bytes)
        stderr_tail = _tail_join(prefix_err, err.text(i), limits.max_output_bytes)
        record = by_index.get(i)
        if record is not None:
            outcome.append(SandboxResult(
                ok=bool(record.get("ok")),
                value=record.get("value") if record.get("ok") else None,
                error=None if record.get("ok") else str(record.get("error")),
                traceback_tail=str(record.get("traceback", "")),
                stdout_tail=stdout_tail,
                stderr_tail=stderr_tail,
                duration_s=float(record.get("duration_s", 0.0)),
            ))
            continue
        began = out.started.get(i)
        outcome.append(SandboxResult(
            ok=False,
            error=crash,
            traceback_tail=str(fatal.get("traceback", "")) if fatal else "",
            stdout_tail=stdout_tail,
            stderr_tail=stderr_tail,
            duration_s=round(ended - began, 6) if began is not None else 0.0,
        ))
    return outcome


def _tail_join(head: str, body: str, cap: int) -> str:
    text = head + body
    return text if len(text) <= cap else f"[... truncated ...]\n{text[-cap:]}"


def _describe_exit(status, cpu_used: float, limits: SandboxLimits, overflow: bool) -> str:
    if overflow:
        return f"results exceeded max_output_bytes={limits.max_output_bytes}"
    if status is None:
        return "sandbox process ended without reporting a result"
    code = os.waitstatus_to_exitcode(int(status))
    if limits.cpu_s is not None and (code == _EXIT_CPU_LIMIT or (code < 0 and cpu_used >= limits.cpu_s)):
        return f"cpu time limit {limits.cpu_s:g}s exceeded"
    if code < 0:
        sig = -code
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {sig} ({name})"
    return f"sandbox process exited with code {code} before returning a result"


def _kill_tree(proc: subprocess.Popen, info: dict, *, pid1_alive: bool) -> None:
    """Kill the child and everything it started, by every handle the run reported."""
    pid1 = info.get("pid1")
    isolation = info.get("isolation", {})
    if pid1_alive and isinstance(pid1, int) and isolation.get("processes") == "pid-namespace":
        if _is_namespace_init(pid1):
            _signal(pid1, signal.SIGKILL)  # the kernel then kills the whole namespace
    if isolation.get("processes") in ("subreaper", "uid-kill") and proc.poll() is None:
        _signal(proc.pid, signal.SIGTERM)  # the bootstrap kills the tree it adopted, then exits
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    uid = info.get("uid")
    if isinstance(uid, int) and uid != 0 and isolation.get("processes") == "uid-kill":
        for _ in range(20):  # a fork bomb may keep spawning while we kill; NPROC bounds it
            if not [_signal(pid, signal.SIGKILL) for pid in _pids_of_uid(uid)]:
                break
