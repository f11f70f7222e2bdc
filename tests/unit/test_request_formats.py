"""Row instances to TF Serving's columnar `inputs`, columnar `outputs` back to rows, and what the worker
reads from the server's metadata."""

from __future__ import annotations

import math
import types
from typing import Any

import pytest

from worker.errors import ModelError
from worker.serving import check_outputs, count_values, values_per_instance
from worker.serving.tfserving import (
    RestPredictor,
    dims_of,
    input_shapes_of,
    input_types_of,
    outputs_declared,
    read_answer,
    rows_of,
    to_columns,
)


def test_bare_instances_become_one_list_and_objects_one_list_per_input():
    assert to_columns([[1, 2], [3, 4]]) == [[1, 2], [3, 4]]
    assert to_columns([{"a": [1], "b": 2}, {"a": [3], "b": 4}]) == {"a": [[1], [3]], "b": [2, 4]}


def test_mixed_instances_are_not_columnar():
    assert to_columns([{"a": 1}, {"b": 2}]) is None
    assert to_columns([{"a": 1}, [2]]) is None


def test_outputs_become_one_prediction_per_instance():
    assert rows_of([[0.1, 0.9], [0.5, 0.5]], 2) == [[0.1, 0.9], [0.5, 0.5]]
    assert rows_of({"total": [1, 2], "ratio": [0.5, "NaN"]}, 2) == [
        {"total": 1, "ratio": 0.5},
        {"total": 2, "ratio": "NaN"},
    ]


def test_outputs_without_one_row_per_instance_are_a_model_error():
    with pytest.raises(ModelError, match="one row per instance"):
        rows_of([[1], [2]], 3)
    with pytest.raises(ModelError, match="one row per instance"):
        rows_of({"a": [1, 2], "b": [1]}, 2)


def test_declared_input_shapes_are_read_from_the_servers_metadata():
    """As TF Serving's GET /v1/models/NAME/metadata gives a signature: sizes as strings, -1 for
    any size, the batch dimension first."""
    signature = {
        "inputs": {
            "x": {
                "dtype": "DT_FLOAT",
                "tensor_shape": {
                    "dim": [{"size": "-1", "name": ""}, {"size": "16", "name": ""}],
                    "unknown_rank": False,
                },
                "name": "serving_default_x:0",
            },
            "tokens": {
                "dtype": "DT_INT64",
                "tensor_shape": {
                    "dim": [{"size": "-1", "name": ""}, {"size": "-1", "name": ""}],
                    "unknown_rank": False,
                },
                "name": "serving_default_tokens:0",
            },
            "any": {"dtype": "DT_STRING", "tensor_shape": {"dim": [], "unknown_rank": True}, "name": "a:0"},
            "scalar": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": [], "unknown_rank": False}, "name": "s:0"},
            "undeclared": {"dtype": "DT_FLOAT", "name": "u:0"},
        },
        "outputs": {},
        "method_name": "tensorflow/serving/predict",
    }
    assert input_shapes_of(signature) == {"x": [16], "tokens": [None], "any": None, "scalar": None, "undeclared": None}
    assert input_types_of(signature) == {
        "x": "float32",
        "tokens": "int64",
        "any": "string",
        "scalar": "float32",
        "undeclared": "float32",
    }


def test_declared_outputs_are_read_from_the_servers_metadata_and_unanswerable_ones_refused():
    """A TensorShapeProto with no dim and no unknown_rank is a scalar, whether the server writes
    the defaults (`"dim": [], "unknown_rank": false`) or leaves them out; types by TF Serving's
    names ("half" for DT_HALF)."""
    signature = {
        "inputs": {},
        "outputs": {
            "scores": {
                "dtype": "DT_FLOAT",
                "tensor_shape": {"dim": [{"size": "-1", "name": ""}, {"size": "3", "name": ""}], "unknown_rank": False},
                "name": "StatefulPartitionedCall:0",
            },
            "total": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": [], "unknown_rank": False}, "name": "s:1"},
            "bare": {"dtype": "DT_INT64", "tensor_shape": {}, "name": "s:2"},
            "any": {"dtype": "DT_STRING", "tensor_shape": {"dim": [], "unknown_rank": True}, "name": "s:3"},
            "undeclared": {"name": "s:4"},
            "half": {"dtype": "DT_HALF", "tensor_shape": {"dim": [{"size": "-1", "name": ""}]}, "name": "s:5"},
        },
    }
    declared = outputs_declared(signature)
    assert declared == {
        "scores": ([None, 3], "float"),
        "total": ([], "float"),
        "bare": ([], "int64"),
        "any": (None, "string"),
        "undeclared": (None, None),
        "half": ([None], "half"),
    }
    with pytest.raises(ModelError) as refused:
        check_outputs(declared, "gs://m/1/")
    assert str(refused.value) == (  # the first output by name
        "model gs://m/1/: output 'bare' is a scalar (shape []), not one row per instance; export the model "
        "with a batch dimension first on every output"
    )
    with pytest.raises(ModelError, match=r"^model gs://m/1/: output 'half' is half, which TF Serving's REST API"):
        check_outputs({"scores": ([None, 3], "float"), "half": ([None], "half")}, "gs://m/1/")
    check_outputs({k: declared[k] for k in ("scores", "any", "undeclared")}, "gs://m/1/")  # nothing to refuse
    # How many values one instance's prediction holds, over the outputs: known only when every
    # output declares every dimension after the batch's.
    assert values_per_instance({"scores": declared["scores"], "half": declared["half"]}) == 4
    assert values_per_instance({"image": ([None, 64, 64, 3], "float")}) == 64 * 64 * 3
    assert values_per_instance({"scores": declared["scores"], "any": declared["any"]}) is None
    assert values_per_instance({"tokens": ([None, None], "int64")}) is None
    # Else they are counted in a prediction as TF Serving answers it: each number, string and
    # {"b64": …} one value, over every output of an object.
    assert count_values(0.5) == count_values("a") == count_values({"b64": "AA=="}) == 1
    assert count_values([[[0.0] * 3] * 4] * 2) == 24
    assert count_values({"mask": [[1, 2], [3, 4]], "label": "cat", "raw": [{"b64": "AA=="}] * 3}) == 8


