"""Shards: GNU-format writing, listing, reading, and DALI wds2idx index files (checked against DALI's own tools)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from fastpretrain.cli import main as cli_main
from fastpretrain.formats.shards import (
    MemberReader,
    ShardWriter,
    expand_braces,
    index_path_for,
    iter_shard,
    list_shards,
    load_index,
    read_index,
    scan_shard,
    write_index,
)
from fastpretrain.errors import UserError




def random_samples(rng: np.random.Generator, n: int, prefix: str = "") -> dict[str, dict[str, bytes]]:
    """n samples of random bytes; sizes straddle the 512-byte tar block, some are empty."""
    samples = {}
    for i in range(n):
        size = int(rng.choice([0, 1, 511, 512, 513, int(rng.integers(1, 5000))]))
        samples[f"{prefix}{i:06d}"] = {"jpg": rng.bytes(size), "json": f'{{"i": {i}}}'.encode()}
    return samples


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with ShardWriter(path) as writer:
        for key, files in samples.items():
            writer.write(key, files)


def test_writer_makes_gnu_tar_that_tarfile_reads_back(tmp_path, rng):
    samples = random_samples(rng, 7)
    # A name over 100 bytes needs a GNU long-name member, and non-ASCII would need PAX: neither may turn PAX.
    samples["d/" + "k" * 120] = {"jpg": rng.bytes(700), "json": b"{}"}
    samples["caf\u00e9_\u00fc"] = {"jpg": rng.bytes(10), "json": b"{}"}
    write_shard(tmp_path / "a.tar", samples)

    raw = (tmp_path / "a.tar").read_bytes()
    assert raw[257:265] == b"ustar  \x00"  # GNU magic (POSIX ustar/PAX would be b"ustar\x0000")
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
        assert all(m.type != tarfile.XHDTYPE and m.type != tarfile.XGLTYPE for m in members)
        assert not any(m.pax_headers for m in members)
        names = [m.name for m in members]
        expected = [f"{key}.{ext}" for key, files in samples.items() for ext in files]
        assert names == expected  # KEY.jpg then KEY.json, in write order
        for key, files in samples.items():
            for ext, data in files.items():
                assert tar.extractfile(f"{key}.{ext}").read() == data
    assert not list(tmp_path.glob("*.tmp"))


def test_writer_rejects_bad_keys_and_removes_partial_shard(tmp_path):
    with pytest.raises(ValueError):
        with ShardWriter(tmp_path / "b.tar") as writer:
            writer.write("000001", {"jpg": b"x"})
            writer.write("has.dot", {"jpg": b"x"})
    assert not (tmp_path / "b.tar").exists() and not list(tmp_path.iterdir())
    for bad_key in ["", "a b", "/abs", "x/"]:
        with ShardWriter(tmp_path / "c.tar") as writer:
            with pytest.raises(ValueError):
                writer.write(bad_key, {"jpg": b"x"})
            writer.write("ok", {"jpg": b"x"})
    with ShardWriter(tmp_path / "d.tar") as writer:
        writer.write("k", {"jpg": b"x"})
        with pytest.raises(ValueError, match="twice"):
            writer.write("k", {"jpg": b"y"})


def test_index_matches_dalis_wds2idx(tmp_path, rng):
    """DALI's own indexer (GNU tar based) is the reference, for names it handles (up to 100 bytes)."""
    wds2idx = shutil.which("wds2idx", path=os.path.dirname(sys.executable)) or shutil.which("wds2idx")
    if wds2idx is None or shutil.which("tar") is None:
        pytest.skip("DALI's wds2idx or GNU tar not installed")
    write_shard(tmp_path / "00003.tar", random_samples(rng, int(rng.integers(1, 30))))
    subprocess.run([wds2idx, str(tmp_path / "00003.tar"), str(tmp_path / "ref.idx")], check=True, capture_output=True)
    assert (tmp_path / "00003.idx").read_text() == (tmp_path / "ref.idx").read_text()
    (tmp_path / "00003.idx").unlink()
    assert write_index(tmp_path / "00003.tar") == tmp_path / "00003.idx"
    assert (tmp_path / "00003.idx").read_text() == (tmp_path / "ref.idx").read_text()


def test_index_offsets_point_at_member_bytes(tmp_path, rng):
    samples = random_samples(rng, 12)
    samples["x" * 150] = {"jpg": rng.bytes(900), "json": b"{}"}  # wds2idx itself gets GNU long names wrong
    write_shard(tmp_path / "s.tar", samples)
    raw = (tmp_path / "s.tar").read_bytes()
    for index in (read_index(tmp_path / "s.idx"), scan_shard(tmp_path / "s.tar")):
        assert list(index.keys) == list(samples)
        reader = MemberReader([tmp_path / "s.tar"])
        for key, members in zip(index.keys, index.members):
            assert set(members) == set(samples[key])
            for ext, (offset, size) in members.items():
                assert raw[offset: offset + size] == samples[key][ext]
                assert reader.read(0, offset, size) == samples[key][ext]
        reader.close()


