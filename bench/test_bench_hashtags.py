"""Hashtag canonicalization and ``vocab build`` speed, each beside its baseline in the same run.

Lookups, on a Zipf stream of real lemma surfaces, plurals and noise, every candidate on the same tags, interleaved:
- ours: the memoized ``Canonicalizer.synset``. Floor: one dict hit per tag plus a method call.
- ``unmemoized``: normalization (NFKC/NFKD/casefold/regex) and the table's rules on every tag.
- ``nltk``: the per-tag WordNet query of a naive implementation (``wn.morphy`` + ``wn.synsets``).

``vocab build`` on JSON-lines posts with 5 tags each, interleaved with its floor, ``parse-only``: reading and parsing
the same posts without canonicalizing. Canonicalizing memoized tags, keeping the rows, the second pass and writing the
label indexes come on top of it, so the build runs at a fixed fraction of the parse rate whatever the machine: the
ratio falls when a stage gets slower than parsing. With 2 workers each worker also pays once to start and load the
table. ``extra_info`` adds the same ratio in CPU time of this process and its workers, which holds on a shared
machine where wall time does not.

Full runs only: shards (the same posts in WebDataset tars with 16 KB stand-in images) read through their DALI index
(only the JSON members, by offset) against reading every member with ``tarfile``; and a fresh process building the
canonicalizer from the disk-cached table (the demo's case) against one that only imports the module.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from fastpretrain.formats.shards import ShardWriter
from fastpretrain.hashtags.build import VocabBuildConfig, build_vocab
from fastpretrain.hashtags.canonical import Canonicalizer, hashtag_key
from fastpretrain.hashtags.sources import InputStats, iter_posts

TAGS_PER_POST = 5
LOOKUPS = 20_000
# The memoized pass goes over the tags this many times, so that its call lasts about as long as the baselines' and a
# time slice lost to another job costs it no larger share (on a loaded machine short calls look slower than they are).
MEMOIZED_PASSES = 10
LOOKUP_ROUNDS, SHORT_LOOKUP_ROUNDS = 25, 15
JSONL_POSTS = 480_000
JSONL_FILES = 8
BUILD_ROUNDS, SHORT_BUILD_ROUNDS = 5, 3  # calls of seconds: their medians settle in a few rounds
SHARD_POSTS = 20_000
IMAGE_BYTES = 16_384  # a small JPEG's size: what reading whole shards pays for and the index path skips


@pytest.fixture(scope="module")
def canonicalizer() -> Canonicalizer:
    return Canonicalizer()


@pytest.fixture(scope="module")
def tag_pool(canonicalizer) -> tuple[list[str], list[float]]:
    """Hashtags as people write them (lemma surfaces, plurals, noise) and cumulative Zipf weights."""
    rng = random.Random(0)  # fixed: the workload must be the same across runs to compare timings
    keys = rng.sample(canonicalizer.table.keys, 30_000)
    pool = ([k.capitalize() for k in keys[:20_000]] + [k + "s" for k in keys[20_000:]]
            + [f"insta{w}{i}" for i, w in enumerate(["good", "daily", "like", "food"] * 2_500)])
    rng.shuffle(pool)
    cum_weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(pool))))
    return pool, cum_weights


def test_lookups(benchmark, report, short, side_by_side, canonicalizer, tag_pool):
    from nltk.corpus import wordnet as wn

    pool, cum_weights = tag_pool
    tags = random.Random(1).choices(pool, cum_weights=cum_weights, k=LOOKUPS)
    synset, synset_of_key = canonicalizer.synset, canonicalizer.synset_of_key
    wn.synsets("warm", "n")  # load WordNet outside the timing
    for tag in tags:  # the memo fills as it would over the first posts of a build
        synset(tag)

    def memoized():
        for _ in range(MEMOIZED_PASSES):
            for tag in tags:
                synset(tag)

    def unmemoized():
        for tag in tags:
            synset_of_key(hashtag_key(tag))

    def nltk():
        for tag in tags:
            base = wn.morphy(hashtag_key(tag), "n")
            if base is not None:
                wn.synsets(base, "n")

    comparison = side_by_side({"memoized": memoized, "unmemoized": unmemoized, "nltk": nltk},
                              SHORT_LOOKUP_ROUNDS if short else LOOKUP_ROUNDS)
    lookups = {"memoized": MEMOIZED_PASSES * LOOKUPS, "unmemoized": LOOKUPS, "nltk": LOOKUPS}
    per_lookup = {name: [seconds / count for seconds in comparison.samples[name]] for name, count in lookups.items()}
    for baseline in ("nltk", "unmemoized"):
        ratio = statistics.median(b / o for b, o in zip(per_lookup[baseline], per_lookup["memoized"], strict=True))
        report(f"hashtags/cpu/lookup/memoized-vs-{baseline}", 1 / statistics.median(per_lookup["memoized"]),
               1 / statistics.median(per_lookup[baseline]), ratio, "lookups/s")
    benchmark.pedantic(memoized, rounds=10, iterations=1)


@pytest.fixture(scope="module")
def posts(tag_pool) -> list[tuple[str, dict]]:
    pool, cum_weights = tag_pool
    rng = random.Random(2)
    return [(f"{i:09d}", {"tags": rng.choices(pool, cum_weights=cum_weights, k=TAGS_PER_POST), "caption": "a nice day"})
            for i in range(JSONL_POSTS)]


@pytest.fixture(scope="module")
def jsonl_inputs(tmp_path_factory, posts) -> list[str]:
    folder = tmp_path_factory.mktemp("jsonl")
    per_file = len(posts) // JSONL_FILES
    paths = []
    for f in range(JSONL_FILES):
        path = folder / f"part-{f:02d}.jsonl"
        chunk = posts[f * per_file : (f + 1) * per_file]
        path.write_text("".join(json.dumps({"key": k, **meta}) + "\n" for k, meta in chunk))
        paths.append(str(path))
    return paths


def _shards(folder: Path, posts: list[tuple[str, dict]], indexed: bool) -> list[str]:
    image = bytes(IMAGE_BYTES)
    paths = []
    for f in range(4):
        path = folder / f"{f:05d}.tar"
        with ShardWriter(path, write_index=indexed) as writer:
            for key, meta in posts[f * SHARD_POSTS // 4 : (f + 1) * SHARD_POSTS // 4]:
                writer.write(key, {"jpg": image, "json": json.dumps(meta).encode()})
        paths.append(str(path))
    return paths


def _cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (a build's pool workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _counting_cpu(function, cpu_seconds: list[float]):
    def run():
        start = _cpu_seconds()
        result = function()
        cpu_seconds.append(_cpu_seconds() - start)
        return result
    return run


def _parse(inputs: list[str]) -> int:
    stats = InputStats()
    for path in inputs:
        for _ in iter_posts(path, stats):
            pass
    return stats.posts


def _build(inputs: list[str], out: Path, workers: int) -> int:
    summary = build_vocab(VocabBuildConfig(data=inputs, out=str(out / "vocab.json"), workers=workers))
    return summary.labeling.stats.posts


def _build_against(benchmark, report, side_by_side, name: str, ours, baseline, posts: int, rounds: int) -> None:
    """``ours`` and ``baseline`` (each a call over ``posts`` posts) interleaved; a row of posts/s, CPU in extra_info.

    Calls of seconds: no warm-up (the fixtures have loaded the table and written the inputs), and ``benchmark`` times
    the whole comparison once rather than our path again.
    """
    cpu: dict[str, list[float]] = {"ours": [], "baseline": []}
    candidates = {"ours": _counting_cpu(ours, cpu["ours"]), "baseline": _counting_cpu(baseline, cpu["baseline"])}
    comparison = benchmark.pedantic(side_by_side, args=(candidates, rounds), kwargs={"warmup": 0, "settle_s": 0},
                                    rounds=1, iterations=1)
    report(name, posts / comparison.median("ours"), posts / comparison.median("baseline"),
           comparison.speedup("ours", "baseline"), "posts/s")
    benchmark.extra_info["cpu_ratio"] = round(statistics.median(
        b / o for b, o in zip(cpu["baseline"], cpu["ours"], strict=True)), 3)
    benchmark.extra_info["posts_per_cpu_s"] = round(posts / statistics.median(cpu["ours"]))


# 1 worker builds in this process, as parsing does: the ratio to gate. 2 workers also start a pool and contend for
# the cores with other users of a shared machine.
@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.full)])
def test_vocab_build_jsonl(benchmark, report, short, side_by_side, jsonl_inputs, tmp_path, workers):
    name = f"vocab-build/cpu/jsonl-{workers}-worker{'s' if workers > 1 else ''}/vs-parse-only"
    _build_against(benchmark, report, side_by_side, name,
                   lambda: _build(jsonl_inputs, tmp_path, workers), lambda: _parse(jsonl_inputs), JSONL_POSTS,
                   SHORT_BUILD_ROUNDS if short else BUILD_ROUNDS)


@pytest.mark.full
def test_vocab_build_shards(benchmark, report, side_by_side, tmp_path_factory, posts, tmp_path):
    indexed = _shards(tmp_path_factory.mktemp("indexed"), posts, indexed=True)
    unindexed = _shards(tmp_path_factory.mktemp("unindexed"), posts, indexed=False)
    _build_against(benchmark, report, side_by_side, "vocab-build/cpu/shards/indexed-vs-unindexed",
                   lambda: _build(indexed, tmp_path, 1), lambda: _build(unindexed, tmp_path, 1), SHARD_POSTS,
                   BUILD_ROUNDS)


def _fresh_process(program: str) -> None:
    subprocess.run([sys.executable, "-c", program], check=True, env=dict(os.environ))


@pytest.mark.full
def test_warm_start(benchmark, report, side_by_side, canonicalizer):
    """The canonicalizer's start from its disk cache (made by the ``canonicalizer`` fixture) in a fresh process."""
    warm = "from fastpretrain.hashtags.canonical import Canonicalizer; Canonicalizer().canonical('cars')"
    candidates = {"warm": lambda: _fresh_process(warm),
                  "import": lambda: _fresh_process("import fastpretrain.formats.vocab")}
    comparison = benchmark.pedantic(side_by_side, args=(candidates, BUILD_ROUNDS), kwargs={"warmup": 1, "settle_s": 0},
                                    rounds=1, iterations=1)
    report("hashtags/cpu/warm-start/vs-import-only", comparison.median("warm"), comparison.median("import"),
           comparison.speedup("warm", "import"), "s")
    benchmark.extra_info["seconds_over_import"] = round(comparison.median("warm") - comparison.median("import"), 3)
