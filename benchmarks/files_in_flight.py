"""Files in flight against storage that answers late: a tree of small files through the worker,
in this process, at several WORKER_FILE_CONCURRENCY values, with each storage request held for
--latencies milliseconds by a proxy in front of fake-gcs-server (benchmarks/latency_proxy.py).
fake-gcs-server answers in about a millisecond; Cloud Storage takes tens.

    PYTHONPATH=. .venv/bin/python -m benchmarks.files_in_flight            # about 3 minutes
    PYTHONPATH=. .venv/bin/python -m benchmarks.files_in_flight --quick    # a smoke run

Each figure is the median of --repeat jobs, the concurrencies taken in turn within each repeat.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from benchmarks.measure import (
    Stopwatch,
    command_line,
    emit,
    median,
    parse_size,
    parse_with_defaults,
    table,
    write_input,
)
from localdev import emulators, models
from worker.config import Settings

FEATURES = 16


def _proxy(upstream: str, latency_ms: float) -> tuple[subprocess.Popen[str], str]:
    port = emulators.free_port()
    argv = [sys.executable, "-m", "benchmarks.latency_proxy", "--port", str(port), "--upstream", upstream]
    proc = subprocess.Popen([*argv, "--latency-ms", str(latency_ms)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc, f"http://127.0.0.1:{port}"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    gcs, gcs_host = emulators.start_fake_gcs()
    proxies: list[subprocess.Popen[str]] = []
    try:
        os.environ.update(STORAGE_EMULATOR_HOST=gcs_host, WORKER_LOG_LEVEL="WARNING", TF_CPP_MIN_LOG_LEVEL="2")
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(project="bench", credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
        with tempfile.TemporaryDirectory(prefix="embedded-tf-bench-") as tmp_dir:
            return _measure_in(args, client, Path(tmp_dir), gcs_host, proxies)
    finally:
        for proxy in proxies:
            proxy.kill()
            proxy.wait()
        gcs.stop()


def _measure_in(
    args: argparse.Namespace, client: Any, tmp: Path, gcs_host: str, proxies: list[subprocess.Popen[str]]
) -> dict[str, Any]:
    from worker.app import Runtime
    from worker.jobs import Job

    for name in ("bench-models", "bench-data"):
        client.create_bucket(name)
    models.upload_folder(client, models.build_mlp(tmp / "mlp"), "bench-models", "mlp/1")
    write_input(tmp / "in.jsonl", parse_size(args.size), features=FEATURES)
    lines = (tmp / "in.jsonl").read_bytes().splitlines(keepends=True)
    per = -(-len(lines) // args.files)
    for i in range(args.files):
        part = b"".join(lines[i * per : (i + 1) * per])
        client.bucket("bench-data").blob(f"tree/part-{i:04d}.jsonl").upload_from_string(part)

    results: dict[str, Any] = {"lines": len(lines), "files": args.files, "rates": {}}
    for latency in args.latencies:
        proxy, host = _proxy(gcs_host.removeprefix("http://"), latency)
        proxies.append(proxy)
        os.environ["STORAGE_EMULATOR_HOST"] = host
        base = Settings.from_env(os.environ)
        runtimes = {
            c: Runtime.from_settings(
                dataclasses.replace(base, file_concurrency=c, work_dir=str(tmp / "work")), publish=False
            )
            for c in args.concurrency
        }
        times: dict[int, list[float]] = {c: [] for c in args.concurrency}
        try:
            for repeat in range(args.repeat + 1):  # the first round warms each runtime's model
                for c, rt in runtimes.items():
                    out = f"gs://bench-data/out/{uuid.uuid4().hex}/"
                    job = Job.from_mapping(
                        {"model": "gs://bench-models/mlp/", "input": "gs://bench-data/tree/", "output": out},
                        default_job_id=uuid.uuid4().hex,
                    )
                    clock = Stopwatch()
                    outcome = rt.run_job(job)
                    if outcome.status != "SUCCEEDED":
                        raise RuntimeError(f"job failed: {outcome.manifest.get('error')}")
                    if repeat:
                        times[c].append(clock.elapsed)
        finally:
            for rt in runtimes.values():
                rt.close()
        results["rates"][str(latency)] = {str(c): len(lines) / median(t) for c, t in times.items()}
        print(
            f"[bench] {latency:g} ms: "
            + ", ".join(f"{c} → {r:,.0f}/s" for c, r in results["rates"][str(latency)].items()),
            file=sys.stderr,
            flush=True,
        )
    return results


def report(args: argparse.Namespace, results: dict[str, Any]) -> str:
    intro = (
        f"{results['lines']:,} lines of {FEATURES} floats in {results['files']} files ({args.size} in all), the small "
        f"MLP; instances/s by added latency per storage request and files in flight (the default is "
        f"{Settings.file_concurrency}):\n"
    )
    rows = [
        [f"{float(latency):g} ms", *(f"{rates[str(c)]:,.0f}" for c in args.concurrency)]
        for latency, rates in results["rates"].items()
    ]
    return intro + "\n" + table(["added latency", *(f"{c} in flight" for c in args.concurrency)], rows)


def main(argv: list[str] | None = None) -> int:
    parser = command_line(__doc__, "10 files of 1MB in all, 0 and 20 ms, 1 and 8 in flight")
    parser.add_argument("--latencies", help="milliseconds added to each storage request (default: 0,20,50)")
    parser.add_argument("--concurrency", help="files in flight to compare (default: 1,4,8,16)")
    parser.add_argument("--files", type=int, help="files in the tree (default: 100)")
    parser.add_argument("--size", help="input size in all (default: 10MB)")
    parser.add_argument("--repeat", type=int, help="jobs per figure; medians are reported (default: 3)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parse_with_defaults(
        parser,
        argv,
        quick={"latencies": "0,20", "concurrency": "1,8", "files": 10, "size": "1MB", "repeat": 1},
        full={"latencies": "0,20,50", "concurrency": "1,4,8,16", "files": 100, "size": "10MB", "repeat": 3},
    )
    args.latencies = [float(x) for x in str(args.latencies).split(",")]
    args.concurrency = [int(x) for x in str(args.concurrency).split(",")]
    results = measure(args)
    emit(report(args, results), results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
