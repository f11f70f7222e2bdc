"""A local cloud on 127.0.0.1: fake-gcs-server and the Pub/Sub emulator, the example model and 250
instances in buckets, the jobs and results topics, and the worker served by functions-framework
with a push subscription on the jobs topic — what `make demo` runs one job through, and what
`make local` keeps running for a person to use from another terminal."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from localdev import emulators, models

PROJECT = "local-project"
MODELS_BUCKET, DATA_BUCKET = "demo-models", "demo-data"


@dataclass
class LocalCloud:
    project: str
    pubsub_host: str
    gcs_host: str
    jobs_topic: str
    results_topic: str
    results_subscription: str  # a pull subscription on the results topic
    worker_url: str
    worker: Any
    services: list[Any] = field(default_factory=list)

    @property
    def exports(self) -> dict[str, str]:
        """The settings that point the client libraries and `embedded-tf` at this cloud."""
        return {
            "STORAGE_EMULATOR_HOST": self.gcs_host,
            "PUBSUB_EMULATOR_HOST": self.pubsub_host,
            "GOOGLE_CLOUD_PROJECT": self.project,
            "WORKER_JOBS_TOPIC": self.jobs_topic,
            "WORKER_RESULTS_TOPIC": self.results_topic,
        }

    def stop(self) -> None:
        for s in reversed(self.services):
            s.stop()


def start(say: Callable[[str], None], *, project: str = PROJECT) -> LocalCloud:
    """Start everything; on a failure part way, stop what was started and raise."""
    say("starting the Pub/Sub emulator and fake-gcs-server on 127.0.0.1")
    services: list[Any] = []
    try:
        pubsub, pubsub_host = emulators.start_pubsub_emulator()
        services.append(pubsub)
        gcs, gcs_host = emulators.start_fake_gcs()
        services.append(gcs)
        os.environ.update(PUBSUB_EMULATOR_HOST=pubsub_host, STORAGE_EMULATOR_HOST=gcs_host)
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import pubsub_v1, storage

        client = storage.Client(project=project, credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
        for name in (MODELS_BUCKET, DATA_BUCKET):
            client.create_bucket(name)

        say(f"building an example SavedModel (16 floats → 3 scores) and uploading it to gs://{MODELS_BUCKET}/mlp/1/")
        with tempfile.TemporaryDirectory() as tmp:
            models.build_mlp(f"{tmp}/mlp")
            models.upload_folder(client, f"{tmp}/mlp", MODELS_BUCKET, "mlp/1")

        say(f"uploading 250 instances to gs://{DATA_BUCKET}/in/ (two files, one in a subfolder)")
        rows = [json.dumps(r) for r in models.mlp_instances(250)]
        data = client.bucket(DATA_BUCKET)
        data.blob("in/part-0.jsonl").upload_from_string("\n".join(rows[:150]) + "\n")
        data.blob("in/2026/part-1.jsonl").upload_from_string("\n".join(rows[150:]) + "\n")

        publisher = pubsub_v1.PublisherClient()
        subscriber = pubsub_v1.SubscriberClient()
        jobs, results = publisher.topic_path(project, "jobs"), publisher.topic_path(project, "results")
        publisher.create_topic(name=jobs)
        publisher.create_topic(name=results)
        results_sub = subscriber.subscription_path(project, "results-pull")
        subscriber.create_subscription(name=results_sub, topic=results)

        say("starting the worker (functions-framework, target handle_event)")
        work_dir = tempfile.mkdtemp(prefix="embedded-tf-")
        worker, url = emulators.start_worker(
            {
                "PUBSUB_EMULATOR_HOST": pubsub_host,
                "STORAGE_EMULATOR_HOST": gcs_host,
                "GOOGLE_CLOUD_PROJECT": project,
                "WORKER_RESULTS_TOPIC": "results",
                "WORKER_JOBS_TOPIC": "jobs",  # jobs with options.parts come back as their parts
                "WORKER_WORK_DIR": work_dir,
            },
            owns=(work_dir,),
        )
        services.append(worker)
        subscriber.create_subscription(
            request={
                "name": subscriber.subscription_path(project, "jobs-push"),
                "topic": jobs,
                "push_config": {"push_endpoint": url + "/"},
                "ack_deadline_seconds": 600,
            }
        )
    except BaseException:
        for s in reversed(services):
            s.stop()
        raise
    return LocalCloud(project, pubsub_host, gcs_host, jobs, results, results_sub, url, worker, services)
