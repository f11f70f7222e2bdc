"""functions-framework entry points: `handle_event` (events: CloudEvents, Pub/Sub pushes) and
`handle_http` (the original tool's `GET /?model=…&input=…&output=…`). Maps outcomes to delivery:
permanent errors are reported and acknowledged (2xx), transient ones raised so the platform retries.

Serve with: PYTHONPATH=. functions-framework --source worker/main.py --target handle_event
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
import uuid
from typing import Any

import cloudevents.http
import flask
import functions_framework
from cloudevents import exceptions as ce_exceptions
from functions_framework import event_conversion
from functions_framework.exceptions import EventConversionException
from werkzeug.exceptions import HTTPException

from worker import codec, errors, events, logs
from worker.codec import shown
from worker.config import Settings
from worker.jobs import STATUS_FAILED, Job
from worker.runtime import Runtime

log = logging.getLogger("worker")

_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime() -> Runtime:
    """The process's Runtime, built on the first request (never at import: functions-framework
    imports this module before gunicorn forks, and gRPC clients must not cross a fork)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            settings = Settings.from_env(os.environ)
            logs.setup(settings.log_level, settings.log_format)
            _runtime = Runtime.from_settings(settings)
            atexit.register(_runtime.close)  # stop model servers when the worker process exits
        return _runtime


class NotAnEvent(Exception):
    """A request to the event door that no sender of events would make."""


@functions_framework.http
def handle_event(request: flask.Request) -> flask.Response:
    """An event, as each of its senders sends it: a CloudEvent (Eventarc, in binary or structured
    mode), the body of a Pub/Sub push subscription (with or without message data, or unwrapped
    with its metadata as headers), or a legacy background event. functions-framework's own
    conversion refuses a push whose message has no data (a job sent as attributes, a bucket
    notification with payload format NONE), so this door reads requests itself. 200 when handled
    (a failure reported), 500 to be retried, 400 when the request is not an event."""
    try:
        attributes, data = _event_of(request)
    except NotAnEvent as e:
        return _json_response({"error": {"code": "INVALID_ARGUMENT", "message": str(e)}}, 400)
    _handle(attributes, data)
    return flask.Response("OK", status=200, mimetype="text/plain")


def _event_of(request: flask.Request) -> tuple[dict[str, Any], Any]:
    """The CloudEvent attributes and data of a request to the event door. The body may be anything
    a push without the wrapper delivers (gzip'd data, say): nothing here raises on it but NotAnEvent."""
    body = request.get_data()
    headers = dict(request.headers)
    try:
        event = cloudevents.http.from_http(headers, body)
    except (ce_exceptions.MissingRequiredFields, ce_exceptions.InvalidRequiredFields):
        pass  # not a CloudEvent: a push body, or a background event
    except (ce_exceptions.GenericException, ValueError, RecursionError) as e:
        # The SDK reads any body as a structured CloudEvent's JSON: only one that claims to be a
        # CloudEvent is refused for not reading as one.
        if _claims_cloud_event(headers):
            raise NotAnEvent(f"a CloudEvent that cannot be read: {type(e).__name__}: {shown(str(e))}") from e
    else:
        return dict(event.get_attributes()), event.get_data()
    try:
        parsed = codec.loads(body)
    except ValueError:
        parsed = None
    push = events.from_push_body(parsed) or events.from_unwrapped_push(headers, body)
    if push is not None:
        return push
    try:
        if not isinstance(parsed, dict):
            raise ValueError("the body is not a JSON object")
        event = event_conversion.background_event_to_cloud_event(request)
    except (
        EventConversionException,
        HTTPException,
        TypeError,
        KeyError,
        ValueError,
        AttributeError,
        RecursionError,
    ) as e:
        raise NotAnEvent(
            "not an event: expected a CloudEvent (ce-* headers, or application/cloudevents+json), a Pub/Sub "
            'push body {"message": …, "subscription": …} (or unwrapped, with "write metadata" on) or a '
            f"background event ({type(e).__name__}: {e})"
        ) from e
    return dict(event.get_attributes()), event.get_data()


