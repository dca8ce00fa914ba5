"""How reader slots deal an epoch, and what is left of it when a run resumes on another number of slots, against a
set-of-positions model worked out element by element (no loader, no images: the arithmetic alone)."""

from __future__ import annotations

import numpy as np

from fastpretrain.data.stream import EpochRest, SlotPlans


class PlanOfLengths:
    """A stream whose epoch ``e`` plan is ``lengths[e]`` positions (the samples do not matter here)."""

    def __init__(self, lengths: dict[int, int]) -> None:
        self.lengths = lengths

    def plan(self, epoch: int) -> np.ndarray:
        return np.arange(self.lengths[epoch])


def test_rest_positions_skip_the_taken_ones(rng):
    start, length = int(rng.integers(0, 20)), int(rng.integers(30, 80))
    free = list(range(start, length))
    taken = sorted(rng.choice(free, size=int(rng.integers(0, 10)), replace=False).tolist())
    rest = EpochRest(start, np.array(taken, dtype=np.int64))
    expected = [p for p in free if p not in taken]  # the rest, element by element
    assert rest.length(length) == len(expected)
    assert rest.positions(np.arange(len(expected))).tolist() == expected


def test_fold_leaves_exactly_what_no_slot_consumed(rng):
    """Slots consume random prefixes of their shares (some into the next epochs, some of epochs shorter than the
    number of slots); after folding, each epoch's rest is the set of positions nobody read, whatever the new D."""
    for _ in range(300):
        lengths = {e: int(rng.integers(1, 40)) for e in range(5)}
        num_slots = int(rng.integers(1, 6))
        plans = SlotPlans(PlanOfLengths(lengths), num_slots)
        consumed = {e: set() for e in lengths}
        places = {}
        for slot in range(num_slots):
            epoch = 0
            while True:  # a random prefix of this epoch's share; all of it moves the slot on to the next epoch
                share = plans.share_length(slot, epoch)
                n = int(rng.integers(0, share + 1))
                consumed[epoch] |= set(plans.chunk(slot, epoch, 0, n).positions.tolist())
                if n < share or epoch == 3:
                    places[slot] = (epoch, n)
                    break
                epoch += 1
        plans.fold(places)
        plans.num_slots = int(rng.integers(1, 6))  # the resumed world: its slots deal out the rests
        first, last = min(e for e, _ in places.values()), max(e for e, _ in places.values())
        for epoch in range(first, 5):
            left = sorted(set(range(lengths[epoch])) - consumed[epoch])
            if epoch not in plans.rests:
                assert epoch > last and not consumed[epoch]  # untouched: whole
            dealt = sorted(p for slot in range(plans.num_slots)
                           for p in plans.chunk(slot, epoch, 0, lengths[epoch]).positions.tolist())
            assert dealt == left, (epoch, places, lengths)
