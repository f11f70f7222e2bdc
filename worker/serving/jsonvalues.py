"""Conversions between TF Serving's JSON row format and NumPy arrays, shared by the backends."""

from __future__ import annotations

import base64
import binascii
from fractions import Fraction
from typing import Any

import numpy as np

from worker.codec import type_name
from worker.errors import ModelError
from worker.serving import BATCH_ADVICE, BatchRejected


def decode_strings(value: Any) -> Any:
    """Turn `{"b64": …}` into bytes and str into UTF-8 bytes, at any nesting depth."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict):
        if is_bytes(value):
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, ValueError) as e:
                raise BatchRejected(f'invalid base64 in {{"b64": …}} value: {e}') from e
        raise BatchRejected(
            f'expected a string or {{"b64": …}} for a string input, got an object with keys {sorted(value)}'
        )
    if isinstance(value, list):
        return [decode_strings(v) for v in value]
    raise BatchRejected(f'expected a string or {{"b64": …}} for a string input, got {json_type([value])}')


def is_bytes(value: Any) -> bool:
    """Whether a JSON value is bytes as TF Serving writes them: `{"b64": "<base64 text>"}`."""
    return isinstance(value, dict) and value.keys() == {"b64"} and isinstance(value["b64"], str)


def _bytes_to_json(value: Any, *, as_b64: bool) -> Any:
    if isinstance(value, bytes):
        if not as_b64:
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                pass
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, list):
        return [_bytes_to_json(v, as_b64=as_b64) for v in value]
    return value


def invalid_text_as_b64(value: Any) -> Any:
    """`value` with every string that holds surrogate escapes (bytes that were not valid UTF-8,
    decoded with "surrogateescape") as those bytes, `{"b64": …}`."""
    if isinstance(value, str):
        if any("\udc80" <= c <= "\udcff" for c in value):
            return {"b64": base64.b64encode(value.encode("utf-8", "surrogateescape")).decode("ascii")}
        return value
    if isinstance(value, list):
        return [invalid_text_as_b64(v) for v in value]
    if isinstance(value, dict):
        return {k: invalid_text_as_b64(v) for k, v in value.items()}
    return value


def rows_from_array(name: str, arr: np.ndarray, n: int) -> list[Any]:
    """Split a batched output tensor into `n` JSON-ready per-instance values; an output without
    one row per instance is the model's fault (`ModelError`), as with TF Serving."""
    if arr.ndim == 0 or arr.shape[0] != n:
        raise ModelError(f"output {name!r} has shape {list(arr.shape)}, not one row per instance ({n}); {BATCH_ADVICE}")
    if arr.dtype.kind == "O" or arr.dtype.kind == "S":
        # TF Serving base64-encodes only outputs whose name ends in _bytes; others are text.
        return [_bytes_to_json(v, as_b64=name.endswith("_bytes")) for v in arr.tolist()]
    if arr.dtype == np.float32:
        arr = tf_serving_floats(arr)
    elif arr.dtype.kind == "f" and arr.dtype.itemsize < 8:
        # The same Python floats, exactly, and sooner: NumPy's tolist is slow on float32.
        arr = arr.astype(np.float64)
    # Non-finite floats stay floats here; the output encoder spells them as strings.
    rows: list[Any] = arr.tolist()
    return rows


# -- float32 outputs as TF Serving writes them ---------------------------------------------------
#
# TF Serving's JSON writer (`WriteDecimal` in tensorflow_serving/util/json_tensor.cc) prints a
# float32 with six significant digits ("%g") when that reads back as the same float32, and with
# nine ("%.9g", enough for any float32) otherwise, so 0.2f is written 0.2, not
# 0.20000000298023224. Most float32 values need the nine. The functions below give, for each
# float32, the float64 nearest to the decimal TF Serving writes: encoded as JSON, it is that
# decimal (the encoder writes a float's shortest form), so both backends write the same numbers.

_POW10 = np.array([float(10**k) for k in range(23)])  # exact in float64
_SCALE = np.array([[5], [8]])  # 10**(scale - exponent) brings a value to 6 and to 9 digits
_LOWEST = np.array([[1e5], [1e8]])
_HIGHEST = np.array([[1e6], [1e9]])


