"""Vocabulary building and labeling: counts worked out by hand, selection order, ImageNet targeting, the
malformed-input gate, determinism across runs and worker counts, vocab.json loading, and the CLI."""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from nltk.corpus import wordnet as wn

from fastpretrain.formats.shards import ShardWriter
from fastpretrain.errors import DataError, UserError
from fastpretrain.hashtags import commands
from fastpretrain.hashtags.canonical import Canonicalizer
from fastpretrain.formats.labels import LabelIndex, label_index_path
from fastpretrain.hashtags.build import VocabBuildConfig, build_vocab, write_label_indexes
from fastpretrain.formats.vocab import Vocab


def wnid(name: str) -> str:
    return "n%08d" % wn.synset(name).offset()


DOG, CAR, ICE_CREAM, GOLDEN, TREE = (wnid(n) for n in
                                     ["dog.n.01", "car.n.01", "ice_cream.n.01", "golden_retriever.n.01", "tree.n.01"])

SHARD_POSTS = [  # (key, json bytes) -> synsets by hand
    ("p0", {"tags": ["car", "cars", "instagood"]}),  # car
    ("p1", {"tags": ["dog", "Automobile"]}),  # dog, car
    ("p2", {"tags": ["instagood"]}),  # nothing
    ("p3", {"tags": ["tree", "dogs", "#IceCream"]}),  # tree, dog, ice cream
    ("p4", None),  # malformed
]
JSONL_POSTS = [
    {"key": "q0", "tags": ["ice_cream", "car"]},  # ice cream, car
    {"key": "q1", "tags": ["goldenretrievers"]},  # golden retriever
    {"key": "q2", "caption": "walk #dog #Dog"},  # dog
    {"key": "q3", "tags": []},  # nothing
]
# Images per synset: dog p1 p3 q2, car p0 p1 q0, ice cream p3 q0, golden retriever q1, tree p3.
# Ranked by count, ties by wnid: dog (n02084071) before car (n02958343); golden retriever (n02099601) before tree.
HAND_RANKING = [(DOG, 3), (CAR, 3), (ICE_CREAM, 2), (GOLDEN, 1), (TREE, 1)]




def write_shard(path: Path, posts) -> Path:
    with ShardWriter(path, write_index=False) as writer:
        for key, meta in posts:
            body = b'{"tags": [' if meta is None else json.dumps(meta).encode()
            writer.write(key, {"jpg": b"\xff\xd8", "json": body})
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def corpus(tmp_path) -> list[str]:
    shard = write_shard(tmp_path / "00000.tar", SHARD_POSTS)
    return [str(shard), str(write_jsonl(tmp_path / "meta.jsonl", JSONL_POSTS))]


def rows_of(label_dir: Path, shard: str) -> dict[str, list[int]]:
    index = LabelIndex.load(label_index_path(label_dir, shard))
    return {str(key): index.labels_of(i).tolist() for i, key in enumerate(index.keys)}


def test_counts_selection_and_labels_match_the_hand_count(tmp_path, corpus):
    out = tmp_path / "v" / "vocab.json"
    summary = build_vocab(VocabBuildConfig(data=corpus, out=str(out), max_bad_fraction=0.2))
    vocab = Vocab.load(out)
    assert [(c.wnid, c.count) for c in vocab.classes] == HAND_RANKING
    assert [c.index for c in vocab.classes] == list(range(5))
    assert vocab.classes[0].lemmas == wn.synset("dog.n.01").lemma_names()
    assert vocab.num_images == 6  # p0 p1 p3 q0 q1 q2
    assert vocab.stats["posts_seen"] == 9 and vocab.stats["posts_kept"] == 6
    assert vocab.stats["posts_dropped_no_kept_hashtag"] == 3 and vocab.stats["posts_malformed"] == 1
    assert vocab.stats["raw_hashtags_seen"] == 3 + 2 + 1 + 3 + 2 + 1 + 2  # q2's caption gives two
    assert vocab.wordnet_version == "3.0" and vocab.sense == "concrete-first"
    label_dir = tmp_path / "v" / "labels"  # the default: beside vocab.json
    dog, car, ice, golden, tree = range(5)
    assert rows_of(label_dir, corpus[0]) == {"p0": [car], "p1": [dog, car], "p2": [], "p3": [dog, ice, tree],
                                              "p4": []}
    assert rows_of(label_dir, corpus[1]) == {"q0": [car, ice], "q1": [golden], "q2": [dog], "q3": []}
    assert LabelIndex.load(label_index_path(label_dir, corpus[0])).vocab_hash == vocab.content_hash
    assert summary.labeling.posts_kept == 6
    assert sorted(p.name for p in label_dir.iterdir()) == ["00000.labels.npz", "meta.labels.npz"]  # no leftovers
    np.testing.assert_array_equal(vocab.counts, [3, 3, 2, 1, 1])


