"""TFRecord files read as Vertex AI batch prediction reads them: each record is one instance,
`{"b64": "<the record, base64>"}` (a serialized tf.Example, say, for a model that parses them).

A record is framed by its length (8 bytes, little-endian), the masked CRC32C of that length
(4 bytes), its data and the masked CRC32C of its data (4 bytes). Records become JSON lines before
the pipeline sees them, one per record, so everything after is what it is for JSON lines. A record
whose data fails its checksum is an `Unreadable` line (an error line, counted); a length that
fails its checksum, or a file that ends inside a record, fails the job naming the file and the
byte offset: what follows cannot be framed. Memory stays bounded: a record longer than the line
limit is an error line, its bytes skipped as they arrive.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator

from worker.errors import InvalidJob
from worker.pipeline.lines import Unreadable
from worker.storage.formats import tfrecord_crc

_HEADER_BYTES = 12  # the length and its checksum
_FOOTER_BYTES = 4  # the data's checksum


def record_blocks(chunks: Iterator[bytes], where: object, max_record_bytes: int) -> Iterator[list[bytes]]:
    """The records of a TFRecord file (its bytes in `chunks`) as JSON lines, a list per chunk."""
    buffer = bytearray()
    at = 0  # the file's offset of buffer[0]
    skipping = 0  # bytes of a record too long still to drop, as they arrive
    for chunk in chunks:
        buffer += chunk
        out: list[bytes] = []
        while True:
            if skipping:
                dropped = min(skipping, len(buffer))
                del buffer[:dropped]
                at, skipping = at + dropped, skipping - dropped
                if skipping:
                    break
            if len(buffer) < _HEADER_BYTES:
                break
            length, length_crc = struct.unpack_from("<QI", buffer)
            if tfrecord_crc(bytes(buffer[:8])) != length_crc:
                raise InvalidJob(
                    f"input {where} is not a TFRecord file, or is corrupt: the record at byte {at:,} has a length "
                    "that fails its checksum — check the file, or its input_format"
                )
            if length > max_record_bytes:
                out.append(
                    Unreadable(
                        b"",
                        f"(the record at byte {at:,}) is {length:,} bytes, more than the {max_record_bytes:,} "
                        "WORKER_MAX_LINE_BYTES allows; it was not read",
                    )
                )
                skipping = _HEADER_BYTES + length + _FOOTER_BYTES
                continue
            end = _HEADER_BYTES + length + _FOOTER_BYTES
            if len(buffer) < end:
                break
            data = bytes(buffer[_HEADER_BYTES : _HEADER_BYTES + length])
            (data_crc,) = struct.unpack_from("<I", buffer, _HEADER_BYTES + length)
            if tfrecord_crc(data) != data_crc:
                out.append(Unreadable(b"", f"(the record at byte {at:,}) fails its checksum: it is corrupt"))
            else:
                out.append(b'{"b64":"' + base64.b64encode(data) + b'"}')
            del buffer[:end]
            at += end
        if out:
            yield out
    if buffer or skipping:
        raise InvalidJob(
            f"input {where} ends inside a record (the record at byte {at:,}): the file was cut short — upload it again"
        )
