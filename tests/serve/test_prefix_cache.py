"""The prefix cache: the radix tree itself (match to the token, split, exact byte count, LRU eviction,
per adapter version), and the engine with it == the engine without it (tokens and logprobs), with
shared starts computed once per adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny
from serve.serve_helpers import WordTokenizer, save_random_adapter

from lorakit.serve import Engine, SamplingParams
from lorakit.serve.prefix_cache import PrefixCache
from lorakit.serve.scheduling import SHARE_MIN_TOKENS

LAYERS, HEADS, DIM, WIDTH = 2, 2, 3, 4


def states(tokens: list[int]):
    """Fake per-token keys/values and hidden states that encode the token and its position."""
    t = torch.tensor(tokens, dtype=torch.float32)
    pos = torch.arange(len(tokens), dtype=torch.float32)
    kv = [(torch.stack([t + 100 * layer + pos / 100] * HEADS)[:, :, None].expand(HEADS, len(tokens), DIM).clone(),
           torch.stack([-t - 100 * layer] * HEADS)[:, :, None].expand(HEADS, len(tokens), DIM).clone())
          for layer in range(LAYERS)]
    return kv, t[:, None].expand(len(tokens), WIDTH).clone()


def per_token_bytes() -> int:
    return 4 * (LAYERS * 2 * HEADS * DIM + WIDTH)


def insert(cache, key, tokens, start=0):
    kv, hidden = states(tokens)
    cache.insert(key, tokens, start, [(k[:, start:], v[:, start:]) for k, v in kv], hidden[start:])


def test_match_split_and_past_to_the_token():
    cache = PrefixCache(1 << 20)
    first = [1, 2, 3, 4, 5, 6]
    insert(cache, 7, first)
    assert cache.match(7, [1, 2, 3, 9]).length == 3  # inside a node: to the token, not to a block
    assert cache.match(8, first).length == 0  # another adapter version shares nothing
    assert cache.match(7, first, limit=5).length == 5
    second = [1, 2, 3, 9, 9]
    insert(cache, 7, second, start=3)  # the first 3 tokens were cached: only the rest is given
    assert cache.nbytes == (len(first) + 2) * per_token_bytes()  # the shared 3 tokens are held once
    for tokens in (first, second):
        found = cache.match(7, tokens)
        assert found.length == len(tokens)
        kv, hidden = cache.past(found)
        want_kv, want_hidden = states(tokens)
        for (k, v), (wk, wv) in zip(kv, want_kv):
            assert torch.equal(k, wk) and torch.equal(v, wv)
        assert torch.equal(hidden, want_hidden)
    insert(cache, 7, [1, 2])  # a prefix of what is there: nothing new
    assert cache.nbytes == (len(first) + 2) * per_token_bytes()
    stats = cache.stats()
    cache.match(7, first, count=False)
    assert cache.stats() == stats  # a look for scheduling counts nothing


def test_lru_eviction_keeps_the_shared_and_the_recent():
    size = per_token_bytes()
    cache = PrefixCache(10 * size)
    insert(cache, 1, [1, 2, 3, 4, 5])
    insert(cache, 1, [1, 2, 3, 7, 7], start=3)  # 7 tokens held
    cache.match(1, [1, 2, 3, 4, 5])  # the first continuation is now the more recent
    insert(cache, 2, [9, 9, 9, 9])  # 11 > 10: the least recent leaf ([7, 7]) goes
    assert cache.nbytes == 9 * size
    assert cache.match(1, [1, 2, 3, 7, 7]).length == 3 and cache.match(1, [1, 2, 3, 4, 5]).length == 5
    cache.drop(1)
    assert cache.nbytes == 4 * size and cache.match(1, [1, 2, 3]).length == 0
    insert(cache, 3, list(range(20)))  # larger than the whole budget: kept nowhere, counted right
    assert cache.nbytes <= 10 * size
    assert PrefixCache(0).match(1, [1]).length == 0


# -- the engine ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = make_tiny("llama")
    base.config.eos_token_id = base.generation_config.eos_token_id = None
    root = tmp_path_factory.mktemp("adapters")
    folders = {"a": save_random_adapter(base, root / "a", r=4, seed=1),
               "b": save_random_adapter(base, root / "b", r=2, seed=2, targets=["q_proj", "lm_head"])}
    return base, folders


def engine_for(setup, **kwargs) -> Engine:
    base, folders = setup
    engine = Engine(copy.deepcopy(base), WordTokenizer(), max_resident=2, max_rank=8, **kwargs)
    for name, folder in folders.items():
        engine.load_adapter(name, folder)
    return engine


def multiple_choice(seed: int, context: int = 24) -> list[list[int]]:
    """One question's requests: a shared context and four continuations of 1–4 tokens."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(1, 96, (context,), generator=g).tolist()
    return [shared + torch.randint(1, 96, (n,), generator=g).tolist() for n in (3, 1, 4, 2)]


