import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two pytest workers on two cores: one thread each, or every small operation waits on the other's threads
    torch.set_num_threads(1)

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


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups (after it, they were silently ignored)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`--dist loadgroup`), the tests of one service stack run in one worker, so each
    worker starts one stack, not both; the heavy tests of the two backends then run side by side. Every
    test that uses the local PostgreSQL is in the PostgreSQL stack's group, since one of them restarts
    the server."""
    for item in items:
        backend = getattr(getattr(item, "callspec", None), "params", {}).get("stack")
        if backend is not None:
            item.add_marker(pytest.mark.xdist_group(backend))
        elif item.path.name in ("test_quickstart.py", "test_schemathesis.py"):
            item.add_marker(pytest.mark.xdist_group("embedded"))  # stacks of their own on SQLite: beside the others' PostgreSQL
