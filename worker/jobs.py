"""Value types of a job: `Options`, `Job`, how its input files are read and where their outputs
go (the locations themselves are `worker.uris.Uri`).

Pure data and validation; no I/O. Every parse error is an `InvalidJob` naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.codec import loads, shown, type_name
from worker.errors import InvalidJob
from worker.uris import Uri, check_text

STATUS_SUCCEEDED = "SUCCEEDED"
STATUS_PARTIAL = "PARTIALLY_SUCCEEDED"
STATUS_FAILED = "FAILED"
# A job run as parts (option `parts`), once they are published: the last to finish completes it.
STATUS_DISPATCHED = "DISPATCHED"

MANIFEST_NAME = "_manifest.json"
# The content type of output files (JSON lines).
JSONL = "application/jsonl"
# Under the output prefix: what a job run as parts (option `parts`) keeps while its parts run.
PARTS_FOLDER = "_parts/"
# Beside a dropped file's manifest (`<output>/_manifests/<file>.json`), the same: `<file>.parts/`.
DROPPED_PARTS_SUFFIX = ".parts/"
MAX_PARTS = 100
LEASE_SUFFIX = ".lease"
# A job id travels as the completion message's `job_id` attribute: Pub/Sub takes attribute values
# of at most 1,024 bytes (https://cloud.google.com/pubsub/quotas#resource_limits).
MAX_JOB_ID_BYTES = 1024


_INSTANCE_TYPES = ("object", "array")
_OUTPUT_FORMATS = ("results", "predictions")
# The input formats read (Vertex AI batch prediction's names).
INPUT_FORMATS = ("jsonl", "csv", "tf-record", "tf-record-gzip", "file-list")
# Formats known by a file's name (`input_format` not given), by the end of the name.
# A shard's number after a file's extension, as TensorFlow Datasets names its TFRecord files.
_SHARD = re.compile(r"(?<=\.tfrecord)s?-\d+-of-\d+(?=(\.gz)?$)")
_FORMATS_BY_NAME = (
    ((".csv", ".csv.gz"), "csv"),
    ((".tfrecord", ".tfrecords"), "tf-record"),
    ((".tfrecord.gz", ".tfrecords.gz"), "tf-record-gzip"),
)


@dataclass(frozen=True)
class Options:
    """Per-job options; every field is optional in the job message."""

    batch_size: int | None = None
    signature_name: str = "serving_default"
    key_field: str | None = None
    included_fields: tuple[str, ...] | None = None
    excluded_fields: tuple[str, ...] | None = None
    instance_type: str | None = None
    output_format: str = "results"
    input_format: str | None = None  # else by the file's name (`input_format_of`)
    max_error_ratio: float | None = None
    parts: int | None = None  # run the job as this many part jobs, on as many instances
    part: tuple[int, int] | None = None  # (k, n): this job is part k of n (set by the worker)

    @classmethod
    def parse(cls, raw: object) -> Options:
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise InvalidJob(f"options must be a JSON object, got {type_name(raw)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            offered = sorted(known - {"part"})  # set by the worker on the parts of a job, not by users
            raise InvalidJob(
                f"unknown option(s) {', '.join(map(repr, unknown))}; supported options are: {', '.join(offered)}"
            )
        kw: dict[str, Any] = {}
        for name, (valid, what, convert) in _OPTION_RULES.items():
            value = raw.get(name)
            if value is None:
                continue
            if not valid(value):
                raise InvalidJob(f"option {name} must be {what}, got {shown(value)}")
            kw[name] = convert(value)
        opts = cls(**kw)
        if opts.parts is not None and opts.part is not None:
            raise InvalidJob("options parts and part cannot be used together: part is set by the worker on each part")
        if opts.instance_type == "array" and opts.included_fields is None:
            raise InvalidJob(
                "option instance_type 'array' needs included_fields, which gives the order of the values in each array"
            )
        if opts.included_fields is not None and opts.excluded_fields is not None:
            raise InvalidJob("options included_fields and excluded_fields cannot be used together")
        return opts

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_names(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_part(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(_is_int(v) for v in value)
        and 1 <= value[0] <= value[1] <= MAX_PARTS
    )


def _same(value: Any) -> Any:
    return value


# Each option: whether a value is valid, what a valid one is (for the error), and the value kept.
_OPTION_RULES: dict[str, tuple[Callable[[Any], bool], str, Callable[[Any], Any]]] = {
    "batch_size": (lambda v: _is_int(v) and 1 <= v <= 100_000, "an integer from 1 to 100000", _same),
    "signature_name": (lambda v: isinstance(v, str) and bool(v), "a non-empty string", _same),
    "key_field": (lambda v: isinstance(v, str) and bool(v), "a non-empty string", _same),
    "included_fields": (_is_names, "a list of field names", tuple),
    "excluded_fields": (_is_names, "a list of field names", tuple),
    "instance_type": (lambda v: v in _INSTANCE_TYPES, f"one of {', '.join(_INSTANCE_TYPES)}", _same),
    "output_format": (lambda v: v in _OUTPUT_FORMATS, f"one of {', '.join(_OUTPUT_FORMATS)}", _same),
    "input_format": (lambda v: v in INPUT_FORMATS, f"one of {', '.join(INPUT_FORMATS)}", _same),
    "max_error_ratio": (lambda v: _is_number(v) and 0 <= v <= 1, "a number from 0 to 1", float),
    "parts": (lambda v: _is_int(v) and 1 <= v <= MAX_PARTS, f"an integer from 1 to {MAX_PARTS}", _same),
    "part": (_is_part, f"[k, n] with 1 <= k <= n <= {MAX_PARTS}", tuple),
}


_JOB_KEYS = {"model", "input", "output", "job_id", "options"}


def _check_fields(raw: Mapping[str, Any], *, part_of_dropped: bool) -> None:
    """A job message's fields: those of a job, and model, input and output among them."""
    unknown = sorted(set(raw) - _JOB_KEYS - ({"manifest"} if part_of_dropped else set()))
    if unknown:
        raise InvalidJob(
            f"unknown job field(s) {', '.join(map(repr, unknown))}; a job has "
            f"{', '.join(sorted(_JOB_KEYS))} (job options go inside 'options')"
        )
    missing = [k for k in ("model", "input", "output") if not raw.get(k)]
    if missing:
        raise InvalidJob(f"job is missing {', '.join(missing)}: a job needs model, input and output gs:// URIs")


