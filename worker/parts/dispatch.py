"""A job with `parts` published as its part jobs (see `worker.parts`)."""

from __future__ import annotations

import contextlib
import logging

from worker import errors
from worker.jobs import STATUS_DISPATCHED, STATUS_FAILED, Job, input_format_of
from worker.manifest import failure
from worker.parts import plan
from worker.pipeline import Limits, Outcome, Publisher, Store
from worker.pipeline.job import check_outputs, completed, finish
from worker.pipeline.results import RunState

log = logging.getLogger(__name__)


def dispatch(
    job: Job, store: Store, publisher: Publisher | None, dispatcher: Publisher | None, limits: Limits
) -> Outcome | None:
    """Publish `job`'s parts to the jobs topic: as many as it asks for, at most one per file or
    piece of a file (a file larger than a part's share is cut into pieces, see `worker.parts`).
    None for a dropped file that makes one part (too small to cut, or of a kind that is not), never
    dispatched before: `parts` in WORKER_OPTIONS is for the large ones, and a small one is
    predicted here, whole, as without it (not one part a trip through Pub/Sub away)."""
    done = completed(job, store, publisher)
    if done is not None:
        return done
    assert job.options.parts is not None
    try:
        given = _given(job, store, dispatcher, limits)
    except errors.PermanentError as e:
        log.error("job %s failed: %s", job.job_id, e)
        return finish(job, store, publisher, RunState(error=failure(e.code, str(e))))
    assert dispatcher is not None
    n = min(job.options.parts, len(given))
    if n == 1 and job.manifest is not None and not store.names_under(job.parts_folder):
        log.info("job %s: %s makes one part (not cut into pieces): predicted here, whole", job.job_id, job.input)
        return None
    shares = plan.fixed_shares(job, store, given, n)
    files = _log_cuts(job, shares)
    _remove_stale(job, store, n)
    for data, attributes in plan.part_messages(job, n):
        dispatcher.publish(data, attributes)
    log.info(
        "job %s: %d input file(s) published as %d parts; the last to finish writes %s",
        job.job_id, files, n, job.manifest_uri,
    )  # fmt: skip
    dispatched = {"job_id": job.job_id, "status": STATUS_DISPATCHED, "parts": n, "files": files}
    return Outcome(
        {**dispatched, "input": str(job.input), "output": str(job.output), "manifest": str(job.manifest_uri)}
    )


def _log_cuts(job: Job, shares: list[list[plan.Cut]]) -> int:
    """The files cut into pieces said; how many files the shares hold."""
    cut = sorted({c.rel for s in shares for c in s if c.piece is not None})
    if cut:
        log.info(
            "job %s: %d file(s) cut into pieces (at line starts; TFRecord files at records) for the parts to share "
            "(%s%s)",
            job.job_id, len(cut), cut[0], ", …" if len(cut) > 1 else "",
        )  # fmt: skip
    return len({c.rel for s in shares for c in s})


def _given(job: Job, store: Store, dispatcher: Publisher | None, limits: Limits) -> list[plan.Cut]:
    """The job's input files as the parts are given them: whole, or cut into pieces."""
    assert job.options.parts is not None
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
    check_outputs(job, inputs)
    return plan.cuts(
        inputs,
        job.options.parts,
        min_piece_bytes=limits.min_piece_bytes,
        can_cut=lambda f: store.can_cut(f, input_format_of(job.options, f.rel)),
    )


def _remove_stale(job: Job, store: Store, n: int) -> None:
    """An earlier run's manifest (FAILED, or another job's) removed, for the parts to create the
    new one; and the manifests of its parts that failed, which run again: the whole job is
    combined only once they have."""
    for uri in (job.manifest_uri, *plan.part_manifests(job, n)):
        stale = store.read_json(uri)
        if stale is not None and (uri == job.manifest_uri or plan.value_of(stale).get("status") == STATUS_FAILED):
            with contextlib.suppress(errors.Conflict):
                store.delete(uri, if_generation_match=stale.generation)
