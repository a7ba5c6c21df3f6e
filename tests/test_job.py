"""A real PeerAiD run on the built-in dataset, its report, its exports, and AutoAttack parity."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from core.engine.sources import load_splits
from core.engine.evaluation import accuracies, autoattack_accuracy, pgd_attack
from core.engine.export import load_model
from core.engine.job import run_job
from core.engine.spec import build_spec

pytestmark = pytest.mark.slow


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


def test_peeraid_student_is_clearly_more_robust_than_natural_training(peeraid_run, natural_run):
    robust = peeraid_run[1].report["student"]["test"]
    natural = natural_run[1].report["student"]["test"]
    print(f"\nPGD-20 accuracy on 100 digits test images at eps=8/255: PeerAiD student {robust['pgd20_acc']:.1%} "
          f"(clean {robust['clean_acc']:.1%}), naturally trained {natural['pgd20_acc']:.1%} (clean {natural['clean_acc']:.1%})")
    assert robust["pgd20_acc"] >= natural["pgd20_acc"] + 0.15
    assert robust["autoattack_acc"] >= natural["autoattack_acc"] + 0.10
    assert robust["clean_acc"] >= 0.6


def test_report_covers_student_and_swa_student(peeraid_run):
    spec, result = peeraid_run
    for key in ("student", "swa_student"):
        m = result.report[key]
        assert set(m["test"]) == {"clean_acc", "fgsm_acc", "pgd20_acc", "autoattack_acc"}
        assert m["test"]["autoattack_acc"] <= m["test"]["pgd20_acc"] + 0.02 <= m["test"]["clean_acc"] + 0.02
        assert 1 <= m["best_epoch"] <= spec.epochs
    assert result.report["swa_student"]["best_epoch"] > spec.resolved_swa_start  # 1-based: epoch swa_start + 1 is the first averaged


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


def test_exported_weights_are_safetensors_that_reproduce_the_reported_accuracy(peeraid_run, digits):
    spec, result = peeraid_run
    path = result.artifacts["student"]
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(header_len))  # a safetensors header, not a pickle
    with safe_open(str(path), framework="pt") as f:
        assert "conv1.weight" in f.keys()
    model, meta = load_model(path)
    assert meta["architecture"] == "small_cnn" and meta["classes"] == digits.classes
    test = digits.test.subset(torch.arange(spec.evaluation.n_examples))
    clean = accuracies(model, test, {"clean": None})["clean"]
    assert clean == pytest.approx(result.report["student"]["test"]["clean_acc"], abs=1e-9)
    assert result.artifacts["peer"].exists() and result.artifacts["swa_student"].exists()


def test_autoattack_through_the_engine_equals_pyautoattack_directly(peeraid_run, digits):
    from pyautoattack import AutoAttack

    model, _ = load_model(peeraid_run[1].artifacts["student"])
    test = digits.test.subset(torch.arange(100))
    eps = peeraid_run[0].epsilon
    engine = autoattack_accuracy(model, test, epsilon=eps, batch_size=100, seed=0)

    x, y = test.images.float() / 255, test.labels
    direct = AutoAttack(model, norm="Linf", eps=eps, version="standard", device="cpu", seed=0)
    _, y_adv = direct.run_standard_evaluation(x, y, batch_size=100)
    assert engine == (y_adv == y).float().mean().item()
    pgd = accuracies(model, test, {"pgd": pgd_attack(eps, 2 / 255, 20)})["pgd"]
    assert 0 < engine <= pgd + 0.02


def test_command_line_runs_a_job_and_prints_the_report(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "core.engine.cli", "train", "--preset", "digits-demo", "--workdir", str(tmp_path),
         "--set", "epochs=2", "--set", "lr_decay_epochs=[1]", "--set", "evaluation.n_examples=20",
         "--set", "attack_steps=2"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "clean" in out.stdout and "pgd20" in out.stdout and "autoattack" in out.stdout
    assert "epoch 2:" in out.stderr
    assert (tmp_path / "artifacts" / "student.safetensors").exists()


def test_command_line_names_a_bad_field(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "core.engine.cli", "train", "--preset", "digits-demo", "--set", "epsilon=3"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2 and "epsilon" in out.stderr and "0.5" in out.stderr
