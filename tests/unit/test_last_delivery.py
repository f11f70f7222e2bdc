"""The last delivery of a job message: Pub/Sub counts deliveries (`deliveryAttempt` in the push
body) when the subscription dead-letters; a transient failure on the last one publishes FAILED
before the message is dead-lettered, so whoever waits for the completion hears of it."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from worker import delivery, errors, events
from worker.config import Settings
from worker.jobs import Job

JOB = {"model": "gs://mdl/m/", "input": "gs://bkt/in/", "output": "gs://bkt/out/", "job_id": "j-1"}
ATTRIBUTES = {"type": events.PUBSUB_PUBLISHED, "id": "42", "source": "//pubsub.googleapis.com/projects/p/topics/t"}


def _push(attempt: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "message": {"data": base64.b64encode(json.dumps(JOB).encode()).decode(), "messageId": "42"},
        "subscription": "projects/p/subscriptions/jobs",
    }
    if attempt is not None:
        body["deliveryAttempt"] = attempt
    return body


class FakeRuntime:
    """Our Runtime's surface that `delivery` uses: it fails every job with `error`."""

    def __init__(self, error: Exception, max_delivery_attempts: int = 5) -> None:
        self.settings = Settings(max_delivery_attempts=max_delivery_attempts)
        self.error = error
        self.reports: list[tuple[str, errors.WorkerError, dict[str, Any]]] = []
        self.jobs: list[Any] = []  # the job each report was for, when the event was one
        self.job_files: dict[str, Any] = {}  # job files by object name, or the error reading one raises

    def handle(self, trigger: events.Trigger) -> None:
        raise self.error

    def job_for_object(self, obj: events.ObjectTrigger) -> Any:
        held = self.job_files.get(obj.name)
        if isinstance(held, Exception):
            raise held
        return None if held is None else Job.from_mapping(held, default_job_id=obj.job_id)

    def report_failure(
        self, job_id: str, error: errors.WorkerError, context: dict[str, Any], *, job: Any = None
    ) -> dict[str, Any]:
        self.reports.append((job_id, error, context))
        self.jobs.append(job)
        return {}


@pytest.fixture
def runtime_of():
    return FakeRuntime


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (_push(5), 5),
        (_push("7"), 7),  # tolerated as a string of digits
        (_push(None), None),  # a subscription without a dead-letter topic does not count
        (_push(0), None),
        (_push(True), None),
        (_push("x"), None),
        ({"bucket": "b", "name": "n"}, None),  # a storage event's data
        (b"raw", None),
    ],
)
def test_delivery_attempt_is_read_from_the_push_body(body: Any, expected: int | None):
    assert events.delivery_attempt(body) == expected


def test_a_transient_failure_on_the_last_delivery_publishes_failed_and_is_still_retried(runtime_of):
    rt = runtime_of(errors.TransientError("model server exited with code 3"))
    with pytest.raises(errors.TransientError):  # not acknowledged: Pub/Sub dead-letters the message
        delivery.deliver(rt, dict(ATTRIBUTES), _push(5))
    [(job_id, error, context)] = rt.reports
    assert job_id == "j-1"
    assert error.code == "UNAVAILABLE"
    assert str(error) == (
        "model server exited with code 3 — gave up after 5 deliveries (max_delivery_attempts): the message "
        "goes to the dead-letter topic; republish it from there once the cause is fixed"
    )
    assert context["delivery_attempt"] == 5 and context["event"]["id"] == "42"


def test_a_dropped_file_s_notification_on_its_last_delivery_reports_the_object_s_job(runtime_of):
    """A bucket's Pub/Sub notification (payload format NONE) through the same dead-lettering push
    subscription: the report carries the dropped file's job id, bucket/name#generation."""
    rt = runtime_of(errors.TransientError("storage unavailable"))
    attributes = {"eventType": "OBJECT_FINALIZE", "bucketId": "bkt", "objectId": "in/a.jsonl",
                  "objectGeneration": "7", "payloadFormat": "NONE"}  # fmt: skip
    body = {
        "message": {"attributes": attributes, "messageId": "43"},
        "subscription": "projects/p/subscriptions/drops",
        "deliveryAttempt": 5,
    }
    with pytest.raises(errors.TransientError):
        delivery.deliver(rt, {**ATTRIBUTES, "id": "43"}, body)
    [(job_id, error, context)] = rt.reports
    assert job_id == "bkt/in/a.jsonl#7"
    assert str(error).startswith("storage unavailable — gave up after 5 deliveries")
    assert context["delivery_attempt"] == 5


