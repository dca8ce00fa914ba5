"""Header checks on real odd and broken images, crop boxes against torchvision's, EXIF orientation against PIL."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop

from fastpretrain.data.decoders.boxes import center_boxes, eval_resize_size, random_resized_boxes, sample_uniforms
from fastpretrain.data.decoders.common import BadImage, probe_image
from fastpretrain.data.decoders.torch import apply_orientation

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


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_turns_like_pil(rng, orientation):
    """nvJPEG ignores EXIF, so the GPU path turns images itself: it must match PIL's exif_transpose."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(smooth_image(rng, int(rng.integers(5, 30)), int(rng.integers(5, 30))), exif=exif)
    reference = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    raw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    turned = apply_orientation(raw, orientation).permute(1, 2, 0).numpy()
    assert turned.shape == reference.shape
    assert np.abs(turned.astype(int) - reference).max() <= 2  # both are libjpeg-turbo; allow IDCT rounding


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
