"""`GcsStore`: the worker's storage for one process, over one `storage.Client` — inputs listed
and read as lines, outputs written whole or not at all, small JSON objects with preconditions,
composes, and the model's files (delegated to `worker.storage.models`)."""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import requests
from google.api_core import exceptions as gexc
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY, ConditionalRetryPolicy, is_generation_specified

from worker import codec
from worker.errors import Conflict, InvalidJob, NotFound, TransientError
from worker.jobs import is_upload_part
from worker.media import MediaTransport
from worker.storage import models, upload
from worker.storage.background import BackgroundWriter, prefetched
from worker.storage.errors import bucket_missing, no_bucket, replaced_is_transient, translate_errors
from worker.storage.formats import (
    CUT_FORMATS,
    as_utf8,
    can_cut_head,
    gunzipped,
    owned_lines,
    skipped,
    split_lines,
)
from worker.storage.values import WRITTEN_BY_KEY, InputFile, LocalModel, ModelSource, StoredJson
from worker.uris import Uri

log = logging.getLogger(__name__)

T = TypeVar("T")

READ_CHUNK_BYTES = 4 * 1024 * 1024
# What a piece of a file reads past its end, a request at a time, for the rest of its last line.
TAIL_CHUNK_BYTES = 64 * 1024
# Objects one compose request joins at most (Cloud Storage's limit).
COMPOSE_MAX_SOURCES = 32
# How long a request is retried (429, 5xx, connection errors) by default: the client library's.
RETRY_S = 120.0