def test_the_part_of_a_job_run_as_parts_is_reported_with_its_job(runtime_of):
    """The report of a part's last delivery carries the part's job: the runtime writes its FAILED
    manifest, so that the whole job completes FAILED once the other parts are done."""
    rt = runtime_of(errors.TransientError("storage unavailable"))
    part = {**JOB, "job_id": "j-1/part-2-of-3", "options": {"part": [2, 3]}}
    body = _push(5)
    body["message"]["data"] = base64.b64encode(json.dumps(part).encode()).decode()
    with pytest.raises(errors.TransientError):
        delivery.deliver(rt, dict(ATTRIBUTES), body)
    [(job_id, _, _)] = rt.reports
    [job] = rt.jobs
    assert job_id == "j-1/part-2-of-3" and job.options.part == (2, 3)


def test_a_redelivery_past_the_last_one_reports_too(runtime_of):
    rt = runtime_of(errors.TransientError("storage unavailable"))
    with pytest.raises(errors.TransientError):
        delivery.deliver(rt, dict(ATTRIBUTES), _push(6))  # dead-lettering is best effort
    assert len(rt.reports) == 1


@pytest.mark.parametrize(
    ("error", "attempt", "max_attempts"),
    [
        (errors.TransientError("storage unavailable"), 4, 5),  # deliveries remain
        (errors.TransientError("storage unavailable"), None, 5),  # the subscription does not count them
        (errors.TransientError("storage unavailable"), 5, 0),  # the worker does not know the limit
        (errors.Busy("lease held by another run"), 5, 5),  # still running elsewhere: it reports itself
    ],
)
def test_no_failed_completion_while_the_job_may_still_complete(runtime_of, error, attempt, max_attempts):
    rt = runtime_of(error, max_attempts)
    with pytest.raises(type(error)):
        delivery.deliver(rt, dict(ATTRIBUTES), _push(attempt))
    assert rt.reports == []


def test_a_failed_publish_on_the_last_delivery_leaves_the_cause_to_be_raised(runtime_of):
    rt = runtime_of(errors.TransientError("storage unavailable"))

    def cannot_publish(job_id: str, error: errors.WorkerError, context: dict[str, Any], **_: Any) -> dict[str, Any]:
        raise errors.TransientError("publishing failed")

    rt.report_failure = cannot_publish  # type: ignore[method-assign]
    with pytest.raises(errors.TransientError, match="storage unavailable"):
        delivery.deliver(rt, dict(ATTRIBUTES), _push(5))


class HeldRuntime(FakeRuntime):
    """A job whose lease another run holds for `held_s` more seconds: then `holder_alive` says
    whether it renewed it (Busy again) or died (this run takes the job over and completes it)."""

    def __init__(self, held_s: float, *, holder_alive: bool, lease_seconds: int = 120) -> None:
        super().__init__(errors.Busy("held"), 5)
        self.settings = Settings(max_delivery_attempts=5, lease_seconds=lease_seconds)
        self.expires = time.time() + held_s
        self.holder_alive = holder_alive
        self.runs: list[float] = []

    def handle(self, trigger: events.Trigger) -> None:
        self.runs.append(time.time())
        if time.time() < self.expires or self.holder_alive:
            raise errors.Busy(f"job is running on another host until {self.expires}", until=self.expires)


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(delivery, "LEASE_WAIT_MARGIN_S", 0.05)

    def make(held_s: float, **kw: Any) -> HeldRuntime:
        fake = HeldRuntime(held_s, **kw)
        return fake

    return make


def test_on_the_last_delivery_a_job_held_by_a_dead_run_is_taken_over_once_its_lease_expires(held):
    """No later delivery would come to take it over: the job ran nowhere and went to the
    dead-letter topic without a completion message."""
    rt = held(0.3, holder_alive=False)
    delivery.deliver(rt, dict(ATTRIBUTES), _push(5))  # acknowledged: the job ran here
    assert len(rt.runs) == 2 and rt.runs[1] >= rt.expires
    assert rt.reports == []


def test_on_the_last_delivery_a_job_whose_holder_renews_its_lease_is_left_to_it(held, caplog):
    rt = held(0.3, holder_alive=True)
    with pytest.raises(errors.Busy):  # dead-lettered; the live run publishes the completion
        delivery.deliver(rt, dict(ATTRIBUTES), _push(5))
    assert len(rt.runs) == 2 and rt.reports == []
    assert "that run publishes the job's completion" in caplog.text


