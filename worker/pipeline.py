"""Runs a job: every input line → one output line, batched through a predictor; manifest last.

Composes a `Store`, a `ModelProvider` and a `Publisher` through the small protocols below; it
never touches the SDKs, HTTP or the environment. Accounting per file and in total:
lines = instances + skipped, instances = predictions + errors.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import re
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from itertools import accumulate, chain, repeat
from typing import Any, Literal, Protocol

from worker import codec, errors, fanout
from worker.jobs import (
    JSONL,
    STATUS_DISPATCHED,
    STATUS_FAILED,
    STATUS_PARTIAL,
    STATUS_SUCCEEDED,
    Counts,
    FileResult,
    GcsUri,
    Job,
    Options,
    check_object_name,
    error_ratio_exceeded,
    failure,
    piece_path,
)
from worker.lease import Lease
from worker.serving import BATCH_ADVICE, MAX_BATCH_OUTPUT_VALUES, BatchRejected, LoadedModel, Predictor

log = logging.getLogger(__name__)

PROGRESS_LOG_INTERVAL_S = 10.0
# Manifest metadata set once its completion message is published: a redelivery of a completed
# job re-publishes only when this is missing (the publish failed after the manifest was written).
PUBLISHED_KEY = "embedded-tf-completion-published"
# A completion message lists a job's files up to this size (some 4,000 files of 250 bytes each).
# Pub/Sub refuses messages over 10 MB, and gRPC clients at their default settings refuse to
# receive one over 4 MiB (the Python subscriber on the emulator does): subscribers of any kind
# should be able to read a completion.
COMPLETION_MAX_BYTES = 1024 * 1024


# Predictors that took a batch they refused whole one shape at a time, every shape without a
# refusal: a model of variable-length inputs. Their batches go one shape at a time from then on,
# without the whole-batch call each would refuse (in this job and in later ones on the warm model).
_ONE_SHAPE_PER_CALL: weakref.WeakSet[Any] = weakref.WeakSet()
# Of the last batch each predictor refused and that was isolated, the share of its instances the
# model refused one by one. From MOSTLY_REFUSED of them on, the next refused batch goes instance
# by instance (n calls) rather than in halves (up to 2n - 1 calls when all are refused).
_LAST_REFUSED: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
MOSTLY_REFUSED = 1 / 4


class Sink(Protocol):
    def write(self, block: bytes, /) -> int: ...


class Store(Protocol):
    def list_inputs(self, input_uri: GcsUri, *, exclude: GcsUri | None = None) -> list[Any]: ...
    # Lines without their endings; one longer than `max_line_bytes` may come cut (to more than that).
    def read_blocks(self, f: Any, *, max_line_bytes: int) -> Iterator[list[bytes]]: ...
    def open_output(self, uri: GcsUri, *, job_id: str, content_type: str) -> AbstractContextManager[Sink]: ...
    def write_json(self, uri: GcsUri, value: Any, *, job_id: str, if_generation_match: int | None = None) -> int: ...
    def read_json(self, uri: GcsUri) -> Any | None: ...  # StoredJson-like: .value, .generation, .metadata
    def mark(self, uri: GcsUri, key: str, value: str) -> None: ...
    def delete(self, uri: GcsUri, *, if_generation_match: int | None = None) -> None: ...
    # For jobs run as parts whose files are cut into pieces (see `worker.fanout`).
    def can_cut(self, f: Any) -> bool: ...
    def lines_before(self, f: Any) -> int: ...
    def names_under(self, prefix: GcsUri) -> set[str]: ...
    def written_by(self, uri: GcsUri) -> str | None: ...
    def compose(
        self, sources: list[GcsUri], uri: GcsUri, *, scratch: GcsUri, job_id: str, content_type: str
    ) -> None: ...


@dataclass(frozen=True)
class ModelHandle:
    """A loaded model and where it came from (for the manifest)."""

    uri: GcsUri  # the version folder actually served
    version: int | None
    model: LoadedModel


class ModelProvider(Protocol):
    def load(self, model: GcsUri) -> AbstractContextManager[ModelHandle]:
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


# Called after each batch of any file, one call at a time.
ProgressFn = Callable[[JobProgress], None]


@dataclass
class Outcome:
    manifest: dict[str, Any]
    skipped: bool = False  # True when an earlier run of the same job already completed it

    @property
    def status(self) -> str:
        return str(self.manifest.get("status"))


def run(
    job: Job,
    *,
    store: Store,
    models: ModelProvider,
    publisher: Publisher | None,
    limits: Limits,
    progress: ProgressFn | None = None,
    dispatcher: Publisher | None = None,
) -> Outcome:
    """Run `job` to completion, once: a job whose manifest says it completed is skipped, and a
    job running elsewhere raises `errors.Busy`. Permanent failures end as a FAILED manifest and
    completion message; transient ones (`errors.TransientError`) propagate so the caller can retry.
    A job with `options.parts` is published as that many part jobs through `dispatcher` (the jobs
    topic); a part publishes no completion of its own, and the last part to finish publishes the
    whole job's (see `worker.fanout`)."""
    if job.options.parts is not None:
        dispatched = _dispatch(job, store, publisher, dispatcher, limits)
        if dispatched is not None:
            return dispatched
        job = replace(job, options=replace(job.options, parts=None))  # predicted here, whole
    part = job.options.part is not None
    own = None if part else publisher  # who hears of this job's own completion
    done = _completed(job, store, own)
    if done is None:
        try:
            check_object_name(job.lease_uri, "the job's lease")
            lease = Lease(store, job.lease_uri, job.job_id, limits.lease_s)
            lease.acquire()
        except errors.PermanentError as e:
            # Nothing can be written to the output: the job fails here, before reading anything
            # (a part too says so itself: no manifest of the whole job will).
            error = failure(e.code, f"cannot write to output {job.output}: {e}")
            return _finish(job, store, publisher, _Run(error=error))
        try:
            done = _completed(job, store, own)  # finished by the run that held the lease before us
            if done is None:
                state = _execute(job, store, models, limits, progress)
                lease.check()
                done = _finish(job, store, own, state)
        finally:
            lease.release()
    if part:
        _combine(job, store, publisher)
    return done


