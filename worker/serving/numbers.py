"""TF Serving's rules for JSON numbers fed to numeric inputs, for the in-process backend.

TF Serving (`AddValueToTensor` and `IsLosslessDecimal` in tensorflow_serving/util/json_tensor.cc,
with rapidjson's reading of numbers) takes:

- for a float input, JSON numbers that convert without loss: an integer up to ±(2**24 − 1)
  (float64: ±(2**53 − 1)) — an integer beyond 64 bits is a double to rapidjson, so it only has
  to fit the type's range — and any other number within the type's range; NaN and the
  infinities written as such. Booleans are not numbers;
- for an integer input, integers only (not 1.0), within its type's range (int8, int16 and uint8
  take any 32-bit integer and keep its low bits); not booleans;
- for a boolean input, booleans only.

The input has already been converted (by TensorFlow or NumPy) when these run: the converted array
says where a refused value could be — a boolean became 0 or 1, a lossy integer is large, an
overflow is infinite — so only those places are looked at in the JSON values, and a batch of
ordinary numbers costs a few vectorised comparisons.
"""

from __future__ import annotations

import math
from itertools import chain
from typing import Any

import numpy as np

from worker.serving import BatchRejected
from worker.serving.refusals import numbers_refusal

_FLOAT_LIMITS = {  # (largest integer taken, largest magnitude taken)
    np.dtype(np.float32): (2**24 - 1, float(np.finfo(np.float32).max)),
    np.dtype(np.float64): (2**53 - 1, float(np.finfo(np.float64).max)),
}
_RAPIDJSON_INTEGERS = (-(2**63), 2**64 - 1)  # rapidjson keeps these as integers, others as doubles


def check_floats(name: str, values: list[Any], arr: np.ndarray) -> None:
    """Refuse `values` (converted to the float array `arr`) where TF Serving would."""
    largest_int, largest = _FLOAT_LIMITS.get(arr.dtype, (None, None))
    if largest_int is None or not arr.size:
        return
    if _any_boolean(values, arr):
        raise BatchRejected(numbers_refusal(name, arr.dtype.name, "boolean"))
    with np.errstate(invalid="ignore"):
        large = ~(np.abs(arr) <= largest_int)  # NaN and the infinities too
    for value in _values_at(values, large):
        if isinstance(value, int) and _RAPIDJSON_INTEGERS[0] <= value <= _RAPIDJSON_INTEGERS[1]:
            lossy = abs(value) > largest_int
        else:  # a double to rapidjson: a float, or an integer beyond 64 bits; NaN and ±inf pass
            lossy = abs(value) > largest and (isinstance(value, int) or math.isfinite(value))
        if lossy:
            raise BatchRejected(
                f"input {name!r}: {value} cannot be converted to {arr.dtype.name} without loss of precision "
                f"(it takes integers up to ±{largest_int} and numbers up to ±{largest:.8g})"
            )


def integers(name: str, dtype_name: str, values: list[Any], arr: np.ndarray, target: np.dtype[Any]) -> np.ndarray:
    """`arr` (NumPy's reading of `values`) as integers of `target`, refusing what TF Serving
    refuses: numbers written as decimals, booleans, and integers out of the input's range, which
    NumPy's cast would wrap without a word (2**63 into int64 gives -2**63)."""
    exact: list[Any] | None = None
    if arr.dtype.kind == "f":
        # NumPy also reads integers that need int64 and uint64 together (-1 and 2**63) as floats.
        exact = _leaves(values, arr.ndim)
        if not all(isinstance(v, int) for v in exact):
            raise BatchRejected(
                f"input {name!r} expects integers ({dtype_name}), got numbers written with a "
                "decimal point or an exponent (such as 2.5 or 1.0)"
            )
    if not arr.size:
        return arr.astype(target)
    if arr.dtype.kind == "b" or _any_boolean(values, arr):
        raise BatchRejected(f"input {name!r} expects integers ({dtype_name}), got values of JSON type boolean")
    low, high = _integer_range(target)
    smallest, largest = (min(exact), max(exact)) if exact is not None else (int(arr.min()), int(arr.max()))
    if smallest < low or largest > high:
        raise BatchRejected(
            f"input {name!r} takes integers from {low} to {high} ({dtype_name}), "
            f"got {smallest if smallest < low else largest}"
        )
    return np.array(values, dtype=target) if exact is not None else arr.astype(target, copy=False)


def check_booleans(name: str, arr: np.ndarray) -> None:
    """TF Serving's boolean inputs take JSON true and false only, not 0 and 1."""
    if arr.size and arr.dtype.kind != "b":
        raise BatchRejected(f"input {name!r} expects booleans (true or false), got numbers")


def _any_boolean(values: list[Any], arr: np.ndarray) -> bool:
    """Whether a JSON boolean is among `values`: only where `arr` (their conversion) holds 0 or 1."""
    return bool in set(map(type, _values_at(values, (arr == 0) | (arr == 1))))


def _values_at(values: list[Any], where: np.ndarray) -> list[Any]:
    """The JSON values at the places `where` marks in their conversion (same shape)."""
    places = np.flatnonzero(where)
    if len(places) > 64:  # many: flattening the lists costs less than indexing each place
        return list(map(_leaves(values, where.ndim).__getitem__, places.tolist()))
    found = []
    for index in zip(*(axis.tolist() for axis in np.unravel_index(places, where.shape)), strict=True):
        value: Any = values
        for i in index:
            value = value[i]
        found.append(value)
    return found


def _leaves(values: list[Any], ndim: int) -> list[Any]:
    """The scalars of rectangular nested lists `ndim` deep (as converted), in order."""
    found: list[Any] = values
    for _ in range(ndim - 1):
        found = list(chain.from_iterable(found))
    return found


def _integer_range(target: np.dtype[Any]) -> tuple[int, int]:
    """The JSON integers TF Serving takes for an integer input: those of its type, except that
    int8, int16 and uint8 take any 32-bit integer (and keep its low bits, as a C cast does)."""
    if target in (np.int8, np.int16, np.uint8):
        target = np.dtype(np.int32)
    info = np.iinfo(target)
    return int(info.min), int(info.max)
