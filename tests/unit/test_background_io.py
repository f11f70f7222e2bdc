"""The download and upload threads: order kept, errors raised in the caller's thread, no hang."""

from __future__ import annotations

import base64
import io
import itertools
import random
import threading
import types
from collections.abc import Iterable

import google_crc32c
import pytest
import requests

import worker.storage.upload as upload_mod
from worker import errors
from worker.storage.background import BackgroundWriter, prefetched
from worker.storage.formats import owned_lines
from worker.storage.upload import Upload


def _reader(chunks: list[bytes | Exception]):
    it = iter([*chunks, b""])

    def read() -> bytes:
        item = next(it)
        if isinstance(item, Exception):
            raise item
        return item

    return read


def test_prefetched_yields_every_chunk_in_order():
    chunks = [bytes([i]) * 10 for i in range(1, 50)]
    assert list(prefetched(_reader(chunks), name="t")) == chunks


def test_prefetched_raises_the_readers_error_after_the_chunks_before_it():
    got = []
    with pytest.raises(ConnectionError, match="reset"):
        for chunk in prefetched(_reader([b"a", b"b", ConnectionError("reset")]), name="t"):
            got.append(chunk)
    assert got == [b"a", b"b"]


def test_prefetched_stops_its_thread_when_the_consumer_stops_early():
    before = threading.active_count()
    gen = prefetched(_reader([b"x"] * 100), name="t")
    assert next(gen) == b"x"
    gen.close()
    assert threading.active_count() == before


def test_prefetched_reads_a_file_of_one_chunk_in_the_callers_thread_and_the_rest_ahead_in_another():
    threads = []

    def read_from(chunks: list[bytes]):
        read = _reader(list(chunks))

        def recorded() -> bytes:
            threads.append(threading.current_thread())
            return read()

        return recorded

    assert list(prefetched(read_from([b"only"]), name="t", more=lambda: False)) == [b"only"]
    assert threads == [threading.current_thread()]  # no thread for a file of one chunk

    threads.clear()
    chunks = [b"a", b"b", b"c"]
    assert list(prefetched(read_from(chunks), name="t", more=lambda: True)) == chunks
    assert threads[0] is threading.current_thread()
    assert all(t is not threading.current_thread() for t in threads[1:]) and len(threads) == 4


def test_background_writer_writes_everything_in_order():
    sink = io.BytesIO()
    writer = BackgroundWriter(sink, name="t", depth=2)
    for i in range(200):
        writer.write(b"%d\n" % i)
    writer.finish()
    assert sink.getvalue() == b"".join(b"%d\n" % i for i in range(200))


class FailingSink(io.BytesIO):
    def write(self, data) -> int:  # type: ignore[override]
        if self.tell() > 10:
            raise OSError("upload failed")
        return super().write(data)


def test_background_writer_raises_the_sinks_error_in_the_callers_thread():
    writer = BackgroundWriter(FailingSink(), name="t", depth=2)
    with pytest.raises(OSError, match="upload failed"):
        for _ in range(1000):  # never blocks: the thread keeps draining after the error
            writer.write(b"0123456789")
        writer.finish()


def test_background_writer_writes_the_first_bytes_in_the_callers_thread_and_the_rest_in_its_own():
    sink = io.BytesIO()
    writer = BackgroundWriter(sink, name="t", inline_bytes=10)
    writer.write(b"abcd")
    writer.write(b"efgh")
    assert sink.getvalue() == b"abcdefgh" and writer._thread is None  # written at once, no thread
    for i in range(100):
        writer.write(b"%d," % i)  # past 10 bytes: queued for the thread
    assert writer._thread is not None
    writer.finish()
    assert sink.getvalue() == b"abcdefgh" + b"".join(b"%d," % i for i in range(100))


