"""The batched LoRA layer: every row with its own adapter == the plain per-row LoRA formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.serve.layers import NO_ADAPTER, BatchedLoraLinear, LoraBatch, SlotContext


def make_layer(num_slots=4, max_rank=8, in_f=12, out_f=10, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f)
    context = SlotContext()
    layer = BatchedLoraLinear(base, num_slots, max_rank, context, in_f, out_f, torch.float32)
    adapters = {}
    for slot, (r, s) in enumerate([(2, 4.0), (8, 0.5), (5, 2.0)]):
        A, B = torch.randn(r, in_f), torch.randn(out_f, r)
        layer.write_slot(slot, A, B, s)
        adapters[slot] = (A, B, s)
    return layer, context, adapters


def reference(layer, x, row_slots, adapters):
    rows = []
    for i, slot in enumerate(row_slots):
        y = layer.base_layer(x[i])
        if slot != NO_ADAPTER:
            A, B, s = adapters[slot]
            y = y + s * (x[i] @ A.T) @ B.T
        rows.append(y)
    return torch.stack(rows)


def test_plan_groups_rows_by_slot():
    plan = LoraBatch.build([5, NO_ADAPTER, 0, 5, 0, 5], ranks=[3, 0, 0, 0, 0, 7], num_slots=6)
    assert plan.slots.tolist() == [0, 5] and plan.first is None  # slots 0 and 5: gathered
    assert plan.groups == 3 and plan.rank == 7
    # slot 0 takes rows 2, 4 and one padding position (row 0, zeroed); slot 5 takes rows 0, 3, 5
    assert plan.gather.tolist() == [2, 4, 0, 0, 3, 5] and plan.pads.tolist() == [2]
    # row 1 has no adapter: it reads the zero row at U·G = 6
    assert plan.scatter.tolist() == [3, 6, 0, 4, 1, 5]
    assert not plan.uniform
    # slots 0 and 2 lie in a short range: groups over 0, 1, 2 (slot 1's group is empty), no gather
    plan = LoraBatch.build([2, 0, 2], ranks=[3, 0, 7], num_slots=3)
    assert plan.first == 0 and plan.slots.tolist() == [0, 1, 2]
    assert plan.gather.tolist() == [1, 0, 0, 0, 0, 2] and plan.pads.tolist() == [1, 2, 3]
    assert plan.scatter.tolist() == [4, 0, 5]
    assert LoraBatch.build([NO_ADAPTER, NO_ADAPTER], ranks=[1], num_slots=1) is None
    assert LoraBatch.build([1, 1], ranks=[2, 4], num_slots=2).uniform


@pytest.mark.parametrize("strategy", ["grouped", "gather"])
@pytest.mark.parametrize("row_slots", [[0, 1, NO_ADAPTER, 2, 1, 0], [1, 1, 1], [2, 0, 1], [NO_ADAPTER, 2],
                                       [0, 7, NO_ADAPTER, 7], [2, 0, 0, NO_ADAPTER]])
def test_mixed_rows_match_per_row_formula(strategy, row_slots):
    layer, context, adapters = make_layer(num_slots=8)
    layer.write_slot(7, *adapters[1][:2], adapters[1][2])  # a copy of slot 1 far away: gathered
    adapters[7] = adapters[1]
    x = torch.randn(len(row_slots), 5, 12)
    context.plan = LoraBatch.build(row_slots, ranks=[2, 8, 5, 0, 0, 0, 0, 8], num_slots=8, strategy=strategy)
    expected = reference(layer, x, row_slots, adapters)
    with torch.no_grad():  # the in-place path (the engine runs in inference mode)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)  # out of place (autograd on)


def test_rank_cut_to_largest_in_use_is_exact():
    layer, context, adapters = make_layer()
    x = torch.randn(3, 2, 12)
    context.plan = LoraBatch.build([0, 2, 0], ranks=[2, 8, 5, 0], num_slots=4)
    assert context.plan.rank == 5  # slot 1 (r=8) is not in the batch
    torch.testing.assert_close(layer(x), reference(layer, x, [0, 2, 0], adapters), rtol=1e-5, atol=1e-5)


def test_no_plan_is_the_base_layer_exactly():
    layer, context, _ = make_layer()
    x = torch.randn(2, 3, 12)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_empty_slot_and_rewrite():
    layer, context, adapters = make_layer()
    layer.write_slot(1, None, None, 0.0)  # adapter 1 does not adapt this layer
    assert layer.lora_A[1].abs().sum() == 0 and layer.lora_Bt[1].abs().sum() == 0
    x = torch.randn(2, 1, 12)
    context.plan = LoraBatch.build([1, 0], ranks=[2, 8, 5, 0], num_slots=4)
    expected = reference(layer, x, [NO_ADAPTER, 0], adapters)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_conv1d_base():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(10, 12)  # nf=out, nx=in; weight (in, out)
    context = SlotContext()
    layer = BatchedLoraLinear(base, 2, 4, context, 12, 10, torch.float32)
    A, B = torch.randn(3, 12), torch.randn(10, 3)
    layer.write_slot(1, A, B, 2.0)
    x = torch.randn(2, 4, 12)
    context.plan = LoraBatch.build([1, NO_ADAPTER], ranks=[0, 3], num_slots=2)
    got = layer(x)
    torch.testing.assert_close(got[0], base(x[0]) + 2.0 * (x[0] @ A.T) @ B.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], base(x[1]), rtol=1e-6, atol=1e-6)


def dora_reference(layer, x, row_slots, adapters, scales):
    """Per row: ``c ⊙ (W x + s·B A x) + b`` for a DoRA slot (``scales``), the LoRA formula otherwise."""
    weight, bias = layer.base_layer.weight, layer.base_layer.bias
    rows = []
    for i, slot in enumerate(row_slots):
        if slot in scales:
            A, B, s = adapters[slot]
            rows.append(scales[slot] * (x[i] @ weight.T + s * (x[i] @ A.T) @ B.T) + bias)
        else:
            rows.append(reference(layer, x[i:i + 1], [slot], adapters)[0])
    return torch.stack(rows)


@pytest.mark.parametrize("strategy", ["grouped", "gather"])
@pytest.mark.parametrize("row_slots", [[0, 1, NO_ADAPTER, 2, 1], [1, 1], [NO_ADAPTER, 1, 0], [2, 0, 0, NO_ADAPTER]])
def test_dora_rows_are_scaled_per_feature(strategy, row_slots):
    """Slot 1 holds a DoRA adapter: its rows get c ⊙ (W x + update) + b; plain-LoRA and base rows in
    the same batch are unchanged."""
    layer, context, adapters = make_layer()
    scale = 0.5 + torch.rand(10)
    layer.write_slot(1, *adapters[1][:2], adapters[1][2], scale=scale)
    assert layer.dora_slots == {1} and layer.lora_scale.shape == (5, 10)
    x = torch.randn(len(row_slots), 5, 12)
    context.plan = LoraBatch.build(row_slots, ranks=[2, 8, 5, 0], num_slots=4, strategy=strategy)
    expected = dora_reference(layer, x, row_slots, adapters, {1: scale})
    with torch.no_grad():  # in place, as the engine runs
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    context.plan = LoraBatch.build(row_slots, ranks=[2, 8, 5, 0], num_slots=4, strategy=strategy)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)  # out of place (autograd on)


def test_dora_slot_rewritten_as_plain_lora_and_batches_without_dora():
    layer, context, adapters = make_layer()
    layer.write_slot(1, *adapters[1][:2], adapters[1][2], scale=torch.full((10,), 2.0))
    x = torch.randn(2, 3, 12)
    context.plan = LoraBatch.build([0, 2], ranks=[2, 8, 5, 0], num_slots=4)  # no DoRA row: the plain path
    torch.testing.assert_close(layer(x), reference(layer, x, [0, 2], adapters), rtol=1e-5, atol=1e-5)
    layer.write_slot(1, *adapters[1][:2], adapters[1][2])  # a plain adapter takes the slot
    assert layer.dora_slots == set() and torch.equal(layer.lora_scale[1], torch.ones(10))
    context.plan = LoraBatch.build([1, 0], ranks=[2, 8, 5, 0], num_slots=4)
    torch.testing.assert_close(layer(x), reference(layer, x, [1, 0], adapters), rtol=1e-5, atol=1e-5)
    layer.write_slot(1, None, None, 0.0, scale=torch.full((10,), 3.0))  # DoRA adapter skipping the layer
    torch.testing.assert_close(layer(x), reference(layer, x, [NO_ADAPTER, 0], adapters), rtol=1e-5, atol=1e-5)


def test_dora_on_conv1d_base():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(10, 12)  # weight (in, out)
    context = SlotContext()
    layer = BatchedLoraLinear(base, 2, 4, context, 12, 10, torch.float32)
    A, B, scale = torch.randn(3, 12), torch.randn(10, 3), 0.5 + torch.rand(10)
    layer.write_slot(1, A, B, 2.0, scale=scale)
    x = torch.randn(2, 4, 12)
    context.plan = LoraBatch.build([1, NO_ADAPTER], ranks=[0, 3], num_slots=2)
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got[0], scale * (x[0] @ base.weight + 2.0 * (x[0] @ A.T) @ B.T) + base.bias,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], base(x[1]), rtol=1e-6, atol=1e-6)


def test_dora_scale_stays_fp32_over_a_bf16_base():
    """c is close to 1: in bf16 its deviation would round to steps of 1/128; the table is fp32 and
    the product is rounded once, into the bf16 output."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10).to(torch.bfloat16)
    context = SlotContext()
    layer = BatchedLoraLinear(base, 2, 4, context, 12, 10, torch.bfloat16)
    A, B, scale = torch.randn(3, 12), torch.randn(10, 3), 1 + 0.002 * torch.randn(10)
    layer.write_slot(0, A, B, 2.0, scale=scale)
    assert layer.lora_scale.dtype == torch.float32 and torch.equal(layer.lora_scale[0], scale)
    x = torch.randn(2, 4, 12, dtype=torch.bfloat16)
    context.plan = LoraBatch.build([0, NO_ADAPTER], ranks=[3, 0], num_slots=2)
    with torch.no_grad():
        got = layer(x)
        u = (x[0] @ base.weight.T).float() + 2.0 * (x[0].float() @ A.T) @ B.T
        want = scale * u + base.bias.float()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got[0].float(), want, rtol=2e-2, atol=1e-1)  # bf16 slots and products
    torch.testing.assert_close(got[1], base(x[1]), rtol=2e-2, atol=1e-2)  # bias added after, in bf16


