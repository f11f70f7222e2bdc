"""The composition root: the one place that builds the worker's collaborators from `Settings` —
store, models, publishers — for every door (event handler, HTTP handler, CLI), and runs jobs and
triggers with them."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Protocol

from worker import errors, events, logs, triggers
from worker.config import Settings
from worker.jobs import STATUS_FAILED, Job
from worker.manifest import failure
from worker.models import ModelStore, StoreModelProvider, make_loader
from worker.notify import PubSubPublisher
from worker.parts import give_up_part, run
from worker.pipeline import Limits, Outcome, ProgressFn, Publisher, Store
from worker.serving import ServingStats
from worker.uris import Uri

log = logging.getLogger(__name__)


class JobStore(Store, ModelStore, Protocol):
    """All a runtime needs of storage: `GcsStore`, or `LocalStore` for the command line's local paths."""

    def read_bytes(self, uri: Uri) -> bytes: ...


def store_for(settings: Settings, *, local: bool = False) -> JobStore:
    """Cloud Storage (or its emulator, STORAGE_EMULATOR_HOST), or with `local` the local disk."""
    if local:
        from worker.storage.local import LocalStore

        return LocalStore()
    from worker.storage import GcsStore

    return GcsStore.from_environment(
        settings.project,
        environ=os.environ,
        download_threads=settings.download_threads,
        # A download and an upload per file in flight, model files, leases and manifests.
        concurrent_requests=2 * settings.file_concurrency + settings.download_threads + 4,
        retry_s=settings.storage_retry_seconds,
    )


@dataclass
class Runtime:
    settings: Settings
    store: JobStore
    models: StoreModelProvider
    publisher: Publisher | None
    dispatcher: Publisher | None = None  # the jobs topic, for the parts of a job run as parts

    @classmethod
    def from_settings(cls, settings: Settings, *, publish: bool = True, local: bool = False) -> Runtime:
        """The runtime of a process; with `local`, of the command line's run on local paths."""
        store = store_for(settings, local=local)
        stats = ServingStats()
        models = StoreModelProvider(
            store,
            make_loader(settings, stats),
            settings.work_dir,
            max_models=settings.max_models,
            max_disk_bytes=settings.max_model_disk_mb * 2**20,
            stats=stats,
        )
        topic, jobs = settings.results_topic_path, settings.jobs_topic_path
        publisher = PubSubPublisher(topic) if publish and topic else None
        dispatcher = PubSubPublisher(jobs, var="WORKER_JOBS_TOPIC", what="part job") if publish and jobs else None
        return cls(settings, store, models, publisher, dispatcher)

    @property
    def limits(self) -> Limits:
        return Limits(
            batch_size=self.settings.batch_size,
            max_batch_bytes=self.settings.max_batch_bytes,
            max_line_bytes=self.settings.max_line_bytes,
            lease_s=float(self.settings.lease_seconds),
            file_concurrency=self.settings.file_concurrency,
            min_piece_bytes=self.settings.min_piece_bytes,
        )

    def run_job(self, job: Job, *, progress: ProgressFn | None = None) -> Outcome:
        with logs.bound(job_id=job.job_id):
            log.info("starting job %s: %s → %s with model %s", job.job_id, job.input, job.output, job.model)
            outcome = run(
                job,
                store=self.store,
                models=self.models,
                publisher=self.publisher,
                limits=self.limits,
                progress=progress,
                dispatcher=self.dispatcher,
            )
            log.info("serving counters: %s", self.models.stats.snapshot())
            return outcome

    def close(self) -> None:
        """Stop every model server and unload every model (process exit)."""
        self.models.close()

    def handle(self, trigger: events.Trigger) -> Outcome | None:
        """Run what a trigger asks for; None when there is nothing to do."""
        if isinstance(trigger, events.Ignored):
            log.info("event ignored: %s", trigger.reason)
            return None
        if isinstance(trigger, events.ObjectTrigger):
            job = self.job_for_object(trigger)
            if job is None:
                return None
        else:
            job = trigger.job
        return self.run_job(job)

    def job_for_object(self, obj: events.ObjectTrigger) -> Job | None:
        return triggers.job_for_object(obj, self.settings, self.store.read_bytes)

    def report_failure(
        self, job_id: str, error: errors.WorkerError, context: dict[str, Any], *, job: Job | None = None
    ) -> dict[str, Any]:
        """Publish FAILED for an event that never became a runnable job (malformed message), or
        whose job failed transiently on its message's last delivery. The part of a job run as
        parts writes its FAILED manifest instead: the whole job's completion, once the other parts
        are done, says that it failed and why."""
        report = {"job_id": job_id, "status": STATUS_FAILED, "error": failure(error.code, str(error)), **context}
        with logs.bound(job_id=job_id):
            log.error("job failed: %s", error)
            if job is not None and job.options.part is not None:
                give_up_part(job, self.store, self.publisher, report["error"])
            elif self.publisher is not None:
                self.publisher.publish(json.dumps(report).encode(), {"job_id": job_id, "status": STATUS_FAILED})
        return report
