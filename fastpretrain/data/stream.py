"""The sample stream: which sample comes next, on which rank, in which epoch (the loaders are in loader.py).

Everything that decides the order is computed up front from static data (shard indexes, label indexes,
the vocabulary), never from what decoding finds:

- rank split: rank ``r`` of ``W`` owns shards ``r, r + W, ...`` (of the sorted list), for the whole run;
- epoch plan: its shards in an order drawn from ``(seed, epoch)``, each sample repeated ``copies`` times
  (``fastpretrain.hashtags.resample``: sqrt resampling, unlabeled samples 0 times), then a windowed shuffle:
  sample ``i`` of that sequence goes to the rank of ``i + shuffle_buffer * u_i``, ``u_i`` uniform. Like a
  shuffle buffer of that size, it mixes neighbouring shards and needs to read at most that far ahead; unlike
  one, it is a single vectorized argsort.
- position: the stream's state is ``(epoch, position in that epoch's plan)``.

A bad image found while decoding is dropped from the batch and the batch is filled from the next samples,
so batch ``k`` is always the same ``B`` good samples: a resumed run regenerates the plan, starts at the saved
position and yields exactly the batches of the uninterrupted one (crop boxes are a function of the position).

Startup cost: one pass over each shard's index and label index (no image is read), and per epoch one BLAKE2b
hash per sample for the resampling draw (about 1 us each).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fastpretrain.formats.shards import load_index
from fastpretrain.errors import DataError, UserError
from fastpretrain.formats.labels import LabelIndex, label_index_path
from fastpretrain.hashtags.resample import copies

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fastpretrain.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the first one a sample has is its image
NOT_BAD = frozenset({"unlabeled"})  # skipped, but not bad data: does not count against max_bad_fraction
STATE_FORMAT = 1


# ----------------------------------------------------------------------------------------------------
# What is known before reading any image


def gather_rows(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``rows`` of the CSR matrix ``(offsets, values)`` as a new CSR pair; a row of -1 is empty.

    ``offsets`` (R+1,), ``values`` (nnz,), ``rows`` (n,) -> ``(values (m,), offsets (n+1,) int64)``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    valid = rows >= 0
    starts = np.zeros(len(rows), dtype=np.int64)  # (n,)
    lengths = np.zeros(len(rows), dtype=np.int64)
    starts[valid] = offsets[rows[valid]]
    lengths[valid] = offsets[rows[valid] + 1] - starts[valid]
    out_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out_offsets[1:])
    # Element j of row i sits at offsets[rows[i]] + j: shift each row's output range by its source start.
    source = np.repeat(starts - out_offsets[:-1], lengths) + np.arange(out_offsets[-1])
    return values[source], out_offsets


@dataclass
class StaticSkip:
    """Samples excluded before decoding: ``count`` of them in shard ``shard`` for ``reason``."""

    reason: str
    shard: int
    count: int
    detail: str


@dataclass
class SampleTable:
    """All samples of a list of shards, numbered globally in shard order.

    ``starts`` (S+1,): shard ``s`` holds samples ``starts[s]:starts[s+1]``; ``shard_of``, ``keys``,
    ``image_offset``, ``image_size``, ``usable`` are (N,); the labels are CSR ``label_offsets`` (N+1,),
    ``labels`` (nnz,) int32. A sample is usable when it has an image, its metadata (a ``.json`` or a ``.txt``
    caption, as img2dataset writes them) and at least one label.
    """

    paths: list[Path]
    starts: np.ndarray
    shard_of: np.ndarray
    keys: np.ndarray
    image_offset: np.ndarray
    image_size: np.ndarray
    label_offsets: np.ndarray
    labels: np.ndarray
    usable: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def labels_of(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The labels of ``samples`` (n,) as CSR: ``(labels (nnz,) int64, offsets (n+1,) int64)``."""
        labels, offsets = gather_rows(self.label_offsets, self.labels, samples)
        return labels.astype(np.int64), offsets

    @classmethod
    def of_shard(cls, path: Path, keys: np.ndarray, image_offset: np.ndarray, image_size: np.ndarray,
                 label_offsets: np.ndarray, labels: np.ndarray, usable: np.ndarray) -> SampleTable:
        """The table of one shard's samples."""
        n = len(keys)
        return cls([path], np.array([0, n], dtype=np.int64), np.zeros(n, dtype=np.int32), keys, image_offset,
                   image_size, label_offsets, labels.astype(np.int32), usable)

    @classmethod
    def concat(cls, tables: list[SampleTable]) -> SampleTable:
        """One table of several, their shards and samples numbered on in order."""
        starts = np.zeros(sum(len(t.paths) for t in tables) + 1, dtype=np.int64)
        np.cumsum([n for t in tables for n in np.diff(t.starts)], out=starts[1:])
        label_offsets = np.zeros(starts[-1] + 1, dtype=np.int64)
        np.cumsum(np.concatenate([np.diff(t.label_offsets) for t in tables]), out=label_offsets[1:])
        return cls(
            paths=[path for t in tables for path in t.paths],
            starts=starts,
            shard_of=np.repeat(np.arange(len(starts) - 1, dtype=np.int32), np.diff(starts)),
            keys=np.concatenate([t.keys for t in tables]),
            image_offset=np.concatenate([t.image_offset for t in tables]),
            image_size=np.concatenate([t.image_size for t in tables]),
            label_offsets=label_offsets,
            labels=np.concatenate([t.labels for t in tables]).astype(np.int32),
            usable=np.concatenate([t.usable for t in tables]),
        )


