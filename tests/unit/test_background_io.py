"""The download and upload threads: order kept, errors raised in the caller's thread, no hang."""

from __future__ import annotations

import io
import threading

import pytest

import worker.storage as storage_mod
from worker.storage import BackgroundWriter, _prefetched, _Upload


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
    assert list(_prefetched(_reader(chunks), name="t")) == chunks


def test_prefetched_raises_the_readers_error_after_the_chunks_before_it():
    got = []
    with pytest.raises(ConnectionError, match="reset"):
        for chunk in _prefetched(_reader([b"a", b"b", ConnectionError("reset")]), name="t"):
            got.append(chunk)
    assert got == [b"a", b"b"]


def test_prefetched_stops_its_thread_when_the_consumer_stops_early():
    before = threading.active_count()
    gen = _prefetched(_reader([b"x"] * 100), name="t")
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

    assert list(_prefetched(read_from([b"only"]), name="t", more=lambda: False)) == [b"only"]
    assert threads == [threading.current_thread()]  # no thread for a file of one chunk

    threads.clear()
    chunks = [b"a", b"b", b"c"]
    assert list(_prefetched(read_from(chunks), name="t", more=lambda: True)) == chunks
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


class _RecordingBlob:
    """Records how an output reaches the blob: one request, or a resumable upload."""

    def __init__(self) -> None:
        self.single: bytes | None = None
        self.resumable: io.BytesIO | None = None
        self.terminated = False

    def upload_from_string(self, data: bytes, content_type: str) -> None:
        self.single = data

    def open(self, mode: str, **kwargs: object) -> _RecordingBlob:
        self.resumable = io.BytesIO()
        return self

    def write(self, block: bytes) -> int:
        assert self.resumable is not None
        return self.resumable.write(block)

    def close(self) -> None:
        pass

    def terminate(self) -> None:
        self.terminated = True


def test_a_small_output_is_one_request_and_a_large_one_holds_at_most_a_chunk(monkeypatch):
    monkeypatch.setattr(storage_mod, "WRITE_CHUNK_BYTES", 1024)
    small = _RecordingBlob()
    up = _Upload(small, "application/jsonl")
    up.write(b"a" * 600)
    up.write(b"b" * 400)
    up.close()
    assert small.single == b"a" * 600 + b"b" * 400 and small.resumable is None

    large = _RecordingBlob()
    up = _Upload(large, "application/jsonl")
    for i in range(3):
        up.write(bytes([65 + i]) * 300)
    assert large.resumable is None  # 900 bytes: still held for one request
    for i in range(3, 10):
        up.write(bytes([65 + i]) * 300)
    assert large.resumable is not None and up._head == []  # a chunk's worth started the upload
    up.close()
    assert large.single is None and large.resumable is not None
    assert large.resumable.getvalue() == b"".join(bytes([65 + i]) * 300 for i in range(10))


def test_an_abandoned_output_cancels_its_upload():
    blob = _RecordingBlob()
    up = _Upload(blob, "application/jsonl")
    up.terminate()
    assert blob.single is None and not blob.terminated  # nothing was started, nothing to cancel
    up = _Upload(blob, "application/jsonl")
    up.write(b"x" * storage_mod.WRITE_CHUNK_BYTES)
    up.terminate()
    assert blob.terminated and blob.single is None
