"""Files dropped into a bucket, delivered the ways Google Cloud delivers them: fake-gcs-server's
object notifications through the Pub/Sub emulator (push subscription → worker), and the same
notifications turned by a small bridge into binary-mode Eventarc CloudEvents. Duplicates,
concurrent duplicates, and a worker killed in the middle of a job."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from localdev import emulators, models
from tests.conftest import (
    PROJECT,
    PubSubTopology,
    create_topology,
    read_lines,
    storage_event_headers,
    worker_env,
    write_lines,
)
from tests.outputs import assert_same_predictions

pytestmark = pytest.mark.integration


@dataclass
class DropWorld:
    """A fake-gcs-server that notifies `notify_topic`, a bucket with the model, a worker."""

    gcs: Any  # storage.Client on this fake-gcs-server
    gcs_host: str
    bucket: str
    notify_topic: str
    topology: PubSubTopology
    worker_url: str
    worker: emulators.Service
    env: dict[str, str]

    def subscribe(self, *, push: bool) -> str:
        from google.cloud import pubsub_v1

        subscriber = pubsub_v1.SubscriberClient()
        name = subscriber.subscription_path(PROJECT, f"notify-{uuid.uuid4().hex[:8]}")
        request: dict[str, Any] = {"name": name, "topic": self.notify_topic, "ack_deadline_seconds": 600}
        if push:
            request["push_config"] = {"push_endpoint": self.worker_url + "/"}
        subscriber.create_subscription(request=request)
        return name

    def drop(self, name: str, lines: list[str]) -> None:
        write_lines(self.gcs, f"gs://{self.bucket}/{name}", lines)


def _storage_client(host: str) -> Any:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    # An explicit endpoint wins over STORAGE_EMULATOR_HOST (the session's other server).
    return storage.Client(project=PROJECT, credentials=AnonymousCredentials(), client_options={"api_endpoint": host})


@pytest.fixture(scope="module")
def drop_world(
    pubsub_host: str, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DropWorld]:
    from google.cloud import pubsub_v1

    notify_topic = pubsub_v1.PublisherClient().topic_path(PROJECT, f"gcs-notify-{uuid.uuid4().hex[:8]}")
    pubsub_v1.PublisherClient().create_topic(name=notify_topic)
    gcs, gcs_host = emulators.start_fake_gcs(
        pubsub_host=pubsub_host, project=PROJECT, topic=notify_topic.rsplit("/", 1)[-1]
    )
    try:
        client = _storage_client(gcs_host)
        bucket = f"drop-{uuid.uuid4().hex[:8]}"
        client.create_bucket(bucket)
        models.upload_folder(client, model_dirs["mlp"], bucket, "models/mlp/1")
        topology = create_topology()
        env = worker_env(
            gcs_host,
            pubsub_host,
            topology,
            tmp_path_factory.mktemp("drop-work"),
            WORKER_MODEL=f"gs://{bucket}/models/mlp/",
            WORKER_INPUT=f"gs://{bucket}/in/",
            # Same bucket for outputs: the worker's own writes notify too and must not loop.
            WORKER_OUTPUT=f"gs://{bucket}/out/",
            WORKER_BATCH_SIZE="8",
            WORKER_LEASE_SECONDS="3",
        )
        worker, url = emulators.start_worker(env)
        try:
            yield DropWorld(client, gcs_host, bucket, notify_topic, topology, url, worker, env)
        finally:
            worker.stop()
    finally:
        gcs.stop()


def test_file_dropped_into_a_bucket_is_predicted_via_bucket_notifications(drop_world: DropWorld, model_dirs, reference):
    w = drop_world
    push = w.subscribe(push=True)
    try:
        instances = models.mlp_instances(11, seed=3)
        w.drop("in/a/b.jsonl", [json.dumps(i) for i in instances])
        [(manifest, attrs)] = w.topology.completions(1)
        # The outputs and manifest the worker wrote notify the same topic; none starts a job.
        assert w.topology.no_more_completions(wait_s=4) == []
    finally:
        from google.cloud import pubsub_v1

        pubsub_v1.SubscriberClient().delete_subscription(subscription=push)

    generation = w.gcs.bucket(w.bucket).get_blob("in/a/b.jsonl").generation
    assert attrs == {"job_id": f"{w.bucket}/in/a/b.jsonl#{generation}", "status": "SUCCEEDED"}
    assert manifest["files"][0]["output"] == f"gs://{w.bucket}/out/a/b.jsonl"
    assert manifest["totals"]["predictions"] == 11
    lines = read_lines(w.gcs, f"gs://{w.bucket}/out/a/b.jsonl")
    expected = reference(model_dirs["mlp"], instances)
    assert_same_predictions([line["prediction"] for line in lines], expected)
    stored = json.loads(w.gcs.bucket(w.bucket).blob("out/_manifests/a/b.jsonl.json").download_as_bytes())
    assert stored["job_id"] == attrs["job_id"]
    assert w.gcs.bucket(w.bucket).get_blob("out/_manifests/a/b.jsonl.json.lease") is None


def _bridge_events(w: DropWorld, subscription: str, name: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Pull fake-gcs-server's notifications and build the binary-mode CloudEvents Eventarc would
    deliver for `name`'s finalize: (headers, body) pairs."""
    from google.cloud import pubsub_v1

    subscriber = pubsub_v1.SubscriberClient()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        resp = subscriber.pull(request={"subscription": subscription, "max_messages": 20}, timeout=10)
        if resp.received_messages:
            subscriber.acknowledge(
                request={"subscription": subscription, "ack_ids": [m.ack_id for m in resp.received_messages]}
            )
        for m in resp.received_messages:
            a = m.message.attributes
            if a.get("eventType") == "OBJECT_FINALIZE" and a.get("objectId") == name:
                resource = json.loads(m.message.data)
                # Eventarc's object resource carries generation/size as strings.
                resource.update({k: str(resource[k]) for k in ("generation", "size") if k in resource})
                time_ = resource.get("updated") or resource["timeCreated"]  # as Eventarc sets it
                headers = storage_event_headers(a["bucketId"], a["objectId"], event_id=m.message.message_id, time=time_)
                return [{"headers": headers, "body": json.dumps(resource)}]
    raise AssertionError(f"no OBJECT_FINALIZE notification for {name} within {timeout_s}s")