def _claims_cloud_event(headers: dict[str, str]) -> bool:
    """A request in binary mode (`ce-specversion`) or structured mode (a cloudevents content type)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    return "ce-specversion" in lowered or lowered.get("content-type", "").startswith("application/cloudevents")


def _handle(attributes: dict[str, Any], data: Any) -> None:
    rt = runtime()
    context = {"event": {k: attributes.get(k) for k in ("id", "type", "source", "subject") if attributes.get(k)}}
    trigger: events.Trigger | None = None
    try:
        trigger = events.from_cloud_event(attributes, data)
        log.info("event %s: %s", attributes.get("id"), events.describe(trigger))
        try:
            rt.handle(trigger)
        except errors.Busy as busy:
            if not _waited_out_lease(rt, busy, attributes, data):
                raise
            # Once more: its holder has finished (the job is skipped), died (its lease has expired:
            # this run takes the job over), or is alive and renewing (Busy again: it reports itself).
            rt.handle(trigger)
    except errors.TransientError as e:
        last = _last_delivery(rt, attributes, data)
        if last is None:
            log.error("transient failure, the event will be redelivered: %s", e)
        elif isinstance(e, errors.Busy):
            log.warning(
                "last delivery (%s) of a job another run still holds: that run publishes the job's completion (%s)",
                last.why, e,
            )  # fmt: skip
        else:
            job = _job_of(rt, trigger)
            job_id = job.job_id if job is not None else _report_job_id(trigger, attributes, data)
            again = "upload the object again" if isinstance(trigger, events.ObjectTrigger) else "publish the job again"
            reported = _give_up(rt, job_id, e, last, again, context, job)
            if reported and not last.dead_letter:
                return  # acknowledged: a redelivery would only report it again
        raise
    except errors.PermanentError as e:
        rt.report_failure(_report_job_id(trigger, attributes, data), e, context)
    except Exception as e:
        # A bug must not turn into a day of redeliveries: report it once and acknowledge.
        log.exception("unexpected error handling event %s", attributes.get("id"))
        internal = errors.WorkerError(f"internal error: {type(e).__name__}: {e}")
        rt.report_failure(_report_job_id(trigger, attributes, data), internal, context)


@dataclasses.dataclass(frozen=True)
class LastDelivery:
    """Why no delivery follows this one if it fails."""

    why: str  # "after 5 deliveries (max_delivery_attempts)"
    context: dict[str, Any]  # for the FAILED report
    dead_letter: bool  # Pub/Sub dead-letters the message (else the worker acknowledges it)


# Past `give_up_after_seconds`, how long an event can still be a redelivery: Eventarc and infra/'s
# subscription keep an event for a day. One older still is replayed (a subscription's seek) or made
# by hand with an old time: it is retried as any other.
REDELIVERY_WINDOW_S = 2 * 3600


def _last_delivery(rt: Runtime, attributes: dict[str, Any], data: Any) -> LastDelivery | None:
    """This delivery is the last of its event when Pub/Sub dead-letters its message unless it is
    acknowledged now (its delivery count), or when the event was sent long enough ago that
    Eventarc or the subscription stops redelivering it before long (`give_up_after_seconds`;
    Eventarc counts no deliveries): then a transient failure is reported. None otherwise."""
    attempt = events.delivery_attempt(data)
    limit = rt.settings.max_delivery_attempts
    if attempt is not None and limit > 0 and attempt >= limit:
        why = f"after {attempt} deliveries (max_delivery_attempts)"
        return LastDelivery(why, {"delivery_attempt": attempt}, dead_letter=True)
    sent = events.sent_at(attributes, data)
    limit_s = rt.settings.give_up_after_seconds
    if sent is not None and limit_s <= (age := time.time() - sent) < limit_s + REDELIVERY_WINDOW_S:
        retried = f"{age / 3600:.1f} hours" if age >= 7200 else f"{age / 60:.0f} minutes"
        why = f"after retrying for {retried} (WORKER_GIVE_UP_AFTER_SECONDS)"
        return LastDelivery(why, {"event_age_s": round(age)}, dead_letter=False)
    return None


# Beyond a lease's expiry before trying it again: clocks of different instances differ a little.
LEASE_WAIT_MARGIN_S = 2.0


def _waited_out_lease(rt: Runtime, busy: errors.Busy, attributes: dict[str, Any], data: Any) -> bool:
    """On the message's last delivery, wait until the lease another run holds would expire if
    that run died (True). No later delivery would come to take over a dead run's job: without
    this, such a job went to the dead-letter topic with no completion message at all."""
    last = _last_delivery(rt, attributes, data)
    if last is None or not last.dead_letter or busy.until is None:
        return False  # (an event old enough to give up on is redelivered after the lease expires)
    wait = min(max(busy.until - time.time(), 0.0), float(rt.settings.lease_seconds)) + LEASE_WAIT_MARGIN_S
    log.warning(
        "last delivery (%s) of a job held by another run: waiting %.0fs to see whether that run renews its lease "
        "(%s)", last.why, wait, busy,
    )  # fmt: skip
    time.sleep(wait)
    return True


def _give_up(
    rt: Runtime,
    job_id: str,
    e: errors.TransientError,
    last: LastDelivery,
    again: str,
    context: dict[str, Any],
    job: Job | None,
) -> bool:
    """A transient failure on the event's last delivery: no retry follows, so the job fails
    where its completion is awaited (True when that was published). (A Busy job is running
    elsewhere and reports itself.)"""
    then = (
        "the message goes to the dead-letter topic; republish it from there once the cause is fixed"
        if last.dead_letter
        else f"the event is acknowledged; {again} once the cause is fixed"
    )
    error = errors.TransientError(f"{e} — gave up {last.why}: {then}")
    try:
        rt.report_failure(job_id, error, {**context, **last.context}, job=job)
    except errors.WorkerError as publish_error:
        log.error("could not publish the FAILED completion of job %s: %s", job_id, publish_error)
        return False
    return True


def _job_of(rt: Runtime, trigger: events.Trigger | None) -> Job | None:
    """The job a trigger ran, for the report of its last delivery: a job file is read again, as the
    job it holds may have a `job_id` of its own, the one its completion is awaited under (None
    when it cannot be read now)."""
    if isinstance(trigger, events.JobTrigger):
        return trigger.job
    if isinstance(trigger, events.ObjectTrigger):
        with contextlib.suppress(errors.WorkerError):
            return rt.job_for_object(trigger)
    return None


def _report_job_id(trigger: events.Trigger | None, attributes: dict[str, Any], data: Any) -> str:
    """The id a failure report carries: the trigger's when it was parsed, else a best guess."""
    if isinstance(trigger, events.JobTrigger):
        return trigger.job.job_id
    if isinstance(trigger, events.ObjectTrigger):
        return trigger.job_id
    return events.job_id_hint(attributes, data)


