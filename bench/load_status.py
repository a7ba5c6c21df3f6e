"""Load test of the service's read endpoints beside a naive baseline, in one run, on one database.

    python -m bench.load_status                      # starts everything on a throwaway PostgreSQL database
    python -m bench.load_status --seconds 20 --clients 16 --rate 200 --json figures.json --profile profile.txt
    python -m bench.load_status --url http://127.0.0.1:8000 --api-key "$KEY" [--naive-url http://127.0.0.1:8001]

By default it creates a database on the local PostgreSQL, starts the service's API
(`python -m service api`, one uvicorn process) and the naive handler (`python -m bench.naive_app`:
GET /v1/jobs/{id} done in the most direct way, same uvicorn settings) on it, creates an API key,
submits a job and adds `--jobs` - 1 more rows, and removes it all at the end (Ctrl-C included).

Phases, each `--seconds` long after a warm-up (one second, or `--seconds` if shorter):
  get    GET /v1/jobs/{id}, closed loop on `--clients` keep-alive connections: service, then naive
         (`--repeat` times, alternating, for a median ratio where other work shares the machine)
  list   GET /v1/jobs (one page of up to 50), closed loop
  sse    GET /v1/jobs/{id}/events: connect, first event, disconnect, closed loop (latency: time to
         first event); started here, the connections are spread over tenants, 8 each, below the
         per-tenant stream limit
  open   GET /v1/jobs/{id} at a fixed `--rate` (open loop: latency counted from the scheduled
         send time), service then naive
  streams  event streams opened `--sse-step` at a time (each step once the last one's first events
         came) up to `--sse-streams` or the first error, all held to the end of the phase: how many
         concurrent streams the service holds. Last, as a server may not recover from it.
Printed per phase: requests/s, p50/p90/p99/max latency (ms), errors, and the CPU used by the server,
PostgreSQL, this load generator and anything else on the machine (100% = one core; the
machine has 2 cores). `--profile FILE` adds a phase that
samples the service's GET /v1/jobs/{id} with py-spy and writes where its time goes.

The load generator is asyncio over raw keep-alive HTTP/1.1 connections (bench/_http.py), in this
process, apart from the servers; `--compare-clients` measures it against httpx.AsyncClient on /healthz."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from ._http import Connection
from ._load import CpuMeter, Sample, closed_loop, open_loop, ramp_streams, stream_openings
from ._stack import REPO, insert_jobs, interrupt_on_ctrl_c_and_sigterm, start_local_service, submit_job

PHASES = ("get", "list", "sse", "open", "streams")  # in this order: streams last, as a server may not recover from it


@dataclass
class Target:
    url: str
    key: str
    job: str
    naive_url: str | None = None
    service_pid: int | None = None
    naive_pid: int | None = None
    stream_tenants: list[tuple[str, str]] = field(default_factory=list)  # (key, job) of more tenants, for the sse phase


# the sse phase spreads its connections over tenants, each below the service's per-tenant stream limit
# (10 by default): one tenant past it is refused with 429 by design, which is not the speed measured here
STREAMS_PER_TENANT = 8


def start_local(stack: ExitStack, jobs: int, sse_clients: int) -> Target:
    stream_tenants = [f"bench-streams-{i}" for i in range(1, math.ceil(sse_clients / STREAMS_PER_TENANT))]
    local = start_local_service(stack, ["bench", *stream_tenants], naive=True)
    key = local.keys["bench"]
    job = submit_job(local.api.url, key)
    insert_jobs(local.database_url, like=job, count=jobs - 1)
    streams = [(local.keys[t], submit_job(local.api.url, local.keys[t])) for t in stream_tenants]
    return Target(local.api.url, key, job, local.naive.url, local.api.pid, local.naive.pid, streams)


def row(endpoint: str, server: str, mode: str, sample: Sample, cpu: dict, **extra) -> dict:
    return {"endpoint": endpoint, "server": server, "mode": mode, **sample.summary(), **cpu, **extra}


class Phases:
    """The phases of one run, each adding its rows (printed as they come)."""

    def __init__(self, args, target: Target):
        self.args, self.target = args, target
        headers = {"Authorization": f"Bearer {target.key}"}
        self.service = lambda: Connection.to(target.url, headers)
        self.servers = [("service", self.service, target.service_pid)]
        if target.naive_url:
            self.servers.append(("naive", lambda: Connection.to(target.naive_url, headers), target.naive_pid))
        self.job_path = f"/v1/jobs/{target.job}"
        self.closed = f"closed loop, {args.clients} connections"
        self.warm_up = min(1.0, args.seconds)
        self.rows: list[dict] = []

    def add(self, *fields, **extra) -> None:
        self.rows.append(row(*fields, **extra))
        report(self.rows[-1])

    async def closed_loop(self, endpoint: str, path: str, server: str, connect, pid: int | None, mode: str) -> None:
        await closed_loop(connect, path, self.args.clients, self.warm_up)  # connections, pools, caches
        meter = CpuMeter(pid)
        sample = await closed_loop(connect, path, self.args.clients, self.args.seconds)
        self.add(endpoint, server, mode, sample, meter.shares())

    async def compare_clients(self) -> None:
        for name, run in (("raw asyncio", closed_loop), ("httpx.AsyncClient", httpx_closed_loop)):
            await run(self.service, "/healthz", self.args.clients, self.warm_up)
            meter = CpuMeter(self.target.service_pid)
            sample = await run(self.service, "/healthz", self.args.clients, self.args.seconds)
            cpu = meter.shares()
            cpu_per_request = cpu["generator_cores"] * sample.seconds / max(1, len(sample.latencies))
            self.add("GET /healthz", "service", f"client {name}", sample, cpu, client=name, generator_us_per_request=1e6 * cpu_per_request)

    async def get(self) -> None:
        repeat = self.args.repeat
        for run in range(1, repeat + 1):
            for server, connect, pid in self.servers:
                mode = self.closed if repeat == 1 else f"{self.closed}, run {run}/{repeat}"
                await self.closed_loop("GET /v1/jobs/{id}", self.job_path, server, connect, pid, mode)

    async def list(self) -> None:
        await self.closed_loop("GET /v1/jobs", "/v1/jobs", "service", self.service, self.target.service_pid, self.closed)

    async def sse(self) -> None:
        target = self.target
        streams = [
            (lambda key=key: Connection.to(target.url, {"Authorization": f"Bearer {key}"}), f"/v1/jobs/{job}/events")
            for key, job in [(target.key, target.job), *target.stream_tenants]
        ]
        meter = CpuMeter(target.service_pid)
        clients = self.args.sse_clients or self.args.clients
        sample = await stream_openings(streams, clients, self.args.seconds)
        mode = f"first event, closed loop, {clients} connections, {len(streams)} tenant{'s' if len(streams) > 1 else ''}"
        self.add("GET /v1/jobs/{id}/events", "service", mode, sample, meter.shares())

    async def open(self) -> None:
        for server, connect, pid in self.servers:
            meter = CpuMeter(pid)
            sample = await open_loop(connect, self.job_path, self.args.rate, self.args.seconds, max_connections=self.args.max_connections)
            self.add("GET /v1/jobs/{id}", server, f"open loop, {self.args.rate:g}/s", sample, meter.shares())

    async def profile(self) -> None:
        if self.target.service_pid is None:
            raise SystemExit("--profile needs the service started here (no --url): py-spy samples its process")
        await profile(self.args, self.service, self.job_path, self.target.service_pid)

    async def streams(self) -> None:
        args = self.args
        meter = CpuMeter(self.target.service_pid)
        reached, outcomes, opened = await ramp_streams(
            self.service, f"{self.job_path}/events", args.sse_streams, args.sse_step, args.seconds
        )
        self.add(
            "GET /v1/jobs/{id}/events",
            "service",
            f"streams, +{args.sse_step} a step up to {args.sse_streams}",
            opened,
            meter.shares(),
            reached=reached,
            held=outcomes.get("held", 0),
            outcomes=dict(outcomes),
        )


async def measure(args, target: Target) -> list[dict]:
    phases = Phases(args, target)
    if args.compare_clients:
        await phases.compare_clients()
    for name in PHASES:
        if name == "streams" and args.profile:
            await phases.profile()  # before the streams, which the server may not recover from
        if name in args.phases:
            await getattr(phases, name)()
    return phases.rows


async def httpx_closed_loop(new_connection, path: str, clients: int, seconds: float) -> Sample:
    """closed_loop's pattern with httpx.AsyncClient instead of raw connections, to compare their cost."""
    import httpx

    template = new_connection()
    sample = Sample()
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://{template.host}:{template.port}", limits=limits, timeout=10) as client:

        async def one_client() -> None:
            while (sent := time.perf_counter()) < deadline:
                try:
                    status = (await client.get(path)).status_code
                    error = None if status == 200 else str(status)
                except httpx.HTTPError as err:
                    error = type(err).__name__
                sample.record(time.perf_counter() - sent, error)

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        sample.seconds = time.perf_counter() - started
    return sample


