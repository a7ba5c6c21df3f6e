"""The training loop: resume exactness, SWA, BatchNorm recalibration, schedule, cancellation, divergence."""

import copy

import pytest
import torch

from core.engine.callbacks import TrainingCallbacks
from core.engine.errors import CheckpointError, TrainingCancelled, TrainingDiverged
from core.engine.loader import BatchLoader
from core.engine.state_io import load_tensors
from core.engine.trainer import CHECKPOINT_NAME, Trainer

from .conftest import tiny_spec


class Recorder(TrainingCallbacks):
    def __init__(self, trainer_ref=None, stop_after_epochs=None):
        self.records, self.steps, self.snapshots = [], [], []
        self.trainer_ref = trainer_ref
        self.stop_after_epochs = stop_after_epochs

    def on_step(self, progress):
        self.steps.append(progress)

    def on_epoch(self, record):
        self.records.append(record)
        if self.trainer_ref is not None:
            self.snapshots.append(copy.deepcopy(self.trainer_ref[0].nets.student.state_dict()))

    def should_stop(self):
        return self.stop_after_epochs is not None and len(self.records) >= self.stop_after_epochs


def full_state(trainer):
    state = {f"student.{k}": v for k, v in trainer.nets.student.state_dict().items()}
    state.update({f"peer.{k}": v for k, v in trainer.nets.peer.state_dict().items()})
    state.update({f"swa.{k}": v for k, v in trainer.swa.state_dict().items()})
    for name, opt in (("s", trainer.nets.student_optimizer), ("p", trainer.nets.peer_optimizer)):
        for i, entry in opt.state_dict()["state"].items():
            state[f"opt.{name}.{i}"] = entry["momentum_buffer"]
    state.update({f"best.{k}": v for k, v in trainer.best_student.state.items()})
    return state


def test_resume_after_stopping_gives_the_same_parameters(tiny_splits, tmp_path):
    spec = tiny_spec(swa_start=1)
    straight = Trainer(spec, tiny_splits, workdir=tmp_path / "straight")
    straight.fit()

    stopper = Recorder(stop_after_epochs=2)
    interrupted = Trainer(spec, tiny_splits, workdir=tmp_path / "interrupted", callbacks=stopper)
    with pytest.raises(TrainingCancelled):
        interrupted.fit()
    assert len(stopper.records) == 2
    _, meta = load_tensors(tmp_path / "interrupted" / CHECKPOINT_NAME)
    assert meta["next_epoch"] == 2

    resumed = Trainer(spec, tiny_splits, workdir=tmp_path / "interrupted")
    assert resumed.next_epoch == 2
    resumed.fit()

    a, b = full_state(straight), full_state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r.student for r in straight.history] == [r.student for r in resumed.history]
    assert straight.best_student.epoch == resumed.best_student.epoch


def test_swa_student_is_the_mean_of_the_students_since_swa_start(tiny_splits, tmp_path):
    ref = []
    recorder = Recorder(trainer_ref=ref)
    trainer = Trainer(tiny_spec(epochs=4, lr_decay_epochs=[1, 3]), tiny_splits, workdir=tmp_path, callbacks=recorder)
    ref.append(trainer)
    trainer.fit()
    assert trainer.spec.resolved_swa_start == 1
    averaged = recorder.snapshots[1:]  # epochs 1, 2, 3
    for name, param in trainer.swa.module.named_parameters():
        expected = torch.stack([s[name] for s in averaged]).mean(0)
        torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-7)
    assert int(trainer.swa.n_averaged) == 3
    assert recorder.records[0].swa_student is None and recorder.records[1].swa_student is not None