class GcsStore:
    """Storage for one process: a `storage.Client` shared by all jobs (thread-safe for our use)."""

    def __init__(self, client: storage.Client, *, download_threads: int = 8, retry_s: float = RETRY_S) -> None:
        self._client = client
        self._download_threads = download_threads
        # Every request: the client library's retry policy (429, 5xx, connection errors), for up to
        # `retry_s`; a compose only when it names its sources' generations, as the library does.
        self._retry = DEFAULT_RETRY.with_timeout(retry_s)
        self._compose_retry = ConditionalRetryPolicy(self._retry, is_generation_specified, ["query_params"])
        # Input reads, small outputs (the requests made per file) and model files.
        # The client's authorized requests session has no public accessor (its constructor takes one
        # only as the private `_http`): `_http` is read here, and only here (and by `upload`).
        self._media = MediaTransport(client._http, client.api_endpoint, retry=self._retry)

    @classmethod
    def from_environment(
        cls,
        project: str | None,
        *,
        environ: Mapping[str, str],
        download_threads: int = 8,
        concurrent_requests: int = 10,
        retry_s: float = RETRY_S,
    ) -> GcsStore:
        """A client for real GCS, or for the emulator when `environ` (the process's environment,
        handed down by the composition root) sets STORAGE_EMULATOR_HOST, keeping up to
        `concurrent_requests` connections alive (requests' default of 10 would drop and reopen
        connections when more files are in flight); requests retried for up to `retry_s`. (The
        client library reads STORAGE_EMULATOR_HOST from the process's environment itself.)"""
        if environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials

            client = storage.Client(project=project or "local", credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
        else:
            client = storage.Client(project=project or None)
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=max(10, concurrent_requests))
        for scheme in ("https://", "http://"):
            client._http.mount(scheme, adapter)
        _read_environment_once(client._http, environ)
        return cls(client, download_threads=download_threads, retry_s=retry_s)

    # -- inputs ------------------------------------------------------------------------------

    def list_inputs(self, input_uri: Uri, *, exclude: Uri | None = None) -> list[InputFile]:
        """The object `input_uri` names, or every object under it when it ends in `/`.

        Folder placeholders (names ending in `/`) and anything under `exclude` (the job's output
        prefix) are left out, so outputs written inside the input tree are never read back.
        """
        bucket = self._client.bucket(input_uri.bucket)
        with translate_errors(f"reading input {input_uri}", bucket):
            if not input_uri.is_prefix:
                return [self._one_input(bucket, input_uri)]
            files = []
            for blob in self._client.list_blobs(input_uri.bucket, prefix=input_uri.path, retry=self._retry):
                name: str = blob.name
                if name.endswith("/") or is_upload_part(name):
                    continue
                if exclude and exclude.bucket == input_uri.bucket and name.startswith(exclude.path):
                    continue
                files.append(self._input_file(blob, name[len(input_uri.path) :]))
        if not files:
            raise NotFound(f"input {input_uri} matches no object — check the prefix and that files were uploaded")
        files.sort(key=lambda f: f.rel)
        return files

    def _one_input(self, bucket: Any, input_uri: Uri) -> InputFile:
        """The object `input_uri` names; NotFound saying what to give instead when there is none."""
        blob = bucket.get_blob(input_uri.path, retry=self._retry)
        if blob is not None:
            return self._input_file(blob, posixpath.basename(input_uri.path))
        if bucket_missing(bucket):
            raise NotFound(f"reading input {input_uri}: {no_bucket(bucket)}")
        wildcard = min((i for i in map(input_uri.path.find, "*?[") if i >= 0), default=None)
        if wildcard is not None:
            folder = input_uri.path[:wildcard].rpartition("/")[0]
            raise NotFound(
                f"input {input_uri} does not exist, and wildcards (* ? [) are not expanded — give the "
                f"prefix the inputs are under, ending in / ({Uri(input_uri.bucket, folder).as_prefix()}, "
                "say): every object under it is an input"
            )
        raise NotFound(
            f"input {input_uri} does not exist — check the object name, or end the URI "
            "with / to read every object under a prefix"
        )

    @staticmethod
    def _input_file(blob: Any, rel: str) -> InputFile:
        return InputFile(
            uri=Uri(blob.bucket.name, blob.name),
            rel=rel,
            size=int(blob.size or 0),
            generation=int(blob.generation or 0),
        )

    def read_blocks(self, f: InputFile, *, max_line_bytes: int = 16 * 2**20) -> Iterator[list[bytes]]:
        """Yield the object's lines without their line endings, a list per downloaded chunk
        (`split_lines`), reading it in bounded chunks, the next chunk downloaded in a thread while
        this one is processed.

        The generation read at listing time is pinned, so a file replaced mid-job is not mixed.
        """

        def lines(chunks: Iterator[bytes], first: int, stop: int) -> Iterator[list[bytes]]:
            if f.piece is None:
                text = as_utf8(gunzipped(chunks, f.uri, READ_CHUNK_BYTES), f.uri)
            elif f.start == 0:  # the file's first piece: its byte order mark goes
                text = as_utf8(owned_lines(chunks, 0, 0, stop), f.uri)
            else:
                text = owned_lines(chunks, first, f.start, stop)
            return split_lines(text, max_line_bytes)

        return self._stream(f, lines)

    def read_data(self, f: InputFile) -> Iterator[bytes]:
        """Yield the whole object's bytes (gzip-compressed ones decompressed), in bounded chunks,
        read ahead as `read_blocks` reads them: for files of records rather than lines. A piece of
        the file gives its bytes as stored from its start to the file's end, as far as they are read."""
        if f.piece is not None:
            return self._stream(f, lambda chunks, first, stop: skipped(chunks, f.start - first))
        return self._stream(f, lambda chunks, first, stop: gunzipped(chunks, f.uri, READ_CHUNK_BYTES))

    def _stream(self, f: InputFile, decode: Callable[[Iterator[bytes], int, int], Iterator[T]]) -> Iterator[T]:
        """What `decode(chunks, first, stop)` makes of the object's chunks: its bytes from `first`
        (a piece reads from the byte before its start) to past `stop` (the end of its last line)."""
        url = self._media.download_url(f.uri.bucket, f.uri.path, f.generation or None)
        # A piece reads from the byte before its start (the end of the line before it, or of a
        # line it is cut through), and past its end only to the end of its last line.
        offset = first = max(0, f.start - 1)
        stop = f.size if f.end is None else f.end
        whole: Any = None  # the object as one stream, when Cloud Storage serves it so

        def read() -> bytes:
            # Ranged reads up to the size listed for this generation: a small file is one request.
            nonlocal offset, whole
            if whole is not None:
                chunk: bytes = whole.read(READ_CHUNK_BYTES)
                return chunk
            if offset >= f.size:
                return b""
            step = READ_CHUNK_BYTES if offset < stop else TAIL_CHUNK_BYTES
            reply = self._media.read(url, offset, min(offset + step, f.size) - 1)
            if reply.stream is not None and f.piece is not None:
                reply.stream.close()
                raise InvalidJob(f"input {f.uri} is stored gzip-encoded: it cannot be read in pieces")
            if reply.stream is not None:
                # The whole object, decompressed as served (it is stored gzip-encoded, and longer
                # than listed): read on from it, past what was read already.
                whole = reply.stream
                while offset > 0 and (skipped := len(whole.read(min(offset, READ_CHUNK_BYTES)))):
                    offset -= skipped
                return read()
            if not reply.data:
                raise TransientError(f"reading input {f.uri}: it ended at byte {offset} of {f.size}")
            offset += len(reply.data)
            return reply.data

        def more() -> bool:
            return whole is not None or offset < f.size

        with translate_errors(f"reading input {f.uri}"), replaced_is_transient(f):
            chunks = prefetched(read, name=f"download {f.uri}", more=more)
            try:
                yield from decode(chunks, first, stop)
            finally:
                chunks.close()  # its reading thread stopped first, then the stream it reads
                if whole is not None:
                    whole.close()

    def can_cut(self, f: InputFile, read_as: str) -> bool:
        """Whether the file, read as `read_as`, can be read in pieces that begin and end at any
        byte: JSON lines or CSV in UTF-8, or TFRecord, as stored — not gzip-compressed (as
        stored, or served decompressed), UTF-16 or of another format, which only a reading from
        its first byte can tell (or decompress)."""
        if read_as not in CUT_FORMATS:
            return False
        url = self._media.download_url(f.uri.bucket, f.uri.path, f.generation or None)
        with translate_errors(f"reading input {f.uri}"), replaced_is_transient(f):
            reply = self._media.read(url, 0, max(1, min(f.size, 16)) - 1)
        if reply.stream is not None:
            reply.stream.close()
            return False
        return can_cut_head(reply.data, read_as)

    def lines_before(self, f: InputFile) -> int:
        """How many lines of the file begin before the first line of the piece `f` (the number of
        that line, less one): its newlines before byte start - 1, plus the line they leave open.
        The bytes before it are read in ranges, `download_threads` at a time, and only counted."""
        if f.start == 0:
            return 0
        url = self._media.download_url(f.uri.bucket, f.uri.path, f.generation or None)

        def newlines(start: int) -> int:
            end = min(start + READ_CHUNK_BYTES, f.start - 1)
            reply = self._media.read(url, start, end - 1)
            if reply.stream is not None:
                reply.stream.close()
            if reply.stream is not None or len(reply.data) != end - start:
                raise TransientError(f"reading input {f.uri}: bytes {start} to {end} of {f.size} did not come whole")
            return reply.data.count(b"\n")

        starts = range(0, f.start - 1, READ_CHUNK_BYTES)
        with translate_errors(f"reading input {f.uri}"), replaced_is_transient(f):
            if len(starts) <= 1:
                return sum(map(newlines, starts)) + 1
            with ThreadPoolExecutor(max_workers=min(self._download_threads, len(starts))) as pool:
                return sum(pool.map(newlines, starts)) + 1

    def names_under(self, prefix: Uri) -> set[str]:
        """The names of the objects under `prefix` (a folder's, ending in /)."""
        with translate_errors(f"listing {prefix}"):
            names = self._client.list_blobs(prefix.bucket, prefix=prefix.path, retry=self._retry)
            return {blob.name for blob in names}

    def compose(self, sources: list[Uri], uri: Uri, *, scratch: Uri, job_id: str, content_type: str) -> None:
        """Write at `uri` the objects `sources` (of its bucket) end to end, as one object that
        appears whole, deleting the sources as it does (`deleteSourceObjects`: at once, without the
        days a bucket's soft delete would keep and bill them). More than Cloud Storage joins in one
        request are joined in groups first, into objects under the prefix `scratch` (the sources
        kept until the groups are joined: the caller removes them). A source that is gone raises."""
        bucket = self._client.bucket(uri.bucket)
        groups = [sources[i : i + COMPOSE_MAX_SOURCES] for i in range(0, len(sources), COMPOSE_MAX_SOURCES)]
        joined = sources if len(groups) == 1 else [scratch.child(f"group-{k}") for k in range(len(groups))]
        with translate_errors(f"writing output {uri}", bucket):
            if len(groups) > 1:
                for group, into in zip(groups, joined, strict=True):
                    self._compose(bucket, group, into, job_id=job_id, content_type=content_type, delete=False)
            self._compose(bucket, joined, uri, job_id=job_id, content_type=content_type, delete=True)
        if len(groups) > 1:
            for into in joined:
                self.delete(into)  # where `deleteSourceObjects` is not honoured (fake-gcs-server ignores it)

    def _compose(
        self, bucket: Any, sources: list[Uri], uri: Uri, *, job_id: str, content_type: str, delete: bool
    ) -> None:
        blob = bucket.blob(uri.path)
        blob.metadata = {WRITTEN_BY_KEY: job_id}
        blob.content_type = content_type
        blob.compose(
            [bucket.blob(s.path) for s in sources], delete_source_objects=delete or None, retry=self._compose_retry
        )

    def written_by(self, uri: Uri) -> str | None:
        """The job that wrote the object (its `embedded-tf-job` metadata); None when it does not
        exist or another program wrote it."""
        with translate_errors(f"reading {uri}"):
            blob = self._client.bucket(uri.bucket).get_blob(uri.path, retry=self._retry)
        return None if blob is None else (blob.metadata or {}).get(WRITTEN_BY_KEY)

    # -- outputs -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def open_output(self, uri: Uri, *, job_id: str, content_type: str) -> Iterator[BackgroundWriter]:
        """A binary stream to `uri`, visible only once the block exits normally; on an exception
        no object appears. Uploading runs in a thread of its own, so the next batches are
        predicted while the last ones are sent."""
        blob = self._client.bucket(uri.bucket).blob(uri.path)
        blob.metadata = {WRITTEN_BY_KEY: job_id}
        with translate_errors(f"writing output {uri}", blob.bucket):
            sink = upload.Upload(blob, content_type, self._media, self._retry)
            writer = BackgroundWriter(sink, name=f"upload {uri}", inline_bytes=upload.FIRST_CHUNK_BYTES)
            try:
                yield writer
                writer.finish()
                sink.close()
            except BaseException:
                writer.abandon()
                sink.terminate()
                raise

    def write_json(self, uri: Uri, value: Any, *, job_id: str, if_generation_match: int | None = None) -> int:
        """Write `value` as one object (a single-request upload, so preconditions apply);
        `if_generation_match=0` creates only if absent. Returns the new generation; a failed
        precondition raises `Conflict`."""
        blob = self._client.bucket(uri.bucket).blob(uri.path)
        blob.metadata = {WRITTEN_BY_KEY: job_id}
        with translate_errors(f"writing {uri}", blob.bucket):
            blob.upload_from_string(
                json.dumps(value, indent=2) + "\n",
                content_type="application/json",
                if_generation_match=if_generation_match,
                retry=self._retry,
            )
        return int(blob.generation or 0)

    def read_json(self, uri: Uri) -> StoredJson | None:
        """The object decoded, with its generation and metadata (value None when it is not JSON);
        None when it does not exist."""
        try:
            with translate_errors(f"reading {uri}"):
                # get_blob reads the metadata too; download_as_bytes alone would not.
                blob = self._client.bucket(uri.bucket).get_blob(uri.path, retry=self._retry)
                if blob is None:
                    return None
                data = blob.download_as_bytes(if_generation_match=blob.generation, retry=self._retry)
        except (NotFound, Conflict):
            return None  # deleted or replaced between the two calls: as good as absent this time
        try:
            value = codec.loads(data)
        except ValueError:
            log.warning("%s is not JSON; ignoring its content", uri)
            value = None
        return StoredJson(value, int(blob.generation or 0), dict(blob.metadata or {}))

    def mark(self, uri: Uri, key: str, value: str) -> None:
        """Add one custom metadata entry to an existing object (its content and generation stay)."""
        blob = self._client.bucket(uri.bucket).blob(uri.path)
        with translate_errors(f"updating metadata of {uri}"):
            blob.reload(retry=self._retry)
            blob.metadata = {**(blob.metadata or {}), key: value}
            blob.patch(retry=self._retry)

    def delete(self, uri: Uri, *, if_generation_match: int | None = None) -> None:
        """Delete the object if it still is that generation; absent already is fine."""
        blob = self._client.bucket(uri.bucket).blob(uri.path)
        try:
            with translate_errors(f"deleting {uri}"):
                blob.delete(if_generation_match=if_generation_match, retry=self._retry)
        except NotFound:
            pass

    def read_at_most(self, uri: Uri, limit: int) -> bytes:
        """The object's bytes, but no more than `limit + 1` of them (more than `limit`: too large to
        take whole), read in one request; `NotFound` when it does not exist."""
        url = self._media.download_url(uri.bucket, uri.path, None)
        with translate_errors(f"reading {uri}", self._client.bucket(uri.bucket)):
            try:
                reply = self._media.read(url, 0, limit)
            except gexc.RequestRangeNotSatisfiable:
                return b""  # an empty object has no byte 0
        if reply.stream is None:
            return reply.data
        try:
            data: bytes = reply.stream.read(limit + 1)
            return data
        finally:
            reply.stream.close()

    def read_bytes(self, uri: Uri) -> bytes:
        with translate_errors(f"reading {uri}"):
            data: bytes = self._client.bucket(uri.bucket).blob(uri.path).download_as_bytes(retry=self._retry)
            return data

    # -- models ------------------------------------------------------------------------------

    def resolve_model(self, model: Uri) -> ModelSource:
        """The version folder `model` designates, listed (see `worker.storage.models`)."""
        return models.resolve_model(self._client, self._retry, model)

    def fetch_model(self, source: ModelSource, work_dir: str) -> LocalModel:
        """The model's version folder on local disk under `work_dir` (see `worker.storage.models`)."""
        return models.fetch_model(source, work_dir, models.gcs_download(self._media), threads=self._download_threads)


def _read_environment_once(session: requests.Session, environ: Mapping[str, str]) -> None:
    """requests looks through the environment on every request: proxy variables, ~/.netrc, CA
    bundles (on a tree of small files, a noticeable share of the worker's CPU). Without proxy variables
    there is nothing there to honour per request: take the CA bundle once and stop looking. With
    any, requests keeps its own per-URL proxy rules (NO_PROXY)."""
    if any(key.lower().endswith("_proxy") for key in environ):
        return
    bundle = environ.get("REQUESTS_CA_BUNDLE") or environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    session.trust_env = False
