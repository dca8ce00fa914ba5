"""Resampling: replication factors against float64 scalar math, emitted copies against r within sampling error,
and draws that every process, rank and resume agrees on."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from fastpretrain.formats.labels import LabelIndex
from fastpretrain.hashtags.resample import (
    RESAMPLE_MODES,
    class_replication,
    copies,
    epoch_length,
    image_replication,
    uniforms,
)

from stats import binomial_range

FALSE_ALARM = 1e-7  # the chance that a statistical check below fails on correct code, per test




def reference_class_r(counts: list[int], num_images: int, mode: str, t: float | None) -> list[float]:
    """The paper's formula, one class at a time in Python floats."""
    if t is None:
        t = max(counts) / num_images
    phi = {"natural": lambda x: 1.0, "sqrt": math.sqrt, "uniform": lambda x: x}[mode]
    return [1.0 if c == 0 else max(1.0, phi(t / (c / num_images))) for c in counts]


@pytest.mark.parametrize("mode", RESAMPLE_MODES)
@pytest.mark.parametrize("t", [None, 0.003, 0.5])
def test_class_replication_matches_the_formula(rng, mode, t):
    num_images = int(rng.integers(1000, 100000))
    counts = rng.integers(0, num_images // 3, size=int(rng.integers(1, 400)))
    counts[0] = max(counts[0], 1)  # at least one class has images, so the default t exists
    got = class_replication(counts, num_images, mode, t)
    assert got.dtype == np.float64 and got.shape == counts.shape
    np.testing.assert_allclose(got, reference_class_r(counts.tolist(), num_images, mode, t), rtol=1e-12)


def test_default_t_gives_square_root_and_flat_class_frequencies():
    counts = np.array([10000, 2500, 100, 1])
    num_images = 10000
    sqrt_r = class_replication(counts, num_images, "sqrt")
    uniform_r = class_replication(counts, num_images, "uniform")
    # Emitted images per class: proportional to sqrt(count) under sqrt, equal under uniform (worked by hand).
    np.testing.assert_allclose(counts * sqrt_r, [10000, 5000, 1000, 100])
    np.testing.assert_allclose(counts * uniform_r, [10000] * 4)
    np.testing.assert_array_equal(class_replication(counts, num_images, "natural"), [1, 1, 1, 1])


def test_class_replication_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        class_replication(np.array([1, 2]), 10, "log")
    with pytest.raises(ValueError, match="t must be"):
        class_replication(np.array([1, 2]), 10, "sqrt", t=0.0)
    with pytest.raises(ValueError, match="num_images"):
        class_replication(np.array([1, 2]), 0)
    with pytest.raises(ValueError, match="counts"):
        class_replication(np.array([1, 20]), 10)
    with pytest.raises(ValueError, match="integer"):
        class_replication(np.array([1.5, 2.0]), 10)


def test_image_replication_is_the_max_over_labels_and_zero_when_unlabeled(rng):
    class_r = rng.uniform(1.0, 30.0, size=50)
    rows = [rng.choice(50, size=rng.integers(0, 5), replace=False).tolist() for _ in range(300)]
    index = LabelIndex.from_rows([str(i) for i in range(300)], rows, "h")
    got = image_replication(class_r, index.labels, index.offsets)
    expected = [max((class_r[c] for c in row), default=0.0) for row in rows]
    np.testing.assert_array_equal(got, expected)
    assert image_replication(class_r, np.zeros(0, np.int32), np.zeros(4, np.int64)).tolist() == [0.0] * 3
    assert epoch_length(got) == pytest.approx(sum(expected))


def test_copies_are_floor_or_floor_plus_one_and_sum_to_r_within_sampling_error(rng):
    n = 20000
    r = rng.uniform(0.0, 6.0, size=n)
    r[:100] = 0.0  # excluded images are never emitted
    r[100:200] = np.floor(r[100:200])  # whole factors are emitted exactly that often
    keys = [f"{i:08d}" for i in range(n)]
    got = copies(r, seed=int(rng.integers(2**31)), epoch=3, keys=keys)
    assert got.dtype == np.int64
    assert np.all((got == np.floor(r)) | (got == np.floor(r) + 1))
    assert np.all(got[:100] == 0) and np.all(got[100:200] == r[100:200])
    frac = r - np.floor(r)
    sigma = math.sqrt(float(np.sum(frac * (1 - frac))))
    assert abs(got.sum() - r.sum()) < 5 * sigma


def test_each_key_is_emitted_its_fraction_of_the_epochs(rng):
    """Over epochs one image's extra copy comes with probability frac(r): the draw is fresh per epoch."""
    fractions = np.array([0.05, 0.3, 0.5, 0.77, 0.95])
    r = 2.0 + fractions
    keys = [f"key-{int(rng.integers(10**9))}-{i}" for i in range(len(r))]
    seed = int(rng.integers(2**31))
    epochs = 3000
    extra = np.stack([copies(r, seed, epoch, keys) - 2 for epoch in range(epochs)])  # (E, 5)
    low, high = binomial_range(epochs, fractions, FALSE_ALARM / len(fractions))
    # (5 standard deviations of a normal would fail 4e-6 of runs: p = 0.05 and 0.95 have heavier tails.)
    assert np.all((low <= extra.sum(axis=0)) & (extra.sum(axis=0) <= high)), (extra.sum(axis=0), low, high)


def test_draw_depends_on_key_not_on_position_and_changes_with_seed_and_epoch(rng):
    keys = [f"{int(k):012d}" for k in rng.integers(0, 10**12, size=2000)]
    u = uniforms(7, 1, keys)
    order = rng.permutation(len(keys))
    np.testing.assert_array_equal(uniforms(7, 1, [keys[i] for i in order]), u[order])  # any rank's subset agrees
    assert np.mean(uniforms(7, 2, keys) == u) < 0.01
    assert np.mean(uniforms(8, 1, keys) == u) < 0.01
    assert 0.0 <= u.min() and u.max() < 1.0
    # Uniform: each tenth of [0, 1) holds about a tenth of the draws (each count is Binomial(2000, 0.1)).
    histogram = np.bincount((u * 10).astype(int), minlength=10)
    low, high = binomial_range(len(keys), np.full(10, 0.1), FALSE_ALARM / 10)
    assert np.all((low <= histogram) & (histogram <= high)), (histogram, low, high)


def test_draw_is_the_same_in_another_process_with_another_hash_seed(rng):
    keys = [f"{int(k)}" for k in rng.integers(0, 10**9, size=50)]
    r = rng.uniform(0.0, 3.0, size=50)
    seed, epoch = int(rng.integers(2**31)), int(rng.integers(100))
    program = (
        "import sys, numpy as np\n"
        "from fastpretrain.hashtags.resample import copies\n"
        f"keys = {keys!r}\n"
        f"r = np.array({r.tolist()!r})\n"
        f"sys.stdout.write(' '.join(map(str, copies(r, {seed}, {epoch}, keys))))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": str(int(rng.integers(1, 2**31)))}
    out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(c) for c in copies(r, seed, epoch, keys)]


