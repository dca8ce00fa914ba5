"""Reading posts (a sample key and its raw hashtags) from shards, JSON lines and YFCC100M-style TSV.

Formats, told apart by file name (an optional ``.gz``, ``.bz2`` or ``.xz`` after it is decompressed):
- ``*.tar``: WebDataset shards as img2dataset writes them; ``KEY.json`` with a ``tags`` list and/or a
  ``caption``, or a ``KEY.txt`` caption. Every sample is a post, even one whose metadata is unusable.
- ``*.jsonl``, ``*.ndjson``, ``*.json``: one ``{"key", "tags", "caption"}`` object per line.
- ``*.tsv``, ``*.yfcc``, ``yfcc100m_dataset*``: YFCC100M rows (23 columns: photo id first, user tags 9th; or
  the 25-column release with a line number and hash first: photo id 2nd, user tags 11th), or two columns
  ``key<TAB>tags``. User tags are comma-separated and URL-encoded, ``+`` for a space.

Hashtags are the tag list's entries plus the ``#words`` of the caption. Bad input never raises: a bad post is
counted by reason in :class:`InputStats` and given no hashtags (or, with no key to name it, skipped); a file that
cannot be read, or whose rest cannot (cut short), is counted as a file, by name, never as a post.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote_plus

from fastpretrain.errors import DataError, UserError
from fastpretrain.formats.shards import MemberReader, Members, list_shards, load_index
from fastpretrain.hashtags.canonical import MAX_TAG_CHARS

# Post-level reasons that make a post malformed (the share the --max-bad-fraction gate applies to).
MALFORMED_REASONS = frozenset(
    [
        "malformed_json",
        "invalid_utf8",
        "nul_byte",
        "missing_fields",
        "bad_field_type",
        "missing_metadata",
        "bad_columns",
        "key_too_long",
        "duplicate_key",
        "read_error",
    ]
)
# A well-formed post can still carry no hashtag at all: dropped, but not malformed.
EMPTY = "empty_tags"

_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_TSV_SUFFIXES = (".tsv", ".yfcc")
# What a folder or glob of inputs matches (shards.list_shards): the formats above, compressed or not; not the
# shards' .idx files beside them.
INPUT_PATTERNS = (*(f"*{suffix}{compressed}" for suffix in (".tar", *_JSONL_SUFFIXES, *_TSV_SUFFIXES)
                    for compressed in ("", *_COMPRESSED)), "yfcc100m_dataset*")
# A caption's hashtags: '#' not inside a word or an HTML entity (YFCC's "&#39;"), then word characters.
_CAPTION_HASHTAG = re.compile(r"(?<![\w&])#(\w+)")
# YFCC100M column layouts by column count: (key column, user tags column).
_TSV_LAYOUTS = {23: (0, 8), 25: (1, 10), 2: (0, 1)}
_METADATA_EXTS = frozenset(["json", "txt"])
# Label indexes store keys as fixed-width strings (posts x longest key x 4 bytes): one huge key would bloat a
# whole index, and no real sample key comes near this.
MAX_KEY_CHARS = 256
_parse_json = json.JSONDecoder().decode  # json.loads without its per-call argument handling


@dataclass
class InputStats:
    """What reading one or more inputs saw: posts, raw hashtags, and what was skipped, by reason.

    ``skipped_files``: (reason, file, why) per input that could not be read at all (``unreadable``) or only up to
    where it breaks (``truncated``): how many posts they held is not known, so they are no posts.
    """

    posts: int = 0
    raw_hashtags: int = 0
    skipped_posts: Counter = field(default_factory=Counter)  # reason -> posts
    skipped_tags: Counter = field(default_factory=Counter)  # reason -> hashtags
    skipped_files: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def malformed(self) -> int:
        """Posts skipped for malformed input (not for merely having no hashtag)."""
        return sum(n for reason, n in self.skipped_posts.items() if reason in MALFORMED_REASONS)

    @property
    def skipped_file_counts(self) -> dict[str, int]:
        """Files skipped per reason (``unreadable``, ``truncated``)."""
        return dict(sorted(Counter(reason for reason, _, _ in self.skipped_files).items()))

    def skip_file(self, reason: str, path: Path, why: str) -> None:
        self.skipped_files.append((reason, str(path), why))

    def add(self, other: InputStats) -> None:
        self.posts += other.posts
        self.raw_hashtags += other.raw_hashtags
        self.skipped_posts.update(other.skipped_posts)
        self.skipped_tags.update(other.skipped_tags)
        self.skipped_files += other.skipped_files


def input_format(path: Path) -> str:
    """``"shard"``, ``"jsonl"`` or ``"tsv"`` from the file's name; UserError for anything else."""
    name = path.name.lower()
    for suffix in _COMPRESSED:
        name = name.removesuffix(suffix)
    if name.endswith(".tar"):
        return "shard"
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(_TSV_SUFFIXES) or name.startswith("yfcc100m_dataset"):
        return "tsv"
    raise UserError(
        f"cannot tell the format of {path}: expected .tar shards, JSON lines (.jsonl/.ndjson/.json) or "
        "YFCC100M rows (.tsv/.yfcc), optionally compressed (.gz/.bz2/.xz)"
    )


