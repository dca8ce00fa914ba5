"""Header checks on real odd and broken images, crop boxes against torchvision's, EXIF orientation against PIL, and
the decoders on odd files that are good pictures (bytes after the end, animated WebP, 16-bit PNG), failures inside a
worker, the crop ring's stamps and DALI's memory check."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.transforms import RandomResizedCrop

from fastpretrain.data.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from fastpretrain.data.decoders import torch as torch_decoder
from fastpretrain.data.decoders.boxes import center_boxes, eval_resize_size, random_resized_boxes, sample_uniforms
from fastpretrain.data.decoders.common import BadImage, CropSpec, prepare_chunk, probe_image
from fastpretrain.data.decoders.torch import ChunkReader, CropRing, TorchDecoder, decode_rgb
from fastpretrain.data.stream import PlanChunk, SampleTable
from fastpretrain.errors import UserError
from fastpretrain.formats.shards import MemberReader, ShardWriter, load_index

try:
    import nvidia.dali  # noqa: F401

    DALI = True
except ImportError:
    DALI = False
CPU = torch.device("cpu")

# torchvision 0.29 deprecates its codecs on every call; the backend silences it around its own decoding only.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")




def encode(array: np.ndarray, fmt: str = "JPEG", mode: str = "RGB", **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).convert(mode).save(out, format=fmt, **options)
    return out.getvalue()


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 with large structure, so that lossy coding keeps it recognisable."""
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))


def test_probe_accepts_odd_but_real_images(rng):
    h, w = int(rng.integers(20, 80)), int(rng.integers(20, 80))
    image = smooth_image(rng, h, w)
    cases = {
        "rgb": encode(image),
        "grayscale": encode(image, mode="L"),
        "cmyk": encode(image, mode="CMYK"),
        "progressive": encode(image, progressive=True),
        "png under .jpg": encode(image, "PNG"),
        "webp under .jpg": encode(image, "WEBP"),
    }
    expected_format = {"png under .jpg": "PNG", "webp under .jpg": "WEBP"}
    for name, data in cases.items():
        info = probe_image(data, max_pixels=10**8)
        assert (info.format, info.width, info.height) == (expected_format.get(name, "JPEG"), w, h), name
    one = probe_image(encode(np.zeros((1, 1, 3), np.uint8)), max_pixels=1)
    assert (one.width, one.height) == (1, 1)


def test_probe_rejects_broken_images_with_their_reason(rng):
    image = smooth_image(rng, 40, 50)
    jpeg = encode(image)
    # Anywhere from past the signature (WEBP's 12 bytes are the longest; a shorter prefix does not say what
    # the file was, so it is not_image) to before the end marker: JPEG's last 2 bytes, PNG's whole 12-byte IEND
    # chunk (a PNG that lost only part of the chunk's CRC still holds "IEND": 1 in 1000 draws cut it there).
    # WEBP has none, but any prefix falls short of the size its RIFF header gives.
    cut = lambda data, end_marker=2: data[: int(rng.integers(12, len(data) - end_marker + 1))]  # noqa: E731
    # Random bytes with bit 1 of byte 1 set: PIL opens TGA, which has no signature, whenever byte 1 (the
    # colour-map type) is 0 or 1 and two other header bytes fit (2e-6 of random strings, then unsupported_format
    # or too_large); the set bit also rules out the JPEG, PNG, GIF, BMP and RIFF signatures.
    noise = bytearray(rng.bytes(int(rng.integers(2, 3000))))
    noise[1] |= 0b10
    cases = {
        "truncated": [cut(jpeg), cut(encode(image, progressive=True)), cut(encode(image, "PNG"), end_marker=12),
                      cut(encode(image, "WEBP"))],
        "not_image": [b"", bytes(noise), b"<html>404 not found</html>"],
        "unsupported_format": [encode(image, "GIF"), encode(image, "BMP")],
        "too_large": [jpeg],
    }
    for reason, blobs in cases.items():
        for data in blobs:
            with pytest.raises(BadImage) as caught:
                probe_image(data, max_pixels=40 * 50 - (reason == "too_large"))
            assert caught.value.reason == reason


