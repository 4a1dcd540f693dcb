"""The compare job's engine side (lorakit.serve.compare) on a tiny random model: a forward under
``Engine.exclusive`` computes as the merged adapter; busy slots are reported, not overwritten; a
cancelled job stops and leaves nothing in the engine. (Its numbers against ``lorakit eval`` are in
test_page.py.)"""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from conftest import make_tiny
from serve.serve_helpers import WordTokenizer, merged_copy, save_random_adapter

from lorakit.evaluate.core import EvalConfig
from lorakit.serve import AdapterSlotsBusyError, Engine, SamplingParams
from lorakit.serve.compare import CompareCancelled, compare_on_engine


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = make_tiny("llama")
    base.config.eos_token_id = base.generation_config.eos_token_id = None
    root = tmp_path_factory.mktemp("compare")
    folders = {name: save_random_adapter(base, root / name, r=4, seed=seed) for seed, name in ((1, "a"), (2, "b"))}
    return base, folders


def engine_for(base, folders, **kwargs):
    engine = Engine(copy.deepcopy(base), WordTokenizer(), max_rank=8, **kwargs)
    for name, folder in folders.items():
        engine.load_adapter(name, folder)
    return engine


def test_exclusive_forward_computes_as_the_merged_adapter(setup):
    base, folders = setup
    engine = engine_for(base, folders, max_resident=2)
    ids = torch.tensor([[3, 14, 15, 92, 65], [35, 89, 79, 32, 38]])
    for name in (None, "a", "b"):
        with engine.exclusive(name, rows=2) as model:
            got = model(input_ids=ids, use_cache=False).logits
        want = merged_copy(base, folders[name] if name else None)(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert engine.registry.context.plan is None and engine.stats()["running"] == 0


def test_exclusive_refuses_to_evict_a_running_requests_adapter(setup):
    base, folders = setup
    engine = engine_for(base, folders, max_resident=1)
    handle = engine.submit(prompt_ids=[1, 2, 3], adapter="a", params=SamplingParams(max_tokens=30, temperature=0))
    engine.step()  # admitted: "a" pins the only slot
    with pytest.raises(AdapterSlotsBusyError):
        with engine.exclusive("b", rows=1):
            pass
    with engine.exclusive("a", rows=1):  # the resident adapter is shared
        pass
    assert handle.result().completion_tokens == 30  # the request was not disturbed


def test_a_cancelled_comparison_stops_and_leaves_the_engine_empty(page_world):
    adapters = {name: str(folder) for name, folder in page_world["adapters"].items()}
    engine = Engine.from_pretrained(str(page_world["base"]), adapters, max_batch=2).start()
    cancel = threading.Event()
    seen = []

    def progress(done, total):
        seen.append((done, total))
        if done >= 5:
            cancel.set()

    slow = engine.model.register_forward_hook(lambda *args: time.sleep(0.02))
    try:
        with pytest.raises(CompareCancelled):
            compare_on_engine(engine, {"base": None, "alpha": "alpha", "beta": "beta"}, str(page_world["ten"]),
                              EvalConfig(max_new_tokens=8), progress=progress, cancel=cancel)
        assert seen[0] == (0, 3 * (10 + 10)) and 5 <= seen[-1][0] < seen[0][1]
        deadline = time.monotonic() + 10
        while engine.has_work() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not engine.has_work()
    finally:
        slow.remove()
        engine.stop()
