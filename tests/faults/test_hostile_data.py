"""Hostile and messy data through the real command line, and the readers under fuzzed and cut bytes.

One corpus holds every case of the hostile-input probe beside normal samples; `fastpretrain vocab build` and
`fastpretrain train` run on it once each, in subprocesses (about 5 s each to start), and every skip count they
report is compared with the count worked out by hand from how the corpus was built (``write_corpus``, then
``VOCAB_STATS`` and ``TRAIN_SKIPPED``). The fuzzing runs in process: cut and changed shards and pictures.
"""

from __future__ import annotations

import ctypes
import gzip
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastpretrain.data.config import DataConfig
from fastpretrain.data.decoders import torch as torch_decoder
from fastpretrain.data.decoders.common import BadImage, probe_image
from fastpretrain.data.stream import PlanChunk
from fastpretrain.errors import DataError
from fastpretrain.formats.shards import ShardWriter, index_path_for, iter_shard, load_index, read_index, scan_shard
from fastpretrain.formats.shards import write_index_file
from fastpretrain.hashtags.sources import InputStats, iter_posts
from test_data_decode import shard_table
from test_data_shards import raw_shard

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

UNLABELED = 10  # posts whose only tag names no synset: they keep the share of bad samples under the limits


# ----------------------------------------------------------------------------------------------------
# Pictures, good and bad


def photo(rng: np.random.Generator, height: int = 40, width: int = 52) -> np.ndarray:
    """(H, W, 3) uint8 with large structure, so lossy coding keeps it a picture."""
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))


def encode(array: np.ndarray, fmt: str = "JPEG", **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt, **options)
    return out.getvalue()


def tail(rng: np.random.Generator) -> bytes:
    """What a phone appends after a JPEG (a Motion Photo's MP4) or a tool after a PNG: random bytes holding the
    markers an end search could stop at (EOI, SOS, IEND)."""
    data = bytearray(b"\x00\x00\x00\x18ftypmp42" + rng.bytes(int(rng.integers(500, 3000))) + b"\x00")
    for marker in (b"\xff\xd9", b"\xff\xda\x00\x0c", b"IEND\xaeB`\x82"):
        at = int(rng.integers(12, len(data) - len(marker)))
        data[at: at + len(marker)] = marker
    return bytes(data)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_16_bit(samples: np.ndarray) -> bytes:
    """(H, W, 3) uint16 as a 16-bit RGB PNG, written by hand (PIL writes none)."""
    height, width, _ = samples.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples.reshape(height, -1))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


