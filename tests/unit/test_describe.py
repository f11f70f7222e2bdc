"""The example instance `python -m worker describe` writes for an input, from its declared shape."""

from __future__ import annotations

from worker.describe import _example


def test_an_example_value_has_the_inputs_shape_and_type_with_one_where_any_size_goes() -> None:
    assert _example([16], "float") == [0.0] * 16
    assert _example([-1, 3], "int64") == [[0, 0, 0]]  # a variable length: one
    assert _example([2], "bool") == [False, False]
    assert _example([], "string") == ""
    assert _example(None, "double") == 0.0  # a shape of unknown rank: a scalar