def test_size_and_min_count_cut_the_ranking(tmp_path, corpus):
    build_vocab(VocabBuildConfig(data=corpus, out=str(tmp_path / "a.json"), size=3, max_bad_fraction=0.2,
                                 label_dir=str(tmp_path / "la")))
    vocab = Vocab.load(tmp_path / "a.json")
    assert vocab.wnids == [DOG, CAR, ICE_CREAM]
    assert vocab.num_images == 5  # q1's golden retriever is gone
    assert rows_of(tmp_path / "la", corpus[1]) == {"q0": [1, 2], "q1": [], "q2": [0], "q3": []}
    build_vocab(VocabBuildConfig(data=corpus, out=str(tmp_path / "b.json"), min_count=2, max_bad_fraction=0.2,
                                 label_dir=str(tmp_path / "lb")))
    assert Vocab.load(tmp_path / "b.json").wnids == [DOG, CAR, ICE_CREAM]


def test_targeted_imagenet_keeps_imagenet_order(tmp_path, corpus):
    listing = resources.files("fastpretrain.assets").joinpath("imagenet1k_synsets.txt").read_text().splitlines()
    imagenet = [line.split()[0] for line in listing if line.strip()]
    build_vocab(VocabBuildConfig(data=corpus, out=str(tmp_path / "in.json"), targeted="imagenet1k",
                                 max_bad_fraction=0.2))
    vocab = Vocab.load(tmp_path / "in.json")
    assert vocab.wnids == imagenet and len(vocab) == 1000
    golden, ice = imagenet.index(GOLDEN), imagenet.index(ICE_CREAM)
    assert (golden, ice) == (207, 928)  # ImageNet's classes 207 and 928: golden retriever, ice cream
    # dog.n.01, car.n.01 and tree.n.01 are no ImageNet class: only p3, q0 (ice cream) and q1 (golden) count.
    assert vocab.classes[golden].count == 1 and vocab.classes[ice].count == 2 and vocab.counts.sum() == 3
    assert rows_of(tmp_path / "labels", corpus[1]) == {"q0": [ice], "q1": [golden], "q2": [], "q3": []}
    assert rows_of(tmp_path / "labels", corpus[0])["p3"] == [ice]
    assert vocab.num_images == 3


def test_targeted_refuses_size_and_min_count(corpus):
    with pytest.raises(UserError, match="size cannot be combined with targeted"):
        VocabBuildConfig(data=corpus, targeted="imagenet1k", size=100)
    with pytest.raises(UserError, match="targeted must be one of imagenet1k"):
        VocabBuildConfig(data=corpus, targeted="imagenet21k")
    with pytest.raises(UserError, match="size must be at least 1"):
        VocabBuildConfig(data=corpus, size=0)
    with pytest.raises(UserError, match="workers"):
        VocabBuildConfig(data=corpus, workers=0)
    with pytest.raises(UserError, match="max_bad_fraction"):
        VocabBuildConfig(data=corpus, max_bad_fraction=1.5)


