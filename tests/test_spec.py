import pytest

from core.engine.cli import UsageError, parse_overrides
from core.engine.errors import SpecError
from core.engine.spec import PRESETS, JobSpec, build_spec


def errors_of(preset=None, **overrides):
    with pytest.raises(SpecError) as err:
        build_spec(preset, overrides)
    return {e["field"]: e["message"] for e in err.value.errors}, str(err.value)


def test_paper_presets_reproduce_the_paper_settings():
    c10 = build_spec("cifar10-resnet18")
    assert (c10.epochs, c10.decay_epochs, c10.batch_size, c10.lr, c10.weight_decay) == (300, [214, 259, 284], 128, 0.1, 2e-4)
    assert c10.peeraid.model_dump() == dict(tau=5, gamma1=1, gamma2=0.1, tau_peer=1, lambda1=0, lambda2=1, lambda3=1)
    assert c10.student == c10.peer_architecture == "resnet18" and c10.resolved_swa_start == 214
    c100 = build_spec("cifar100-wrn34-10")
    assert c100.student == "wrn34_10" and c100.peeraid.gamma2 == 1
    tiny = build_spec("tinyimagenet-resnet18")
    assert (tiny.epochs, tiny.decay_epochs) == (200, [99, 149])
    assert tiny.peeraid.model_dump() == dict(tau=1, gamma1=1, gamma2=100, tau_peer=1, lambda1=0.035, lambda2=35, lambda3=20)
    assert c10.epsilon == 8 / 255 and c10.attack_step_size == 2 / 255 and c10.attack_steps == 10
    assert {
        "cifar10-resnet18",
        "cifar10-wrn34-10",
        "cifar100-resnet18",
        "cifar100-wrn34-10",
        "tinyimagenet-resnet18",
        "tinyimagenet-wrn34-10",
    } <= set(PRESETS)


def test_overrides_merge_into_nested_fields():
    spec = build_spec("cifar100-resnet18", {"epochs": 10, "lr_decay_epochs": [5, 8], "peeraid": {"tau": 3}})
    assert spec.peeraid.tau == 3 and spec.peeraid.gamma2 == 1  # the rest of the preset's weights stay
    assert spec.epochs == 10 and spec.resolved_swa_start == 5


def test_lr_schedule_at_the_decay_boundaries():
    spec = build_spec("cifar10-resnet18")
    for epoch, lr in [(0, 0.1), (213, 0.1), (214, 0.01), (258, 0.01), (259, 0.001), (283, 0.001), (284, 0.0001), (299, 0.0001)]:
        assert spec.lr_at(epoch) == pytest.approx(lr, rel=1e-12), epoch


@pytest.mark.parametrize(
    "overrides,field,fragment",
    [
        ({"epsilon": 2.0}, "epsilon", "less than or equal to 0.5"),
        ({"epsilon": -0.1}, "epsilon", "greater than 0"),
        ({"epsilon": "big"}, "epsilon", "valid number"),
        ({"lr": 0}, "lr", "greater than 0"),
        ({"epochs": "ten"}, "epochs", "valid integer"),
        ({"batch_size": 1}, "batch_size", "greater than or equal to 2"),
        ({"lr_decay_epochs": [50, 20]}, "lr_decay_epochs", "strictly increasing"),
        ({"epochs": 10, "lr_decay_epochs": [5, 12]}, "", "lr_decay_epochs [12] are not below epochs=10"),
        ({"lr_decay_epochs": [0.5, 30]}, "lr_decay_epochs", "all of one kind; got [0.5, 30]"),
        ({"lr_decay_epochs": [1.5]}, "lr_decay_epochs", "an epoch (an integer ≥ 1) or a fraction of training"),
        ({"lr_decay_epochs": [0, 5]}, "lr_decay_epochs", "decay epochs must be ≥ 1"),
        ({"lr_decay_epochs": [0.8, 0.6]}, "lr_decay_epochs", "strictly increasing"),
        ({"swa_start": 2.5}, "swa_start", "an epoch (integer) or a fraction of training"),
        ({"peeraid": {"tau": 0}}, "peeraid.tau", "greater than 0"),
        ({"peeraid": {"temperature": 4}}, "peeraid.temperature", "unknown field"),
        ({"learning_rate": 0.1}, "learning_rate", "unknown field"),
        ({"method": "magic"}, "method", "'peeraid'"),
        ({"evaluation": {"n_examples": 0}}, "evaluation.n_examples", "greater than or equal to 1"),
    ],
)
def test_bad_specs_name_the_field(overrides, field, fragment):
    errors, text = errors_of("cifar10-resnet18", **overrides)
    assert field in errors, errors
    assert fragment in errors[field], errors[field]
    assert fragment in text


