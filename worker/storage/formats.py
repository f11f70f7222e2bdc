"""What the bytes of an input file are: gzip, a byte order mark, another format than JSON lines;
and the lines a piece of a file owns. Pure functions over iterators of chunks."""

from __future__ import annotations

import codecs
import itertools
import zlib
from collections.abc import Iterator

import google_crc32c

from worker.errors import InvalidJob, OtherFormat
from worker.uris import Uri

# How a gzip file begins; no JSON text does (0x1f is a control character).
GZIP_MAGIC = b"\x1f\x8b"


def _without_cr(lines: list[bytes]) -> list[bytes]:
    """The lines of a CRLF file without their CR."""
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def split_lines(text: Iterator[bytes], max_line_bytes: int) -> Iterator[list[bytes]]:
    """The lines of `text` (UTF-8 chunks) without their endings (`\n` or `\r\n`), a list per
    chunk. A line that grows past `max_line_bytes` across chunks is cut to `max_line_bytes + 1`
    bytes (so it still reads as too long) and the rest of it is dropped as it arrives: memory stays
    bounded by the chunk and the limit, whatever the file holds."""
    pending = b""
    cut = False  # `pending` is the start of a line longer than the limit
    for chunk in text:
        if cut:
            end = chunk.find(b"\n")
            if end < 0:
                continue  # still inside the long line: dropped
            yield [pending]
            pending, cut, chunk = b"", False, chunk[end + 1 :]
        data = pending + chunk
        lines = data.split(b"\n")
        pending = lines.pop()
        if len(pending) > max_line_bytes:
            pending, cut = pending[: max_line_bytes + 1], True
        if lines:
            yield _without_cr(lines) if b"\r" in data else lines
    if pending:
        yield _without_cr([pending])


def owned_lines(chunks: Iterator[bytes], pos: int, start: int, end: int) -> Iterator[bytes]:
    """The bytes of the lines that begin in [start, end), from `chunks`, the object's bytes from
    byte `pos` on (0, or start - 1: whether a line begins at `start` is told by the byte before it).
    A file cut at any bytes into pieces read so has each of its lines in one piece, whole."""
    if start >= end:
        return
    skipping = start > 0  # through the end of the line that byte start - 1 is in
    for chunk in chunks:
        at, pos = pos, pos + len(chunk)
        if skipping:
            newline = chunk.find(b"\n")
            if newline < 0:
                continue
            skipping, chunk, at = False, chunk[newline + 1 :], at + newline + 1
            if at >= end:
                return  # the first line after the cut begins at or after the end: none is this piece's
        if pos >= end:
            # The last line that begins before `end` ends at the first newline from byte end - 1 on.
            newline = chunk.find(b"\n", max(0, end - 1 - at))
            if newline >= 0:
                yield chunk[: newline + 1]
                return
        if chunk:
            yield chunk


def gunzipped(chunks: Iterator[bytes], uri: Uri, chunk_bytes: int) -> Iterator[bytes]:
    """The chunks as they are; or, when the first begins as gzip does (a `.gz` file stored as it
    is, without Content-Encoding), what they decompress to, in pieces of at most `chunk_bytes`
    (a file that expands a thousandfold stays bounded), member after member (`cat a.gz b.gz`)."""
    first = next(chunks, b"")
    if not first.startswith(GZIP_MAGIC):
        if first:
            yield first
        yield from chunks
        return
    member = zlib.decompressobj(wbits=31)
    inside = False  # in a member whose end has not been read yet
    try:
        for data in itertools.chain([first], chunks):
            while data:
                inside = True
                piece = member.decompress(data, chunk_bytes)
                if member.eof:  # the member ends here; another may follow it
                    data, member, inside = member.unused_data, zlib.decompressobj(wbits=31), False
                else:
                    data = member.unconsumed_tail
                if piece:
                    yield piece
            while inside and (piece := member.decompress(b"", chunk_bytes)):
                yield piece  # what the last input still holds beyond one piece
    except zlib.error as e:
        raise InvalidJob(f"input {uri} is gzip-compressed but cannot be decompressed ({e}) — check the file") from e
    if inside:
        raise InvalidJob(f"input {uri} is gzip-compressed but ends before its compressed data does — upload it again")


# Byte order marks, the longest first (UTF-32-LE's begins with UTF-16-LE's), and their codecs.
BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