def _dispatch(
    job: Job, store: Store, publisher: Publisher | None, dispatcher: Publisher | None, limits: Limits
) -> Outcome | None:
    """Publish `job`'s parts to the jobs topic: as many as it asks for, at most one per file or
    piece of a file (a file larger than a part's share is cut into pieces, see `worker.fanout`).
    None for a dropped file that makes one part (too small to cut, or not UTF-8 lines), never
    dispatched before: `parts` in WORKER_OPTIONS is for the large ones, and a small one is
    predicted here, whole, as without it (not one part a trip through Pub/Sub away)."""
    done = _completed(job, store, publisher)
    if done is not None:
        return done
    assert job.options.parts is not None
    try:
        if dispatcher is None:
            instead = (
                "drop parts from the file's `options` metadata (or from WORKER_OPTIONS)"
                if job.manifest is not None
                else "send the job without parts"
            )
            raise errors.InvalidJob(
                "option parts needs the worker's WORKER_JOBS_TOPIC (the topic its job messages come from), "
                f"to publish the parts to — set it, or {instead}"
            )
        inputs = store.list_inputs(job.input, exclude=job.output)
        _check_outputs(job, inputs)
        given = fanout.cuts(inputs, job.options.parts, min_piece_bytes=limits.min_piece_bytes, can_cut=store.can_cut)
    except errors.PermanentError as e:
        log.error("job %s failed: %s", job.job_id, e)
        return _finish(job, store, publisher, _Run(error=failure(e.code, str(e))))
    n = min(job.options.parts, len(given))
    if n == 1 and job.manifest is not None and not store.names_under(job.parts_folder):
        log.info("job %s: %s makes one part (not cut into pieces): predicted here, whole", job.job_id, job.input)
        return None
    shares = fanout.fixed_shares(job, store, given, n)
    files = len({c.rel for s in shares for c in s})
    cut = sorted({c.rel for s in shares for c in s if c.piece is not None})
    if cut:
        log.info(
            "job %s: %d file(s) cut into pieces at line starts for the parts to share (%s%s)",
            job.job_id, len(cut), cut[0], ", …" if len(cut) > 1 else "",
        )  # fmt: skip
    # An earlier run's manifest (FAILED, or another job's) is removed, for the parts to create the
    # new one; so are the manifests of its parts that failed, which run again: the whole job is
    # combined only once they have.
    for uri in (job.manifest_uri, *fanout.part_manifests(job, n)):
        stale = store.read_json(uri)
        if stale is not None and (uri == job.manifest_uri or _value(stale).get("status") == STATUS_FAILED):
            with contextlib.suppress(errors.Conflict):
                store.delete(uri, if_generation_match=stale.generation)
    for data, attributes in fanout.part_messages(job, n):
        dispatcher.publish(data, attributes)
    log.info(
        "job %s: %d input file(s) published as %d parts; the last to finish writes %s",
        job.job_id, files, n, job.manifest_uri,
    )  # fmt: skip
    dispatched = {"job_id": job.job_id, "status": STATUS_DISPATCHED, "parts": n, "files": files}
    return Outcome(
        {**dispatched, "input": str(job.input), "output": str(job.output), "manifest": str(job.manifest_uri)}
    )


def give_up_part(part: Job, store: Store, publisher: Publisher | None, error: dict[str, str]) -> None:
    """A part no later delivery will run (its message goes to the dead-letter topic): its FAILED
    manifest, so that the whole job completes FAILED, naming it, once the other parts are done."""
    _finish(part, store, None, _Run(error=error))
    _combine(part, store, publisher)


def _value(stored: Any) -> dict[str, Any]:
    return stored.value if isinstance(stored.value, dict) else {}


