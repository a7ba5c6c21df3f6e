"""Does the service hold under a hostile tenant? A bounded load test, on this machine only.

    python -m bench.load_hostile                     # starts the API on a throwaway PostgreSQL database
    python -m bench.load_hostile --seconds 60 --streams 300 --uploads 30 --rate 20
    python -m bench.load_hostile --url http://127.0.0.1:8000 --key-a "$KEY_A" --key-b "$KEY_B" [--pg-url postgresql://…/db]

From the start, tenant B reads its own job (GET /v1/jobs/{id}) at a steady `--rate` (open loop:
latency counted from the scheduled send time) and /healthz is polled every 100 ms. After
`--attack-after` seconds, tenant A opens `--streams` event streams (GET /v1/jobs/{id}/events on its
queued job) and `--uploads` uploads (POST /v1/datasets) whose bodies trickle at `--upload-rate`
bytes/s and never finish, and holds them all to the end. Every second, the PostgreSQL connections
of the service's database are counted by state (pg_stat_activity).

Printed: tenant B's latency percentiles and errors before and during the attack, /healthz
failures, A's streams and uploads admitted / refused (429) / failed, the PostgreSQL connections,
and how long B waited for a good answer after the attack. Exit status 1 when tenant B's p99 is
over `--max-p99-ms`, B had more than `--max-b-errors` errors, or /healthz failed more than
`--max-healthz-failures` times; 0 otherwise."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from ._http import Connection
from ._load import NETWORK_ERRORS, Sample, error_name, hold_streams, open_loop, outcome_of, percentile
from ._stack import interrupt_on_ctrl_c_and_sigterm, libpq_url, start_local_service, submit_job
from .load_status import fmt, new_event_loop

HEALTHZ_INTERVAL = 0.1
TRICKLE_INTERVAL = 0.1


@dataclass
class Target:
    url: str
    key_a: str
    key_b: str
    job_a: str
    job_b: str
    pg_url: str | None  # libpq URL of the service's database, for pg_stat_activity


def raise_open_files_limit(needed: int) -> int:
    """Make room for `needed` descriptors (and for the servers started after, which inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


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


async def poll_healthz(url: str, until: float, timeout: float) -> Sample:
    """GET /healthz every 100 ms on one keep-alive connection; a poll that is late skips the ticks it missed."""
    sample = Sample()
    connection = Connection.to(url)
    started = time.perf_counter()
    try:
        while (sent := time.perf_counter()) < until:
            try:
                async with asyncio.timeout(timeout):
                    error = outcome_of((await connection.get("/healthz")).status)
            except (TimeoutError, *NETWORK_ERRORS) as err:
                error = error_name(err)
                connection.close()
            sample.record(time.perf_counter() - sent, error)
            ticks = math.floor((time.perf_counter() - started) / HEALTHZ_INTERVAL) + 1
            await asyncio.sleep(max(0.0, started + ticks * HEALTHZ_INTERVAL - time.perf_counter()))
    finally:
        connection.close()
    sample.seconds = time.perf_counter() - started
    return sample


async def sample_database_connections(pg_url: str, until: float) -> list[dict[str, int]]:
    """Every second: the database's connections by state (other than this one)."""
    import psycopg

    database = pg_url.rsplit("/", 1)[1].split("?", 1)[0]
    admin_url = pg_url.rsplit("/", 1)[0] + "/postgres"
    samples = []
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True, connect_timeout=3) as db:
        while time.perf_counter() < until:
            rows = await (
                await db.execute(
                    "SELECT coalesce(state, '?'), count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() GROUP BY 1",
                    (database,),
                )
            ).fetchall()
            samples.append(dict(rows))
            await asyncio.sleep(1.0)
    return samples


async def recovery_seconds(connect, path: str, limit: float, fast: float) -> float | None:
    """Seconds until a GET answers 200 within `fast` seconds (None if not within `limit`)."""
    started = time.perf_counter()
    while (sent := time.perf_counter()) - started < limit:
        connection = connect()
        try:
            async with asyncio.timeout(max(0.1, limit - (sent - started))):
                status = (await connection.get(path)).status
            if status == 200 and time.perf_counter() - sent <= fast:
                return time.perf_counter() - started
        except (TimeoutError, *NETWORK_ERRORS):
            pass
        finally:
            connection.close()
        await asyncio.sleep(0.25)
    return None


