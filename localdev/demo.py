"""The embedded default, end to end on this machine: local GCS and Pub/Sub emulators, an example
model built with TensorFlow, a job published to Pub/Sub and pushed to the worker served by
functions-framework, then the completion message and a few output lines printed.

Run: make demo   (or: PYTHONPATH=. .venv/bin/python -m localdev.demo)
"""

from __future__ import annotations

import json
import sys
import time

from localdev import cloud

PROJECT = "demo-project"


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def main() -> int:
    local = cloud.start(say, project=PROJECT)
    try:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import pubsub_v1, storage

        publisher = pubsub_v1.PublisherClient()
        subscriber = pubsub_v1.SubscriberClient()
        jobs, results, results_sub = local.jobs_topic, local.results_topic, local.results_subscription
        client = storage.Client(project=PROJECT, credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
        data = client.bucket(cloud.DATA_BUCKET)
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
            print(f"no completion message after 180 s; worker log:\n{local.worker.log_tail()}", file=sys.stderr)
            return 1

        say("first 3 lines of gs://demo-data/out/part-0.jsonl:")
        for line in data.blob("out/part-0.jsonl").download_as_text().splitlines()[:3]:
            print(line)
        return 0
    finally:
        say("stopping the worker and the emulators")
        local.stop()


if __name__ == "__main__":
    raise SystemExit(main())
