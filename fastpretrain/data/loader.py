"""The loaders over the sample stream: a backend (DALI or torch) decodes the stream's chunks, each reader slot
assembles always-full batches from its own chunks, and the train loader keeps the places that make a resumed run
yield exactly the batches of an uninterrupted one (see stream.py for the order and what a slot is).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fastpretrain.data.config import Batch, DataConfig
from fastpretrain.data.decoders import make_decoder
from fastpretrain.data.stream import (DecodedChunk, PlanChunk, SampleStream, SampleTable, SkipLog, SlotPlans, StaticSkip,
                                      image_folder_table, load_class_table, load_table)
from fastpretrain.errors import DataError, UserError
from fastpretrain.formats.image_folder import is_image_folder, read_image_folder
from fastpretrain.formats.shards import list_shards
from fastpretrain.hashtags.resample import class_replication, image_replication

if TYPE_CHECKING:
    import torch

    from fastpretrain.formats.vocab import Vocab

STATE_FORMAT = 2


def _images_to_batch(images: torch.Tensor, table: SampleTable, samples: np.ndarray, origin: np.ndarray,
                     device: torch.device) -> Batch:
    import torch

    labels, offsets = table.labels_of(samples)

    def to_device(array: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(array)
        # From pageable memory the copy would first wait for the work queued on the stream; pinned memory comes
        # from torch's caching host allocator, not a cudaHostAlloc per step.
        if torch.device(device).type == "cuda":
            host = host.pin_memory()
        return host.to(device, non_blocking=True)

    return Batch(
        images=images.permute(0, 3, 1, 2),  # (B, H, W, 3) -> (B, 3, H, W): a channels-last view
        labels=to_device(labels),
        offsets=to_device(offsets),
        origin=origin,
    )


@dataclass
class _Decoded:
    """Good samples of one decoded chunk not yet in a batch: ``order`` (k,) their indices in the slot's share of
    ``epoch`` (None for an eval chunk), ``positions`` and ``samples`` (k,), ``images`` (k, H, W, 3)."""

    epoch: int
    order: np.ndarray | None
    positions: np.ndarray
    samples: np.ndarray
    images: torch.Tensor

    def __len__(self) -> int:
        return len(self.samples)

    def split(self, n: int) -> tuple[_Decoded, _Decoded]:
        head = _Decoded(self.epoch, None if self.order is None else self.order[:n], self.positions[:n],
                        self.samples[:n], self.images[:n])
        tail = _Decoded(self.epoch, None if self.order is None else self.order[n:], self.positions[n:],
                        self.samples[n:], self.images[n:])
        return head, tail


def _good_part(chunk: PlanChunk, decoded: DecodedChunk) -> _Decoded:
    """The decoded (good) samples of ``chunk``, with their orders (a chunk's positions ascend)."""
    order = None if chunk.order is None else chunk.order[np.searchsorted(chunk.positions, decoded.positions)]
    return _Decoded(decoded.epoch, order, decoded.positions, decoded.samples, decoded.images)


def _take(pending: deque[_Decoded], size: int) -> list[_Decoded]:
    """The first ``size`` samples of ``pending`` (which has them), removed from it."""
    parts = []
    while size:
        head, tail = pending.popleft().split(size)
        parts.append(head)
        size -= len(head)
        if len(tail):
            pending.appendleft(tail)
    return parts


def _concat(parts: list[_Decoded]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(images (n, H, W, 3), samples (n,), origin (n, 2)) of ``parts``."""
    import torch

    images = parts[0].images if len(parts) == 1 else torch.cat([p.images for p in parts])
    origin = np.concatenate([np.stack([np.full(len(p), p.epoch), p.positions], axis=1) for p in parts])
    return images, np.concatenate([p.samples for p in parts]), origin.astype(np.int64)


class _DecodeFeed:
    """The decoder's output paired with the chunks it was given: a backend yields one DecodedChunk per PlanChunk,
    in order, so the chunks it has pulled and not yet returned wait here in order."""

    def __init__(self, decoder, chunks: Iterator[PlanChunk], skips: SkipLog, table: SampleTable) -> None:
        self.skips = skips
        self.table = table
        self._given: deque[PlanChunk] = deque()
        self._decoded = decoder.decode(self._record(chunks))

    def _record(self, chunks: Iterator[PlanChunk]) -> Iterator[PlanChunk]:
        for chunk in chunks:
            self._given.append(chunk)
            yield chunk

    def next(self) -> tuple[PlanChunk, _Decoded] | None:
        """The next chunk and its good samples (its bad ones counted), or None when the chunks ran out."""
        decoded = next(self._decoded, None)
        if decoded is None:
            return None
        chunk = self._given.popleft()
        for sample, reason, detail in decoded.bad:
            self.skips.add_decoded(sample, reason, int(self.table.shard_of[sample]), detail)
        self.skips.check()
        return chunk, _good_part(chunk, decoded)

    def close(self) -> None:
        self._decoded.close()


class TrainLoader:
    """Endless full Batches of this process's reader slots, one slot after the other (see ``build_train_loader``)."""

    def __init__(self, cfg: DataConfig, plans: SlotPlans, skips: SkipLog, decoder, device: torch.device,
                 slots: list[int]) -> None:
        self.cfg = cfg
        self.plans = plans
        self.skips = skips
        self.decoder = decoder
        self.device = device
        self.slots = list(slots)
        self.places = {slot: (0, 0) for slot in self.slots}  # slot -> (epoch, elements of its share consumed)
        self.samples_per_epoch = float(plans.stream.replication.sum())  # expected, after resampling
        self._feed: _DecodeFeed | None = None
        self._turn = 0

    @property
    def table(self) -> SampleTable:
        return self.plans.stream.table

    @property
    def epoch(self) -> int:
        """The epoch this process's next sample comes from (its earliest slot's)."""
        return min(epoch for epoch, _ in self.places.values())

    @property
    def batches_per_epoch(self) -> int:
        """Expected global steps per epoch after resampling: one batch of every slot each (draws vary a little)."""
        return max(1, round(self.samples_per_epoch / (self.cfg.batch_size * self.plans.num_slots)))

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far that this process knows of, per reason (``unlabeled``: excluded by design)."""
        return self.skips.counts()

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch:
        slot = self.slots[self._turn]
        self._turn = (self._turn + 1) % len(self.slots)
        if self._feed is None:
            self._start()
        size = self.cfg.batch_size
        while sum(map(len, self._pending[slot])) < size:
            got = self._feed.next()
            if got is None:  # the chunks are endless: only every sample being bad ends them, which check() stops first
                raise DataError("the training stream ran dry")
            chunk, good = got
            if len(good):
                self._pending[chunk.slot].append(good)
        parts = _take(self._pending[slot], size)
        self._advance(slot, parts[-1].epoch, int(parts[-1].order[-1]) + 1)
        images, samples, origin = _concat(parts)
        return _images_to_batch(images, self.table, samples, origin, self.device)

    def _advance(self, slot: int, epoch: int, consumed: int) -> None:
        """The slot's place after a batch ending at its share's element ``consumed - 1`` of ``epoch``."""
        before_epoch, before = self.places[slot]
        if consumed >= self.plans.share_length(slot, epoch):
            epoch, consumed = epoch + 1, 0
        self.places[slot] = (epoch, consumed)
        done = consumed - before if epoch == before_epoch else \
            self.plans.share_length(slot, before_epoch) - before + consumed
        self._consumed[slot] += done

    def _start(self) -> None:
        self._pending: dict[int, deque[_Decoded]] = {slot: deque() for slot in self.slots}
        self._issued = dict(self.places)  # where the next chunk made for each slot begins
        self._consumed = dict.fromkeys(self.slots, 0)  # elements, since this start
        self._handed = dict.fromkeys(self.slots, 0)
        self._feed = _DecodeFeed(self.decoder, self._chunks(), self.skips, self.table)

    def _chunks(self) -> Iterator[PlanChunk]:
        """Endless chunks of ``batch_size`` elements, each for the slot that has the fewest handed out and not yet
        consumed: the slots' needs differ by their bad samples, and a fixed turn would let the others' decoded
        chunks pile up. Only when a chunk is made depends on timing; what a slot's batches hold does not."""
        turn = {slot: i for i, slot in enumerate(self.slots)}
        while True:
            slot = min(self.slots, key=lambda v: (self._handed[v] - self._consumed[v], turn[v]))
            epoch, first = self._issued[slot]
            for _ in range(1000):  # an epoch can be too short to give every slot an element
                if first < self.plans.share_length(slot, epoch):
                    break
                epoch, first = epoch + 1, 0
            else:
                raise DataError(f"reader slot {slot} found no sample in 1000 epochs: the stream has fewer samples "
                                f"per epoch than readers ({self.plans.num_slots})")
            chunk = self.plans.chunk(slot, epoch, first, self.cfg.batch_size)
            self._issued[slot] = (epoch, first + len(chunk.order))
            self._handed[slot] += len(chunk.order)
            yield chunk

    def state_dict(self) -> dict:
        """This process's part of the stream's state: its slots' places and the bad samples it knows of. The states
        of all processes, merged by ``merge_states``, resume the stream on any number of slots."""
        return {
            "format": STATE_FORMAT,
            "seed": self.cfg.seed,
            "shards": _fingerprint(self.table),
            "plans": self.plans.state_dict(),
            "places": {str(slot): list(place) for slot, place in self.places.items()},
            "bad_samples": {str(sample): list(found) for sample, found in self.skips.decoded().items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a (merged) ``state_dict()``: exactly where the same number of slots left it, or, on another
        number, with what was left of each epoch (nothing lost, nothing repeated). UserError if the state came from
        another data set or seed."""
        if state.get("format") != STATE_FORMAT:
            raise UserError(f"data state of format {state.get('format')!r}, expected {STATE_FORMAT}")
        mine = {"seed": self.cfg.seed, "shards": _fingerprint(self.table)}
        for key, value in mine.items():
            if state[key] != value:
                raise UserError(f"cannot resume the data stream: its {key} was {state[key]!r}, now {value!r}")
        self.close()
        num_slots = self.plans.num_slots
        self.plans.load_state_dict(state["plans"])
        places = {int(slot): (int(epoch), int(n)) for slot, (epoch, n) in state["places"].items()}
        if self.plans.num_slots == num_slots:
            self.places = {slot: places[slot] for slot in self.slots}
        else:
            self.plans.fold(places)
            self.plans.num_slots = num_slots
            first_epoch = min(self.plans.rests)
            self.places = dict.fromkeys(self.slots, (first_epoch, 0))
        self.skips.restored = {int(sample): (reason, int(shard))
                               for sample, (reason, shard) in state["bad_samples"].items()}
        self.skips.own = {}

    def close(self) -> None:
        """Stop the decoding workers or pipeline (a later ``next`` starts them again)."""
        if self._feed is not None:
            self._feed.close()
            self._feed = None


def merge_states(states: list[dict]) -> dict:
    """One stream state from every process's ``TrainLoader.state_dict()``: all slots' places, all bad samples."""
    merged = dict(states[0])
    merged["places"] = {slot: place for state in states for slot, place in state["places"].items()}
    merged["bad_samples"] = {sample: found for state in states for sample, found in state["bad_samples"].items()}
    earliest = min(epoch for epoch, _ in merged["places"].values())  # what is left of epochs every slot has passed
    rests = merged["plans"]["rests"]
    merged["plans"] = {**merged["plans"], "rests": {e: rest for e, rest in rests.items() if int(e) >= earliest}}
    return merged


class EvalLoader:
    """One pass over this process's share of the usable samples in shard order per ``iter()`` (rank ``r`` of ``W``
    takes samples ``r, r + W, ...``); the last batch may be short."""

    def __init__(self, cfg: DataConfig, table: SampleTable, skips: SkipLog, decoder, device: torch.device,
                 rank: int = 0, world_size: int = 1) -> None:
        self.cfg = cfg
        self.table = table
        self.skips = skips
        self.decoder = decoder
        self.device = device
        self.samples = np.flatnonzero(table.usable)[rank::world_size]  # (n,)

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far, per reason (``unlabeled``: no kept label, excluded)."""
        return self.skips.counts()

    def __len__(self) -> int:
        """Batches in a pass, if no image turns out bad."""
        return -(-len(self.samples) // self.cfg.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        size = self.cfg.batch_size
        chunks = (
            PlanChunk(0, np.arange(i, min(i + size, len(self.samples))), self.samples[i: i + size])
            for i in range(0, len(self.samples), size)
        )
        feed = _DecodeFeed(self.decoder, chunks, self.skips, self.table)
        pending: deque[_Decoded] = deque()
        try:
            while True:
                got = feed.next()
                if got is not None and len(got[1]):
                    pending.append(got[1])
                count = sum(map(len, pending))
                if count >= size or (got is None and count):
                    images, samples, origin = _concat(_take(pending, min(size, count)))
                    yield _images_to_batch(images, self.table, samples, origin, self.device)
                elif got is None:
                    return
        finally:
            feed.close()


def _fingerprint(table: SampleTable) -> str:
    names = "\n".join(f"{p.name}:{n}" for p, n in zip(table.paths, np.diff(table.starts)))
    return hashlib.blake2b(names.encode(), digest_size=12).hexdigest()


def _read_table(cfg: DataConfig, vocab: Vocab) -> tuple[SampleTable, list[StaticSkip]]:
    """The samples of ``cfg.shards`` and their labels: hashtags from the label indexes in ``cfg.label_dir``; without
    one, classes from an ImageFolder's class folders (named as ``vocab``'s classes) or from each sample's ``cls``."""
    if cfg.label_dir is not None:
        return load_table(list_shards(cfg.shards), cfg.label_dir, vocab.content_hash)
    if isinstance(cfg.shards, str) and is_image_folder(cfg.shards):
        return image_folder_table(read_image_folder(cfg.shards, vocab.wnids)), []
    return load_class_table(list_shards(cfg.shards), len(vocab))


def _open(cfg: DataConfig, vocab: Vocab, share: float) -> tuple[SampleTable, SkipLog]:
    table, static_skips = _read_table(cfg, vocab)
    paths = table.paths
    # Checked once here, where the batches come from: the CUDA loss reads labels without a per-step check.
    highest = int(table.labels.argmax()) if table.labels.size else None  # position of the largest class id
    if highest is not None and int(table.labels[highest]) >= len(vocab):
        sample = np.searchsorted(table.label_offsets, highest, "right") - 1  # the CSR row holding that position
        shard = table.paths[int(table.shard_of[sample])]
        raise DataError(f"label index of {shard.name} names class {int(table.labels[highest])}, "
                        f"but the vocabulary has {len(vocab)} classes: rebuild it with `fastpretrain vocab label`")
    lost = sum(s.count for s in static_skips if s.reason in ("unreadable_shard", "missing_in_shard"))
    skips = SkipLog(paths, len(table) + lost, cfg.max_bad_fraction, share)
    for skip in static_skips:
        skips.add_static(skip.reason, skip.shard, skip.count, skip.detail)
    skips.check()
    if not table.usable.any():
        raise DataError(f"no usable sample in {len(paths)} files ({', '.join(f'{r}: {n}' for r, n in skips.counts().items())})")
    return table, skips


def build_train_loader(cfg: DataConfig, vocab: Vocab, device: torch.device, dtype: torch.dtype,
                       slots: list[int] | None = None, num_slots: int = 1) -> TrainLoader:
    """Endless full Batches (random-resized crop, flip, normalize) of reader ``slots`` out of ``num_slots`` (default:
    the only slot), one slot after the other. A process of a torchrun world of W with A accumulation steps reads
    slots ``rank * A .. rank * A + A - 1`` of ``W * A``."""
    slots = [0] if slots is None else list(slots)
    if not slots or any(not 0 <= slot < num_slots for slot in slots):
        raise ValueError(f"build_train_loader: slots {slots} are not all in [0, {num_slots})")
    table, skips = _open(cfg, vocab, len(slots) / num_slots)
    class_r = class_replication(vocab.counts, vocab.num_images, cfg.resample, cfg.resample_t)
    replication = image_replication(class_r, table.labels, table.label_offsets)
    stream = SampleStream(table, replication, cfg.seed, cfg.shuffle_buffer)
    per_epoch = float(stream.replication.sum())
    if per_epoch < cfg.batch_size * num_slots:
        raise UserError(f"an epoch holds about {per_epoch:.0f} samples after resampling, fewer than one batch of "
                        f"{cfg.batch_size} for each of the {num_slots} readers (world size x accumulation steps)")
    decoder = make_decoder(cfg, table, device, dtype, train=True)
    return TrainLoader(cfg, SlotPlans(stream, num_slots), skips, decoder, device, slots)


def build_eval_loader(cfg: DataConfig, vocab: Vocab, device: torch.device, dtype: torch.dtype, rank: int = 0,
                      world_size: int = 1) -> EvalLoader:
    """Every labeled sample once, in shard order, rank ``rank``'s share of ``world_size``: resize to
    ``round(image_size * 256 / 224)``, centre crop, normalize."""
    table, skips = _open(cfg, vocab, 1 / world_size)
    return EvalLoader(cfg, table, skips, make_decoder(cfg, table, device, dtype, train=False), device, rank,
                      world_size)
