"""``fastpretrain dedup``: the hash against the DCT written out by hand, the multi-index search against all pairs,
planted copies of evaluation pictures found and unrelated pictures not, the loader skipping exactly the listed
samples, and hash files written once per shard."""

from __future__ import annotations

import argparse
import io
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastpretrain.data import build_train_loader
from fastpretrain.data.synth import make_post
from fastpretrain.errors import DataError, UserError
from fastpretrain.formats.phash import HASH_VERSION, DuplicateList, ShardHashes, duplicates_path, hashes_path
from fastpretrain.formats.shards import ShardWriter
from fastpretrain.transfer import dedup
from test_data_loaders import identify, make_corpus

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

MAX_PIXELS = 10**8


def photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8: a random field with natural images' 1/f amplitude spectrum, channels correlated, plus noise."""
    f2 = np.fft.fftfreq(height)[:, None] ** 2 + np.fft.fftfreq(width)[None, :] ** 2  # (H, W)
    amplitude = 1 / np.maximum(f2, 1 / (height * width))

    def field() -> np.ndarray:
        return np.real(np.fft.ifft2(amplitude * np.exp(2j * np.pi * rng.random((height, width)))))

    shared = field()
    channels = [shared + 0.5 * field() for _ in range(3)]
    pixels = np.stack([(c - c.mean()) / c.std() for c in channels], -1) * 45 + rng.uniform(80, 170, 3)
    return np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8)


