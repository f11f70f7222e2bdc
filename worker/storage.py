"""Cloud Storage I/O, and the only importer of `google.cloud.storage`.

Lists input objects, streams their lines, writes outputs that appear whole or not at all, reads and
writes manifests, and fetches a SavedModel (resolving TF Serving's numeric version folders).
SDK exceptions are translated here into the worker's permanent/transient errors.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import hashlib
import itertools
import json
import logging
import os
import posixpath
import queue
import shutil
import tempfile
import threading
import zlib
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import google_crc32c
import requests
import urllib3
from google.api_core import exceptions as gexc
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY, ConditionalRetryPolicy, is_generation_specified

from worker import codec
from worker.codec import shown
from worker.errors import Conflict, InvalidJob, ModelError, NotFound, PermanentError, TransientError
from worker.jobs import GcsUri, is_upload_part
from worker.media import TIMEOUTS_S, DataCorrupted, MediaTransport

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 4 * 1024 * 1024
# Resumable upload chunks must be multiples of 256 KiB. Each chunk is a request: fewer of them
# means fewer round trips to Cloud Storage. An open output holds at most one chunk (and one
# block): 16 MiB holds what 8 MiB did through the client library's writer, which holds two. The
# chunks grow to it from FIRST_CHUNK_BYTES (8, 16, 16 … MiB); an output smaller than the first
# chunk is sent in one request when complete, as the client library sends an object of up to
# 8 MiB (its multipart limit). docs/benchmarks.md has the measurements behind these sizes.
WRITE_CHUNK_BYTES = 16 * 1024 * 1024
# What a piece of a file reads past its end, a request at a time, for the rest of its last line.
TAIL_CHUNK_BYTES = 64 * 1024
# Objects one compose request joins at most (Cloud Storage's limit).
COMPOSE_MAX_SOURCES = 32
FIRST_CHUNK_BYTES = 8 * 1024 * 1024
# How long a request is retried (429, 5xx, connection errors) by default: the client library's.
RETRY_S = 120.0
# Output blocks queued for the upload thread at most: bounds memory (a block is a batch's lines).
WRITE_QUEUE_BLOCKS = 64
# How a gzip file begins; no JSON text does (0x1f is a control character).
GZIP_MAGIC = b"\x1f\x8b"
# The file that makes a folder a SavedModel: binary, or text (as TF 1's builders could write it
# with as_text=True); TensorFlow and TF Serving load either.
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
# Custom metadata set on every object the worker writes, so object events never loop back.
WRITTEN_BY_KEY = "embedded-tf-job"


@dataclass(frozen=True)
class InputFile:
    uri: GcsUri
    rel: str  # path relative to the input prefix: where its output goes under the output prefix
    size: int
    generation: int
    # A piece of the file (cut for a job run as parts): piece i of m, the lines that begin in its
    # bytes [start, end). The whole file is the one piece [0, size).
    piece: tuple[int, int] | None = None
    start: int = 0
    end: int | None = None

    @property
    def length(self) -> int:
        """Bytes of the file this reads (about: a piece's last line may end past its `end`)."""
        return (self.size if self.end is None else self.end) - self.start


@dataclass(frozen=True)
class StoredJson:
    """A small JSON object as read, with what conditional writes and marks need."""

    value: Any
    generation: int
    metadata: dict[str, str]


@dataclass(frozen=True)
class ModelSource:
    """A model's version folder in Cloud Storage, as listed: what `fetch_model` downloads."""

    folder: GcsUri
    version: int | None
    blobs: list[Any]
    fingerprint: str  # changes when any object of the model changes
    size: int  # bytes of its objects: what it takes on local disk

    @classmethod
    def of(cls, folder: GcsUri, version: int | None, blobs: list[Any]) -> ModelSource:
        names = "\n".join(sorted(f"{b.name}#{b.generation}" for b in blobs))
        fingerprint = hashlib.sha256(names.encode()).hexdigest()[:20]
        return cls(folder, version, blobs, fingerprint, sum(int(b.size or 0) for b in blobs))


@dataclass(frozen=True)
class LocalModel:
    uri: GcsUri  # the version folder that was fetched
    version: int | None
    path: str  # local folder holding saved_model.pb (or .pbtxt)
    fingerprint: str  # changes when any object of the model changes
    downloaded: bool = True  # False when an identical local copy was reused


# Failures to talk to Cloud Storage at all (from requests, or urllib3 under the media transport).
_UNREACHABLE = (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


@contextlib.contextmanager
def translate_errors(what: str, bucket: Any = None) -> Iterator[None]:
    """Map SDK and transport failures to the worker's error tree, naming `what` was being done.
    With the `bucket` being worked in, a 404 says so when it is the bucket that does not exist."""
    try:
        yield
    except (NotFound, PermanentError, TransientError):
        raise
    except gexc.PreconditionFailed as e:
        raise Conflict(f"{what}: changed by another writer ({e.message})") from e
    except gexc.NotFound as e:
        if bucket is not None and _bucket_missing(bucket):
            raise NotFound(f"{what}: {_no_bucket(bucket)}") from e
        raise NotFound(f"{what}: not found ({e.message})") from e
    except gexc.Forbidden as e:
        raise PermanentError(f"{what}: permission denied ({e.message}) — {_grant(e.message, bucket)}") from e
    except gexc.Unauthorized as e:
        raise PermanentError(f"{what}: unauthorized ({e.message})") from e
    except (gexc.ServerError, gexc.TooManyRequests, gexc.RetryError) as e:
        raise TransientError(f"{what}: Cloud Storage unavailable ({e})") from e
    except DataCorrupted as e:
        raise TransientError(f"{what}: {e}; the job will be retried") from e
    except _UNREACHABLE as e:
        raise TransientError(f"{what}: cannot reach Cloud Storage ({e})") from e


# The predefined role that holds a Cloud Storage permission a 403 names, the least that does.
_ROLES = {
    "storage.objects.get": "roles/storage.objectViewer",
    "storage.objects.list": "roles/storage.objectViewer",
    "storage.objects.create": "roles/storage.objectUser",
    "storage.objects.delete": "roles/storage.objectUser",
    "storage.objects.update": "roles/storage.objectUser",
}


def _grant(message: str, bucket: Any) -> str:
    """What to grant after a 403 whose `message` names the missing permission, as Cloud Storage's
    do ("… does not have storage.objects.create access to … Permission 'storage.objects.create'
    denied …")."""
    where = f" on gs://{bucket.name}" if bucket is not None else " on the bucket"
    for permission, role in _ROLES.items():
        if permission in message:
            return f"grant the worker's service account {role}{where}: it lacks {permission}"
    return f"grant the worker's service account access{where}"


def _bucket_missing(bucket: Any) -> bool:
    """Whether `bucket` does not exist; asked after a 404 only. False when that cannot be told
    (the service account may read objects without being allowed to read the bucket)."""
    try:
        return not bucket.exists()
    except (gexc.GoogleAPICallError, requests.RequestException):
        return False


# Model files of other formats, by what their names end with: what each is, and what to do.
_OTHER_FORMATS = {
    (".keras", ".h5", ".hdf5"): ("a Keras model file", "export a SavedModel with Keras 3's `model.export(folder)`"),
    (".tflite",): ("a TensorFlow Lite model", "save the model it was converted from with `tf.saved_model.save`"),
    (".onnx",): ("an ONNX model", "convert it to a SavedModel (onnx-tf, say)"),
    (".pt", ".pth", ".pkl", ".joblib"): ("not a TensorFlow model", "this worker serves TensorFlow SavedModels"),
    (".zip", ".tar", ".tar.gz", ".tgz"): ("an archive", "unpack it into the bucket"),
}


def _not_saved_model(name: str) -> str:
    """What a model object named `name` is when its format is not a SavedModel's, and what to do
    ("; m.keras is a Keras model file, not a SavedModel: export …"); "" for other names."""
    for suffixes, (what, advice) in _OTHER_FORMATS.items():
        if name.lower().endswith(suffixes):
            return f"; {posixpath.basename(name)} is {what}, not a SavedModel: {advice}"
    return ""


def _no_bucket(bucket: Any) -> str:
    return f"bucket {bucket.name} does not exist — check the bucket name in the URI"


@contextlib.contextmanager
def _replaced_is_transient(f: InputFile) -> Iterator[None]:
    """The listed generation of an input vanishing mid-read means it was replaced or deleted: a
    retry lists the input again and reads what is there then."""
    try:
        yield
    except gexc.NotFound as e:
        raise TransientError(
            f"input {f.uri} was replaced or deleted while it was read (generation {f.generation} is gone); "
            "the job will be retried"
        ) from e


def _safe_join(root: str, rel: str) -> str:
    """`root/rel` for a model object named `rel` in its folder, refusing any name that is not a
    plain path below it: a `.`, `..` or empty segment, a backslash, or a leading `/`."""
    segments = rel.split("/")
    if "\\" in rel or any(segment in ("", ".", "..") for segment in segments):
        raise ModelError(
            f"model object name {shown(rel)} is not a plain path in the model folder (it has a '.', '..' or empty "
            "segment, or a backslash): refusing to download it — rename or delete that object"
        )
    return os.path.join(root, *segments)


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
        self._media = MediaTransport(client._http, client._connection.API_BASE_URL, retry=self._retry)

    @classmethod
    def from_environment(
        cls, project: str | None, *, download_threads: int = 8, concurrent_requests: int = 10, retry_s: float = RETRY_S
    ) -> GcsStore:
        """A client for real GCS, or for the emulator when STORAGE_EMULATOR_HOST is set, keeping
        up to `concurrent_requests` connections alive (requests' default of 10 would drop and
        reopen connections when more files are in flight); requests retried for up to `retry_s`."""
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials

            client = storage.Client(project=project or "local", credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
        else:
            client = storage.Client(project=project or None)
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=max(10, concurrent_requests))
        for scheme in ("https://", "http://"):
            client._http.mount(scheme, adapter)
        _read_environment_once(client._http, os.environ)
        return cls(client, download_threads=download_threads, retry_s=retry_s)

    # -- inputs ------------------------------------------------------------------------------

    def list_inputs(self, input_uri: GcsUri, *, exclude: GcsUri | None = None) -> list[InputFile]:
        """The object `input_uri` names, or every object under it when it ends in `/`.

        Folder placeholders (names ending in `/`) and anything under `exclude` (the job's output
        prefix) are left out, so outputs written inside the input tree are never read back.
        """
        bucket = self._client.bucket(input_uri.bucket)
        with translate_errors(f"reading input {input_uri}", bucket):
            if not input_uri.is_prefix:
                blob = bucket.get_blob(input_uri.path, retry=self._retry)
                if blob is None and _bucket_missing(bucket):
                    raise NotFound(f"reading input {input_uri}: {_no_bucket(bucket)}")
                wildcard = min((i for i in map(input_uri.path.find, "*?[") if i >= 0), default=None)
                if blob is None and wildcard is not None:
                    folder = input_uri.path[:wildcard].rpartition("/")[0]
                    raise NotFound(
                        f"input {input_uri} does not exist, and wildcards (* ? [) are not expanded — give the "
                        f"prefix the inputs are under, ending in / ({GcsUri(input_uri.bucket, folder).as_prefix()}, "
                        "say): every object under it is an input"
                    )
                if blob is None:
                    raise NotFound(
                        f"input {input_uri} does not exist — check the object name, or end the URI "
                        "with / to read every object under a prefix"
                    )
                return [self._input_file(blob, posixpath.basename(input_uri.path))]
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

    @staticmethod
    def _input_file(blob: Any, rel: str) -> InputFile:
        return InputFile(
            uri=GcsUri(blob.bucket.name, blob.name),
            rel=rel,
            size=int(blob.size or 0),
            generation=int(blob.generation or 0),
        )

    def read_blocks(self, f: InputFile, *, max_line_bytes: int = 16 * 2**20) -> Iterator[list[bytes]]:
        """Yield the object's lines without their line endings (`\n` or `\r\n`), a list per
        downloaded chunk, reading it in bounded chunks, the next chunk downloaded in a thread while
        this one is processed. A line that grows past `max_line_bytes` across chunks is cut to
        `max_line_bytes + 1` bytes (so it still reads as too long) and the rest of it is dropped
        as it arrives: memory stays bounded by the chunk and the limit, whatever the file holds.

        The generation read at listing time is pinned, so a file replaced mid-job is not mixed.
        """
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

        with translate_errors(f"reading input {f.uri}"), _replaced_is_transient(f):
            chunks = _prefetched(read, name=f"download {f.uri}", more=more)
            try:
                pending = b""
                cut = False  # `pending` is the start of a line longer than the limit
                if f.piece is None:
                    text = _as_utf8(_gunzipped(chunks, f.uri), f.uri)
                elif f.start == 0:  # the file's first piece: its byte order mark goes
                    text = _as_utf8(_owned_lines(chunks, 0, 0, stop), f.uri)
                else:
                    text = _owned_lines(chunks, first, f.start, stop)
                for chunk in text:
                    if cut:
                        end = chunk.find(b"\n")
                        if end < 0:
                            continue  # still inside the long line: dropped
                        yield [pending]
                        pending, cut, chunk = b"", False, chunk[end + 1 :]
                    data = pending + chunk
                    lines = data.split(b"\n")
                    pending = lines.pop()
                    if len(pending) > max_line_bytes:
                        pending, cut = pending[: max_line_bytes + 1], True
                    if lines:
                        yield _without_cr(lines) if b"\r" in data else lines
                if pending:
                    yield _without_cr([pending])
            finally:
                chunks.close()  # its reading thread stopped first, then the stream it reads
                if whole is not None:
                    whole.close()

    def can_cut(self, f: InputFile) -> bool:
        """Whether the file can be read in pieces that begin and end at any byte: JSON lines in
        UTF-8 as stored, not gzip-compressed (as stored, or served decompressed), UTF-16 or of
        another format, which only a reading from its first byte can tell (or decompress)."""
        url = self._media.download_url(f.uri.bucket, f.uri.path, f.generation or None)
        with translate_errors(f"reading input {f.uri}"), _replaced_is_transient(f):
            reply = self._media.read(url, 0, max(1, min(f.size, 16)) - 1)
        if reply.stream is not None:
            reply.stream.close()
            return False
        head = reply.data
        marks = [mark for mark, _ in _BYTE_ORDER_MARKS if mark != codecs.BOM_UTF8]
        return not (head.startswith(GZIP_MAGIC) or head.startswith(tuple(marks)) or _other_format(head))

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
        with translate_errors(f"reading input {f.uri}"), _replaced_is_transient(f):
            if len(starts) <= 1:
                return sum(map(newlines, starts)) + 1
            with ThreadPoolExecutor(max_workers=min(self._download_threads, len(starts))) as pool:
                return sum(pool.map(newlines, starts)) + 1

    def names_under(self, prefix: GcsUri) -> set[str]:
        """The names of the objects under `prefix` (a folder's, ending in /)."""
        with translate_errors(f"listing {prefix}"):
            names = self._client.list_blobs(prefix.bucket, prefix=prefix.path, retry=self._retry)
            return {blob.name for blob in names}

    def compose(self, sources: list[GcsUri], uri: GcsUri, *, scratch: GcsUri, job_id: str, content_type: str) -> None:
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
        self, bucket: Any, sources: list[GcsUri], uri: GcsUri, *, job_id: str, content_type: str, delete: bool
    ) -> None:
        blob = bucket.blob(uri.path)
        blob.metadata = {WRITTEN_BY_KEY: job_id}
        blob.content_type = content_type
        blob.compose(
            [bucket.blob(s.path) for s in sources], delete_source_objects=delete or None, retry=self._compose_retry
        )

    def written_by(self, uri: GcsUri) -> str | None:
        """The job that wrote the object (its `embedded-tf-job` metadata); None when it does not
        exist or another program wrote it."""
        with translate_errors(f"reading {uri}"):
            blob = self._client.bucket(uri.bucket).get_blob(uri.path, retry=self._retry)
        return None if blob is None else (blob.metadata or {}).get(WRITTEN_BY_KEY)

    # -- outputs -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def open_output(self, uri: GcsUri, *, job_id: str, content_type: str) -> Iterator[BackgroundWriter]:
        """A binary stream to `uri`, visible only once the block exits normally; on an exception
        no object appears. Uploading runs in a thread of its own, so the next batches are
        predicted while the last ones are sent."""
        blob = self._client.bucket(uri.bucket).blob(uri.path)
        blob.metadata = {WRITTEN_BY_KEY: job_id}
        with translate_errors(f"writing output {uri}", blob.bucket):
            sink = _Upload(blob, content_type, self._media, self._retry)
            writer = BackgroundWriter(sink, name=f"upload {uri}", inline_bytes=FIRST_CHUNK_BYTES)
            try:
                yield writer
                writer.finish()
                sink.close()
            except BaseException:
                writer.abandon()
                sink.terminate()
                raise

    def write_json(self, uri: GcsUri, value: Any, *, job_id: str, if_generation_match: int | None = None) -> int:
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

    def read_json(self, uri: GcsUri) -> StoredJson | None:
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

    def mark(self, uri: GcsUri, key: str, value: str) -> None:
        """Add one custom metadata entry to an existing object (its content and generation stay)."""
        blob = self._client.bucket(uri.bucket).blob(uri.path)
        with translate_errors(f"updating metadata of {uri}"):
            blob.reload(retry=self._retry)
            blob.metadata = {**(blob.metadata or {}), key: value}
            blob.patch(retry=self._retry)

    def delete(self, uri: GcsUri, *, if_generation_match: int | None = None) -> None:
        """Delete the object if it still is that generation; absent already is fine."""
        blob = self._client.bucket(uri.bucket).blob(uri.path)
        try:
            with translate_errors(f"deleting {uri}"):
                blob.delete(if_generation_match=if_generation_match, retry=self._retry)
        except NotFound:
            pass

    def read_bytes(self, uri: GcsUri) -> bytes:
        with translate_errors(f"reading {uri}"):
            data: bytes = self._client.bucket(uri.bucket).blob(uri.path).download_as_bytes(retry=self._retry)
            return data

    # -- models ------------------------------------------------------------------------------

    def resolve_model(self, model: GcsUri) -> ModelSource:
        """Find the version folder `model` designates and list its objects.

        `model` may be the version folder itself (holding saved_model.pb, or saved_model.pbtxt), or
        a base path of numeric version folders, where the highest version wins as in TF Serving.
        """
        base = model
        leaf = posixpath.basename(base.path)
        if leaf in SAVED_MODEL_FILES:
            base = GcsUri(base.bucket, base.path[: -len(leaf)])
        base = base.as_prefix()
        bucket = self._client.bucket(base.bucket)
        with translate_errors(f"reading model {model}", bucket):
            blobs = list(self._client.list_blobs(base.bucket, prefix=base.path, retry=self._retry))
            if not blobs and not model.is_prefix and bucket.get_blob(model.path, retry=self._retry) is not None:
                raise ModelError(
                    f"model {model} is one object, not a folder{_not_saved_model(model.path)} — point `model` at "
                    "the folder that holds saved_model.pb and variables/"
                )
        if not blobs:
            raise NotFound(f"model {model} does not exist: no object under {base} — check the path")
        rel_names = {b.name[len(base.path) :]: b for b in blobs}
        if any(name in rel_names for name in SAVED_MODEL_FILES):
            leaf = base.path.rstrip("/").rsplit("/", 1)[-1]
            return ModelSource.of(base, int(leaf) if leaf.isdigit() else None, blobs)
        versions = sorted(
            {
                int(folder)
                for folder, _, name in (rel.partition("/") for rel in rel_names)
                if folder.isdigit() and name in SAVED_MODEL_FILES
            }
        )
        if not versions:
            found = {posixpath.dirname(rel) + "/" for rel in rel_names if posixpath.basename(rel) in SAVED_MODEL_FILES}
            if found:
                deeper = sorted(found)
                where = ", ".join(str(base.child(d)) for d in deeper[:3]) + (", …" if len(deeper) > 3 else "")
                raise ModelError(
                    f"model {model} has no saved_model.pb, nor numeric version folders holding one; there is one "
                    f"deeper, in {where} — point `model` at that folder (or at the folder of its numeric versions)"
                )
            hint = next(filter(None, map(_not_saved_model, sorted(rel_names))), "")
            raise ModelError(
                f"model {model} has no saved_model.pb{hint} — point `model` at the version folder that "
                "holds saved_model.pb and variables/, or at its parent holding numeric version folders"
            )
        version = versions[-1]
        folder = base.child(f"{version}/")
        return ModelSource.of(folder, version, [b for b in blobs if b.name.startswith(folder.path)])

    def fetch_model(self, source: ModelSource, work_dir: str) -> LocalModel:
        """Download the model's version folder under `work_dir`, reusing an identical earlier copy."""
        folder, version, blobs, fingerprint = source.folder, source.version, source.blobs, source.fingerprint
        dest = os.path.join(work_dir, "models", fingerprint)
        if any(os.path.isfile(os.path.join(dest, name)) for name in SAVED_MODEL_FILES):
            log.info("model %s already on local disk", folder)
            return LocalModel(folder, version, dest, fingerprint, downloaded=False)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".fetch-", dir=os.path.dirname(dest))
        try:
            targets = []
            for b in blobs:
                rel = b.name[len(folder.path) :]
                if not rel or rel.endswith("/"):
                    continue
                targets.append((b, _safe_join(staging, rel)))
            log.info("downloading model %s: %d files, %d bytes", folder, len(targets), source.size)

            def fetch(item: tuple[Any, str]) -> None:
                blob, path = item
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with translate_errors(f"downloading model file gs://{blob.bucket.name}/{blob.name}"):
                    url = self._media.download_url(blob.bucket.name, blob.name, blob.generation)
                    self._media.download(url, path, crc32c=blob.crc32c)

            with ThreadPoolExecutor(max_workers=self._download_threads) as pool:
                list(pool.map(fetch, targets))
            try:
                os.rename(staging, dest)
            except OSError:
                # Another job fetched the same model at the same time; theirs is as good as ours.
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return LocalModel(folder, version, dest, fingerprint)


