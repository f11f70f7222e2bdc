"""Conversions between TF Serving's JSON row format and NumPy arrays, shared by the backends."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

from worker.serving import BatchRejected


def decode_strings(value: Any) -> Any:
    """Turn `{"b64": …}` into bytes and str into UTF-8 bytes, at any nesting depth."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict):
        if set(value) == {"b64"} and isinstance(value["b64"], str):
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, ValueError) as e:
                raise BatchRejected(f'invalid base64 in {{"b64": …}} value: {e}') from e
        raise BatchRejected(
            f'expected a string or {{"b64": …}} for a string input, got an object with keys {sorted(value)}'
        )
    if isinstance(value, list):
        return [decode_strings(v) for v in value]
    raise BatchRejected(f'expected a string or {{"b64": …}} for a string input, got {type(value).__name__}')


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


def rows_from_array(name: str, arr: np.ndarray, n: int) -> list[Any]:
    """Split a batched output tensor into `n` JSON-ready per-instance values."""
    if arr.ndim == 0 or arr.shape[0] != n:
        raise ValueError(
            f"output {name!r} has shape {list(arr.shape)}, not one row per instance ({n}); "
            "export the model with a batch dimension first on every output"
        )
    if arr.dtype.kind == "O" or arr.dtype.kind == "S":
        # TF Serving base64-encodes only outputs whose name ends in _bytes; others are text.
        return [_bytes_to_json(v, as_b64=name.endswith("_bytes")) for v in arr.tolist()]
    if arr.dtype.kind == "f" and arr.dtype.itemsize < 8:
        # The same Python floats, exactly, and 4× sooner: NumPy's tolist is slow on float32.
        arr = arr.astype(np.float64)
    # Non-finite floats stay floats here; the output encoder spells them as strings.
    rows: list[Any] = arr.tolist()
    return rows
