"""Bad jobs and bad lines, through the real chain (Pub/Sub emulator push → functions-framework):
a bad job ends as one FAILED completion saying what to fix, and is acknowledged (never
redelivered); a bad line becomes one error line while its neighbours are predicted."""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest

from localdev import models
from tests.conftest import read_lines, write_lines
from tests.outputs import assert_same_predictions

pytestmark = pytest.mark.integration


def _by_job(done: list[tuple[dict[str, Any], dict[str, str]]]) -> dict[str, tuple[dict[str, Any], dict[str, str]]]:
    return {attrs["job_id"]: (data, attrs) for data, attrs in done}


def test_bad_jobs_fail_with_actionable_messages(worker_service, storage_client, bucket, model_uris):
    _, _, topo = worker_service
    write_lines(storage_client, f"gs://{bucket}/in/ok.jsonl", [json.dumps(models.mlp_instances(1)[0])])
    # A model folder without saved_model.pb (only variables).
    storage_client.bucket(bucket).blob("nomodel/variables/variables.index").upload_from_string(b"x")
    good = {"model": model_uris["mlp"], "input": f"gs://{bucket}/in/ok.jsonl", "output": f"gs://{bucket}/out/"}
    # A gzip file cut short (its upload interrupted), beside a good file.
    storage_client.bucket(bucket).blob("gz/a.jsonl").upload_from_string(b"[1]\n")
    storage_client.bucket(bucket).blob("gz/b.jsonl.gz").upload_from_string(gzip.compress(b"[1]\n" * 99)[:-12])

    malformed_id = topo.publish_job(b'{"model": "gs://b/m", "input": ')
    cases = {
        "unknown-option": {**good, "options": {"batch_sise": 3}},
        "http-uri": {**good, "input": "http://example.com/in.jsonl"},
        "missing-model": {**good, "model": f"gs://{bucket}/no-such-model/"},
        "no-saved-model": {**good, "model": f"gs://{bucket}/nomodel/"},
        "no-input": {**good, "input": f"gs://{bucket}/nothing-here/"},
        "missing-input-object": {**good, "input": f"gs://{bucket}/in/ok.json"},
        "missing-field": {"model": good["model"], "input": good["input"]},
        # A bucket name with a typo, in each of the three URIs (an object and a prefix for input).
        "no-model-bucket": {**good, "model": f"gs://{bucket}-gone/mlp/"},
        "no-input-bucket": {**good, "input": f"gs://{bucket}-gone/in/ok.jsonl"},
        "no-input-bucket-prefix": {**good, "input": f"gs://{bucket}-gone/in/"},
        "no-output-bucket": {**good, "output": f"gs://{bucket}-gone/out/"},
        "gzip-file": {**good, "input": f"gs://{bucket}/gz/", "output": f"gs://{bucket}/gz-out/"},
    }
    for job_id, job in cases.items():
        topo.publish_job({**job, "job_id": job_id})

    done = _by_job(topo.completions(len(cases) + 1))
    assert set(done) == {*cases, malformed_id}
    assert all(attrs["status"] == "FAILED" for _, attrs in done.values())
    errors = {job_id: data["error"] for job_id, (data, _) in done.items()}

    assert errors[malformed_id]["code"] == "INVALID_ARGUMENT"
    assert errors[malformed_id]["message"].startswith(f"job message {malformed_id} is not valid JSON")
    assert errors["unknown-option"] == {
        "code": "INVALID_ARGUMENT",
        "message": "unknown option(s) 'batch_sise'; supported options are: batch_size, excluded_fields, "
        "included_fields, input_format, instance_type, key_field, max_error_ratio, output_format, parts, "
        "signature_name",
    }
    assert errors["http-uri"] == {
        "code": "INVALID_ARGUMENT",
        "message": 'input "http://example.com/in.jsonl" is not a gs:// URI — write it as gs://BUCKET/PATH '
        "(only Cloud Storage locations are supported)",
    }
    assert errors["missing-model"] == {
        "code": "NOT_FOUND",
        "message": f"model gs://{bucket}/no-such-model/ does not exist: no object under "
        f"gs://{bucket}/no-such-model/ — check the path",
    }
    assert errors["no-saved-model"] == {
        "code": "FAILED_PRECONDITION",
        "message": f"model gs://{bucket}/nomodel/ has no saved_model.pb — point `model` at the version folder "
        "that holds saved_model.pb and variables/, or at its parent holding numeric version folders",
    }
    assert errors["no-input"] == {
        "code": "NOT_FOUND",
        "message": f"input gs://{bucket}/nothing-here/ matches no object — check the prefix and that files "
        "were uploaded",
    }
    assert errors["gzip-file"] == {
        "code": "INVALID_ARGUMENT",
        "message": f"input gs://{bucket}/gz/b.jsonl.gz is gzip-compressed but ends before its compressed data "
        "does — upload it again",
    }
    assert storage_client.bucket(bucket).get_blob("gz-out/b.jsonl.gz") is None
    assert errors["missing-input-object"]["code"] == "NOT_FOUND"
    assert errors["missing-input-object"]["message"].startswith(f"input gs://{bucket}/in/ok.json does not exist")
    assert errors["missing-field"] == {
        "code": "INVALID_ARGUMENT",
        "message": "job is missing output: a job needs model, input and output gs:// URIs",
    }
    gone = f"bucket {bucket}-gone does not exist — check the bucket name in the URI"
    assert errors["no-model-bucket"] == {
        "code": "NOT_FOUND",
        "message": f"reading model gs://{bucket}-gone/mlp/: {gone}",
    }
    for job_id, uri in (("no-input-bucket", "in/ok.jsonl"), ("no-input-bucket-prefix", "in/")):
        assert errors[job_id] == {"code": "NOT_FOUND", "message": f"reading input gs://{bucket}-gone/{uri}: {gone}"}
    assert errors["no-output-bucket"] == {
        "code": "NOT_FOUND",
        "message": f"cannot write to output gs://{bucket}-gone/out/: writing "
        f"gs://{bucket}-gone/out/_manifest.json.lease: {gone}",
    }
    # Acknowledged, so nothing is redelivered and reported twice.
    assert topo.no_more_completions() == []


