"""A job's manifest — its commit point, and the data of its completion message — built one way
for a job run whole and for a job combined from its parts, with the one rule for its status."""

from __future__ import annotations

from typing import Any

from worker.jobs import STATUS_FAILED, STATUS_PARTIAL, STATUS_SUCCEEDED, Counts, Job


def status_of(error: dict[str, str] | None, totals: Counts) -> str:
    """FAILED with an error; else PARTIALLY_SUCCEEDED when any instance is an error line."""
    return STATUS_FAILED if error else STATUS_PARTIAL if totals.errors else STATUS_SUCCEEDED


def first_error(files: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The job's first error line, in input order (its files' manifest entries): which file, which
    line, and why."""
    return next(({"input": f["input"], **f["first_error"]} for f in files if f.get("first_error")), None)


def build(
    job: Job,
    *,
    model: Any,
    files: list[dict[str, Any]],
    totals: Counts,
    times: tuple[str, str, dict[str, Any]],
    error: dict[str, str] | None,
    **more: Any,
) -> dict[str, Any]:
    """The manifest of `job`: its model (the version served), its files' entries and totals, the
    first error line, its times (started, finished, timings), then `more` (a combined job's parts)
    and its error when it failed."""
    started_at, finished_at, timings = times
    first = first_error(files)
    manifest: dict[str, Any] = {
        "job_id": job.job_id,
        "status": status_of(error, totals),
        "model": model,
        "input": str(job.input),
        "output": str(job.output),
        "manifest": str(job.manifest_uri),
        "options": job.options.to_json(),
        "files": files,
        "totals": totals.to_json(),
        **({"first_error": first} if first else {}),
        "started_at": started_at,
        "finished_at": finished_at,
        "timings": timings,
        **more,
    }
    if error:
        manifest["error"] = error
    return manifest
