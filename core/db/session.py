"""Engines and sessions for SQLite (embedded) and PostgreSQL (production), and retrying writes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)
T = TypeVar("T")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the worker's writes
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # pre-ping: after a PostgreSQL restart, stale pooled connections are replaced instead of failing a request
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_recycle=1800)


@lru_cache
def engine_for(url: str) -> Engine:
    return make_engine(url)


@lru_cache
def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=engine_for(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def is_transient(err: BaseException) -> bool:
    """Connection loss (a database restart) or SQLite lock contention: worth retrying."""
    if isinstance(err, DBAPIError) and err.connection_invalidated:
        return True
    return isinstance(err, OperationalError)


def with_retry(url: str, work: Callable[[Session], T], *, attempts: int = 30, delay: float = 1.0) -> T:
    """Run work(session) in its own transaction, retrying while the database is unreachable."""
    for attempt in range(1, attempts + 1):
        try:
            with session_scope(url) as session:
                return work(session)
        except DBAPIError as err:
            if not is_transient(err) or attempt == attempts:
                raise
            log.warning("database unavailable (%s), retry %d/%d in %.0fs", type(err.orig).__name__, attempt, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