def test_before_the_last_delivery_a_held_job_is_retried_by_pub_sub_without_waiting(held):
    rt = held(30, holder_alive=False)
    started = time.time()
    with pytest.raises(errors.Busy):
        delivery.deliver(rt, dict(ATTRIBUTES), _push(4))
    assert len(rt.runs) == 1 and time.time() - started < 5


def test_the_wait_for_a_lease_is_bounded_by_the_lease_time(held):
    """An expiry far ahead (another instance's clock, a corrupt lease) waits one lease time at most."""
    rt = held(3600, holder_alive=False, lease_seconds=0)
    with pytest.raises(errors.Busy):
        delivery.deliver(rt, dict(ATTRIBUTES), _push(5))
    assert len(rt.runs) == 2 and rt.runs[1] - rt.runs[0] < 5


# Eventarc counts no deliveries: an event is known to be near its last by its age.
DAY_S = 24 * 3600
STORAGE_EVENT = {
    "type": events.STORAGE_FINALIZED,
    "id": "9001",
    "source": "//storage.googleapis.com/projects/_/buckets/bkt",
    "subject": "objects/in/a.jsonl",
}
OBJECT = {"bucket": "bkt", "name": "in/a.jsonl", "generation": "7", "metadata": JOB}


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"  # as Pub/Sub writes it


@pytest.mark.parametrize(
    ("attributes", "data", "expected"),
    [
        ({"time": "2026-12-03T12:00:00.123456789Z"}, None, 1796299200.123456),
        ({"time": "2026-12-03T12:00:00Z"}, None, 1796299200.0),
        ({"time": "2026-12-03T13:00:00+01:00"}, None, 1796299200.0),
        ({}, {"message": {"publishTime": "2026-12-03T12:00:00.5Z"}}, 1796299200.5),
        ({}, {"message": {"publish_time": "2026-12-03T12:00:00Z"}}, 1796299200.0),
        # The message's publish time before the CloudEvent's time (Eventarc sets both the same).
        ({"time": "2026-12-04T00:00:00Z"}, {"message": {"publishTime": "2026-12-03T12:00:00Z"}}, 1796299200.0),
        ({"time": "2026-12-03T12:00:00Z"}, {"message": {"publishTime": "soon"}}, 1796299200.0),
        ({"time": "2026-13-03T12:00:00Z"}, None, None),  # no month 13
        ({"time": "2026-12-03T12:00:00"}, None, None),  # no zone: not RFC 3339
        ({"time": 1796299200}, None, None),
        ({}, {"bucket": "b", "name": "n"}, None),
    ],
)
def test_when_an_event_was_sent_is_read_from_its_message_or_its_time(attributes, data, expected):
    assert events.sent_at(attributes, data) == expected


def test_an_eventarc_storage_event_failing_near_the_end_of_its_retries_publishes_failed_and_is_acknowledged(
    runtime_of,
):
    """Eventarc redelivers a direct storage event for a day, counting nothing: without this, a
    dropped file that failed transiently every time was dropped after a day with no completion."""
    rt = runtime_of(errors.TransientError("storage unavailable"), max_delivery_attempts=0)
    sent = time.time() - (DAY_S - 1800)
    delivery.deliver(rt, {**STORAGE_EVENT, "time": _rfc3339(sent)}, dict(OBJECT))  # no raise: acknowledged
    [(job_id, error, context)] = rt.reports
    assert job_id == "bkt/in/a.jsonl#7"
    assert error.code == "UNAVAILABLE"
    assert str(error) == (
        "storage unavailable — gave up after retrying for 23.5 hours (WORKER_GIVE_UP_AFTER_SECONDS): the event is "
        "acknowledged; upload the object again once the cause is fixed"
    )
    assert abs(context["event_age_s"] - (DAY_S - 1800)) < 60 and context["event"]["id"] == "9001"


def test_a_job_message_through_eventarc_near_the_end_of_its_retries_says_to_publish_it_again(runtime_of):
    rt = runtime_of(errors.TransientError("model server exited with code 3"), max_delivery_attempts=0)
    body = _push(None)
    body["message"]["publishTime"] = _rfc3339(time.time() - 23.2 * 3600)
    delivery.deliver(rt, {**ATTRIBUTES, "time": body["message"]["publishTime"]}, body)
    [(job_id, error, _)] = rt.reports
    assert job_id == "j-1"
    assert str(error).endswith(
        "gave up after retrying for 23.2 hours (WORKER_GIVE_UP_AFTER_SECONDS): the event is acknowledged; "
        "publish the job again once the cause is fixed"
    )


