"""Event payloads in the shapes Google Cloud sends them → triggers."""

from __future__ import annotations

import base64
import json

import pytest

from worker import errors, events

JOB = {"model": "gs://mdl/m/", "input": "gs://bkt/in/", "output": "gs://bkt/out/"}


def _pubsub(data: bytes | None, attributes: dict[str, str] | None = None, message_id: str = "42") -> dict:
    message = {"attributes": attributes or {}, "messageId": message_id, "publishTime": "2026-11-23T00:00:00Z"}
    if data is not None:
        message["data"] = base64.b64encode(data).decode()
    return {"message": message, "subscription": "projects/p/subscriptions/s"}


CE_PUBSUB = {"type": events.PUBSUB_PUBLISHED, "id": "42", "source": "//pubsub.googleapis.com/projects/p/topics/jobs"}


def test_job_message_in_data():
    trigger = events.from_cloud_event(CE_PUBSUB, _pubsub(json.dumps(JOB).encode()))
    assert isinstance(trigger, events.JobTrigger)
    assert trigger.job.job_id == "42"
    assert str(trigger.job.output) == "gs://bkt/out/"


def test_job_message_in_attributes_with_options_as_json_text():
    attrs = {**JOB, "job_id": "mine", "options": '{"batch_size": 5}'}
    trigger = events.from_cloud_event(CE_PUBSUB, _pubsub(None, attrs))
    assert isinstance(trigger, events.JobTrigger)
    assert (trigger.job.job_id, trigger.job.options.batch_size) == ("mine", 5)


def test_eventarc_storage_finalized_with_string_generation():
    resource = {"bucket": "bkt", "name": "in/a.jsonl", "generation": "1700000000000001", "size": "12",
                "metageneration": "1", "metadata": {"model": "gs://mdl/m/"}}  # fmt: skip
    ce = {"type": events.STORAGE_FINALIZED, "id": "e1", "source": "//storage.googleapis.com/projects/_/buckets/bkt"}
    trigger = events.from_cloud_event(ce, resource)
    assert trigger == events.ObjectTrigger("bkt", "in/a.jsonl", "1700000000000001", {"model": "gs://mdl/m/"})
    assert trigger.job_id == "bkt/in/a.jsonl#1700000000000001"


def test_bucket_notification_over_pubsub():
    attrs = {"eventType": "OBJECT_FINALIZE", "bucketId": "bkt", "objectId": "in/a.jsonl",
             "objectGeneration": "7", "payloadFormat": "JSON_API_V1"}  # fmt: skip
    body = json.dumps({"bucket": "bkt", "name": "in/a.jsonl", "generation": "7"}).encode()
    trigger = events.from_cloud_event(CE_PUBSUB, _pubsub(body, attrs))
    assert trigger == events.ObjectTrigger("bkt", "in/a.jsonl", "7", {})
    deleted = events.from_cloud_event(CE_PUBSUB, _pubsub(body, {**attrs, "eventType": "OBJECT_DELETE"}))
    assert isinstance(deleted, events.Ignored)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "job message is empty"),
        (b"[1, 2]", "must be a JSON object"),
        (b"{bad", "is not valid JSON"),
        (json.dumps({**JOB, "extra": 1}).encode(), "unknown job field(s) 'extra'"),
        (json.dumps({**JOB, "job_id": "a\ud800"}).encode(), "not valid JSON (a string holds \\\\ud800, half of a"),
    ],
)
def test_malformed_job_messages(data, message):
    with pytest.raises(errors.InvalidJob, match=message.replace("(", r"\(").replace(")", r"\)")):
        events.from_cloud_event(CE_PUBSUB, _pubsub(data))


def test_job_id_hint_prefers_the_messages_own_job_id():
    data = _pubsub(json.dumps({"job_id": "mine", "input": 3}).encode())
    assert events.job_id_hint(CE_PUBSUB, data) == "mine"
    assert events.job_id_hint(CE_PUBSUB, _pubsub(b"{bad")) == "42"


