"""How the service words quantities for people, in one place for the API (its web pages) and the workers (their
messages). Torch-free; the client, which may not import the service, has its own (peeraid_client.progress)."""

from __future__ import annotations

import math
from typing import Any


def format_duration(seconds: Any) -> str:
    """A duration in its two largest units: "45s", "3m 07s", "2h 05m", "7d 00h"; "–" for anything not a finite number."""
    if not isinstance(seconds, int | float) or not math.isfinite(seconds):
        return "–"
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"
