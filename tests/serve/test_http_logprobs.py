"""Logprobs, echo, token prompts, several prompts and ``n``, and the tokenizer endpoints, through the real
``openai`` client on a loopback port: values equal the log-softmax of PEFT's teacher-forced logits
for the base, a LoRA and a DoRA adapter whose requests share one prefill; streams carry the same
logprobs as whole answers. (lm-evaluation-harness against these endpoints: tests/serve/test_lm_eval.py.)"""

from __future__ import annotations

import copy
import threading
import time

import httpx
import openai
import pytest
from conftest import make_tiny
from serve.serve_helpers import ChatWordTokenizer, peft_lora_and_dora, peft_reference

from lorakit.serve import Engine
from lorakit.serve.asgi import BackgroundServer
from lorakit.serve.http import create_app

BASE = "tiny"
PROMPTS = {None: [5, 9, 2, 33, 17, 4], "lora": [7, 1, 60, 61, 3, 3, 40], "dora": [11, 4, 8, 8, 90]}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = make_tiny("llama")
    base.config.eos_token_id = base.generation_config.eos_token_id = None
    folders = peft_lora_and_dora(base, tmp_path_factory.mktemp("adapters"))
    engine = Engine(copy.deepcopy(base), ChatWordTokenizer(), max_batch=4, max_resident=2, max_rank=8)
    for name, folder in folders.items():
        engine.load_adapter(name, folder)
    with BackgroundServer(create_app(engine, BASE)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=60)
        yield dict(url=server.url, client=client, engine=engine, reference=peft_reference(base, folders))


def model_of(name):
    return name or BASE


def test_echo_logprobs_equal_peft_in_one_mixed_batch(served):
    """lm-evaluation-harness' loglikelihood request (token ids, max_tokens 1, logprobs 1, echo), for the
    base, LoRA and DoRA at once: one prefill; every prompt token's logprob and top-1 equal PEFT's."""
    client, engine = served["client"], served["engine"]
    answers = {}

    def ask(name):
        answers[name] = client.completions.create(model=model_of(name), prompt=[PROMPTS[name]], max_tokens=1,
                                                  logprobs=1, echo=True, temperature=0, seed=1234)

    with engine._step_lock:  # hold the engine's loop until all three wait, so they share one prefill
        threads = [threading.Thread(target=ask, args=(name,)) for name in PROMPTS]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while engine.stats()["waiting"] < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["waiting"] == 3
    for t in threads:
        t.join()
    for name, prompt in PROMPTS.items():
        choice = answers[name].choices[0]
        lp = choice.logprobs  # the openai client's Logprobs object
        generated = answers[name].usage.completion_tokens
        assert generated == 1 and len(lp.tokens) == len(prompt) + 1
        assert lp.tokens[:len(prompt)] == [f" w{t}" for t in prompt]
        assert choice.text == "".join(lp.tokens)  # echo: the prompt's text, then the generated one
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        sequence = prompt + [int(lp.tokens[-1][2:])]
        expected = served["reference"](sequence, name).log_softmax(-1)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for t in range(1, len(sequence)):
            assert lp.token_logprobs[t] == pytest.approx(float(expected[t - 1, sequence[t]]), abs=1e-5)
            best = int(expected[t - 1].argmax())
            assert lp.top_logprobs[t][f" w{best}"] == pytest.approx(float(expected[t - 1, best]), abs=1e-5)
            assert max(lp.top_logprobs[t].values()) == pytest.approx(float(expected[t - 1].max()), abs=1e-5)
        assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())  # greedy: exactly the top one