def test_copies_rejects_mismatched_or_negative_factors():
    with pytest.raises(ValueError, match="keys"):
        copies(np.ones(3), 0, 0, ["a", "b"])
    with pytest.raises(ValueError, match=">= 0"):
        copies(np.array([1.0, -0.5]), 0, 0, ["a", "b"])
    with pytest.raises(ValueError, match="finite"):
        copies(np.array([np.inf]), 0, 0, ["a"])


def test_resampling_frequencies_follow_image_replication(rng):
    """End to end from class counts: each image's mean copies over epochs is its r(I)."""
    classes, n = 6, 400
    rows = [rng.choice(classes, size=rng.integers(0, 3), replace=False).tolist() for _ in range(n)]
    index = LabelIndex.from_rows([f"im{i}" for i in range(n)], rows, "h")
    labeled = int(np.count_nonzero(np.diff(index.offsets)))
    counts = np.bincount(index.labels, minlength=classes)
    r_image = image_replication(class_replication(counts, labeled, "sqrt"), index.labels, index.offsets)
    epochs = 400
    seed = int(rng.integers(2**31))
    total = sum(copies(r_image, seed, e, index.keys.tolist()) for e in range(epochs))  # (n,)
    whole = np.floor(r_image)
    # The extra copies of an image are Binomial(epochs, frac(r)); exact bounds, as frac(r) is often tiny
    # (5 standard deviations of a normal failed 1.4e-3 of runs, 2.7e-3 measured on one corpus).
    low, high = binomial_range(epochs, r_image - whole, FALSE_ALARM / n)
    extra = total - epochs * whole.astype(np.int64)  # (n,)
    assert np.all((low <= extra) & (extra <= high)), np.flatnonzero((extra < low) | (extra > high))