def png_bomb() -> bytes:
    """A PNG header claiming 50000 x 50000 pixels (7.5 GB decoded) over a few bytes of data."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


def jpeg_bomb(jpeg: bytes) -> bytes:
    """The JPEG with its frame header claiming 50000 x 50000 pixels."""
    frame = jpeg.find(b"\xff\xc0")
    return jpeg[: frame + 5] + struct.pack(">HH", 50000, 50000) + jpeg[frame + 9:]


def bogus_sampling(jpeg: bytes) -> bytes:
    """The JPEG with its first component's sampling factors zeroed: every header parser reads it, every decoder
    refuses it."""
    frame = jpeg.find(b"\xff\xc0")
    return jpeg[: frame + 11] + b"\x00" + jpeg[frame + 12:]


def animated_webp(rng: np.random.Generator) -> bytes:
    frames = [Image.fromarray(rng.integers(0, 256, (30, 36, 3), dtype=np.uint8)) for _ in range(3)]
    out = io.BytesIO()
    frames[0].save(out, "WEBP", save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    return out.getvalue()


def noise(rng: np.random.Generator) -> bytes:
    """Random bytes no image parser takes (bit 1 of byte 1 set rules out TGA, which has no signature)."""
    data = bytearray(rng.bytes(int(rng.integers(100, 3000))))
    data[1] |= 0b10
    return bytes(data)


# ----------------------------------------------------------------------------------------------------
# The corpus


def tags(*names: str) -> bytes:
    return json.dumps({"tags": list(names)}).encode()


def write_corpus(root: Path, rng: np.random.Generator) -> dict[str, Path]:
    """Every case of the probe, beside good samples. What each is counted as, by hand, is said next to it and
    summed up in the tests."""
    shards, odd = root / "shards", root / "odd"
    shards.mkdir(parents=True)
    odd.mkdir()
    jpeg = lambda: encode(photo(rng), quality=90)  # noqa: E731
    with ShardWriter(shards / "00000.tar") as writer:  # with its .idx beside it: `shards/*` must not list it
        writer.write("good", {"jpg": jpeg(), "json": tags("dog")})
        writer.write("motion", {"jpg": jpeg() + tail(rng), "json": tags("dog")})  # good: bytes after EOI
        writer.write("padded", {"png": encode(photo(rng), "PNG") + tail(rng), "json": tags("dog")})  # good
        writer.write("animated", {"webp": animated_webp(rng), "json": tags("dog")})  # good: its first frame
        deep = rng.integers(0, 2**16, (28, 34, 3)).astype(np.uint16)
        writer.write("deep", {"png": png_16_bit(deep), "json": tags("dog")})  # good: scaled to 8 bits
        cut = jpeg()
        writer.write("cut", {"jpg": cut[: len(cut) // 2], "json": tags("dog")})  # truncated
        writer.write("noise", {"jpg": noise(rng), "json": tags("dog")})  # not_image
        writer.write("bomb_png", {"png": png_bomb(), "json": tags("dog")})  # too_large
        writer.write("bomb_jpg", {"jpg": jpeg_bomb(jpeg()), "json": tags("dog")})  # too_large
        writer.write("gif", {"jpg": encode(photo(rng), "GIF"), "json": tags("dog")})  # unsupported_format
        writer.write("undecodable", {"jpg": bogus_sampling(jpeg()), "json": tags("dog")})  # decode_error
        writer.write("huge", {"jpg": jpeg(), "json": tags("dog")})  # read_error: its .idx is edited below
        writer.write("no_json", {"jpg": jpeg()})  # missing_metadata (a malformed post to vocab build)
        writer.write("no_image", {"json": tags("dog")})  # missing_image (a good post to vocab build)
        for i in range(UNLABELED):
            writer.write(f"unlabeled{i}", {"jpg": jpeg(), "json": tags("instagood")})  # unlabeled: not_a_noun
    index = read_index(shards / "00000.idx")  # a member of 2**40 bytes, where the shard has a few hundred kB
    huge = index.keys.tolist().index("huge")
    index.members[huge]["jpg"] = (index.members[huge]["jpg"][0], 2**40)
    write_index_file(shards / "00000.idx", index)

    first, second = jpeg(), jpeg()
    raw_shard(shards / "00001.tar", [
        ("twice.jpg", None, first), ("twice.json", None, tags("dog")),  # good
        ("twice.jpg", None, second), ("twice.json", None, tags("dog")),  # duplicate_key: the second twice
        ("link.jpg", tarfile.SYMTYPE, b"/etc/passwd"), ("hard.jpg", tarfile.LNKTYPE, b"twice.jpg"),
        ("device.jpg", tarfile.CHRTYPE, b""), ("fifo.jpg", tarfile.FIFOTYPE, b""),  # none of these is a sample
        ("/abs/escape.jpg", None, jpeg()), ("/abs/escape.json", None, tags("dog")),
        ("../up.jpg", None, jpeg()), ("../up.json", None, tags("dog")),
        ("after.jpg", None, jpeg()), ("after.json", None, tags("dog"))])  # good

    (shards / "gzipped.tar").write_bytes(gzip.compress((shards / "00000.tar").read_bytes()))  # unreadable
    (shards / "locked.tar").write_bytes((shards / "00000.tar").read_bytes())
    (shards / "locked.tar").chmod(0)  # unreadable: permission denied
    strange = odd / "we[i]rd{1}.tar"  # given by its name: a path, not a pattern
    with ShardWriter(strange) as writer:
        writer.write("w", {"jpg": jpeg(), "json": tags("cat")})
    return {"shards": shards, "strange": strange}


# By hand, from write_corpus. vocab build reads every post's metadata (never an image): 00000.tar has 14 named
# posts and UNLABELED more, 00001.tar three (twice counted twice), the strange shard one.
POSTS = 14 + UNLABELED + 3 + 1
VOCAB_STATS = {
    "posts_seen": POSTS,
    "posts_kept": 13 + 2 + 1,  # a dog tag in 00000 (all named posts but no_json) and 00001 (twice, after); a cat
    "posts_malformed": 2,  # no_json, the second twice
    "raw_hashtags_seen": POSTS - 2,  # one tag per post but those two
    "skipped_posts": {"duplicate_key": 1, "missing_metadata": 1},
    "skipped_tags": {"not_a_noun": UNLABELED},
    "skipped_files": {"unreadable": 2},  # gzipped.tar, locked.tar: files, not posts
    "inputs": 5,  # 00000.tar, 00001.tar, gzipped.tar, locked.tar (not the .idx files), the strange shard
}
# train, torch backend, natural resampling: every usable sample (image, metadata, a label) is decoded once an
# epoch; 8 good samples in 2 steps of 4 is more than the 7 good ones (good, motion, padded, animated, deep,
# twice, after), so the stream wraps and every usable sample of the first epoch is decoded, each counted once.
TRAIN_SKIPPED = {"missing_metadata": 1, "missing_image": 1, "unlabeled": UNLABELED, "duplicate_key": 1,
                 "truncated": 1, "not_image": 1, "too_large": 2, "unsupported_format": 1, "decode_error": 1,
                 "read_error": 1}


def keep_modes() -> None:
    """In the child, before exec: file modes as an ordinary user meets them. Root reads any file
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH); dropped from the bounding set, exec gives them to no one."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastpretrain", *args], capture_output=True, text=True,
                          timeout=600, preexec_fn=keep_modes if os.geteuid() == 0 else None)


