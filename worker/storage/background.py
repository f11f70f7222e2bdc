"""Reading ahead and writing behind: a file's next chunk downloads, and its output uploads, in a
thread of its own while the batches in between are predicted; memory stays bounded."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator
from typing import Protocol

# Output blocks queued for the upload thread at most: bounds memory (a block is a batch's lines).
WRITE_QUEUE_BLOCKS = 64


def prefetched(
    read: Callable[[], bytes], *, name: str, depth: int = 1, more: Callable[[], bool] = lambda: True
) -> Generator[bytes, None, None]:
    """The chunks `read()` returns until it returns b"", read by a thread up to `depth` ahead.
    Its errors are raised here; when the consumer stops early the thread stops after its read.

    The first chunk is read in the caller's thread, and the thread starts only if `more()` says
    there is more to read after it: a file of one chunk (most files of a tree) costs no thread,
    whose start waits for the GIL while other files are being predicted."""
    first = read()
    if not first:
        return
    if not more():
        yield first
        return
    ready: queue.Queue[tuple[bytes, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: tuple[bytes, BaseException | None]) -> None:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def pump() -> None:
        while not stop.is_set():
            try:
                chunk = read()
            except BaseException as e:  # handed to the consumer's thread
                offer((b"", e))
                return
            offer((chunk, None))
            if not chunk:
                return

    thread = threading.Thread(target=pump, name=name, daemon=True)
    thread.start()
    try:
        yield first
        while True:
            chunk, error = ready.get()
            if error is not None:
                raise error
            if not chunk:
                return
            yield chunk
    finally:
        stop.set()
        thread.join()


class _Writable(Protocol):
    def write(self, block: bytes, /) -> int: ...


class BackgroundWriter:
    """Writes blocks to `sink` in a thread, through a bounded queue. An error in the thread is
    raised by the next `write` or by `finish`, in the caller's thread.

    The first blocks, while fewer than `inline_bytes` in all, go to the sink in the caller's
    thread: for a sink that only holds them until then (an output smaller than one upload
    chunk) that is immediate, and a small output costs no thread."""

    def __init__(self, sink: _Writable, *, name: str, depth: int = WRITE_QUEUE_BLOCKS, inline_bytes: int = 0) -> None:
        self._sink = sink
        self._name = name
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._inline_left = inline_bytes
        self._thread: threading.Thread | None = None

    def _drain(self) -> None:
        while True:
            block = self._queue.get()
            if block is None:
                return
            if self._error is None:
                try:
                    self._sink.write(block)
                except BaseException as e:  # handed to the caller's thread
                    self._error = e

    def write(self, block: bytes) -> int:
        if self._error is not None:
            raise self._error
        if not block:
            return 0
        if self._thread is None:
            if len(block) < self._inline_left:
                self._inline_left -= len(block)
                return self._sink.write(block)
            self._thread = threading.Thread(target=self._drain, name=self._name, daemon=True)
            self._thread.start()
        self._queue.put(block)
        return len(block)

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()

    def finish(self) -> None:
        """Wait until every block reached the sink; raise what went wrong there, if anything."""
        self._stop()
        if self._error is not None:
            raise self._error

    def abandon(self) -> None:
        """Stop without waiting for the sink to succeed (the upload is being cancelled)."""
        self._error = self._error or RuntimeError("abandoned")
        self._stop()