def test_a_small_output_is_written_without_a_thread_and_errors_reach_the_caller():
    sink = FailingSink()
    writer = BackgroundWriter(sink, name="t", inline_bytes=1000)
    writer.write(b"0123456789")
    writer.write(b"0123456789")
    with pytest.raises(OSError, match="upload failed"):
        writer.write(b"0123456789")
    assert writer._thread is None
    writer.abandon()


def test_abandon_stops_the_thread_and_refuses_further_writes():
    writer = BackgroundWriter(io.BytesIO(), name="t")
    writer.write(b"partial")
    writer.abandon()
    assert writer._thread is not None and not writer._thread.is_alive()
    with pytest.raises(RuntimeError, match="abandoned"):
        writer.write(b"more")


class _Response:
    def __init__(self, status_code: int, headers: dict[str, str] | None = None, body: dict | None = None) -> None:
        self.status_code = status_code
        self.headers = headers or {}
        self._body = body or {}

    def json(self) -> dict:
        return self._body


class _Session:
    """A resumable upload session as Cloud Storage keeps it: bytes at their offsets, a 308 with
    the Range kept, the object's CRC32C once complete. `keep` caps the bytes kept per request,
    `fail` raises on the first requests, `crc` replaces the CRC32C reported."""

    def __init__(self, *, keep: int | None = None, fail: int = 0, crc: str | None = None) -> None:
        self.data = bytearray()
        self.requests: list[tuple[dict[str, str], list[bytes]]] = []
        self.deleted: list[str] = []
        self._keep, self._fail, self._crc = keep, fail, crc

    def put(self, url: str, *, data, headers: dict[str, str], **kwargs) -> _Response:
        blocks = list(data)
        assert len(data) == sum(map(len, blocks))
        self.requests.append((dict(headers), blocks))
        if self._fail:
            self._fail -= 1
            raise requests.ConnectionError("connection reset")
        where, _, total = headers["Content-Range"].removeprefix("bytes ").partition("/")
        body = b"".join(blocks)
        if where != "*":
            first = int(where.split("-")[0])
            assert first <= len(self.data), "a gap in the upload"
            kept = body[: self._keep] if self._keep is not None else body
            self.data[first : first + len(kept)] = kept
        if total != "*" and int(total) == len(self.data):
            crc = google_crc32c.Checksum(bytes(self.data))
            return _Response(
                200, body={"crc32c": self._crc or base64.b64encode(crc.digest()).decode(), "generation": "7"}
            )
        return _Response(308, {"Range": f"bytes=0-{len(self.data) - 1}"} if self.data else {})

    def delete(self, url: str, **kwargs) -> None:
        self.deleted.append(url)


class _RecordingBlob:
    """Records how an output reaches the blob: one request, or a resumable upload over `session`."""

    name = "out/o.jsonl"

    def __init__(self, session: _Session | None = None, *, crc: str | None = None) -> None:
        self.single: bytes | None = None
        self._crc = crc  # the CRC32C a single-request upload reports, when not the data's
        self.session = session or _Session()
        self.client = types.SimpleNamespace(_http=self.session)
        self.bucket = types.SimpleNamespace(name="b")
        self.started = False
        self.deleted: list[int | None] = []

    metadata = None

    def upload(self, bucket: str, name: str, blocks: Iterable[bytes], *, content_type: str, metadata: dict) -> dict:
        """The media transport's single-request upload (`Upload` is given the blob as its transport)."""
        self.single = data = b"".join(blocks)
        crc = self._crc or base64.b64encode(google_crc32c.Checksum(data).digest()).decode()
        return {"crc32c": crc, "generation": "3"}

    def create_resumable_upload_session(self, **kwargs: object) -> str:
        assert not self.started
        self.started = True
        return "https://upload/session"

    def delete(self, if_generation_match: int | None = None, retry: object = None) -> None:
        self.deleted.append(if_generation_match)


def _blocks(n: int, size: int = 300) -> list[bytes]:
    return [bytes([65 + i % 26]) * size for i in range(n)]