def iter_posts(path: str | Path, stats: InputStats) -> Iterator[tuple[str, list[str]]]:
    """Yield ``(key, hashtags)`` per post of one input file, in file order, counting into ``stats``.

    Hashtags are raw (not normalized); tags over ``MAX_TAG_CHARS`` characters are dropped and counted; a post
    whose key is over ``MAX_KEY_CHARS`` characters is malformed (``key_too_long``) and not yielded.
    """
    path = Path(path)
    reader = {"shard": _shard_posts, "jsonl": _jsonl_posts, "tsv": _tsv_posts}[input_format(path)]
    for key, tags in reader(path, stats):
        stats.posts += 1
        if key is None:  # nothing to name it by: it cannot have a row in the label index
            continue
        if len(key) > MAX_KEY_CHARS:
            stats.skipped_posts["key_too_long"] += 1
            continue
        if tags is None:
            tags = []
        elif not tags:
            stats.skipped_posts[EMPTY] += 1
        stats.raw_hashtags += len(tags)
        yield key, tags


def _bounded(tags: list[str], stats: InputStats) -> list[str]:
    """``tags`` without those over ``MAX_TAG_CHARS`` characters (counted)."""
    kept = [tag for tag in tags if len(tag) <= MAX_TAG_CHARS]
    if len(kept) < len(tags):
        stats.skipped_tags["tag_too_long"] += len(tags) - len(kept)
    return kept


# The readers below yield (key, tags) per post: tags None when the post was malformed (its reason already
# counted), [] when it is well formed without hashtags; key None when the post has none to read.
_Posts = Iterator[tuple["str | None", "list[str] | None"]]


def _hashtags(tags: object, caption: object, stats: InputStats) -> list[str] | None:
    """The post's hashtags from a tag list and a caption, or None (counted) when either has the wrong type."""
    if tags is None:
        tags = []
    try:  # the cheapest check that every tag is a string (this runs once per post)
        if not isinstance(tags, list) or not isinstance(caption, (str, type(None))):
            raise TypeError
        joined = "".join(tags)
    except TypeError:
        stats.skipped_posts["bad_field_type"] += 1
        return None
    if caption is not None and "#" in caption:
        return _bounded(tags + _CAPTION_HASHTAG.findall(caption), stats)
    return tags if len(joined) <= MAX_TAG_CHARS else _bounded(tags, stats)  # no tag can be too long


def _decode_json(raw: bytes, stats: InputStats) -> dict | None:
    if b"\0" in raw:
        stats.skipped_posts["nul_byte"] += 1
        return None
    try:
        text = raw.decode()  # before json.loads, which would first guess the encoding of bytes
    except UnicodeDecodeError:
        stats.skipped_posts["invalid_utf8"] += 1
        return None
    try:
        meta = _parse_json(text)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the decoder's stack allows
        stats.skipped_posts["malformed_json"] += 1
        return None
    if not isinstance(meta, dict):
        stats.skipped_posts["bad_field_type"] += 1
        return None
    return meta


