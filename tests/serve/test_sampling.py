"""Sampling: greedy, top-k, top-p, temperature and per-row seeds, against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.serve.sampling import SamplingParams, sample


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_greedy_is_argmax_per_row():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample(logits, [SamplingParams(temperature=0)] * 2, [None, None]) == [1, 0]


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6),
              SamplingParams(temperature=0.7, top_k=1, top_p=0.5), SamplingParams(temperature=0)]
    assert sample(logits, params, gens(4)) == logits.argmax(-1).tolist()


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen_k, seen_p = set(), set()
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        seen_k.add(sample(logits, [SamplingParams(top_k=2)], [g])[0])
        seen_p.add(sample(logits, [SamplingParams(top_p=0.8)], [g])[0])  # 0.5 + 0.3 reaches 0.8
    assert seen_k == {0, 1}
    assert seen_p == {0, 1}


def test_temperature_frequencies_follow_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sample(logits, [SamplingParams(temperature=2.0)], [g])[0]] += 1
    expected = torch.softmax(logits[0] / 2.0, -1)
    assert torch.allclose(counts / 3000, expected, atol=0.03), (counts / 3000, expected)


def test_each_row_uses_its_own_generator():
    logits = torch.zeros(3, 1000)
    params = [SamplingParams(seed=5)] * 3
    a = sample(logits, params, [torch.Generator().manual_seed(5) for _ in range(3)])
    assert a[0] == a[1] == a[2]  # same seed, same draw, whatever the row
    b = sample(logits, params, gens(3, seed=100))
    assert len(set(b)) > 1


def test_parameters_are_checked():
    for kwargs, field in [(dict(temperature=-1), "temperature"), (dict(top_k=-2), "top_k"), (dict(top_p=1.5), "top_p"),
                          (dict(stop=[""]), "stop"), (dict(seed="x"), "seed"), (dict(max_tokens=True), "max_tokens"),
                          (dict(stop_token_ids=["a"]), "stop_token_ids")]:
        with pytest.raises(LorakitError, match=field):
            SamplingParams(**kwargs)
    assert SamplingParams(stop="###").stop == ["###"]
