"""CPU-heavy requests: job pre-flights and submissions (building networks on the meta device and counting
their arithmetic), and training-curve images (Matplotlib). Three bounds keep them from starving everyone else:

- per tenant, at most `per_tenant` at once in this API process; beyond that 429 with Retry-After, before any
  of the work (a tenant sending 32 at once gets 2 running and 30 refusals);
- the arithmetic and the drawing run in worker processes (`WorkerPool`, `workers` of them per API process,
  forked on first use from a server that has imported torch, the engine and Matplotlib, at a lower CPU
  priority than the API's): the event loop shares neither a GIL nor a garbage collector with them, and is
  scheduled ahead of them on the cores they share. (In threads, a pre-flight held the GIL between
  the loop's every await, and its networks' garbage made full collections of 200-370 ms that stopped the
  loop.) Calls beyond them wait their turn; the rest of a request (its database work, the enqueue) runs in
  the API's thread pool as any other blocking work, so submissions still meet in the database at once;
- a request whose client goes away (http.disconnect) is cancelled: before it starts it never runs; once
  running, a torch dispatch mode in the worker (`api.cpu_worker`) checks a flag the API sets before every tensor
  operation, so a pre-flight stops within milliseconds. The tenant's slot comes back only when the work has
  stopped, so leaving and retrying does not pile work up. (A curve image, about 0.2 s, runs to its end.)

The API process imports neither torch nor Matplotlib: what runs in the workers is named by the functions of
`api.cpu_worker`, which import the engine when called (in a worker, where the fork server has loaded it).

The deterministic part of a pre-flight (a network's parameters, arithmetic and activations) is cached in
each worker by the engine (`core.engine.preflight.network_cost`), the least recently busy worker taking the
next call so that a tenant's repeated pre-flights find their networks counted; curve images are cached by
their ETag (`api.routes.curves`)."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
from collections.abc import Callable
from ctypes import c_byte
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from . import cpu_worker
from .cpu_worker import Cancelled
from .streams import TenantSlots

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # as nginx logs it: the answer had nobody left to read it
# imported once by the fork server, shared by its workers; the first lowers their CPU priority below the API's
PRELOAD = ["api.cpu_worker_priority", "api.cpu_worker", "core.engine.preflight", "api.plots"]


class WorkerDied(RuntimeError):
    """A worker process ended in the middle of a call (it is started afresh for the next)."""


class Worker:
    def __init__(self, context: Any):
        self.context = context
        self.flag: Any = context.Value(c_byte, 0, lock=False)  # set by the API: stop the call under way
        self.process: Any = None
        self.conn: Connection | None = None

    def call(self, work: Callable[..., T], args: tuple[Any, ...]) -> T:
        if self.process is None or not self.process.is_alive():
            parent, child = self.context.Pipe()
            self.process = self.context.Process(target=cpu_worker.serve, args=(child, self.flag), name="peeraid-cpu-work", daemon=True)
            self.process.start()
            child.close()
            self.conn = parent
        assert self.conn is not None
        try:
            self.conn.send((work, args))
            kind, value = self.conn.recv()
        except (EOFError, OSError) as err:
            self.process = None
            raise WorkerDied("a CPU worker process ended during the call; it is started again for the next") from err
        if kind == "error":
            raise value
        return value


class Ticket:
    """One offloaded call's cancellation: before it starts, it never runs; once running, its worker's flag is set."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cancelled = False
        self.worker: Worker | None = None

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            if self.worker is not None:
                self.worker.flag.value = 1


class WorkerPool:
    """Worker processes, shared by every app of this process; grown to the most workers any app asked for."""

    _shared: WorkerPool | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        self.context = context
        self.idle: list[Worker] = []  # the most recently busy last: it is taken first (its caches are warm)
        self.size = 0
        self.condition = threading.Condition()

    @classmethod
    def shared(cls, size: int) -> WorkerPool:
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            pool = cls._shared
        with pool.condition:
            while pool.size < size:
                pool.idle.insert(0, Worker(pool.context))
                pool.size += 1
        return pool

    def call(self, ticket: Ticket, work: Callable[..., T], *args: Any) -> T:
        """work(*args) in a worker process (blocking the calling thread, not the GIL); Cancelled if the ticket is."""
        with self.condition:
            while not self.idle:
                self.condition.wait()
            worker = self.idle.pop()
        try:
            with ticket.lock:
                if ticket.cancelled:
                    raise Cancelled
                worker.flag.value = 0
                ticket.worker = worker
            try:
                return worker.call(work, args)
            finally:
                with ticket.lock:
                    ticket.worker = None
        finally:
            with self.condition:
                self.idle.append(worker)
                self.condition.notify()

    def each(self, work: Callable[..., T], *args: Any) -> list[T]:
        """work(*args) in every worker in turn (their caches: `network_cost.cache_info`, `.cache_clear`)."""
        with self.condition:
            while len(self.idle) < self.size:
                self.condition.wait()
            workers, self.idle = self.idle, []
        try:
            return [worker.call(work, args) for worker in workers]
        finally:
            with self.condition:
                self.idle.extend(workers)
                self.condition.notify_all()


Offload = Callable[..., Any]  # offload(work, *args): work(*args) in a worker process


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away. The body was read already: what comes now is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class CpuWork:
    def __init__(self, per_tenant: int, workers: int):
        self.slots = TenantSlots(
            "CPU-heavy requests", per_tenant, retry_after=1, hint="pre-flights, submissions and curves count; retry when one has finished"
        )
        self.workers = workers
        self.cancelled = 0  # requests whose work was stopped because their client left

    @property
    def pool(self) -> WorkerPool:
        return WorkerPool.shared(self.workers)

    async def run(self, request: Request, tenant_id: str, work: Callable[..., T], *args: Any) -> T:
        """work(offload, *args) in the thread pool, within the tenant's limit (429 beyond); its CPU-heavy parts go
        through offload(fn, *fn_args) to a worker process. Stopped if the client goes away (499)."""
        self.slots.acquire(tenant_id)
        ticket = Ticket()
        pool = self.pool

        def offload(fn: Callable[..., Any], *fn_args: Any) -> Any:
            return pool.call(ticket, fn, *fn_args)

        try:
            future = asyncio.ensure_future(run_in_threadpool(_unless_cancelled, ticket, work, offload, *args))
            gone = asyncio.ensure_future(_disconnected(request))
            try:
                await asyncio.wait((future, gone), return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if not future.done():
                ticket.cancel()
                with contextlib.suppress(Exception):
                    await asyncio.shield(future)  # until the work has stopped (or it never started)
                self.cancelled += 1
                raise HTTPException(CLIENT_CLOSED_REQUEST, "the client closed the request before its answer; the work was stopped")
            return future.result()
        except BaseException:
            ticket.cancel()  # the request itself was cancelled (the server stopping): the work stops too
            raise
        finally:
            self.slots.release(tenant_id)


def _unless_cancelled(ticket: Ticket, work: Callable[..., T], offload: Offload, *args: Any) -> T:
    if ticket.cancelled:
        raise Cancelled
    return work(offload, *args)
