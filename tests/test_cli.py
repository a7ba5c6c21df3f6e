"""The engine command line layers a job spec as the API does: preset, then --spec (inline JSON or a
file), then each --set, nested fields merged key by key."""

import json

import pytest

from core.engine.cli import job_overrides
from core.engine.errors import SpecError
from core.engine.spec import build_spec


def test_spec_and_set_merge_deeply_over_the_preset():
    overrides = job_overrides('{"peeraid": {"gamma2": 0.7}, "epochs": 5}', ["peeraid.tau=3", "lr_decay_epochs=[2]"], None)
    spec = build_spec("digits-demo", overrides)
    preset = build_spec("digits-demo")
    assert (spec.peeraid.gamma2, spec.peeraid.tau, spec.epochs, spec.lr_decay_epochs) == (0.7, 3, 5, [2])
    assert spec.peeraid.lambda1 == preset.peeraid.lambda1 == 0.5  # the preset's other weights stay


def test_set_wins_over_spec_and_dataset_over_both(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"evaluation": {"n_examples": 50, "pgd_steps": 7}, "dataset": "cifar10"}))
    overrides = job_overrides(str(path), ["evaluation.n_examples=20"], "digits")
    assert overrides == {"evaluation": {"n_examples": 20, "pgd_steps": 7}, "dataset": "digits"}


@pytest.mark.parametrize(
    "value,message",
    [
        ('{"epochs": }', "--spec is not valid JSON"),
        ("[1, 2]", "cannot read [1, 2]"),
        ("/no/such/spec.json", "cannot read /no/such/spec.json"),
    ],
)
def test_a_bad_spec_argument_is_named(value, message):
    with pytest.raises(SpecError, match="--spec: " + message.replace("[", r"\[").replace("]", r"\]")):
        job_overrides(value, [], None)


def test_a_spec_file_must_hold_an_object(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SpecError, match="must hold a JSON object"):
        job_overrides(str(tmp_path / "list.json"), [], None)
