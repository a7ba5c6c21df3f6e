"""A job's order of work (models on disk before the final evaluation; failures recorded, not fatal;
stopped jobs keep a model), and a real PeerAiD run on the built-in dataset: its report, its exports,
AutoAttack parity and the command line."""

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch
from safetensors import safe_open

from core.engine import evaluation as evaluation_module
from core.engine import faults
from core.engine.callbacks import TrainingCallbacks
from core.engine.errors import CheckpointError, TrainingCancelled
from core.engine.evaluation import accuracies, evaluation_sample
from core.engine.export import load_model
from core.engine.pipeline import ARTIFACTS, export_checkpoint_student, run_job
from core.engine.sources import load_splits
from core.engine.spec import build_spec
from core.engine.state_io import load_tensors, unprefixed
from core.engine.trainer import CHECKPOINT_NAME

from .conftest import tiny_spec


def _tiny_job_spec(autoattack=False):
    return tiny_spec(epochs=2, lr_decay_epochs=[1], evaluation=dict(n_examples=16, autoattack=autoattack, batch_size=64, pgd_steps=2))


def test_models_and_a_card_are_on_disk_before_the_final_evaluation(tiny_splits, tmp_path, monkeypatch):
    monkeypatch.setattr(faults, "_hits", Counter())
    monkeypatch.setenv("PEERAID_FAULTS", "final-evaluation:enospc")
    with pytest.raises(OSError, match="No space left"):
        run_job(_tiny_job_spec(), tiny_splits, tmp_path)
    out = tmp_path / "artifacts"
    for name in ("student", "swa_student", "peer", "student_onnx", "model_card", "model_card_markdown"):
        assert (out / ARTIFACTS[name].file_name).exists(), name
    card = json.loads((out / "model_card.json").read_text())
    assert card["evaluation"]["status"] == "pending" and card["metrics"]["student"]["test"] == {}
    assert "evaluation had not finished" in (out / "model_card.md").read_text()
    load_model(out / "student.safetensors")


def test_a_failing_attack_is_recorded_and_the_job_keeps_its_models_and_other_metrics(tiny_splits, tmp_path, monkeypatch):
    def autoattack_breaks(*args, **kwargs):  # what pyautoattack's standard version raised on 2 classes
        raise IndexError("index -3 is out of bounds for dimension 1 with size 2")

    monkeypatch.setattr(evaluation_module, "autoattack_predictions", autoattack_breaks)
    result = run_job(_tiny_job_spec(autoattack=True), tiny_splits, tmp_path)
    error = "IndexError: index -3 is out of bounds for dimension 1 with size 2"
    assert result.evaluation["status"] == "incomplete"
    assert result.evaluation["failures"] == [{"model": m, "attack": "AutoAttack", "error": error} for m in ("student", "swa_student")]
    for m in result.report.values():
        assert set(m["test"]) == {"clean_acc", "fgsm_acc", "pgd2_acc"}
    assert all(p.exists() for p in result.artifacts.values()) and {"student", "swa_student", "student_onnx"} <= set(result.artifacts)
    card = json.loads(result.artifacts["model_card"].read_text())
    assert card["evaluation"] == result.evaluation and card["metrics"] == result.report
    md = result.artifacts["model_card_markdown"].read_text()
    assert f"Not evaluated: AutoAttack on the student failed ({error})" in md and "| — |" in md


