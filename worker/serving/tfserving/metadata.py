"""What TF Serving's model metadata says of a signature: its inputs' shapes and types, its
outputs' declared shapes. Pure functions over the metadata's JSON."""

from __future__ import annotations

from typing import Any

from worker.serving import (
    DeclaredOutput,
)


def input_shapes_of(signature_def: Any) -> dict[str, list[int | None] | None]:
    """Each input's declared shape per instance, from the server's metadata (`tensor_shape`: the
    batch dimension first, -1 for any size); None where it declares none, or none per instance."""
    inputs = signature_def.get("inputs") if isinstance(signature_def, dict) else None
    return {name: dims[1:] if (dims := _declared_shape(info)) else None for name, info in (inputs or {}).items()}


def outputs_declared(signature_def: Any) -> dict[str, DeclaredOutput]:
    """Each output's shape and type ("float", "half") as the server's metadata declares them: a
    `TensorShapeProto` with no `dim` and no `unknown_rank` is a scalar; None where not declared."""
    declared: dict[str, DeclaredOutput] = {}
    outputs = signature_def.get("outputs") if isinstance(signature_def, dict) else None
    for name, info in (outputs or {}).items():
        dtype = info.get("dtype") if isinstance(info, dict) else None
        type_name = dtype[3:].lower() if isinstance(dtype, str) and dtype.startswith("DT_") else None
        declared[name] = (_declared_shape(info), type_name)
    return declared


def _declared_shape(info: Any) -> list[int | None] | None:
    """A tensor's shape as the server's metadata declares it (`tensor_shape`, the batch dimension
    first): its sizes, None for a size of any value (-1); [] for a scalar (a `TensorShapeProto`
    with no `dim` and no `unknown_rank`); None when it declares no rank."""
    shape = info.get("tensor_shape") if isinstance(info, dict) else None
    if not isinstance(shape, dict) or shape.get("unknown_rank"):
        return None
    dims = shape.get("dim", [])
    return [_size(d) for d in dims] if isinstance(dims, list) else None


def _size(dim: Any) -> int | None:
    """A `TensorShapeProto.Dim`'s size as JSON gives it ({"size": "3"}); None for -1 (any size)."""
    try:
        size = int(dim.get("size", -1)) if isinstance(dim, dict) else -1
    except (TypeError, ValueError):
        return None
    return size if size >= 0 else None


# TF Serving's numeric and string types, by the names the in-process backend's messages give them.
_TYPES = {
    "DT_FLOAT": "float32",
    "DT_DOUBLE": "float64",
    **{f"DT_{t.upper()}": t for t in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")},
    "DT_STRING": "string",
}


def input_types_of(signature_def: Any) -> dict[str, str]:
    """The signature's numeric and string inputs and their types, from the server's metadata."""
    inputs = signature_def.get("inputs") if isinstance(signature_def, dict) else None
    return {
        name: _TYPES[info["dtype"]]
        for name, info in (inputs or {}).items()
        if isinstance(info, dict) and info.get("dtype") in _TYPES
    }


def dims_of(value: Any) -> tuple[int, ...] | None:
    """The shape of a JSON value as a tensor: () for a number, a string or `{"b64": …}`; the sizes
    of nested arrays; None when they are ragged, hold other objects, or nest too deep to walk."""
    if isinstance(value, dict):
        return () if set(value) == {"b64"} else None
    if not isinstance(value, list):
        return ()
    if not any(isinstance(v, (list, dict)) for v in value):
        return (len(value),)
    try:
        inner = {dims_of(v) for v in value}
    except RecursionError:
        return None
    if len(inner) != 1 or (sub := inner.pop()) is None:
        return None
    return (len(value), *sub)