def load_table(paths: list[Path], label_dir: str | os.PathLike, vocab_hash: str) -> tuple[SampleTable, list[StaticSkip]]:
    """Read the shard indexes and label indexes of ``paths``; UserError if a label index is of another vocabulary."""
    loaded = [_load_shard(shard, path, label_dir, vocab_hash) for shard, path in enumerate(paths)]
    return SampleTable.concat([table for table, _ in loaded]), [skip for _, skips in loaded for skip in skips]


def _load_shard(shard: int, path: Path, label_dir: str | os.PathLike, vocab_hash: str) -> tuple[SampleTable, list[StaticSkip]]:
    """Shard number ``shard``'s samples, and what is excluded of them before decoding."""
    label_file = label_index_path(label_dir, path)
    try:
        label_index: LabelIndex | None = LabelIndex.load(label_file)
    except DataError as e:
        label_index, label_problem = None, str(e)
    if label_index is not None and label_index.vocab_hash != vocab_hash:
        raise UserError(
            f"label index {label_file} was made with another vocabulary (hash {label_index.vocab_hash[:12]}, "
            f"the vocabulary's is {vocab_hash[:12]}): relabel the shards with `fastpretrain vocab label`"
        )
    try:
        index = load_index(path)
    except DataError as e:
        lost = len(label_index) if label_index is not None else 0
        none = np.zeros(0, dtype=np.int64)
        table = SampleTable.of_shard(path, np.zeros(0, dtype=str), none, none, np.zeros(1, np.int64), none,
                                     np.zeros(0, dtype=bool))
        return table, [StaticSkip("unreadable_shard", shard, lost, str(e))]

    n = len(index)
    skips: list[StaticSkip] = []
    missing_labels_detail = "key not in the label index"
    if label_index is None:
        rows = np.full(n, -1, dtype=np.int64)
        missing_labels_detail = label_problem
        label_index = LabelIndex.from_rows([], [], vocab_hash)
    elif len(label_index) == n and np.array_equal(label_index.keys, index.keys):
        rows = np.arange(n, dtype=np.int64)
    else:
        by_key = label_index.rows_by_key()
        rows = np.array([by_key.get(str(key), -1) for key in index.keys], dtype=np.int64)
        lost = len(label_index) - len(np.unique(rows[rows >= 0]))
        if lost > 0:  # e.g. a truncated shard
            skips.append(StaticSkip("missing_in_shard", shard, lost, f"{lost} samples of {label_file} not in the shard"))

    image_offset = np.full(n, -1, dtype=np.int64)
    image_size = np.zeros(n, dtype=np.int64)
    has_metadata = np.zeros(n, dtype=bool)
    for i, members in enumerate(index.members):
        ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        if ext is not None:
            image_offset[i], image_size[i] = members[ext]
        has_metadata[i] = "json" in members or "txt" in members
    labels, label_offsets = gather_rows(label_index.offsets, label_index.labels, rows)
    has_labels = np.diff(label_offsets) > 0
    # Each excluded sample is counted once, under the first of these reasons that applies.
    excluded = np.zeros(n, dtype=bool)
    for reason, applies, detail in (
        ("missing_image", image_offset < 0, "no image member"),
        ("missing_metadata", ~has_metadata, "no .json or .txt member"),
        ("missing_labels", rows < 0, missing_labels_detail),
        ("unlabeled", ~has_labels, "no kept hashtag"),
    ):
        counted = applies & ~excluded
        if counted.any():
            skips.append(StaticSkip(reason, shard, int(counted.sum()), f"{detail}, e.g. sample {index.keys[counted.argmax()]}"))
        excluded |= counted
    return SampleTable.of_shard(path, index.keys, image_offset, image_size, label_offsets, labels, ~excluded), skips


# ----------------------------------------------------------------------------------------------------
# Counting what was skipped


