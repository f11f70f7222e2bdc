"""JSON for the hot path: orjson where it gives the same answer as the standard library, the
standard library where it does not.

Parsing and encoding lines is much of a job's work; orjson does both several times faster than
`json`. It is strict where `json` is lenient, so each function
falls back to `json` in exactly those cases, and results never depend on which codec ran:

- input: bare `NaN`/`Infinity` (which TF Serving's REST API accepts), UTF-16/32 text → parsed by
  `json`; so is any line with a run of 19 digits, because orjson silently turns integers beyond
  64 bits into floats. Arrays and objects nest at most MAX_DEPTH levels (orjson's limit): `json`
  is asked only after that is checked, so a deeper value is a `ValueError`, never the
  interpreter's `RecursionError`;
- output: orjson writes non-finite floats as `null`, so any `null` in its output means the value
  is re-encoded by `json`, which spells them `"NaN"`, `"Infinity"`, `"-Infinity"` (JSON has no
  NaN, and a real null stays null); integers beyond 64 bits also go to `json`.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np
import orjson

# Digits → "0", anything else → " ": a run of 19 digits is then a substring search, cheaper per
# line than a regular expression.
_DIGITS = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_19_DIGITS = b"0" * 19
# From this many bytes on, NumPy finds the runs sooner than the substring search; below it,
# NumPy's cost per call dominates.
_VECTOR_SCAN_BYTES = 4096


def _has_19_digit_run(data: bytes) -> bool:
    """Whether `data` holds 19 digits in a row, the shortest integer orjson may read wrongly."""
    if len(data) < _VECTOR_SCAN_BYTES:
        return _19_DIGITS in data.translate(_DIGITS)
    run = (np.frombuffer(data, dtype=np.uint8) - 48) < 10  # ASCII digit (bytes below "0" wrap)
    # run[i] becomes "digits at i..i+k-1" for k = 2, 4, 8, 16, then 19 (16 from i and 16 from i+3).
    for step in (1, 2, 4, 8, 3):
        run = run[:-step] & run[step:]
    return bool(run.any())


# Arrays and objects nested deeper than this are refused: orjson's own limit. (`json` recurses
# once per level, and would hit the interpreter's recursion limit, 1000 frames, near there.)
MAX_DEPTH = 1024
# A JSON string, to leave out when counting brackets (possessive: linear on any input).
_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.S)


def _depth_beyond_limit(raw: bytes | str) -> int:
    """How deep arrays and objects nest in JSON text when that is deeper than MAX_DEPTH (brackets
    inside strings not counted), else 0."""
    text = raw if isinstance(raw, str) else raw.decode(json.detect_encoding(raw), "replace")
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return 0  # no value nests deeper than it has brackets
    skeleton = np.frombuffer(_STRING.sub("", text).encode("utf-8", "replace"), dtype=np.uint8)
    step = np.isin(skeleton, (0x5B, 0x7B)).astype(np.int32) - np.isin(skeleton, (0x5D, 0x7D))
    depth = int(np.cumsum(step).max(initial=0))
    return depth if depth > MAX_DEPTH else 0


def _json_loads(raw: bytes | str) -> Any:
    """`json.loads`, refusing values nested deeper than MAX_DEPTH with a ValueError."""
    depth = _depth_beyond_limit(raw)
    if depth:
        raise ValueError(f"arrays and objects nest {depth} levels deep, more than the {MAX_DEPTH} read")
    try:
        return json.loads(raw)
    except RecursionError:  # within MAX_DEPTH, yet deeper than this thread's stack lets `json` go
        raise ValueError(f"arrays and objects nest too deep to read (at most {MAX_DEPTH} levels)") from None


def loads(raw: bytes | str) -> Any:
    """A JSON value; raises ValueError (or UnicodeDecodeError) as `json.loads` would."""
    return parse(raw)[0]


def parse(raw: bytes | str) -> tuple[Any, bool]:
    """(value, strict): `strict` is True when `raw` is strict JSON (no NaN, UTF-8), which can then
    be copied into output as it is instead of being encoded again."""
    if isinstance(raw, bytes) and not _has_19_digit_run(raw):
        try:
            return orjson.loads(raw), True
        except orjson.JSONDecodeError:
            pass
    return _unicode(_json_loads(raw)), False


def _unicode(value: Any) -> Any:
    """`value`, refused (ValueError) when a string in it holds half of a UTF-16 surrogate pair
    (`"\\ud800"` with no `\\udc00` after it): `json` reads one, but it is no Unicode text —
    orjson and TF Serving refuse it, and it cannot be written out as UTF-8."""
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        half = f"\\u{ord(e.object[e.start]):04x}"
        raise ValueError(f"a string holds {half}, half of a UTF-16 surrogate pair without the other half") from None
    except RecursionError:  # deeper than `json` writes: what reads it next says so
        pass
    return value


def parse_strict(raws: list[bytes]) -> list[Any] | None:
    """Every line's value when every line is strict JSON that orjson reads as json would (the
    common batch); None otherwise, for `parse_many` to take them one by one."""
    if _has_19_digit_run(b" ".join(raws)):
        return None
    try:
        loads_ = orjson.loads
        return [loads_(raw) for raw in raws]
    except orjson.JSONDecodeError:
        return None


def dumps_each(objs: list[Any]) -> list[bytes]:
    """`dumps` of each value, in one pass where orjson's answers are all good."""
    try:
        dumps_ = orjson.dumps
        out = [dumps_(obj) for obj in objs]
    except TypeError:
        return [dumps(obj) for obj in objs]
    if b"null" in b"".join(out):
        return [dumps(obj) for obj in objs]
    return out


def parse_many(raws: list[bytes]) -> list[tuple[Any, bool] | ValueError]:
    """`parse` of each line, or the error that line raised; one digit scan for the whole batch."""
    values = parse_strict(raws)
    if values is not None:
        return [(value, True) for value in values]
    return [_parse_or_error(raw) for raw in raws]


def _parse_or_error(raw: bytes) -> tuple[Any, bool] | ValueError:
    try:
        return parse(raw)
    except ValueError as e:  # UnicodeDecodeError is a ValueError too
        return e


def dumps(obj: Any) -> bytes:
    """Compact strict JSON (UTF-8, no NaN: non-finite floats become strings)."""
    return _orjson_dumps(obj) or _dumps_std(obj)


def dumps_request(obj: Any) -> bytes:
    """JSON for a TF Serving request: non-finite floats bare (`NaN`), as its REST API reads them."""
    return _orjson_dumps(obj) or json.dumps(obj).encode()


def _orjson_dumps(obj: Any) -> bytes | None:
    """orjson's encoding, or None where it would differ from json's: integers beyond 64 bits, and
    any `null` in its output (a NaN or Infinity it turned into null, or a real null)."""
    try:
        out = orjson.dumps(obj)
    except TypeError:
        return None
    return None if b"null" in out else out


def _dumps_std(obj: Any) -> bytes:
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


_JSON_TYPE_NAMES = {str: "string", dict: "object", list: "array", type(None): "null", bool: "boolean"}


def type_name(value: Any) -> str:
    """The JSON type of a parsed value, as a message to a person names it ("number", "null")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


# A value quoted in a message or a log line is cut after this many characters: a message's
# values come from whoever sent it, and a report of them must fit a Pub/Sub message and a log entry.
SHOWN_CHARS = 200


def shown(value: Any) -> str:
    """A parsed value as JSON text, for a message (`null`, `"64"`), not as Python's repr; cut to
    SHOWN_CHARS characters (ending in "…")."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    except RecursionError:
        text = f"({type_name(value)} nested too deep to show)"
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "…"