def test_autoattack_can_run_on_fewer_images_and_the_report_says_how_many(tiny_splits, tmp_path):
    spec = tiny_spec(
        epochs=1,
        lr_decay_epochs=[],
        swa=False,
        evaluation=dict(n_examples=16, autoattack=True, autoattack_n_examples=4, batch_size=64, pgd_steps=2),
    )
    result = run_job(spec, tiny_splits, tmp_path)
    assert result.evaluation["images"] == {"clean_acc": 16, "fgsm_acc": 16, "pgd2_acc": 16, "autoattack_acc": 4}
    assert result.evaluation["sample"]["method"] == "class-stratified sample" and result.evaluation["sample"]["seed"] == 0
    assert sum(result.evaluation["sample"]["per_class"]["evaluated"].values()) == 16
    assert sum(result.evaluation["sample"]["per_class"]["autoattack"].values()) == 4
    student = result.report["student"]
    assert student["test"]["autoattack_acc"] * 4 in range(5)
    assert list(student["test_on_autoattack_images"]) == ["clean_acc", "fgsm_acc", "pgd2_acc", "autoattack_acc"]
    assert student["test_on_autoattack_images"]["autoattack_acc"] <= student["test_on_autoattack_images"]["pgd2_acc"]
    assert set(student["test_per_class"]) == set(student["test"])
    assert result.warnings[0]["kind"] == "subset"
    md = result.artifacts["model_card_markdown"].read_text()
    assert "images used per attack: Clean 16, FGSM 16, PGD-2 16, AutoAttack 4" in md
    assert "On the 4 images AutoAttack ran on" in md and "### Per class" in md


class StopAfter(TrainingCallbacks):
    def __init__(self, epochs):
        self.epochs, self.done = epochs, 0

    def on_epoch(self, record):
        self.done += 1

    def should_stop(self):
        return self.done >= self.epochs


def test_a_cancelled_job_still_leaves_loadable_students_and_a_card(tiny_splits, tmp_path):
    with pytest.raises(TrainingCancelled):
        run_job(tiny_spec(epochs=3, lr_decay_epochs=[1]), tiny_splits, tmp_path, callbacks=StopAfter(2))
    artifacts = export_checkpoint_student(tmp_path, tiny_splits, stopped="cancelled after epoch 2")
    assert set(artifacts) == {"last_student", "student", "swa_student", "model_card", "model_card_markdown"}
    tensors, meta = load_tensors(tmp_path / CHECKPOINT_NAME)
    for name, prefix in (("last_student", "student"), ("student", "best_student"), ("swa_student", "best_swa")):
        model, weights_meta = load_model(artifacts[name])
        assert weights_meta["classes"] == tiny_splits.classes
        want = unprefixed(prefix, tensors)
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items()), name
    card = json.loads(artifacts["model_card"].read_text())
    assert card["training"] == {
        "epochs": 3,
        "epochs_completed": 2,
        "stopped": "cancelled after epoch 2",
        "lr_decay_epochs": [1],
        "swa_start": 1,
    }
    assert card["evaluation"]["status"] == "not run" and card["metrics"]["student"]["best_epoch"] == meta["best_student"]["epoch"]
    md = artifacts["model_card_markdown"].read_text()
    assert "Not evaluated on the test set: cancelled after epoch 2" in md and "| Epochs | 2 of 3 (cancelled after epoch 2) |" in md


def _as_v1(path):
    """Rewrite a checkpoint as version 1 wrote it: epochs counted from 0, and no `selection` in its spec."""
    from core.engine.state_io import save_tensors
    from core.engine.trainer import CHECKPOINT_FORMAT_V1

    tensors, meta = load_tensors(path)
    zero_based = lambda entry: {**entry, "epoch": entry["epoch"] - 1}
    meta["format"] = CHECKPOINT_FORMAT_V1
    meta["history"] = [{**zero_based(r), "best": {k: zero_based(b) for k, b in r["best"].items()}} for r in meta["history"]]
    for name in ("best_student", "best_swa"):
        meta[name] = zero_based(meta[name])
    del meta["spec"]["selection"]
    save_tensors(path, tensors, meta)


def test_a_job_stopped_with_a_v1_checkpoint_still_exports_its_students(tiny_splits, tmp_path):
    """Resuming reads v1 checkpoints; so does the export of a stopped job's students (it once refused them,
    so a job checkpointed before the upgrade and then cancelled kept nothing)."""
    with pytest.raises(TrainingCancelled):
        run_job(tiny_spec(epochs=3, lr_decay_epochs=[1]), tiny_splits, tmp_path, callbacks=StopAfter(2))
    _, v2 = load_tensors(tmp_path / CHECKPOINT_NAME)
    _as_v1(tmp_path / CHECKPOINT_NAME)
    artifacts = export_checkpoint_student(tmp_path, tiny_splits, stopped="cancelled after epoch 2")
    assert set(artifacts) == {"last_student", "student", "swa_student", "model_card", "model_card_markdown"}
    card = json.loads(artifacts["model_card"].read_text())
    assert card["metrics"]["student"]["best_epoch"] == v2["best_student"]["epoch"]  # counted from 1 again
    assert [r["epoch"] for r in card["history"]] == [1, 2] and card["history"] == v2["history"]
    load_model(artifacts["student"])