def test_hostile_corpus_through_vocab_build_and_train_is_counted_exactly(tmp_path, rng):
    """Every case of the probe in one corpus: vocab build and train both finish (no traceback, no crash, no
    MemoryError), read no .idx file as a shard, take the strange name as a path, and count every skipped post,
    file and sample exactly as worked out by hand."""
    paths = write_corpus(tmp_path / "corpus", rng)
    probe = subprocess.run(["cat", str(paths["shards"] / "locked.tar")], capture_output=True,
                           preexec_fn=keep_modes if os.geteuid() == 0 else None)
    if probe.returncode == 0:
        pytest.skip("a file of mode 000 is readable here (root without a way to drop CAP_DAC_OVERRIDE)")

    out = tmp_path / "corpus" / "vocab.json"
    built = run_cli("vocab", "build", "--data", str(paths["shards"] / "*"), str(paths["strange"]),
                    "--out", str(out), "--max-bad-fraction", "0.5")
    assert built.returncode == 0, built.stderr
    stats = json.loads(out.read_text())["stats"]
    assert {key: stats[key] for key in VOCAB_STATS} == VOCAB_STATS
    files_line = [line for line in built.stdout.splitlines() if line.startswith("files skipped: ")]
    assert files_line == [
        f"files skipped: unreadable 2 (shard {paths['shards'] / 'gzipped.tar'}: gzip-compressed: decompress it, "
        f"random access needs a plain tar; shard {paths['shards'] / 'locked.tar'}: cannot read it (permission "
        "denied))"]
    assert "Traceback" not in built.stderr

    run = tmp_path / "run"
    trained = run_cli("train", "--data", str(paths["shards"] / "*"), "--vocab", str(out), "--steps", "2",
                      "--batch-size", "4", "--img-size", "32", "--workers", "1", "--data-backend", "torch",
                      "--max-bad-fraction", "0.5", "--resample", "natural", "--model", "resnext_tiny",
                      "--output", str(run))
    assert trained.returncode == 0, trained.stderr
    assert "Traceback" not in trained.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r.get("event") == "train"][-1]["skipped_samples"]
    assert skipped == TRAIN_SKIPPED


# ----------------------------------------------------------------------------------------------------
# Fuzzed and cut bytes, in process


def mutated(data: bytes, rng: np.random.Generator) -> bytes:
    """``data`` cut anywhere, or with 1 to 20 bytes set at random anywhere, or followed by random bytes."""
    how = int(rng.integers(0, 3))
    if how == 0:
        return data[: int(rng.integers(0, len(data)))]
    if how == 1:
        changed = bytearray(data)
        for at in rng.integers(0, len(data), int(rng.integers(1, 21))):
            changed[at] = int(rng.integers(0, 256))
        return bytes(changed)
    return data + rng.bytes(int(rng.integers(1, 2000)))


