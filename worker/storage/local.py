"""`LocalStore`: the store of the command line's runs on local files — the same interface as
`GcsStore`, over a local disk, so a job on local paths goes through the same pipeline and writes
the same outputs and manifest as one on `gs://` locations.

An object is a file; its generation is its modification time in nanoseconds. Outputs and JSON
objects are written to a temporary file beside them and renamed into place, so they appear whole
or not at all. Custom metadata (the "written by" and "published" marks) lives in memory: it
matters to the event-driven worker, not to one command's run. A job on local paths is not run as
parts (which go over Pub/Sub to other instances).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from worker import codec
from worker.errors import Conflict, InvalidJob, NotFound
from worker.storage import models
from worker.storage.background import prefetched
from worker.storage.formats import as_utf8, gunzipped, split_lines
from worker.storage.values import SAVED_MODEL_FILES, WRITTEN_BY_KEY, InputFile, LocalModel, ModelSource, StoredJson
from worker.uris import Uri

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 4 * 1024 * 1024
# Files being written are named so until renamed into place; a listing leaves them out.
TEMP_PREFIX = ".embedded-tf-"
NO_PARTS = "option parts runs a job's parts on other instances over Pub/Sub: it does not apply to local paths"


@dataclass(frozen=True)
class LocalObject:
    """A local file as a model's object: its absolute path, size and generation (mtime in ns)."""

    name: str
    size: int
    generation: int


