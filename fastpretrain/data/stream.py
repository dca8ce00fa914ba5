"""The sample stream: which sample comes next, in which epoch, for which reader (the loaders are in loader.py).

Everything that decides the order is computed up front from static data (shard indexes, label indexes,
the vocabulary), never from what decoding finds, and nothing in it depends on the world size:

- epoch plan: every shard, in an order drawn from ``(seed, epoch)``, each sample repeated ``copies`` times
  (``fastpretrain.hashtags.resample``: sqrt resampling, unlabeled samples 0 times), then a windowed shuffle:
  sample ``i`` of that sequence goes to the place of ``i + shuffle_buffer * u_i``, ``u_i`` uniform. Like a
  shuffle buffer of that size, it mixes neighbouring shards and needs to read at most that far ahead; unlike
  one, it is a single vectorized argsort. Every process computes the same plan.
- slots (``SlotPlans``): the plan is dealt to D = world size x accumulation steps readers, element ``i`` to slot
  ``i mod D``; a global step is one micro-batch of each slot. Each slot keeps its place ``(epoch, n)``.
- resume: on the same D the slots continue from their places, exactly. On another D (an elastic restart) what the
  slots consumed is folded into "what is left of the epoch" (a start position and the few positions consumed out of
  order beyond it), and the new slots deal out that rest: no sample of the epoch is lost or repeated (MosaicML
  Streaming's elastic determinism); which slot and step a remaining sample lands in changes with D.

A bad image found while decoding is dropped from the batch and the batch is filled from the slot's next samples,
so a slot's batch ``k`` is always the same ``B`` good samples: a resumed run regenerates the plan, starts at the
saved places and yields exactly the batches of the uninterrupted one (crop boxes are a function of the plan
position, not of the slot).

Startup cost: one pass over every shard's index and label index in every process (no image is read), and per
epoch one BLAKE2b hash per sample for the resampling draw (about 1 us each). Memory: the sample table (about 40
bytes per sample) and the plan (8 bytes per sample per epoch), in every process.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fastpretrain.errors import DataError, UserError
from fastpretrain.formats.image_folder import ImageFolder
from fastpretrain.formats.labels import LabelIndex, label_index_path
from fastpretrain.formats.phash import DuplicateList, duplicates_path
from fastpretrain.formats.shards import MemberReader, ShardIndex, load_index
from fastpretrain.hashtags.resample import copies

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fastpretrain.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the first one a sample has is its image
# Skipped by design, not bad data: they do not count against max_bad_fraction.
NOT_BAD = frozenset({"unlabeled", "duplicate_of_eval"})
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
    return _load_shards(paths, lambda shard, path, index: _index_labels(shard, path, index, label_dir, vocab_hash),
                        lambda path: _label_index_length(label_dir, path))


def load_class_table(paths: list[Path], num_classes: int) -> tuple[SampleTable, list[StaticSkip]]:
    """Read the shard indexes of ``paths`` and each sample's class from its ``cls`` member (WebDataset's convention:
    the class index as text), which must lie in [0, num_classes)."""
    return _load_shards(paths, lambda shard, path, index: _member_classes(shard, path, index, num_classes),
                        lambda path: 0)


def image_folder_table(folder: ImageFolder) -> SampleTable:
    """An ImageFolder tree as a table: every file its own one-sample "shard" (read whole, from offset 0)."""
    n = len(folder.files)
    starts = np.arange(n + 1, dtype=np.int64)
    keys = np.array([str(path.relative_to(folder.root)) for path in folder.files], dtype=str)
    return SampleTable(list(folder.files), starts, np.arange(n, dtype=np.int32), keys, np.zeros(n, np.int64),
                       folder.sizes, starts.copy(), folder.labels.astype(np.int32), np.ones(n, dtype=bool))


@dataclass
class ShardLabels:
    """What a label reader found for a shard's samples: their labels as CSR, which lack their metadata (the reader's
    own precondition), which have no label and why, and other skips (e.g. labels of samples the shard lost);
    ``duplicate_of_eval``, which `fastpretrain dedup` listed as near-duplicates of evaluation pictures (None: none)."""

    labels: np.ndarray  # (nnz,)
    offsets: np.ndarray  # (n + 1,)
    no_metadata: np.ndarray  # (n,) bool
    missing: np.ndarray  # (n,) bool
    missing_detail: str
    skips: list[StaticSkip]
    duplicate_of_eval: np.ndarray | None = None  # (n,) bool


LabelReader = Callable[[int, Path, ShardIndex], ShardLabels]


def _load_shards(paths: list[Path], labels_for: LabelReader,
                 known_length: Callable[[Path], int]) -> tuple[SampleTable, list[StaticSkip]]:
    loaded = [_load_shard(shard, path, labels_for, known_length) for shard, path in enumerate(paths)]
    return SampleTable.concat([table for table, _ in loaded]), [skip for _, skips in loaded for skip in skips]


def image_member(members) -> tuple[int, int] | None:
    """(offset, size) of a sample's image, the first of IMAGE_EXTENSIONS it has; None without one."""
    return next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)


