"""Session fixtures: real fake-gcs-server and Pub/Sub emulator on free ports, SavedModels built
by TensorFlow once, the worker served by functions-framework. Everything is stopped by pid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from localdev import emulators, models

PROJECT = "test-project"


def _emulator(start: Any, env_var: str) -> Iterator[str]:
    """Start an emulator, point the client libraries at it for the session, stop it by pid."""
    service, host = start()
    os.environ[env_var] = host
    try:
        yield host
    finally:
        service.stop()
        os.environ.pop(env_var, None)


@pytest.fixture(scope="session")
def pubsub_host() -> Iterator[str]:
    yield from _emulator(emulators.start_pubsub_emulator, "PUBSUB_EMULATOR_HOST")


@pytest.fixture(scope="session")
def gcs_host() -> Iterator[str]:
    yield from _emulator(emulators.start_fake_gcs, "STORAGE_EMULATOR_HOST")


@pytest.fixture(scope="session")
def storage_client(gcs_host: str) -> Any:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project=PROJECT, credentials=AnonymousCredentials())


def make_bucket(client: Any, prefix: str = "b") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    client.create_bucket(name)
    return name


@pytest.fixture
def bucket(storage_client: Any) -> str:
    """A fresh, empty bucket per test."""
    return make_bucket(storage_client)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: build(root / name) for name, build in models.BUILDERS.items()}


@pytest.fixture(scope="session")
def model_uris(storage_client: Any, model_dirs: dict[str, Path]) -> dict[str, str]:
    """Each model under gs://models-…/NAME/VERSION/, and the base path NAME/ as the job's model."""
    bucket = make_bucket(storage_client, "models")
    uris = {}
    for name, path in model_dirs.items():
        models.upload_folder(storage_client, path, bucket, f"{name}/1")
        uris[name] = f"gs://{bucket}/{name}/"
    return uris


@pytest.fixture(scope="session")
def reference() -> Any:
    """Predictions straight from TensorFlow on the same SavedModel, to check outputs against."""
    from worker.serving.tf_backend import TensorFlowModel

    cache: dict[str, Any] = {}

    def predict(model_dir: Path, instances: list[Any]) -> list[Any]:
        key = str(model_dir)
        if key not in cache:
            cache[key] = TensorFlowModel(key, description=key).predictor("serving_default")
        return list(cache[key].predict(instances))

    return predict


