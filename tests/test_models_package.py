"""peeraid-models on its own: weights files the engine writes read back bitwise with PyTorch alone, for every
architecture; tampered files refused with a clear WeightsError; and the package loading a student in a
Python that has torch and nothing of this repository (no core, api, worker or service, no safetensors)."""

import ast
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import peeraid_models
import pytest
import torch
from peeraid_models import WEIGHTS_FORMAT, WeightsError, create_model, get_model_info, list_models, load_model, read_weights
from peeraid_models.weights import DTYPES, decode_little_endian
from safetensors.torch import load_file, save, save_file

from core.engine import export as engine_export
from core.engine.errors import CheckpointError

PACKAGE_SRC = Path(peeraid_models.__file__).resolve().parents[1]
REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "bird"]
IN_CHANNELS, SIZE = 1, 12  # small inputs every architecture takes (the largest minimum is 9)
SLOW = {"wrn70_16"}  # 267M parameters: a 1 GB file


def trained_looking(name: str, seed: int = 0) -> torch.nn.Module:
    """A network whose BatchNorm statistics are not the defaults, so eval-mode logits depend on every buffer."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=len(CLASSES), in_channels=IN_CHANNELS)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.num_batches_tracked.fill_(17)
    return model.eval()


def engine_weights(tmp_path: Path, name: str) -> tuple[torch.nn.Module, Path]:
    model = trained_looking(name)
    path = tmp_path / f"{name}.safetensors"
    engine_export.save_weights(
        model, path, architecture=name, num_classes=len(CLASSES), input_shape=(IN_CHANNELS, SIZE, SIZE), classes=CLASSES
    )
    return model, path


def probe(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, IN_CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


@pytest.fixture
def one_thread():
    """Identical logits across processes: one thread each, so no reduction is split differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", [pytest.param(i.name, marks=[pytest.mark.slow] if i.name in SLOW else []) for i in list_models()])