def _combine(part: Job, store: Store, publisher: Publisher | None) -> None:
    """After a part's manifest is written: when every part's is, the whole job's manifest and its
    completion message, published by whichever part writes that manifest."""
    whole = fanout.whole_job(part)
    parts = fanout.parts_done(whole, store)
    if parts is None:
        log.info("job %s: part %d of %d done; others still running", whole.job_id, *part.options.part or (0, 0))
        return
    manifest = {**fanout.combined(whole, parts), "combined_by": part.job_id}
    # The pieces of cut files joined into their outputs, unless a part failed (it runs again).
    missing = [] if any(p.get("status") == STATUS_FAILED for p in parts) else fanout.join_pieces(whole, store, parts)
    if missing:
        stored = store.read_json(whole.manifest_uri)
        earlier = _value(stored) if stored is not None else {}
        if earlier.get("job_id") != whole.job_id or earlier.get("status") == STATUS_FAILED:
            why = f"cannot join the pieces of {missing[0]} — send the job again with another job_id"
            error = failure("NOT_FOUND", why)
            manifest = {**manifest, "status": STATUS_FAILED, "error": error}
        # else: the part that wrote the job's manifest (not FAILED) joined them, then removed them
    if not fanout.write_combined(whole, store, manifest) and not _replaced(whole, part, store, publisher, manifest):
        return
    if manifest["status"] != STATUS_FAILED:  # the job sent again after a FAILED one joins them again
        fanout.remove_pieces(store, parts)
    if publisher is not None:
        _publish(whole, store, publisher, manifest, manifest_written=True)
    totals = manifest["totals"]
    log.info(
        "job %s %s: %d parts, %d instances, %d predictions, %d errors",
        whole.job_id, manifest["status"], len(parts), totals["instances"], totals["predictions"], totals["errors"],
    )  # fmt: skip


def _replaced(whole: Job, part: Job, store: Store, publisher: Publisher | None, manifest: dict[str, Any]) -> bool:
    """The whole job's manifest was written before. True when `manifest` replaced it: it said
    FAILED, and now that the failed part ran again (its message sent again from the dead-letter
    topic) none has failed. Else False, after publishing the earlier one when this part wrote it
    and its publishing was never confirmed (the part is delivered again because it failed)."""
    stored = store.read_json(whole.manifest_uri)
    earlier = _value(stored) if stored is not None else {}
    if stored is None or earlier.get("job_id") != whole.job_id:
        return False
    if earlier.get("status") == STATUS_FAILED and manifest["status"] != STATUS_FAILED:
        return fanout.write_combined(whole, store, manifest, replacing=stored.generation)
    if publisher is not None and earlier.get("combined_by") == part.job_id and PUBLISHED_KEY not in stored.metadata:
        log.warning("job %s completed but its completion was not confirmed published: publishing it", whole.job_id)
        _publish(whole, store, publisher, earlier, manifest_written=True)
    return False


def _completed(job: Job, store: Store, publisher: Publisher | None) -> Outcome | None:
    """The earlier outcome when this job already completed (FAILED runs are retried: the cause may
    have been fixed). Re-publishes its completion if that was never confirmed."""
    stored = store.read_json(job.manifest_uri)
    if stored is None:
        return None
    previous = stored.value
    if not isinstance(previous, dict) or previous.get("job_id") != job.job_id:
        return None
    if previous.get("status") == STATUS_FAILED:
        return None
    if publisher is not None and PUBLISHED_KEY not in stored.metadata:
        log.warning("job %s completed but its completion was not confirmed published: publishing it", job.job_id)
        _publish(job, store, publisher, previous, manifest_written=True)
    else:
        log.info("job %s already completed (%s): skipping", job.job_id, previous.get("status"))
    return Outcome(previous, skipped=True)


@dataclass
class _Run:
    started: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    files: list[FileResult] = field(default_factory=list)
    totals: Counts = field(default_factory=Counts)
    handle: ModelHandle | None = None
    error: dict[str, str] | None = None


def _execute(job: Job, store: Store, models: ModelProvider, limits: Limits, progress: ProgressFn | None) -> _Run:
    state = _Run()
    timings = state.timings
    try:
        t = time.perf_counter()
        inputs = store.list_inputs(job.input, exclude=job.output)
        _check_outputs(job, inputs)
        if job.options.part is not None:
            inputs = fanout.part_files(job, store, inputs)
        timings["list_inputs_s"] = time.perf_counter() - t
        log.info("job %s: %d input file(s), %d bytes", job.job_id, len(inputs), sum(f.length for f in inputs))

        t = time.perf_counter()
        with models.load(job.model) as handle:
            state.handle = handle
            predictor = handle.model.predictor(job.options.signature_name)
            timings["model_load_s"] = time.perf_counter() - t

            t = time.perf_counter()
            tracker = _Tracker(job.job_id, inputs, progress)
            batch_size = _BatchSize(job, limits, predictor)

            def one(f: Any) -> FileResult:
                return _run_file(job, f, store, predictor, batch_size, limits, tracker)

            _run_files(one, inputs, limits.file_concurrency, state, tracker)
            timings["predict_s"] = time.perf_counter() - t
            timings["input_wait_s"] = sum(r.input_wait_s for r in state.files)
            timings["output_wait_s"] = sum(r.output_wait_s for r in state.files)
        if job.options.part is None:  # a part's share alone does not decide: the whole job's does
            state.error = error_ratio_exceeded(job.options, state.totals, _first_error(state.files))
    except errors.PermanentError as e:
        log.error("job %s failed: %s", job.job_id, e)
        state.error = failure(e.code, str(e))
    return state


# Batches of one instance a job sends at most to learn how many values a model's predictions
# hold, when its outputs do not declare their shapes (files in flight each send some at once).
PROBE_BATCHES = 32


