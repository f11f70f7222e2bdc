"""TFRecord files read as Vertex AI batch prediction reads them: each record is one instance,
`{"b64": "<the record, base64>"}` (a serialized tf.Example, say, for a model that parses them).

A record is framed by its length (8 bytes, little-endian), the masked CRC32C of that length
(4 bytes), its data and the masked CRC32C of its data (4 bytes). Records become JSON lines before
the pipeline sees them, one per record, so everything after is what it is for JSON lines. A record
whose data fails its checksum is an `Unreadable` line (an error line, counted); a length that
fails its checksum, or a file that ends inside a record, fails the job naming the file and the
byte offset: what follows cannot be framed. Memory stays bounded: a record longer than the line
limit is an error line, its bytes skipped as they arrive.

A piece of a file (cut at any byte, for a job run as parts) holds the records that begin in its
bytes [start, end). Where its first begins is found by the framing itself: the first offset from
`start` where a length checks out against its checksum, and the length after that record's data
does too (or the file ends there). Data that merely looks framed is as unlikely as two checksums
agreeing by chance; and each piece says where its records began and where the next one's should
(`Framing`), which the parts' combination checks meet, so a file that fooled it fails its job
rather than lose or repeat a record.
"""

from __future__ import annotations

import base64
import dataclasses
import struct
from collections.abc import Iterator

from worker.errors import InvalidJob
from worker.pipeline.lines import Unreadable
from worker.storage.formats import tfrecord_crc

_HEADER_BYTES = 12  # the length and its checksum
_FOOTER_BYTES = 4  # the data's checksum


@dataclasses.dataclass
class Framing:
    """A piece of a TFRecord file of `size` bytes: the records that begin in [start, end). Once
    read: `first`, where its first record began (None when none begins in it), and `next`, where
    the record after its last begins (the next piece's first, or the file's end)."""

    start: int
    end: int
    size: int
    first: int | None = None
    next: int | None = None


def record_blocks(
    chunks: Iterator[bytes], where: object, max_record_bytes: int, framing: Framing | None = None
) -> Iterator[list[bytes]]:
    """The records of a TFRecord file (its bytes in `chunks`) as JSON lines, a list per chunk; of
    a piece of it, with `framing` (its bytes from `framing.start` on in `chunks`), its records."""
    reader = _Reader(where, max_record_bytes, framing)
    if framing is not None and framing.start:
        found = _first_record(chunks, framing, max_record_bytes)
        if found is None:
            return
        reader.buffer, reader.at = found
    if framing is not None:
        framing.first = reader.at
    for chunk in _then(chunks):
        reader.buffer += chunk
        if out := reader.records():
            yield out
        if reader.done:
            return
    if reader.buffer or reader.skipping:
        raise InvalidJob(
            f"input {where} ends inside a record (the record at byte {reader.at:,}): the file was cut short — "
            "upload it again"
        )
    if framing is not None:
        framing.next = reader.at


class _Reader:
    """The records framed in a buffer of a TFRecord file's bytes, as they arrive."""

    def __init__(self, where: object, max_record_bytes: int, framing: Framing | None) -> None:
        self.where, self.max_record_bytes, self.framing = where, max_record_bytes, framing
        self.buffer = bytearray()
        self.at = 0  # the file's offset of buffer[0]
        self.skipping = 0  # bytes of a record too long still to drop, as they arrive
        self.done = False  # a piece's records all read: the next is the next piece's

    def records(self) -> list[bytes]:
        """The records the buffer holds whole, as JSON lines (or `Unreadable` lines), taken from it."""
        out: list[bytes] = []
        while True:
            if self.skipping:
                dropped = min(self.skipping, len(self.buffer))
                del self.buffer[:dropped]
                self.at, self.skipping = self.at + dropped, self.skipping - dropped
                if self.skipping:
                    return out
            if self.framing is not None and self.at >= self.framing.end:  # the next piece's record
                self.framing.next, self.done = self.at, True
                return out
            record = self._record()
            if record is None:
                return out
            out.append(record)

    def _record(self) -> bytes | None:
        """The record at the buffer's start, taken from it; None until the buffer holds it whole."""
        buffer, at = self.buffer, self.at
        if len(buffer) < _HEADER_BYTES:
            return None
        length, length_crc = struct.unpack_from("<QI", buffer)
        if tfrecord_crc(bytes(buffer[:8])) != length_crc:
            framing = self.framing
            if framing is not None and framing.start and framing.first is not None:
                raise InvalidJob(
                    f"input {self.where} could not be cut at records: the piece of it from byte {framing.start:,} "
                    f"found its first record at byte {framing.first:,}, and at byte {at:,} a length that fails its "
                    "checksum (a record's data framed like records, or a corrupt record) — send the job again with "
                    "another job_id and without parts"
                )
            raise InvalidJob(
                f"input {self.where} is not a TFRecord file, or is corrupt: the record at byte {at:,} has a length "
                "that fails its checksum — check the file, or its input_format"
            )
        if length > self.max_record_bytes:
            self.skipping = _HEADER_BYTES + length + _FOOTER_BYTES
            return Unreadable(
                b"",
                f"(the record at byte {at:,}) is {length:,} bytes, more than the {self.max_record_bytes:,} "
                "WORKER_MAX_LINE_BYTES allows; it was not read",
            )
        end = _HEADER_BYTES + length + _FOOTER_BYTES
        if len(buffer) < end:
            return None
        data = bytes(buffer[_HEADER_BYTES : _HEADER_BYTES + length])
        (data_crc,) = struct.unpack_from("<I", buffer, _HEADER_BYTES + length)
        del buffer[:end]
        self.at += end
        if tfrecord_crc(data) != data_crc:
            return Unreadable(b"", f"(the record at byte {at:,}) fails its checksum: it is corrupt")
        return b'{"b64":"' + base64.b64encode(data) + b'"}'


