"""Perceptual hashes of a shard's pictures, and the near-duplicates of evaluation pictures found among them, beside the
shard's label index: ``LABEL_DIR/<shard stem>.phash.npz`` and ``LABEL_DIR/<shard stem>.duplicates.npz``.

- ``ShardHashes``: one 64-bit hash per sample whose picture could be hashed (``keys`` (n,) str and ``hashes`` (n,)
  uint64, in shard order), the others counted per reason, and ``version``, the hash's definition
  (``fastpretrain.transfer.dedup``). Written once per shard: a file at least as new as its shard and of this version
  is reused (``fresh_hashes``).
- ``DuplicateList``: the keys of the shard's samples within ``radius`` bits of an evaluation picture, with the nearest
  one (its set and name) and its distance. The training loader skips the listed samples (``duplicate_of_eval``).

Both are ``np.savez`` files, uncompressed, read with ``allow_pickle=False`` and checked before they are trusted.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastpretrain.errors import DataError
from fastpretrain.formats.files import atomic_write
from fastpretrain.formats.labels import _stored_size_problem

log = logging.getLogger(__name__)

HASH_SUFFIX = ".phash.npz"
DUPLICATES_SUFFIX = ".duplicates.npz"
# The hash's definition: bump it with any change to fastpretrain.transfer.dedup's hash, so old files are made again.
HASH_VERSION = 1


def hashes_path(label_dir: str | os.PathLike, shard: str | os.PathLike) -> Path:
    """Where the hash file of ``shard`` lives: ``label_dir/<shard stem>.phash.npz``, beside its label index."""
    return Path(label_dir) / f"{Path(shard).stem}{HASH_SUFFIX}"


def duplicates_path(label_dir: str | os.PathLike, shard: str | os.PathLike) -> Path:
    """Where the duplicate list of ``shard`` lives: ``label_dir/<shard stem>.duplicates.npz``."""
    return Path(label_dir) / f"{Path(shard).stem}{DUPLICATES_SUFFIX}"


@dataclass
class ShardHashes:
    """``keys`` (n,) str and ``hashes`` (n,) uint64 of the samples hashed; ``unhashed``: reason -> samples left."""

    keys: np.ndarray
    hashes: np.ndarray
    unhashed: dict[str, int]
    version: int = HASH_VERSION

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically."""
        reasons = sorted(self.unhashed)
        with atomic_write(path) as f:
            np.savez(f, keys=np.asarray(self.keys, dtype=np.str_), hashes=np.asarray(self.hashes, dtype=np.uint64),
                     unhashed_reasons=np.asarray(reasons, dtype=np.str_),
                     unhashed_counts=np.asarray([self.unhashed[r] for r in reasons], dtype=np.int64),
                     version=np.int64(self.version))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ShardHashes:
        """Read a hash file; DataError naming it when it is missing or corrupt."""
        arrays = _read(path, "hash file", ("keys", "hashes", "unhashed_reasons", "unhashed_counts", "version"))
        keys, hashes, reasons, counts = (arrays[n] for n in ("keys", "hashes", "unhashed_reasons", "unhashed_counts"))
        problem = (_strings_problem("keys", keys) or _strings_problem("unhashed_reasons", reasons)
                   or _same_length_problem(("keys", keys), ("hashes", hashes))
                   or _same_length_problem(("unhashed_reasons", reasons), ("unhashed_counts", counts)))
        if not problem and hashes.dtype != np.uint64:
            problem = f"hashes have dtype {hashes.dtype}, expected uint64"
        if not problem and (counts.dtype != np.int64 or arrays["version"].shape != ()):
            problem = "unhashed_counts or version of the wrong type"
        if problem:
            raise DataError(f"hash file {path} is corrupt: {problem}")
        return cls(keys, hashes, dict(zip(reasons.tolist(), counts.tolist())), int(arrays["version"]))


def fresh_hashes(path: str | os.PathLike, shard: str | os.PathLike) -> ShardHashes | None:
    """The hash file at ``path`` when it is at least as new as ``shard`` (the rule of ``shards.load_index``) and of
    this ``HASH_VERSION``; else None: the shard must be hashed again."""
    try:
        if Path(path).stat().st_mtime_ns < Path(shard).stat().st_mtime_ns:
            return None
        hashes = ShardHashes.load(path)
    except FileNotFoundError:
        return None
    except (OSError, DataError) as e:
        log.warning("%s unusable (%s); hashing the shard again", path, e)
        return None
    return hashes if hashes.version == HASH_VERSION else None


@dataclass
class DuplicateList:
    """The shard's samples ``keys`` (k,) str within ``radius`` bits of an evaluation picture, and per sample the
    nearest one: ``eval_sets`` (k,) str (the set as it was given) and ``eval_pictures`` (k,) str (its name in the set),
    at ``distances`` (k,) uint8 bits."""

    keys: np.ndarray
    eval_sets: np.ndarray
    eval_pictures: np.ndarray
    distances: np.ndarray
    radius: int

    def __len__(self) -> int:
        return len(self.keys)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically."""
        with atomic_write(path) as f:
            np.savez(f, keys=np.asarray(self.keys, dtype=np.str_), eval_sets=np.asarray(self.eval_sets, dtype=np.str_),
                     eval_pictures=np.asarray(self.eval_pictures, dtype=np.str_),
                     distances=np.asarray(self.distances, dtype=np.uint8), radius=np.int64(self.radius))

    @classmethod
    def load(cls, path: str | os.PathLike) -> DuplicateList:
        """Read a duplicate list; DataError naming it when it is missing or corrupt."""
        names = ("keys", "eval_sets", "eval_pictures", "distances")
        arrays = _read(path, "duplicate list", (*names, "radius"))
        problem = (_strings_problem("keys", arrays["keys"]) or _strings_problem("eval_sets", arrays["eval_sets"])
                   or _strings_problem("eval_pictures", arrays["eval_pictures"])
                   or _same_length_problem(*((n, arrays[n]) for n in names)))
        if not problem and (arrays["distances"].dtype != np.uint8 or arrays["radius"].shape != ()):
            problem = "distances or radius of the wrong type"
        if problem:
            raise DataError(f"duplicate list {path} is corrupt: {problem}")
        return cls(*(arrays[n] for n in names), int(arrays["radius"]))


def _read(path: str | os.PathLike, what: str, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``names`` of the npz file at ``path``, checked not to claim more memory than the file holds."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    try:
        problem = _stored_size_problem(path)
        if problem:
            raise ValueError(problem)
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in names}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{what} {path} is corrupt: {e}") from None


def _strings_problem(name: str, array: np.ndarray) -> str | None:
    if array.ndim != 1 or array.dtype.kind != "U":
        return f"{name} must be a 1-D array of str, not {array.ndim}-D {array.dtype}"
    return None


def _same_length_problem(*named: tuple[str, np.ndarray]) -> str | None:
    lengths = {name: array.shape for name, array in named}
    if any(len(shape) != 1 for shape in lengths.values()) or len(set(lengths.values())) > 1:
        return "arrays of different shapes: " + ", ".join(f"{name} {shape}" for name, shape in lengths.items())
    return None
