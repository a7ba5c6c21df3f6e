"""The database: one `Database` per URL, and one way to use it — a short transaction around a function
of a session, `db.run(work)`, committed when `work` returns and rolled back if it raises. Workers, which
must ride out a PostgreSQL restart, use `run(work, retry=True)`. The API, on its event loop, uses
`await db.arun(work)`: the same `work(session)` runs on an asyncio connection (SQLAlchemy's run_sync),
so a request's database work takes no thread and holds a connection only while its queries run.

No transaction should stay open while something slow happens (a client reading a stream, a file
arriving): open one, do the reads and writes, leave."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any, TypeVar

from sqlalchemy import Engine, Select, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from .postgres_reads import PostgresReads

log = logging.getLogger(__name__)
T = TypeVar("T")


# enough connections kept open for a busy API process, so they are reused rather than opened and closed per request
POOL = {"pool_size": 20, "max_overflow": 10, "pool_recycle": 1800, "pool_timeout": 10}
# seconds to open a PostgreSQL connection (libpq waits indefinitely by default): a host that does not answer
# fails the request (the API answers 503) or the worker's try (it retries), instead of hanging it
CONNECT_ARGS = {"connect_timeout": 5}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the worker's writes
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pre-ping: after a PostgreSQL restart, stale pooled connections are replaced instead of failing a request
    return create_engine(url, pool_pre_ping=True, connect_args=CONNECT_ARGS, **POOL)


def make_async_engine(url: str) -> AsyncEngine:
    """The same database through an asyncio driver: aiosqlite for SQLite, psycopg's own for PostgreSQL."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url.replace("sqlite://", "sqlite+aiosqlite://", 1), connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    # no pre-ping (a round trip per request): a connection a restart broke is retried once instead (arun)
    return create_async_engine(url.replace("postgresql://", "postgresql+psycopg://", 1), connect_args=CONNECT_ARGS, **POOL)


def is_transient(err: BaseException) -> bool:
    """Connection loss (a database restart) or SQLite lock contention: worth retrying."""
    if isinstance(err, DBAPIError) and err.connection_invalidated:
        return True
    return isinstance(err, OperationalError)


class Database:
    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(bind=self.engine, expire_on_commit=False)
        self._async_engines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncEngine] = weakref.WeakKeyDictionary()
        self.postgres_reads = PostgresReads(url) if url.startswith("postgresql") else None

    def async_engine(self) -> AsyncEngine:
        """The running event loop's engine: asyncio connections belong to the loop that opened them (a server
        has one loop; test clients each run their own)."""
        loop = asyncio.get_running_loop()
        if loop not in self._async_engines:
            self._async_engines[loop] = make_async_engine(self.url)
        return self._async_engines[loop]

    async def arun(self, work: Callable[[Session], T]) -> T:
        """work(session) in its own transaction on the event loop, without a thread; once more if the
        connection was broken (a database restart invalidates pooled connections)."""
        for attempt in (1, 2):
            try:
                async with AsyncSession(self.async_engine(), expire_on_commit=False) as session, session.begin():
                    return await session.run_sync(work)
            except DBAPIError as err:
                if attempt == 2 or not err.connection_invalidated:
                    raise
        raise AssertionError("unreachable")

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def run(self, work: Callable[[Session], T], *, retry: bool = False, attempts: int = 30, delay: float = 1.0) -> T:
        """work(session) in its own transaction; with retry, again while the database is unreachable."""
        for attempt in range(1, (attempts if retry else 1) + 1):
            try:
                with self.transaction() as session:
                    return work(session)
            except DBAPIError as err:
                if not retry or not is_transient(err) or attempt == attempts:
                    raise
                log.warning("database unavailable (%s), retry %d/%d in %.0fs", type(err.orig).__name__, attempt, attempts, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    async def afetch(self, statement: Select[Any], parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The rows of one read-only statement, on the event loop, with no ORM session: the hot read paths'
        (a job's status polled by many clients) cheapest way; once more if the connection was broken.

        Pass a statement built once, with bound parameters, and the values in `parameters`: it is compiled
        once. On PostgreSQL it runs straight through asyncpg (core/db/postgres_reads.py)."""
        if self.postgres_reads is not None:
            return await self.postgres_reads.fetch(statement, parameters)
        for attempt in (1, 2):
            try:
                async with self.async_engine().connect() as connection:
                    return [dict(row) for row in (await connection.execute(statement, parameters)).mappings()]
            except DBAPIError as err:
                if attempt == 2 or not err.connection_invalidated:
                    raise
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        """Close the running event loop's connections of the hot reads (the API's shutdown)."""
        if self.postgres_reads is not None:
            await self.postgres_reads.close()

    def forget_inherited_connections(self) -> None:
        """In a forked child: drop the parent's pooled connections without closing them under it."""
        self.engine.dispose(close=False)
        for engine in list(self._async_engines.values()):
            engine.sync_engine.dispose(close=False)


@cache
def database(url: str) -> Database:
    return Database(url)