def _read_environment_once(session: requests.Session, environ: Mapping[str, str]) -> None:
    """requests looks through the environment on every request: proxy variables, ~/.netrc, CA
    bundles (on a tree of small files, 12% of the worker's CPU, measured). Without proxy variables
    there is nothing there to honour per request: take the CA bundle once and stop looking. With
    any, requests keeps its own per-URL proxy rules (NO_PROXY)."""
    if any(key.lower().endswith("_proxy") for key in environ):
        return
    bundle = environ.get("REQUESTS_CA_BUNDLE") or environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    session.trust_env = False


def _without_cr(lines: list[bytes]) -> list[bytes]:
    """The lines of a CRLF file without their CR."""
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


class _Upload:
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


def _owned_lines(chunks: Iterator[bytes], pos: int, start: int, end: int) -> Iterator[bytes]:
    """The bytes of the lines that begin in [start, end), from `chunks`, the object's bytes from
    byte `pos` on (0, or start - 1: whether a line begins at `start` is told by the byte before it).
    A file cut at any bytes into pieces read so has each of its lines in one piece, whole."""
    if start >= end:
        return
    skipping = start > 0  # through the end of the line that byte start - 1 is in
    for chunk in chunks:
        at, pos = pos, pos + len(chunk)
        if skipping:
            newline = chunk.find(b"\n")
            if newline < 0:
                continue
            skipping, chunk, at = False, chunk[newline + 1 :], at + newline + 1
            if at >= end:
                return  # the first line after the cut begins at or after the end: none is this piece's
        if pos >= end:
            # The last line that begins before `end` ends at the first newline from byte end - 1 on.
            newline = chunk.find(b"\n", max(0, end - 1 - at))
            if newline >= 0:
                yield chunk[: newline + 1]
                return
        if chunk:
            yield chunk


