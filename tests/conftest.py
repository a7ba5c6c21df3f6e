import pytest
import torch

from core.engine.datasets import DatasetSplits, fingerprint, split_validation
from core.engine.sources import load_digits
from core.engine.spec import build_spec


@pytest.fixture(scope="session")
def tiny_splits() -> DatasetSplits:
    """A 320-image slice of the built-in digits: enough for exact-behaviour tests in seconds."""
    train, test = load_digits()
    train = train.subset(torch.arange(320))
    train, val = split_validation(train, 0.2, seed=0)
    test = test.subset(torch.arange(64))
    return DatasetSplits("digits-tiny", train, val, test, fingerprint(train, val, test))


def tiny_spec(**overrides):
    base = dict(
        dataset="digits",
        student="small_cnn",
        epochs=4,
        lr_decay_epochs=[2, 3],
        batch_size=64,
        lr=0.05,
        attack_steps=2,
        eval_pgd_steps=2,
        evaluation=dict(n_examples=32, autoattack=False, batch_size=64),
    )
    base.update(overrides)
    return build_spec(None, base)


# The real service stacks (API + Celery worker; embedded and PostgreSQL + Redis), shared by tests/service and tests/client.
from tests.stack import digits_npz_bytes, stack  # noqa: E402, F401
