"""The narrow interfaces the pipeline runs on — what it needs of storage, of the model and of
Pub/Sub — and the values it hands back: limits, progress, the outcome."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from worker.serving import MAX_BATCH_OUTPUT_VALUES, LoadedModel
from worker.uris import Uri


class Sink(Protocol):
    def write(self, block: bytes, /) -> int: ...


class Store(Protocol):
    def list_inputs(self, input_uri: Uri, *, exclude: Uri | None = None) -> list[Any]: ...
    # Lines without their endings; one longer than `max_line_bytes` may come cut (to more than that).
    def read_blocks(self, f: Any, *, max_line_bytes: int) -> Iterator[list[bytes]]: ...
    # The file's bytes, gzip-compressed ones decompressed (files of records, not lines); a piece's
    # from its start on, as stored.
    def read_data(self, f: Any) -> Iterator[bytes]: ...
    # Any object's (a file list's entry's) bytes, but at most `limit + 1` of them.
    def read_at_most(self, uri: Uri, limit: int) -> bytes: ...
    def open_output(self, uri: Uri, *, job_id: str, content_type: str) -> AbstractContextManager[Sink]: ...
    def write_json(self, uri: Uri, value: Any, *, job_id: str, if_generation_match: int | None = None) -> int: ...
    def read_json(self, uri: Uri) -> Any | None: ...  # StoredJson-like: .value, .generation, .metadata
    def mark(self, uri: Uri, key: str, value: str) -> None: ...
    def delete(self, uri: Uri, *, if_generation_match: int | None = None) -> None: ...
    # For jobs run as parts whose files are cut into pieces (see `worker.parts`).
    def can_cut(self, f: Any, read_as: str) -> bool: ...
    def lines_before(self, f: Any) -> int: ...
    def names_under(self, prefix: Uri) -> set[str]: ...
    def written_by(self, uri: Uri) -> str | None: ...
    def compose(self, sources: list[Uri], uri: Uri, *, scratch: Uri, job_id: str, content_type: str) -> None: ...


@dataclass(frozen=True)
class ModelHandle:
    """A loaded model and where it came from (for the manifest)."""

    uri: Uri  # the version folder actually served
    version: int | None
    model: LoadedModel


class ModelProvider(Protocol):
    def load(self, model: Uri) -> AbstractContextManager[ModelHandle]:
        """The model, loaded (or kept warm), for the duration of the block."""
        ...


class Publisher(Protocol):
    def publish(self, data: bytes, attributes: dict[str, str]) -> None: ...


@dataclass(frozen=True)
class Limits:
    batch_size: int = 1024
    max_batch_bytes: int = 4 * 1024 * 1024
    max_line_bytes: int = 16 * 1024 * 1024  # a longer line is an error line, not an instance
    max_batch_output_values: int = MAX_BATCH_OUTPUT_VALUES  # when the model declares its outputs' shapes
    lease_s: float = 120.0  # a job's lease time to live; renewed every third of it
    file_concurrency: int = 8  # input files of one job in flight at once
    min_piece_bytes: int = 1024 * 1024  # the smallest piece a file is cut into for a job run as parts


@dataclass(frozen=True)
class JobProgress:
    """Where a job stands, summed over its files (some may be in flight at once)."""

    files_done: int
    files: int
    bytes_read: int
    bytes_total: int
    lines: int
    stage: str = "predicting"  # or "loading model", before the first batch


# Called after each batch of any file, one call at a time.
ProgressFn = Callable[[JobProgress], None]


@dataclass
class Outcome:
    manifest: dict[str, Any]
    skipped: bool = False  # True when an earlier run of the same job already completed it

    @property
    def status(self) -> str:
        return str(self.manifest.get("status"))
