"""The child side of a sandboxed run, started by the loop as a script by file path:
``python -s -P _child.py --genopt-sandbox-child JOB``.

First a trusted bootstrap (namespaces, uid choice), which forks the runner (rlimits, privilege
drop, then the preamble and the generated code). The bootstrap stays behind to report the
runner's pid and exit status on a control pipe the runner closes; the runner reports each
call's result as a JSON line on a private result pipe.

Standard library only, and never the ``mlflow_genopt`` package: started by path (``-P`` keeps
this directory off ``sys.path``), it loads its one sibling, ``_isolation.py``, by path too, as
root and before any mount or uid change. The loop side imports this module only for the
constants it shares with the child.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

if __package__:  # imported by the loop as mlflow_genopt.sandbox._child
    from . import _isolation
else:  # started by path (or re-run by path, e.g. by multiprocessing's "spawn")

    def _load_sibling(name: str):
        import importlib.util

        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"_genopt_sandbox{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module

    _isolation = _load_sibling("_isolation")

_CHILD_FLAG = "--genopt-sandbox-child"
_SOURCE_NAME = "generated.py"
_PREAMBLE_NAME = "preamble.py"
_TRACEBACK_LINES = 20
_EXIT_CPU_LIMIT = 152  # the runner's exit code after RLIMIT_CPU's SIGXCPU
# Frames of these files are the sandbox's own: tracebacks shown to the user leave them out.
_OWN_FILES = frozenset(os.path.abspath(path) for path in (__file__, _isolation.__file__))


def _write_control(fd: int, record: dict) -> None:
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# Bootstrap: runs first, as the loop's user
# --------------------------------------------------------------------------------------------


def _child_main(job_path: str) -> None:
    import ctypes, linecache, pwd, resource, traceback  # noqa: F401,E401 - load before privileges go
    with open(job_path, encoding="utf-8") as handle:
        job = json.load(handle)
    os.unlink(job_path)  # the generated code has no business seeing its own job description
    iso = _isolation
    libc = iso._libc()
    iso._syscall_ok(libc, "prctl", iso._PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # die with the loop
    limits, control_fd, result_fd = job["limits"], job["control_fd"], job["result_fd"]
    isolation = {"network": "allowed" if limits["allow_network"] else "python-guard",
                 "privilege": "none", "processes": "process-group", "proc": "host"}
    disabled = set(job["disabled"])
    namespaces = 0 if "namespaces" in disabled else iso._enter_namespaces(libc, limits["allow_network"], isolation)
    uid = None
    if os.geteuid() == 0 and sys.platform.startswith("linux") and "uid" not in disabled:
        uid = iso._choose_uid(libc, namespaces & ~(iso._CLONE_NEWNS if "mount" in disabled else 0), job["scratch"],
                              isolation, job["expose_packages"])
    nproc_base = 0 if uid is not None else iso._count_tasks(os.getuid())
    if isolation["processes"] == "process-group":
        if iso._syscall_ok(libc, "prctl", iso._PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0):
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
        iso._signal(pid1, signal.SIGKILL)
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
            _isolation._signal(pid, signal.SIGKILL)
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


# --------------------------------------------------------------------------------------------
# Runner: isolates itself, then runs the preamble and the generated code
# --------------------------------------------------------------------------------------------


def _runner_main(job: dict, libc, namespaces: int, uid: int | None, nproc_base: int, isolation: dict) -> None:
    global _C_STDIO
    _C_STDIO = libc
    iso = _isolation
    result_fd, limits = job["result_fd"], job["limits"]
    emit = _Emitter(result_fd)
    try:
        if namespaces & iso._CLONE_NEWPID and namespaces & iso._CLONE_NEWNS:
            if iso._mount(libc, "proc", "/proc", "proc", iso._MS_NOSUID | iso._MS_NODEV | iso._MS_NOEXEC):
                isolation["proc"] = "private"
        if uid is not None:
            iso._drop_privileges(libc, uid, isolation["privilege"] == "dedicated-uid+dac_read_search")
        elif isolation.get("userns"):
            iso._set_capabilities(libc, 0)  # the namespace's creator holds all caps in it: give them up
        iso._syscall_ok(libc, "prctl", iso._PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        iso._syscall_ok(libc, "prctl", iso._PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # reset by the uid change
        iso._set_rlimits(limits, nproc_base)
        if isolation["network"] == "python-guard":
            iso._install_socket_guard()
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

    def strip(summary, seen):  # hide the sandbox's own frames, wherever they appear
        if summary is None or id(summary) in seen:
            return
        seen.add(id(summary))
        summary.stack = traceback.StackSummary.from_list(
            [frame for frame in summary.stack if os.path.abspath(frame.filename) not in _OWN_FILES])
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
