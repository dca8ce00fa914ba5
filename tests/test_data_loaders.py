"""The sample stream and the train/eval loaders of both backends, on small corpora written here.

Each image is a flat colour (unique per sample) with a faint texture: the colour a batch shows identifies the
sample, so the labels, the order and the coverage of every batch are checked against the label index and
counts worked out here, and the texture makes different crops give different pixels (for exact resume).
"""

from __future__ import annotations

import io
import itertools
import os
import logging
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from fastpretrain import cpp_extension
from fastpretrain import log as fastpretrain_log
from fastpretrain.data import Batch, DataConfig, build_eval_loader, build_train_loader
from fastpretrain.data.loader import merge_states
from fastpretrain.data.decoders import resolve_data_backend
from fastpretrain.data.decoders import torch as torch_decoder
from fastpretrain.data.config import IMAGENET_MEAN, IMAGENET_STD
from fastpretrain.data.decoders.boxes import random_resized_boxes, sample_uniforms
from fastpretrain.formats.shards import ShardWriter
from fastpretrain.data.stream import gather_rows
from fastpretrain.errors import DataError, UserError
from fastpretrain.formats.labels import LabelIndex, label_index_path
from fastpretrain.formats.vocab import Vocab, VocabClass
from stats import binomial_range

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

BACKENDS = ["torch"]
try:
    import nvidia.dali  # noqa: F401

    BACKENDS.append("dali")
except ImportError:
    pass
# The region decoder needs libjpeg-turbo's headers to build (Debian's libjpeg62-turbo-dev, which `make` installs).
JPEG_HEADERS = Path("/usr/include/jpeglib.h").exists()

