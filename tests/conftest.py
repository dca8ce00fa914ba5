"""Session-wide test setup, and the one source of randomness for tests.

Triton's interpreter must be switched on before triton is imported (``import torchvision`` imports it),
so this runs before any test module: on a machine without CUDA, Triton kernels run on CPU tensors.

Every test that draws random inputs takes them from the ``seed`` fixture (or ``rng``, ``py_rng``, ``gen``, all made
from it): a fresh seed per test, or ``$FASTPRETRAIN_TEST_SEED`` to replay one. A failing test's report names its
seed and the command line that replays it.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SEED_ENV = "FASTPRETRAIN_TEST_SEED"


@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory):
    """One ``$FASTPRETRAIN_CACHE`` for the whole session, never the user's: WordNet's noun table (20-40 s to build
    here) and each demo corpus are made once, and CLI subprocesses inherit it. Tests of the cache itself use their
    own folder."""
    cache = tmp_path_factory.mktemp("fastpretrain-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTPRETRAIN_CACHE", str(cache))
        yield cache


def fresh_seed() -> int:
    """``$FASTPRETRAIN_TEST_SEED`` when set, else a fresh one (32 bits)."""
    replay = os.environ.get(SEED_ENV)
    return int(replay) if replay else int.from_bytes(os.urandom(4), "little")


@pytest.fixture
def seed(request) -> int:
    """This test's seed (``fresh_seed``), named in its failure report."""
    request.node.test_seed = fresh_seed()
    return request.node.test_seed


@dataclass
class DemoRun:
    folder: Path  # the run folder: metrics.jsonl, checkpoints/
    seed: int  # its --seed is seed % 1000 (the demo corpus's too)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, shared_cache) -> DemoRun:
    """A shortened demo training, made once: 3 epochs of 2,000 posts with --amp and a fresh seed, the suite's longest
    run (about 2 minutes here). tests/test_train.py checks that it learns; tests/test_probe.py transfers its trunk.
    A test that uses it takes its seed (``request.node.test_seed``), so that a failure replays the same run."""
    from fastpretrain.cli import main  # here, not above: TRITON_INTERPRET must be set before torchvision imports

    seed = fresh_seed()
    folder = tmp_path_factory.mktemp("demo-run") / "run"
    assert main(["train", "--amp", "--demo-images", "2000", "--epochs", "3", "--output", str(folder),
                 "--log-interval", "10", "--seed", str(seed % 1000)]) == 0
    return DemoRun(folder, seed)


@pytest.fixture
def rng(seed) -> np.random.Generator:
    """A NumPy generator seeded with this test's seed."""
    return np.random.default_rng(seed)


@pytest.fixture
def py_rng(seed) -> random.Random:
    """A Python ``random.Random`` seeded with this test's seed."""
    return random.Random(seed)


@pytest.fixture
def gen(seed) -> torch.Generator:
    """A torch CPU generator seeded with this test's seed."""
    return torch.Generator().manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "test_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"{SEED_ENV}={seed} pytest '{item.nodeid}'"))