def test_malformed_share_over_the_limit_fails_naming_the_worst_file(tmp_path):
    good = [(f"g{i:03d}", {"tags": ["dog"]}) for i in range(97)]
    clean = write_shard(tmp_path / "clean.tar", good)
    dirty = write_shard(tmp_path / "dirty.tar", [("d0", None), ("d1", None), ("d2", {"tags": ["car"]})])
    out = tmp_path / "vocab.json"
    with pytest.raises(DataError, match=r"2 of 100 posts malformed .*dirty\.tar \(2 of 3\)"):
        build_vocab(VocabBuildConfig(data=[str(clean), str(dirty)], out=str(out)))
    assert not out.exists() and list((tmp_path / "labels").iterdir()) == []  # nothing half-written
    build_vocab(VocabBuildConfig(data=[str(clean), str(dirty)], out=str(out), max_bad_fraction=0.05))
    assert Vocab.load(out).num_images == 98


def test_inputs_sharing_a_label_index_name_are_refused(tmp_path):
    a = write_shard(tmp_path / "a" / "00000.tar", [("x", {"tags": ["dog"]})])
    b = write_shard(tmp_path / "b" / "00000.tar", [("y", {"tags": ["dog"]})])
    with pytest.raises(UserError, match="would share the label index"):
        build_vocab(VocabBuildConfig(data=[str(a), str(b)], out=str(tmp_path / "v.json")))


def random_corpus(folder: Path, py_rng: random.Random, canonicalizer: Canonicalizer) -> list[str]:
    """Shards and metadata of random posts from a long-tailed tag pool with synonyms, plurals and noise."""
    table = canonicalizer.table
    words = py_rng.sample([k for k in table.keys if k.isalpha() and len(k) > 3], 150)
    pool = words + [w + "s" for w in words[:40]] + ["instagood", "love", "photooftheday", "😀", "x" * 300]
    weights = [1.0 / (i + 1) ** 0.8 for i in range(len(pool))]
    inputs = []
    for f in range(5):
        posts = [(f"{f}{i:04d}", {"tags": py_rng.choices(pool, weights, k=py_rng.randint(0, 7))}) for i in range(120)]
        if f == 4:
            inputs.append(str(write_jsonl(folder / "meta.jsonl", [{"key": k, **m} for k, m in posts])))
        else:
            inputs.append(str(write_shard(folder / f"{f:05d}.tar", posts)))
    return inputs


def test_random_corpus_against_a_direct_count_and_identical_across_worker_counts(tmp_path, py_rng):
    canonicalizer = Canonicalizer()
    inputs = random_corpus(tmp_path, py_rng, canonicalizer)
    built = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}" / "vocab.json"
        build_vocab(VocabBuildConfig(data=inputs, out=str(out), size=40, workers=workers))
        built[workers] = out
    assert built[1].read_text() == built[2].read_text()
    for path in inputs:
        a, b = (LabelIndex.load(label_index_path(built[w].parent / "labels", path)) for w in (1, 2))
        assert a.keys.tolist() == b.keys.tolist()
        np.testing.assert_array_equal(a.offsets, b.offsets)
        np.testing.assert_array_equal(a.labels, b.labels)

    # The reference: every post's distinct synsets by a plain loop, counted and ranked in Python.
    posts = {}
    for path in inputs:
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
            posts.update({row["key"]: row["tags"] for row in rows})
        else:
            with tarfile.open(path) as tar:
                for member in tar:
                    if member.name.endswith(".json"):
                        posts[member.name[:-5]] = json.load(tar.extractfile(member))["tags"]
    synsets_of = {key: {canonicalizer.canonical(t) for t in tags} - {None} for key, tags in posts.items()}
    counts = Counter(s for synsets in synsets_of.values() for s in synsets)
    ranking = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:40]
    vocab = Vocab.load(built[1])
    assert [(c.wnid, c.count) for c in vocab.classes] == ranking
    class_of = {wnid: i for i, (wnid, _) in enumerate(ranking)}
    assert vocab.num_images == sum(1 for s in synsets_of.values() if s & class_of.keys())
    for path in inputs:
        index = LabelIndex.load(label_index_path(built[1].parent / "labels", path))
        for row, key in enumerate(index.keys.tolist()):
            assert index.labels_of(row).tolist() == sorted(class_of[s] for s in synsets_of[key] if s in class_of)


