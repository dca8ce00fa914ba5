"""A learnable, weakly labeled demo corpus: procedural pictures with hashtags as noisy as real ones.

Each picture shows one to three copies of an object (a car, a ball, a house ...) in one colour on a
grey texture. Its hashtags name what is visible the way people tag photos: synonyms and plurals of
WordNet nouns (#car, #automobile, #cars), squashed multiword tags (#icecream, #polkadots), non-noun
noise (#instagood, #beautiful), and hashtags that are missing or wrong. Objects follow a long-tailed
(Zipf) frequency, as concepts do on photo-sharing sites.

Shards are WebDataset tars in img2dataset's layout (``00000.tar`` with ``KEY.jpg`` + ``KEY.json``),
written by :class:`fastpretrain.formats.shards.ShardWriter`. Every picture and its tags are a pure function
of ``(seed, index)``, so a corpus is the same whatever the shard size or the machine.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fastpretrain.formats.shards import ShardWriter
from fastpretrain.errors import UserError


@dataclass(frozen=True)
class Concept:
    """Something visible, and the hashtags people use for it (all name one WordNet noun synset)."""

    name: str
    tags: tuple[str, ...]


# Drawn objects, in falling frequency (their Zipf rank). Each tag list mixes a noun, its synonyms,
# plurals and squashed multiword forms, which canonicalization must fold into one class.
OBJECTS = (
    Concept("car", ("car", "cars", "automobile", "Auto", "motorcar")),
    Concept("ball", ("ball", "balls", "Ball")),
    Concept("house", ("house", "houses", "House")),
    Concept("tree", ("tree", "trees", "Tree")),
    Concept("star", ("star", "stars")),
    Concept("icecream", ("icecream", "ice_cream", "IceCream", "icecreams")),
    Concept("heart", ("heart", "Heart", "HEART")),  # not #hearts: WordNet reads that as the card game
    Concept("kite", ("kite", "kites")),
    Concept("moon", ("moon", "Moon")),
    Concept("umbrella", ("umbrella", "umbrellas")),
)
COLOURS = {  # colour name -> RGB; the object's colour, never the background's
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
}
COLOUR_TAGS = {"red": ("red",), "green": ("green",), "blue": ("blue",), "yellow": ("yellow",), "purple": ("purple",)}
TEXTURES = {  # background texture -> its hashtags ("plain" has none)
    "plain": (),
    "stripes": ("stripes", "stripe", "stripey"),
    "polkadots": ("polkadots", "polka_dot", "polkadot"),
    "checkerboard": ("checkerboard", "checkerboards"),
}
COUNT_TAGS = {1: (), 2: ("pair", "two"), 3: ("three", "trio")}
NOISE_TAGS = ("instagood", "love", "beautiful", "photooftheday", "happy", "tbt", "fun", "cute", "picoftheday")
CAPTION_WORDS = ("what a day", "look at this", "weekend vibes", "so nice", "guess what", "finally")

P_TAG_MISSING = 0.2  # each true hashtag is left out with this probability
P_WRONG_TAG = 0.1  # a post gains a hashtag of an object it does not show
P_TAGS_IN_CAPTION_ONLY = 0.2  # some posts carry their hashtags only as #words in the caption
ZIPF_EXPONENT = 1.0


@dataclass(frozen=True)
class Post:
    key: str
    jpeg: bytes
    meta: dict


def _draw_object(draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw one object of radius ``r`` centred on (cx, cy)."""
    dark = (40, 40, 40)
    if name == "car":
        draw.rectangle([cx - r, cy - 0.4 * r, cx + r, cy + 0.3 * r], fill=fill)
        draw.rectangle([cx - 0.5 * r, cy - 0.8 * r, cx + 0.5 * r, cy - 0.4 * r], fill=fill)
        for wx in (cx - 0.55 * r, cx + 0.55 * r):
            draw.ellipse([wx - 0.28 * r, cy + 0.15 * r, wx + 0.28 * r, cy + 0.71 * r], fill=dark)
    elif name == "ball":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif name == "house":
        draw.rectangle([cx - 0.7 * r, cy - 0.1 * r, cx + 0.7 * r, cy + r], fill=fill)
        draw.polygon([(cx - r, cy - 0.1 * r), (cx + r, cy - 0.1 * r), (cx, cy - r)], fill=fill)
        draw.rectangle([cx - 0.15 * r, cy + 0.4 * r, cx + 0.15 * r, cy + r], fill=dark)
    elif name == "tree":
        draw.rectangle([cx - 0.15 * r, cy + 0.3 * r, cx + 0.15 * r, cy + r], fill=(110, 70, 30))
        draw.polygon([(cx - 0.8 * r, cy + 0.4 * r), (cx + 0.8 * r, cy + 0.4 * r), (cx, cy - r)], fill=fill)
    elif name == "star":
        points = [
            (cx + (r if i % 2 == 0 else 0.4 * r) * math.sin(i * math.pi / 5),
             cy - (r if i % 2 == 0 else 0.4 * r) * math.cos(i * math.pi / 5))
            for i in range(10)
        ]
        draw.polygon(points, fill=fill)
    elif name == "icecream":
        draw.polygon([(cx - 0.45 * r, cy - 0.1 * r), (cx + 0.45 * r, cy - 0.1 * r), (cx, cy + r)], fill=(210, 160, 90))
        draw.ellipse([cx - 0.5 * r, cy - r, cx + 0.5 * r, cy], fill=fill)
    elif name == "heart":
        draw.ellipse([cx - r, cy - 0.8 * r, cx, cy + 0.1 * r], fill=fill)
        draw.ellipse([cx, cy - 0.8 * r, cx + r, cy + 0.1 * r], fill=fill)
        draw.polygon([(cx - 0.97 * r, cy - 0.2 * r), (cx + 0.97 * r, cy - 0.2 * r), (cx, cy + r)], fill=fill)
    elif name == "kite":
        draw.polygon([(cx, cy - r), (cx + 0.6 * r, cy - 0.1 * r), (cx, cy + 0.7 * r), (cx - 0.6 * r, cy - 0.1 * r)], fill=fill)
        draw.line([(cx, cy + 0.7 * r), (cx + 0.3 * r, cy + r)], fill=dark, width=2)
    elif name == "moon":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        draw.ellipse([cx - 0.4 * r, cy - 1.1 * r, cx + 1.4 * r, cy + 0.7 * r], fill=(128, 128, 128))
    elif name == "umbrella":
        draw.pieslice([cx - r, cy - r, cx + r, cy + r], 180, 360, fill=fill)
        draw.line([(cx, cy), (cx, cy + r)], fill=dark, width=2)
    else:  # a new entry in OBJECTS without a drawing is a programming error
        raise KeyError(name)


