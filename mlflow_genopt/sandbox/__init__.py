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
  ``sys.path`` directories, the directories of the packages the caller names in
  ``expose_packages`` (trusted code's imports that only an import hook finds, e.g. an editable
  install), the sandbox's own directory and the scratch dir into a fresh ``tmpfs`` over the
  blocking directory, so the rest of that directory stays hidden. Fallbacks:
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

from ._run import (
    _ISOLATION_CONSTANTS,
    SandboxLimits,
    SandboxResult,
    isolation_report,
    run_function,
    run_script,
)

__all__ = [
    "SandboxLimits",
    "SandboxResult",
    "run_function",
    "run_script",
    "isolation_report",
]  # NETWORK_ISOLATION, PRIVILEGE_DROP, PROCESS_CONTAINMENT, PROC_VISIBILITY: lazy, see __getattr__


def __getattr__(name: str) -> str:
    if name in _ISOLATION_CONSTANTS:
        return isolation_report()[_ISOLATION_CONSTANTS[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
