"""Where a loop's evaluations run: this machine, or a Dask cluster, chosen by a string.

Like Optuna storages and our model specs, an executor is named by one string
(``LoopConfig.executor``, ``--executor``):

* ``local`` (default): threads and sandboxed subprocesses of this machine, as always.
* ``dask://HOST:PORT``: an existing Dask scheduler (``dask scheduler``, workers started with
  ``dask worker HOST:PORT``; see the README, "Scaling out evaluations").
* ``dask:local[N]``: an in-process ``LocalCluster`` of ``N`` worker processes (one thread each),
  for one big machine.

Tasks hand their *units of evaluation* (a batch of Atari episodes, one cross-validation fold)
to :meth:`Executor.map` or :meth:`Executor.submit`. A unit is a module-level function of plain,
picklable arguments (the program's source, seeds, a fold's row positions, limits) that a worker
imports by name from this package or ``genopt_projects``. It runs the generated code through
:func:`mlflow_genopt.sandbox.run_function` *on the worker*, exactly as locally: in a sandboxed
child process with a clean environment (no variable of the worker's environment, so no secrets,
reaches it), a dedicated uid, no network; never in the worker process itself. A unit returns
raw results (returns, predictions); the loop computes every score from them, so a worker is
trusted no more than the local sandbox is. Where the executor runs is not part of a loop's
identity: ``executor`` is logged as a param but left out of ``config_hash``, the evaluation
cache's task fingerprint and resume matching, so a run started on a cluster resumes locally and
vice versa, and cached trials are shared.

Failure semantics
-----------------
Units are pure functions of (version, example seed or fold): the same arguments give the same
result on any worker. So a worker that dies mid-unit (SIGKILL, OOM, machine lost) costs only
time: the Dask scheduler notices the lost worker and re-runs its unfinished units on the
remaining workers, and the evaluation's trials are identical to an uninterrupted one's. When
re-running is impossible - a unit has killed ``allowed-failures`` workers (Dask's
``KilledWorker``, default 3), no worker has been connected for ``no_workers_timeout_s``, or
the connection to the scheduler is lost (Dask cancels the pending units; a client that stays
disconnected for ``scheduler_timeout_s`` counts as lost too) - the evaluation raises
:class:`ExecutorError`. That is an *infrastructure* failure, never a bad candidate: the
version is not scored (a worker's death says nothing about the program, and scoring it as a
failure would reject a good candidate for a broken machine). The loop stops, the CLI prints
one line (``genopt: error: executor: ...``) and exits non-zero, the MLflow run is marked
failed with its last completed step checkpointed, and running the same command again (with a
working executor, or ``--executor local``; ``genopt resume RUN_ID --executor local``) resumes
it. Anything generated code does (crash,
timeout, memory) stays what it is locally: a failed trial from the sandbox, not an error here.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import re
import threading
import time
from typing import Any, Callable, Iterable, Sequence

EXECUTOR_FORMS = "local, dask://HOST:PORT (an existing Dask scheduler) or dask:local[N] (N >= 1)"
_REMOTE = re.compile(r"^dask://(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")
_LOCAL_CLUSTER = re.compile(r"^dask:local\[(?P<n>\d{1,4})\]$")


class ExecutorError(RuntimeError):
    """The executor could not run an evaluation (scheduler unreachable or gone, no workers
    left, a unit that killed every worker it ran on). One line, starting with ``executor:``.
    Infrastructure, not the candidate's fault: the loop stops and the run stays resumable."""


def check_executor(spec: Any) -> str:
    """The normalised executor string, or a one-line ``ValueError`` naming ``executor`` and
    the accepted forms (the config turns it into a ``ConfigError``)."""
    if spec is None:
        return "local"
    if not isinstance(spec, str):
        raise ValueError(f"executor: must be {EXECUTOR_FORMS}; got {spec!r}")
    text = spec.strip()
    if text == "local":
        return text
    remote = _REMOTE.match(text)
    if remote and 1 <= int(remote["port"]) <= 65535:
        return text
    cluster = _LOCAL_CLUSTER.match(text)
    if cluster and int(cluster["n"]) >= 1:
        return text
    raise ValueError(f"executor: must be {EXECUTOR_FORMS}; got {spec!r}")


