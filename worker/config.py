"""`Settings`: the worker's configuration, read once from the environment.

Everything below `main` and `cli` receives a `Settings` (or values from it), never `os.environ`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

from worker.errors import InvalidJob
from worker.jobs import Options, parse_json_object

# (environment variable, field, description) — also the table of docs/configuration.md.
ENV_VARS: tuple[tuple[str, str, str], ...] = (
    ("GOOGLE_CLOUD_PROJECT", "project", "Project of the results topic (also used by the client libraries)."),
    (
        "WORKER_RESULTS_TOPIC",
        "results_topic",
        "Topic for completion messages: a name or projects/P/topics/T. Empty: do not publish.",
    ),
    (
        "WORKER_JOBS_TOPIC",
        "jobs_topic",
        "The topic job messages come from (a name or projects/P/topics/T): a job with options.parts is "
        "published to it as that many part jobs. Empty: such jobs fail.",
    ),
    ("WORKER_BATCH_SIZE", "batch_size", "Instances per prediction call, unless a job sets options.batch_size."),
    ("WORKER_MAX_BATCH_BYTES", "max_batch_bytes", "Upper bound on the input bytes of one batch."),
    (
        "WORKER_MAX_LINE_BYTES",
        "max_line_bytes",
        "Longest input line read as an instance; a longer one (a file that is one JSON document, say) is an "
        "error line, and is not held in memory.",
    ),
    (
        "WORKER_FILE_CONCURRENCY",
        "file_concurrency",
        "Input files of one job predicted at the same time, each with its own download and upload.",
    ),
    (
        "WORKER_MIN_PIECE_BYTES",
        "min_piece_bytes",
        "The smallest piece a job run as parts (options.parts) cuts an input file into (at line starts, or "
        "records), when the file is larger than a part's share of the input's bytes.",
    ),
    (
        "WORKER_STORAGE_RETRY_SECONDS",
        "storage_retry_seconds",
        "How long a Cloud Storage request is retried (429, 5xx, no connection) before the job fails as "
        "transient, to be delivered again.",
    ),
    ("WORKER_WORK_DIR", "work_dir", "Local folder for downloaded models."),
    ("WORKER_DOWNLOAD_THREADS", "download_threads", "Parallel downloads when fetching a model."),
    (
        "WORKER_LEASE_SECONDS",
        "lease_seconds",
        "A running job's lease: a redelivered event waits (retryable answer) while the lease is renewed; "
        "a retry takes over this long after its holder died.",
    ),
    (
        "WORKER_MAX_DELIVERY_ATTEMPTS",
        "max_delivery_attempts",
        "The job subscription's dead-letter max_delivery_attempts: a job that fails transiently on that "
        "delivery publishes FAILED before its message is dead-lettered. Empty: never.",
    ),
    (
        "WORKER_GIVE_UP_AFTER_SECONDS",
        "give_up_after_seconds",
        "An event still failing transiently this long after it was sent (its Pub/Sub message's publish "
        "time, else the CloudEvent's time) publishes FAILED and is acknowledged: Eventarc redelivers for a "
        "day and counts no deliveries. Keep it an hour under the retention of a subscription of your own.",
    ),
    ("WORKER_MODEL", "default_model", "Model for input files dropped into a bucket without `model` metadata."),
    (
        "WORKER_INPUT",
        "input_prefix",
        "gs://BUCKET/PREFIX/ where dropped input files go: only objects under it start a job, and "
        "`PREFIX/a/b.jsonl` writes `WORKER_OUTPUT/a/b.jsonl`. Empty: any object of the bucket, path kept whole.",
    ),
    ("WORKER_OUTPUT", "default_output", "Output prefix for dropped files without `output` metadata."),
    (
        "WORKER_OPTIONS",
        "default_options",
        'Job options (JSON, e.g. {"key_field": "id"}) for dropped files without `options` metadata.',
    ),
    (
        "WORKER_SERVING",
        "serving",
        "auto (TensorFlow Serving when WORKER_MODEL_SERVER is on PATH, else in-process), tfserving or tensorflow.",
    ),
    ("WORKER_MODEL_SERVER", "model_server", "The TensorFlow Serving program (and leading arguments) to start."),
    (
        "WORKER_MODEL_SERVER_ARGS",
        "model_server_args",
        "More flags for it, e.g. --tensorflow_intra_op_parallelism=2 or "
        "--enable_batching --batching_parameters_file=PATH.",
    ),
    (
        "WORKER_REQUEST_FORMAT",
        "request_format",
        'How batches are sent to TensorFlow Serving: row ({"instances": …}) or columnar ({"inputs": …}).',
    ),
    ("WORKER_SERVER_START_SECONDS", "server_start_seconds", "How long a model server may take to load a model."),
    ("WORKER_PREDICT_TIMEOUT_SECONDS", "predict_timeout_seconds", "Longest a model server may take on one batch."),
    ("WORKER_MAX_MODELS", "max_models", "Models kept loaded (with their servers and local files) between jobs."),
    (
        "WORKER_MAX_MODEL_DISK_MB",
        "max_model_disk_mb",
        "Local disk the warm models' files may take; least recently used models are evicted to make "
        "room, and a model larger than this fails its job.",
    ),
    ("WORKER_LOG_LEVEL", "log_level", "DEBUG, INFO, WARNING or ERROR."),
    (
        "WORKER_LOG_FORMAT",
        "log_format",
        "json (JSON lines for Cloud Logging), text (time, level, message), or auto: text when stderr is a "
        "terminal, else json.",
    ),
)

SERVING_CHOICES = ("auto", "tfserving", "tensorflow")
REQUEST_FORMATS = ("row", "columnar")
LOG_FORMATS = ("auto", "json", "text")


@dataclass(frozen=True)
class Settings:
    project: str = ""
    results_topic: str = ""
    jobs_topic: str = ""
    batch_size: int = 1024
    max_batch_bytes: int = 4 * 1024 * 1024
    max_line_bytes: int = 16 * 1024 * 1024
    file_concurrency: int = 8
    min_piece_bytes: int = 1024 * 1024
    storage_retry_seconds: int = 120  # the client library's default
    work_dir: str = os.path.join(tempfile.gettempdir(), "embedded-tf")
    download_threads: int = 8
    lease_seconds: int = 120
    max_delivery_attempts: int = 0  # 0: unknown (the subscription does not dead-letter, or is not ours)
    give_up_after_seconds: int = 23 * 3600  # Eventarc and infra/'s subscriptions redeliver for 24 hours
    default_model: str = ""
    input_prefix: str = ""
    default_output: str = ""
    default_options: str = ""  # JSON text of a job's options
    serving: str = "auto"
    model_server: str = "tensorflow_model_server"
    model_server_args: str = ""
    request_format: str = "row"
    server_start_seconds: int = 300
    predict_timeout_seconds: int = 300
    max_models: int = 2
    max_model_disk_mb: int = 2048
    log_level: str = "INFO"
    log_format: str = "auto"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        kw: dict[str, object] = {}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for var, name, _ in ENV_VARS:
            raw = env.get(var, "").strip()
            if not raw:
                continue
            if types[name] in ("int", int):
                try:
                    value = int(raw)
                except ValueError:
                    raise ValueError(f"{var}={raw!r} is not an integer") from None
                if value < 1:
                    raise ValueError(f"{var}={raw!r} must be at least 1")
                kw[name] = value
            else:
                kw[name] = raw
        settings = cls(**kw)  # type: ignore[arg-type]
        if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"WORKER_LOG_LEVEL={settings.log_level!r} is not a log level")
        if settings.log_format not in LOG_FORMATS:
            raise ValueError(f"WORKER_LOG_FORMAT={settings.log_format!r} is not one of {', '.join(LOG_FORMATS)}")
        if settings.serving not in SERVING_CHOICES:
            raise ValueError(f"WORKER_SERVING={settings.serving!r} is not one of {', '.join(SERVING_CHOICES)}")
        if settings.request_format not in REQUEST_FORMATS:
            raise ValueError(
                f"WORKER_REQUEST_FORMAT={settings.request_format!r} is not one of {', '.join(REQUEST_FORMATS)}"
            )
        if settings.default_options:
            try:
                Options.parse(parse_json_object(settings.default_options, what="WORKER_OPTIONS"))
            except InvalidJob as e:
                message = str(e)
                raise ValueError(message if "WORKER_OPTIONS" in message else f"WORKER_OPTIONS: {message}") from None
        return settings

    @property
    def results_topic_path(self) -> str:
        """Fully qualified topic path, or "" when completion messages are off."""
        return self._topic_path("WORKER_RESULTS_TOPIC", self.results_topic)

    @property
    def jobs_topic_path(self) -> str:
        """Fully qualified path of the jobs topic, or "" when jobs cannot be run as parts."""
        return self._topic_path("WORKER_JOBS_TOPIC", self.jobs_topic)

    def _topic_path(self, var: str, topic: str) -> str:
        if not topic or topic.startswith("projects/"):
            return topic
        if not self.project:
            raise ValueError(
                f"{var}={topic!r} is a bare name: set GOOGLE_CLOUD_PROJECT too, "
                "or give the full projects/P/topics/T path"
            )
        return f"projects/{self.project}/topics/{topic}"