class _BatchSize:
    """The job's batch size (the job's, else the worker's), made smaller for a model whose
    predictions are large (an image per instance, say), so that a batch's predictions hold at
    most `limits.max_batch_output_values`, and no larger than a call of the model takes once one
    was too big (a model server's batch size limit, memory, its timeout). The values per instance
    are the outputs' declared shapes'; when an output does not declare its shape, batches are of
    one instance until the predictor has measured them (PROBE_BATCHES at most: a file whose first
    lines all fail)."""

    def __init__(self, job: Job, limits: Limits, predictor: Predictor) -> None:
        self._job_id = job.job_id
        self._asked = job.options.batch_size or limits.batch_size
        self._max_values = limits.max_batch_output_values
        self._predictor = predictor
        self._probes = 0
        # (values per instance, most per call) that `_size` is for; not yet sized.
        self._sized_for: tuple[int | None, int | None] | None = None
        self._size = self._asked

    def __call__(self) -> int:
        per, most = self._predictor.values_per_instance, self._predictor.most_per_call
        if (per, most) == self._sized_for:
            return self._size
        if per is None and self._probes < PROBE_BATCHES:
            self._probes += 1
            return 1
        size = self._asked
        if per and size * per > self._max_values:
            size = max(1, self._max_values // per)
            if self._sized_for is None or self._sized_for[0] != per:
                log.info(
                    "job %s: the model predicts %d values per instance: batches of %d instances instead of %d, so "
                    "that a batch's predictions hold at most %d values", self._job_id, per, size, self._asked,
                    self._max_values,
                )  # fmt: skip
        if most is not None:
            size = min(size, most)
        self._sized_for, self._size = (per, most), size
        return size


def _finish(job: Job, store: Store, publisher: Publisher | None, state: _Run) -> Outcome:
    """Write the manifest (the job's commit point), then publish the completion message."""
    totals = state.totals
    status = STATUS_FAILED if state.error else STATUS_PARTIAL if totals.errors else STATUS_SUCCEEDED
    manifest = _manifest(job, status, state)
    written = False
    try:
        store.write_json(job.manifest_uri, manifest, job_id=job.job_id)
        written = True
    except errors.PermanentError as e:
        if status != STATUS_FAILED:
            raise
        # The job already failed; not being able to write its manifest must not hide why.
        log.error("could not write manifest %s: %s", job.manifest_uri, e)
    if publisher is not None:
        _publish(job, store, publisher, manifest, manifest_written=written)
    log.info(
        "job %s %s: %d instances, %d predictions, %d errors in %.2fs",
        job.job_id, status, totals.instances, totals.predictions, totals.errors, time.time() - state.started,
    )  # fmt: skip
    return Outcome(manifest)


def _publish(job: Job, store: Store, publisher: Publisher, manifest: dict[str, Any], *, manifest_written: bool) -> None:
    data = _completion(manifest, COMPLETION_MAX_BYTES)
    publisher.publish(data, {"job_id": job.job_id, "status": str(manifest.get("status"))})
    if manifest_written:
        store.mark(job.manifest_uri, PUBLISHED_KEY, _iso(time.time()))


def _completion(manifest: dict[str, Any], max_bytes: int) -> bytes:
    """The manifest as a completion message's data. One beyond `max_bytes` (a job of tens of
    thousands of files) lists the files that fit, in order, and in `files_omitted` how many it
    leaves out: the manifest (at `manifest`) lists them all."""
    data = json.dumps(manifest).encode()
    if len(data) <= max_bytes:
        return data
    files = manifest.get("files") or []
    # Room for the files: what the rest takes, with the largest count of omitted files it can say.
    room = max_bytes - len(json.dumps({**manifest, "files": [], "files_omitted": len(files)}).encode())
    kept = 0
    for f in files:
        room -= len(json.dumps(f).encode()) + 2  # and its separator
        if room < 0:
            break
        kept += 1
    return json.dumps({**manifest, "files": files[:kept], "files_omitted": len(files) - kept}).encode()


def _check_outputs(job: Job, inputs: list[Any]) -> None:
    """Every input's mirrored output is a plain path under the output prefix, and no input's."""
    names = {(f.uri.bucket, f.uri.path) for f in inputs}
    for f in inputs:
        out = job.output.child(f.rel)
        if any(segment in ("", ".", "..") for segment in f.rel.split("/")):
            # Cloud Storage would take the name; any tool copying the outputs to disk would write
            # such a file outside the output folder.
            raise errors.InvalidJob(
                f"input {f.uri} would be mirrored as {out}, whose name below the output has a '.', '..' or empty "
                "segment — rename that object (or move it out of the input)"
            )
        check_object_name(out, f"the output of {f.uri}")
        if (out.bucket, out.path) in names:
            raise errors.InvalidJob(
                f"output {out} would overwrite input {f.uri} — choose an output prefix outside the input"
            )


def _first_error(files: list[FileResult]) -> dict[str, Any] | None:
    """The job's first error line, in input order: which file, which line, and why."""
    for f in files:
        if f.first_error is not None:
            return {"input": f.input, "line": f.first_error[0], "message": f.first_error[1]}
    return None


def _manifest(job: Job, status: str, state: _Run) -> dict[str, Any]:
    handle, started, error = state.handle, state.started, state.error
    finished = time.time()
    manifest: dict[str, Any] = {
        "job_id": job.job_id,
        "status": status,
        "model": {
            "uri": str(job.model),
            "resolved": str(handle.uri) if handle else None,
            "version": handle.version if handle else None,
            "signature_name": job.options.signature_name,
        },
        "input": str(job.input),
        "output": str(job.output),
        "manifest": str(job.manifest_uri),
        "options": job.options.to_json(),
        "files": [f.to_json() for f in state.files],
        "totals": state.totals.to_json(),
        **({"first_error": first} if (first := _first_error(state.files)) else {}),
        "started_at": _iso(started),
        "finished_at": _iso(finished),
        "timings": {"total_s": round(finished - started, 3), **{k: round(v, 3) for k, v in state.timings.items()}},
    }
    if error:
        manifest["error"] = error
    return manifest


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- the files ---------------------------------------------------------------------------------


class _Stopped(Exception):
    """Raised in a file's thread when another file of the job failed: its output is abandoned."""


class _Tracker:
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

    def stop(self) -> None:
        with self._lock:
            self._stopped = True


def _run_files(
    one: Callable[[Any], FileResult], inputs: list[Any], concurrency: int, state: _Run, tracker: _Tracker
) -> None:
    """Run `one` over the inputs, up to `concurrency` files at a time, recording each result in
    input order. The first failure stops the other files (their outputs are abandoned) and is raised."""
    results: dict[int, FileResult] = {}
    try:
        if concurrency <= 1 or len(inputs) <= 1:
            for i, f in enumerate(inputs):
                results[i] = one(f)
            return
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
    finally:
        for i in sorted(results):
            state.files.append(results[i])
            state.totals.add(results[i].counts)


# -- one file -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    """One instance line on its way to an output line."""

    shown: Any  # what the output line echoes: the instance, or its key
    label: str = "instance"  # "key" when `shown` is the key_field value
    feed: Any = None  # what the model receives
    error: str | None = None
    prediction: Any = None
    raw: bytes | None = None  # `shown` as strict JSON text, when it is the whole input line


def _run_file(
    job: Job,
    f: Any,
    store: Store,
    predictor: Predictor,
    batch_size: Callable[[], int],
    limits: Limits,
    tracker: _Tracker,
) -> FileResult:
    out_uri = job.output.child(f.rel)
    result = FileResult(input=str(f.uri), output=str(out_uri))
    if f.piece is not None:  # its lines go to an object of their own, joined into `out_uri` once all are
        out_uri = job.parts_folder.child(piece_path(f.rel, *f.piece))
        result.piece = {"of": list(f.piece), "bytes": [f.start, f.end], "object": str(out_uri)}
    # Lines of the file before this piece's first, read only when an error line is to name its line.
    lines_before = functools.cache(lambda: store.lines_before(f) if f.start else 0)
    counts = result.counts
    options = job.options
    plain = options.key_field is None and options.included_fields is None and options.excluded_fields is None
    results_format = options.output_format != "predictions"
    # Lines and bytes already told to the tracker.
    lines_told = bytes_told = 0
    # The batch being filled: its non-blank lines, their line numbers, and their bytes.
    pending: list[bytes] = []
    numbers: list[int] = []
    pending_bytes = 0
    where = f"{f.uri} (bytes {f.start:,} to {f.end:,}, piece {f.piece[0]} of {f.piece[1]})" if f.piece else f.uri
    log.info("%s (%d bytes) → %s", where, f.length, out_uri)
    started = time.perf_counter()

    with store.open_output(out_uri, job_id=job.job_id, content_type=JSONL) as output:
        out = _Waits(output)

        def flush() -> None:
            plain_outcome = None
            if plain:
                plain_outcome = _flush_plain(pending, predictor, counts, out, results_format=results_format)
            if plain_outcome == "done":
                return
            parsed = codec.parse_many(pending)
            entries = [
                _Entry(p[0], feed=p[0], raw=raw.strip() if p[1] else None)
                if plain and not isinstance(p, ValueError)
                else _entry(p, raw, lineno, options)
                for lineno, raw, p in zip(numbers, pending, parsed, strict=True)
            ]
            if f.start and any(e.error is not None for e in entries):  # its lines numbered as in the file
                before = lines_before()
                entries = [
                    e if e.error is None else _entry(p, raw, lineno + before, options)
                    for e, lineno, raw, p in zip(entries, numbers, pending, parsed, strict=True)
                ]
            # A batch the model just rejected whole is not sent whole again.
            _predict_entries(
                predictor, entries, rejected=plain_outcome if isinstance(plain_outcome, BatchRejected) else None
            )
            failed = sum(1 for e in entries if e.error is not None)
            if failed:
                _hint_request_bodies(entries)
            if failed and result.first_error is None:
                result.first_error = next(
                    (n + lines_before(), e.error) for n, e in zip(numbers, entries, strict=True) if e.error
                )
            counts.instances += len(entries)
            counts.errors += failed
            counts.predictions += len(entries) - failed
            if results_format:  # the common line inline: the input line copied, the prediction encoded
                lines = [
                    _OPEN[e.label] + e.raw + b',"prediction":' + codec.dumps(e.prediction) + b"}"
                    if e.raw is not None and e.error is None
                    else _format(e, options)
                    for e in entries
                ]
            else:
                lines = [_format(e, options) for e in entries]
            lines.append(b"")
            out.write(b"\n".join(lines))

        # Lines come in blocks (a downloaded chunk's worth) and are cut into batches as lists:
        # at a few microseconds per instance, a Python step per line is a cost worth avoiding.
        max_batch_bytes, max_line_bytes = limits.max_batch_bytes, limits.max_line_bytes
        for block in out.blocks(store.read_blocks(f, max_line_bytes=max_line_bytes)):
            if max(map(len, block), default=0) > max_line_bytes:
                block = [_TooLong(raw, max_line_bytes) if len(raw) > max_line_bytes else raw for raw in block]
            first = counts.lines + 1
            counts.lines += len(block)
            kept = [raw for raw in block if raw and not raw.isspace()]
            if len(kept) == len(block):
                kept_numbers: list[int] | range = range(first, first + len(block))
            else:
                counts.skipped += len(block) - len(kept)
                kept_numbers = [first + i for i, raw in enumerate(block) if raw and not raw.isspace()]
            start = 0
            while start < len(kept):
                # Take lines up to the batch's size, or up to the line that reaches its byte bound.
                size = batch_size()
                end = min(len(kept), start + max(0, size - len(pending)))
                sizes = list(accumulate(map(len, kept[start:end]), initial=pending_bytes))
                end = start + min(bisect_left(sizes, max_batch_bytes, lo=1), end - start)
                pending += kept[start:end]
                numbers += kept_numbers[start:end]
                pending_bytes = sizes[end - start]
                start = end
                if len(pending) >= size or pending_bytes >= max_batch_bytes:
                    flush()
                    tracker.advance(numbers[-1] - lines_told, pending_bytes + len(pending))
                    lines_told, bytes_told = numbers[-1], bytes_told + pending_bytes + len(pending)
                    pending, numbers, pending_bytes = [], [], 0
        if pending:
            flush()
        last_batch = time.perf_counter()
    # After the last batch: the rest of the output sent, and stored.
    result.input_wait_s, result.output_wait_s = out.input_s, out.output_s + time.perf_counter() - last_batch
    tracker.advance(counts.lines - lines_told, max(0, f.length - bytes_told), file_done=True)
    if result.first_error is not None:
        log.warning(
            "%s: %d of %d instances could not be predicted (error lines in %s); the first, line %d: %s",
            f.uri, counts.errors, counts.instances, out_uri, *result.first_error,
        )  # fmt: skip
    log.info(
        "%s → %s: %d instances, %d predictions, %d errors, %d skipped in %.2fs (of which waiting for input %.2fs, "
        "for the output to be stored %.2fs)",
        f.uri, out_uri, counts.instances, counts.predictions, counts.errors, counts.skipped,
        time.perf_counter() - started, result.input_wait_s, result.output_wait_s,
    )  # fmt: skip
    return result


class _Waits:
    """A file's output sink that adds up what the file waited for: its writes (the upload's
    back-pressure) and the arrival of each input block it reads through `blocks`."""

    __slots__ = ("_sink", "input_s", "output_s")

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self.input_s = self.output_s = 0.0

    def write(self, block: bytes) -> int:
        t = time.perf_counter()
        n = self._sink.write(block)
        self.output_s += time.perf_counter() - t
        return n

    def blocks(self, blocks: Iterator[list[bytes]]) -> Iterator[list[bytes]]:
        while True:
            t = time.perf_counter()
            block = next(blocks, None)
            self.input_s += time.perf_counter() - t
            if block is None:
                return
            yield block


def _flush_plain(
    raws: list[bytes], predictor: Predictor, counts: Counts, out: Sink, *, results_format: bool
) -> Literal["done", "not strict JSON", "one shape per call"] | BatchRejected:
    """The common batch of plain instances — every line strict JSON, the model takes them all —
    predicted and written as whole lists, without per-line bookkeeping ("done"). Otherwise nothing
    is written, and the batch then goes line by line (told how the model refused it, if it did)."""
    if predictor in _ONE_SHAPE_PER_CALL:
        return "one shape per call"
    values = codec.parse_strict(raws)
    if values is None:
        return "not strict JSON"
    try:
        predictions = _predict(predictor, values)
    except BatchRejected as rejected:
        return rejected  # isolated instance by instance, in `_predict_entries`
    encoded = codec.dumps_each(predictions)
    if results_format:
        # Each line is {"instance":<the input line>,"prediction":<encoded>}, joined in one C-level pass.
        parts = zip(
            repeat(_OPEN["instance"]), map(bytes.strip, raws), repeat(b',"prediction":'), encoded, repeat(b"}\n")
        )
        out.write(b"".join(chain.from_iterable(parts)))
    else:
        encoded.append(b"")
        out.write(b"\n".join(encoded))
    counts.instances += len(values)
    counts.predictions += len(values)
    return "done"


def _entry(parsed: tuple[Any, bool] | ValueError, raw: bytes, lineno: int, options: Options) -> _Entry:
    """The entry of a line that is not valid JSON, or of an instance under key/fields options
    (plain valid lines are made inline, in `_run_file`)."""
    if isinstance(raw, _TooLong):
        return _Entry(
            raw.preview,
            error=f"line {lineno} is longer than {raw.limit:,} bytes (WORKER_MAX_LINE_BYTES) and was not read — is "
            "the file one JSON document (an array of every instance, say)? Write one instance per line, "
            "or raise WORKER_MAX_LINE_BYTES for instances this large",
        )
    if isinstance(parsed, ValueError):
        error = f"line {lineno} is not valid JSON: {parsed}{_not_json_hint(raw)}"
        return _Entry(raw.decode("utf-8", errors="replace"), error=error)
    value, _ = parsed
    shown: Any = value
    if options.key_field is not None:
        if not isinstance(value, dict) or options.key_field not in value:
            return _Entry(value, error=f"line {lineno} has no key field {options.key_field!r}")
        shown = value[options.key_field]
    label = "key" if options.key_field is not None else "instance"
    try:
        feed = _select_fields(value, options)
    except ValueError as e:
        return _Entry(shown, label, error=f"line {lineno}: {e}")
    if options.key_field is None and (options.included_fields or options.excluded_fields):
        shown = feed
    return _Entry(shown, label, feed=feed)


class _TooLong(bytes):
    """An input line longer than the limit, in place of its text: not JSON by construction (no
    batch takes it as an instance), with the start of the line to show in its error line."""

    preview: str
    limit: int

    def __new__(cls, raw: bytes, limit: int) -> _TooLong:
        line = super().__new__(cls, b"\x01a line too long\x01")
        line.preview = raw[:80].decode("utf-8", errors="replace") + "…"
        line.limit = limit
        return line


# The first line of an indented JSON document, or one of its closing lines.
_INDENTED_JSON_LINES = frozenset((b"{", b"[", b"}", b"]", b"},", b"],"))


def _not_json_hint(raw: bytes) -> str:
    """What to fix in a line that is not JSON, when it is a common slip: a file of indented JSON
    (its first line a lone `{` or `[`), an instance followed by a comma (copied from a JSON array),
    or comma-separated values (CSV) where a JSON array was meant."""
    text = raw.strip()
    if text in _INDENTED_JSON_LINES:
        return (
            " — is the file indented JSON? Each line must hold one whole instance (JSON lines: "
            "one instance per line, no line breaks inside it)"
        )
    if text.endswith(b","):
        try:
            codec.parse(text[:-1])
        except ValueError:
            return ""
        return " — remove the comma at its end (instances copied from a JSON array?): nothing separates JSON lines"
    if b"," in text and text[:1] not in (b"[", b"{", b'"'):
        try:
            codec.parse(b"[" + text + b"]")
        except ValueError:
            pass
        else:
            return " — comma-separated values (CSV?) make one instance when written as a JSON array: [v1, v2, …]"
    if _CSV_HEADER.fullmatch(text):
        return (
            " — a row of column names (a CSV header?): each line of JSON lines is one instance, an array "
            '[v1, v2, …] or an object {"column": v, …}'
        )
    return ""


# Two or more comma-separated names, bare or double-quoted: a CSV file's header row.
_CSV_HEADER = re.compile(rb'\s*(?:[A-Za-z_][\w .-]*|"[^"]*")\s*(?:,\s*(?:[A-Za-z_][\w .-]*|"[^"]*")\s*)+')


# Keys of a TF Serving request body: a whole request written as one line. (Not its columnar
# "inputs": many models name their one input so.)
_REQUEST_BODY_KEYS = ({"instances"}, {"signature_name", "instances"})


def _hint_request_bodies(entries: list[_Entry]) -> None:
    """Add what to fix to the errors of instances that are whole TF Serving request bodies."""
    for e in entries:
        if e.error is not None and isinstance(e.feed, dict) and e.feed.keys() in _REQUEST_BODY_KEYS:
            e.error += (
                ' — this line is a whole TF Serving request ({"instances": […]}): '
                "write each of its instances on a line of its own"
            )


def _select_fields(value: Any, options: Options) -> Any:
    """Apply key_field / included_fields / excluded_fields / instance_type (one is set) to one instance."""
    if not isinstance(value, dict):
        raise ValueError("instance must be a JSON object when key_field or *_fields options are set")
    if options.included_fields is not None:
        missing = [k for k in options.included_fields if k not in value]
        if missing:
            raise ValueError(f"instance has no field(s) {missing} named in included_fields")
        if options.instance_type == "array":
            return [value[k] for k in options.included_fields]
        return {k: value[k] for k in options.included_fields}
    dropped = set(options.excluded_fields or ())
    if options.key_field is not None:
        dropped.add(options.key_field)
    return {k: v for k, v in value.items() if k not in dropped}


def _predict_entries(predictor: Predictor, entries: list[_Entry], *, rejected: BatchRejected | None = None) -> None:
    """Predict every entry without an error yet; `rejected`: how the model has just refused them
    all as one batch."""
    todo = [e for e in entries if e.error is None]
    if rejected is not None and len(todo) == len(entries):
        _refused(predictor, todo, rejected, grouped=False)
    elif todo and not (predictor in _ONE_SHAPE_PER_CALL and _by_shape(predictor, todo)):
        _predict_isolating(predictor, todo)


def _predict(predictor: Predictor, feeds: list[Any]) -> list[Any]:
    """One prediction per instance, or ModelError; the model's BatchRejected passes through."""
    predictions = predictor.predict(feeds)
    if len(predictions) != len(feeds):
        raise errors.ModelError(
            f"the model returned {len(predictions)} predictions for {len(feeds)} instances; {BATCH_ADVICE}"
        )
    return predictions


def _predict_isolating(predictor: Predictor, entries: list[_Entry], *, grouped: bool = False) -> None:
    """Predict `entries`; when the model rejects the batch, isolate what it refuses."""
    try:
        predictions = _predict(predictor, [e.feed for e in entries])
    except BatchRejected as rejected:
        _refused(predictor, entries, rejected, grouped=grouped)
        return
    for e, p in zip(entries, predictions, strict=True):
        e.prediction = p


def _refused(predictor: Predictor, entries: list[_Entry], rejected: BatchRejected, *, grouped: bool) -> None:
    """After the model refused `entries` as one batch: a lone instance, or instances each refused
    for the same reason, are error lines; the others are isolated."""
    if len(entries) == 1 or rejected.each:
        for e in entries:
            e.error = rejected.message
    elif grouped:
        _isolate(predictor, entries, grouped=grouped)
    else:  # a batch as the file gave it: how many of its instances are refused tells how to isolate the next
        _isolate(predictor, entries, grouped=False, one_by_one=_LAST_REFUSED.get(predictor, 0.0) >= MOSTLY_REFUSED)
        _LAST_REFUSED[predictor] = sum(e.error is not None for e in entries) / len(entries)


def _isolate(predictor: Predictor, entries: list[_Entry], *, grouped: bool, one_by_one: bool = False) -> None:
    """Predict a batch the model refused, in parts. First instances of one shape together: a model
    of variable-length inputs (token ids, say) takes only rectangular batches, as TF Serving does,
    so each length makes a batch of its own (and when every length goes through, the predictor is
    remembered as taking one shape per call). Then halves, until each bad instance is alone: one
    bad instance costs one error line and not its batch; or, `one_by_one` (when a quarter or more of
    the last refused batch was refused), each instance alone."""
    if not grouped and _by_shape(predictor, entries):
        if all(e.error is None for e in entries):
            _ONE_SHAPE_PER_CALL.add(predictor)
        return
    if one_by_one:
        for e in entries:
            _predict_isolating(predictor, [e], grouped=True)
        return
    mid = len(entries) // 2
    _predict_isolating(predictor, entries[:mid], grouped=True)
    _predict_isolating(predictor, entries[mid:], grouped=True)


def _by_shape(predictor: Predictor, entries: list[_Entry]) -> bool:
    """Predict `entries` one batch per shape, when they have several (True); else do nothing."""
    groups: dict[Any, list[_Entry]] = {}
    for k, e in enumerate(entries):
        groups.setdefault(_shape_of(e.feed, k), []).append(e)
    if len(groups) == 1:
        return False
    for group in groups.values():
        _predict_isolating(predictor, group, grouped=True)
    return True


def _shape_of(value: Any, k: int) -> Any:
    """The nesting of arrays in a JSON value (in objects, per key): values of one shape can make a
    rectangular batch. Numbers, strings and `{"b64": …}` have the same, empty shape; a value too
    deep to walk gets one of its own (`k`: its place in the batch)."""
    try:
        return _shape(value)
    except RecursionError:
        return ("too deep", k)


def _shape(value: Any) -> Any:
    if isinstance(value, list):
        if value and isinstance(value[0], (list, dict)):
            return (len(value), tuple(map(_shape, value)))
        return (len(value),)
    if isinstance(value, dict) and not (len(value) == 1 and "b64" in value):
        return tuple((key, _shape(v)) for key, v in sorted(value.items()))
    return ()


def _format(e: _Entry, options: Options) -> bytes:
    if options.output_format == "predictions":
        return dumps_line(e.prediction if e.error is None else {"error": _error_obj(e.error)})
    if e.raw is not None:
        # The input line is strict JSON: copy it rather than encode the parsed instance again.
        tail = (
            b',"prediction":' + dumps_line(e.prediction)
            if e.error is None
            else b',"error":' + dumps_line(_error_obj(e.error))
        )
        return _OPEN[e.label] + e.raw + tail + b"}"
    obj: dict[str, Any] = {e.label: e.shown}
    if e.error is None:
        obj["prediction"] = e.prediction
    else:
        obj["error"] = _error_obj(e.error)
    return dumps_line(obj)


_OPEN = {"instance": b'{"instance":', "key": b'{"key":'}


def _error_obj(message: str) -> dict[str, str]:
    return {"status": "INVALID_ARGUMENT", "message": message}


def dumps_line(obj: Any) -> bytes:
    """One strict-JSON line. Non-finite floats (a model's NaN, or NaN in an input line) are not
    JSON: TF Serving writes them bare, we write the strings "NaN", "Infinity", "-Infinity"."""
    return codec.dumps(obj)
