"""TFRecord framing (worker/pipeline/tf_records.py). Files written by TensorFlow itself are read in
tests/integration/test_tf_records.py; here, frames made to order: corrupt, cut short, too long."""

from __future__ import annotations

import base64
import itertools
import json
import struct

import pytest

from worker.errors import InvalidJob
from worker.jobs import Options, input_format_of, output_name
from worker.pipeline.lines import Unreadable
from worker.pipeline.tf_records import Framing, record_blocks, records_before
from worker.storage.formats import tfrecord_crc


def frame(data: bytes, *, data_crc: int | None = None) -> bytes:
    length = struct.pack("<Q", len(data))
    crc = tfrecord_crc(data) if data_crc is None else data_crc
    return length + struct.pack("<I", tfrecord_crc(length)) + data + struct.pack("<I", crc)


def records(data: bytes, chunk: int = 3, limit: int = 1000) -> list[bytes]:
    chunks = iter([data[i : i + chunk] for i in range(0, len(data), chunk)])
    return [line for block in record_blocks(chunks, "gs://b/in/r.tfrecord", limit) for line in block]


def test_each_record_is_a_b64_instance_whatever_the_chunks_cut():
    data = frame(b"first") + frame(b"") + frame(bytes(range(256)))
    for chunk in (1, 7, 4096):
        got = [json.loads(line) for line in records(data, chunk)]
        assert [base64.b64decode(g["b64"]) for g in got] == [b"first", b"", bytes(range(256))]


def test_a_record_whose_data_fails_its_checksum_is_an_error_line_and_the_next_ones_are_read():
    got = records(frame(b"ok") + frame(b"bad", data_crc=1) + frame(b"ok too"))
    assert isinstance(got[1], Unreadable) and not isinstance(got[2], Unreadable)
    assert got[1].why == "(the record at byte 18) fails its checksum: it is corrupt"
    assert base64.b64decode(json.loads(got[2])["b64"]) == b"ok too"


def test_a_record_longer_than_the_limit_is_an_error_line_its_bytes_skipped():
    got = records(frame(b"x" * 50) + frame(b"after"), chunk=8, limit=20)
    assert isinstance(got[0], Unreadable) and "is 50 bytes, more than the 20 WORKER_MAX_LINE_BYTES" in got[0].why
    assert base64.b64decode(json.loads(got[1])["b64"]) == b"after"


def test_a_file_cut_short_fails_naming_the_file_and_the_offset():
    data = frame(b"one") + frame(b"two")
    with pytest.raises(InvalidJob, match=r"^input gs://b/in/r.tfrecord ends inside a record \(the record at byte 19\)"):
        records(data[:-2])


def test_a_length_that_fails_its_checksum_fails_the_job():
    with pytest.raises(InvalidJob, match=r"is not a TFRecord file, or is corrupt: the record at byte 0 has a length"):
        records(b'{"not": "a record"}\n')


def _file() -> tuple[bytes, list[bytes]]:
    """Records of many lengths — empty, one too long to read, one whose data fails its checksum —
    framed as one file, and each record's line as the whole file's reading gives it."""
    data = b"".join(
        frame(bytes([k % 256]) * (k * 7 % 40), data_crc=1 if k == 9 else None) if k != 5 else frame(b"y" * 60)
        for k in range(24)
    )
    return data, records(data, chunk=5, limit=50)


def _piece(data: bytes, start: int, end: int, chunk: int = 5) -> tuple[list[bytes], Framing]:
    framing = Framing(start, end, len(data))
    rest = data[start:]
    chunks = iter([rest[i : i + chunk] for i in range(0, len(rest), chunk)])
    lines = [line for block in record_blocks(chunks, "gs://b/in/r.tfrecord", 50, framing) for line in block]
    return lines, framing


