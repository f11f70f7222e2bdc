"""The values storage hands the pipeline and the model cache: input files, stored JSON, model
folders and their local copies. Pure data."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from worker.uris import Uri

# The file that makes a folder a SavedModel: binary, or text (as TF 1's builders could write it
# with as_text=True); TensorFlow and TF Serving load either.
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
# Custom metadata set on every object the worker writes, so object events never loop back.
WRITTEN_BY_KEY = "embedded-tf-job"


@dataclass(frozen=True)
class InputFile:
    uri: Uri
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

    folder: Uri
    version: int | None
    blobs: list[Any]
    fingerprint: str  # changes when any object of the model changes
    size: int  # bytes of its objects: what it takes on local disk

    @classmethod
    def of(cls, folder: Uri, version: int | None, blobs: list[Any]) -> ModelSource:
        names = "\n".join(sorted(f"{b.name}#{b.generation}" for b in blobs))
        fingerprint = hashlib.sha256(names.encode()).hexdigest()[:20]
        return cls(folder, version, blobs, fingerprint, sum(int(b.size or 0) for b in blobs))


@dataclass(frozen=True)
class LocalModel:
    uri: Uri  # the version folder that was fetched
    version: int | None
    path: str  # local folder holding saved_model.pb (or .pbtxt)
    fingerprint: str  # changes when any object of the model changes
    downloaded: bool = True  # False when an identical local copy was reused
