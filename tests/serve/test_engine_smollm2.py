"""The engine on the real SmolLM2-135M-Instruct: a mixed chat batch over base + 3 adapters of
ranks 4, 8 and 16 gives token for token what each request gives alone with its adapter merged."""

from __future__ import annotations

import pytest
import torch
from serve.serve_helpers import greedy_reference, save_random_adapter

import lorakit
from lorakit.adapter_io import load_adapter
from lorakit.models import load_model, load_tokenizer
from lorakit.serve import Engine, SamplingParams

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "Define the word 'able'.",
             "List three colours.", "What is 7 times 8?", "Name a large mammal."]
NAMES = [None, "r4", "r8", "r16", "r4", "r16"]
NEW_TOKENS = 6


def _fresh(path):
    return load_model(str(path), dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def smollm2(smollm2_path, tmp_path_factory):
    base = _fresh(smollm2_path)
    root = tmp_path_factory.mktemp("smol-adapters")
    folders = {
        "r4": save_random_adapter(base, root / "r4", r=4, alpha=8, seed=1, b_scale=0.05),
        "r8": save_random_adapter(base, root / "r8", r=8, alpha=16, seed=2, b_scale=0.3, targets=["q_proj", "v_proj"]),
        "r16": save_random_adapter(base, root / "r16", r=16, alpha=16, seed=3, b_scale=0.05, use_rslora=True),
    }
    return smollm2_path, folders


def test_mixed_chat_batch_equals_merged_alone(smollm2):
    path, folders = smollm2
    tokenizer = load_tokenizer(str(path))
    engine = Engine(_fresh(path), tokenizer, max_resident=3, max_rank=16)
    for name, folder in folders.items():
        engine.load_adapter(name, folder)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    handles = [engine.submit(messages=[{"role": "user", "content": q}], adapter=a, params=params)
               for q, a in zip(QUESTIONS[:4], NAMES[:4])]
    engine.step()  # the first four are prefilled; the last two join mid-decode
    handles += [engine.submit(messages=[{"role": "user", "content": q}], adapter=a, params=params)
                for q, a in zip(QUESTIONS[4:], NAMES[4:])]
    results = [h.result() for h in handles]
    for r, q in zip(results, QUESTIONS):  # the chat template was applied
        prompt = tokenizer.decode(r.prompt_token_ids)
        assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(f"{q}<|im_end|>\n<|im_start|>assistant\n")
    assert "Paris" in results[0].text
    del engine
    base = _fresh(path)
    for name in (None, "r4", "r8", "r16"):
        model = _fresh(path)
        if name is not None:
            load_adapter(model, folders[name], "ref")
            model = lorakit.merge_and_unload(model)
            with torch.no_grad():  # not vacuous: the adapter moves the logits
                ids = torch.tensor([results[NAMES.index(name)].prompt_token_ids])
                assert (model(ids).logits[0, -1] - base(ids).logits[0, -1]).abs().max() > 0.5, name
        for r, a in zip(results, NAMES):
            if a == name:
                assert r.token_ids == greedy_reference(model, r.prompt_token_ids, NEW_TOKENS, {2}), (a, r.text)
