"""The in-process backend turns JSON instances into tensors: float inputs through TensorFlow's own
reading of nested lists, the rest (and whatever that refuses) through NumPy. Whichever route a
batch takes, the predictions must be those of NumPy's conversion, and what neither takes is
rejected with a reason that names the input, the type or the shape."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localdev import models
from worker.errors import ModelError
from worker.serving import BatchRejected
from worker.serving.jsonvalues import tf_serving_floats
from worker.serving.tf_backend import NotFromJson, TensorFlowModel, TensorFlowSignature

pytestmark = pytest.mark.integration

FEATURES = 16


@pytest.fixture(scope="module")
def mlp(model_dirs: dict[str, Path]) -> TensorFlowSignature:
    return TensorFlowModel(str(model_dirs["mlp"]), description="mlp").predictor("serving_default")


@pytest.fixture(scope="module")
def two_io(model_dirs: dict[str, Path]) -> TensorFlowSignature:
    return TensorFlowModel(str(model_dirs["two_io"]), description="two_io").predictor("serving_default")


@pytest.fixture(scope="module")
def numpy_reference(model_dirs: dict[str, Path]) -> Any:
    """The MLP's scores with the batch converted by NumPy (float64, then float32), rows as JSON
    (float32 scores written as TF Serving writes them, as every backend does)."""
    import tensorflow as tf

    fn = tf.saved_model.load(str(model_dirs["mlp"])).signatures["serving_default"]

    def predict(instances: list[Any]) -> list[Any]:
        with np.errstate(over="ignore"):  # beyond float32's range: infinity, as in TensorFlow
            x = np.asarray(instances).astype(np.float32)
        rows: list[Any] = tf_serving_floats(fn(x=tf.constant(x))["scores"].numpy()).tolist()
        return rows

    return predict


def same_json(a: Any, b: Any) -> bool:
    """Equal to the last digit, NaN equal to NaN (unlike with ==). The tests here compare the backend
    with `numpy_reference` on the same rows in one call each: the same batch by construction, so
    the same kernels and sums, and the same float32 results on any CPU (see tests/outputs.py)."""
    return json.dumps(a) == json.dumps(b)


# Normal float32 magnitudes (TensorFlow flushes subnormals to zero, as its kernels do), beyond
# float32's range too, integers of every size, and the other JSON values that convert to numbers.
number = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: v == 0 or abs(v) >= 1.2e-38),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-(2**80), 2**80),
    st.sampled_from([0, 1, 2**24 - 1, 2**24, -(2**24), 2**64 - 1, 2**64, 3.4028234e38, 3.4028236e38, 0.0, 1.0]),
    st.booleans(),
)
FLOAT32_MAX = 3.4028234663852886e38


def tf_serving_takes_as_float32(value: Any) -> bool:
    """TF Serving's rule (IsLosslessDecimal in json_tensor.cc, numbers as rapidjson reads them)."""
    if isinstance(value, bool):
        return False  # not a JSON number
    if isinstance(value, int) and -(2**63) <= value <= 2**64 - 1:
        return abs(value) <= 2**24 - 1  # an integer to rapidjson
    return not math.isfinite(value) or abs(value) <= FLOAT32_MAX  # a double to rapidjson


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.lists(number, min_size=FEATURES, max_size=FEATURES), min_size=1, max_size=12))
def test_predictions_are_those_of_numpy_s_conversion_where_tf_serving_takes_the_numbers(
    rows: list[list[Any]], mlp: TensorFlowSignature, numpy_reference: Any
) -> None:
    if all(tf_serving_takes_as_float32(v) for row in rows for v in row):
        assert same_json(mlp.predict(rows), numpy_reference(rows))
    else:
        with pytest.raises(BatchRejected):
            mlp.predict(rows)


def test_a_batch_of_plain_floats_is_predicted_exactly_as_numpy_converts_it(
    mlp: TensorFlowSignature, numpy_reference: Any
) -> None:
    rng = np.random.default_rng(3)
    rows = rng.normal(0, 3, (1024, FEATURES)).round(4).tolist()
    rows[5] = [int(v) for v in rows[5]]  # integers are numbers too
    assert mlp.predict(rows) == numpy_reference(rows)  # one batch of 1024 both ways: equal to the last digit


