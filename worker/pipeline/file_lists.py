"""File lists read as Vertex AI batch prediction reads them: each line names a file (a `gs://`
URI; a local path when the job's input is local), and the file's bytes are one instance,
`{"b64": "<its bytes>"}` (an image, say). Each output line's `instance` is the line's URI.

Entries become JSON lines before the pipeline sees them, each a `Fetched` line that remembers its
URI, so everything after is what it is for JSON lines. A line that names no file the worker can
read — not a URI, absent, unreadable, larger than the limit — is an error line naming it. The files
of a block are fetched a few at a time (`FETCH_THREADS`), each read only up to the limit, so memory
stays bounded by the block.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from worker import errors
from worker.pipeline.lines import Fetched, Unreadable
from worker.uris import Uri

FETCH_THREADS = 8
# Files of a block fetched before their lines are handed on: bounds memory (limit × this).
FETCH_AHEAD = 32


def locate_entry(text: str, *, local: bool) -> Uri:
    """The file a list's line names: a gs:// URI, or (in a local job) a local path."""
    if text.startswith("gs://"):
        return Uri.parse(text, what="file")
    if local and "://" not in text:
        return Uri.local(os.path.abspath(os.path.expanduser(text)), folder=False)
    raise errors.InvalidJob("it is not a gs:// URI" + (" nor a local path" if local else ""))


def entry_blocks(
    blocks: Iterator[list[bytes]], fetch: Callable[[Uri, int], bytes], *, local: bool, max_bytes: int
) -> Iterator[list[bytes]]:
    """The list's lines as JSON lines: blank lines as they are, each entry its file's bytes.
    `fetch(uri, limit)` reads at most `limit + 1` bytes of a file."""
    with ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="fetch") as pool:
        for block in blocks:
            out: list[bytes] = []
            for start in range(0, len(block), FETCH_AHEAD):
                lines = block[start : start + FETCH_AHEAD]
                out += pool.map(lambda raw: entry_of(raw, fetch, local=local, max_bytes=max_bytes), lines)
            yield out


def entry_of(raw: bytes, fetch: Callable[[Uri, int], bytes], *, local: bool, max_bytes: int) -> bytes:
    text = raw.decode("utf-8", errors="replace").strip()
    if not text:
        return raw
    try:
        uri = locate_entry(text, local=local)
        data = fetch(uri, max_bytes)
    except errors.PermanentError as e:
        return Unreadable(raw, f"names {text}, which cannot be read: {e}")
    except errors.TransientError:
        raise  # storage unavailable: the job is retried, not a line lost
    if len(data) > max_bytes:
        return Unreadable(
            raw, f"names {text}, larger than the {max_bytes:,} bytes WORKER_MAX_LINE_BYTES allows: it was not read"
        )
    return Fetched(b'{"b64":"' + base64.b64encode(data) + b'"}', text)
