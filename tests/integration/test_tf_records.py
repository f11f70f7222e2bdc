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