def run_local_cli(
    argv: list[str], work_dir: Path, *, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """`python -m worker ARGV` on local paths as a person runs it: no emulator, no credentials and
    no metadata server probed (NO_GCE_CHECK)."""
    base = {k: v for k, v in os.environ.items() if not k.endswith("_EMULATOR_HOST")}
    root = str(Path(__file__).resolve().parents[1])
    return subprocess.run(
        [sys.executable, "-m", "worker", *argv],
        env={**base, "PYTHONPATH": root, "NO_GCE_CHECK": "true", "WORKER_WORK_DIR": str(work_dir), **env},
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
    )


def write_lines(client: Any, uri: str, lines: list[str]) -> None:
    bucket, _, name = uri[len("gs://") :].partition("/")
    client.bucket(bucket).blob(name).upload_from_string("".join(line + "\n" for line in lines))


def storage_event_headers(bucket: str, name: str, *, event_id: str, time: str) -> dict[str, str]:
    """The headers of the binary-mode CloudEvent Eventarc delivers for an object's finalize (its
    body is the object resource, `generation` and `size` as strings); `time`: the object's."""
    return {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-type": "google.cloud.storage.object.v1.finalized",
        "ce-source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
        "ce-subject": f"objects/{name}",
        "ce-time": time,
        "content-type": "application/json",
    }


def read_lines(client: Any, uri: str) -> list[Any]:
    bucket, _, name = uri[len("gs://") :].partition("/")
    text = client.bucket(bucket).blob(name).download_as_text()
    return [json.loads(line) for line in text.splitlines()]


@dataclass
class PubSubTopology:
    project: str
    jobs_topic: str
    results_topic: str
    results_subscription: str

    def publish_job(self, job: dict[str, Any] | bytes, **attributes: str) -> str:
        from google.cloud import pubsub_v1

        data = job if isinstance(job, bytes) else json.dumps(job).encode()
        publisher = pubsub_v1.PublisherClient()
        return str(publisher.publish(self.jobs_topic, data, **attributes).result(timeout=30))

    def completions(self, count: int = 1, timeout_s: float = 120.0) -> list[tuple[dict[str, Any], dict[str, str]]]:
        """Pull `count` completion messages (data, attributes) from the results topic."""
        from google.cloud import pubsub_v1

        subscriber = pubsub_v1.SubscriberClient()
        got: list[tuple[dict[str, Any], dict[str, str]]] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < count and time.monotonic() < deadline:
            resp = subscriber.pull(request={"subscription": self.results_subscription, "max_messages": 10}, timeout=10)
            if resp.received_messages:
                subscriber.acknowledge(
                    request={
                        "subscription": self.results_subscription,
                        "ack_ids": [m.ack_id for m in resp.received_messages],
                    }
                )
            for m in resp.received_messages:
                got.append((json.loads(m.message.data), dict(m.message.attributes)))
        return got

    def no_more_completions(self, wait_s: float = 3.0) -> list[Any]:
        from google.cloud import pubsub_v1

        subscriber = pubsub_v1.SubscriberClient()
        time.sleep(wait_s)
        resp = subscriber.pull(request={"subscription": self.results_subscription, "max_messages": 10}, timeout=10)
        return list(resp.received_messages)


def create_topology() -> PubSubTopology:
    """Topics jobs-* and results-*, with a pull subscription on results."""
    from google.cloud import pubsub_v1

    suffix = uuid.uuid4().hex[:8]
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    jobs = publisher.topic_path(PROJECT, f"jobs-{suffix}")
    results = publisher.topic_path(PROJECT, f"results-{suffix}")
    publisher.create_topic(name=jobs)
    publisher.create_topic(name=results)
    results_sub = subscriber.subscription_path(PROJECT, f"results-{suffix}")
    subscriber.create_subscription(name=results_sub, topic=results)
    return PubSubTopology(PROJECT, jobs, results, results_sub)


def worker_env(
    gcs_host: str, pubsub_host: str, topology: PubSubTopology, work_dir: Path, **more: str
) -> dict[str, str]:
    """The environment of a worker on the emulators that publishes completions to `topology`."""
    return {
        "STORAGE_EMULATOR_HOST": gcs_host,
        "PUBSUB_EMULATOR_HOST": pubsub_host,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "WORKER_RESULTS_TOPIC": topology.results_topic,
        "WORKER_WORK_DIR": str(work_dir),
        **more,
    }


@pytest.fixture(scope="session")
def worker_service(
    pubsub_host: str, gcs_host: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, str, PubSubTopology]]:
    """The worker served over HTTP by functions-framework, fed by a push subscription."""
    # The results topic must exist before the worker starts publishing to it.
    topology = create_topology()
    env = worker_env(
        gcs_host,
        pubsub_host,
        topology,
        tmp_path_factory.mktemp("worker-work"),
        WORKER_BATCH_SIZE="8",
        WORKER_JOBS_TOPIC=topology.jobs_topic,  # a job with `parts` comes back as its parts
        WORKER_MIN_PIECE_BYTES="16384",  # so that a test's file of 64 kB is cut for parts
    )
    service, url = emulators.start_worker(env)
    from google.cloud import pubsub_v1

    subscriber = pubsub_v1.SubscriberClient()
    subscriber.create_subscription(
        request={
            "name": subscriber.subscription_path(PROJECT, f"jobs-push-{uuid.uuid4().hex[:8]}"),
            "topic": topology.jobs_topic,
            "push_config": {"push_endpoint": url + "/"},
            "ack_deadline_seconds": 600,
        }
    )
    try:
        yield service, url, topology
    finally:
        service.stop()
