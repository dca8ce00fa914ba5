"""WebDataset tar shards: writing them, listing them, reading them, and their DALI index files.

A shard is a tar of members ``KEY.EXT`` grouped by key (img2dataset's layout: ``000123.jpg``,
``000123.json``). The key is the member name up to the first dot of its last path component, the rule
of both WebDataset and DALI's ``wds2idx``. A key names one sample: a later sample with a key already seen in the
shard (two ``KEY.jpg``) is set aside as a duplicate, whether the index is scanned or read from its file.

We write GNU-format tars: DALI's webdataset reader fails on PAX headers (NVIDIA/DALI issue 3640), and
Python's ``tarfile`` writes PAX by default.

The index file is DALI's ``wds2idx`` format (version ``v1.2``): a line ``v1.2 N``, then one line per
sample, ``ext offset size name`` repeated per member, where ``offset`` is where the member's data
starts. Our stream reads samples by these offsets, so one index serves DALI's reader and ours.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import logging
import math
import os
import re
import stat
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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
_RANGE = re.compile(r"(\d+)\.\.(\d+)")
_GLOB_CHARS = re.compile(r"[*?\[]")
# More paths than this from one brace pattern is a slip (a digit too many), not a data set: refused before the
# paths are made (a billion of them would be ~100 GB of strings).
MAX_PATTERN_PATHS = 1_000_000
# What a folder or a glob matches when listing shards: a folder of shards also holds their .idx index files.
SHARD_PATTERNS = ("*.tar",)


def _brace_choices(body: str, pattern: str) -> tuple[int, Iterator[str]]:
    """How many choices a brace group's ``body`` (``000..099`` or ``a,b``) has, and the choices, made lazily."""
    ranged = _RANGE.fullmatch(body)
    if not ranged:
        choices = body.split(",")
        return len(choices), iter(choices)
    lo, hi = int(ranged.group(1)), int(ranged.group(2))
    if hi < lo:
        raise UserError(f"pattern {pattern!r}: range {{{body}}} runs backwards")
    width = len(ranged.group(1)) if ranged.group(1).startswith("0") else 0
    return hi - lo + 1, (str(i).zfill(width) for i in range(lo, hi + 1))


def _count_paths(pattern: str, limit: int) -> int:
    """How many paths ``pattern``'s braces make, counted without making them (exactly up to ``limit``; past it,
    some number over it)."""
    groups = list(_BRACE.finditer(pattern))
    if not groups:
        return 1
    if not _BRACE.search(_BRACE.sub("", pattern)):  # no group inside another: their choices multiply
        return math.prod(_brace_choices(group.group(1), pattern)[0] for group in groups)
    # Nested groups (``{a,{b,c}}``, rare): each choice of the innermost first one may shape the others.
    first = groups[0]
    total = 0
    for choice in _brace_choices(first.group(1), pattern)[1]:
        total += _count_paths(pattern[: first.start()] + choice + pattern[first.end() :], limit - total)
        if total > limit:
            break
    return total


def expand_braces(pattern: str) -> list[str]:
    """``"d/{000..002}.tar"`` -> ``d/000.tar, d/001.tar, d/002.tar`` (widths kept); ``{a,b}`` lists too.

    UserError for a pattern naming more than ``MAX_PATTERN_PATHS`` paths, before any is made."""
    if _count_paths(pattern, MAX_PATTERN_PATHS) > MAX_PATTERN_PATHS:
        raise UserError(f"pattern {pattern!r} names more than {MAX_PATTERN_PATHS:,} paths: "
                        "split it into smaller ones, or give the folder")
    return _expand(pattern)


def _expand(pattern: str) -> list[str]:
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [path for choice in _brace_choices(match.group(1), pattern)[1] for path in _expand(head + choice + tail)]


def _named_like(path: str | Path, patterns: Sequence[str]) -> bool:
    name = os.path.basename(path).lower()
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _list_one(spec: str, patterns: Sequence[str]) -> list[Path]:
    path = Path(spec)
    # What exists is taken as it is, even when its name holds [ ] { }, the pattern characters.
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and _named_like(p, patterns))
    if _BRACE.search(spec):
        paths = [Path(p) for p in expand_braces(spec)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"pattern {spec!r}: {len(missing)} of {len(paths)} files missing, e.g. {missing[0]}")
        return paths
    if _GLOB_CHARS.search(spec):
        return [Path(p) for p in sorted(glob.glob(spec)) if os.path.isfile(p) and _named_like(p, patterns)]
    raise UserError(f"{spec!r}: no such file or folder")


