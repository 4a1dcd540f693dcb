"""Packed batches train exactly like unpacked rows (tiny Llama and Qwen2, fp32); the batch contract."""

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


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("block_mask", [False, True], ids=["position_ids", "block_mask"])
def test_packed_loss_equals_unpacked(arch, block_mask):
    model = make_tiny(arch)
    rows = make_rows()
    batch = collate_packed(rows, block_mask=block_mask)
    expected_tokens, expected_mean = unpacked(model, rows)
    torch.testing.assert_close(token_losses(model, batch), expected_tokens, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        loss = model(**batch, use_cache=False).loss  # HF's mean over all targets of the packed row
    torch.testing.assert_close(loss, expected_mean, atol=1e-5, rtol=1e-5)
    assert num_label_tokens(batch) == len(expected_tokens) == sum(n - n // 2 for n in LENGTHS)


def test_without_row_boundaries_the_loss_differs():
    # The same packed tokens with one running position sequence let rows attend to each other:
    # proof that the test above can fail.
    model = make_tiny("llama")
    rows = make_rows()
    batch = collate_packed(rows)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
    assert not torch.allclose(token_losses(model, batch), unpacked(model, rows)[0], atol=1e-3)


def test_padded_batch_loss_equals_unpacked():
    model = make_tiny("qwen2")
    rows = make_rows(1)
    batch = collate_padded(rows, pad_token_id=0)
    torch.testing.assert_close(token_losses(model, batch), unpacked(model, rows)[0], atol=1e-5, rtol=1e-5)


def test_packed_batch_contract():
    rows = make_rows()
    batch = collate_packed(rows, pad_to_multiple_of=8)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    total = sum(LENGTHS)  # 31 -> padded to 32
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, 32)
    assert all(t.dtype == torch.int64 for t in batch.values())
    positions = batch["position_ids"][0].tolist()
    assert positions == [*range(7), *range(12), *range(3), *range(9), 0]
    starts = [0, 7, 19, 22, 31]
    assert all(batch["labels"][0, s] == -100 for s in starts)  # never learn across a row boundary
    ids = np.concatenate([r[0] for r in rows])
    assert batch["input_ids"][0, :total].tolist() == ids.tolist() and batch["input_ids"][0, total] == 0
    expected = np.concatenate([np.where(np.arange(n) < n // 2, -100, r[0]) for n, r in zip(LENGTHS, rows)])
    assert batch["labels"][0, :total].tolist() == expected.tolist()


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