def test_probe_swaps_size_for_rotating_exif_orientation(rng):
    image = smooth_image(rng, 30, 70)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        info = probe_image(encode(image, exif=exif), max_pixels=10**6)
        assert (info.width, info.height, info.orientation) == ((30, 70) if orientation >= 5 else (70, 30)) + (orientation,)


def test_uniforms_are_a_pure_function_of_seed_epoch_position(rng):
    seed, epoch, n = int(rng.integers(0, 2**62)), int(rng.integers(0, 100)), 20000
    positions = rng.permutation(n)
    u = sample_uniforms(seed, epoch, positions)
    assert u.shape == (n, 23) and 0 <= u.min() and u.max() < 1
    order = np.argsort(positions)
    np.testing.assert_array_equal(sample_uniforms(seed, epoch, positions[order]), u[order])
    assert not np.array_equal(sample_uniforms(seed, epoch + 1, positions), u)
    assert not np.array_equal(sample_uniforms(seed + 1, epoch, positions), u)
    # Uniform and uncorrelated across draws: mean 1/2, variance 1/12, tiny correlations.
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    # Each of the 253 correlations is about normal with standard deviation 1 / sqrt(n): past 6.1 of them with
    # probability 1.1e-9, so any of them with less than 3e-7.
    assert np.abs(np.corrcoef(u.T) - np.eye(23)).max() < 6.1 / np.sqrt(n)


