"""How a finalized object becomes a job (or nothing), from the worker's configuration (`worker.triggers`)."""

from __future__ import annotations

import pytest

from worker import errors, events, triggers
from worker.config import Settings
from worker.jobs import Job


class _Configured:
    """`triggers.job_for_object` with one configuration: `.job_for_object(obj)`."""

    def __init__(self, **settings: str) -> None:
        self.settings = Settings(**settings)  # type: ignore[arg-type]

    def job_for_object(self, obj: events.ObjectTrigger) -> Job | None:
        return triggers.job_for_object(obj, self.settings, read=lambda uri: b"")


def _runtime(**settings: str) -> _Configured:
    return _Configured(**settings)


def _obj(name: str, bucket: str = "drop", **metadata: str) -> events.ObjectTrigger:
    return events.ObjectTrigger(bucket, name, "17", metadata)


def test_dropped_file_mirrors_its_path_from_the_input_prefix_to_the_output_prefix():
    rt = _runtime(default_model="gs://mdl/model/", input_prefix="gs://drop/in", default_output="gs://res/out/")
    job = rt.job_for_object(_obj("in/a/b.jsonl"))
    assert job is not None
    assert (str(job.input), str(job.output)) == ("gs://drop/in/a/b.jsonl", "gs://res/out/a/")
    assert str(job.output.child("b.jsonl")) == "gs://res/out/a/b.jsonl"
    # One manifest (and lease) per file, so files dropped together never share one.
    assert str(job.manifest_uri) == "gs://res/out/_manifests/a/b.jsonl.json"
    assert str(job.lease_uri) == "gs://res/out/_manifests/a/b.jsonl.json.lease"
    assert job.job_id == "drop/in/a/b.jsonl#17"


def test_objects_outside_the_input_prefix_or_written_by_the_worker_start_nothing():
    rt = _runtime(default_model="gs://mdl/model/", input_prefix="gs://drop/in/", default_output="gs://drop/out/")
    assert rt.job_for_object(_obj("other/b.jsonl")) is None
    assert rt.job_for_object(_obj("in/b.jsonl", bucket="elsewhere")) is None
    assert rt.job_for_object(_obj("out/b.jsonl")) is None  # under WORKER_OUTPUT
    assert rt.job_for_object(_obj("in/x.jsonl", **{"embedded-tf-job": "j"})) is None
    assert rt.job_for_object(_obj("in/sub/")) is None


def test_the_parts_of_a_parallel_composite_upload_start_nothing():
    """`gcloud storage cp` and `gsutil cp` upload a large file as part objects, then compose them."""
    rt = _runtime(default_model="gs://mdl/model/", default_output="gs://res/out/")
    gcloud = "gcloud/tmp/parallel_composite_uploads/see_gcloud_storage_cp_help_for_details/6f1e_3"
    gsutil = "1234/gsutil/tmp/parallel_composite_uploads/for_details_see/gsutil_help_cp/9a7c"
    for name in (gcloud, gsutil, "in/" + gcloud):
        assert rt.job_for_object(_obj(name)) is None, name
    for name in ("in/gcloud.jsonl", "in/mygcloud/tmp/parallel_composite_uploads/x.jsonl"):
        assert rt.job_for_object(_obj(name)) is not None, name


def test_without_an_input_prefix_the_whole_name_is_mirrored():
    rt = _runtime(default_model="gs://mdl/model/", default_output="gs://res/out/")
    job = rt.job_for_object(_obj("x/y.jsonl"))
    assert job is not None and str(job.output) == "gs://res/out/x/"
    assert str(job.manifest_uri) == "gs://res/out/_manifests/x/y.jsonl.json"


def test_metadata_names_model_and_output_for_one_file():
    rt = _runtime(input_prefix="gs://drop/in/")
    job = rt.job_for_object(_obj("in/deep/f.jsonl", model="gs://mdl/other/", output="gs://res/mine"))
    assert job is not None
    assert (str(job.model), str(job.output)) == ("gs://mdl/other/", "gs://res/mine/")
    assert str(job.manifest_uri) == "gs://res/mine/_manifests/f.jsonl.json"


def test_a_dropped_file_with_nowhere_to_go_says_what_to_set():
    with pytest.raises(errors.InvalidJob, match="WORKER_MODEL/WORKER_OUTPUT"):
        _runtime().job_for_object(_obj("f.jsonl"))


def test_dropped_file_options_from_its_metadata_else_from_the_worker():
    """A dropped file's job options come from its `options` custom metadata (JSON text), else
    from WORKER_OPTIONS; a bad value is the job's error (metadata) or the worker's (at start)."""
    rt = _runtime(default_model="gs://mdl/m/", default_output="gs://res/out/", default_options='{"key_field": "id"}')
    job = rt.job_for_object(_obj("f.jsonl"))
    assert job is not None and (job.options.key_field, job.options.output_format) == ("id", "results")
    job = rt.job_for_object(_obj("f.jsonl", options='{"output_format": "predictions"}'))
    assert job is not None and (job.options.key_field, job.options.output_format) == (None, "predictions")
    with pytest.raises(errors.InvalidJob, match=r"`options` metadata of gs://drop/f.jsonl is not valid JSON"):
        rt.job_for_object(_obj("f.jsonl", options="key_field=id"))
    with pytest.raises(errors.InvalidJob, match="unknown option"):
        rt.job_for_object(_obj("f.jsonl", options='{"batch": 5}'))

    assert Settings.from_env({"WORKER_OPTIONS": ' {"batch_size": 8} '}).default_options == '{"batch_size": 8}'
    with pytest.raises(ValueError, match=r"^WORKER_OPTIONS: option batch_size must be an integer"):
        Settings.from_env({"WORKER_OPTIONS": '{"batch_size": "8"}'})
    with pytest.raises(ValueError, match="WORKER_OPTIONS must be a JSON object"):
        Settings.from_env({"WORKER_OPTIONS": "[1]"})
