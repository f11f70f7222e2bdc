"""What becomes of a delivered event: acknowledged (handled, or its failure reported) or redelivered
(raised). Pub/Sub and Eventarc redeliver whatever is not acknowledged, for a day or up to a
subscription's max delivery attempts, so a permanent failure is reported FAILED and acknowledged,
and a transient one is raised — unless this delivery is the event's last, when the job is reported
FAILED first, so that whoever waits for its completion hears of it."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any, Protocol

from worker import errors, events
from worker.config import Settings
from worker.jobs import Job

log = logging.getLogger("worker")


class Handler(Protocol):
    """What a delivery needs of the runtime."""

    settings: Settings

    def handle(self, trigger: events.Trigger) -> Any: ...
    def job_for_object(self, obj: events.ObjectTrigger) -> Job | None: ...
    def report_failure(
        self, job_id: str, error: errors.WorkerError, context: dict[str, Any], *, job: Job | None = None
    ) -> dict[str, Any]: ...


def deliver(rt: Handler, attributes: dict[str, Any], data: Any) -> None:
    """Handle one delivery of an event; return to acknowledge it, raise to have it redelivered.
    Permanent failures are reported (FAILED) and acknowledged; transient ones raised, except on the
    event's last delivery, where the job is reported FAILED first; a job another run holds is
    waited out on the last delivery, then tried once more; a bug is reported once, not retried."""
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


def _last_delivery(rt: Handler, attributes: dict[str, Any], data: Any) -> LastDelivery | None:
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


def _waited_out_lease(rt: Handler, busy: errors.Busy, attributes: dict[str, Any], data: Any) -> bool:
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
    rt: Handler,
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


def _job_of(rt: Handler, trigger: events.Trigger | None) -> Job | None:
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