def list_shards(spec: str | os.PathLike | Sequence[str | os.PathLike],
                patterns: Sequence[str] = SHARD_PATTERNS) -> list[Path]:
    """The files of ``spec``: a file (taken as it is, whatever its name), a folder (its files named like one of
    ``patterns``, sorted; case does not count), a glob (the files it matches named like ``patterns``), a brace
    pattern ``"data/{00000..00999}.tar"`` (every file it names must exist), or a list of these. A path that exists
    is never read as a pattern: ``a[1].tar`` is that file.

    ``patterns`` (``fnmatch``, lower case) default to ``SHARD_PATTERNS``, tar shards; ``hashtags.sources`` passes
    its metadata formats too. Duplicates are dropped, first occurrence kept. UserError when nothing matches.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise UserError("no shards given")
    seen: dict[Path, None] = {}
    for one in specs:
        for path in _list_one(os.fspath(one), patterns):
            seen.setdefault(path, None)
    if not seen:
        raise UserError(f"{', '.join(map(os.fspath, specs))}: nothing matches (folders and globs take files "
                        f"named {' '.join(patterns)})")
    return list(seen)


# ----------------------------------------------------------------------------------------------------
# Reading: one walk over a tar's headers (``scan_shard``) makes the index; samples are read by its offsets

Members = dict[str, tuple[int, int]]  # ext -> (offset, size) of one sample's members


@dataclass
class ShardIndex:
    """Where each sample's members lie in one shard.

    ``keys`` (n,) str; per sample a dict ext -> (offset, size) in ``members``. ``problem`` says why the index
    covers only the first whole samples of a damaged shard (None for a whole one). ``duplicates``: the samples
    skipped because an earlier sample of the shard has their key, as (key, members); each key names one sample
    (a label index row), so only the first is read.
    """

    keys: np.ndarray
    members: list[Members]
    problem: str | None = None
    duplicates: list[tuple[str, Members]] = field(default_factory=list)

    @classmethod
    def of_samples(cls, samples: list[tuple[str, Members]], problem: str | None = None) -> ShardIndex:
        """The index of a shard's samples in tar order, a key's first sample kept and the later ones set aside."""
        seen: set[str] = set()
        kept, duplicates = [], []
        for key, members in samples:
            (duplicates if key in seen else kept).append((key, members))
            seen.add(key)
        return cls(np.array([key for key, _ in kept], dtype=str), [members for _, members in kept], problem,
                   duplicates)

    def __len__(self) -> int:
        return len(self.keys)

    def lines(self) -> list[str]:
        """The sample lines of the index file, duplicates included (in tar order), so reading the file sets aside
        the same samples as scanning the shard."""
        samples = sorted([*zip(self.keys.tolist(), self.members), *self.duplicates],
                         key=lambda sample: min(offset for offset, _ in sample[1].values()))
        return [" ".join(f"{ext} {off} {size} {key}.{ext}" for ext, (off, size) in parts.items())
                for key, parts in samples]


# The first bytes of the compressed files a shard might be: random access by offset needs the plain tar.
_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _check_plain_file(path: Path) -> int:
    """The shard's size; DataError saying why when it cannot be opened or is a compressed file."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise DataError(f"shard {path}: cannot read it ({(e.strerror or str(e)).lower()})") from None
    for magic, name in _COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            raise DataError(f"shard {path}: {name}-compressed: decompress it, random access needs a plain tar")
    return size


def _is_sample_member(member: tarfile.TarInfo) -> bool:
    """Regular files named by a relative path that stays inside the shard, with an extension: links, devices,
    fifos and folders hold no sample, and an absolute or ``..`` name would not name a place in the shard."""
    name = member.name
    return (member.isreg() and not name.startswith("/") and ".." not in name.split("/")
            and split_member_name(name)[1] != "")