def test_labeling_a_validation_split_with_an_existing_vocab(tmp_path, corpus):
    build_vocab(VocabBuildConfig(data=corpus, out=str(tmp_path / "vocab.json"), max_bad_fraction=0.2))
    vocab = Vocab.load(tmp_path / "vocab.json")
    val = write_jsonl(tmp_path / "val.jsonl", [{"key": "v0", "tags": ["Trees", "dog"]}, {"key": "v1", "tags": ["x"]},
                                              {"key": "v2", "caption": "#goldenretriever"}])
    summary = write_label_indexes(str(val), vocab, tmp_path / "val-labels")
    assert rows_of(tmp_path / "val-labels", str(val)) == {"v0": [0, 4], "v1": [], "v2": [3]}
    assert LabelIndex.load(label_index_path(tmp_path / "val-labels", val)).vocab_hash == vocab.content_hash
    assert summary.stats.posts == 3 and summary.posts_kept == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "b0", "tags": ["dog"]}\n{"key": \n')
    with pytest.raises(DataError, match="bad.jsonl"):
        write_label_indexes(str(bad), vocab, tmp_path / "bad-labels")
    assert list((tmp_path / "bad-labels").iterdir()) == []


def test_vocab_load_refuses_missing_corrupt_foreign_and_edited_files(tmp_path, corpus):
    with pytest.raises(UserError, match="nope.json does not exist"):
        Vocab.load(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"format_version": 1, "classes": [')
    with pytest.raises(UserError, match="broken.json"):
        Vocab.load(broken)
    build_vocab(VocabBuildConfig(data=corpus, out=str(tmp_path / "vocab.json"), max_bad_fraction=0.2))
    body = json.loads((tmp_path / "vocab.json").read_text())
    (tmp_path / "future.json").write_text(json.dumps({**body, "format_version": 99}))
    with pytest.raises(UserError, match="future.json has format version 99"):
        Vocab.load(tmp_path / "future.json")
    body["classes"][0], body["classes"][1] = body["classes"][1], body["classes"][0]
    body["classes"][0]["index"], body["classes"][1]["index"] = 0, 1
    (tmp_path / "edited.json").write_text(json.dumps(body))
    with pytest.raises(UserError, match="edited.json is corrupt: its content hash"):
        Vocab.load(tmp_path / "edited.json")


def test_command_line_build_and_label(tmp_path, corpus, capsys):
    parser = argparse.ArgumentParser(prog="fastpretrain")
    commands.register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli" / "vocab.json"
    args = parser.parse_args(["vocab", "build", "--data", *corpus, "--out", str(out), "--size", "2",
                              "--max-bad-fraction", "0.2"])
    assert args.func(args) == 0
    assert Vocab.load(out).wnids == [DOG, CAR]
    printed = capsys.readouterr().out
    assert "2 classes" in printed and "9 seen, 5 kept" in printed and "malformed_json 1" in printed
    args = parser.parse_args(["vocab", "label", "--data", corpus[1], "--vocab", str(out), "--out",
                              str(tmp_path / "val")])
    assert args.func(args) == 0
    assert rows_of(tmp_path / "val", corpus[1]) == {"q0": [1], "q1": [], "q2": [0], "q3": []}
    args = parser.parse_args(["vocab", "build", "--data", *corpus, "--targeted", "imagenet1k", "--size", "5"])
    with pytest.raises(UserError, match="size cannot be combined"):
        args.func(args)


def test_cli_exits_1_naming_the_worst_file_when_too_much_is_malformed(tmp_path, capsys):
    from fastpretrain.cli import main

    clean = write_shard(tmp_path / "clean.tar", [(f"g{i:02d}", {"tags": ["dog"]}) for i in range(40)])
    dirty = write_shard(tmp_path / "dirty.tar", [("d0", None), ("d1", {"tags": ["car"]})])
    code = main(["vocab", "build", "--data", str(clean), str(dirty), "--out", str(tmp_path / "vocab.json")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "1 of 42 posts malformed" in err and "dirty.tar (1 of 2)" in err
    assert main(["vocab", "build", "--data", str(clean), str(dirty), "--out", str(tmp_path / "vocab.json"),
                 "--max-bad-fraction", "0.05"]) == 0


def test_every_exported_name_resolves():
    import fastpretrain.hashtags as hashtags

    for name in hashtags.__all__:
        value = getattr(hashtags, name)  # AttributeError when the name maps to the wrong module
        assert getattr(value, "__name__", name) == name  # a class or function is the one of that name


# Hashtags by why they name no synset, classified by hand (the premise of each is checked against WordNet below).
DROPPED_BY_HAND = {
    "no_letters_or_digits": ["😀", "🎉🎉", "#", "--", "❤️"],
    "digits_only": ["2024", "#1000", "42"],
    "not_a_noun": ["instagood", "happily", "tbt"],
}
NOUNS = ["dog", "Dogs", "car", "#IceCream"]


def test_dropped_hashtags_are_counted_by_reason(tmp_path, py_rng, capsys):
    assert all(not wn.synsets(tag, "n") for tag in DROPPED_BY_HAND["not_a_noun"])
    reason_of = {tag: reason for reason, tags in DROPPED_BY_HAND.items() for tag in tags}
    pool = [*reason_of, *NOUNS]
    rows = [{"key": f"k{i}", "tags": py_rng.choices(pool, k=py_rng.randint(1, 6))} for i in range(60)]
    rows.append({"key": "long", "tags": ["x" * 200, "dog", "dog"]})  # one too long (dropped while reading)
    out = tmp_path / "vocab.json"
    summary = build_vocab(VocabBuildConfig(data=[str(write_jsonl(tmp_path / "m.jsonl", rows))], out=str(out)))
    expected = Counter(reason_of[tag] for row in rows for tag in row["tags"] if tag in reason_of)
    expected["tag_too_long"] = 1
    assert dict(summary.labeling.stats.skipped_tags) == dict(expected)
    assert Vocab.load(out).stats["skipped_tags"] == dict(sorted(expected.items()))
    printed = "\n".join(summary.lines())
    assert "hashtags dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(expected.items())) in printed
    assert summary.labeling.stats.raw_hashtags == sum(len(row["tags"]) for row in rows) - 1
    # The dropped tags change no label: each row is its distinct nouns.
    noun_synset = {"dog": DOG, "Dogs": DOG, "car": CAR, "#IceCream": ICE_CREAM}
    vocab = Vocab.load(out)
    index_of = {c.wnid: c.index for c in vocab.classes}
    expected_rows = {row["key"]: sorted({index_of[noun_synset[t]] for t in row["tags"] if t in noun_synset})
                     for row in rows}
    assert rows_of(tmp_path / "labels", str(tmp_path / "m.jsonl")) == expected_rows


@pytest.mark.parametrize("size", [None, 3])
def test_sqrt_epoch_length_matches_the_hand_computation(tmp_path, corpus, size):
    summary = build_vocab(VocabBuildConfig(data=corpus, out=str(tmp_path / "v.json"), size=size,
                                           max_bad_fraction=0.2))
    # r(image) = max over its classes of max(1, sqrt(t / f)), t = the head's share, f = count / kept images.
    if size is None:  # 6 kept images; t / f(h) = 3 / count(h): dog 3, car 3, ice cream 2, golden 1, tree 1
        # p0 car 1, p1 dog+car 1, q2 dog 1, p3 dog+ice cream+tree sqrt(3), q0 car+ice cream sqrt(3/2), q1 golden sqrt(3)
        by_hand = 3 + 2 * math.sqrt(3) + math.sqrt(1.5)
    else:  # dog, car, ice cream: 5 kept images (q1 loses its class); p3 and q0 get ice cream's sqrt(3/2)
        by_hand = 3 + 2 * math.sqrt(1.5)
    assert summary.sqrt_epoch_length == pytest.approx(by_hand, rel=1e-12)


def test_vocab_load_refuses_deeply_nested_json_in_one_line(tmp_path):
    """json's decoder recurses per nesting level: '[' * 100000 raised RecursionError, a traceback; now the
    vocabulary is unreadable JSON, a UserError naming the file."""
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000)
    with pytest.raises(UserError, match=r"^vocabulary .*nested.json is not readable JSON: .*recursion") as caught:
        Vocab.load(nested)
    assert "\n" not in str(caught.value)


def test_unreadable_inputs_are_counted_as_files_not_posts(tmp_path, corpus, capsys):
    """A gzip-compressed shard and a .jsonl.gz that is no gzip: no post is made up for them (the hand count of the
    corpus is unchanged), vocab.json's stats count them under skipped_files, and the summary says which and why."""
    from fastpretrain.cli import main

    packed = tmp_path / "packed.tar"
    packed.write_bytes(gzip.compress(Path(corpus[0]).read_bytes()))
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_text('{"key": "z", "tags": ["dog"]}\n')
    out = tmp_path / "v" / "vocab.json"
    assert main(["vocab", "build", "--data", *corpus, str(packed), str(fake), "--out", str(out),
                 "--max-bad-fraction", "0.2"]) == 0
    stats = Vocab.load(out).stats
    assert stats["posts_seen"] == 9 and stats["posts_malformed"] == 1 and stats["inputs"] == 4
    assert stats["skipped_files"] == {"unreadable": 2}
    assert "truncated_file" not in stats["skipped_posts"]
    printed = capsys.readouterr().out.splitlines()
    files_line = [line for line in printed if line.startswith("files skipped: ")]
    assert files_line == [f"files skipped: unreadable 2 (shard {packed}: gzip-compressed: decompress it, random "
                          f"access needs a plain tar; {fake}: BadGzipFile: Not a gzipped file (b'{{\"'))"]


def test_sigterm_mid_build_removes_the_temporary_folder_and_exits_143(tmp_path):
    """SIGTERM's default action ends a process without running `finally`: a real `fastpretrain vocab build`,
    sent SIGTERM while it works through many small inputs, exits 128 + 15 with one line on stderr and leaves no
    .vocab-build-* folder (nor vocab.json) behind."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in range(2000):
        (inputs / f"{i:05d}.jsonl").write_text(json.dumps({"key": f"k{i}", "tags": ["dog", "car"]}) + "\n")
    labels = tmp_path / "labels"
    command = ["vocab", "build", "--data", str(inputs / "*.jsonl"), "--out", str(tmp_path / "vocab.json"),
               "--labels", str(labels), "--workers", "1"]
    build = subprocess.Popen([sys.executable, "-m", "fastpretrain", *command], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        # Mid-build: the temporary folder holds the rows of a few inputs, and most are still to be read.
        while build.poll() is None and len(list(labels.glob(".vocab-build-*/*.npz"))) < 20:
            time.sleep(0.01)
        assert build.poll() is None, build.communicate()
        build.send_signal(signal.SIGTERM)
        stdout, stderr = build.communicate(timeout=120)
    finally:
        build.kill()
    assert build.returncode == 143, stderr
    assert stderr == "fastpretrain: error: vocab build stopped by SIGTERM before it finished; run it again\n"
    assert list(labels.iterdir()) == [] and not (tmp_path / "vocab.json").exists()
