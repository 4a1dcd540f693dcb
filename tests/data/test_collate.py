"""Packed (B, L) batches train exactly like unpacked rows (tiny Llama, Qwen2, GPT-2, fp32); no example sees
another; the batch contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny

from lorakit.data.collation import block_diagonal_mask, collate_packed, collate_padded, num_label_tokens

LENGTHS = (7, 12, 3, 9)


def make_rows(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rows of random ids (vocab 96) with the first half of each masked, like a prompt."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in LENGTHS:
        ids = rng.integers(0, 96, n)
        labels = ids.copy()
        labels[: n // 2] = -100
        rows.append((ids, labels))
    return rows


def token_losses(model, batch) -> torch.Tensor:
    """Per-target cross-entropy, (targets,), in the model's own shift convention."""
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits  # (B, T, vocab)
    labels = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="none",
                                               ignore_index=-100)
    return losses[labels.flatten() != -100]


def unpacked(model, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses of each row run alone, concatenated; and the mean of HF's own loss."""
    per_token, sums, count = [], 0.0, 0
    for ids, labels in rows:
        batch = {"input_ids": torch.as_tensor(ids)[None], "labels": torch.as_tensor(labels)[None]}
        losses = token_losses(model, batch)
        per_token.append(losses)
        sums += float(losses.sum())
        count += len(losses)
    return torch.cat(per_token), torch.tensor(sums / count)


PACKED_ROWS = ((0, 1), (2, 3))  # two packed rows of two examples each: 19 and 12 tokens


def packed_rows(rows):
    return [[rows[i] for i in row] for row in PACKED_ROWS]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("block_mask", [False, True], ids=["position_ids", "block_mask"])
def test_packed_loss_equals_unpacked(arch, block_mask):
    model = make_tiny(arch)
    rows = make_rows()
    batch = collate_packed(packed_rows(rows), block_mask=block_mask)
    assert batch["input_ids"].shape == (2, 19)  # (B, L): the rows, padded to the fullest one
    expected_tokens, expected_mean = unpacked(model, rows)
    torch.testing.assert_close(token_losses(model, batch), expected_tokens, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        loss = model(**batch, use_cache=False).loss  # HF's mean over all targets of the packed batch
    torch.testing.assert_close(loss, expected_mean, atol=1e-5, rtol=1e-5)
    assert num_label_tokens(batch) == len(expected_tokens) == sum(n - n // 2 for n in LENGTHS)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_packed_gradients_equal_unpacked(arch):
    model = make_tiny(arch)
    rows = make_rows(2)
    model.zero_grad()
    model(**collate_packed(packed_rows(rows)), use_cache=False).loss.backward()
    packed = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    sums, count = 0.0, 0
    for ids, labels in rows:  # the mean over every target of the rows, each row run alone
        logits = model(input_ids=torch.as_tensor(ids)[None], use_cache=False).logits[0, :-1]
        targets = torch.as_tensor(labels)[1:]
        sums = sums + torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
    (sums / count).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_attention_never_crosses_packed_examples(arch):
    # Change the tokens of one packed example: the logits of every other example, in its own packed
    # row and in the other row, stay the same; its own change (proof the test can fail).
    model = make_tiny(arch)
    rows = make_rows(3)
    changed = list(rows)
    ids, labels = rows[1]
    changed[1] = ((ids + 1) % 96, labels)
    with torch.no_grad():
        before = model(**collate_packed(packed_rows(rows)), use_cache=False).logits
        after = model(**collate_packed(packed_rows(changed)), use_cache=False).logits
    # Example 1 is row 0, tokens 7…18 (after example 0's 7 tokens).
    others = torch.ones(before.shape[:2], dtype=torch.bool)
    others[0, 7:19] = False
    torch.testing.assert_close(after[others], before[others], atol=1e-6, rtol=0)
    assert (after[0, 7:19] - before[0, 7:19]).abs().max() > 1e-2


def test_without_example_boundaries_the_loss_differs():
    # The same packed tokens with one running position sequence let examples attend to each other:
    # proof that the tests above can fail.
    model = make_tiny("llama")
    rows = make_rows()
    batch = collate_packed(packed_rows(rows))
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand(2, -1)
    assert not torch.allclose(token_losses(model, batch), unpacked(model, rows)[0], atol=1e-3)


def test_flat_packing_is_one_row_without_padding():
    rows = make_rows()
    batch = collate_packed(packed_rows(rows), flat=True)
    assert batch["input_ids"].shape == (1, sum(LENGTHS))
    assert batch["position_ids"][0].tolist() == [*range(7), *range(12), *range(3), *range(9)]
    model = make_tiny("qwen2")
    torch.testing.assert_close(token_losses(model, batch), unpacked(model, rows)[0], atol=1e-5, rtol=1e-5)


def test_padded_batch_loss_equals_unpacked():
    model = make_tiny("qwen2")
    rows = make_rows(1)
    batch = collate_padded(rows, pad_token_id=0)
    torch.testing.assert_close(token_losses(model, batch), unpacked(model, rows)[0], atol=1e-5, rtol=1e-5)


def test_packed_batch_contract():
    rows = make_rows()
    batch = collate_packed(packed_rows(rows), pad_to_multiple_of=8)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (2, 24)
    assert all(t.dtype == torch.int64 for t in batch.values())
    # Row 0: examples of 7 and 12 tokens, then a 5-token tail; row 1: 3 and 9, then a 12-token tail.
    assert batch["position_ids"][0].tolist() == [*range(7), *range(12), *range(5)]
    assert batch["position_ids"][1].tolist() == [*range(3), *range(9), *range(12)]
    assert batch["labels"][0, 0] == batch["labels"][0, 7] == batch["labels"][1, 0] == batch["labels"][1, 3] == -100
    for r, (a, b) in enumerate(PACKED_ROWS):  # never learn across an example boundary
        ids = np.concatenate([rows[a][0], rows[b][0]])
        assert batch["input_ids"][r, :len(ids)].tolist() == ids.tolist()
        assert (batch["input_ids"][r, len(ids):] == 0).all() and (batch["labels"][r, len(ids):] == -100).all()
        expected = np.concatenate([np.where(np.arange(LENGTHS[i]) < LENGTHS[i] // 2, -100, rows[i][0]) for i in (a, b)])
        assert batch["labels"][r, :len(ids)].tolist() == expected.tolist()


def test_padded_batch_contract():
    rows = make_rows()
    batch = collate_padded(rows, pad_token_id=5)
    assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask"}
    assert batch["input_ids"].shape == (4, 12)
    assert batch["attention_mask"].sum(1).tolist() == list(LENGTHS)
    assert batch["input_ids"][2].tolist() == rows[2][0].tolist() + [5] * 9
    assert batch["labels"][2].tolist() == rows[2][1].tolist() + [-100] * 9
    assert batch["position_ids"][0].tolist() == list(range(12))


def test_block_diagonal_mask_values():
    mask = block_diagonal_mask([2, 3])
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [0, 0, 1, 0, 0],
                       [0, 0, 1, 1, 0],
                       [0, 0, 1, 1, 1]]
    assert mask.min() == torch.finfo(torch.float32).min
