"""Where a job reads or writes: `Uri` (a Cloud Storage object or prefix, or a local path), and the
names Cloud Storage takes. Pure; every parse error is an `InvalidJob` naming the fix."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

from worker.codec import shown
from worker.errors import InvalidJob

# A bucket name as GCS accepts it (3-222 chars of lowercase letters, digits, -, _ and .).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
# Cloud Storage's longest object name, in bytes of UTF-8 (fake-gcs-server takes longer ones).
MAX_OBJECT_NAME_BYTES = 1024


@dataclass(frozen=True)
class Uri:
    """Where a job reads or writes: `gs://bucket/path`, `path` empty (the bucket root) or ending in
    `/` (a prefix); or, for the command line's runs on local files, an absolute local path (scheme
    `file`, no bucket; a folder's ends in `/`). Jobs from messages and events are `gs://` only."""

    bucket: str
    path: str
    scheme: str = "gs"

    @classmethod
    def parse(cls, value: object, *, what: str = "URI") -> Uri:
        if not isinstance(value, str) or not value:
            raise InvalidJob(f"{what} must be a gs:// URI string, got {shown(value)}")
        if not value.startswith("gs://"):
            raise InvalidJob(
                f"{what} {shown(value)} is not a gs:// URI — write it as gs://BUCKET/PATH "
                "(only Cloud Storage locations are supported)"
            )
        check_text(value, what)
        rest = value[len("gs://") :]
        bucket, _, path = rest.partition("/")
        if not _BUCKET_RE.match(bucket):
            raise InvalidJob(f"{what} {shown(value)} has no valid bucket name after gs://")
        if "//" in path or path.startswith("/"):
            raise InvalidJob(f"{what} {shown(value)} has an empty path segment (//)")
        if any(segment in (".", "..") for segment in path.split("/")):
            # Object names are not paths: gs://b/a/../x names objects under `a/../`, and copied to
            # disk they would land elsewhere.
            raise InvalidJob(f"{what} {shown(value)} has a '.' or '..' segment — write the path without it")
        return cls(bucket, path)

    @classmethod
    def local(cls, path: str, *, folder: bool) -> Uri:
        """An absolute local path: a file's, or a folder's (then ending in `/`)."""
        if not path.startswith("/"):
            raise InvalidJob(f"local path {shown(path)} must be absolute")
        check_text(path, "local path")
        return cls("", path.rstrip("/") + "/" if folder else path, scheme="file")

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    def with_path(self, path: str) -> Uri:
        """Another object (or prefix) of the same bucket, or another local path."""
        return dataclasses.replace(self, path=path)

    @property
    def is_prefix(self) -> bool:
        return self.path == "" or self.path.endswith("/")

    def as_prefix(self) -> Uri:
        """The same location read as a folder: `gs://b/out` → `gs://b/out/`."""
        return self if self.is_prefix else self.with_path(self.path + "/")

    def child(self, rel: str) -> Uri:
        return self.with_path(self.as_prefix().path + rel)

    def __str__(self) -> str:
        return self.path if self.is_local else f"gs://{self.bucket}/{self.path}"


def check_object_name(uri: Uri, why: str) -> None:
    """Refuse (`InvalidJob`) an object the worker would write whose name Cloud Storage refuses."""
    size = len(uri.path.encode())
    if size > MAX_OBJECT_NAME_BYTES:
        raise InvalidJob(
            f"{why} {shown(str(uri))} would be an object name of {size} bytes, more than the {MAX_OBJECT_NAME_BYTES} "
            "Cloud Storage takes — use a shorter output prefix or shorter input names"
        )


def is_plain_path(name: str) -> bool:
    """Whether a `/`-separated name is a plain path below its folder: no empty, `.` or `..`
    segment (Cloud Storage takes them; a copy of the objects to disk would resolve them)."""
    return not any(segment in ("", ".", "..") for segment in name.split("/"))


def is_text(value: object) -> bool:
    """A string that can be written as UTF-8: none holding half of a UTF-16 surrogate pair (only a
    hand-made request carries one: Pub/Sub and Cloud Storage take UTF-8 alone)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_text(value: str, what: str) -> None:
    """Refuse a string that is not text: it cannot name an object or go into one."""
    if not is_text(value):  # `json.dumps` escapes it for the message
        raise InvalidJob(f"{what} {json.dumps(value)} holds half of a UTF-16 surrogate pair: it is not text")
