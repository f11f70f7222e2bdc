"""A run's results: its files' counts, the manifest (its commit point) and the completion
message made from it, cut to what any subscriber can receive."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from worker import manifest
from worker.jobs import Job
from worker.manifest import Counts, FileResult
from worker.pipeline.ports import ModelHandle

# Manifest metadata set once its completion message is published: a redelivery of a completed
# job re-publishes only when this is missing (the publish failed after the manifest was written).
PUBLISHED_KEY = "embedded-tf-completion-published"
# A completion message lists a job's files up to this size (some 4,000 files of 250 bytes each).
# Pub/Sub refuses messages over 10 MB, and gRPC clients at their default settings refuse to
# receive one over 4 MiB (the Python subscriber on the emulator does): subscribers of any kind
# should be able to read a completion.
COMPLETION_MAX_BYTES = 1024 * 1024


@dataclass
class RunState:
    started: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    files: list[FileResult] = field(default_factory=list)
    totals: Counts = field(default_factory=Counts)
    handle: ModelHandle | None = None
    error: dict[str, str] | None = None


def completion_data(manifest: dict[str, Any], max_bytes: int) -> bytes:
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


def first_error_line(files: list[FileResult]) -> dict[str, Any] | None:
    """The job's first error line, in input order: which file, which line, and why."""
    return manifest.first_error([f.to_json() for f in files if f.first_error is not None])


def manifest_of(job: Job, state: RunState) -> dict[str, Any]:
    handle, started = state.handle, state.started
    finished = time.time()
    model = {
        "uri": str(job.model),
        "resolved": str(handle.uri) if handle else None,
        "version": handle.version if handle else None,
        "signature_name": job.options.signature_name,
    }
    timings = {"total_s": round(finished - started, 3), **{k: round(v, 3) for k, v in state.timings.items()}}
    return manifest.build(
        job,
        model=model,
        files=[f.to_json() for f in state.files],
        totals=state.totals,
        times=(iso_time(started), iso_time(finished), timings),
        error=state.error,
    )


def iso_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
