"""A job's files in flight: up to WORKER_FILE_CONCURRENCY at a time, their results in input
order, progress summed over them, and the first failure stopping the rest."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

from worker.manifest import FileResult
from worker.pipeline.ports import JobProgress, ProgressFn
from worker.pipeline.results import RunState

log = logging.getLogger(__name__)

PROGRESS_LOG_INTERVAL_S = 10.0


class _Stopped(Exception):
    """Raised in a file's thread when another file of the job failed: its output is abandoned."""


class Tracker:
    """Sums progress over the job's files (called from their threads), reports it to `progress`
    and logs it every PROGRESS_LOG_INTERVAL_S; `stop()` makes every file end at its next batch."""

    def __init__(self, job_id: str, inputs: list[Any], progress: ProgressFn | None) -> None:
        self._job_id = job_id
        self._progress = progress
        self._lock = threading.Lock()
        self._stopped = False
        self._last_log = time.monotonic()
        self.files = len(inputs)
        self.bytes_total = sum(f.length for f in inputs)
        self.files_done = self.bytes_read = self.lines = 0

    def advance(self, lines: int, nbytes: int, *, file_done: bool = False) -> None:
        with self._lock:
            if self._stopped and not file_done:
                raise _Stopped
            self.lines += lines
            self.bytes_read += nbytes
            self.files_done += file_done
            now = time.monotonic()
            if now - self._last_log >= PROGRESS_LOG_INTERVAL_S:
                self._last_log = now
                log.info(
                    "job %s: %d/%d files, %d/%d bytes (%.0f%%), %d lines",
                    self._job_id, self.files_done, self.files, self.bytes_read, self.bytes_total,
                    100 * min(self.bytes_read, self.bytes_total) / max(self.bytes_total, 1), self.lines,
                )  # fmt: skip
            if self._progress is not None:
                self._progress(JobProgress(self.files_done, self.files, self.bytes_read, self.bytes_total, self.lines))

    def announce(self, stage: str) -> None:
        """Report a stage before the first batch (the model's download and load)."""
        if self._progress is not None:
            with self._lock:
                self._progress(JobProgress(0, self.files, 0, self.bytes_total, 0, stage))

    def stop(self) -> None:
        with self._lock:
            self._stopped = True


def run_files(
    one: Callable[[Any], FileResult], inputs: list[Any], concurrency: int, state: RunState, tracker: Tracker
) -> None:
    """Run `one` over the inputs, up to `concurrency` files at a time, recording each result in
    input order. The first failure stops the other files (their outputs are abandoned) and is raised."""
    results: dict[int, FileResult] = {}
    try:
        if concurrency <= 1 or len(inputs) <= 1:
            for i, f in enumerate(inputs):
                results[i] = one(f)
            return
        _in_threads(one, inputs, concurrency, tracker, results)
    finally:
        for i in sorted(results):
            state.files.append(results[i])
            state.totals.add(results[i].counts)


def _in_threads(
    one: Callable[[Any], FileResult],
    inputs: list[Any],
    concurrency: int,
    tracker: Tracker,
    results: dict[int, FileResult],
) -> None:
    """`one` over the inputs in up to `concurrency` threads, each result in `results` by the
    input's index as it comes; the first failure cancels the files not begun and is raised once
    the files begun are done."""
    with ThreadPoolExecutor(max_workers=min(concurrency, len(inputs)), thread_name_prefix="file") as pool:
        # Each file runs in a copy of this context, so its logs carry the job's id.
        futures: dict[Future[FileResult], int] = {
            pool.submit(contextvars.copy_context().run, one, f): i for i, f in enumerate(inputs)
        }
        done, not_done = wait(futures, return_when=FIRST_EXCEPTION)
        error = next((e for e in (fut.exception() for fut in done) if e is not None), None)
        if error is not None:
            tracker.stop()
            for fut in not_done:
                fut.cancel()
        wait(not_done)
        for fut, i in futures.items():
            if not fut.cancelled() and fut.exception() is None:
                results[i] = fut.result()
        if error is not None:
            raise error
