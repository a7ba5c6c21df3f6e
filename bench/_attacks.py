"""The hostile tenant of `bench.load_hostile`, as a process of its own (`python -m bench._attacks`, a JSON plan
on stdin, the outcomes as JSON on stdout, started at a lower CPU priority), so that its load loops never delay
the measuring of the other tenant's latencies: each attack phase runs from its start to its end (wall-clock
times in the plan).

Phases (every count is of requests; an outcome is the HTTP status, 'held' for a request still in flight at
the phase's end, or what went wrong):
- streams: `streams` event streams and `uploads` uploads trickling at `upload_rate` B/s, held to the end;
- bodies: 6 connections sending 400 MiB bodies of odd content types (text/plain, application/octet-stream,
  application/xml, image/png, none, application/x-ndjson), declared or chunked, with no key, over and over;
- json: 6 connections sending tenant A's 8.8 MB application/*+json bodies (declared and chunked) and deeply
  nested ones;
- multipart: 4 connections sending 1 GiB multipart bodies to /ui/login (declared and chunked);
- preflights: 32 concurrent pre-flight loops with A's key, cycling over architectures and datasets (each
  new pair is a cold network to build and count); every fourth loop leaves 50 ms after sending;
- spellings: 6 spellings of A's Authorization header × `spelling_requests` requests held in flight each
  (JSON bodies trickling at 10 B/s);
- charts: 100 loops fetching A's job's curves on its web page with a web session (signed in at /ui/login)."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator

from ._http import Connection
from ._load import NETWORK_ERRORS, error_name, hold_streams, slow_upload

PIECE = 64 * 1024
SPELLINGS = ("Bearer {}", "bearer {}", "BEARER {}", "Bearer   {}", "\tbearer {}", "bEaReR {} ")
ODD_TYPES = ("text/plain", "application/octet-stream", "application/xml", "image/png", None, "application/x-ndjson")
JSON_TYPES = ("application/vnd.peeraid+json", "application/problem+json; charset=utf-8")
ARCHITECTURES = ("wrn70_16", "wrn34_10", "wrn28_10", "resnet50", "resnet34", "resnet18", "preactresnet18", "mobilenetv2")
PRESETS = ("cifar10-resnet18", "cifar100-resnet18", "tinyimagenet-resnet18")


def rounds(until: float) -> Iterator[int]:
    """0, 1, 2, … while the phase lasts, and at least once: a phase that started late still makes its attempt."""
    yield 0
    count = 1
    while time.perf_counter() < until:
        yield count
        count += 1


async def send_body(
    connection: Connection, path: str, headers: dict[str, str], size: int, until: float, *, chunked: bool, prefix: bytes = b""
) -> tuple[str, int]:
    """POST `size` bytes, `prefix` first, as fast as the server takes them (declared in Content-Length, or chunked),
    until the server answers or `until`. Returns (its status or what went wrong, bytes sent before the answer)."""
    head = {**headers, **({"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(size)})}
    data = b"0" * PIECE
    piece = b"%x\r\n%s\r\n" % (PIECE, data) if chunked else data
    sent = 0
    answer: asyncio.Task | None = None
    try:
        await connection.send_head("POST", path, head)
        answer = asyncio.create_task(connection.read_response())
        try:
            if prefix:
                await connection.send(b"%x\r\n%s\r\n" % (len(prefix), prefix) if chunked else prefix)
                sent += len(prefix)
            while sent < size and not answer.done() and time.perf_counter() < until:
                await connection.send(piece)
                sent += PIECE
                await asyncio.sleep(0)
            if chunked and not answer.done() and sent >= size:
                await connection.send(b"0\r\n\r\n")
        except NETWORK_ERRORS:  # the server answered and closed under the body
            pass
        await asyncio.wait([answer], timeout=min(5.0, max(1.0, until - time.perf_counter())))
        return (str(answer.result().status) if answer.done() and not answer.exception() else "unanswered"), sent
    except (TimeoutError, *NETWORK_ERRORS) as err:
        return error_name(err), sent
    finally:
        if answer is not None:
            answer.cancel()
        connection.close()


async def body_loops(
    connect: Callable[[], Connection], kinds: list[tuple[str, dict[str, str], int, bool]], loops: int, until: float, prefix: bytes = b""
) -> dict:
    """`loops` connections, each sending the next kind of body as soon as the last was answered."""
    outcomes: Counter = Counter()
    most_sent = 0
    cycle = itertools.cycle(kinds)

    async def loop() -> None:
        nonlocal most_sent
        for _ in rounds(until):
            path, headers, size, chunked = next(cycle)
            outcome, sent = await send_body(connect(), path, headers, size, until, chunked=chunked, prefix=prefix)
            outcomes[outcome] += 1
            most_sent = max(most_sent, sent)

    await asyncio.gather(*(loop() for _ in range(loops)))
    return {"outcomes": dict(outcomes), "most_bytes_sent_before_the_answer": most_sent}


async def bodies(plan: dict, until: float) -> dict:
    size = 400 * 1024 * 1024
    kinds = [
        (path, {"Content-Type": content_type} if content_type else {}, size, chunked)
        for path, content_type, chunked in zip(
            itertools.cycle(("/v1/jobs/preflight", "/v1/jobs")), ODD_TYPES, itertools.cycle((False, True)), strict=False
        )
    ]
    return await body_loops(lambda: Connection.to(plan["url"]), kinds, 6, until)


async def json_bodies(plan: dict, until: float) -> dict:
    auth = {"Authorization": f"Bearer {plan['key_a']}"}
    size = 8_800_000
    kinds = [("/v1/jobs/preflight", {**auth, "Content-Type": t}, size, chunked) for t in JSON_TYPES for chunked in (False, True)]
    deep = ('{"preset": "digits-demo", "spec": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}").encode()
    outcomes: Counter = Counter()

    async def deep_loop() -> None:
        connection = Connection.to(plan["url"], auth)
        try:
            for _ in rounds(until):
                try:
                    async with asyncio.timeout(plan["timeout"]):
                        answer = await connection.request("POST", "/v1/jobs/preflight", deep, {"Content-Type": JSON_TYPES[0]})
                    outcomes[f"deep {answer.status}"] += 1
                except (TimeoutError, *NETWORK_ERRORS) as err:
                    outcomes[f"deep {error_name(err)}"] += 1
                    connection.close()
        finally:
            connection.close()

    big, _ = await asyncio.gather(body_loops(lambda: Connection.to(plan["url"]), kinds, 5, until), deep_loop())
    return {"outcomes": {**big["outcomes"], **outcomes}, "most_bytes_sent_before_the_answer": big["most_bytes_sent_before_the_answer"]}


async def multipart(plan: dict, until: float) -> dict:
    boundary = "peeraid-bench-boundary"
    headers = {"Origin": plan["url"], "Content-Type": f"multipart/form-data; boundary={boundary}"}
    kinds = [("/ui/login", headers, 1024**3, chunked) for chunked in (False, True)]
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="api_key"; filename="key.bin"\r\n\r\n'.encode()  # a file's part
    return await body_loops(lambda: Connection.to(plan["url"]), kinds, 4, until, prefix=part)


def preflight_bodies():
    for epochs in itertools.count(1):
        for architecture, preset in itertools.product(ARCHITECTURES, PRESETS):
            spec = {"student": architecture, "peer": architecture, "epochs": epochs % 200 + 2, "lr_decay_epochs": [1]}
            yield json.dumps({"preset": preset, "spec": spec}).encode()


async def preflights(plan: dict, until: float) -> dict:
    auth = {"Authorization": f"Bearer {plan['key_a']}", "Content-Type": "application/json"}
    bodies = preflight_bodies()
    outcomes: Counter = Counter()

    async def loop(leaves: bool) -> None:
        connection = Connection.to(plan["url"], auth)
        try:
            for _ in rounds(until):
                body = next(bodies)
                try:
                    if leaves:  # sends the request and goes away: its work must stop
                        await connection.send_head("POST", "/v1/jobs/preflight", {"Content-Length": str(len(body))})
                        await connection.send(body)
                        await asyncio.sleep(0.05)
                        connection.close()
                        outcomes["left after 50 ms"] += 1
                        continue
                    async with asyncio.timeout(plan["timeout"]):
                        answer = await connection.request("POST", "/v1/jobs/preflight", body)
                    outcomes[str(answer.status)] += 1
                except (TimeoutError, *NETWORK_ERRORS) as err:
                    outcomes[error_name(err)] += 1
                    connection.close()
        finally:
            connection.close()

    await asyncio.gather(*(loop(i % 4 == 3) for i in range(32)))
    return {"outcomes": dict(outcomes)}


async def held_body(connection: Connection, path: str, until: float) -> str:
    """A JSON body trickling at 10 B/s until `until`: 'held' if the server was still waiting for it then."""
    answer = None
    try:
        await connection.send_head("POST", path, {"Content-Type": "application/json", "Content-Length": "100000"})
        answer = asyncio.create_task(connection.read_response())
        while time.perf_counter() < until and not answer.done():
            await connection.send(b" ")
            await asyncio.wait([answer], timeout=0.1)
        return str(answer.result().status) if answer.done() else "held"
    except (TimeoutError, *NETWORK_ERRORS) as err:
        return error_name(err)
    finally:
        if answer is not None:
            answer.cancel()
        connection.close()


async def spellings(plan: dict, until: float) -> dict:
    tasks = [
        held_body(Connection.to(plan["url"], {"Authorization": spelling.format(plan["key_a"])}), "/v1/jobs/preflight", until)
        for spelling in SPELLINGS
        for _ in range(plan["spelling_requests"])
    ]
    outcomes = Counter(await asyncio.gather(*tasks))
    return {"outcomes": dict(outcomes), "spellings": len(SPELLINGS)}


async def sign_in(url: str, key: str) -> str:
    """A web session's cookie ('peeraid_session=…'), signed in as the browser's form does."""
    connection = Connection.to(url)
    try:
        body = f"api_key={key}".encode()
        answer = await connection.request("POST", "/ui/login", body, {"Origin": url, "Content-Type": "application/x-www-form-urlencoded"})
    finally:
        connection.close()
    if answer.status != 303 or "set-cookie" not in answer.headers:
        raise RuntimeError(f"signing in at /ui/login answered {answer.status}")
    return answer.headers["set-cookie"].split(";", 1)[0]


async def charts(plan: dict, until: float) -> dict:
    cookie = await sign_in(plan["url"], plan["key_a"])
    path = f"/ui/jobs/{plan['job_a']}/curves.png"
    outcomes: Counter = Counter()

    async def loop() -> None:
        connection = Connection.to(plan["url"], {"Cookie": cookie})
        try:
            for _ in rounds(until):
                try:
                    async with asyncio.timeout(plan["timeout"]):
                        outcomes[str((await connection.get(path)).status)] += 1
                except (TimeoutError, *NETWORK_ERRORS) as err:
                    outcomes[error_name(err)] += 1
                    connection.close()
        finally:
            connection.close()

    await asyncio.gather(*(loop() for _ in range(100)))
    return {"outcomes": dict(outcomes)}


async def streams(plan: dict, until: float) -> dict:

    auth = {"Authorization": f"Bearer {plan['key_a']}"}

    def connect() -> Connection:
        return Connection.to(plan["url"], auth)

    held = hold_streams(connect, f"/v1/jobs/{plan['job_a']}/events", plan["streams"], until - time.perf_counter(), plan["timeout"])
    uploads = [
        slow_upload(connect(), "/v1/datasets?name=slow&filename=slow.npz", plan["upload_size"], until, plan["upload_rate"])
        for _ in range(plan["uploads"])
    ]
    (stream_outcomes, opened), *upload_outcomes = await asyncio.gather(held, *uploads)
    return {"streams": dict(stream_outcomes), "streams_opened": opened.summary(), "uploads": dict(Counter(upload_outcomes))}


PHASES = {
    "streams": streams,
    "bodies": bodies,
    "json": json_bodies,
    "multipart": multipart,
    "preflights": preflights,
    "spellings": spellings,
    "charts": charts,
}


async def run(plan: dict) -> dict:
    results = {}
    for phase in plan["phases"]:
        await asyncio.sleep(max(0.0, phase["start"] - time.time()))
        until = time.perf_counter() + (phase["end"] - time.time())
        try:
            results[phase["name"]] = await PHASES[phase["name"]](plan, until)
        except Exception as err:  # a broken phase must not hide the others
            results[phase["name"]] = {"error": f"{type(err).__name__}: {err}"}
    return results


def main() -> int:
    from .load_status import new_event_loop

    plan = json.loads(sys.stdin.read())
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        results = runner.run(run(plan))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
