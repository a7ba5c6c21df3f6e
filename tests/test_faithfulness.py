"""The method as the authors' script runs it, pinned: presets against their configs, the optimizers
the script builds, eval mode wherever the script evaluates, and ε, α, K reaching the attacks."""

import math

import pytest
import torch

from core.engine.evaluation import final_report, validation_metrics
from core.engine.spec import PRESETS, JobSpec, build_spec
from core.engine.trainer import Trainer

from .conftest import tiny_spec

# Written from the paper's table and the authors' configs/*.json and training_scripts/*.sh,
# independently of core/engine/spec.py: (dataset, architecture, epochs, LR decay epochs, τ, γ1, γ2, τp, λ1, λ2, λ3)
AUTHORS_CONFIGS = {
    "cifar10-resnet18": ("cifar10", "resnet18", 300, [214, 259, 284], (5, 1, 0.1, 1, 0, 1, 1)),
    "cifar10-wrn34-10": ("cifar10", "wrn34_10", 300, [214, 259, 284], (5, 1, 0.1, 1, 0, 1, 1)),
    "cifar100-resnet18": ("cifar100", "resnet18", 300, [214, 259, 284], (5, 1, 1, 1, 0, 1, 1)),
    "cifar100-wrn34-10": ("cifar100", "wrn34_10", 300, [214, 259, 284], (5, 1, 1, 1, 0, 1, 1)),
    "tinyimagenet-resnet18": ("tinyimagenet", "resnet18", 200, [99, 149], (1, 1, 100, 1, 0.035, 35, 20)),
    "tinyimagenet-wrn34-10": ("tinyimagenet", "wrn34_10", 100, [49, 79], (1, 1, 100, 1, 0.035, 35, 20)),
}


def authors_lr(epoch: int, decay_epochs: list[int], lr: float = 0.1) -> float:
    """main.py's adjust_learning_rate, transcribed: divide by 10 for every decay epoch ≤ epoch (0-based)."""
    for boundary in decay_epochs:
        if epoch < boundary:
            break
        lr /= 10
    return lr


@pytest.mark.parametrize("preset", AUTHORS_CONFIGS)
def test_paper_presets_are_the_authors_configs(preset):
    dataset, arch, epochs, decays, weights = AUTHORS_CONFIGS[preset]
    s = build_spec(preset)
    assert (s.dataset, s.method, s.student, s.peer_architecture) == (dataset, "peeraid", arch, arch)
    assert (s.epochs, s.batch_size, s.lr, s.peer_lr or s.lr, s.momentum, s.weight_decay) == (epochs, 128, 0.1, 0.1, 0.9, 2e-4)
    assert [s.lr_at(e) for e in range(epochs)] == pytest.approx([authors_lr(e, decays) for e in range(epochs)], rel=1e-12)
    assert s.swa and s.resolved_swa_start == decays[0]  # main.py: swa_s_start = lr_decay_epochs_student[0]
    assert tuple(s.peeraid.model_dump().values()) == weights
    assert list(s.peeraid.model_dump()) == ["tau", "gamma1", "gamma2", "tau_peer", "lambda1", "lambda2", "lambda3"]
    assert (s.epsilon, s.attack_step_size, s.attack_steps) == (8 / 255, 2 / 255, 10)
    assert (s.eval_pgd_steps, s.evaluation.pgd_steps, s.evaluation.autoattack, s.evaluation.n_examples) == (10, 20, True, None)
    assert (s.augment, s.crop_padding) == (True, 4)
    assert (s.selection, s.student_adv_forwards) == ("test", 2)  # the script's protocol and its two S(x') forwards
    assert not s.recalibrate_batchnorm  # validation on the running statistics training left, as the script


def test_every_preset_is_in_the_table_or_says_it_is_not_the_paper():
    for name, (description, _) in PRESETS.items():
        assert (name in AUTHORS_CONFIGS) == description.startswith("Paper:"), name


