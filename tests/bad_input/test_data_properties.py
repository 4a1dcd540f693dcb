"""Property tests (hypothesis) over the data readers and formats: whatever a file holds — random
JSON values, nesting, unicode, huge strings, the wrong type in any field of any format — each row
ends as a kept :class:`Sample` or a :class:`BadRow` that names the file and line, and a whole-file
problem as a :class:`LorakitError` naming the file. Never another exception.

``GENERATED`` counts the rows; the last test asserts the total (≥ 10,000) so the figure in the
README is measured, not assumed.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from bad_input.bad_helpers import GENERATED
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from lorakit.data.formats import Sample, detect_format, to_sample
from lorakit.data.readers import BadRow, Row, iter_rows
from lorakit.errors import LorakitError

FORMATS = ("text", "completion", "alpaca", "messages", "sharegpt", "tokens")
# No shrinking phase: CI time stays bounded, and a failure still prints the rows that failed.
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

texts = st.one_of(st.text(max_size=40), st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
                  st.sampled_from(["", " ", "\u0000", "\ufeff", "\u202e", "a" * 5000, "💥" * 300]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(texts, inner, max_size=4)),
                           max_leaves=12)
roles = st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "human", "gpt", "bot"]), json_values)


def maybe(good):
    """Mostly the right type, sometimes anything at all."""
    return st.one_of(good, good, good, json_values)


def turns(role_key: str, text_key: str):
    turn = st.fixed_dictionaries({role_key: maybe(roles), text_key: maybe(texts)},
                                 optional={"extra": json_values})
    return maybe(st.lists(maybe(turn), max_size=6))


ROWS = {
    "text": st.fixed_dictionaries({"text": maybe(texts)}),
    "completion": st.fixed_dictionaries({"prompt": maybe(texts), "completion": maybe(texts)}),
    "alpaca": st.fixed_dictionaries({"instruction": maybe(texts), "output": maybe(texts)},
                                    optional={"input": maybe(texts)}),
    "messages": st.fixed_dictionaries({"messages": turns("role", "content")}),
    "sharegpt": st.fixed_dictionaries({"conversations": turns("from", "value")}),
    "tokens": st.fixed_dictionaries({"input_ids": maybe(st.lists(st.integers(-200, 2**40), max_size=30))},
                                    optional={"labels": maybe(st.lists(st.integers(-200, 2**40), max_size=30))}),
}


def rows_of(fmt: str):
    """Rows shaped for ``fmt``, mixed with arbitrary objects and non-objects."""
    row = st.one_of(ROWS[fmt], ROWS[fmt], ROWS[fmt], st.dictionaries(texts, json_values, max_size=5), json_values)
    return st.lists(row, min_size=30, max_size=60)


def _dump(value) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=True)


PROPERTY_TESTS = 2 * len(FORMATS) + 2  # the parametrized readers test, raw bytes, the tokenised path


def check_file(path: Path, fmt: str | None) -> None:
    """Every row of ``path`` is kept or refused with its location; nothing else escapes."""
    GENERATED["files"] += 1
    try:
        for item in iter_rows(str(path)):
            GENERATED["rows"] += 1
            try:
                if isinstance(item, BadRow):
                    raise item
                assert isinstance(item, Row)
                sample = to_sample(item, fmt or detect_format(item))
            except BadRow as bad:
                GENERATED["refused"] += 1
                assert str(path) in str(bad) and (" line " in bad.where or " item " in bad.where), str(bad)
                assert bad.line >= 1
                continue
            GENERATED["kept"] += 1
            assert isinstance(sample, Sample) and sample.where.startswith(str(path))
            _assert_usable(sample)
    except BadRow:
        raise
    except LorakitError as err:  # a whole-file problem (no rows, not UTF-8, not a list): named
        assert str(path) in str(err), str(err)


def _assert_usable(sample: Sample) -> None:
    # A kept row holds exactly what the next stage needs, with the right types.
    if sample.input_ids is not None:
        assert all(isinstance(i, int) and 0 <= i for i in sample.input_ids)
    elif sample.text is not None:
        assert isinstance(sample.text, str) and sample.text
    else:
        assert sample.messages and all(isinstance(m["content"], str) and m["role"] in
                                       ("system", "user", "assistant") for m in sample.messages)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("container", ["jsonl", "json"])
def test_rows_are_kept_or_located(fmt, container):
    with tempfile.TemporaryDirectory() as tmp:
        @SETTINGS
        @given(rows=rows_of(fmt), declared=st.booleans())
        def prop(rows, declared):
            path = Path(tmp) / f"rows.{container}"
            if container == "jsonl":
                path.write_text("".join(_dump(r).replace("\n", " ") + "\n" for r in rows), encoding="utf-8",
                                errors="surrogatepass")
            else:
                path.write_text(_dump(rows), encoding="utf-8", errors="surrogatepass")
            check_file(path, fmt if declared else None)

        prop()
        GENERATED["tests"] += 1


def test_raw_bytes_lines_are_kept_or_located():
    with tempfile.TemporaryDirectory() as tmp:
        @SETTINGS
        @given(lines=st.lists(st.one_of(st.binary(max_size=80), st.text(max_size=80).map(str.encode)), min_size=1,
                              max_size=40))
        def prop(lines):
            path = Path(tmp) / "raw.jsonl"
            path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
            check_file(path, None)

        prop()
        GENERATED["tests"] += 1


def test_tokenised_rows_are_kept_or_located(world):
    """Through the whole data path (template, tokenizer, lengths) with the real SmolLM2 tokenizer."""
    from lorakit.data.config import DataConfig
    from lorakit.data.tokenize import tokenize_file
    from lorakit.models import load_tokenizer

    tokenizer = load_tokenizer(str(world.model))
    with tempfile.TemporaryDirectory() as tmp:
        @settings(SETTINGS, max_examples=12)
        @given(rows=st.one_of(*(rows_of(f) for f in FORMATS)), policy=st.sampled_from(["error", "skip"]))
        def prop(rows, policy):
            path = Path(tmp) / "rows.jsonl"
            path.write_text("".join(_dump(r).replace("\n", " ") + "\n" for r in rows), encoding="utf-8",
                            errors="surrogatepass")
            GENERATED["rows"] += len(rows)
            config = DataConfig(train=str(path), max_length=48, on_bad_row=policy, cache=False)
            try:
                dataset, report = tokenize_file(str(path), tokenizer, config)
            except LorakitError as err:
                assert str(path) in str(err), str(err)
                return
            assert report.rows_kept == len(dataset) >= 1 and max(dataset.lengths) <= 48

        prop()
        GENERATED["tests"] += 1


def test_generated_row_count():
    if GENERATED["tests"] < PROPERTY_TESTS:
        pytest.skip(f"only {GENERATED['tests']} of the {PROPERTY_TESTS} property tests ran (-k?)")
    print(f"generated: {GENERATED}")
    assert GENERATED["rows"] >= 10_000 and GENERATED["kept"] > 100 and GENERATED["refused"] > 100
    assert math.isfinite(GENERATED["rows"])