_HTTP_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "FAILED_PRECONDITION": 422}


def _json_response(body: dict[str, Any], status: int) -> flask.Response:
    return flask.Response(json.dumps(body, indent=2) + "\n", status=status, mimetype="application/json")


@functions_framework.http
def handle_http(request: flask.Request) -> flask.Response:
    """`GET /?model=gs://…&input=gs://…&output=gs://…[&job_id=…][&options={json}]` runs the job
    and answers with its manifest as JSON."""
    if request.method not in ("GET", "POST"):
        return _json_response({"error": {"code": "INVALID_ARGUMENT", "message": "use GET or POST"}}, 405)
    rt = runtime()
    params = dict(request.args)
    if request.method == "POST" and request.is_json and isinstance(request.get_json(silent=True), dict):
        body = request.get_json()
        params.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in body.items()})
    try:
        job = events.from_query(params, default_job_id=f"http-{uuid.uuid4().hex[:16]}")
    except errors.InvalidJob as e:
        usage = "GET /?model=gs://BUCKET/MODEL&input=gs://BUCKET/INPUT&output=gs://BUCKET/OUTPUT/"
        return _json_response({"error": {"code": e.code, "message": str(e)}, "usage": usage}, 400)
    try:
        outcome = rt.run_job(job)
    except errors.TransientError as e:
        return _json_response({"job_id": job.job_id, "error": {"code": e.code, "message": str(e)}}, 503)
    manifest = outcome.manifest
    status = 200
    if manifest.get("status") == STATUS_FAILED:
        status = _HTTP_STATUS.get(str((manifest.get("error") or {}).get("code")), 500)
    return _json_response(manifest, status)