def test_evaluation_defaults_are_the_scripts():
    spec = JobSpec()
    assert spec.eval_pgd_steps == 10  # test_kd: adversary_student.perturb(inputs, targets, 10)
    assert spec.evaluation.pgd_steps == 20  # --pgd_eval: evaluate_adversary(..., 20, ...)
    assert spec.evaluation.n_examples is None and spec.evaluation.autoattack


# ---- the optimizers ----


def paper_trainer(tiny_splits, tmp_path, **overrides) -> Trainer:
    """The cifar10-resnet18 preset's optimisation settings on small networks and the tiny digits."""
    spec = build_spec("cifar10-resnet18", {"student": "small_cnn", "peer": "small_cnn", "selection": "validation", **overrides})
    return Trainer(spec, tiny_splits, workdir=tmp_path)


def test_both_optimizers_are_the_scripts_sgd_on_all_parameters(tiny_splits, tmp_path):
    trainer = paper_trainer(tiny_splits, tmp_path)
    for model, optimizer in ((trainer.nets.student, trainer.nets.student_optimizer), (trainer.nets.peer, trainer.nets.peer_optimizer)):
        # main.py: optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4), nothing else
        assert type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 1
        group = optimizer.param_groups[0]
        assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]  # BatchNorm and biases decay too
        assert (group["lr"], group["momentum"], group["weight_decay"], group["dampening"]) == (0.1, 0.9, 2e-4, 0)
        assert group["nesterov"] is False and group["maximize"] is False


def test_the_peer_learning_rate_follows_the_same_schedule(tiny_splits, tmp_path):
    trainer = paper_trainer(tiny_splits, tmp_path, peer_lr=0.05)
    for epoch in (0, 213, 214, 259, 299):
        trainer.set_lr(epoch)
        assert trainer.nets.student_optimizer.param_groups[0]["lr"] == pytest.approx(authors_lr(epoch, [214, 259, 284], 0.1))
        assert trainer.nets.peer_optimizer.param_groups[0]["lr"] == pytest.approx(authors_lr(epoch, [214, 259, 284], 0.05))


# ---- eval mode wherever the script evaluates ----


def batchnorm_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


def test_per_epoch_validation_runs_in_eval_mode(tiny_splits, tmp_path):
    """BatchNorm counts its train-mode forwards: after an epoch they are exactly the training step's
    (S(x') twice and S(x) once per step, as the script); a validation in train mode would add its own."""
    spec = tiny_spec(epochs=1, lr_decay_epochs=[], swa=False, student_adv_forwards=2)
    trainer = Trainer(spec, tiny_splits, workdir=tmp_path)
    record = trainer.run_epoch(0)
    assert int(trainer.nets.student.bn1.num_batches_tracked) == 3 * len(trainer.train_loader)
    assert trainer.nets.student.training  # and back in train mode for the next epoch
    student = trainer.nets.student.eval()
    with torch.no_grad():
        clean = (student(tiny_splits.val.images.float() / 255).argmax(1) == tiny_splits.val.labels).float().mean().item()
    assert record.student["clean_acc"] == pytest.approx(clean)


def test_validation_and_final_report_leave_batchnorm_alone_and_the_mode_as_found(tiny_splits):
    torch.manual_seed(0)
    from peeraid_models import create_model

    model = create_model("small_cnn", num_classes=10, in_channels=1).train()
    before = batchnorm_state(model)
    data = tiny_splits.val
    validation_metrics(model, data, epsilon=8 / 255, step_size=2 / 255, steps=2, batch_size=32, device="cpu")
    final_report(model, data, epsilon=8 / 255, step_size=2 / 255, pgd_steps=2, run_autoattack=False, batch_size=32, device="cpu", seed=0)
    after = batchnorm_state(model)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert model.training


# ---- ε, α and K reach the attacks ----


