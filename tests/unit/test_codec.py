"""The fast codec gives exactly the standard library's answers (or stricter output: no NaN)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import codec

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


def _finite_equal(a: object, b: object) -> bool:
    """Equality where NaN equals NaN (after a round trip both are the string "NaN")."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_finite_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_finite_equal(a[k], b[k]) for k in a)
    return a == b


def _strict(text: bytes) -> object:
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in output"))


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_dumps_is_strict_json_and_agrees_with_the_standard_library(value):
    out = codec.dumps(value)
    assert _strict(out) == _strict(codec._dumps_std(value))


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_parse_reads_what_json_reads(value):
    text = json.dumps(value).encode()  # may hold bare NaN/Infinity, as TF Serving and some users write
    parsed, strict = codec.parse(text)
    assert _finite_equal(parsed, json.loads(text))
    if strict:  # then the text can be copied into output lines: it must be strict JSON
        _strict(text)


def test_non_utf8_and_bom_fall_back_or_fail_like_json():
    assert codec.parse(b"\xef\xbb\xbf[1]".decode("utf-8-sig").encode("utf-16"))[0] == [1]
    with pytest.raises(ValueError):
        codec.parse(b"[1, 2")
    with pytest.raises(UnicodeDecodeError):
        codec.parse(b'["\xff"]')


def test_half_a_surrogate_pair_is_not_text():
    """`json` reads `"\\ud800"` alone (orjson and TF Serving do not) into a string that cannot be
    written as UTF-8: parse refuses it, however the line reaches `json`; a whole pair is text."""
    assert codec.parse(rb'["\ud83d\ude00"]') == (["\U0001f600"], True)
    for text in (
        rb'["\ud800"]',
        rb'{"a": {"b": "x\udfffy"}}',
        rb'[12345678901234567890, "\ud800"]',  # read by json alone: 19 digits
        rb'[NaN, "\ud800"]',
        '["\\ud800"]'.encode("utf-16"),
        b'\xff\xfe"\x00\x00\xd8"\x00',  # UTF-16 text holding the half itself
    ):
        with pytest.raises(ValueError, match=r"a string holds \\ud[8f]\w\w, half of a UTF-16 surrogate pair"):
            codec.parse(text)


def test_a_real_null_stays_null_and_nan_becomes_a_string():
    assert codec.dumps({"a": None, "b": [float("nan"), float("-inf")]}) == b'{"a":null,"b":["NaN","-Infinity"]}'


lines = st.lists(
    st.one_of(
        json_values.map(lambda v: json.dumps(v).encode()),
        st.sampled_from([b"[1", b"2]", b"1,2", b"", b"{", b'"\xff"', b"NaN", b"12345678901234567890", b"[1] x"]),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(lines)
def test_parse_many_answers_line_by_line_as_parse_does(batch):
    got = codec.parse_many(batch)
    assert len(got) == len(batch)
    for raw, answer in zip(batch, got, strict=True):
        try:
            want = codec.parse(raw)
        except ValueError:
            assert isinstance(answer, ValueError)
            continue
        assert not isinstance(answer, ValueError)
        assert _finite_equal(answer[0], want[0]) and answer[1] == want[1]


@settings(max_examples=300, deadline=None)
@given(st.lists(json_values, max_size=12))
def test_dumps_each_encodes_each_value_as_dumps_does(values):
    assert codec.dumps_each(values) == [codec.dumps(v) for v in values]


@settings(max_examples=300, deadline=None)
@given(lines)
def test_parse_strict_gives_every_value_only_when_every_line_is_strict(batch):
    got = codec.parse_strict(batch)
    answers = codec.parse_many(batch)
    if got is None:  # only when some line is not strict JSON (or not JSON at all)
        assert any(isinstance(a, ValueError) or not a[1] for a in answers)
    else:
        assert len(got) == len(batch)
        assert all(
            _finite_equal(v, codec.parse(raw)[0]) and codec.parse(raw)[1] for v, raw in zip(got, batch, strict=True)
        )


# Digit runs of any length between the bytes on either side of "0"-"9", in texts below and above
# the size where the scan changes method.
digit_texts = st.lists(
    st.tuples(st.integers(0, 25), st.sampled_from([b"/", b":", b".", b",", b" ", b"\x00", b"\xff", b"e"])),
    max_size=600,
).map(lambda parts: b"".join(b"7" * n + sep for n, sep in parts))


@settings(max_examples=300, deadline=None)
@given(digit_texts, st.sampled_from([b"", b"[0.5]" * 820]))
def test_the_digit_scan_finds_exactly_the_runs_of_19(text, prefix):
    import re

    for data in (text, prefix + text, text + prefix):
        assert codec._has_19_digit_run(data) == (re.search(rb"[0-9]{19}", data) is not None)


@pytest.mark.parametrize("where", [0, 500, 1023])
def test_a_big_integer_anywhere_in_a_big_batch_is_read_exactly(where):
    batch = [b"[0.1234, -1.5, 2]"] * 1024
    batch[where] = b"[0.1234, 123456789012345678901, 2]"
    assert codec.parse_strict(batch) is None  # orjson would read it as a float
    assert codec.parse_many(batch)[where][0] == [0.1234, 123456789012345678901, 2]


@pytest.mark.parametrize("depth", [1025, 1100, 100_000])
@pytest.mark.parametrize("shape", ["[{}]", '{{"a":{}}}', "[NaN,{}]"])
def test_values_nested_beyond_the_limit_are_a_value_error_whichever_codec_reads_them(depth: int, shape: str) -> None:
    """orjson refuses beyond 1024 levels; `json` (after it, for NaN) would raise RecursionError near
    1000: both are the worker's ValueError naming the limit, never the interpreter's error."""
    text = "1"
    for _ in range(depth):
        text = shape.format(text)
    for raw in (text.encode(), text):
        with pytest.raises(ValueError, match=f"nest {depth} levels deep, more than the 1024 read"):
            codec.loads(raw)
    assert isinstance(codec.parse_many([text.encode()])[0], ValueError)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    raw = json.dumps(["[" * 2000, {"a": "{" * 2000}, math.nan]).encode()  # NaN: read by `json`
    assert codec.loads(raw)[0] == "[" * 2000


def test_values_nested_within_the_limit_are_read() -> None:
    assert codec.loads(b"[" * 1024 + b"]" * 1024) is not None
    assert codec.loads(b"[" * 900 + b"NaN" + b"]" * 900) is not None


def test_a_shown_value_is_cut_to_a_bounded_length() -> None:
    assert codec.shown("x" * 10) == '"xxxxxxxxxx"'
    assert codec.shown("x" * 10_000) == '"' + "x" * (codec.SHOWN_CHARS - 1) + "…"
    deep: list[object] = []
    for _ in range(5000):
        deep = [deep]
    assert codec.shown(deep) == "(array nested too deep to show)"
