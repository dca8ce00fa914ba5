"""``fastpretrain dedup``: near-duplicates of evaluation pictures out of the training stream, as Mahajan et al. (2018)
did before reporting transfer results.

The hash (``hash_pixels``): a 64-bit DCT perceptual hash. The picture, upright and in grayscale, is area-averaged to
32x32; the top-left 8x8 block of its 2-D DCT-II (orthonormal, two matrix products), the lowest frequencies, gives a
bit per coefficient, row by row from bit 63: above the median of the 63 coefficients other than the DC term (the mean
brightness), or not. The median is one of the 63, so 31 of their bits are set and every distance is even; the DC
bit is 1 for any picture brighter than black.

Training shards are hashed once each (``formats.phash``: a hash file beside the label index, reused while it is
newer than its shard); the evaluation pictures on every run (not cached), each also with ``EVAL_CROPS`` of every
side cut off, so that a training copy cropped a few percent is as near as a resized one. A training sample within
``radius`` bits of an evaluation picture is listed in its shard's duplicate list; the training loader skips it
(``duplicate_of_eval``).

Measured on ``tests/test_dedup.py``'s noisy 1/f "photos" (3,000, 120-500 px), bits from the nearest crop of the
original: re-encoded at JPEG quality 40-70, at most 4; resized 0.5x or 1.5x, or as PNG, at most 8 (1 copy in 2,000
at 8); cropped 3-5% off every border, at most 6 (16 without EVAL_CROPS); each border cropped by its own 3-5%, at most
8 (0.3% at 8). Unrelated photos, 29M pairs: 1 pair within 8 bits, 1e-6 of pairs within 10, 1.4e-5 within 12 (mean
30). Hence DEFAULT_RADIUS = 8: every copy measured is found, and of the training pictures about 3e-8 x (evaluation
pictures) match by chance: 0.2% against ImageNet's 50k val; at 10 bits it would be 5%. The demo's drawings (one flat
object on a grey texture) are a worse case: 0.1% of pairs are within 8 bits, two objects of one shape in colours
of one brightness, true grayscale twins.

The search (``HashIndex``) is multi-index hashing: the 64 bits are 4 chunks of 16, and two hashes within R bits
agree within R // 4 bits on at least one chunk (pigeonhole). Each chunk has a table (value -> the evaluation hashes
with it), probed at the V = sum_{i <= R // 4} C(16, i) values that near (V = 137 at R = 8), and only the hashes found
are compared whole: per training hash 4V probes and, for E evaluation hashes with evenly spread chunks, about
4V E / 65536 candidates instead of E (R = 8, ImageNet's 50k val at 4 crops: ~1,700 of 200,000; photos' hashes are
less even: twice that).

Memory: per evaluation picture its name and 8 bytes a crop, the tables (4 x 65537 offsets and 4 ids per hash), and
one training shard's hashes at a time.
"""

from __future__ import annotations

import argparse
import functools
import io
import logging
import multiprocessing
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fastpretrain.data.config import DataConfig
from fastpretrain.data.stream import image_member
from fastpretrain.errors import DataError, UserError
from fastpretrain.formats.image_folder import is_image_folder, read_image_folder
from fastpretrain.formats.phash import DuplicateList, ShardHashes, duplicates_path, fresh_hashes, hashes_path
from fastpretrain.formats.shards import MemberReader, list_shards, load_index

log = logging.getLogger(__name__)