def tf_serving_floats(arr: np.ndarray) -> np.ndarray:
    """float32 values → float64 values of the decimals TF Serving writes for them (see above).

    Vectorised: each value is scaled to 6 and to 9 digits by an exact power of ten and rounded;
    the quotient by that power is then the double nearest the decimal (one IEEE rounding of exact
    operands). The 6 digits are kept when they lie strictly inside the float32's rounding interval
    (its bounds are exact in float64). A value where float64 arithmetic could not be sure — a
    scaled value within 1e-6 of a rounding tie, a power of ten beyond 1e22, a decimal on an
    interval bound — is done exactly, one by one, by `tf_serving_float`."""
    flat32 = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
    with np.errstate(invalid="ignore"):  # signalling NaNs
        wide = flat32.astype(np.float64)
        live = np.isfinite(wide) & (wide != 0)  # zeros, NaN and infinities stay as they are
    all_live = bool(live.all())
    mag32 = np.abs(flat32 if all_live else flat32[live])
    mag = mag32.astype(np.float64)
    scale = _SCALE - np.floor(np.log10(mag)).astype(np.int64)  # (2, n)
    if scale.size and scale.min() >= 0 and scale.max() <= 22:  # |values| in [1e-14, 1e6): the usual case
        power = _POW10[scale]
        scaled = mag * power
        digits = np.rint(scaled)
        decimal = digits / power
        sure = np.ones(scale.shape, dtype=bool)
    else:
        sure = np.abs(scale) <= 22
        power = _POW10[np.minimum(np.abs(scale), 22)]
        up = scale >= 0
        scaled = np.where(up, mag * power, mag / power)
        digits = np.rint(scaled)
        decimal = np.where(up, digits / power, digits * power)
    sure &= np.abs(scaled - digits) < 0.5 - 1e-6
    sure &= (scaled >= _LOWEST) & (digits < _HIGHEST)
    six, nine = decimal
    bits = mag32.view(np.uint32)  # positive: the neighbours are one bit pattern away
    low = (mag + (bits - np.uint32(1)).view(np.float32)) * 0.5
    high = (mag + (bits + np.uint32(1)).view(np.float32)) * 0.5
    six_fits = (six > low) & (six < high)
    sure = sure[0] & (six != low) & (six != high) & (six_fits | sure[1])
    values = np.where(six_fits, six, nine)
    np.copysign(values, wide if all_live else wide[live], out=values)
    if all_live:
        out = values
    else:
        out = wide
        out[live] = values
    if not sure.all():
        unsure = np.flatnonzero(~sure)
        for k in unsure if all_live else np.flatnonzero(live)[unsure]:
            out[k] = tf_serving_float(float(flat32[k]))
    result: np.ndarray = out.reshape(np.shape(arr))
    return result


def tf_serving_float(value: float) -> float:
    """One float32 value (given as a Python float) → the float64 of the decimal TF Serving
    writes for it, in exact arithmetic: "%.6g" when it rounds back to the same float32
    (round half to even, as strtof does), else "%.9g"."""
    if value == 0 or value != value or value in (float("inf"), float("-inf")):
        return value
    six = f"{value:.6g}"
    f = np.float32(abs(value))
    exact = Fraction(float(f))
    below = Fraction(float(np.nextafter(f, np.float32(0))))
    with np.errstate(over="ignore"):
        above = np.nextafter(f, np.float32(np.inf))  # infinity above the largest float32
    low = (exact + below) / 2
    high = (exact + Fraction(float(above))) / 2 if np.isfinite(above) else None
    even = int(f.view(np.uint32)) % 2 == 0
    d = abs(Fraction(six))
    inside = (d > low or (d == low and even)) and (high is None or d < high or (d == high and even))
    return float(six if inside else f"{value:.9g}")


def json_type(values: list[Any]) -> str:
    """The JSON types of `values`, as a message names them ("array", "object/string")."""
    return "/".join(sorted({type_name(v) for v in values}))
