"""TF Serving's rules for JSON numbers, on inputs of the types the test models do not have."""

from __future__ import annotations

import numpy as np
import pytest

from worker.serving import BatchRejected, numbers


def test_boolean_inputs_take_true_and_false_only():
    numbers.check_booleans("flag", np.asarray([True, False]))
    with pytest.raises(BatchRejected, match="input 'flag' expects booleans"):
        numbers.check_booleans("flag", np.asarray([True, 1]))


@pytest.mark.parametrize(
    ("dtype", "values", "expected"),
    [
        (np.int8, [300, -1], [44, -1]),  # any 32-bit integer, its low bits kept, as TF Serving does
        (np.uint8, [256 + 7], [7]),
        (np.uint64, [1, 2**63], [1, 2**63]),  # NumPy reads these as floats; they are integers
        (np.int32, [2**31 - 1, -(2**31)], [2**31 - 1, -(2**31)]),
    ],
)
def test_integers_in_range_are_converted_exactly(dtype, values, expected):
    assert numbers.integers("n", "t", values, np.asarray(values), np.dtype(dtype)).tolist() == expected


@pytest.mark.parametrize(
    ("dtype", "values", "reason"),
    [
        (np.int8, [2**31], "takes integers from -2147483648 to 2147483647 (t), got 2147483648"),
        (np.uint32, [-1], "takes integers from 0 to 4294967295 (t), got -1"),
        (np.uint64, [-1, 2**63], "takes integers from 0 to 18446744073709551615 (t), got -1"),
        (np.int64, [[1, 2], [3, 2.5]], "expects integers (t), got numbers written with a decimal point"),
        (np.int64, [[1, 2], [3, True]], "expects integers (t), got values of JSON type boolean"),
    ],
)
def test_integers_tf_serving_refuses_are_refused(dtype, values, reason):
    with pytest.raises(BatchRejected) as e:
        numbers.integers("n", "t", values, np.asarray(values), np.dtype(dtype))
    assert str(e.value).startswith(f"input 'n' {reason}"), str(e.value)


def test_float64_inputs_take_integers_up_to_2_to_the_53():
    ok = [[2**53 - 1, 1e300], [float(2**60), 2**80]]
    numbers.check_floats("x", ok, np.asarray(ok, dtype=np.float64))
    lossy = [[2**53, 0.5]]
    with pytest.raises(BatchRejected, match="9007199254740992 cannot be converted to float64 without loss"):
        numbers.check_floats("x", lossy, np.asarray(lossy, dtype=np.float64))


def test_many_places_to_look_at_find_the_same_values_as_few():
    rows = [[0.0] * 100 for _ in range(3)]
    rows[2][99] = True
    with pytest.raises(BatchRejected, match="JSON type boolean"):
        numbers.check_floats("x", rows, np.asarray(rows, dtype=np.float32))
    rows = [[0.5] * 100 for _ in range(3)]
    rows[2][99] = True
    with pytest.raises(BatchRejected, match="JSON type boolean"):
        numbers.check_floats("x", rows, np.asarray(rows, dtype=np.float32))