def _draw_background(size: int, texture: str, rng: np.random.Generator) -> Image.Image:
    """A grey background: plain, striped, dotted or checkered (luminance only, so colour names the object)."""
    light, dark = int(rng.integers(150, 200)), int(rng.integers(60, 110))
    image = Image.new("RGB", (size, size), (light,) * 3)
    draw = ImageDraw.Draw(image)
    period = int(rng.integers(size // 12, size // 6))
    if texture == "stripes":
        for x in range(0, 2 * size, period):
            draw.line([(x, 0), (x - size, size)], fill=(dark,) * 3, width=max(1, period // 2))
    elif texture == "polkadots":
        for y in range(period // 2, size, period):
            for x in range(period // 2, size, period):
                draw.ellipse([x - period / 4, y - period / 4, x + period / 4, y + period / 4], fill=(dark,) * 3)
    elif texture == "checkerboard":
        for y in range(0, size, period):
            for x in range(0, size, period):
                if (x // period + y // period) % 2:
                    draw.rectangle([x, y, x + period - 1, y + period - 1], fill=(dark,) * 3)
    return image


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _draw_scene(rng: np.random.Generator, obj: Concept, image_size: int) -> tuple[Image.Image, str, str, int]:
    """One to three copies of ``obj`` in a random colour on a random texture: (picture, colour, texture, count)."""
    colour = _pick(rng, tuple(COLOURS))
    texture = _pick(rng, tuple(TEXTURES))
    count = int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
    image = _draw_background(image_size, texture, rng)
    draw = ImageDraw.Draw(image)
    radius = image_size * (0.32 if count == 1 else 0.2)
    for i in range(count):  # spread copies along a jittered row so they overlap little
        cx = image_size * ((i + 0.5) / count) + rng.uniform(-0.05, 0.05) * image_size
        cy = image_size * 0.5 + rng.uniform(-0.15, 0.15) * image_size
        _draw_object(draw, obj.name, cx, cy, radius * rng.uniform(0.85, 1.1), COLOURS[colour])
    return image, colour, texture, count


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_post(seed: int, index: int, image_size: int = 96) -> Post:
    """Draw post number ``index`` of the corpus with ``seed``: its JPEG and its img2dataset-style JSON."""
    rng = np.random.default_rng([seed, index])
    zipf = 1.0 / np.arange(1, len(OBJECTS) + 1) ** ZIPF_EXPONENT
    obj = OBJECTS[int(rng.choice(len(OBJECTS), p=zipf / zipf.sum()))]
    image, colour, texture, count = _draw_scene(rng, obj, image_size)

    true_tags = [_pick(rng, obj.tags), _pick(rng, COLOUR_TAGS[colour])]
    true_tags += [_pick(rng, t) for t in (TEXTURES[texture], COUNT_TAGS[count]) if t]
    tags = [t for t in true_tags if rng.random() >= P_TAG_MISSING]
    if rng.random() < P_WRONG_TAG:
        tags.append(_pick(rng, OBJECTS[int(rng.integers(len(OBJECTS)))].tags))
    tags += [t for t in NOISE_TAGS if rng.random() < 0.12]
    rng.shuffle(tags)

    caption = _pick(rng, CAPTION_WORDS)
    meta: dict = {"key": "", "caption": caption, "width": image_size, "height": image_size}
    if rng.random() < P_TAGS_IN_CAPTION_ONLY:
        meta["caption"] = " ".join([caption] + [f"#{t}" for t in tags])
        meta["tags"] = []
    else:
        meta["tags"] = tags
    return Post(key="", jpeg=_jpeg(image), meta=meta)


LABELED_SPLITS = {"train": 1, "val": 2}  # split -> its draws' stream, apart from the hashtag corpus's


def write_labeled_split(out_dir: str | Path, per_class: dict[str, int], seed: int = 0,
                        image_size: int = 96) -> dict[str, int]:
    """A labeled ImageFolder from the demo's world, for transfer: ``OUT/SPLIT/OBJECT/NNNNN.jpg``, ``per_class[split]``
    pictures of each object (balanced, unlike the hashtag corpus's long tail), no hashtags. Returns images per split."""
    if any(n < 1 for n in per_class.values()):
        raise UserError(f"images per class must be at least 1, got {per_class}")
    if seed < 0:
        raise UserError(f"--seed must not be negative, got {seed}")
    written = {}
    for split, count in per_class.items():
        for c, obj in enumerate(OBJECTS):
            folder = Path(out_dir) / split / obj.name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, LABELED_SPLITS[split], c, i])
                (folder / f"{i:05d}.jpg").write_bytes(_jpeg(_draw_scene(rng, obj, image_size)[0]))
        written[split] = count * len(OBJECTS)
    return written


def write_demo_corpus(
    out_dir: str | Path, images: int, seed: int = 0, shard_size: int = 1000, image_size: int = 96
) -> list[Path]:
    """Write ``images`` posts as shards ``00000.tar, 00001.tar, ...`` into ``out_dir``; return their paths."""
    if images < 1:
        raise UserError(f"--images must be at least 1, got {images}")
    if seed < 0:  # numpy's generators take no negative seeds
        raise UserError(f"--seed must not be negative, got {seed}")
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    if image_size < 16:
        raise UserError(f"--image-size must be at least 16, got {image_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_digits = max(4, len(str(shard_size - 1)))  # img2dataset's key: shard number, then index in shard
    shards = []
    for shard_index, start in enumerate(range(0, images, shard_size)):
        path = out / f"{shard_index:05d}.tar"
        with ShardWriter(path) as writer:
            for index in range(start, min(start + shard_size, images)):
                post = make_post(seed, index, image_size)
                key = f"{shard_index:05d}{index - start:0{key_digits}d}"
                writer.write(key, {"jpg": post.jpeg, "json": json.dumps({**post.meta, "key": key}).encode()})
        shards.append(path)
    return shards
