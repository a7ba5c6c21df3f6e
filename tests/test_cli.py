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


# Both command lines' --set: the engine's (python -m core.engine.cli train) and the client's (peeraid jobs submit).
SET_CASES = [
    ["epochs=5", "peeraid.tau=2.5", "lr_decay_epochs=[3,4]", "dataset=my.zip", "peer=null", "name=not json"],
    ["peeraid.tau=2", "peeraid=1"],  # a later value replaces the whole table
    ["peeraid=1", "peeraid.tau=2"],  # a field inside a value: once a TypeError in the engine's copy
    ["epochs=1", "epochs.x.y=2"],
    ["epochs"],
    ["=3"],
    ["a..b=1"],
    ["a.=1"],
    ["evaluation.n_examples=20", "evaluation.pgd_steps=7"],
    ['spec={"epochs": 3}', "spec.epochs=4"],
]


def _outcome(parse, cases):
    try:
        return "ok", parse(cases)
    except Exception as err:
        return type(err).__name__, str(err)


@pytest.mark.parametrize("cases", SET_CASES, ids=[" ".join(c) for c in SET_CASES])
def test_the_engine_and_the_client_parse_set_alike(cases):
    from core.engine.cli import parse_overrides
    from peeraid_client.cli import parse_assignments

    engine, client = _outcome(parse_overrides, cases), _outcome(parse_assignments, cases)
    assert engine == client
    assert engine[0] in ("ok", "UsageError")


def test_a_value_set_inside_a_value_is_a_usage_error(capsys):
    from core.engine.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["train", "--preset", "digits-demo", "--set", "peeraid=1", "--set", "peeraid.tau=2"])
    assert stopped.value.code == 2
    assert "--set 'peeraid.tau=2': peeraid was already set to a value" in capsys.readouterr().err
