"""Command line: `python -m worker run --model gs://… --input gs://… --output gs://…`.

Runs the same pipeline as the event handler, with a progress bar for the job on stderr, and prints
the manifest as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from typing import TYPE_CHECKING, Any

from worker import __version__, errors, logs
from worker.config import ENV_VARS, Settings
from worker.jobs import STATUS_FAILED, Job, parse_json_object

if TYPE_CHECKING:
    from worker.pipeline import JobProgress

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TRANSIENT = 75  # EX_TEMPFAIL: try again later


def _env_help() -> str:
    defaults = Settings()
    emulators = (
        ("STORAGE_EMULATOR_HOST", "Cloud Storage emulator, e.g. http://127.0.0.1:4443"),
        ("PUBSUB_EMULATOR_HOST", "Pub/Sub emulator, e.g. 127.0.0.1:8085"),
    )
    rows = []
    for var, name, text in ENV_VARS:
        default = getattr(defaults, name)
        # "" and 0 are "not set" (a number set in the environment is at least 1).
        rows.append((var, text + (f" [{default}]" if default not in ("", 0) else "")))
    rows.extend(emulators)
    width = max(len(var) for var, _ in rows)
    return "\n".join(["environment (default in brackets):", *(f"  {var:<{width}} {text}" for var, text in rows)])


def build_parser() -> argparse.ArgumentParser:
    # `embedded-tf` once installed (pip install .), `python -m worker` from a checkout.
    installed = os.path.basename(sys.argv[0]) == "embedded-tf"
    parser = argparse.ArgumentParser(
        prog="embedded-tf" if installed else "python -m worker",
        description="Batch predictions with a TensorFlow SavedModel over JSON-lines files in Cloud Storage.",
    )
    parser.add_argument("--version", action="version", version=f"embedded-tf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run one job and print its manifest",
        description=(
            "Predict every line of every input file with the model and write the predictions under "
            "the output prefix, mirroring the input tree; then write _manifest.json and, when "
            "WORKER_RESULTS_TOPIC is set, publish the completion message."
        ),
        epilog=_env_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--model", required=True, help="gs:// SavedModel version folder, or a base path of numeric versions"
    )
    run.add_argument("--input", required=True, help="gs:// object, or a prefix ending in / for every object under it")
    run.add_argument("--output", required=True, help="gs:// prefix where outputs and _manifest.json are written")
    run.add_argument("--job-id", help="job id (default: a new random id); a completed job id is not run again")
    run.add_argument(
        "--batch-size",
        type=int,
        help=f"instances per prediction call (default: WORKER_BATCH_SIZE or {Settings.batch_size})",
    )
    run.add_argument("--signature-name", help="model signature (default: serving_default)")
    run.add_argument("--options", help='job options as JSON, e.g. \'{"key_field": "id"}\'')
    run.add_argument("--no-publish", action="store_true", help="do not publish a completion message")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    describe = sub.add_parser(
        "describe",
        help="print what a model takes and gives, with an example instance line",
        description=(
            "Find the model as a job would, download and load it with TensorFlow, and print each "
            "signature's inputs and outputs (TF Serving's type names; shapes with the batch first, -1 "
            "for any size), an example instance line for input files, and that example's prediction "
            "(or why the model refused it: it may need real values)."
        ),
    )
    describe.add_argument(
        "--model", required=True, help="gs:// SavedModel version folder, or a base path of numeric versions"
    )
    describe.add_argument("--signature-name", help="one signature (default: all of them)")
    return parser


class _Bar:
    """One tqdm bar for the job, advanced in bytes over all its files."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None

    def __call__(self, p: JobProgress) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=p.bytes_total, unit="B", unit_scale=True, file=sys.stderr)
        self._bar.update(min(p.bytes_read, p.bytes_total) - self._bar.n)
        self._bar.set_postfix(files=f"{p.files_done}/{p.files}", lines=p.lines)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env(os.environ)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    logs.setup(settings.log_level, settings.log_format)
    if args.command == "describe":
        return _describe(args, settings)
    from worker.runtime import Runtime

    raw: dict[str, Any] = {"model": args.model, "input": args.input, "output": args.output}
    if args.job_id:
        raw["job_id"] = args.job_id
    try:
        options = parse_json_object(args.options, what="--options") if args.options else {}
        if args.batch_size is not None:
            options["batch_size"] = args.batch_size
        if args.signature_name:
            options["signature_name"] = args.signature_name
        raw["options"] = options
        job = Job.from_mapping(raw, default_job_id=f"cli-{uuid.uuid4().hex[:16]}")
        rt = Runtime.from_settings(settings, publish=not args.no_publish)
    except (errors.InvalidJob, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    bar = _Bar(enabled=not args.quiet)
    try:
        outcome = rt.run_job(job, progress=bar)
    except errors.TransientError as e:
        print(f"error (transient, try again): {e}", file=sys.stderr)
        return EXIT_TRANSIENT
    finally:
        bar.close()
        rt.close()
    print(json.dumps(outcome.manifest, indent=2))
    if outcome.status == STATUS_FAILED:
        error = outcome.manifest.get("error") or {}
        print(f"error: job {job.job_id} FAILED ({error.get('code')}): {error.get('message')}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _describe(args: argparse.Namespace, settings: Settings) -> int:
    from worker.describe import describe
    from worker.storage import GcsStore

    try:
        store = GcsStore.from_environment(settings.project, retry_s=settings.storage_retry_seconds)
        described = describe(store, args.model, settings.work_dir, args.signature_name)
    except errors.InvalidJob as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except errors.TransientError as e:
        print(f"error (transient, try again): {e}", file=sys.stderr)
        return EXIT_TRANSIENT
    except errors.PermanentError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(described, indent=2))
    return 0