def test_a_checkpoint_of_an_unknown_format_is_refused_naming_it(tiny_splits, tmp_path):
    from core.engine.state_io import save_tensors

    with pytest.raises(TrainingCancelled):
        run_job(tiny_spec(epochs=3, lr_decay_epochs=[1]), tiny_splits, tmp_path, callbacks=StopAfter(1))
    tensors, meta = load_tensors(tmp_path / CHECKPOINT_NAME)
    save_tensors(tmp_path / CHECKPOINT_NAME, tensors, {**meta, "format": "peeraid-service/checkpoint-v0"})
    with pytest.raises(CheckpointError, match="not a training checkpoint of this version \\(format 'peeraid-service/checkpoint-v0'\\)"):
        export_checkpoint_student(tmp_path, tiny_splits, stopped="cancelled")


def test_a_job_stopped_before_its_first_epoch_has_no_model_to_export(tiny_splits, tmp_path):
    with pytest.raises(CheckpointError, match="no epoch finished"):
        export_checkpoint_student(tmp_path, tiny_splits, stopped="cancelled")


# --- a real PeerAiD run on the built-in digits (slow) ---------------------------------------------


@pytest.fixture(scope="module")
def digits():
    spec = build_spec("digits-demo")
    return load_splits("digits", val_fraction=spec.val_fraction, seed=spec.seed)


@pytest.fixture(scope="module")
def peeraid_run(digits, tmp_path_factory):
    spec = build_spec("digits-demo")
    return spec, run_job(spec, digits, tmp_path_factory.mktemp("peeraid"))


@pytest.fixture(scope="module")
def natural_run(digits, tmp_path_factory):
    spec = build_spec("digits-demo", {"method": "natural", "peer": None})
    return spec, run_job(spec, digits, tmp_path_factory.mktemp("natural"))


@pytest.mark.slow
def test_peeraid_student_is_clearly_more_robust_than_natural_training(peeraid_run, natural_run):
    robust = peeraid_run[1].report["student"]["test"]
    natural = natural_run[1].report["student"]["test"]
    images = peeraid_run[1].evaluation["images"]
    print(
        f"\nPGD-20 accuracy on {images['pgd20_acc']} digits test images at eps=8/255: PeerAiD student {robust['pgd20_acc']:.1%} "
        f"(clean {robust['clean_acc']:.1%}), naturally trained {natural['pgd20_acc']:.1%} (clean {natural['clean_acc']:.1%}); "
        f"AutoAttack on {images['autoattack_acc']}: {robust['autoattack_acc']:.1%} and {natural['autoattack_acc']:.1%}"
    )
    assert robust["pgd20_acc"] >= natural["pgd20_acc"] + 0.15
    assert robust["autoattack_acc"] >= natural["autoattack_acc"] + 0.10
    assert robust["clean_acc"] >= 0.6


@pytest.mark.slow
def test_report_covers_student_and_swa_student(peeraid_run, digits):
    spec, result = peeraid_run
    assert result.evaluation["images"] == {"clean_acc": 359, "fgsm_acc": 359, "pgd20_acc": 359, "autoattack_acc": 50}
    for key in ("student", "swa_student"):
        m = result.report[key]
        assert set(m["test"]) == {"clean_acc", "fgsm_acc", "pgd20_acc", "autoattack_acc"}
        assert m["test"]["pgd20_acc"] <= m["test"]["clean_acc"]
        on_autoattack_images = m["test_on_autoattack_images"]
        assert on_autoattack_images["autoattack_acc"] == m["test"]["autoattack_acc"]
        assert on_autoattack_images["autoattack_acc"] <= on_autoattack_images["pgd20_acc"] <= on_autoattack_images["clean_acc"]
        assert not [w for w in result.warnings if w["kind"] == "attack_order"]
        assert 1 <= m["best_epoch"] <= spec.epochs
    assert result.report["swa_student"]["best_epoch"] > spec.resolved_swa_start  # 1-based: epoch swa_start + 1 is the first averaged


