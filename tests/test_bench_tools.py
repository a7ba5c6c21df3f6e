"""The load tools (bench/): percentile math, the raw HTTP client and load patterns against a tiny
local server, the naive baseline on a real SQLite database; and (slow) a short run of each tool
against the real API on PostgreSQL, cleaning up after itself, Ctrl-C included."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert

from bench._http import Connection, StreamEnded
from bench._load import Sample, closed_loop, hold_streams, open_loop, percentile, slow_upload, stream_openings
from tests.stack import PG_ADMIN_URL, POSTGRES_GROUP, REDIS_URL, _postgres_available, require_services

REPO = Path(__file__).resolve().parents[1]


# percentiles


def test_percentile_is_the_nearest_rank():
    values = list(range(100, 0, -1))  # 1..100, unsorted
    assert percentile(values, 0.50) == 50
    assert percentile(values, 0.99) == 99
    assert percentile(values, 0.07) == 7  # 0.07 * 100 is 7.000000000000001 in floating point
    assert percentile(values, 1.0) == 100
    assert percentile(values, 0.0) == 1
    assert percentile([5.0], 0.99) == 5.0
    assert percentile([1, 2, 3, 4], 0.5) == 2
    assert percentile([1, 2, 3, 4], 0.51) == 3
    assert math.isnan(percentile([], 0.5))


def test_sample_summary():
    sample = Sample(seconds=2.0)
    for ms in range(1, 101):
        sample.record(ms / 1000, "500" if ms > 98 else None)
    summary = sample.summary()
    assert summary["requests"] == 100 and summary["per_second"] == 50.0
    assert summary["p50_ms"] == pytest.approx(50) and summary["p99_ms"] == pytest.approx(99) and summary["max_ms"] == pytest.approx(100)
    assert summary["errors"] == 2 and summary["errors_by_kind"] == {"500": 2}


# the raw HTTP client, against a tiny HTTP/1.1 server


class TinyServer:
    """Answers by path: /len (Content-Length), /chunked, /close (Connection: close), /missing (404),
    /events (two events and a comment, then the end), /forever (one event, then nothing),
    /refuse (429 as soon as the head arrives), /swallow (reads the body, never answers)."""

    def __init__(self):
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> TinyServer:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    def connection(self, **headers) -> Connection:
        return Connection("127.0.0.1", self.port, headers)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                path = head.split(" ")[1]
                length = next((int(line.split(":")[1]) for line in head.split("\r\n") if line.lower().startswith("content-length")), 0)
                if not await self.answer(path, length, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def answer(self, path: str, length: int, reader, writer) -> bool:
        """Writes the answer to `path`; False when the connection is to close."""
        chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        if path == "/len":
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        elif path == "/chunked":
            writer.write(f"{chunked}3\r\nhel\r\n2;ext=1\r\nlo\r\n0\r\n\r\n".encode())
        elif path == "/close":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbye")
            await writer.drain()
            return False
        elif path == "/missing":
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}")
        elif path == "/events":
            events = [b": keep-alive\n\n", b"event: job\ndata: 1\n\nevent: job\n", b"data: 2\n\n"]
            writer.write(chunked.encode() + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n")
        elif path == "/forever":
            event = b"event: job\ndata: {}\n\n"
            writer.write(chunked.encode() + b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await reader.read()  # until the client leaves
            return False
        elif path.startswith("/refuse"):
            writer.write(b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            return False
        elif path.startswith("/swallow"):
            await reader.read()
            return False
        await writer.drain()
        return True


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def test_requests_share_one_keep_alive_connection():
    async def scenario():
        async with TinyServer() as server:
            connection = server.connection(Authorization="Bearer x")
            answers = [await connection.get("/len") for _ in range(3)]
            answers.append(await connection.get("/chunked"))
            answers.append(await connection.request("POST", "/len", b"abc"))
            connection.close()
            return server.connections, answers

    connections, answers = run(scenario())
    assert connections == 1
    assert [a.body for a in answers] == [b"hello"] * 3 + [b"hello", b"hello"]
    assert all(a.status == 200 for a in answers)


def test_connection_close_and_error_statuses():
    async def scenario():
        async with TinyServer() as server:
            connection = server.connection()
            bye = await connection.get("/close")
            missing = await connection.get("/missing")  # on a new connection
            connection.close()
            return server.connections, bye, missing

    connections, bye, missing = run(scenario())
    assert (bye.status, bye.body) == (200, b"bye")
    assert (missing.status, missing.body) == (404, b"{}")
    assert connections == 2


def test_server_sent_events():
    async def scenario():
        async with TinyServer() as server:
            connection = server.connection()
            opened = await connection.open_stream("/events")
            events = [await connection.next_event(), await connection.next_event()]
            with pytest.raises(StreamEnded):
                await connection.next_event()
            connection.close()
            refused = await server.connection().open_stream("/missing")
            return opened.status, events, refused.status

    status, events, refused = run(scenario())
    assert status == 200
    assert events == ["event: job\ndata: 1", "event: job\ndata: 2"]  # the comment is skipped, a split event joined
    assert refused == 404


def test_load_patterns():
    async def scenario():
        async with TinyServer() as server:
            closed = await closed_loop(server.connection, "/len", clients=4, seconds=0.3)
            connections_after_closed = server.connections
            scheduled = await open_loop(server.connection, "/len", rate=100, seconds=0.3, max_connections=8)
            first_events = await stream_openings([(server.connection, "/events")], clients=2, seconds=0.2)
            held, opened = await hold_streams(server.connection, "/forever", count=5, seconds=0.3)
            failing = await closed_loop(server.connection, "/missing", clients=1, seconds=0.1)
            return closed, connections_after_closed, scheduled, first_events, held, opened, failing

    closed, connections, scheduled, first_events, held, opened, failing = run(scenario())
    assert closed.summary()["requests"] > 20 and not closed.errors and connections == 4
    assert scheduled.summary()["requests"] == 30 and not scheduled.errors
    assert first_events.summary()["requests"] > 2 and not first_events.errors
    assert held == {"held": 5} and len(opened.latencies) == 5
    assert failing.errors["404"] == failing.summary()["requests"] > 0


def test_slow_upload_outcomes():
    async def scenario():
        async with TinyServer() as server:
            until = time.perf_counter() + 0.5
            return await asyncio.gather(
                slow_upload(server.connection(), "/refuse", 10_000, until, 100),
                slow_upload(server.connection(), "/swallow", 10_000, until, 100),
            )

    assert run(scenario()) == ["429", "uploading at the end"]


# the naive baseline, on SQLite


def test_naive_app_reads_a_job_like_the_service(tmp_path):
    from fastapi.testclient import TestClient

    from bench.naive_app import create_app
    from core.db.models import ApiKey, Base, Job, Tenant

    url = f"sqlite:///{tmp_path / 'naive.sqlite'}"
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    key, other_key = "pk_aaaa_secret", "pk_bbbb_secret"
    with engine.begin() as db:
        for tenant, prefix, secret in (("tn_a", "aaaa", key), ("tn_b", "bbbb", other_key)):
            db.execute(insert(Tenant).values(id=tenant, name=tenant))
            db.execute(insert(ApiKey).values(tenant_id=tenant, prefix=prefix, key_hash=hashlib.sha256(secret.encode()).hexdigest()))
        db.execute(insert(Job).values(id="job_a", tenant_id="tn_a", dataset_name="digits", preset="digits-demo", spec={"epochs": 3}))
    engine.dispose()

    with TestClient(create_app(url)) as client:
        job = client.get("/v1/jobs/job_a", headers={"Authorization": f"Bearer {key}"})
        wrong_key = client.get("/v1/jobs/job_a", headers={"Authorization": "Bearer pk_aaaa_wrong"})
        no_key = client.get("/v1/jobs/job_a")
        other_tenant = client.get("/v1/jobs/job_a", headers={"Authorization": f"Bearer {other_key}"})

    assert job.status_code == 200, job.text
    body = job.json()
    assert body["id"] == "job_a" and body["status"] == "queued" and body["dataset"] == "digits" and body["spec"] == {"epochs": 3}
    assert datetime.fromisoformat(body["created_at"]).tzinfo is not None
    assert set(body) == {
        "id",
        "status",
        "phase",
        "dataset",
        "dataset_id",
        "preset",
        "spec",
        "progress",
        "latest_metrics",
        "best_metrics",
        "result",
        "error",
        "attempts",
        "cancel_requested",
        "created_at",
        "started_at",
        "finished_at",
        "updated_at",
    }  # the fields of the service's JobOut
    assert (wrong_key.status_code, no_key.status_code, other_tenant.status_code) == (401, 401, 404)


# the tools end to end, against the real API on PostgreSQL


def test_the_tools_the_tests_start_use_the_test_servers():
    """PEERAID_TEST_PG_URL / PEERAID_TEST_REDIS_URL point every test elsewhere, the load tools they start included."""
    elsewhere = {"PEERAID_TEST_PG_URL": "postgresql://tester@127.0.0.2:5433/admin", "PEERAID_TEST_REDIS_URL": "redis://127.0.0.2:6380/15"}
    code = (
        "import subprocess, sys\n"
        "from tests.test_bench_tools import tool_env\n"
        "tool = 'import bench._stack as s; print(s.PG_ADMIN_URL, s.REDIS_URL)'\n"
        "print(subprocess.run([sys.executable, '-c', tool], env=tool_env(), capture_output=True, text=True, check=True).stdout)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **elsewhere}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [elsewhere["PEERAID_TEST_PG_URL"], elsewhere["PEERAID_TEST_REDIS_URL"]]


def tool_env() -> dict[str, str]:
    """The environment the tools run in: the test servers (PEERAID_TEST_PG_URL, PEERAID_TEST_REDIS_URL) as theirs."""
    return {**os.environ, "PEERAID_BENCH_PG_URL": PG_ADMIN_URL, "PEERAID_BENCH_REDIS_URL": REDIS_URL}


def services_problem() -> str | None:
    return _postgres_available()


# The tools' tests compare the throwaway databases and queues before and after each, so they run one at a
# time, and in the worker of every other PostgreSQL test (one of which restarts the server).
BENCH_GROUP = pytest.mark.xdist_group(POSTGRES_GROUP)


@pytest.fixture
def postgres():
    require_services(services_problem())
    before = bench_databases(), bench_redis_keys()
    yield
    assert bench_databases() == before[0], "a throwaway database was left behind"
    assert bench_redis_keys() <= before[1], "a run's queue was left in Redis"


def bench_redis_keys() -> set[bytes]:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=3)
    try:
        return set(client.scan_iter(match="*peeraid-bench-*"))
    finally:
        client.close()


def bench_databases() -> set[str]:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL) as conn:
        return {name for (name,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'peeraid_bench_%'")}


def run_tool(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=tool_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@BENCH_GROUP
def test_load_status_runs_every_phase(postgres, tmp_path):
    figures = tmp_path / "figures.json"
    out = run_tool(
        "bench.load_status", "--seconds", "1", "--clients", "4", "--rate", "20", "--sse-streams", "8", "--jobs", "5", "--json", str(figures)
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rows = json.loads(figures.read_text())["rows"]
    measured = {(r["endpoint"], r["server"], r["mode"].split(",")[0]) for r in rows if r["requests"] > 0}
    assert measured >= {
        ("GET /v1/jobs/{id}", "service", "closed loop"),
        ("GET /v1/jobs/{id}", "naive", "closed loop"),
        ("GET /v1/jobs", "service", "closed loop"),
        ("GET /v1/jobs/{id}/events", "service", "first event"),
        ("GET /v1/jobs/{id}", "service", "open loop"),
        ("GET /v1/jobs/{id}", "naive", "open loop"),
    }, out.stdout
    streams = next(r for r in rows if "outcomes" in r)
    assert streams["held"] == 8, out.stdout
    assert "service/naive requests/s" in out.stdout


@pytest.mark.slow
@BENCH_GROUP
def test_load_hostile_runs_and_judges(postgres, tmp_path):
    figures = tmp_path / "hostile.json"
    out = run_tool(
        "bench.load_hostile",
        "--seconds",
        "4.5",
        "--attack-after",
        "1",
        "--streams",
        "5",
        "--uploads",
        "2",
        "--spelling-requests",
        "2",
        "--rate",
        "10",
        "--recovery-limit",
        "3",
        "--max-p99-ms",
        "1000000",
        "--max-b-errors",
        "1000000",
        "--max-healthz-failures",
        "1000000",
        "--json",
        str(figures),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(figures.read_text())
    phases = {phase["name"]: phase for phase in result["phases"]}
    assert list(phases) == ["before the attack", "streams", "bodies", "json", "multipart", "preflights", "spellings", "charts"]
    assert phases["before the attack"]["tenant_b"]["requests"] == 10
    assert sum(p["tenant_b"]["requests"] for p in result["phases"]) > 25 and sum(p["healthz"]["requests"] for p in result["phases"]) > 20
    assert phases["before the attack"]["api"]["rss_mib"]["start"] > 0 and phases["bodies"]["api"]["tmp_mib"]
    attack = {name: phase["attack"] for name, phase in phases.items() if name != "before the attack"}
    assert not [name for name, outcome in attack.items() if "error" in outcome], attack
    assert sum(attack["streams"]["streams"].values()) == 5 and sum(attack["streams"]["uploads"].values()) == 2
    assert sum(attack["spellings"]["outcomes"].values()) == 12  # six spellings, two requests each
    for name in ("bodies", "json", "multipart", "preflights", "charts"):
        assert attack[name]["outcomes"], (name, out.stdout)
    assert {"413"} <= set(attack["bodies"]["outcomes"]) and {"415"} <= set(attack["multipart"]["outcomes"]), out.stdout
    assert result["pg_connections"] and "unavailable" not in result["pg_connections"][0]
    assert "PASS" in out.stdout


@pytest.mark.slow
@BENCH_GROUP
def test_ctrl_c_stops_the_servers_and_drops_the_database(postgres):
    tool = subprocess.Popen(
        [sys.executable, "-m", "bench.load_hostile", "--seconds", "60", "--streams", "5", "--uploads", "1"],
        cwd=REPO,
        env=tool_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as a non-interactive shell starts a background job
    )
    try:
        first_line = tool.stdout.readline()  # printed once the API is up
        assert " against http://127.0.0.1:" in first_line, first_line + tool.stdout.read()
        url = first_line.split(" against ", 1)[1].split(" ", 1)[0]
        time.sleep(1.5)
        tool.send_signal(signal.SIGINT)
        try:
            tool.wait(timeout=120)  # its clean-up is bounded (the API is killed 10 s after SIGTERM); generous for a loaded machine
        except subprocess.TimeoutExpired:
            tool.kill()
            pytest.fail(f"still running 120 s after Ctrl-C:\n{tool.stdout.read()}")
        assert tool.returncode == 130, f"exit status {tool.returncode}, not 130 (interrupted):\n{tool.stdout.read()}"
    finally:
        if tool.poll() is None:
            tool.kill()
    import httpx

    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=2)