async def attack(args, target: Target, until: float) -> dict:
    tenant_a = {"Authorization": f"Bearer {target.key_a}"}

    def connect_a() -> Connection:
        return Connection.to(target.url, tenant_a)

    upload_path = "/v1/datasets?name=slow&filename=slow.npz"
    streams = hold_streams(connect_a, f"/v1/jobs/{target.job_a}/events", args.streams, until - time.perf_counter(), args.timeout)
    uploads = [slow_upload(connect_a(), upload_path, args.upload_size, until, args.upload_rate) for _ in range(args.uploads)]
    (stream_outcomes, opened), *upload_outcomes = await asyncio.gather(streams, *uploads)
    return {"streams": stream_outcomes, "streams_opened": opened, "uploads": Counter(upload_outcomes)}


async def run(args, target: Target) -> dict:
    tenant_b = {"Authorization": f"Bearer {target.key_b}"}

    def connect_b() -> Connection:
        return Connection.to(target.url, tenant_b)

    b_path = f"/v1/jobs/{target.job_b}"
    start = time.perf_counter()
    end = start + args.seconds
    healthz = asyncio.create_task(poll_healthz(target.url, end, args.healthz_timeout))
    connections = asyncio.create_task(sample_database_connections(target.pg_url, end)) if target.pg_url else None
    before = await open_loop(connect_b, b_path, args.rate, args.attack_after, max_connections=args.b_connections, timeout=args.timeout)
    attacking = asyncio.create_task(attack(args, target, end))
    during = await open_loop(
        connect_b, b_path, args.rate, end - time.perf_counter(), max_connections=args.b_connections, timeout=args.timeout
    )
    a = await attacking
    recovered = await recovery_seconds(connect_b, b_path, args.recovery_limit, args.max_p99_ms / 1000)
    try:
        pg_samples = await connections if connections else []
    except Exception as err:  # the count is extra information: its failure must not hide the rest
        pg_samples = [{"unavailable": str(err).splitlines()[0]}]
    return {"before": before, "during": during, "healthz": await healthz, **a, "pg": pg_samples, "recovered": recovered}


def report(args, result: dict) -> list[str]:
    """Prints the outcome; returns the reasons for failing (empty: passed)."""
    before, during, healthz = result["before"], result["during"], result["healthz"]
    both = Sample(before.latencies + during.latencies, before.errors + during.errors, before.seconds + during.seconds)
    print(f"{'tenant B, GET /v1/jobs/{id}':<40} {'requests':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>7}")
    for label, sample in ((f"before the attack ({args.attack_after:g} s)", before), ("during the attack", during), ("all", both)):
        s = sample.summary()
        print(
            f"  {label:<38} {s['requests']:>8} {fmt(s['p50_ms']):>8} {fmt(s['p90_ms']):>8} {fmt(s['p99_ms']):>8} {fmt(s['max_ms']):>8} "
            f"{s['errors']:>7} {dict(sample.errors) or ''}"
        )
    h = healthz.summary()
    print(
        f"/healthz every {1000 * HEALTHZ_INTERVAL:.0f} ms: {h['requests']} polls, {h['errors']} failed {dict(healthz.errors) or ''}; "
        f"p99 {fmt(h['p99_ms'])} ms, max {fmt(h['max_ms'])} ms"
    )

    opened = result["streams_opened"]
    admitted = len(opened.latencies) - sum(opened.errors.values())
    refused = result["streams"].get("429", 0)
    print(
        f"tenant A event streams: {args.streams} opened: admitted {admitted} (held to the end {result['streams'].get('held', 0)}), "
        f"refused (429) {refused}, failed {args.streams - admitted - refused}; outcomes {dict(result['streams'])}"
    )
    if opened.latencies:
        print(
            f"  time to the first event: p50 {fmt(1000 * percentile(opened.latencies, 0.5))} ms, max {fmt(1000 * max(opened.latencies))} ms"
        )
    uploads = result["uploads"]
    taken, refused = uploads.get("uploading at the end", 0), uploads.get("429", 0)
    print(
        f"tenant A slow uploads ({args.upload_rate:g} B/s): {args.uploads} started: admitted (still uploading at the end) {taken}, "
        f"refused (429) {refused}, failed or answered otherwise {args.uploads - taken - refused}; outcomes {dict(uploads)}"
    )
    pg = [s for s in result["pg"] if "unavailable" not in s]
    if pg:
        peak = max(pg, key=lambda s: sum(s.values()))
        print(
            f"PostgreSQL connections to the service's database (every 1 s, {len(pg)} samples): "
            f"at most {sum(peak.values())} {peak}; at the end {pg[-1]}"
        )
    elif result["pg"]:
        print(f"PostgreSQL connections: not counted ({result['pg'][0]['unavailable']})")
    recovered = result["recovered"]
    print(
        f"after the attack, tenant B's first answer within {args.max_p99_ms:g} ms came "
        + (f"after {recovered:.1f} s" if recovered is not None else f"not within {args.recovery_limit:g} s")
    )

    reasons = []
    p99 = both.summary()["p99_ms"]
    if not p99 <= args.max_p99_ms:
        reasons.append(f"tenant B's p99 {fmt(p99)} ms > {args.max_p99_ms:g} ms")
    if sum(both.errors.values()) > args.max_b_errors:
        reasons.append(f"tenant B had {sum(both.errors.values())} errors (at most {args.max_b_errors})")
    if h["errors"] > args.max_healthz_failures:
        reasons.append(f"/healthz failed {h['errors']} times (at most {args.max_healthz_failures})")
    print("FAIL: " + "; ".join(reasons) if reasons else "PASS")
    return reasons


