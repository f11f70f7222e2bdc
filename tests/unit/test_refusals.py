"""Why instances are refused (worker/serving/refusals.py), as both backends say it: pure, so
tested here on values; tests/integration/test_serving.py checks both backends say the same."""

from __future__ import annotations

import pytest

from worker.serving import BatchRejected
from worker.serving.refusals import inputs_of, named_inputs_refusal, numbers_refused, strings_refused

ONE_INPUT = (
    'this model takes one input, \'x\': an instance that is an object must be {"x": …} (or {"b64": …} for bytes)'
)


def test_a_signature_of_one_input_takes_its_values_bare_or_named_and_bytes_as_b64() -> None:
    assert inputs_of(["x"], [[1, 2], [3, 4]]) == {"x": [[1, 2], [3, 4]]}
    assert inputs_of(["x"], [{"x": [1, 2]}, [3, 4]]) == {"x": [[1, 2], [3, 4]]}
    assert inputs_of(["x"], [{"b64": "AA=="}, {"x": {"b64": "AQ=="}}]) == {"x": [{"b64": "AA=="}, {"b64": "AQ=="}]}


def test_objects_keyed_otherwise_are_refused_each_when_all_have_the_same_keys() -> None:
    with pytest.raises(BatchRejected) as alike:
        inputs_of(["x"], [{"features": [1]}, {"features": [2]}])
    assert alike.value.each and alike.value.message == f"{ONE_INPUT}, got one with keys ['features']"
    with pytest.raises(BatchRejected) as mixed:
        inputs_of(["x"], [{"x": [1], "id": 1}, [2]])
    assert not mixed.value.each  # the bare instance alone is taken
    assert mixed.value.message.startswith(f"{ONE_INPUT}, got one with keys ['id', 'x']: 'id' is not an input")


def test_a_signature_of_several_inputs_takes_objects_of_exactly_their_names() -> None:
    assert inputs_of(["a", "b"], [{"a": 1, "b": 2}, {"b": 3, "a": 4}]) == {"a": [1, 4], "b": [2, 3]}
    with pytest.raises(BatchRejected) as arrays:
        inputs_of(["a", "b"], [[1, 2], [3, 4]])
    assert arrays.value.each and arrays.value.message.endswith("got array")
    with pytest.raises(BatchRejected) as one_bad:
        inputs_of(["a", "b"], [{"a": 1, "b": 2}, [3, 4]])
    assert not one_bad.value.each


def test_wrong_json_types_are_refused_each_only_when_every_instance_holds_the_same() -> None:
    refused = strings_refused("text", [1, 2])
    assert refused is not None and refused.each
    assert refused.message == "input 'text' expects strings (or {\"b64\": …} for bytes), got values of JSON type number"
    assert strings_refused("text", ["a", {"b64": "AA=="}]) is None
    mixed = strings_refused("text", ["a", 2])
    assert mixed is not None and not mixed.each
    quoted = numbers_refused("x", "float32", [["1", "2"], ["3", "4"]])
    assert quoted is not None and quoted.each
    assert quoted.message == "input 'x' expects float32 numbers, got values of JSON type string"
    assert numbers_refused("x", "float32", [[1, 2.5], [True, 0]]) is None  # booleans read as numbers
    # An integer beyond 64 bits is never refused for every instance: a float input reads it.
    huge = numbers_refused("x", "int64", [[2**64], [2**65]])
    assert huge is not None and not huge.each


def test_fields_beside_the_inputs_are_named_with_the_options_that_keep_them_out() -> None:
    assert named_inputs_refusal(["a", "b"], {"a": 1, "b": 2, "id": 3, "ts": 4}) == (
        "this model takes named inputs ['a', 'b']: each instance must be an object with exactly those keys, got "
        "['a', 'b', 'id', 'ts']: 'id', 'ts' are not inputs — name one in options.key_field to write it as each "
        "line's key, or leave them out with options.excluded_fields"
    )
    # Missing an input: no such hint.
    assert named_inputs_refusal(["a", "b"], {"a": 1, "id": 3}) == (
        "this model takes named inputs ['a', 'b']: each instance must be an object with exactly those keys, got "
        "['a', 'id']"
    )
    assert named_inputs_refusal(["a", "b"], {"b": 1, "a": 2}) is None