def test_a_hand_made_request_with_half_a_surrogate_pair_is_refused_and_reported_under_the_message_id():
    """Pub/Sub takes UTF-8 alone, but a request posted by hand may carry `"\\udc00"` in an attribute."""
    for key in ("job_id", "input"):
        attrs = {**JOB, key: JOB.get(key, "") + "\udc00"}
        with pytest.raises(errors.InvalidJob, match=rf"^{key} \S+ holds half of a UTF-16 surrogate pair"):
            events.from_cloud_event(CE_PUBSUB, _pubsub(None, attrs))
    assert events.job_id_hint(CE_PUBSUB, _pubsub(None, {"job_id": "\udc00"})) == "42"
    assert events.job_id_hint(CE_PUBSUB, _pubsub(rb'{"job_id": "\udc00"}')) == "42"


def test_http_query():
    job = events.from_query(JOB, default_job_id="http-1")
    assert job.job_id == "http-1"
    with pytest.raises(errors.InvalidJob, match="unknown query parameter"):
        events.from_query({**JOB, "modle": "x"}, default_job_id="h")


def test_a_push_body_is_the_event_eventarc_would_deliver_with_or_without_data():
    for data in (json.dumps(JOB).encode(), None):
        body = _pubsub(data, dict(JOB) if data is None else None, message_id="77")
        attributes, event_data = events.from_push_body(body)
        assert (attributes["type"], attributes["id"]) == (events.PUBSUB_PUBLISHED, "77")
        assert attributes["source"] == "//pubsub.googleapis.com/projects/p/subscriptions/s"
        trigger = events.from_cloud_event(attributes, event_data)
        assert isinstance(trigger, events.JobTrigger) and trigger.job.job_id == "77"
        assert str(trigger.job.input) == JOB["input"]
    # A bucket notification with payload format NONE: attributes only.
    notification = _pubsub(None, {"eventType": "OBJECT_FINALIZE", "bucketId": "bkt", "objectId": "in/a.jsonl",
                                  "objectGeneration": "5", "payloadFormat": "NONE"})  # fmt: skip
    trigger = events.from_cloud_event(*events.from_push_body(notification))
    assert isinstance(trigger, events.ObjectTrigger) and trigger.job_id == "bkt/in/a.jsonl#5"


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "x",
        {"message": "m", "subscription": "s"},
        {"message": {}},
        {"context": {}, "message": {}, "subscription": "s"},
    ],
)
def test_other_bodies_are_not_push_bodies(body):
    assert events.from_push_body(body) is None


def test_an_unwrapped_push_with_its_metadata_is_the_same_event():
    """Payload unwrapping with "write metadata": the body is the data; the message id, the
    subscription and each attribute are headers (any case, as proxies may change it)."""
    meta = {"X-Goog-Pubsub-Message-Id": "88", "x-goog-pubsub-subscription-name": "projects/p/subscriptions/s",
            "x-goog-pubsub-publish-time": "2026-11-23T00:00:00Z", "Content-Type": "application/json"}  # fmt: skip
    attributes, data = events.from_unwrapped_push(meta, json.dumps(JOB).encode())
    assert (attributes, data) == events.from_push_body(_pubsub(json.dumps(JOB).encode(), message_id="88"))
    trigger = events.from_cloud_event(attributes, data)
    assert isinstance(trigger, events.JobTrigger) and trigger.job.job_id == "88"
    # A job as attributes alone, and a bucket notification (payload format NONE): headers only.
    trigger = events.from_cloud_event(*events.from_unwrapped_push({**meta, **JOB, "Options": '{"batch_size": 2}'}, b""))
    assert isinstance(trigger, events.JobTrigger) and trigger.job.options.batch_size == 2
    notification = {
        "eventtype": "OBJECT_FINALIZE",
        "bucketid": "bkt",
        "objectid": "in/a.jsonl",
        "objectgeneration": "5",
    }
    trigger = events.from_cloud_event(*events.from_unwrapped_push({**meta, **notification}, b""))
    assert isinstance(trigger, events.ObjectTrigger) and trigger.job_id == "bkt/in/a.jsonl#5"
    # Without "write metadata" there is no message id: not taken for a push.
    assert events.from_unwrapped_push({"Content-Type": "application/json"}, json.dumps(JOB).encode()) is None


