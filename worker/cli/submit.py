"""`submit`: publish a job to the jobs topic for a deployed worker; with `--wait`, wait for its
completion message on the results topic and exit as `run` does.

The wait reads a subscription of its own, made before the job is published (so the completion
cannot come first) and deleted afterwards; it expires after a day unused if the command is killed.
Cloud Pub/Sub delivers it only the job's messages (a filter on the `job_id` attribute); every
message is checked too, since the emulator ignores filters and a filter holds 256 bytes at most.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from typing import Any

from worker import errors
from worker.cli.common import (
    EXIT_FAILED,
    EXIT_TRANSIENT,
    EXIT_USAGE,
    CommandError,
    check_credentials,
    check_reachable,
    job_of,
)
from worker.config import Settings
from worker.jobs import STATUS_FAILED, Job
from worker.notify import PubSubPublisher

MAX_FILTER_BYTES = 256  # Pub/Sub's limit on a subscription filter
WAIT_SUBSCRIPTION_TTL_S = 24 * 3600  # the shortest expiration Pub/Sub takes
PULL_TIMEOUT_S = 30.0


def job_filter(job_id: str) -> str | None:
    """The subscription filter that passes the job's messages alone; None when it would be longer
    than Pub/Sub takes (a job id near 256 bytes)."""
    quoted = job_id.replace("\\", "\\\\").replace('"', '\\"')
    text = f'attributes.job_id = "{quoted}"'
    return text if len(text.encode()) <= MAX_FILTER_BYTES else None


def submit_command(args: argparse.Namespace, settings: Settings) -> int:
    try:
        job = job_of(args, local=False)
        jobs_topic = _topic(settings, args.topic or settings.jobs_topic, "--topic or WORKER_JOBS_TOPIC")
        results_topic = ""
        if args.wait:
            name = args.results_topic or settings.results_topic
            results_topic = _topic(settings, name, "--results-topic or WORKER_RESULTS_TOPIC")
    except (errors.InvalidJob, ValueError) as e:
        raise CommandError(str(e), EXIT_USAGE) from None
    check_reachable(os.environ, "PUBSUB_EMULATOR_HOST")
    check_credentials(os.environ, "PUBSUB_EMULATOR_HOST")
    data = json.dumps(job.to_json()).encode()
    publisher = PubSubPublisher(jobs_topic, var="--topic / WORKER_JOBS_TOPIC", what="job")
    try:
        if not args.wait:
            publisher.publish(data, {})
            print(json.dumps({"job_id": job.job_id, "topic": jobs_topic, "manifest": str(job.manifest_uri)}, indent=2))
            return 0
        completion = _publish_and_wait(job, data, publisher, results_topic, args.timeout)
    except errors.TransientError as e:
        raise CommandError(str(e), EXIT_TRANSIENT) from None
    except errors.PermanentError as e:
        raise CommandError(str(e), EXIT_USAGE) from None
    print(json.dumps(completion, indent=2))
    if completion.get("status") == STATUS_FAILED:
        error = completion.get("error") or {}
        print(f"error: job {job.job_id} FAILED ({error.get('code')}): {error.get('message')}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _topic(settings: Settings, name: str, where: str) -> str:
    if not name:
        raise ValueError(f"no topic: give {where}")
    if name.startswith("projects/"):
        return name
    if not settings.project:
        raise ValueError(f"topic {name!r} is a bare name: set GOOGLE_CLOUD_PROJECT too, or give projects/P/topics/T")
    return f"projects/{settings.project}/topics/{name}"


def _publish_and_wait(
    job: Job, data: bytes, publisher: PubSubPublisher, results_topic: str, timeout_s: float
) -> dict[str, Any]:
    from google.api_core import exceptions as gexc
    from google.cloud import pubsub_v1

    subscriber = pubsub_v1.SubscriberClient()
    project = results_topic.split("/")[1]
    subscription = subscriber.subscription_path(project, f"embedded-tf-wait-{uuid.uuid4().hex[:12]}")
    request: dict[str, Any] = {
        "name": subscription,
        "topic": results_topic,
        "ack_deadline_seconds": 60,
        "expiration_policy": {"ttl": {"seconds": WAIT_SUBSCRIPTION_TTL_S}},
    }
    wanted = job_filter(job.job_id)
    if wanted is not None:
        request["filter"] = wanted
    try:
        subscriber.create_subscription(request=request)
    except gexc.NotFound as e:
        raise errors.TransientError(f"results topic {results_topic} does not exist — create it or fix the topic") from e
    except gexc.GoogleAPIError as e:
        raise errors.TransientError(f"cannot subscribe to {results_topic}: {e}") from e
    try:
        publisher.publish(data, {})
        print(f"submitted job {job.job_id}; waiting for its completion on {results_topic}", file=sys.stderr)
        return _wait(subscriber, subscription, job, timeout_s)
    finally:
        with contextlib.suppress(gexc.GoogleAPIError):  # else it expires after a day unused
            subscriber.delete_subscription(request={"subscription": subscription})
        subscriber.close()


def _wait(subscriber: Any, subscription: str, job: Job, timeout_s: float) -> dict[str, Any]:
    """The job's completion, read from `subscription`; every message read is acknowledged."""
    from google.api_core import exceptions as gexc

    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    while deadline is None or time.monotonic() < deadline:
        left = PULL_TIMEOUT_S if deadline is None else max(0.1, min(PULL_TIMEOUT_S, deadline - time.monotonic()))
        try:
            reply = subscriber.pull(request={"subscription": subscription, "max_messages": 10}, timeout=left)
        except (gexc.DeadlineExceeded, gexc.ServiceUnavailable):
            continue
        if reply.received_messages:
            ack_ids = [m.ack_id for m in reply.received_messages]
            subscriber.acknowledge(request={"subscription": subscription, "ack_ids": ack_ids})
        for received in reply.received_messages:
            message = received.message
            if message.attributes.get("job_id") != job.job_id:
                continue  # another job's (the emulator applies no filter)
            try:
                completion = json.loads(message.data)
            except ValueError:
                completion = None
            if isinstance(completion, dict):
                return completion
    raise errors.TransientError(
        f"no completion of job {job.job_id} within {timeout_s:g}s — it may still be running: its manifest will be "
        f"{job.manifest_uri}"
    )
