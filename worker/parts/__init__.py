"""One job run as parts on several instances: `options.parts` = N. This wraps the pipeline's run of
a job; the pipeline itself runs one job, or one part, without knowing how parts are made or joined.

The job's own run (the dispatch, `dispatch.py`) lists its input, cuts each file larger than a
part's share of the input's bytes into pieces (when it can be read in pieces: JSON lines or CSV
stored as UTF-8, cut at line starts; TFRecord stored uncompressed, at records), shares the files
and pieces among N parts (by size, largest first, each to the part with the fewest bytes so far)
and keeps those shares at `<parts folder>/files-of-N.json` (`plan.py`), then publishes N part jobs
to the jobs topic (`WORKER_JOBS_TOPIC`): the same model, input, output and options, with
`part: [k, N]` instead of `parts`, the job id `<job id>/part-k-of-N` (and, for a dropped file's job, its
`manifest`). Every part predicts the files of its share, writes its outputs where the whole job
would, and its manifest at `<parts folder>/part-k-of-N.json`; it publishes nothing itself. The part
that then finds all N part manifests written combines them into the job's manifest (`combine.py`),
after joining each cut file's pieces into the file's output (a TFRecord file's pieces once their
records are seen to meet), and publishes the job's one completion message. The job sent again keeps
the shares of its first dispatch, so the parts that succeeded then and the parts that run again
never hold a file twice or miss one between them.

    plan.py       cuts, shares, the part jobs and where their manifests go
    dispatch.py   a job with `parts` published as its part jobs
    combine.py    the parts' manifests combined, pieces joined, the job's completion published
"""

from __future__ import annotations

import functools
from dataclasses import replace

from worker.jobs import Job
from worker.parts import plan
from worker.parts.combine import combine, give_up_part
from worker.parts.dispatch import dispatch
from worker.pipeline import Limits, ModelProvider, Outcome, ProgressFn, Publisher, Store
from worker.pipeline import run as run_pipeline

__all__ = ["give_up_part", "run"]


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
    """Run `job`: a job with `options.parts` is published as that many part jobs through
    `dispatcher` (the jobs topic), or predicted here, whole, when it makes one part; a part
    predicts its share, and the last part to finish publishes the whole job's completion; any
    other job is the pipeline's run alone."""
    if job.options.parts is not None:
        dispatched = dispatch(job, store, publisher, dispatcher, limits)
        if dispatched is not None:
            return dispatched
        job = replace(job, options=replace(job.options, parts=None))  # predicted here, whole
    if job.options.part is None:
        return run_pipeline(job, store=store, models=models, publisher=publisher, limits=limits, progress=progress)
    select = functools.partial(plan.part_files, job, store)
    done = run_pipeline(
        job, store=store, models=models, publisher=publisher, limits=limits, progress=progress, select=select
    )
    combine(job, store, publisher)
    return done
