"""Load patterns over bench._http connections, and what they measure: latency percentiles, errors,
and the CPU that the server, this generator and the whole machine spent meanwhile.

- closed loop: `clients` connections, each sending its next request as soon as the last is answered
  (throughput: as many requests as the server answers);
- open loop: requests started on a fixed schedule whatever the answers, latency counted from the
  scheduled time, so queueing in the server shows in it;
- event streams: time to the first event, and how many streams are held at once."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ._http import Connection, HttpError

NETWORK_ERRORS = (OSError, HttpError, asyncio.IncompleteReadError, ValueError)


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest rank: the smallest value with at least a fraction q of all values at or below it."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = math.ceil(q * len(ordered) - 1e-9)  # 1e-9: 0.07 * 100 is 7.000000000000001 in floating point
    return ordered[min(len(ordered), max(1, rank)) - 1]


def error_name(err: BaseException) -> str:
    return "timeout" if isinstance(err, TimeoutError) else type(err).__name__


@dataclass
class Sample:
    """Latencies (seconds) of every answered or failed request, and errors by kind."""

    latencies: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def record(self, latency: float, error: str | None = None) -> None:
        self.latencies.append(latency)
        if error:
            self.errors[error] += 1

    def summary(self) -> dict:
        ms = [1000 * x for x in self.latencies]
        return {
            "requests": len(ms),
            "per_second": len(ms) / self.seconds if self.seconds else math.nan,
            "p50_ms": percentile(ms, 0.50),
            "p90_ms": percentile(ms, 0.90),
            "p99_ms": percentile(ms, 0.99),
            "max_ms": max(ms, default=math.nan),
            "errors": sum(self.errors.values()),
            "errors_by_kind": dict(self.errors),
        }


def outcome_of(status: int) -> str | None:
    return None if status == 200 else str(status)


async def closed_loop(new_connection: Callable[[], Connection], path: str, clients: int, seconds: float, timeout: float = 10.0) -> Sample:
    sample = Sample()
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        connection = new_connection()
        try:
            while (sent := time.perf_counter()) < deadline:
                try:
                    async with asyncio.timeout(timeout):
                        error = outcome_of((await connection.get(path)).status)
                except (TimeoutError, *NETWORK_ERRORS) as err:
                    error = error_name(err)
                    connection.close()
                    await asyncio.sleep(0.01)  # a server refusing connections must not spin this loop
                sample.record(time.perf_counter() - sent, error)
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    sample.seconds = time.perf_counter() - started
    return sample


async def open_loop(
    new_connection: Callable[[], Connection], path: str, rate: float, seconds: float, max_connections: int = 64, timeout: float = 10.0
) -> Sample:
    """`rate` requests a second for `seconds`, on up to `max_connections` keep-alive connections;
    a request waiting for a free connection is late, and its latency says so. Each request has
    `timeout` seconds from its scheduled time, so the phase ends at most that long after the last."""
    sample = Sample()
    idle: list[Connection] = []
    connections = asyncio.Semaphore(max_connections)

    async def one(due: float) -> None:
        try:
            async with asyncio.timeout(max(0.0, due + timeout - time.perf_counter())):  # waiting for a connection counts
                async with connections:
                    connection = idle.pop() if idle else new_connection()
                    try:
                        error = outcome_of((await connection.get(path)).status)
                    except BaseException:
                        connection.close()  # a half-read answer: start afresh
                        raise
                    finally:
                        idle.append(connection)
        except (TimeoutError, *NETWORK_ERRORS) as err:
            error = error_name(err)
        sample.record(time.perf_counter() - due, error)

    start = time.perf_counter() + 0.05
    tasks = []
    try:
        for i in range(int(rate * seconds)):
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(due)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        for connection in idle:
            connection.close()
    sample.seconds = seconds
    return sample


async def first_event(connection: Connection, path: str) -> str | None:
    """Open an event stream and wait for its first event; None when it opened, else the error."""
    answer = await connection.open_stream(path)
    if answer.status != 200:
        return str(answer.status)
    await connection.next_event()
    return None


async def stream_openings(
    streams: Sequence[tuple[Callable[[], Connection], str]], clients: int, seconds: float, timeout: float = 10.0
) -> Sample:
    """Closed loop of: connect, open the stream, read its first event, disconnect. Latency: time to first event.
    `streams` are (connection factory, path) pairs, say one per tenant; client i opens streams[i % len]."""
    sample = Sample()
    deadline = time.perf_counter() + seconds

    async def client(new_connection: Callable[[], Connection], path: str) -> None:
        while (started := time.perf_counter()) < deadline:
            connection = new_connection()
            try:
                async with asyncio.timeout(timeout):
                    error = await first_event(connection, path)
            except (TimeoutError, *NETWORK_ERRORS) as err:
                error = error_name(err)
                await asyncio.sleep(0.01)
            finally:
                connection.close()
            sample.record(time.perf_counter() - started, error)

    started = time.perf_counter()
    await asyncio.gather(*(client(*streams[i % len(streams)]) for i in range(clients)))
    sample.seconds = time.perf_counter() - started
    return sample


async def hold_stream(connection: Connection, path: str, until: float, first_event_timeout: float, opened: Sample) -> str:
    """Open a stream and keep reading it until `until` (a perf_counter time). Returns 'held' if it
    stayed open with no error to the end, else what went wrong ('429', 'timeout', 'StreamEnded', ...).
    Its time to first event goes into `opened`."""
    started = time.perf_counter()
    try:
        try:
            async with asyncio.timeout(min(first_event_timeout, max(0.0, until - started))):
                error = await first_event(connection, path)
        except TimeoutError:
            return "timeout before the first event"
        opened.record(time.perf_counter() - started, error)
        if error:
            return error
        try:
            async with asyncio.timeout(max(0.0, until - time.perf_counter())):
                while True:
                    await connection.next_event()
        except TimeoutError:
            return "held"
    except NETWORK_ERRORS as err:
        return error_name(err)
    finally:
        connection.close()


async def hold_streams(new_connection: Callable[[], Connection], path: str, count: int, seconds: float, first_event_timeout: float = 10.0):
    """`count` streams opened at once and held for `seconds`: (outcomes by kind, time-to-first-event sample)."""
    opened = Sample()
    until = time.perf_counter() + seconds
    outcomes = await asyncio.gather(*(hold_stream(new_connection(), path, until, first_event_timeout, opened) for _ in range(count)))
    opened.seconds = seconds
    return Counter(outcomes), opened


async def ramp_streams(
    new_connection: Callable[[], Connection], path: str, count: int, step: int, seconds: float, first_event_timeout: float = 5.0
):
    """Streams opened `step` at a time, each step once the last one's first events arrived, up to
    `count` or the first step with an error, then all held until `seconds` have passed.
    Returns (streams open with no error after the last good step, outcomes by kind at the end,
    time-to-first-event sample)."""
    opened = Sample()
    until = time.perf_counter() + seconds
    tasks: list[asyncio.Task] = []
    reached = 0
    try:
        while len(tasks) < count and time.perf_counter() < until:
            for _ in range(min(step, count - len(tasks))):
                tasks.append(asyncio.create_task(hold_stream(new_connection(), path, until, first_event_timeout, opened)))
            step_deadline = min(until, time.perf_counter() + first_event_timeout)
            while len(opened.latencies) < len(tasks) and time.perf_counter() < step_deadline:
                await asyncio.sleep(0.02)
            if len(opened.latencies) < len(tasks) or opened.errors:
                break
            reached = len(tasks)
        outcomes = Counter(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
    opened.seconds = seconds
    return reached, outcomes, opened


class CpuMeter:
    """CPU seconds spent by the machine, this process, PostgreSQL's processes and optionally one
    other process (the server) with its child processes (several API workers), from Linux's /proc;
    what remains is other work on the machine."""

    TICKS = os.sysconf("SC_CLK_TCK")

    def __init__(self, pid: int | None = None):
        self.pid = pid
        self.start = self._read()

    def _read(self) -> tuple[float, float, float, dict[int, float], dict[int, float]]:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
        busy = (sum(fields) - fields[3] - fields[4]) / self.TICKS  # all but idle and iowait
        processes = all_processes()
        server = tree_seconds(self.pid, processes) if self.pid else {}
        postgres = {pid: seconds for pid, (name, _, seconds) in processes.items() if name == "postgres"}
        return time.perf_counter(), busy, time.process_time(), server, postgres

    def shares(self) -> dict:
        """Since creation, as fractions of one core."""
        end = self._read()
        wall = end[0] - self.start[0]
        postgres = sum(seconds - self.start[4].get(pid, 0.0) for pid, seconds in end[4].items())
        server = sum(seconds - self.start[3].get(pid, 0.0) for pid, seconds in end[3].items()) if end[3] else math.nan
        shares = {
            "machine_cores": (end[1] - self.start[1]) / wall,
            "generator_cores": (end[2] - self.start[2]) / wall,
            "server_cores": server / wall,
            "postgres_cores": postgres / wall,
        }
        known = shares["generator_cores"] + shares["postgres_cores"] + (0 if math.isnan(shares["server_cores"]) else shares["server_cores"])
        return {**shares, "other_cores": max(0.0, shares["machine_cores"] - known)}


def process_seconds(pid: int) -> tuple[str, int, float]:
    """(command name, parent pid, user + system CPU seconds) of a process; ('', 0, nan) if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            name, _, rest = stat.read().partition(" (")[2].rpartition(")")
    except OSError:
        return "", 0, math.nan
    fields = rest.split()
    return name, int(fields[1]), (int(fields[11]) + int(fields[12])) / CpuMeter.TICKS