CPU = torch.device("cpu")
# The GPU decode paths (nvJPEG in the torch backend, DALI's mixed decoder) run where there is a GPU.
DEVICES = [pytest.param(CPU, id="cpu"),
           pytest.param(torch.device("cuda"), id="cuda",
                        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
LEVELS = (24, 88, 152, 216)  # 64 apart: JPEG keeps a flat colour within a few levels
WNIDS = [f"n{i:08d}" for i in range(6)]
VOCAB_HASH = Vocab.hash_of(WNIDS, "concrete-first", "3.0")




def colour(i: int) -> tuple[int, int, int]:
    return LEVELS[i % 4], LEVELS[(i // 4) % 4], LEVELS[(i // 16) % 4]


def textured(rng: np.random.Generator, rgb: tuple[int, int, int], height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8: the colour plus a +-14 smooth texture (crops differ, their mean stays near the colour)."""
    bumps = rng.integers(-14, 15, (3, 3, 1)).astype(np.float32)
    texture = np.asarray(Image.fromarray(((bumps + 14) * 9).astype(np.uint8)[..., 0]).resize((width, height), Image.BILINEAR))
    return np.clip(np.array(rgb, np.float32) + texture[..., None].astype(np.float32) / 9 - 14, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "JPEG", mode: str = "RGB", **options) -> bytes:
    if fmt == "JPEG":
        options.setdefault("quality", 95)
    out = io.BytesIO()
    Image.fromarray(array).convert(mode).save(out, format=fmt, **options)
    return out.getvalue()


@dataclass
class Corpus:
    shards: Path
    label_dir: Path
    vocab: Vocab
    rows: dict[str, list[int]]  # the label row of every sample in a shard's label index
    colours: dict[tuple[int, int, int], str]  # colour -> key, for samples with a decodable image
    order: list[str]  # every key in shard order
    seed: int  # the loaders' seed, fresh each run

    def usable(self) -> list[str]:
        """Keys that should come out: labeled, decodable, with json (in shard order)."""
        decodable = set(self.colours.values())
        return [k for k in self.order if self.rows.get(k) and k in decodable]

    def config(self, **overrides) -> DataConfig:
        settings = dict(shards=str(self.shards), label_dir=str(self.label_dir), batch_size=5, image_size=16,
                        workers=0, shuffle_buffer=8, resample="natural", seed=self.seed)
        settings.update(overrides)
        return DataConfig(**settings)


def make_vocab(rows: list[list[int]]) -> Vocab:
    """Counts by hand: images per class, and images with at least one class."""
    counts = [sum(c in row for row in rows) for c in range(len(WNIDS))]
    classes = [VocabClass(i, w, [w], counts[i]) for i, w in enumerate(WNIDS)]
    return Vocab(classes, "concrete-first", VOCAB_HASH, sum(1 for row in rows if row))


@dataclass
class Sample:
    """One sample as a corpus writes it: its shard ``files``, its ``row`` in the label index (None: the key is left
    out of the label index) and the colour its image ``shows`` (None: it must not decode)."""

    files: dict[str, bytes]
    row: list[int] | None
    shows: tuple[int, int, int] | None


def make_corpus(root: Path, rng: np.random.Generator, shards: int = 3, per_shard: int = 12, odd=None) -> Corpus:
    """``shards`` shards of ``per_shard`` textured JPEGs of random sizes (8 to 59 pixels a side);
    ``odd(shard, i, key, rgb)`` may replace a sample by a ``Sample`` (or return None to keep it)."""
    rows, colours, order, number = {}, {}, [], 0
    for s in range(shards):
        path = root / "train" / f"{s:05d}.tar"
        keys, index_rows = [], []
        with ShardWriter(path) as writer:
            for i in range(per_shard):
                key, rgb = f"{s:05d}{i:04d}", colour(number)
                number += 1
                row = sorted(set(rng.integers(0, len(WNIDS), int(rng.integers(0, 4))).tolist()))
                image = textured(rng, rgb, int(rng.integers(8, 60)), int(rng.integers(8, 60)))
                files, shown = {"jpg": encode(image), "json": b"{}"}, rgb
                if odd is not None and (replaced := odd(s, i, key, rgb)) is not None:
                    files, row, shown = replaced.files, replaced.row, replaced.shows
                writer.write(key, files)
                order.append(key)
                if shown is not None:
                    colours[shown] = key
                if row is not None:
                    keys.append(key)
                    index_rows.append(row)
                    rows[key] = row
        LabelIndex.from_rows(keys, index_rows, VOCAB_HASH).save(label_index_path(root / "labels", path))
    return Corpus(root / "train", root / "labels", make_vocab(list(rows.values())), rows, colours, order,
                  int(rng.integers(2**62)))


def identify(batch: Batch, corpus: Corpus) -> list[str]:
    """The key of each image of a batch, from its mean colour."""
    std = torch.tensor(IMAGENET_STD)[:, None, None] * 255
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None] * 255
    pixels = batch.images.float().cpu() * std + mean  # (B, 3, H, W)
    shown = pixels.mean(dim=(2, 3)).numpy()  # (B, 3)
    keys = []
    for rgb in shown:
        nearest = tuple(LEVELS[int(np.abs(np.array(LEVELS) - v).argmin())] for v in rgb)
        assert np.abs(np.array(nearest) - rgb).max() < 20, f"colour {rgb} is near no sample's"
        keys.append(corpus.colours[nearest])
    return keys


def skips_without_bad_data(corpus: Corpus) -> dict[str, int]:
    """The skip counts of a corpus without bad data. A reason appears once it has happened: a quarter of the
    samples are unlabeled, so 0.75^36 = 3e-5 of 36-sample corpora have none, and no entry."""
    unlabeled = sum(1 for k in corpus.order if not corpus.rows[k])
    return {"unlabeled": unlabeled} if unlabeled else {}


def check_batch(batch: Batch, corpus: Corpus, size: int, count: int, dtype=torch.float32, device=CPU) -> list[str]:
    """Shape, layout, dtype, device, and labels equal to the label index rows of the samples shown; their keys."""
    assert batch.images.shape == (count, 3, size, size) and batch.images.dtype == dtype
    assert {t.device.type for t in (batch.images, batch.labels, batch.offsets)} == {device.type}
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.labels.dtype == torch.int64 and batch.offsets.dtype == torch.int64
    keys = identify(batch, corpus)
    expected = [corpus.rows[k] for k in keys]
    assert batch.offsets.tolist() == np.cumsum([0] + [len(r) for r in expected]).tolist()
    assert batch.labels.tolist() == [c for r in expected for c in r]
    return keys


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_train_batches_are_full_labelled_and_cover_each_epoch(tmp_path, rng, backend, device):
    corpus = make_corpus(tmp_path, rng)
    cfg = corpus.config(backend=backend, batch_size=int(rng.integers(3, 8)))
    loader = build_train_loader(cfg, corpus.vocab, device, torch.float32)
    usable = corpus.usable()
    assert loader.batches_per_epoch == max(1, round(len(usable) / cfg.batch_size))
    seen: list[str] = []
    while len(seen) < 2 * len(usable) + cfg.batch_size:
        seen += check_batch(next(loader), corpus, cfg.image_size, cfg.batch_size, device=device)
    # Natural sampling: each epoch shows every usable sample exactly once, in a new order.
    first, second = seen[: len(usable)], seen[len(usable): 2 * len(usable)]
    assert sorted(first) == sorted(usable) and sorted(second) == sorted(usable) and first != second
    assert loader.epoch == len(seen) // len(usable)
    assert loader.skipped == skips_without_bad_data(corpus)
    loader.close()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_batches(tmp_path, rng, backend, device):
    corpus = make_corpus(tmp_path, rng, shards=1)
    loaders = {dtype: build_train_loader(corpus.config(backend=backend), corpus.vocab, device, dtype)
               for dtype in (torch.bfloat16, torch.float32)}
    half = next(loaders[torch.bfloat16])
    check_batch(half, corpus, 16, 5, dtype=torch.bfloat16, device=device)
    # Normalized in float32 and rounded once: the float32 batch of the same run, rounded.
    assert torch.equal(half.images, next(loaders[torch.float32]).images.to(torch.bfloat16))
    for loader in loaders.values():
        loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_yields_the_batches_of_the_uninterrupted_run(tmp_path, rng, backend):
    corpus = make_corpus(tmp_path, rng, per_shard=8)
    cfg = corpus.config(backend=backend, resample="sqrt", batch_size=4)
    run = build_train_loader(cfg, corpus.vocab, CPU, torch.float32)
    for _ in range(int(rng.integers(1, 8))):  # often past an epoch boundary (about 3 batches an epoch)
        next(run)
    state = run.state_dict()
    expected = [next(run) for _ in range(5)]
    run.close()

    resumed = build_train_loader(cfg, corpus.vocab, CPU, torch.float32)
    resumed.load_state_dict(state)
    assert resumed.places == {0: tuple(state["places"]["0"])}
    for want in expected:
        got = next(resumed)
        assert torch.equal(got.images, want.images)  # same samples, same crops, same flips
        assert torch.equal(got.labels, want.labels) and torch.equal(got.offsets, want.offsets)
    other = build_train_loader(corpus.config(backend=backend, seed=corpus.seed + 1), corpus.vocab, CPU, torch.float32)
    with pytest.raises(UserError, match="seed"):
        other.load_state_dict(state)


def test_torch_workers_give_the_same_batches_as_in_process(tmp_path, rng):
    corpus = make_corpus(tmp_path, rng, shards=2, per_shard=10)
    batches = {}
    for workers in (0, 2):
        loader = build_train_loader(corpus.config(workers=workers, backend="torch"), corpus.vocab, CPU, torch.float32)
        batches[workers] = [next(loader) for _ in range(6)]
        loader.close()
    for a, b in zip(batches[0], batches[2]):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def epoch_of_batches(loaders: list, epoch: int) -> list[list[tuple[int, int]]]:
    """Each loader's (epoch, plan position) of every image it yields until all its slots have left ``epoch``."""
    seen = []
    for loader in loaders:
        origins = []
        while loader.epoch <= epoch:
            origins += [tuple(o) for o in next(loader).origin.tolist()]
        seen.append(origins)
        loader.close()
    return seen


def test_slots_read_disjoint_shares_that_cover_the_epoch(tmp_path, rng):
    """Three readers (a world of 3, or of 1 with 3 accumulation steps) deal each epoch's plan: no position read twice,
    every position of the epoch read (the plan counted by hand from the loaders' stream)."""
    corpus = make_corpus(tmp_path, rng, shards=3, per_shard=12)
    cfg = corpus.config(backend="torch", batch_size=2, resample="sqrt")
    loaders = [build_train_loader(cfg, corpus.vocab, CPU, torch.float32, slots=[slot], num_slots=3) for slot in range(3)]
    plan_length = len(loaders[0].plans.stream.plan(0))
    seen = [[p for e, p in origins if e == 0] for origins in epoch_of_batches(loaders, 0)]
    everything = [p for origins in seen for p in origins]
    assert len(everything) == len(set(everything)) == plan_length
    assert [sorted(origins) for origins in seen] == [list(range(slot, plan_length, 3)) for slot in range(3)]
    with pytest.raises(UserError, match="fewer than one batch"):
        build_train_loader(corpus.config(batch_size=40), corpus.vocab, CPU, torch.float32, slots=[0], num_slots=100)


def test_one_process_of_two_slots_reads_what_two_processes_of_one_read(tmp_path, rng):
    """Gradient accumulation on one process (slots 0 and 1 in turn) sees the batches of a two-process world."""
    corpus = make_corpus(tmp_path, rng, shards=2, per_shard=12)
    cfg = corpus.config(backend="torch", batch_size=3)
    both = build_train_loader(cfg, corpus.vocab, CPU, torch.float32, slots=[0, 1], num_slots=2)
    apart = [build_train_loader(cfg, corpus.vocab, CPU, torch.float32, slots=[slot], num_slots=2) for slot in (0, 1)]
    for _ in range(7):  # past an epoch's end (about 3 steps an epoch)
        for slot in (0, 1):
            got, want = next(both), next(apart[slot])
            assert torch.equal(got.images, want.images) and np.array_equal(got.origin, want.origin)
    for loader in (both, *apart):
        loader.close()


@pytest.mark.parametrize("old, new", [(2, 1), (1, 3), (3, 2)])
def test_resume_on_another_world_size_reads_every_remaining_sample_once(tmp_path, rng, old, new):
    """Stopped after k steps on ``old`` readers (one with a bad sample, so places differ), resumed on ``new``: the
    positions read before and after the stop are each epoch's plan, exactly once."""
    def corrupt_one(s, i, key, rgb):
        return Sample({"jpg": b"\xff\xd8\xff garbage", "json": b"{}"}, [1], None) if (s, i) == (0, 3) else None

    corpus = make_corpus(tmp_path, rng, shards=3, per_shard=10, odd=corrupt_one)
    cfg = corpus.config(backend="torch", batch_size=2, max_bad_fraction=0.5)
    before = [build_train_loader(cfg, corpus.vocab, CPU, torch.float32, slots=[s], num_slots=old) for s in range(old)]
    steps = int(rng.integers(1, 12))  # an epoch is about 29 / (2 old) steps: sometimes past its end
    read = [tuple(o) for _ in range(steps) for loader in before for o in next(loader).origin.tolist()]
    state = merge_states([loader.state_dict() for loader in before])
    for loader in before:
        loader.close()
    after = [build_train_loader(cfg, corpus.vocab, CPU, torch.float32, slots=[s], num_slots=new) for s in range(new)]
    for loader in after:
        loader.load_state_dict(state)
    last_epoch = max(epoch for epoch, _ in read) + 1
    read += [o for origins in epoch_of_batches(after, last_epoch) for o in origins]
    stream = after[0].plans.stream
    bad = {p for p, sample in enumerate(stream.plan(0)) if corpus.order[sample] not in corpus.colours.values()}
    for epoch in range(last_epoch + 1):
        positions = sorted(p for e, p in read if e == epoch)
        expected = [p for p in range(len(stream.plan(epoch)))
                    if corpus.order[stream.plan(epoch)[p]] in corpus.colours.values()]
        assert positions == expected, (epoch, steps, bad)


def test_sqrt_resampling_emits_each_image_about_r_times(tmp_path, rng):
    """r(h) = max(1, sqrt(t / f(h))), t the head class's share; an image takes its classes' largest r."""
    corpus = make_corpus(tmp_path, rng, shards=2, per_shard=20)
    loader = build_train_loader(corpus.config(resample="sqrt"), corpus.vocab, CPU, torch.float32)
    counts, num_images = corpus.vocab.counts, corpus.vocab.num_images
    t = counts.max() / num_images
    expected = {}
    for key in corpus.usable():
        expected[key] = max(max(1.0, math.sqrt(t / (counts[c] / num_images))) for c in corpus.rows[key])
    keys = loader.plans.stream.table.keys
    epochs = 60
    totals = dict.fromkeys(expected, 0)
    for epoch in range(epochs):
        emitted = {}
        for i in loader.plans.stream.plan(epoch):
            emitted[str(keys[i])] = emitted.get(str(keys[i]), 0) + 1
        assert set(emitted) <= set(expected)
        for key, r in expected.items():
            assert math.floor(r) <= emitted.get(key, 0) <= math.ceil(r)
            totals[key] += emitted.get(key, 0)
    # The extra copies of an image over the epochs are Binomial(epochs, frac r): exact bounds, 1e-7 false alarms.
    r = np.array(list(expected.values()))
    low, high = binomial_range(epochs, r - np.floor(r), 1e-7 / len(r))
    extra = np.array(list(totals.values())) - epochs * np.floor(r).astype(np.int64)
    assert np.all((low <= extra) & (extra <= high)), (extra, low, high)
    assert loader.samples_per_epoch == pytest.approx(sum(expected.values()))


def test_windowed_shuffle_is_local_deterministic_and_new_each_epoch(tmp_path, rng):
    corpus = make_corpus(tmp_path, rng, shards=4, per_shard=16)
    window = int(rng.integers(2, 12))

    def stream(**overrides):
        cfg = corpus.config(**{"shuffle_buffer": window, **overrides})
        return build_train_loader(cfg, corpus.vocab, CPU, torch.float32).plans.stream

    a, b = stream(), stream()
    plans = [a.plan(e) for e in range(3)]
    np.testing.assert_array_equal(plans[0], b.plan(0))
    assert not np.array_equal(plans[0], plans[1])
    assert not np.array_equal(plans[0], stream(seed=corpus.seed + 1).plan(0))
    sequential = stream(shuffle_buffer=0)
    for epoch, plan in enumerate(plans):
        in_order = sequential.plan(epoch)  # the same shard order, samples in shard order
        assert sorted(in_order) == sorted(plan)
        assert (np.diff(in_order[np.isin(sequential.table.shard_of[in_order], [0])]) > 0).all()
        where = {int(s): p for p, s in enumerate(in_order)}
        displacement = np.array([abs(p - where[int(s)]) for p, s in enumerate(plan)])
        assert displacement.max() <= window and displacement.any()


GREY = (152, 152, 152)  # colour(42): no other sample of a 3 x 14 corpus shows it


def odd_samples(s: int, i: int, key: str, rgb):
    """Shard 0 holds one of each odd-but-real and each broken kind of sample; the rest are normal."""
    if s != 0:
        return None
    image = textured(np.random.default_rng(i), rgb, 40, 30)
    jpeg = encode(image)
    cases = {
        0: Sample({"jpg": encode(image, mode="CMYK"), "json": b"{}"}, [1], rgb),
        1: Sample({"jpg": encode(textured(np.random.default_rng(i), GREY, 30, 40), mode="L"), "json": b"{}"}, [2], GREY),
        2: Sample({"jpg": encode(image, progressive=True), "json": b"{}"}, [1], rgb),
        3: Sample({"jpg": encode(np.full((1, 1, 3), rgb, np.uint8)), "json": b"{}"}, [3], rgb),
        4: Sample({"jpg": encode(image, "PNG"), "json": b"{}"}, [4], rgb),
        5: Sample({"jpg": encode(image, "WEBP", lossless=True), "json": b"{}"}, [5], rgb),
        6: Sample({"jpg": jpeg[: len(jpeg) // 2], "json": b"{}"}, [1], None),  # truncated
        7: Sample({"jpg": b"<html>403 Forbidden</html>", "json": b"{}"}, [1], None),  # not an image
        8: Sample({"jpg": encode(textured(np.random.default_rng(i), rgb, 60, 60)), "json": b"{}"}, [2], None),  # too large
        9: Sample({"jpg": jpeg}, [2], None),  # no metadata
        10: Sample({"jpg": jpeg, "json": b"{}"}, None, None),  # not in the label index
        11: Sample({"jpg": bogus_sampling(jpeg), "json": b"{}"}, [3], None),  # a sound header, an undecodable body
        12: Sample({"jpg": jpeg, "txt": b"a caption #tag"}, [4], rgb),  # a .txt caption instead of a .json: usable
    }
    return cases.get(i)


def bogus_sampling(jpeg: bytes) -> bytes:
    """The JPEG with its first component's sampling factors zeroed in the frame header: every header parser
    reads it, every decoder refuses it (the case that makes a whole DALI batch fail)."""
    frame = jpeg.find(b"\xff\xc0")
    broken = bytearray(jpeg)
    broken[frame + 11] = 0x00  # marker (2), length (2), precision (1), height (2), width (2), count (1), id (1)
    return bytes(broken)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_data_is_skipped_counted_and_never_shortens_a_batch(tmp_path, rng, backend, device, caplog):
    corpus = make_corpus(tmp_path, rng, shards=3, per_shard=14, odd=odd_samples)
    # Shard 1 becomes unreadable; its label index says it held 14 samples.
    (corpus.shards / "00001.tar").write_bytes(rng.bytes(5000))
    (corpus.shards / "00001.idx").unlink()
    corpus.colours = {c: k for c, k in corpus.colours.items() if not k.startswith("00001")}
    good = corpus.usable()
    unlabeled = sum(1 for k in corpus.order if not k.startswith("00001") and corpus.rows.get(k) == [])

    # 59 x 59 is the largest normal image, 60 x 60 the bomb.
    cfg = corpus.config(backend=backend, max_bad_fraction=0.9, decode_limit_pixels=59 * 59, batch_size=4)
    caplog.set_level(logging.WARNING, logger="fastpretrain.data")
    loader = build_train_loader(cfg, corpus.vocab, device, torch.float32)
    seen = []
    while len(seen) < len(good) + 4:
        batch = next(loader)
        assert batch.images.shape[0] == 4
        seen += check_batch(batch, corpus, 16, 4, device=device)
    assert sorted(seen[: len(good)]) == sorted(good)
    expected = {"truncated": 1, "not_image": 1, "too_large": 1, "missing_metadata": 1, "missing_labels": 1,
                "decode_error": 1, "unreadable_shard": 14, "unlabeled": unlabeled}
    assert loader.skipped == {reason: n for reason, n in expected.items() if n}
    # One warning per reason and shard, naming the shard.
    warned = [r.getMessage() for r in caplog.records]
    for reason in ("truncated", "not_image", "too_large", "missing_metadata", "missing_labels", "decode_error"):
        assert sum(reason in m and "00000.tar" in m for m in warned) == 1, reason
    assert sum("unreadable_shard" in m and "00001.tar" in m for m in warned) == 1
    loader.close()

    with pytest.raises(DataError, match="00001.tar"):  # unreadable shard: over the limit before any decoding
        build_train_loader(corpus.config(backend=backend, max_bad_fraction=0.2), corpus.vocab, CPU, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_too_many_corrupt_images_stop_with_an_error_naming_the_shard(tmp_path, rng, backend):
    def corrupt_some(s, i, key, rgb):
        return Sample({"jpg": b"\xff\xd8\xff garbage", "json": b"{}"}, [1], None) if s == 1 and i % 2 else None

    corpus = make_corpus(tmp_path, rng, shards=3, per_shard=10, odd=corrupt_some)
    loader = build_train_loader(corpus.config(backend=backend, max_bad_fraction=0.1), corpus.vocab, CPU,
                                torch.float32)
    with pytest.raises(DataError, match="00001.tar"):
        for _ in range(20):
            next(loader)
    loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_loader_shows_every_labeled_sample_once_in_shard_order(tmp_path, rng, backend):
    corpus = make_corpus(tmp_path, rng)
    cfg = corpus.config(backend=backend, batch_size=int(rng.integers(3, 9)))
    loader = build_eval_loader(cfg, corpus.vocab, CPU, torch.float32)
    usable = corpus.usable()
    for _ in range(2):  # each iteration is a whole pass
        batches = list(loader)
        assert len(batches) == len(loader) == math.ceil(len(usable) / cfg.batch_size)
        last = len(usable) - cfg.batch_size * (len(batches) - 1)
        sizes = [cfg.batch_size] * (len(batches) - 1) + [last]
        assert [k for b, n in zip(batches, sizes) for k in check_batch(b, corpus, 16, n)] == usable
    assert loader.skipped == skips_without_bad_data(corpus)


STD_LEVELS, MEAN_LEVELS = np.array(IMAGENET_STD) * 255, np.array(IMAGENET_MEAN) * 255


def photo_corpus(tmp_path: Path, rng: np.random.Generator, count: int) -> Corpus:
    """``count`` busier pictures than the flat colours, some turned by EXIF, in one shard."""

    def photo(s, i, key, rgb):
        image = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
            (int(rng.integers(40, 120)), int(rng.integers(40, 120))), Image.BICUBIC))
        exif = Image.Exif()
        exif[0x0112] = int(rng.choice([1, 1, 3, 6, 8]))
        return Sample({"jpg": encode(image, exif=exif), "json": b"{}"}, [1], rgb)

    return make_corpus(tmp_path, rng, shards=1, per_shard=count, odd=photo)


def pil_reference(jpegs: list[bytes], seed: int, size: int) -> tuple[torch.Tensor, list]:
    """(B, S, S, 3) float32 normalized crops by PIL of the boxes epoch 0 draws at positions 0 .. B-1, and those
    boxes: the same box, an antialiased bilinear resize, the same flip, the same normalization."""
    crops, boxes = [], []
    for position, data in enumerate(jpegs):
        picture = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        box = random_resized_boxes(np.array([picture.width]), np.array([picture.height]),
                                   sample_uniforms(seed, 0, np.array([position])))
        left, top, w, h = int(box.left[0]), int(box.top[0]), int(box.width[0]), int(box.height[0])
        crop = np.asarray(picture.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h)),
                          dtype=np.float64)  # (S, S, 3); PIL's bilinear widens its filter when shrinking
        crops.append(crop[:, ::-1] if box.flip[0] else crop)
        boxes.append((left, top, w, h, bool(box.flip[0])))
    return torch.from_numpy((np.stack(crops) - MEAN_LEVELS) / STD_LEVELS).float(), boxes


def mean_level_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean absolute difference of two normalized (B, S, S, 3) batches, in 0-255 levels."""
    return float(((got - reference) * torch.from_numpy(STD_LEVELS).float()).abs().mean())


def shard_jpegs(corpus: Corpus, samples) -> list[bytes]:
    with tarfile.open(corpus.shards / "00000.tar") as tar:
        return [tar.extractfile(f"{corpus.order[int(sample)]}.jpg").read() for sample in samples]


@pytest.mark.parametrize("device", DEVICES)
def test_backends_cut_the_same_pixels_as_pil_and_each_other_on_the_same_box(tmp_path, rng, device):
    """PIL as the reference, and each backend against the others on the same batch."""
    corpus = photo_corpus(tmp_path, rng, count=12)
    size, count = 24, 12
    got = {}
    for backend in BACKENDS:
        cfg = corpus.config(backend=backend, batch_size=count, image_size=size, shuffle_buffer=0)
        loader = build_train_loader(cfg, corpus.vocab, device, torch.float32)
        got[backend] = next(loader).images.permute(0, 2, 3, 1).cpu()  # (B, S, S, 3)
        samples = loader.plans.stream.plan(0)[:count]  # no bad sample: batch 0 is positions 0 .. B-1 of epoch 0
        loader.close()
    reference, _ = pil_reference(shard_jpegs(corpus, samples), corpus.seed, size)
    # Decoders (IDCT, chroma upsampling) and resamplers differ by rounding, not by content: a box off by a few
    # pixels, a missed flip or a missed EXIF turn costs tens of levels on these pictures.
    for backend, images in got.items():
        assert mean_level_error(images, reference) < 3.0, backend
    for first, second in itertools.combinations(got, 2):
        assert mean_level_error(got[first], got[second]) < 3.0, (first, second)


def test_dali_finished_graph_runs_on_the_cpu_like_pil(tmp_path, rng):
    """The GPU graph's resize, mirror and normalize (with their arguments), placed on DALI's CPU backend."""
    if "dali" not in BACKENDS:
        pytest.skip("DALI not installed")
    from fastpretrain.data.decoders.dali import image_pipeline

    count, size = 8, 24
    corpus = photo_corpus(tmp_path, rng, count=count)
    jpegs = shard_jpegs(corpus, range(count))
    reference, boxes = pil_reference(jpegs, corpus.seed, size)
    pipe = image_pipeline(count, 2, None, size, IMAGENET_MEAN, IMAGENET_STD, half=False, hw_decoder_load=0.75,
                          finish=True)
    pipe.build()
    pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8) for data in jpegs])
    pipe.feed_input("anchor", [np.array(box[:2], dtype=np.float32) for box in boxes])
    pipe.feed_input("shape", [np.array(box[2:4], dtype=np.float32) for box in boxes])
    pipe.feed_input("mirror", [np.array(box[4], dtype=np.int32) for box in boxes])
    (images,) = pipe.run()
    got = torch.from_numpy(np.stack([np.asarray(image) for image in images]))  # (B, S, S, 3)
    assert got.shape == (count, size, size, 3) and got.dtype == torch.float32
    assert mean_level_error(got, reference) < 3.0


def test_dali_gpu_pipeline_definition():
    """The GPU pipeline cannot run here: check its graph, operator by operator, without building it."""
    if "dali" not in BACKENDS:
        pytest.skip("DALI not installed")
    from nvidia.dali import types

    from fastpretrain.data.decoders.dali import GPU_DECODER_ARGS, image_pipeline

    pipe = image_pipeline(256, 8, 0, 224, IMAGENET_MEAN, IMAGENET_STD, half=True, hw_decoder_load=0.75)
    pipe._build_graph()  # DALI's own graph construction (what build() does before touching the device)
    ops = [(inst._op.__class__.__name__, inst._op.device, inst._op._init_args) for inst in pipe._ops]
    assert [name for name, _, _ in ops] == ["ExternalSource"] * 3 + ["ImageSlice", "Resize", "ExternalSource",
                                                                     "CropMirrorNormalize"]
    assert {device for name, device, _ in ops if name == "ExternalSource"} == {"cpu"}
    _, device, decode = ops[3]
    assert device == "mixed" and decode["hw_decoder_load"] == 0.75 and decode["output_type"] == types.RGB
    assert decode["axis_names"] == "WH" and not decode["normalized_anchor"] and not decode["normalized_shape"]
    assert all(decode[k] == v for k, v in GPU_DECODER_ARGS.items())
    _, device, resize = ops[4]
    assert device == "gpu" and resize["size"] == [224, 224] and resize["antialias"]
    _, device, normalize = ops[6]
    assert device == "gpu" and normalize["dtype"] == types.FLOAT16 and normalize["output_layout"] == "HWC"
    assert normalize["mean"] == pytest.approx([255 * m for m in IMAGENET_MEAN])
    assert normalize["std"] == pytest.approx([255 * s for s in IMAGENET_STD])
    assert pipe.device_id == 0 and pipe.max_batch_size == 256 and pipe.num_threads == 8

    cpu = image_pipeline(8, 2, None, 64, IMAGENET_MEAN, IMAGENET_STD, half=False, hw_decoder_load=0.75)
    cpu._build_graph()
    decode = next(inst._op for inst in cpu._ops if inst._op.__class__.__name__ == "ImageSlice")
    assert decode.device == "cpu" and "hw_decoder_load" not in decode._init_args


def test_label_index_of_another_vocabulary_is_refused(tmp_path, rng):
    corpus = make_corpus(tmp_path, rng, shards=1)
    other = make_vocab(list(corpus.rows.values()))
    other.content_hash = Vocab.hash_of(WNIDS[::-1], "concrete-first", "3.0")
    with pytest.raises(UserError, match="another vocabulary"):
        build_train_loader(corpus.config(), other, CPU, torch.float32)


def test_label_outside_the_vocabulary_is_refused_naming_the_shard(tmp_path, rng):
    corpus = make_corpus(tmp_path, rng, shards=2)
    bad_shard = corpus.shards / "00001.tar"
    index = LabelIndex.load(label_index_path(corpus.label_dir, bad_shard))
    index.labels[-1] = len(WNIDS)  # one past the last class
    index.save(label_index_path(corpus.label_dir, bad_shard))
    with pytest.raises(DataError, match=f"00001.tar names class {len(WNIDS)}.* {len(WNIDS)} classes"):
        build_train_loader(corpus.config(), corpus.vocab, CPU, torch.float32)


def test_missing_label_indexes_count_as_bad_samples(tmp_path, rng):
    corpus = make_corpus(tmp_path, rng, shards=2)
    label_index_path(corpus.label_dir, corpus.shards / "00001.tar").unlink()
    loader = build_train_loader(corpus.config(max_bad_fraction=0.6), corpus.vocab, CPU, torch.float32)
    assert loader.skipped["missing_labels"] == 12
    with pytest.raises(DataError, match="00001.tar"):
        build_train_loader(corpus.config(), corpus.vocab, CPU, torch.float32)


@pytest.mark.parametrize("field, value", [
    ("backend", "opencv"), ("batch_size", 0), ("image_size", 4), ("workers", -1), ("shuffle_buffer", -1),
    ("resample", "log"), ("resample_t", 0.0), ("max_bad_fraction", 1.5), ("decode_limit_pixels", 0),
    ("crop_scale", (0.5, 0.2)), ("crop_ratio", (0.0, 1.0)), ("seed", 1.5), ("shards", []), ("label_dir", ""),
])
def test_config_names_the_bad_field(field, value):
    settings = {"shards": "data/", "label_dir": "labels/", field: value}
    with pytest.raises(UserError, match=f"data.{field}"):
        DataConfig(**settings)


def test_auto_backend_is_the_fastest_where_it_runs_and_says_why(caplog, monkeypatch):
    """On a CPU the torch backend (measured faster there); on a GPU DALI when it imports, else torch."""
    caplog.set_level(logging.INFO, logger="fastpretrain.data")
    monkeypatch.setattr(fastpretrain_log, "_said", set())
    assert resolve_data_backend("auto", CPU) == resolve_data_backend("auto", CPU) == "torch"
    on_gpu = resolve_data_backend("auto", torch.device("cuda"))  # only the choice: nothing runs on the device
    assert on_gpu == ("dali" if "dali" in BACKENDS else "torch")
    messages = [r.getMessage() for r in caplog.records if "data backend" in r.getMessage()]
    assert len(messages) == 2 and "fastest on CPUs" in messages[0] and on_gpu in messages[1]
    assert resolve_data_backend("dali", CPU) == "dali"


def test_region_decoder_builds_where_libjpeg_is():
    if not JPEG_HEADERS:
        pytest.skip("no libjpeg-turbo headers on this machine")
    assert hasattr(torch_decoder.region_decoder(), "decode_region")


def test_cpu_crops_are_the_same_with_the_region_decoder_or_without(tmp_path, rng, monkeypatch, caplog):
    """The torch backend on the CPU decodes plain JPEGs in the box's region only: the same pixels as the box of the
    full decode, so the batches are equal with the region decoder and without it (then: one warning, full decodes)."""
    if not JPEG_HEADERS:
        pytest.skip("no libjpeg-turbo headers on this machine")
    corpus = photo_corpus(tmp_path, rng, count=12)  # some turned by EXIF: those are decoded whole either way
    cfg = corpus.config(backend="torch", batch_size=12, image_size=24)
    calls = []
    decoder = torch_decoder.region_decoder()
    monkeypatch.setattr(torch_decoder, "region_decoder", lambda: calls.append(1) or decoder)
    with_region = next(build_train_loader(cfg, corpus.vocab, CPU, torch.float32))
    assert len(calls) > 1  # once at start, then per upright JPEG (workers=0: in this process)

    monkeypatch.undo()
    monkeypatch.setattr(cpp_extension, "_modules", {})
    monkeypatch.setattr(cpp_extension, "_failures", {"jpeg": "cannot build the C++ extension: jpeglib.h not found"})
    monkeypatch.setattr(fastpretrain_log, "_said", set())
    caplog.set_level(logging.WARNING, logger="fastpretrain")
    whole = next(build_train_loader(cfg, corpus.vocab, CPU, torch.float32))
    warned = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert len(warned) == 1 and "jpeglib.h not found; falling back to torchvision's full decode" in warned[0], warned
    assert torch.equal(with_region.images, whole.images) and torch.equal(with_region.labels, whole.labels)


def test_too_little_shared_memory_is_a_one_line_user_error(tmp_path, rng, monkeypatch):
    """The CPU workers' crop slots: (workers x prefetch + 2) chunks of (batch, S, S, 3) bytes, worked out here."""
    corpus = make_corpus(tmp_path, rng, shards=1)
    cfg = corpus.config(backend="torch", workers=2, prefetch_batches=2, batch_size=5, image_size=16)
    needed = (2 * 2 + 2) * 5 * 16 * 16 * 3
    real_statvfs = torch_decoder.os.statvfs
    for free, refused in ((needed - 1, True), (needed, False)):
        def statvfs(path, free=free):
            stats = real_statvfs(path)
            return os.statvfs_result((stats.f_bsize, 1, stats.f_blocks, free, free) + tuple(stats)[5:])

        monkeypatch.setattr(torch_decoder.os, "statvfs", statvfs)
        loader = build_train_loader(cfg, corpus.vocab, CPU, torch.float32)
        if refused:
            message = (f"needs {needed / 2**20:.3g} MiB of shared memory for its crops and /dev/shm has "
                       f"{free / 2**20:.3g} MiB free: .* lower --workers or --batch-size$")
            with pytest.raises(UserError, match=message):
                next(loader)
        else:
            next(loader)
        loader.close()


def test_gather_rows_against_a_loop(rng):
    lengths = rng.integers(0, 5, 30)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = rng.integers(0, 100, offsets[-1])
    rows = rng.integers(-1, 30, 50)
    got, got_offsets = gather_rows(offsets, values, rows)
    expected = [values[offsets[r]: offsets[r + 1]] if r >= 0 else [] for r in rows]
    assert got.tolist() == [v for row in expected for v in row]
    assert got_offsets.tolist() == np.cumsum([0] + [len(r) for r in expected]).tolist()