def _post(url: str, event: dict[str, Any]) -> int:
    return requests.post(url + "/", headers=event["headers"], data=event["body"], timeout=120).status_code


def test_eventarc_event_and_its_duplicates_give_one_output_and_one_completion(drop_world: DropWorld):
    w = drop_world
    pull = w.subscribe(push=False)
    w.drop("in/e/c.jsonl", [json.dumps(i) for i in models.mlp_instances(40, seed=4)] + ["{broken"])
    [event] = _bridge_events(w, pull, "in/e/c.jsonl")

    # Three concurrent deliveries: one runs; the others are told to retry (5xx) or find it done.
    codes: list[int] = []
    threads = [threading.Thread(target=lambda: codes.append(_post(w.worker_url, event))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(1 for c in codes if c < 300) >= 1, codes
    assert all(c < 300 or c >= 500 for c in codes), codes
    # Three more in a row, after the fact: acknowledged, nothing recomputed or re-sent.
    assert [_post(w.worker_url, event) for _ in range(3)] == [200, 200, 200]

    [(manifest, attrs)] = w.topology.completions(1)
    assert w.topology.no_more_completions(wait_s=3) == []
    assert attrs["status"] == "PARTIALLY_SUCCEEDED"
    assert manifest["totals"] == {"lines": 41, "instances": 41, "predictions": 40, "errors": 1, "skipped": 0}
    lines = read_lines(w.gcs, f"gs://{w.bucket}/out/e/c.jsonl")
    assert len(lines) == 41 and lines[-1]["error"]["message"].startswith("line 41 is not valid JSON")


def test_a_worker_killed_mid_job_leaves_no_partial_output_and_the_retry_completes(
    drop_world: DropWorld, tmp_path_factory: pytest.TempPathFactory
):
    w = drop_world
    pull = w.subscribe(push=False)
    # Large enough that the job is still writing its output when the worker dies.
    instances = models.mlp_instances(200, seed=5)
    w.drop("in/k/big.jsonl", [json.dumps(instances[i % 200]) for i in range(60_000)])
    [event] = _bridge_events(w, pull, "in/k/big.jsonl")
    out = w.gcs.bucket(w.bucket)

    victim, url = emulators.start_worker({**w.env, "WORKER_LEASE_SECONDS": "4"})
    try:
        threading.Thread(target=_post_ignoring_death, args=(url, event), daemon=True).start()
        # Kill it once it is streaming predictions into the output (its per-file log line).
        deadline = time.monotonic() + 120
        while f"gs://{w.bucket}/in/k/big.jsonl (" not in victim.log_tail(200):
            assert time.monotonic() < deadline, "the job never started:\n" + victim.log_tail()
            time.sleep(0.1)
        time.sleep(1.5)
    finally:
        victim.kill()

    assert out.get_blob("out/_manifests/k/big.jsonl.json") is None, "the job finished before the kill"
    assert out.get_blob("out/k/big.jsonl") is None  # the unfinished upload is invisible
    assert out.get_blob("out/_manifests/k/big.jsonl.json.lease") is not None  # the dead holder's lease

    # Redelivered at once: the lease is still held, so a retryable answer (not an ack).
    assert _post(w.worker_url, event) >= 500
    time.sleep(4.5)  # the dead holder's lease expires; the next redelivery takes over
    assert _post(w.worker_url, event) == 200
    [(manifest, attrs)] = w.topology.completions(1)
    assert attrs["status"] == "SUCCEEDED" and manifest["totals"]["predictions"] == 60_000
    assert len(read_lines(w.gcs, f"gs://{w.bucket}/out/k/big.jsonl")) == 60_000


def _post_ignoring_death(url: str, event: dict[str, Any]) -> None:
    with contextlib.suppress(requests.RequestException):  # the worker is killed while answering
        _post(url, event)


def test_a_dropped_csv_file_through_eventarc_writes_json_lines_beside_its_manifest(drop_world: DropWorld):
    """A CSV file dropped into the bucket: its Eventarc event is a job like any dropped file's, read
    by its name as CSV; its output is JSON lines (`.jsonl` appended) and starts nothing itself."""
    w = drop_world
    pull = w.subscribe(push=False)
    rows = models.mlp_instances(5, seed=8)
    w.drop("in/csv/rows.csv", [",".join(f"f{k}" for k in range(16))] + [",".join(map(str, r)) for r in rows])
    [event] = _bridge_events(w, pull, "in/csv/rows.csv")
    assert _post(w.worker_url, event) == 200
    [(manifest, attrs)] = w.topology.completions(1)
    assert attrs["status"] == "SUCCEEDED", manifest
    assert manifest["totals"] == {"lines": 6, "instances": 5, "predictions": 5, "errors": 0, "skipped": 1}
    assert manifest["files"][0]["output"] == f"gs://{w.bucket}/out/csv/rows.csv.jsonl"
    assert manifest["manifest"] == f"gs://{w.bucket}/out/_manifests/csv/rows.csv.json"
    lines = read_lines(w.gcs, f"gs://{w.bucket}/out/csv/rows.csv.jsonl")
    assert [line["instance"] for line in lines] == rows
