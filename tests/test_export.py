"""ONNX files and torch.export programs reproduce the PyTorch logits at any batch size, for every
architecture; broken exports are caught; the Markdown model card renders the JSON card; and a job
ships all of them for both student models."""

import json

import onnx
import onnxruntime
import pytest
import torch
from peeraid_models import create_model, list_models
from torch import nn

from core.engine import pipeline
from core.engine.attacks import AutoAttackSet
from core.engine.export import (
    ExportError,
    export_onnx,
    export_program,
    library_versions,
    load_model,
    verify_onnx,
    verify_program,
)
from core.engine.model_card import model_card_markdown
from core.engine.pipeline import ARTIFACTS, run_job
from core.engine.spec import build_spec

from .conftest import tiny_spec

# (architecture, in_channels, input size, classes)
ARCHITECTURES = [
    pytest.param(("small_cnn", 1, 16, 10), id="small_cnn"),
    *(pytest.param((name, 3, 16, 5), marks=pytest.mark.slow, id=name) for name in ("resnet18", "preactresnet18", "mobilenetv2")),
]
ATOL = 1e-4


def _model(name, channels, size, classes):
    """A freshly initialised network whose BatchNorm statistics fit its activations: without them the
    signal fades through the layers and every input gets nearly the same logits, which proves nothing."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes, in_channels=channels)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        model.train()(_images(16, (channels, size, size), seed=7))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    return model.eval()


def _images(batch, shape, seed=123):
    return torch.rand(batch, *shape, generator=torch.Generator().manual_seed(seed))


def _onnx_logits(path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"] and [o.name for o in session.get_outputs()] == ["logits"]
    return torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])


@pytest.fixture(scope="module", params=ARCHITECTURES)
def exported(request, tmp_path_factory):
    name, channels, size, classes = request.param
    model, shape = _model(name, channels, size, classes), (channels, size, size)
    with torch.no_grad():
        assert model(_images(8, shape)).std(0).min() > 0.01  # logits depend on the input
    out = tmp_path_factory.mktemp(name)
    return model, shape, export_onnx(model, out / "m.onnx", shape), export_program(model, out / "m.pt2", shape)


def test_onnx_reproduces_pytorch_logits_at_any_batch_size(exported):
    model, shape, onnx_path, _ = exported
    assert onnx.load(str(onnx_path)).opset_import[0].version >= 17
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"] and [o.name for o in session.get_outputs()] == ["logits"]
    for batch in (1, 3, 8):
        x = _images(batch, shape)
        with torch.no_grad():
            want = model(x)
        got = torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])
        assert got.shape == want.shape and torch.allclose(got, want, atol=ATOL, rtol=0), batch


def test_program_reproduces_pytorch_logits_at_any_batch_size(exported):
    model, shape, _, pt2_path = exported
    loaded = torch.export.load(str(pt2_path)).module()
    for batch in (1, 3, 8, 33):
        x = _images(batch, shape)
        with torch.no_grad():
            assert torch.allclose(loaded(x), model(x), atol=ATOL, rtol=0), batch


def test_export_uses_eval_mode_and_leaves_the_callers_model_alone(tmp_path):
    model = _model("small_cnn", 1, 16, 10).train()
    path = export_onnx(model, tmp_path / "m.onnx", (1, 16, 16))
    assert model.training
    x = _images(4, (1, 16, 16))
    with torch.no_grad():
        assert torch.allclose(_onnx_logits(path, x), model.eval()(x), atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def exported_small(tmp_path_factory):
    model, shape = _model("small_cnn", 1, 16, 10), (1, 16, 16)
    out = tmp_path_factory.mktemp("small")
    return model, shape, export_onnx(model, out / "m.onnx", shape), export_program(model, out / "m.pt2", shape)


def test_tampered_onnx_file_is_detected(exported_small, tmp_path):
    model, shape, onnx_path, _ = exported_small
    verify_onnx(onnx_path, model, shape)
    proto = onnx.load(str(onnx_path))
    bias = next(t for t in reversed(proto.graph.initializer) if len(t.dims) == 1)  # the classifier's bias
    values = onnx.numpy_helper.to_array(bias) + 0.01
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(proto, str(tmp_path / "tampered.onnx"))
    with pytest.raises(ExportError, match="differ"):
        verify_onnx(tmp_path / "tampered.onnx", model, shape)

    (tmp_path / "truncated.onnx").write_bytes(onnx_path.read_bytes()[:1000])
    with pytest.raises(ExportError, match="invalid ONNX"):
        verify_onnx(tmp_path / "truncated.onnx", model, shape)


def test_tampered_program_is_detected(exported_small, tmp_path):
    model, shape, _, pt2_path = exported_small
    verify_program(pt2_path, model, shape)
    program = torch.export.load(str(pt2_path))
    with torch.no_grad():
        next(iter(program.state_dict.values())).mul_(1.5)
    torch.export.save(program, str(tmp_path / "tampered.pt2"))
    with pytest.raises(ExportError, match="differ"):
        verify_program(tmp_path / "tampered.pt2", model, shape)

    (tmp_path / "truncated.pt2").write_bytes(pt2_path.read_bytes()[:1000])
    with pytest.raises(ExportError, match="cannot load"):
        verify_program(tmp_path / "truncated.pt2", model, shape)


class Drifting(nn.Module):
    """Its output depends on Python state that tracing freezes into a constant: the export is wrong."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.linear(x.flatten(1)) + self.calls


