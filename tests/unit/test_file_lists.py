"""File-list entries (worker/pipeline/file_lists.py) with a fetch of our own."""

from __future__ import annotations

import json

import pytest

from worker import errors
from worker.pipeline.file_lists import entry_blocks
from worker.pipeline.lines import Fetched, Unreadable
from worker.uris import Uri


def test_entries_keep_their_order_and_uri_whatever_order_their_files_arrive_in():
    def fetch(uri: Uri, limit: int) -> bytes:
        return uri.path.encode()

    names = [f"gs://bkt/f{k}" for k in range(70)]
    [out] = entry_blocks(iter([[n.encode() for n in names]]), fetch, local=False, max_bytes=100)
    assert [line.uri for line in out if isinstance(line, Fetched)] == names
    assert json.loads(out[5]) == {"b64": "ZjU="}  # b"f5"


def test_storage_unavailable_fails_the_block_rather_than_making_error_lines():
    def fetch(uri: Uri, limit: int) -> bytes:
        raise errors.TransientError("Cloud Storage unavailable")

    with pytest.raises(errors.TransientError):
        list(entry_blocks(iter([[b"gs://bkt/a"]]), fetch, local=False, max_bytes=100))


def test_a_local_path_is_an_entry_only_in_a_local_job():
    [out] = entry_blocks(iter([[b"/data/a.png", b""]]), lambda uri, limit: b"x", local=False, max_bytes=100)
    assert (
        isinstance(out[0], Unreadable)
        and out[0].why == "names /data/a.png, which cannot be read: it is not a gs:// URI"
    )
    assert out[1] == b""
    [out] = entry_blocks(iter([[b"/data/a.png"]]), lambda uri, limit: b"x", local=True, max_bytes=100)
    assert isinstance(out[0], Fetched) and out[0].uri == "/data/a.png"
