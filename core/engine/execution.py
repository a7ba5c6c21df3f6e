"""How a training step executes: precision (fp32 / TF32 / bf16 autocast), memory format, and whether
the whole step — attack, forwards, backward, both optimizer steps — is captured in one CUDA graph.

At batch 128 a PeerAiD step is hundreds of small kernels and the GPU waits on their launches; a
graph replays them all with one launch. Graphs need a static batch shape: full batches replay the
graph, the last partial batch of an epoch runs the same step eagerly. The learning rate is baked
into the captured optimizer kernels, so the graph is re-captured when the schedule changes it
(a handful of times per job)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .errors import SpecError
from .methods import Networks, TrainingMethod

Precision = Literal["fp32", "tf32", "bf16"]
GraphKey = tuple[tuple[int, ...], tuple[float, ...]]  # the batch shape, and every param group's learning rate
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Execution:
    precision: Precision
    cuda_graph: bool
    channels_last: bool

    @staticmethod
    def resolve(precision: Precision | Literal["auto"], cuda_graph: Literal["auto", "on", "off"], device: torch.device) -> Execution:
        on_gpu = device.type == "cuda"
        if precision == "auto":
            precision = "tf32" if on_gpu else "fp32"
        if precision == "tf32" and not on_gpu:
            precision = "fp32"  # TF32 is a tensor-core format; the CPU computes in fp32 anyway
        if cuda_graph == "on" and not on_gpu:
            raise SpecError([{"field": "cuda_graph", "message": f"'on' needs a CUDA device, not {device.type}; use 'auto' or 'off'"}])
        return Execution(precision, cuda_graph == "on" or (cuda_graph == "auto" and on_gpu), on_gpu)

    def configure_backends(self) -> None:
        """TF32 switches are process-wide; a worker runs one job at a time. With bf16 the step runs under
        autocast and everything outside it (validation, the final evaluation) in TF32, as PyTorch's default
        runs the authors' convolutions: in true fp32 the per-epoch validation took 3.8× longer (H200)."""
        tf32 = self.precision in ("tf32", "bf16")
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True

    def autocast(self, device: torch.device):
        if self.precision != "bf16":
            return contextlib.nullcontext()
        # no autocast weight cache: it would hold tensors across graph replays
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


class StepRunner:
    """Calls `method.step` with the chosen precision; on CUDA with cuda_graph, through a captured graph.

    A graph is an optimisation, never a reason to lose a job: if a capture or the replay right after
    it raises, the runner logs a warning, drops the graph, runs that batch eagerly and stays eager for
    the rest of the job. (A replay that fails after launching part of its kernels may have applied part
    of that step; replays fail at launch in practice.) `report()` says what actually ran, and why."""

    def __init__(self, method: TrainingMethod, nets: Networks, execution: Execution, device: torch.device, warmup_steps: int = 3):
        self.method = method
        self.nets = nets
        self.execution = execution
        self.device = torch.device(device)
        self.warmup_left = warmup_steps if execution.cuda_graph else 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_key: GraphKey | None = None
        self.static: dict[str, torch.Tensor] = {}  # the captured step's inputs, "x" and "y"
        self.static_out: dict[str, torch.Tensor] = {}  # and its outputs
        self.steps = 0
        self.captures = 0
        self.fallback: dict[str, Any] | None = None

    @property
    def uses_graph(self) -> bool:
        return self.execution.cuda_graph and self.fallback is None

    def report(self) -> dict[str, Any]:
        """The execution actually used: precision, memory format, graph or eager and why."""
        return {
            "precision": self.execution.precision,
            "channels_last": self.execution.channels_last,
            "cuda_graph_requested": self.execution.cuda_graph,
            "cuda_graph": self.uses_graph,
            "graph_captures": self.captures,
            "fallback": self.fallback,
        }

    def eager(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.execution.autocast(self.device):
            return self.method.step(self.nets, x, y)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        self.steps += 1
        if not self.uses_graph:
            return self.eager(x, y)
        if self.warmup_left > 0:  # real steps on a side stream: lazily created state (momentum) must exist before capture
            self.warmup_left -= 1
            return self._on_side_stream(x, y)
        key: GraphKey = (tuple(x.shape), tuple(g["lr"] for o in self.nets.optimizers() for g in o.param_groups))
        if self.graph is not None:
            assert self.graph_key is not None  # captured together with the graph
            if key[0] != self.graph_key[0]:
                return self.eager(x, y)  # the epoch's last, smaller batch
        if key == self.graph_key:
            return self._replay(x, y)
        phase = "capture"
        try:
            self._capture(x, y, key)
            phase = "first replay"
            out = self._replay(x, y)
            self._synchronize()  # a replay's asynchronous errors surface here, not steps later
            return out
        except Exception as err:
            self._fall_back(phase, err)
            return self.eager(x, y)

    def _fall_back(self, phase: str, err: Exception) -> None:
        reason = f"{phase} failed: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
        log.warning("CUDA graph %s; continuing with eager steps from step %d", reason, self.steps)
        self.fallback = {"reason": reason, "step": self.steps}
        self.graph, self.graph_key, self.static, self.static_out = None, None, {}, {}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _on_side_stream(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            out = self.eager(x, y)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return out

    def _capture(self, x: torch.Tensor, y: torch.Tensor, key: GraphKey) -> None:
        self.graph = None
        torch.cuda.synchronize(self.device)
        static_x, static_y = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.eager(static_x, static_y)
        self.static, self.static_out = {"x": static_x, "y": static_y}, out
        self.graph, self.graph_key = graph, key
        self.captures += 1

    def _replay(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        self.static["x"].copy_(x)
        self.static["y"].copy_(y)
        assert self.graph is not None  # replays follow a capture, whose key they matched
        self.graph.replay()
        return self.static_out

    def _synchronize(self) -> None:
        torch.cuda.synchronize(self.device)
