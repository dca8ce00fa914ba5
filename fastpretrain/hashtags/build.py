"""Building a hashtag vocabulary: count canonical hashtags over the posts, keep the most frequent, label every shard.

``build_vocab`` makes one streaming pass over the inputs (in parallel over files): each post's hashtags become
the set of their noun synsets, counted as images per synset in an array of WordNet's size (never one entry per
raw hashtag), and each file's rows are kept on disk as synset ids. After selection the rows are mapped to class
ids and written as one :class:`LabelIndex` per input, then ``vocab.json``. ``write_label_indexes`` labels other
inputs (a validation split) with an existing vocabulary.

Selection: the ``size`` most frequent synsets with at least ``min_count`` images, most frequent first, ties by
wnid; or ``targeted="imagenet1k"``: exactly the 1000 ImageNet-1k synsets in ImageNet's class order (class ``i``
is ImageNet class ``i``, even with no image), so the hashtag head is an ImageNet classifier.

Memory: the (S,) count array, the canonicalizer's bounded memo, and one input file's rows per worker at a time
(a shard's are small; split a huge metadata file into parts, as each input gets its own label index).

Both entry points work in a temporary folder inside the label folder, removed whatever happens: on SIGTERM too
(its default action would end the process without running ``finally``), which ends them with ``Terminated``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import threading
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from fastpretrain.errors import DataError, UserError
from fastpretrain.hashtags.canonical import DROP_REASONS, SENSE_RULES, Canonicalizer
from fastpretrain.formats.labels import LabelIndex, label_index_path
from fastpretrain.hashtags.resample import class_replication, epoch_length, image_replication
from fastpretrain.hashtags.sources import InputStats, iter_posts, list_inputs
from fastpretrain.hashtags.wordnet import NounTable, noun_table

from fastpretrain.formats.vocab import Vocab, VocabClass

DEFAULT_SIZE = 17_000  # the paper's full vocabulary
TARGETED_WNIDS = {"imagenet1k": "imagenet1k_synsets.txt"}  # name -> wnid list in fastpretrain.assets
WORST_FILES_SHOWN = 3


@dataclass
class VocabBuildConfig:
    """What ``fastpretrain vocab build`` does; validated on construction (UserError naming the field)."""

    data: str | list[str]
    out: str = "vocab.json"
    size: int | None = None  # default DEFAULT_SIZE; not with `targeted`
    min_count: int | None = None  # default 1; not with `targeted`
    targeted: str | None = None
    sense: str = "concrete-first"
    workers: int = 1
    label_dir: str | None = None  # default: <folder of out>/labels
    max_bad_fraction: float = 0.01

    def __post_init__(self) -> None:
        if self.targeted is not None:
            if self.targeted not in TARGETED_WNIDS:
                raise UserError(f"targeted must be one of {', '.join(TARGETED_WNIDS)}, got {self.targeted!r}")
            for name in ("size", "min_count"):
                if getattr(self, name) is not None:
                    raise UserError(f"{name} cannot be combined with targeted={self.targeted} "
                                    "(the targeted vocabulary is its fixed class list)")
        else:
            self.size = DEFAULT_SIZE if self.size is None else self.size
            self.min_count = 1 if self.min_count is None else self.min_count
            if self.size < 1:
                raise UserError(f"size must be at least 1, got {self.size}")
            if self.min_count < 1:
                raise UserError(f"min_count must be at least 1, got {self.min_count}")
        if self.sense not in SENSE_RULES:
            raise UserError(f"sense must be one of {', '.join(SENSE_RULES)}, got {self.sense!r}")
        _check_workers_and_fraction(self.workers, self.max_bad_fraction)
        if self.label_dir is None:
            self.label_dir = str(Path(self.out).parent / "labels")


def _check_workers_and_fraction(workers: int, max_bad_fraction: float) -> None:
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise UserError(f"max_bad_fraction must lie in [0, 1], got {max_bad_fraction}")


@dataclass
class VocabLabelConfig:
    """What ``fastpretrain vocab label`` does; validated on construction (UserError naming the field)."""

    data: str | list[str]
    vocab: str
    out: str
    workers: int = 1
    max_bad_fraction: float = 0.01

    def __post_init__(self) -> None:
        _check_workers_and_fraction(self.workers, self.max_bad_fraction)


@dataclass
class LabelSummary:
    """What labeling inputs found: posts, the label indexes written, and what was skipped."""

    label_dir: Path
    label_indexes: list[Path]
    stats: InputStats
    posts_kept: int

    def lines(self) -> list[str]:
        """A human summary, one fact per line."""
        s = self.stats
        out = [f"{len(self.label_indexes)} label indexes in {self.label_dir}",
               f"posts: {s.posts} seen, {self.posts_kept} kept, {s.posts - self.posts_kept} without a kept hashtag "
               f"({s.malformed} malformed)",
               f"raw hashtags: {s.raw_hashtags}"]
        if s.skipped_posts:
            out.append("posts skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(s.skipped_posts.items())))
        if s.skipped_tags:
            out.append("hashtags dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(s.skipped_tags.items())))
        if s.skipped_files:
            out.append(_skipped_files_line(s))
        return out


def _skipped_files_line(stats: InputStats) -> str:
    """``files skipped: unreadable 2 (why; why)``: each reason's count and its first files, each saying why."""
    parts = []
    for reason, count in stats.skipped_file_counts.items():
        whys = [why for r, _, why in stats.skipped_files if r == reason]
        more = f"; and {count - WORST_FILES_SHOWN} more" if count > WORST_FILES_SHOWN else ""
        parts.append(f"{reason} {count} ({'; '.join(whys[:WORST_FILES_SHOWN])}{more})")
    return "files skipped: " + ", ".join(parts)


