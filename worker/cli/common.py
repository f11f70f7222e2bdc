"""What the commands share: exit codes, the job a command line describes, and the checks that turn
an unreachable emulator or missing credentials into one line within seconds."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from worker.codec import shown
from worker.errors import InvalidJob
from worker.jobs import Job, parse_json_object
from worker.uris import Uri

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TRANSIENT = 75  # EX_TEMPFAIL: try again later

# How long a connection to an emulator may take before it is reported unreachable.
CONNECT_TIMEOUT_S = 3.0
NO_CREDENTIALS = (
    "no Google Cloud credentials found — run `gcloud auth application-default login` (or set "
    "GOOGLE_APPLICATION_CREDENTIALS to a service account key file; for the local emulators, set "
    "STORAGE_EMULATOR_HOST and PUBSUB_EMULATOR_HOST)"
)


class CommandError(Exception):
    """Ends a command with one `error: …` line and an exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def locate(value: object, what: str) -> Uri:
    """A `gs://` URI, or a local path made absolute (a folder's ending in `/`)."""
    if isinstance(value, str) and value and not value.startswith("gs://"):
        if "://" in value:
            raise InvalidJob(f"{what} {shown(value)} is neither a gs:// URI nor a local path")
        path = os.path.abspath(os.path.expanduser(value))
        return Uri.local(path, folder=what == "output" or value.endswith("/") or os.path.isdir(path))
    return Uri.parse(value, what=what)


def job_of(args: argparse.Namespace, *, local: bool) -> Job:
    """The job the command line gives: locations, job id and options (flags over `--options`)."""
    options = parse_json_object(args.options, what="--options") if args.options else {}
    flags: dict[str, Any] = {
        "batch_size": args.batch_size,
        "signature_name": args.signature_name,
        "key_field": args.key_field,
        "instance_type": args.instance_type,
        "output_format": args.output_format,
        "max_error_ratio": args.max_error_ratio,
        "input_format": args.input_format,
        "parts": getattr(args, "parts", None),
    }
    for name in ("included_fields", "excluded_fields"):
        value = getattr(args, name)
        if value is not None:
            flags[name] = [field.strip() for field in value.split(",") if field.strip()]
    options.update({name: value for name, value in flags.items() if value is not None})
    raw: dict[str, Any] = {"model": args.model, "input": args.input, "output": args.output, "options": options}
    if args.job_id:
        raw["job_id"] = args.job_id
    job = Job.from_mapping(raw, default_job_id=f"cli-{uuid.uuid4().hex[:16]}", locate=locate if local else _gcs_only)
    if len({job.model.scheme, job.input.scheme, job.output.scheme}) > 1:
        raise InvalidJob("--model, --input and --output must be all gs:// URIs or all local paths")
    if job.input.is_local and job.options.parts is not None:
        raise InvalidJob("option parts runs a job on several instances over Pub/Sub: it does not apply to local paths")
    return job


def _gcs_only(value: object, what: str) -> Uri:
    return Uri.parse(value, what=what)


def check_reachable(environ: Mapping[str, str], *variables: str) -> None:
    """Raise `CommandError` when an emulator a variable points at refuses connections (or does not
    answer within seconds): the client libraries would retry for minutes before saying so."""
    for var in variables:
        value = environ.get(var, "").strip()
        if not value:
            continue
        parts = urlsplit(value if "://" in value else f"http://{value}")
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        if not host:
            raise CommandError(f"{var}={value!r} names no host — write it as HOST:PORT", EXIT_USAGE)
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            reason = e.strerror or str(e) or type(e).__name__
            raise CommandError(
                f"cannot connect to {host}:{port}, which {var} names ({reason}) — start the emulator, or unset {var}",
                EXIT_TRANSIENT,
            ) from None


def check_credentials(environ: Mapping[str, str], emulator: str) -> None:
    """Raise `CommandError` (one line, not a traceback) when Google Cloud is to be reached without
    its emulator and no credentials are found."""
    if environ.get(emulator, "").strip():
        return
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    quiet = logging.getLogger("google.auth._default")  # it warns of each place it found nothing
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        google.auth.default()
    except DefaultCredentialsError:
        raise CommandError(NO_CREDENTIALS, EXIT_USAGE) from None
    finally:
        quiet.setLevel(level)
