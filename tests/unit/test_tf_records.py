"""TFRecord framing (worker/pipeline/tf_records.py). Files written by TensorFlow itself are read in
tests/integration/test_tf_records.py; here, frames made to order: corrupt, cut short, too long."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from worker.errors import InvalidJob
from worker.pipeline.lines import Unreadable
from worker.pipeline.tf_records import record_blocks
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
