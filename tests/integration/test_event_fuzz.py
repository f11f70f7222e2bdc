"""Property-based: whatever arrives — malformed CloudEvents, Pub/Sub messages with odd data or
attributes, job JSON of the wrong shape, storage events for missing objects — the worker served
by functions-framework answers 2xx (reporting FAILED when it was meant as a job) or a clean 4xx
from the framework for a non-CloudEvent. Never a 5xx: that would be redelivered for a day."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from localdev import emulators
from tests.conftest import PubSubTopology, create_topology

pytestmark = pytest.mark.integration

PUBSUB = "google.cloud.pubsub.topic.v1.messagePublished"
FINALIZED = "google.cloud.storage.object.v1.finalized"

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
json_value = st.recursive(
    json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
)
uris = st.one_of(
    st.builds(lambda b, p: f"gs://{b}/{p}", st.sampled_from(["fuzz-missing", "Bad_Bucket", "", "a"]), st.text()),
    st.sampled_from(["s3://x/y", "gs://", "gs:///x", "gs://fuzz-missing//x", "/local/path"]),
    json_value,
)
options = st.one_of(
    st.dictionaries(
        st.sampled_from(["batch_size", "signature_name", "key_field", "instance_type", "output_format", "nope"]),
        json_value,
        max_size=3,
    ),
    json_value,
)
jobs = st.fixed_dictionaries(
    {},
    optional={
        "model": uris,
        "input": uris,
        "output": uris,
        "job_id": st.one_of(st.text(max_size=12), json_value),
        "options": options,
        "extra": json_value,
    },
)
text_maps = st.dictionaries(st.text(max_size=12), st.text(max_size=30), max_size=4)
attributes = st.one_of(
    text_maps,
    st.fixed_dictionaries(
        {"eventType": st.sampled_from(["OBJECT_FINALIZE", "OBJECT_DELETE", "x"])},
        optional={"bucketId": st.text(max_size=10), "objectId": st.text(max_size=20), "objectGeneration": st.text()},
    ),
    st.fixed_dictionaries({}, optional={"model": st.text(), "input": st.text(), "output": st.text()}),
)
payloads = st.one_of(
    jobs.map(lambda j: json.dumps(j).encode()),
    st.binary(max_size=40),
    json_value.map(lambda v: json.dumps(v).encode()),
)
messages = st.fixed_dictionaries(
    {},
    optional={
        "data": st.one_of(payloads.map(lambda b: base64.b64encode(b).decode()), st.text(max_size=20), json_value),
        "attributes": st.one_of(attributes, json_value),
        "messageId": st.one_of(st.text(max_size=10), json_value),
    },
)
objects = st.fixed_dictionaries(
    {},
    optional={
        "bucket": st.one_of(st.sampled_from(["fuzz-missing", ""]), json_value),
        "name": st.one_of(st.sampled_from(["in/a.jsonl", "x.job.json", "dir/", ""]), st.text(max_size=20)),
        "generation": st.one_of(st.text(max_size=5), st.integers()),
        "metadata": st.one_of(
            st.fixed_dictionaries({}, optional={"model": uris, "output": uris}),
            json_value,
        ),
    },
)
events = st.one_of(
    st.tuples(st.just(PUBSUB), st.one_of(st.fixed_dictionaries({"message": messages}), json_value)),
    st.tuples(st.just(FINALIZED), st.one_of(objects, json_value)),
    st.tuples(st.sampled_from(["google.cloud.storage.object.v1.deleted", "com.example.other"]), json_value),
)


@pytest.fixture(scope="module")
def fuzz_worker(gcs_host: str, pubsub_host: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    topology = create_topology()
    service, url = emulators.start_worker(
        {
            "STORAGE_EMULATOR_HOST": gcs_host,
            "PUBSUB_EMULATOR_HOST": pubsub_host,
            "GOOGLE_CLOUD_PROJECT": topology.project,
            "WORKER_RESULTS_TOPIC": topology.results_topic,
            "WORKER_WORK_DIR": str(tmp_path_factory.mktemp("fuzz")),
        }
    )
    try:
        yield url, topology
    finally:
        service.stop()


def _send(url: str, ce_type: str, data: Any, binary: bool) -> requests.Response:
    event_id = uuid.uuid4().hex
    source = "//pubsub.googleapis.com/projects/p/topics/t"
    if binary:
        headers = {
            "ce-specversion": "1.0",
            "ce-id": event_id,
            "ce-type": ce_type,
            "ce-source": source,
            "content-type": "application/json",
        }
        return requests.post(url + "/", headers=headers, data=json.dumps(data), timeout=60)
    body = {"specversion": "1.0", "id": event_id, "type": ce_type, "source": source, "data": data}
    return requests.post(
        url + "/", headers={"content-type": "application/cloudevents+json"}, data=json.dumps(body), timeout=60
    )


def test_failure_reports_say_what_went_wrong(fuzz_worker: tuple[str, PubSubTopology]) -> None:
    # Runs first: the property test below fills the results topic with reports.
    url, topology = fuzz_worker
    message = {"data": base64.b64encode(b'{"model": "gs://fuzz-missing/m", "input": 3}').decode(), "messageId": "m-1"}
    assert _send(url, PUBSUB, {"message": message}, binary=True).status_code == 200
    [(report, attrs)] = topology.completions(1)
    assert attrs == {"job_id": "m-1", "status": "FAILED"}
    assert report["error"]["code"] == "INVALID_ARGUMENT"
    assert "job is missing output" in report["error"]["message"]


def test_background_events_are_read_and_other_requests_refused(fuzz_worker: tuple[str, PubSubTopology]) -> None:
    # Also before the property test. A legacy (1st gen) storage event, as functions-framework
    # converts it: an input file with neither model metadata nor WORKER_MODEL.
    url, topology = fuzz_worker
    legacy = {
        "context": {
            "eventId": "evt-1",
            "timestamp": "2026-12-02T00:00:00.000Z",
            "eventType": "google.storage.object.finalize",
            "resource": {"service": "storage.googleapis.com", "name": "projects/_/buckets/fuzz-b/objects/in/x.jsonl"},
        },
        "data": {"bucket": "fuzz-b", "name": "in/x.jsonl", "generation": "9", "metageneration": "1"},
    }
    assert requests.post(url + "/", json=legacy, timeout=60).status_code == 200
    [(report, attrs)] = topology.completions(1)
    assert attrs == {"job_id": "fuzz-b/in/x.jsonl#9", "status": "FAILED"}
    assert "has no `model`/`output` custom metadata" in report["error"]["message"]
    for body in ({"hello": "world"}, [1, 2], "not json"):
        r = requests.post(url + "/", data=json.dumps(body) if body != "not json" else body, timeout=60)
        assert r.status_code == 400 and "not an event" in r.json()["error"]["message"]
    assert requests.get(url + "/", timeout=60).status_code == 400


def _deep(depth: int) -> bytes:
    return b'{"model": ' * depth + b"1" + b"}" * depth


# Jobs without a job_id of their own (or with one too long to be used): reported under the
# message id, so each report is known for the message's.
jobs_of_messages = jobs.map(lambda j: {k: v for k, v in j.items() if k != "job_id"})
# Message data Pub/Sub delivers as it was published: anything at all.
hostile_data = st.one_of(
    st.binary(max_size=60),
    st.integers(1000, 1200).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1000, 1200).map(_deep),
    jobs_of_messages.map(lambda j: json.dumps(j).encode()).flatmap(
        lambda b: st.integers(0, len(b)).map(lambda k: b[:k])
    ),
    st.builds(
        lambda job, n, ch: json.dumps({**job, "job_id": ch * n}).encode(),
        jobs_of_messages,
        st.integers(1025, 3000),  # characters: over 1,024 bytes
        st.sampled_from(["x", "é", "\u20ac"]),
    ),
    st.binary(min_size=2, max_size=40).map(lambda b: b"\xff\xfe" + b),  # UTF-16 BOM, odd bytes after it
)
hostile_attributes = st.one_of(
    st.dictionaries(
        st.sampled_from(["model", "input", "output", "options", "other"]),
        st.one_of(st.text(max_size=20), st.integers(1020, 1500).map(lambda n: "a" * n)),
        max_size=3,
    ),
    st.integers(1025, 5000).map(lambda n: {"job_id": "j" * n}),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=hostile_data, attrs=hostile_attributes)
def test_every_deliverable_message_gets_one_failed_completion_within_pubsub_s_limits(
    fuzz_worker: tuple[str, PubSubTopology], data: bytes, attrs: dict[str, str]
) -> None:
    """A push of any message data and attributes (no `eventType`: a job message, however broken)
    is acknowledged with exactly one FAILED completion, under an id real Pub/Sub takes. (Before the
    property test below, which leaves reports on the results topic.)"""
    url, topology = fuzz_worker
    message_id = uuid.uuid4().hex
    message = {"data": base64.b64encode(data).decode(), "attributes": attrs, "messageId": message_id}
    r = requests.post(url + "/", json={"message": message, "subscription": "projects/p/subscriptions/s"}, timeout=60)
    assert r.status_code == 200, (r.status_code, r.text[:500])
    done = topology.completions(1, timeout_s=30)
    assert len(done) == 1
    [(report, report_attrs)] = done
    assert report_attrs["status"] == "FAILED", report
    assert all(len(v.encode()) <= 1024 for v in report_attrs.values()) and len(report_attrs) <= 100
    assert len(json.dumps(report).encode()) < 10_000_000
    # This message's report, not a second report of an earlier one.
    assert report_attrs["job_id"] == report["job_id"] == message_id, (report_attrs, report)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ce=events, binary=st.booleans())
def test_no_event_gets_a_5xx(fuzz_worker: tuple[str, PubSubTopology], ce: tuple[str, Any], binary: bool) -> None:
    url, _ = fuzz_worker
    ce_type, data = ce
    r = _send(url, ce_type, data, binary)
    event(f"HTTP {r.status_code}")  # shown by --hypothesis-show-statistics
    assert r.status_code < 500, (r.status_code, r.text[:500])