def random_photo(rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(photo(rng, int(rng.integers(120, 300)), int(rng.integers(120, 300))))


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def crop_borders(image: Image.Image, share: float) -> Image.Image:
    """``share`` of each dimension cut off each of its borders."""
    w, h = image.size
    return image.crop((round(share * w), round(share * h), w - round(share * w), h - round(share * h)))


def planted_copies(image: Image.Image, rng: np.random.Generator) -> dict[str, bytes]:
    """The copies of an evaluation picture a training set might hold, as files."""
    w, h = image.size
    return {
        "requality.jpg": encode(image, quality=int(rng.integers(40, 70))),
        "half.jpg": encode(image.resize((w // 2, h // 2), Image.Resampling.LANCZOS), quality=85),
        "larger.jpg": encode(image.resize((w * 3 // 2, h * 3 // 2), Image.Resampling.BICUBIC), quality=85),
        "cropped.jpg": encode(crop_borders(image, rng.uniform(0.03, 0.05)), quality=85),
        "same.png": encode(image, "PNG"),
    }


def popcount(x: int) -> int:
    return bin(x).count("1")


# ----------------------------------------------------------------------------------------------------
# The hash and the search


def reference_dct(pixels: np.ndarray) -> np.ndarray:
    """(8, 8) float64: the lowest coefficients of the orthonormal 2-D DCT-II of a square picture, as cosine sums."""
    n = len(pixels)
    cosines = [[math.cos(math.pi * (2 * x + 1) * u / (2 * n)) for x in range(n)] for u in range(8)]
    scale = [math.sqrt(1 / n)] + [math.sqrt(2 / n)] * 7
    values = pixels.astype(float).tolist()
    return np.array([[scale[u] * scale[v] * sum(values[x][y] * cosines[u][x] * cosines[v][y]
                                                 for x in range(n) for y in range(n))
                      for v in range(8)] for u in range(8)])


def reference_hash(coefficients: np.ndarray) -> int:
    """The 8x8 coefficients row by row, each bit (from bit 63) whether it is above the median of the 63 after the DC
    term."""
    flat = coefficients.ravel().tolist()
    median = sorted(flat[1:])[31]
    return sum(1 << (63 - i) for i, c in enumerate(flat) if c > median)


def test_hash_is_the_dct_hash_written_out(rng):
    ramp = np.add.outer(np.arange(32), int(rng.integers(0, 4)) * np.arange(32)) * 3 % 256  # large AC terms
    for pixels in (rng.integers(0, 256, (32, 32)), np.clip(ramp + rng.integers(-20, 21, (32, 32)), 0, 255)):
        coefficients = reference_dct(pixels)
        np.testing.assert_allclose(dedup.low_frequencies(pixels), coefficients, rtol=0, atol=1e-9)
        png = encode(Image.fromarray(pixels.astype(np.uint8), "L"), "PNG")  # 32x32 already: no resizing
        assert int(dedup.hash_picture(png, MAX_PIXELS)[0]) == reference_hash(coefficients)


def test_exif_orientation_is_applied_before_hashing(rng):
    upright = random_photo(rng)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a phone writes; EXIF 6 turns it back upright
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = int(dedup.hash_picture(encode(stored, quality=95, exif=exif), MAX_PIXELS)[0])
    plain = int(dedup.hash_picture(encode(upright, quality=95), MAX_PIXELS)[0])
    sideways = int(dedup.hash_picture(encode(stored, quality=95), MAX_PIXELS)[0])
    assert popcount(turned ^ plain) <= 4 < 12 <= popcount(turned ^ sideways)


def flips(rng: np.random.Generator, count: int, most: int) -> np.ndarray:
    """(count,) uint64 masks of 0 to ``most`` random bits each."""
    masks = np.zeros(count, dtype=np.uint64)
    for i in range(count):
        for bit in rng.choice(64, int(rng.integers(0, most + 1)), replace=False):
            masks[i] |= np.uint64(1) << np.uint64(bit)
    return masks


@pytest.mark.parametrize("radius", [0, 3, 8, 11, 12])
def test_search_finds_the_pairs_all_pairs_find(rng, radius):
    stored = rng.integers(0, 2**63, 400, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 400, dtype=np.uint64)
    # Crowded buckets: a third share one of four lowest chunks; one hash is stored twice.
    stored[:130] = (stored[:130] & ~np.uint64(0xFFFF)) | rng.integers(0, 4, 130).astype(np.uint64)
    stored[-1] = stored[0]
    queries = np.concatenate([stored[rng.integers(0, 400, 250)] ^ flips(rng, 250, radius + 3),
                              rng.integers(0, 2**63, 50, dtype=np.uint64)])
    i, j, distance = dedup.HashIndex(stored).search(queries, radius)
    expected = [(a, b, popcount(int(q) ^ int(s))) for a, q in enumerate(queries) for b, s in enumerate(stored)
                if popcount(int(q) ^ int(s)) <= radius]
    assert list(zip(i.tolist(), j.tolist(), distance.tolist())) == expected
    assert len(expected) >= 20  # about 250 (radius + 1) / (radius + 4) planted near queries are there to be found


# ----------------------------------------------------------------------------------------------------
# The command on planted copies


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with ShardWriter(path) as writer:
        for key, files in samples.items():
            writer.write(key, files)


def run_dedup(*flags: str) -> None:
    parser = argparse.ArgumentParser()
    dedup.register(parser.add_subparsers())
    args = parser.parse_args(["dedup", *flags])
    args.func(args)


@pytest.fixture
def planted(tmp_path, rng):
    """An ImageFolder of 4 evaluation photos and a shard of 2 more; two training shards holding 5 copies of each,
    20 demo drawings, 8 other photos, a file that is no picture and a sample without one. Returns the paths and
    the planted keys -> (evaluation set, picture name)."""
    folder = tmp_path / "val"
    shard_set = tmp_path / "val-shards"
    shard_set.mkdir()
    originals = {}  # (set, name) -> picture
    for i in range(4):
        name = f"class{i % 2}/{i:03d}.jpg"
        originals[str(folder), name] = picture = random_photo(rng)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(encode(picture, quality=90))
    eval_samples = {}
    for i in range(2):
        originals[str(shard_set), f"00000.tar/e{i}"] = picture = random_photo(rng)
        eval_samples[f"e{i}"] = {"jpg": encode(picture, quality=90), "cls": b"0"}
    write_shard(shard_set / "00000.tar", eval_samples)

    samples, copies = {}, {}
    for number, (source, picture) in enumerate(originals.items()):
        for name, data in planted_copies(picture, rng).items():
            key = f"copy{number}-{name.split('.')[0]}"
            samples[key] = {name.split(".")[1]: data, "json": b"{}"}
            copies[key] = source
    seed = int(rng.integers(2**31))
    for i in range(20):
        samples[f"drawing{i}"] = {"jpg": make_post(seed, i).jpeg, "json": b"{}"}
    for i in range(8):
        samples[f"photo{i}"] = {"jpg": encode(random_photo(rng), quality=90), "json": b"{}"}
    samples["garbage"] = {"jpg": b"not a picture at all", "json": b"{}"}
    samples["textonly"] = {"json": b"{}"}
    keys = list(samples)
    order = rng.permutation(len(keys))
    train = tmp_path / "train"
    train.mkdir()
    for s, part in enumerate(np.array_split(order, 2)):
        write_shard(train / f"{s:05d}.tar", {keys[k]: samples[keys[k]] for k in part})
    labels = tmp_path / "labels"
    labels.mkdir()
    return train, labels, [str(folder), str(shard_set)], copies


def listed(train: Path, labels: Path) -> dict[str, tuple[str, str, int]]:
    found = {}
    for shard in sorted(train.glob("*.tar")):
        duplicates = DuplicateList.load(duplicates_path(labels, shard))
        found.update({k: (s, p, d) for k, s, p, d in zip(duplicates.keys.tolist(), duplicates.eval_sets.tolist(),
                                                         duplicates.eval_pictures.tolist(),
                                                         duplicates.distances.tolist())})
    return found


def test_planted_copies_are_found_and_unrelated_pictures_are_not(planted, capsys):
    train, labels, against, copies = planted
    run_dedup("--data", str(train), "--labels", str(labels), "--against", *against)
    found = listed(train, labels)
    assert {key: (s, p) for key, (s, p, _) in found.items()} == copies
    assert all(d <= dedup.DEFAULT_RADIUS for _, _, d in found.values())
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "training: 58 pictures hashed in 2 shards (2 could not be hashed: missing_image 1, not_image 1)"
    assert out[1] == f"{against[0]}: 4 pictures; 20 training samples are near-duplicates of 4 of them"
    assert out[2] == f"{against[1]}: 2 pictures; 10 training samples are near-duplicates of 2 of them"
    assert out[3].startswith(f"in all: 30 near-duplicates of evaluation pictures (within {dedup.DEFAULT_RADIUS} bits)")


def test_hash_files_are_written_once_per_shard(planted, rng):
    train, labels, against, copies = planted
    config = dedup.DedupConfig([str(train)], str(labels), against)
    first = dedup.find_duplicates(config)
    shards = sorted(train.glob("*.tar"))
    written = {shard: hashes_path(labels, shard).stat().st_mtime_ns for shard in shards}
    found = listed(train, labels)
    again = dedup.find_duplicates(config)
    assert {shard: hashes_path(labels, shard).stat().st_mtime_ns for shard in shards} == written
    assert (first.reused, again.reused) == (0, 2) and listed(train, labels) == found
    assert again.unhashed == first.unhashed and again.hashed == first.hashed  # the counts came with the files

    changed = shards[int(rng.integers(2))]
    later = os.stat(changed).st_mtime_ns + 10**9
    os.utime(changed, ns=(later, later))  # the shard is newer than its hash file: hashed again
    assert dedup.find_duplicates(config).reused == 1
    assert hashes_path(labels, changed).stat().st_mtime_ns > written[changed]
    assert listed(train, labels) == found
    hashes_path(labels, changed).write_bytes(b"garbage")  # newer than the shard, but no hash file: hashed again
    assert dedup.find_duplicates(config).reused == 1 and listed(train, labels) == found
    assert ShardHashes.load(hashes_path(labels, changed)).version == HASH_VERSION


def test_workers_find_what_one_process_finds(planted):
    train, labels, against, copies = planted
    dedup.find_duplicates(dedup.DedupConfig([str(train)], str(labels), against, workers=2))
    assert {key: (s, p) for key, (s, p, _) in listed(train, labels).items()} == copies


def test_bad_input_is_one_line(planted, tmp_path):
    train, labels, against, _ = planted
    common = ["--data", str(train), "--labels", str(labels), "--against", *against]
    for flags, message in (
        ([*common, "--radius", "13"], "--radius must lie in"),
        ([*common, "--workers", "0"], "--workers must be at least 1"),
        (["--data", str(train), "--labels", str(tmp_path / "nowhere"), "--against", *against], "no such folder"),
        (["--data", str(train), "--labels", str(labels), "--against", str(train)], "is one of the training shards"),
        ([*common[:-2], str(tmp_path / "missing")], "no such file or folder"),
    ):
        with pytest.raises(UserError, match=message):
            run_dedup(*flags)
    unreadable = tmp_path / "unreadable"
    write_shard(unreadable / "00000.tar", {"a": {"jpg": b"\xff\xd8\xff garbage"}, "b": {"json": b"{}"}})
    with pytest.raises(DataError, match="none of its 1 pictures could be hashed"):
        run_dedup("--data", str(train), "--labels", str(labels), "--against", str(unreadable))
    garbage = tmp_path / "x.duplicates.npz"
    garbage.write_bytes(b"PK\x03\x04 not an archive")
    with pytest.raises(DataError, match="duplicate list .* is corrupt"):
        DuplicateList.load(garbage)


# ----------------------------------------------------------------------------------------------------
# The training loader


def test_loader_skips_exactly_the_listed_samples(tmp_path, rng):
    corpus = make_corpus(tmp_path, rng, shards=3, per_shard=12)
    shards = sorted(corpus.shards.glob("*.tar"))
    in_first = [key for key in corpus.order if key.startswith("00000")]
    chosen = rng.choice(in_first, int(rng.integers(1, 6)), replace=False).tolist()
    # Shard 0 lists some of its samples and a key it does not hold; shard 1 lists none; shard 2 has no list.
    for shard, keys in ((shards[0], [*chosen, "not-in-the-shard"]), (shards[1], [])):
        DuplicateList(np.array(keys, dtype=str), np.array(["val"] * len(keys), dtype=str),
                      np.array(["a.jpg"] * len(keys), dtype=str), np.zeros(len(keys), np.uint8),
                      8).save(duplicates_path(corpus.label_dir, shard))
    usable = [key for key in corpus.usable() if key not in chosen]
    loader = build_train_loader(corpus.config(backend="torch"), corpus.vocab, torch.device("cpu"), torch.float32)
    seen: list[str] = []
    while len(seen) < len(usable):
        seen += identify(next(loader), corpus)
    assert sorted(seen[: len(usable)]) == sorted(usable)  # natural sampling: one epoch shows each once
    unlabeled = sum(1 for key in corpus.order if not corpus.rows[key] and key not in chosen)
    assert loader.skipped == {"duplicate_of_eval": len(chosen), **({"unlabeled": unlabeled} if unlabeled else {})}
    loader.close()