@pytest.mark.parametrize("row_slots", [[0, 1, NO_ADAPTER], [2, 2], [NO_ADAPTER, 0]])
def test_one_position_per_row_keeps_the_input_shape(row_slots):
    """(B, in) in, (B, out) out, as the engine's head over each row's last position calls it."""
    layer, context, adapters = make_layer()
    x = torch.randn(len(row_slots), 12)
    context.plan = LoraBatch.build(row_slots, ranks=[2, 8, 5, 0], num_slots=4)
    expected = reference(layer, x[:, None], row_slots, adapters)[:, 0]
    with torch.no_grad():
        got = layer(x)
    assert got.shape == (len(row_slots), 10)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_layers_no_adapter_of_the_batch_adapts_run_the_base_alone():
    layer, context, _ = make_layer(num_slots=4)
    layer.write_slot(3, None, None, 1.0)  # slot 3's adapter skips this layer
    assert layer.filled == {0, 1, 2}
    x = torch.randn(2, 3, 12)
    context.plan = LoraBatch.build([3, 3], ranks=[2, 8, 5, 4], num_slots=4)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)


def test_lazy_tables_appear_at_the_first_write():
    base = nn.Linear(6, 50)
    layer = BatchedLoraLinear(base, 2, 4, SlotContext(), 6, 50, torch.float32, lazy=True)
    assert layer.lora_A is None and layer.lora_Bt is None
    layer.write_slot(0, None, None, 1.0)
    assert layer.lora_A is None  # an adapter that skips the layer allocates nothing
    A, B = torch.randn(3, 6), torch.randn(50, 3)
    layer.write_slot(1, A, B, 2.0)
    assert layer.lora_A.shape == (2, 4, 6) and layer.filled == {1}
    layer.context.plan = LoraBatch.build([1, NO_ADAPTER], ranks=[0, 3], num_slots=2)
    x = torch.randn(2, 6)
    expected = torch.stack([base(x[0]) + 2.0 * (x[0] @ A.T) @ B.T, base(x[1])])
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_embedding_rows_match_per_row_formula():
    from lorakit.serve.embedding import BatchedLoraEmbedding

    torch.manual_seed(0)
    base = nn.Embedding(30, 8)
    context = SlotContext()
    layer = BatchedLoraEmbedding(base, 3, 4, context, torch.float32)
    assert layer.lora_At is None  # nothing allocated before an embedding adapter arrives
    adapters = {}
    for slot, (r, s) in enumerate([(2, 3.0), (4, 0.5)]):
        A, B = torch.randn(r, 30), torch.randn(8, r)  # PEFT's lora_embedding_A (r, vocab), _B (dim, r)
        layer.write_slot(slot, A, B, s)
        adapters[slot] = (A, B, s)
    ids = torch.randint(0, 30, (4, 5))
    row_slots = [1, NO_ADAPTER, 0, 1]
    context.plan = LoraBatch.build(row_slots, ranks=[2, 4, 0], num_slots=3)
    expected = []
    for row, slot in zip(ids, row_slots):
        y = base(row)
        if slot != NO_ADAPTER:
            A, B, s = adapters[slot]
            y = y + s * A.T[row] @ B.T
        expected.append(y)
    torch.testing.assert_close(layer(ids), torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert layer.num_embeddings == 30 and layer.weight is base.weight
