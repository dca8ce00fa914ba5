"""precision@k and the majority baseline against counts made by hand, row by row, in plain Python."""

import torch

from fastpretrain.data import Batch
from fastpretrain.evaluate import evaluate, multi_hot, precision_at_k


def random_csr(batch, classes, gen, max_labels=4):
    rows = [sorted(set(torch.randint(0, classes, (int(torch.randint(0, max_labels + 1, (1,), generator=gen)),),
                                     generator=gen).tolist())) for _ in range(batch)]
    offsets = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    labels = torch.tensor([c for r in rows for c in r], dtype=torch.int64)
    return rows, labels, offsets


def test_multi_hot_and_precision_at_k_match_a_loop(gen):
    batch, classes = 37, 11
    rows, labels, offsets = random_csr(batch, classes, gen)
    # float64: two float32 normals are equal 1.4e-8 of the time, and a tie at the k-th place may be broken
    # either way (torch.topk against the stable sort below): about 8e-7 of float32 runs would fail so.
    logits = torch.randn(batch, classes, generator=gen, dtype=torch.float64)
    target = multi_hot(labels, offsets, classes)
    for i, row in enumerate(rows):
        assert sorted(target[i].nonzero().flatten().tolist()) == row
    for k in (1, 5):
        got = precision_at_k(logits, target, k)
        for i, row in enumerate(rows):
            top = sorted(range(classes), key=lambda c: -logits[i, c].item())[:k]
            assert abs(got[i].item() - sum(c in row for c in top) / k) < 1e-6


def test_evaluate_averages_over_labeled_images_only(gen):
    classes = 6
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, classes))
    batches, expected_p1, expected_major, labeled = [], 0.0, 0.0, 0
    for batch in (5, 3):
        rows, labels, offsets = random_csr(batch, classes, gen)
        images = torch.randn(batch, 1, 2, 2, generator=gen)
        batches.append(Batch(images, labels, offsets))
        logits = model(images)
        for i, row in enumerate(rows):
            if row:
                labeled += 1
                expected_p1 += logits[i].argmax().item() in row
                expected_major += 2 in row
    result = evaluate(model, batches, majority_class=2)
    assert result["images"] == labeled
    assert abs(result["precision@1"] - expected_p1 / max(labeled, 1)) < 1e-9
    assert abs(result["majority_precision@1"] - expected_major / max(labeled, 1)) < 1e-9