def _load_shard(shard: int, path: Path, labels_for: LabelReader,
                known_length: Callable[[Path], int]) -> tuple[SampleTable, list[StaticSkip]]:
    """Shard number ``shard``'s samples, and what is excluded of them before decoding."""
    try:
        index = load_index(path)
    except DataError as e:
        none = np.zeros(0, dtype=np.int64)
        table = SampleTable.of_shard(path, np.zeros(0, dtype=str), none, none, np.zeros(1, np.int64), none,
                                     np.zeros(0, dtype=bool))
        return table, [StaticSkip("unreadable_shard", shard, known_length(path), str(e))]
    n = len(index)
    found = labels_for(shard, path, index)
    skips = found.skips
    if index.duplicates:  # samples whose key the shard had already: left out of the index, counted here
        skips.append(StaticSkip("duplicate_key", shard, len(index.duplicates),
                                f"a key seen before in the shard, e.g. {index.duplicates[0][0]}"))
    image_offset = np.full(n, -1, dtype=np.int64)
    image_size = np.zeros(n, dtype=np.int64)
    for i, members in enumerate(index.members):
        member = image_member(members)
        if member is not None:
            image_offset[i], image_size[i] = member
    has_labels = np.diff(found.offsets) > 0
    # Each excluded sample is counted once, under the first of these reasons that applies.
    excluded = np.zeros(n, dtype=bool)
    for reason, applies, detail in (
        ("missing_image", image_offset < 0, "no image member"),
        ("missing_metadata", found.no_metadata, "no .json or .txt member"),
        ("missing_labels", found.missing, found.missing_detail),
        ("duplicate_of_eval", np.zeros(n, bool) if found.duplicate_of_eval is None else found.duplicate_of_eval,
         "a near-duplicate of an evaluation picture (fastpretrain dedup)"),
        ("unlabeled", ~has_labels, "no kept hashtag"),
    ):
        counted = applies & ~excluded
        if counted.any():
            skips.append(StaticSkip(reason, shard, int(counted.sum()), f"{detail}, e.g. sample {index.keys[counted.argmax()]}"))
        excluded |= counted
    table = SampleTable.of_shard(path, index.keys, image_offset, image_size, found.offsets, found.labels, ~excluded)
    return table, skips


def _label_index_length(label_dir: str | os.PathLike, path: Path) -> int:
    """How many samples an unreadable shard had, from its label index (0 when that is gone too)."""
    try:
        return len(LabelIndex.load(label_index_path(label_dir, path)))
    except DataError:
        return 0


