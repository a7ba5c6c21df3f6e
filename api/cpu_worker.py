"""The CPU workers' side of `api.cpu_work`: the loop each worker process runs, and the work the API sends it.
This module imports nothing heavy itself (the API imports it to name the work); each function imports the
engine or Matplotlib when called, in a worker, where the fork server has preloaded them."""

from __future__ import annotations

import signal
from multiprocessing.connection import Connection
from typing import Any

from core.engine.estimates import DataShape, Estimate
from core.engine.spec import JobSpec


class Cancelled(Exception):
    """The client went away: the work stopped."""


def serve(conn: Connection, flag: Any) -> None:
    """A worker process: calls from `conn`, one at a time, each cancellable through `flag` (a shared c_byte the API
    sets): a torch dispatch mode checks it before every tensor operation, so a pre-flight stops within milliseconds."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Cancellable(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if flag.value:
                raise Cancelled
            return func(*args, **(kwargs or {}))

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the API's to handle; the worker ends with its pipe
    torch.set_num_threads(1)
    while True:
        try:
            work, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            with Cancellable():
                answer: tuple[str, Any] = ("ok", work(*args))
        except Exception as err:
            answer = ("error", err)
        try:
            conn.send(answer)
        except Exception as err:  # an answer that does not pickle
            conn.send(("error", RuntimeError(f"{type(err).__name__}: {err}")))


def preflight(spec: JobSpec, shape: DataShape) -> Estimate:
    from core.engine.preflight import preflight

    return preflight(spec, shape)


def architectures() -> list[dict[str, Any]]:
    """The models package's architectures, with their smallest input and their parameters for CIFAR-10."""
    from peeraid_models import list_models

    return [
        dict(name=m.name, description=m.description, family=m.family, min_input_size=m.min_input_size, params_cifar10=m.num_params(10, 3))
        for m in list_models()
    ]


def training_curves_png(records: list[dict[str, Any]], title: str) -> bytes:
    from .plots import training_curves_png

    return training_curves_png(records, title)


def network_cache(clear: bool = False) -> dict[str, int]:
    """Through `WorkerPool.each`: this worker's cache of network measures, as hits, misses, currsize; emptied first with `clear`."""
    from core.engine.preflight import network_cost

    if clear:
        network_cost.cache_clear()
    return {k: v for k, v in network_cost.cache_info()._asdict().items() if v is not None}
