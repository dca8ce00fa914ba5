"""Fixtures of the trainer's fault tests: the demo corpus and the uninterrupted reference run, each made once."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from trainer_runs import DEMO_IMAGES, REFERENCE_ARGS, Demo

from fastpretrain.cpp_extension import EXTENSIONS, ExtensionUnavailable, load_extension
from fastpretrain.demo import prepare_demo


@pytest.fixture(scope="session")
def demo(shared_cache) -> Demo:
    """The demo corpus, made once per session, and the C++ extensions built: on a fresh machine the first run would
    otherwise spend minutes compiling them inside a test's time limit (later processes load the cached library)."""
    for kind in EXTENSIONS:
        with contextlib.suppress(ExtensionUnavailable):  # then every run falls back, and says so
            load_extension(kind)
    paths = prepare_demo(DEMO_IMAGES, workers=2)  # into the session's cache (tests/conftest.py)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # lr 0.02: the demo's 0.2 on batches of 6 sends the loss to 40, and a non-finite streak would end a run early.
    flags = ["--recipe", "demo", "--data", str(paths.train), "--vocab", str(paths.vocab), "--batch-size", "6",
             "--img-size", "32", "--workers", "0", "--data-backend", "torch", "--lr", "0.02", "--log-interval", "1"]
    return Demo(env, flags)


@pytest.fixture(scope="session")
def reference_run(demo, tmp_path_factory) -> Path:
    """The reference run, uninterrupted, made once per session."""
    run = tmp_path_factory.mktemp("faults-reference") / "run"
    result = demo.run(run, *REFERENCE_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return run