def test_a_small_output_is_one_request(monkeypatch):
    monkeypatch.setattr(upload_mod, "WRITE_CHUNK_BYTES", 1024)
    small = _RecordingBlob()
    up = Upload(small, "application/jsonl", small)
    up.write(b"a" * 600)
    up.write(b"b" * 400)
    up.close()
    assert small.single == b"a" * 600 + b"b" * 400 and not small.started


def test_an_output_under_8_mib_is_one_request_and_a_larger_one_goes_in_chunks_of_8_then_16_mib():
    """The sizes worker/storage/upload.py states (the client library's multipart limit is 8 MiB)."""
    mib = 1024 * 1024
    block = b"x" * (mib // 4)
    small = _RecordingBlob()
    up = Upload(small, "application/jsonl", small)
    for _ in range(31):  # 7.75 MiB
        up.write(block)
    up.close()
    assert small.single is not None and len(small.single) == 31 * len(block) and not small.started
    large = _RecordingBlob()
    up = Upload(large, "application/jsonl", large)
    for _ in range(4 * 8 + 4 * 16 + 4 * 16 + 1):  # 8 + 16 + 16 MiB and a block
        up.write(block)
    up.close()
    ranges = [headers["Content-Range"] for headers, _ in large.session.requests]
    total = 40 * mib + len(block)
    assert ranges == [
        f"bytes 0-{8 * mib - 1}/*",
        f"bytes {8 * mib}-{24 * mib - 1}/*",
        f"bytes {24 * mib}-{40 * mib - 1}/*",
        f"bytes {40 * mib}-{total - 1}/{total}",
    ]
    assert large.single is None and len(large.session.data) == total


@pytest.mark.parametrize("n", [4, 10, 24, 41])  # 1,200 / 3,000 / 7,200 / 12,300 bytes
def test_a_large_output_goes_in_growing_chunks_from_the_blocks_written(monkeypatch, n):
    monkeypatch.setattr(upload_mod, "FIRST_CHUNK_BYTES", 1024)
    monkeypatch.setattr(upload_mod, "WRITE_CHUNK_BYTES", 4096)
    blob = _RecordingBlob()
    up = Upload(blob, "application/jsonl", blob)
    written = _blocks(n)
    for block in written:
        up.write(block)
        assert up._held < 4096, "never a whole chunk held once a write returns"
    up.close()
    content = b"".join(written)
    assert blob.single is None and bytes(blob.session.data) == content
    # Chunks of 1, 2, then 4 KiB (the largest), the last one what is left.
    expected, offset, size = [], 0, 1024
    while offset + size <= len(content):
        expected.append(f"bytes {offset}-{offset + size - 1}/*")
        offset, size = offset + size, min(2 * size, 4096)
    last = f"bytes {offset}-{len(content) - 1}/{len(content)}" if offset < len(content) else f"bytes */{len(content)}"
    ranges = [headers["Content-Range"] for headers, _ in blob.session.requests]
    assert ranges == [*expected, last]
    assert ["X-Goog-Hash" in headers for headers, _ in blob.session.requests] == [False] * len(expected) + [True]
    # Whole blocks are sent as they were written: only the one crossing a chunk's end is cut.
    sent = [b for _, blocks in blob.session.requests for b in blocks]
    assert sum(1 for b in sent if any(b is w for w in written)) >= len(written) - len(expected)


def _written(session: _Session, blocks: list[bytes], retry: object = upload_mod.DEFAULT_RETRY) -> Upload:
    """An upload to `session` with `blocks` written, not yet closed."""
    blob = _RecordingBlob(session)
    up = Upload(blob, "application/jsonl", blob, retry)
    for block in blocks:
        up.write(block)
    return up


def test_a_chunk_kept_in_part_gets_the_rest_sent_again(monkeypatch):
    monkeypatch.setattr(upload_mod, "WRITE_CHUNK_BYTES", 1024)
    session, written = _Session(keep=700), _blocks(10)
    _written(session, written).close()
    assert bytes(session.data) == b"".join(written)


def test_a_chunk_is_retried_after_a_connection_error(monkeypatch):
    monkeypatch.setattr(upload_mod, "WRITE_CHUNK_BYTES", 1024)
    session, written = _Session(fail=2), _blocks(5)
    _written(session, written, upload_mod.DEFAULT_RETRY.with_delay(initial=0.01, maximum=0.02)).close()
    assert bytes(session.data) == b"".join(written)
    first, again, third = (b"".join(blocks) for _, blocks in session.requests[:3])
    assert first == again == third == b"".join(written)[:1024]


def test_an_object_stored_with_another_crc32c_is_deleted_and_the_job_retried(monkeypatch):
    monkeypatch.setattr(upload_mod, "WRITE_CHUNK_BYTES", 1024)
    up = _written(_Session(crc="AAAAAA=="), _blocks(5))
    with pytest.raises(errors.TransientError, match=r"CRC32C \(AAAAAA==\) is not the one of the bytes sent"):
        up.close()
    assert up._blob.deleted == [7]


def test_a_small_output_stored_with_another_crc32c_is_deleted_and_the_job_retried():
    blob = _RecordingBlob(crc="AAAAAA==")
    up = Upload(blob, "application/jsonl", blob)
    up.write(b"small\n")
    with pytest.raises(errors.TransientError, match=r"CRC32C \(AAAAAA==\) is not the one of the bytes sent"):
        up.close()
    assert blob.single == b"small\n" and blob.deleted == [3]


def test_an_abandoned_output_cancels_its_upload(monkeypatch):
    monkeypatch.setattr(upload_mod, "WRITE_CHUNK_BYTES", 1024)
    blob = _RecordingBlob()
    up = Upload(blob, "application/jsonl", blob)
    up.write(b"x" * 1000)
    up.terminate()
    assert blob.single is None and not blob.started  # nothing was started, nothing to cancel
    up = Upload(blob, "application/jsonl", blob)
    up.write(b"x" * 1500)
    up.terminate()
    assert blob.session.deleted == ["https://upload/session"] and blob.single is None


def _pieces(data: bytes, cuts: list[int], chunk: int) -> list[bytes]:
    """The bytes `owned_lines` gives each piece of `data` cut at `cuts`, fed `chunk` bytes at a time
    from the byte before the piece's start (as `read_blocks` reads a piece)."""
    bounds = [0, *cuts, len(data)]
    out = []
    for start, end in itertools.pairwise(bounds):
        first = max(0, start - 1)
        chunks = (data[i : i + chunk] for i in range(first, len(data), chunk))
        out.append(b"".join(owned_lines(chunks, first, start, end)))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_a_file_cut_anywhere_into_pieces_has_each_line_in_exactly_one_piece_whole(seed: int) -> None:
    """Cuts at any bytes (in a line, on a newline, beside one another, in a run of blank lines):
    the pieces, in order, are the file; each is whole lines; each line is in the piece its first
    byte is in."""
    rng = random.Random(seed)
    lines = [b"x" * rng.choice([0, 0, 1, 2, 5, 30]) for _ in range(rng.randint(0, 40))]
    data = b"\n".join(lines) + (b"\n" if rng.random() < 0.5 else b"")
    cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(1, 8)))
    pieces = _pieces(data, cuts, chunk=rng.choice([1, 2, 3, 7, 64]))
    assert b"".join(pieces) == data
    starts = [i for i in range(len(data)) if i == 0 or data[i - 1 : i] == b"\n"]  # where lines begin

    def line_start_from(at: int) -> int:
        return min((s for s in starts if s >= at), default=len(data))

    for piece, (start, end) in zip(pieces, itertools.pairwise([0, *cuts, len(data)]), strict=True):
        assert piece == data[line_start_from(start) : line_start_from(end)]
