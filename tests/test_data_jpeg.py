"""The region decoder of the CPU decode path (``csrc/jpeg_region.cpp``) against PIL's full decode of the same bytes.

The two use different builds of libjpeg-turbo (the system's 2.1.5 here, PIL's bundled 3.2) with the same settings
(islow IDCT, fancy upsampling). Measured: their full decodes are the same to the level, over thousands of images
(4:4:4, 4:2:2, 4:2:0, baseline and progressive, restart markers, grayscale, quality 50 to 95), and so are baseline
JPEGs cut short or corrupted (against PIL with LOAD_TRUNCATED_IMAGES); every box of every image up to 40x120 equals
the same box of the full decode once the chroma at the box's edges is upsampled from the pixels outside it
(``test_box_edges_are_not_treated_as_image_edges``). So pixels are compared exactly; the only exceptions,
documented where they are, are damaged progressive JPEGs, where the two libraries recover differently.

Images are textured so that the checks catch a box off by one pixel or a wrong channel order: each channel has
its own ramp (red along x, green along y, blue along the diagonal) plus noise of sd 40, so neighbouring pixels and
the channels differ by tens of levels (asserted by ``assert_content_tells_apart``).
"""

from __future__ import annotations

import ctypes
import io
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, JpegImagePlugin

# The extension needs libjpeg-turbo's headers (Debian's libjpeg62-turbo-dev); where they are, a build failure fails.
if not Path("/usr/include/jpeglib.h").exists():
    pytest.skip("libjpeg-turbo's headers (/usr/include/jpeglib.h) are not installed", allow_module_level=True)

from fastpretrain.cpp_extension import load_extension  # noqa: E402

Box = tuple[int, int, int, int]  # (left, top, width, height)


@dataclass(frozen=True)
class Encoding:
    mode: str  # PIL mode saved: "RGB" or "L"
    options: Mapping[str, object]  # PIL JPEG save options besides the quality
    imcu: int  # iMCU width in pixels: jpeg_crop_scanline can only start on a multiple of it


ENCODINGS = {
    "444": Encoding("RGB", {"subsampling": 0}, 8),
    "422": Encoding("RGB", {"subsampling": 1}, 16),
    "420": Encoding("RGB", {"subsampling": 2}, 16),
    "444-progressive": Encoding("RGB", {"subsampling": 0, "progressive": True}, 8),
    "422-progressive": Encoding("RGB", {"subsampling": 1, "progressive": True}, 16),
    "420-progressive": Encoding("RGB", {"subsampling": 2, "progressive": True}, 16),
    "420-restart-blocks": Encoding("RGB", {"subsampling": 2, "restart_marker_blocks": 3}, 16),
    "444-restart-rows": Encoding("RGB", {"subsampling": 0, "restart_marker_rows": 1}, 8),
    "rgb-colourspace": Encoding("RGB", {"subsampling": 0, "keep_rgb": True}, 8),  # Adobe transform 0: no YCbCr
    "gray": Encoding("L", {}, 8),
    "gray-progressive": Encoding("L", {"progressive": True}, 8),
}
SUBSAMPLED = [name for name in ENCODINGS if name[:3] in ("422", "420")]
BASELINE = [name for name, e in ENCODINGS.items() if not e.options.get("progressive")]
PROGRESSIVE = [name for name, e in ENCODINGS.items() if e.options.get("progressive")]
DECODE_FAILED = r"^JPEG decode failed: \S"




@pytest.fixture(scope="module")
def jpeg():
    return load_extension("jpeg")


def textured(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8: a ramp per channel, each along its own direction, plus noise of sd 40."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)  # (H, W) each
    ramps = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 1 - (x + y) / max(height + width - 2, 1)], -1)
    return np.clip(128 * ramps + 64 + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)


