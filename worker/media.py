"""Object bytes over HTTP for the requests a job makes per input file — the ranged reads of the
input and the single-request upload of a small output — and for downloading model files.

They go through the storage client's own connection pools, credentials and retry policy, but
not through requests and the client library's media classes, which add about a millisecond of
CPU to every request and read a response 8 kB at a time: on a tree of small files, a job makes
two requests per file, and that work would be a large share of its time.
With proxy variables in the environment requests sends them, keeping its per-URL proxy rules.
`storage` hands it the client's session, endpoint and retry policy: this module does not import
the client library.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.parse
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import google_crc32c
import requests
import urllib3
from google.api_core import exceptions as gexc
from google.auth.transport.requests import Request as AuthRequest

# The client library's own timeouts (seconds): to connect, then for each read.
TIMEOUTS_S = (61.0, 60.0)
TIMEOUT = urllib3.Timeout(connect=TIMEOUTS_S[0], read=TIMEOUTS_S[1])
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
USER_AGENT = "embedded-tf"


class DataCorrupted(Exception):
    """An object's bytes arrived other than Cloud Storage stores them."""


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Any  # case-insensitive
    data: bytes
    stream: Any = None  # instead of `data`, for a read answered with the whole object: .read(n), .close()

    def json(self) -> Any:
        return json.loads(self.data)


