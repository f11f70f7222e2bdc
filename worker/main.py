"""functions-framework entry points: `handle_event` (CloudEvents) and `handle_http` (the original
tool's `GET /?model=…&input=…&output=…`). Maps outcomes to delivery: permanent errors are
reported and acknowledged (2xx), transient ones raised so the platform retries.

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

import flask
import functions_framework
from cloudevents.http import CloudEvent

from worker import errors, events, logs
from worker.config import Settings
from worker.jobs import STATUS_FAILED
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
            logs.setup(settings.log_level)
            _runtime = Runtime.from_settings(settings)
            atexit.register(_runtime.close)  # stop model servers when the worker process exits
        return _runtime


@functions_framework.cloud_event
def handle_event(cloud_event: CloudEvent) -> None:
    rt = runtime()
    attributes = dict(cloud_event.get_attributes())
    data = cloud_event.get_data()
    context = {"event": {k: attributes.get(k) for k in ("id", "type", "source", "subject") if attributes.get(k)}}
    trigger: events.Trigger | None = None
    try:
        trigger = events.from_cloud_event(attributes, data)
        log.info("event %s: %s", attributes.get("id"), events.describe(trigger))
        rt.handle(trigger)
    except errors.TransientError as e:
        log.error("transient failure, the event will be redelivered: %s", e)
        raise
    except errors.PermanentError as e:
        rt.report_failure(_report_job_id(trigger, attributes, data), e, context)
    except Exception as e:
        # A bug must not turn into a day of redeliveries: report it once and acknowledge.
        log.exception("unexpected error handling event %s", attributes.get("id"))
        internal = errors.WorkerError(f"internal error: {type(e).__name__}: {e}")
        rt.report_failure(_report_job_id(trigger, attributes, data), internal, context)


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