def as_json(args, result: dict, reasons: list[str]) -> dict:
    return {
        "args": vars(args),
        "tenant_b": {"before": result["before"].summary(), "during": result["during"].summary()},
        "healthz": result["healthz"].summary(),
        "streams": dict(result["streams"]),
        "streams_opened": result["streams_opened"].summary(),
        "uploads": dict(result["uploads"]),
        "pg_connections": result["pg"],
        "recovered_seconds": result["recovered"],
        "failures": reasons,
    }


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.load_hostile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=40.0, help="length of the whole test (default 40)")
    parser.add_argument("--attack-after", type=float, default=5.0, help="seconds of tenant B alone first (default 5)")
    parser.add_argument("--streams", type=int, default=300, help="tenant A's event streams (default 300)")
    parser.add_argument("--uploads", type=int, default=30, help="tenant A's slow uploads (default 30)")
    parser.add_argument("--upload-rate", type=float, default=100.0, help="bytes/s of each slow upload (default 100)")
    parser.add_argument("--upload-size", type=int, default=1_000_000, help="declared Content-Length of a slow upload (default 1 MB)")
    parser.add_argument("--rate", type=float, default=20.0, help="tenant B's GET requests/s (default 20)")
    parser.add_argument("--b-connections", type=int, default=32, help="connections tenant B may open (default 32)")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds before tenant B's GET, or a stream's first event, times out (default 10)"
    )
    parser.add_argument("--healthz-timeout", type=float, default=1.0, help="seconds before a /healthz poll counts as failed (default 1)")
    parser.add_argument(
        "--recovery-limit", type=float, default=15.0, help="seconds to wait, after the attack, for tenant B to be served again (default 15)"
    )
    parser.add_argument("--max-p99-ms", type=float, default=100.0, help="fail above this p99 of tenant B (default 100)")
    parser.add_argument("--max-b-errors", type=int, default=0, help="fail above this many errors of tenant B (default 0)")
    parser.add_argument("--max-healthz-failures", type=int, default=0, help="fail above this many /healthz failures (default 0)")
    parser.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    parser.add_argument("--url", help="an already running service instead of starting one")
    parser.add_argument("--key-a", help="with --url: the hostile tenant's API key")
    parser.add_argument("--key-b", help="with --url: the other tenant's API key")
    parser.add_argument("--pg-url", help="with --url: postgresql://… of the service's database, to count its connections")
    args = parser.parse_args(argv)
    if args.url and not (args.key_a and args.key_b):
        parser.error("--url needs --key-a and --key-b")
    if not 0 <= args.attack_after < args.seconds:
        parser.error("--attack-after must be less than --seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_ctrl_c_and_sigterm()
    limit = raise_open_files_limit(args.streams + args.uploads + args.b_connections + 256)
    with ExitStack() as stack:
        if args.url:
            url = args.url.rstrip("/")
            target = Target(url, args.key_a, args.key_b, submit_job(url, args.key_a), submit_job(url, args.key_b), args.pg_url)
        else:
            local = start_local_service(stack, ["tenant-a", "tenant-b"])
            url, keys = local.api.url, local.keys
            target = Target(
                url,
                keys["tenant-a"],
                keys["tenant-b"],
                submit_job(url, keys["tenant-a"]),
                submit_job(url, keys["tenant-b"]),
                libpq_url(local.database_url),
            )
        print(
            f"{args.seconds:g} s against {target.url} (open files limit {limit}); tenant A attacks after {args.attack_after:g} s "
            f"with {args.streams} event streams and {args.uploads} slow uploads",
            flush=True,
        )
        try:
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                result = runner.run(run(args, target))
        except KeyboardInterrupt:
            print("interrupted: stopping the servers and dropping the database", file=sys.stderr)
            return 130
    reasons = report(args, result)
    if args.json:
        Path(args.json).write_text(json.dumps(as_json(args, result, reasons), indent=2))
    return 1 if reasons else 0


if __name__ == "__main__":
    sys.exit(main())