@dataclass
class VocabBuildSummary:
    """The vocabulary written, where, and the labeling of its inputs; ``sqrt_epoch_length`` is the expected
    samples per epoch under the default square-root resampling."""

    vocab_path: Path
    vocab: Vocab
    labeling: LabelSummary
    sqrt_epoch_length: float

    def lines(self) -> list[str]:
        v = self.vocab
        return [f"vocabulary {self.vocab_path}: {len(v)} classes (sense {v.sense}, hash {v.content_hash})",
                *self.labeling.lines(),
                f"sqrt resampling (default t): about {self.sqrt_epoch_length:.0f} samples per epoch "
                f"({self.sqrt_epoch_length / max(v.num_images, 1):.2f}x the {v.num_images} kept images)"]


# ------------------------------------------------------------------------------------------------------------
# Scanning: one input file -> its posts' synset rows (worker processes run this)


@dataclass
class SynsetRows:
    """One input's posts in file order: ``keys`` (n,), CSR ``offsets`` (n+1,) over ``synsets`` (nnz,) int32
    noun table rows, each row's synsets distinct."""

    keys: np.ndarray
    offsets: np.ndarray
    synsets: np.ndarray

    def to_labels(self, class_of_synset: np.ndarray, vocab_hash: str) -> LabelIndex:
        """Map to class ids, dropping synsets outside the vocabulary; each row sorted."""
        n = len(self.keys)
        classes = class_of_synset[self.synsets]  # (nnz,)
        rows = np.repeat(np.arange(n), np.diff(self.offsets))  # (nnz,)
        kept = classes >= 0
        classes, rows = classes[kept], rows[kept]
        order = np.lexsort((classes, rows))  # rows ascending, then class ids within a row
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
        return LabelIndex(self.keys, offsets, classes[order].astype(np.int32), vocab_hash)


def scan_input(path: Path, canonicalizer: Canonicalizer, stats: InputStats) -> SynsetRows:
    """Read one input's posts and canonicalize their hashtags (the hot loop of ``vocab build``); hashtags that
    name no synset are counted by reason into ``stats.skipped_tags``."""
    keys: list[str] = []
    lengths = array("q")
    flat = array("i")
    codes_of = canonicalizer.codes
    for key, tags in iter_posts(path, stats):
        keys.append(key)
        lengths.append(len(tags))
        flat.extend(codes_of(tags))
    # Per-tag codes (T,) -> each post's distinct synsets, in numpy: a few ms per 100k posts, where a Python set
    # per post would cost more and lose the count of dropped tags.
    offsets, synsets, dropped = _distinct_rows(np.frombuffer(lengths, dtype=np.int64),
                                               np.frombuffer(flat, dtype=np.int32), len(DROP_REASONS))
    for code in np.flatnonzero(dropped):
        stats.skipped_tags[DROP_REASONS[code]] += int(dropped[code])
    return SynsetRows(np.array(keys, dtype=np.str_), offsets, synsets)


