"""Logprobs from the engine: prompt logprobs (echo) and generated tokens' logprobs equal the
log-softmax of the teacher-forced logits of PEFT's model with the same adapter (the oracle), for the
base, a LoRA adapter on every layer (output head and embeddings included) and a DoRA adapter, all
in one batched prefill; the backbone/head split behind them is checked, not assumed."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHITECTURES, make_tiny
from serve.serve_helpers import WordTokenizer, peft_lora_and_dora, peft_reference

from lorakit.errors import LorakitError
from lorakit.serve import Engine, SamplingParams
from lorakit.serve.head import OutputHead
from lorakit.serve.logprobs import TokenStrings, chat_logprobs, completion_logprobs

K = 3
PROMPTS = [[5, 9, 2, 33, 17, 4, 4, 80], [7, 1, 60, 61, 3], [11, 4, 8, 8, 90, 12, 2]]
NAMES = [None, "lora", "dora"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = make_tiny("llama")
    base.config.eos_token_id = base.generation_config.eos_token_id = None
    folders = peft_lora_and_dora(base, tmp_path_factory.mktemp("adapters"))
    engine = Engine(copy.deepcopy(base), WordTokenizer(), max_resident=2, max_rank=8)
    for name, folder in folders.items():
        engine.load_adapter(name, folder)
    return engine, peft_reference(base, folders)


def _check(entry, logprobs_row, token):
    assert entry.token == token
    assert entry.logprob == pytest.approx(float(logprobs_row[token]), abs=1e-5)
    values, ids = logprobs_row.topk(K)
    assert [t for t, _ in entry.top] == ids.tolist()
    assert [lp for _, lp in entry.top] == pytest.approx(values.tolist(), abs=1e-5)


def test_echo_and_generated_logprobs_equal_peft_teacher_forced_in_one_mixed_batch(served):
    engine, reference = served
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=K, prompt_logprobs=K)
    handles = [engine.submit(prompt_ids=p, adapter=a, params=params) for p, a in zip(PROMPTS, NAMES)]
    engine.step()
    assert engine.stats()["running"] == 3 and engine.stats()["waiting"] == 0  # one prefill for all three
    done = [h.result() for h in handles]
    rows = []
    for prompt, name, completion in zip(PROMPTS, NAMES, done):
        sequence = prompt + completion.token_ids
        logprobs = reference(sequence, name).log_softmax(-1)  # (T, vocab): position t scores token t + 1
        assert completion.prompt_logprobs[0] is None and len(completion.prompt_logprobs) == len(prompt)
        for t in range(1, len(prompt)):
            _check(completion.prompt_logprobs[t], logprobs[t - 1], prompt[t])
        assert len(completion.logprobs) == len(completion.token_ids) == 4
        for j, entry in enumerate(completion.logprobs):
            _check(entry, logprobs[len(prompt) - 1 + j], completion.token_ids[j])
            assert entry.logprob == entry.top[0][1]  # greedy: the token is the most likely, exactly
        rows.append([e.logprob for e in completion.prompt_logprobs[1:]])
    # Not vacuous: each adapter changes the distribution (same prompt under base, LoRA and DoRA).
    same = [engine.submit(prompt_ids=PROMPTS[0], adapter=a, params=params) for a in NAMES]
    values = [torch.tensor([e.logprob for e in h.result().prompt_logprobs[1:]]) for h in same]
    assert (values[0] - values[1]).abs().max() > 0.05 and (values[0] - values[2]).abs().max() > 0.05


def test_the_output_head_and_embedding_adapters_count(served):
    """The LoRA adapter's changes to lm_head and embed_tokens are served: without them the prompt
    logprobs differ (PEFT with those modules' adapters switched off is another distribution)."""
    engine, reference = served
    registry = engine.registry
    assert registry.layers["lm_head"].filled and registry.layers["model.embed_tokens"].filled
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    got = engine.submit(prompt_ids=PROMPTS[1], adapter="lora", params=params).result().prompt_logprobs
    full = reference(PROMPTS[1], "lora").log_softmax(-1)
    ours = torch.tensor([e.logprob for e in got[1:]])
    expected = full[torch.arange(len(PROMPTS[1]) - 1), PROMPTS[1][1:]]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_prompt_logprob_requests_share_the_batch_and_do_not_stall_decoding(served):
    """Six scoring requests (echo-style: prompt logprobs, one token) over three adapters arrive while a
    generation runs: they are prefilled together in one step, and the generation gets its token at
    every step all the same."""
    engine, _ = served
    running = engine.submit(prompt_ids=[3, 4, 5], params=SamplingParams(max_tokens=12, temperature=0))
    engine.step()
    scoring = [engine.submit(prompt_ids=PROMPTS[i % 3] + [i + 1], adapter=NAMES[i % 3],
                             params=SamplingParams(max_tokens=1, temperature=0, logprobs=1, prompt_logprobs=1))
               for i in range(6)]
    grew = []
    for step in range(3):
        before = len(running.completion.token_ids)
        engine.step()
        grew.append(len(running.completion.token_ids) - before)
        if step == 0:
            assert all(h.done for h in scoring)  # one prefill for all six, next to the decode
    assert grew == [1, 1, 1]
    assert all(len(h.result().prompt_logprobs) == len(h.result().prompt_token_ids) for h in scoring)
    running.result()


def test_logprob_parameters_are_checked():
    with pytest.raises(LorakitError, match=r"logprobs must be an integer in \[0, 20\]"):
        SamplingParams(logprobs=21)
    with pytest.raises(LorakitError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)


def test_head_split_is_verified_per_model():
    for arch in ARCHITECTURES:  # llama, qwen2, gpt2, gemma, mistral
        assert OutputHead.split(make_tiny(arch)) is not None, arch
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    gemma2 = AutoModelForCausalLM.from_config(Gemma2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0)).eval()
    head = OutputHead.split(gemma2)
    assert head is not None and head.softcap == 3.0
    odd = make_tiny("llama")
    odd.config.final_logit_softcapping = 0.5  # the head would soft-cap; Llama's forward does not
    assert OutputHead.split(odd) is None


