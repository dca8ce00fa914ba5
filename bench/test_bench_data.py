"""Images per second from shards to a ready batch (read, decode, crop, resize, flip, normalize, collate).

Each backend runs beside the common baseline, a torchvision ``ImageFolder``-style ``DataLoader`` (PIL decode,
``RandomResizedCrop``, flip, ``ToTensor``, ``Normalize``) with the same number of workers, and beside the
rate of decoding the full JPEGs alone (torchvision ``decode_jpeg`` on as many threads). They are timed in
turn, round after round, each after a drain of what it prefetched meanwhile; ``extra_info`` holds images/s
and the ratios of this run (``benchmark``'s own timing covers our loader alone).

Pictures: the demo corpus's drawings at 500x375 with sensor-like noise, so that a JPEG (~65 KB) costs about
what a photo of that size costs to entropy-decode; ``demo`` cases use the demo's own 96x96 pictures at 64.

Floor and prediction, from per-image costs on one core of this machine (500x375 in, 224 out):
- torchvision: read + header check 0.08 ms, full decode 0.88, antialiased uint8 resized crop 0.29, normalize
  0.10 (over whole pixel rows; 0.49 with a per-channel broadcast) = ~1.35 ms, ~1.6 ms with Python overhead;
  the baseline costs ~2.6 ms (PIL decode 1.3 + resize 0.4 + ToTensor + Normalize ~0.9). Predicted ~1.6x.
- DALI on CPU threads: region decode 0.80 ms (decoding only the crop saves ~10-20% of the 1.0 ms full decode),
  but its CPU resize costs ~1.0 ms, so ~2.0-2.2 ms: ~1.2-1.3x. DALI is built for the GPU (nvJPEG, hardware
  decoder, GPU resize), where none of that runs on the CPU cores.
- The issue's targets (2.5x the baseline, and at least the decode-only rate) need the whole pipeline under
  ~1.05 ms per image, i.e. below the full decode alone: not reachable on these cores without decoding at a
  reduced DCT scale, which a 224 crop of a 500x375 picture rarely allows. The measured ratios are reported,
  not asserted.
"""

from __future__ import annotations

import io
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastpretrain.data import DataConfig, build_train_loader
from fastpretrain.data.shards import ShardWriter, iter_shard
from fastpretrain.data.synth import make_post, write_demo_corpus
from fastpretrain.hashtags.labels import LabelIndex, label_index_path
from fastpretrain.hashtags.vocab import Vocab, VocabClass

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

WORKERS = 2  # this machine's cores
BATCH = 32
BATCHES_PER_CALL = 8
ROUNDS = 5
# Batches a pipeline may have ready before it is timed (DataLoader: 2 per worker; DALI: 2 runs in flight).
PREFETCHED = 2 * WORKERS
IMAGES = 256
WNIDS = ["n00000001"]
VOCAB_HASH = Vocab.hash_of(WNIDS, "concrete-first", "3.0")

try:
    import nvidia.dali  # noqa: F401

    BACKENDS = ["dali", "torch"]
except ImportError:
    BACKENDS = ["torch"]


