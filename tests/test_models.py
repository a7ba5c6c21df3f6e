import pytest
import torch
from peeraid_models import (
    ArchitectureError,
    ArchitectureInfo,
    InputTooSmallError,
    UnknownArchitectureError,
    create_model,
    get_model_info,
    list_models,
    register_model,
)

NAMES = {
    "resnet18",
    "resnet34",
    "resnet50",
    "preactresnet18",
    "wrn28_10",
    "wrn34_10",
    "wrn70_16",
    "mobilenetv2",
    "small_cnn",
}
BIG = ["resnet50", "wrn28_10", "wrn34_10", "wrn70_16"]
SMALL = sorted(NAMES - set(BIG))
CONFIGS = [(10, 3, 32), (7, 1, 16), (200, 3, 64)]
MIN_SIZE = {info.name: info.min_input_size for info in list_models()}


def _check_forward_backward(model, num_classes, in_channels, size, batch=2):
    x = torch.rand(batch, in_channels, size, size, requires_grad=True)
    out = model(x)
    assert out.shape == (batch, num_classes)
    assert torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out.logsumexp(1).sum() - out[:, 0].sum(), x)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


def test_list_models():
    infos = list_models()
    assert {i.name for i in infos} == NAMES
    assert len(infos) == len(NAMES)
    for info in infos:
        assert isinstance(info, ArchitectureInfo)
        assert info.description and info.family and info.min_input_size >= 1


@pytest.mark.parametrize("num_classes,in_channels,size", CONFIGS)
@pytest.mark.parametrize("name", SMALL)
def test_small_models_forward_backward(name, num_classes, in_channels, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, in_channels=in_channels)
    model.train()
    _check_forward_backward(model, num_classes, in_channels, size)
    model.eval()
    _check_forward_backward(model, num_classes, in_channels, size)


# Written from the strides, independently of the registry: an epoch's last batch can be one image, and
# BatchNorm in train mode needs more than one value per channel, so the deepest feature map,
# ceil(size / downsampling) on a side, must be at least 2 pixels.
DOWNSAMPLING = {
    "resnet18": 8,
    "resnet34": 8,
    "resnet50": 8,
    "preactresnet18": 8,
    "mobilenetv2": 8,
    "wrn28_10": 4,
    "wrn34_10": 4,
    "wrn70_16": 4,
    "small_cnn": 4,
}


def test_min_input_size_follows_the_strides():
    assert {name: factor + 1 for name, factor in DOWNSAMPLING.items()} == MIN_SIZE


