"""Turns what arrives — a CloudEvent, a Pub/Sub message, an HTTP query — into a `Trigger`.

Pure parsing, no I/O: a job message becomes a `Job`; a finalized object becomes an
`ObjectTrigger` (the runtime decides whether it is a job file or an input file); anything else
is `Ignored` with the reason. Malformed payloads raise `InvalidJob`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from worker.codec import loads, shown
from worker.errors import InvalidJob
from worker.jobs import MAX_JOB_ID_BYTES, Job, fit_job_id, parse_json_object
from worker.uris import is_text

PUBSUB_PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished"
STORAGE_FINALIZED = "google.cloud.storage.object.v1.finalized"
_JOB_ATTRIBUTE_KEYS = ("model", "input", "output", "job_id", "options")


@dataclass(frozen=True)
class ObjectTrigger:
    """A finalized Cloud Storage object."""

    bucket: str
    name: str
    generation: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def job_id(self) -> str:
        """`bucket/name#generation`, shortened (with a hash of it) where it would not fit a job id."""
        return fit_job_id(f"{self.bucket}/{self.name}#{self.generation}")


@dataclass(frozen=True)
class Ignored:
    reason: str


@dataclass(frozen=True)
class JobTrigger:
    job: Job


Trigger = JobTrigger | ObjectTrigger | Ignored


def from_cloud_event(attributes: Mapping[str, Any], data: Any) -> Trigger:
    """Dispatch on the CloudEvent type: Pub/Sub message or Cloud Storage object finalize."""
    ce_type = attributes.get("type", "")
    if ce_type == PUBSUB_PUBLISHED:
        if not isinstance(data, Mapping) or not isinstance(data.get("message"), Mapping):
            raise InvalidJob("Pub/Sub event has no message: expected data.message with data and attributes")
        fallback_id = str(attributes.get("id", ""))
        return from_pubsub_message(data["message"], fallback_id=fallback_id)
    if ce_type == STORAGE_FINALIZED:
        return object_trigger(_object_resource(data))
    if ce_type.startswith("google.cloud.storage.object."):
        return Ignored(f"storage event {ce_type} is not a finalize")
    return Ignored(f"event type {ce_type!r} is not handled")


def from_push_body(body: Any) -> tuple[dict[str, str], dict[str, Any]] | None:
    """A Pub/Sub push subscription's request body, `{"message": {…}, "subscription": "…"}`, as
    the CloudEvent attributes and data Eventarc delivers for the same message (its data is that
    body); None for any other body. A message may have no `data`: a job sent as attributes, a
    bucket notification with payload format NONE."""
    if not isinstance(body, Mapping) or "context" in body or not isinstance(body.get("message"), Mapping):
        return None
    if not isinstance(body.get("subscription"), str):
        return None
    message = body["message"]
    message_id = message.get("messageId") or message.get("message_id") or ""
    attributes = {
        "specversion": "1.0",
        "type": PUBSUB_PUBLISHED,
        "source": f"//pubsub.googleapis.com/{body['subscription']}",
        "id": str(message_id),
    }
    return attributes, dict(body)


# Attributes the worker reads, as an unwrapped push brings them: one header each.
_MESSAGE_ATTRIBUTES = (
    *_JOB_ATTRIBUTE_KEYS,
    *("eventType", "bucketId", "objectId", "objectGeneration", "payloadFormat", "notificationConfig"),
)


def from_unwrapped_push(headers: Mapping[str, str], body: bytes) -> tuple[dict[str, str], dict[str, Any]] | None:
    """A push from a subscription with payload unwrapping and "write metadata": the message data
    is the body, its id and subscription come as `x-goog-pubsub-*` headers and its attributes as
    headers of their own names. As `from_push_body`; None without those headers (without "write
    metadata" a message has no id to make its job idempotent)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    message_id = lowered.get("x-goog-pubsub-message-id")
    if not message_id:
        return None
    attributes = {name: lowered[name.lower()] for name in _MESSAGE_ATTRIBUTES if name.lower() in lowered}
    message = {"data": base64.b64encode(body).decode(), "messageId": message_id, "attributes": attributes}
    if "x-goog-pubsub-publish-time" in lowered:
        message["publishTime"] = lowered["x-goog-pubsub-publish-time"]
    subscription = lowered.get("x-goog-pubsub-subscription-name", "")
    return from_push_body({"message": message, "subscription": subscription})


def from_pubsub_message(message: Mapping[str, Any], *, fallback_id: str = "") -> Trigger:
    """A Pub/Sub message: a bucket notification (eventType attribute) or a job message."""
    attrs = message.get("attributes") or {}
    if not isinstance(attrs, Mapping):
        raise InvalidJob("Pub/Sub message attributes must be an object of strings")
    message_id = str(message.get("messageId") or message.get("message_id") or fallback_id)
    payload = _message_data(message.get("data"))

    if attrs.get("eventType") is not None:
        return _bucket_notification(attrs, payload)

    in_attributes = {k: attrs[k] for k in _JOB_ATTRIBUTE_KEYS if k in attrs}
    if payload.strip():
        data = parse_json_object(payload, what=f"job message {message_id or ''}".strip())
        raw = _with_attributes(data, in_attributes)
    elif any(k in attrs for k in ("model", "input", "output")):
        raw = in_attributes
    else:
        raise InvalidJob(
            "job message is empty: publish a JSON object with model, input and output "
            "(or set them as message attributes)"
        )
    if not message_id and not raw.get("job_id"):
        raise InvalidJob("job message has neither a message id nor a job_id")
    return JobTrigger(Job.from_mapping(raw, default_job_id=message_id))


def _bucket_notification(attrs: Mapping[str, Any], payload: bytes) -> Trigger:
    """A Cloud Storage notification to Pub/Sub: its object (in the payload, or named by the
    attributes) when it was finalized."""
    event_type = attrs["eventType"]
    if event_type != "OBJECT_FINALIZE":
        return Ignored(f"bucket notification {event_type} is not OBJECT_FINALIZE")
    resource: dict[str, Any] = {}
    if payload.strip():
        resource = parse_json_object(payload, what="bucket notification payload")
    resource.setdefault("bucket", attrs.get("bucketId"))
    resource.setdefault("name", attrs.get("objectId"))
    resource.setdefault("generation", attrs.get("objectGeneration"))
    return object_trigger(resource)


def _with_attributes(raw: dict[str, Any], in_attributes: Mapping[str, Any]) -> dict[str, Any]:
    """A job message's data with the job keys its attributes add (a publisher may send the model as
    an attribute and the rest as data); a key given both ways with different values is refused."""
    for key, value in in_attributes.items():
        if key not in raw:
            raw[key] = value
            continue
        given = raw[key]
        same = given == value or (key == "options" and isinstance(value, str) and _json_equal(value, given))
        if not same:
            raise InvalidJob(
                f"job message gives {key!r} twice with different values: {shown(given)} in its data and "
                f"{shown(value)} as an attribute; send it one way"
            )
    return raw


def _json_equal(text: str, value: Any) -> bool:
    try:
        return bool(loads(text) == value)
    except ValueError:
        return False


def from_query(params: Mapping[str, str], *, default_job_id: str) -> Job:
    """The original tool's interface: `?model=gs://…&input=gs://…&output=gs://…`."""
    raw: dict[str, Any] = {k: v for k, v in params.items() if k in ("model", "input", "output", "job_id")}
    extra = sorted(set(params) - set(raw) - {"options"})
    if extra:
        raise InvalidJob(f"unknown query parameter(s) {extra}; use model, input, output, job_id, options")
    if "options" in params:
        raw["options"] = parse_json_object(params["options"], what="options parameter")
    return Job.from_mapping(raw, default_job_id=default_job_id)


def object_trigger(resource: Mapping[str, Any]) -> ObjectTrigger:
    bucket, name = resource.get("bucket"), resource.get("name")
    if not isinstance(bucket, str) or not bucket or not isinstance(name, str) or not name:
        raise InvalidJob("storage event has no bucket and object name")
    metadata = resource.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        metadata = {}
    return ObjectTrigger(
        bucket=bucket,
        name=name,
        generation=str(resource.get("generation") or "0"),
        metadata={str(k): str(v) for k, v in metadata.items()},
    )


def _object_resource(data: Any) -> Mapping[str, Any]:
    if isinstance(data, (bytes, str)):
        return parse_json_object(data, what="storage event data")
    if not isinstance(data, Mapping):
        raise InvalidJob("storage event data must be the object resource JSON")
    return data


def _message_data(data: Any) -> bytes:
    if data is None or data == "":
        return b""
    if isinstance(data, bytes):
        return data
    if not isinstance(data, str):
        raise InvalidJob("Pub/Sub message data must be base64 text")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidJob(f"Pub/Sub message data is not valid base64: {e}") from e


def delivery_attempt(data: Any) -> int | None:
    """Which delivery of its message an event is, when the subscription counts them: Pub/Sub
    writes `deliveryAttempt` into the push body of a subscription with a dead-letter topic (the
    data of the event). None when it is not there."""
    if not isinstance(data, Mapping):
        return None
    attempt = data.get("deliveryAttempt")
    if isinstance(attempt, str) and attempt.isdigit():
        attempt = int(attempt)
    if isinstance(attempt, int) and not isinstance(attempt, bool) and attempt > 0:
        return attempt
    return None


def sent_at(attributes: Mapping[str, Any], data: Any) -> float | None:
    """When an event was first sent (seconds since the epoch): its Pub/Sub message's publish time,
    else the CloudEvent's `time` (for a storage event, the object's change); it stays the same on
    every redelivery. None when neither is there or readable."""
    message = data.get("message") if isinstance(data, Mapping) else None
    if isinstance(message, Mapping):
        published = _timestamp(message.get("publishTime") or message.get("publish_time"))
        if published is not None:
            return published
    return _timestamp(attributes.get("time"))


# RFC 3339 as Pub/Sub and CloudEvents write it: "2026-12-03T12:00:00.123456789Z" (nanoseconds).
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\d)[Tt ](\d\d:\d\d:\d\d)(?:\.(\d+))?([Zz]|[+-]\d\d:\d\d)")