def all_processes() -> dict[int, tuple[str, int, float]]:
    """Every live process on this machine: pid → (name, parent pid, CPU seconds)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            name, parent, seconds = process_seconds(int(entry))
            if not math.isnan(seconds):
                found[int(entry)] = (name, parent, seconds)
    return found


def tree_seconds(pid: int, processes: dict[int, tuple[str, int, float]]) -> dict[int, float]:
    """CPU seconds of a process and of its descendants, by pid."""
    tree, frontier = {}, [pid]
    while frontier:
        current = frontier.pop()
        if current in processes:
            tree[current] = processes[current][2]
        frontier.extend(child for child, (_, parent, _) in processes.items() if parent == current)
    return tree


TRICKLE_INTERVAL = 0.1  # seconds between the pieces of a slow upload


async def slow_upload(connection: Connection, path: str, size: int, until: float, bytes_per_second: float) -> str:
    """A POST of `size` declared bytes, sent at `bytes_per_second` until `until`. Returns the status
    the server answered with, or 'uploading at the end', or what went wrong."""
    piece = b"\0" * max(1, round(bytes_per_second * TRICKLE_INTERVAL))
    answer = None
    try:
        await connection.send_head("POST", path, {"Content-Type": "application/octet-stream", "Content-Length": str(size)})
        answer = asyncio.create_task(connection.read_response())
        try:
            sent = 0
            while time.perf_counter() < until and not answer.done() and sent + len(piece) < size:
                await connection.send(piece)
                sent += len(piece)
                await asyncio.wait([answer], timeout=TRICKLE_INTERVAL)
        except NETWORK_ERRORS:  # a server that answers and closes early may reset the connection under the body
            await asyncio.wait([answer], timeout=1.0)
            if not answer.done():
                raise
        return str(answer.result().status) if answer.done() else "uploading at the end"
    except (TimeoutError, *NETWORK_ERRORS) as err:
        return error_name(err)
    finally:
        if answer is not None:
            answer.cancel()
        connection.close()
