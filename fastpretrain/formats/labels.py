"""Per-shard label index: each sample's kept classes as CSR arrays, so training never parses JSON or calls WordNet.

One ``.labels.npz`` file per shard (or per metadata file), rows in the shard's sample order, every sample present
(an image with no kept hashtag has an empty row; the data path excludes it).
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fastpretrain.errors import DataError
from fastpretrain.formats.files import atomic_write

LABEL_INDEX_SUFFIX = ".labels.npz"


def label_index_path(label_dir: str | os.PathLike, shard: str | os.PathLike) -> Path:
    """Where the label index of ``shard`` lives: ``label_dir/<shard stem>.labels.npz``."""
    return Path(label_dir) / f"{Path(shard).stem}{LABEL_INDEX_SUFFIX}"


@dataclass
class LabelIndex:
    """The labels of one shard's samples, in sample order, as CSR arrays.

    ``keys`` (n,) str; ``offsets`` (n+1,) int64 with ``offsets[0] == 0``; ``labels`` (nnz,) int32, each row's
    distinct class ids ascending; ``vocab_hash`` the content hash of the vocabulary the ids refer to.
    """

    keys: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    vocab_hash: str

    def __post_init__(self) -> None:
        self.keys = np.asarray(self.keys, dtype=np.str_)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.int32)
        problem = _layout_problem(self.keys, self.offsets, self.labels)
        if problem:
            raise ValueError(f"LabelIndex: {problem}")

    @classmethod
    def from_rows(cls, keys: Sequence[str], rows: Sequence[Sequence[int]], vocab_hash: str) -> LabelIndex:
        """Build from one list of class ids per sample (deduplicated and sorted here)."""
        if len(keys) != len(rows):
            raise ValueError(f"LabelIndex.from_rows: {len(keys)} keys but {len(rows)} rows")
        distinct = [np.unique(np.asarray(row, dtype=np.int32)) for row in rows]
        offsets = np.zeros(len(distinct) + 1, dtype=np.int64)
        np.cumsum([len(row) for row in distinct], out=offsets[1:])
        labels = np.concatenate(distinct) if distinct else np.zeros(0, dtype=np.int32)
        return cls(np.asarray(list(keys), dtype=np.str_), offsets, labels, vocab_hash)

    def __len__(self) -> int:
        return len(self.keys)

    def labels_of(self, row: int) -> np.ndarray:
        """Class ids (int32, ascending) of sample ``row``; empty when it has no kept hashtag."""
        return self.labels[self.offsets[row] : self.offsets[row + 1]]

    def rows_by_key(self) -> dict[str, int]:
        """Sample key -> row (a key seen twice in a shard maps to its last row)."""
        return {str(key): row for row, key in enumerate(self.keys)}

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a temporary file in the same folder, renamed over ``path``."""
        with atomic_write(path) as f:
            np.savez(
                f,
                keys=self.keys,
                offsets=self.offsets,
                labels=self.labels,
                vocab_hash=np.asarray(self.vocab_hash, dtype=np.str_),
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> LabelIndex:
        """Read a saved index; ``DataError`` naming the file when it is missing or corrupt."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"label index {path} does not exist (run `fastpretrain vocab label` for its shard)")
        try:
            problem = _stored_size_problem(path)
            if problem:
                raise ValueError(problem)
            with np.load(path, allow_pickle=False) as npz:
                keys, offsets, labels = npz["keys"], npz["offsets"], npz["labels"]
                vocab_hash = str(npz["vocab_hash"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"label index {path} is corrupt: {e}") from None
        problem = _dtype_problem(keys, offsets, labels) or _layout_problem(keys, offsets, labels)
        if problem:
            raise DataError(f"label index {path} is corrupt: {problem}")
        return cls(keys, offsets, labels, vocab_hash)


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _stored_size_problem(path: Path) -> str | None:
    """Why the file's arrays could make ``np.load`` allocate more than the file holds, or None. Each must be stored
    uncompressed, as ``np.savez`` writes them, and its header claim no more bytes than follow it: numpy allocates
    what a header claims before reading (2**40 entries: a MemoryError)."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                return f"{info.filename} is compressed (label indexes are written uncompressed)"
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = _NPY_HEADER_READERS.get(version)
                if read_header is None:
                    return f"{info.filename}: .npy format version {version}"
                shape, _, dtype = read_header(member)
                claimed, held = math.prod(shape) * dtype.itemsize, info.file_size - member.tell()
                if claimed > held:
                    return f"{info.filename} claims {claimed} bytes of data and holds {held}"
    return None


def _dtype_problem(keys: np.ndarray, offsets: np.ndarray, labels: np.ndarray) -> str | None:
    if keys.dtype.kind != "U":
        return f"keys have dtype {keys.dtype}, expected str"
    if offsets.dtype != np.int64:
        return f"offsets have dtype {offsets.dtype}, expected int64"
    if labels.dtype != np.int32:
        return f"labels have dtype {labels.dtype}, expected int32"
    return None


def _layout_problem(keys: np.ndarray, offsets: np.ndarray, labels: np.ndarray) -> str | None:
    """What breaks the CSR contract, or None (checked on every load: a bad index must not reach training)."""
    if keys.ndim != 1 or offsets.ndim != 1 or labels.ndim != 1:
        return "keys, offsets and labels must be 1-D"
    if len(offsets) != len(keys) + 1:
        return f"{len(offsets)} offsets for {len(keys)} keys (expected n + 1)"
    if offsets[0] != 0 or offsets[-1] != len(labels):
        return f"offsets run from {offsets[0]} to {offsets[-1]}, expected 0 to {len(labels)}"
    if np.any(np.diff(offsets) < 0):
        return "offsets decrease"
    if len(labels) and labels.min() < 0:
        return "negative class id"
    # Within each row labels must strictly increase: distinct and ascending.
    steps = np.diff(labels.astype(np.int64))  # (nnz - 1,)
    row_starts = np.zeros(len(labels), dtype=bool)
    row_starts[offsets[1:-1][offsets[1:-1] < len(labels)]] = True
    if np.any((steps <= 0) & ~row_starts[1:]):
        return "a row's labels are not distinct and ascending"
    return None