def test_peer_is_refused_for_methods_without_one():
    errors, _ = errors_of(None, method="pgd_at", peer="resnet18", epochs=300)
    assert "peer is only used by method 'peeraid'" in errors[""]


def test_unknown_preset_lists_the_known_ones():
    errors, _ = errors_of("cifar11")
    assert "unknown preset 'cifar11'" in errors["preset"] and "cifar10-resnet18" in errors["preset"]


def test_spec_round_trips_through_json():
    spec = build_spec("digits-demo")
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


def test_cli_overrides_parse_json_values():
    assert parse_overrides(["epochs=5", "peeraid.tau=2.5", "lr_decay_epochs=[3,4]", "dataset=my.zip"]) == {
        "epochs": 5,
        "peeraid": {"tau": 2.5},
        "lr_decay_epochs": [3, 4],
        "dataset": "my.zip",
    }
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_overrides(["epochs"])


def test_overriding_epochs_alone_keeps_a_preset_schedule_in_proportion():
    """`--preset digits-demo --set epochs=4` used to fail: its decay epochs [8, 10] were not below 4."""
    demo = build_spec("digits-demo", parse_overrides(["epochs=4"]))
    assert demo.decay_epochs == [3, 3] and demo.resolved_swa_start == 3  # 8/12 and 10/12 of 4 epochs, rounded
    assert [demo.lr_at(e) for e in range(4)] == pytest.approx([0.1, 0.1, 0.1, 0.001])  # both decays still apply
    c10 = build_spec("cifar10-resnet18", {"epochs": 100})
    assert c10.decay_epochs == [71, 86, 95] and c10.resolved_swa_start == 71  # 214/300, 259/300, 284/300 of 100
    for epochs in range(1, 40):
        spec = build_spec("cifar100-resnet18", {"epochs": epochs})
        assert all(1 <= e < epochs for e in spec.decay_epochs) and 0 <= spec.resolved_swa_start < epochs, epochs
    assert build_spec("cifar10-resnet18", {"epochs": 1}).decay_epochs == []  # no epoch left to decay at


def test_fractions_and_epochs_give_the_same_schedule_and_explicit_epochs_are_unchanged():
    fractions = build_spec(None, {"epochs": 300, "lr_decay_epochs": [0.7133, 0.8633, 0.9467]})
    epochs = build_spec(None, {"epochs": 300, "lr_decay_epochs": [214, 259, 284]})
    assert fractions.decay_epochs == epochs.decay_epochs == epochs.lr_decay_epochs == [214, 259, 284]
    assert [fractions.lr_at(e) for e in range(300)] == [epochs.lr_at(e) for e in range(300)]
    assert epochs.model_dump()["lr_decay_epochs"] == [214, 259, 284]  # integers stay integers (stored specs compare equal)
    assert build_spec(None, {"epochs": 100, "lr_decay_epochs": [75.0, 90.0]}).lr_decay_epochs == [75, 90]
    swa = build_spec(None, {"epochs": 10, "lr_decay_epochs": [0.7], "swa_start": 0.5})
    assert swa.resolved_swa_start == 5 and build_spec(None, {"epochs": 10, "lr_decay_epochs": [7], "swa_start": 3}).resolved_swa_start == 3
    assert JobSpec.model_validate_json(fractions.model_dump_json()) == fractions