@pytest.mark.parametrize("export", [export_onnx, export_program])
def test_an_export_that_disagrees_with_the_model_raises_and_leaves_no_file(export, tmp_path):
    with pytest.raises(ExportError, match="differ"):
        export(Drifting().eval(), tmp_path / "model", (1, 4, 4))
    assert list(tmp_path.iterdir()) == []


# --- Markdown model card --------------------------------------------------------------------


def _sample_card():
    spec = build_spec(None, {"student": "resnet18", "peeraid": {"tau": 3.5, "gamma2": 0.25}, "evaluation": {"pgd_steps": 50}})
    return {
        "created": "2026-03-04T05:06:07+00:00",
        "method": "peeraid",
        "architecture": {"student": "resnet18", "peer": "resnet18"},
        "classes": [f"class_{i}" for i in range(30)],
        "input_shape": [3, 32, 32],
        "input_range": [0.0, 1.0],
        "threat_model": {"norm": "Linf", "epsilon": 8 / 255},
        "dataset": {
            "name": "cifar10-sample",
            "fingerprint": "f00dfeed1234",
            "train_examples": 45000,
            "validation_examples": 5000,
            "test_examples": 10000,
            "test_examples_evaluated": 2000,
            "protocol": "best epoch selected on 5000 validation images",
        },
        "training": {"epochs": 300, "epochs_completed": 300, "stopped": None},
        "hyperparameters": spec.model_dump(mode="json"),
        "metrics": {
            "student": {
                "best_epoch": 211,
                "validation": {"clean_acc": 0.8111, "pgd_acc": 0.5122},
                "test": {"clean_acc": 0.8233, "fgsm_acc": 0.6344, "pgd50_acc": 0.5455, "autoattack_acc": 0.4966},
            },
            "swa_student": {
                "best_epoch": 277,
                "validation": {"clean_acc": 0.8377, "pgd_acc": 0.5288},
                "test": {"clean_acc": 0.8499, "fgsm_acc": 0.6611, "pgd50_acc": 0.5722, "autoattack_acc": 0.5133},
            },
        },
        "warnings": [],
        "evaluation": {
            "status": "complete",
            "images": {"clean_acc": 2000, "fgsm_acc": 2000, "pgd50_acc": 2000, "autoattack_acc": 2000},
            "failures": [],
            "autoattack": AutoAttackSet(30).to_dict(),
        },
        "exports": {
            "student_onnx": "ok",
            "student_pt2": "failed: ExportError: torch.export logits differ",
            "swa_student_onnx": "ok",
            "swa_student_pt2": "ok",
        },
        "artifacts": {
            "student": "student.safetensors",
            "swa_student": "swa_student.safetensors",
            "student_onnx": "student.onnx",
            "swa_student_onnx": "swa_student.onnx",
            "swa_student_pt2": "swa_student.pt2",
        },
        "history": [],
        "device": "cuda:0",
        "library_versions": {"python": "3.11.7", "torch": "2.14.1", "onnxruntime": "1.32.0"},
    }