@pytest.mark.parametrize(
    "age_s",
    [
        None,  # no time to tell
        0,
        3600,
        23 * 3600 - 60,
        -600,  # the sender's clock ahead of ours
        # Older than any redelivery: replayed (a subscription's seek), or made by hand with the
        # time of an example; it was never retried for a day.
        25 * 3600 + 60,
        7 * DAY_S,
        3 * 365 * DAY_S,
    ],
)
def test_an_event_not_near_the_end_of_its_redeliveries_is_left_to_be_redelivered(runtime_of, age_s):
    rt = runtime_of(errors.TransientError("storage unavailable"), max_delivery_attempts=0)
    attributes = dict(STORAGE_EVENT) if age_s is None else {**STORAGE_EVENT, "time": _rfc3339(time.time() - age_s)}
    with pytest.raises(errors.TransientError):
        delivery.deliver(rt, attributes, dict(OBJECT))
    assert rt.reports == []


def test_the_delivery_count_decides_first_where_the_subscription_dead_letters(runtime_of):
    """An old message on its last counted delivery goes to the dead-letter topic, as any other."""
    rt = runtime_of(errors.TransientError("storage unavailable"))
    body = _push(5)
    body["message"]["publishTime"] = _rfc3339(time.time() - DAY_S)
    with pytest.raises(errors.TransientError):
        delivery.deliver(rt, dict(ATTRIBUTES), body)
    [(_, error, context)] = rt.reports
    assert "gave up after 5 deliveries (max_delivery_attempts)" in str(error) and context["delivery_attempt"] == 5


def test_an_old_event_whose_failure_cannot_be_published_is_not_acknowledged(runtime_of):
    """A redelivery tries the job, and the report, again."""
    rt = runtime_of(errors.TransientError("storage unavailable"), max_delivery_attempts=0)

    def cannot_publish(job_id: str, error: errors.WorkerError, context: dict[str, Any], **_: Any) -> dict[str, Any]:
        raise errors.TransientError("publishing failed")

    rt.report_failure = cannot_publish  # type: ignore[method-assign]
    with pytest.raises(errors.TransientError, match="storage unavailable"):
        delivery.deliver(rt, {**STORAGE_EVENT, "time": _rfc3339(time.time() - DAY_S)}, dict(OBJECT))


def test_an_old_event_of_a_job_held_by_another_run_is_redelivered_without_waiting(held):
    """Eventarc redelivers it within 10 minutes, after the lease of a dead run has expired: no
    request is held for the lease's time."""
    rt = held(30, holder_alive=False)
    rt.settings = Settings(lease_seconds=120)  # no delivery count: the event's age decides
    started = time.time()
    with pytest.raises(errors.Busy):
        delivery.deliver(rt, {**ATTRIBUTES, "time": _rfc3339(time.time() - 23.5 * 3600)}, _push(None))
    assert len(rt.runs) == 1 and time.time() - started < 5
    assert rt.reports == []


def test_the_age_after_which_the_worker_gives_up_is_configurable(runtime_of):
    rt = runtime_of(errors.TransientError("storage unavailable"), max_delivery_attempts=0)
    rt.settings = Settings.from_env({"WORKER_GIVE_UP_AFTER_SECONDS": "600"})
    delivery.deliver(rt, {**STORAGE_EVENT, "time": _rfc3339(time.time() - 700)}, dict(OBJECT))
    [(_, error, _)] = rt.reports
    assert "gave up after retrying for 12 minutes (WORKER_GIVE_UP_AFTER_SECONDS)" in str(error)


def test_a_job_file_given_up_on_is_reported_under_the_job_id_it_holds(runtime_of):
    """Its completion is awaited under the `job_id` the file sets, not the object's; when the file
    cannot be read again (storage is what fails), the object's id is the one left."""
    rt = runtime_of(errors.TransientError("model server exited with code 3"), max_delivery_attempts=0)
    rt.job_files = {"jobs/nightly.job.json": {**JOB, "job_id": "nightly-42"}}
    job_file = {**STORAGE_EVENT, "subject": "objects/jobs/nightly.job.json", "time": _rfc3339(time.time() - DAY_S)}
    resource = {"bucket": "bkt", "name": "jobs/nightly.job.json", "generation": "3"}
    delivery.deliver(rt, job_file, dict(resource))
    rt.job_files = {"jobs/nightly.job.json": errors.TransientError("storage unavailable")}
    delivery.deliver(rt, job_file, dict(resource))
    assert [job_id for job_id, _, _ in rt.reports] == ["nightly-42", "bkt/jobs/nightly.job.json#3"]
    assert str(rt.reports[0][1]).endswith("the event is acknowledged; upload the object again once the cause is fixed")
