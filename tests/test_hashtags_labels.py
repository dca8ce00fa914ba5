"""LabelIndex: CSR layout, save/load round trip, and a clear DataError for every way a file can be bad."""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fastpretrain.errors import DataError
from fastpretrain.formats.labels import LabelIndex, label_index_path




def random_rows(rng: np.random.Generator, n: int, classes: int) -> list[list[int]]:
    """Rows with repeats and any order, some empty, as a tagger would produce them."""
    return [rng.integers(0, classes, size=rng.integers(0, 6)).tolist() for _ in range(n)]


def test_label_index_path_names_the_index_after_the_shard_stem():
    assert label_index_path("corpus/labels", "corpus/train/00012.tar") == Path("corpus/labels/00012.labels.npz")
    assert label_index_path(Path("/x"), "meta/part-3.jsonl") == Path("/x/part-3.labels.npz")


def test_from_rows_builds_distinct_ascending_csr(rng):
    rows = random_rows(rng, 50, 9)
    keys = [f"k{i:04d}" for i in range(50)]
    index = LabelIndex.from_rows(keys, rows, "hash")
    assert len(index) == 50
    assert index.offsets.dtype == np.int64 and index.labels.dtype == np.int32
    assert index.offsets[0] == 0 and index.offsets[-1] == len(index.labels)
    for i, row in enumerate(rows):
        assert index.labels_of(i).tolist() == sorted(set(row))
    assert index.rows_by_key() == {key: i for i, key in enumerate(keys)}


def test_save_load_round_trip_is_exact_and_leaves_no_temporary(tmp_path, rng):
    keys = [f"{i:09d}" for i in range(200)]
    index = LabelIndex.from_rows(keys, random_rows(rng, 200, 17000), "abc123")
    path = label_index_path(tmp_path / "labels", "00007.tar")
    index.save(path)
    loaded = LabelIndex.load(path)
    assert loaded.keys.tolist() == keys
    np.testing.assert_array_equal(loaded.offsets, index.offsets)
    np.testing.assert_array_equal(loaded.labels, index.labels)
    assert loaded.labels.dtype == np.int32 and loaded.offsets.dtype == np.int64
    assert loaded.vocab_hash == "abc123"
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_empty_index_round_trips(tmp_path):
    index = LabelIndex.from_rows([], [], "h")
    index.save(tmp_path / "e.labels.npz")
    loaded = LabelIndex.load(tmp_path / "e.labels.npz")
    assert len(loaded) == 0 and loaded.offsets.tolist() == [0]


def test_constructor_rejects_broken_csr():
    with pytest.raises(ValueError, match="offsets"):
        LabelIndex(np.array(["a", "b"]), np.array([0, 1]), np.array([3], dtype=np.int32), "h")
    with pytest.raises(ValueError, match="distinct and ascending"):
        LabelIndex(np.array(["a"]), np.array([0, 2]), np.array([3, 3], dtype=np.int32), "h")
    with pytest.raises(ValueError, match="distinct and ascending"):
        LabelIndex(np.array(["a"]), np.array([0, 2]), np.array([4, 3], dtype=np.int32), "h")
    # Descending across a row boundary is fine: each row is its own list.
    LabelIndex(np.array(["a", "b"]), np.array([0, 1, 2]), np.array([4, 3], dtype=np.int32), "h")


def test_load_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match="00003.labels.npz"):
        LabelIndex.load(tmp_path / "00003.labels.npz")


def test_load_corrupt_files_raise_data_error_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.labels.npz"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="garbage.labels.npz"):
        LabelIndex.load(garbage)

    good = tmp_path / "good.labels.npz"
    LabelIndex.from_rows(["a", "b"], [[1], [2, 5]], "h").save(good)
    truncated = tmp_path / "cut.labels.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.labels.npz"):
        LabelIndex.load(truncated)

    missing_array = tmp_path / "partial.labels.npz"
    np.savez(missing_array, keys=np.array(["a"]), offsets=np.array([0, 1]))
    with pytest.raises(DataError, match="partial.labels.npz"):
        LabelIndex.load(missing_array)

    bad_layout = tmp_path / "layout.labels.npz"
    np.savez(bad_layout, keys=np.array(["a", "b"]), offsets=np.array([0, 3, 2], dtype=np.int64),
             labels=np.array([1, 2], dtype=np.int32), vocab_hash=np.array("h"))
    with pytest.raises(DataError, match="layout.labels.npz.*decrease"):
        LabelIndex.load(bad_layout)

    pickled = tmp_path / "pickled.labels.npz"
    np.savez(pickled, keys=np.array([object()], dtype=object), offsets=np.array([0, 0], dtype=np.int64),
             labels=np.zeros(0, dtype=np.int32), vocab_hash=np.array("h"))
    with pytest.raises(DataError, match="pickled.labels.npz"):
        LabelIndex.load(pickled)
    assert zipfile.is_zipfile(pickled)  # it was a well-formed npz: the refusal is about its content


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_index_has_the_mode_a_plain_open_gives(tmp_path, umask):
    from fastpretrain.formats import files

    files.shared_file_mode.cache_clear()  # the mode is read once per process: read it under this umask
    previous = os.umask(umask)
    try:
        (tmp_path / "plain").write_bytes(b"")
        LabelIndex.from_rows(["a"], [[1]], "h").save(tmp_path / "x.labels.npz")
    finally:
        os.umask(previous)
        files.shared_file_mode.cache_clear()
    plain = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert plain == 0o666 & ~umask  # the premise
    assert stat.S_IMODE((tmp_path / "x.labels.npz").stat().st_mode) == plain


def test_headers_claiming_more_than_the_file_holds_are_corrupt_not_a_memory_error(tmp_path):
    """numpy allocates what an array's header claims before reading it: a label index claiming 2**40 offsets
    (8 TiB) in a file of a few hundred bytes is a DataError, as is a compressed one, whose members could expand
    without bound (np.savez, which writes them, stores them uncompressed)."""
    good = tmp_path / "good.labels.npz"
    LabelIndex.from_rows(["a", "b"], [[1], [2, 5]], "h").save(good)
    huge = tmp_path / "huge.labels.npz"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(huge, "w") as target:
        for info in source.infolist():
            body = source.read(info)
            if info.filename == "offsets.npy":
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(header, {"descr": "<i8", "fortran_order": False,
                                                              "shape": (2**40,)})
                body = header.getvalue() + body[len(header.getvalue()):]
            target.writestr(info.filename, body)
    with pytest.raises(DataError, match=r"huge.labels.npz is corrupt: offsets.npy claims 8796093022208 bytes"):
        LabelIndex.load(huge)
    packed = tmp_path / "packed.labels.npz"
    np.savez_compressed(packed, keys=np.array(["a"]), offsets=np.array([0, 1], dtype=np.int64),
                        labels=np.array([3], dtype=np.int32), vocab_hash=np.array("h"))
    with pytest.raises(DataError, match="packed.labels.npz is corrupt: .* is compressed"):
        LabelIndex.load(packed)
    assert LabelIndex.load(good).labels.tolist() == [1, 2, 5]