def test_bad_lines_become_error_lines(worker_service, storage_client, bucket, model_uris, model_dirs, reference):
    _, _, topo = worker_service
    good = models.mlp_instances(10)
    lines = [json.dumps(i) for i in good]
    lines.insert(3, '{"not json"')  # malformed
    lines.insert(6, json.dumps([1.0, 2.0, 3.0]))  # wrong shape
    lines.insert(8, "")  # blank: skipped
    lines.append(r'["\ud800", 1]')  # half of a surrogate pair: json reads it, but it is not text
    write_lines(storage_client, f"gs://{bucket}/in.jsonl", lines)
    topo.publish_job(
        {
            "model": model_uris["mlp"],
            "input": f"gs://{bucket}/in.jsonl",
            "output": f"gs://{bucket}/out/",
            "job_id": "bad-lines",
        }
    )
    [(manifest, attrs)] = topo.completions(1)
    assert attrs == {"job_id": "bad-lines", "status": "PARTIALLY_SUCCEEDED"}
    assert manifest["totals"] == {"lines": 14, "instances": 13, "predictions": 10, "errors": 3, "skipped": 1}
    first = {"line": 4, "message": "line 4 is not valid JSON: Expecting ':' delimiter: line 1 column 12 (char 11)"}
    assert manifest["files"][0]["first_error"] == first
    assert manifest["first_error"] == {"input": f"gs://{bucket}/in.jsonl", **first}

    out = read_lines(storage_client, f"gs://{bucket}/out/in.jsonl")
    assert len(out) == 13
    assert out[3] == {
        "instance": '{"not json"',
        "error": {
            "status": "INVALID_ARGUMENT",
            "message": "line 4 is not valid JSON: Expecting ':' delimiter: line 1 column 12 (char 11)",
        },
    }
    assert out[6] == {
        "instance": [1.0, 2.0, 3.0],
        "error": {"status": "INVALID_ARGUMENT", "message": "input 'x' expects instances of shape [16], got [3]"},
    }
    assert out[12] == {
        "instance": r'["\ud800", 1]',
        "error": {
            "status": "INVALID_ARGUMENT",
            "message": r"line 14 is not valid JSON: a string holds \ud800, half of a UTF-16 surrogate pair without "
            "the other half",
        },
    }
    predicted = [line for line in out if "prediction" in line]
    assert [line["instance"] for line in predicted] == good
    want = reference(model_dirs["mlp"], good)
    assert_same_predictions([line["prediction"] for line in predicted], want)


def test_a_100_kib_line(worker_service, storage_client, bucket, model_uris):
    _, _, topo = worker_service
    long_text = "é" * (50 * 1024)  # 100 KiB of UTF-8 in one JSON string
    write_lines(storage_client, f"gs://{bucket}/long.jsonl", [json.dumps("short"), json.dumps(long_text)])
    topo.publish_job(
        {"model": model_uris["strings"], "input": f"gs://{bucket}/long.jsonl", "output": f"gs://{bucket}/o/"}
    )
    [(manifest, attrs)] = topo.completions(1)
    assert attrs["status"] == "SUCCEEDED", manifest
    out = read_lines(storage_client, f"gs://{bucket}/o/long.jsonl")
    assert [line["prediction"]["length"] for line in out] == [5, len(long_text.encode())]
    assert out[1]["instance"] == long_text
