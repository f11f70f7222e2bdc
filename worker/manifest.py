"""A job's results: the counts of its lines, each file's result, its failure, and its manifest —
its commit point, and the data of its completion message — built one way for a job run whole and
for a job combined from its parts, with the one rule for its status."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from worker.jobs import STATUS_FAILED, STATUS_PARTIAL, STATUS_SUCCEEDED, Job, Options


@dataclass
class Counts:
    """Line accounting for a file or a job: lines = instances + skipped; instances = predictions + errors."""

    lines: int = 0
    instances: int = 0
    predictions: int = 0
    errors: int = 0
    skipped: int = 0

    def add(self, other: Counts) -> None:
        self.lines += other.lines
        self.instances += other.instances
        self.predictions += other.predictions
        self.errors += other.errors
        self.skipped += other.skipped

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass
class FileResult:
    input: str
    output: str
    counts: Counts = field(default_factory=Counts)
    # Seconds this file's lines waited for input (downloads, cut into lines) and for its output
    # (the upload's back-pressure, then storing the rest): summed into the manifest's timings.
    input_wait_s: float = 0.0
    output_wait_s: float = 0.0
    # The file's first error line: its line number and message (what to fix, without opening the output).
    first_error: tuple[int, str] | None = None
    # For a piece of a file cut for a job run as parts: which piece, its bytes [start, end) of the
    # input, and the object its lines went to (`output` is the whole file's, once joined).
    piece: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"input": self.input, "output": self.output, **self.counts.to_json()}
        if self.piece is not None:
            out["piece"] = self.piece
        if self.first_error is not None:
            out["first_error"] = {"line": self.first_error[0], "message": self.first_error[1]}
        return out


def failure(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def error_ratio_exceeded(options: Options, totals: Counts, first: dict[str, Any] | None) -> dict[str, str] | None:
    """The job's failure from its counts: instances of which none could be predicted, or more of them
    failed than `max_error_ratio` allows; `first` is its first error line (input, line, message)."""
    if not totals.instances:
        return None
    where = f"; the first, line {first['line']} of {first['input']}: {first['message']}" if first else ""
    if not totals.predictions:
        return failure(
            "INVALID_ARGUMENT",
            f"none of the {totals.instances} instances could be predicted{where} — see the error lines in the "
            "output files",
        )
    if options.max_error_ratio is None:
        return None
    ratio = totals.errors / totals.instances
    if ratio <= options.max_error_ratio:
        return None
    return failure(
        "INVALID_ARGUMENT",
        f"{totals.errors} of {totals.instances} instances ({ratio:.1%}) could not be predicted, more "
        f"than max_error_ratio {options.max_error_ratio} allows{where} — see the error lines in the output files",
    )


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
