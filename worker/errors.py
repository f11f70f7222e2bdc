"""The worker's error tree: what is reported and acknowledged vs what is retried.

    WorkerError
    ├── PermanentError        the job can never succeed as given: report FAILED, ack
    │   ├── InvalidJob        malformed job, unknown option, bad URI   (INVALID_ARGUMENT)
    │   │   └── OtherFormat   an input read as JSON lines is of another format
    │   ├── NotFound          model or input missing                   (NOT_FOUND)
    │   ├── ModelError        model present but unusable               (FAILED_PRECONDITION)
    │   └── Unpublishable     a message over Pub/Sub's limits          (INVALID_ARGUMENT)
    └── TransientError        may succeed later: raise, so delivery is retried  (UNAVAILABLE)
        ├── Conflict          a write precondition failed: someone else wrote first
        └── Busy              the job (or its output) is being run elsewhere right now

Every message names the object at fault and what to change.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error the worker raises on purpose."""

    code = "INTERNAL"


class PermanentError(WorkerError):
    """Retrying cannot help: the job is reported FAILED and the event acknowledged."""

    code = "FAILED_PRECONDITION"


class InvalidJob(PermanentError):
    """The job itself is malformed: its JSON, an option, a URI."""

    code = "INVALID_ARGUMENT"


class NotFound(PermanentError):
    """The model or input the job names does not exist."""

    code = "NOT_FOUND"


class ModelError(PermanentError):
    """The model exists but cannot be loaded or served."""

    code = "FAILED_PRECONDITION"


class OtherFormat(InvalidJob):
    """An input file read as JSON lines is of another format (`kind`: "tf-record", …, or None)."""

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


class Unpublishable(PermanentError):
    """A message Pub/Sub would refuse, whatever the retry: over its size or attribute limits."""

    code = "INVALID_ARGUMENT"


class TransientError(WorkerError):
    """A dependency is unavailable for now: raised so the platform redelivers."""

    code = "UNAVAILABLE"


class Conflict(TransientError):
    """A conditional write lost a race (HTTP 412): another writer changed the object first."""

    code = "ABORTED"


class Busy(TransientError):
    """Another run holds the job's lease: this delivery must be retried later, not acknowledged.
    `until`: when the lease expires unless its holder renews it (a Unix time), when known."""

    code = "ABORTED"

    def __init__(self, message: str, *, until: float | None = None) -> None:
        super().__init__(message)
        self.until = until