class Executor:
    """Runs units of evaluation; see the module docstring for what a unit is and what happens
    when workers or the scheduler fail.

    ``remote``: units leave this process's machine (tasks then split work finer and ship data
    with :meth:`share`). ``slots``: how many units can run at once (``None``: as many as the
    task asks for, i.e. the task's own ``workers``)."""

    spec: str = "local"
    remote: bool = False

    @property
    def slots(self) -> int | None:
        return None

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        """Start ``fn(*args)``; a ``concurrent.futures.Future`` of its result. Its ``result()``
        raises :class:`ExecutorError` for infrastructure failures, and whatever ``fn`` raised
        otherwise (units do not raise for what generated code does)."""
        raise NotImplementedError

    def map(self, fn: Callable[..., Any], units: Iterable[Sequence[Any]]) -> list[Any]:
        """``[fn(*unit) for unit in units]``, run in parallel, results in order."""
        futures = [self.submit(fn, *unit) for unit in units]
        return [future.result() for future in futures]

    def share(self, value: Any) -> Any:
        """A handle for ``value`` (data that several units of one evaluation need), passed to
        :meth:`submit` in its place: the value itself locally; shipped once to the workers
        (replicated, so a dying worker does not lose it) on a cluster."""
        return value

    def close(self) -> None:
        pass

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


class LocalExecutor(Executor):
    """Today's behaviour: units run in threads of this process (each unit starts its own
    sandboxed subprocess), one thread per unit up to ``max_threads``; a single unit runs inline."""

    def __init__(self, max_threads: int | None = None) -> None:
        self.max_threads = max_threads
        self._pool: cf.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        with self._lock:
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(max_workers=self.max_threads or 64,
                                                   thread_name_prefix="genopt-unit")
            return self._pool.submit(fn, *args)

    def map(self, fn: Callable[..., Any], units: Iterable[Sequence[Any]]) -> list[Any]:
        units = list(units)
        if len(units) == 1:
            return [fn(*units[0])]
        return super().map(fn, units)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


