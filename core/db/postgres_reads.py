"""The API's hottest reads on PostgreSQL straight through asyncpg: a job polled by its clients, a page
of jobs. Each statement is built once with SQLAlchemy (its SQL, its types) and compiled once here;
a read then costs a pool acquire and one prepared query. Through SQLAlchemy's async engine the same read
also pays a connection checkout and result handling, and a statement built per request must be matched
to its cached compiled form: most of the time of GET /v1/jobs/{id} (the README's load figures).

Values come back as SQLAlchemy would return them: each column type's result processing (timestamps
stored as naive UTC come back timezone-aware) and JSON decoded. Everything else — transactions,
writes, the ORM — stays with SQLAlchemy (core/db/session.py)."""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import make_url
from sqlalchemy.dialects.postgresql.asyncpg import dialect as AsyncpgDialect
from sqlalchemy.sql import Select

from .errors import DatabaseUnavailable

MAX_STATEMENTS = 64  # the hot reads are a handful of statements built at import; more means one is built per call
Processor = Callable[[Any], Any] | None
# a connection the server dropped (a restart): the pool is renewed and the read tried once more
CONNECTION_LOST = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, ConnectionError, OSError)
# no connection to be had (the server down, starting or shutting down, the database dropped, no slot free, a
# refused login): DatabaseUnavailable, which the API answers with 503
UNAVAILABLE = (
    *CONNECTION_LOST,
    asyncpg.OperatorInterventionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidAuthorizationSpecificationError,
    TimeoutError,
)
CONNECT_TIMEOUT = 5.0  # seconds to open a connection: a host that does not answer fails the read, it does not hang it


@dataclass(frozen=True)
class CompiledRead:
    sql: str
    parameters: tuple[tuple[str, Processor], ...]  # in $1, $2, … order, with each one's bind processing
    columns: tuple[tuple[str, Processor], ...]  # result keys in select order, with each one's result processing

    def arguments(self, values: dict[str, Any]) -> list[Any]:
        return [values[name] if process is None else process(values[name]) for name, process in self.parameters]

    def row(self, record: asyncpg.Record) -> dict[str, Any]:
        return {
            key: value if process is None or value is None else process(value)
            for (key, process), value in zip(self.columns, record.values(), strict=True)
        }


class PostgresReads:
    def __init__(self, url: str, max_connections: int = 10):
        self.dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.max_connections = max_connections
        self.dialect = AsyncpgDialect()
        self._compiled: dict[Select[Any], CompiledRead] = {}
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[asyncpg.Pool]] = weakref.WeakKeyDictionary()

    def compile(self, statement: Select[Any]) -> CompiledRead:
        compiled = self._compiled.get(statement)
        if compiled is None:
            if len(self._compiled) >= MAX_STATEMENTS:
                raise RuntimeError(f"more than {MAX_STATEMENTS} statements read: build each once, with bound parameters")
            sql = statement.compile(dialect=self.dialect)
            binds = sql.binds
            compiled = self._compiled[statement] = CompiledRead(
                sql=sql.string,
                parameters=tuple((name, binds[name].type.bind_processor(self.dialect)) for name in sql.positiontup or ()),
                columns=tuple((str(column.key), column.type.result_processor(self.dialect, None)) for column in statement.selected_columns),
            )
        return compiled

    async def fetch(self, statement: Select[Any], parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        compiled = self.compile(statement)
        arguments = compiled.arguments(parameters or {})
        try:
            pool = await self._pool()
            for attempt in (1, 2):
                try:
                    async with pool.acquire(timeout=CONNECT_TIMEOUT) as connection:
                        return [compiled.row(record) for record in await connection.fetch(compiled.sql, *arguments)]
                except CONNECTION_LOST:
                    if attempt == 2:
                        raise
                    await pool.expire_connections()
        except UNAVAILABLE as err:
            raise DatabaseUnavailable(f"{type(err).__name__}: {err}".splitlines()[0]) from err
        raise AssertionError("unreachable")

    async def _pool(self) -> asyncpg.Pool:
        """The running event loop's pool (asyncio connections belong to the loop that opened them)."""
        loop = asyncio.get_running_loop()
        opening = self._pools.get(loop)
        if opening is None or (opening.done() and opening.exception() is not None):  # first use, or the last try failed
            opening = self._pools[loop] = asyncio.ensure_future(
                asyncpg.create_pool(
                    self.dsn,
                    min_size=1,
                    max_size=self.max_connections,
                    init=_decode_json,
                    reset=_keep_session,
                    max_inactive_connection_lifetime=300,
                    timeout=CONNECT_TIMEOUT,
                )
            )
        return await asyncio.shield(opening)  # shared by the requests that came before it was open

    async def close(self) -> None:
        """Close this event loop's pool (the API's shutdown)."""
        opening = self._pools.pop(asyncio.get_running_loop(), None)
        if opening is not None and opening.done() and opening.exception() is None:
            await opening.result().close()


async def _decode_json(connection: asyncpg.Connection) -> None:
    for type_name in ("json", "jsonb"):
        await connection.set_type_codec(type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(_connection: asyncpg.Connection) -> None:
    """Nothing to reset between reads (no session state is ever set): no reset query, a round trip, per read."""