def _index_labels(shard: int, path: Path, index: ShardIndex, label_dir: str | os.PathLike, vocab_hash: str):
    """A shard's hashtag labels from its label index; samples need their metadata (the posts the index was made of).
    The samples its duplicate list names (``fastpretrain dedup``, beside the label index) are left out."""
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
    n = len(index)
    skips: list[StaticSkip] = []
    detail = "key not in the label index"
    if label_index is None:
        rows = np.full(n, -1, dtype=np.int64)
        detail = label_problem
        label_index = LabelIndex.from_rows([], [], vocab_hash)
    elif len(label_index) == n and np.array_equal(label_index.keys, index.keys):
        rows = np.arange(n, dtype=np.int64)
    else:
        by_key = label_index.rows_by_key()
        rows = np.array([by_key.get(str(key), -1) for key in index.keys], dtype=np.int64)
        lost = len(label_index) - len(np.unique(rows[rows >= 0]))
        if lost > 0:  # e.g. a truncated shard
            skips.append(StaticSkip("missing_in_shard", shard, lost, f"{lost} samples of {label_file} not in the shard"))
    no_metadata = np.array([not ("json" in m or "txt" in m) for m in index.members], dtype=bool)
    labels, offsets = gather_rows(label_index.offsets, label_index.labels, rows)
    listed = duplicates_path(label_dir, path)
    duplicate = np.isin(index.keys, DuplicateList.load(listed).keys) if listed.is_file() else None  # (n,)
    return ShardLabels(labels, offsets, no_metadata, rows < 0, detail, skips, duplicate)


def _member_classes(shard: int, path: Path, index: ShardIndex, num_classes: int):
    """A shard's classes from each sample's ``cls`` member; a missing or out-of-range one is a missing label."""
    reader = MemberReader([path])
    classes = np.full(len(index), -1, dtype=np.int64)
    bad = None
    try:
        for i, members in enumerate(index.members):
            if "cls" not in members:
                continue
            try:
                value = int(reader.read(0, *members["cls"]).decode().strip())
            except (ValueError, UnicodeDecodeError, OSError):
                value = -1
            if 0 <= value < num_classes:
                classes[i] = value
            elif bad is None:
                bad = f"sample {index.keys[i]}'s cls is not a class index in [0, {num_classes})"
    finally:
        reader.close()
    labeled = classes >= 0
    offsets = np.zeros(len(index) + 1, dtype=np.int64)
    np.cumsum(labeled, out=offsets[1:])
    return ShardLabels(classes[labeled].astype(np.int32), offsets, np.zeros(len(index), dtype=bool), ~labeled,
                       bad or "no .cls member", [])


# ----------------------------------------------------------------------------------------------------
# Counting what was skipped