def test_an_answer_with_text_that_is_not_valid_utf8_reads_it_as_bytes():
    """TF Serving writes text outputs as their bytes (bare NaN too); only the invalid strings
    become {"b64": …}, at any depth."""
    answer = read_answer(b'{"predictions": ["\xc3", "\xc3\xa9t\xc3\xa9", {"k": ["\xff\xfe", 1]}, NaN]}')
    first, valid, nested, nan = answer["predictions"]
    assert first == {"b64": "ww=="}
    assert valid == "été"
    assert nested == {"k": [{"b64": "//4="}, 1]}
    assert math.isnan(nan)
    assert read_answer(b'{"predictions": ["\xc3\xa9"]}') == {"predictions": ["é"]}  # the common answer


def test_the_shape_of_a_json_value_as_a_tensor():
    assert dims_of(0.5) == () and dims_of("text") == () and dims_of({"b64": "AA=="}) == ()
    assert dims_of([0.5] * 15) == (15,)
    assert dims_of([[1, 2, 3], [4, 5, 6]]) == (2, 3)
    assert dims_of([{"b64": "AA=="}, "a"]) == (2,)
    assert dims_of([[1], [2, 3]]) is None  # ragged
    assert dims_of([1, [2]]) is None
    assert dims_of({"x": [1]}) is None  # an object: the server judges it


def test_a_refused_batch_is_refused_for_each_instance_only_for_a_reason_they_all_share():
    """What the worker concludes from the server's metadata once the server has refused a batch."""
    server: Any = types.SimpleNamespace(description="m")
    one = RestPredictor(server, "serving_default", input_shapes={"x": [4]}, input_types={"x": "float32"})
    assert one._shared_refusal([[1.0, 2.0, 3.0]] * 3) == "input 'x' expects instances of shape [4], got [3]"
    assert one._shared_refusal([{"x": [1.0] * 5}, [2.0] * 5]) == "input 'x' expects instances of shape [4], got [5]"
    quoted = [["1", "2", "3", "4"], ["5", "6", "7", "8"]]
    assert one._shared_refusal(quoted) == "input 'x' expects float32 numbers, got values of JSON type string"
    assert one._shared_refusal([[1.0] * 4, [1.0] * 3]) is None  # shapes differ: some may be taken
    assert one._shared_refusal([["1"] * 4, [1.0] * 4]) is None  # one holds numbers only
    assert one._shared_refusal([[2**70] + [1.0] * 3] * 2) is None  # read by a float input; the server says why
    assert one._shared_refusal([[1.0] * 4] * 2) is None  # refused for its values: the server says why
    two = RestPredictor(
        server, "serving_default", input_shapes={"a": [2], "b": None}, input_types={"a": "int64", "b": "string"}
    )
    assert two._shared_refusal([{"a": [1, 2, 3], "b": "x"}] * 2) == "input 'a' expects instances of shape [2], got [3]"
    # Instances all alike that do not name both inputs: each alone is refused just the same.
    named = "this model takes named inputs ['a', 'b']: each instance must be an object with exactly those keys"
    assert two._shared_refusal([{"a": [1, 2, 3]}] * 2) == f"{named}, got ['a']"
    assert two._shared_refusal([[1, 2], [3, 4]]) == f"{named}, got array"
    assert two._shared_refusal([{"a": [1, 2]}, [3, 4]]) is None  # refused for different reasons
    assert two._shared_refusal([{"a": [1, 2]}, {"a": [1, 2], "b": "x"}]) is None  # one is keyed right
    # A string input given the same other JSON types in every instance (numbers for text, say).
    strings = "input 'b' expects strings (or {\"b64\": …} for bytes), got values of JSON type"
    assert two._shared_refusal([{"a": [1, 2], "b": 5}, {"a": [3, 4], "b": 7.5}]) == f"{strings} number"
    assert two._shared_refusal([{"a": [1, 2], "b": [None, "x"]}] * 2) == f"{strings} null"
    assert two._shared_refusal([{"a": [1, 2], "b": 5}, {"a": [3, 4], "b": "x"}]) is None  # one holds a string
    assert two._shared_refusal([{"a": [1, 2], "b": {"b64": "AA=="}}] * 2) is None  # bytes: the server says why
