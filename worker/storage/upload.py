"""An output's upload: in one request when small, else a resumable upload sent chunk by chunk
straight from the written blocks, checked against its CRC32C."""

from __future__ import annotations

import base64
import contextlib
from collections import deque
from collections.abc import Iterator
from typing import Any

import google_crc32c
from google.api_core import exceptions as gexc
from google.cloud.storage.retry import DEFAULT_RETRY

from worker.errors import TransientError
from worker.media import TIMEOUTS_S, MediaTransport

# Resumable upload chunks must be multiples of 256 KiB. Each chunk is a request: fewer of them
# means fewer round trips to Cloud Storage. An open output holds at most one chunk (and one
# block): 16 MiB holds what 8 MiB did through the client library's writer, which holds two. The
# chunks grow to it from FIRST_CHUNK_BYTES (8, 16, 16 … MiB); an output smaller than the first
# chunk is sent in one request when complete, as the client library sends an object of up to
# 8 MiB (its multipart limit). docs/benchmarks.md has the measurements behind these sizes.
WRITE_CHUNK_BYTES = 16 * 1024 * 1024
FIRST_CHUNK_BYTES = 8 * 1024 * 1024


class Upload:
    """An object's content, written in blocks: an output smaller than the first upload chunk is
    sent in one request when it is complete; a larger one goes over a resumable upload, chunk by
    chunk, the chunks growing from FIRST_CHUNK_BYTES to WRITE_CHUNK_BYTES.

    The blocks are held as they were written and each chunk is sent straight from them, so an
    open output holds at most one chunk and one block (the client library's writer holds two
    chunks: its buffer and the copy being sent). A chunk is retried as the client library retries
    it, with the same bytes; a 308 that keeps only part of it gets the rest sent again. The last
    request carries the object's CRC32C, and the object Cloud Storage reports is checked against
    it: one that does not match is deleted, and the job retried."""

    def __init__(self, blob: Any, content_type: str, media: MediaTransport, retry: Any = DEFAULT_RETRY) -> None:
        self._blob = blob
        self._content_type = content_type
        self._media = media
        self._retry = retry  # each chunk's request, with the same bytes
        self._blocks: deque[bytes] = deque()  # written, not yet sent, in order
        self._held = 0  # their bytes
        self._session: Any = None  # the resumable upload's URL, once started
        self._sent = 0  # bytes Cloud Storage has kept
        self._crc = google_crc32c.Checksum()  # type: ignore[no-untyped-call]
        self._what = f"writing output gs://{blob.bucket.name}/{blob.name}"  # the start of its error messages

    def write(self, block: bytes) -> int:
        self._blocks.append(block)
        self._held += len(block)
        while self._held >= self._chunk_bytes():
            self._send(self._take(self._chunk_bytes()), final=False)
        return len(block)

    def _chunk_bytes(self) -> int:
        """The size of the next chunk: doubling from FIRST_CHUNK_BYTES up to WRITE_CHUNK_BYTES."""
        size = min(FIRST_CHUNK_BYTES, WRITE_CHUNK_BYTES)
        while size < WRITE_CHUNK_BYTES and size <= self._sent:
            size *= 2
        return min(size, WRITE_CHUNK_BYTES)

    def close(self) -> None:
        """Make the object appear with everything written."""
        if self._session is None:
            blocks, self._blocks = self._blocks, deque()
            for block in blocks:
                self._crc.update(block)  # type: ignore[no-untyped-call]
            blob = self._blob
            resource = self._media.upload(
                blob.bucket.name, blob.name, blocks, content_type=self._content_type, metadata=dict(blob.metadata or {})
            )
            self._check(resource)
        else:
            self._send(self._take(self._held), final=True)

    def terminate(self) -> None:
        """Give up: cancel a started upload; nothing appears."""
        self._blocks.clear()
        if self._session is not None:
            with contextlib.suppress(Exception):  # best effort: an abandoned session expires in a week
                self._blob.client._http.delete(self._session, timeout=TIMEOUTS_S)

    def _take(self, n: int) -> list[bytes]:
        """The first `n` bytes held, as blocks (the one that crosses `n` is cut in two)."""
        taken: list[bytes] = []
        size = 0
        while size < n:
            block = self._blocks.popleft()
            if size + len(block) > n:
                cut = n - size
                block, rest = block[:cut], block[cut:]
                self._blocks.appendleft(rest)
            taken.append(block)
            size += len(block)
        self._held -= size
        return taken

    def _send(self, blocks: list[bytes], *, final: bool) -> None:
        if self._session is None:
            self._session = self._blob.create_resumable_upload_session(
                content_type=self._content_type, checksum=None, retry=self._retry
            )
        for block in blocks:
            self._crc.update(block)  # type: ignore[no-untyped-call]
        start = self._sent
        end = start + sum(map(len, blocks))
        while True:
            headers = {"Content-Type": self._content_type}
            if final:
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{end}" if end > start else f"bytes */{end}"
                headers["X-Goog-Hash"] = "crc32c=" + self._crc32c()
            else:
                headers["Content-Range"] = f"bytes {start}-{end - 1}/*"
            response = self._retry(self._put)(_Body(blocks), headers)
            if response.status_code != 308:
                self._sent = end
                self._check(response.json())
                return
            kept = _kept_bytes(response)
            if kept >= end and not final:
                self._sent = end
                return
            if not start <= kept < end:
                raise TransientError(
                    f"{self._what}: Cloud Storage kept {kept} bytes of an upload at byte {start}; "
                    "the job will be retried"
                )
            # Cloud Storage kept part of this chunk: send it the rest.
            blocks = _skip(blocks, kept - start)
            start = kept

    def _put(self, body: _Body, headers: dict[str, str]) -> Any:
        response = self._blob.client._http.put(
            self._session, data=body, headers=headers, timeout=TIMEOUTS_S, allow_redirects=False
        )
        if response.status_code in (200, 201, 308):
            return response
        if response.status_code in (404, 410):
            raise TransientError(
                f"{self._what}: its upload session is gone ({response.status_code}); the job will be retried"
            )
        raise gexc.from_http_response(response)  # type: ignore[no-untyped-call]

    def _crc32c(self) -> str:
        """The CRC32C of the bytes sent so far, as Cloud Storage writes it (base64, big-endian)."""
        return base64.b64encode(self._crc.digest()).decode()  # type: ignore[no-untyped-call]

    def _check(self, resource: dict[str, Any]) -> None:
        """The stored object's CRC32C against the one of the bytes sent (when it is reported)."""
        ours = self._crc32c()
        theirs = resource.get("crc32c")
        if theirs is None or theirs == ours:
            return
        generation = resource.get("generation")
        with contextlib.suppress(Exception):
            self._blob.delete(if_generation_match=int(generation) if generation else None, retry=self._retry)
        raise TransientError(
            f"{self._what}: Cloud Storage stored an object "
            f"whose CRC32C ({theirs}) is not the one of the bytes sent ({ours}); it was deleted, and the job "
            "will be retried"
        )


class _Body:
    """A request body sent block by block, without joining them: requests sends an iterable
    with a length under that Content-Length."""

    def __init__(self, blocks: list[bytes]) -> None:
        self._blocks = blocks
        self._size = sum(map(len, blocks))

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._blocks)


def _kept_bytes(response: Any) -> int:
    """The bytes a 308 says Cloud Storage has kept ("Range: bytes=0-N"; none without Range)."""
    value = response.headers.get("Range", "")
    _, _, last = value.partition("-")
    return int(last) + 1 if value.startswith("bytes=0-") and last.isdigit() else 0


def _skip(blocks: list[bytes], n: int) -> list[bytes]:
    """`blocks` without their first `n` bytes."""
    out = []
    for block in blocks:
        if n >= len(block):
            n -= len(block)
            continue
        out.append(block[n:] if n else block)
        n = 0
    return out
