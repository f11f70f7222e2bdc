"""float32 outputs come out as TF Serving writes them: six significant digits when they read back
as the same float32, nine otherwise (tensorflow_serving/util/json_tensor.cc, `WriteDecimal`)."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import codec
from worker.serving.jsonvalues import rows_from_array, tf_serving_float, tf_serving_floats


def _nearest_float32(d: Fraction) -> np.float32:
    """strtof's answer for a positive decimal, found independently of the code under test: the
    nearest of the float32 values around it, ties to the even bit pattern."""
    guess = np.float32(float(d))
    candidates = [guess]
    with np.errstate(over="ignore"):
        for _ in range(2):
            candidates += [np.nextafter(c, np.float32(np.inf)) for c in candidates]
            candidates += [np.nextafter(c, np.float32(0)) for c in candidates]
    finite = {float(c): c for c in candidates if np.isfinite(c)}
    return min(finite.values(), key=lambda c: (abs(Fraction(float(c)) - d), int(np.float32(c).view(np.uint32)) % 2))


def reference(value: np.float32) -> float:
    """What TF Serving writes for `value`, read back as a float64."""
    v = float(value)
    if not math.isfinite(v) or v == 0:
        return v
    six = f"{v:.6g}"
    if _nearest_float32(abs(Fraction(six))) == np.float32(abs(v)):
        return float(six)
    return float(f"{v:.9g}")


def same(a: float, b: float) -> bool:
    return (a == b and math.copysign(1, a) == math.copysign(1, b)) or (math.isnan(a) and math.isnan(b))


def test_known_values_come_out_as_tf_serving_writes_them() -> None:
    values = np.array([0.2, 0.1, 1 / 3, 0.5, 16777216, 3.4028235e38, 1e-45, -2.5e-8, 123456.7], np.float32)
    assert tf_serving_floats(values).tolist() == [
        0.2,  # not 0.20000000298023224
        0.1,
        0.333333343,
        0.5,
        16777216.0,
        3.40282347e38,
        1.4013e-45,  # the smallest subnormal: six digits read back as itself
        -2.5e-08,
        123456.703,
    ]
    assert codec.dumps(tf_serving_floats(np.array([0.2, 1 / 3], np.float32)).tolist()) == b"[0.2,0.333333343]"


def test_zeros_and_non_finite_values_are_kept() -> None:
    out = tf_serving_floats(np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 0.7], np.float32)).tolist()
    assert [same(a, b) for a, b in zip(out, [0.0, -0.0, math.nan, math.inf, -math.inf, 0.7], strict=True)] == [True] * 6


def test_ties_and_decade_edges_match_the_exact_rule() -> None:
    # 2**-10 is 0.0009765625: "%.6g" rounds its tie to 0.000976562, which is another float32.
    edges = [2.0**-10, 2.0**-20, 9.9999997e-1, 9.999995e-1, 999999.94, 1e6, 1e-5, 1e-14, 1e-15, 1e22, 1e23, 1e30]
    values = np.array(edges + [-e for e in edges], np.float32)
    got = tf_serving_floats(values)
    assert [same(g, reference(v)) for g, v in zip(got.tolist(), values, strict=True)] == [True] * len(values)
    assert got[0] == 0.0009765625


def test_every_kind_of_float32_matches_the_exact_rule() -> None:
    """Random bit patterns cover every exponent: normal, subnormal, huge, NaN and infinities."""
    rng = np.random.default_rng(7)
    values = rng.integers(0, 2**32, 20_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    got = tf_serving_floats(values).tolist()
    want = [reference(v) for v in values]
    assert [v for v, g, w in zip(values, got, want, strict=True) if not same(g, w)] == []
    # The one-by-one exact path agrees with the reference too.
    assert all(same(tf_serving_float(float(v)), w) for v, w in zip(values[:2000], want[:2000], strict=True))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=50))
def test_model_outputs_read_back_as_the_same_float32(values: list[float]) -> None:
    arr = np.array(values, np.float32)
    got = tf_serving_floats(arr)
    assert [same(g, reference(v)) for g, v in zip(got.tolist(), arr, strict=True)] == [True] * len(arr)
    # Never a different float32, and never more than nine significant digits in the output.
    assert np.array_equal(got.astype(np.float32), arr)
    for text in json.loads(codec.dumps(got.tolist()).decode(), parse_float=str):
        mantissa = text.lstrip("-").split("e")[0].replace(".", "").lstrip("0")
        assert len(mantissa.rstrip("0") or "0") <= 9, text


def test_rows_keep_their_shape_and_float64_outputs_stay_exact() -> None:
    batch = np.array([[[0.1, 0.2]], [[0.3, 1 / 3]]], np.float32)
    assert rows_from_array("scores", batch, 2) == [[[0.1, 0.2]], [[0.3, 0.333333343]]]
    doubles = np.array([0.1 + 0.2, 1 / 3])
    assert rows_from_array("scores", doubles, 2) == [0.30000000000000004, 1 / 3]
