"""CSV files read as Vertex AI batch prediction reads them: the first row is a header; a double-
quoted cell is a string (`""` inside it is a quote); any other cell is a number; no cell holds a
line break, so each line is one row. A row is one instance: the list of its values in column
order (`instance_type` array, the default), or an object keyed by the header (`instance_type`
object); `key_field`, `included_fields` and `excluded_fields` name header columns.

Rows become JSON lines before the pipeline sees them, so everything after (batches, keys, fields,
output lines, counts) is what it is for JSON lines. The header becomes a blank line (a skipped
line); a row that cannot be read becomes an `Unreadable` line, which makes an error line saying
why.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from collections.abc import Iterator
from typing import Any

from worker import codec
from worker.jobs import Options
from worker.pipeline.lines import Unreadable

# A number as JSON writes one; Python's int() and float() also take "1_000", " 1", "inf", "nan".
_INTEGER = re.compile(rb"-?(?:0|[1-9][0-9]*)")
# The bytes of a row of numbers: digits, signs, points, exponents, commas and blanks.
_NUMBER_BYTES = b"0123456789+-.eE, \t"
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


class RowError(ValueError):
    """A CSV line that is not a row of cells."""


def cells(line: bytes) -> list[Any]:
    """The values of one CSV row: double-quoted cells as strings, the others as numbers."""
    values: list[Any] = []
    at, end = 0, len(line)
    while True:
        if line[at : at + 1] == b'"':
            text, at = _quoted(line, at + 1)
            values.append(text)
            if at < end and line[at : at + 1] != b",":
                raise RowError(f"cell {len(values)} has text after its closing double quote")
        else:
            comma = line.find(b",", at)
            stop = end if comma < 0 else comma
            values.append(_number(line[at:stop].strip(b" \t"), len(values) + 1))
            at = stop
        if at >= end:
            return values
        at += 1  # the comma


def _quoted(line: bytes, at: int) -> tuple[str, int]:
    """The string of the quoted cell that begins at `at` (after its quote), and where it ends."""
    parts = []
    while True:
        quote = line.find(b'"', at)
        if quote < 0:
            raise RowError("a double quote is not closed (a cell may not hold a line break)")
        parts.append(line[at:quote])
        if line[quote + 1 : quote + 2] == b'"':  # "" inside a quoted cell: one quote
            parts.append(b'"')
            at = quote + 2
            continue
        try:
            return b"".join(parts).decode("utf-8"), quote + 1
        except UnicodeDecodeError as e:
            raise RowError(f"a cell is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _number(text: bytes, column: int) -> int | float:
    if _INTEGER.fullmatch(text):
        return int(text)
    if _NUMBER.fullmatch(text):
        return float(text)
    shown = text.decode("utf-8", errors="replace")
    if not text:
        raise RowError(f'cell {column} is empty: a number, or a string in double quotes ("") is expected')
    raise RowError(f"cell {column} ({shown[:40]}) is not a number: write strings in double quotes")


@dataclasses.dataclass
class CsvRows:
    """A CSV file's lines as JSON lines, block by block; `options`, once its header is read, are the
    job's options for this file (fields named by the header)."""

    options: Options
    header: list[str] | None = None

    def blocks(self, blocks: Iterator[list[bytes]]) -> Iterator[list[bytes]]:
        objects = self.options.instance_type == "object" or self._selects
        for block in blocks:
            out: list[bytes] = []
            for raw in block:
                if self.header is None:
                    if raw.strip():
                        self._read_header(raw)
                    out.append(b"")  # the header: a skipped line
                    continue
                if not raw.strip():
                    out.append(raw)
                    continue
                out.append(self._row(raw, objects=objects))
            yield out

    def take_header(self, raw: bytes) -> None:
        """The file's header, read apart from its lines (for a piece of the file that does not begin it)."""
        if raw.strip():
            self._read_header(raw)

    @property
    def _selects(self) -> bool:
        o = self.options
        return o.key_field is not None or o.included_fields is not None or o.excluded_fields is not None

    def _read_header(self, raw: bytes) -> None:
        # Column names, quoted or not, as the csv module reads them.
        self.header = [n.strip() for n in next(csv.reader([raw.decode("utf-8", errors="replace")]), [])]
        o = self.options
        if o.instance_type != "object" and self._selects and o.included_fields is None:
            # An array of the columns sent, in the header's order.
            dropped = {*(o.excluded_fields or ()), *([o.key_field] if o.key_field else [])}
            kept = tuple(n for n in self.header if n not in dropped)
            self.options = dataclasses.replace(o, instance_type="array", included_fields=kept, excluded_fields=None)
        elif o.instance_type != "object" and o.included_fields is not None:
            self.options = dataclasses.replace(o, instance_type="array")

    def _row(self, raw: bytes, *, objects: bool) -> bytes:
        assert self.header is not None
        if not objects and not raw.translate(None, _NUMBER_BYTES) and raw.count(b",") + 1 == len(self.header):
            # A row of numbers alone is a JSON array once bracketed, when JSON reads it so.
            line = b"[" + raw.strip() + b"]"
            try:
                _, strict = codec.parse(line)
            except ValueError:
                pass  # read cell by cell below, which says which cell is wrong
            else:
                if strict:
                    return line
        try:
            values = cells(raw)
        except RowError as e:
            return Unreadable(raw, f"not a CSV row: {e}")
        if len(values) != len(self.header):
            return Unreadable(raw, f"has {len(values)} cells where the header has {len(self.header)}")
        instance: Any = dict(zip(self.header, values, strict=True)) if objects else values
        return codec.dumps(instance)
