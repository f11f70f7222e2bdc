"""Runs a job: skipped when complete, leased while it runs, its files predicted, its manifest
written last and its completion published; a job with `parts` is published as its parts,
and the last part to finish completes it (see `worker.fanout`)."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace
from typing import Any

from worker import errors, fanout
from worker.jobs import (
    STATUS_DISPATCHED,
    STATUS_FAILED,
    Job,
    check_object_name,
    input_format_of,
    is_plain_path,
    output_name,
)
from worker.lease import Lease
from worker.manifest import FileResult, error_ratio_exceeded, failure
from worker.pipeline.batching import _BatchSize
from worker.pipeline.file import _run_file
from worker.pipeline.files import _run_files, _Tracker
from worker.pipeline.ports import Limits, ModelProvider, Outcome, ProgressFn, Publisher, Store
from worker.pipeline.results import (
    COMPLETION_MAX_BYTES,
    PUBLISHED_KEY,
    _completion,
    _first_error,
    _iso,
    _manifest,
    _Run,
)

log = logging.getLogger(__name__)


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
        given = fanout.cuts(
            inputs,
            job.options.parts,
            min_piece_bytes=limits.min_piece_bytes,
            # JSON lines alone are cut into pieces: a CSV file's would need its header, a TFRecord
            # file's to begin at a record.
            can_cut=lambda f: input_format_of(job.options, f.rel) == "jsonl" and store.can_cut(f),
        )
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
        tracker = _Tracker(job.job_id, inputs, progress)
        tracker.announce("loading model")
        with models.load(job.model) as handle:
            state.handle = handle
            predictor = handle.model.predictor(job.options.signature_name)
            timings["model_load_s"] = time.perf_counter() - t

            t = time.perf_counter()
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


def _finish(job: Job, store: Store, publisher: Publisher | None, state: _Run) -> Outcome:
    """Write the manifest (the job's commit point), then publish the completion message."""
    totals = state.totals
    manifest = _manifest(job, state)
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


def _check_outputs(job: Job, inputs: list[Any]) -> None:
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