def test_job_message_data_completed_by_attributes():
    """A publisher may send part of a job as attributes (the model, say) and the rest as data: the
    job has both. The same key both ways must agree (options compared as JSON), else the message
    is refused naming the key."""
    data = json.dumps({"input": JOB["input"], "output": JOB["output"], "options": {"batch_size": 5}}).encode()
    attrs = {"model": JOB["model"], "options": '{"batch_size": 5}', "origin": "scheduler"}
    trigger = events.from_cloud_event(CE_PUBSUB, _pubsub(data, attrs))
    assert isinstance(trigger, events.JobTrigger)
    assert (str(trigger.job.model), trigger.job.options.batch_size) == (JOB["model"], 5)

    with pytest.raises(errors.InvalidJob, match=r"'model' twice with different values: \"gs://a/\" in its data"):
        events.from_cloud_event(CE_PUBSUB, _pubsub(json.dumps({**JOB, "model": "gs://a/"}).encode(), attrs))
    with pytest.raises(errors.InvalidJob, match="'options' twice"):
        events.from_cloud_event(CE_PUBSUB, _pubsub(data, {**attrs, "options": '{"batch_size": 6}'}))


def test_a_job_id_over_pubsub_s_attribute_limit_is_refused_and_reported_under_the_message_id():
    """The completion carries the job id as an attribute: at most 1,024 bytes in Pub/Sub."""
    fits = "é" * 512  # 1,024 bytes
    trigger = events.from_cloud_event(CE_PUBSUB, _pubsub(json.dumps({**JOB, "job_id": fits}).encode()))
    assert isinstance(trigger, events.JobTrigger) and trigger.job.job_id == fits
    for too_long in ("x" * 1025, "é" * 513, "x" * 2**20):
        for body in (
            _pubsub(json.dumps({**JOB, "job_id": too_long}).encode()),
            _pubsub(None, {**JOB, "job_id": too_long}),
        ):
            with pytest.raises(
                errors.InvalidJob, match=r"is \d+ bytes of UTF-8, more than the 1024 a Pub/Sub attribute"
            ):
                events.from_cloud_event(CE_PUBSUB, body)
            assert events.job_id_hint(CE_PUBSUB, body) == "42"
    with pytest.raises(errors.InvalidJob) as raised:
        events.from_query({**JOB, "job_id": "x" * 2**20}, default_job_id="http-1")
    assert len(str(raised.value)) < 500  # the id is quoted cut short, not whole


def test_the_id_of_an_object_whose_name_is_near_1024_bytes_is_shortened_the_same_way_each_time():
    name = "in/" + "n" * 1017  # 1,020 bytes: bucket/name#generation is more than 1,024
    trigger = events.object_trigger({"bucket": "bkt", "name": name, "generation": "1700000000000001"})
    job_id = trigger.job_id
    assert len(job_id.encode()) == 1024 and job_id.startswith("bkt/in/nnn") and "…" in job_id
    again = events.object_trigger({"bucket": "bkt", "name": name, "generation": "1700000000000001"})
    other = events.object_trigger({"bucket": "bkt", "name": name, "generation": "1700000000000002"})
    assert again.job_id == job_id != other.job_id
    short = events.object_trigger({"bucket": "bkt", "name": "in/a.jsonl", "generation": "7"})
    assert short.job_id == "bkt/in/a.jsonl#7"


@pytest.mark.parametrize("field", ["model", "input", "output"])
@pytest.mark.parametrize("path", ["a/../b/", "a/./b", "..", "a/.."])
def test_uris_with_dot_segments_are_refused(field, path):
    with pytest.raises(errors.InvalidJob, match=r"has a '\.' or '\.\.' segment — write the path without it"):
        events.from_cloud_event(CE_PUBSUB, _pubsub(json.dumps({**JOB, field: f"gs://bkt/{path}"}).encode()))