def encode(rng: np.random.Generator, name: str, height: int, width: int) -> tuple[bytes, np.ndarray]:
    """A textured JPEG of ``ENCODINGS[name]`` at a random quality 50..95, and PIL's (H, W, 3) RGB decode of it."""
    encoding = ENCODINGS[name]
    out = io.BytesIO()
    image = Image.fromarray(textured(rng, height, width)).convert(encoding.mode)
    image.save(out, "JPEG", quality=int(rng.integers(50, 96)), **encoding.options)
    data = out.getvalue()
    assert_encoded_as(data, encoding)
    return data, pil_rgb(data)


def assert_encoded_as(data: bytes, encoding: Encoding) -> None:
    """The file has what its encoding claims, so each case tests what it says it does."""
    image = Image.open(io.BytesIO(data))
    assert image.mode == encoding.mode
    assert (b"\xff\xc2" in data) == bool(encoding.options.get("progressive"))  # SOF2: progressive DCT
    restart = "restart_marker_blocks" in encoding.options or "restart_marker_rows" in encoding.options
    assert (b"\xff\xdd" in data) == restart  # DRI: define restart interval
    if encoding.mode == "RGB":
        assert JpegImagePlugin.get_sampling(image) == encoding.options["subsampling"]
        assert image.info.get("adobe_transform", 1) == (0 if encoding.options.get("keep_rgb") else 1)


def pil_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # (H, W, 3) uint8