def _distinct_rows(lengths: np.ndarray, codes: np.ndarray, num_reasons: int) -> tuple[np.ndarray, np.ndarray,
                                                                                       np.ndarray]:
    """Per-post ``lengths`` (n,) over per-tag ``codes`` (T,) -> CSR ``offsets`` (n+1,) over each post's distinct
    synset rows (nnz,) int32, ascending within a post, and the count of tags per negative code (num_reasons,)."""
    n = len(lengths)
    rows = np.repeat(np.arange(n, dtype=np.int64), lengths)  # (T,)
    dropped = codes < 0
    dropped_by_code = np.bincount(-codes[dropped], minlength=num_reasons)  # (num_reasons,)
    kept = ~dropped
    stride = int(codes.max(initial=0)) + 1
    # One int64 per (post, synset); rows are already ascending, so a stable sort meets long sorted runs.
    pairs = rows[kept] * stride + codes[kept]  # (K,)
    pairs.sort(kind="stable")
    first = np.ones(len(pairs), dtype=bool)
    np.not_equal(pairs[1:], pairs[:-1], out=first[1:])
    pairs = pairs[first]  # (nnz,)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(pairs // stride, minlength=n), out=offsets[1:])
    return offsets, (pairs % stride).astype(np.int32), dropped_by_code


# Per worker process: set once by _init_worker, so tasks carry only paths.
_canonicalizer: Canonicalizer | None = None
_class_of_synset: np.ndarray | None = None
_vocab_hash = ""


def _init_worker(sense: str, class_of_synset: np.ndarray | None, vocab_hash: str) -> None:
    global _canonicalizer, _class_of_synset, _vocab_hash
    if _canonicalizer is None or _canonicalizer.sense != sense:
        _canonicalizer = Canonicalizer(sense)
    _class_of_synset, _vocab_hash = class_of_synset, vocab_hash


@dataclass
class _Scanned:
    path: Path
    stats: InputStats
    synsets: np.ndarray | None  # counting: the synsets the file's posts carry (K,), and on how many posts (K,)
    synset_counts: np.ndarray | None  # (sparse: per-file arrays of WordNet's size would not stay bounded)
    posts_kept: int  # labeling: posts with at least one class


def _scan_task(path: Path, out: Path) -> _Scanned:
    """Scan ``path``; write its label index (labeling) or its synset rows (counting) to ``out``."""
    stats = InputStats()
    rows = scan_input(path, _canonicalizer, stats)
    if _class_of_synset is not None:
        index = rows.to_labels(_class_of_synset, _vocab_hash)
        index.save(out)
        return _Scanned(path, stats, None, None, int(np.count_nonzero(np.diff(index.offsets))))
    np.savez(out, keys=rows.keys, offsets=rows.offsets, synsets=rows.synsets)
    synsets, counts = np.unique(rows.synsets, return_counts=True)  # each row's synsets are distinct
    return _Scanned(path, stats, synsets, counts, 0)


def _scan_all(paths: list[Path], outs: list[Path], workers: int, sense: str,
              class_of_synset: np.ndarray | None = None, vocab_hash: str = "") -> Iterator[_Scanned]:
    """``_scan_task`` over the inputs in ``workers`` processes, results in input order as they come."""
    init = (sense, class_of_synset, vocab_hash)
    if workers == 1 or len(paths) == 1:
        _init_worker(*init)
        yield from map(_scan_task, paths, outs)
        return
    # spawn, not fork: the caller may hold threads (torch's, OpenBLAS's, a loader's) that fork would copy
    # mid-state. It costs each worker about a second to load the table, paid once per build.
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(paths)), initializer=_init_worker, initargs=init) as pool:
        yield from pool.imap(_scan_task_args, zip(paths, outs), chunksize=1)


def _scan_task_args(args: tuple[Path, Path]) -> _Scanned:
    return _scan_task(*args)


def _gather(scanned: Iterator[_Scanned], num_synsets: int | None = None) -> tuple[list[_Scanned], InputStats,
                                                                                  np.ndarray | None]:
    """Per-file results without their counts, the summed stats, and images per synset (S,) when counting."""
    results, total = [], InputStats()
    counts = None if num_synsets is None else np.zeros(num_synsets, dtype=np.int64)
    for result in scanned:
        total.add(result.stats)
        if counts is not None:
            counts[result.synsets] += result.synset_counts
            result.synsets = result.synset_counts = None
        results.append(result)
    return results, total, counts


