"""Answer masks token by token, for templates with and without generation markers."""

from __future__ import annotations

import pytest
from data.data_helpers import GENERATION_TEMPLATE, bare_tokenizer, inst_tokenizer, marked, smol_tokenizer

from lorakit.data.templates import PLAIN_TEMPLATE, NoChatTemplate, encode_chat, encode_text, resolve_template
from lorakit.errors import LorakitError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sum 2+3?"},
        {"role": "assistant", "content": "5"}]
F, T = False, True
SYSTEM = [("<|im_start|>", F), ("system", F), ("\n", F), ("Be", F), (" brief", F), (".", F), ("<|im_end|>", F),
          ("\n", F)]
CHATML = SYSTEM + [
    ("<|im_start|>", F), ("user", F), ("\n", F), ("Hi", F), ("<|im_end|>", F), ("\n", F),
    ("<|im_start|>", F), ("ass", F), ("istant", F), ("\n", F), ("Hello", T), (".", T), ("<|im_end|>", T), ("\n", F),
    ("<|im_start|>", F), ("user", F), ("\n", F), ("Sum", F), (" ", F), ("2", F), ("+", F), ("3", F), ("?", F),
    ("<|im_end|>", F), ("\n", F),
    ("<|im_start|>", F), ("ass", F), ("istant", F), ("\n", F), ("5", T), ("<|im_end|>", T), ("\n", F)]


def encode(tokenizer, setting="auto", **options):
    ids, labels = encode_chat(tokenizer, resolve_template(tokenizer, setting), CHAT, **options)
    assert len(ids) == len(labels)
    return marked(tokenizer, ids, labels)


def test_chatml_own_template_trains_answers_and_end_of_turn():
    assert encode(smol_tokenizer()) == CHATML


def test_default_system_prompt_of_the_template_stays_masked():
    tokenizer = smol_tokenizer()
    ids, labels = encode_chat(tokenizer, resolve_template(tokenizer), CHAT[1:])
    rows = marked(tokenizer, ids, labels)
    assert rows[:3] == [("<|im_start|>", F), ("system", F), ("\n", F)]
    assert "".join(text for text, trained in rows if trained) == "Hello.<|im_end|>5<|im_end|>"
    assert not any(trained for text, trained in rows[:rows.index(("Hello", T))])


def test_generation_markers_give_the_same_mask_as_prefix_rendering():
    assert encode(smol_tokenizer(), GENERATION_TEMPLATE) == CHATML


def test_inst_template_without_generation_prompt():
    # Llama-2/Mistral style: the system message is dropped by this template; answers start after "[/INST]".
    assert encode(inst_tokenizer()) == [
        ("<|im_start|>", F), ("[", F), ("INST", F), ("]", F), (" Hi", F), (" [", F), ("/", F), ("INST", F), ("]", F),
        (" Hello", T), (".", T), ("<|im_end|>", T),
        ("[", F), ("INST", F), ("]", F), (" Sum", F), (" ", F), ("2", F), ("+", F), ("3", F), ("?", F),
        (" [", F), ("/", F), ("INST", F), ("]", F), (" ", T), ("5", T), ("<|im_end|>", T)]


def test_a_tokenizer_without_template_is_refused_for_conversations_under_auto():
    tokenizer = bare_tokenizer()
    assert resolve_template(tokenizer) == ""
    with pytest.raises(NoChatTemplate, match=r"has none \(data.chat_template: auto\); set data.chat_template: plain"):
        encode(tokenizer)
    ids, labels = encode_text(tokenizer, "hello world")  # text rows need no template
    assert ids == labels == [28120, 905, tokenizer.eos_token_id]


def test_plain_template_on_request_for_a_tokenizer_without_template():
    tokenizer = bare_tokenizer()
    assert resolve_template(tokenizer, "plain") == PLAIN_TEMPLATE
    rows = encode(tokenizer, "plain")
    header = [("###", F), (" Assistant", F), (":", F), ("\n", F)]
    assert rows[:9] == [("###", F), (" System", F), (":", F), ("\n", F), ("Be", F), (" brief", F), (".", F),
                        ("\n", F), ("\n", F)]
    assert rows[16:25] == header + [("Hello", T), (".", T), ("<|im_end|>", T), ("\n", F), ("\n", F)]
    assert rows[-7:] == header + [("5", T), ("<|im_end|>", T), ("\n\n", F)]
    assert sum(trained for _, trained in rows) == 5


def test_last_turn_only_and_train_on_inputs():
    last = encode(smol_tokenizer(), last_turn_only=True)
    assert [t for t, trained in last if trained] == ["5", "<|im_end|>"]
    assert [t for t, _ in last] == [t for t, _ in CHATML]
    everything = encode(smol_tokenizer(), train_on_inputs=True)
    assert all(trained for _, trained in everything) and len(everything) == len(CHATML)


def test_template_that_rewrites_earlier_turns_is_refused():
    # Renders the last assistant turn differently from earlier ones: prefixes are not consistent.
    odd = ("{% for m in messages %}{% if loop.last %}LAST:{% endif %}{{ m['role'] }}: {{ m['content'] }}\n"
           "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(LorakitError, match="renders turn 1 differently"):
        encode_chat(smol_tokenizer(), odd, CHAT[1:3] + CHAT[3:])


def test_text_rows_end_with_eos_and_train_everything():
    tokenizer = smol_tokenizer()
    ids, labels = encode_text(tokenizer, "hello world")
    assert ids == labels == [28120, 905, tokenizer.eos_token_id]


def test_custom_template_setting_must_be_jinja():
    with pytest.raises(LorakitError, match="expected 'auto', 'plain' or a Jinja template"):
        resolve_template(smol_tokenizer(), "chatml")
