"""Reading posts from shards, JSON lines and YFCC TSV: every kind of bad input skipped and counted by reason."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from fastpretrain.formats import shards
from fastpretrain.formats.shards import ShardWriter, index_path_for, read_index, write_index_file
from fastpretrain.errors import UserError
from fastpretrain.hashtags import sources
from fastpretrain.hashtags.sources import InputStats, input_format, iter_posts, list_inputs

LONG_TAG = "x" * 10_000

# (key, members, expected hashtags or None when the post is malformed) -- worked out by hand.
SHARD_SAMPLES = [
    ("s00", {"json": json.dumps({"tags": ["Car", "#cars"], "caption": "fun #Dog day, &#39;quote&#39;"}).encode()},
     ["Car", "#cars", "Dog"]),
    ("s01", {"json": b'{"tags": ['}, None),  # malformed_json
    ("s02", {"json": b'{"tags": ["\xff\xfe"]}'}, None),  # invalid_utf8
    ("s03", {"json": b'{"url": "http://x"}'}, None),  # missing_fields
    ("s04", {"json": b'{"tags": [], "caption": "no tags here"}'}, []),  # empty_tags
    ("s05", {"json": json.dumps({"tags": [LONG_TAG, "tree"]}).encode()}, ["tree"]),  # one tag_too_long
    ("s06", {"json": json.dumps({"tags": ["😀", "🎉"]}).encode()}, ["😀", "🎉"]),  # kept here, no synset later
    ("s07", {"json": b'{"tags": ["a\x00b"]}'}, None),  # nul_byte
    ("s08", {"txt": "a photo #sunset".encode()}, ["sunset"]),
    ("s09", {"jpg": b"\xff\xd8 not really"}, None),  # missing_metadata
    ("s10", {"json": b'{"tags": "car"}'}, None),  # bad_field_type
    ("s11", {"json": b"[1, 2]"}, None),  # bad_field_type
    ("s12", {"jpg": b"\xff\xd8", "json": json.dumps({"tags": ["kitty"], "caption": None}).encode()}, ["kitty"]),
    ("s13", {"json": b"[" * 100_000}, None),  # malformed_json: nested past the decoder's recursion limit
]
SHARD_REASONS = {"malformed_json": 2, "invalid_utf8": 1, "missing_fields": 1, "empty_tags": 1, "nul_byte": 1,
                 "missing_metadata": 1, "bad_field_type": 2}


def read(path: Path) -> tuple[list[tuple[str, list[str]]], InputStats]:
    stats = InputStats()
    return list(iter_posts(path, stats)), stats


def write_shard(path: Path, samples, write_index: bool = False) -> Path:
    with ShardWriter(path, write_index=write_index) as writer:
        for key, members, _ in samples:
            writer.write(key, members)
    return path


@pytest.mark.parametrize("indexed", [False, True])  # metadata members found by scanning, or by the DALI index
def test_shard_posts_and_reasons(tmp_path, monkeypatch, indexed):
    shard = write_shard(tmp_path / "00000.tar", SHARD_SAMPLES, write_index=indexed)
    if indexed:  # the index file must be enough: scanning the shard is not allowed
        monkeypatch.setattr(shards, "scan_shard", None)
    posts, stats = read(shard)
    assert [key for key, _ in posts] == [key for key, _, _ in SHARD_SAMPLES]  # every sample keeps its row
    assert [tags for _, tags in posts] == [expected or [] for _, _, expected in SHARD_SAMPLES]
    assert stats.posts == len(SHARD_SAMPLES)
    assert dict(stats.skipped_posts) == SHARD_REASONS
    assert dict(stats.skipped_tags) == {"tag_too_long": 1}
    assert stats.malformed == sum(SHARD_REASONS.values()) - SHARD_REASONS["empty_tags"]
    assert stats.raw_hashtags == sum(len(e or []) for _, _, e in SHARD_SAMPLES)


@pytest.mark.parametrize("index", ["none", "stale"])
def test_truncated_shard_gives_its_whole_samples_and_counts_the_file(tmp_path, index):
    """A shard cut in half and scanned: its whole samples are read; the file, not a post, is counted as truncated."""
    whole = write_shard(tmp_path / "whole.tar", SHARD_SAMPLES, write_index=index != "none")
    data = whole.read_bytes()
    cut = tmp_path / "whole.tar"
    cut.write_bytes(data[: len(data) // 2])
    posts, stats = read(cut)
    assert 0 < len(posts) < len(SHARD_SAMPLES)
    assert posts == [(k, e or []) for k, _, e in SHARD_SAMPLES[: len(posts)]]
    assert "truncated_file" not in stats.skipped_posts and stats.posts == len(posts)
    assert [(reason, path) for reason, path, _ in stats.skipped_files] == [("truncated", str(cut))]


def test_index_naming_bytes_past_the_shards_end_makes_read_errors_not_a_crash(tmp_path, monkeypatch):
    """A shard cut after its index was written (the index as new as the cut, so it is trusted): each post whose
    metadata lies past the cut is a read_error, every other post is read, and nothing is allocated for the
    missing bytes (one index entry claims 2**40 of them)."""
    shard = write_shard(tmp_path / "00000.tar", SHARD_SAMPLES, write_index=True)
    index = read_index(index_path_for(shard))
    key, ext = "s00", "json"
    index.members[0][ext] = (index.members[0][ext][0], 2**40)
    write_index_file(index_path_for(shard), index)
    cut_at = shard.stat().st_size // 2
    shard.write_bytes(shard.read_bytes()[:cut_at])
    stamp = shard.stat().st_mtime_ns
    os.utime(index_path_for(shard), ns=(stamp, stamp))
    monkeypatch.setattr(shards, "scan_shard", None)  # the index file must be what is read
    # By hand from the index: a post is lost when one of its metadata members ends past the cut.
    lost = {k for k, members in zip(index.keys, index.members)
            if any(offset + size > cut_at for e, (offset, size) in members.items() if e in ("json", "txt"))}
    assert key in lost and 1 < len(lost) < len(SHARD_SAMPLES)
    posts, stats = read(shard)
    assert [k for k, _ in posts] == [k for k, _, _ in SHARD_SAMPLES]
    assert [tags for _, tags in posts] == [[] if k in lost else expected or [] for k, _, expected in SHARD_SAMPLES]
    assert stats.skipped_posts["read_error"] == len(lost) and stats.skipped_files == []


def test_unreadable_inputs_are_counted_as_files_saying_why(tmp_path):
    """A gzip-compressed shard, a missing metadata file and a .jsonl.gz that is no gzip hold no post: each is
    counted once under skipped_files with why, and no post is made up for them."""
    plain = write_shard(tmp_path / "plain.tar", SHARD_SAMPLES[:2])
    packed = tmp_path / "packed.tar"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    (tmp_path / "fake.jsonl.gz").write_bytes(b'{"key": "a", "tags": ["dog"]}\n')
    cases = {packed: "gzip-compressed: decompress it, random access needs a plain tar",
             tmp_path / "gone.jsonl": "no such file or directory",
             tmp_path / "fake.jsonl.gz": "BadGzipFile"}
    for path, why in cases.items():
        posts, stats = read(path)
        assert posts == [] and stats.posts == 0 and not stats.skipped_posts
        assert len(stats.skipped_files) == 1
        reason, named, detail = stats.skipped_files[0]
        assert (reason, named) == ("unreadable", str(path)) and why in detail, detail


def test_duplicate_keys_keep_the_first_sample_and_count_the_rest(tmp_path):
    """k.jpg k.json k.jpg k.json: the second k is another sample with the same key; its post is counted as
    duplicate_key (malformed) and the first k's tags are the ones read, whether scanned or read by its index."""
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in [("k.jpg", b"1"), ("k.json", b'{"tags": ["first"]}'), ("k.jpg", b"2"),
                           ("k.json", b'{"tags": ["second"]}'), ("m.json", b'{"tags": ["other"]}'),
                           ("k.json", b'{"tags": ["third"]}')]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for _ in ("scanned", "by its index"):
        posts, stats = read(path)
        assert posts == [("k", ["first"]), ("m", ["other"])]
        assert stats.posts == 4 and dict(stats.skipped_posts) == {"duplicate_key": 2} and stats.malformed == 2
        shards.write_index(path)