def test_an_integer_beyond_64_bits_in_a_float_input_is_read_as_the_nearest_float(
    mlp: TensorFlowSignature, numpy_reference: Any
) -> None:
    big = [2**64 + 1] + [0.5] * (FEATURES - 1)
    assert mlp.predict([big]) == numpy_reference([[float(v) for v in big]])


@pytest.mark.parametrize(
    ("instance", "reason"),
    [
        (["0.5"] * FEATURES, "input 'x' expects float32 numbers, got values of JSON type string"),
        ([0.5] * (FEATURES - 1) + [None], "input 'x' expects float32 numbers, got values of JSON type null"),
        ({"y": [1.0] * FEATURES}, "this model takes one input, 'x': an instance that is an object must be {\"x\": …}"),
        ([1.0] * (FEATURES - 1) + [[1.0]], "input 'x': instances are not rectangular arrays"),
        ([1.0] * 3, "input 'x' expects instances of shape [16], got [3]"),
        ([True] + [0.5] * (FEATURES - 1), "input 'x' expects float32 numbers, got values of JSON type boolean"),
        ([0.5] * (FEATURES - 1) + [2**24], "input 'x': 16777216 cannot be converted to float32 without loss"),
        ([1e39] + [0.5] * (FEATURES - 1), "input 'x': 1e+39 cannot be converted to float32 without loss"),
        ([[1.0] * FEATURES], "input 'x' expects instances of shape [16], got [1, 16]"),
    ],
)
def test_what_neither_route_takes_is_rejected_with_its_reason(
    mlp: TensorFlowSignature, instance: Any, reason: str
) -> None:
    good = [0.25] * FEATURES
    with pytest.raises(BatchRejected):
        mlp.predict([good, instance, good])
    with pytest.raises(BatchRejected) as e:  # then the pipeline predicts it alone, for its reason
        mlp.predict([instance])
    assert str(e.value).startswith(reason), str(e.value)


def test_a_batch_all_of_a_wrong_shape_is_refused_for_each_instance(mlp: TensorFlowSignature) -> None:
    """Every instance of a rectangular batch has its shape: each alone would be refused the same,
    so the pipeline writes their error lines without predicting them one by one."""
    with pytest.raises(BatchRejected) as all_wrong:
        mlp.predict([[0.5] * 3] * 5)
    assert all_wrong.value.each and all_wrong.value.message == "input 'x' expects instances of shape [16], got [3]"
    with pytest.raises(BatchRejected) as mixed:  # some of them would be predicted
        mlp.predict([[0.5] * FEATURES, [0.5] * 3])
    assert not mixed.value.each


def test_a_batch_all_of_numbers_written_as_strings_is_refused_for_each_instance(mlp: TensorFlowSignature) -> None:
    message = "input 'x' expects float32 numbers, got values of JSON type string"
    with pytest.raises(BatchRejected) as quoted:
        mlp.predict([["0.5"] * FEATURES, ["1"] + [0.5] * (FEATURES - 1)])
    assert quoted.value.each and quoted.value.message == message
    for some_good in ([[0.5] * FEATURES, ["0.5"] * FEATURES], [["0.5"] * FEATURES, [None] * FEATURES]):
        with pytest.raises(BatchRejected) as mixed:  # not each: alone, one is taken or says "null"
            mlp.predict(some_good)
        assert not mixed.value.each


def test_string_instances_of_several_shapes_are_isolated_not_refused_together_or_crashing(
    model_dirs: dict[str, Path],
) -> None:
    """NumPy makes an object array of strings of any shapes without a word ("a" and ["b"]: 2
    elements, bytes and a list): such a batch is refused as not rectangular, so the pipeline
    isolates its instances, not refused for each (it wrote good instances as errors) nor a crash
    (TensorFlow's ValueError failed the whole job)."""
    strings = TensorFlowModel(str(model_dirs["strings"]), description="strings").predictor("serving_default")
    for mixed in (["a", ["b"]], [["a"], "b"], [[], ["a"]]):
        with pytest.raises(BatchRejected) as refused:
            strings.predict(mixed)
        assert not refused.value.each
        assert refused.value.message == "input 'text': instances are not rectangular arrays of one shape"
    assert strings.predict(["a"]) == [{"length": 1, "upper_bytes": {"b64": "QQ=="}}]
    with pytest.raises(BatchRejected) as alone:  # the pipeline then sends the list alone: its reason
        strings.predict([["b"]])
    assert alone.value.each and alone.value.message == "input 'text' expects instances of shape [], got [1]"