class MediaTransport:
    """Sends object reads and uploads for one storage client: `session` is its authorized
    requests session, `api_base` its endpoint (Cloud Storage's, or the emulator's), `retry` its
    retry policy (google.api_core's `Retry`: which errors, how long)."""

    def __init__(self, session: Any, api_base: str, *, retry: Callable[[Any], Any]) -> None:
        self._session = session
        self._api_base = api_base.rstrip("/")
        self._auth_request: AuthRequest | None = None  # made when first needed: for fetching tokens
        self._send_retried = retry(self._once)
        self._download_retried = retry(self._download_once)

    def download_url(self, bucket: str, name: str, generation: int | None) -> str:
        url = f"{self._api_base}/download/storage/v1/b/{_quote(bucket)}/o/{_quote(name)}?alt=media"
        return url + (f"&generation={generation}" if generation else "")

    def read(self, url: str, start: int, end: int) -> Reply:
        """Bytes `start`..`end` (inclusive) of the object at `url`: a 206 with them as `data`, or a
        200 with the whole object as a `stream` to read on, when Cloud Storage serves it whole (it
        decompresses a gzip-encoded object as it serves it, and then ignores the range)."""
        # Not Accept-Encoding gzip (requests' default): a gzip-encoded object's range would then be
        # stored bytes, a piece of a gzip stream that cannot be decompressed alone.
        headers = {"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
        return self._send("GET", url, headers=headers, stream_whole=True)

    def download(self, url: str, path: str, *, crc32c: str | None) -> None:
        """Write the object at `url` to the file `path`, 1 MiB at a time, checked against the
        CRC32C listed for it (base64) when it is served as stored; retried whole as a read is."""
        self._download_retried(url, path, crc32c)

    def _download_once(self, url: str, path: str, crc32c: str | None) -> None:
        reply = self._once("GET", url, {"Accept-Encoding": "identity"}, None, True)
        stream = reply.stream or io.BytesIO(reply.data)  # a 2xx other than 200 came whole
        checksum = google_crc32c.Checksum()  # type: ignore[no-untyped-call]
        try:
            with open(path, "wb") as f:
                while chunk := stream.read(DOWNLOAD_CHUNK_BYTES):
                    f.write(chunk)
                    checksum.update(chunk)  # type: ignore[no-untyped-call]
        finally:
            stream.close()
        # A gzip-encoded object is served decompressed: its CRC32C is that of the stored bytes.
        as_stored = reply.headers.get("x-goog-stored-content-encoding", "identity") == "identity"
        got = base64.b64encode(checksum.digest()).decode()  # type: ignore[no-untyped-call]
        if crc32c and as_stored and got != crc32c:
            raise DataCorrupted(f"{url} arrived with CRC32C {got}, not the {crc32c} Cloud Storage lists for it")

    def upload(
        self, bucket: str, name: str, blocks: Iterable[bytes], *, content_type: str, metadata: dict[str, str]
    ) -> Any:
        """Store `blocks`, joined, as one object in one multipart request; the object resource stored.
        (The blocks are joined once, into the request's body.)"""
        boundary = "embedded-tf-" + uuid.uuid4().hex
        resource = json.dumps({"name": name, "contentType": content_type, "metadata": metadata})
        body = b"".join(
            (
                f"--{boundary}\r\ncontent-type: application/json; charset=UTF-8\r\n\r\n{resource}\r\n".encode(),
                f"--{boundary}\r\ncontent-type: {content_type}\r\n\r\n".encode(),
                *blocks,
                f"\r\n--{boundary}--".encode(),
            )
        )
        url = f"{self._api_base}/upload/storage/v1/b/{_quote(bucket)}/o?uploadType=multipart"
        headers = {"Content-Type": f'multipart/related; boundary="{boundary}"'}
        return self._send("POST", url, headers=headers, body=body).json()

    def _send(
        self, method: str, url: str, *, headers: dict[str, str], body: bytes | None = None, stream_whole: bool = False
    ) -> Reply:
        """One request, retried by the retry policy; a non-2xx status it does not retry (or that
        outlasts it) raises the matching google.api_core error."""
        reply: Reply = self._send_retried(method, url, headers, body, stream_whole)
        return reply

    def _once(self, method: str, url: str, headers: dict[str, str], body: bytes | None, stream_whole: bool) -> Reply:
        credentials = self._session.credentials
        for attempt in (1, 2):
            sent = {"User-Agent": USER_AGENT, **headers}
            credentials.before_request(self._auth(), method, url, sent)
            reply = self._transmit(method, url, sent, body, stream_whole)
            if reply.status == 401 and attempt == 1 and getattr(credentials, "token", None):
                credentials.refresh(self._auth())  # the access token expired in flight
                continue
            break
        if 200 <= reply.status < 300:
            return reply
        raise gexc.from_http_status(reply.status, f"{method} {url}: {server_error_message(reply)}")  # type: ignore[no-untyped-call]

    def _transmit(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None, stream_whole: bool
    ) -> Reply:
        session = self._session
        if session.trust_env:
            # Proxy variables: requests applies them (and NO_PROXY) per URL. Plain Session.request:
            # the credentials were applied above.
            r = requests.Session.request(
                session, method, url, headers=headers, data=body, timeout=TIMEOUTS_S, allow_redirects=False, stream=True
            )
            response = r.raw
            response.decode_content = True
        else:
            probe = requests.PreparedRequest()
            probe.url = url
            pool = session.get_adapter(url).get_connection_with_tls_context(probe, session.verify, cert=session.cert)
            parts = urllib.parse.urlsplit(url)
            target = parts.path + ("?" + parts.query if parts.query else "")
            response = pool.urlopen(
                method,
                target,
                body=body,
                headers=headers,
                retries=False,
                redirect=False,
                timeout=TIMEOUT,
                preload_content=False,
            )
        if stream_whole and response.status == 200:
            return Reply(response.status, response.headers, b"", stream=response)
        try:
            return Reply(response.status, response.headers, response.read())
        finally:
            response.release_conn()

    def _auth(self) -> AuthRequest:
        if self._auth_request is None:
            self._auth_request = AuthRequest()
        return self._auth_request


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def server_error_message(reply: Reply) -> str:
    """Cloud Storage's `{"error": {"message": …}}`, else the body's start."""
    try:
        message = reply.json()["error"]["message"]
        return str(message)
    except (ValueError, KeyError, TypeError):
        return reply.data[:200].decode("utf-8", "replace") or f"HTTP {reply.status}"