# Files of other formats, by how they begin, none of which a line of JSON can begin as.
_EXPORT_JSON = "write the instances as JSON lines (newline-delimited JSON), one per line"
_OTHER_FILES = (
    (b"PAR1\x15", "a Parquet file", f"{_EXPORT_JSON} (BigQuery: --destination_format=NEWLINE_DELIMITED_JSON)"),
    (b"Obj\x01", "an Avro file", f"{_EXPORT_JSON} (BigQuery: --destination_format=NEWLINE_DELIMITED_JSON)"),
    (b"PK\x03\x04", "a zip archive", "unzip it and upload the files inside"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it, or compress it with gzip, which the worker reads"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it, or compress it with gzip, which the worker reads"),
    (b"\x93NUMPY", "a NumPy array file", _EXPORT_JSON),
)


def other_format(first: bytes) -> tuple[str, str] | None:
    """What a file that begins with `first` is, when that is a format of its own, and what to do."""
    for magic, what, advice in _OTHER_FILES:
        if first.startswith(magic):
            return what, advice
    if first.startswith(b"BZh") and first[4:10] == b"1AY&SY":
        return "bzip2-compressed", "decompress it, or compress it with gzip, which the worker reads"
    # A TFRecord file begins with a record's length (8 bytes) and their masked CRC32C (4 bytes).
    if len(first) >= 12 and tfrecord_crc(first[:8]) == int.from_bytes(first[8:12], "little"):
        return "a TFRecord file", (
            'read it as one with the job option "input_format": "tf-record" ("tf-record-gzip" when it is '
            'gzip-compressed), or name it *.tfrecord: each record is then the instance {"b64": "<the record>"}'
        )
    return None


# The formats whose files can be cut at any byte into pieces read apart (for a job run as parts):
# lines, each in the piece it begins in (a CSV piece takes the file's header too); records, found
# from a piece's start by their framing.
CUT_FORMATS = ("jsonl", "csv", "tf-record")


def can_cut_head(head: bytes, read_as: str) -> bool:
    """Whether a file of `read_as` that begins with `head` (as stored) can be cut into pieces:
    not gzip-compressed, and for lines, UTF-8 and not of another format."""
    if read_as not in CUT_FORMATS or head.startswith(GZIP_MAGIC):
        return False
    if read_as == "tf-record":
        return True
    marks = tuple(mark for mark, _ in BYTE_ORDER_MARKS if mark != codecs.BOM_UTF8)
    return not (head.startswith(marks) or other_format(head))


def skipped(chunks: Iterator[bytes], n: int) -> Iterator[bytes]:
    """The chunks without their first n bytes."""
    for chunk in chunks:
        if n >= len(chunk):
            n -= len(chunk)
            continue
        yield chunk[n:] if n else chunk
        n = 0


def tfrecord_crc(data: bytes) -> int:
    """TFRecord's checksum of a record's length or data: CRC32C, rotated right by 15 bits, plus a constant."""
    crc = int(google_crc32c.value(data))
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def as_utf8(chunks: Iterator[bytes], uri: Uri) -> Iterator[bytes]:
    """The chunks as they are; or, when the first begins with a byte order mark, their text as
    UTF-8 without it: a file saved as UTF-16 (Windows PowerShell's `>` and `Out-File` write it)
    has a NUL byte beside every character, and a UTF-8 one's mark would stay on its first line.
    A file of another format (Parquet, TFRecord, …) fails its job, saying so, before a line of it
    becomes an error line."""
    first = next(chunks, b"")
    other = other_format(first)
    if other is not None:
        kind = "tf-record" if other[0] == "a TFRecord file" else None
        raise OtherFormat(f"input {uri} is {other[0]}, not JSON lines — {other[1]}", kind=kind)
    encoding = next((name for mark, name in BYTE_ORDER_MARKS if first.startswith(mark)), None)
    if encoding in (None, "utf-8-sig"):
        rest = first[len(codecs.BOM_UTF8) :] if encoding else first  # UTF-8 already: only its mark goes
        if rest:
            yield rest
        yield from chunks
        return
    decoder = codecs.getincrementaldecoder(encoding)()
    try:
        for chunk in itertools.chain([first], chunks):
            if text := decoder.decode(chunk):
                yield text.encode("utf-8")
        if text := decoder.decode(b"", final=True):
            yield text.encode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidJob(f"input {uri} begins as {encoding} text (its byte order mark) but is not: {e}") from e