async def profile(args, service, job_path: str, pid: int) -> None:
    from ._profile import start_py_spy, summarise

    raw = Path(args.profile).with_suffix(".collapsed")
    await closed_loop(service, job_path, args.clients, min(1.0, args.seconds))
    seconds = max(1, round(args.seconds))
    spy = start_py_spy(pid, seconds, raw)
    await asyncio.sleep(0.5)  # py-spy attaching
    sample = await closed_loop(service, job_path, args.clients, seconds)
    _, err = await asyncio.to_thread(spy.communicate)
    if spy.returncode != 0 or not raw.exists():
        raise SystemExit(f"py-spy failed: {err.decode(errors='replace')[-2000:]}")
    summary = f"GET /v1/jobs/{{id}} under py-spy: {sample.summary()['per_second']:.0f} requests/s\n" + summarise(
        raw.read_text(), REPO, seconds
    )
    Path(args.profile).write_text(summary + "\n")
    print(f"\nprofile (collapsed stacks in {raw}, e.g. for flamegraph.pl or speedscope):\n{summary}")


def fmt(value: float, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


HEADER = (
    f"{'endpoint':<26} {'server':<8} {'mode':<52} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>7}"
    "  CPU % server/postgres/generator/other"
)


def report(r: dict) -> None:
    cpu = " / ".join(fmt(100 * r[f"{name}_cores"], 0) for name in ("server", "postgres", "generator", "other"))
    print(
        f"{r['endpoint']:<26} {r['server']:<8} {r['mode']:<52} {fmt(r['per_second']):>8} {fmt(r['p50_ms']):>8} {fmt(r['p90_ms']):>8} "
        f"{fmt(r['p99_ms']):>8} {fmt(r['max_ms']):>8} {r['errors']:>7}  {cpu}",
        flush=True,
    )
    if r["errors"]:
        print(f"{'':<26} errors: {r['errors_by_kind']}")
    if "outcomes" in r:
        print(
            f"{'':<26} opened without error: {r['reached']}; held to the end: {r['held']} of {sum(r['outcomes'].values())}; "
            f"outcomes {r['outcomes']} (latency: time to first event)"
        )
    if "generator_us_per_request" in r:
        print(f"{'':<26} load generator CPU per request: {r['generator_us_per_request']:.0f} µs")


def ratios(rows: list[dict]) -> list[str]:
    """service/naive of each pair of GET /v1/jobs/{id} rows measured alike, and the medians of repeated runs."""
    lines, repeated = [], []
    for mode in sorted({r["mode"] for r in rows if r["server"] == "naive"}):
        pair = {r["server"]: r for r in rows if r["mode"] == mode and r["endpoint"] == "GET /v1/jobs/{id}"}
        if {"service", "naive"} <= pair.keys():
            s, n = pair["service"], pair["naive"]
            ratio = {key: s[key] / n[key] for key in ("per_second", "p50_ms", "p99_ms")}
            lines.append(
                f"GET /v1/jobs/{{id}}, {mode}: service/naive requests/s {ratio['per_second']:.2f}×, "
                f"p50 {ratio['p50_ms']:.2f}×, p99 {ratio['p99_ms']:.2f}×"
            )
            if ", run " in mode:
                repeated.append(ratio)
    if len(repeated) > 1:
        median = {key: statistics.median(r[key] for r in repeated) for key in repeated[0]}
        lines.append(
            f"GET /v1/jobs/{{id}}, closed loop, median of {len(repeated)} runs: service/naive requests/s {median['per_second']:.2f}×, "
            f"p50 {median['p50_ms']:.2f}×, p99 {median['p99_ms']:.2f}×"
        )
    return lines


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.load_status", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase (default 10)")
    parser.add_argument("--clients", type=int, default=16, help="connections of the closed-loop phases (default 16)")
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s of the open-loop phase (default 100)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure GET /v1/jobs/{id} service then naive this many times, "
        "for the median ratio on a machine shared with other work (default 1)",
    )
    parser.add_argument("--max-connections", type=int, default=64, help="connections the open loop may open (default 64)")
    parser.add_argument(
        "--sse-clients",
        type=int,
        help="connections of the sse phase (default: --clients; keep it under a "
        "per-tenant stream limit to time first events rather than refusals)",
    )
    parser.add_argument("--sse-streams", type=int, default=64, help="most event streams the streams phase opens (default 64)")
    parser.add_argument("--sse-step", type=int, default=4, help="event streams opened at a time in the streams phase (default 4)")
    parser.add_argument("--jobs", type=int, default=50, help="jobs of the tenant, for the list (default 50: one page)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)} (default all)")
    parser.add_argument("--compare-clients", action="store_true", help="first measure /healthz with this client and with httpx.AsyncClient")
    parser.add_argument("--profile", metavar="FILE", help="also sample the service under GET /v1/jobs/{id} with py-spy; summary to FILE")
    parser.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    parser.add_argument("--url", help="an already running service instead of starting one")
    parser.add_argument("--api-key", help="with --url")
    parser.add_argument("--job", help="with --url: the job to read (default: submit one)")
    parser.add_argument("--naive-url", help="with --url: a running `python -m bench.naive_app` on the same database")
    args = parser.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if unknown := set(args.phases) - set(PHASES):
        parser.error(f"unknown phases {sorted(unknown)}")
    if args.url and not args.api_key:
        parser.error("--url needs --api-key")
    return args


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_ctrl_c_and_sigterm()
    started = os.getloadavg()
    with ExitStack() as stack:
        if args.url:
            target = Target(args.url.rstrip("/"), args.api_key, args.job or submit_job(args.url, args.api_key), args.naive_url)
        else:
            target = start_local(stack, args.jobs, args.sse_clients or args.clients)
        print(f"{os.cpu_count()} cores; load average {' '.join(f'{x:.2f}' for x in started)} before starting\n\n{HEADER}", flush=True)
        try:
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                rows = runner.run(measure(args, target))
        except KeyboardInterrupt:
            print("interrupted: stopping the servers and dropping the database", file=sys.stderr)
            return 130
    load = os.getloadavg()
    print(*ratios(rows), sep="\n")
    print(f"load average {' '.join(f'{x:.2f}' for x in load)} at the end")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"load_average": {"start": started, "end": load}, "args": vars(args), "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
