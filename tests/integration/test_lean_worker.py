"""Behind TF Serving the worker never imports TensorFlow, so the default image leaves it out
(requirements.txt holds none): a worker served by functions-framework runs a job behind the TF
Serving stand-in, and none of its processes has TensorFlow's library mapped. The same check on a
worker of the in-process backend finds it, so the check can tell."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from localdev import emulators, models
from tests.conftest import write_lines
from worker.serving.tf_backend import TENSORFLOW_MISSING

pytestmark = pytest.mark.integration

STANDIN = f"{sys.executable} -m localdev.tfserving_standin"


def _worker_processes(group: int) -> list[int]:
    """The processes of the worker's process group (functions-framework and its workers), but
    the model server it started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        pgid = int(stat.rsplit(")", 1)[1].split()[2])
        if pgid == group and "tfserving_standin" not in cmdline:
            pids.append(int(entry.name))
    return pids


def _tensorflow_mapped(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "libtensorflow" in maps or "_pywrap_tensorflow" in maps


def _run_one_job(serving: str, gcs_host: str, storage_client, bucket: str, model_uri: str, work_dir: str) -> bool:
    """Serve a worker of `serving`, push it one job, and tell whether TensorFlow is mapped in any
    of its processes once the job is done."""
    env = {
        "STORAGE_EMULATOR_HOST": gcs_host,
        "WORKER_WORK_DIR": work_dir,
        "WORKER_SERVING": serving,
        "WORKER_MODEL_SERVER": STANDIN,
    }
    service, url = emulators.start_worker(env)
    try:
        out = f"gs://{bucket}/out-{serving}/"
        job = {"model": model_uri, "input": f"gs://{bucket}/in.jsonl", "output": out}
        body = {
            "message": {"data": base64.b64encode(json.dumps(job).encode()).decode(), "messageId": uuid.uuid4().hex},
            "subscription": "projects/p/subscriptions/jobs",
        }
        r = requests.post(url + "/", json=body, timeout=180)
        assert r.status_code == 200, r.text
        manifest = json.loads(storage_client.bucket(bucket).blob(f"out-{serving}/_manifest.json").download_as_bytes())
        assert manifest["status"] == "SUCCEEDED", manifest
        assert service.proc is not None
        pids = _worker_processes(os.getpgid(service.proc.pid))
        assert service.proc.pid in pids and len(pids) >= 2  # the master and a worker process at least
        return any(_tensorflow_mapped(pid) for pid in pids)
    finally:
        service.stop()


def test_the_tf_serving_path_never_imports_tensorflow(gcs_host, storage_client, bucket, model_uris, tmp_path):
    write_lines(storage_client, f"gs://{bucket}/in.jsonl", [json.dumps(i) for i in models.mlp_instances(10)])
    assert not _run_one_job("tfserving", gcs_host, storage_client, bucket, model_uris["mlp"], str(tmp_path / "a"))
    assert _run_one_job("tensorflow", gcs_host, storage_client, bucket, model_uris["mlp"], str(tmp_path / "b"))


def test_describe_without_tensorflow_says_what_it_needs(gcs_host, model_uris, tmp_path):
    """`describe` loads the model with TensorFlow: where it is not installed (the TF Serving
    image), one error line says so and what to do, not a traceback."""
    blocked = "import sys; sys.modules['tensorflow'] = None; from worker.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "WORKER_WORK_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", blocked, "describe", "--model", model_uris["mlp"]],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: {TENSORFLOW_MISSING}"
    assert "Traceback" not in done.stderr
