"""The README's quickstarts, run exactly as written: each `sh` block after a `<!-- quickstart: … -->`
mark goes to bash line by line, in a folder laid out as the text says (a model at
./export/churn/1, instances.jsonl beside it, `.venv` of this checkout), or beside `make local`."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from localdev import models

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NO_CLOUD = {"NO_GCE_CHECK": "true", "GOOGLE_APPLICATION_CREDENTIALS": "", "WORKER_RESULTS_TOPIC": ""}


def quickstart(name: str) -> str:
    """The commands of the `sh` block the README marks `<!-- quickstart: NAME …-->`."""
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- quickstart: " + re.escape(name) + r"\b[^>]*-->\n```sh\n(.*?)```", text, re.S)
    assert found, f"no quickstart {name!r} in README.md"
    return found.group(1)


def _bash(script: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.endswith("_EMULATOR_HOST")}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_local_files_quickstart_runs_as_written(tmp_path):
    models.build_mlp(tmp_path / "export" / "churn" / "1")
    rows = [{"id": f"c-{k}", "x": x} for k, x in enumerate(models.mlp_instances(5))]
    (tmp_path / "instances.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    env = {**NO_CLOUD, "HOME": str(tmp_path), "WORKER_WORK_DIR": str(tmp_path / "work")}

    done = _bash(quickstart("local files"), tmp_path, env)
    assert done.returncode == 0, done.stderr
    described, rest = done.stdout.split("\n}\n", 1)
    assert json.loads(described + "}")["signatures"]["serving_default"]["inputs"]["x"]["shape"] == [-1, 16]
    manifest_text, head = rest.rsplit("\n}\n", 1)
    manifest = json.loads(manifest_text + "}")
    assert manifest["status"] == "SUCCEEDED" and manifest["totals"]["predictions"] == 5
    assert manifest["model"]["resolved"] == f"{tmp_path}/export/churn/1/" and manifest["model"]["version"] == 1
    first_two = [json.loads(line) for line in head.splitlines()]
    assert [line["key"] for line in first_two] == ["c-0", "c-1"] and all(len(x["prediction"]) == 3 for x in first_two)
    assert json.loads((tmp_path / "predictions" / "_manifest.json").read_text()) == manifest


def test_the_local_cloud_quickstart_runs_as_written_beside_make_local(tmp_path):
    env_file = ROOT / ".local-cloud.env"
    assert not env_file.exists(), "another `make local` is running in this checkout"
    log = (tmp_path / "make-local.log").open("w")
    local = subprocess.Popen(["make", "local"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not env_file.exists():
            assert local.poll() is None, (tmp_path / "make-local.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "make-local.log").read_text()
            time.sleep(0.5)
        exports = dict(re.findall(r"export (\w+)=(\S+)", env_file.read_text()))
        done = _bash(quickstart("local cloud"), ROOT, {"HOME": str(tmp_path)})
        assert done.returncode == 0, done.stderr
        completion = json.loads(done.stdout)
        assert completion["status"] == "SUCCEEDED" and completion["totals"]["predictions"] == 250
        assert completion["output"] == "gs://demo-data/out/"
    finally:
        os.killpg(local.pid, signal.SIGINT)  # Ctrl-C, as a person stops it
        local.wait(timeout=60)
        log.close()
    assert "stopping the worker and the emulators" in (tmp_path / "make-local.log").read_text()
    assert not env_file.exists()
    for var in ("STORAGE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST"):  # stopped: nothing listens there now
        host, port = exports[var].removeprefix("http://").split(":")
        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=3).close()