class SkipLog:
    """Skipped samples per reason, one warning per reason and shard, and the stop when too many are bad.

    ``static``: found before decoding, from the indexes (the same in every process: every rank reads every index).
    Samples found bad while decoding are kept by sample id (each counts once, whatever its copies and whichever
    rank decodes it): ``restored`` came with a resumed stream (all ranks' up to the checkpoint), ``own`` this
    process found since. ``share`` is the part of the stream this process decodes (its slots over all slots): its own
    finds, divided by it, estimate the whole run's for the ``max_bad_fraction`` check.
    """

    def __init__(self, paths: list[Path], total: int, max_bad_fraction: float, share: float = 1.0) -> None:
        self.paths = paths
        self.total = total
        self.max_bad_fraction = max_bad_fraction
        self.share = share
        self.static: Counter[str] = Counter()
        self.static_bad_by_shard: Counter[int] = Counter()
        self.restored: dict[int, tuple[str, int]] = {}  # sample -> (reason, shard)
        self.own: dict[int, tuple[str, int]] = {}
        self._warned: set[tuple[str, int]] = set()

    def add_static(self, reason: str, shard: int, count: int, detail: str) -> None:
        """``count`` samples of ``shard`` excluded before decoding for ``reason``."""
        self.static[reason] += count
        if reason not in NOT_BAD:
            self.static_bad_by_shard[shard] += count
        self._warn(reason, shard, detail)

    def add_decoded(self, sample: int, reason: str, shard: int, detail: str) -> None:
        """Sample ``sample`` of ``shard`` failed to decode (counted the first time only)."""
        if sample in self.restored or sample in self.own:
            return
        self.own[sample] = (reason, shard)
        self._warn(reason, shard, detail)

    def _warn(self, reason: str, shard: int, detail: str) -> None:
        if reason not in NOT_BAD and (reason, shard) not in self._warned:
            self._warned.add((reason, shard))
            log.warning("shard %s: skipping %s samples (%s); further ones are only counted",
                        self.paths[shard], reason, detail)

    def counts(self, decoded: dict[int, tuple[str, int]] | None = None) -> dict[str, int]:
        """Samples skipped per reason: the static ones and ``decoded`` (default: restored and own)."""
        decoded = self.decoded() if decoded is None else decoded
        return dict(self.static + Counter(reason for reason, _ in decoded.values()))

    def decoded(self) -> dict[int, tuple[str, int]]:
        """Every decoded bad sample this process knows of."""
        return self.restored | self.own

    def check(self) -> None:
        """DataError naming the worst shards once more than ``max_bad_fraction`` of all samples are bad."""
        static_bad = sum(self.static_bad_by_shard.values())
        estimate = static_bad + len(self.restored) + len(self.own) / self.share
        if estimate and estimate > self.max_bad_fraction * self.total:
            by_shard = self.static_bad_by_shard + Counter(shard for _, shard in self.decoded().values())
            worst = ", ".join(f"{self.paths[s]} ({n})" for s, n in by_shard.most_common(5))
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.counts().items()) if r not in NOT_BAD)
            raise DataError(
                f"about {estimate:.0f} of {self.total} samples are bad, more than max_bad_fraction="
                f"{self.max_bad_fraction} ({reasons}); worst shards: {worst}"
            )


# ----------------------------------------------------------------------------------------------------
# The order


@dataclass
class PlanChunk:
    """Positions ``positions`` (n,) of epoch ``epoch``'s plan and their samples (n,); for a training stream also
    the slot that reads them and their indices ``order`` (n,) in that slot's share of the epoch."""

    epoch: int
    positions: np.ndarray
    samples: np.ndarray
    slot: int = 0
    order: np.ndarray | None = None


class SampleStream:
    """Epoch plans of the whole run: shard order, resampling copies, windowed shuffle (see the module docstring).
    The same in every process, whatever the world size."""

    def __init__(self, table: SampleTable, replication: np.ndarray, seed: int, shuffle_buffer: int) -> None:
        self.table = table
        self.replication = np.where(table.usable, replication, 0.0)  # (N,)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self._plans: dict[int, np.ndarray] = {}

    def _rng(self, epoch: int, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & (2**64 - 1), epoch, purpose])

    def plan(self, epoch: int) -> np.ndarray:
        """The samples of ``epoch`` in order, (M,) int64 (the plans of this epoch and the one before are kept:
        slots cross an epoch's end at slightly different times)."""
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
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


@dataclass
class EpochRest:
    """What is left of one epoch's plan: every position from ``start`` on, except the ``taken`` ones (sorted, all
    >= start), which were consumed out of order before a resume on another number of slots."""

    start: int = 0
    taken: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def positions(self, indices: np.ndarray) -> np.ndarray:
        """Plan positions of the rest's elements ``indices`` (ascending): the i-th position not taken from ``start``."""
        # taken[m] has taken[m] - start - m untaken positions before it, so it precedes element i when that is <= i.
        before = self.taken - self.start - np.arange(len(self.taken))  # (T,) non-decreasing
        return self.start + indices + np.searchsorted(before, indices, side="right")

    def length(self, plan_length: int) -> int:
        return plan_length - self.start - len(self.taken)