@pytest.mark.parametrize("name", sorted(NAMES))
def test_both_sides_of_the_minimum_input_size(name):
    size = MIN_SIZE[name]
    torch.manual_seed(0)
    device = "meta" if name == "wrn70_16" else "cpu"  # 267M parameters: shapes are what matter here
    with torch.device(device):
        model = create_model(name, num_classes=3, in_channels=1).train()
    if device == "cpu":
        _check_forward_backward(model, 3, 1, size, batch=1)
    else:
        assert model(torch.empty(1, 1, size, size, device="meta")).shape == (1, 3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(torch.rand(1, 1, size - 1, size - 1, device=device))
    info = get_model_info(name)
    info.check_input_size(size, size + 7)
    for height, width in ((size - 1, size - 1), (size, size - 1), (size - 1, 64)):
        with pytest.raises(InputTooSmallError, match=f"{name} needs inputs of at least {size}×{size}") as e:
            info.check_input_size(height, width)
        assert (e.value.architecture, e.value.min_size, e.value.height, e.value.width) == (name, size, height, width)


def test_trainer_refuses_images_smaller_than_an_architecture_needs(tiny_splits, tmp_path):
    from core.engine.datasets import DatasetSplits, ImageDataset
    from core.engine.errors import DatasetError
    from core.engine.trainer import Trainer

    from .conftest import tiny_spec

    crop = lambda d: ImageDataset(d.images[:, :, :8, :8].contiguous(), d.labels, d.classes)
    small = DatasetSplits("digits-8px", crop(tiny_splits.train), crop(tiny_splits.val), crop(tiny_splits.test), "x")
    Trainer(tiny_spec(), small, workdir=tmp_path / "small_cnn")  # 8 ≥ 5
    with pytest.raises(DatasetError, match="resnet18 needs inputs of at least 9×9; the images are 8×8"):
        Trainer(tiny_spec(peer="resnet18"), small, workdir=tmp_path / "resnet18")


def test_num_params():
    info = {i.name: i for i in list_models()}
    assert info["resnet18"].num_params(10, 3) == 11_173_962
    assert info["wrn34_10"].num_params(10, 3) == 46_160_474
    assert info["small_cnn"].num_params(7, 1) < 200_000


# ---- the authors' checkpoint layout, written out independently of the implementation ----


def _bn(sd, prefix, c):
    sd[f"{prefix}.weight"] = (c,)
    sd[f"{prefix}.bias"] = (c,)
    sd[f"{prefix}.running_mean"] = (c,)
    sd[f"{prefix}.running_var"] = (c,)
    sd[f"{prefix}.num_batches_tracked"] = ()


def _resnet_layout(blocks, bottleneck, num_classes, in_channels):
    sd = {"conv1.weight": (64, in_channels, 3, 3)}
    _bn(sd, "bn1", 64)
    expansion = 4 if bottleneck else 1
    cin = 64
    for li, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 2, 2), strict=True), 1):
        for b in range(n):
            s = stride if b == 0 else 1
            p = f"layer{li}.{b}"
            if bottleneck:
                sd[f"{p}.conv1.weight"] = (planes, cin, 1, 1)
                _bn(sd, f"{p}.bn1", planes)
                sd[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                _bn(sd, f"{p}.bn2", planes)
                sd[f"{p}.conv3.weight"] = (4 * planes, planes, 1, 1)
                _bn(sd, f"{p}.bn3", 4 * planes)
            else:
                sd[f"{p}.conv1.weight"] = (planes, cin, 3, 3)
                _bn(sd, f"{p}.bn1", planes)
                sd[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                _bn(sd, f"{p}.bn2", planes)
            cout = expansion * planes
            if s != 1 or cin != cout:
                sd[f"{p}.shortcut.0.weight"] = (cout, cin, 1, 1)
                _bn(sd, f"{p}.shortcut.1", cout)
            cin = cout
    sd["linear.weight"] = (num_classes, 512 * expansion)
    sd["linear.bias"] = (num_classes,)
    return sd


def _preact_layout(num_classes, in_channels):
    sd = {"conv1.weight": (64, in_channels, 3, 3)}
    cin = 64
    for li, (planes, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2), strict=True), 1):
        for b in range(2):
            s = stride if b == 0 else 1
            p = f"layer{li}.{b}"
            _bn(sd, f"{p}.bn1", cin)
            sd[f"{p}.conv1.weight"] = (planes, cin, 3, 3)
            _bn(sd, f"{p}.bn2", planes)
            sd[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            if s != 1 or cin != planes:
                sd[f"{p}.shortcut.0.weight"] = (planes, cin, 1, 1)
            cin = planes
    sd["linear.weight"] = (num_classes, 512)
    sd["linear.bias"] = (num_classes,)
    return sd


def _wrn_layout(depth, k, num_classes, in_channels):
    n = (depth - 4) // 6
    sd = {"conv1.weight": (16, in_channels, 3, 3)}
    cin = 16
    for g, cout in enumerate((16 * k, 32 * k, 64 * k), 1):  # the stride changes no shape
        for b in range(n):
            p = f"block{g}.layer.{b}"
            _bn(sd, f"{p}.bn1", cin)
            sd[f"{p}.conv1.weight"] = (cout, cin, 3, 3)
            _bn(sd, f"{p}.bn2", cout)
            sd[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            if cin != cout:
                sd[f"{p}.convShortcut.weight"] = (cout, cin, 1, 1)
            cin = cout
    _bn(sd, "bn1", 64 * k)
    sd["fc.weight"] = (num_classes, 64 * k)
    sd["fc.bias"] = (num_classes,)
    return sd


def _mobilenetv2_layout(num_classes, in_channels):
    cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    sd = {"conv1.weight": (32, in_channels, 3, 3)}
    _bn(sd, "bn1", 32)
    cin, i = 32, 0
    for t, cout, n, stride in cfg:
        for b in range(n):
            s = stride if b == 0 else 1
            hidden = t * cin
            p = f"layers.{i}"
            sd[f"{p}.conv1.weight"] = (hidden, cin, 1, 1)
            _bn(sd, f"{p}.bn1", hidden)
            sd[f"{p}.conv2.weight"] = (hidden, 1, 3, 3)
            _bn(sd, f"{p}.bn2", hidden)
            sd[f"{p}.conv3.weight"] = (cout, hidden, 1, 1)
            _bn(sd, f"{p}.bn3", cout)
            if s == 1 and cin != cout:
                sd[f"{p}.shortcut.0.weight"] = (cout, cin, 1, 1)
                _bn(sd, f"{p}.shortcut.1", cout)
            cin, i = cout, i + 1
    sd["conv2.weight"] = (1280, 320, 1, 1)
    _bn(sd, "bn2", 1280)
    sd["linear.weight"] = (num_classes, 1280)
    sd["linear.bias"] = (num_classes,)
    return sd


def _random_state_dict(layout, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(123, dtype=torch.int64)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("running_mean") or key.endswith(".bias"):
            sd[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            sd[key] = torch.rand(shape, generator=g) * 0.5 + 0.25
        else:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            sd[key] = torch.randn(shape, generator=g) / fan_in**0.5
    return sd


LAYOUTS = [
    ("resnet18", 10, 3, lambda nc, ic: _resnet_layout([2, 2, 2, 2], False, nc, ic)),
    ("resnet18", 200, 1, lambda nc, ic: _resnet_layout([2, 2, 2, 2], False, nc, ic)),
    ("resnet34", 100, 3, lambda nc, ic: _resnet_layout([3, 4, 6, 3], False, nc, ic)),
    ("resnet50", 10, 3, lambda nc, ic: _resnet_layout([3, 4, 6, 3], True, nc, ic)),
    ("preactresnet18", 10, 3, _preact_layout),
    ("wrn34_10", 10, 3, lambda nc, ic: _wrn_layout(34, 10, nc, ic)),
    ("wrn28_10", 100, 3, lambda nc, ic: _wrn_layout(28, 10, nc, ic)),
    ("mobilenetv2", 10, 3, _mobilenetv2_layout),
]


def test_layout_spot_checks():
    r = _resnet_layout([2, 2, 2, 2], False, 10, 3)
    assert r["conv1.weight"] == (64, 3, 3, 3)
    assert r["layer2.0.shortcut.0.weight"] == (128, 64, 1, 1)
    assert "layer2.0.shortcut.1.weight" in r and "layer1.0.shortcut.0.weight" not in r
    assert r["linear.weight"] == (10, 512)
    w = _wrn_layout(34, 10, 10, 3)
    assert w["block1.layer.0.convShortcut.weight"] == (160, 16, 1, 1)
    assert "block1.layer.1.convShortcut.weight" not in w and "block1.layer.4.bn1.weight" in w
    assert w["bn1.weight"] == (640,) and w["fc.weight"] == (10, 640)


@pytest.mark.parametrize("name,num_classes,in_channels,layout", LAYOUTS, ids=lambda v: str(v) if not callable(v) else "")
def test_authors_state_dict_loads_strict(name, num_classes, in_channels, layout):
    sd = _random_state_dict(layout(num_classes, in_channels), seed=1)
    torch.manual_seed(2)
    model = create_model(name, num_classes=num_classes, in_channels=in_channels).eval()
    x = torch.rand(2, in_channels, 16, 16)
    with torch.no_grad():
        before = model(x)
    model.load_state_dict(sd, strict=True)
    own = model.state_dict()
    assert set(own) == set(sd)
    for key, value in sd.items():
        assert own[key].dtype == value.dtype and torch.equal(own[key], value), key
    torch.manual_seed(3)
    other = create_model(name, num_classes=num_classes, in_channels=in_channels).eval()
    other.load_state_dict(sd, strict=True)
    with torch.no_grad():
        after, again = model(x), other(x)
    assert torch.isfinite(after).all()
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, again)


# ---- arguments ----


def test_unknown_name():
    with pytest.raises(UnknownArchitectureError) as e:
        create_model("resnet19", num_classes=10)
    msg = str(e.value)
    assert "resnet19" in msg and "resnet18" in msg and "wrn34_10" in msg
    assert isinstance(e.value, ArchitectureError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    "kwargs,arg,limit",
    [
        (dict(num_classes=1), "num_classes", "2"),
        (dict(num_classes=10, in_channels=0), "in_channels", "1"),
        (dict(num_classes=2.5), "num_classes", "2"),
    ],
)
def test_bad_arguments(kwargs, arg, limit):
    with pytest.raises(ValueError, match=arg) as e:
        create_model("small_cnn", **kwargs)
    assert limit in str(e.value)
    assert isinstance(e.value, ArchitectureError) and not isinstance(e.value, UnknownArchitectureError)


def test_duplicate_registration_rejected():
    with pytest.raises(ArchitectureError, match="resnet18"):
        register_model("resnet18", description="dup")(lambda nc, ic: None)
    assert len(list_models()) == len(NAMES)


def test_small_cnn_learns_digits():
    from core.engine.sources import load_digits

    train, test = load_digits(size=16)
    x, y = train.images.float() / 255, train.labels
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=train.num_classes, in_channels=x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        for idx in torch.randperm(len(x)).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(test.images.float() / 255).argmax(1) == test.labels).float().mean().item()
    assert acc > 0.85
