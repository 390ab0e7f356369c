"""Databases for the journal and the SQL sinks: SQLite (embedded) and MySQL/MariaDB, one code path.

Everything that touches a database is written once, as a plain function over a SQLAlchemy Core ``Connection``,
and run inside one transaction by :meth:`Database.transaction`:

- MySQL/MariaDB: SQLAlchemy's async engine on aiomysql; the function runs through ``AsyncConnection.run_sync``,
  so the driver's I/O is native asyncio.
- SQLite: SQLAlchemy's engine on the standard sqlite3 driver, each transaction run whole in a dedicated thread.
  We measured SQLAlchemy over aiosqlite at 3.9 ms for a group commit of 8 messages against 1.3 ms this way:
  aiosqlite hops to its thread for every cursor call (about 70 us each, a dozen per transaction), and each hop
  waits for the event loop to give up the GIL. One thread per database also makes this process's writers take
  turns instead of sleeping in SQLite's busy handler. ``sqlite+aiosqlite://`` URLs are accepted as aliases.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, event
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import (
    TimeoutError as PoolTimeoutError,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from gateway.errors import ConfigError, PermanentError, TransientError, UnavailableError

T = TypeVar("T")

# Above this much log in a background-checkpointed WAL, the checkpoint also resets it (RESTART); see
# SqliteDatabase.checkpoint. 64 MiB is about 5 s of the soak's mixed load; its wal-index is 128 KiB.
WAL_LIMIT_BYTES = 64 * 1024 * 1024
BUSY_TIMEOUT_MS = 30_000  # how long a statement waits for another connection's lock before SQLITE_BUSY
RESTART_WAIT_MS = 20  # how long a reset of the WAL waits for readers to leave it (commits wait behind it)


def backend_of(url: str) -> str:
    try:
        return make_url(url).get_backend_name()
    except Exception as exc:
        raise ConfigError(f"not a database URL: {exc}") from None


def is_sqlite(url: str) -> bool:
    return backend_of(url) == "sqlite"


def check_database_url(url: str) -> str:
    """For config validators: ValueError unless ``url`` is a SQLite or a MySQL/MariaDB-on-aiomysql URL."""
    try:
        u = make_url(url)
    except Exception:
        raise ValueError("not a database URL") from None
    backend, driver = u.get_backend_name(), u.get_driver_name()
    if backend == "sqlite":
        if not u.database:
            raise ValueError("a SQLite URL needs a file path: sqlite:///RELATIVE or sqlite:////ABSOLUTE")
        return url
    if backend in ("mysql", "mariadb") and driver == "aiomysql":
        return url
    raise ValueError(f"unsupported database {backend}+{driver}: use sqlite:/// or mysql+aiomysql://")


class Database:
    """Runs functions over a Core Connection, each in its own transaction. ``transaction`` writes;
    ``read`` may run concurrently with writes (SQLite WAL readers do not block the writer)."""

    url: URL
    dialect: str

    async def transaction(self, fn: Callable[[Connection], T], *, durable: bool = True) -> T:
        """Run ``fn`` in one transaction. ``durable=False`` allows the commit to skip the flush to disk where
        the database can (SQLite: synchronous=NORMAL for that transaction's connection); use it only for
        writes whose loss in a power failure is harmless, such as marking an idempotent delivery done."""
        raise NotImplementedError

    async def read(self, fn: Callable[[Connection], T]) -> T:
        raise NotImplementedError

    async def dispose(self) -> None:
        raise NotImplementedError


def open_database(
    url: str, *, pool_size: int = 5, synchronous: str = "FULL", background_checkpoints: bool = False
) -> Database:
    """A Database for ``url`` (no I/O happens until the first call). ``background_checkpoints``: SQLite
    only; see :meth:`SqliteDatabase.checkpoint`."""
    backend = backend_of(url)
    u = make_url(url)
    if backend == "sqlite":
        return SqliteDatabase(u, synchronous=synchronous, background_checkpoints=background_checkpoints)
    if backend in ("mysql", "mariadb"):
        if u.get_driver_name() != "aiomysql":
            raise ConfigError("MySQL/MariaDB URLs must use the aiomysql driver: mysql+aiomysql://...")
        return AsyncDatabase(u, pool_size=pool_size)
    raise ConfigError(f"unsupported database backend {backend!r}: use sqlite:/// or mysql+aiomysql://")


class AsyncDatabase(Database):
    def __init__(self, url: URL, *, pool_size: int) -> None:
        self.url = url
        self.dialect = url.get_backend_name()
        self.engine: AsyncEngine = create_async_engine(
            url, pool_size=pool_size, max_overflow=pool_size, pool_recycle=3600, pool_pre_ping=True
        )
        event.listen(self.engine.sync_engine, "connect", bytes_as_hex)

    async def transaction(self, fn: Callable[[Connection], T], *, durable: bool = True) -> T:
        async with self.engine.begin() as conn:
            return await conn.run_sync(fn)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        async with self.engine.connect() as conn:
            return await conn.run_sync(fn)

    async def dispose(self) -> None:
        await self.engine.dispose()


def bytes_as_hex(dbapi_conn: Any, _record: Any) -> None:
    """Bind ``bytes`` parameters as hexadecimal literals (``x'...'``) on this aiomysql connection.

    aiomysql 0.3 writes bytes into the statement with PyMySQL's escape table: the bytes are decoded with
    surrogateescape and run through ``str.translate`` with a 128-entry list, so every byte >= 0x80 is a failed
    lookup handled per character. The journal binds sealed (AES-GCM, so random) raw messages and bundles: about
    1 ms of CPU per message measured under load, most of a MariaDB ingest's cost. ``bytes.hex()`` runs in C at
    memory speed; the statement is twice as long on the wire for those values, which MariaDB parses at once. The
    server stores the same bytes either way (tests/integration/test_db_bytes.py round-trips every byte value)."""
    conn = dbapi_conn._connection  # the aiomysql Connection inside SQLAlchemy's adapter
    escape = conn.escape

    def escape_bytes_as_hex(obj: Any) -> Any:
        if isinstance(obj, bytes | bytearray):
            return "x'" + obj.hex() + "'"
        return escape(obj)

    conn.escape = escape_bytes_as_hex


class SqliteDatabase(Database):
    def __init__(
        self,
        url: URL,
        *,
        synchronous: str,
        background_checkpoints: bool = False,
        wal_limit_bytes: int = WAL_LIMIT_BYTES,
    ) -> None:
        self.url = url.set(drivername="sqlite")
        self.dialect = "sqlite"
        self.synchronous = synchronous
        self.background_checkpoints = background_checkpoints
        self.wal_limit_bytes = wal_limit_bytes
        db = self.url.database or ""
        self.path = None if not db or db == ":memory:" or db.startswith("file:") else Path(db)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._readers = ThreadPoolExecutor(2, thread_name_prefix="sqlite-reader")
        self._lock = threading.Lock()
        self._engines_by_kind: dict[str, Engine] = {}
        # Each executor thread keeps its connection open: checking one out of the pool and resetting it on
        # return costs more CPU than a small transaction itself.
        self._local = threading.local()
        self._open: list[Connection] = []

    def _engine(self, kind: str) -> Engine:
        with self._lock:
            if not self._engines_by_kind:
                if self.path is not None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                self._engines_by_kind = {
                    "durable": self._make(immediate=True, synchronous=self.synchronous),
                    # Same file, commits not flushed: the next durable commit flushes the WAL up to it anyway.
                    "lazy": self._make(immediate=True, synchronous="NORMAL"),
                    "read": self._make(immediate=False, synchronous=self.synchronous),
                }
            return self._engines_by_kind[kind]

    def _make(self, *, immediate: bool, synchronous: str) -> Engine:
        # check_same_thread off: the pool hands connections to our executor threads, one at a time.
        engine = create_sync_engine(self.url, connect_args={"check_same_thread": False, "timeout": 30})
        background_checkpoints = self.background_checkpoints
        wal_limit = self.wal_limit_bytes

        @event.listens_for(engine, "connect")
        def on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Take transaction control from the driver, so the BEGIN below is the only one.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            if background_checkpoints:
                cur.execute("PRAGMA wal_autocheckpoint=0")
                # When the log starts over (see checkpoint), a file larger than this is cut back to it: a WAL
                # that an older version let grow to gigabytes shrinks at the first reset.
                cur.execute(f"PRAGMA journal_size_limit={int(wal_limit)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        # With WAL, a deferred transaction that reads and then writes fails at once with SQLITE_BUSY when
        # another connection (another process) committed in between, and the busy timeout cannot help: writers
        # take the write lock up front and queue instead.
        begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"

        @event.listens_for(engine, "begin")
        def on_begin(conn: Connection) -> None:
            conn.exec_driver_sql(begin)

        return engine

    def _connection(self, kind: str) -> Connection:
        conn: Connection | None = getattr(self._local, kind, None)
        if conn is None or conn.closed or conn.invalidated:
            conn = self._engine(kind).connect()
            setattr(self._local, kind, conn)
            with self._lock:
                self._open.append(conn)
        return conn

    def _run(self, fn: Callable[[Connection], T], kind: str) -> T:
        conn = self._connection(kind)
        try:
            with conn.begin():
                return fn(conn)
        except BaseException:
            if conn.in_transaction() or conn.invalidated:
                conn.close()  # start clean next time
            raise

    async def transaction(self, fn: Callable[[Connection], T], *, durable: bool = True) -> T:
        kind = "durable" if durable else "lazy"
        return await asyncio.get_running_loop().run_in_executor(self._writer, self._run, fn, kind)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._run, fn, "read")

    async def checkpoint(self) -> None:
        """Copy the WAL into the database file without blocking writers (PASSIVE). With background checkpoints
        the committing connection never does this itself: SQLite's automatic checkpoint runs inside a commit
        and adds its fsync of the database file to that commit's latency, which senders see as slow ACKs.

        When the WAL then holds more than ``wal_limit_bytes``, it is also reset (RESTART). A PASSIVE checkpoint
        never resets the WAL: SQLite starts writing the log from its beginning again only when a write begins
        with every frame already copied and no reader on the log, which steady load never allows (commits land
        while each checkpoint runs). Without the reset the WAL grew without bound under the soak (1.7 GB in two
        minutes), and with it the wal-index that every connection maps (journal.db-shm, 8 bytes a page: the
        daemon's file-backed RSS grew 2.4 MB/min)."""

        def passive() -> int:
            # On the driver connection (autocommit): through SQLAlchemy the pragma would open a transaction
            # that the next read on this thread then trips over.
            dbapi_conn = self._connection("read").connection.dbapi_connection
            assert dbapi_conn is not None
            _busy, log_frames, _copied = dbapi_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            (page_size,) = dbapi_conn.execute("PRAGMA page_size").fetchone()
            return int(log_frames) * int(page_size)

        def restart() -> None:
            # In the writer thread, between transactions: no commit of ours can start while it runs, and only
            # the few frames committed since the PASSIVE pass are left to copy, so commits wait milliseconds.
            dbapi_conn = self._connection("durable").connection.dbapi_connection
            assert dbapi_conn is not None
            # RESTART, not TRUNCATE: the next commits overwrite the log in place instead of growing the file
            # again, so the file stays near the limit and their fsyncs need no change of its size.
            # RESTART waits for every reader to leave the log, through the busy handler: with the connection's
            # 30-s timeout, one long reader (an online backup with sqlite3 .backup, a slow status query) would
            # hold the writer thread, and every commit and ACK behind it, for up to 30 s. A short wait instead;
            # when a reader stays, the reset is tried again at the next checkpoint.
            dbapi_conn.execute(f"PRAGMA busy_timeout={RESTART_WAIT_MS}")
            try:
                dbapi_conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            finally:
                dbapi_conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

        loop = asyncio.get_running_loop()
        try:
            if await loop.run_in_executor(self._readers, passive) > self.wal_limit_bytes:
                await loop.run_in_executor(self._writer, restart)
        except sqlite3.Error as exc:  # on the driver connection: wrapped as SQLAlchemy wraps it, for the callers
            raise OperationalError("PRAGMA wal_checkpoint", None, exc) from exc

    async def dispose(self) -> None:
        loop = asyncio.get_running_loop()
        # A read or checkpoint may still run in a reader thread even though the coroutine that asked for it was
        # cancelled: closing its connection under it crashes the process (sqlite3 is not safe for that). Let
        # the readers finish first, then close every connection from the writer thread, which is idle here.
        await loop.run_in_executor(None, functools.partial(self._readers.shutdown, wait=True))
        await loop.run_in_executor(self._writer, self._dispose_engines)
        self._writer.shutdown(wait=False)

    def _dispose_engines(self) -> None:
        with self._lock:
            for conn in self._open:
                conn.close()
            self._open.clear()
            for e in self._engines_by_kind.values():
                e.dispose()
            self._engines_by_kind = {}


def translate(exc: BaseException, what: str) -> TransientError | PermanentError:
    """A database exception as the gateway's error: connection, lock and timeout problems are transient; a row
    the database refuses for its content is permanent. Unique-key races are transient (a retry re-reads)."""
    if isinstance(exc, DataError):
        return PermanentError(f"{what}: the database refused the data ({type(exc.orig).__name__})")
    if isinstance(exc, IntegrityError):
        return TransientError(f"{what}: concurrent write conflict, will retry")
    code = lock_conflict_code(exc)
    if code is not None:  # this transaction lost a lock conflict, the database is fine
        return TransientError(f"{what}: lock conflict ({code}), will retry")
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError | OSError | TimeoutError):
        return UnavailableError(f"{what}: database unavailable ({_short(exc)})")
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return UnavailableError(f"{what}: database connection lost")
    if isinstance(exc, SQLAlchemyError):
        return TransientError(f"{what}: database error ({_short(exc)})")
    return TransientError(f"{what}: {type(exc).__name__}")


def lock_conflict_code(exc: BaseException) -> int | None:
    """1213 (deadlock) or 1205 (lock wait timeout) when ``exc`` is MySQL/MariaDB aborting a transaction for a
    lock conflict, which the same transaction retried a moment later may win; else None."""
    if not isinstance(exc, DBAPIError):
        return None
    args = getattr(exc.orig, "args", ())
    code = args[0] if args else None
    return code if code in (1205, 1213) else None


def _short(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc)
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
