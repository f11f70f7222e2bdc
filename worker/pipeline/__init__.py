"""Runs a job: every input line → one output line, batched through a predictor; manifest last.

Composes a `Store`, a `ModelProvider` and a `Publisher` through the small protocols of
`ports.py`; it never touches the SDKs, HTTP or the environment. Accounting per file and in total:
lines = instances + skipped, instances = predictions + errors.

    job.py        a job: skip if done, lease, execute, finish; parts dispatched and combined
    files.py      the job's files in flight, progress
    file.py       one file: blocks → batches → output lines
    batching.py   how many instances go in one call
    lines.py      a line → an entry → an output line; hints for common slips
    csv_rows.py   CSV rows as JSON lines (Vertex AI's rules)
    tf_records.py TFRecord records as JSON lines of {"b64": …}
    file_lists.py a file list's entries as JSON lines of their files' bytes
    isolation.py  finding the instances a model refuses
    results.py    the run's state, the manifest and the completion message
    ports.py      the protocols and values at the pipeline's edges
"""

from worker.pipeline import job
from worker.pipeline.batching import PROBE_BATCHES
from worker.pipeline.job import run
from worker.pipeline.lines import dumps_line
from worker.pipeline.ports import (
    JobProgress,
    Limits,
    ModelHandle,
    ModelProvider,
    Outcome,
    ProgressFn,
    Publisher,
    Sink,
    Store,
)
from worker.pipeline.results import COMPLETION_MAX_BYTES, PUBLISHED_KEY, completion_data

__all__ = [
    "COMPLETION_MAX_BYTES",
    "PROBE_BATCHES",
    "PUBLISHED_KEY",
    "JobProgress",
    "Limits",
    "ModelHandle",
    "ModelProvider",
    "Outcome",
    "ProgressFn",
    "Publisher",
    "Sink",
    "Store",
    "completion_data",
    "dumps_line",
    "job",
    "run",
]