SIDE = 32  # the thumbnail the DCT is taken of
BLOCK = 8  # its BLOCK x BLOCK lowest frequencies give the 64 bits
# JPEGs decode at the smallest of libjpeg's 1/2..1/8 scales that keeps this many pixels a side (a 500x375 picture:
# 1/4, 16x fewer pixels); the area average to SIDE then has at least 2x2 pixels per thumbnail pixel.
DRAFT = 2 * SIDE
# Share of each side cut off an evaluation picture, a hash for each: a training copy cropped up to 7% per side is
# within 1% per side of one of them.
EVAL_CROPS = (0.0, 0.02, 0.04, 0.06)
DEFAULT_RADIUS = 8  # copies measured: at most 8 bits apart; unrelated pictures: 1 pair in 29M (module docstring)
MAX_RADIUS = 12  # 1.4e-5 of unrelated pairs are within 12 bits: against 50k pictures, most training pictures
CHUNKS, CHUNK_BITS = 4, 16
QUERY_BLOCK = 1024  # training hashes searched at once: bounds the probe and candidate arrays
EVAL_TASK = 256  # evaluation pictures (files of an ImageFolder) per worker task
_TRANSPOSE = {  # EXIF orientation -> what makes the picture upright (PIL's ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# ----------------------------------------------------------------------------------------------------
# The hash


@functools.cache
def _dct_rows() -> np.ndarray:
    """(BLOCK, SIDE): the first rows of the orthonormal DCT-II matrix, C[u, x] = a_u cos(pi (2x + 1) u / (2 SIDE)),
    a_0 = sqrt(1 / SIDE), a_u = sqrt(2 / SIDE)."""
    u, x = np.arange(BLOCK)[:, None], np.arange(SIDE)[None, :]
    rows = np.sqrt(2 / SIDE) * np.cos(np.pi * (2 * x + 1) * u / (2 * SIDE))
    rows[0] /= np.sqrt(2)
    return rows


def low_frequencies(gray: np.ndarray) -> np.ndarray:
    """(..., SIDE, SIDE) grayscale thumbnails -> (..., BLOCK, BLOCK) float64: the top-left block of their 2-D DCT."""
    rows = _dct_rows()
    return rows @ gray.astype(np.float64) @ rows.T


def hash_pixels(gray: np.ndarray) -> np.ndarray:
    """(..., SIDE, SIDE) grayscale thumbnails -> (...) uint64 hashes (the module docstring's definition)."""
    block = low_frequencies(gray).reshape(*gray.shape[:-2], BLOCK * BLOCK)  # (..., 64)
    bits = block > np.median(block[..., 1:], axis=-1, keepdims=True)  # (..., 64)
    return np.packbits(bits, axis=-1).view(">u8")[..., 0].astype(np.uint64)  # bit 63 is coefficient 0


def gray_picture(data: bytes, max_pixels: int) -> Image.Image:
    """The picture in ``data``, upright (its EXIF orientation applied, as the loaders do), in grayscale; a JPEG at the
    scale DRAFT allows. BadImage with ``probe_image``'s reasons, or ``decode_error``."""
    # Imported here, not above: it imports torch, which `fastpretrain --help` should not wait for.
    from fastpretrain.data.decoders.common import BadImage, probe_image

    info = probe_image(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # probe_image applied our limit
            image = Image.open(io.BytesIO(data[: info.length]))
            image.draft("L", (DRAFT, DRAFT))
            image = image.convert("L")
    except Exception as e:  # noqa: BLE001 - a decoder fed arbitrary bytes fails in arbitrary ways
        raise BadImage("decode_error", f"{type(e).__name__}: {e}") from None
    transpose = _TRANSPOSE.get(info.orientation)
    return image if transpose is None else image.transpose(transpose)


def hash_picture(data: bytes, max_pixels: int, crops: tuple[float, ...] = (0.0,)) -> np.ndarray:
    """(len(crops),) uint64: the hash of the picture in ``data`` with each share of ``crops`` cut off every side.
    BadImage when it cannot be read."""
    image = gray_picture(data, max_pixels)
    w, h = image.size
    # BOX is the exact area average over the (sub-pixel) box: antialiased at any scale.
    thumbs = np.stack([np.asarray(image.resize((SIDE, SIDE), Image.Resampling.BOX,
                                               box=(c * w, c * h, (1 - c) * w, (1 - c) * h)))
                       for c in crops])  # (len(crops), SIDE, SIDE)
    return hash_pixels(thumbs)


@dataclass
class _Hashed:
    """``hashes`` (n, crops) uint64 of n pictures, 0 where ``ok`` (n,) is False; ``unhashed``: reason -> pictures."""

    hashes: np.ndarray
    ok: np.ndarray
    unhashed: Counter


def _hash_members(paths: list[Path], members: list[tuple[int, int, int]], crops: tuple[float, ...],
                  max_pixels: int) -> _Hashed:
    """Hash the pictures at ``members``, each (file number in ``paths``, offset, size)."""
    from fastpretrain.data.decoders.common import BadImage  # see gray_picture

    reader = MemberReader(paths)
    hashed = _Hashed(np.zeros((len(members), len(crops)), dtype=np.uint64), np.zeros(len(members), dtype=bool),
                     Counter())
    try:
        for i, (file, offset, size) in enumerate(members):
            try:
                hashed.hashes[i] = hash_picture(reader.read(file, offset, size), max_pixels, crops)
                hashed.ok[i] = True
            except BadImage as e:
                hashed.unhashed[e.reason] += 1
            except OSError:
                hashed.unhashed["read_error"] += 1
    finally:
        reader.close()
    return hashed


def _hash_training_shard(task: tuple[Path, Path, int]) -> tuple[ShardHashes | None, bool, str | None]:
    """(hashes, reused, problem) of training shard ``task[0]``: from its hash file ``task[1]`` when fresh, else hashed
    and written there; no hashes and the problem when the shard cannot be read."""
    shard, out, max_pixels = task
    found = fresh_hashes(out, shard)
    if found is not None:
        return found, True, None
    try:
        index = load_index(shard)
    except DataError as e:
        return None, False, str(e)
    images = [(key, image_member(members)) for key, members in zip(index.keys.tolist(), index.members)]
    images = [(key, member) for key, member in images if member is not None]
    hashed = _hash_members([shard], [(0, *member) for _, member in images], (0.0,), max_pixels)
    if len(images) < len(index):
        hashed.unhashed["missing_image"] += len(index) - len(images)
    keys = np.array([key for key, _ in images], dtype=str)
    hashes = ShardHashes(keys[hashed.ok], hashed.hashes[hashed.ok, 0], dict(hashed.unhashed))
    hashes.save(out)
    return hashes, False, None


def _hash_eval_task(task: tuple[list[Path], list[tuple[int, int, int]], int]) -> _Hashed:
    paths, members, max_pixels = task
    return _hash_members(paths, members, EVAL_CROPS, max_pixels)


# ----------------------------------------------------------------------------------------------------
# The search


def _chunks(hashes: np.ndarray) -> np.ndarray:
    """(CHUNKS, n) int64: the CHUNK_BITS-bit chunks of ``hashes`` (n,) uint64, lowest first."""
    shifts = np.arange(CHUNKS, dtype=np.uint64)[:, None] * np.uint64(CHUNK_BITS)
    return ((hashes[None, :] >> shifts) & np.uint64(2**CHUNK_BITS - 1)).astype(np.int64)


def _distinct(values: np.ndarray) -> np.ndarray:
    """The distinct values of ``values`` (n,) >= 0, ascending. By sorting: numpy 2.4's hash-based ``np.unique`` takes
    ~100x longer on a million int64s."""
    values = np.sort(values)
    return values[np.diff(values, prepend=-1) != 0]


@functools.cache
def _near_masks(bits: int) -> np.ndarray:
    """(V,) int64: every chunk value with at most ``bits`` bits set, what a probe XORs in."""
    values = np.arange(2**CHUNK_BITS, dtype=np.int64)
    return values[np.bitwise_count(values) <= bits]


class HashIndex:
    """Multi-index hashing over ``hashes`` (M,) uint64 (the module docstring): every stored hash within a radius of a
    query, without comparing all pairs."""

    def __init__(self, hashes: np.ndarray) -> None:
        self.hashes = np.asarray(hashes, dtype=np.uint64)
        chunks = _chunks(self.hashes)  # (CHUNKS, M)
        self.order = np.argsort(chunks, axis=1, kind="stable")  # (CHUNKS, M): stored hashes by chunk value
        # Chunk c's hashes of value v: order[c, starts[c, v] : starts[c, v + 1]].
        self.starts = np.zeros((CHUNKS, 2**CHUNK_BITS + 1), dtype=np.int64)
        for c in range(CHUNKS):
            np.cumsum(np.bincount(chunks[c], minlength=2**CHUNK_BITS), out=self.starts[c, 1:])

    def search(self, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every pair (query i, stored hash j) at most ``radius`` bits apart, once each: ``(i (P,) int64, j (P,)
        int64, distance (P,) uint8)`` ordered by i, then j."""
        queries = np.asarray(queries, dtype=np.uint64)
        found = [self._search_block(queries[first: first + QUERY_BLOCK], radius, first)
                 for first in range(0, len(queries) if len(self.hashes) else 0, QUERY_BLOCK)]
        if not found:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
        return tuple(np.concatenate(parts) for parts in zip(*found))

    def _search_block(self, queries: np.ndarray, radius: int, first: int):
        masks = _near_masks(radius // CHUNKS)  # (V,)
        chunks = _chunks(queries)  # (CHUNKS, n)
        pairs = []  # (i * M + j) of the candidates within the radius
        for c in range(CHUNKS):
            probes = (chunks[c][:, None] ^ masks[None, :]).ravel()  # (n * V,)
            lo = self.starts[c, probes]
            counts = self.starts[c, probes + 1] - lo  # (n * V,) hashes found by each probe
            ends = np.cumsum(counts)
            # Candidate k of probe p is order[c, lo[p] + k]; candidates are laid out probe after probe.
            stored = self.order[c, np.repeat(lo - (ends - counts), counts) + np.arange(ends[-1])]  # (K,)
            query = np.repeat(np.repeat(np.arange(len(queries)), len(masks)), counts)  # (K,)
            near = np.bitwise_count(queries[query] ^ self.hashes[stored]) <= radius
            pairs.append(query[near] * len(self.hashes) + stored[near])
        # A pair near on several chunks was found on each: once.
        i, j = np.divmod(_distinct(np.concatenate(pairs)), len(self.hashes))
        return i + first, j, np.bitwise_count(queries[i] ^ self.hashes[j])


# ----------------------------------------------------------------------------------------------------
# The command


@dataclass
class DedupConfig:
    """What ``fastpretrain dedup`` does; validated on construction (UserError naming the flag)."""

    data: list[str]
    labels: str
    against: list[str]
    radius: int = DEFAULT_RADIUS
    workers: int = 1
    max_pixels: int = DataConfig.decode_limit_pixels

    def __post_init__(self) -> None:
        if not 0 <= self.radius <= MAX_RADIUS:
            raise UserError(f"--radius must lie in [0, {MAX_RADIUS}] bits, got {self.radius}")
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if not self.data or not self.against:
            raise UserError("dedup: give training shards (--data) and at least one evaluation set (--against)")
        if not Path(self.labels).is_dir():
            raise UserError(f"--labels {self.labels}: no such folder (the training shards' label indexes, "
                            "from `fastpretrain vocab build`)")


@dataclass
class EvalSet:
    """One ``--against``: the ``names`` (E,) of its pictures that could be hashed, their ``hashes`` (E, crops) uint64,
    how many it has in all and why the others could not be hashed."""

    spec: str
    names: np.ndarray
    hashes: np.ndarray
    pictures: int
    unhashed: Counter


@dataclass
class DedupSummary:
    """What ``find_duplicates`` found: per evaluation set the training samples near one of its pictures
    (``samples_near``) and those pictures (``pictures_copied``); ``duplicates``, the samples near any."""

    radius: int
    label_dir: Path
    shards: int
    reused: int
    hashed: int
    unhashed: Counter
    unreadable: list[str]
    sets: list[EvalSet]
    samples_near: list[int]
    pictures_copied: list[int]
    duplicates: int

    def lines(self) -> list[str]:
        fresh = f", {self.reused} hash files reused" if self.reused else ""
        lines = [f"training: {self.hashed} pictures hashed in {self.shards} shards{fresh}{_reasons(self.unhashed)}"]
        if self.unreadable:
            lines.append(f"  {len(self.unreadable)} shards unreadable, not listed: {'; '.join(self.unreadable[:3])}")
        for s, near, copied in zip(self.sets, self.samples_near, self.pictures_copied):
            lines.append(f"{s.spec}: {s.pictures} pictures{_reasons(s.unhashed)}; {near} training samples are "
                         f"near-duplicates of {copied} of them")
        lines.append(f"in all: {self.duplicates} near-duplicates of evaluation pictures (within {self.radius} bits), "
                     f"listed in {self.label_dir}/*.duplicates.npz; training skips them")
        return lines


def _reasons(unhashed: Counter) -> str:
    if not unhashed:
        return ""
    return f" ({sum(unhashed.values())} could not be hashed: " + \
        ", ".join(f"{reason} {n}" for reason, n in sorted(unhashed.items())) + ")"


@contextmanager
def _mapper(workers: int) -> Iterator[Callable]:
    """``map`` in ``workers`` processes (results in order, as they come), or in this one."""
    if workers == 1:
        yield map
        return
    # spawn, not fork: the caller may hold threads (torch's, OpenBLAS's) that fork would copy mid-state.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield functools.partial(pool.imap, chunksize=1)


def _hash_eval_set(spec: str, training: set[Path], max_pixels: int, map_tasks: Callable) -> EvalSet:
    """Hash an ImageFolder tree's files or the images of a list of shards, at EVAL_CROPS."""
    tasks, names = [], []
    if is_image_folder(spec):
        folder = read_image_folder(spec)
        names = [str(path.relative_to(folder.root)) for path in folder.files]
        for first in range(0, len(folder.files), EVAL_TASK):
            sizes = folder.sizes[first: first + EVAL_TASK].tolist()
            tasks.append((folder.files[first: first + EVAL_TASK], [(i, 0, size) for i, size in enumerate(sizes)]))
    else:
        for shard in list_shards(spec):
            if shard.resolve() in training:
                raise UserError(f"--against {spec}: {shard} is one of the training shards")
            index = load_index(shard)
            members = []
            for key, member in zip(index.keys.tolist(), map(image_member, index.members)):
                if member is not None:
                    members.append((0, *member))
                    names.append(f"{shard.name}/{key}")
            tasks.append(([shard], members))
    results = list(map_tasks(_hash_eval_task, [(paths, members, max_pixels) for paths, members in tasks]))
    ok = np.concatenate([r.ok for r in results])
    unhashed = sum((r.unhashed for r in results), Counter())
    if not ok.any():
        raise DataError(f"--against {spec}: none of its {len(names)} pictures could be hashed{_reasons(unhashed)}")
    hashes = np.concatenate([r.hashes for r in results])[ok]
    return EvalSet(spec, np.array(names, dtype=str)[ok], hashes, len(names), unhashed)


def _check_stems(shards: list[Path], label_dir: Path) -> None:
    seen: dict[str, Path] = {}
    for shard in shards:
        other = seen.setdefault(shard.stem, shard)
        if other != shard:
            raise UserError(f"training shards {other} and {shard} would share {hashes_path(label_dir, shard)}")


class _EvalPictures:
    """The evaluation sets' pictures, searchable, and what was found of them: ``copied`` (P,), whether a training
    sample is near picture p; ``near`` (sets,), training samples near a picture of each set."""

    def __init__(self, sets: list[EvalSet], radius: int) -> None:
        self.radius = radius
        self.index = HashIndex(np.concatenate([s.hashes.reshape(-1) for s in sets]))  # picture p's crops: p * C + k
        self.names = np.concatenate([s.names for s in sets])  # (P,)
        self.specs = np.array([s.spec for s in sets], dtype=str)
        self.set_of = np.repeat(np.arange(len(sets)), [len(s.names) for s in sets])  # (P,)
        self.copied = np.zeros(len(self.names), dtype=bool)
        self.near = np.zeros(len(sets), dtype=np.int64)

    def duplicates(self, hashes: ShardHashes) -> DuplicateList:
        """The samples of ``hashes`` within the radius of a picture, each with its nearest one."""
        sample, stored, distance = self.index.search(hashes.hashes, self.radius)
        picture = stored // len(EVAL_CROPS)
        self.copied[picture] = True
        pairs = _distinct(sample * len(self.specs) + self.set_of[picture])  # each (sample, set) once
        self.near += np.bincount(pairs % len(self.specs), minlength=len(self.specs))
        order = np.lexsort((distance, sample))  # by sample, the nearest picture first
        best = order[np.diff(sample[order], prepend=-1) != 0]
        return DuplicateList(hashes.keys[sample[best]], self.specs[self.set_of[picture[best]]],
                             self.names[picture[best]], distance[best], self.radius)


def find_duplicates(config: DedupConfig) -> DedupSummary:
    """Hash the training shards (those without a fresh hash file) and the evaluation sets, and write every training
    shard's duplicate list: its samples within ``config.radius`` bits of an evaluation picture."""
    shards, label_dir = list_shards(config.data), Path(config.labels)
    _check_stems(shards, label_dir)
    with _mapper(config.workers) as map_tasks:
        sets = [_hash_eval_set(spec, {s.resolve() for s in shards}, config.max_pixels, map_tasks)
                for spec in config.against]
        pictures = _EvalPictures(sets, config.radius)
        summary = DedupSummary(config.radius, label_dir, len(shards), 0, 0, Counter(), [], sets, [], [], 0)
        tasks = [(shard, hashes_path(label_dir, shard), config.max_pixels) for shard in shards]
        for shard, (hashes, reused, problem) in zip(shards, map_tasks(_hash_training_shard, tasks)):
            if hashes is None:
                log.warning("%s; its samples are not checked", problem)
                summary.unreadable.append(problem)
                continue
            summary.reused += reused
            summary.hashed += len(hashes.hashes)
            summary.unhashed.update(hashes.unhashed)
            found = pictures.duplicates(hashes)
            found.save(duplicates_path(label_dir, shard))
            summary.duplicates += len(found)
    summary.samples_near = pictures.near.tolist()
    summary.pictures_copied = np.bincount(pictures.set_of[pictures.copied], minlength=len(sets)).tolist()
    return summary


def register(subparsers) -> None:
    """Add the ``dedup`` command."""
    dedup = subparsers.add_parser(
        "dedup", help="list the training samples that are near-duplicates of evaluation pictures; training skips them")
    dedup.add_argument("--data", nargs="+", required=True,
                       help="training shards: files, folders (their *.tar), globs or {00000..00999} patterns")
    dedup.add_argument("--labels", required=True,
                       help="the training shards' label index folder: hash files and duplicate lists go beside them")
    dedup.add_argument("--against", nargs="+", required=True,
                       help="evaluation sets, each an ImageFolder tree (e.g. ImageNet's val/) or shards")
    dedup.add_argument("--radius", type=int, default=DEFAULT_RADIUS,
                       help="most bits of 64 in which a near-duplicate's hash differs (default: %(default)s)")
    dedup.add_argument("--workers", type=int, default=1, help="processes hashing pictures (default: %(default)s)")
    dedup.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = DedupConfig(args.data, args.labels, args.against, args.radius, args.workers)
    print("\n".join(find_duplicates(config).lines()))
    return 0
