"""CSV input files end to end: written by Python's csv module and as a spreadsheet exports them
(CRLF, a byte order mark, quoted commas), served by fake-gcs-server through a Pub/Sub job, and the
same files through local paths; predictions checked against the model's own."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from localdev import models
from tests.conftest import read_lines, run_local_cli
from tests.outputs import assert_same_output_lines, assert_same_predictions

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FEATURES = [f"f{k}" for k in range(16)]


def _python_csv(rows: list[list[float]]) -> bytes:
    """The csv module's own writing: numbers bare, strings quoted."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
    writer.writerow(FEATURES)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _spreadsheet_csv(rows: list[list[float]]) -> bytes:
    """As a spreadsheet exports "CSV UTF-8": a byte order mark, CRLF, an id column of quoted text
    holding commas, then one short row and one with an unclosed quote."""
    lines = ['"id",' + ",".join(FEATURES)]
    lines += [f'"row {k}, batch A",' + ",".join(repr(v) for v in row) for k, row in enumerate(rows)]
    lines += ['"short",1,2', '"open,1']
    return b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n"


def test_csv_files_through_a_pubsub_job_and_through_local_paths(
    worker_service, storage_client, bucket, model_uris, model_dirs, reference, gcs_host, tmp_path
):
    _, _, topo = worker_service
    rows = models.mlp_instances(12, seed=5)
    files = {"plain.csv": _python_csv(rows[:6]), "sheet/export.csv": _spreadsheet_csv(rows[6:])}
    for rel, data in files.items():
        storage_client.bucket(bucket).blob(f"in/{rel}").upload_from_string(data)
    topo.publish_job(
        {
            "model": model_uris["mlp"],
            "input": f"gs://{bucket}/in/",
            "output": f"gs://{bucket}/out/",
            "job_id": "csv-1",
            "options": {},
        }
    )
    [(manifest, attrs)] = topo.completions(1)
    assert attrs["status"] == "PARTIALLY_SUCCEEDED", manifest
    by_input = {f["input"].rsplit("/in/", 1)[1]: f for f in manifest["files"]}
    # Outputs are JSON lines: `.jsonl` appended to a CSV file's mirrored name.
    assert by_input["plain.csv"]["output"] == f"gs://{bucket}/out/plain.csv.jsonl"
    assert {k: by_input["plain.csv"][k] for k in ("lines", "instances", "predictions", "errors", "skipped")} == {
        "lines": 7, "instances": 6, "predictions": 6, "errors": 0, "skipped": 1,
    }  # fmt: skip
    plain = read_lines(storage_client, f"gs://{bucket}/out/plain.csv.jsonl")
    assert [line["instance"] for line in plain] == rows[:6]  # each row as the list of its values
    assert_same_predictions([line["prediction"] for line in plain], reference(model_dirs["mlp"], rows[:6]))

    # Without key_field the spreadsheet's id column is sent too: every row is refused by the model.
    sheet = by_input["sheet/export.csv"]
    assert (sheet["lines"], sheet["skipped"], sheet["instances"], sheet["errors"]) == (9, 1, 8, 8)
    lines = read_lines(storage_client, f"gs://{bucket}/out/sheet/export.csv.jsonl")
    assert lines[-2]["error"]["message"] == "line 8 has 3 cells where the header has 17"
    assert lines[-1] == {
        "instance": '"open,1',
        "error": {
            "status": "INVALID_ARGUMENT",
            "message": "line 9 not a CSV row: a double quote is not closed (a cell may not hold a line break)",
        },
    }

    # key_field names the id column: it becomes each line's key, and the rest is sent in column order.
    topo.publish_job(
        {
            "model": model_uris["mlp"],
            "input": f"gs://{bucket}/in/sheet/export.csv",
            "output": f"gs://{bucket}/keyed/",
            "job_id": "csv-2",
            "options": {"key_field": "id"},
        }
    )
    [(keyed, _)] = topo.completions(1)
    assert keyed["totals"] == {"lines": 9, "instances": 8, "predictions": 6, "errors": 2, "skipped": 1}
    keyed_lines = read_lines(storage_client, f"gs://{bucket}/keyed/export.csv.jsonl")
    assert [line["key"] for line in keyed_lines[:6]] == [f"row {k}, batch A" for k in range(6)]
    assert_same_predictions([line["prediction"] for line in keyed_lines[:6]], reference(model_dirs["mlp"], rows[6:]))

    # The same file and job through local paths: the same output lines.
    (tmp_path / "export.csv").write_bytes(files["sheet/export.csv"])
    argv = ["run", "--model", str(model_dirs["mlp"]), "--input", str(tmp_path / "export.csv")]
    done = run_local_cli([*argv, "--output", str(tmp_path / "out"), "--key-field", "id", "--quiet"], tmp_path / "work")
    assert done.returncode == 0, done.stderr
    local = [json.loads(line) for line in (tmp_path / "out" / "export.csv.jsonl").read_text().splitlines()]
    assert_same_output_lines(local, keyed_lines)


def test_a_large_csv_file_is_cut_into_pieces_that_each_take_its_header(
    worker_service, storage_client, bucket, model_uris, model_dirs, reference
):
    """`parts: 3` over a spreadsheet export of about 70 kB (pieces of at least 16 kB in this
    worker), keyed by its id column: the dispatch cuts it at line starts into 3 pieces, each part
    reads the file's header to name its rows, and the joined output is the job run whole's — every
    row once, in order, keyed; its bad rows error lines numbered as in the file."""
    _, _, topo = worker_service
    rows = models.mlp_instances(500, seed=8)
    storage_client.bucket(bucket).blob("big/export.csv").upload_from_string(_spreadsheet_csv(rows))
    job = {"model": model_uris["mlp"], "input": f"gs://{bucket}/big/export.csv", "options": {"key_field": "id"}}
    topo.publish_job({**job, "output": f"gs://{bucket}/big-parts/", "options": {"key_field": "id", "parts": 3}})
    [(manifest, attrs)] = topo.completions(1)
    topo.publish_job({**job, "output": f"gs://{bucket}/big-whole/"})
    [(whole, _)] = topo.completions(1)
    assert attrs["status"] == "PARTIALLY_SUCCEEDED", manifest
    assert manifest["totals"] == whole["totals"] == {
        "lines": 503, "instances": 502, "predictions": 500, "errors": 2, "skipped": 1
    }  # fmt: skip
    [entry] = manifest["files"]
    assert entry["pieces"] == 3 and entry["first_error"] == whole["files"][0]["first_error"]
    assert entry["first_error"]["line"] == 502
    cut = read_lines(storage_client, f"gs://{bucket}/big-parts/export.csv.jsonl")
    assert [line["key"] for line in cut[:500]] == [f"row {k}, batch A" for k in range(500)]
    assert_same_predictions([line["prediction"] for line in cut[:500]], reference(model_dirs["mlp"], rows))
    assert_same_output_lines(cut, read_lines(storage_client, f"gs://{bucket}/big-whole/export.csv.jsonl"))