def _metadata_members(path: Path, stats: InputStats) -> Iterator[tuple[str | None, dict[str, bytes] | None]]:
    """``(key, {ext: bytes})`` per sample of a shard, with at least its metadata members (json, txt); None for the
    members when they cannot be read (``read_error``, counted); ``(None, None)`` per duplicate sample (a key seen
    before in the shard: ``duplicate_key``, counted), which gets no label index row.

    Only those members are read, by the offsets of the shard's index (``load_index``: the DALI index beside the
    shard, or its tar headers): the images, nearly all of a shard's bytes, are never read.
    """
    try:
        index = load_index(path)
    except DataError as e:
        stats.skip_file("unreadable", path, str(e))
        return
    reader = MemberReader([path])
    try:
        for key, members in zip(index.keys.tolist(), index.members):
            yield key, _read_members(reader, members, stats)
    finally:
        reader.close()
    for _ in index.duplicates:
        stats.skipped_posts["duplicate_key"] += 1
        yield None, None
    if index.problem is not None:  # a damaged shard: its whole samples were read
        stats.skip_file("truncated", path, f"shard {path}: {index.problem}")


def _read_members(reader: MemberReader, members: Members, stats: InputStats) -> dict[str, bytes] | None:
    try:
        return {ext: reader.read(0, *members[ext]) for ext in _METADATA_EXTS.intersection(members)}
    except OSError:  # the index names bytes the shard does not hold (cut short after it was written)
        stats.skipped_posts["read_error"] += 1
        return None


def _shard_posts(path: Path, stats: InputStats) -> _Posts:
    for key, files in _metadata_members(path, stats):
        if files is None:
            yield key, None
            continue
        caption = None
        if "txt" in files:
            try:
                caption = files["txt"].decode()
            except UnicodeDecodeError:
                stats.skipped_posts["invalid_utf8"] += 1
                yield key, None
                continue
        if "json" not in files:
            if caption is None:
                stats.skipped_posts["missing_metadata"] += 1
                yield key, None
            else:
                yield key, _hashtags(None, caption, stats)
            continue
        meta = _decode_json(files["json"], stats)
        if meta is None:
            yield key, None
        elif meta.get("tags") is None and meta.get("caption") is None and caption is None:
            stats.skipped_posts["missing_fields"] += 1
            yield key, None
        else:
            yield key, _hashtags(meta.get("tags"), meta.get("caption") or caption, stats)


def _lines(path: Path, stats: InputStats) -> Iterator[bytes]:
    """The file's non-blank lines as bytes; a file that cannot be read, or a compressed one cut short, is counted
    (``unreadable`` before its first line, else ``truncated``)."""
    opener = _COMPRESSED.get(path.suffix.lower(), open)
    read_any = False
    try:
        with opener(path, "rb") as f:
            for line in f:
                read_any = True
                if line.strip():
                    yield line
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        why = e.strerror.lower() if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        stats.skip_file("truncated" if read_any else "unreadable", path, f"{path}: {why}")


def _jsonl_posts(path: Path, stats: InputStats) -> _Posts:
    for line in _lines(path, stats):
        meta = _decode_json(line, stats)
        if meta is None:
            yield None, None
            continue
        key = meta.get("key")
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)
        if not isinstance(key, str) or not key:
            stats.skipped_posts["missing_fields"] += 1
            yield None, None
        elif meta.get("tags") is None and meta.get("caption") is None:
            stats.skipped_posts["missing_fields"] += 1
            yield key, None
        else:
            yield key, _hashtags(meta.get("tags"), meta.get("caption"), stats)


def _tsv_posts(path: Path, stats: InputStats) -> _Posts:
    for line in _lines(path, stats):
        if b"\0" in line:
            stats.skipped_posts["nul_byte"] += 1
            yield None, None
            continue
        try:
            text = line.decode().rstrip("\r\n")
        except UnicodeDecodeError:
            stats.skipped_posts["invalid_utf8"] += 1
            yield None, None
            continue
        columns = text.split("\t")
        layout = _TSV_LAYOUTS.get(len(columns))
        if layout is None or not columns[layout[0]]:
            stats.skipped_posts["bad_columns"] += 1
            yield None, None
            continue
        key, tags = columns[layout[0]], columns[layout[1]]
        yield key, _bounded([unquote_plus(tag) for tag in tags.split(",") if tag], stats)


def list_inputs(spec: str | Path | list[str | Path]) -> list[Path]:
    """The input files of ``spec`` (a folder, a glob, a brace pattern, a file, or a list of these): folders and
    globs match the ``INPUT_PATTERNS`` files; UserError when nothing matches or a file given by name is of an
    unknown format."""
    paths = list_shards(spec, INPUT_PATTERNS)
    for path in paths:
        input_format(path)
    return paths
