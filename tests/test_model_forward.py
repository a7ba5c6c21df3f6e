"""Every architecture's forward pass, pinned two ways.

1. Against an independent functional transcription of the authors' modules (models/resnet.py,
   wide_resnet.py, mobilenetv2.py of the PeerAiD code, CIFAR branch: fixed average pools) on the same
   random weights, BatchNorm in eval mode: a wrong shortcut, pooling, activation or stride fails.
2. Against logits stored in tests/data/model_reference_logits.json (written once by
   `python -m tests.make_model_references`), in train and eval mode: any later change to a forward
   pass fails, including small_cnn's, which has no external counterpart.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peeraid_models import create_model
from peeraid_models.wide_resnet import WideResNet

from .test_models import _mobilenetv2_layout, _preact_layout, _random_state_dict, _resnet_layout, _wrn_layout

REFERENCE_FILE = Path(__file__).parent / "data" / "model_reference_logits.json"
REFERENCE_ARCHITECTURES = ["mobilenetv2", "preactresnet18", "resnet18", "resnet34", "resnet50", "small_cnn", "wrn28_10", "wrn34_10"]


def reference_input(in_channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.rand(2, in_channels, size, size, generator=torch.Generator().manual_seed(7))


def seeded_model(name: str, num_classes: int = 10) -> torch.nn.Module:
    """The registry's network with weights and BatchNorm statistics drawn from a fixed seed."""
    model = create_model(name, num_classes=num_classes, in_channels=3)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith("num_batches_tracked"):
                continue
            if key.endswith("running_var") or (key.endswith(".weight") and tensor.dim() == 1):
                tensor.copy_(torch.rand(tensor.shape, generator=g) * 0.5 + 0.75)
            elif tensor.dim() == 1:
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=g))
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=g) / tensor[0].numel() ** 0.5)
    return model


def reference_logits(name: str) -> dict[str, list[list[float]]]:
    model = seeded_model(name)
    x = reference_input()
    out = {}
    with torch.no_grad():
        for mode in ("train", "eval"):
            model.train(mode == "train")
            out[mode] = model(x).tolist()
    return out


@pytest.mark.parametrize("name", REFERENCE_ARCHITECTURES)
def test_forward_matches_the_stored_reference_logits(name):
    stored = json.loads(REFERENCE_FILE.read_text())[name]
    got = reference_logits(name)
    # Train-mode BatchNorm over a batch of 2 amplifies rounding through deep networks: ResNet-50 differs by
    # 4e-5 between CPUs with and without AVX-512 kernels. A changed layer moves logits by far more than either.
    tolerance = {"train": dict(rtol=1e-3, atol=1e-4), "eval": dict(rtol=1e-4, atol=1e-5)}
    for mode in ("train", "eval"):
        torch.testing.assert_close(torch.tensor(got[mode]), torch.tensor(stored[mode]), **tolerance[mode], msg=f"{name} {mode}")


# ---- an independent functional transcription of the authors' modules ----


def bn(sd, p, x):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"], False, 0.0, 1e-5)


def conv(sd, p, x, stride=1, groups=1):
    w = sd[f"{p}.weight"]
    return F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2, groups=groups)


def resnet_reference(sd, x, blocks, bottleneck):
    out = F.relu(bn(sd, "bn1", conv(sd, "conv1", x)))
    for li, (n, stride) in enumerate(zip(blocks, (1, 2, 2, 2), strict=True), 1):
        for b in range(n):
            p, s = f"layer{li}.{b}", stride if b == 0 else 1
            if bottleneck:
                y = F.relu(bn(sd, f"{p}.bn1", conv(sd, f"{p}.conv1", out)))
                y = F.relu(bn(sd, f"{p}.bn2", conv(sd, f"{p}.conv2", y, s)))
                y = bn(sd, f"{p}.bn3", conv(sd, f"{p}.conv3", y))
            else:
                y = F.relu(bn(sd, f"{p}.bn1", conv(sd, f"{p}.conv1", out, s)))
                y = bn(sd, f"{p}.bn2", conv(sd, f"{p}.conv2", y))
            shortcut = bn(sd, f"{p}.shortcut.1", conv(sd, f"{p}.shortcut.0", out, s)) if f"{p}.shortcut.0.weight" in sd else out
            out = F.relu(y + shortcut)
    out = F.avg_pool2d(out, 4).flatten(1)
    return F.linear(out, sd["linear.weight"], sd["linear.bias"])


def preact_reference(sd, x):
    out = conv(sd, "conv1", x)
    for li, stride in enumerate((1, 2, 2, 2), 1):
        for b in range(2):
            p, s = f"layer{li}.{b}", stride if b == 0 else 1
            pre = F.relu(bn(sd, f"{p}.bn1", out))
            # the authors' PreActBlock (out_shortcut=False): the projection takes the block's raw input
            shortcut = conv(sd, f"{p}.shortcut.0", out, s) if f"{p}.shortcut.0.weight" in sd else out
            y = conv(sd, f"{p}.conv1", pre, s)
            out = conv(sd, f"{p}.conv2", F.relu(bn(sd, f"{p}.bn2", y))) + shortcut
    out = F.avg_pool2d(out, 4).flatten(1)
    return F.linear(out, sd["linear.weight"], sd["linear.bias"])


