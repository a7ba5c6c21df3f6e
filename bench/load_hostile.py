"""Does the service hold under a hostile tenant? A bounded load test, on this machine only.

    python -m bench.load_hostile                     # starts the API on a throwaway PostgreSQL database
    python -m bench.load_hostile --seconds 60 --streams 300 --uploads 30 --rate 20 --phases streams,preflights
    python -m bench.load_hostile --url http://127.0.0.1:8000 --key-a "$KEY_A" --key-b "$KEY_B" [--pg-url postgresql://…/db] [--api-pid PID]

From the start, tenant B reads its own job (GET /v1/jobs/{id}) at a steady `--rate` (open loop:
latency counted from the scheduled send time) and /healthz is polled every 100 ms. After
`--attack-after` seconds, tenant A (or anyone, without a key) attacks in phases, one after another,
sharing the rest of the time. The attack (`bench/_attacks.py` says what each phase sends) runs as a process
of its own at a lower CPU priority: its loops never delay the measuring of B's latencies, and on this
shared machine they take the cores the service leaves (an attacker elsewhere would take none of them):

- streams: `--streams` event streams on A's queued job and `--uploads` uploads trickling at `--upload-rate` B/s;
- bodies: 400 MiB bodies of odd content types, declared or chunked, with no key;
- json: A's 8.8 MB application/*+json bodies, and deeply nested ones;
- multipart: 1 GiB multipart bodies to the sign-in form (/ui/login);
- preflights: 32 concurrent pre-flights with A's key, over many architectures and datasets, a quarter of
  them abandoned 50 ms after sending;
- spellings: six spellings of A's Authorization header, `--spelling-requests` requests held in flight each;
- charts: 100 loops fetching A's job's curves on its web page, with a web session.

Every second, the PostgreSQL connections of the service's database are counted by state
(pg_stat_activity); every 0.25 s the API's resident memory (its processes together) and the size of its
temporary directory (the local service's TMPDIR, or `--tmp-dir`).

Printed, per phase: tenant B's latency percentiles and errors, /healthz failures, the API's memory (RSS,
at the phase's start and at most; PSS before and after the run) and temporary files (growth at most), the CPU of the API (its
worker processes included), of the attacker and of the machine's other work (another user's, which a
shared machine has), and what A's requests got (admitted, refused with 413 / 415 / 422 / 429, failed);
then the PostgreSQL connections and how long B waited for a good answer after the attack. Exit status 1
when tenant B's p99 (in any phase, or over the whole run) is over `--max-p99-ms`, B had more than
`--max-b-errors` errors, or /healthz failed more than `--max-healthz-failures` times; 0 otherwise."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import sys
import time
from collections import Counter
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path

from ._attacks import PHASES
from ._http import Connection
from ._load import NETWORK_ERRORS, CpuMeter, Sample, all_processes, error_name, open_loop, outcome_of, process_seconds, tree_seconds
from ._stack import REPO, interrupt_on_ctrl_c_and_sigterm, libpq_url, start_local_service, submit_job
from .load_status import fmt, new_event_loop

HEALTHZ_INTERVAL = 0.1
ATTACKER_NICENESS = 10  # the attacking process takes the cores the service and the measuring leave


@dataclass
class Target:
    url: str
    key_a: str
    key_b: str
    job_a: str
    job_b: str
    pg_url: str | None  # libpq URL of the service's database, for pg_stat_activity
    api_pid: int | None = None  # the API's (first) process, for its memory and CPU
    attacker_pid: int | None = None  # the attacking process, once started, for its CPU
    tmp_dir: Path | None = None  # the API's temporary directory, for its growth


def raise_open_files_limit(needed: int) -> int:
    """Make room for `needed` descriptors (and for the servers started after, which inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


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


def process_tree(pid: int) -> list[int]:
    """A process and its descendants (the API and its worker processes)."""
    return list(tree_seconds(pid, all_processes()))


def resident_bytes(tree: list[int]) -> int:
    """Resident memory of processes from /proc/*/status: the sum of their RSS, which counts the pages they share
    (torch's, forked) once per process. Cheap to read."""
    total = 0
    for each in tree:
        with suppress(OSError, StopIteration), open(f"/proc/{each}/status") as status:
            total += next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    return total


def proportional_bytes(pid: int) -> int:
    """The same processes' PSS, which divides each shared page among its sharers. Reading it walks each process's
    page tables (some 20 ms for the API, holding off its memory mappings meanwhile), so it is read only before
    and after the run: every 0.25 s, it was itself the slowest of the other tenant's answers."""
    total = 0
    for each in tree_seconds(pid, all_processes()):
        with suppress(OSError, StopIteration), open(f"/proc/{each}/smaps_rollup") as rollup:
            total += next(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Pss:"))
    return total


def temporary_bytes(path: Path, tree: list[int]) -> int:
    """Bytes in the API's temporary directory: its files, and those it holds open there already unlinked
    (tempfile.TemporaryFile, as a spooled form upload's, has no name to find it by)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with suppress(OSError):
                info = os.lstat(os.path.join(root, name))
                seen.add((info.st_dev, info.st_ino))
                total += info.st_size
    for each in tree:
        with suppress(OSError):
            for fd in os.listdir(f"/proc/{each}/fd"):
                with suppress(OSError):
                    if os.readlink(f"/proc/{each}/fd/{fd}").startswith(str(path)):
                        info = os.stat(f"/proc/{each}/fd/{fd}")
                        if (info.st_dev, info.st_ino) not in seen:
                            seen.add((info.st_dev, info.st_ino))
                            total += info.st_size
    return total


def cpu_seconds(pid: int) -> float:
    return sum(tree_seconds(pid, all_processes()).values()) if process_seconds(pid)[0] else math.nan


@dataclass
class Watch:
    """The API's memory and temporary files, sampled every 0.25 s (first, most, last); the CPU of the API, of the
    attacker, and of the machine's other work (all but these, this process and PostgreSQL), in cores."""

    rss: list[int] = field(default_factory=list)
    tmp: list[int] = field(default_factory=list)
    cpu_cores: float = math.nan
    attacker_cores: float = math.nan
    other_cores: float = math.nan

    def summary(self) -> dict:
        def first_most_last(values: list[int]) -> dict:
            mib = 1024 * 1024
            return {"start": values[0] / mib, "most": max(values) / mib, "end": values[-1] / mib} if values else {}

        return {
            "rss_mib": first_most_last(self.rss),
            "tmp_mib": first_most_last(self.tmp),
            "cpu_cores": self.cpu_cores,
            "attacker_cores": self.attacker_cores,
            "other_cores": self.other_cores,
        }


async def watch(target: Target, until: float) -> Watch:
    result = Watch()
    meter = CpuMeter(target.api_pid)
    attacker_pid = target.attacker_pid
    attacker = cpu_seconds(attacker_pid) if attacker_pid else 0.0
    while True:
        tree = process_tree(target.api_pid) if target.api_pid else []
        if tree:
            result.rss.append(resident_bytes(tree))
        if target.tmp_dir:
            result.tmp.append(temporary_bytes(target.tmp_dir, tree))
        if time.perf_counter() >= until:
            break
        await asyncio.sleep(min(0.25, max(0.0, until - time.perf_counter())))
    wall = time.perf_counter() - meter.start[0]
    shares = meter.shares()
    result.cpu_cores = shares["server_cores"]
    result.attacker_cores = (cpu_seconds(attacker_pid) - attacker) / wall if attacker_pid else 0.0
    result.other_cores = max(0.0, shares["other_cores"] - result.attacker_cores)
    return result


@dataclass
class Phase:
    name: str
    b: Sample
    healthz: Sample
    watch: Watch
    attack: dict = field(default_factory=dict)


async def measured(target: Target, args, name: str, seconds: float) -> Phase:
    """Tenant B's open loop, the /healthz polls and the API's memory, temporary files and CPU, for `seconds`."""

    def connect_b() -> Connection:
        return Connection.to(target.url, {"Authorization": f"Bearer {target.key_b}"})

    until = time.perf_counter() + seconds
    healthz = asyncio.create_task(poll_healthz(target.url, until, args.healthz_timeout))
    watched = asyncio.create_task(watch(target, until))
    b = await open_loop(connect_b, f"/v1/jobs/{target.job_b}", args.rate, seconds, max_connections=args.b_connections, timeout=args.timeout)
    return Phase(name, b, await healthz, await watched)


async def attacker(target: Target, args, schedule: list[dict]) -> dict:
    """The attack phases, in a process of their own (bench._attacks); their outcomes by phase."""
    plan = {
        "url": target.url,
        "key_a": target.key_a,
        "job_a": target.job_a,
        "phases": schedule,
        "timeout": args.timeout,
        "streams": args.streams,
        "uploads": args.uploads,
        "upload_rate": args.upload_rate,
        "upload_size": args.upload_size,
        "spelling_requests": args.spelling_requests,
    }
    niced = f"import os, runpy; os.nice({ATTACKER_NICENESS}); runpy.run_module('bench._attacks', run_name='__main__', alter_sys=True)"
    process = await asyncio.create_subprocess_exec(  # at the lower priority from its first import on
        sys.executable, "-c", niced, cwd=REPO, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    target.attacker_pid = process.pid
    try:
        out, _ = await process.communicate(json.dumps(plan).encode())
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode != 0:
        return {phase["name"]: {"error": f"the attacking process exited with {process.returncode}"} for phase in schedule}
    return json.loads(out)


async def run(args, target: Target) -> dict:
    pss_before = proportional_bytes(target.api_pid) if target.api_pid else None
    started = time.time()
    length = (args.seconds - args.attack_after) / len(args.phases)
    schedule = [
        {"name": name, "start": started + args.attack_after + i * length, "end": started + args.attack_after + (i + 1) * length}
        for i, name in enumerate(args.phases)
    ]
    end = time.perf_counter() + args.seconds
    connections = asyncio.create_task(sample_database_connections(target.pg_url, end)) if target.pg_url else None
    attacking = asyncio.create_task(attacker(target, args, schedule))
    try:
        phases = [await measured(target, args, "before the attack", args.attack_after)]
        for phase in schedule:
            phases.append(await measured(target, args, phase["name"], max(0.0, phase["end"] - time.time())))
        outcomes = await attacking
    finally:
        attacking.cancel()  # on Ctrl-C: the attacking process is killed
    for phase in phases[1:]:
        phase.attack = outcomes.get(phase.name, {})

    def connect_b() -> Connection:
        return Connection.to(target.url, {"Authorization": f"Bearer {target.key_b}"})

    recovered = await recovery_seconds(connect_b, f"/v1/jobs/{target.job_b}", args.recovery_limit, args.max_p99_ms / 1000)
    try:
        pg_samples = await connections if connections else []
    except Exception as err:  # the count is extra information: its failure must not hide the rest
        pg_samples = [{"unavailable": str(err).splitlines()[0]}]
    pss_after = proportional_bytes(target.api_pid) if target.api_pid else None
    return {"phases": phases, "pg": pg_samples, "recovered": recovered, "pss_bytes": [pss_before, pss_after]}


def _others(outcomes: dict, *known: str) -> dict:
    return {k: v for k, v in outcomes.items() if k not in known}


def attack_summary(phase: Phase) -> str:
    attack = phase.attack
    if "error" in attack:
        return f"the attack failed: {attack['error']}"
    if phase.name == "streams":
        streams, uploads = attack.get("streams", {}), attack.get("uploads", {})
        return (
            f"streams held {streams.get('held', 0)}, refused (429) {streams.get('429', 0)}, other {_others(streams, 'held', '429')}; "
            f"uploads still uploading {uploads.get('uploading at the end', 0)}, refused (429) {uploads.get('429', 0)}, "
            f"other {_others(uploads, 'uploading at the end', '429')}"
        )
    text = ", ".join(f"{outcome}: {count}" for outcome, count in sorted(attack.get("outcomes", {}).items()))
    if "most_bytes_sent_before_the_answer" in attack:
        text += f"; at most {attack['most_bytes_sent_before_the_answer'] / 1024:,.0f} KiB sent before an answer"
    return text


def overall(phases: list[Phase], pick) -> Sample:
    samples = [pick(p) for p in phases]
    return Sample(
        [x for s in samples for x in s.latencies], sum((s.errors for s in samples), start=Counter()), sum(s.seconds for s in samples)
    )


def report(args, result: dict) -> list[str]:
    """Prints the outcome; returns the reasons for failing (empty: passed)."""
    phases: list[Phase] = result["phases"]
    print(
        f"{'phase':<18} {'B requests':>10} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'B errors':>8} {'/healthz failed':>15} "
        f"{'API RSS MiB':>17} {'tmp MiB':>8} {'CPU: API':>8} {'attack':>6} {'other':>5}"
    )
    for phase in phases:
        s, h, w = phase.b.summary(), phase.healthz.summary(), phase.watch.summary()
        rss, tmp = w["rss_mib"], w["tmp_mib"]
        rss_text = f"{rss['start']:,.0f} → {rss['most']:,.0f}" if rss else "–"
        tmp_text = f"+{tmp['most'] - tmp['start']:,.1f}" if tmp else "–"
        print(
            f"{phase.name:<18} {s['requests']:>10} {fmt(s['p50_ms']):>7} {fmt(s['p99_ms']):>7} {fmt(s['max_ms']):>7} {s['errors']:>8} "
            f"{h['errors']:>6} of {h['requests']:<6} {rss_text:>17} {tmp_text:>8} {fmt(w['cpu_cores'], 2):>8} "
            f"{fmt(w['attacker_cores'], 2):>6} {fmt(w['other_cores'], 2):>5}"
        )
        if phase.b.errors or phase.healthz.errors:
            print(f"    B errors {dict(phase.b.errors)}; /healthz failures {dict(phase.healthz.errors)}")
        if phase.attack:
            print(f"    {attack_summary(phase)}")
    b, healthz = overall(phases, lambda p: p.b), overall(phases, lambda p: p.healthz)
    s, h = b.summary(), healthz.summary()
    print(
        f"{'all':<18} {s['requests']:>10} {fmt(s['p50_ms']):>7} {fmt(s['p99_ms']):>7} {fmt(s['max_ms']):>7} {s['errors']:>8} "
        f"{h['errors']:>6} of {h['requests']:<6} (/healthz p99 {fmt(h['p99_ms'])} ms, max {fmt(h['max_ms'])} ms)"
    )
    if None not in result["pss_bytes"]:
        before, after = (value / 2**20 for value in result["pss_bytes"])
        print(f"the API's PSS (its worker processes included): {before:,.0f} MiB before the run, {after:,.0f} MiB after it")
    pg = [sample for sample in result["pg"] if "unavailable" not in sample]
    if pg:
        peak = max(pg, key=lambda sample: sum(sample.values()))
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
    for phase in phases:
        if (p99 := phase.b.summary()["p99_ms"]) > args.max_p99_ms:
            reasons.append(f"tenant B's p99 {fmt(p99)} ms > {args.max_p99_ms:g} ms ({phase.name})")
    if not s["p99_ms"] <= args.max_p99_ms:
        reasons.append(f"tenant B's p99 {fmt(s['p99_ms'])} ms > {args.max_p99_ms:g} ms (all)")
    if s["errors"] > args.max_b_errors:
        reasons.append(f"tenant B had {s['errors']} errors (at most {args.max_b_errors})")
    if h["errors"] > args.max_healthz_failures:
        reasons.append(f"/healthz failed {h['errors']} times (at most {args.max_healthz_failures})")
    print("FAIL: " + "; ".join(reasons) if reasons else "PASS")
    return reasons


def as_json(args, result: dict, reasons: list[str]) -> dict:
    return {
        "args": {**vars(args), "tmp_dir": str(args.tmp_dir) if args.tmp_dir else None},
        "phases": [
            {"name": p.name, "tenant_b": p.b.summary(), "healthz": p.healthz.summary(), "api": p.watch.summary(), "attack": p.attack}
            for p in result["phases"]
        ],
        "pss_mib": [value / 2**20 if value is not None else None for value in result["pss_bytes"]],
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
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"attack phases, in this order, sharing the time (default {','.join(PHASES)})"
    )
    parser.add_argument("--streams", type=int, default=300, help="tenant A's event streams (default 300)")
    parser.add_argument("--uploads", type=int, default=30, help="tenant A's slow uploads (default 30)")
    parser.add_argument("--upload-rate", type=float, default=100.0, help="bytes/s of each slow upload (default 100)")
    parser.add_argument("--upload-size", type=int, default=1_000_000, help="declared Content-Length of a slow upload (default 1 MB)")
    parser.add_argument(
        "--spelling-requests", type=int, default=32, help="requests held in flight per Authorization spelling (default 32; 6 spellings)"
    )
    parser.add_argument("--rate", type=float, default=20.0, help="tenant B's GET requests/s (default 20)")
    parser.add_argument("--b-connections", type=int, default=32, help="connections tenant B may open (default 32)")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds before a request (or a stream's first event) times out (default 10)"
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
    parser.add_argument("--api-pid", type=int, help="with --url: the API's process, to watch its memory and CPU")
    parser.add_argument("--tmp-dir", type=Path, help="with --url: the API's temporary directory, to watch its growth")
    args = parser.parse_args(argv)
    if args.url and not (args.key_a and args.key_b):
        parser.error("--url needs --key-a and --key-b")
    if not 0 <= args.attack_after < args.seconds:
        parser.error("--attack-after must be less than --seconds")
    args.phases = [name.strip() for name in args.phases.split(",") if name.strip()]
    unknown = [name for name in args.phases if name not in PHASES]
    if unknown or not args.phases:
        parser.error(f"--phases: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(PHASES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_ctrl_c_and_sigterm()
    limit = raise_open_files_limit(args.streams + args.uploads + 6 * args.spelling_requests + args.b_connections + 256)
    with ExitStack() as stack:
        if args.url:
            url = args.url.rstrip("/")
            target = Target(
                url,
                args.key_a,
                args.key_b,
                submit_job(url, args.key_a),
                submit_job(url, args.key_b),
                args.pg_url,
                api_pid=args.api_pid,
                tmp_dir=args.tmp_dir,
            )
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
                api_pid=local.api.pid,
                tmp_dir=local.tmp_dir,
            )
        print(
            f"{args.seconds:g} s against {target.url} (open files limit {limit}); tenant A attacks after {args.attack_after:g} s, "
            f"in phases of {(args.seconds - args.attack_after) / len(args.phases):.1f} s: {', '.join(args.phases)}",
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
