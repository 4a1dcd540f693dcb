"""Batch plans: every row exactly once, budgets kept, deterministic per (seed, epoch), little padding."""

from __future__ import annotations

import numpy as np
import pytest

from lorakit.data.batching import padding_share, plan_batches
from lorakit.errors import LorakitError

LENGTHS = np.random.default_rng(0).integers(5, 129, 500)  # a wide mix of row lengths, max 128


def flat(plan):
    return sorted(i for batch in plan for i in batch)


def test_packing_places_every_row_once_within_budget():
    plan = plan_batches(LENGTHS, packing=True, batch_size=4, max_length=128)
    assert flat(plan) == list(range(500))
    sizes = [int(LENGTHS[b].sum()) for b in plan]
    assert max(sizes) <= 512
    # Best-fit decreasing: the bins are nearly full (only the lower bound of bins plus one).
    assert len(plan) <= int(np.ceil(LENGTHS.sum() / 512)) + 1
    assert sizes[0] == max(sizes)  # the largest batch first


def test_plans_are_deterministic_per_seed_and_epoch():
    a = plan_batches(LENGTHS, packing=True, batch_size=4, max_length=128, seed=1, epoch=0)
    assert a == plan_batches(LENGTHS, packing=True, batch_size=4, max_length=128, seed=1, epoch=0)
    assert a != plan_batches(LENGTHS, packing=True, batch_size=4, max_length=128, seed=1, epoch=1)
    assert a != plan_batches(LENGTHS, packing=True, batch_size=4, max_length=128, seed=2, epoch=0)


def test_length_grouping_cuts_padding():
    grouped = plan_batches(LENGTHS, packing=False, batch_size=8, max_length=128)
    plain = plan_batches(LENGTHS, packing=False, batch_size=8, max_length=128, group_by_length=False)
    assert flat(grouped) == flat(plain) == list(range(500))
    assert sorted(len(b) for b in grouped) == [4] + [8] * 62
    assert padding_share(grouped, LENGTHS, packing=False) < 0.05 < padding_share(plain, LENGTHS, packing=False)
    assert padding_share(plan_batches(LENGTHS, packing=True, batch_size=8, max_length=128), LENGTHS,
                         packing=True) == 0.0


def test_evaluation_order_is_file_order():
    plan = plan_batches([3, 3, 3, 3, 3], packing=False, batch_size=2, max_length=8, shuffle=False)
    assert plan == [[0, 1], [2, 3], [4]]
    packed = plan_batches([5, 4, 3, 8], packing=True, batch_size=1, max_length=8, max_tokens=9, shuffle=False)
    assert packed == [[0, 1], [2], [3]]


def test_bad_budgets_are_refused():
    with pytest.raises(LorakitError, match="max_tokens 64 is smaller than max_length 128"):
        plan_batches(LENGTHS, packing=True, batch_size=1, max_length=128, max_tokens=64)
    with pytest.raises(LorakitError, match="a row of 128 tokens exceeds max_length 100"):
        plan_batches(LENGTHS, packing=True, batch_size=1, max_length=100)
