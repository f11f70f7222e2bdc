"""`run` and `describe` on local paths, as a person runs them (a subprocess, no cloud, no emulator):
the same pipeline behind the same store interface, so the outputs, manifest and counts of a job on
local files are those of the same job on the same files in Cloud Storage."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from localdev import models
from tests.outputs import assert_same_output_lines

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# No cloud reachable: no emulator variables, no credentials, no metadata server probed.
NO_CLOUD = {"NO_GCE_CHECK": "true", "GOOGLE_APPLICATION_CREDENTIALS": "", "WORKER_RESULTS_TOPIC": ""}


def _cli(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[int, str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST")}
    done = subprocess.run(
        [sys.executable, "-m", "worker", *argv],
        env={**base, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
    )
    return done.returncode, done.stdout, done.stderr


def _input_files() -> dict[str, bytes]:
    rows = models.mlp_instances(30, seed=3)
    lines = [json.dumps(r) for r in rows]
    return {
        "a.jsonl": "\n".join([*lines[:10], "not json", *lines[10:12]]).encode() + b"\n",
        "deeper/b.jsonl": ("\r\n".join(lines[12:20]) + "\r\n\r\n").encode(),
        "deeper/c.jsonl.gz": gzip.compress(("\n".join(lines[20:]) + "\n").encode()),
    }


def _same_manifest(local: dict[str, Any], remote: dict[str, Any], where: dict[str, str]) -> None:
    """The manifests agree once each location is written as the other run's."""

    def normal(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: normal(v) for k, v in value.items() if k not in ("timings", "started_at", "finished_at")}
        if isinstance(value, list):
            return [normal(v) for v in value]
        if isinstance(value, str):
            for old, new in where.items():
                value = value.replace(old, new)
        return value

    assert normal(local) == normal(remote)


def test_a_job_on_local_paths_writes_what_the_same_job_in_cloud_storage_writes(
    storage_client, gcs_host, bucket, model_dirs, tmp_path
):
    model = tmp_path / "models" / "mlp"
    shutil.copytree(model_dirs["mlp"], model / "1")
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    for rel, data in _input_files().items():
        (inputs / rel).parent.mkdir(parents=True, exist_ok=True)
        (inputs / rel).write_bytes(data)
        storage_client.bucket(bucket).blob(f"in/{rel}").upload_from_string(data)
    models.upload_folder(storage_client, model, bucket, "models/mlp")
    common = ["--job-id", "local-vs-gs", "--batch-size", "4", "--quiet"]
    env = {**NO_CLOUD, "WORKER_WORK_DIR": str(tmp_path / "work")}

    code, out, err = _cli(
        ["run", "--model", str(model), "--input", str(inputs), "--output", str(outputs), *common], env
    )
    assert code == 0, err
    local = json.loads(out)
    remote_argv = ["--model", f"gs://{bucket}/models/mlp/", "--input", f"gs://{bucket}/in/"]
    code, out, err = _cli(
        ["run", *remote_argv, "--output", f"gs://{bucket}/out/", *common], {**env, "STORAGE_EMULATOR_HOST": gcs_host}
    )
    assert code == 0, err
    remote = json.loads(out)

    assert local["status"] == remote["status"] == "PARTIALLY_SUCCEEDED"
    assert local["totals"] == remote["totals"] == {
        "lines": 32, "instances": 31, "predictions": 30, "errors": 1, "skipped": 1,
    }  # fmt: skip
    _same_manifest(
        local,
        remote,
        {
            f"{model}/": f"gs://{bucket}/models/mlp/",
            f"{inputs}/": f"gs://{bucket}/in/",
            f"{outputs}/": f"gs://{bucket}/out/",
        },
    )
    assert json.loads((outputs / "_manifest.json").read_text()) == local
    written = sorted(str(p.relative_to(outputs)) for p in outputs.rglob("*") if p.is_file())
    assert written == ["_manifest.json", "a.jsonl", "deeper/b.jsonl", "deeper/c.jsonl.gz"]
    for rel in written[1:]:
        got = [json.loads(line) for line in (outputs / rel).read_text().splitlines()]
        want = [
            json.loads(line)
            for line in storage_client.bucket(bucket).blob(f"out/{rel}").download_as_text().splitlines()
        ]
        assert_same_output_lines(got, want)


def test_a_local_job_run_again_is_skipped_and_a_relative_path_is_read_from_the_working_folder(model_dirs, tmp_path):
    shutil.copytree(model_dirs["mlp"], tmp_path / "model")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in models.mlp_instances(3)) + "\n")
    env = {**NO_CLOUD, "WORKER_WORK_DIR": str(tmp_path / "work")}
    argv = ["run", "--model", "model", "--input", "data.jsonl", "--output", "out", "--job-id", "again", "--quiet"]
    code, out, err = _cli(argv, env, cwd=tmp_path)
    assert code == 0, err
    first = json.loads(out)
    assert first["status"] == "SUCCEEDED" and first["totals"]["predictions"] == 3
    assert first["files"][0]["output"] == str(tmp_path / "out" / "data.jsonl")
    assert len((tmp_path / "out" / "data.jsonl").read_text().splitlines()) == 3
    code, out, err = _cli(argv, env, cwd=tmp_path)
    assert code == 0 and json.loads(out) == first, err  # a completed job id is not run again
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_manifest.json", "data.jsonl"]


def test_local_path_mistakes_are_one_line_each(model_dirs, tmp_path):
    shutil.copytree(model_dirs["mlp"], tmp_path / "model")
    env = {**NO_CLOUD, "WORKER_WORK_DIR": str(tmp_path / "work")}
    code, out, err = _cli(
        ["run", "--model", "model", "--input", "nothing/", "--output", "out", "--quiet"], env, tmp_path
    )
    assert code == 1 and json.loads(out)["status"] == "FAILED", err
    assert err.splitlines()[-1].endswith(f"(NOT_FOUND): input folder {tmp_path}/nothing/ does not exist")
    code, _, err = _cli(["run", "--model", "model", "--input", "gs://bkt/in/", "--output", "out"], env, tmp_path)
    assert (code, err.strip()) == (2, "error: --model, --input and --output must be all gs:// URIs or all local paths")
    code, _, err = _cli(["describe", "--model", str(tmp_path / "none")], env)
    assert code == 1 and err.strip() == f"error: model {tmp_path}/none does not exist — check the path"


def test_describe_reads_a_local_model(model_dirs, tmp_path):
    code, out, err = _cli(
        ["describe", "--model", str(model_dirs["mlp"])], {**NO_CLOUD, "WORKER_WORK_DIR": str(tmp_path)}
    )
    assert code == 0, err
    described = json.loads(out)
    sig = described["signatures"]["serving_default"]
    assert described["resolved"] == f"{model_dirs['mlp']}/" and described["version"] is None
    assert sig["inputs"] == {"x": {"dtype": "float", "shape": [-1, 16]}}
    assert len(sig["example_prediction"]) == 3  # the one output, unwrapped as in output lines
    # Its CSV example is a file that a job reads and predicts.
    assert sig["example_csv"] == ",".join(f"c{k}" for k in range(16)) + "\n" + ",".join(["0.0"] * 16) + "\n"
    (tmp_path / "example.csv").write_text(sig["example_csv"])
    argv = ["run", "--model", str(model_dirs["mlp"]), "--input", str(tmp_path / "example.csv")]
    code, out, err = _cli(
        [*argv, "--output", str(tmp_path / "out"), "--quiet"], {**NO_CLOUD, "WORKER_WORK_DIR": str(tmp_path)}
    )
    assert code == 0 and json.loads(out)["totals"]["predictions"] == 1, err
