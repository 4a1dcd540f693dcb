"""Batch plans: every row exactly once, budgets kept, deterministic per (seed, epoch), little padding."""

from __future__ import annotations

import numpy as np
import pytest

from lorakit.data.batching import (choose_batching, micro_batch_tokens, padding_share, plan_batches, rows_of,
                                   split_batch)
from lorakit.errors import LorakitError

LENGTHS = np.random.default_rng(0).integers(5, 129, 500)  # a wide mix of row lengths, max 128


def flat(plan):
    return sorted(rows_of_plan(plan))


def rows_of_plan(plan):
    return [i for batch in plan for i in rows_of(batch)]


def test_packing_places_every_row_once_in_rows_of_at_most_max_length():
    plan = plan_batches(LENGTHS, packing=True, batch_size=4, max_length=128)
    assert flat(plan) == list(range(500))
    assert all(1 <= len(batch) <= 4 for batch in plan)  # batch_size packed rows (the last batch may hold fewer)
    fills = [int(LENGTHS[row].sum()) for batch in plan for row in batch]
    assert max(fills) <= 128  # a packed row never exceeds max_length: attention never spans the batch budget
    # Best-fit decreasing: the rows are nearly full (rows up to 128 tokens into rows of 128: within 8 % of
    # the lower bound on the number of rows).
    assert len(fills) <= 1.08 * np.ceil(LENGTHS.sum() / 128)
    cost = [len(b) * max(int(LENGTHS[row].sum()) for row in b) for b in plan]
    assert cost[0] == max(cost)  # the largest batch first
    assert padding_share(plan, LENGTHS) < 0.05  # rows of similar fill share a batch: little tail padding


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
    assert padding_share(grouped, LENGTHS) < 0.05 < padding_share(plain, LENGTHS)


def test_evaluation_order_is_file_order():
    plan = plan_batches([3, 3, 3, 3, 3], packing=False, batch_size=2, max_length=8, shuffle=False)
    assert plan == [[0, 1], [2, 3], [4]]
    packed = plan_batches([5, 4, 3, 8], packing=True, batch_size=2, max_length=9, shuffle=False)
    assert packed == [[[0, 1], [2]], [[3]]]


def test_a_row_over_max_length_is_refused():
    with pytest.raises(LorakitError, match="a row of 128 tokens exceeds max_length 100"):
        plan_batches(LENGTHS, packing=True, batch_size=1, max_length=100)


@pytest.mark.parametrize("setting, attention, device, packed, flat_row", [
    ("auto", "sdpa", "cpu", False, False),
    ("auto", "eager", "cpu", False, False),
    ("auto", "sdpa", "cuda", False, False),  # SDPA with a mask computes every pair of a packed row
    ("auto", "flash_attention_2", "cuda", True, True),  # the varlen kernel skips across examples
    (True, "sdpa", "cpu", True, False),  # asked for: (B, L) rows with a block-causal mask
    (True, "flash_attention_2", "cuda", True, True),
    (False, "flash_attention_2", "cuda", False, False),
])
def test_choose_batching(setting, attention, device, packed, flat_row):
    choice = choose_batching(setting, attention, device)
    assert (choice.packed, choice.flat) == (packed, flat_row)


def test_the_batching_line_says_what_and_why():
    line = choose_batching("auto", "sdpa", "cpu").describe(8, 256)
    assert line.startswith("batching: padded, length-grouped (data.packing: auto; sdpa attention on cpu ")
    line = choose_batching(True, "sdpa", "cpu").describe(8, 256)
    assert line.startswith("batching: packed, 8 rows of up to 256 tokens per batch, each example with its own "
                           "positions and a block-causal mask (data.packing: true;")
    assert "padded, in random order" in choose_batching(False, "sdpa", "cpu").describe(8, 256, group_by_length=False)


def test_split_batch_into_micro_batches_of_at_most_max_tokens():
    lengths = np.array([250, 240, 100, 90, 80, 70, 60, 50])
    padded = list(range(8))
    pieces = split_batch(padded, lengths, 1024)
    assert pieces == [[0, 1, 2, 3], [4, 5, 6, 7]]  # widest first: 4 × 250 and 4 × 80 tensor tokens
    assert all(len(p) * max(lengths[p]) <= 1024 for p in pieces)
    assert split_batch(padded, lengths, None) == [padded]  # no limit: the batch as it is
    assert split_batch([7, 0], lengths, 100) == [[0], [7]]  # a row wider than the limit still runs, alone
    packed = [[0], [1, 2], [3, 4, 5]]  # packed rows of 250, 340 and 240 tokens
    assert split_batch(packed, lengths, 700) == [[[1, 2], [0]], [[3, 4, 5]]]
    assert sorted(rows_of_plan(split_batch(packed, lengths, 700))) == list(range(6))  # every row once


def test_micro_batches_are_limited_on_the_cpu_only_by_default():
    assert micro_batch_tokens("auto", "cpu") == 1024
    assert micro_batch_tokens("auto", "cuda") is None
    assert micro_batch_tokens(512, "cuda") == 512 and micro_batch_tokens(None, "cpu") is None
