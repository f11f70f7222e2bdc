"""Hostile and odd input through the served worker (functions-framework, Pub/Sub emulator pushes,
fake-gcs-server): whatever Pub/Sub or Eventarc can deliver is acknowledged with one FAILED
completion that fits Pub/Sub's limits, never answered 5xx (a redelivery for a day); no object name
makes the worker write outside its folders."""

from __future__ import annotations

import gzip
import json
import re
import time
import uuid
from typing import Any

import pytest
import requests

from localdev import models
from tests.conftest import PROJECT, storage_event_headers, write_lines

pytestmark = pytest.mark.integration


def fits_pubsub(data: dict[str, Any], attributes: dict[str, str]) -> bool:
    """What real Pub/Sub would take (the emulator takes more): attribute values of at most 1,024
    bytes, keys of at most 256, 100 attributes, data under 10 MB."""
    encoded = json.dumps(data).encode()
    keys_ok = all(0 < len(k.encode()) <= 256 for k in attributes)
    return (
        len(attributes) <= 100
        and keys_ok
        and all(len(v.encode()) <= 1024 for v in attributes.values())
        and (len(encoded) < 10_000_000)
    )


def test_data_nested_too_deep_is_one_failed_completion_not_a_redelivery(worker_service, storage_client, bucket):
    """1,100 nested arrays (2.2 kB), as the message's data or inside a job's options: the data
    that made the door answer 500 forever. Each is reported once, FAILED, and acknowledged."""
    _, _, topo = worker_service
    deep_data = topo.publish_job(b"[" * 1100 + b"]" * 1100)
    job = {"model": "gs://fuzz-missing/m/", "input": f"gs://{bucket}/in/", "output": f"gs://{bucket}/out/"}
    text = json.dumps({**job, "options": {"batch_size": "DEEP"}}).replace('"DEEP"', "[" * 1100 + "]" * 1100)
    deep_options = topo.publish_job(text.encode())
    done = {attrs["job_id"]: (data, attrs) for data, attrs in topo.completions(2)}
    assert set(done) == {deep_data, deep_options}
    for data, attrs in done.values():
        assert attrs["status"] == "FAILED" and data["error"]["code"] == "INVALID_ARGUMENT"
        assert re.search(r"nest 110\d levels deep, more than the 1024 read", data["error"]["message"]), data
        assert fits_pubsub(data, attrs)
    assert topo.no_more_completions() == []  # acknowledged: no redelivery reports it again


def test_a_job_id_over_1024_bytes_is_refused_and_reported_under_the_message_id(worker_service, bucket):
    _, _, topo = worker_service
    job = {"model": "gs://fuzz-missing/m/", "input": f"gs://{bucket}/in/", "output": f"gs://{bucket}/out/"}
    ids = {topo.publish_job({**job, "job_id": "j" * n}): n for n in (1025, 2000, 2**20)}
    done = topo.completions(3)
    assert sorted(attrs["job_id"] for _, attrs in done) == sorted(ids)
    for data, attrs in done:
        n = ids[attrs["job_id"]]
        assert attrs["status"] == "FAILED" and fits_pubsub(data, attrs)
        assert data["error"]["message"].endswith(
            f"is {n} bytes of UTF-8, more than the 1024 a Pub/Sub attribute holds (the completion message carries "
            "it as one) — use a shorter job_id"
        )
        assert len(data["error"]["message"]) < 500  # the id is quoted cut short
    assert topo.no_more_completions() == []


