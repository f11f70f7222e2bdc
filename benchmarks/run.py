"""Benchmarks: the worker side by side with the raw model and with the original tool's approach.

    PYTHONPATH=. .venv/bin/python -m benchmarks.run            # the full run (about 20 minutes)
    PYTHONPATH=. .venv/bin/python -m benchmarks.run --quick    # a smoke run (about 1 minute)

Against local fake-gcs-server, on generated JSON lines of 16 floats, for each model it measures:

1. limit   — the SavedModel signature called in-process on pre-built tensors, per batch size;
2. floor   — parse lines → predict → encode lines, in this process, memory to memory;
3. worker  — end to end through an event (functions-framework, model warm) and through the CLI
             (a new process: TensorFlow import and model load included): instances/s and the peak
             RSS of the whole process tree; the time from event to completed 10-line job, cold
             (new process) and warm; the peak RSS of a job on the smallest input and on
             --memory-size (1 GB) of input, through the CLI; and the same jobs run by the worker's
             pipeline in this process with the input's bytes from memory and the output discarded
             (what the worker costs beyond the floor, storage I/O left out);
4. original — the original tool's approach (benchmarks/original.py) against the TF Serving
             stand-in: whole file in memory, one request per file; where it breaks, why.

Every figure is a median over --repeat runs; ratios are taken between figures of the same run,
and the worker's ratio to the floor between each event job and a pass of the floor just before it.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import requests

from benchmarks.measure import (
    CLOCK_TICKS,
    RssSampler,
    Stopwatch,
    command_line,
    emit,
    human,
    instance_block,
    median,
    parse_size,
    parse_with_defaults,
    table,
    tree_cpu_s,
    write_input,
)
from localdev import emulators, models
from worker.config import Settings
from worker.serving.cache import settle_collector
from worker.serving.jsonvalues import tf_serving_floats
from worker.storage import READ_CHUNK_BYTES

REPO = Path(__file__).resolve().parent.parent
FEATURES = 16
MODELS = {"mlp": models.build_mlp, "dense": models.build_dense}
MODEL_TEXT = {"mlp": "16→32→3 MLP", "dense": "16→3×1024→3 dense"}


@dataclass
class Config:
    models: list[str]
    sizes: list[int]
    batch_sizes: list[int]
    batch_size: int
    repeat: int
    tree_files: int
    original_timeout_s: float
    original_cap: int
    floor_bytes: int
    memory_size: int  # 0: no memory-bound measurement


@dataclass
class Env:
    gcs_host: str
    gcs_pid: int  # fake-gcs-server's process, whose CPU time the event runs report
    client: Any
    tmp: Path
    model_dirs: dict[str, Path] = field(default_factory=dict)
    inputs: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # label → (uri, lines, bytes)
    memory_input: str = ""  # the --memory-size input's URI


def say(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def child_env(env: Env, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "STORAGE_EMULATOR_HOST": env.gcs_host,
        "GOOGLE_CLOUD_PROJECT": "bench",
        "WORKER_LOG_LEVEL": "WARNING",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **extra,
    }


# -- setup ----------------------------------------------------------------------------------------


def prepare(env: Env, cfg: Config) -> None:
    for name in ("bench-models", "bench-data"):
        env.client.create_bucket(name)
    for name in cfg.models:
        say(f"building model {name} ({MODEL_TEXT[name]})")
        path = MODELS[name](env.tmp / "models" / name)
        env.model_dirs[name] = path
        models.upload_folder(env.client, path, "bench-models", f"{name}/1")
    data = env.client.bucket("bench-data")
    small_lines = instance_block(10, FEATURES)
    data.blob("in/10lines.jsonl").upload_from_string(small_lines)
    env.inputs["10 lines"] = ("gs://bench-data/in/10lines.jsonl", 10, len(small_lines))
    for size in cfg.sizes:
        label = human(size)
        path = env.tmp / f"{label}.jsonl"
        say(f"generating and uploading {label} of JSON lines")
        lines = write_input(path, size, features=FEATURES)
        data.blob(f"in/{label}.jsonl").upload_from_filename(str(path), content_type="application/jsonl")
        env.inputs[label] = (f"gs://bench-data/in/{label}.jsonl", lines, path.stat().st_size)
        if size == min(cfg.sizes) and cfg.tree_files > 1:
            all_lines = path.read_bytes().splitlines(keepends=True)
            per = -(-len(all_lines) // cfg.tree_files)
            for i in range(cfg.tree_files):
                part = b"".join(all_lines[i * per : (i + 1) * per])
                data.blob(f"tree/{label}/d{i % 10}/part-{i:04d}.jsonl").upload_from_string(part)
            env.inputs[f"{label} in {cfg.tree_files} files"] = (
                f"gs://bench-data/tree/{label}/",
                len(all_lines),
                path.stat().st_size,
            )
        if size != min(cfg.sizes):
            path.unlink()
    if cfg.memory_size:
        label = human(cfg.memory_size)
        path = env.tmp / f"memory-{label}.jsonl"
        say(f"generating and uploading {label} of JSON lines for the memory bound")
        write_input(path, cfg.memory_size, features=FEATURES)
        data.blob(f"memory/{label}.jsonl").upload_from_filename(str(path), content_type="application/jsonl")
        env.memory_input = f"gs://bench-data/memory/{label}.jsonl"
        path.unlink()


def output_bytes(env: Env, uri: str) -> int:
    """Bytes of the output files under `uri` (the manifest left out)."""
    bucket, _, prefix = uri.removeprefix("gs://").partition("/")
    return sum(b.size for b in env.client.list_blobs(bucket, prefix=prefix) if not b.name.endswith(".json"))


def delete_prefix(env: Env, uri: str) -> None:
    bucket, _, prefix = uri.removeprefix("gs://").partition("/")
    for blob in env.client.list_blobs(bucket, prefix=prefix):
        blob.delete()


# -- 1 and 2: limit and floor -----------------------------------------------------------------------


def _signature(model_dir: Path) -> Any:
    """TensorFlow and the model's signature, loaded; then the garbage collector set as the worker
    sets it after a load (`settle_collector`)."""
    import tensorflow as tf

    fn = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    settle_collector()
    return tf, fn


def limit(tf: Any, fn: Any, batch: int, repeat: int, min_instances: int = 50_000) -> float:
    """Instances/s of the signature `fn` on pre-built float32 tensors of `batch` rows."""
    x = tf.constant(np.random.default_rng(1).normal(0, 1, (batch, FEATURES)).astype(np.float32))
    fn(x=x)
    calls = max(1, min_instances // batch)
    rates = []
    for _ in range(repeat):
        clock = Stopwatch()
        for _ in range(calls):
            fn(x=x)["scores"].numpy()
        rates.append(calls * batch / clock.elapsed)
    return median(rates)


def floor(tf: Any, fn: Any, lines: list[bytes], batch: int, repeat: int) -> float:
    """Instances/s of parse → predict → encode over `lines` in memory (median of `repeat` passes
    of `floor_pass`)."""
    return median(floor_pass(tf, fn, lines, batch) for _ in range(repeat))


def floor_pass(tf: Any, fn: Any, lines: list[bytes], batch: int) -> float:
    """Instances/s of one pass of parse → predict → encode over `lines` in memory, with the fastest
    codec here (orjson), the fastest conversions found (TensorFlow reading the lists: the worker's
    own), float32 scores written as TF Serving writes them (the worker's conversion) and the input
    line copied into the output line: the same output lines the worker writes, with nothing else
    (no I/O, no accounting, no error handling)."""
    clock = Stopwatch()
    out = []
    for i in range(0, len(lines), batch):
        chunk = lines[i : i + batch]
        instances = [orjson.loads(line) for line in chunk]
        scores = tf_serving_floats(fn(x=tf.constant(instances, dtype=tf.float32))["scores"].numpy()).tolist()
        out.append(
            b"".join(
                b'{"instance":' + line + b',"prediction":' + orjson.dumps(p) + b"}\n"
                for line, p in zip(chunk, scores, strict=True)
            )
        )
    return len(lines) / clock.elapsed


# -- 3: the worker ------------------------------------------------------------------------------------


def post_job(url: str, job: dict[str, Any], timeout_s: float = 3600) -> requests.Response:
    """A Pub/Sub messagePublished CloudEvent in binary mode, as Eventarc delivers it."""
    message_id = uuid.uuid4().hex[:16]
    body = {
        "message": {"data": base64.b64encode(json.dumps(job).encode()).decode(), "messageId": message_id},
        "subscription": "projects/bench/subscriptions/jobs",
    }
    headers = {
        "ce-id": message_id,
        "ce-specversion": "1.0",
        "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
        "ce-source": "//pubsub.googleapis.com/projects/bench/topics/jobs",
        "Content-Type": "application/json",
    }
    r = requests.post(url + "/", json=body, headers=headers, timeout=timeout_s)
    if r.status_code != 200:
        raise RuntimeError(f"worker answered {r.status_code}: {r.text[:500]}")
    return r


def read_manifest(env: Env, output: str) -> dict[str, Any]:
    bucket, _, prefix = output.removeprefix("gs://").partition("/")
    manifest: dict[str, Any] = json.loads(env.client.bucket(bucket).blob(prefix + "_manifest.json").download_as_bytes())
    if manifest["status"] != "SUCCEEDED":
        raise RuntimeError(f"job {manifest['job_id']} {manifest['status']}: {manifest.get('error')}")
    return manifest


@dataclass
class Run:
    seconds: float
    instances: int
    peak_rss: int
    output_bytes: int = 0
    cpu_s: float = 0.0  # CPU seconds of the worker's process tree during the run
    emulator_cpu_s: float = 0.0  # CPU seconds of fake-gcs-server during the run
    # From the job's manifest: what its files waited for, summed over the files.
    input_wait_s: float = 0.0
    output_wait_s: float = 0.0
    # The floor's instances/s measured just before this run, and the median over the runs of
    # this run's rate ÷ that floor (set by `_median_run`): this machine's speed moves by up to 2×
    # between minutes, so a ratio is taken between figures measured side by side.
    floor_rate: float = 0.0
    paired_ratio: float = 0.0

    @property
    def rate(self) -> float:
        return self.instances / self.seconds


def _median_run(runs: list[Run]) -> Run:
    runs = sorted(runs, key=lambda r: r.seconds)
    mid = runs[len(runs) // 2]
    paired = [r.rate / r.floor_rate for r in runs if r.floor_rate]
    return dataclasses.replace(
        mid,
        peak_rss=int(median(r.peak_rss for r in runs)),
        floor_rate=median(r.floor_rate for r in runs) if paired else 0.0,
        paired_ratio=median(paired) if paired else 0.0,
    )


def worker_event_runs(
    env: Env, cfg: Config, model: str, backend: str, floor_now: Callable[[], float]
) -> dict[str, Any]:
    """Cold and warm latency on 10 lines, then every input through events to one warm worker,
    each job just after a pass of the floor (`floor_now`, in this process) to pair it with."""
    results: dict[str, Any] = {}
    worker_env = child_env(
        env,
        WORKER_SERVING=backend,
        WORKER_WORK_DIR=str(env.tmp / f"work-{model}-{backend}"),
        WORKER_BATCH_SIZE=str(cfg.batch_size),
        WORKER_MODEL_SERVER=f"{sys.executable} -m localdev.tfserving_standin",
    )
    small_uri = env.inputs["10 lines"][0]
    model_uri = f"gs://bench-models/{model}/"
    # Each cold start next to a TensorFlow import of its own: the import alone moves by a second
    # between minutes on this kind of machine, and the cold start's budget is measured from it.
    cold, imports = [], []
    for _ in range(cfg.repeat):
        imports.append(tensorflow_import_once())
        clock = Stopwatch()
        service, url = emulators.start_worker(worker_env, threads=2)
        try:
            out = f"gs://bench-data/out/{uuid.uuid4().hex}/"
            post_job(url, {"model": model_uri, "input": small_uri, "output": out})
            cold.append(clock.elapsed)
        finally:
            service.stop()
    results["cold_s"], results["cold_import_s"] = median(cold), median(imports)
    results["cold_over_import_s"] = median(c - i for c, i in zip(cold, imports, strict=True))

    service, url = emulators.start_worker(worker_env, threads=2)
    try:
        assert service.proc is not None
        post_job(url, {"model": model_uri, "input": small_uri, "output": f"gs://bench-data/out/{uuid.uuid4().hex}/"})
        warm = []
        for _ in range(max(cfg.repeat, 5)):
            out = f"gs://bench-data/out/{uuid.uuid4().hex}/"
            clock = Stopwatch()
            post_job(url, {"model": model_uri, "input": small_uri, "output": out})
            warm.append(clock.elapsed)
        results["warm_s"] = median(warm)
        for label, (uri, _, size) in env.inputs.items():
            if label == "10 lines":
                continue
            runs = []
            for _ in range(cfg.repeat if size < 2**30 else 1):
                out = f"gs://bench-data/out/{uuid.uuid4().hex}/"
                floor_rate = floor_now()
                cpu, emulator_cpu = tree_cpu_s([service.proc.pid]), tree_cpu_s([env.gcs_pid])
                with RssSampler([service.proc.pid]) as rss:
                    clock = Stopwatch()
                    post_job(url, {"model": model_uri, "input": uri, "output": out})
                    seconds = clock.elapsed
                cpu, emulator_cpu = tree_cpu_s([service.proc.pid]) - cpu, tree_cpu_s([env.gcs_pid]) - emulator_cpu
                manifest = read_manifest(env, out)
                timings = manifest["timings"]
                run = Run(
                    seconds,
                    manifest["totals"]["predictions"],
                    rss.peak,
                    output_bytes(env, out),
                    cpu,
                    emulator_cpu,
                    timings["input_wait_s"],
                    timings["output_wait_s"],
                    floor_rate,
                )
                runs.append(run)
                delete_prefix(env, out)
            results[label] = _median_run(runs)
            say(f"  event/{backend} {model} {label}: {results[label].rate:,.0f} instances/s")
    finally:
        service.stop()
    return results


class _BytesInMemory:
    """The worker's store with each input file's bytes served from memory, in the blocks of lines
    its reads make (4 MiB of the file each), and every output discarded; the rest (listing, the
    lease, the manifest) goes to fake-gcs-server as in any job. A job run on it is the worker's own
    work without reading or uploading data."""

    def __init__(self, store: Any, data: dict[str, bytes]) -> None:
        self._store = store
        self._data = data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def read_blocks(self, f: Any, *, max_line_bytes: int) -> Iterator[list[bytes]]:
        data, pending = self._data[f.uri.path], b""
        for start in range(0, len(data), READ_CHUNK_BYTES):
            lines = (pending + data[start : start + READ_CHUNK_BYTES]).split(b"\n")
            pending = lines.pop()
            if lines:
                yield lines
        if pending:
            yield [pending]

    @contextlib.contextmanager
    def open_output(self, uri: Any, *, job_id: str, content_type: str) -> Iterator[Any]:
        yield _Discard()


class _Discard:
    def write(self, block: bytes) -> int:
        return len(block)


def worker_without_storage_runs(env: Env, cfg: Config, model: str, floor_now: Callable[[], float]) -> dict[str, Run]:
    """The event runs' jobs through the worker's pipeline in this process, with every input's
    bytes from memory and every output discarded, each job just after a pass of the floor: what
    the worker does beyond the floor, storage I/O left out."""
    from worker.app import Runtime
    from worker.jobs import Job
    from worker.pipeline import run

    settings = dataclasses.replace(
        Settings.from_env(os.environ),
        serving="tensorflow",
        batch_size=cfg.batch_size,
        work_dir=str(env.tmp / f"work-in-process-{model}"),
    )
    runtime = Runtime.from_settings(settings, publish=False)

    def one(uri: str, store: Any) -> tuple[float, int]:
        output = f"gs://bench-data/out/{uuid.uuid4().hex}/"
        job = Job.from_mapping(
            {"model": f"gs://bench-models/{model}/", "input": uri, "output": output}, default_job_id=uuid.uuid4().hex
        )
        clock = Stopwatch()
        outcome = run(job, store=store, models=runtime.models, publisher=None, limits=runtime.limits)
        seconds = clock.elapsed
        if outcome.status != "SUCCEEDED":
            raise RuntimeError(f"in-process job {job.job_id} {outcome.status}: {outcome.manifest.get('error')}")
        delete_prefix(env, output)
        return seconds, int(outcome.manifest["totals"]["predictions"])

    results: dict[str, Run] = {}
    try:
        one(env.inputs["10 lines"][0], runtime.store)  # the model loaded
        for label, (uri, _, size) in env.inputs.items():
            if label == "10 lines":
                continue
            bucket, _, prefix = uri.removeprefix("gs://").partition("/")
            data = {b.name: b.download_as_bytes() for b in env.client.list_blobs(bucket, prefix=prefix)}
            store = _BytesInMemory(runtime.store, data)
            runs = []
            for _ in range(cfg.repeat if size < 2**30 else 1):  # as the event runs
                floor_rate = floor_now()
                seconds, predictions = one(uri, store)
                runs.append(Run(seconds, predictions, 0, floor_rate=floor_rate))
            results[label] = _median_run(runs)
            say(f"  in process, no storage I/O, {model} {label}: {results[label].rate:,.0f} instances/s")
    finally:
        runtime.close()
    return results


def storage_alone_s(env: Env, uri: str, out_bytes: int, repeat: int) -> float:
    """Seconds the worker's own storage layer takes to read `uri` and write `out_bytes` of output
    alongside, file by file as a job does (the worker's default number of files in flight, each
    output written as its input is read), with no parsing or prediction: what the I/O against this
    fake-gcs-server costs alone."""
    from concurrent.futures import ThreadPoolExecutor

    from worker.storage import GcsStore
    from worker.uris import Uri

    store = GcsStore.from_environment("bench", environ=os.environ, concurrent_requests=16)
    inputs = store.list_inputs(Uri.parse(uri))
    ratio = out_bytes / sum(f.size for f in inputs)

    def one(f: Any, out: str) -> None:
        with store.open_output(Uri.parse(out + f.rel), job_id="bench", content_type="application/jsonl") as sink:
            for block in store.read_blocks(f):
                sink.write(b"x" * int((sum(map(len, block)) + len(block)) * ratio))

    times = []
    for _ in range(repeat):
        out = f"gs://bench-data/out/{uuid.uuid4().hex}/"
        clock = Stopwatch()
        with ThreadPoolExecutor(Settings.file_concurrency) as pool:
            list(pool.map(one, inputs, [out] * len(inputs)))
        times.append(clock.elapsed)
        delete_prefix(env, out)
    return median(times)


ONE_AT_A_TIME = " (one file at a time)"


def cli_run(env: Env, cfg: Config, model: str, uri: str, options: str = "", **extra_env: str) -> Run:
    """One job through `python -m worker run` in a new process, sampling its peak RSS."""
    out = f"gs://bench-data/out/{uuid.uuid4().hex}/"
    argv = [sys.executable, "-m", "worker", "run", "--model", f"gs://bench-models/{model}/"]
    argv += ["--input", uri, "--output", out, "--no-publish", "--quiet", "--batch-size", str(cfg.batch_size)]
    if options:
        argv += ["--options", options]
    work = str(env.tmp / f"cli-{uuid.uuid4().hex}")
    clock = Stopwatch()
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=child_env(env, WORKER_SERVING="tensorflow", WORKER_WORK_DIR=work, **extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    with RssSampler([proc.pid]) as rss:
        stdout, stderr = proc.communicate()
    seconds = clock.elapsed
    if proc.returncode != 0:
        raise RuntimeError(f"worker CLI exited {proc.returncode}: {stderr.decode()[-2000:]}")
    manifest = json.loads(stdout)
    delete_prefix(env, out)
    return Run(seconds, manifest["totals"]["predictions"], rss.peak)


def worker_cli_runs(env: Env, cfg: Config, model: str) -> dict[str, Run]:
    """Each single-file input through the CLI; the tree too, with its files in flight together
    (the default) and one after another, side by side."""
    results: dict[str, Run] = {}
    for label, (uri, _, size) in env.inputs.items():
        if label == "10 lines":
            continue
        variants: dict[str, dict[str, str]] = {label: {}}
        if " in " in label:
            variants[label + ONE_AT_A_TIME] = {"WORKER_FILE_CONCURRENCY": "1"}
        for name, extra in variants.items():
            runs = [cli_run(env, cfg, model, uri, **extra) for _ in range(cfg.repeat if size < 2**30 else 1)]
            results[name] = _median_run(runs)
            say(f"  cli {model} {name}: {results[name].rate:,.0f} instances/s")
    return results


def memory_runs(env: Env, cfg: Config, model: str) -> dict[str, Run]:
    """Peak RSS of the CLI on the smallest input and on the --memory-size one. Outputs are
    predictions only: fake-gcs-server's resumable upload grows quadratically with an object's size
    (300 MB takes 25 s, 1 GB many minutes), and it is the worker's memory being measured."""
    smallest = human(min(cfg.sizes))
    results: dict[str, Run] = {}
    for label, uri in ((smallest, env.inputs[smallest][0]), (human(cfg.memory_size), env.memory_input)):
        results[label] = cli_run(env, cfg, model, uri, options='{"output_format": "predictions"}')
        say(f"  memory {model} {label}: peak RSS {mb(results[label].peak_rss)}")
    return results


# -- 4: the original approach -------------------------------------------------------------------------


def original_runs(env: Env, cfg: Config, model: str) -> dict[str, Run | str]:
    results: dict[str, Run | str] = {}
    base = env.tmp / f"standin-{model}"
    base.mkdir(exist_ok=True)
    if not (base / "1").exists():
        (base / "1").symlink_to(env.model_dirs[model])
    port = emulators.free_port()
    argv = [sys.executable, "-m", "localdev.tfserving_standin", f"--rest_api_port={port}"]
    argv += ["--model_name=model", f"--model_base_path={base}"]

    def ready() -> bool:
        r = requests.get(f"http://127.0.0.1:{port}/v1/models/model", timeout=2)
        return "AVAILABLE" in r.text

    for label, (uri, _, size) in env.inputs.items():
        if label == "10 lines":
            continue
        server = emulators.Service(f"standin-{model}", argv, env=child_env(env), cwd=str(REPO), ready=ready)
        server.start()
        runs: list[Run] = []
        broke = ""
        try:
            for _ in range(cfg.repeat if size < 2**30 else 1):
                out = f"gs://bench-data/out/{uuid.uuid4().hex}/"
                client_argv = [sys.executable, "-m", "benchmarks.original"]
                client_argv += ["--url", f"http://127.0.0.1:{port}/v1/models/model:predict"]
                client_argv += ["--input", uri, "--output", out, "--timeout", str(cfg.original_timeout_s)]
                clock = Stopwatch()
                proc = subprocess.Popen(
                    client_argv, cwd=REPO, env=child_env(env), stdout=subprocess.PIPE, start_new_session=True
                )
                assert server.proc is not None
                with RssSampler([proc.pid, server.proc.pid], cap_bytes=cfg.original_cap) as rss:
                    stdout, _ = proc.communicate()
                seconds = clock.elapsed
                delete_prefix(env, out)
                if rss.capped:
                    broke = f"memory: over {human(cfg.original_cap)} after {seconds:.0f} s"
                    break
                answer = json.loads(stdout or b"{}")
                if proc.returncode != 0:
                    broke = str(answer.get("error", f"exit {proc.returncode}"))
                    break
                runs.append(Run(seconds, answer["instances"], rss.peak))
        finally:
            server.stop()
        results[label] = broke or _median_run(runs)
        say(f"  original {model} {label}: {broke or f'{_median_run(runs).rate:,.0f} instances/s'}")
    return results


# -- the report ---------------------------------------------------------------------------------------


def tensorflow_import_once() -> float:
    """Seconds a new Python process takes to import TensorFlow."""
    code = "import time; t = time.perf_counter(); import tensorflow; print(time.perf_counter() - t)"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(proc.stdout)


def tensorflow_import_s(repeat: int) -> float:
    return median(tensorflow_import_once() for _ in range(repeat))


def model_download_s(env: Env, model: str) -> float:
    clock = Stopwatch()
    for blob in env.client.list_blobs("bench-models", prefix=f"{model}/"):
        blob.download_as_bytes()
    return clock.elapsed


def rate(x: float) -> str:
    return f"{x:,.0f}"


def mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB"


def report(cfg: Config, env: Env, results: dict[str, Any]) -> str:
    out = []
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?")
    out.append(f"Machine: {os.cpu_count()} CPUs ({cpu}); TensorFlow import {results['tf_import_s']:.1f} s.")
    out.append(f"Batch size {cfg.batch_size}; medians of {cfg.repeat} runs (1 run at 1 GB).\n")
    for model in cfg.models:
        r = results[model]
        out.append(f"### {model} ({MODEL_TEXT[model]})\n")
        out.append("Batch curve (instances/s):\n")
        out.append(
            table(
                ["batch", "limit: signature on tensors", "floor: parse → predict → encode"],
                [[str(b), rate(r["limit"][b]), rate(r["floor"][b])] for b in cfg.batch_sizes],
            )
        )
        fl = r["floor"][cfg.batch_size]
        rows = []
        for label, (_, lines, _size) in env.inputs.items():
            if label == "10 lines":
                continue
            ev: Run = r["event"][label]
            cli: Run | None = r["cli"].get(label)
            orig = r["original"].get(label)
            io_rate = ev.instances / r["storage_s"][label]
            row = [f"{label} ({lines:,} lines)", rate(ev.rate), rate(ev.floor_rate), f"{ev.paired_ratio:.2f}"]
            row += [rate(io_rate), mb(ev.peak_rss)]
            row += [rate(cli.rate), mb(cli.peak_rss)] if cli else ["—", "—"]
            if isinstance(orig, Run):
                row += [rate(orig.rate), mb(orig.peak_rss), f"{ev.rate / orig.rate:.1f}×"]
            else:
                row += [f"breaks: {orig}", "—", "—"]
            rows.append(row)
        out.append(
            "\nEnd to end (instances/s; each event job ran just after a pass of the floor, and ÷ floor "
            "is the median over the jobs of each job's rate ÷ the floor's just before it — the floor "
            f"was {rate(fl)} in the curve above; storage alone: the same bytes read and written by the "
            "worker's storage code with no processing):\n"
        )
        out.append(
            table(
                [
                    "input",
                    "worker, event (warm)",
                    "floor beside it",
                    "÷ floor",
                    "storage alone",
                    "peak RSS",
                    "worker, CLI (cold)",
                    "peak RSS",
                    "original approach",
                    "peak RSS",
                    "worker ÷ original",
                ],
                rows,
            )
        )
        out.append(
            f"\nWhere an event job's time goes (seconds per job; the worker and fake-gcs-server share "
            f"the {os.cpu_count()} CPUs; CPU time is counted in ticks of {1000 // CLOCK_TICKS} ms; the waits "
            f"are the manifest's, summed over the files, up to {Settings.file_concurrency} at a time; the same "
            "job, no storage I/O: run by the worker's pipeline in the benchmark's process with the input's bytes "
            "from memory and the output discarded, just after a pass of the floor, and its ÷ floor paired so):\n"
        )
        out.append(
            table(
                [
                    "input",
                    "job",
                    "floor, same lines",
                    "storage alone",
                    "files waited for input",
                    "files waited for output",
                    "worker CPU",
                    "fake-gcs-server CPU",
                    "same job, no storage I/O",
                    "its ÷ floor",
                ],
                [
                    [label]
                    + [
                        f"{s:.2f}"
                        for s in (
                            ev.seconds,
                            ev.instances / ev.floor_rate,
                            r["storage_s"][label],
                            ev.input_wait_s,
                            ev.output_wait_s,
                            ev.cpu_s,
                            ev.emulator_cpu_s,
                            r["no_io"][label].seconds,
                            r["no_io"][label].paired_ratio,
                        )
                    ]
                    for label, ev in r["event"].items()
                    if isinstance(ev, Run)
                ],
            )
        )
        for label in env.inputs:
            serial = r["cli"].get(label + ONE_AT_A_TIME)
            if serial is not None:
                together: Run = r["cli"][label]
                out.append(
                    f"\n{label} through the CLI: {rate(together.rate)} instances/s with the files in flight "
                    f"together (WORKER_FILE_CONCURRENCY={Settings.file_concurrency}), {rate(serial.rate)} one "
                    "after another: "
                    f"{together.rate / serial.rate:.2f}×."
                )
        labels = [lb for lb in env.inputs if lb != "10 lines" and " in " not in lb]
        if len(labels) > 1:
            growth = r["event"][labels[-1]].peak_rss - r["event"][labels[0]].peak_rss
            out.append(f"\nPeak RSS growth from {labels[0]} to {labels[-1]} (event): {mb(growth)}.")
        if r.get("memory"):
            (small, small_run), (big, big_run) = r["memory"].items()
            out.append(
                f"Memory bound (CLI, predictions-only output): peak RSS {mb(small_run.peak_rss)} at {small}, "
                f"{mb(big_run.peak_rss)} at {big} ({big_run.rate:,.0f} instances/s): "
                f"{mb(big_run.peak_rss - small_run.peak_rss)} more for {big_run.instances:,} instances."
            )
        events = r["event"]
        budget = events["cold_import_s"] + r["download_s"] + 1
        out.append(
            f"Event → 10-line job done: warm {events['warm_s'] * 1000:.0f} ms; cold (new process) "
            f"{events['cold_s']:.1f} s against TensorFlow import + model download + 1 s = {budget:.1f} s "
            f"(the import measured next to each cold start, {events['cold_import_s']:.1f} s; a cold start took "
            f"{events['cold_over_import_s']:.2f} s more than the import beside it, against a budget of "
            f"{r['download_s'] + 1:.2f} s).\n"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = command_line(__doc__, "mlp, 1MB and 4MB, one run each: a smoke test")
    parser.add_argument("--models", help="comma-separated: mlp, dense (default: both; --quick: mlp)")
    parser.add_argument(
        "--sizes",
        help="input sizes (default: 10MB,100MB; --quick: 1MB,4MB). 1GB works but measures fake-gcs-server's "
        "in-memory backend, which takes minutes and GBs at that size",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=Settings.batch_size,
        help=f"the worker's batch size (default: its own, {Settings.batch_size})",
    )
    parser.add_argument("--batch-sizes", help="batch curve for limit and floor (default: 16,64,256,1024)")
    parser.add_argument("--repeat", type=int, help="runs per figure; medians are reported (default: 3; --quick: 1)")
    parser.add_argument("--tree-files", type=int, help="files in the tree input (smallest size; default: 100)")
    parser.add_argument(
        "--memory-size",
        help="input size for the memory bound, measured on the first model (default: 1GB; --quick: 16MB; 0: skip)",
    )
    parser.add_argument("--original-timeout", type=float, default=30.0, help="REST timeout of the original (30 s)")
    parser.add_argument("--original-cap", default="8GB", help="kill the original approach above this RSS (8GB)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parse_with_defaults(
        parser,
        argv,
        quick={"models": "mlp", "sizes": "1MB,4MB", "batch_sizes": "64,256", "repeat": 1, "tree_files": 10,
               "memory_size": "16MB"},
        full={"models": "mlp,dense", "sizes": "10MB,100MB", "batch_sizes": "16,64,256,1024", "repeat": 3,
              "tree_files": 100, "memory_size": "1GB"},
    )  # fmt: skip
    cfg = Config(
        models=[m for m in args.models.split(",") if m],
        sizes=sorted(parse_size(s) for s in args.sizes.split(",")),
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        batch_size=args.batch_size,
        repeat=args.repeat,
        tree_files=args.tree_files,
        original_timeout_s=args.original_timeout,
        original_cap=parse_size(args.original_cap),
        floor_bytes=min(parse_size("10MB"), min(parse_size(s) for s in args.sizes.split(","))),
        memory_size=0 if args.memory_size == "0" else parse_size(args.memory_size),
    )
    unknown = [m for m in cfg.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}: choose from {sorted(MODELS)}")
    if cfg.batch_size not in cfg.batch_sizes:
        cfg.batch_sizes = sorted({*cfg.batch_sizes, cfg.batch_size})

    say("starting fake-gcs-server")
    gcs, gcs_host = emulators.start_fake_gcs()
    try:
        os.environ["STORAGE_EMULATOR_HOST"] = gcs_host
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(project="bench", credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
        with tempfile.TemporaryDirectory(prefix="embedded-tf-bench-") as tmp:
            assert gcs.proc is not None
            env = Env(gcs_host=gcs_host, gcs_pid=gcs.proc.pid, client=client, tmp=Path(tmp))
            prepare(env, cfg)
            results: dict[str, Any] = {"tf_import_s": tensorflow_import_s(cfg.repeat)}
            smallest = env.tmp / f"{human(min(cfg.sizes))}.jsonl"
            floor_lines = smallest.read_bytes()[: cfg.floor_bytes].splitlines()
            floor_lines = [line for line in floor_lines if line.endswith(b"]")]
            for model in cfg.models:
                say(f"model {model}: limit and floor")
                r: dict[str, Any] = {"limit": {}, "floor": {}}
                tf, fn = _signature(env.model_dirs[model])  # for the limit, the floor and the floor beside each job
                for b in cfg.batch_sizes:
                    r["limit"][b] = limit(tf, fn, b, cfg.repeat)
                    r["floor"][b] = floor(tf, fn, floor_lines, b, cfg.repeat)
                r["download_s"] = model_download_s(env, model)
                say(f"model {model}: the worker through events")
                floor_now = functools.partial(floor_pass, tf, fn, floor_lines, cfg.batch_size)
                r["event"] = worker_event_runs(env, cfg, model, "tensorflow", floor_now)
                say(f"model {model}: the worker in this process, without storage I/O")
                r["no_io"] = worker_without_storage_runs(env, cfg, model, floor_now)
                r["storage_s"] = {
                    label: storage_alone_s(env, env.inputs[label][0], run.output_bytes, cfg.repeat)
                    for label, run in r["event"].items()
                    if isinstance(run, Run)
                }
                say(f"model {model}: the worker through its CLI")
                r["cli"] = worker_cli_runs(env, cfg, model)
                if cfg.memory_size and model == cfg.models[0]:
                    say(f"model {model}: the memory bound at {human(cfg.memory_size)}")
                    r["memory"] = memory_runs(env, cfg, model)
                say(f"model {model}: the original approach")
                r["original"] = original_runs(env, cfg, model)
                results[model] = r
            text = report(cfg, env, results)
        emit(text, results, args.json)
    finally:
        gcs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
