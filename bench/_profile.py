"""Sampling a server with py-spy while it is under load, and a text summary of where its time goes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

RATE = 250  # samples a second
# what a thread of the server always runs under (its start, the event loop): no news in an inclusive profile
ROOT_FUNCTIONS = {
    "_run_module_as_main",
    "_run_code",
    "<module>",
    "main",
    "cmd_api",
    "run_api",
    "run",
    "Server.run",
    "Server.serve",
    "asyncio_run",
    "Runner.run",
    "Thread._bootstrap",
    "Thread._bootstrap_inner",
    "WorkerThread.run",
}
PROJECT_AREAS = {"api", "core", "worker", "bench"}
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy_command() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")
    return found


def start_py_spy(pid: int, seconds: int, output: Path, rate: int = RATE) -> subprocess.Popen:
    """Collapsed stacks ('thread;frame;frame;... count' lines) of `pid` for `seconds`, of the thread
    holding the GIL only: one process runs one thread of Python at a time, so the GIL's time is the
    server's capacity, and a thread merely runnable (on a busy machine) or waiting is not counted.
    Non-blocking: the server is not paused at each sample, so it runs at its own speed."""
    return subprocess.Popen(
        [
            py_spy_command(),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            str(rate),
            "--gil",
            "--format",
            "raw",
            "--full-filenames",
            "--threads",
            "--nonblocking",
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def read_collapsed(text: str) -> list[tuple[list[str], int]]:
    stacks = []
    for line in text.splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append((frames.split(";"), int(count)))
    return stacks


def frame_name(frame: str, repo: Path) -> tuple[str, str]:
    """(function and short file, area) of one py-spy frame, e.g. ('authenticate (api/security.py)', 'api')."""
    match = FRAME.match(frame)
    if match is None:
        return frame, "?"
    path = match["file"]
    if "site-packages/" in path:
        short = path.split("site-packages/", 1)[1]
        area = short.split("/", 1)[0].removesuffix(".py")
    elif path.startswith(str(repo) + "/"):
        short = path[len(str(repo)) + 1 :]
        area = short.split("/", 1)[0]
    elif re.search(r"/python3\.\d+/", path):
        short = re.split(r"/python3\.\d+/", path, maxsplit=1)[1]
        area = "stdlib " + short.split("/", 1)[0].removesuffix(".py")
    else:
        short, area = path, path.split("/", 1)[0] or "?"
    return f"{match['function']} ({short})", area


def summarise(text: str, repo: Path, seconds: float | None = None, rate: int = RATE, top: int = 25) -> str:
    """Shares of all samples: by thread, by package and function, self time (the running frame)
    and inclusive (anywhere on the stack). With `seconds`, also how busy the GIL was."""
    stacks = read_collapsed(text)
    total = sum(count for _, count in stacks)
    if not total:
        return "no samples (was the server busy? py-spy needs ptrace rights)"
    own, areas, threads, inclusive, project = Counter(), Counter(), Counter(), Counter(), Counter()
    for frames, count in stacks:
        thread, code = (frames[0].partition("): ")[2] or frames[0], frames[1:]) if frames[0].startswith("thread (") else ("?", frames)
        threads["event loop (MainThread)" if thread == "MainThread" else f"thread pool ({thread})" if "worker" in thread else thread] += (
            count
        )
        names = [frame_name(frame, repo) for frame in code]
        if names:
            own[names[-1][0]] += count
            areas[names[-1][1]] += count
        for name, area in set(names):
            if name.split(" (", 1)[0] not in ROOT_FUNCTIONS:
                inclusive[name] += count
                if area in PROJECT_AREAS:
                    project[name] += count

    def table(title: str, counts: Counter, rows: int) -> list[str]:
        return [title, *(f"  {100 * n / total:5.1f}%  {name}" for name, n in counts.most_common(rows))]

    busy = f", the GIL held {100 * total / (rate * seconds):.0f}% of the time" if seconds else ""
    return "\n".join(
        [
            f"{total} samples at {rate}/s{busy}; shares of these samples:",
            *table("by thread:", threads, 5),
            *table("self time by package:", areas, 15),
            *table("self time by function:", own, top),
            *table("inclusive time by function (without the frames a thread starts with):", inclusive, top),
            *table("inclusive time by function of the project's code:", project, top),
        ]
    )
