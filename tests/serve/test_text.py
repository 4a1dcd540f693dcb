"""TextStream: streamed text is final text only (no partial characters, no stop strings)."""

from __future__ import annotations

from lorakit.serve.sampling import SamplingParams
from lorakit.serve.text import TextStream


class ByteTokenizer:
    """Token = one UTF-8 byte: a character can span several tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def run(text: str, max_tokens: int = 100, eos: int | None = None, **params):
    stream = TextStream(ByteTokenizer(), SamplingParams(**params), {eos} if eos is not None else set(), max_tokens)
    tokens, deltas = [], []
    for b in list(text.encode()) + ([eos] if eos is not None else []):
        tokens.append(b)
        deltas.append(stream.push(tokens))
        if stream.finish_reason:
            break
    return deltas, stream


def test_partial_characters_are_held_back():
    deltas, stream = run("né", max_tokens=3)
    assert deltas == ["n", "", "é"]  # é is two bytes: nothing until both are there
    assert stream.finish_reason == "length" and "\ufffd" not in "".join(deltas)


def test_stop_string_across_tokens_is_never_streamed():
    deltas, stream = run("abc###def", stop=["###"])
    assert "".join(deltas) == stream.text == "abc" and stream.finish_reason == "stop"
    deltas, stream = run("abc###def", stop=["###"], include_stop_str_in_output=True)
    assert stream.text == "abc###"
    deltas, stream = run("ab#c#d", stop=["###", "c#"])  # partial matches are released once they fail
    assert stream.text == "ab#" and "".join(deltas) == "ab#"


def test_eos_ends_and_is_not_text():
    deltas, stream = run("hi", eos=300)
    assert stream.finish_reason == "stop" and stream.text == "hi" and deltas[-1] == ""
    _, ignored = run("hi", eos=300, ignore_eos=True, max_tokens=3)
    assert ignored.finish_reason == "length"