def test_a_batch_all_of_other_json_types_for_a_string_input_is_refused_for_each_instance(
    model_dirs: dict[str, Path],
) -> None:
    strings = TensorFlowModel(str(model_dirs["strings"]), description="strings").predictor("serving_default")
    message = "input 'text' expects strings (or {\"b64\": …} for bytes), got values of JSON type number"
    with pytest.raises(BatchRejected) as numbers:  # token ids for a model of raw text, say
        strings.predict([5, 7.5, 2])
    assert numbers.value.each and numbers.value.message == message
    with pytest.raises(BatchRejected) as alone:
        strings.predict([5])
    assert alone.value.message == message
    for some_good in (["a", 5], [5, None]):
        with pytest.raises(BatchRejected) as mixed:  # not each: alone, one is taken or says "null"
            strings.predict(some_good)
        assert not mixed.value.each
    with pytest.raises(BatchRejected) as bad_b64:
        strings.predict([{"b64": "not base64!"}])
    assert bad_b64.value.message.startswith("input 'text': invalid base64 in {\"b64\": …} value")


def test_named_float_and_integer_inputs_each_take_their_route(two_io: TensorFlowSignature) -> None:
    got = two_io.predict([{"a": [1.0, 2.0, 3.0, 4.0], "b": 2}, {"a": [1, 1, 1, 1], "b": 0}])
    assert got[0] == {"total": 12.0, "ratio": 5.0}
    assert got[1]["total"] == 4.0 and math.isinf(got[1]["ratio"])
    with pytest.raises(BatchRejected, match="expects integers"):
        two_io.predict([{"a": [1.0, 2.0, 3.0, 4.0], "b": 2.5}])
    with pytest.raises(BatchRejected, match="input 'b' expects int64 numbers, got values of JSON type integer beyond"):
        two_io.predict([{"a": [1.0, 2.0, 3.0, 4.0], "b": 2**64}])


def test_booleans_are_not_integers(two_io: TensorFlowSignature) -> None:
    a = [1.0, 2.0, 3.0, 4.0]
    for batch in ([{"a": a, "b": True}], [{"a": a, "b": 0}, {"a": a, "b": False}]):  # alone, or read as 0
        with pytest.raises(BatchRejected) as e:
            two_io.predict(batch)
        assert str(e.value) == "input 'b' expects integers (int64), got values of JSON type boolean"


def test_what_tf_serving_takes_for_a_float_input_is_predicted(mlp: TensorFlowSignature, numpy_reference: Any) -> None:
    # Integers up to 2**24 - 1, an integer beyond 64 bits (a double to TF Serving), floats within
    # float32's range however large, and NaN and infinity written as such.
    rows = [[2**24 - 1, -(2**24 - 1), 2**70, 3.4e38, 16777216.0, 0, 1, 0.0] + [0.5] * (FEATURES - 8)]
    rows.append([math.nan, math.inf] + [0.5] * (FEATURES - 2))
    assert same_json(mlp.predict(rows), numpy_reference(rows))


@pytest.mark.parametrize("b", [2**63, 2**64 - 1])
def test_an_integer_beyond_the_input_s_range_is_rejected_not_wrapped(two_io: TensorFlowSignature, b: int) -> None:
    # NumPy reads 2**63 as uint64, and its cast to int64 would give -2**63 without a word.
    with pytest.raises(BatchRejected) as e:
        two_io.predict([{"a": [1.0, 2.0, 3.0, 4.0], "b": 1}, {"a": [1.0, 2.0, 3.0, 4.0], "b": b}])
    assert str(e.value) == (
        f"input 'b' takes integers from -9223372036854775808 to 9223372036854775807 (int64), got {b}"
    )
    edges = two_io.predict([{"a": [0.0] * 4, "b": 2**63 - 1}, {"a": [0.0] * 4, "b": -(2**63)}])
    assert [p["total"] for p in edges] == [9.22337204e18, -9.22337204e18]  # 2**63 as a float32


