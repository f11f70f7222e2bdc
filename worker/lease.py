"""A job's lease: one run at a time per job output, across instances, under at-least-once delivery.

Pub/Sub and Eventarc redeliver an event whose handler has not answered within the ack deadline
(at most 600 s) while the first run is still going. The lease is a small JSON object next to the
job's manifest, created with `ifGenerationMatch=0` (only one creator wins) and rewritten with
`ifGenerationMatch=<our generation>` every third of its time to live. A second run finds it
held and answers "busy" (a retryable error: acknowledging would lose the job if the holder then
crashed). A holder that dies stops renewing; once the lease has expired a retry takes it over.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol

from worker import errors
from worker.uris import Uri

log = logging.getLogger(__name__)


class LeaseStore(Protocol):
    def read_json(self, uri: Uri) -> Any | None: ...  # StoredJson-like: .value, .generation
    def write_json(self, uri: Uri, value: Any, *, job_id: str, if_generation_match: int | None = None) -> int: ...
    def delete(self, uri: Uri, *, if_generation_match: int | None = None) -> None: ...


def _holder_id() -> str:
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def iso_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Lease:
    """Context manager: acquire on enter (or raise `errors.Busy`), renew in the background, release
    on exit. `check()` raises if the lease was lost (the holder stalled past its expiry)."""

    def __init__(
        self,
        store: LeaseStore,
        uri: Uri,
        job_id: str,
        ttl_s: float,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.uri = uri
        self._job_id = job_id
        self._ttl_s = ttl_s
        self._clock = clock
        self.holder = _holder_id()
        self.generation = 0
        self._lost: str | None = None
        self._renewing = threading.Lock()  # one renewal at a time: the background one, or check()'s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "job_id": self._job_id,
            "holder": self.holder,
            "renewed_at": iso_time(now),
            "expires_at": now + self._ttl_s,
            "ttl_s": self._ttl_s,
        }

    def acquire(self) -> None:
        write = self._store.write_json
        try:
            self.generation = write(self.uri, self._body(), job_id=self._job_id, if_generation_match=0)
        except errors.Conflict:
            current = self._store.read_json(self.uri)
            if current is None:  # released between our write and our read: try once more
                self.generation = self._create_or_busy(0, "another run just released it")
            else:
                held = current.value if isinstance(current.value, dict) else {}
                expires = held.get("expires_at")
                if isinstance(expires, int | float) and expires > self._clock():
                    raise errors.Busy(
                        f"job {held.get('job_id')!r} is running on {held.get('holder')} (lease {self.uri} held "
                        f"until {iso_time(expires)}); this delivery will be retried",
                        until=expires,
                    ) from None
                log.warning("taking over the expired lease %s of %s", self.uri, held.get("holder"))
                self.generation = self._create_or_busy(current.generation, "another run took it over first")
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self._job_id}", daemon=True)
        self._thread.start()
        log.info("lease %s acquired by %s for %.0fs", self.uri, self.holder, self._ttl_s)

    def _create_or_busy(self, generation: int, why: str) -> int:
        try:
            return self._store.write_json(self.uri, self._body(), job_id=self._job_id, if_generation_match=generation)
        except errors.Conflict:
            raise errors.Busy(f"lease {self.uri}: {why}; this delivery will be retried") from None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self._ttl_s / 3) and self._renew():
            pass

    def _renew(self) -> bool:
        """Rewrite the lease if it is still ours; False once it is not (another run took it over)."""
        with self._renewing:
            if self._lost:
                return False
            try:
                self.generation = self._store.write_json(
                    self.uri, self._body(), job_id=self._job_id, if_generation_match=self.generation
                )
            except errors.Conflict:
                self._lost = f"lease {self.uri} was taken over by another run (this one stalled past its expiry)"
                log.error("%s", self._lost)
                return False
            except errors.WorkerError as e:
                log.warning("could not renew lease %s (will retry): %s", self.uri, e)
            return True

    def check(self) -> None:
        """Raise `errors.Busy` if another run has taken the lease over. The lease is renewed here
        once more: a run that stalled past its expiry since the last renewal (another run may be
        predicting the job meanwhile) learns it before it writes the manifest and publishes."""
        self._renew()
        if self._lost:
            raise errors.Busy(self._lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._lost:
            return
        try:
            self._store.delete(self.uri, if_generation_match=self.generation)
        except errors.WorkerError as e:
            # It expires on its own; a retry only waits for that.
            log.warning("could not release lease %s: %s", self.uri, e)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
