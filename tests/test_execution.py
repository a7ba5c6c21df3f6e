"""The fast execution path against the eager step, on CPU (graph capture needs CUDA; see bench/)."""

import subprocess
import sys

import pytest
import torch
from peeraid_models import create_model

from core.engine.errors import SpecError
from core.engine.execution import Execution, StepRunner
from core.engine.methods import AttackSettings, Networks, PeerAiD
from core.engine.spec import PAPER_WEIGHTS

W = PAPER_WEIGHTS["cifar100"]


def train(execution: Execution, batches):
    torch.manual_seed(0)
    fmt = torch.channels_last if execution.channels_last else torch.contiguous_format
    student = create_model("resnet18", num_classes=5).to(memory_format=fmt)
    peer = create_model("small_cnn", num_classes=5).to(memory_format=fmt)
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=2e-4)
    nets = Networks(student, sgd(student), peer, sgd(peer))
    runner = StepRunner(PeerAiD(AttackSettings(8 / 255, 2 / 255, 3), W), nets, execution, torch.device("cpu"))
    torch.manual_seed(1)
    for x, y in batches:
        runner(x.contiguous(memory_format=fmt), y)
    return student, peer


def batches(sizes):
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)) for n in sizes]


def assert_same_parameters(nets_a, nets_b, **tolerance):
    for a, b in zip(nets_a, nets_b, strict=True):
        for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            if tolerance:
                torch.testing.assert_close(ta, tb, msg=name, **tolerance)
            else:
                assert torch.equal(ta, tb), name


def test_fast_path_without_capture_matches_eager_fp32_after_n_steps():
    """The CPU fast path (the step runner, graph capture off, a partial last batch) is the eager step exactly."""
    data = batches((16, 16, 16, 7))
    torch.manual_seed(0)
    student = create_model("resnet18", num_classes=5)
    peer = create_model("small_cnn", num_classes=5)
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=2e-4)
    nets = Networks(student, sgd(student), peer, sgd(peer))
    method = PeerAiD(AttackSettings(8 / 255, 2 / 255, 3), W)
    torch.manual_seed(1)
    for x, y in data:
        method.step(nets, x, y)
    assert_same_parameters((student, peer), train(Execution.resolve("fp32", "off", torch.device("cpu")), data))


def test_channels_last_changes_only_rounding():
    """Memory format reorders the float arithmetic (and so, rarely, the sign of a near-zero input gradient in
    the attack): per tensor, the two steps differ by under 2% of the step's own update."""
    data = batches((16,))
    torch.manual_seed(0)
    start = create_model("resnet18", num_classes=5).state_dict()
    nchw, _ = train(Execution("fp32", cuda_graph=False, channels_last=False), data)
    nhwc, _ = train(Execution("fp32", cuda_graph=False, channels_last=True), data)
    for name, p in nchw.named_parameters():
        update = (p - start[name]).norm()
        assert update > 0 and (p - dict(nhwc.named_parameters())[name]).norm() < 0.02 * update, name


def test_execution_defaults_per_device():
    cpu = Execution.resolve("auto", "auto", torch.device("cpu"))
    assert cpu == Execution("fp32", False, False)
    assert Execution.resolve("tf32", "off", torch.device("cpu")).precision == "fp32"
    assert Execution.resolve("bf16", "auto", torch.device("cpu")).precision == "bf16"
    assert Execution.resolve("auto", "auto", torch.device("cuda")) == Execution("tf32", True, True)
    with pytest.raises(SpecError, match="cuda_graph: 'on' needs a CUDA device") as err:
        Execution.resolve("fp32", "on", torch.device("cpu"))
    assert err.value.errors[0]["field"] == "cuda_graph"


