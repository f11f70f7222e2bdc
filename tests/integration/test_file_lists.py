"""File lists end to end: a text file of gs:// URIs, each file's bytes one instance {"b64": …},
through a Pub/Sub job on fake-gcs-server; and a list of local paths through the CLI."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tests.conftest import read_lines, run_local_cli

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _length(data: bytes) -> dict[str, object]:
    """The `strings` model's prediction for a file of these bytes: its length, and it upper-cased."""
    return {"length": len(data), "upper_bytes": {"b64": base64.b64encode(data.upper()).decode()}}


def test_a_file_list_through_a_pubsub_job(worker_service, storage_client, bucket, model_uris):
    _, _, topo = worker_service
    files = {"img/a.bin": b"\x89PNG\r\n\x1a\n\x00\xff", "img/empty.bin": b"", "img/c.txt": b"hello, world"}
    for name, data in files.items():
        storage_client.bucket(bucket).blob(name).upload_from_string(data)
    listed = [f"gs://{bucket}/img/a.bin", "", f"gs://{bucket}/img/missing.bin", "not a uri"]
    listed += [f"gs://{bucket}/img/empty.bin", f"gs://{bucket}/img/c.txt"]
    storage_client.bucket(bucket).blob("lists/batch.txt").upload_from_string("\n".join(listed) + "\n")
    topo.publish_job(
        {
            "model": model_uris["strings"],
            "input": f"gs://{bucket}/lists/batch.txt",
            "output": f"gs://{bucket}/out/",
            "job_id": "file-list-1",
            "options": {"input_format": "file-list"},
        }
    )
    [(manifest, attrs)] = topo.completions(1)
    assert attrs["status"] == "PARTIALLY_SUCCEEDED", manifest
    assert manifest["files"][0]["output"] == f"gs://{bucket}/out/batch.txt.jsonl"
    assert manifest["totals"] == {"lines": 6, "instances": 5, "predictions": 3, "errors": 2, "skipped": 1}
    lines = read_lines(storage_client, f"gs://{bucket}/out/batch.txt.jsonl")
    assert [line["instance"] for line in lines] == [u for u in listed if u]  # each line shows its URI
    assert lines[0]["prediction"] == _length(files["img/a.bin"])
    assert lines[3]["prediction"] == _length(b"") and lines[4]["prediction"] == _length(files["img/c.txt"])
    missing = lines[1]["error"]["message"]
    assert missing.startswith(f"line 3 names gs://{bucket}/img/missing.bin, which cannot be read: "), missing
    assert lines[2]["error"]["message"] == "line 4 names not a uri, which cannot be read: it is not a gs:// URI"


def test_a_list_of_local_paths_through_the_cli(model_dirs, tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "big.bin").write_bytes(b"x" * 3000)
    (tmp_path / "list.txt").write_text(f"{tmp_path}/a.bin\nbig.bin\n{tmp_path}/none.bin\n")
    argv = ["run", "--model", str(model_dirs["strings"]), "--input", str(tmp_path / "list.txt"), "--quiet"]
    argv += ["--output", str(tmp_path / "out"), "--input-format", "file-list"]
    # A relative path in the list is read from the working folder.
    done = run_local_cli(argv, tmp_path / "work", cwd=tmp_path, WORKER_MAX_LINE_BYTES="2000")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in (tmp_path / "out" / "list.txt.jsonl").read_text().splitlines()]
    assert lines[0] == {"instance": f"{tmp_path}/a.bin", "prediction": _length(b"abc")}
    assert lines[1]["error"]["message"] == (
        "line 2 names big.bin, larger than the 1,484 bytes WORKER_MAX_LINE_BYTES allows: it was not read"
    )
    assert (
        lines[2]["error"]["message"]
        == f"line 3 names {tmp_path}/none.bin, which cannot be read: reading {tmp_path}/none.bin: it does not exist"
    )
