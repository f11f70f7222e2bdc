"""The embedded default, end to end on this machine: local GCS and Pub/Sub emulators, an example
model built with TensorFlow, a job published to Pub/Sub and pushed to the worker served by
functions-framework, then the completion message and a few output lines printed.

Run: make demo   (or: PYTHONPATH=. .venv/bin/python -m localdev.demo)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from localdev import emulators, models

PROJECT = "demo-project"


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def main() -> int:
    say("starting the Pub/Sub emulator and fake-gcs-server on 127.0.0.1")
    pubsub, pubsub_host = emulators.start_pubsub_emulator()
    gcs, gcs_host = emulators.start_fake_gcs()
    services = [pubsub, gcs]
    try:
        os.environ.update(PUBSUB_EMULATOR_HOST=pubsub_host, STORAGE_EMULATOR_HOST=gcs_host)
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import pubsub_v1, storage

        client = storage.Client(project=PROJECT, credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
        for name in ("demo-models", "demo-data"):
            client.create_bucket(name)

        say("building an example SavedModel (16 floats → 3 scores) and uploading it to gs://demo-models/mlp/1/")
        with tempfile.TemporaryDirectory() as tmp:
            models.build_mlp(f"{tmp}/mlp")
            models.upload_folder(client, f"{tmp}/mlp", "demo-models", "mlp/1")

        say("uploading 250 instances to gs://demo-data/in/ (two files, one in a subfolder)")
        rows = [json.dumps(r) for r in models.mlp_instances(250)]
        data = client.bucket("demo-data")
        data.blob("in/part-0.jsonl").upload_from_string("\n".join(rows[:150]) + "\n")
        data.blob("in/2026/part-1.jsonl").upload_from_string("\n".join(rows[150:]) + "\n")

        publisher = pubsub_v1.PublisherClient()
        subscriber = pubsub_v1.SubscriberClient()
        jobs, results = publisher.topic_path(PROJECT, "jobs"), publisher.topic_path(PROJECT, "results")
        publisher.create_topic(name=jobs)
        publisher.create_topic(name=results)
        results_sub = subscriber.subscription_path(PROJECT, "results-pull")
        subscriber.create_subscription(name=results_sub, topic=results)

        say("starting the worker (functions-framework, target handle_event)")
        work_dir = tempfile.mkdtemp(prefix="embedded-tf-")
        worker, url = emulators.start_worker(
            {
                "PUBSUB_EMULATOR_HOST": pubsub_host,
                "STORAGE_EMULATOR_HOST": gcs_host,
                "GOOGLE_CLOUD_PROJECT": PROJECT,
                "WORKER_RESULTS_TOPIC": "results",
                "WORKER_WORK_DIR": work_dir,
            }
        )
        services.append(worker)
        subscriber.create_subscription(
            request={
                "name": subscriber.subscription_path(PROJECT, "jobs-push"),
                "topic": jobs,
                "push_config": {"push_endpoint": url + "/"},
                "ack_deadline_seconds": 600,
            }
        )

        job = {"model": "gs://demo-models/mlp/", "input": "gs://demo-data/in/", "output": "gs://demo-data/out/"}
        message_id = publisher.publish(jobs, json.dumps(job).encode()).result(timeout=30)
        say(f"published job {message_id} to {jobs}: {json.dumps(job)}")

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            resp = subscriber.pull(request={"subscription": results_sub, "max_messages": 1}, timeout=10)
            if resp.received_messages:
                m = resp.received_messages[0]
                subscriber.acknowledge(request={"subscription": results_sub, "ack_ids": [m.ack_id]})
                say(f"completion message on {results}, attributes {dict(m.message.attributes)}:")
                print(json.dumps(json.loads(m.message.data), indent=2))
                break
        else:
            print(f"no completion message after 180 s; worker log:\n{worker.log_tail()}", file=sys.stderr)
            return 1

        say("first 3 lines of gs://demo-data/out/part-0.jsonl:")
        for line in data.blob("out/part-0.jsonl").download_as_text().splitlines()[:3]:
            print(line)
        return 0
    finally:
        say("stopping the worker and the emulators")
        for s in reversed(services):
            s.stop()


if __name__ == "__main__":
    raise SystemExit(main())
