"""The command line's arguments and help: `run`, `describe` and `submit`, each listing the
settings (environment variables) that apply to it."""

from __future__ import annotations

import argparse
import os
import sys

from worker import __version__
from worker.config import ENV_VARS, Settings
from worker.jobs import INPUT_FORMATS

MODEL_HELP = "SavedModel version folder (or a base folder of numeric versions): gs://… or a local path"

# The settings of a worker serving events alone: a command's job gives its own model and output.
_EVENTS_ONLY = {
    "WORKER_MAX_DELIVERY_ATTEMPTS",
    "WORKER_GIVE_UP_AFTER_SECONDS",
    "WORKER_MODEL",
    "WORKER_INPUT",
    "WORKER_OUTPUT",
    "WORKER_OPTIONS",
    "WORKER_MAX_MODELS",
}
# What `describe` (a model read and loaded with TensorFlow) and `submit` (two topics) read.
_DESCRIBE = {
    "GOOGLE_CLOUD_PROJECT",
    "WORKER_STORAGE_RETRY_SECONDS",
    "WORKER_WORK_DIR",
    "WORKER_DOWNLOAD_THREADS",
    "WORKER_LOG_LEVEL",
    "WORKER_LOG_FORMAT",
}
_SUBMIT = {"GOOGLE_CLOUD_PROJECT", "WORKER_JOBS_TOPIC", "WORKER_RESULTS_TOPIC", "WORKER_LOG_LEVEL", "WORKER_LOG_FORMAT"}
_EMULATORS = {
    "STORAGE_EMULATOR_HOST": "Cloud Storage emulator, e.g. http://127.0.0.1:4443 (no credentials needed)",
    "PUBSUB_EMULATOR_HOST": "Pub/Sub emulator, e.g. 127.0.0.1:8085 (no credentials needed)",
}


def env_help(command: str) -> str:
    """The settings that apply to `command`, with their defaults."""
    if command == "describe":
        applies, emulators = _DESCRIBE.__contains__, ["STORAGE_EMULATOR_HOST"]
    elif command == "submit":
        applies, emulators = _SUBMIT.__contains__, ["PUBSUB_EMULATOR_HOST"]
    else:
        applies, emulators = (lambda var: var not in _EVENTS_ONLY), list(_EMULATORS)
    defaults = Settings()
    rows = []
    for var, name, text in ENV_VARS:
        if applies(var):
            default = getattr(defaults, name)
            # "" and 0 are "not set" (a number set in the environment is at least 1).
            rows.append((var, text + (f" [{default}]" if default not in ("", 0) else "")))
    rows.extend((var, _EMULATORS[var]) for var in emulators)
    width = max(len(var) for var, _ in rows)
    return "\n".join(["environment (default in brackets):", *(f"  {var:<{width}} {text}" for var, text in rows)])


def _add_job_arguments(command: argparse.ArgumentParser, *, local: bool) -> None:
    where = "gs://… or a local path" if local else "gs://…"
    model_help = MODEL_HELP if local else MODEL_HELP.replace(" or a local path", "")
    command.add_argument("--model", required=True, help=model_help)
    command.add_argument(
        "--input", required=True, help=f"an input file, or a folder (prefix ending in /) of them: {where}"
    )
    command.add_argument(
        "--output", required=True, help=f"folder (prefix) where outputs and _manifest.json are written: {where}"
    )
    command.add_argument("--job-id", help="job id (default: a new random id); a completed job id is not run again")
    options = command.add_argument_group("job options (see docs/jobs.md; each overrides the same key of --options)")
    worker = f"WORKER_BATCH_SIZE or {Settings.batch_size}" if local else "the worker's WORKER_BATCH_SIZE"
    options.add_argument("--batch-size", type=int, help=f"instances per prediction call (default: {worker})")
    options.add_argument("--signature-name", help="model signature (default: serving_default)")
    options.add_argument("--key-field", help="field of each instance copied to its output line as `key`, not sent")
    options.add_argument(
        "--instance-type", choices=("object", "array"), help="send each instance as an object or an array"
    )
    options.add_argument("--included-fields", help="comma-separated fields sent (and their order, for arrays)")
    options.add_argument("--excluded-fields", help="comma-separated fields not sent")
    options.add_argument(
        "--output-format",
        choices=("results", "predictions"),
        help="results: Vertex AI's lines {instance, prediction} (default); predictions: the prediction alone",
    )
    options.add_argument(
        "--max-error-ratio", type=float, help="fail the job when more of its instances than this (0 to 1) are errors"
    )
    options.add_argument(
        "--input-format",
        choices=INPUT_FORMATS,
        help="how input files are read (default: by name: *.csv CSV, *.tfrecord TFRecord, the rest JSON lines)",
    )
    options.add_argument("--options", help='every job option as JSON, e.g. \'{"key_field": "id"}\'')


def build_parser() -> argparse.ArgumentParser:
    # `embedded-tf` once installed (pip install .), `python -m worker` from a checkout.
    installed = os.path.basename(sys.argv[0]) == "embedded-tf"
    parser = argparse.ArgumentParser(
        prog="embedded-tf" if installed else "python -m worker",
        description=(
            "Batch predictions with a TensorFlow SavedModel over files of JSON lines, in Cloud Storage or on "
            "local disk."
        ),
    )
    parser.add_argument("--version", action="version", version=f"embedded-tf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run one job here and print its manifest",
        description=(
            "Predict every line of every input file with the model and write the predictions under "
            "the output folder, mirroring the input tree; then write _manifest.json and, when "
            "WORKER_RESULTS_TOPIC is set, publish the completion message. Model, input and output are all "
            "gs:// locations or all local paths. Exit status: 0 SUCCEEDED or PARTIALLY_SUCCEEDED, 1 FAILED, "
            "2 usage, 75 transient (try again)."
        ),
        epilog=env_help("run"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_job_arguments(run, local=True)
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
        epilog=env_help("describe"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    describe.add_argument("--model", required=True, help=MODEL_HELP)
    describe.add_argument("--signature-name", help="one signature (default: all of them)")
    submit = sub.add_parser(
        "submit",
        help="publish a job for the deployed worker, and with --wait, wait for its completion",
        description=(
            "Publish the job to the jobs topic, for a deployed (or local) worker to run. With --wait, wait "
            "for its completion message on the results topic, print it and exit as `run` does: 0 "
            "SUCCEEDED or PARTIALLY_SUCCEEDED, 1 FAILED, 2 usage, 75 transient or timed out."
        ),
        epilog=env_help("submit"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_job_arguments(submit, local=False)
    submit.add_argument("--parts", type=int, help="run the job as this many parts, on as many instances")
    submit.add_argument("--topic", help="jobs topic: a name or projects/P/topics/T (default: WORKER_JOBS_TOPIC)")
    submit.add_argument("--wait", action="store_true", help="wait for the job's completion message and print it")
    submit.add_argument(
        "--results-topic", help="topic of completion messages, for --wait (default: WORKER_RESULTS_TOPIC)"
    )
    submit.add_argument(
        "--timeout", type=float, default=0, help="with --wait, give up after this many seconds (default: never)"
    )
    return parser