class LocalFile:
    """An output being written: a temporary file renamed into place by `close`."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, self._temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=os.path.dirname(path))
        self._file: IO[bytes] = os.fdopen(fd, "wb")
        self._path = path

    def write(self, block: bytes, /) -> int:
        return self._file.write(block)

    def close(self) -> None:
        self._file.close()
        os.replace(self._temp, self._path)

    def abandon(self) -> None:
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._temp)


class LocalStore:
    """The `Store` of jobs on local paths (`Uri.local`), and the model's files copied from a local folder."""

    def __init__(self) -> None:
        self._metadata: dict[str, dict[str, str]] = {}
        # Held by a read-compare-write of a JSON object (a lease, a manifest): one at a time.
        self._lock = threading.Lock()

    # -- inputs ------------------------------------------------------------------------------

    def list_inputs(self, input_uri: Uri, *, exclude: Uri | None = None) -> list[InputFile]:
        """The file `input_uri` names, or every file under the folder it names (its sub-folders'
        too), leaving out anything under `exclude` (the job's output folder) and hidden files the
        worker is writing."""
        path = input_uri.path
        if not input_uri.is_prefix:
            if not os.path.isfile(path):
                what = "is a folder: end it with /" if os.path.isdir(path) else "does not exist"
                raise NotFound(f"input {path} {what}")
            return [self._input_file(input_uri, os.path.basename(path))]
        if not os.path.isdir(path):
            raise NotFound(f"input folder {path} does not exist")
        files = []
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for name in names:
                full = os.path.join(root, name)
                if name.startswith(TEMP_PREFIX) or (exclude is not None and full.startswith(exclude.path)):
                    continue
                if os.path.isfile(full):
                    files.append(self._input_file(input_uri.with_path(full), full[len(path) :]))
        if not files:
            raise NotFound(f"input folder {path} holds no file")
        files.sort(key=lambda f: f.rel)
        return files

    @staticmethod
    def _input_file(uri: Uri, rel: str) -> InputFile:
        st = os.stat(uri.path)
        return InputFile(uri=uri, rel=rel, size=st.st_size, generation=st.st_mtime_ns)

    def read_blocks(self, f: InputFile, *, max_line_bytes: int = 16 * 2**20) -> Iterator[list[bytes]]:
        """The file's lines without their endings, a list per chunk read, as `GcsStore.read_blocks`
        gives them (gzip decompressed, byte order marks honoured, other formats refused)."""
        with open(f.uri.path, "rb") as file:
            chunks = prefetched(lambda: file.read(READ_CHUNK_BYTES), name=f"read {f.uri}")
            try:
                yield from split_lines(as_utf8(gunzipped(chunks, f.uri, READ_CHUNK_BYTES), f.uri), max_line_bytes)
            finally:
                chunks.close()

    def read_data(self, f: InputFile) -> Iterator[bytes]:
        """The file's bytes (gzip-compressed ones decompressed), in bounded chunks."""
        with open(f.uri.path, "rb") as file:
            chunks = prefetched(lambda: file.read(READ_CHUNK_BYTES), name=f"read {f.uri}")
            try:
                yield from gunzipped(chunks, f.uri, READ_CHUNK_BYTES)
            finally:
                chunks.close()

    def can_cut(self, f: InputFile, read_as: str) -> bool:
        raise InvalidJob(NO_PARTS)

    def lines_before(self, f: InputFile) -> int:
        raise InvalidJob(NO_PARTS)

    def names_under(self, prefix: Uri) -> set[str]:
        raise InvalidJob(NO_PARTS)

    def compose(self, sources: list[Uri], uri: Uri, *, scratch: Uri, job_id: str, content_type: str) -> None:
        raise InvalidJob(NO_PARTS)

    def written_by(self, uri: Uri) -> str | None:
        return self._metadata.get(uri.path, {}).get(WRITTEN_BY_KEY) if os.path.isfile(uri.path) else None

    # -- outputs -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def open_output(self, uri: Uri, *, job_id: str, content_type: str) -> Iterator[LocalFile]:
        """A binary stream to the file `uri` names, which appears only once the block exits normally."""
        out = LocalFile(uri.path)
        try:
            yield out
        except BaseException:
            out.abandon()
            raise
        out.close()
        self._metadata[uri.path] = {WRITTEN_BY_KEY: job_id}

    def write_json(self, uri: Uri, value: Any, *, job_id: str, if_generation_match: int | None = None) -> int:
        """Write `value` as the file `uri` names; `if_generation_match=0` creates it only if absent,
        another number replaces it only if it is still that generation. Returns the new generation;
        a failed precondition raises `Conflict`."""
        folder = os.path.dirname(uri.path)
        os.makedirs(folder, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
        with os.fdopen(fd, "wb") as file:
            file.write((json.dumps(value, indent=2) + "\n").encode())
        try:
            with self._lock:
                if if_generation_match == 0:
                    try:
                        os.link(temp, uri.path)  # fails when the file exists, even one created meanwhile
                    except FileExistsError:
                        raise Conflict(f"writing {uri}: it exists already") from None
                else:
                    before = self._generation(uri)
                    if if_generation_match is not None and before != if_generation_match:
                        raise Conflict(f"writing {uri}: it changed since it was read")
                    os.replace(temp, uri.path)
                    if self._generation(uri) == before:  # a clock too coarse to tell the two writes apart
                        os.utime(uri.path, ns=(before + 1, before + 1))
                self._metadata[uri.path] = {WRITTEN_BY_KEY: job_id}
                return self._generation(uri)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)

    @staticmethod
    def _generation(uri: Uri) -> int:
        try:
            return os.stat(uri.path).st_mtime_ns
        except FileNotFoundError:
            return 0

    def read_json(self, uri: Uri) -> StoredJson | None:
        """The file decoded, with its generation (value None when it is not JSON); None when it does not exist."""
        try:
            with open(uri.path, "rb") as file:
                generation = os.fstat(file.fileno()).st_mtime_ns
                data = file.read()
        except (FileNotFoundError, IsADirectoryError):
            return None
        try:
            value = codec.loads(data)
        except ValueError:
            log.warning("%s is not JSON; ignoring its content", uri)
            value = None
        return StoredJson(value, generation, dict(self._metadata.get(uri.path, {})))

    def mark(self, uri: Uri, key: str, value: str) -> None:
        if not os.path.isfile(uri.path):
            raise NotFound(f"updating metadata of {uri}: it does not exist")
        self._metadata.setdefault(uri.path, {})[key] = value

    def delete(self, uri: Uri, *, if_generation_match: int | None = None) -> None:
        """Delete the file if it still is that generation; absent already is fine."""
        with self._lock:
            if if_generation_match is not None and self._generation(uri) not in (0, if_generation_match):
                raise Conflict(f"deleting {uri}: it changed since it was read")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(uri.path)
            self._metadata.pop(uri.path, None)

    def read_at_most(self, uri: Uri, limit: int) -> bytes:
        """The file's bytes, but no more than `limit + 1` of them; `NotFound` when it does not exist."""
        try:
            with open(uri.path, "rb") as file:
                return file.read(limit + 1)
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"reading {uri}: it does not exist") from None
        except OSError as e:
            raise InvalidJob(f"reading {uri}: {e.strerror}") from None

    def read_bytes(self, uri: Uri) -> bytes:
        try:
            with open(uri.path, "rb") as file:
                return file.read()
        except FileNotFoundError:
            raise NotFound(f"reading {uri}: it does not exist") from None

    # -- models ------------------------------------------------------------------------------

    def resolve_model(self, model: Uri) -> ModelSource:
        """The version folder `model` designates, as `GcsStore.resolve_model` finds it."""
        if os.path.isfile(model.path) and os.path.basename(model.path) not in SAVED_MODEL_FILES:
            raise models.one_object(model)
        base = models.model_base(model)
        if not os.path.isdir(base.path):
            raise NotFound(f"model {model} does not exist — check the path")
        files = []
        for root, dirs, names in os.walk(base.path):
            dirs.sort()
            for name in sorted(names):
                st = os.stat(os.path.join(root, name))
                files.append(LocalObject(os.path.join(root, name), st.st_size, st.st_mtime_ns))
        return models.choose_version(model, base, files)

    def fetch_model(self, source: ModelSource, work_dir: str) -> LocalModel:
        """The model's version folder copied under `work_dir` (the model cache deletes the copies
        it evicts, never the user's folder)."""

        def copy(f: LocalObject, path: str) -> None:
            shutil.copyfile(f.name, path)

        return models.fetch_model(source, work_dir, copy, threads=4)
