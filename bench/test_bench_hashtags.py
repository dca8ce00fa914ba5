"""Hashtag canonicalization and ``vocab build`` speed, each beside its baseline in the same run.

Lookups (group ``hashtag-lookup``), on a Zipf stream of real lemma surfaces, plurals and noise:
- floor: one dict hit per tag, about 50-100 ns, so ~10M lookups/s; the memoized ``Canonicalizer.synset`` is that
  plus a method call. Predicted: >= 5M/s after warm-up (issue target: >= 1M/s per core).
- ``unmemoized``: normalization (NFKC/NFKD/casefold/regex) and the table's rules on every tag, ~1.5 us per tag.
- ``nltk``: the per-tag WordNet query of a naive implementation (``wn.morphy`` + ``wn.synsets``).
  ``extra_info["speedup_vs_nltk"]`` and ``["speedup_vs_unmemoized"]`` are the ratios, measured in this run.

``vocab build`` (group ``vocab-build``) on JSON-lines posts with 5 tags each:
- floor: reading and parsing the posts without canonicalizing (``parse_only``), ~2 us of CPU per post.
  Canonicalizing 5 memoized tags, keeping the rows, the second pass and writing the label indexes add ~3 us.
  Predicted: ~200k posts per CPU-second in one worker; with 2 workers on 2 idle cores >= 200k posts/s, each
  worker paying ~0.7 CPU-s once to start and load the table. ``extra_info["posts_per_cpu_s"]`` counts the CPU
  time of this process and its workers, so it holds on a shared machine where wall time does not.
- ``vocab-build-shards``: the same posts in WebDataset tars with 16 KB stand-in images. Without a DALI index
  ``tarfile`` reads every member (~40 us per sample); with one, only the JSON members are read by offset.

``warm-start``: a fresh process building the canonicalizer from the disk-cached table (the demo's case; target
< 2 s), beside one that only imports the module.

Measured 2026-11-29 on the shared 2-core machine (load average about 3 from other jobs, so wall times of the
2-worker case are not meaningful): memoized 15.2M lookups/s (16.6x unmemoized at 0.91M/s, 55x the nltk query at
0.27M/s); vocab build with 1 worker 205k posts/s wall, 211k posts per CPU-second (parse floor 504k); with 2
workers 3.8 CPU-s for 480k posts (1.5 CPU-s of it worker start-up), which predicts ~250k posts/s on 2 idle
cores (not measurable here); shards 19k posts per CPU-second without an index, 80k with one (4.2x); warm start
0.6 s, 0.44 s over a bare import.
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
from fastpretrain.hashtags.canonical import Canonicalizer, hashtag_key
from fastpretrain.hashtags.sources import InputStats, iter_posts
from fastpretrain.hashtags.build import VocabBuildConfig, build_vocab

TAGS_PER_POST = 5
LOOKUP_STREAM = 200_000
JSONL_POSTS = 480_000
JSONL_FILES = 8
SHARD_POSTS = 20_000
IMAGE_BYTES = 16_384  # a small JPEG's size: what reading whole shards pays for and the index path skips
MEDIANS: dict[str, float] = {}  # benchmark name -> median seconds, for ratios within this run


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


@pytest.fixture(scope="module")
def tag_stream(tag_pool) -> list[str]:
    pool, cum_weights = tag_pool
    return random.Random(1).choices(pool, cum_weights=cum_weights, k=LOOKUP_STREAM)


def _record(benchmark, name: str, items: int, unit: str) -> float:
    median = benchmark.stats.stats.median
    MEDIANS[name] = median
    benchmark.extra_info[f"{unit}_per_s"] = round(items / median)
    return median


@pytest.mark.benchmark(group="hashtag-lookup")
def test_lookup_nltk_per_tag(benchmark, tag_stream):
    from nltk.corpus import wordnet as wn

    sample = tag_stream[:2_000]
    wn.synsets("warm", "n")  # load WordNet outside the timing

    def run():
        for tag in sample:
            base = wn.morphy(hashtag_key(tag), "n")
            if base is not None:
                wn.synsets(base, "n")

    benchmark.pedantic(run, rounds=3, iterations=1)
    MEDIANS["nltk_per_lookup"] = _record(benchmark, "nltk", len(sample), "lookups") / len(sample)


@pytest.mark.benchmark(group="hashtag-lookup")
def test_lookup_unmemoized(benchmark, canonicalizer, tag_stream):
    def run():
        for tag in tag_stream:
            canonicalizer.synset_of_key(hashtag_key(tag))

    benchmark.pedantic(run, rounds=5, iterations=1)
    MEDIANS["unmemoized_per_lookup"] = _record(benchmark, "unmemoized", len(tag_stream), "lookups") / len(tag_stream)


@pytest.mark.benchmark(group="hashtag-lookup")
def test_lookup_memoized(benchmark, canonicalizer, tag_stream):
    synset = canonicalizer.synset
    for tag in tag_stream:  # warm-up: the memo fills as it would over the first posts of a build
        synset(tag)

    def run():
        for tag in tag_stream:
            synset(tag)

    benchmark.pedantic(run, rounds=10, iterations=1)
    per_lookup = _record(benchmark, "memoized", len(tag_stream), "lookups") / len(tag_stream)
    for baseline in ("nltk", "unmemoized"):
        if f"{baseline}_per_lookup" in MEDIANS:
            benchmark.extra_info[f"speedup_vs_{baseline}"] = round(MEDIANS[f"{baseline}_per_lookup"] / per_lookup, 1)


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


@pytest.fixture(scope="module", params=["no_index", "indexed"])
def shard_inputs(request, tmp_path_factory, posts) -> list[str]:
    """Shards of the first SHARD_POSTS posts with a stand-in image of IMAGE_BYTES, with or without DALI index."""
    folder = tmp_path_factory.mktemp(f"shards_{request.param}")
    image = bytes(IMAGE_BYTES)
    paths = []
    for f in range(4):
        path = folder / f"{f:05d}.tar"
        with ShardWriter(path, write_index=request.param == "indexed") as writer:
            for key, meta in posts[f * SHARD_POSTS // 4 : (f + 1) * SHARD_POSTS // 4]:
                writer.write(key, {"jpg": image, "json": json.dumps(meta).encode()})
        paths.append(str(path))
    return paths


CPU_SECONDS: dict[str, list[float]] = {}  # benchmark name -> CPU seconds per round, this process and its workers


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _counting_cpu(name: str, fn, *args):
    start = _cpu_seconds()
    result = fn(*args)
    CPU_SECONDS.setdefault(name, []).append(_cpu_seconds() - start)  # pool workers are reaped: their time counts
    return result


def _build(inputs: list[str], out: Path, workers: int) -> int:
    summary = build_vocab(VocabBuildConfig(data=inputs, out=str(out / "vocab.json"), workers=workers))
    return summary.labels.stats.posts


def _record_cpu(benchmark, name: str, posts: int) -> None:
    """Posts per CPU-second: per-core throughput that other jobs on a shared machine do not distort."""
    cpu = statistics.median(CPU_SECONDS[name])
    benchmark.extra_info["cpu_s"] = round(cpu, 3)
    benchmark.extra_info["posts_per_cpu_s"] = round(posts / cpu)


@pytest.mark.benchmark(group="vocab-build")
def test_parse_only_floor(benchmark, jsonl_inputs):
    def run():
        stats = InputStats()
        for path in jsonl_inputs:
            for _ in iter_posts(path, stats):
                pass
        return stats.posts

    posts = benchmark.pedantic(_counting_cpu, args=("parse_only", run), rounds=3, iterations=1)
    _record(benchmark, "parse_only", posts, "posts")
    _record_cpu(benchmark, "parse_only", posts)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.benchmark(group="vocab-build")
def test_vocab_build_jsonl(benchmark, jsonl_inputs, tmp_path, workers):
    name = f"build_{workers}"
    posts = benchmark.pedantic(_counting_cpu, args=(name, _build, jsonl_inputs, tmp_path, workers), rounds=3,
                               iterations=1)
    median = _record(benchmark, name, posts, "posts")
    _record_cpu(benchmark, name, posts)
    if "parse_only" in MEDIANS:
        benchmark.extra_info["time_vs_parse_floor"] = round(median / MEDIANS["parse_only"], 2)
    if workers == 2 and "build_1" in MEDIANS:
        benchmark.extra_info["speedup_vs_1_worker"] = round(MEDIANS["build_1"] / median, 2)


@pytest.mark.benchmark(group="vocab-build-shards")
def test_vocab_build_shards(benchmark, shard_inputs, tmp_path, request):
    name = f"shards_{request.node.callspec.id}"
    posts = benchmark.pedantic(_counting_cpu, args=(name, _build, shard_inputs, tmp_path, 1), rounds=3, iterations=1)
    _record(benchmark, name, posts, "posts")
    _record_cpu(benchmark, name, posts)
    if "shards_no_index" in MEDIANS and name == "shards_indexed":
        benchmark.extra_info["speedup_vs_no_index"] = round(MEDIANS["shards_no_index"] / MEDIANS[name], 1)


def _fresh_process(program: str) -> None:
    subprocess.run([sys.executable, "-c", program], check=True, env=dict(os.environ))


@pytest.mark.benchmark(group="warm-start")
def test_import_only_baseline(benchmark, canonicalizer):
    benchmark.pedantic(_fresh_process, args=("import fastpretrain.formats.vocab",), rounds=3, iterations=1)
    _record(benchmark, "import_only", 1, "starts")


@pytest.mark.benchmark(group="warm-start")
def test_warm_start_canonicalizer(benchmark, canonicalizer):
    program = "from fastpretrain.hashtags.canonical import Canonicalizer; Canonicalizer().canonical('cars')"
    benchmark.pedantic(_fresh_process, args=(program,), rounds=3, iterations=1)
    median = _record(benchmark, "warm_start", 1, "starts")
    if "import_only" in MEDIANS:
        benchmark.extra_info["seconds_over_import"] = round(median - MEDIANS["import_only"], 3)