def _check_inputs(spec, label_dir: Path) -> list[Path]:
    paths = list_inputs(spec)
    by_index: dict[Path, Path] = {}
    for path in paths:
        other = by_index.setdefault(label_index_path(label_dir, path), path)
        if other != path:
            raise UserError(f"inputs {other} and {path} would share the label index "
                            f"{label_index_path(label_dir, path)}: give them distinct file names")
    return paths


def _check_bad_share(scanned: list[_Scanned], total: InputStats, max_bad_fraction: float) -> None:
    if total.posts == 0:
        why = f"; {_skipped_files_line(total)}" if total.skipped_files else ""
        raise DataError(f"no posts in {', '.join(str(s.path) for s in scanned[:WORST_FILES_SHOWN])}"
                        f"{' ...' if len(scanned) > WORST_FILES_SHOWN else ''}{why}")
    share = total.malformed / total.posts
    if share > max_bad_fraction:
        worst = sorted(scanned, key=lambda s: (-s.stats.malformed, str(s.path)))[:WORST_FILES_SHOWN]
        named = ", ".join(f"{s.path} ({s.stats.malformed} of {s.stats.posts})" for s in worst if s.stats.malformed)
        raise DataError(f"{total.malformed} of {total.posts} posts malformed ({share:.1%}, more than "
                        f"max_bad_fraction {max_bad_fraction:.1%}); worst files: {named}")


# ------------------------------------------------------------------------------------------------------------
# Selection and the two entry points


def synset_classes(vocab: Vocab, table: NounTable) -> np.ndarray:
    """(S,) int32 over the noun table's synsets: the class id, or -1 for a synset outside the vocabulary."""
    mapping = np.full(len(table.offsets), -1, dtype=np.int32)
    for c in vocab.classes:
        mapping[table.synset_of_wnid[c.wnid]] = c.index
    return mapping


def select_synsets(counts: np.ndarray, table: NounTable, config: VocabBuildConfig) -> list[int]:
    """Noun table rows of the chosen classes, in class order (see the module docstring)."""
    if config.targeted is not None:
        listing = resources.files("fastpretrain.assets").joinpath(TARGETED_WNIDS[config.targeted]).read_text()
        wnids = [line.split()[0] for line in listing.splitlines() if line.strip()]
        return [table.synset_of_wnid[wnid] for wnid in wnids]
    eligible = np.flatnonzero(counts >= config.min_count)  # (E,) ascending rows: ascending wnids
    ranked = eligible[np.lexsort((eligible, -counts[eligible]))]  # most images first, ties by wnid
    if len(ranked) == 0:
        raise DataError(f"no canonical hashtag has min_count={config.min_count} images")
    return ranked[: config.size].tolist()


def _sqrt_epoch_length(vocab: Vocab, label_indexes: list[Path]) -> float:
    """Expected samples per epoch under square-root resampling with the default ``t``."""
    r_class = class_replication(vocab.counts, vocab.num_images, "sqrt")  # (C,)
    total = 0.0
    for path in label_indexes:
        index = LabelIndex.load(path)
        total += epoch_length(image_replication(r_class, index.labels, index.offsets))
    return total


def _write_labels(rows_files: list[Path], targets: list[Path], class_of_synset: np.ndarray, vocab_hash: str) -> int:
    """Map each file's synset rows to class ids and save them as label indexes; returns the posts kept."""
    posts_kept = 0
    for rows_file, target in zip(rows_files, targets):  # one file in memory at a time
        with np.load(rows_file) as npz:
            rows = SynsetRows(npz["keys"], npz["offsets"], npz["synsets"])
        index = rows.to_labels(class_of_synset, vocab_hash)
        index.save(target)
        posts_kept += int(np.count_nonzero(np.diff(index.offsets)))
    return posts_kept


def _vocab_stats(total: InputStats, posts_kept: int, inputs: int) -> dict:
    """What vocab.json records about the posts it was counted over."""
    return {"posts_seen": total.posts, "posts_kept": posts_kept,
            "posts_dropped_no_kept_hashtag": total.posts - posts_kept, "posts_malformed": total.malformed,
            "raw_hashtags_seen": total.raw_hashtags, "inputs": inputs,
            "skipped_posts": dict(sorted(total.skipped_posts.items())),
            "skipped_tags": dict(sorted(total.skipped_tags.items())),
            "skipped_files": total.skipped_file_counts}


