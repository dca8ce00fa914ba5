"""The loaders over the sample stream: a backend (DALI or torch) decodes the stream's chunks, an assembler fills
always-full batches, and the train loader keeps the position that makes a resumed run yield exactly the batches
of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fastpretrain.data.config import Batch, DataConfig
from fastpretrain.data.decoders import make_decoder
from fastpretrain.formats.shards import list_shards
from fastpretrain.data.stream import (STATE_FORMAT, DecodedChunk, PlanChunk, SampleStream, SampleTable, SkipLog,
                                      load_table)
from fastpretrain.errors import DataError, UserError
from fastpretrain.hashtags.resample import class_replication, image_replication

if TYPE_CHECKING:
    import torch

    from fastpretrain.formats.vocab import Vocab

log = logging.getLogger("fastpretrain.data")

def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if (rank is None) != (world_size is None):
        raise ValueError("build_train_loader: give both rank and world_size, or neither")
    if rank is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            try:
                rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
            except ValueError as e:
                raise UserError(f"RANK / WORLD_SIZE environment variables: {e}") from None
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in [0, world size {world_size})")
    return rank, world_size


def _images_to_batch(images: torch.Tensor, table: SampleTable, samples: np.ndarray, device: torch.device) -> Batch:
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
    )


class _Assembler:
    """Cuts a backend's decoded chunks into batches of exactly ``size`` samples, in stream order."""

    def __init__(self, decoded: Iterator[DecodedChunk], skips: SkipLog, table: SampleTable) -> None:
        self.decoded = decoded
        self.skips = skips
        self.table = table
        self.pending: deque[DecodedChunk] = deque()
        self.pending_count = 0

    def take(self, size: int, allow_short: bool = False) -> tuple[torch.Tensor, np.ndarray, tuple[int, int]] | None:
        """(images (n, H, W, 3), samples (n,), (epoch, position) of the last one), or None when exhausted."""
        import torch

        while self.pending_count < size:
            chunk = next(self.decoded, None)
            if chunk is None:
                break
            for sample, reason, detail in chunk.bad:
                self.skips.add(reason, int(self.table.shard_of[sample]), detail=detail, sample=sample)
            self.skips.check()
            if len(chunk.samples):
                self.pending.append(chunk)
                self.pending_count += len(chunk.samples)
        if self.pending_count == 0 or (self.pending_count < size and not allow_short):
            return None
        pieces, samples, want = [], [], min(size, self.pending_count)
        while want:
            chunk = self.pending[0]
            n = min(want, len(chunk.samples))
            pieces.append(chunk.images[:n])
            samples.append(chunk.samples[:n])
            last = (chunk.epoch, int(chunk.positions[n - 1]))
            if n == len(chunk.samples):
                self.pending.popleft()
            else:
                self.pending[0] = DecodedChunk(chunk.epoch, chunk.positions[n:], chunk.samples[n:], chunk.images[n:], [])
            self.pending_count -= n
            want -= n
        images = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return images, np.concatenate(samples), last


