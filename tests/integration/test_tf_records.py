"""TFRecord input files end to end: tf.train.Examples written by TensorFlow's own TFRecordWriter,
plain and GZIP, for a model that parses them, served by fake-gcs-server through a Pub/Sub job, and
through local paths."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from localdev import models
from tests.conftest import read_lines, run_local_cli
from tests.outputs import assert_same_output_lines, close_to

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _examples(values: list[tuple[float, float]], path: Path, compression: str = "") -> list[bytes]:
    """tf.train.Examples of feature x (2 floats), written to `path`; their serialized records."""
    from worker.serving.tf_backend import import_tensorflow

    tf = import_tensorflow()
    records = []
    with tf.io.TFRecordWriter(str(path), options=compression or None) as writer:
        for a, b in values:
            feature = {"x": tf.train.Feature(float_list=tf.train.FloatList(value=[a, b]))}
            record = tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
            writer.write(record)
            records.append(record)
    return records


def _b64(record: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(record).decode()}


def test_tfrecord_files_through_a_pubsub_job_and_through_local_paths(worker_service, storage_client, bucket, tmp_path):
    _, _, topo = worker_service
    model = models.build_parse_example(tmp_path / "model" / "1")
    models.upload_folder(storage_client, model, bucket, "model/1")
    plain = _examples([(0.5, 1.5), (2.0, 3.0), (-1.0, 1.0)], tmp_path / "a.tfrecord")
    zipped = _examples([(1.0, 1.0), (4.0, 0.25)], tmp_path / "b.tfrecord.gz", "GZIP")
    _examples([(10.0, 5.0)], tmp_path / "part-00000")
    # No extension, no option: recognised as TFRecord by its first record's checksums.
    _examples([(7.0, 0.5)], tmp_path / "part-00001")
    # A copy of a.tfrecord whose second record's data is damaged: that record's checksum fails.
    damaged = bytearray((tmp_path / "a.tfrecord").read_bytes())
    second = 12 + len(plain[0]) + 4 + 12  # past the first record and the second's length
    damaged[second + 3] ^= 0xFF
    (tmp_path / "damaged.tfrecord").write_bytes(bytes(damaged))
    for name in ("a.tfrecord", "b.tfrecord.gz", "damaged.tfrecord", "part-00000", "part-00001"):
        where = "other" if name == "part-00000" else "in"
        storage_client.bucket(bucket).blob(f"{where}/{name}").upload_from_filename(str(tmp_path / name))

    topo.publish_job(
        {
            "model": f"gs://{bucket}/model/",
            "input": f"gs://{bucket}/in/",
            "output": f"gs://{bucket}/out/",
            "job_id": "tfr-1",
        }
    )
    [(manifest, attrs)] = topo.completions(1)
    assert attrs["status"] == "PARTIALLY_SUCCEEDED", manifest
    files = {f["input"].rsplit("/", 1)[1]: f for f in manifest["files"]}
    assert files["b.tfrecord.gz"]["output"] == f"gs://{bucket}/out/b.tfrecord.gz.jsonl"
    assert manifest["totals"] == {"lines": 9, "instances": 9, "predictions": 8, "errors": 1, "skipped": 0}
    assert files["part-00001"]["output"] == f"gs://{bucket}/out/part-00001.jsonl"
    assert read_lines(storage_client, f"gs://{bucket}/out/part-00001.jsonl")[0]["prediction"] == 7.5
    assert storage_client.bucket(bucket).get_blob("out/part-00001") is None  # the read as JSON lines left nothing

    a = read_lines(storage_client, f"gs://{bucket}/out/a.tfrecord.jsonl")
    assert [line["instance"] for line in a] == [_b64(r) for r in plain]  # each record, as sent
    assert all(close_to(line["prediction"], want) for line, want in zip(a, [2.0, 5.0, 0.0], strict=True))
    b = read_lines(storage_client, f"gs://{bucket}/out/b.tfrecord.gz.jsonl")
    assert [line["instance"] for line in b] == [_b64(r) for r in zipped]
    assert [line["prediction"] for line in b] == [2.0, 4.25]
    bad = read_lines(storage_client, f"gs://{bucket}/out/damaged.tfrecord.jsonl")
    assert [line["prediction"] for line in (bad[0], bad[2])] == [2.0, 0.0]
    assert (
        bad[1]["error"]["message"]
        == f"line 2 (the record at byte {12 + len(plain[0]) + 4}) fails its checksum: it is corrupt"
    )

    # A file without the extension, read as TFRecord because the job says so.
    topo.publish_job(
        {
            "model": f"gs://{bucket}/model/",
            "input": f"gs://{bucket}/other/part-00000",
            "output": f"gs://{bucket}/out2/",
            "job_id": "tfr-2",
            "options": {"input_format": "tf-record"},
        }
    )
    [(second_manifest, _)] = topo.completions(1)
    assert second_manifest["status"] == "SUCCEEDED", second_manifest
    assert read_lines(storage_client, f"gs://{bucket}/out2/part-00000.jsonl")[0]["prediction"] == 15.0

    # The same input through local paths: the same output lines.
    local_in = tmp_path / "in"
    local_in.mkdir()
    for name in ("a.tfrecord", "b.tfrecord.gz", "damaged.tfrecord", "part-00001"):
        (local_in / name).write_bytes((tmp_path / name).read_bytes())
    argv = ["run", "--model", str(tmp_path / "model"), "--input", str(local_in), "--output", str(tmp_path / "out")]
    done = run_local_cli([*argv, "--quiet"], tmp_path / "work")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["totals"] == manifest["totals"]
    for name, remote in (("a.tfrecord", a), ("b.tfrecord.gz", b), ("damaged.tfrecord", bad)):
        local = [json.loads(line) for line in (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()]
        assert_same_output_lines(local, remote)


def test_a_large_tfrecord_file_is_cut_into_pieces_at_records(worker_service, storage_client, bucket, tmp_path):
    """`parts: 3` over a file of tf.train.Examples written by TensorFlow, of about 100 kB (pieces
    of at least 16 kB in this worker): each part finds the first record in its piece by the
    framing, and the joined output holds every record once, in order, predicted; a damaged
    record's error line names it by its number in the file."""
    _, _, topo = worker_service
    model = models.build_parse_example(tmp_path / "model" / "1")
    models.upload_folder(storage_client, model, bucket, "big-model/1")
    values = [(k / 8, (k % 7) / 4) for k in range(2500)]
    records = _examples(values, tmp_path / "big.tfrecord")
    data = bytearray((tmp_path / "big.tfrecord").read_bytes())
    damaged = sum(12 + len(r) + 4 for r in records[:2000]) + 12  # the data of record 2001
    data[damaged + 5] ^= 0xFF
    storage_client.bucket(bucket).blob("big/examples.tfrecord").upload_from_string(bytes(data))
    job = {"model": f"gs://{bucket}/big-model/", "input": f"gs://{bucket}/big/", "output": f"gs://{bucket}/big-out/"}
    topo.publish_job({**job, "options": {"parts": 3}})
    [(manifest, attrs)] = topo.completions(1)
    assert attrs["status"] == "PARTIALLY_SUCCEEDED", manifest
    assert manifest["totals"] == {"lines": 2500, "instances": 2500, "predictions": 2499, "errors": 1, "skipped": 0}
    [entry] = manifest["files"]
    assert entry["pieces"] == 3 and entry["output"] == f"gs://{bucket}/big-out/examples.tfrecord.jsonl"
    assert entry["first_error"]["line"] == 2001
    assert "fails its checksum" in entry["first_error"]["message"]
    lines = read_lines(storage_client, f"gs://{bucket}/big-out/examples.tfrecord.jsonl")
    good = [k for k in range(2500) if k != 2000]
    assert len(lines) == 2500 and [lines[k]["instance"] for k in good] == [_b64(records[k]) for k in good]
    assert all(close_to(lines[k]["prediction"], sum(values[k])) for k in good)
    assert lines[2000]["error"]["message"].startswith("line 2001 (the record at byte ")
    assert topo.no_more_completions() == []