def scan_shard(path: str | os.PathLike) -> ShardIndex:
    """Build a shard's index by reading its tar headers (data blocks are skipped, not read).

    Members of one sample are consecutive and share the key; a member whose extension the sample already has
    starts another sample (set aside as a duplicate: ``ShardIndex.of_samples``). Raises DataError naming the shard
    and why if it cannot be read at all (unopenable, compressed, no whole sample). A truncated or corrupt shard
    gives the index of its whole samples, with ``problem`` set: the sample being read when the shard broke is kept
    only if the break came between two of its members' samples (a member cut short starts a new key).
    """
    path = Path(path)
    size_on_disk = _check_plain_file(path)
    samples: list[tuple[str, Members]] = []
    problem = None
    try:
        last_is_whole = False  # whether the break came between two samples, so the last one listed is whole
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if not _is_sample_member(member):
                        continue
                    key, ext = split_member_name(member.name)
                    starts_sample = not samples or samples[-1][0] != key or ext in samples[-1][1]
                    if member.offset_data + member.size > size_on_disk:
                        last_is_whole = starts_sample
                        raise tarfile.ReadError(f"member {member.name} truncated")
                    if starts_sample:
                        samples.append((key, {}))
                    samples[-1][1][ext] = (member.offset_data, member.size)
                _check_archive_end(tar, size_on_disk)
        except (tarfile.TarError, EOFError) as e:
            if samples and not last_is_whole:
                samples.pop()
            if not samples:
                raise DataError(f"shard {path}: no whole sample in it ({e})") from e
            problem = f"{type(e).__name__}: {e}"
            log.warning("shard %s: %s; using its first %d samples", path, e, len(samples))
    except OSError as e:
        raise DataError(f"shard {path}: {e}") from e
    return ShardIndex.of_samples(samples, problem)


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
    warning). Non-file members and duplicate samples are skipped.
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
    lines = index.lines()
    with atomic_write(path, "w") as f:
        f.write(f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines))


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
    samples: list[tuple[str, Members]] = []
    for line in body.splitlines():
        fields = line.split(" ")
        groups = [fields[i : i + 4] for i in range(0, len(fields), 4)]  # ext offset size name, per member
        if len(fields) % 4 or not all(offset.isdigit() and size.isdigit() for _, offset, size, _ in groups):
            raise ValueError(f"{index_path}: bad line {line[:80]!r}")
        members = {ext: (int(offset), int(size)) for ext, offset, size, _ in groups}
        samples.append((split_member_name(fields[3])[0], members))
    if len(samples) != int(count):
        raise ValueError(f"{index_path}: says {count} samples, has {len(samples)}")
    return ShardIndex.of_samples(samples)


def load_index(shard: str | os.PathLike) -> ShardIndex:
    """The shard's index: from the file beside it when that is at least as new as the shard (the one freshness
    rule), else scanned from the shard's headers. DataError saying why if the shard cannot be read at all
    (checked even when the index file is there: it alone would not tell)."""
    shard = Path(shard)
    _check_plain_file(shard)
    idx = index_path_for(shard)
    try:
        found = idx.stat()
        # A regular file only: reading a fifo put there would wait forever.
        if stat.S_ISREG(found.st_mode) and found.st_mtime_ns >= shard.stat().st_mtime_ns:
            return read_index(idx)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        log.warning("index %s unusable (%s); scanning the shard instead", idx, e)
    return scan_shard(shard)


class MemberReader:
    """Reads members by (shard, offset, size) with ``os.pread``, keeping the last ``MAX_OPEN`` shards it read open
    (an ImageFolder's files are a million one-sample "shards": all open would exhaust the process's descriptors).

    Safe to pickle into DataLoader workers (the open files are not carried; each process opens its own).
    """

    MAX_OPEN = 64  # the stream's windowed shuffle reads a few shards at a time; the oldest is closed first

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self._fds: dict[int, int] = {}  # in the order opened
        self._sizes: dict[int, int] = {}  # per open shard, from one fstat

    def read(self, shard: int, offset: int, size: int) -> bytes:
        """The ``size`` bytes at ``offset`` of shard number ``shard``; OSError if the shard is short or gone.

        Checked against the shard's size before reading: an index naming more bytes than the shard holds (a
        damaged or hostile ``.idx``: 2**40) must not make ``pread`` allocate them."""
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= self.MAX_OPEN:
                oldest = next(iter(self._fds))
                os.close(self._fds.pop(oldest))
                del self._sizes[oldest]
            fd = os.open(self.paths[shard], os.O_RDONLY)
            self._fds[shard], self._sizes[shard] = fd, os.fstat(fd).st_size
        if offset < 0 or size < 0 or offset + size > self._sizes[shard]:
            raise OSError(f"{self.paths[shard]}: {size} bytes at offset {offset} run past its end "
                          f"({self._sizes[shard]} bytes)")
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{self.paths[shard]}: {len(data)} of {size} bytes at offset {offset}")
        return data

    def close(self) -> None:
        """Close the open shards."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._sizes.clear()

    def __getstate__(self) -> dict:
        return {"paths": self.paths, "_fds": {}, "_sizes": {}}

    def __del__(self) -> None:
        self.close()