@pytest.mark.parametrize(("dtype", "name"), [("float16", "half"), ("uint16", "uint16")])
def test_an_input_type_tf_serving_cannot_fill_from_json_is_refused_in_its_words(
    tmp_path: Path, dtype: str, name: str
) -> None:
    typed = TensorFlowModel(str(models.build_typed(tmp_path / dtype, dtype)), description=dtype)
    with pytest.raises(NotFromJson) as e:
        typed.predictor("serving_default").predict([[3, 1, 2, 0]])
    assert e.value.tf_serving_message == f"Conversion of JSON Value: 3 to type: {name}"
    assert str(e.value).startswith(f"input 'x' is {name}, which TF Serving's REST API cannot fill from JSON")


def test_every_input_type_tf_serving_fills_from_json_is_taken(tmp_path: Path) -> None:
    for dtype in ("float64", "int8", "int16", "int32", "int64", "uint8", "uint32", "uint64"):
        typed = TensorFlowModel(str(models.build_typed(tmp_path / dtype, dtype)), description=dtype)
        assert typed.predictor("serving_default").predict([[3, 1, 2, 0]]) == [6.0]


def test_a_boolean_input_takes_true_and_false_and_says_so_for_anything_else(tmp_path: Path) -> None:
    flags = TensorFlowModel(str(models.build_typed(tmp_path / "bool", "bool")), description="bool")
    predictor = flags.predictor("serving_default")
    assert predictor.predict([[True, False, True, True]]) == [3.0]
    for instance, got in (([0, 1, 0, 1], "got numbers"), (["true"] * 4, "got values of JSON type string")):
        with pytest.raises(BatchRejected) as refused:
            predictor.predict([instance])
        assert refused.value.message == f"input 'x' expects booleans (true or false), {got}"


def test_an_instance_of_nested_lists_of_several_lengths_is_refused_in_words_about_the_instance(
    two_io: TensorFlowSignature,
) -> None:
    """Not NumPy's words, which name the batch's dimensions ("the detected shape was (1, 2) + …")."""
    with pytest.raises(BatchRejected) as refused:
        two_io.predict([{"a": [[1, 2], [3]], "b": 1}])
    assert refused.value.message == "input 'a': instances are not rectangular arrays of one shape"


def test_an_output_without_a_row_per_instance_is_the_model_s_fault(tmp_path: Path) -> None:
    """An output reduced over the batch (a scalar) is refused from the signature, before any
    prediction; an output of the wrong number of rows at the first batch. Either way the job fails
    saying what to export, instead of every line failing or the job ending in an internal error."""
    import tensorflow as tf

    class Unbatched(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def serve(self, x: Any) -> Any:
            return {"total": tf.reduce_sum(x), "rows": x}

    module = Unbatched()
    tf.saved_model.save(module, str(tmp_path / "m"), signatures={"serving_default": module.serve})
    with pytest.raises(ModelError, match=r"^model m: output 'total' is a scalar \(shape \[\]\), not one row per"):
        TensorFlowModel(str(tmp_path / "m"), description="m").predictor("serving_default")

    first = models.build_unbatched(tmp_path / "first", "first")
    predictor = TensorFlowModel(str(first), description="first").predictor("serving_default")
    with pytest.raises(ModelError, match=r"output 'first' has shape \[1, 2\], not one row per instance \(2\); export"):
        predictor.predict([[1, 2], [3, 4]])


def test_a_batch_too_big_for_memory_goes_in_halves_and_one_instance_too_big_fails_the_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """TensorFlow's out-of-memory error: the batch is predicted again in halves, and later ones no
    bigger; an instance that cannot be predicted alone fails the job saying so."""
    model = TensorFlowModel(str(models.build_greedy(tmp_path / "m")), description="gs://b/greedy/1/")
    predictor = model.predictor("serving_default")
    with caplog.at_level(logging.WARNING, logger="worker.serving.tf_backend"):
        assert predictor.predict([[0, 5], [0, 1], [0, 2]]) == [5.0, 1.0, 2.0]
        assert predictor.predict([[0, 3], [0, 4]]) == [3.0, 4.0]  # one at a time from the start
    warned = [r.getMessage() for r in caplog.records if "from now on" in r.getMessage()]
    assert len(warned) == 1, warned
    assert warned[0].startswith("model gs://b/greedy/1/: ran out of memory (OOM when allocating tensor")
    assert warned[0].endswith("on 3 instances: at most 1 per call from now on")
    with pytest.raises(ModelError, match=r"ran out of memory on one instance \(OOM when allocating"):
        predictor.predict([[1, 2]])