def _timestamp(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp() if value.tzinfo is not None else None
    match = _RFC3339.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        return None
    day, clock, fraction, zone = match.groups()
    zone = "+00:00" if zone in "Zz" else zone
    try:
        return datetime.fromisoformat(f"{day}T{clock}.{(fraction or '')[:6].ljust(6, '0')}{zone}").timestamp()
    except ValueError:  # a month 13, a day 32
        return None


def job_id_hint(attributes: Mapping[str, Any], data: Any) -> str:
    """The job id to report for an event that may never become a job: an explicit job_id in
    the message if it can be read, else the message id, the object's id, or the event id."""
    if isinstance(data, Mapping) and isinstance(data.get("message"), Mapping):
        message = data["message"]
        attrs = message.get("attributes")
        if isinstance(attrs, Mapping) and _job_id(attrs.get("job_id")):
            return str(attrs["job_id"])
        try:
            payload = loads(_message_data(message.get("data")))
        except (ValueError, InvalidJob):
            payload = None
        if isinstance(payload, dict) and _job_id(payload.get("job_id")):
            return str(payload["job_id"])
        msg_id = message.get("messageId") or message.get("message_id")
        if msg_id:
            return fit_job_id(str(msg_id))
    if isinstance(data, Mapping) and data.get("bucket") and data.get("name"):
        return fit_job_id(f"{data['bucket']}/{data['name']}#{data.get('generation', '0')}")
    return fit_job_id(str(attributes.get("id") or "unknown"))


def _job_id(value: Any) -> bool:
    """A job id to report under: non-empty text that fits a Pub/Sub attribute."""
    return bool(value) and is_text(value) and len(value.encode()) <= MAX_JOB_ID_BYTES


def describe(trigger: Trigger) -> str:
    if isinstance(trigger, JobTrigger):
        return f"job {trigger.job.job_id}"
    if isinstance(trigger, ObjectTrigger):
        return f"object gs://{trigger.bucket}/{trigger.name}#{trigger.generation}"
    return f"ignored ({trigger.reason})"


__all__ = [
    "Ignored",
    "JobTrigger",
    "ObjectTrigger",
    "Trigger",
    "from_cloud_event",
    "from_pubsub_message",
    "from_push_body",
    "from_query",
    "from_unwrapped_push",
]
