"""The database: one `Database` per URL (engine and sessions), and one way to use it — a short
transaction, `with database(url).transaction() as session:`, committed when the block ends and
rolled back on an error. Workers, which must ride out a PostgreSQL restart, use `run(work, retry=True)`.

No transaction should stay open while something slow happens (a client reading a stream, a file
arriving): open one, do the reads and writes, leave."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)
T = TypeVar("T")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the worker's writes
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # pre-ping: after a PostgreSQL restart, stale pooled connections are replaced instead of failing a request
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_recycle=1800, pool_timeout=10)


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

    def forget_inherited_connections(self) -> None:
        """In a forked child: drop the parent's pooled connections without closing them under it."""
        self.engine.dispose(close=False)


@cache
def database(url: str) -> Database:
    return Database(url)