def wrn_reference(sd, x, depth):
    n = (depth - 4) // 6
    out = conv(sd, "conv1", x)
    for g, stride in enumerate((1, 2, 2), 1):
        for b in range(n):
            p, s = f"block{g}.layer.{b}", stride if b == 0 else 1
            pre = F.relu(bn(sd, f"{p}.bn1", out))
            if f"{p}.convShortcut.weight" in sd:  # not equalInOut: x itself is replaced by relu(bn1(x))
                shortcut = conv(sd, f"{p}.convShortcut", pre, s)
            else:
                shortcut = out
            y = F.relu(bn(sd, f"{p}.bn2", conv(sd, f"{p}.conv1", pre, s)))
            out = shortcut + conv(sd, f"{p}.conv2", y)
    out = F.relu(bn(sd, "bn1", out))
    out = F.avg_pool2d(out, 8).flatten(1)
    return F.linear(out, sd["fc.weight"], sd["fc.bias"])


def mobilenetv2_reference(sd, x):
    cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    out = F.relu(bn(sd, "bn1", conv(sd, "conv1", x)))
    i = 0
    for _, _, n, stride in cfg:
        for b in range(n):
            p, s = f"layers.{i}", stride if b == 0 else 1
            y = F.relu(bn(sd, f"{p}.bn1", conv(sd, f"{p}.conv1", out)))
            y = F.relu(bn(sd, f"{p}.bn2", conv(sd, f"{p}.conv2", y, s, groups=y.shape[1])))
            y = bn(sd, f"{p}.bn3", conv(sd, f"{p}.conv3", y))
            if s == 1:
                y = y + (bn(sd, f"{p}.shortcut.1", conv(sd, f"{p}.shortcut.0", out)) if f"{p}.shortcut.0.weight" in sd else out)
            out, i = y, i + 1
    out = F.relu(bn(sd, "bn2", conv(sd, "conv2", out)))
    out = F.avg_pool2d(out, 4).flatten(1)
    return F.linear(out, sd["linear.weight"], sd["linear.bias"])


def small_cnn_reference(sd, x):
    out = F.relu(bn(sd, "bn1", conv(sd, "conv1", x)))
    out = F.relu(bn(sd, "bn2", conv(sd, "conv2", out, 2)))
    out = F.relu(bn(sd, "bn3", conv(sd, "conv3", out, 2)))
    return F.linear(out.mean((2, 3)), sd["linear.weight"], sd["linear.bias"])


def _small_cnn_layout(num_classes, in_channels):
    sd = {}
    for i, (cin, cout) in enumerate(((in_channels, 16), (16, 32), (32, 64)), 1):
        sd[f"conv{i}.weight"] = (cout, cin, 3, 3)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            sd[f"bn{i}.{stat}"] = (cout,)
        sd[f"bn{i}.num_batches_tracked"] = ()
    sd["linear.weight"] = (num_classes, 64)
    sd["linear.bias"] = (num_classes,)
    return sd


FAMILIES = [
    (
        "resnet18",
        lambda: create_model("resnet18", num_classes=10),
        lambda nc: _resnet_layout([2, 2, 2, 2], False, nc, 3),
        lambda sd, x: resnet_reference(sd, x, [2, 2, 2, 2], False),
    ),
    (
        "resnet50",
        lambda: create_model("resnet50", num_classes=10),
        lambda nc: _resnet_layout([3, 4, 6, 3], True, nc, 3),
        lambda sd, x: resnet_reference(sd, x, [3, 4, 6, 3], True),
    ),
    ("preactresnet18", lambda: create_model("preactresnet18", num_classes=10), lambda nc: _preact_layout(nc, 3), preact_reference),
    # the registry's WRN-28-10/34-10/70-16 are this class at other depths and widths (their layouts are tested)
    ("wrn16_2", lambda: WideResNet(16, 2, 10, 3), lambda nc: _wrn_layout(16, 2, nc, 3), lambda sd, x: wrn_reference(sd, x, 16)),
    ("mobilenetv2", lambda: create_model("mobilenetv2", num_classes=10), lambda nc: _mobilenetv2_layout(nc, 3), mobilenetv2_reference),
    ("small_cnn", lambda: create_model("small_cnn", num_classes=10), lambda nc: _small_cnn_layout(nc, 3), small_cnn_reference),
]


@pytest.mark.parametrize("name,build,layout,reference", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_forward_matches_a_transcription_of_the_authors_modules(name, build, layout, reference):
    sd = {k: v.double() if v.is_floating_point() else v for k, v in _random_state_dict(layout(10), seed=5).items()}
    model = build().double().eval()
    model.load_state_dict(sd, strict=True)
    x = reference_input().double()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(sd, x), rtol=1e-9, atol=1e-9)
