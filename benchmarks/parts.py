"""One job against the same job with `parts`: a tree of small files, and the same lines in one file
(cut into pieces for the parts), the MLP, on two worker processes behind a round-robin pusher — a
loop that pulls the jobs topic of the Pub/Sub emulator and POSTs each message to the next worker, as
Cloud Run spreads pushes over its instances — against fake-gcs-server. Each figure is the time from
publishing the job to pulling its completion: the trip of a job with parts through Pub/Sub twice
(the job, then its parts) counts.

    PYTHONPATH=. .venv/bin/python -m benchmarks.parts            # under a minute
    PYTHONPATH=. .venv/bin/python -m benchmarks.parts --quick    # a smoke run

The jobs with and without parts alternate, after a warm-up that loads the model in both workers;
medians of --repeat jobs each.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from benchmarks.measure import (
    command_line,
    emit,
    median,
    parse_size,
    parse_with_defaults,
    table,
    tree_cpu_s,
    write_input,
)
from localdev import emulators, models

PROJECT = "bench"
FEATURES = 16


class Pusher:
    """Pulls the jobs subscription and POSTs each message, as a push subscription's body, to the
    workers in turn (each in a thread of its own, as concurrent pushes arrive)."""

    def __init__(self, subscriber: Any, subscription: str, urls: list[str]) -> None:
        self._subscriber = subscriber
        self._subscription = subscription
        self._urls = itertools.cycle(urls)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Pusher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                answer = self._subscriber.pull(subscription=self._subscription, max_messages=10, timeout=2)
            except Exception:  # the emulator's pull timing out when idle
                continue
            for received in answer.received_messages:
                threading.Thread(target=self._push, args=(received, next(self._urls)), daemon=True).start()

    def _push(self, received: Any, url: str) -> None:
        message = received.message
        body = {
            "message": {
                "data": base64.b64encode(message.data).decode(),
                "messageId": message.message_id,
                "attributes": dict(message.attributes),
            },
            "subscription": self._subscription,
        }
        r = requests.post(url + "/", json=body, timeout=600)
        ids = [received.ack_id]
        if r.status_code < 300:
            self._subscriber.acknowledge(subscription=self._subscription, ack_ids=ids)
        else:  # redelivered at once, as a push subscription retries
            self._subscriber.modify_ack_deadline(subscription=self._subscription, ack_ids=ids, ack_deadline_seconds=0)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    gcs, gcs_host = emulators.start_fake_gcs()
    pubsub, pubsub_host = emulators.start_pubsub_emulator()
    workers: list[tuple[emulators.Service, str]] = []
    try:
        os.environ.update(STORAGE_EMULATOR_HOST=gcs_host, PUBSUB_EMULATOR_HOST=pubsub_host, TF_CPP_MIN_LOG_LEVEL="2")
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import pubsub_v1, storage

        publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        jobs, results = publisher.topic_path(PROJECT, "jobs"), publisher.topic_path(PROJECT, "results")
        for topic in (jobs, results):
            publisher.create_topic(name=topic)
        pushed, completions = (subscriber.subscription_path(PROJECT, n) for n in ("jobs-pushed", "completions"))
        subscriber.create_subscription(name=pushed, topic=jobs, ack_deadline_seconds=600)
        subscriber.create_subscription(name=completions, topic=results, ack_deadline_seconds=60)
        client = storage.Client(project=PROJECT, credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
        with tempfile.TemporaryDirectory(prefix="embedded-tf-bench-") as tmp_dir:
            tmp = Path(tmp_dir)
            lines = _prepare(args, client, tmp)
            for k in range(2):
                env = {
                    "GOOGLE_CLOUD_PROJECT": PROJECT,
                    "WORKER_RESULTS_TOPIC": results,
                    "WORKER_JOBS_TOPIC": jobs,
                    "WORKER_SERVING": "tensorflow",
                    "WORKER_LOG_LEVEL": "WARNING",
                    "WORKER_WORK_DIR": str(tmp / f"worker-{k}"),
                    # So that the quick run's file of 1 MB is cut too (10 MB is cut with the default).
                    "WORKER_MIN_PIECE_BYTES": str(64 * 1024),
                }
                workers.append(emulators.start_worker(env))
            services = [service for service, _ in workers] + [gcs]
            pids = [service.proc.pid for service in services if service.proc is not None]

            def job(inp: str, options: dict[str, Any]) -> tuple[float, float]:
                job_id = uuid.uuid4().hex[:12]
                body = {"model": "gs://bench-models/mlp/", "input": inp, "output": f"gs://bench-data/out/{job_id}/"}
                cpu, started = tree_cpu_s(pids), time.perf_counter()
                data = json.dumps({**body, "job_id": job_id, "options": options}).encode()
                publisher.publish(jobs, data).result(timeout=60)
                manifest = completion_data(subscriber, completions, job_id)
                took = time.perf_counter() - started
                if manifest["status"] != "SUCCEEDED" or manifest["totals"]["instances"] != lines[inp]:
                    raise RuntimeError(f"job {job_id}: {json.dumps(manifest)[:500]}")
                return took, tree_cpu_s(pids) - cpu

            tree, one, small = "gs://bench-data/tree/", "gs://bench-data/one.jsonl", "gs://bench-data/small/"
            with Pusher(subscriber, pushed, [url for _, url in workers]):
                job(small, {"parts": 2})  # the model loaded in both workers
                job(tree, {})
                ways = {"one job": {}, f"parts: {args.parts}": {"parts": args.parts}}
                runs: dict[str, list[tuple[float, float]]] = {
                    f"{what}, {way}": [] for what in ("tree", "one file") for way in ways
                }
                for _ in range(args.repeat):
                    for what, inp in (("tree", tree), ("one file", one)):
                        for way, options in ways.items():
                            runs[f"{what}, {way}"].append(job(inp, options))
        return {
            "instances": lines[tree],
            "files": args.files,
            "runs": {
                k: {"seconds": median(t for t, _ in v), "cpu_s": median(c for _, c in v)} for k, v in runs.items()
            },
        }
    finally:
        for service, _ in workers:
            service.stop()
        pubsub.stop()
        gcs.stop()


def _prepare(args: argparse.Namespace, client: Any, tmp: Path) -> dict[str, int]:
    """The model, the tree of --files files, and two small files; instances per input."""
    client.create_bucket("bench-models")
    data = client.create_bucket("bench-data")
    models.upload_folder(client, models.build_mlp(tmp / "mlp"), "bench-models", "mlp/1")
    path = tmp / "input.jsonl"
    write_input(path, parse_size(args.size), features=FEATURES)
    lines = path.read_bytes().splitlines(keepends=True)
    per = -(-len(lines) // args.files)
    for i in range(args.files):
        data.blob(f"tree/d{i % 10}/part-{i:04d}.jsonl").upload_from_string(b"".join(lines[i * per : (i + 1) * per]))
    data.blob("one.jsonl").upload_from_string(b"".join(lines))
    for i, name in enumerate(("a", "b")):
        data.blob(f"small/{name}.jsonl").upload_from_string(b"".join(lines[i * 10 : (i + 1) * 10]))
    return {"gs://bench-data/tree/": len(lines), "gs://bench-data/one.jsonl": len(lines), "gs://bench-data/small/": 20}


def completion_data(subscriber: Any, subscription: str, job_id: str, timeout_s: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = subscriber.pull(subscription=subscription, max_messages=10, timeout=10)
        if answer.received_messages:
            subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in answer.received_messages])
        for received in answer.received_messages:
            if received.message.attributes.get("job_id") == job_id:
                manifest: dict[str, Any] = json.loads(received.message.data)
                return manifest
    raise RuntimeError(f"no completion for job {job_id} within {timeout_s:g} s")


def report(args: argparse.Namespace, results: dict[str, Any]) -> str:
    runs = results["runs"]
    rows = [
        [name, f"{r['seconds']:.3f}", f"{results['instances'] / r['seconds']:,.0f}", f"{r['cpu_s']:.2f}",
         f"{runs[name.split(',')[0] + ', one job']['seconds'] / r['seconds']:.2f}×"]
        for name, r in runs.items()
    ]  # fmt: skip
    head = (
        f"{args.size} ({results['instances']:,} lines) in a tree of {results['files']} files and in one file, the "
        f"MLP, two worker processes; medians of {args.repeat} jobs each:\n\n"
    )
    headers = ["input, job", "seconds", "instances/s", "CPU s (workers + fake-gcs-server)", "÷ one job"]
    return head + table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = command_line(__doc__, "10 files of 1MB in all, 1 job each way")
    parser.add_argument("--files", type=int, help="files in the tree (default: 100)")
    parser.add_argument("--size", help="input size in all (default: 10MB)")
    parser.add_argument("--parts", type=int, help="parts of the job sent with parts (default: 2)")
    parser.add_argument("--repeat", type=int, help="jobs each way; medians are reported (default: 6)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parse_with_defaults(
        parser,
        argv,
        quick={"files": 10, "size": "1MB", "parts": 2, "repeat": 1},
        full={"files": 100, "size": "10MB", "parts": 2, "repeat": 6},
    )
    results = measure(args)
    emit(report(args, results), results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