def _checked_job_id(job_id: Any) -> str:
    """A job id as given: non-empty text of at most what a Pub/Sub attribute holds."""
    if not isinstance(job_id, str) or not job_id.strip():
        raise InvalidJob(f"job_id must be a non-empty string, got {shown(job_id)}")
    check_text(job_id, "job_id")
    if len(job_id.encode()) > MAX_JOB_ID_BYTES:
        raise InvalidJob(
            f"job_id {shown(job_id)} is {len(job_id.encode())} bytes of UTF-8, more than the {MAX_JOB_ID_BYTES} "
            "a Pub/Sub attribute holds (the completion message carries it as one) — use a shorter job_id"
        )
    return job_id


@dataclass(frozen=True)
class Job:
    """One batch prediction: a model, its input file(s), where predictions go."""

    job_id: str
    model: Uri
    input: Uri
    output: Uri
    options: Options = field(default_factory=Options)
    # Where the manifest goes when not `<output>/_manifest.json` (one per file for dropped files,
    # so files dropped together into one folder do not share, and race for, one manifest).
    manifest: Uri | None = None

    @classmethod
    def from_mapping(
        cls, raw: Mapping[str, Any], *, default_job_id: str, locate: Callable[[object, str], Uri] | None = None
    ) -> Job:
        """Build a job from a decoded job message (keys: model, input, output, job_id, options);
        `locate(value, field)` reads model, input and output (default: gs:// URIs only)."""
        options = raw.get("options")
        if isinstance(options, str):
            # Message attributes are strings: options arrive as JSON text there.
            options = parse_json_object(options, what="options attribute")
        # The part of a dropped file's job carries where that job's manifest goes (set by the worker).
        part_of_dropped = "manifest" in raw and isinstance(options, Mapping) and "part" in options
        _check_fields(raw, part_of_dropped=part_of_dropped)
        job_id = _checked_job_id(raw.get("job_id") or fit_job_id(default_job_id))
        parse = locate or (lambda value, what: Uri.parse(value, what=what))
        model = parse(raw["model"], "model")
        inp = parse(raw["input"], "input")
        out = parse(raw["output"], "output").as_prefix()
        if inp.path == "" and inp.bucket == out.bucket and out.path == "":
            raise InvalidJob(f"output {out} is the input bucket's root: outputs would be read as input")
        manifest = Uri.parse(raw["manifest"], what="manifest") if part_of_dropped else None
        return cls(job_id=job_id, model=model, input=inp, output=out, options=Options.parse(options), manifest=manifest)

    @property
    def manifest_uri(self) -> Uri:
        if self.options.part is not None:
            return self.parts_folder.child(part_manifest_path(*self.options.part))
        if self.manifest is not None:
            return self.manifest
        return self.output.child(MANIFEST_NAME)

    @property
    def parts_folder(self) -> Uri:
        """Where a job run as parts, and each of its parts, keeps the parts' shares and manifests and
        the pieces of cut files: `<output>/_parts/`, or beside a dropped file's manifest (files
        dropped into one folder share their output folder)."""
        if self.manifest is None:
            return self.output.child(PARTS_FOLDER)
        return self.manifest.with_path(self.manifest.path.removesuffix(".json") + DROPPED_PARTS_SUFFIX)

    @property
    def lease_uri(self) -> Uri:
        """The lease object that keeps two runs of this job (or two jobs on its manifest) apart."""
        m = self.manifest_uri
        return m.with_path(m.path + LEASE_SUFFIX)

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "model": str(self.model),
            "input": str(self.input),
            "output": str(self.output),
            "options": self.options.to_json(),
        }