class SkipLog:
    """Skipped samples per reason, one warning per reason and shard, and the stop when too many are bad."""

    def __init__(self, paths: list[Path], total: int, max_bad_fraction: float) -> None:
        self.paths = paths
        self.total = total
        self.max_bad_fraction = max_bad_fraction
        self.counts: Counter[str] = Counter()
        self.bad_by_shard: Counter[int] = Counter()
        self._seen: set[int] = set()  # samples counted while decoding: each counts once, whatever its copies
        self._warned: set[tuple[str, int]] = set()

    def add(self, reason: str, shard: int, count: int = 1, detail: str = "", sample: int | None = None) -> None:
        """Count ``count`` skipped samples of ``shard`` (a decoded ``sample`` only the first time)."""
        if sample is not None:
            if sample in self._seen:
                return
            self._seen.add(sample)
        self.counts[reason] += count
        if reason not in NOT_BAD:
            self.bad_by_shard[shard] += count
        if (reason, shard) not in self._warned:
            self._warned.add((reason, shard))
            if reason not in NOT_BAD:
                log.warning("shard %s: skipping %s samples (%s); further ones are only counted",
                            self.paths[shard], reason, detail)

    @property
    def bad(self) -> int:
        return sum(self.bad_by_shard.values())

    def check(self) -> None:
        """DataError naming the worst shards once more than ``max_bad_fraction`` of all samples are bad."""
        bad = self.bad
        if bad and bad > self.max_bad_fraction * self.total:
            worst = ", ".join(f"{self.paths[s]} ({n})" for s, n in self.bad_by_shard.most_common(5))
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.counts.items()) if r not in NOT_BAD)
            raise DataError(
                f"{bad} of {self.total} samples are bad, more than max_bad_fraction={self.max_bad_fraction} "
                f"({reasons}); worst shards: {worst}"
            )

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "bad_by_shard": {int(k): v for k, v in self.bad_by_shard.items()},
                "seen": sorted(self._seen), "warned": sorted(self._warned)}

    def load_state_dict(self, state: dict) -> None:
        self.counts = Counter(state["counts"])
        self.bad_by_shard = Counter({int(k): v for k, v in state["bad_by_shard"].items()})
        self._seen = set(state["seen"])
        self._warned = {(r, int(s)) for r, s in state["warned"]}


# ----------------------------------------------------------------------------------------------------
# The order


@dataclass
class PlanChunk:
    """Consecutive positions ``positions`` (n,) of epoch ``epoch``'s plan and their samples (n,)."""

    epoch: int
    positions: np.ndarray
    samples: np.ndarray


class SampleStream:
    """Epoch plans of one rank: shard order, resampling copies, windowed shuffle (see the module docstring)."""

    def __init__(self, table: SampleTable, replication: np.ndarray, seed: int, rank: int, shuffle_buffer: int) -> None:
        self.table = table
        self.replication = np.where(table.usable, replication, 0.0)  # (N,)
        self.seed = seed
        self.rank = rank
        self.shuffle_buffer = shuffle_buffer
        self._plans: dict[int, np.ndarray] = {}

    def _rng(self, epoch: int, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & (2**64 - 1), epoch, self.rank, purpose])

    def plan(self, epoch: int) -> np.ndarray:
        """The samples of ``epoch`` in order, (M,) int64 (the last two epochs' plans are kept)."""
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1}
            self._plans[epoch] = self._make_plan(epoch)
        return self._plans[epoch]

    def _make_plan(self, epoch: int) -> np.ndarray:
        table = self.table
        emitted = copies(self.replication, self.seed, epoch, table.keys)  # (N,)
        shard_order = self._rng(epoch, 0).permutation(len(table.paths))
        sequence = np.concatenate([
            np.repeat(np.arange(table.starts[s], table.starts[s + 1]), emitted[table.starts[s]: table.starts[s + 1]])
            for s in shard_order
        ])  # (M,)
        if self.shuffle_buffer > 1 and len(sequence) > 1:
            jitter = self.shuffle_buffer * self._rng(epoch, 1).random(len(sequence))
            sequence = sequence[np.argsort(np.arange(len(sequence)) + jitter, kind="stable")]
        return sequence

    def chunks(self, epoch: int, position: int, size: int) -> Iterator[PlanChunk]:
        """Endless: ``size`` positions at a time from ``(epoch, position)`` on, epoch after epoch."""
        while True:
            plan = self.plan(epoch)
            for start in range(position, len(plan), size):
                positions = np.arange(start, min(start + size, len(plan)), dtype=np.int64)
                yield PlanChunk(epoch, positions, plan[positions])
            epoch, position = epoch + 1, 0

    def after(self, epoch: int, position: int) -> tuple[int, int]:
        """The (epoch, position) that follows ``position`` of ``epoch``."""
        if position + 1 < len(self.plan(epoch)):
            return epoch, position + 1
        return epoch + 1, 0


@dataclass
class DecodedChunk:
    """What a backend made of a PlanChunk: the ``positions``/``samples`` (k,) it decoded, their ``images``
    (k, H, W, 3) normalized in the training dtype on the device, and the ``bad`` ones as (sample, reason, detail)."""

    epoch: int
    positions: np.ndarray
    samples: np.ndarray
    images: torch.Tensor
    bad: list[tuple[int, str, str]]