class TrainLoader:
    """Endless iterator of full Batches across epochs; see ``build_train_loader``."""

    def __init__(self, cfg: DataConfig, stream: SampleStream, skips: SkipLog, decoder, device: torch.device,
                 world_size: int) -> None:
        self.cfg = cfg
        self.stream = stream
        self.skips = skips
        self.decoder = decoder
        self.device = device
        self.world_size = world_size
        self._next = (0, 0)  # (epoch, position) of the first sample not yet in a batch
        self._assembler: _Assembler | None = None
        self.samples_per_epoch = float(stream.replication.sum())  # expected, after resampling

    @property
    def epoch(self) -> int:
        """The epoch the next sample comes from."""
        return self._next[0]

    @property
    def batches_per_epoch(self) -> int:
        """Expected full batches per epoch on this rank after resampling (each epoch's draw varies a little)."""
        return max(1, round(self.samples_per_epoch / self.cfg.batch_size))

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far, per reason (``unlabeled`` ones are excluded by design, not bad data)."""
        return dict(self.skips.counts)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch:
        if self._assembler is None:
            chunks = self.stream.chunks(*self._next, self.cfg.batch_size)
            self._assembler = _Assembler(self.decoder.decode(chunks), self.skips, self.stream.table)
        taken = self._assembler.take(self.cfg.batch_size)
        if taken is None:  # an endless stream ends only if every sample is bad, which check() stops first
            raise DataError("the training stream ran dry")
        images, samples, (epoch, position) = taken
        self._next = self.stream.after(epoch, position)
        return _images_to_batch(images, self.stream.table, samples, self.device)

    def state_dict(self) -> dict:
        """The stream's position and skip counts: loading it makes the next batch the one that followed."""
        return {
            "format": STATE_FORMAT,
            "epoch": self._next[0],
            "position": self._next[1],
            "seed": self.cfg.seed,
            "rank": self.stream.rank,
            "world_size": self.world_size,
            "shards": _fingerprint(self.stream.table),
            "skipped": self.skips.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``state_dict()``; UserError if it came from another data set, seed or world size."""
        if state.get("format") != STATE_FORMAT:
            raise UserError(f"data state of format {state.get('format')!r}, expected {STATE_FORMAT}")
        mine = self.state_dict()
        for key in ("seed", "rank", "world_size", "shards"):
            if state[key] != mine[key]:
                raise UserError(f"cannot resume the data stream exactly: its {key} was {state[key]!r}, now {mine[key]!r}")
        self.close()
        self._next = (int(state["epoch"]), int(state["position"]))
        self.skips.load_state_dict(state["skipped"])

    def close(self) -> None:
        """Stop the decoding workers or pipeline (a later ``next`` starts them again)."""
        if self._assembler is not None:
            self._assembler.decoded.close()
            self._assembler = None


class EvalLoader:
    """One pass over every usable sample in shard order per ``iter()``; the last batch may be short."""

    def __init__(self, cfg: DataConfig, table: SampleTable, skips: SkipLog, decoder, device: torch.device) -> None:
        self.cfg = cfg
        self.table = table
        self.skips = skips
        self.decoder = decoder
        self.device = device
        self.samples = np.flatnonzero(table.usable)  # (n,)

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far, per reason (``unlabeled``: no kept label, excluded)."""
        return dict(self.skips.counts)

    def __len__(self) -> int:
        """Batches in a pass, if no image turns out bad."""
        return -(-len(self.samples) // self.cfg.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        size = self.cfg.batch_size
        chunks = (
            PlanChunk(0, np.arange(i, min(i + size, len(self.samples))), self.samples[i: i + size])
            for i in range(0, len(self.samples), size)
        )
        decoded = self.decoder.decode(chunks)
        assembler = _Assembler(decoded, self.skips, self.table)
        try:
            while (taken := assembler.take(size, allow_short=True)) is not None:
                images, samples, _ = taken
                yield _images_to_batch(images, self.table, samples, self.device)
        finally:
            decoded.close()


def _fingerprint(table: SampleTable) -> str:
    names = "\n".join(f"{p.name}:{n}" for p, n in zip(table.paths, np.diff(table.starts)))
    return hashlib.blake2b(names.encode(), digest_size=12).hexdigest()


def _open(cfg: DataConfig, vocab: Vocab, paths: list[Path]) -> tuple[SampleTable, SkipLog]:
    table, static_skips = load_table(paths, cfg.label_dir, vocab.content_hash)
    # Checked once here, where the batches come from: the CUDA loss reads labels without a per-step check.
    highest = int(table.labels.argmax()) if table.labels.size else None  # position of the largest class id
    if highest is not None and int(table.labels[highest]) >= len(vocab):
        sample = np.searchsorted(table.label_offsets, highest, "right") - 1  # the CSR row holding that position
        shard = table.paths[int(table.shard_of[sample])]
        raise DataError(f"label index of {shard.name} names class {int(table.labels[highest])}, "
                        f"but the vocabulary has {len(vocab)} classes: rebuild it with `fastpretrain vocab label`")
    lost = sum(s.count for s in static_skips if s.reason in ("unreadable_shard", "missing_in_shard"))
    skips = SkipLog(paths, len(table) + lost, cfg.max_bad_fraction)
    for skip in static_skips:
        skips.add(skip.reason, skip.shard, skip.count, skip.detail)
    skips.check()
    if not table.usable.any():
        raise DataError(f"no usable sample in {len(paths)} shards ({', '.join(f'{r}: {n}' for r, n in skips.counts.items())})")
    return table, skips


def build_train_loader(cfg: DataConfig, vocab: Vocab, device: torch.device, dtype: torch.dtype,
                       rank: int | None = None, world_size: int | None = None) -> TrainLoader:
    """An endless iterator of full Batches (random-resized crop, flip, normalize) over this rank's shards.

    ``rank``/``world_size`` default to torch.distributed's, else the RANK/WORLD_SIZE environment variables.
    """
    rank, world_size = _resolve_rank(rank, world_size)
    all_paths = list_shards(cfg.shards)
    if len(all_paths) < world_size:
        raise UserError(f"{len(all_paths)} shards cannot feed {world_size} ranks: each rank needs at least one")
    table, skips = _open(cfg, vocab, all_paths[rank::world_size])
    class_r = class_replication(vocab.counts, vocab.num_images, cfg.resample, cfg.resample_t)
    replication = image_replication(class_r, table.labels, table.label_offsets)
    stream = SampleStream(table, replication, cfg.seed, rank, cfg.shuffle_buffer)
    decoder = make_decoder(cfg, table, device, dtype, train=True)
    return TrainLoader(cfg, stream, skips, decoder, device, world_size)


def build_eval_loader(cfg: DataConfig, vocab: Vocab, device: torch.device, dtype: torch.dtype) -> EvalLoader:
    """Every labeled sample once, in shard order: resize to ``round(image_size * 256 / 224)``, centre crop, normalize."""
    table, skips = _open(cfg, vocab, list_shards(cfg.shards))
    return EvalLoader(cfg, table, skips, make_decoder(cfg, table, device, dtype, train=False), device)