def _gunzipped(chunks: Iterator[bytes], uri: GcsUri) -> Iterator[bytes]:
    """The chunks as they are; or, when the first begins as gzip does (a `.gz` file stored as it
    is, without Content-Encoding), what they decompress to, in pieces of at most READ_CHUNK_BYTES
    (a file that expands a thousandfold stays bounded), member after member (`cat a.gz b.gz`)."""
    first = next(chunks, b"")
    if not first.startswith(GZIP_MAGIC):
        if first:
            yield first
        yield from chunks
        return
    member = zlib.decompressobj(wbits=31)
    inside = False  # in a member whose end has not been read yet
    try:
        for data in itertools.chain([first], chunks):
            while data:
                inside = True
                piece = member.decompress(data, READ_CHUNK_BYTES)
                if member.eof:  # the member ends here; another may follow it
                    data, member, inside = member.unused_data, zlib.decompressobj(wbits=31), False
                else:
                    data = member.unconsumed_tail
                if piece:
                    yield piece
            while inside and (piece := member.decompress(b"", READ_CHUNK_BYTES)):
                yield piece  # what the last input still holds beyond one piece
    except zlib.error as e:
        raise InvalidJob(f"input {uri} is gzip-compressed but cannot be decompressed ({e}) — check the file") from e
    if inside:
        raise InvalidJob(f"input {uri} is gzip-compressed but ends before its compressed data does — upload it again")