@pytest.mark.slow
def test_model_card_records_what_a_user_needs(peeraid_run, digits):
    spec, result = peeraid_run
    card = json.loads(result.artifacts["model_card"].read_text())
    assert card["architecture"] == {"student": "small_cnn", "peer": "small_cnn"}
    assert card["classes"] == [str(d) for d in range(10)] and card["input_shape"] == [1, 16, 16]
    assert card["threat_model"] == {"norm": "Linf", "epsilon": spec.epsilon}
    assert card["dataset"]["fingerprint"] == digits.fingerprint and card["method"] == "peeraid"
    assert card["hyperparameters"]["peeraid"] == spec.peeraid.model_dump()
    assert card["metrics"] == result.report and len(card["history"]) == spec.epochs
    assert card["library_versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]


@pytest.mark.slow
def test_exported_weights_are_safetensors_that_reproduce_the_reported_accuracy(peeraid_run, digits):
    _, result = peeraid_run
    path = result.artifacts["student"]
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(header_len))  # a safetensors header, not a pickle
    with safe_open(str(path), framework="pt") as f:
        assert "conv1.weight" in f.keys()  # noqa: SIM118 (a safetensors file, not a dict)
    model, meta = load_model(path)
    assert meta["architecture"] == "small_cnn" and meta["classes"] == digits.classes
    clean = accuracies(model, digits.test, {"clean": None})["clean"]
    assert clean == pytest.approx(result.report["student"]["test"]["clean_acc"], abs=1e-9)
    assert result.artifacts["peer"].exists() and result.artifacts["swa_student"].exists()


@pytest.mark.slow
def test_autoattack_through_the_engine_equals_pyautoattack_directly(peeraid_run, digits):
    from pyautoattack import AutoAttack

    spec, result = peeraid_run
    model, _ = load_model(result.artifacts["student"])
    n = result.evaluation["images"]["autoattack_acc"]
    sample = evaluation_sample(digits.test, spec.evaluation.n_examples, spec.evaluation.autoattack_n_examples, spec.seed)
    test = digits.test.subset(sample.index).subset(sample.autoattack_index)
    assert len(test) == n and sorted(set(test.labels.tolist())) == list(range(10))  # a sample of every class, not the first 50
    x, y = test.images.float() / 255, test.labels
    direct = AutoAttack(model, norm="Linf", eps=spec.epsilon, version="standard", device="cpu", seed=spec.seed)
    _, y_adv = direct.run_standard_evaluation(x, y, batch_size=n)
    reported = result.report["student"]["test"]["autoattack_acc"]
    assert reported * n == (y_adv == y).sum().item() and reported > 0


@pytest.mark.slow
def test_command_line_runs_a_job_and_prints_the_report(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "core.engine.cli",
            "train",
            "--preset",
            "digits-demo",
            "--workdir",
            str(tmp_path),
            "--set",
            "epochs=2",
            "--set",
            "lr_decay_epochs=[1]",
            "--set",
            "evaluation.n_examples=20",
            "--set",
            "attack_steps=2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "Clean" in out.stdout and "PGD-20" in out.stdout and "AutoAttack" in out.stdout
    assert "test images per attack: Clean 20, FGSM 20, PGD-20 20, AutoAttack 20" in out.stdout
    assert "epoch 2:" in out.stderr
    assert (tmp_path / "artifacts" / "student.safetensors").exists()


@pytest.mark.slow
def test_command_line_names_a_bad_field(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "core.engine.cli", "train", "--preset", "digits-demo", "--set", "epsilon=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "epsilon" in out.stderr and "0.5" in out.stderr
