"""The media transport against a local HTTP server answering as told: retries, token refresh,
errors, and what it sends."""

from __future__ import annotations

import base64
import http.server
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import google_crc32c
import pytest
from google.api_core import exceptions as gexc
from google.auth import credentials as ga_credentials
from google.auth.transport.requests import AuthorizedSession
from google.cloud.storage.retry import DEFAULT_RETRY

import worker.media as media_mod
from worker import errors
from worker.media import MediaTransport
from worker.storage import GcsStore
from worker.uris import Uri


class _Server(http.server.ThreadingHTTPServer):
    """Answers each request with the next of `answers` (status, headers, body); records them."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answers: list[tuple[int, dict[str, str], bytes]] = []
        self.otherwise: tuple[int, dict[str, str], bytes] | None = None  # once `answers` are used up
        self.seen: list[tuple[str, str, Any, bytes]] = []


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def read_answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append((self.command, self.path, self.headers, body))  # headers: case-insensitive
        status, headers, data = self.server.answers.pop(0) if self.server.answers else self.server.otherwise or ()
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = read_answer

    def log_message(self, *args: Any) -> None:
        pass


class _Token(ga_credentials.Credentials):
    """A bearer token that a refresh replaces."""

    def __init__(self) -> None:
        super().__init__()
        self.token = "old"
        self.refreshed = 0

    def refresh(self, request: Any) -> None:
        self.refreshed += 1
        self.token = "new"


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(params=["pooled", "requests"])
def transport(request, server: _Server) -> tuple[MediaTransport, _Token]:
    creds = _Token()
    session = AuthorizedSession(creds)
    session.trust_env = request.param == "requests"
    retry = DEFAULT_RETRY.with_delay(initial=0.01, maximum=0.02)  # the storage client's, quicker
    return MediaTransport(session, f"http://127.0.0.1:{server.server_port}", retry=retry), creds


def test_a_read_asks_for_its_range_uncompressed_and_is_retried_after_a_503(transport, server):
    media, _ = transport
    server.answers = [(503, {}, b"busy"), (206, {}, b"bytes 10-19")]
    url = media.download_url("bkt", "in/a b#c.jsonl", 7)
    reply = media.read(url, 10, 19)
    assert (reply.status, reply.data, reply.stream) == (206, b"bytes 10-19", None)
    assert len(server.seen) == 2
    method, path, headers, _ = server.seen[-1]
    assert (method, path) == ("GET", "/download/storage/v1/b/bkt/o/in%2Fa%20b%23c.jsonl?alt=media&generation=7")
    assert (headers["Range"], headers["Accept-Encoding"], headers["Authorization"]) == (
        "bytes=10-19",
        "identity",
        "Bearer old",
    )


def test_a_whole_object_answer_comes_as_a_stream(transport, server):
    media, _ = transport
    server.answers = [(200, {}, b"0123456789" * 1000)]
    reply = media.read(media.download_url("bkt", "o", None), 0, 9)
    assert reply.status == 200 and reply.stream is not None
    assert reply.stream.read(4) + reply.stream.read() == b"0123456789" * 1000
    reply.stream.close()


def test_an_expired_token_is_refreshed_once_and_the_request_sent_again(transport, server):
    media, creds = transport
    server.answers = [(401, {}, b'{"error": {"message": "expired"}}'), (206, {}, b"ok")]
    assert media.read(media.download_url("bkt", "o", None), 0, 1).data == b"ok"
    assert creds.refreshed == 1
    assert [seen[2]["Authorization"] for seen in server.seen] == ["Bearer old", "Bearer new"]


@pytest.mark.parametrize(("status", "error"), [(404, gexc.NotFound), (403, gexc.Forbidden), (400, gexc.BadRequest)])
def test_other_answers_raise_the_matching_error_with_cloud_storages_message_and_are_not_retried(
    transport, server, status, error
):
    media, _ = transport
    server.answers = [(status, {}, b'{"error": {"message": "No such object: bkt/o"}}')]
    with pytest.raises(error, match="No such object: bkt/o"):
        media.read(media.download_url("bkt", "o", None), 0, 1)
    assert len(server.seen) == 1


def _forbidden(permission: str) -> tuple[int, dict[str, str], bytes]:
    """Cloud Storage's 403, as it words one."""
    message = (
        f"worker@p.iam.gserviceaccount.com does not have {permission} access to the Google Cloud Storage object. "
        f"Permission '{permission}' denied on resource (or it may not exist)."
    )
    body = json.dumps({"error": {"code": 403, "message": message, "errors": [{"message": message}]}})
    return 403, {"Content-Type": "application/json"}, body.encode()