def test_markdown_card_renders_every_metric_and_the_threat_model():
    card = _sample_card()
    md = model_card_markdown(card)
    assert md == model_card_markdown(card)
    assert md.startswith("# resnet18 trained with PeerAiD on cifar10-sample")
    for key, m in card["metrics"].items():
        for split in ("validation", "test"):
            for name, value in m[split].items():
                assert f"{value:.2%}" in md, (key, split, name)
        assert f"| {m['best_epoch']} |" in md
    for label in ("| Clean | FGSM | PGD-50 | AutoAttack |", "| Clean | PGD-10 |", "| Student |", "| SWA student |"):
        assert label in md
    threat = next(line for line in md.splitlines() if "Threat model" in line)
    assert "L∞" in threat and "8/255" in threat
    assert "[0, 1]" in md and "N×3×32×32" in md
    assert "`class_19`" in md and "class_20" not in md and "10 more" in md
    assert "τ = 3.5" in md and "γ2 = 0.25" in md and "λ3 = 1" in md and "K = 10" in md and "α = 2/255" in md
    assert "f00dfeed1234" in md and "45000 training, 5000 validation, 10000 test" in md and "2000" in md
    assert "onnxruntime 1.32.0" in md and "2026-03-04T05:06:07+00:00" in md
    assert '"input"' in md and "student.onnx" in md and "load_model" in md
    assert "torch.export.load" not in md and "student's torch.export export is not available (failed: ExportError" in md
    assert "The SWA student's exports load the same way: `swa_student.onnx`, `swa_student.pt2`." in md
    assert "## Limitations" in md and "AutoAttack was not run" not in md
    assert "AutoAttack: standard version, L∞: APGD-CE, APGD-T (9 target classes), FAB-T (9 target classes), Square (5000 queries)." in md


def test_markdown_card_without_autoattack_says_so_and_writes_odd_epsilons_over_255():
    card = _sample_card()
    card["threat_model"]["epsilon"] = 4.5 / 255
    for m in card["metrics"].values():
        del m["test"]["autoattack_acc"]
    del card["evaluation"]["images"]["autoattack_acc"], card["evaluation"]["autoattack"]
    md = model_card_markdown(card)
    assert "ε = 4.5/255" in md and "AutoAttack was not run" in md and "| AutoAttack |" not in md


def test_markdown_card_puts_warnings_first_with_what_to_try():
    card = _sample_card()
    assert "## Warnings" not in model_card_markdown(card)
    card["warnings"] = [
        {
            "model": "student",
            "kind": "chance",
            "message": "the student is at chance: 10.0% clean accuracy",
            "advice": "train for more epochs",
        }
    ]
    md = model_card_markdown(card)
    assert md.index("## Warnings") < md.index("## Intended use")
    assert "- **Warning**: the student is at chance: 10.0% clean accuracy." in md and "What to try: train for more epochs." in md


# --- a real job -------------------------------------------------------------------------------


def _tiny_job_spec():
    return tiny_spec(epochs=2, lr_decay_epochs=[1], evaluation=dict(n_examples=32, autoattack=False, batch_size=64, pgd_steps=2))


def test_job_ships_verified_onnx_and_programs_of_both_students_and_a_markdown_card(tiny_splits, tmp_path):
    result = run_job(_tiny_job_spec(), tiny_splits, tmp_path)
    artifacts = result.artifacts
    exported = {f"{model}_{fmt}" for model in ("student", "swa_student") for fmt in ("onnx", "pt2")}
    assert set(artifacts) == {"student", "swa_student", "peer", "model_card_markdown", "model_card", *exported}
    assert all(p.exists() and p.name == ARTIFACTS[name].file_name for name, p in artifacts.items())
    assert [artifacts[n].name for n in ("student_onnx", "student_pt2", "swa_student_pt2")] == [
        "student.onnx",
        "student.pt2",
        "swa_student.pt2",
    ]

    card = json.loads(artifacts["model_card"].read_text())
    assert card["exports"] == dict.fromkeys(sorted(exported), "ok") == result.model_card["exports"]
    assert card["artifacts"] == {name: ARTIFACTS[name].file_name for name in artifacts}

    x = tiny_splits.test.images[:8].float() / 255
    for model in ("student", "swa_student"):
        weights, _ = load_model(artifacts[model])
        with torch.no_grad():
            want = weights(x)
            assert torch.allclose(torch.export.load(str(artifacts[f"{model}_pt2"])).module()(x), want, atol=ATOL, rtol=0)
        assert torch.allclose(_onnx_logits(artifacts[f"{model}_onnx"], x), want, atol=ATOL, rtol=0)

    md = artifacts["model_card_markdown"].read_text()
    assert md == model_card_markdown(card)
    assert "8/255" in md and f"{card['metrics']['student']['test']['clean_acc']:.2%}" in md
    assert 'torch.export.load("student.pt2").module()' in md and 'InferenceSession("student.onnx"' in md
    for path in artifacts.values():
        if path.suffix in (".onnx", ".pt2", ".safetensors"):
            assert path.name in md or path.name == "peer.safetensors"


