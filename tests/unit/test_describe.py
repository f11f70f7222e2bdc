"""The example instance `python -m worker describe` writes for an input, from its declared shape."""

from __future__ import annotations

from worker.describe import _example


def test_an_example_value_has_the_inputs_shape_and_type_with_one_where_any_size_goes() -> None:
    assert _example([16], "float") == [0.0] * 16
    assert _example([-1, 3], "int64") == [[0, 0, 0]]  # a variable length: one
    assert _example([2], "bool") == [False, False]
    assert _example([], "string") == ""
    assert _example(None, "double") == 0.0  # a shape of unknown rank: a scalar


def test_a_vector_of_numbers_gets_a_csv_example_and_a_string_input_a_tf_record_note() -> None:
    from worker.describe import other_formats

    assert other_formats({"x": {"dtype": "float", "shape": [-1, 3]}}) == {"example_csv": "c0,c1,c2\n0.0,0.0,0.0\n"}
    assert other_formats({"a": {"dtype": "float", "shape": [-1]}, "b": {"dtype": "int64", "shape": [-1]}}) == {
        "example_csv": "a,b\n0.0,0\n",
        "example_csv_options": {"instance_type": "object"},
    }
    assert "example_tf_record" in other_formats({"examples": {"dtype": "string", "shape": [-1]}})
    # An image per instance, or several inputs of vectors: no row of cells holds one.
    assert other_formats({"image": {"dtype": "float", "shape": [-1, 8, 8, 3]}}) == {}
    assert other_formats({"a": {"dtype": "float", "shape": [-1, 4]}, "b": {"dtype": "int64", "shape": [-1]}}) == {}
