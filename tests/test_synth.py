"""The demo corpus: img2dataset layout in GNU tar, deterministic, long-tailed, and noisy as specified."""

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from fastpretrain.data.synth import NOISE_TAGS, OBJECTS, ZIPF_EXPONENT, make_post, write_demo_corpus


def read_tar(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_layout_format_and_determinism(tmp_path):
    seed = int(np.random.default_rng().integers(1 << 30))
    a = write_demo_corpus(tmp_path / "a", 25, seed=seed, shard_size=10, image_size=48)
    b = write_demo_corpus(tmp_path / "b", 25, seed=seed, shard_size=7, image_size=48)
    assert [p.name for p in a] == ["00000.tar", "00001.tar", "00002.tar"]
    members = [m for shard in a for m in read_tar(shard)]
    assert [name.rsplit(".", 1)[1] for name, _ in members] == ["jpg", "json"] * 25
    for shard in a:  # GNU tar magic, not POSIX/PAX: DALI's reader fails on PAX headers
        assert shard.read_bytes()[257:265] == b"ustar  \0"
    for (jpg_name, jpg), (json_name, meta) in zip(members[::2], members[1::2]):
        meta = json.loads(meta)
        assert jpg_name == f"{meta['key']}.jpg" and json_name == f"{meta['key']}.json"
        assert Image.open(io.BytesIO(jpg)).size == (48, 48)
        assert isinstance(meta["tags"], list) and isinstance(meta["caption"], str)
    # the same posts whatever the shard size: each post is a function of (seed, index) alone
    other = [m for shard in b for m in read_tar(shard)]
    assert [data for _, data in members][::2] == [data for _, data in other][::2]
    assert make_post(seed + 1, 0).jpeg != make_post(seed, 0).jpeg


def post_tags(meta):
    return meta["tags"] or [w[1:] for w in meta["caption"].split() if w.startswith("#")]


def test_objects_are_long_tailed_and_tags_noisy():
    seed = int(np.random.default_rng().integers(1 << 30))
    n = 3000
    tags = [post_tags(make_post(seed, i, image_size=32).meta) for i in range(n)]
    seen = Counter()
    for post in tags:
        for concept in OBJECTS:
            seen[concept.name] += any(t in concept.tags for t in post)
    # Zipf over objects; the shown object's tag survives with p=0.8; with p=0.1 a random object's tag is added
    zipf = 1.0 / np.arange(1, len(OBJECTS) + 1) ** ZIPF_EXPONENT
    share = zipf / zipf.sum()
    wrong = 0.1 / len(OBJECTS)
    for rank, concept in enumerate(OBJECTS):
        expected = n * (share[rank] * (1 - 0.2 * (1 - wrong)) + (1 - share[rank]) * wrong)
        assert abs(seen[concept.name] - expected) < 5 * np.sqrt(expected) + 5, concept.name
    noise = sum(t in NOISE_TAGS for post in tags for t in post)
    assert noise == pytest.approx(n * len(NOISE_TAGS) * 0.12, rel=0.1)
    assert any(t in ("icecream", "IceCream") for post in tags for t in post)  # squashed multiword tags
    assert sum(not post for post in tags) > 0  # some posts lose every tag, as real ones do


def test_object_hashtags_fold_into_one_wordnet_class_each():
    """With real WordNet: every spelling of an object (synonym, plural, case, squashed multiword) is one synset,
    and different objects are different synsets; the noise tags that are not nouns are dropped."""
    from fastpretrain.hashtags import Canonicalizer

    canon = Canonicalizer()
    wnids = {}
    for concept in OBJECTS:
        ids = {canon.canonical(tag) for tag in concept.tags}
        assert len(ids) == 1 and None not in ids, (concept.name, ids)
        wnids[concept.name] = ids.pop()
    assert len(set(wnids.values())) == len(OBJECTS)
    assert wnids["car"] == "n02958343"  # car.n.01 (auto, automobile, machine, motorcar)
    assert canon.canonical("instagood") is None and canon.canonical("photooftheday") is None