def run(engine, requests, params):
    """Submit all, then step by hand; returns the completions and each step's prefill size."""
    handles = [engine.submit(prompt_ids=p, adapter=a, params=params) for p, a in requests]
    sizes = []
    while engine.has_work():
        before = engine.stats()["waiting"]
        engine.step()
        sizes.append(before - engine.stats()["waiting"])
    return [h.result() for h in handles], sizes


def test_engine_with_the_cache_equals_without_it(setup):
    """Two questions × four choices × (base, a, b), with prompt logprobs and a few greedy tokens: the
    same tokens and logprobs (1e-5) as an engine without the cache, and each context computed once
    per adapter."""
    requests = [(p, a) for seed in (1, 2) for a in (None, "a", "b") for p in multiple_choice(seed)]
    params = SamplingParams(max_tokens=3, temperature=0, logprobs=2, prompt_logprobs=2)
    cached, sizes = run(engine_for(setup), requests, params)
    plain, _ = run(engine_for(setup, prefix_cache_bytes=0), requests, params)
    for ours, theirs in zip(cached, plain):
        assert ours.token_ids == theirs.token_ids
        got = [e.logprob for e in ours.prompt_logprobs[1:] + ours.logprobs]
        want = [e.logprob for e in theirs.prompt_logprobs[1:] + theirs.logprobs]
        assert got == pytest.approx(want, abs=1e-5)
    engine = engine_for(setup)
    run(engine, requests, params)
    stats = engine.stats()["prefix_cache"]
    # Each of the 6 (question, adapter) contexts is computed once; the other 3 choices reuse its 24 tokens.
    assert stats["hit_tokens"] >= 6 * 3 * 24
    assert sizes[0] == 6  # the first step prefills one choice per (question, adapter); the rest wait a step
    assert SHARE_MIN_TOKENS <= 24


def test_a_common_system_prompt_is_computed_once_per_adapter(setup):
    engine = engine_for(setup)
    system = list(range(40, 70))  # 30 tokens
    params = SamplingParams(max_tokens=2, temperature=0)
    requests = [(system + [i, i + 1], a) for i in range(1, 6) for a in (None, "a")]
    done, _ = run(engine, requests, params)
    stats = engine.stats()["prefix_cache"]
    assert stats["hit_tokens"] >= 2 * 4 * 30  # per adapter: the first computes it, four reuse it
    alone = [engine_for(setup, prefix_cache_bytes=0).submit(prompt_ids=p, adapter=a, params=params).result()
             for p, a in requests[:2]]
    assert [d.token_ids for d in done[:2]] == [d.token_ids for d in alone]


def test_reloaded_adapters_do_not_reuse_old_prefixes(setup, tmp_path):
    base, folders = setup
    engine = engine_for(setup)
    prompt = list(range(1, 30))
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0)
    engine.submit(prompt_ids=prompt, adapter="a", params=params).result()
    other = save_random_adapter(base, tmp_path / "other", r=4, seed=11)
    engine.load_adapter("a", other, replace=True)  # same name, other weights
    hits = engine.stats()["prefix_cache"]["hit_tokens"]
    after = engine.submit(prompt_ids=prompt, adapter="a", params=params).result()
    assert engine.stats()["prefix_cache"]["hit_tokens"] == hits  # a new version: nothing reused
    fresh = engine_for(setup, prefix_cache_bytes=0)
    fresh.load_adapter("a", other, replace=True)
    expected = fresh.submit(prompt_ids=prompt, adapter="a", params=params).result()
    assert [e.logprob for e in after.prompt_logprobs[1:]] == pytest.approx(
        [e.logprob for e in expected.prompt_logprobs[1:]], abs=1e-5)
    engine.unload_adapter("a")
    engine.step()  # the engine's loop drops the unloaded version's prefixes
    assert all(key in (0, engine.registry.version("b")) for key in engine.prefix_cache._roots)