def test_a_push_without_the_wrapper_whose_data_is_not_utf8_is_one_failed_completion(
    worker_service, storage_client, bucket
):
    """A subscription with --push-no-wrapper delivers the data as the body: gzip'd bytes here.
    Through the emulator's own push, and as Pub/Sub sends it (the emulator re-encodes the body)."""
    from google.cloud import pubsub_v1

    _, url, topo = worker_service
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    suffix = uuid.uuid4().hex[:8]
    topic = publisher.topic_path(PROJECT, f"raw-{suffix}")
    publisher.create_topic(name=topic)
    subscription = subscriber.subscription_path(PROJECT, f"raw-push-{suffix}")
    subscriber.create_subscription(
        request={
            "name": subscription,
            "topic": topic,
            "push_config": {"push_endpoint": url + "/", "no_wrapper": {"write_metadata": True}},
            "ack_deadline_seconds": 600,
        }
    )
    data = gzip.compress(json.dumps({"model": "gs://m/m/"}).encode())
    try:
        pushed = publisher.publish(topic, data).result(timeout=30)
        [(report, attrs)] = topo.completions(1)
    finally:
        subscriber.delete_subscription(subscription=subscription)
    assert attrs == {"job_id": pushed, "status": "FAILED"}
    assert report["error"]["code"] == "INVALID_ARGUMENT" and "is not valid JSON" in report["error"]["message"]

    headers = {
        "x-goog-pubsub-message-id": "raw-2",
        "x-goog-pubsub-subscription-name": subscription,
        "x-goog-pubsub-publish-time": "2026-12-07T00:00:00.000Z",
        "content-type": "application/json",  # what a publisher may have meant; the bytes are gzip
    }
    r = requests.post(url + "/", headers=headers, data=data, timeout=60)
    assert r.status_code == 200, r.text
    [(report, attrs)] = topo.completions(1)
    assert attrs == {"job_id": "raw-2", "status": "FAILED"} and "is not valid JSON" in report["error"]["message"]
    assert topo.no_more_completions() == []


@pytest.mark.parametrize(
    "headers",
    [
        {"content-type": "application/cloudevents+json"},
        {"ce-specversion": "1.0", "ce-id": "x", "ce-type": "t", "ce-source": "s", "content-type": "application/json"},
    ],
    ids=["structured", "binary"],
)
def test_a_cloud_event_that_is_not_utf8_or_nests_too_deep_is_refused_with_400(worker_service, headers):
    """No platform sends these: a request error, not a failure to report or a retry."""
    _, url, _ = worker_service
    for body in (b"\xff\xfe\x1f\x8b" * 10, b"[" * 1100 + b"]" * 1100):
        r = requests.post(url + "/", headers=headers, data=body, timeout=60)
        if "ce-specversion" in headers and body.startswith(b"\xff"):
            # Binary mode: the body is the event's data, as bytes, of a type the worker ignores.
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "INVALID_ARGUMENT"


def test_a_dropped_file_whose_name_is_near_1024_bytes_completes_under_a_shortened_id(
    worker_service, storage_client, model_uris
):
    """`bucket/name#generation` is over 1,024 bytes: the job id is its beginning and a hash, the
    same on every delivery; the manifest names the file in full. (The name leaves room for its
    manifest's, `out/_manifests/<name>.json.lease`, within Cloud Storage's 1,024 bytes.)"""
    _, url, topo = worker_service
    bucket = f"hostile-{uuid.uuid4().hex}{uuid.uuid4().hex}"[:63]  # the longest name without dots
    storage_client.create_bucket(bucket)
    name = "in/" + "n" * (990 - len("in/.jsonl")) + ".jsonl"
    assert len(f"{bucket}/{name}#1".encode()) > 1024
    blob = storage_client.bucket(bucket).blob(name)
    blob.metadata = {"model": model_uris["mlp"], "output": f"gs://{bucket}/out/"}
    blob.upload_from_string("".join(json.dumps(i) + "\n" for i in models.mlp_instances(3)))
    resource = {k: str(v) for k, v in blob._properties.items() if k in ("bucket", "name", "generation", "size")}
    body = json.dumps({**resource, "metadata": blob.metadata})
    for event_id in ("long-1", "long-2"):  # delivered twice: one job
        headers = storage_event_headers(bucket, name, event_id=event_id, time=blob._properties["timeCreated"])
        r = requests.post(url + "/", headers=headers, data=body, timeout=120)
        assert r.status_code == 200, r.text
    [(manifest, attrs)] = topo.completions(1)
    assert attrs["status"] == "SUCCEEDED" and fits_pubsub(manifest, attrs)
    assert len(attrs["job_id"].encode()) == 1024 and attrs["job_id"].startswith(f"{bucket}/in/nnn")
    assert manifest["job_id"] == attrs["job_id"] and manifest["input"] == f"gs://{bucket}/{name}"
    assert topo.no_more_completions() == []