def test_a_403_says_which_role_to_grant_on_which_bucket(server, monkeypatch):
    """The first deployment's usual failure, reading a model or input bucket or writing an output one.
    Every request is refused alike (the client library also reads a bucket's metadata in the
    background, in a request of its own)."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_port}")
    store = GcsStore.from_environment("p", environ=os.environ)
    server.otherwise = _forbidden("storage.objects.list")
    with pytest.raises(errors.PermanentError) as raised:
        store.list_inputs(Uri("data", "in/"))
    assert str(raised.value).endswith(
        "— grant the worker's service account roles/storage.objectViewer on gs://data: it lacks storage.objects.list"
    )
    server.otherwise = _forbidden("storage.objects.create")
    with pytest.raises(errors.PermanentError) as raised:
        store.write_json(Uri("out", "o/_manifest.json"), {}, job_id="j")
    assert str(raised.value).startswith("writing gs://out/o/_manifest.json: permission denied (")
    assert str(raised.value).endswith(
        "— grant the worker's service account roles/storage.objectUser on gs://out: it lacks storage.objects.create"
    )


def test_an_upload_is_one_multipart_request_with_the_objects_resource_and_bytes(transport, server):
    media, _ = transport
    server.answers = [(200, {}, b'{"name": "out/x.jsonl", "generation": "5"}')]
    blocks = [b'{"instance": 1}\r\n', b"--not-a-boundary\r\n"]
    data = b"".join(blocks)
    resource = media.upload("bkt", "out/x.jsonl", blocks, content_type="application/jsonl", metadata={"k": "v"})
    assert resource == {"name": "out/x.jsonl", "generation": "5"}
    [(method, path, headers, body)] = server.seen
    assert (method, path) == ("POST", "/upload/storage/v1/b/bkt/o?uploadType=multipart")
    boundary = headers["Content-Type"].split('boundary="')[1].rstrip('"')
    meta, content = body.split(b"--" + boundary.encode())[1:3]
    assert meta.endswith(
        b'\r\n\r\n{"name": "out/x.jsonl", "contentType": "application/jsonl", "metadata": {"k": "v"}}\r\n'
    )
    assert content == b"\r\ncontent-type: application/jsonl\r\n\r\n" + data + b"\r\n"


def _crc(data: bytes) -> str:
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def test_a_download_is_written_whole_checked_and_retried_from_the_start(transport, server, tmp_path, monkeypatch):
    media, _ = transport
    monkeypatch.setattr(media_mod, "DOWNLOAD_CHUNK_BYTES", 1000)
    data = bytes(range(256)) * 40
    server.answers = [(502, {}, b"bad gateway"), (200, {}, data)]
    media.download(media.download_url("bkt", "m/saved_model.pb", 3), str(tmp_path / "f"), crc32c=_crc(data))
    assert (tmp_path / "f").read_bytes() == data
    assert [seen[2]["Accept-Encoding"] for seen in server.seen] == ["identity", "identity"]


def test_a_download_that_differs_from_its_listed_crc32c_is_refused_unless_it_was_decompressed(
    transport, server, tmp_path
):
    media, _ = transport
    url = media.download_url("bkt", "m/variables/variables.index", None)
    server.answers = [(200, {}, b"corrupted")]
    with pytest.raises(media_mod.DataCorrupted, match="not the AAAAAA== Cloud Storage lists for it"):
        media.download(url, str(tmp_path / "f"), crc32c="AAAAAA==")
    server.answers = [(200, {"X-Goog-Stored-Content-Encoding": "gzip"}, b"decompressed")]
    media.download(url, str(tmp_path / "f"), crc32c="AAAAAA==")  # the CRC32C is of the stored, gzip bytes
    assert (tmp_path / "f").read_bytes() == b"decompressed"