def test_prompt_logprobs_are_refused_where_the_split_is_not_exact():
    model = make_tiny("llama")
    model.config.final_logit_softcapping = 0.5
    engine = Engine(model, WordTokenizer())
    assert engine.head is None
    with pytest.raises(LorakitError, match="prompt logprobs .* not available for this model"):
        engine.submit(prompt_ids=[1, 2], params=SamplingParams(prompt_logprobs=1))
    # Everything else still works, the model running whole.
    params = SamplingParams(max_tokens=3, logprobs=1, temperature=0, ignore_eos=True)
    assert len(engine.submit(prompt_ids=[1, 2], params=params).result().logprobs) == 3


def test_openai_shapes():
    from lorakit.serve.logprobs import TokenLogprob

    strings = TokenStrings(WordTokenizer())
    entries = [None, TokenLogprob(7, -0.5, ((7, -0.5), (3, -1.5))), TokenLogprob(3, -2.0, ((9, -0.1),))]
    body = completion_logprobs([1, 7, 3], entries, strings)
    assert body == {"tokens": [" w1", " w7", " w3"], "token_logprobs": [None, -0.5, -2.0],
                    "top_logprobs": [None, {" w7": -0.5, " w3": -1.5}, {" w3": -2.0, " w9": -0.1}],
                    "text_offset": [0, 3, 6]}
    chat = chat_logprobs(entries[1:2], strings)
    assert chat["content"][0] == {"token": " w7", "logprob": -0.5, "bytes": list(b" w7"),
                                  "top_logprobs": [{"token": " w7", "logprob": -0.5, "bytes": list(b" w7")},
                                                   {"token": " w3", "logprob": -1.5, "bytes": list(b" w3")}]}
