"""Load test: poll job status at a steady rate with a real HTTP client while a job runs, and print
latency percentiles and errors.

    python -m bench.load_status --url http://127.0.0.1:8000 --api-key "$KEY" --rate 200 --seconds 60

It submits a job (preset digits-demo unless --job names a running one), then `--clients` threads
each issue GET /v1/jobs/{id} on a fixed schedule (open loop: a slow answer does not delay the next
request, so queueing shows up in the latency) until `--seconds` have passed."""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import httpx


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load_status", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--job", help="poll this job instead of submitting one")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second, all clients together")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args(argv)

    headers = {"Authorization": f"Bearer {args.api_key}"}
    job_id = args.job
    if job_id is None:
        response = httpx.post(f"{args.url}/v1/jobs", headers=headers, json={"preset": "digits-demo"}, timeout=30)
        response.raise_for_status()
        job_id = response.json()["id"]

    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    interval = args.clients / args.rate
    start = time.perf_counter() + 0.5
    deadline = start + args.seconds

    def client(offset: float) -> None:
        with httpx.Client(base_url=args.url, headers=headers, timeout=10) as http:
            due = start + offset
            while due < deadline:
                time.sleep(max(0.0, due - time.perf_counter()))
                sent = time.perf_counter()
                try:
                    response = http.get(f"/v1/jobs/{job_id}")
                    outcome = None if response.status_code == 200 else str(response.status_code)
                except httpx.HTTPError as err:
                    outcome = type(err).__name__
                elapsed = time.perf_counter() - sent
                with lock:
                    latencies.append(elapsed)
                    if outcome:
                        errors[outcome] = errors.get(outcome, 0) + 1
                due += interval

    threads = [threading.Thread(target=client, args=(i * interval / args.clients,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    final = httpx.get(f"{args.url}/v1/jobs/{job_id}", headers=headers, timeout=10).json()
    ms = [1000 * x for x in latencies]
    print(f"job {job_id} ({final['status']}, {final['phase']}): {len(ms)} status requests in {args.seconds:.0f}s "
          f"at a target of {args.rate:.0f}/s from {args.clients} clients")
    print(f"latency ms: p50 {percentile(ms, 0.50):.1f}  p90 {percentile(ms, 0.90):.1f}  p99 {percentile(ms, 0.99):.1f}  "
          f"max {max(ms):.1f}  mean {statistics.fmean(ms):.1f}")
    print(f"errors: {sum(errors.values())} {errors if errors else ''}")


if __name__ == "__main__":
    main()