def test_a_file_cut_at_any_byte_gives_each_record_to_the_piece_it_begins_in_once_whole():
    """Cut in two at every byte (in a length, its checksum, data, a record too long to read, a
    corrupt record) and in three at a spread of bytes: the pieces' records, in order, are the
    whole file's, with their error lines; each piece's first record is where the one before it
    found the next, and the last one's records end with the file."""
    data, whole = _file()
    cuts = [[c] for c in range(1, len(data))]
    cuts += [[a, b] for a in range(1, len(data), 37) for b in range(a + 1, len(data), 53)]
    for cut in cuts:
        bounds = [0, *cut, len(data)]
        read, framings = [], []
        for start, end in itertools.pairwise(bounds):
            lines, framing = _piece(data, start, end)
            read += lines
            framings.append(framing)
        assert [bytes(x) for x in read] == [bytes(x) for x in whole], cut
        assert [getattr(x, "why", None) for x in read] == [getattr(x, "why", None) for x in whole], cut
        expected = 0
        for framing in framings:
            if framing.first is not None:
                assert framing.first == expected, cut
                expected = framing.next
            else:  # no record begins in it: the one before it ran on past its end
                assert expected >= framing.end, cut
        assert expected == len(data), cut


def test_records_before_a_record_are_counted_by_their_lengths():
    data, whole = _file()
    offsets = [0]
    while offsets[-1] < len(data):
        (length,) = struct.unpack_from("<Q", data, offsets[-1])
        offsets.append(offsets[-1] + 16 + length)
    assert len(offsets) == len(whole) + 1
    for k, offset in enumerate(offsets):
        chunks = iter([data[i : i + 7] for i in range(0, len(data), 7)])
        assert records_before(chunks, offset) == k


def test_a_piece_that_begins_inside_a_record_whose_data_is_framed_records_fails_or_says_where_it_began():
    """A record whose data is itself a TFRecord file: a piece that begins in it may take its inner
    records for the file's. Read on, they run into the outer record's checksum: the piece fails,
    saying why. Ended before that, its first record is not where the piece before it found the
    next, which the parts' combination checks (tests/unit/test_parts.py)."""
    inner = frame(b"inner one") + frame(b"inner two")
    data = frame(b"first") + frame(inner) + frame(b"last")
    outer = len(frame(b"first"))
    with pytest.raises(InvalidJob, match=r"could not be cut at records: the piece of it from byte 26 found its first "):
        _piece(data, outer + 5, len(data))
    _, before = _piece(data, 0, outer + 5)
    lines, inside = _piece(data, outer + 5, outer + 20)
    assert before.next == len(data) - len(frame(b"last"))
    assert inside.first == outer + 12 != before.next  # the inner record, inside the outer one's data
    assert [base64.b64decode(json.loads(x)["b64"]) for x in lines] == [b"inner one"]


def test_a_piece_in_which_no_record_begins_reads_none():
    data = frame(b"a" * 40) + frame(b"b")
    lines, framing = _piece(data, 20, 40)
    assert lines == [] and framing.first is None


@pytest.mark.parametrize(
    ("rel", "read_as"),
    [
        ("a.tfrecord", "tf-record"),
        ("sub/A.TFRecords", "tf-record"),
        ("b.tfrecord.gz", "tf-record-gzip"),
        ("mnist-train.tfrecord-00000-of-00004", "tf-record"),  # TensorFlow Datasets' shards
        ("mnist-train.tfrecords-00012-of-00100.gz", "tf-record-gzip"),
        ("part-00000-of-00004", "jsonl"),  # known by its content, if at all
        ("a.tfrecord-00000-of-00004.json", "jsonl"),
        ("rows.csv", "csv"),
        ("rows.jsonl", "jsonl"),
    ],
)
def test_a_file_is_read_as_its_name_says_and_its_output_is_json_lines(rel: str, read_as: str):
    options = Options.parse({})
    assert input_format_of(options, rel) == read_as
    assert output_name(rel, read_as) == (rel if read_as == "jsonl" else rel + ".jsonl")
    assert input_format_of(Options.parse({"input_format": "csv"}), rel) == "csv"
