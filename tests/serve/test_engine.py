"""The engine on tiny random models: mixed batches == each request alone with its adapter merged,
continuous batching, sampling, stop strings, streaming, limits, cancellation, hot load/unload."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from conftest import make_tiny
from serve.serve_helpers import WordTokenizer, greedy_reference, merged_copy, save_random_adapter

from lorakit.errors import LorakitError
from lorakit.serve import AdapterNotFoundError, ContextLengthExceededError, Engine, SamplingParams

GREEDY = dict(temperature=0)


def _targets(arch: str, attention_only: bool):
    if not attention_only:
        return "all-linear"
    return ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request, tmp_path_factory):
    """A tiny base (no EOS, so lengths are exact) and three adapters: ranks 2, 8, 4 (rsLoRA),
    one of them on the attention projections only."""
    arch = request.param
    base = make_tiny(arch)
    base.config.eos_token_id = base.generation_config.eos_token_id = None
    root = tmp_path_factory.mktemp(f"adapters-{arch}")
    folders = {
        "a": save_random_adapter(base, root / "a", r=2, seed=1),
        "b": save_random_adapter(base, root / "b", r=8, alpha=64, seed=2, targets=_targets(arch, True)),
        "c": save_random_adapter(base, root / "c", r=4, seed=3, use_rslora=True),
    }
    return arch, base, folders


def make_engine(base, folders, **kwargs) -> Engine:
    kwargs = {"max_resident": 4, "max_rank": 8, **kwargs}
    engine = Engine(copy.deepcopy(base), WordTokenizer(), **kwargs)
    for name, folder in folders.items():
        engine.load_adapter(name, folder)
    return engine


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 96, (int(torch.randint(2, 14, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def references(base, folders, requests, max_new):
    merged = {name: merged_copy(base, folders[name] if name else None) for name in {a for _, a in requests}}
    return [greedy_reference(merged[a], p, max_new) for p, a in requests]


def test_mixed_batch_equals_each_request_alone_merged(setup):
    arch, base, folders = setup
    requests = list(zip(prompts(12), [None, "a", "b", "c"] * 3))
    engine = make_engine(base, folders)
    handles = [engine.submit(prompt_ids=p, adapter=a, params=SamplingParams(max_tokens=8, **GREEDY))
               for p, a in requests]
    got = [h.result().token_ids for h in handles]
    expected = references(base, folders, requests, 8)
    assert got == expected
    # Not vacuous: each adapter changes the output of some of its prompts.
    plain = references(base, folders, [(p, None) for p, _ in requests], 8)
    for name in ("a", "b", "c"):
        assert any(g != b for g, b, (_, a) in zip(got, plain, requests) if a == name), name


def test_continuous_batching_join_and_leave(setup):
    """Requests arrive between decode steps and finish at different lengths; each still equals its
    own run alone."""
    arch, base, folders = setup
    engine = make_engine(base, folders, max_batch=5)
    ps = prompts(10, seed=1)
    names = ["c", None, "a", "b", "a", None, "b", "c", "a", "b"]
    lengths = [3, 9, 5, 12, 1, 7, 2, 10, 6, 4]
    handles = []
    for i, (p, a, n) in enumerate(zip(ps, names, lengths)):
        handles.append(engine.submit(prompt_ids=p, adapter=a, params=SamplingParams(max_tokens=n, **GREEDY)))
        for _ in range(i % 3):  # a few decode steps between arrivals
            engine.step()
    while engine.step():
        assert engine.stats()["running"] <= 5
    for handle, p, a, n in zip(handles, ps, names, lengths):
        completion = handle.result()
        assert completion.finish_reason == "length"
        assert completion.token_ids == references(base, folders, [(p, a)], n)[0], (p, a, n)
    assert engine.stats()["cache_length"] == 0


def test_seeded_sampling_is_independent_of_the_batch(setup):
    arch, base, folders = setup
    engine = make_engine(base, folders)
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=20, seed=123)
    p = prompts(1, seed=5)[0]
    alone = engine.submit(prompt_ids=p, adapter="b", params=params).result().token_ids
    crowd = [engine.submit(prompt_ids=q, adapter=a, params=SamplingParams(max_tokens=6, temperature=1.0))
             for q, a in zip(prompts(5, seed=6), ["a", None, "c", "b", "a"])]
    engine.step()
    together = engine.submit(prompt_ids=p, adapter="b", params=params).result().token_ids
    assert alone == together
    other_seed = engine.submit(prompt_ids=p, adapter="b",
                               params=SamplingParams(max_tokens=10, temperature=0.9, seed=7)).result().token_ids
    assert other_seed != alone
    assert all(h.result().finish_reason == "length" for h in crowd)


def test_stop_strings_and_streaming(setup):
    arch, base, folders = setup
    engine = make_engine(base, folders)
    p = prompts(1, seed=2)[0]
    full = engine.submit(prompt_ids=p, adapter="a", params=SamplingParams(max_tokens=10, **GREEDY)).result()
    stop = f" w{full.token_ids[4]}"  # the fifth token's text
    cut = full.text.index(stop)
    events = []
    handle = engine.submit(prompt_ids=p, adapter="a", on_event=events.append,
                           params=SamplingParams(max_tokens=10, stop=[stop, "never"], **GREEDY))
    streamed = list(handle)
    completion = handle.result()
    assert completion.finish_reason == "stop"
    assert completion.text == full.text[:cut]
    assert "".join(e.text for e in streamed) == completion.text  # the stream never shows the stop string
    assert events == streamed and streamed[-1].finished and not any(e.finished for e in streamed[:-1])
    kept = engine.submit(prompt_ids=p, adapter="a", params=SamplingParams(
        max_tokens=10, stop=[stop], include_stop_str_in_output=True, **GREEDY)).result()
    assert kept.text == full.text[:cut] + stop


def test_stop_token_ids_and_eos(setup):
    arch, base, folders = setup
    engine = make_engine(base, folders)
    p = prompts(1, seed=3)[0]
    full = engine.submit(prompt_ids=p, params=SamplingParams(max_tokens=8, **GREEDY)).result()
    stop_id = full.token_ids[3]
    first = full.token_ids.index(stop_id)
    stopped = engine.submit(prompt_ids=p, params=SamplingParams(max_tokens=8, stop_token_ids=[stop_id], **GREEDY)).result()
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == full.token_ids[: first + 1]  # the stop token is kept in the ids…
    assert stopped.text == full.text[: full.text.index(f" w{stop_id}")] or first == 0  # …not in the text
    engine.eos_ids = {stop_id}
    assert engine.submit(prompt_ids=p, params=SamplingParams(max_tokens=8, **GREEDY)).result().token_ids == \
        full.token_ids[: first + 1]
    ignored = engine.submit(prompt_ids=p, params=SamplingParams(max_tokens=8, ignore_eos=True, **GREEDY)).result()
    assert ignored.token_ids == full.token_ids and ignored.finish_reason == "length"
    held = engine.submit(prompt_ids=p, params=SamplingParams(max_tokens=8, min_tokens=8, **GREEDY)).result()
    assert stop_id not in held.token_ids and held.completion_tokens == 8 and held.finish_reason == "length"


def test_context_limit(setup):
    arch, base, folders = setup
    engine = make_engine(base, folders, max_context=20)
    with pytest.raises(ContextLengthExceededError, match="maximum context length is 20"):
        engine.submit(prompt_ids=list(range(1, 16)), params=SamplingParams(max_tokens=6))
    with pytest.raises(ContextLengthExceededError):
        engine.submit(prompt_ids=list(range(1, 21)), params=SamplingParams(max_tokens=None))
    fill = engine.submit(prompt_ids=list(range(1, 16)), adapter="c", params=SamplingParams(max_tokens=None, **GREEDY))
    completion = fill.result()
    assert completion.completion_tokens == 5 and completion.finish_reason == "length"
    assert make_engine(base, {}).max_context == 64  # the model's own limit by default


def test_unknown_adapter_fails_alone(setup):
    arch, base, folders = setup
    engine = make_engine(base, folders)
    with pytest.raises(AdapterNotFoundError, match="no adapter named 'nope'"):
        engine.submit(prompt_ids=[1, 2], adapter="nope")
    ps = prompts(3, seed=4)
    good = [engine.submit(prompt_ids=p, adapter=a, params=SamplingParams(max_tokens=6, **GREEDY))
            for p, a in zip(ps, ["a", "b", None])]
    engine.step()
    doomed = engine.submit(prompt_ids=[5, 6, 7], adapter="c", params=SamplingParams(max_tokens=6))
    engine.unload_adapter("c")  # gone before the request is admitted
    with pytest.raises(AdapterNotFoundError):
        doomed.result()
    assert doomed.completion.finish_reason == "error"
    assert [h.result().token_ids for h in good] == references(base, folders, list(zip(ps, ["a", "b", None])), 6)


def test_cancel_one_request(setup):
    arch, base, folders = setup
    engine = make_engine(base, folders)
    ps = prompts(3, seed=8)
    handles = [engine.submit(prompt_ids=p, adapter=a, params=SamplingParams(max_tokens=10, **GREEDY))
               for p, a in zip(ps, ["a", "b", "c"])]
    events = iter(handles[1])
    next(events), next(events)
    handles[1].cancel()
    rest = list(events)
    assert rest[-1].finish_reason == "cancelled" and handles[1].result().finish_reason == "cancelled"
    assert handles[1].result().completion_tokens < 10
    for i in (0, 2):
        assert handles[i].result().token_ids == references(base, folders, [(ps[i], "abc"[i])], 10)[0]
    waiting = engine.submit(prompt_ids=[1, 2, 3], params=SamplingParams(max_tokens=3))
    waiting.cancel()
    assert waiting.result().finish_reason == "cancelled" and waiting.result().token_ids == []


def test_lru_eviction_and_reload(setup):
    arch, base, folders = setup
    engine = make_engine(base, folders, max_resident=2)
    p = prompts(1, seed=9)[0]
    params = SamplingParams(max_tokens=5, **GREEDY)
    first = {a: engine.submit(prompt_ids=p, adapter=a, params=params).result().token_ids for a in ("a", "b")}
    assert engine.registry.resident() == ["a", "b"]
    engine.submit(prompt_ids=p, adapter="a", params=params).result()  # a is now the most recent
    engine.submit(prompt_ids=p, adapter="c", params=params).result()  # evicts b, the least recent
    assert engine.registry.resident() == ["a", "c"]
    assert engine.submit(prompt_ids=p, adapter="b", params=params).result().token_ids == first["b"]
    assert engine.registry.resident() == ["c", "b"]
    # Three adapters in one batch with two slots: the third waits for a slot, then runs, correctly.
    requests = list(zip(prompts(3, seed=10), ["a", "b", "c"]))
    handles = [engine.submit(prompt_ids=q, adapter=a, params=params) for q, a in requests]
    assert [h.result().token_ids for h in handles] == references(base, folders, requests, 5)


def test_hot_load_and_unload_under_load(setup, tmp_path):
    """With the engine running in its thread: load an adapter and use it while others decode;
    unload one while its request runs (that request finishes correctly, new ones fail)."""
    arch, base, folders = setup
    extra = save_random_adapter(base, tmp_path / "d", r=6, seed=4)
    engine = make_engine(base, {"a": folders["a"], "b": folders["b"]}, max_resident=3)
    ps = prompts(8, seed=11)
    params = SamplingParams(max_tokens=12, **GREEDY)
    with engine:
        early = [engine.submit(prompt_ids=p, adapter=a, params=params) for p, a in zip(ps[:4], ["a", "b", None, "b"])]
        next(iter(early[1]))  # decoding has started
        engine.load_adapter("d", extra)
        late = [engine.submit(prompt_ids=p, adapter="d", params=params) for p in ps[4:6]]
        engine.unload_adapter("b")  # early[1] and early[3] are running with it
        with pytest.raises(AdapterNotFoundError):
            engine.submit(prompt_ids=ps[6], adapter="b")
        results = [h.result(timeout=60).token_ids for h in early + late]
    expected = references(base, {**folders, "d": extra},
                          list(zip(ps[:4], ["a", "b", None, "b"])) + [(p, "d") for p in ps[4:6]], 12)
    assert results == expected
    assert "b" not in engine.registry.resident() and engine.registry.names() == ["a", "d"]


def test_concurrent_submitters(setup):
    arch, base, folders = setup
    engine = make_engine(base, folders)
    ps = prompts(12, seed=12)
    names = [None, "a", "b", "c"] * 3
    out: dict[int, list[int]] = {}

    def client(i):
        out[i] = engine.submit(prompt_ids=ps[i], adapter=names[i],
                               params=SamplingParams(max_tokens=6, **GREEDY)).result(timeout=60).token_ids

    with engine:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
            time.sleep(0.002)
        for t in threads:
            t.join()
    assert [out[i] for i in range(12)] == references(base, folders, list(zip(ps, names)), 6)


def test_bad_requests(setup):
    arch, base, folders = setup
    engine = make_engine(base, folders)
    with pytest.raises(LorakitError, match="exactly one of"):
        engine.submit("w1 w2", prompt_ids=[1, 2])
    with pytest.raises(LorakitError, match="empty"):
        engine.submit(prompt_ids=[])
    with pytest.raises(LorakitError, match="no chat template"):
        engine.submit(messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(LorakitError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(LorakitError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    completion = engine.submit("w3 w4 w5", adapter="a", params=SamplingParams(max_tokens=2, **GREEDY)).result()
    assert completion.prompt_token_ids == [3, 4, 5] and completion.completion_tokens == 2


def test_failing_callback_cancels_only_its_request(setup):
    arch, base, folders = setup
    engine = make_engine(base, folders)

    def boom(event):
        raise RuntimeError("client went away")

    p = prompts(2, seed=13)
    bad = engine.submit(prompt_ids=p[0], adapter="a", on_event=boom, params=SamplingParams(max_tokens=6, **GREEDY))
    good = engine.submit(prompt_ids=p[1], adapter="b", params=SamplingParams(max_tokens=6, **GREEDY))
    assert good.result().token_ids == references(base, folders, [(p[1], "b")], 6)[0]
    assert bad.result().finish_reason == "cancelled"


def _save_dora_adapter(base, folder, seed):
    """A lorakit-written DoRA adapter with non-zero B and a magnitude away from the initial norm."""
    import lorakit

    work = copy.deepcopy(base)
    torch.manual_seed(seed)
    lorakit.add_adapter(work, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True,
                                                 init_lora_weights=False))
    with torch.no_grad():
        for name, param in work.named_parameters():
            if "lora_B" in name:
                param.mul_(0.5)
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.randn(param.shape))
    lorakit.save_adapter(work, folder)
    return folder


def test_dora_adapter_mixed_with_lora_and_base(setup, tmp_path):
    """Issue #8: a DoRA adapter served per row, in one batch with a plain LoRA adapter and the base,
    gives each request the greedy tokens of the model with that adapter merged, alone; and the
    engine's first-step logits equal lorakit's own (unmerged) DoRA model."""
    arch, base, folders = setup
    dora_folder = _save_dora_adapter(base, tmp_path / "dora", seed=5)
    all_folders = {**folders, "dora": dora_folder}
    engine = make_engine(base, {"a": folders["a"], "dora": dora_folder})
    assert {i.name: i.dora for i in engine.adapters()} == {"a": False, "dora": True}
    requests = list(zip(prompts(9, seed=3), ["dora", "a", None] * 3))
    handles = [engine.submit(prompt_ids=p, adapter=a, params=SamplingParams(max_tokens=6, **GREEDY))
               for p, a in requests]
    got = [h.result().token_ids for h in handles]
    assert got == references(base, all_folders, requests, 6)
    plain = references(base, all_folders, [(p, None) for p, _ in requests], 6)
    assert any(g != b for g, b, (_, a) in zip(got, plain, requests) if a == "dora")

    from lorakit.adapter_io import load_adapter
    from lorakit.serve.layers import LoraBatch

    ours = copy.deepcopy(base)
    load_adapter(ours, dora_folder, "dora")
    ids = torch.tensor([p[:2] for p, _ in requests[:3]])
    reg = engine.registry
    slots = [reg.acquire("dora"), reg.acquire("a"), reg.acquire(None)]
    reg.context.plan = LoraBatch.build(slots, reg.slot_ranks(), reg.max_resident)
    try:
        with torch.no_grad():
            served = engine.model(input_ids=ids).logits
    finally:
        reg.context.plan = None
        for slot in slots:
            reg.release(slot)
    with torch.no_grad():
        torch.testing.assert_close(served[0], ours(input_ids=ids[:1]).logits[0], rtol=1e-5, atol=1e-5)


def test_output_head_and_embedding_adapters_are_served(tmp_path):
    """An adapter on the output head and the input embeddings (and one projection), mixed with a plain
    adapter and the base: each request's greedy tokens equal the merged model's, alone."""
    base = make_tiny("llama")
    base.config.eos_token_id = base.generation_config.eos_token_id = None
    folders = {"edge": save_random_adapter(base, tmp_path / "edge", r=4, seed=7,
                                           targets=["lm_head", "embed_tokens", "v_proj"]),
               "a": save_random_adapter(base, tmp_path / "a", r=2, seed=1)}
    engine = make_engine(base, folders)
    requests = list(zip(prompts(9, seed=4), ["edge", "a", None] * 3))
    handles = [engine.submit(prompt_ids=p, adapter=a, params=SamplingParams(max_tokens=6, **GREEDY))
               for p, a in requests]
    got = [h.result().token_ids for h in handles]
    layers = engine.registry.layers
    assert len(layers["lm_head"].filled) == len(layers["model.embed_tokens"].filled) == 1  # "edge"'s slot
    assert got == references(base, folders, requests, 6)
    plain = references(base, folders, [(p, None) for p, _ in requests], 6)
    assert any(g != b for g, b, (_, a) in zip(got, plain, requests) if a == "edge")