class Terminated(UserError):
    """SIGTERM arrived while building or labeling; the temporary folder was removed. Exits like the shell's 128 +
    signal number."""

    exit_code = 128 + signal.SIGTERM


@contextmanager
def _sigterm_raises(what: str) -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread while the block runs (its default action would end the process
    without running ``finally``, leaving the temporary folder behind); the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def handle(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
        raise Terminated(f"{what} stopped by SIGTERM before it finished; run it again")

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _work_folder(label_dir: Path, prefix: str) -> Iterator[Path]:
    """A temporary folder in ``label_dir`` (the same file system, so staged files are renamed into place), removed
    when the block ends, or at exit if a signal comes between its making and the block."""
    with tempfile.TemporaryDirectory(dir=label_dir, prefix=prefix, ignore_cleanup_errors=True) as folder:
        yield Path(folder)


def build_vocab(config: VocabBuildConfig) -> VocabBuildSummary:
    """Count, select, write the label index of every input into ``config.label_dir``, then ``vocab.json``."""
    label_dir = Path(config.label_dir)
    paths = _check_inputs(config.data, label_dir)
    table = noun_table()  # derived and cached on disk once, before any worker process starts
    label_dir.mkdir(parents=True, exist_ok=True)
    with _sigterm_raises("vocab build"), _work_folder(label_dir, ".vocab-build-") as work:
        rows_files = [work / f"{i:06d}.npz" for i in range(len(paths))]
        scanned, total, synset_counts = _gather(_scan_all(paths, rows_files, config.workers, config.sense),
                                                len(table.offsets))
        _check_bad_share(scanned, total, config.max_bad_fraction)
        chosen = select_synsets(synset_counts, table, config)
        wnids = [table.wnid(s) for s in chosen]
        vocab_hash = Vocab.hash_of(wnids, config.sense, table.wordnet_version)
        class_of_synset = np.full(len(table.offsets), -1, dtype=np.int32)
        class_of_synset[chosen] = np.arange(len(chosen), dtype=np.int32)
        staged = [work / label_index_path(label_dir, path).name for path in paths]
        posts_kept = _write_labels(rows_files, staged, class_of_synset, vocab_hash)
        if posts_kept == 0:
            raise DataError(f"no post has a hashtag among the {len(chosen)} selected classes")
        classes = [VocabClass(i, table.wnid(s), table.lemmas[s], int(synset_counts[s])) for i, s in enumerate(chosen)]
        vocab = Vocab(classes, config.sense, vocab_hash, posts_kept, table.wordnet_version,
                      {"size": config.size, "min_count": config.min_count, "targeted": config.targeted},
                      _vocab_stats(total, posts_kept, len(paths)))
        sqrt_epoch = _sqrt_epoch_length(vocab, staged)
        written = [label_dir / target.name for target in staged]
        for source, target in zip(staged, written):
            os.replace(source, target)
        vocab.save(config.out)
    summary = LabelSummary(label_dir, written, total, posts_kept)
    return VocabBuildSummary(Path(config.out), vocab, summary, sqrt_epoch)


def write_label_indexes(inputs, vocab: Vocab, label_dir: str | os.PathLike, workers: int = 1,
                        max_bad_fraction: float = 0.01) -> LabelSummary:
    """Label ``inputs`` (e.g. a validation split) with an existing vocabulary: one index per input in
    ``label_dir``, written only if at most ``max_bad_fraction`` of the posts were malformed."""
    _check_workers_and_fraction(workers, max_bad_fraction)
    label_dir = Path(label_dir)
    paths = _check_inputs(inputs, label_dir)
    table = noun_table()
    if table.wordnet_version != vocab.wordnet_version:
        raise UserError(f"the vocabulary was built with WordNet {vocab.wordnet_version}, "
                        f"this machine has {table.wordnet_version}")
    label_dir.mkdir(parents=True, exist_ok=True)
    with _sigterm_raises("vocab label"), _work_folder(label_dir, ".vocab-label-") as work:
        staged = [work / label_index_path(label_dir, path).name for path in paths]
        scanned, total, _ = _gather(
            _scan_all(paths, staged, workers, vocab.sense, synset_classes(vocab, table), vocab.content_hash))
        _check_bad_share(scanned, total, max_bad_fraction)
        written = [label_dir / s.name for s in staged]
        for source, target in zip(staged, written):
            os.replace(source, target)
    return LabelSummary(label_dir, written, total, sum(s.posts_kept for s in scanned))