def test_swa_batchnorm_statistics_are_recomputed_over_the_training_data(tiny_splits, tmp_path):
    trainer = Trainer(tiny_spec(epochs=2, lr_decay_epochs=[1], batch_size=48), tiny_splits, workdir=tmp_path)
    trainer.fit()
    swa = trainer.swa.module
    # independent: the sample-weighted average of per-batch statistics of conv1's output over one pass
    loader = BatchLoader(tiny_splits.train, 48, train=True, padding=4, seed=trainer.spec.seed)
    loader.set_epoch(trainer.bn_pass_epoch(1))
    means, variances, sizes = [], [], []
    with torch.no_grad():
        for x, _ in loader:
            out = swa.conv1(x)
            means.append(out.mean((0, 2, 3)))
            variances.append(out.var((0, 2, 3), unbiased=True))
            sizes.append(len(x))
    w = torch.tensor(sizes, dtype=torch.float32)[:, None] / sum(sizes)
    assert sizes[-1] != sizes[0]  # a partial last batch: per-sample weighting differs from per-batch
    torch.testing.assert_close(swa.bn1.running_mean, (torch.stack(means) * w).sum(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(swa.bn1.running_var, (torch.stack(variances) * w).sum(0), rtol=1e-4, atol=1e-6)


def test_learning_rate_follows_the_step_schedule(tiny_splits, tmp_path):
    recorder = Recorder()
    trainer = Trainer(tiny_spec(epochs=4, lr_decay_epochs=[2, 3]), tiny_splits, workdir=tmp_path, callbacks=recorder)
    trainer.fit()
    assert [r.lr for r in recorder.records] == pytest.approx([0.05, 0.05, 0.005, 0.0005])
    assert trainer.nets.peer_optimizer.param_groups[0]["lr"] == pytest.approx(0.0005)
    assert recorder.steps and recorder.steps[-1].step == recorder.steps[-1].steps_per_epoch
    assert all(s.images_per_sec > 0 for s in recorder.steps)


def test_progress_reports_every_epoch_with_metrics(tiny_splits, tmp_path):
    recorder = Recorder()
    Trainer(tiny_spec(epochs=2, lr_decay_epochs=[1]), tiny_splits, workdir=tmp_path, callbacks=recorder).fit()
    assert [r.epoch for r in recorder.records] == [1, 2]
    for r in recorder.records:
        assert set(r.student) == {"clean_acc", "pgd_acc"} and 0 <= r.student["pgd_acc"] <= r.student["clean_acc"] + 0.2
        assert {"loss_student", "loss_peer"} <= set(r.losses) and r.train_seconds > 0
        best = max(recorder.records[: r.epoch], key=lambda q: (q.student["pgd_acc"], -q.epoch))
        assert r.best["student"] == {"epoch": best.epoch, **best.student}


def test_divergence_fails_and_keeps_the_last_good_checkpoint(tiny_splits, tmp_path):
    trainer = Trainer(tiny_spec(epochs=3, lr_decay_epochs=[2]), tiny_splits, workdir=tmp_path)
    trainer.run_epoch(0)
    good, _ = load_tensors(tmp_path / CHECKPOINT_NAME)
    with torch.no_grad():
        trainer.nets.student.linear.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="non-finite in epoch 2;"):  # the second epoch, counted from 1 as users count
        trainer.run_epoch(1)
    kept, meta = load_tensors(tmp_path / CHECKPOINT_NAME)
    assert meta["next_epoch"] == 1
    assert torch.equal(kept["student.linear.weight"], good["student.linear.weight"])
    assert torch.isfinite(kept["student.linear.weight"]).all()


def test_a_cancel_names_the_epoch_it_stopped_in_counting_from_1(tiny_splits, tmp_path):
    trainer = Trainer(tiny_spec(epochs=3, lr_decay_epochs=[2]), tiny_splits, workdir=tmp_path, callbacks=Recorder(stop_after_epochs=1))
    with pytest.raises(TrainingCancelled, match=r"^cancelled during epoch 2$"):  # one epoch finished: the second was running
        trainer.fit()


def test_checkpoint_of_another_job_is_refused(tiny_splits, tmp_path):
    spec = tiny_spec(epochs=2, lr_decay_epochs=[1])
    Trainer(spec, tiny_splits, workdir=tmp_path).run_epoch(0)
    with pytest.raises(CheckpointError, match="different job spec"):
        Trainer(replace_spec(spec, lr=0.01), tiny_splits, workdir=tmp_path)


def replace_spec(spec, **changes):
    return spec.model_copy(update=changes)


@pytest.mark.parametrize("method", ["pgd_at", "trades", "natural"])
def test_baselines_train_under_the_same_interface(tiny_splits, tmp_path, method):
    spec = tiny_spec(method=method, epochs=2, lr_decay_epochs=[1])
    trainer = Trainer(spec, tiny_splits, workdir=tmp_path)
    before = copy.deepcopy(trainer.nets.student.state_dict())
    history = trainer.fit()
    assert trainer.nets.peer is None and len(history) == 2
    assert all(torch.isfinite(torch.tensor(r.losses["loss_student"])) for r in history)
    assert not torch.equal(before["conv1.weight"], trainer.nets.student.conv1.weight)
    assert trainer.best_student.state is not None and trainer.best_swa.state is not None


def test_batchnorm_recalibration_restores_mode_and_momenta_even_when_a_batch_fails():
    from peeraid_models import create_model

    from core.engine.trainer import recalibrate_batchnorm

    model = create_model("small_cnn", num_classes=3, in_channels=1).eval()
    good, bad = (torch.rand(4, 1, 8, 8), None), (torch.rand(4, 2, 8, 8), None)  # 2 channels: conv1 refuses it
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(model, [good, bad])
    assert not model.training
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    recalibrate_batchnorm(model, [good])
    assert not model.training and model.bn1.num_batches_tracked == 1


def test_splits_of_another_selection_protocol_are_refused(tiny_splits, tmp_path):
    from core.engine.errors import DatasetError

    with pytest.raises(DatasetError, match="the spec asks for selection 'test'"):
        Trainer(tiny_spec(selection="test"), tiny_splits, workdir=tmp_path)


def test_a_v1_checkpoint_resumes_like_an_uninterrupted_run(tiny_splits, tmp_path):
    """v1 numbered epochs from 0 and its specs predate `selection`; the upgrade must give the same run."""
    from core.engine.state_io import save_tensors
    from core.engine.trainer import CHECKPOINT_FORMAT_V1

    spec = tiny_spec(swa_start=1)
    straight = Trainer(spec, tiny_splits, workdir=tmp_path / "straight")
    straight.fit()
    interrupted = Trainer(spec, tiny_splits, workdir=tmp_path / "v1", callbacks=Recorder(stop_after_epochs=2))
    with pytest.raises(TrainingCancelled):
        interrupted.fit()

    path = tmp_path / "v1" / CHECKPOINT_NAME
    tensors, meta = load_tensors(path)
    zero_based = lambda entry: {**entry, "epoch": entry["epoch"] - 1}
    meta["format"] = CHECKPOINT_FORMAT_V1
    meta["history"] = [{**zero_based(r), "best": {k: zero_based(b) for k, b in r["best"].items()}} for r in meta["history"]]
    for name in ("best_student", "best_swa"):
        meta[name] = zero_based(meta[name])
    del meta["spec"]["selection"]
    save_tensors(path, tensors, meta)

    resumed = Trainer(spec, tiny_splits, workdir=tmp_path / "v1")
    assert resumed.next_epoch == 2 and [r.epoch for r in resumed.history] == [1, 2]
    assert (resumed.best_student.epoch, resumed.best_swa.epoch) == (interrupted.best_student.epoch, interrupted.best_swa.epoch)
    assert resumed.history[1].best == interrupted.history[1].best
    resumed.fit()
    a, b = full_state(straight), full_state(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r.to_dict() | {"train_seconds": 0, "eval_seconds": 0, "images_per_sec": 0} for r in resumed.history] == [
        r.to_dict() | {"train_seconds": 0, "eval_seconds": 0, "images_per_sec": 0} for r in straight.history
    ]
    assert (resumed.best_student.epoch, resumed.best_swa.epoch) == (straight.best_student.epoch, straight.best_swa.epoch)


def test_a_checkpoint_naming_the_splits_fingerprint_of_earlier_versions_still_resumes(tiny_splits, tmp_path):
    """Checkpoints record the data's fingerprint (the API's); earlier versions recorded the three splits': a job
    running across the upgrade resumes, and a checkpoint of other data is still refused."""
    from dataclasses import replace

    from core.engine.datasets import fingerprint
    from core.engine.state_io import save_tensors

    splits = replace(tiny_splits, fingerprint=fingerprint(tiny_splits.train, tiny_splits.test))
    assert splits.fingerprint != splits.split_fingerprint
    spec = tiny_spec(epochs=2, lr_decay_epochs=[1])
    Trainer(spec, splits, workdir=tmp_path).run_epoch(0)
    path = tmp_path / CHECKPOINT_NAME
    tensors, meta = load_tensors(path)
    assert meta["dataset_fingerprint"] == splits.fingerprint
    save_tensors(path, tensors, {**meta, "dataset_fingerprint": splits.split_fingerprint})
    assert Trainer(spec, splits, workdir=tmp_path).next_epoch == 1
    save_tensors(path, tensors, {**meta, "dataset_fingerprint": "0" * 64})
    with pytest.raises(CheckpointError, match="different dataset"):
        Trainer(spec, splits, workdir=tmp_path)


def test_recalibrated_batchnorm_validates_the_student_on_statistics_of_its_own_weights(tiny_splits, tmp_path):
    """With recalibrate_batchnorm (the small-data preset), the student's running statistics before validation are
    one clean pass over the training data with its current weights, as the SWA student's; without it (the paper
    presets), whatever training left."""
    from core.engine.trainer import recalibrate_batchnorm

    def running_means(model):
        return [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    spec = tiny_spec(epochs=1, lr_decay_epochs=[], swa=False, recalibrate_batchnorm=True)
    trainer = Trainer(spec, tiny_splits, workdir=tmp_path / "on")
    trainer.run_epoch(0)
    recalibrated = running_means(trainer.nets.student)
    again = copy.deepcopy(trainer.nets.student)
    trainer.train_loader.set_epoch(trainer.bn_pass_epoch(0))
    recalibrate_batchnorm(again, trainer.train_loader)
    assert all(torch.allclose(a, b) for a, b in zip(recalibrated, running_means(again), strict=True))
    kept = [v for k, v in trainer.best_student.state.items() if k.endswith("running_mean")]
    assert all(torch.equal(a, b) for a, b in zip(recalibrated, kept, strict=True))  # the selected student keeps them

    plain = Trainer(tiny_spec(epochs=1, lr_decay_epochs=[], swa=False), tiny_splits, workdir=tmp_path / "off")
    plain.run_epoch(0)
    assert not all(torch.allclose(a, b) for a, b in zip(recalibrated, running_means(plain.nets.student), strict=True))
