"""A finalized object as a job, or as nothing: a `*.job.json` object holds a job; any other object
is an input file whose model and output come from its custom metadata or the worker's settings;
objects the worker wrote, and anything under its output prefix, start nothing (no trigger loops)."""

from __future__ import annotations

import dataclasses
import logging
import posixpath
from collections.abc import Callable
from typing import Any

from worker import errors
from worker.config import Settings
from worker.events import ObjectTrigger
from worker.jobs import MANIFEST_NAME, Job, is_upload_part, parse_json_object
from worker.storage import WRITTEN_BY_KEY
from worker.uris import Uri

log = logging.getLogger(__name__)

JOB_FILE_SUFFIX = ".job.json"
# Under the output prefix: one manifest per dropped input file, mirroring its path.
MANIFESTS_FOLDER = "_manifests/"


def job_for_object(obj: ObjectTrigger, settings: Settings, read: Callable[[Uri], bytes]) -> Job | None:
    """A finalized object as a job: `*.job.json` holds one; any other object is an input file.
    Objects the worker wrote, and anything under the configured output, start nothing. `read`
    reads a job file."""
    uri = f"gs://{obj.bucket}/{obj.name}"
    if WRITTEN_BY_KEY in obj.metadata or obj.name.endswith("/" + MANIFEST_NAME) or obj.name == MANIFEST_NAME:
        log.info("ignoring %s: written by the worker", uri)
        return None
    default_output = settings.default_output
    if default_output and default_output.startswith("gs://"):
        out = Uri.parse(default_output, what="WORKER_OUTPUT").as_prefix()
        if out.bucket == obj.bucket and obj.name.startswith(out.path):
            log.info("ignoring %s: under the output prefix %s", uri, out)
            return None
    if obj.name.endswith("/"):
        return None
    if is_upload_part(obj.name):
        log.info("ignoring %s: a part of a parallel composite upload, not a file", uri)
        return None
    if obj.name.endswith(JOB_FILE_SUFFIX):
        raw = parse_json_object(read(Uri(obj.bucket, obj.name)), what=f"job file {uri}")
        return Job.from_mapping(raw, default_job_id=obj.job_id)
    return _input_file_job(obj, uri, settings)


def _input_file_job(obj: ObjectTrigger, uri: str, settings: Settings) -> Job | None:
    """A dropped input file: `WORKER_INPUT/a/b.jsonl` → `WORKER_OUTPUT/a/b.jsonl`, or
    `<output metadata>/b.jsonl`; its manifest is `<output>/_manifests/<same path>.json`."""
    inputs = Uri.parse(settings.input_prefix, what="WORKER_INPUT").as_prefix() if settings.input_prefix else None
    if inputs is not None and (obj.bucket != inputs.bucket or not obj.name.startswith(inputs.path)):
        log.info("ignoring %s: not under the input prefix %s (WORKER_INPUT)", uri, inputs)
        return None
    model = obj.metadata.get("model") or settings.default_model
    output = obj.metadata.get("output") or settings.default_output
    if not model or not output:
        raise errors.InvalidJob(
            f"input file {uri} has no `model`/`output` custom metadata and the worker has no "
            "WORKER_MODEL/WORKER_OUTPUT default — set one of them"
        )
    if obj.metadata.get("output"):
        rel = posixpath.basename(obj.name)
    else:
        rel = obj.name[len(inputs.path) :] if inputs is not None else obj.name
    out = Uri.parse(output, what="output").as_prefix()
    folder = posixpath.dirname(rel)
    raw: dict[str, Any] = {"model": model, "input": uri, "output": str(out.child(folder + "/" if folder else ""))}
    if obj.metadata.get("options"):
        raw["options"] = parse_json_object(obj.metadata["options"], what=f"`options` metadata of {uri}")
    elif settings.default_options:
        raw["options"] = parse_json_object(settings.default_options, what="WORKER_OPTIONS")
    job = Job.from_mapping(raw, default_job_id=obj.job_id)
    return dataclasses.replace(job, manifest=out.child(f"{MANIFESTS_FOLDER}{rel}.json"))