class AttackRecorder:
    """Records every forward of a real network: its mode, whether the input needs a gradient (an
    attack step), and the input itself."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self.record)

    def record(self, module, args):
        x = args[0]
        self.calls.append((module.training, x.requires_grad, x.detach().clone()))

    def attack_inputs(self):
        return [x for training, needs_grad, x in self.calls if needs_grad and not training]


def test_training_attack_uses_the_specs_epsilon_alpha_and_steps(tiny_splits, tmp_path):
    eps, alpha, k = 3 / 255, 2 / 255, 4
    trainer = Trainer(tiny_spec(epsilon=eps, attack_step_size=alpha, attack_steps=k, student_adv_forwards=2), tiny_splits, workdir=tmp_path)
    recorder = AttackRecorder(trainer.nets.student)
    g = torch.Generator().manual_seed(0)
    x = 0.25 + 0.5 * torch.rand(32, 1, 16, 16, generator=g)  # away from 0 and 1: no clipping to the image range
    y = torch.randint(0, 10, (32,), generator=g)
    trainer.step(x, y)

    iterates = recorder.attack_inputs()
    assert len(iterates) == k  # K gradient steps of the student in eval mode
    train_inputs = [x_in for training, _, x_in in recorder.calls if training]
    assert len(train_inputs) == 3  # S(x'), S(x') again, S(x)
    x_adv = train_inputs[0]
    assert torch.equal(train_inputs[1], x_adv) and torch.equal(train_inputs[2], x)
    assert (iterates[0] - x).abs().max() < 0.01  # the start: x + 0.001·N(0, I)
    for a, b in zip([*iterates[1:], x_adv], iterates, strict=True):
        assert (a - b).abs().max() <= alpha + 1e-6  # each step moves at most α ...
    assert (x_adv - x).abs().max() <= eps + 1e-6  # ... inside the ε-ball,
    assert (x_adv - x).abs().max() >= eps - 1e-6  # whose edge K·α > ε reaches
    assert (iterates[1] - iterates[0]).abs().median().item() == pytest.approx(alpha, abs=1e-6)  # a full α step


def test_per_epoch_validation_uses_the_specs_pgd_steps_and_epsilon(tiny_splits, tmp_path):
    eps, steps = 5 / 255, 3
    spec = tiny_spec(epochs=1, lr_decay_epochs=[], swa=False, epsilon=eps, eval_pgd_steps=steps, attack_steps=2)
    trainer = Trainer(spec, tiny_splits, workdir=tmp_path, eval_batch_size=16)
    recorder = AttackRecorder(trainer.nets.student)
    trainer.run_epoch(0)
    attack_inputs = recorder.attack_inputs()
    training_attack_steps = 2 * len(trainer.train_loader)
    validation_batches = math.ceil(len(tiny_splits.val) / 16)
    assert len(attack_inputs) == training_attack_steps + steps * validation_batches
    val = tiny_splits.val.images.float() / 255
    for i, x_adv in enumerate(attack_inputs[training_attack_steps:]):
        x = val[(i // steps) * 16 : (i // steps) * 16 + len(x_adv)]
        assert (x_adv - x).abs().max() <= eps + 1e-6


def test_the_model_card_states_the_protocol_the_execution_and_the_report_attack(tiny_splits, tmp_path):
    from core.engine.datasets import DatasetSplits, fingerprint
    from core.engine.pipeline import run_job

    train, test = tiny_splits.train, tiny_splits.test
    paper = DatasetSplits("digits-tiny", train, test, test, fingerprint(train, test, test), selection="test")
    spec = tiny_spec(
        epochs=1,
        lr_decay_epochs=[],
        swa=False,
        selection="test",
        evaluation=dict(n_examples=16, autoattack=False, batch_size=64, pgd_steps=3),
    )
    card = run_job(spec, paper, tmp_path).model_card
    assert card["dataset"]["protocol"].startswith("paper protocol") and "selected on the test set" in card["dataset"]["protocol"]
    assert card["hyperparameters"]["selection"] == "test"
    assert card["execution"] == {
        "device": "cpu",
        "precision": "fp32",
        "channels_last": False,
        "cuda_graph_requested": False,
        "cuda_graph": False,
        "graph_captures": 0,
        "fallback": None,
    }
    assert "pgd3_acc" in card["metrics"]["student"]["test"]  # the report's PGD runs evaluation.pgd_steps steps
