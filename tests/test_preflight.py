"""The pre-flight check and estimate: the data's fit, the arithmetic counted on the meta device, the
built-in shapes as the sources load them."""

import pytest
import torch
from peeraid_models import create_model

from core.engine.builtin_datasets import BUILTIN_SHAPES
from core.engine.errors import DatasetError
from core.engine.estimates import DataShape
from core.engine.preflight import forward_flops, network_cost, preflight, step_flops
from core.engine.sources import load_digits
from core.engine.spec import build_spec


def test_the_digits_shape_is_the_loaded_one():
    train, test = load_digits()
    shape = BUILTIN_SHAPES["digits"]
    assert (shape.in_channels, shape.height, shape.width) == tuple(train.images.shape[1:])
    assert (shape.num_classes, shape.num_train, shape.num_test) == (10, len(train), len(test))


def test_forward_arithmetic_of_a_known_network():
    with torch.device("meta"):
        model = create_model("small_cnn", num_classes=10, in_channels=1)
    flops, activations = forward_flops(model, BUILTIN_SHAPES["digits"])
    # conv1 16×1×3×3 at 16×16, conv2 32×16×3×3 at 8×8, conv3 64×32×3×3 at 4×4, linear 64→10; two FLOPs per multiply-add
    macs = 16 * 9 * 256 + 32 * 16 * 9 * 64 + 64 * 32 * 9 * 16 + 64 * 10
    assert flops == pytest.approx(2 * macs)
    assert activations > 16 * 256


def test_the_step_counts_the_attack_and_both_networks():
    spec = build_spec("digits-demo")
    assert step_flops(spec, 1.0, 1.0) == 1 + 3 * spec.attack_steps + 3 + 3 * (spec.student_adv_forwards + 1)
    assert step_flops(build_spec("digits-demo", {"method": "natural", "peer": None}), 1.0, 0.0) == 3


def test_the_estimate_follows_the_epochs_and_refuses_too_small_images():
    shape = BUILTIN_SHAPES["digits"]
    short, long = (preflight(build_spec("digits-demo", {"epochs": e}), shape) for e in (4, 8))
    assert long.training_flops == pytest.approx(2 * short.training_flops, rel=0.05)
    assert short.hours["cpu"] > short.hours["h100"] > 0
    with pytest.raises(DatasetError, match="at least"):
        preflight(build_spec("digits-demo", {"student": "resnet18", "peer": "resnet18"}), DataShape(3, 4, 4, 2, 100, 20))
    with pytest.raises(DatasetError, match="at least 2"):
        preflight(build_spec("digits-demo"), DataShape(1, 16, 16, 1, 100, 20))


def test_autoattacks_work_follows_its_target_classes_and_small_networks_pay_its_overhead():
    from core.engine.estimates import DEVICE_RATES
    from core.engine.evaluation import autoattack_work

    assert autoattack_work(100, 10) == pytest.approx(300_000)  # the standard version: 9 targets
    assert autoattack_work(100, 4) == pytest.approx(0.64 * 300_000)  # 3 targets
    assert autoattack_work(100, 2) < autoattack_work(100, 3) < autoattack_work(100, 4)
    cpu = DEVICE_RATES["cpu"]
    small, large = (
        cpu.evaluation_seconds("small_cnn", 1000, f) / (1000 * f / cpu.evaluation_flops_per_second("small_cnn")) for f in (1.25e6, 5.6e6)
    )
    assert small > large > 1  # a 1.25 MFLOP network pays relatively more of the per-pass overhead than a 5.6 MFLOP one
    ten, four = (preflight(build_spec("small-data", {"dataset": "digits"}), DataShape(3, 32, 32, c, 600, 200)) for c in (10, 4))
    assert four.evaluation_hours["cpu"] < ten.evaluation_hours["cpu"]


def test_a_networks_measures_are_counted_once_per_combination():
    network_cost.cache_clear()
    with torch.device("meta"):
        model = create_model("resnet18", num_classes=7, in_channels=3)
    flops, activations = forward_flops(model, DataShape(3, 24, 20, 7, 0, 0))
    first = network_cost("resnet18", 7, 3, 24, 20)
    assert (first.flops, first.activations) == (flops, activations)
    assert first.parameters == sum(p.numel() for p in model.parameters())
    assert network_cost("resnet18", 7, 3, 24, 20) is first and network_cost.cache_info().hits == 1
    assert network_cost("resnet18", 8, 3, 24, 20).parameters > first.parameters  # classes, channels and sizes are part of the key
    spec, shape = build_spec("digits-demo", {"student": "resnet18", "peer": "resnet18"}), DataShape(3, 24, 20, 7, 100, 20)
    estimate = preflight(spec, shape)
    assert estimate.student_parameters == estimate.peer_parameters == first.parameters and network_cost.cache_info().hits >= 3


@pytest.mark.parametrize("overrides,field", [({"student": "resnet19"}, "student"), ({"peer": "vgg"}, "peer")])
def test_an_unknown_architecture_is_a_spec_error_naming_its_field_and_survives_pickling(overrides, field):
    """Checked where networks are built (pre-flight, trainer), not by JobSpec, which torch-free processes read;
    the error crosses from the API's CPU workers to the API, so it must keep its fields when pickled."""
    import pickle

    from core.engine.errors import SpecError

    spec = build_spec("cifar10-resnet18", overrides)
    with pytest.raises(SpecError) as caught:
        preflight(spec, BUILTIN_SHAPES["cifar10"])
    (error,) = pickle.loads(pickle.dumps(caught.value)).errors
    assert error["field"] == field and f"unknown architecture '{overrides[field]}'" in error["message"]
    assert "resnet18" in error["message"]  # the known ones are listed