def test_random_resized_boxes_follow_torchvision_distribution(rng):
    """Same rule as RandomResizedCrop.get_params: compare the distributions of area share, aspect and position."""
    width, height, n = int(rng.integers(40, 600)), int(rng.integers(40, 600)), 12000
    torch.manual_seed(int(rng.integers(0, 2**31)))
    image = torch.empty(1, height, width)
    reference = np.array([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    ref_top, ref_left, ref_h, ref_w = reference.T
    boxes = random_resized_boxes(np.full(n, width), np.full(n, height), sample_uniforms(int(rng.integers(0, 1000)), 0, np.arange(n)))
    assert (boxes.left >= 0).all() and (boxes.top >= 0).all() and (boxes.width >= 1).all() and (boxes.height >= 1).all()
    assert (boxes.left + boxes.width <= width).all() and (boxes.top + boxes.height <= height).all()
    stats = [
        (boxes.width * boxes.height / (width * height), ref_w * ref_h / (width * height)),
        (np.log(boxes.width / boxes.height), np.log(ref_w / ref_h)),
        ((boxes.left + boxes.width / 2) / width, (ref_left + ref_w / 2) / width),
        ((boxes.top + boxes.height / 2) / height, (ref_top + ref_h / 2) / height),
    ]
    for ours, theirs in stats:
        # Two-sample Kolmogorov-Smirnov statistic D: for equal distributions, P(D > x * sqrt(2 / n)) is about
        # 2 exp(-2 x^2) (less for these partly discrete ones); x = 2.9: 9.6e-8, so 4e-7 for the four of them.
        grid = np.sort(np.concatenate([ours, theirs]))
        cdf = lambda sample: np.searchsorted(np.sort(sample), grid, side="right") / len(sample)  # noqa: E731
        assert np.abs(cdf(ours) - cdf(theirs)).max() < 2.9 * np.sqrt(2 / n)
    assert 0.45 < boxes.flip.mean() < 0.55


def test_random_resized_boxes_fall_back_like_torchvision_for_extreme_shapes():
    """A 1000x10 strip never fits a 3/4..4/3 box of 8-100% area: torchvision's fallback centre crop."""
    u = sample_uniforms(0, 0, np.arange(50))
    for (w, h) in [(1000, 10), (10, 1000), (1, 1)]:
        torch.manual_seed(0)
        top, left, bh, bw = RandomResizedCrop.get_params(torch.empty(1, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
        boxes = random_resized_boxes(np.full(50, w), np.full(50, h), u)
        if (w, h) != (1, 1):
            assert set(boxes.width) == {bw} and set(boxes.height) == {bh}
            assert set(boxes.left) == {left} and set(boxes.top) == {top}
        else:
            assert set(boxes.width) == {1} and set(boxes.height) == {1}


def test_center_box_resized_matches_resize_then_center_crop(rng):
    """Eval: cropping our box and resizing it samples the source where torchvision's Resize(256/224 * S) then
    CenterCrop(S) does. Resizing a coordinate ramp maps each output pixel to the source position it samples
    (a linear ramp survives linear interpolation), so the two maps are compared in source pixels."""
    from torchvision.transforms.v2 import functional as TF

    for _ in range(6):
        size = int(rng.choice([16, 32, 64, 224]))
        h, w = int(rng.integers(size, 5 * size)), int(rng.integers(size, 5 * size))
        resize = eval_resize_size(size)
        box = center_boxes(np.array([w]), np.array([h]), size, resize)
        left, top, side = int(box.left[0]), int(box.top[0]), int(box.width[0])
        assert box.height[0] == side and 0 <= left <= w - side and 0 <= top <= h - side
        ramps = torch.stack([torch.arange(w).float().expand(h, w), torch.arange(h).float()[:, None].expand(h, w)])
        reference = TF.center_crop(TF.resize(ramps, resize, antialias=True), [size, size])  # (2, S, S)
        ours = TF.resized_crop(ramps, top, left, side, side, [size, size], antialias=True)
        inner = (slice(None), slice(2, -2), slice(2, -2))  # the antialiasing filter bends the ramp at the edges
        source_per_output = min(h, w) / resize
        # Both against the exact transform, in source pixels. torchvision rounds the crop offset to whole resized
        # pixels (half an output pixel) and floors the longer side (less than half an output pixel more at the
        # crop's edges). Our box's offset is rounded to whole source pixels (half a pixel) and so is its side
        # (half a pixel over the crop: a quarter more at its edges); 0.5 alone failed 1 in 600 runs (e.g. 32
        # from 41 x 42).
        assert (ours - reference)[inner].abs().max() <= source_per_output + 0.75
    assert eval_resize_size(224) == 256



# ----------------------------------------------------------------------------------------------------
# Odd files that are good pictures, and what the decoders make of them


def trailing_bytes(rng: np.random.Generator) -> bytes:
    """Random bytes holding every marker an end search could take for the picture's: JPEG's EOI, SOS and SOI,
    PNG's IEND chunk and a RIFF header. They end in a zero, as padding and a video's last box do: a tail ending in
    EOI itself is kept with the picture (the JPEG walk's shortcut; the decoders ignore it)."""
    tail = bytearray(rng.bytes(int(rng.integers(200, 3000))) + b"\x00")
    for marker in (b"\xff\xd9", b"\xff\xda\x00\x0c", b"\xff\xd8\xff", b"\x00\x00\x00\x00IEND\xaeB`\x82", b"RIFF"):
        at = int(rng.integers(0, len(tail) - len(marker)))
        tail[at: at + len(marker)] = marker
    return bytes(tail)


def with_app_segment(jpeg: bytes, payload: bytes) -> bytes:
    """The JPEG with an APP15 segment after its SOI (where an EXIF thumbnail sits, in APP1): markers in it are data."""
    return jpeg[:2] + b"\xff\xef" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def good_pictures(rng: np.random.Generator) -> dict[str, bytes]:
    image = smooth_image(rng, int(rng.integers(16, 90)), int(rng.integers(16, 90)))
    thumbnail = encode(image[:8, :8])  # a whole JPEG: SOI, SOS, EOI
    return {"baseline": encode(image), "progressive": encode(image, progressive=True),
            "restart markers": encode(image, restart_marker_blocks=1), "grayscale": encode(image, mode="L"),
            "thumbnail in an APP segment": with_app_segment(encode(image), thumbnail + trailing_bytes(rng)),
            "png": encode(image, "PNG"), "webp": encode(image, "WEBP")}


def test_bytes_after_the_picture_are_no_truncation(rng):
    """A Motion Photo (a video after the JPEG's EOI), a PNG padded after IEND, a WebP with bytes after its RIFF
    size: whole pictures, whose length (the file without its tail, known by construction) is found whatever
    markers the tail holds; cut anywhere before their end they are still truncated."""
    for name, data in good_pictures(rng).items():
        for _ in range(5):
            assert probe_image(data + trailing_bytes(rng), max_pixels=10**8).length == len(data), name
        end_marker = {"png": 12, "webp": 1}.get(name, 2)  # EOI; the IEND chunk; any byte the RIFF size counts
        with pytest.raises(BadImage) as caught:
            probe_image(data[: int(rng.integers(12, len(data) - end_marker + 1))], max_pixels=10**8)
        assert caught.value.reason == "truncated", name


def dali_cpu_decode(data: bytes) -> np.ndarray:
    """DALI's CPU image decoder (the DALI backend's without a GPU): (H, W, 3) uint8."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipeline():
        return fn.decoders.image(fn.external_source(name="encoded", dtype=types.UINT8, ndim=1), device="cpu",
                                 output_type=types.RGB)

    pipe = pipeline()
    pipe.build()
    pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8)])
    (out,) = pipe.run()
    return np.asarray(out[0])


def flat(rgb: tuple[int, int, int], height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), rgb, dtype=np.uint8)


def shard_table(path: Path, images: list[bytes]) -> SampleTable:
    """A shard of ``images`` (one sample each, in order) and its sample table, every sample usable."""
    with ShardWriter(path) as writer:
        for i, data in enumerate(images):
            writer.write(f"{i:04d}", {"jpg": data, "json": b"{}"})
    index = load_index(path)
    offset, size = (np.array([members["jpg"][k] for members in index.members], dtype=np.int64) for k in (0, 1))
    n = len(images)
    return SampleTable.of_shard(path, index.keys, offset, size, np.arange(n + 1, dtype=np.int64),
                                np.zeros(n, dtype=np.int32), np.ones(n, dtype=bool))


def data_config(path: Path, **overrides) -> DataConfig:
    settings = dict(shards=str(path), label_dir=str(path.parent), backend="torch", batch_size=4, image_size=16,
                    workers=0)
    return DataConfig(**{**settings, **overrides})


def plan_chunks(count: int, size: int) -> list[PlanChunk]:
    """The samples 0 .. count - 1 in order, ``size`` per chunk."""
    return [PlanChunk(0, np.arange(a, min(a + size, count)), np.arange(a, min(a + size, count)))
            for a in range(0, count, size)]


def shown_colours(images: torch.Tensor) -> np.ndarray:
    """(k, S, S, 3) normalized crops -> (k, 3) their mean colour in pixel levels."""
    pixels = images.float() * torch.tensor(IMAGENET_STD) * 255 + torch.tensor(IMAGENET_MEAN) * 255
    return pixels.mean(dim=(1, 2)).numpy()


def test_every_decoder_ignores_what_follows_the_picture(tmp_path, rng):
    """Checked on each decoder a backend runs on the CPU (torchvision's decode_image, the region decoder, DALI's
    CPU decoder): a file with a tail gives the pixels of the file without it. prepare_chunk also cuts the tail
    off, so no decoder (nvJPEG included, not checked here) sees it, and a Motion Photo's video is not moved."""
    pictures = good_pictures(rng)
    region = torch_decoder.region_decoder()
    tailed = {name: data + trailing_bytes(rng) for name, data in pictures.items()}
    for name, data in pictures.items():
        fmt = probe_image(data, 10**8).format
        assert torch.equal(decode_rgb(tailed[name], fmt), decode_rgb(data, fmt)), name
        if region is not None and fmt == "JPEG":
            box = (3, 2, 10, 9)
            assert torch.equal(region.decode_region(tailed[name], *box), region.decode_region(data, *box)), name
        if DALI:
            np.testing.assert_array_equal(dali_cpu_decode(tailed[name]), dali_cpu_decode(data), err_msg=name)
    table = shard_table(tmp_path / "tails.tar", list(tailed.values()))
    prepared = prepare_chunk(plan_chunks(len(tailed), len(tailed))[0], table, MemberReader(table.paths),
                             CropSpec.from_config(data_config(tmp_path / "tails.tar"), train=False))
    assert prepared.bad == [] and prepared.encoded == list(pictures.values())


def animated_webp(frames: list[np.ndarray]) -> bytes:
    out = io.BytesIO()
    first, *rest = [Image.fromarray(frame) for frame in frames]
    first.save(out, "WEBP", save_all=True, append_images=rest, duration=100, loop=0, lossless=True)
    return out.getvalue()


def test_animated_webp_gives_its_first_frame_as_dali_does(tmp_path, rng):
    """torchvision refuses animated WebP; the torch backend takes its first frame, the pixels of DALI's decode
    (PIL's where DALI is not installed), through the whole CPU path too."""
    frames = [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(3)]
    data = animated_webp(frames)
    with pytest.raises(RuntimeError, match="[Aa]nimated"):
        torch_decoder.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    reference = dali_cpu_decode(data) if DALI else np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    ours = decode_rgb(data, "WEBP").permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, reference)
    assert not np.array_equal(ours, frames[1])  # the frames differ: the first one was taken
    table = shard_table(tmp_path / "anim.tar", [data, encode(flat((90, 90, 90), 20, 20))])
    (decoded,) = TorchDecoder(data_config(tmp_path / "anim.tar"), table, CPU, torch.float32, train=False).decode(
        iter(plan_chunks(2, 2)))
    assert decoded.bad == [] and decoded.samples.tolist() == [0, 1]


def png_16_bit(samples: np.ndarray) -> bytes:
    """A PNG of 16-bit samples, (H, W, 3) RGB or (H, W) gray uint16, written by hand (PIL writes no 16-bit RGB)."""
    height, width = samples.shape[:2]
    colour_type = 2 if samples.ndim == 3 else 0
    rows = samples.reshape(height, -1).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 (none) per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_16_bit_pngs_are_scaled_to_8_bits_like_pil(tmp_path, rng):
    """torchvision decoded a 16-bit PNG to uint16, which the crop's resampler has no kernel for (it crashed the
    worker): now uint8, within a level of the exact scaling (and of PIL's conversion), and cropped like any
    picture."""
    rgb = rng.integers(0, 2**16, (21, 33, 3)).astype(np.uint16)
    gray = rng.integers(0, 2**16, (18, 25)).astype(np.uint16)
    files = [png_16_bit(rgb), png_16_bit(gray)]
    # PIL's reference for RGB; for gray PIL clips (its I;16 -> RGB conversion saturates): the exact scaling then,
    # v * 255 / 65535 in float64, as it is for RGB too.
    references = [[np.asarray(Image.open(io.BytesIO(files[0])).convert("RGB")), rgb / 257],
                  [np.repeat(gray[..., None] / 257, 3, axis=2)]]
    for data, expected in zip(files, references):
        ours = decode_rgb(data, "PNG")
        assert ours.dtype == torch.uint8
        for reference in expected:
            assert np.abs(ours.permute(1, 2, 0).numpy() - reference.astype(np.float64)).max() <= 1
    table = shard_table(tmp_path / "deep.tar", files)
    (decoded,) = TorchDecoder(data_config(tmp_path / "deep.tar"), table, CPU, torch.float32, train=True).decode(
        iter(plan_chunks(2, 2)))
    assert decoded.bad == [] and decoded.images.shape == (2, 16, 16, 3)


def test_a_png_with_corrupt_compressed_data_is_a_decode_error_not_a_crash(tmp_path, rng):
    """torchvision 0.29's decode_png kills the process (SIGSEGV) on a PNG whose deflate stream is corrupt (its
    chunk CRCs intact, so only the zlib check fails): the torch backend decodes PNGs with PIL, which raises."""
    png = bytearray(encode(smooth_image(rng, 20, 24), "PNG"))
    start = png.find(b"IDAT") + 4
    length = int.from_bytes(png[start - 8: start - 4], "big")
    # The first deflate block's type set to 3, which is reserved: every inflater must fail there. (A flipped byte
    # elsewhere may inflate to other pixels, or sit in the Adler-32 that PIL stops before reading.)
    png[start + 2] |= 0b110
    png[start + length: start + length + 4] = struct.pack(">I", zlib.crc32(png[start - 4: start + length]))
    with pytest.raises(Exception):  # noqa: B017 - PIL's error, whatever its kind: what matters is that it returns
        decode_rgb(bytes(png), "PNG")
    table = shard_table(tmp_path / "corrupt.tar", [bytes(png), encode(flat((90, 90, 90), 20, 20))])
    (decoded,) = TorchDecoder(data_config(tmp_path / "corrupt.tar"), table, CPU, torch.float32, train=True).decode(
        iter(plan_chunks(2, 2)))
    assert [(sample, reason) for sample, reason, _ in decoded.bad] == [(0, "decode_error")]


COLOURS = [(200, 20, 20), (20, 200, 20), (20, 20, 200), (200, 200, 20), (20, 200, 200), (200, 20, 200)]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_crop_that_fails_is_a_decode_error_and_the_others_keep_their_places(tmp_path, rng, monkeypatch, workers):
    """The crop used to run outside the per-sample error handling: one failing crop killed the worker and the run.
    Now the sample is a decode_error and every other one comes out, each image in its own sample's row."""
    count = 12
    colours = [COLOURS[i % len(COLOURS)] for i in range(count)]
    poison = int(rng.integers(0, count))
    colours[poison] = (120, 120, 120)
    table = shard_table(tmp_path / "s.tar", [encode(flat(rgb, 20, 24), quality=95) for rgb in colours])
    real_crop = torch_decoder.crop_resize_into

    def crop(out, image, *box):
        if abs(float(image.float().mean()) - 120) < 8:  # the poison sample's flat grey
            raise RuntimeError("a crop that fails")
        real_crop(out, image, *box)

    monkeypatch.setattr(torch_decoder, "crop_resize_into", crop)  # forked workers inherit it
    decoder = TorchDecoder(data_config(tmp_path / "s.tar", workers=workers), table, CPU, torch.float32, train=True)
    chunks = plan_chunks(count, 4)
    decoded = list(decoder.decode(iter(chunks)))
    assert len(decoded) == len(chunks)
    bad = [entry for chunk in decoded for entry in chunk.bad]
    assert [(sample, reason) for sample, reason, _ in bad] == [(poison, "decode_error")]
    assert "a crop that fails" in bad[0][2]
    for chunk in decoded:
        shown = shown_colours(chunk.images)
        np.testing.assert_allclose(shown, np.array([colours[s] for s in chunk.samples]), atol=6)
    assert sorted(s for chunk in decoded for s in chunk.samples.tolist()) == sorted(set(range(count)) - {poison})


def test_a_ring_slot_overwritten_before_it_was_read_is_an_error_not_mixed_images(tmp_path):
    """Each slot carries the sequence number of the chunk whose crops it holds: chunk 1 written into chunk 0's slot
    before chunk 0 was read makes reading chunk 0 a RuntimeError; chunk 1 reads back its own pixels."""
    table = shard_table(tmp_path / "s.tar", [encode(flat(rgb, 20, 20), quality=95) for rgb in COLOURS[:4]])
    cfg = data_config(tmp_path / "s.tar", batch_size=2)
    ring = CropRing.make(1, 2, 16)
    reader = ChunkReader(table, CropSpec.from_config(cfg, train=False), ring)
    first, second = (reader[(sequence, chunk)] for sequence, chunk in enumerate(plan_chunks(4, 2)))
    normalize = torch_decoder.Normalizer(cfg, CPU, torch.float32)
    with pytest.raises(RuntimeError, match="crop slot 0 holds chunk 1, not chunk 0"):
        ring.read(first.slot, first.sequence, 2, normalize)
    np.testing.assert_allclose(shown_colours(ring.read(second.slot, second.sequence, 2, normalize)),
                               np.array(COLOURS[2:4]), atol=6)


def test_a_ring_too_small_for_the_chunks_in_flight_raises_with_workers(tmp_path, monkeypatch):
    """A ring of one slot under two workers (four chunks in flight): slots are overwritten while still in flight;
    that must end the pass with a RuntimeError, never hand out another chunk's images."""
    count = 48
    table = shard_table(tmp_path / "s.tar", [encode(flat(COLOURS[i % 6], 40, 40), quality=95) for i in range(count)])
    monkeypatch.setattr(torch_decoder, "ring_slots", lambda cfg: 1)
    cfg = data_config(tmp_path / "s.tar", workers=2, batch_size=4)
    decoder = TorchDecoder(cfg, table, CPU, torch.float32, train=False)
    with pytest.raises(RuntimeError, match=r"crop slot 0 holds (chunk \d+|a chunk being written), not chunk \d+"):
        for chunk in decoder.decode(iter(plan_chunks(count, 4))):
            # Until the error, what comes out is right: the stamps are checked after the copy too.
            np.testing.assert_allclose(shown_colours(chunk.images), np.array([COLOURS[s % 6] for s in chunk.samples]),
                                       atol=6)


@pytest.mark.skipif(not DALI, reason="DALI is not installed")
def test_dali_refuses_batches_that_would_not_fit_in_memory(tmp_path, monkeypatch):
    """DaliDecoder's constructor estimates its batches in flight, by hand here: (prefetch + 2) batches of B images
    of S x S x 3 float32 plus their encoded bytes (the shard's mean image); over MemAvailable is a one-line
    UserError saying the estimate and what to lower. -b 100000000 is refused on this machine as it is."""
    from fastpretrain.data.decoders import dali

    images = [encode(flat(rgb, 20, 20)) for rgb in COLOURS]
    table = shard_table(tmp_path / "s.tar", images)
    cfg = data_config(tmp_path / "s.tar", backend="dali", batch_size=64, image_size=32, workers=1, prefetch_batches=2)
    needed = 64 * (32 * 32 * 3 * 4 + np.mean([len(data) for data in images])) * (2 + 2)
    meminfo = tmp_path / "meminfo"
    monkeypatch.setattr(dali, "MEMINFO", meminfo)
    for available_kib, refused in ((int(needed) // 1024, True), (-(-int(needed) // 1024), False)):
        meminfo.write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {available_kib} kB\n")
        if refused:
            message = (rf"^the DALI data backend needs about {needed / 2**30:.3g} GiB for its batches in flight "
                       rf"\(4 batches of 64 images of 32x32\) and this machine has {available_kib / 2**20:.3g} GiB "
                       r"available: lower --batch-size or --img-size$")
            with pytest.raises(UserError, match=message):
                dali.DaliDecoder(cfg, table, CPU, torch.float32, train=True)
        else:
            dali.DaliDecoder(cfg, table, CPU, torch.float32, train=True)
    monkeypatch.undo()
    with pytest.raises(UserError, match="lower --batch-size"):
        dali.DaliDecoder(data_config(tmp_path / "s.tar", backend="dali", batch_size=10**8, image_size=32), table,
                         CPU, torch.float32, train=True)
