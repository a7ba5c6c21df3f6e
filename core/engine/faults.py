"""Failure injection for the fault-tolerance tests, off unless PEERAID_FAULTS is set.

PEERAID_FAULTS="point:action[@n],..." triggers `action` on the n-th time (default the first) this
process reaches `point`: `kill` (SIGKILL its whole process group — a Celery worker and its pool —
as a crashed host would), `enospc` (raise "No space left on device"). Points: `write:<file name>`
inside atomic writes (after the temporary file is written, before it replaces the target),
`final-evaluation` (between the PGD and AutoAttack runs)."""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter

_hits: Counter[str] = Counter()


def fault_point(name: str) -> None:
    spec = os.environ.get("PEERAID_FAULTS")
    if not spec:
        return
    _hits[name] += 1
    for item in spec.split(","):
        point, _, rest = item.strip().rpartition(":")
        action, _, nth = rest.partition("@")
        if point != name or _hits[name] != int(nth or 1):
            continue
        if action == "kill":
            os.killpg(os.getpgrp(), signal.SIGKILL)
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
