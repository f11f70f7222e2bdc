"""The download and upload threads: order kept, errors raised in the caller's thread, no hang."""

from __future__ import annotations

import io
import threading

import pytest

from worker.storage import BackgroundWriter, _prefetched


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


def test_abandon_stops_the_thread_and_refuses_further_writes():
    writer = BackgroundWriter(io.BytesIO(), name="t")
    writer.write(b"partial")
    writer.abandon()
    assert not writer._thread.is_alive()
    with pytest.raises(RuntimeError, match="abandoned"):
        writer.write(b"more")