def test_a_model_object_naming_its_folder_fails_the_job_with_a_manifest(
    worker_service, storage_client, bucket, model_dirs
):
    """`<model>/1/variables/..` resolves to the version folder itself: refused by name, the job
    FAILED with its manifest written, nothing downloaded outside the work folder."""
    _, _, topo = worker_service
    models.upload_folder(storage_client, model_dirs["mlp"], bucket, "m/1")
    storage_client.bucket(bucket).blob("m/1/variables/..").upload_from_string(b"x")
    write_lines(storage_client, f"gs://{bucket}/in/a.jsonl", [json.dumps(models.mlp_instances(1)[0])])
    job_id = topo.publish_job(
        {"model": f"gs://{bucket}/m/", "input": f"gs://{bucket}/in/", "output": f"gs://{bucket}/out/"}
    )
    [(manifest, attrs)] = topo.completions(1)
    assert attrs == {"job_id": job_id, "status": "FAILED"}
    assert manifest["error"] == {
        "code": "FAILED_PRECONDITION",
        "message": "model object name \"variables/..\" is not a plain path in the model folder (it has a '.', '..' "
        "or empty segment, or a backslash): refusing to download it — rename or delete that object",
    }
    stored = json.loads(storage_client.bucket(bucket).blob("out/_manifest.json").download_as_bytes())
    assert stored["status"] == "FAILED" and stored["job_id"] == job_id


def test_an_input_name_that_would_mirror_outside_the_output_fails_the_job_naming_it(
    worker_service, storage_client, bucket, model_uris
):
    """`in/../../esc.jsonl` under the prefix `in/`: mirrored, its output would be `out/../../esc.jsonl`,
    which a copy of the outputs to disk writes outside the output folder. The job fails naming the
    object before anything is predicted or written."""
    _, _, topo = worker_service
    write_lines(storage_client, f"gs://{bucket}/in/ok.jsonl", [json.dumps(models.mlp_instances(1)[0])])
    write_lines(storage_client, f"gs://{bucket}/in/../../esc.jsonl", [json.dumps(models.mlp_instances(1)[0])])
    job_id = topo.publish_job(
        {"model": model_uris["mlp"], "input": f"gs://{bucket}/in/", "output": f"gs://{bucket}/out/"}
    )
    [(manifest, attrs)] = topo.completions(1)
    assert attrs == {"job_id": job_id, "status": "FAILED"}
    assert manifest["error"] == {
        "code": "INVALID_ARGUMENT",
        "message": f"input gs://{bucket}/in/../../esc.jsonl would be mirrored as gs://{bucket}/out/../../esc.jsonl, "
        "whose name below the output has a '.', '..' or empty segment — rename that object (or move it out of the "
        "input)",
    }
    # The job's lease is released just after its completion is published: give it a moment.
    deadline = time.monotonic() + 10
    while (written := [b.name for b in storage_client.list_blobs(bucket, prefix="out/")]) != ["out/_manifest.json"]:
        assert time.monotonic() < deadline, written
        time.sleep(0.1)


def test_a_storage_event_with_a_huge_event_id_is_reported_within_pubsub_s_limits(worker_service, bucket):
    """A hand-made event whose id is 6 kB and whose object has no model: the FAILED report's job id
    is the object's, and every attribute fits."""
    _, url, topo = worker_service
    headers = storage_event_headers(bucket, "x" * 1100, event_id="e" * 6000, time="2026-12-07T00:00:00Z")
    body = json.dumps({"bucket": bucket, "name": "x" * 1100, "generation": "5"})
    r = requests.post(url + "/", headers=headers, data=body, timeout=60)
    assert r.status_code == 200, r.text
    [(report, attrs)] = topo.completions(1)
    assert attrs["status"] == "FAILED" and fits_pubsub(report, attrs) and len(attrs["job_id"].encode()) == 1024
