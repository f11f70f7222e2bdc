"""CSV rows read as Vertex AI batch prediction reads them (worker/pipeline/csv_rows.py)."""

from __future__ import annotations

import csv
import io
import json

import pytest

from worker.jobs import Options
from worker.pipeline.csv_rows import CsvRows, RowError, cells
from worker.pipeline.lines import Unreadable


def test_quoted_cells_are_strings_and_the_others_numbers():
    assert cells(b'1,-2.5,"a, b","say ""hi""",3e2, 7 ,""') == [1, -2.5, "a, b", 'say "hi"', 300.0, 7, ""]
    assert cells(b'"\xc3\xa9t\xc3\xa9"') == ["été"]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b'1,"open', "a double quote is not closed"),
        (b'"a"b,1', "cell 1 has text after its closing double quote"),
        (b"1,,2", "cell 2 is empty"),
        (b"1,abc", "cell 2 (abc) is not a number: write strings in double quotes"),
        (b"1,nan", "cell 2 (nan) is not a number"),
        (b'"\xff"', "a cell is not UTF-8 text"),
    ],
)
def test_a_line_that_is_not_a_row_of_cells_says_why(line: bytes, why: str):
    with pytest.raises(RowError, match=why.replace("(", r"\(").replace(")", r"\)")):
        cells(line)


def _lines(text: str) -> list[bytes]:
    return [line.encode() for line in text.splitlines()]


def _read(rows: CsvRows, lines: list[bytes]) -> list[bytes]:
    return [line for block in rows.blocks(iter([lines[:2], lines[2:]])) for line in block]


def test_rows_written_by_the_csv_module_become_json_arrays_and_the_header_a_skipped_line():
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC)
    writer.writerow(["x", "y", "label"])
    writer.writerows([[1.5, 2, "cat, tabby"], [0.25, -1, 'a "b"']])
    out = _read(CsvRows(Options()), _lines(buffer.getvalue()))
    assert out[0] == b""
    assert [json.loads(line) for line in out[1:]] == [[1.5, 2.0, "cat, tabby"], [0.25, -1.0, 'a "b"']]


def test_instance_type_object_keys_each_row_by_the_header():
    out = _read(CsvRows(Options(instance_type="object")), _lines('a,"b c"\n1,"x"\n2,"y"\n'))
    assert [json.loads(line) for line in out[1:]] == [{"a": 1, "b c": "x"}, {"a": 2, "b c": "y"}]


def test_key_and_excluded_fields_name_columns_and_the_instance_stays_an_array_in_header_order():
    rows = CsvRows(Options(key_field="id", excluded_fields=("note",)))
    out = _read(rows, _lines('id,x,note,y\n"r1",1,"n",2\n'))
    assert json.loads(out[1]) == {"id": "r1", "x": 1, "note": "n", "y": 2}  # selected by the pipeline
    assert rows.options.instance_type == "array"
    assert rows.options.included_fields == ("x", "y") and rows.options.excluded_fields is None


def test_rows_that_cannot_be_read_become_unreadable_lines_and_blank_lines_stay_blank():
    out = _read(CsvRows(Options()), _lines('a,b\n1,2\n\n1\n1,"2\n3,4\n'))
    assert [line for line in out if not isinstance(line, Unreadable)] == [b"", b"[1,2]", b"", b"[3,4]"]
    bad = [line for line in out if isinstance(line, Unreadable)]
    assert [b.why for b in bad] == [
        "has 1 cells where the header has 2",
        "not a CSV row: a double quote is not closed (a cell may not hold a line break)",
    ]
    assert [b.preview for b in bad] == ["1", '1,"2']


def test_a_header_alone_is_one_skipped_line():
    assert _read(CsvRows(Options()), [b"a,b"]) == [b""]


@pytest.mark.parametrize("line", [b"1,2", b" -1.5 , 3e2", b"0,-0.0001", b"12345678901234567890123,1", b"1,true"])
def test_a_row_of_numbers_reads_as_the_cell_by_cell_reading_does(line: bytes):
    """Rows without quotes are read whole as a JSON array when JSON reads them as numbers alone;
    anything else (a bare `true`, an integer beyond 64 bits) goes cell by cell."""
    [_, got] = _read(CsvRows(Options()), [b"a,b", line])
    try:
        want = cells(line)
    except RowError as e:
        assert isinstance(got, Unreadable) and got.why == f"not a CSV row: {e}"
    else:
        assert json.loads(got) == want