def test_a_failed_export_is_recorded_and_the_training_result_kept(tiny_splits, tmp_path, monkeypatch):
    def broken(model, path, input_shape):
        raise ExportError("ONNX logits differ from PyTorch by 1 at batch 8")

    monkeypatch.setitem(pipeline.EXPORT_FORMATS, "onnx", broken)
    result = run_job(_tiny_job_spec(), tiny_splits, tmp_path)
    card = json.loads(result.artifacts["model_card"].read_text())
    for model in ("student", "swa_student"):
        assert card["exports"][f"{model}_onnx"] == "failed: ExportError: ONNX logits differ from PyTorch by 1 at batch 8"
        assert card["exports"][f"{model}_pt2"] == "ok"
        assert f"{model}_onnx" not in result.artifacts and not (tmp_path / "artifacts" / f"{model}.onnx").exists()
    assert {"student", "swa_student", "student_pt2", "swa_student_pt2", "model_card"} <= set(result.artifacts)
    assert all(p.exists() for p in result.artifacts.values())
    md = result.artifacts["model_card_markdown"].read_text()
    assert "student's ONNX export is not available" in md and "swa student's ONNX export is not available" in md


# The wide ResNets share one module: wrn28_10 exercises it; wrn34_10 and wrn70_16 (267M parameters) are that module deeper and wider.
EVERY_ARCHITECTURE = [info.name for info in list_models() if info.name not in ("wrn34_10", "wrn70_16")]


@pytest.mark.slow
@pytest.mark.parametrize("name", EVERY_ARCHITECTURE)
def test_every_architecture_exports_to_onnx_and_torch_export(name, tmp_path):
    info = next(i for i in list_models() if i.name == name)
    size = info.min_input_size
    model = _model(name, 3, size, 7)
    export_onnx(model, tmp_path / "m.onnx", (3, size, size))  # each verifies its logits against PyTorch's
    export_program(model, tmp_path / "m.pt2", (3, size, size))


def test_library_versions_name_the_export_runtimes():
    versions = library_versions()
    assert versions["onnx"] == onnx.__version__ and versions["onnxruntime"] == onnxruntime.__version__


def test_the_markdown_card_renders_hostile_names_as_text(tmp_path):
    """Class and dataset names come from users' archives: in the Markdown card they are text, never markup or HTML."""
    from markdown_it import MarkdownIt

    from core.engine.model_card import _code, _text

    hostile = ["a` <img src=x onerror=alert(1)> `b", "two\nlines", "[link](javascript:alert(1))", "**bold**", "``double``"]
    html = MarkdownIt().render(" ".join([_text(h) for h in hostile] + [_code(h) for h in hostile]))
    assert "<img" not in html and "<a " not in html and "<strong>" not in html
    for name in hostile:
        rendered_code = MarkdownIt().render(_code(name))
        assert rendered_code.count("<code>") == 1, (name, rendered_code)  # one code span, nothing escaping it


def test_a_whole_markdown_card_with_hostile_class_and_dataset_names_has_no_markup_from_them():
    from markdown_it import MarkdownIt

    card = _sample_card()
    card["classes"] = ["cat` <img src=x onerror=alert(1)> `", "dog\n# heading", "[x](javascript:alert(1))"]
    card["dataset"]["name"] = "<script>alert(1)</script>.zip"
    card["warnings"] = [
        {"model": "student", "kind": "one_class", "message": "predicts class '<b>cat</b>' for 99%", "advice": "check labels"}
    ]
    html = MarkdownIt().render(model_card_markdown(card))
    assert "<img" not in html and "<script>" not in html and "<b>" not in html and 'href="javascript' not in html
    assert "<h1>dog" not in html
