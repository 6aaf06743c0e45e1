"""Where a study lives: storage URLs and their kinds, opening an Optuna storage, the per-study
lock that serializes workers, and one-line errors for storages that cannot be opened.

Storages are chosen by URL, as in Optuna: ``sqlite:///path.db`` (default), ``postgresql://...``
(several machines), ``journal:path/study.log`` (Optuna's journal file) or ``memory``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna

from ..config import ConfigError

DEFAULT_STORAGE = "sqlite:///optuna.db"
HEARTBEAT_KINDS = ("sqlite", "postgresql", "mysql")  # RDB storages: heartbeats notice dead workers


def storage_kind(url: str) -> str:
    """``memory``, ``journal``, ``sqlite``, ``postgresql`` or ``mysql``; anything else is a
    one-line :class:`ConfigError`."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"storage: must be a URL, got {url!r}")
    if url == "memory":
        return "memory"
    if url.startswith("journal:"):
        if not journal_path(url):
            raise ConfigError(f"storage: {url!r} names no file; e.g. journal:./study.log")
        return "journal"
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme in ("sqlite", "postgresql", "postgres", "mysql"):
        return scheme if scheme != "postgres" else "postgresql"
    raise ConfigError(
        f"storage: unsupported URL {url!r}; use sqlite:///path.db, postgresql://user:pw@host/db, "
        "journal:path/to/study.log or memory"
    )


def journal_path(url: str) -> str:
    rest = url[len("journal:"):]
    return rest[2:] if rest.startswith("//") else rest


def hide_password(url: str) -> str:
    """``url`` with its password masked, for output, tags and summaries."""
    if "://" not in url or "@" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("://", 1)[0] + "://***@" + url.rsplit("@", 1)[1]


class StudyLock:
    """Serializes "decide whether to start a trial, then create it" over all workers of a study.

    Reentrant-safe ``release`` (the objective releases it as soon as its trial holds its
    parameters; the worker's ``finally`` releases it if that never happened)."""

    def __init__(self) -> None:
        self.held = False

    def acquire(self) -> None:
        self._acquire()
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._release()

    def _acquire(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.release()

    @contextlib.contextmanager
    def hold(self):
        self.acquire()
        try:
            yield
        finally:
            self.release()


class _ThreadLock(StudyLock):
    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def _acquire(self) -> None:
        self._lock.acquire()

    def _release(self) -> None:
        self._lock.release()


class _FileLock(StudyLock):
    """``flock`` on a file next to the storage; the kernel releases it if the process dies."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._fd: int | None = None

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)  # the storage's folder, made early
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def _release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class _PostgresLock(StudyLock):
    """A session-level advisory lock; PostgreSQL releases it when a dead worker's connection
    drops, so a killed worker never blocks the others."""

    def __init__(self, url: str, name: str) -> None:
        super().__init__()
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self._engine = create_engine(url, poolclass=NullPool)
        digest = hashlib.sha256(f"genopt-study:{name}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)
        self._conn = None

    def _acquire(self) -> None:
        from sqlalchemy import text

        conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": self._key})
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _release(self) -> None:
        from sqlalchemy import text

        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
        finally:
            conn.close()

    def close(self) -> None:
        super().close()
        self._engine.dispose()


@contextlib.contextmanager
def storage_errors(url: str):
    """A storage that cannot be opened (no driver, no server, bad credentials): one line."""
    try:
        yield
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"storage: {hide_password(url)} needs the {exc.name} package; "
            "pip install 'mlflow-genopt[postgres]'"
        ) from None
    except Exception as exc:
        if not type(exc).__module__.startswith(("sqlalchemy", "psycopg", "sqlite3")) \
                and not isinstance(exc, OSError):
            raise
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
        raise ConfigError(f"storage: cannot open {hide_password(url)}: {reason[:300]}") from None


def make_lock(url: str, kind: str, name: str) -> tuple[StudyLock, bool]:
    """The study lock and whether it spans processes."""
    if kind == "postgresql":
        return _PostgresLock(url, name), True
    path: str | None = None
    if kind == "journal":
        path = journal_path(url)
    elif kind == "sqlite":
        from sqlalchemy.engine import make_url

        database = make_url(url).database
        path = database if database and database != ":memory:" else None
    if path is None:
        return _ThreadLock(), False
    # One lock file per storage file (not the file itself: SQLite and Optuna's journal have
    # their own locks on it, and NFS would map flock onto them).
    return _FileLock(Path(f"{path}.genopt-lock")), True



def open_storage(url: str, kind: str, *, heartbeat_interval_s: int, grace_period_s: int | None,
                 on_stale_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None]) -> Any:
    """The Optuna storage behind ``url`` (of ``storage_kind(url)`` ``kind``), creating the folder
    of a SQLite database or journal file. RDB storages send heartbeats every
    ``heartbeat_interval_s`` and call ``on_stale_trial`` for a trial whose worker stopped."""
    if kind == "memory":
        return optuna.storages.InMemoryStorage()
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(journal_path(url))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if kind == "sqlite":
        engine_kwargs = {"connect_args": {"timeout": 60}}
        from sqlalchemy.engine import make_url

        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval_s,
            grace_period=grace_period_s,
            heartbeat_stale_trial_callback=on_stale_trial,
        )