# Byte order marks, the longest first (UTF-32-LE's begins with UTF-16-LE's), and their codecs.
_BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


# Files of other formats, by how they begin, none of which a line of JSON can begin as.
_EXPORT_JSON = "write the instances as JSON lines (newline-delimited JSON), one per line"
_OTHER_FILES = (
    (b"PAR1\x15", "a Parquet file", f"{_EXPORT_JSON} (BigQuery: --destination_format=NEWLINE_DELIMITED_JSON)"),
    (b"Obj\x01", "an Avro file", f"{_EXPORT_JSON} (BigQuery: --destination_format=NEWLINE_DELIMITED_JSON)"),
    (b"PK\x03\x04", "a zip archive", "unzip it and upload the files inside"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it, or compress it with gzip, which the worker reads"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it, or compress it with gzip, which the worker reads"),
    (b"\x93NUMPY", "a NumPy array file", _EXPORT_JSON),
)


def _other_format(first: bytes) -> tuple[str, str] | None:
    """What a file that begins with `first` is, when that is a format of its own, and what to do."""
    for magic, what, advice in _OTHER_FILES:
        if first.startswith(magic):
            return what, advice
    if first.startswith(b"BZh") and first[4:10] == b"1AY&SY":
        return "bzip2-compressed", "decompress it, or compress it with gzip, which the worker reads"
    # A TFRecord file begins with a record's length (8 bytes) and their masked CRC32C (4 bytes).
    if len(first) >= 12:
        crc = google_crc32c.value(first[:8])
        if (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF == int.from_bytes(first[8:12], "little"):
            return "a TFRecord file", (
                f"{_EXPORT_JSON}: each tf.Example's features as an object of {{name: value}}, or, for a model "
                'that parses serialized tf.Example protos, each record as {"b64": "<the record, base64>"}'
            )
    return None


def _as_utf8(chunks: Iterator[bytes], uri: GcsUri) -> Iterator[bytes]:
    """The chunks as they are; or, when the first begins with a byte order mark, their text as
    UTF-8 without it: a file saved as UTF-16 (Windows PowerShell's `>` and `Out-File` write it)
    has a NUL byte beside every character, and a UTF-8 one's mark would stay on its first line.
    A file of another format (Parquet, TFRecord, …) fails its job, saying so, before a line of it
    becomes an error line."""
    first = next(chunks, b"")
    other = _other_format(first)
    if other is not None:
        raise InvalidJob(f"input {uri} is {other[0]}, not JSON lines — {other[1]}")
    encoding = next((name for mark, name in _BYTE_ORDER_MARKS if first.startswith(mark)), None)
    if encoding in (None, "utf-8-sig"):
        rest = first[len(codecs.BOM_UTF8) :] if encoding else first  # UTF-8 already: only its mark goes
        if rest:
            yield rest
        yield from chunks
        return
    decoder = codecs.getincrementaldecoder(encoding)()
    try:
        for chunk in itertools.chain([first], chunks):
            if text := decoder.decode(chunk):
                yield text.encode("utf-8")
        if text := decoder.decode(b"", final=True):
            yield text.encode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidJob(f"input {uri} begins as {encoding} text (its byte order mark) but is not: {e}") from e


def _prefetched(
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