# Where `gcloud storage cp` and `gsutil cp` put the parts of a parallel composite upload (a file
# of 150 MB or more): objects of their own, composed into the file and then deleted, or left
# behind when the upload was interrupted. Never an input.
_COMPOSITE_PARTS = ("gcloud/tmp/parallel_composite_uploads/", "gsutil/tmp/parallel_composite_uploads/")


def is_upload_part(name: str) -> bool:
    """Whether an object is a temporary part of a parallel composite upload, by its name:
    `gcloud/tmp/parallel_composite_uploads/…` (gcloud, at the bucket's root by default) or
    `<random id>/gsutil/tmp/parallel_composite_uploads/…` (gsutil), with any prefix before it."""
    return any("/" + part in "/" + name for part in _COMPOSITE_PARTS)


def part_manifest_path(k: int, n: int) -> str:
    """Where part k of n writes its manifest, in the job's parts folder."""
    return f"part-{k}-of-{n}.json"


def shares_path(n: int) -> str:
    """Where a job run as n parts keeps which files each part predicts, in its parts folder."""
    return f"files-of-{n}.json"


def piece_path(rel: str, i: int, m: int) -> str:
    """Where the part predicting piece i of m of the input file `rel` (a file cut for a job run as
    parts) writes its lines, in the job's parts folder, until they are joined into `rel`."""
    return f"pieces/{rel}/{i}-of-{m}.jsonl"


def input_format_of(options: Options, rel: str) -> str:
    """How an input file is read: its job's `input_format`, else by its name — `.csv` (or
    `.csv.gz`) is CSV, `.tfrecord` (or `.tfrecords`, and either `.gz`) TFRecord, as is a shard
    `.tfrecord-00000-of-00004` (TensorFlow Datasets' names), anything else JSON lines (a file list
    is never guessed: a `.txt` of URIs is named by the option)."""
    if options.input_format is not None:
        return options.input_format
    name = _SHARD.sub("", rel.lower())
    return next((fmt for ends, fmt in _FORMATS_BY_NAME if name.endswith(ends)), "jsonl")


def output_name(rel: str, input_format: str) -> str:
    """The output of the input file `rel`, below the output prefix: its own name for JSON lines
    (whatever its extension), `.jsonl` appended for any other format — outputs are JSON lines."""
    return rel if input_format == "jsonl" else rel + ".jsonl"


def fit_job_id(text: str) -> str:
    """`text` as a job id of at most MAX_JOB_ID_BYTES: itself when it fits, else its beginning, "…"
    and a hash of the whole (the same for the same text, so a redelivery finds the same job). For
    ids the worker makes (`bucket/name#generation` of an object whose name is near 1,024 bytes)."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= MAX_JOB_ID_BYTES:
        return text
    tail = "…" + hashlib.sha256(data).hexdigest()[:32]
    head = data[: MAX_JOB_ID_BYTES - len(tail.encode())].decode("utf-8", "ignore")
    return head + tail


def parse_json_object(text: str | bytes, *, what: str) -> dict[str, Any]:
    """Decode JSON that must be an object, with an error that says where it went wrong."""
    try:
        value = loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidJob(f"{what} is not valid JSON ({e}); send a JSON object") from e
    if not isinstance(value, dict):
        raise InvalidJob(f"{what} must be a JSON object, got {type_name(value)}")
    return value
