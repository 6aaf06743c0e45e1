"""The isolation mechanisms the child applies to itself: namespaces, uid choice, exposed paths,
capabilities, rlimits and the socket guard, plus the /proc helpers both sides use to find and
kill processes.

Standard library only: the child (``_child.py``, started by path) loads this file by path,
before it drops privileges, without importing the ``mlflow_genopt`` package.
"""

from __future__ import annotations

import os
import secrets
import sys
from typing import Sequence

_DYNAMIC_UID_RANGE = (61184, 65519)  # systemd's range for dynamic users: unused by real accounts
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


# --------------------------------------------------------------------------------------------
# Processes, as /proc shows them (used by the loop to kill, and by the child to choose a uid)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# System calls
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Namespaces
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Dedicated uid, and the paths it must be able to read
# --------------------------------------------------------------------------------------------


def _choose_uid(libc, namespaces: int, scratch: str, isolation: dict, expose_packages: Sequence[str]) -> int | None:
    """As root: pick an unused uid the code will run as, and make sure it can run Python (and
    import ``expose_packages``)."""
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
    needed = _paths_python_needs(scratch, expose_packages)
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


def _package_dirs(names: Sequence[str]) -> list[str]:
    """Where the importable packages ``names`` (top-level names) live. An editable install maps
    a package to its source checkout through an import hook rather than ``sys.path``, so trusted
    code that imports such a package needs its directories exposed explicitly. A name that
    cannot be found is skipped (the import then fails inside the sandbox as usual)."""
    import importlib.util

    dirs = []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.submodule_search_locations:
            dirs.extend(p for p in spec.submodule_search_locations if os.path.isdir(p))
    return dirs


def _paths_python_needs(scratch: str, expose_packages: Sequence[str]) -> list[str]:
    # The sandbox's own directory: a process the code starts by re-running the main script
    # (multiprocessing's "spawn") reads the child's files under the dedicated uid.
    own_dir = os.path.dirname(os.path.abspath(__file__))
    candidates = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, scratch, own_dir,
                  os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(os.__file__)}
    candidates.update(entry for entry in sys.path if entry and os.path.isdir(entry))
    candidates.update(_package_dirs(expose_packages))
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


# --------------------------------------------------------------------------------------------
# Privilege drop, capabilities, rlimits, network guard (in the runner, before the code runs)
# --------------------------------------------------------------------------------------------


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