def _then(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The chunks after an empty one: what was read before them is framed first."""
    yield b""
    yield from chunks


def _first_record(chunks: Iterator[bytes], framing: Framing, max_record_bytes: int) -> tuple[bytearray, int] | None:
    """The bytes from the first record that begins in the piece on (as far as read), and its
    offset; None when none does. `chunks` hold the file's bytes from `framing.start`."""
    buffer, at, i = bytearray(), framing.start, 0  # buffer[0] is at byte `at`; buffer[i], a candidate
    while at + i < framing.end:
        if not _holds(buffer, chunks, i + _HEADER_BYTES):
            return None  # the file ends before: no record begins here
        if _is_record(buffer, chunks, i, at + i, framing.size, max_record_bytes):
            del buffer[:i]
            return buffer, at + i
        i += 1
        if i >= 1 << 16:  # what was looked at goes
            del buffer[:i]
            at, i = at + i, 0
    return None


def _holds(buffer: bytearray, chunks: Iterator[bytes], n: int) -> bool:
    """Whether `buffer` holds n bytes, once chunks are added to it as needed."""
    while len(buffer) < n:
        chunk = next(chunks, None)
        if chunk is None:
            return False
        buffer += chunk
    return True


def _is_record(
    buffer: bytearray, chunks: Iterator[bytes], i: int, offset: int, size: int, max_record_bytes: int
) -> bool:
    """Whether a record begins at buffer[i] (the file's byte `offset`): its length checks out, and
    so does the next record's, or the file ends after it. A record too long to read is taken on
    its own length's checksum alone: its bytes are skipped unread."""
    length, length_crc = struct.unpack_from("<QI", buffer, i)
    after = offset + _HEADER_BYTES + length + _FOOTER_BYTES
    if after > size or tfrecord_crc(bytes(buffer[i : i + 8])) != length_crc:
        return False
    if after == size or length > max_record_bytes:
        return True
    following = i + (after - offset)
    if not _holds(buffer, chunks, following + _HEADER_BYTES):
        return False
    next_length, next_crc = struct.unpack_from("<QI", buffer, following)
    return bool(tfrecord_crc(bytes(buffer[following : following + 8])) == next_crc and next_length <= size)


def records_before(chunks: Iterator[bytes], offset: int) -> int:
    """How many records of a TFRecord file (its bytes in `chunks`, from its first) begin before
    byte `offset`, a record boundary: their lengths are followed, their data skipped."""
    count = at = 0  # records counted; where the next begins
    base, buffer = 0, bytearray()  # buffer[0] is at byte `base`
    for chunk in chunks:
        buffer += chunk
        while at < offset and at + 8 <= base + len(buffer):
            (length,) = struct.unpack_from("<Q", buffer, at - base)
            at += _HEADER_BYTES + length + _FOOTER_BYTES
            count += 1
        dropped = min(at - base, len(buffer))
        del buffer[:dropped]
        base += dropped
        if at >= offset:
            break
    return count