JSONL_LINES = [
    (json.dumps({"key": "a", "tags": ["#IceCream", "geese"], "caption": "yum #dessert"}).encode(),
     ("a", ["#IceCream", "geese", "dessert"])),
    (b'{"key": "b", "tags": ["car"', None),  # malformed_json, no key: not yielded
    (b'{"key": "c", "tags": ["\xc3\x28"]}', None),  # invalid_utf8
    (json.dumps({"tags": ["car"]}).encode(), None),  # missing_fields (no key): not yielded
    (json.dumps({"key": "e", "caption": None}).encode(), ("e", [])),  # missing_fields, yielded with no tags
    (json.dumps({"key": 17, "tags": []}).encode(), ("17", [])),  # empty_tags; an integer key is fine
    (b"   ", None),  # a blank line is no post
    (json.dumps({"key": "g", "tags": [1, 2]}).encode(), ("g", [])),  # bad_field_type
    (json.dumps({"key": "h", "tags": ["dog"], "caption": 5}).encode(), ("h", [])),  # bad_field_type
    (json.dumps({"key": "i", "caption": "sunset #beach #Sea"}).encode(), ("i", ["beach", "Sea"])),
    (b"[" * 100_000, None),  # malformed_json: nested past the decoder's recursion limit
    (b'{"key": "j", "tags": ' + b"[" * 100_000, None),  # malformed_json, as deep inside an object
]
JSONL_REASONS = {"malformed_json": 3, "invalid_utf8": 1, "missing_fields": 2, "empty_tags": 1, "bad_field_type": 2}


