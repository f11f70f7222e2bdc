"""Cold start by serving backend, side by side in one run: a new worker process served by
functions-framework, from its spawn to its port answering, and to a 10-line job done, behind the
TF Serving stand-in and with the in-process backend, in alternating rounds; with the peak RSS of
the worker's own processes (the model server's not counted: TF Serving's binary is its own).

Run: PYTHONPATH=. .venv/bin/python -m benchmarks.cold_start [--rounds 3]

The stand-in loads the model with TensorFlow in Python, as TF Serving's binary loads it in C++:
its time to a first prediction stands in for the real server's, not measures it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

from localdev import emulators, models

STANDIN = f"{sys.executable} -m localdev.tfserving_standin"


def _group_rss_mb(group: int) -> float:
    """Resident memory of the processes of a process group, but the model server's (MB)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
            status = (entry / "status").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[2]) != group or b"tfserving_standin" in cmdline:
            continue
        rss = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), "0")
        total += int(rss)
    return total / 1024


def _one(serving: str, gcs_host: str, model: str, inputs: str, output: str) -> dict[str, float]:
    work_dir = tempfile.mkdtemp(prefix="cold-")
    env = {"STORAGE_EMULATOR_HOST": gcs_host, "WORKER_WORK_DIR": work_dir, "WORKER_SERVING": serving}
    env["WORKER_MODEL_SERVER"] = STANDIN
    started = time.monotonic()
    service, url = emulators.start_worker(env)
    try:
        ready = time.monotonic() - started
        job = {"model": model, "input": inputs, "output": output}
        body = {
            "message": {"data": base64.b64encode(json.dumps(job).encode()).decode(), "messageId": uuid.uuid4().hex},
            "subscription": "projects/p/subscriptions/jobs",
        }
        r = requests.post(url + "/", json=body, timeout=300)
        done = time.monotonic() - started
        if r.status_code != 200:
            raise SystemExit(f"{serving}: HTTP {r.status_code}: {r.text[:500]}")
        assert service.proc is not None
        rss = _group_rss_mb(os.getpgid(service.proc.pid))
        return {"ready_s": ready, "job_done_s": done, "worker_rss_mb": rss}
    finally:
        service.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per backend (default 3)")
    args = parser.parse_args(argv)
    gcs, gcs_host = emulators.start_fake_gcs()
    try:
        os.environ["STORAGE_EMULATOR_HOST"] = gcs_host
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(project="bench", credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
        client.create_bucket("cold-models")
        client.create_bucket("cold-data")
        with tempfile.TemporaryDirectory() as tmp:
            models.build_mlp(f"{tmp}/mlp")
            models.upload_folder(client, f"{tmp}/mlp", "cold-models", "mlp/1")
        lines = "".join(json.dumps(i) + "\n" for i in models.mlp_instances(10))
        client.bucket("cold-data").blob("in.jsonl").upload_from_string(lines)
        runs: dict[str, list[dict[str, float]]] = {"tfserving": [], "tensorflow": []}
        for k in range(args.rounds):
            for serving in runs:
                out = f"gs://cold-data/out-{serving}-{k}/"
                runs[serving].append(_one(serving, gcs_host, "gs://cold-models/mlp/", "gs://cold-data/in.jsonl", out))
        print("| backend | spawn → port answers | spawn → 10-line job done | worker's peak RSS |")
        print("|---|---|---|---|")
        for serving, results in runs.items():
            med = {key: statistics.median(r[key] for r in results) for key in results[0]}
            print(f"| {serving} | {med['ready_s']:.2f} s | {med['job_done_s']:.2f} s | {med['worker_rss_mb']:.0f} MB |")
        print(f"\nMedians of {args.rounds} rounds, the backends alternating; RSS: the worker's, not the server's.")
        print(json.dumps(runs))
        return 0
    finally:
        gcs.stop()


if __name__ == "__main__":
    raise SystemExit(main())
