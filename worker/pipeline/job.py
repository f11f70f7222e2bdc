"""Runs a job: skipped when complete, leased while it runs, its files predicted, its manifest
written last and its completion published. A job run as parts is dispatched and combined around
this run (`worker.parts`)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from worker import errors
from worker.jobs import STATUS_FAILED, Job, input_format_of, output_name
from worker.lease import Lease
from worker.manifest import error_ratio_exceeded, failure
from worker.pipeline.batching import BatchSize
from worker.pipeline.file import JobFiles, run_file
from worker.pipeline.files import Tracker, run_files
from worker.pipeline.ports import Limits, ModelProvider, Outcome, ProgressFn, Publisher, Store
from worker.pipeline.results import (
    COMPLETION_MAX_BYTES,
    PUBLISHED_KEY,
    RunState,
    completion_data,
    first_error_line,
    iso_time,
    manifest_of,
)
from worker.uris import check_object_name, is_plain_path

log = logging.getLogger(__name__)


def run(
    job: Job,
    *,
    store: Store,
    models: ModelProvider,
    publisher: Publisher | None,
    limits: Limits,
    progress: ProgressFn | None = None,
    select: Callable[[list[Any]], list[Any]] | None = None,
) -> Outcome:
    """Run `job` to completion, once: a job whose manifest says it completed is skipped, and a
    job running elsewhere raises `errors.Busy`. Permanent failures end as a FAILED manifest and
    completion message; transient ones (`errors.TransientError`) propagate so the caller can retry.
    `select` picks the files a part predicts from the input's (see `worker.parts`); a part
    publishes no completion of its own, unless nothing can be written to its output."""
    part = job.options.part is not None
    own = None if part else publisher  # who hears of this job's own completion
    done = completed(job, store, own, leased=False)
    if done is None:
        try:
            check_object_name(job.lease_uri, "the job's lease")
            lease = Lease(store, job.lease_uri, job.job_id, limits.lease_s)
            lease.acquire()
        except errors.PermanentError as e:
            # Nothing can be written to the output: the job fails here, before reading anything
            # (a part too says so itself: no manifest of the whole job will).
            error = failure(e.code, f"cannot write to output {job.output}: {e}")
            return finish(job, store, publisher, RunState(error=error))
        try:
            done = completed(job, store, own)  # finished by the run that held the lease before us
            if done is None:
                state = _execute(job, store, models, limits, progress, select)
                lease.check()
                done = finish(job, store, own, state)
        finally:
            lease.release()
    return done


def completed(job: Job, store: Store, publisher: Publisher | None, *, leased: bool = True) -> Outcome | None:
    """The earlier outcome when this job already completed (FAILED runs are retried: the cause may
    have been fixed). Re-publishes its completion if that was never confirmed — only under the
    job's lease (`leased`): without it, the run that wrote the manifest may be publishing it right
    now, and this delivery would send the completion a second time; None then, to take the lease."""
    stored = store.read_json(job.manifest_uri)
    if stored is None:
        return None
    previous = stored.value
    if not isinstance(previous, dict) or previous.get("job_id") != job.job_id:
        return None
    if previous.get("status") == STATUS_FAILED:
        return None
    if publisher is not None and PUBLISHED_KEY not in stored.metadata:
        if not leased:
            return None
        log.warning("job %s completed but its completion was not confirmed published: publishing it", job.job_id)
        publish_completion(job, store, publisher, previous, manifest_written=True)
    else:
        log.info("job %s already completed (%s): skipping", job.job_id, previous.get("status"))
    return Outcome(previous, skipped=True)


def _execute(
    job: Job,
    store: Store,
    models: ModelProvider,
    limits: Limits,
    progress: ProgressFn | None,
    select: Callable[[list[Any]], list[Any]] | None,
) -> RunState:
    state = RunState()
    timings = state.timings
    try:
        t = time.perf_counter()
        inputs = store.list_inputs(job.input, exclude=job.output)
        check_outputs(job, inputs)
        if select is not None:
            inputs = select(inputs)
        timings["list_inputs_s"] = time.perf_counter() - t
        log.info("job %s: %d input file(s), %d bytes", job.job_id, len(inputs), sum(f.length for f in inputs))

        t = time.perf_counter()
        tracker = Tracker(job.job_id, inputs, progress)
        tracker.announce("loading model")
        with models.load(job.model) as handle:
            state.handle = handle
            predictor = handle.model.predictor(job.options.signature_name)
            timings["model_load_s"] = time.perf_counter() - t

            t = time.perf_counter()
            batch_size = BatchSize(job, limits, predictor)

            files = JobFiles(job, store, predictor, batch_size, limits, tracker)
            run_files(functools.partial(run_file, files), inputs, limits.file_concurrency, state, tracker)
            timings["predict_s"] = time.perf_counter() - t
            timings["input_wait_s"] = sum(r.input_wait_s for r in state.files)
            timings["output_wait_s"] = sum(r.output_wait_s for r in state.files)
        if job.options.part is None:  # a part's share alone does not decide: the whole job's does
            state.error = error_ratio_exceeded(job.options, state.totals, first_error_line(state.files))
    except errors.PermanentError as e:
        log.error("job %s failed: %s", job.job_id, e)
        state.error = failure(e.code, str(e))
    return state


def finish(job: Job, store: Store, publisher: Publisher | None, state: RunState) -> Outcome:
    """Write the manifest (the job's commit point), then publish the completion message."""
    totals = state.totals
    manifest = manifest_of(job, state)
    status = manifest["status"]
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
        publish_completion(job, store, publisher, manifest, manifest_written=written)
    log.info(
        "job %s %s: %d instances, %d predictions, %d errors in %.2fs",
        job.job_id, status, totals.instances, totals.predictions, totals.errors, time.time() - state.started,
    )  # fmt: skip
    return Outcome(manifest)


def publish_completion(
    job: Job, store: Store, publisher: Publisher, manifest: dict[str, Any], *, manifest_written: bool
) -> None:
    data = completion_data(manifest, COMPLETION_MAX_BYTES)
    publisher.publish(data, {"job_id": job.job_id, "status": str(manifest.get("status"))})
    if manifest_written:
        store.mark(job.manifest_uri, PUBLISHED_KEY, iso_time(time.time()))


def check_outputs(job: Job, inputs: list[Any]) -> None:
    """Every input's mirrored output is a plain path under the output prefix, and no input's."""
    names = {(f.uri.bucket, f.uri.path) for f in inputs}
    for f in inputs:
        out = job.output.child(output_name(f.rel, input_format_of(job.options, f.rel)))
        if not is_plain_path(f.rel):
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