def test_load_index_rebuilds_stale_or_corrupt_index(tmp_path, rng):
    write_shard(tmp_path / "s.tar", random_samples(rng, 3))
    first = read_index(tmp_path / "s.idx")
    write_shard(tmp_path / "s2.tar", random_samples(rng, 5, prefix="n"))
    os.replace(tmp_path / "s2.tar", tmp_path / "s.tar")  # a newer shard beside the old index
    later = time.time() + 10
    os.utime(tmp_path / "s.tar", (later, later))
    assert len(first) == 3 and list(load_index(tmp_path / "s.tar").keys) == [f"n{i:06d}" for i in range(5)]
    (tmp_path / "s.idx").write_text("v9 2\ngarbage\n")
    os.utime(tmp_path / "s.idx", (later + 5, later + 5))
    assert len(load_index(tmp_path / "s.tar")) == 5


def test_iter_shard_groups_by_key_and_resumes_at_start(tmp_path, rng):
    samples = random_samples(rng, 9)
    write_shard(tmp_path / "s.tar", samples)
    assert list(iter_shard(tmp_path / "s.tar")) == list(samples.items())
    start = int(rng.integers(0, 10))
    assert list(iter_shard(tmp_path / "s.tar", start=start)) == list(samples.items())[start:]


def test_iter_shard_stops_and_reports_on_truncated_or_garbage_shard(tmp_path, rng):
    samples = random_samples(rng, 10)
    write_shard(tmp_path / "s.tar", samples)
    raw = (tmp_path / "s.tar").read_bytes()
    index = read_index(tmp_path / "s.idx")
    # Cut inside sample 6's jpg: samples 0-5 are whole.
    offset, size = index.members[6]["jpg"]
    (tmp_path / "cut.tar").write_bytes(raw[: offset + size // 2])
    reports = []
    got = list(iter_shard(tmp_path / "cut.tar", on_error=lambda path, msg: reports.append(path)))
    assert got == list(samples.items())[:6] and reports == [tmp_path / "cut.tar"]
    assert list(scan_shard(tmp_path / "cut.tar").keys) == list(samples)[:6]

    (tmp_path / "junk.tar").write_bytes(rng.bytes(3000))
    reports.clear()
    assert list(iter_shard(tmp_path / "junk.tar", on_error=lambda path, msg: reports.append(msg))) == []
    assert len(reports) == 1
    assert list(iter_shard(tmp_path / "missing.tar", on_error=lambda path, msg: reports.append(msg))) == []
    assert len(reports) == 2


def test_list_shards_folder_glob_braces_and_lists(tmp_path):
    for name in ["00000.tar", "00001.tar", "00002.tar", "00010.tar", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    tars = [tmp_path / n for n in ["00000.tar", "00001.tar", "00002.tar", "00010.tar"]]
    assert list_shards(tmp_path) == tars
    assert list_shards(str(tmp_path / "0000?.tar")) == tars[:3]
    assert list_shards(str(tmp_path / "{00000..00002}.tar")) == tars[:3]
    assert list_shards([str(tmp_path / "00010.tar"), str(tmp_path)]) == [tars[3]] + tars[:3]
    assert expand_braces("d/{8..10}/{a,b}.tar") == ["d/8/a.tar", "d/8/b.tar", "d/9/a.tar", "d/9/b.tar",
                                                     "d/10/a.tar", "d/10/b.tar"]
    assert expand_braces("{098..100}") == ["098", "099", "100"]
    with pytest.raises(UserError, match="missing"):
        list_shards(str(tmp_path / "{00000..00003}.tar"))
    with pytest.raises(UserError, match="nothing matches"):
        list_shards(str(tmp_path / "*.tgz"))
    with pytest.raises(UserError, match="no such"):
        list_shards(str(tmp_path / "nope"))
    with pytest.raises(UserError):
        list_shards([])


def test_dali_webdataset_reader_reads_our_shards(tmp_path, rng):
    """DALI's reader, given our index, must return exactly the bytes we wrote."""
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    samples = random_samples(rng, 6)
    for files in samples.values():
        files["jpg"] = files["jpg"] or b"\x00"  # DALI's reader treats an empty member as missing
    write_shard(tmp_path / "00000.tar", samples)

    @pipeline_def(batch_size=len(samples), num_threads=1, device_id=None)
    def read():
        return tuple(fn.readers.webdataset(paths=[str(tmp_path / "00000.tar")],
                                           index_paths=[str(tmp_path / "00000.idx")], ext=["jpg", "json"]))

    pipe = read()
    pipe.build()
    jpgs, jsons = pipe.run()
    for i, files in enumerate(samples.values()):
        assert bytes(np.array(jpgs.at(i))) == files["jpg"]
        assert bytes(np.array(jsons.at(i))) == files["json"]
    assert dali.__version__


def test_cli_data_index_writes_indexes_and_fails_on_unreadable(tmp_path, rng, capsys):
    write_shard(tmp_path / "00000.tar", random_samples(rng, 4))
    write_shard(tmp_path / "00001.tar", random_samples(rng, 2))
    for path in tmp_path.glob("*.idx"):
        path.unlink()
    assert cli_main(["data", "index", str(tmp_path)]) == 0
    assert "wrote 2 index files" in capsys.readouterr().out
    assert len(read_index(index_path_for(tmp_path / "00000.tar"))) == 4
    assert len(read_index(tmp_path / "00001.idx")) == 2

    (tmp_path / "00002.tar").write_bytes(rng.bytes(2000))
    assert cli_main(["data", "index", str(tmp_path / "{00000..00002}.tar")]) == 1
    assert "00002.tar" in capsys.readouterr().err
    assert cli_main(["data", "index", str(tmp_path / "nothing-here")]) == 2
