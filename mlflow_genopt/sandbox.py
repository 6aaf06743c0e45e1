"""Run untrusted, LLM-generated Python in a separate, limited process.

The learning loop never executes generated code in its own process. ``run_function`` starts
ONE child interpreter per batch, runs a trusted ``preamble`` (imports), then the generated
``source``, looks up ``function_name`` and calls it once per entry of ``calls``. Each call gets
its own :class:`SandboxResult`; an exception in one call does not stop the others, while a
timeout or crash of the whole process fails every call that had not finished, with the same
error. ``run_script`` runs a whole module instead of a function.

Return values travel back as JSON over a private pipe (never over stdout), so what the code
prints cannot be mistaken for its result. Output is captured per call, truncated to a tail,
and decoded with ``errors="replace"``.

What the sandbox enforces
-------------------------
The mechanisms are chosen at run time, strongest first, and the ones in effect on the current
machine are reported by :func:`isolation_report` and the module constants ``NETWORK_ISOLATION``,
``PRIVILEGE_DROP``, ``PROCESS_CONTAINMENT`` and ``PROC_VISIBILITY`` (computed lazily, by one
probe run, on first access). On Linux when the loop runs as root (the usual container setup):

* **Separate process, clean environment.** The code runs in a child interpreter
  (``python -s -P``) whose environment is a fixed allowlist (``PATH``, ``LANG``, ``LC_ALL``,
  ``HOME`` and ``TMPDIR`` pointing at the scratch dir, ``PYTHONHASHSEED=0``, single-thread
  BLAS/OpenMP settings, ``LD_LIBRARY_PATH`` if set). No other variable of the loop's process
  reaches it: no API keys, tokens, passwords, no ``MLFLOW_TRACKING_URI``.
* **Scratch directory.** cwd, ``HOME`` and ``TMPDIR`` are a fresh temporary directory holding
  only the ``files`` given; it is deleted afterwards unless ``workdir_keep=True``.
* **Privilege drop** (``PRIVILEGE_DROP``). ``"dedicated-uid"``: the code runs under a random,
  otherwise unused uid/gid (61184-65519, the range systemd uses for dynamic users) with no
  supplementary groups and ``no_new_privs`` set (setuid binaries such as ``sudo`` cannot
  raise it again). It can therefore write only to the scratch dir and world-writable places
  (``/tmp``, ``/var/tmp``, ``/dev/shm``); it cannot read files that are not world-readable,
  cannot signal or inspect the loop's processes or other sandboxes. If the Python
  installation is not reachable by other users (e.g. pyenv under a ``0700`` ``/root``), a
  private mount namespace bind-mounts just the interpreter, its standard library, the
  ``sys.path`` directories and the scratch dir into a fresh ``tmpfs`` over the blocking
  directory, so the rest of that directory stays hidden. Fallbacks:
  ``"dedicated-uid+dac_read_search"`` (Python not reachable and no mount namespace: the uid
  keeps the single capability to *read* every file, so it can read secrets in files, but
  still cannot write outside world-writable places, signal the loop, or read other processes'
  environments) and ``"none"``: the code runs as the loop's own user. That is always the case
  without root; as root it happens only when neither fallback is possible (e.g. Docker's
  default capability set and a Python install other users cannot read), and then the code
  can read and write whatever root can and ``max_processes`` is not enforced.
* **Process containment** (``PROCESS_CONTAINMENT``). ``"pid-namespace"``: the code runs as
  PID 1 of a new PID namespace, so when it ends or is killed the kernel kills every process it
  started, including ones that called ``setsid()``; fork bombs cannot outlive the call.
  Fallbacks: ``"uid-kill"`` (every process of the dedicated uid is killed),
  ``"subreaper"`` (the sandbox's first process is a child subreaper: every orphan the code
  leaves is re-parented to it and killed; only code that kills that process first, which
  requires running as the same uid, escapes) and ``"process-group"`` (non-Linux: the child's
  session is killed; a process that calls ``setsid()`` escapes). Without a PID namespace the
  subreaper is used as well as ``uid-kill``.
* **/proc** (``PROC_VISIBILITY``). ``"private"``: a fresh ``/proc`` for the new PID namespace,
  so the code sees only its own processes; ``/proc/<loop pid>/environ`` does not exist there
  (and with a dedicated uid it would be unreadable anyway). ``"host"``: the host's ``/proc``.
* **Network** (``NETWORK_ISOLATION``). ``"netns"``: with ``allow_network=False`` the code runs
  in a new, empty network namespace (only a down loopback), so no TCP/UDP connection to any
  host, including 127.0.0.1, is possible; filesystem Unix sockets remain reachable subject to
  file permissions. ``"python-guard"`` (no namespace available): ``socket.socket`` refuses
  ``AF_INET``/``AF_INET6``; generated code using ``ctypes`` or a subprocess can bypass it.
* **Resource limits.** Wall clock ``timeout_s`` for the whole batch (then the process tree is
  killed with SIGKILL and unfinished calls report "timeout after N s"). Per process
  (setrlimit): ``RLIMIT_AS`` = ``memory_mb`` (an allocation beyond it raises ``MemoryError``,
  reported as "memory limit N MB exceeded"); ``RLIMIT_NPROC`` = ``max_processes`` (processes
  and threads; enforced only with a dedicated uid or a user namespace, since the kernel
  exempts root); ``RLIMIT_CPU`` = ``cpu_s`` rounded up to whole seconds (reported as "cpu time
  limit N s exceeded"; it ends the batch, as the budget is the process's); ``RLIMIT_FSIZE`` =
  ``max_file_mb`` (a larger write fails with ``OSError``); ``RLIMIT_CORE`` = 0. Captured
  stdout/stderr and returned values are capped by ``max_output_bytes``.

Not enforced:

* Total memory of a process tree: ``RLIMIT_AS`` is per process, so N processes may use N times
  ``memory_mb`` (bounded by ``max_processes``); no cgroup is created.
* Reading world-readable files anywhere (``/etc``, the repository, world-readable files the
  loop itself writes, such as a local MLflow store). Keep secrets in files readable only by
  their owner.
* Writing to world-writable directories (``/tmp``, ``/dev/shm``), bounded per file by
  ``RLIMIT_FSIZE`` but not in total; such files are not cleaned up.
* Disk I/O, CPU share of the machine, GPU access (device files are as the host has them).
* Tampering with its own results: generated code runs in the same interpreter as the runner
  and can, deliberately, write to the result pipe (or fake the per-call output markers to
  move printed text between calls). Printing can never forge a result, but a score must be
  computed by the loop (or trusted code in another process), not trusted from the sandbox.
* Kernel vulnerabilities: this is process-level isolation, not a virtual machine.

Without root, the same code uses an unprivileged user namespace where the kernel allows it
(network, PID namespace and private ``/proc``, but no uid change); otherwise only the separate
process, clean environment, scratch dir, rlimits, subreaper and the Python-level network guard
remain. Non-Linux platforms get the latter set only (with a process group instead of the
subreaper). Starting a batch costs one interpreter start, about 50 ms plus the preamble's
imports.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

__all__ = [
    "SandboxLimits",
    "SandboxResult",
    "run_function",
    "run_script",
    "isolation_report",
]  # NETWORK_ISOLATION, PRIVILEGE_DROP, PROCESS_CONTAINMENT, PROC_VISIBILITY: lazy, see __getattr__

_RUNNER_FILE = os.path.abspath(__file__)
_CHILD_FLAG = "--genopt-sandbox-child"
_SOURCE_NAME = "generated.py"
_PREAMBLE_NAME = "preamble.py"
_TRACEBACK_LINES = 20
_EXIT_CPU_LIMIT = 152  # the runner's exit code after RLIMIT_CPU's SIGXCPU
_DYNAMIC_UID_RANGE = (61184, 65519)  # systemd's range for dynamic users: unused by real accounts


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
) -> list[SandboxResult]:
    """Run ``source`` in one sandboxed child process and call ``function_name(*args, **kwargs)``
    for each ``(args, kwargs)`` in ``calls``, in order. Returns one result per call.

    ``preamble`` is trusted code run before ``source`` in the same namespace (typically
    imports). ``files`` maps relative paths to contents written into the scratch dir before the
    code runs. Arguments must be JSON-serializable; so must return values (otherwise that
    call's result is an error). Never raises for anything the generated code does; raises
    ``TypeError``/``ValueError`` for bad arguments of this function."""
    if not isinstance(function_name, str) or not function_name.isidentifier():
        raise ValueError(f"function_name must be a Python identifier, got {function_name!r}")
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
    job = {"mode": "function", "source": source, "preamble": preamble, "function_name": function_name, "calls": call_list}
    results, _ = _execute(job, len(call_list), limits, files, workdir_keep)
    return results


def run_script(
    source: str,
    *,
    limits: SandboxLimits = SandboxLimits(),
    preamble: str = "",
    files: Mapping[str, bytes | str] | None = None,
    workdir_keep: bool = False,
) -> SandboxResult:
    """Run ``source`` as a whole module in the sandbox. ``ok`` is True when it ran to the end
    without an exception; ``value`` is always None; output is in ``stdout_tail``/``stderr_tail``."""
    job = {"mode": "script", "source": source, "preamble": preamble, "function_name": None, "calls": None}
    results, _ = _execute(job, 1, limits, files, workdir_keep)
    return results[0]


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
    "host"). See the module docstring for what each means."""
    global _isolation_cache
    if _isolation_cache is None:
        job = {"mode": "function", "source": "def probe():\n    return 1\n", "preamble": "",
               "function_name": "probe", "calls": [[[], {}]]}
        results, isolation = _execute(job, 1, SandboxLimits(timeout_s=60.0), None, False)
        if not results[0].ok or results[0].value != 1:
            raise RuntimeError(f"sandbox probe failed: {results[0].error}\n{results[0].stderr_tail}")
        _isolation_cache = {key: isolation.get(key, "unknown") for key in _ISOLATION_CONSTANTS.values()}
    return dict(_isolation_cache)


def __getattr__(name: str) -> str:
    if name in _ISOLATION_CONSTANTS:
        return isolation_report()[_ISOLATION_CONSTANTS[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


class _SegmentedTail:
    """One output stream, split at the runner's per-call markers; keeps each segment's tail.

    Segment -1 is what was printed before the first call (preamble and module level)."""

    def __init__(self, nonce: str, cap: int) -> None:
        self._prefix = f"\x1egenopt-{nonce}:".encode()
        self._hold = len(self._prefix) + 12
        self._pending = b""
        self._cap = cap
        self.current = -1
        self.segments: dict[int, bytearray] = {}
        self.dropped: dict[int, int] = {}
        self.started: dict[int, float] = {}

    def feed(self, data: bytes) -> None:
        buf = self._pending + data
        while True:
            start = buf.find(self._prefix)
            if start < 0:
                cut = max(0, len(buf) - self._hold)  # a marker may straddle two reads
                self._append(buf[:cut])
                self._pending = buf[cut:]
                return
            end = buf.find(b"\x1e", start + len(self._prefix), start + self._hold)
            if end < 0:
                if len(buf) - start < self._hold:
                    self._append(buf[:start])
                    self._pending = buf[start:]
                    return
                self._append(buf[: start + 1])  # not a marker after all
                buf = buf[start + 1 :]
                continue
            self._append(buf[:start])
            index = buf[start + len(self._prefix) : end]
            if index.isdigit():
                self.current = int(index)
                self.started.setdefault(self.current, time.monotonic())
            else:
                self._append(buf[start : end + 1])
            buf = buf[end + 1 :]

    def finish(self) -> None:
        self._append(self._pending)
        self._pending = b""

    def _append(self, data: bytes) -> None:
        if not data:
            return
        segment = self.segments.setdefault(self.current, bytearray())
        segment += data
        excess = len(segment) - self._cap
        if excess > 0:
            del segment[:excess]
            self.dropped[self.current] = self.dropped.get(self.current, 0) + excess

    def text(self, index: int) -> str:
        body = bytes(self.segments.get(index, b"")).decode("utf-8", errors="replace")
        dropped = self.dropped.get(index, 0)
        return f"[... {dropped} bytes truncated ...]\n{body}" if dropped else body


class _LineChannel:
    """JSON-lines reader with a byte cap; anything beyond the cap is discarded."""

    def __init__(self, cap: int) -> None:
        self._buf = bytearray()
        self._cap = cap
        self._seen = 0
        self.records: list[dict] = []
        self.overflow = False

    def feed(self, data: bytes) -> None:
        self._seen += len(data)
        if self._seen > self._cap:
            self.overflow = True
            data = data[: max(0, len(data) - (self._seen - self._cap))]
        self._buf += data
        while True:
            newline = self._buf.find(b"\n")
            if newline < 0:
                return
            line = bytes(self._buf[:newline])
            del self._buf[: newline + 1]
            try:
                record = _valid_unicode(json.loads(line.decode("utf-8", errors="replace")))
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict):
                self.records.append(record)


def _valid_unicode(value: Any) -> Any:
    """``value`` (parsed JSON) with lone surrogates in its strings replaced by U+FFFD. The child
    escapes them as ``"\\udc80"``; left in, they make every later UTF-8 encode fail (MLflow
    artifacts, the response cache, the next LLM request)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_valid_unicode(item) for item in value]
    if isinstance(value, dict):
        return {_valid_unicode(k): _valid_unicode(v) for k, v in value.items()}
    return value


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
            timed_out = _pump(proc, sinks, control, info, deadline=started + limits.timeout_s)
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


def _pump(proc: subprocess.Popen, sinks: dict, control: _LineChannel, info: dict, *, deadline: float) -> bool:
    """Feed the child's pipes to their sinks until all close; returns True on timeout."""
    reaped_at = None
    selector = selectors.DefaultSelector()
    try:
        for fd in sinks:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            now = time.monotonic()
            if now >= deadline:
                return True
            if reaped_at is not None and now - reaped_at > 1.0:
                return False  # the tree is dead; a pipe still open belongs to an escaped process
            for key, _ in selector.select(timeout=min(deadline - now, 0.1)):
                try:
                    data = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if data:
                    sinks[key.fd](data)
                else:
                    selector.unregister(key.fd)
            for record in control.records:
                info.update(record)
            control.records.clear()
            if reaped_at is None and ("status" in info or proc.poll() is not None):
                # The code's main process has ended: nothing it started may outlive it.
                _kill_tree(proc, info, pid1_alive="status" not in info)
                reaped_at = time.monotonic()
        return False
    finally:
        selector.close()


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


def _signal(pid: int, sig: int) -> int:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    return pid


def _is_namespace_init(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("NSpid:"):
                    return line.split()[-1] == "1"
    except OSError:
        pass
    return False


def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


# --------------------------------------------------------------------------------------------
# Child side. Runs as ``python -s -P sandbox.py --genopt-sandbox-child JOB``: first a trusted
# bootstrap (namespaces, uid choice), which forks the runner (rlimits, privilege drop, then
# the generated code). The bootstrap stays behind to report the runner's pid and exit status
# on a control pipe the runner closes.
# --------------------------------------------------------------------------------------------

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_KEEPCAPS, _PR_SET_NO_NEW_PRIVS = 1, 4, 8, 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE = 47, 2
_CAP_DAC_READ_SEARCH = 2
_PR_SET_CHILD_SUBREAPER = 36
_MNT_DETACH = 2


def _libc():
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _syscall_ok(libc, name: str, *args) -> bool:
    function = getattr(libc, name, None) if libc is not None else None
    return function is not None and function(*args) == 0


def _mount(libc, source, target, fstype, flags, data=None) -> bool:
    enc = lambda value: value.encode() if isinstance(value, str) else value  # noqa: E731
    return _syscall_ok(libc, "mount", enc(source), enc(target), enc(fstype), flags, enc(data))


def _write_control(fd: int, record: dict) -> None:
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    except OSError:
        pass


def _child_main(job_path: str) -> None:
    import ctypes, linecache, pwd, resource, traceback  # noqa: F401,E401 - load before privileges go
    with open(job_path, encoding="utf-8") as handle:
        job = json.load(handle)
    os.unlink(job_path)  # the generated code has no business seeing its own job description
    libc = _libc()
    _syscall_ok(libc, "prctl", _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # die with the loop
    limits, control_fd, result_fd = job["limits"], job["control_fd"], job["result_fd"]
    isolation = {"network": "allowed" if limits["allow_network"] else "python-guard",
                 "privilege": "none", "processes": "process-group", "proc": "host"}
    disabled = set(job["disabled"])
    namespaces = 0 if "namespaces" in disabled else _enter_namespaces(libc, limits["allow_network"], isolation)
    uid = None
    if os.geteuid() == 0 and sys.platform.startswith("linux") and "uid" not in disabled:
        uid = _choose_uid(libc, namespaces & ~(_CLONE_NEWNS if "mount" in disabled else 0), job["scratch"], isolation)
    nproc_base = 0 if uid is not None else _count_tasks(os.getuid())
    if isolation["processes"] == "process-group":
        if _syscall_ok(libc, "prctl", _PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0):
            isolation["processes"] = "subreaper"  # orphans of the code become our children, to be killed
        if uid is not None:
            isolation["processes"] = "uid-kill"  # and the loop kills every process of the uid
    pid1 = os.fork()
    if pid1 == 0:
        try:
            os.close(control_fd)
            _runner_main(job, libc, namespaces, uid, nproc_base, isolation)
        finally:
            os._exit(70)
    os.close(result_fd)

    def stop(signum=None, frame=None):
        _signal(pid1, signal.SIGKILL)
        _kill_descendants()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)  # the loop's way of ending a run that overstays
    _write_control(control_fd, {"pid1": pid1, "uid": uid, "isolation": isolation})
    while True:
        try:
            _, status, usage = os.wait4(pid1, 0)
            break
        except InterruptedError:
            continue
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _kill_descendants()
    _write_control(control_fd, {"status": status, "cpu_s": usage.ru_utime + usage.ru_stime})
    os._exit(0)


def _kill_descendants() -> None:
    """Kill our children until none is left; as a subreaper, the code's orphans come to us."""
    me = str(os.getpid())
    for _ in range(1000):
        children = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat", "rb") as handle:
                        fields = handle.read().rsplit(b")", 1)[1].split()
                except OSError:
                    continue
                if fields[1].decode() == me:
                    children.append(int(entry))
        for pid in children:
            _signal(pid, signal.SIGKILL)
        reaped = False
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
            reaped = True
        if not children and not reaped:
            time.sleep(0.01)


def _enter_namespaces(libc, allow_network: bool, isolation: dict) -> int:
    """Unshare what the kernel allows; returns the CLONE_* flags obtained."""
    if not sys.platform.startswith("linux") or libc is None:
        return 0
    wanted = _CLONE_NEWNS | _CLONE_NEWPID | (0 if allow_network else _CLONE_NEWNET)
    if os.geteuid() == 0:
        attempts = [(wanted, False)] + ([] if allow_network else [(_CLONE_NEWNET, False)])
    else:
        attempts = [(wanted, True)] + ([] if allow_network else [(_CLONE_NEWNET, True)])
    obtained = 0
    for flags, user in attempts:
        uid, gid = os.getuid(), os.getgid()
        if _syscall_ok(libc, "unshare", flags | (_CLONE_NEWUSER if user else 0)):
            if user:
                try:  # keep our own ids inside the namespace (no uid change without root)
                    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                                       ("/proc/self/gid_map", f"{gid} {gid} 1")):
                        with open(path, "w") as handle:
                            handle.write(text)
                except OSError:
                    pass
                isolation["userns"] = "yes"
            obtained = flags
            break
    if obtained & _CLONE_NEWNET:
        isolation["network"] = "netns"
    if obtained & _CLONE_NEWPID:
        isolation["processes"] = "pid-namespace"
    if obtained & _CLONE_NEWNS:
        _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we mount leaks out
    return obtained


def _choose_uid(libc, namespaces: int, scratch: str, isolation: dict) -> int | None:
    """As root: pick an unused uid the code will run as, and make sure it can run Python."""
    import pwd

    os.setgroups([])
    uid = None
    for _ in range(50):
        candidate = _DYNAMIC_UID_RANGE[0] + secrets.randbelow(_DYNAMIC_UID_RANGE[1] - _DYNAMIC_UID_RANGE[0])
        try:
            pwd.getpwuid(candidate)
            continue
        except KeyError:
            pass
        if not _pids_of_uid(candidate):
            uid = candidate
            break
    if uid is None or not _can_become(uid):
        return None
    for root, dirs, names in os.walk(scratch):  # the code's own place: writable by it alone
        for name in [root] + [os.path.join(root, n) for n in dirs + names]:
            os.lchown(name, uid, uid)
    needed = _paths_python_needs(scratch)
    if _accessible_as(uid, needed):
        isolation["privilege"] = "dedicated-uid"
    elif namespaces & _CLONE_NEWNS and _expose_paths(libc, needed) and _accessible_as(uid, needed):
        isolation["privilege"] = "dedicated-uid"
        isolation["python_install"] = "bind-mounted"
    elif _has_capability(_CAP_DAC_READ_SEARCH):
        isolation["privilege"] = "dedicated-uid+dac_read_search"
    else:
        return None  # e.g. Docker's default capability set: the code stays root
    return uid


def _has_capability(cap: int) -> bool:
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            permitted = next(int(line.split()[1], 16) for line in handle if line.startswith("CapPrm:"))
    except (OSError, StopIteration, ValueError):
        return False
    return bool(permitted >> cap & 1)


def _can_become(uid: int) -> bool:
    try:
        os.setegid(uid)
        os.seteuid(uid)
    except OSError:
        return False
    finally:
        try:
            os.seteuid(0)
            os.setegid(0)
        except OSError:
            pass
    return True


def _own_package_dirs() -> list[str]:
    """Where this library and its case studies live. An editable install maps them to the
    source checkout through an import hook rather than ``sys.path``, so trusted preambles that
    import them (e.g. the Atari worker) need these directories exposed explicitly."""
    import importlib.util

    dirs = []
    for name in ("mlflow_genopt", "genopt_projects"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.submodule_search_locations:
            dirs.extend(p for p in spec.submodule_search_locations if os.path.isdir(p))
    return dirs


def _paths_python_needs(scratch: str) -> list[str]:
    candidates = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, scratch,
                  os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(os.__file__)}
    candidates.update(entry for entry in sys.path if entry and os.path.isdir(entry))
    candidates.update(_own_package_dirs())
    real = sorted({os.path.realpath(path) for path in candidates if os.path.exists(path)})
    # a path inside another needed path comes along with it
    return [path for path in real if not any(path != other and path.startswith(other.rstrip("/") + "/") for other in real)]


def _accessible_as(uid: int, paths: list[str]) -> bool:
    checks = [(path, os.R_OK | os.X_OK) for path in paths]
    checks += [(os.path.realpath(sys.executable), os.X_OK), (os.path.realpath(os.__file__), os.R_OK)]
    try:
        os.setegid(uid)
        os.seteuid(uid)
        return all(os.access(path, mode, effective_ids=True) for path, mode in checks)
    except OSError:
        return False
    finally:
        os.seteuid(0)
        os.setegid(0)


def _expose_paths(libc, needed: list[str]) -> bool:
    """Mount a tmpfs over each directory that blocks other users from a needed path, then
    bind-mount only the needed paths back into it (in our private mount namespace)."""
    covers: dict[str, list[str]] = {}
    for path in needed:
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:depth])
            if not os.stat(ancestor).st_mode & 0o001:
                covers.setdefault(ancestor, [])
                break
    for cover in covers:
        covers[cover] = [path for path in needed if path.startswith(cover + "/")]
    for cover, paths in covers.items():
        handles = [(path, os.open(path, os.O_PATH)) for path in paths]
        try:
            if not _mount(libc, "tmpfs", cover, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=755,size=1m"):
                return False
            for path, fd in handles:
                os.makedirs(path, mode=0o755, exist_ok=True)
                if not _mount(libc, f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC):
                    libc.umount2(cover.encode(), _MNT_DETACH)  # leave the view as it was
                    return False
        finally:
            for _, fd in handles:
                os.close(fd)
    return True


def _count_tasks(uid: int) -> int:
    """Threads of ``uid`` now: RLIMIT_NPROC counts them all, not only ours."""
    total = 0
    for pid in _pids_of_uid(uid):
        try:
            with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
                total += next((int(line.split()[1]) for line in handle if line.startswith("Threads:")), 1)
        except (OSError, ValueError):
            pass
    return total


def _drop_privileges(libc, uid: int, keep_read_all: bool) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    if keep_read_all:
        _syscall_ok(libc, "prctl", _PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setresuid(uid, uid, uid)
    if keep_read_all:
        if not _set_capabilities(libc, 1 << _CAP_DAC_READ_SEARCH):
            raise OSError("could not restrict capabilities to CAP_DAC_READ_SEARCH")
        # so that subprocesses it starts (e.g. joblib workers) can load Python too
        _syscall_ok(libc, "prctl", _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, _CAP_DAC_READ_SEARCH, 0, 0)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError("privilege drop did not take effect")
    # The uid change made us non-dumpable, which leaves /proc/self owned by root (unreadable
    # /proc/self/fd, unwritable /proc/self/comm); as after an exec, our own uid may see it.
    _syscall_ok(libc, "prctl", _PR_SET_DUMPABLE, 1, 0, 0, 0)


def _set_capabilities(libc, mask: int) -> bool:
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (Data * 2)()
    data[0].effective = data[0].permitted = data[0].inheritable = mask & 0xFFFFFFFF
    data[1].effective = data[1].permitted = data[1].inheritable = mask >> 32
    return _syscall_ok(libc, "capset", ctypes.byref(header), data)


def _set_rlimits(limits: dict, nproc_base: int) -> None:
    import resource

    def cap(kind, soft, hard=None):
        try:
            resource.setrlimit(kind, (soft, soft if hard is None else hard))
        except (ValueError, OSError):
            pass

    cap(resource.RLIMIT_CORE, 0)
    if limits["max_file_mb"] is not None:
        cap(resource.RLIMIT_FSIZE, limits["max_file_mb"] << 20)
    if limits["cpu_s"] is not None:
        seconds = max(1, int(-(-limits["cpu_s"] // 1)))
        cap(resource.RLIMIT_CPU, seconds, seconds + 1)  # SIGXCPU first, SIGKILL a second later
    if limits["max_processes"] is not None and hasattr(resource, "RLIMIT_NPROC"):
        cap(resource.RLIMIT_NPROC, nproc_base + limits["max_processes"])
    if limits["memory_mb"] is not None:
        cap(resource.RLIMIT_AS, limits["memory_mb"] << 20)


def _install_socket_guard() -> None:
    import socket

    class GuardedSocket(socket.socket):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None and family in (-1, socket.AF_INET, socket.AF_INET6):
                raise PermissionError("network access is disabled in the sandbox")
            super().__init__(family, type, proto, fileno)

    socket.socket = GuardedSocket


def _runner_main(job: dict, libc, namespaces: int, uid: int | None, nproc_base: int, isolation: dict) -> None:
    global _C_STDIO
    _C_STDIO = libc
    result_fd, limits = job["result_fd"], job["limits"]
    emit = _Emitter(result_fd)
    try:
        if namespaces & _CLONE_NEWPID and namespaces & _CLONE_NEWNS:
            if _mount(libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC):
                isolation["proc"] = "private"
        if uid is not None:
            _drop_privileges(libc, uid, isolation["privilege"] == "dedicated-uid+dac_read_search")
        elif isolation.get("userns"):
            _set_capabilities(libc, 0)  # the namespace's creator holds all caps in it: give them up
        _syscall_ok(libc, "prctl", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        _syscall_ok(libc, "prctl", _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # reset by the uid change
        _set_rlimits(limits, nproc_base)
        if isolation["network"] == "python-guard":
            _install_socket_guard()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises instead of killing
        if limits["cpu_s"] is not None:
            signal.signal(signal.SIGXCPU, _raise_cpu_limit)  # as PID 1 we would ignore it otherwise
        os.chdir(job["scratch"])
    except BaseException as exc:  # noqa: BLE001 - report, never run the code half-isolated
        emit({"kind": "fatal", "error": f"sandbox setup failed: {_one_line(exc)}"})
        os._exit(71)
    emit({"kind": "setup", "isolation": isolation})
    _run_job(job, emit)
    _flush_std()
    os._exit(0)


class _CpuLimitExceeded(BaseException):
    """Raised in the code when RLIMIT_CPU's soft limit is reached; the process then ends, since
    the budget is the whole process's and the hard limit follows a second later."""


def _raise_cpu_limit(signum, frame):
    raise _CpuLimitExceeded("cpu time limit exceeded")


class _Emitter:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __call__(self, record: dict) -> None:
        data = (json.dumps(record, allow_nan=True) + "\n").encode()
        while data:
            try:
                written = os.write(self.fd, data)
            except InterruptedError:
                continue
            except OSError:
                return
            data = data[written:]


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - the code may have replaced or closed them
            pass
    if _C_STDIO is not None:
        _C_STDIO.fflush(None)  # output of C extensions, so it lands in the right call


_C_STDIO = None


def _run_job(job: dict, emit: _Emitter) -> None:
    import linecache

    limits = job["limits"]
    memory_reserve = bytearray(1 << 20)  # freed on MemoryError so we can still report it
    namespace: dict[str, Any] = {"__name__": "generated", "__builtins__": __builtins__}
    for filename, text in ((_PREAMBLE_NAME, job["preamble"]), (_SOURCE_NAME, job["source"])):
        linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    script = job["mode"] == "script"
    for filename, text in ((_PREAMBLE_NAME, job["preamble"]), (_SOURCE_NAME, job["source"])):
        if not text and filename == _PREAMBLE_NAME:
            continue
        if script and filename == _SOURCE_NAME:
            _mark_call(job["nonce"], 0)
        started = time.perf_counter()
        try:
            exec(compile(text, filename, "exec"), namespace)  # noqa: S102 - this is the sandbox
        except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt included
            memory_reserve = None
            error = _error_line(exc, limits)
            if filename == _PREAMBLE_NAME:
                error = f"preamble failed: {error}"
            record = {"error": error, "traceback": _traceback_tail(exc)}
            _flush_std()
            if script:
                emit({"kind": "call", "i": 0, "ok": False, "duration_s": time.perf_counter() - started, **record})
            else:
                emit({"kind": "fatal", **record})
            if isinstance(exc, _CpuLimitExceeded):
                os._exit(_EXIT_CPU_LIMIT)
            return
    if script:
        _flush_std()
        emit({"kind": "call", "i": 0, "ok": True, "value": None, "duration_s": time.perf_counter() - started})
        return

    name = job["function_name"]
    function = namespace.get(name)
    if not callable(function):
        defined = sorted(key for key, value in namespace.items() if callable(value) and not key.startswith("__")
                         and getattr(value, "__module__", None) == "generated")
        what = "does not define" if function is None else f"defines {name!r} as a {type(function).__name__}, not"
        hint = f" (it defines: {', '.join(defined)})" if defined else ""
        emit({"kind": "fatal", "error": f"the code {what} a function named {name!r}{hint}", "traceback": ""})
        return

    for index, (args, kwargs) in enumerate(job["calls"]):
        _mark_call(job["nonce"], index)
        started = time.perf_counter()
        try:
            value = function(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001
            memory_reserve = None
            record = {"ok": False, "error": _error_line(exc, limits), "traceback": _traceback_tail(exc)}
            if isinstance(exc, _CpuLimitExceeded):
                _flush_std()
                emit({"kind": "call", "i": index, "duration_s": time.perf_counter() - started, **record})
                os._exit(_EXIT_CPU_LIMIT)
        else:
            record = _encode_value(value, limits["max_output_bytes"])
        duration = time.perf_counter() - started
        value = None  # drop our reference before the next call
        _flush_std()
        if "value_json" in record:
            raw = record.pop("value_json")
            head = json.dumps({"kind": "call", "i": index, "ok": True, "duration_s": duration})
            emit_raw = f'{head[:-1]}, "value": {raw}}}\n'.encode()
            _write_all(emit.fd, emit_raw)
        else:
            emit({"kind": "call", "i": index, "duration_s": duration, **record})
        if memory_reserve is None:
            try:
                memory_reserve = bytearray(1 << 20)
            except MemoryError:
                pass


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except InterruptedError:
            continue
        except OSError:
            return


def _mark_call(nonce: str, index: int) -> None:
    """Tell the loop where call ``index``'s output starts, on both streams."""
    _flush_std()
    marker = f"\x1egenopt-{nonce}:{index}\x1e".encode()
    for fd in (1, 2):
        try:
            os.write(fd, marker)
        except OSError:
            pass


def _encode_value(value: Any, max_bytes: int) -> dict:
    try:
        encoded = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        return {"ok": False, "error": f"return value is not JSON-serializable: {type(value).__name__}", "traceback": ""}
    except MemoryError:
        return {"ok": False, "error": "return value too large to serialize (MemoryError)", "traceback": ""}
    if len(encoded) > max_bytes:
        return {"ok": False, "error": f"return value too large: {len(encoded)} bytes of JSON > max_output_bytes={max_bytes}",
                "traceback": ""}
    return {"value_json": encoded}


def _one_line(exc: BaseException) -> str:
    try:
        message = " ".join(str(exc).split())
    except Exception:  # noqa: BLE001 - a hostile __str__
        message = "<unprintable message>"
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text if len(text) <= 500 else text[:497] + "..."


def _error_line(exc: BaseException, limits: dict) -> str:
    if isinstance(exc, _CpuLimitExceeded):
        return f"cpu time limit {limits['cpu_s']:g}s exceeded"
    if isinstance(exc, MemoryError) and limits.get("memory_mb"):
        return f"memory limit {limits['memory_mb']} MB exceeded ({_one_line(exc)})"
    return _one_line(exc)


def _traceback_tail(exc: BaseException) -> str:
    import traceback

    def strip(summary, seen):  # hide the runner's own frames, wherever they appear
        if summary is None or id(summary) in seen:
            return
        seen.add(id(summary))
        summary.stack = traceback.StackSummary.from_list(
            [frame for frame in summary.stack if os.path.abspath(frame.filename) != _RUNNER_FILE])
        strip(summary.__cause__, seen)
        strip(summary.__context__, seen)
        for inner in getattr(summary, "exceptions", None) or ():
            strip(inner, seen)

    try:
        summary = traceback.TracebackException(type(exc), exc, exc.__traceback__)
        strip(summary, set())
        lines = "".join(summary.format()).splitlines()
        text = "\n".join(lines[-_TRACEBACK_LINES:])
        return text if len(text) <= 8000 else "..." + text[-8000:]
    except BaseException:  # noqa: BLE001
        return _one_line(exc)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == _CHILD_FLAG:
    _child_main(sys.argv[2])
