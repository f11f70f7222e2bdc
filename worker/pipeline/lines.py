"""One line of input on its way to one line of output: parsed (or an error saying what to fix),
its key and fields, and the output line written."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from worker import codec
from worker.jobs import (
    Options,
)


@dataclass(slots=True)
class Entry:
    """One instance line on its way to an output line."""

    shown: Any  # what the output line echoes: the instance, or its key
    label: str = "instance"  # "key" when `shown` is the key_field value
    feed: Any = None  # what the model receives
    error: str | None = None
    prediction: Any = None
    raw: bytes | None = None  # `shown` as strict JSON text, when it is the whole input line


def entry_of(parsed: tuple[Any, bool] | ValueError, raw: bytes, lineno: int, options: Options) -> Entry:
    """The entry of a line that is not valid JSON, or of an instance under key/fields options
    (plain valid lines are made inline, in `run_file`)."""
    if isinstance(raw, Unreadable):
        return Entry(raw.preview, error=f"line {lineno} {raw.why}")
    if isinstance(raw, TooLong):
        return Entry(
            raw.preview,
            error=f"line {lineno} is longer than {raw.limit:,} bytes (WORKER_MAX_LINE_BYTES) and was not read — is "
            "the file one JSON document (an array of every instance, say)? Write one instance per line, "
            "or raise WORKER_MAX_LINE_BYTES for instances this large",
        )
    if isinstance(parsed, ValueError):
        error = f"line {lineno} is not valid JSON: {parsed}{_not_json_hint(raw)}"
        return Entry(raw.decode("utf-8", errors="replace"), error=error)
    value, _ = parsed
    shown: Any = raw.uri if isinstance(raw, Fetched) else value
    if options.key_field is not None:
        if not isinstance(value, dict) or options.key_field not in value:
            return Entry(value, error=f"line {lineno} has no key field {options.key_field!r}")
        shown = value[options.key_field]
    label = "key" if options.key_field is not None else "instance"
    try:
        feed = _select_fields(value, options)
    except ValueError as e:
        return Entry(shown, label, error=f"line {lineno}: {e}")
    if options.key_field is None and (options.included_fields or options.excluded_fields):
        shown = feed
    return Entry(shown, label, feed=feed)


class Unreadable(bytes):
    """An input line that cannot be an instance, in place of its text: not JSON by construction
    (no batch takes it as an instance), with the line to show and why, for its error line."""

    preview: str
    why: str

    def __new__(cls, raw: bytes, why: str) -> Unreadable:
        line = super().__new__(cls, b"\x01an unreadable line\x01")
        line.preview = raw.decode("utf-8", errors="replace")
        line.why = why
        return line


class Fetched(bytes):
    """The JSON line of a file-list entry, `{"b64": …}`, with the URI its output line shows."""

    uri: str

    def __new__(cls, line: bytes, uri: str) -> Fetched:
        fetched = super().__new__(cls, line)
        fetched.uri = uri
        return fetched


class TooLong(bytes):
    """An input line longer than the limit, in place of its text: not JSON by construction (no
    batch takes it as an instance), with the start of the line to show in its error line."""

    preview: str
    limit: int

    def __new__(cls, raw: bytes, limit: int) -> TooLong:
        line = super().__new__(cls, b"\x01a line too long\x01")
        line.preview = raw[:80].decode("utf-8", errors="replace") + "…"
        line.limit = limit
        return line


# The first line of an indented JSON document, or one of its closing lines.
_INDENTED_JSON_LINES = frozenset((b"{", b"[", b"}", b"]", b"},", b"],"))


def _not_json_hint(raw: bytes) -> str:
    """What to fix in a line that is not JSON, when it is a common slip: a file of indented JSON
    (its first line a lone `{` or `[`), an instance followed by a comma (copied from a JSON array),
    or comma-separated values (CSV) where a JSON array was meant."""
    text = raw.strip()
    if text in _INDENTED_JSON_LINES:
        return (
            " — is the file indented JSON? Each line must hold one whole instance (JSON lines: "
            "one instance per line, no line breaks inside it)"
        )
    if text.endswith(b","):
        try:
            codec.parse(text[:-1])
        except ValueError:
            return ""
        return " — remove the comma at its end (instances copied from a JSON array?): nothing separates JSON lines"
    if b"," in text and text[:1] not in (b"[", b"{", b'"'):
        try:
            codec.parse(b"[" + text + b"]")
        except ValueError:
            pass
        else:
            return " — comma-separated values (CSV?) make one instance when written as a JSON array: [v1, v2, …]"
    if _CSV_HEADER.fullmatch(text):
        return (
            " — a row of column names (a CSV header?): each line of JSON lines is one instance, an array "
            '[v1, v2, …] or an object {"column": v, …}'
        )
    return ""


# Two or more comma-separated names, bare or double-quoted: a CSV file's header row.
_CSV_HEADER = re.compile(rb'\s*(?:[A-Za-z_][\w .-]*|"[^"]*")\s*(?:,\s*(?:[A-Za-z_][\w .-]*|"[^"]*")\s*)+')


# Keys of a TF Serving request body: a whole request written as one line. (Not its columnar
# "inputs": many models name their one input so.)
_REQUEST_BODY_KEYS = ({"instances"}, {"signature_name", "instances"})


def hint_request_bodies(entries: list[Entry]) -> None:
    """Add what to fix to the errors of instances that are whole TF Serving request bodies."""
    for e in entries:
        if e.error is not None and isinstance(e.feed, dict) and e.feed.keys() in _REQUEST_BODY_KEYS:
            e.error += (
                ' — this line is a whole TF Serving request ({"instances": […]}): '
                "write each of its instances on a line of its own"
            )


def _select_fields(value: Any, options: Options) -> Any:
    """Apply key_field / included_fields / excluded_fields / instance_type (one is set) to one instance."""
    if not isinstance(value, dict):
        raise ValueError("instance must be a JSON object when key_field or *_fields options are set")
    if options.included_fields is not None:
        missing = [k for k in options.included_fields if k not in value]
        if missing:
            raise ValueError(f"instance has no field(s) {missing} named in included_fields")
        if options.instance_type == "array":
            return [value[k] for k in options.included_fields]
        return {k: value[k] for k in options.included_fields}
    dropped = set(options.excluded_fields or ())
    if options.key_field is not None:
        dropped.add(options.key_field)
    return {k: v for k, v in value.items() if k not in dropped}


def format_line(e: Entry, options: Options) -> bytes:
    if options.output_format == "predictions":
        return dumps_line(e.prediction if e.error is None else {"error": _error_obj(e.error)})
    if e.raw is not None:
        # The input line is strict JSON: copy it rather than encode the parsed instance again.
        tail = (
            b',"prediction":' + dumps_line(e.prediction)
            if e.error is None
            else b',"error":' + dumps_line(_error_obj(e.error))
        )
        return OPEN[e.label] + e.raw + tail + b"}"
    obj: dict[str, Any] = {e.label: e.shown}
    if e.error is None:
        obj["prediction"] = e.prediction
    else:
        obj["error"] = _error_obj(e.error)
    return dumps_line(obj)


OPEN = {"instance": b'{"instance":', "key": b'{"key":'}


def _error_obj(message: str) -> dict[str, str]:
    return {"status": "INVALID_ARGUMENT", "message": message}


def dumps_line(obj: Any) -> bytes:
    """One strict-JSON line. Non-finite floats (a model's NaN, or NaN in an input line) are not
    JSON: TF Serving writes them bare, we write the strings "NaN", "Infinity", "-Infinity"."""
    return codec.dumps(obj)