class SlotPlans:
    """How ``num_slots`` readers share each epoch: slot ``v`` reads the rest's elements ``v, v + D, v + 2D, ...``
    (D = ``num_slots``), and each slot keeps its own place ``(epoch, n)``: ``n`` elements of its share consumed.

    A slot is one micro-batch stream: rank ``r`` of a world of W with A accumulation steps reads slots
    ``r * A .. r * A + A - 1``, so a global step reads the same samples whether it runs as 2 processes of 1 micro-batch
    or 1 process of 2. ``rests`` holds the epochs that were partly consumed before a resume on another number of slots
    (``fold``); untouched epochs are whole.
    """

    def __init__(self, stream: SampleStream, num_slots: int) -> None:
        self.stream = stream
        self.num_slots = num_slots
        self.rests: dict[int, EpochRest] = {}

    def rest(self, epoch: int) -> EpochRest:
        return self.rests.get(epoch) or EpochRest()

    def share_length(self, slot: int, epoch: int) -> int:
        """How many elements slot ``slot`` reads of ``epoch``."""
        left = self.rest(epoch).length(len(self.stream.plan(epoch)))
        return max(0, -(-(left - slot) // self.num_slots))

    def chunk(self, slot: int, epoch: int, first: int, size: int) -> PlanChunk:
        """Elements ``first .. first + size - 1`` of the slot's share of ``epoch`` (fewer at the share's end)."""
        order = np.arange(first, min(first + size, self.share_length(slot, epoch)), dtype=np.int64)
        positions = self.rest(epoch).positions(slot + self.num_slots * order)
        return PlanChunk(epoch, positions, self.stream.plan(epoch)[positions], slot, order)

    def fold(self, places: dict[int, tuple[int, int]]) -> None:
        """Turn the slots' places into what is left of each epoch, for a resume on another number of slots: every
        element a slot consumed is taken, the others stay, in plan order."""
        epochs = [epoch for epoch, _ in places.values()]
        rests = {}
        for epoch in range(min(epochs), max(epochs) + 1):
            rest, left = self.rest(epoch), self.rest(epoch).length(len(self.stream.plan(epoch)))
            consumed = []  # (k,) indices into the rest
            for slot in range(self.num_slots):
                slot_epoch, n = places.get(slot, (min(epochs), 0))
                n = self.share_length(slot, epoch) if slot_epoch > epoch else (n if slot_epoch == epoch else 0)
                consumed.append(slot + self.num_slots * np.arange(n, dtype=np.int64))
            done = np.sort(np.concatenate(consumed))
            # The first element not consumed, and the consumed ones after it, in plan positions.
            gaps = np.flatnonzero(done != np.arange(len(done)))
            first_free = int(gaps[0]) if len(gaps) else len(done)
            if first_free >= left:  # the whole epoch is consumed: nothing left of it (not "untouched")
                rests[epoch] = EpochRest(len(self.stream.plan(epoch)))
                continue
            start = int(rest.positions(np.array([first_free]))[0])
            taken = np.union1d(rest.taken[rest.taken > start], rest.positions(done[first_free:]))
            rests[epoch] = EpochRest(start, taken.astype(np.int64))
        self.rests = rests

    def state_dict(self) -> dict:
        return {"num_slots": self.num_slots,
                "rests": {str(e): {"start": r.start, "taken": r.taken.tolist()} for e, r in self.rests.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.num_slots = int(state["num_slots"])
        self.rests = {int(e): EpochRest(int(r["start"]), np.asarray(r["taken"], dtype=np.int64))
                      for e, r in state["rests"].items()}


@dataclass
class DecodedChunk:
    """What a backend made of a PlanChunk (one per chunk, in order): the ``positions``/``samples`` (k,) it decoded,
    their ``images`` (k, H, W, 3) normalized in the training dtype on the device, and the ``bad`` ones as
    (sample, reason, detail)."""

    epoch: int
    positions: np.ndarray
    samples: np.ndarray
    images: torch.Tensor
    bad: list[tuple[int, str, str]]