def test_weights_the_engine_writes_load_bitwise_with_identical_logits(tmp_path, name):
    model, path = engine_weights(tmp_path, name)
    tensors, meta = read_weights(path)
    written = load_file(str(path))
    assert set(tensors) == set(written) == set(model.state_dict())
    for key, value in written.items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key
    expected_meta = {"architecture": name, "num_classes": 3, "in_channels": 1, "input_size": SIZE, "classes": CLASSES}
    assert meta == {"format": WEIGHTS_FORMAT, **expected_meta}

    loaded, loaded_meta = load_model(path)
    assert loaded_meta == meta and not any(m.training for m in loaded.modules())
    assert all(not t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    with torch.no_grad():
        assert torch.equal(loaded(probe()), model(probe()))


def test_bytes_load_like_the_file_and_the_engine_loads_through_the_package(tmp_path):
    model, path = engine_weights(tmp_path, "small_cnn")
    from_bytes, meta = load_model(path.read_bytes())
    from_engine, engine_meta = engine_export.load_model(path)
    assert meta == engine_meta
    with torch.no_grad():
        assert torch.equal(from_bytes(probe()), model(probe()))
        assert torch.equal(from_engine(probe()), model(probe()))


def test_loaded_weights_train_like_any_model(tmp_path):
    _, path = engine_weights(tmp_path, "small_cnn")
    model, _ = load_model(path)
    before = model.linear.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(model.train()(probe(4)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    assert all(p.requires_grad for p in model.parameters()) and not torch.equal(model.linear.weight, before)


def test_every_safetensors_dtype_at_unaligned_offsets():
    """A 3-byte tensor first puts later ones off their alignment; each is read back byte for byte."""
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "0_odd": torch.arange(3, dtype=torch.uint8),
        "0_empty": torch.empty(0, 4),
        "0_scalar": torch.tensor(2.5, dtype=torch.float64),
    }
    for code, dtype in DTYPES.items():
        raw = torch.randint(0, 2 if dtype == torch.bool else 256, (5 * 3 * dtype.itemsize,), dtype=torch.uint8, generator=generator)
        tensors[code] = raw.view(dtype).reshape(5, 3)
    read, meta = read_weights(_safetensors_bytes(tensors))
    assert meta["architecture"] == "small_cnn" and set(read) == set(tensors)
    for key, value in tensors.items():
        assert read[key].dtype == value.dtype and read[key].shape == value.shape, key
        assert torch.equal(read[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), key


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    meta = {"format": WEIGHTS_FORMAT, "architecture": "small_cnn", "num_classes": 3, "in_channels": 1, "input_size": 8, "classes": CLASSES}
    return save(tensors, metadata={"peeraid": json.dumps(meta)})


def test_big_endian_hosts_get_the_bytes_swapped():
    if sys.byteorder != "little":
        pytest.skip("written for a little-endian host")
    value = torch.tensor([1.5, -2.25, 3e7], dtype=torch.float32)
    little = value.view(torch.uint8)
    assert torch.equal(decode_little_endian(little, torch.float32, [3]), value)
    swapped = decode_little_endian(little, torch.float32, [3], byteorder="big")
    assert torch.equal(swapped.view(torch.uint8).reshape(3, 4), little.reshape(3, 4).flip(1))
    assert torch.equal(decode_little_endian(little, torch.uint8, [12], byteorder="big"), little)


# ---- tampered files ----


def split_file(data: bytes) -> tuple[dict, bytes]:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def join_file(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


def edit_header(edit):
    def apply(data: bytes) -> bytes:
        header, body = split_file(data)
        edit(header)
        return join_file(header, body)

    return apply


def edit_meta(edit):
    def apply(header: dict) -> None:
        meta = json.loads(header["__metadata__"]["peeraid"])
        edit(meta)
        header["__metadata__"]["peeraid"] = json.dumps(meta)

    return edit_header(apply)


def set_entry(name: str, **fields):
    return edit_header(lambda header: header[name].update(fields))


TAMPERED = {
    "too-short": (lambda d: d[:5], "too short for a header"),
    "header-longer-than-file": (lambda d: (len(d)).to_bytes(8, "little") + d[8:], "a header of"),
    "header-not-json": (lambda d: d[:8] + b"#" + d[9:], "header is not JSON"),
    "header-not-an-object": (lambda d: join_file([1, 2], b""), "not a JSON object"),
    "unknown-dtype": (set_entry("linear.bias", dtype="F12"), "has dtype 'F12'"),
    "shape-needs-other-bytes": (set_entry("linear.bias", shape=[4]), "needs 16 bytes"),
    "offsets-past-the-data": (set_entry("linear.bias", data_offsets=[10**9, 10**9 + 12]), "data_offsets"),
    "negative-size": (set_entry("linear.bias", shape=[-3]), "needs a shape"),
    "tensor-dropped-from-header": (edit_header(lambda h: h.pop("conv2.weight")), "tensors lie back to back"),
    "trailing-bytes": (lambda d: d + b"\0" * 8, "the tensors end at byte"),
    "metadata-not-strings": (edit_header(lambda h: h["__metadata__"].update(peeraid={"format": 1})), "must map strings to strings"),
    "no-service-metadata": (edit_header(lambda h: h.pop("__metadata__")), "not weights of the PeerAiD service"),
    "service-metadata-not-json": (edit_header(lambda h: h["__metadata__"].update(peeraid="{")), "'peeraid' metadata is not JSON"),
    "other-format": (edit_meta(lambda m: m.update(format="peeraid-service/checkpoint-v1")), "format 'peeraid-service/checkpoint-v1'"),
    "num-classes-a-string": (edit_meta(lambda m: m.update(num_classes="3")), "num_classes should be of type int, got '3'"),
    "in-channels-a-bool": (edit_meta(lambda m: m.update(in_channels=True)), "in_channels should be of type int"),
    "classes-missing": (edit_meta(lambda m: m.pop("classes")), "classes should be of type list"),
    "classes-do-not-match-outputs": (edit_meta(lambda m: m.update(classes=["cat"])), "names 1 classes for 3 outputs"),
    "unknown-architecture": (edit_meta(lambda m: m.update(architecture="resnet19")), "unknown architecture 'resnet19'"),
    "other-architecture": (edit_meta(lambda m: m.update(architecture="resnet18")), "do not fit resnet18"),
    "bad-num-classes": (edit_meta(lambda m: m.update(num_classes=1, classes=["cat"])), "num_classes must be an integer >= 2"),
    "transposed-shape": (set_entry("linear.weight", shape=[64, 3]), "size mismatch for linear.weight"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_files_are_refused_with_what_is_wrong(tmp_path, case):
    tamper, message = TAMPERED[case]
    _, path = engine_weights(tmp_path, "small_cnn")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(tamper(path.read_bytes()))
    with pytest.raises(WeightsError, match=re.escape(message)) as err:
        load_model(bad)
    assert str(bad) in str(err.value)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        engine_export.load_model(bad)


def test_a_plain_safetensors_file_and_a_missing_file(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(plain))
    with pytest.raises(WeightsError, match="not weights of the PeerAiD service: no 'peeraid' metadata"):
        read_weights(plain)
    with pytest.raises(WeightsError, match="the given bytes is not a safetensors file"):
        load_model(b"PK\x03\x04 a zip file, not weights")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match=r"absent\.safetensors"):
        engine_export.load_model(tmp_path / "absent.safetensors")


def test_a_too_small_input_is_the_packages_error_and_the_engines_dataset_error():
    from core.engine.errors import DatasetError
    from core.engine.preflight import check_input_size

    with pytest.raises(peeraid_models.InputTooSmallError):
        get_model_info("resnet18").check_input_size(8, 8)
    with pytest.raises(DatasetError, match="resnet18 needs inputs of at least 9×9; the images are 8×8"):
        check_input_size("resnet18", 8, 8)
    check_input_size("resnet18", 9, 9)


# ---- torch alone ----


def absolute_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            yield node.module


def test_the_package_imports_only_torch_and_the_standard_library():
    allowed = sys.stdlib_module_names | {"torch"}
    for path in PACKAGE_SRC.joinpath("peeraid_models").rglob("*.py"):
        outside = [name for name in absolute_imports(path) if name.split(".")[0] not in allowed]
        assert not outside, f"{path.name} imports {outside}"


def torch_alone_site(folder: Path) -> Path:
    """A folder of links to torch and the distributions it requires (nothing else of this environment)."""
    folder.mkdir()
    for dist in requirement_closure("torch"):
        for top in {f.parts[0] for f in dist.files or []}:
            if top in ("..", "__pycache__") or top.endswith((".dist-info", ".pth")) or (folder / top).exists():
                continue
            (folder / top).symlink_to(Path(str(dist.locate_file(top))).resolve())
    return folder


def requirement_closure(name: str) -> list[metadata.Distribution]:
    found: dict[str, metadata.Distribution] = {}
    todo = [name]
    while todo:
        try:
            dist = metadata.distribution(todo.pop())
        except metadata.PackageNotFoundError:  # a requirement for another platform or Python
            continue
        if dist.metadata["Name"].lower() in found:
            continue
        found[dist.metadata["Name"].lower()] = dist
        todo += [re.match(r"[A-Za-z0-9._-]+", r).group() for r in dist.requires or [] if "extra ==" not in r]
    return list(found.values())


STANDALONE = """
import importlib.util, json, sys
sys.path[:0] = sys.argv[1:3]
absent = {m: importlib.util.find_spec(m) is None for m in ("core", "api", "worker", "service", "safetensors", "numpy")}
import torch
from peeraid_models import load_model
torch.set_num_threads(1)
x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(5))
logits = {}
for path in sys.argv[3:]:
    model, meta = load_model(path)
    with torch.no_grad():
        logits[meta["architecture"]] = model(x).tolist()
print(json.dumps({"absent": absent, "logits": logits, "package": load_model.__module__, "file": sys.modules["peeraid_models"].__file__}))
"""


def run_torch_alone(tmp_path: Path, package_dir: Path, paths: list[Path]) -> dict:
    site = torch_alone_site(tmp_path / "torch-site")
    command = [sys.executable, "-I", "-S", "-c", STANDALONE, str(site), str(package_dir), *map(str, paths)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def check_same_logits(result: dict, models: dict[str, torch.nn.Module]) -> None:
    assert result["absent"] == dict.fromkeys(("core", "api", "worker", "service", "safetensors", "numpy"), True)
    assert set(result["logits"]) == set(models)
    with torch.no_grad():
        for name, model in models.items():
            assert torch.equal(torch.tensor(result["logits"][name]), model(probe())), name


def test_torch_alone_loads_the_engines_weights(tmp_path, one_thread):
    written = {name: engine_weights(tmp_path, name) for name in ("small_cnn", "preactresnet18")}
    result = run_torch_alone(tmp_path, PACKAGE_SRC, [path for _, path in written.values()])
    assert Path(result["file"]).is_relative_to(PACKAGE_SRC)
    check_same_logits(result, {name: model for name, (model, _) in written.items()})


def test_the_installed_package_loads_with_torch_alone(tmp_path, one_thread):
    """What `pip install ./models` puts in place, not the source tree: every module and the py.typed marker."""
    target = tmp_path / "installed"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(REPO / "models")]
    subprocess.run(pip, check=True, capture_output=True, timeout=300, cwd=tmp_path)
    assert (target / "peeraid_models" / "py.typed").exists()
    written = {name: engine_weights(tmp_path, name) for name in ("small_cnn", "mobilenetv2")}
    result = run_torch_alone(tmp_path, target, [path for _, path in written.values()])
    assert Path(result["file"]).is_relative_to(target)
    check_same_logits(result, {name: model for name, (model, _) in written.items()})
