"""Why a model refuses instances, said the same by both backends: the in-process one finds it as
it builds its input tensors, the TF Serving one after the server refused a batch (the server's
own message may name the batch's size, "In[0]: [1024,15]", where one instance's would not).

A refusal is `each` when every instance of the batch is refused alike: each alone would be
refused just the same, so the pipeline need not try them one by one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from worker.codec import type_name
from worker.serving import BatchRejected
from worker.serving.jsonvalues import is_bytes, json_type

_HUGE_INTEGER = "integer beyond 64 bits"


def inputs_of(names: list[str], instances: list[Any]) -> dict[str, list[Any]]:
    """Each input's values, one per instance, as TF Serving's row format reads instances: a
    signature of one input takes its value, or `{name: value}` (bytes are `{"b64": …}`); one of
    several inputs takes objects with exactly their names as keys. `BatchRejected` when the
    instances are not so, saying why."""
    if len(names) == 1:
        return {names[0]: _one_input(names[0], instances)}
    refusals = [named_inputs_refusal(names, i) for i in instances]
    first = next((r for r in refusals if r is not None), None)
    if first is not None:
        raise BatchRejected(first, each=all(r == first for r in refusals))
    return {name: [i[name] for i in instances] for name in names}


def _one_input(name: str, instances: list[Any]) -> list[Any]:
    """The values of a signature's one input: each instance, or its value when it is `{name: value}`."""
    if dict not in set(map(type, instances)):
        return instances
    values = [i[name] if isinstance(i, dict) and set(i) == {name} else i for i in instances]
    named = next((v for v in values if isinstance(v, dict) and set(v) != {"b64"}), None)
    if named is not None:  # not the input's name, nor bytes: an id beside it, say
        each = all(isinstance(v, dict) and v.keys() == named.keys() for v in values)
        raise BatchRejected(one_input_refusal(name, named), each=each)
    return values


def strings_refused(name: str, values: list[Any]) -> BatchRejected | None:
    """When the values of the string input `name` hold other JSON types (numbers for a text
    input, say): its refusal; else None."""
    others = not_strings(values)
    if not others:
        return None
    each = all(not_strings([v]) == others for v in values)
    return BatchRejected(strings_refusal(name, "/".join(sorted(others))), each=each)


def numbers_refused(name: str, type_name: str, values: list[Any]) -> BatchRejected | None:
    """When the values of the numeric input `name` (of `type_name`, "float32") hold other JSON
    types (numbers written as strings, say): its refusal; else None. Integers beyond 64 bits
    are never refused `each`: a float input reads them, and refuses them only as inexact."""
    others = not_numbers(values)
    if not others:
        return None
    each = _HUGE_INTEGER not in others and all(not_numbers([v]) == others for v in values)
    return BatchRejected(numbers_refusal(name, type_name, "/".join(sorted(others))), each=each)


def not_numbers_refusal(name: str, type_name: str, values: list[Any]) -> BatchRejected:
    """The refusal of values that do not make an array of numbers for the numeric input `name`."""
    return numbers_refused(name, type_name, values) or BatchRejected(
        numbers_refusal(name, type_name, json_type(values))
    )


# -- the messages ---------------------------------------------------------------------------


def shape_refusal(name: str, want: list[int | None] | None, got: list[int]) -> str | None:
    """Why input `name`, declared `want` per instance (None: a dimension of any size; `want` None:
    any shape), does not take instances of shape `got`; None when it does."""
    if want is None or (len(got) == len(want) and all(w is None or w == g for w, g in zip(want, got, strict=True))):
        return None
    return f"input {name!r} expects instances of shape {_shape_text(want)}, got {_shape_text(got)}"


def numbers_refusal(name: str, dtype: str, types: str) -> str:
    """Why numeric input `name` (of `dtype`, "float32") does not take values of these JSON types."""
    wanted = "booleans (true or false)" if dtype == "bool" else f"{dtype} numbers"
    return f"input {name!r} expects {wanted}, got values of JSON type {types}"


def ragged_refusal(name: str) -> str:
    """Why input `name` does not take instances whose nested lists differ in length, or a batch
    of instances of several shapes."""
    return f"input {name!r}: instances are not rectangular arrays of one shape"


def strings_refusal(name: str, types: str) -> str:
    """Why string input `name` does not take values of these JSON types."""
    return f'input {name!r} expects strings (or {{"b64": …}} for bytes), got values of JSON type {types}'


def _shape_text(dims: list[int | None] | list[int]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def named_inputs_refusal(names: list[str], instance: Any) -> str | None:
    """Why `instance` is not an object with exactly the inputs `names` that a signature of several
    inputs takes; None when it is."""
    if isinstance(instance, dict) and instance.keys() == set(names):
        return None
    got = sorted(instance) if isinstance(instance, dict) else json_type([instance])
    return (
        f"this model takes named inputs {names}: each instance must be an object with exactly those keys, "
        f"got {got}{keys_hint(names, instance)}"
    )


def one_input_refusal(name: str, instance: dict[str, Any]) -> str:
    """Why an object instance is refused by a signature of the one input `name` (when it is not
    `{name: value}`, nor bytes)."""
    return (
        f'this model takes one input, {name!r}: an instance that is an object must be {{"{name}": …}} '
        f'(or {{"b64": …}} for bytes), got one with keys {sorted(instance)}{keys_hint([name], instance)}'
    )


def keys_hint(names: list[str], instance: Any) -> str:
    """What to do about an object instance's keys that are not the model's inputs (an id beside the
    features, say), when it holds every input; "" otherwise."""
    if not isinstance(instance, dict) or not set(names) <= instance.keys():
        return ""
    extra = sorted(set(instance) - set(names))
    one = len(extra) == 1
    return (
        f": {', '.join(map(repr, extra))} {'is not an input' if one else 'are not inputs'} — name "
        f"{'it' if one else 'one'} in options.key_field to write it as each line's key, or leave "
        f"{'it' if one else 'them'} out with options.excluded_fields"
    )


def not_numbers(values: list[Any]) -> set[str]:
    """The JSON types inside the arrays that are not numbers (booleans count as numbers here, as
    NumPy reads them; an integer beyond 64 bits is named for what it is)."""
    return _leaf_types_refused(values, _not_a_number)


def not_strings(values: list[Any]) -> set[str]:
    """The JSON types inside the arrays that are not strings (nor `{"b64": …}`, which is bytes)."""
    return _leaf_types_refused(values, _not_a_string)


def _not_a_number(value: Any) -> str | None:
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        return "integer beyond 64 bits"
    return None if isinstance(value, (int, float)) else type_name(value)


def _not_a_string(value: Any) -> str | None:
    return None if isinstance(value, str) or is_bytes(value) else type_name(value)


def _leaf_types_refused(values: list[Any], refused: Callable[[Any], str | None]) -> set[str]:
    """What `refused` names (a JSON type) for the values inside the arrays that an input does not take."""
    names, stack = set(), list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
        elif (name := refused(value)) is not None:
            names.add(name)
    return names