def spans(rng: np.random.Generator, size: int, imcu: int) -> list[tuple[int, int]]:
    """(start, length) along one axis: the whole, against each edge, one pixel (first, last, random), starting on
    and off an iMCU boundary, and random."""
    out = [(0, size), (0, int(rng.integers(1, size + 1))), (0, 1), (size - 1, 1), (int(rng.integers(0, size)), 1)]
    start = int(rng.integers(0, size))
    out.append((start, size - start))
    if size > imcu:
        on = imcu * int(rng.integers(1, (size - 1) // imcu + 1))
        off = int(rng.choice([s for s in range(1, size) if s % imcu]))
        out += [(s, int(rng.integers(1, size - s + 1))) for s in (on, off)]
    for _ in range(4):
        start = int(rng.integers(0, size))
        out.append((start, int(rng.integers(1, size - start + 1))))
    return out


def boxes(rng: np.random.Generator, height: int, width: int, imcu: int) -> list[Box]:
    """Every pairing of ``spans`` along x and along y: ~130 boxes, with all four edges and corners touched."""
    rows = spans(rng, height, imcu)
    return [(left, top, w, h) for left, w in spans(rng, width, imcu) for top, h in rows]


def image_sizes(rng: np.random.Generator) -> list[tuple[int, int]]:
    """(height, width): not multiples of 8 (odd), multiples of 16, and tiny."""
    odd = (int(rng.integers(4, 50)) * 2 + 1, int(rng.integers(8, 80)) * 2 + 1)
    return [odd, (16 * int(rng.integers(1, 6)), 16 * int(rng.integers(1, 8))), tuple(rng.integers(1, 17, 2).tolist())]


def assert_box_equal(out: torch.Tensor, reference: np.ndarray, box: Box) -> None:
    """``out`` is exactly ``box`` of the (H, W, 3) ``reference``; the message names the box and the first miss."""
    left, top, width, height = box
    assert out.dtype == torch.uint8 and tuple(out.shape) == (height, width, 3) and out.is_contiguous(), (box, out.shape)
    expected = reference[top:top + height, left:left + width]
    got = out.numpy()
    if not np.array_equal(got, expected):
        diff = np.abs(got.astype(np.int16) - expected).max(-1)  # (h, w)
        y, x = np.argwhere(diff > 0)[0]
        cols = np.unique(np.argwhere(diff > 0)[:, 1]) + left
        pytest.fail(f"box (left, top, width, height) {box}: {int((diff > 0).sum())} pixels differ, by up to "
                    f"{int(diff.max())} levels, in image columns {cols.tolist()}; first at x={left + x}, y={top + y}: "
                    f"{got[y, x].tolist()} instead of {expected[y, x].tolist()}")


def assert_content_tells_apart(reference: np.ndarray, box: Box, gray: bool) -> None:
    """The box one pixel left or up, or with its channels reversed, would differ clearly from the truth (measured:
    by at least 60 levels for a shift, 24 for the channels, on boxes of 8x8 or more): an exact match is no luck."""
    left, top, width, height = box
    if width < 8 or height < 8 or left == 0 or top == 0:
        return
    truth = reference[top:top + height, left:left + width].astype(np.int16)
    assert np.abs(truth - reference[top:top + height, left - 1:left - 1 + width]).max() >= 16
    assert np.abs(truth - reference[top - 1:top - 1 + height, left:left + width]).max() >= 16
    if not gray:
        assert np.abs(truth - truth[..., ::-1]).max() >= 8


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_boxes_equal_the_same_box_of_pils_full_decode(jpeg, rng: np.random.Generator, name: str) -> None:
    encoding = ENCODINGS[name]
    for height, width in image_sizes(rng):
        data, reference = encode(rng, name, height, width)
        for box in boxes(rng, height, width, encoding.imcu):
            out = jpeg.decode_region(data, *box)
            assert_box_equal(out, reference, box)
            assert_content_tells_apart(reference, box, encoding.mode == "L")
            if encoding.mode == "L":
                assert torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_every_column_range_and_every_row_range(jpeg, rng: np.random.Generator, name: str) -> None:
    """Exhaustive along each axis on a ~40x40 image: every [left, right) at full height (where crop_scanline widens
    to iMCU columns and upsamples chroma across the box's edges), every [top, bottom) at full width (skipping)."""
    height, width = (int(v) for v in rng.integers(33, 49, 2))
    data, reference = encode(rng, name, height, width)
    for left in range(width):
        for w in range(1, width - left + 1):
            assert_box_equal(jpeg.decode_region(data, left, 0, w, height), reference, (left, 0, w, height))
    for top in range(height):
        for h in range(1, height - top + 1):
            assert_box_equal(jpeg.decode_region(data, 0, top, width, h), reference, (0, top, width, h))


@pytest.mark.parametrize("name", SUBSAMPLED)
def test_box_edges_are_not_treated_as_image_edges(jpeg, rng: np.random.Generator, name: str) -> None:
    """libjpeg's fancy chroma upsampling treats the first and last column it decodes as the image's edges, and turns
    itself off below 2 chroma columns (libjpeg.txt, "Decompressing partial scanlines"): a box starting on an iMCU
    boundary, or ending on an even column, must still get the chroma its neighbours outside the box give it."""
    height, width = 24, 64
    data, reference = encode(rng, name, height, width)
    for box in [(16, 0, 16, height), (0, 0, 8, height), (16, 0, 1, height), (17, 0, 1, height), (0, 0, 1, height),
                (width - 1, 0, 1, height), (32, 4, 18, 9)]:
        assert_box_equal(jpeg.decode_region(data, *box), reference, box)


@pytest.mark.parametrize("name", ["444", "422", "420", "gray", "420-progressive"])
def test_tiny_images_every_box(jpeg, rng: np.random.Generator, name: str) -> None:
    for height, width in [(1, 1), (1, 2), (2, 1), (2, 2), (3, 5), (5, 3), (1, 17), (17, 1)]:
        data, reference = encode(rng, name, height, width)
        for left in range(width):
            for top in range(height):
                for w in range(1, width - left + 1):
                    for h in range(1, height - top + 1):
                        assert_box_equal(jpeg.decode_region(data, left, top, w, h), reference, (left, top, w, h))


def cmyk_jpeg(rng: np.random.Generator, adobe_transform: int) -> bytes:
    """A CMYK JPEG from PIL (Adobe transform 0); with transform 2 its header says YCCK (the pixels do not matter:
    the decoder must not decode it)."""
    out = io.BytesIO()
    Image.fromarray(textured(rng, 20, 30)).convert("CMYK").save(out, "JPEG")
    data = bytearray(out.getvalue())
    adobe = data.index(b"Adobe")
    assert data[adobe + 11] == 0  # APP14 "Adobe", version, flags0, flags1, transform
    data[adobe + 11] = adobe_transform
    assert Image.open(io.BytesIO(bytes(data))).info["adobe_transform"] == adobe_transform
    return bytes(data)


@pytest.mark.parametrize("transform", [0, 2], ids=["cmyk", "ycck"])
def test_cmyk_and_ycck_are_left_to_another_decoder(jpeg, rng: np.random.Generator, transform: int) -> None:
    data = cmyk_jpeg(rng, transform)
    for box in [(0, 0, 30, 20), (3, 2, 5, 7)]:
        out = jpeg.decode_region(data, *box)
        assert out.dtype == torch.uint8 and tuple(out.shape) == (0, 0, 3)


def not_jpeg(rng: np.random.Generator) -> dict[str, tuple[bytes, str | None]]:
    """Undecodable data -> (bytes, libjpeg's message where it is stable across versions, else None)."""
    png = io.BytesIO()
    Image.fromarray(textured(rng, 10, 12)).save(png, "PNG")
    junk = rng.integers(0, 256, 300, dtype=np.uint8)
    junk[0] = rng.integers(0, 255)  # not 0xFF: never a JPEG's SOI by chance
    data, _ = encode(rng, "420", 30, 40)
    sof = data.index(b"\xff\xc0")
    zero_height = bytearray(data)
    zero_height[sof + 5:sof + 7] = b"\x00\x00"  # SOF0: length(2), precision(1), height(2), width(2)
    return {
        "empty": (b"", "Empty input file"),
        "png": (png.getvalue(), "Not a JPEG file: starts with 0x89 0x50"),
        "random": (junk.tobytes(), None),
        "text": (b"hello, world" * 8, "Not a JPEG file: starts with 0x68 0x65"),
        "soi only": (data[:2], None),
        "cut in the header": (data[:sof + 6], None),
        "no soi": (data[2:], None),
        "zero height": (bytes(zero_height), None),
    }


def test_undecodable_data_raises_with_libjpegs_message(jpeg, rng: np.random.Generator) -> None:
    for name, (data, message) in not_jpeg(rng).items():
        with pytest.raises(RuntimeError, match=DECODE_FAILED) as error:
            jpeg.decode_region(data, 0, 0, 1, 1)
        if message is not None:
            assert str(error.value) == f"JPEG decode failed: {message}", name


def test_bad_boxes_raise(jpeg, rng: np.random.Generator) -> None:
    height, width = (int(v) for v in rng.integers(5, 60, 2))
    data, _ = encode(rng, str(rng.choice(list(ENCODINGS))), height, width)
    outside = f"^{re.escape(f'decode_region: box outside the {width}x{height} image')}$"
    for box in [(0, 0, width + 1, height), (0, 0, width, height + 1), (1, 0, width, height), (0, 1, width, height),
                (width, 0, 1, 1), (0, height, 1, 1), (2**40, 0, 1, 1), (0, 0, 1, 2**33)]:
        with pytest.raises(RuntimeError, match=outside):
            jpeg.decode_region(data, *box)
    for box in [(0, 0, 0, 1), (0, 0, 1, 0), (0, 0, -1, 1), (0, 0, 1, -1), (-1, 0, 1, 1), (0, -1, 1, 1)]:
        with pytest.raises(RuntimeError, match="^decode_region: empty or negative box$"):
            jpeg.decode_region(data, *box)


def malloc_in_use() -> int | None:
    """Bytes the C heap has handed out (glibc's mallinfo2), or None where there is no mallinfo2."""

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except AttributeError:
        return None
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd  # in use from the heap + from mmap


def test_repeated_errors_neither_crash_nor_leak(jpeg, rng: np.random.Generator) -> None:
    """Every error path destroys libjpeg's state. A missed jpeg_destroy_decompress leaks at least libjpeg's
    permanent pool (1.6 KB), after jpeg_start_decompress the image's buffers too: far above the bound."""
    data, _ = encode(rng, "420-progressive", 64, 96)
    bad_scan = bytearray(data)
    second_scan = data.index(b"\xff\xda", data.index(b"\xff\xda") + 2)
    components = bad_scan[second_scan + 4]
    bad_scan[second_scan + 5 + 2 * components] = 64  # Ss past the last coefficient: fails inside start_decompress
    calls = {
        "not a JPEG": ((not_jpeg(rng)["png"][0], 0, 0, 1, 1), DECODE_FAILED),
        "bad progressive scan": ((bytes(bad_scan), 0, 0, 96, 64), DECODE_FAILED),
        "box outside": ((data, 90, 0, 7, 1), "box outside"),
        "negative box": ((data, 0, -1, 1, 1), "empty or negative box"),
        "success": ((data, 5, 40, 50, 10), None),  # stops before the last row: abort, not finish
    }
    for name, (args, error) in calls.items():
        def call() -> None:
            if error is None:
                assert tuple(jpeg.decode_region(*args).shape) == (args[4], args[3], 3)
            else:
                with pytest.raises(RuntimeError, match=error):
                    jpeg.decode_region(*args)
        for _ in range(50):  # warm up: allocator caches, pybind11's and torch's first-call state
            call()
        # mallinfo2 counts every thread's heap: a thread left running by an earlier test may allocate during a
        # window. A leak grows the heap in every window, so the least growth of three is the one that counts.
        growths = []
        for _ in range(3):
            before = malloc_in_use()
            for _ in range(300):
                call()
            if before is not None:
                growths.append((malloc_in_use() - before) / 300)
        if growths:
            assert min(growths) < 512, f"{name}: the C heap grew by {min(growths):.0f} bytes a call, at least"


def entropy_start(data: bytes, scan: int = -1) -> int:
    """Offset of the entropy-coded data of the first (scan=0) or last (scan=-1) scan: after its SOS header."""
    starts = [m.start() for m in re.finditer(b"\xff\xda", data)]
    sos = starts[scan]
    return sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")


def pil_rgb_damaged(data: bytes, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    with monkeypatch.context() as patch:
        patch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
        return pil_rgb(data)


def full_width_boxes(rng: np.random.Generator, height: int, width: int) -> list[Box]:
    """Boxes across the whole width (unaffected by horizontal cropping): the rows above them are skipped."""
    return [(0, top, width, h) for top, h in spans(rng, height, 16)]


@pytest.mark.parametrize("name", BASELINE)
def test_truncated_baseline_decodes_like_pil(jpeg, rng: np.random.Generator, capfd, monkeypatch, name: str) -> None:
    """Cut inside the entropy-coded data, libjpeg warns (premature end of data) and decodes on as if the rest
    were zeros: the rows before the cut are the intact image's, the rest mid-gray. PIL with LOAD_TRUNCATED_IMAGES
    gives the same pixels (measured: equal to the level). The warning must not reach stderr."""
    height, width = (int(v) for v in rng.integers(40, 90, 2))
    data, intact = encode(rng, name, height, width)
    start = entropy_start(data)
    cut = data[:int(rng.integers(start + 1, start + int(0.8 * (len(data) - start))))]
    reference = pil_rgb_damaged(cut, monkeypatch)
    assert not np.array_equal(reference, intact)  # the cut lost rows
    for box in full_width_boxes(rng, height, width):
        assert_box_equal(jpeg.decode_region(cut, *box), reference, box)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("name", ["444", "420", "420-restart-blocks", "444-restart-rows", "gray"])
@pytest.mark.parametrize("damage", ["stray marker", "garbage"])
def test_corrupt_baseline_decodes_like_pil(jpeg, rng: np.random.Generator, capfd, monkeypatch, name: str,
                                           damage: str) -> None:
    """Damage inside the entropy-coded data: a stray EOI marker (libjpeg always warns: premature end of data
    segment) or bytes of garbage. libjpeg recovers (at the next restart marker where there are some) as PIL does
    (measured: equal to the level); nothing reaches stderr."""
    height, width = (int(v) for v in rng.integers(40, 90, 2))
    data, intact = encode(rng, name, height, width)
    start = entropy_start(data)
    at = int(rng.integers(start + 1, len(data) - 8))
    if damage == "stray marker":
        damaged = data[:at] + b"\xff\xd9" + data[at:]
    else:  # no 0xFF: no marker by chance
        damaged = data[:at] + rng.integers(0, 255, 8, dtype=np.uint8).tobytes() + data[at + 8:]
    reference = pil_rgb_damaged(damaged, monkeypatch)
    for box in full_width_boxes(rng, height, width):
        assert_box_equal(jpeg.decode_region(damaged, *box), reference, box)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("name", PROGRESSIVE)
def test_truncated_progressive_decodes_quietly(jpeg, rng: np.random.Generator, capfd, name: str) -> None:
    """Cut inside the first scan, a progressive JPEG still decodes (libjpeg warns, and decodes what it has) to the
    right shape, every box the same rows as the whole image. There is no independent reference for the pixels:
    PIL's LOAD_TRUNCATED_IMAGES decode differed by up to 17 levels (up to ~250 for cuts in later scans) as it
    feeds libjpeg differently, and torchvision refuses truncated data."""
    height, width = (int(v) for v in rng.integers(40, 90, 2))
    data, intact = encode(rng, name, height, width)
    start = entropy_start(data, scan=0)
    cut = data[:int(rng.integers(start + 1, data.index(b"\xff", start)))]
    whole = jpeg.decode_region(cut, 0, 0, width, height)
    assert tuple(whole.shape) == (height, width, 3)
    assert not np.array_equal(whole.numpy(), intact)
    for box in full_width_boxes(rng, height, width):
        assert_box_equal(jpeg.decode_region(cut, *box), whole.numpy(), box)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("name", ["420", "444-restart-rows", "420-progressive", "gray-progressive"])
def test_cut_anywhere_decodes_or_raises_quietly(jpeg, rng: np.random.Generator, capfd, name: str) -> None:
    """Cut at any byte, the data either decodes to the right shape or raises libjpeg's error (libjpeg fails where
    the cut lands inside a marker segment, e.g. a later scan's Huffman table, where PIL returns what it has);
    never a crash, never a line on stderr."""
    height, width = (int(v) for v in rng.integers(20, 60, 2))
    data, _ = encode(rng, name, height, width)
    for length in rng.integers(0, len(data), 40):
        try:
            out = jpeg.decode_region(data[:length], 0, 0, width, height)
        except RuntimeError as error:
            assert re.match(DECODE_FAILED, str(error)), str(error)
        else:
            assert tuple(out.shape) == (height, width, 3)
    assert capfd.readouterr().err == ""


def test_threads_give_the_single_threaded_results(jpeg, rng: np.random.Generator) -> None:
    """decode_region releases the GIL: four threads at once, each result the same as decoded alone."""
    jobs = []
    for _ in range(24):
        name = str(rng.choice(list(ENCODINGS)))
        height, width = (int(v) for v in rng.integers(16, 120, 2))
        data, _ = encode(rng, name, height, width)
        jobs += [(data, box) for box in rng.permutation(boxes(rng, height, width, ENCODINGS[name].imcu))[:10]]
    alone = [jpeg.decode_region(data, *map(int, box)) for data, box in jobs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda job: jpeg.decode_region(job[0], *map(int, job[1])), jobs))
    for (data, box), a, b in zip(jobs, alone, together):
        assert torch.equal(a, b), tuple(box)