def test_cut_and_fuzzed_shards_never_raise_out_of_the_readers(tmp_path, rng):
    """A shard cut anywhere or with bytes changed anywhere (tar headers included), alone, beside its own index
    or beside a fuzzed index: scan_shard and load_index give an index or a DataError, iter_shard and the post
    reader never raise. A shard cut short and scanned gives its first samples, byte for byte."""
    samples = {f"{i:03d}": {"jpg": rng.bytes(int(rng.integers(0, 1500))), "json": tags("dog")} for i in range(6)}
    with ShardWriter(tmp_path / "whole.tar") as writer:
        for key, files in samples.items():
            writer.write(key, files)
    whole, index_text = (tmp_path / "whole.tar").read_bytes(), (tmp_path / "whole.idx").read_text()
    for trial in range(150):
        shard = tmp_path / f"{trial:03d}.tar"
        shard.write_bytes(mutated(whole, rng))
        beside = trial % 3  # 0: no index, 1: the whole shard's, 2: a fuzzed one (written after: it is trusted)
        if beside:
            text = index_text if beside == 1 else mutated(index_text.encode(), rng).decode("latin-1")
            index_path_for(shard).write_text(text, encoding="latin-1")
        for read in (scan_shard, load_index):
            try:
                read(shard)
            except DataError:
                pass
        got = list(iter_shard(shard, on_error=lambda path, message: None))
        list(iter_posts(shard, InputStats()))
        if not beside and len(shard.read_bytes()) < len(whole) and whole.startswith(shard.read_bytes()):
            assert got == list(samples.items())[: len(got)]


def test_fuzzed_images_never_raise_out_of_probe_or_the_torch_decoder(tmp_path, rng):
    """Good pictures of every kind the decoders take, cut, changed or extended at random: probe_image raises
    only BadImage, and the torch backend gives, per chunk, every sample either decoded or bad with a reason."""
    sources = [encode(photo(rng), quality=90), encode(photo(rng), quality=90, progressive=True),
               encode(photo(rng), "PNG"), encode(photo(rng), "WEBP"), animated_webp(rng),
               png_16_bit(rng.integers(0, 2**16, (20, 24, 3)).astype(np.uint16))]
    images = [mutated(sources[int(rng.integers(0, len(sources)))], rng) for _ in range(120)]
    for data in images:
        try:
            probe_image(data, max_pixels=10**7)
        except BadImage:
            pass
    decoded = decode_all(tmp_path / "fuzzed.tar", images)
    assert sum(len(chunk.samples) + len(chunk.bad) for chunk in decoded) == len(images)
    assert all(reason in {"truncated", "not_image", "too_large", "unsupported_format", "decode_error"}
               for chunk in decoded for _, reason, _ in chunk.bad)


def decode_all(path: Path, images: list[bytes], **config) -> list:
    """``images`` as a shard, every one through the torch backend's CPU path (in this process), 8 per chunk."""
    table, n = shard_table(path, images), len(images)
    cfg = DataConfig(shards=str(path), label_dir=str(path.parent), backend="torch", batch_size=8, image_size=16,
                     workers=0, **config)
    chunks = [PlanChunk(0, np.arange(a, min(a + 8, n)), np.arange(a, min(a + 8, n))) for a in range(0, n, 8)]
    decoder = torch_decoder.TorchDecoder(cfg, table, torch.device("cpu"), torch.float32, train=True)
    return list(decoder.decode(iter(chunks)))


def test_decompression_bombs_are_too_large_and_never_reach_a_decoder(tmp_path, rng, monkeypatch):
    """A PNG and a JPEG whose headers claim 50000 x 50000 pixels (7.5 GB decoded): too_large from the header, and
    no decoder is ever handed them, so nothing is allocated for them."""
    decoded_sizes = []
    real_decode_box = torch_decoder.decode_box

    def decode_box(data, info, *box):
        decoded_sizes.append((info.width, info.height))
        return real_decode_box(data, info, *box)

    monkeypatch.setattr(torch_decoder, "decode_box", decode_box)
    good = encode(photo(rng, 30, 20), quality=90)
    (chunk,) = decode_all(tmp_path / "bombs.tar", [png_bomb(), jpeg_bomb(good), good])
    assert [(sample, reason) for sample, reason, _ in chunk.bad] == [(0, "too_large"), (1, "too_large")]
    assert chunk.samples.tolist() == [2] and decoded_sizes == [(20, 30)]