@pytest.mark.parametrize(("precision", "tf32"), [("fp32", False), ("tf32", True), ("bf16", True)])
def test_tf32_outside_autocast_except_in_strict_fp32(precision, tf32):
    """bf16 autocasts the step only; its validation in true fp32 took 3.8× TF32's time on an H200."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    try:
        Execution(precision, False, False).configure_backends()
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def test_bf16_autocast_step_runs_and_stays_close_on_cpu():
    data = batches((16,))
    fp32, _ = train(Execution("fp32", False, False), data)
    bf16, _ = train(Execution("bf16", False, False), data)
    drift = max((a - b).abs().max().item() for a, b in zip(fp32.parameters(), bf16.parameters(), strict=True))
    assert 0 < drift < 0.05


def test_benchmark_command_runs(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.train_step",
            "--device",
            "cpu",
            "--archs",
            "small_cnn",
            "--batch",
            "16",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--epoch-images",
            "64",
            "--epoch-val-images",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    for word in ("reference", "eager", "tf32-graph", "bf16-graph", "images/s", "× ref", "epoch fp32"):
        assert word in out.stdout, out.stdout


class CaptureFails(StepRunner):
    """The real runner, with the CUDA capture replaced by the error a failed capture raises."""

    def _capture(self, x, y, key):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


class FirstReplayFails(StepRunner):
    """The real runner; its capture keeps the static buffers a capture keeps, and the replay raises."""

    def _capture(self, x, y, key):
        self.static, self.graph_key = {"x": x.clone(), "y": y.clone()}, key
        self.captures += 1

    def _replay(self, x, y):
        raise RuntimeError("CUDA error: an illegal instruction was encountered")

    def _synchronize(self):
        pass


@pytest.mark.parametrize("runner_class,phase", [(CaptureFails, "capture"), (FirstReplayFails, "first replay")])
def test_a_failing_cuda_graph_falls_back_to_eager_steps(runner_class, phase, caplog):
    data = batches((16, 16, 16, 7))

    def run(make_runner):
        torch.manual_seed(0)
        student = create_model("small_cnn", num_classes=5)
        peer = create_model("small_cnn", num_classes=5)
        sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=2e-4)
        runner = make_runner(PeerAiD(AttackSettings(8 / 255, 2 / 255, 3), W), Networks(student, sgd(student), peer, sgd(peer)))
        torch.manual_seed(1)
        losses = [runner(x, y) for x, y in data]
        return runner, (student, peer), losses

    cpu = torch.device("cpu")
    eager, eager_nets, _ = run(lambda method, nets: StepRunner(method, nets, Execution("fp32", False, False), cpu))
    with caplog.at_level("WARNING", logger="core.engine.execution"):
        failing, failing_nets, losses = run(
            lambda method, nets: runner_class(method, nets, Execution("fp32", True, False), cpu, warmup_steps=0)
        )
    assert_same_parameters(eager_nets, failing_nets)  # no step lost, none applied twice
    assert all(torch.isfinite(v) for step in losses for v in step.values())
    report = failing.report()
    assert report["cuda_graph_requested"] and not report["cuda_graph"]
    assert report["fallback"]["step"] == 1 and report["fallback"]["reason"].startswith(f"{phase} failed: RuntimeError: CUDA error")
    assert report["graph_captures"] == (1 if phase == "first replay" else 0)
    assert f"CUDA graph {phase} failed" in caplog.text and "continuing with eager steps" in caplog.text
    assert eager.report() == {
        "precision": "fp32",
        "channels_last": False,
        "cuda_graph_requested": False,
        "cuda_graph": False,
        "graph_captures": 0,
        "fallback": None,
    }


def test_the_trainer_reports_the_execution_it_used(tiny_splits, tmp_path):
    from core.engine.trainer import Trainer

    from .conftest import tiny_spec

    trainer = Trainer(tiny_spec(precision="bf16"), tiny_splits, workdir=tmp_path)
    assert trainer.execution_report() == {
        "device": "cpu",
        "precision": "bf16",
        "channels_last": False,
        "cuda_graph_requested": False,
        "cuda_graph": False,
        "graph_captures": 0,
        "fallback": None,
    }
