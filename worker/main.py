"""functions-framework entry points: `handle_event` (events: CloudEvents, Pub/Sub pushes) and
`handle_http` (the original tool's `GET /?model=…&input=…&output=…`). An event's outcome decides
its delivery (`worker.delivery`): acknowledged (2xx) when handled or reported, retried (5xx) when
its failure is transient.

Serve with: PYTHONPATH=. functions-framework --source worker/main.py --target handle_event
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import uuid
from typing import Any

import cloudevents.http
import flask
import functions_framework
from cloudevents import exceptions as ce_exceptions
from functions_framework import event_conversion
from functions_framework.exceptions import EventConversionException
from werkzeug.exceptions import HTTPException

from worker import codec, delivery, errors, events, logs
from worker.app import Runtime
from worker.codec import shown
from worker.config import Settings
from worker.jobs import STATUS_FAILED

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
    delivery.deliver(runtime(), attributes, data)


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