def test_chat_logprobs_equal_peft(served):
    client = served["client"]
    answer = client.chat.completions.create(model="lora", messages=[{"role": "user", "content": "w3 w14 w15"}],
                                            max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)
    tokens = [int(c.token[2:]) for c in content]
    assert answer.choices[0].message.content == "".join(c.token for c in content)
    expected = served["reference"]([3, 14, 15] + tokens, "lora").log_softmax(-1)
    for j, item in enumerate(content):
        row = expected[2 + j]
        assert item.logprob == pytest.approx(float(row[tokens[j]]), abs=1e-5)
        assert item.bytes == list(item.token.encode())
        values, ids = row.topk(3)
        assert [t.token for t in item.top_logprobs] == [f" w{i}" for i in ids.tolist()]
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(values.tolist(), abs=1e-5)
    plain = client.chat.completions.create(model="lora", messages=[{"role": "user", "content": "w3"}], max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_several_prompts_and_n(served):
    client = served["client"]
    answer = client.completions.create(model="dora", prompt=[[3, 4], [5, 6, 7]], n=2, max_tokens=3,
                                       temperature=1.0, seed=5)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert answer.usage.prompt_tokens == 5 and answer.usage.completion_tokens == 12  # each prompt counted once
    for i, prompt in enumerate([[3, 4], [5, 6, 7]]):
        for j in range(2):  # choice j samples with seed + j: the same text as a request of its own
            alone = client.completions.create(model="dora", prompt=prompt, max_tokens=3, temperature=1.0, seed=5 + j)
            assert answer.choices[2 * i + j].text == alone.choices[0].text
    texts = client.completions.create(model=BASE, prompt=["w1 w2", "w9"], max_tokens=2, temperature=0)
    assert [c.index for c in texts.choices] == [0, 1]
    assert texts.choices[1].text == client.completions.create(model=BASE, prompt="w9", max_tokens=2,
                                                              temperature=0).choices[0].text
    echoed = client.completions.create(model=BASE, prompt="w1 w2", max_tokens=2, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("w1 w2") and echoed.choices[0].logprobs is None
    chat = dict(model="lora", messages=[{"role": "user", "content": "w5"}], n=3, max_tokens=3, temperature=1.0, seed=9)
    whole = client.chat.completions.create(**chat)
    streamed = {}
    for c in client.chat.completions.create(**chat, stream=True):
        for choice in c.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert streamed == {c.index: c.message.content for c in whole.choices} and len(streamed) == 3


def test_streams_carry_the_logprobs_of_the_whole_answer(served):
    client = served["client"]
    args = dict(model="lora", prompt=[[5, 6, 7, 8]], max_tokens=5, temperature=0, logprobs=2, echo=True)
    whole = client.completions.create(**args).choices[0].logprobs
    chunks = list(client.completions.create(**args, stream=True))
    tokens, values, offsets, tops = [], [], [], []
    for c in chunks:
        if c.choices and c.choices[0].logprobs is not None:
            tokens += c.choices[0].logprobs.tokens
            values += c.choices[0].logprobs.token_logprobs
            offsets += c.choices[0].logprobs.text_offset
            tops += c.choices[0].logprobs.top_logprobs
    assert tokens == whole.tokens and offsets == whole.text_offset
    # The second request finds its prompt in the prefix cache: equal up to float rounding (1e-5).
    assert values[0] is None and values[1:] == pytest.approx(whole.token_logprobs[1:], abs=1e-5)
    assert [list(t) for t in tops[1:]] == [list(t) for t in whole.top_logprobs[1:]]
    chat = dict(model="dora", messages=[{"role": "user", "content": "w2 w3"}], max_tokens=4, temperature=0,
                logprobs=True, top_logprobs=1)
    whole = client.chat.completions.create(**chat).choices[0].logprobs.content
    streamed = [item for c in client.chat.completions.create(**chat, stream=True)
                if c.choices and c.choices[0].logprobs is not None for item in c.choices[0].logprobs.content]
    assert [i.token for i in streamed] == [i.token for i in whole]
    assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in whole], abs=1e-5)


def test_tokenizer_endpoints(served):
    url = served["url"]
    body = httpx.post(f"{url}/tokenize", json={"prompt": "w4 w5 w6", "return_token_strs": True}).json()
    assert body == {"count": 3, "max_model_len": 64, "tokens": [4, 5, 6], "token_strs": [" w4", " w5", " w6"]}
    chat = httpx.post(f"{url}/tokenize", json={"model": "lora", "messages": [{"role": "user", "content": "w7"},
                                                                            {"role": "user", "content": "w8"}]})
    assert chat.json()["tokens"] == [7, 8]
    assert httpx.post(f"{url}/detokenize", json={"tokens": [1, 2]}).json() == {"prompt": " w1 w2"}
    assert httpx.post(f"{url}/tokenize", json={"model": "nope", "prompt": "w1"}).status_code == 404
    assert httpx.post(f"{url}/detokenize", json={"tokens": [500]}).status_code == 400
    assert httpx.post(f"{url}/tokenize", json={"prompt": "w1", "messages": []}).status_code == 400
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["tokenizer_class"] == "ChatWordTokenizer" and info["model_max_length"] == 64 and "eos_token" in info
