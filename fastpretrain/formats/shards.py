"""WebDataset tar shards: writing them, listing them, reading them, and their DALI index files.

A shard is a tar of members ``KEY.EXT`` grouped by key (img2dataset's layout: ``000123.jpg``,
``000123.json``). The key is the member name up to the first dot of its last path component, the rule
of both WebDataset and DALI's ``wds2idx``.

We write GNU-format tars: DALI's webdataset reader fails on PAX headers (NVIDIA/DALI issue 3640), and
Python's ``tarfile`` writes PAX by default.

The index file is DALI's ``wds2idx`` format (version ``v1.2``): a line ``v1.2 N``, then one line per
sample, ``ext offset size name`` repeated per member, where ``offset`` is where the member's data
starts. Our stream reads samples by these offsets, so one index serves DALI's reader and ours.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastpretrain.errors import DataError, UserError
from fastpretrain.formats.files import AtomicFile, atomic_write

log = logging.getLogger(__name__)

INDEX_VERSION = "v1.2"
# Fixed member metadata, so the same samples always make byte-identical shards.
_MEMBER_MTIME = 0
_MEMBER_MODE = 0o644


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/000123.seg.png"`` -> ``("dir/000123", "seg.png")``: the key ends at the first dot of the last path part."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def _check_key(key: str) -> None:
    last = key.rsplit("/", 1)[-1]
    # A space would split the index file's fields; a dot would move where the key ends.
    if not last or "." in last or key.startswith("/") or any(c.isspace() or c == "\0" for c in key):
        raise ValueError(f"sample key {key!r}: must be non-empty, relative, without spaces or '.' in its last part")


class ShardWriter:
    """Writes one WebDataset tar shard in GNU tar format, atomically (``files.AtomicFile``: renamed into place on
    close, removed on abort).

    ``write(key, {"jpg": ..., "json": ...})`` adds the members ``KEY.jpg``, ``KEY.json`` in the dict's order.
    With ``write_index`` (the default), the DALI ``wds2idx`` index is written beside the shard on close
    (``index_path_for(path)``), from the offsets recorded while writing.
    """

    def __init__(self, path: str | os.PathLike, write_index: bool = True) -> None:
        self.path = Path(path)
        self.write_index = write_index
        self._file = AtomicFile(self.path)
        self._tar = tarfile.open(fileobj=self._file.file, mode="w", format=tarfile.GNU_FORMAT)
        self._keys: dict[str, None] = {}  # in order
        self._members: list[dict[str, tuple[int, int]]] = []

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Append one sample: a member ``KEY.EXT`` per item of ``files``, in order."""
        _check_key(key)
        if key in self._keys:
            raise ValueError(f"sample key {key!r} written twice to {self.path}")
        if not files:
            raise ValueError(f"sample {key!r} has no files")
        members = {}
        for ext, data in files.items():
            if not ext or "/" in ext:
                raise ValueError(f"sample {key!r}: bad extension {ext!r}")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = _MEMBER_MTIME
            info.mode = _MEMBER_MODE
            self._tar.addfile(info, io.BytesIO(data))
            # addfile has padded the data to a 512-byte block: it started size-rounded-up bytes before here.
            members[ext] = (self._tar.offset - _round_up_block(info.size), info.size)
        self._keys[key] = None
        self._members.append(members)

    def close(self) -> None:
        """Finish the tar, move it into place and write its index."""
        if self._tar.closed:
            return
        self._tar.close()
        self._file.commit()
        if self.write_index:
            write_index_file(index_path_for(self.path), ShardIndex(np.array(list(self._keys), dtype=str), self._members))

    def abort(self) -> None:
        """Drop the partial shard."""
        if not self._tar.closed:
            self._tar.close()
        self._file.abort()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _round_up_block(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


# ----------------------------------------------------------------------------------------------------
# Listing


_BRACE = re.compile(r"\{([^{}]*)\}")
_GLOB_CHARS = re.compile(r"[*?\[]")


def expand_braces(pattern: str) -> list[str]:
    """``"d/{000..002}.tar"`` -> ``d/000.tar, d/001.tar, d/002.tar`` (widths kept); ``{a,b}`` lists too."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    ranged = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if ranged:
        lo, hi = ranged.group(1), ranged.group(2)
        if int(hi) < int(lo):
            raise UserError(f"shard pattern {pattern!r}: range {{{body}}} runs backwards")
        width = len(lo) if lo.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def _list_one(spec: str) -> list[Path]:
    path = Path(spec)
    if _BRACE.search(spec):
        paths = [Path(p) for p in expand_braces(spec)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise UserError(
                f"shard pattern {spec!r}: {len(missing)} of {len(paths)} shards missing, e.g. {missing[0]}"
            )
        return paths
    if _GLOB_CHARS.search(spec):
        return [Path(p) for p in sorted(glob.glob(spec)) if Path(p).is_file()]
    if path.is_dir():
        return sorted(p for p in path.glob("*.tar") if p.is_file())
    if path.is_file():
        return [path]
    raise UserError(f"shards {spec!r}: no such file or folder")


def list_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The shard files of ``spec``: a folder (its ``*.tar``, sorted), a glob, a brace pattern
    ``"data/{00000..00999}.tar"`` (every shard it names must exist), a file, or a list of these.

    Duplicates are dropped, first occurrence kept. Raises UserError when nothing matches.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise UserError("no shards given")
    seen: dict[Path, None] = {}
    for one in specs:
        for path in _list_one(os.fspath(one)):
            seen.setdefault(path, None)
    if not seen:
        raise UserError(f"shards {', '.join(map(os.fspath, specs))}: nothing matches")
    return list(seen)


# ----------------------------------------------------------------------------------------------------
# Reading: one walk over a tar's headers (``scan_shard``) makes the index; samples are read by its offsets


@dataclass
class ShardIndex:
    """Where each sample's members lie in one shard.

    ``keys`` (n,) str; per sample a dict ext -> (offset, size) in ``members``. ``problem`` says why the index
    covers only the first whole samples of a damaged shard (None for a whole one).
    """

    keys: np.ndarray
    members: list[dict[str, tuple[int, int]]]
    problem: str | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def lines(self) -> list[str]:
        """The sample lines of the index file."""
        return [
            " ".join(f"{ext} {off} {size} {key}.{ext}" for ext, (off, size) in parts.items())
            for key, parts in zip(self.keys, self.members)
        ]


def scan_shard(path: str | os.PathLike) -> ShardIndex:
    """Build a shard's index by reading its tar headers (data blocks are skipped, not read).

    Raises DataError naming the shard if it cannot be read at all. A truncated or corrupt shard gives the index
    of its whole samples, with ``problem`` set: the sample being read when the shard broke is kept only if the
    break came between two of its members' samples (a member cut short starts a new key).
    """
    path = Path(path)
    keys: list[str] = []
    members: list[dict[str, tuple[int, int]]] = []
    problem = None
    try:
        size_on_disk = path.stat().st_size
        last_is_whole = False  # whether the break came between two samples, so the last one listed is whole
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if not member.isreg():
                        continue
                    key, ext = split_member_name(member.name)
                    if member.offset_data + member.size > size_on_disk:
                        last_is_whole = not keys or keys[-1] != key
                        raise tarfile.ReadError(f"member {member.name} truncated")
                    if not keys or keys[-1] != key:
                        keys.append(key)
                        members.append({})
                    members[-1][ext] = (member.offset_data, member.size)
                _check_archive_end(tar, size_on_disk)
        except (tarfile.TarError, EOFError) as e:
            if keys and not last_is_whole:
                keys.pop(), members.pop()
            if not keys:
                raise DataError(f"shard {path}: no whole sample in it ({e})") from e
            problem = f"{type(e).__name__}: {e}"
            log.warning("shard %s: %s; using its first %d samples", path, e, len(keys))
    except OSError as e:
        raise DataError(f"shard {path}: {e}") from e
    return ShardIndex(np.array(keys, dtype=str), members, problem)


def _check_archive_end(tar: tarfile.TarFile, size_on_disk: int) -> None:
    """ReadError unless the archive's end-of-archive blocks are there: tarfile reads a shard cut at a
    member boundary as a whole archive, whose last sample may then lack members."""
    if size_on_disk < tar.offset + 2 * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"no end-of-archive marker after {tar.offset} bytes")


ErrorReporter = Callable[[Path, str], None]


def _warn_unreadable(path: Path, message: str) -> None:
    log.warning("shard %s: %s; skipping the rest of it", path, message)


def iter_shard(
    path: str | os.PathLike, start: int = 0, on_error: ErrorReporter | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` per sample, grouped by key in tar order, from sample ``start`` on.

    Reads by the shard's index (``load_index``). A missing, truncated or corrupt shard never raises: iteration
    stops after the last whole sample and ``on_error(path, message)`` is called once (default: a logged
    warning). Non-file members are skipped.
    """
    path = Path(path)
    report = on_error or _warn_unreadable
    try:
        index = load_index(path)
    except DataError as e:
        report(path, str(e))
        return
    reader = MemberReader([path])
    try:
        for key, members in zip(index.keys[start:].tolist(), index.members[start:]):
            yield key, {ext: reader.read(0, offset, size) for ext, (offset, size) in members.items()}
    except OSError as e:  # cut short after its index was written
        report(path, f"{type(e).__name__}: {e}")
        return
    finally:
        reader.close()
    if index.problem is not None:
        report(path, index.problem)


# ----------------------------------------------------------------------------------------------------
# Index files (DALI wds2idx format)


def index_path_for(shard: str | os.PathLike) -> Path:
    """The index beside a shard, named as ``wds2idx`` names it: ``data/00012.tar`` -> ``data/00012.idx``."""
    shard = Path(shard)
    return shard.with_name(split_member_name(shard.name)[0] + ".idx")


def write_index_file(path: str | os.PathLike, index: ShardIndex) -> None:
    """Write ``index`` as a ``wds2idx`` file, atomically."""
    with atomic_write(path, "w") as f:
        f.write(f"{INDEX_VERSION} {len(index)}\n" + "".join(line + "\n" for line in index.lines()))


def write_index(shard: str | os.PathLike, index_path: str | os.PathLike | None = None) -> Path:
    """Write the DALI ``wds2idx`` index of a shard (default: beside it); returns the index's path."""
    out = Path(index_path) if index_path is not None else index_path_for(shard)
    shard_index = scan_shard(shard)
    if len(shard_index) == 0:
        raise DataError(f"shard {shard}: no samples")
    write_index_file(out, shard_index)
    return out


def read_index(index_path: str | os.PathLike) -> ShardIndex:
    """Parse a ``wds2idx`` index file. Raises ValueError if it is not one (callers rebuild it then)."""
    text = Path(index_path).read_text()
    head, _, body = text.partition("\n")
    version, _, count = head.partition(" ")
    if version != INDEX_VERSION or not count.isdigit():
        raise ValueError(f"{index_path}: not a {INDEX_VERSION} index")
    keys: list[str] = []
    members: list[dict[str, tuple[int, int]]] = []
    for line in body.splitlines():
        fields = line.split(" ")
        if len(fields) % 4:
            raise ValueError(f"{index_path}: bad line {line[:80]!r}")
        parts = {}
        for i in range(0, len(fields), 4):
            ext, offset, size, name = fields[i : i + 4]
            parts[ext] = (int(offset), int(size))
        keys.append(split_member_name(fields[3])[0])
        members.append(parts)
    if len(keys) != int(count):
        raise ValueError(f"{index_path}: says {count} samples, has {len(keys)}")
    return ShardIndex(np.array(keys, dtype=str), members)


def load_index(shard: str | os.PathLike) -> ShardIndex:
    """The shard's index: from the file beside it when that is at least as new as the shard (the one freshness
    rule), else scanned from the shard's headers. DataError if the shard cannot be read at all."""
    shard = Path(shard)
    idx = index_path_for(shard)
    try:
        if idx.stat().st_mtime_ns >= shard.stat().st_mtime_ns:
            return read_index(idx)
    except (OSError, ValueError) as e:
        if idx.exists():
            log.warning("index %s unusable (%s); scanning the shard instead", idx, e)
    return scan_shard(shard)


class MemberReader:
    """Reads members by (shard, offset, size) with ``os.pread``, keeping the shards open.

    Safe to pickle into DataLoader workers (the open files are not carried; each process opens its own).
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self._fds: dict[int, int] = {}

    def read(self, shard: int, offset: int, size: int) -> bytes:
        """The ``size`` bytes at ``offset`` of shard number ``shard``; OSError if the shard is short or gone."""
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{self.paths[shard]}: {len(data)} of {size} bytes at offset {offset}")
        return data

    def close(self) -> None:
        """Close the open shards."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __getstate__(self) -> dict:
        return {"paths": self.paths, "_fds": {}}

    def __del__(self) -> None:
        self.close()