def _photo_like(index: int, rng: np.random.Generator) -> bytes:
    drawing = Image.open(io.BytesIO(make_post(1, index, image_size=128).jpeg)).resize((500, 375), Image.BILINEAR)
    noisy = np.asarray(drawing, dtype=np.float32) + rng.normal(0, 10, (375, 500, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _label_everything(shards: list[Path], labels: Path) -> None:
    for shard in shards:
        keys = [key for key, _ in iter_shard(shard)]
        LabelIndex.from_rows(keys, [[0]] * len(keys), VOCAB_HASH).save(label_index_path(labels, shard))


def _image_folder(shards: list[Path], folder: Path) -> None:
    """The same JPEGs as files in one class folder, for the ImageFolder baseline."""
    (folder / "0").mkdir(parents=True)
    for shard in shards:
        for key, files in iter_shard(shard):
            (folder / "0" / f"{key}.jpg").write_bytes(files["jpg"])


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data-bench")
    rng = np.random.default_rng(0)  # fixed: the same pictures in every run, to compare runs
    photos = []
    for s in range(IMAGES // 128):
        path = root / "photos" / f"{s:05d}.tar"
        with ShardWriter(path) as writer:
            for i in range(128):
                writer.write(f"{s:05d}{i:04d}", {"jpg": _photo_like(s * 128 + i, rng), "json": b"{}"})
        photos.append(path)
    demo = write_demo_corpus(root / "demo", IMAGES, seed=1, shard_size=128)
    for name, shards in (("photos", photos), ("demo", demo)):
        _label_everything(shards, root / f"{name}-labels")
        _image_folder(shards, root / f"{name}-folder")
    return {"root": root}


def _vocab() -> Vocab:
    return Vocab([VocabClass(0, WNIDS[0], ["thing"], IMAGES)], "concrete-first", VOCAB_HASH, IMAGES)


def _endless(loader_factory):
    while True:
        yield from loader_factory()


def _baseline(folder: Path, size: int):
    import torchvision
    import torchvision.transforms as T

    dataset = torchvision.datasets.ImageFolder(str(folder), T.Compose([
        T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=WORKERS,
                                         persistent_workers=True, drop_last=True)
    return _endless(lambda: loader)


def _decode_only(shards_root: Path, pool: ThreadPoolExecutor):
    from torchvision.io import decode_jpeg

    encoded = [torch.frombuffer(bytearray(files["jpg"]), dtype=torch.uint8)
               for shard in sorted(shards_root.glob("*.tar")) for _, files in iter_shard(shard)]
    position = 0

    def batch() -> None:
        nonlocal position
        chunk = [encoded[(position + i) % len(encoded)] for i in range(BATCH)]
        position += BATCH
        list(pool.map(decode_jpeg, chunk))

    return batch


def _steady_medians(candidates: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each candidate, in turn round after round, each timed after taking (untimed)
    the batches its pipeline prepared while the others ran: interleaving alone would credit that head start."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, (take, drain) in candidates.items():
            drain()
            start = time.perf_counter()
            take()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def _measure(benchmark, corpora, backend: str, corpus: str, size: int) -> None:
    root = corpora["root"]
    cfg = DataConfig(shards=str(root / corpus), labels_dir=str(root / f"{corpus}-labels"), backend=backend,
                     batch_size=BATCH, image_size=size, workers=WORKERS, resample="natural", seed=1)
    ours = build_train_loader(cfg, _vocab(), torch.device("cpu"), torch.float32, rank=0, world_size=1)
    baseline = _baseline(root / f"{corpus}-folder", size)
    torch.set_num_threads(1)  # the decode-only threads each run one decode; intra-op threads would oversubscribe
    with ThreadPoolExecutor(WORKERS) as pool:
        decode_batch = _decode_only(root / corpus, pool)
        takers = {backend: lambda: next(ours), "baseline": lambda: next(baseline), "decode_only": decode_batch}
        candidates = {
            name: (lambda take=take: [take() for _ in range(BATCHES_PER_CALL)],
                   lambda take=take: [take() for _ in range(PREFETCHED)])
            for name, take in takers.items()
        }
        for take, drain in candidates.values():  # start-up: worker processes, pipeline build, first batches
            drain()
        medians = _steady_medians(candidates, ROUNDS)
        benchmark.pedantic(candidates[backend][0], rounds=3, iterations=1)
    ours.close()
    rate = {name: BATCH * BATCHES_PER_CALL / seconds for name, seconds in medians.items()}
    benchmark.extra_info.update({
        f"{name}_images_per_s": round(value) for name, value in rate.items()
    })
    benchmark.extra_info["speedup_vs_baseline"] = round(rate[backend] / rate["baseline"], 2)
    benchmark.extra_info["share_of_decode_only_rate"] = round(rate[backend] / rate["decode_only"], 2)
    benchmark.extra_info["workers"] = WORKERS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.benchmark(group="data-224-from-500x375")
def test_loader_images_per_second(benchmark, corpora, backend):
    _measure(benchmark, corpora, backend, "photos", 224)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.benchmark(group="data-demo-64-from-96")
def test_demo_loader_images_per_second(benchmark, corpora, backend):
    """The demo's case: its trainer needs ~60 images/s; the loader must be far faster on the same cores."""
    _measure(benchmark, corpora, backend, "demo", 64)