@pytest.mark.parametrize("compress", [False, True])
def test_jsonl_posts_and_reasons(tmp_path, compress):
    body = b"".join(line + b"\n" for line, _ in JSONL_LINES)
    path = tmp_path / ("meta.jsonl.gz" if compress else "meta.jsonl")
    path.write_bytes(gzip.compress(body) if compress else body)
    posts, stats = read(path)
    assert posts == [e for _, e in JSONL_LINES if e is not None]
    assert stats.posts == len(JSONL_LINES) - 1  # all but the blank line
    assert dict(stats.skipped_posts) == JSONL_REASONS


def test_truncated_compressed_metadata_is_counted_as_a_file(tmp_path):
    """A .jsonl.gz cut in half: the lines before the cut are posts, the file is counted as truncated."""
    body = b"".join(json.dumps({"key": str(i), "tags": ["tree"]}).encode() + b"\n" for i in range(5000))
    packed = gzip.compress(body)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(packed[: len(packed) // 2])
    posts, stats = read(path)
    assert 0 < len(posts) < 5000 and posts == [(str(i), ["tree"]) for i in range(len(posts))]
    assert stats.posts == len(posts) and not stats.skipped_posts
    assert [(reason, named) for reason, named, _ in stats.skipped_files] == [("truncated", str(path))]


def yfcc_row(columns: int, key: str, tags: str) -> str:
    fields = [f"c{i}" for i in range(columns)]
    key_col, tag_col = {23: (0, 8), 25: (1, 10), 2: (0, 1)}[columns]
    fields[key_col], fields[tag_col] = key, tags
    return "\t".join(fields)


def test_yfcc_tsv_rows(tmp_path):
    rows = [
        yfcc_row(23, "1001", "ice+cream,new%20york,dog"),
        yfcc_row(25, "1002", "golden+retriever"),
        yfcc_row(2, "1003", ""),  # empty_tags
        "only\tthree\tcolumns",  # bad_columns
        yfcc_row(23, "", "dog"),  # bad_columns: no key
    ]
    path = tmp_path / "yfcc100m_dataset-0"
    path.write_bytes(("\n".join(rows) + "\n").encode() + b"1004\t\xff\xfe\n" + b"1005\tca\x00t\n")
    posts, stats = read(path)
    assert posts == [("1001", ["ice cream", "new york", "dog"]), ("1002", ["golden retriever"]), ("1003", [])]
    assert stats.posts == 7
    assert dict(stats.skipped_posts) == {"empty_tags": 1, "bad_columns": 2, "invalid_utf8": 1, "nul_byte": 1}


def test_formats_by_name_and_unknown_files_refused(tmp_path):
    assert input_format(Path("a/00001.tar")) == "shard"
    assert input_format(Path("m.JSONL.bz2")) == "jsonl"
    assert input_format(Path("y.tsv.xz")) == "tsv"
    with pytest.raises(UserError, match="cannot tell the format of notes.csv"):
        input_format(Path("notes.csv"))
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.csv").write_text("")
    assert list_inputs(str(tmp_path / "*.jsonl")) == [tmp_path / "a.jsonl"]
    with pytest.raises(UserError, match="b.csv"):
        list_inputs([str(tmp_path / "a.jsonl"), str(tmp_path / "b.csv")])


def test_folders_and_globs_of_inputs_take_every_known_format_but_not_index_files(tmp_path):
    """`vocab build --data 'posts/*'` after `data index`: the shards' .idx files (and other strangers) are not
    inputs; shards, JSON lines and TSV, compressed or not, are, by their names as input_format reads them."""
    inputs = ["00000.tar", "m.jsonl.gz", "n.NDJSON", "o.json", "y.tsv.xz", "z.yfcc", "yfcc100m_dataset-3.bz2"]
    for name in [*inputs, "00000.idx", "notes.txt", "00000.labels.npz"]:
        (tmp_path / name).write_bytes(b"")
    expected = sorted(tmp_path / name for name in inputs)
    assert list_inputs(str(tmp_path / "*")) == expected
    assert list_inputs(str(tmp_path)) == expected
    assert {input_format(path) for path in expected} == {"shard", "jsonl", "tsv"}


def test_keys_over_the_limit_are_skipped_as_malformed_and_counted(tmp_path, py_rng):
    rng = py_rng
    limit = sources.MAX_KEY_CHARS
    lengths = [rng.choice([1, limit - 1, limit, limit + 1, 10_000, rng.randint(1, 2 * limit)]) for _ in range(40)]
    keys = [f"{i:03d}".ljust(n, "k") if n >= 3 else "k" * n for i, n in enumerate(lengths)]
    path = tmp_path / "meta.jsonl"
    path.write_text("".join(json.dumps({"key": key, "tags": ["dog"]}) + "\n" for key in keys))
    posts, stats = read(path)
    assert [key for key, _ in posts] == [key for key in keys if len(key) <= 256]  # the limit, by hand
    long_keys = sum(len(key) > 256 for key in keys)
    assert stats.posts == len(keys) and stats.malformed == long_keys
    assert dict(stats.skipped_posts) == ({"key_too_long": long_keys} if long_keys else {})
