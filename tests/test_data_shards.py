"""Shards: GNU-format writing, listing, reading, and DALI wds2idx index files (checked against DALI's own tools)."""

from __future__ import annotations

import bz2
import contextlib
import ctypes
import gzip
import io
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fastpretrain.cli import main as cli_main
from fastpretrain.formats import shards
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
from fastpretrain.errors import DataError, UserError




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
    with pytest.raises(UserError, match=r"nothing matches \(folders and globs take files named \*\.tar\)"):
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


def test_folders_and_globs_list_only_tar_files_and_existing_paths_are_taken_as_they_are(tmp_path):
    """A folder of shards after `data index` also holds their .idx files: neither the folder nor `shards/*` lists
    them. A path that exists is that file, even when its name holds the pattern characters [ ] { }."""
    for name in ["00000.tar", "00001.TAR", "00000.idx", "00001.idx", "notes.txt", "x[1]{a,b}.tar"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.tar").mkdir()  # a folder named like a shard is none
    tars = [tmp_path / name for name in ["00000.tar", "00001.TAR", "x[1]{a,b}.tar"]]
    assert list_shards(tmp_path) == tars
    assert list_shards(str(tmp_path / "*")) == tars
    assert list_shards(str(tmp_path / "x[1]{a,b}.tar")) == [tmp_path / "x[1]{a,b}.tar"]
    assert list_shards(str(tmp_path / "00000.idx")) == [tmp_path / "00000.idx"]  # named: taken as given
    assert list_shards(str(tmp_path / "*"), patterns=("*.idx", "*.txt")) == [
        tmp_path / name for name in ["00000.idx", "00001.idx", "notes.txt"]]


def test_brace_patterns_naming_too_many_paths_are_refused_before_they_are_made(tmp_path, monkeypatch):
    """A hundred million names would take minutes and gigabytes to make: refused at once by counting. The counts
    are by hand: ranges and lists multiply; a nested group is expanded as written ({a,{b,c}} makes a, b, a, c)."""
    with pytest.raises(UserError, match=r"names more than 1,000,000 paths"):
        list_shards(str(tmp_path / "{00000000..99999999}.tar"))
    with pytest.raises(UserError, match=r"names more than 1,000,000 paths"):
        expand_braces("{0..9999}/{0..9999}/{a,b}")
    monkeypatch.setattr(shards, "MAX_PATTERN_PATHS", 12)
    for pattern, count in [("{0..11}", 12), ("{0..3}-{a,b,c}", 12), ("{a,{b,c}}{0..2}", 12), ("x{}y{0..11}", 12),
                           ("{0..12}", 13), ("{1..2}{1..2}{1..3}x", 12), ("{0..3}{a,b,c,}", 16),
                           ("{a,{b,{c,d}}}{1..3}", 24)]:
        if count <= 12:
            assert len(expand_braces(pattern)) == count, pattern
        else:
            with pytest.raises(UserError, match="names more than 12 paths"):
                expand_braces(pattern)


def test_member_reader_refuses_reads_past_the_shards_end_without_allocating_them(tmp_path, rng):
    """An index naming a member of 2**40 bytes (damaged or hostile): an OSError (a read_error to the loaders),
    not a MemoryError from pread allocating a terabyte; so are negative offsets and sizes."""
    samples = random_samples(rng, 3)
    write_shard(tmp_path / "s.tar", samples)
    index = read_index(tmp_path / "s.idx")
    size = (tmp_path / "s.tar").stat().st_size
    reader = MemberReader([tmp_path / "s.tar"])
    offset = index.members[1]["jpg"][0]
    for bad_offset, bad_size in [(offset, 2**40), (size, 1), (offset, size), (-1, 1), (offset, -1)]:
        with pytest.raises(OSError, match="run past its end"):
            reader.read(0, bad_offset, bad_size)
    assert reader.read(0, *index.members[1]["jpg"]) == samples["000001"]["jpg"]
    assert reader.read(0, size, 0) == b""
    reader.close()
    # A negative number in an index file makes it no index: the shard is scanned instead.
    text = (tmp_path / "s.idx").read_text().replace(f" {index.members[1]['json'][1]} ", " -5 ", 1)
    (tmp_path / "s.idx").write_text(text)
    with pytest.raises(ValueError, match="bad line"):
        read_index(tmp_path / "s.idx")
    assert list(load_index(tmp_path / "s.tar").keys) == list(samples)


def test_a_fifo_in_place_of_the_index_is_not_waited_on(tmp_path, rng):
    """Opening a fifo for reading waits for a writer, forever: load_index scans the shard instead."""
    samples = random_samples(rng, 2)
    write_shard(tmp_path / "s.tar", samples)
    (tmp_path / "s.idx").unlink()
    os.mkfifo(tmp_path / "s.idx")
    found = []
    worker = threading.Thread(target=lambda: found.append(load_index(tmp_path / "s.tar")), daemon=True)
    worker.start()
    worker.join(60)  # a hang detector, not a speed check: the scan takes milliseconds
    assert found and list(found[0].keys) == list(samples)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@contextlib.contextmanager
def modes_enforced():
    """File modes as an ordinary user meets them: root reads any file (capabilities DAC_OVERRIDE and
    DAC_READ_SEARCH), so they are dropped from this thread's effective set for the block, and given back after."""
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3, this thread
    if libc.capget(ctypes.byref(header), data) != 0:
        pytest.skip("capget failed: cannot make a file unreadable for root")
    saved = data[0].effective
    data[0].effective &= ~0b110  # bits 1 and 2: CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.capset(ctypes.byref(header), data) != 0:
        pytest.skip("capset failed: cannot make a file unreadable for root")
    try:
        yield
    finally:
        data[0].effective = saved
        libc.capset(ctypes.byref(header), data)


@pytest.mark.parametrize("with_index", [False, True])
def test_unopenable_and_compressed_shards_are_data_errors_saying_why(tmp_path, rng, with_index):
    """A shard without read permission, and shards compressed whole (gzip, bzip2, xz): scan_shard and load_index
    raise a DataError naming the shard and why, even with a fresh index beside it (which alone would not tell)."""
    with ShardWriter(tmp_path / "plain.tar") as writer:
        writer.write("k", {"jpg": rng.bytes(100), "json": b"{}"})
    raw = (tmp_path / "plain.tar").read_bytes()
    cases = {"gzip": gzip.compress(raw), "bzip2": bz2.compress(raw), "xz": lzma.compress(raw)}
    for name, data in cases.items():
        shard = tmp_path / f"{name}.tar"
        shard.write_bytes(data)
        if with_index:
            shutil.copy(tmp_path / "plain.idx", index_path_for(shard))
        message = rf"^shard {shard}: {name}-compressed: decompress it, random access needs a plain tar$"
        for reader in (scan_shard, load_index):
            with pytest.raises(DataError, match=message):
                reader(shard)
    locked = tmp_path / "locked.tar"
    shutil.copy(tmp_path / "plain.tar", locked)
    if with_index:
        shutil.copy(tmp_path / "plain.idx", index_path_for(locked))
    locked.chmod(0)
    with modes_enforced():
        for reader in (scan_shard, load_index):
            with pytest.raises(DataError, match=rf"^shard {locked}: cannot read it \(permission denied\)$"):
                reader(locked)
    with pytest.raises(DataError, match=r"cannot read it \(no such file or directory\)"):
        load_index(tmp_path / "gone.tar")


def raw_shard(path: Path, members: list[tuple[str, bytes | None, bytes]]) -> None:
    """A tar written member by member: (name, tar type or None for a file, data)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind is None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.type, info.linkname = kind, data.decode()
                tar.addfile(info)


def test_duplicate_keys_keep_the_first_sample_in_every_reader(tmp_path, rng):
    """Two consecutive samples with one key used to merge (the second's bytes replacing the first's): a member
    whose extension the sample already has starts another sample, set aside as a duplicate, as is a key coming
    back later. Scanning, the index file and iter_shard agree, and the index file keeps the duplicates' lines."""
    first, second, third, other = (rng.bytes(int(rng.integers(1, 900))) for _ in range(4))
    raw_shard(tmp_path / "d.tar", [("k.jpg", None, first), ("k.json", None, b"1"), ("k.jpg", None, second),
                                   ("k.json", None, b"2"), ("m.jpg", None, other), ("k.jpg", None, third)])
    scanned = scan_shard(tmp_path / "d.tar")
    assert list(scanned.keys) == ["k", "m"] and [key for key, _ in scanned.duplicates] == ["k", "k"]
    assert [sorted(members) for _, members in scanned.duplicates] == [["jpg", "json"], ["jpg"]]
    write_index(tmp_path / "d.tar")
    assert (tmp_path / "d.idx").read_text().splitlines()[0] == "v1.2 4"
    from_file = read_index(tmp_path / "d.idx")
    assert list(from_file.keys) == ["k", "m"] and from_file.members == scanned.members
    assert from_file.duplicates == scanned.duplicates
    assert list(iter_shard(tmp_path / "d.tar")) == [("k", {"jpg": first, "json": b"1"}), ("m", {"jpg": other})]


def test_links_devices_fifos_and_names_leaving_the_shard_are_no_samples(tmp_path, rng):
    """Only regular files with a relative name inside the shard are members of samples: symlinks, hardlinks,
    devices, fifos and folders, absolute names, names with '..' and names without an extension are skipped."""
    good = rng.bytes(300)
    raw_shard(tmp_path / "odd.tar", [
        ("a.jpg", None, good), ("a.json", None, b"{}"),
        ("l.jpg", tarfile.SYMTYPE, b"/etc/passwd"), ("h.jpg", tarfile.LNKTYPE, b"a.jpg"),
        ("c.jpg", tarfile.CHRTYPE, b""), ("b.jpg", tarfile.BLKTYPE, b""), ("f.jpg", tarfile.FIFOTYPE, b""),
        ("d.jpg", tarfile.DIRTYPE, b""), ("/abs/x.jpg", None, rng.bytes(10)), ("../up.jpg", None, rng.bytes(10)),
        ("in/../../up2.jpg", None, rng.bytes(10)), ("noext", None, rng.bytes(10)),
        ("sub/z.jpg", None, good)])
    index = scan_shard(tmp_path / "odd.tar")
    assert list(index.keys) == ["a", "sub/z"] and not index.duplicates
    assert list(iter_shard(tmp_path / "odd.tar")) == [("a", {"jpg": good, "json": b"{}"}), ("sub/z", {"jpg": good})]


def test_member_reader_keeps_a_bounded_number_of_files_open(tmp_path, monkeypatch):
    """A million one-sample files (an ImageFolder) must not mean a million open descriptors: the oldest are closed,
    and a closed file is opened again when read again."""
    monkeypatch.setattr(MemberReader, "MAX_OPEN", 3)
    paths = []
    for i in range(7):
        paths.append(tmp_path / f"{i}.bin")
        paths[-1].write_bytes(bytes([i]) * 10)
    reader = MemberReader(paths)
    for round_ in range(2):
        for i in range(7):
            assert reader.read(i, 2, 3) == bytes([i]) * 3
            assert len(reader._fds) <= 3
    assert sorted(reader._fds) == [4, 5, 6]
    reader.close()