class DaskExecutor(Executor):
    """Units as Dask tasks: on the scheduler ``address`` (``tcp://HOST:PORT``), or, with
    ``local_workers=N``, on an in-process ``LocalCluster`` of N single-threaded worker
    processes. Connects on construction (an unreachable scheduler is an :class:`ExecutorError`
    before anything runs)."""

    remote = True

    def __init__(self, spec: str, *, address: str | None = None, local_workers: int | None = None,
                 connect_timeout_s: float = 10.0, no_workers_timeout_s: float = 60.0,
                 scheduler_timeout_s: float = 20.0, poll_s: float = 0.5) -> None:
        try:
            import distributed
        except ImportError:
            raise ExecutorError(f"executor: {spec} needs the Dask 'distributed' package; install "
                                "mlflow-genopt[dask] (or use --executor local)") from None
        # distributed logs every lost connection on the client; the executor reports what
        # matters itself, as one line (ExecutorError)
        _quiet_distributed()
        self.spec = spec
        self.no_workers_timeout_s = no_workers_timeout_s
        self.scheduler_timeout_s = scheduler_timeout_s
        self.poll_s = poll_s
        self._cluster = None
        try:
            if local_workers is not None:
                self._cluster = distributed.LocalCluster(
                    n_workers=local_workers, threads_per_worker=1, processes=True,
                    dashboard_address=":0",  # a free port: never collide with a running one
                    silence_logs=logging.CRITICAL)
                address = self._cluster.scheduler_address
            self.client = distributed.Client(address, timeout=connect_timeout_s,
                                             set_as_default=False)
        except Exception as exc:  # noqa: BLE001 - OSError, TimeoutError, CommClosedError...
            if self._cluster is not None:
                self._cluster.close()
            what = "start the local Dask cluster" if local_workers else "reach the Dask scheduler"
            raise ExecutorError(f"executor: cannot {what} of {spec} "
                                f"({type(exc).__name__}: {_one_line(exc)})") from None
        self._shared: list[Any] = []

    @property
    def slots(self) -> int | None:
        try:
            workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
        except TypeError:  # older distributed: no n_workers argument
            workers = self.client.scheduler_info()["workers"].values()
        except Exception:  # noqa: BLE001 - the scheduler is gone; submit will say so
            return 1
        return max(1, sum(int(w.get("nthreads", 1)) for w in workers))

    def share(self, value: Any) -> Any:
        try:
            # a list, not the value: scatter() would send a dict's items under its keys as
            # names, so two evaluations' {"train.csv": ...} would overwrite each other
            [future] = self.client.scatter([value], broadcast=True, hash=True)
        except Exception as exc:  # noqa: BLE001
            raise ExecutorError(f"executor: cannot ship data to the workers of {self.spec} "
                                f"({type(exc).__name__}: {_one_line(exc)})") from None
        self._shared.append(future)  # keep it alive until the evaluation is done
        del self._shared[:-16]
        return future

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        return self._watch([self.client.submit(fn, *args, pure=False)])[0]

    def map(self, fn: Callable[..., Any], units: Iterable[Sequence[Any]]) -> list[Any]:
        units = list(units)
        dask_futures = [self.client.submit(fn, *unit, pure=False) for unit in units]
        return [future.result() for future in self._watch(dask_futures)]

    def _watch(self, dask_futures: list[Any]) -> list[cf.Future]:
        """concurrent.futures for ``dask_futures``, resolved by one watcher thread that turns
        lost workers, a lost scheduler and Dask's own failures into :class:`ExecutorError`."""
        results = [cf.Future() for _ in dask_futures]
        thread = threading.Thread(target=self._resolve, args=(dask_futures, results),
                                  name="genopt-dask-watch", daemon=True)
        thread.start()
        return results

    def _resolve(self, dask_futures: list[Any], results: list[cf.Future]) -> None:
        pending = dict(enumerate(dask_futures))
        changed = threading.Event()
        no_workers_since = scheduler_lost_since = None
        try:
            for future in dask_futures:
                future.add_done_callback(lambda _: changed.set())
            while pending:
                changed.wait(self.poll_s)
                changed.clear()
                for index, future in list(pending.items()):
                    if future.done():
                        self._settle(future, results[index])
                        del pending[index]
                if not pending:
                    break
                now = time.monotonic()
                if self.client.status != "running":
                    scheduler_lost_since = scheduler_lost_since or now
                    if now - scheduler_lost_since > self.scheduler_timeout_s:
                        raise ExecutorError(f"executor: lost the Dask scheduler of {self.spec} "
                                            f"for {self.scheduler_timeout_s:g} s")
                    continue
                scheduler_lost_since = None
                if self.slots_now() == 0:
                    no_workers_since = no_workers_since or now
                    if now - no_workers_since > self.no_workers_timeout_s:
                        raise ExecutorError(f"executor: no Dask worker connected to {self.spec} "
                                            f"for {self.no_workers_timeout_s:g} s")
                else:
                    no_workers_since = None
        except Exception as exc:  # noqa: BLE001
            error = exc if isinstance(exc, ExecutorError) else ExecutorError(
                f"executor: {self.spec} failed ({type(exc).__name__}: {_one_line(exc)})")
            for index, future in pending.items():
                future.cancel()
                results[index].set_exception(error)

    def slots_now(self) -> int:
        try:
            return len(self.client.scheduler_info()["workers"])
        except Exception:  # noqa: BLE001
            return -1

    def _settle(self, future: Any, result: cf.Future) -> None:
        status = future.status
        if status == "finished":
            try:
                result.set_result(future.result())
            except Exception as exc:  # noqa: BLE001 - lost between done and fetch
                result.set_exception(self._infrastructure(exc))
            return
        if status == "error":
            exc = future.exception()
            if type(exc).__name__ in ("KilledWorker", "FutureCancelledError", "CommClosedError"):
                result.set_exception(self._infrastructure(exc))
            else:  # the unit's own exception (trusted code; generated code never raises here)
                result.set_exception(exc)
            return
        result.set_exception(ExecutorError(f"executor: a unit of evaluation on {self.spec} was "
                                           f"{status} (scheduler lost or restarted)"))

    def _infrastructure(self, exc: BaseException) -> ExecutorError:
        if type(exc).__name__ == "KilledWorker":
            return ExecutorError(f"executor: a unit of evaluation killed every Dask worker it ran on "
                                 f"({self.spec}); see the workers' logs")
        return ExecutorError(f"executor: {self.spec} failed ({type(exc).__name__}: {_one_line(exc)})")

    def close(self) -> None:
        self._shared.clear()
        try:
            self.client.close(timeout=5)
        except Exception:  # noqa: BLE001 - closing after the scheduler died
            pass
        if self._cluster is not None:
            try:
                self._cluster.close(timeout=10)
            except Exception:  # noqa: BLE001
                pass


def make_executor(spec: str | None = "local", *, max_threads: int | None = None) -> Executor:
    """The executor ``spec`` names (see the module docstring); ``max_threads`` bounds a local
    one's threads."""
    spec = check_executor(spec)
    if spec == "local":
        return LocalExecutor(max_threads)
    cluster = _LOCAL_CLUSTER.match(spec)
    if cluster:
        return DaskExecutor(spec, local_workers=int(cluster["n"]))
    remote = _REMOTE.match(spec)
    return DaskExecutor(spec, address=f"tcp://{remote['host']}:{remote['port']}")


def _quiet_distributed() -> None:
    # distributed's config gives several of its loggers their own levels: set each one
    for name in ["distributed", *logging.root.manager.loggerDict]:
        if name == "distributed" or name.startswith("distributed."):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


__all__ = ["DaskExecutor", "EXECUTOR_FORMS", "Executor", "ExecutorError", "LocalExecutor",
           "check_executor", "make_executor"]
