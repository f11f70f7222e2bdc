"""Storage against fake-gcs-server with the real google-cloud-storage client."""

from __future__ import annotations

import os

import pytest

from worker import errors
from worker.jobs import GcsUri
from worker.storage import GcsStore, _safe_join

pytestmark = pytest.mark.integration


@pytest.fixture
def store(storage_client):
    return GcsStore(storage_client)


def _put(client, bucket, name, data=b"x\n"):
    client.bucket(bucket).blob(name).upload_from_string(data)


def test_single_object_is_exact_and_prefix_skips_output(store, storage_client, bucket):
    for name in ("in/a.json", "in/a.json.bak", "in/sub/b.json", "in/out/old.json", "in/dir/"):
        _put(storage_client, bucket, name)
    [one] = store.list_inputs(GcsUri(bucket, "in/a.json"))
    assert (one.uri.path, one.rel) == ("in/a.json", "a.json")
    files = store.list_inputs(GcsUri(bucket, "in/"), exclude=GcsUri(bucket, "in/out/"))
    assert [f.rel for f in files] == ["a.json", "a.json.bak", "sub/b.json"]


def test_lines_stream_across_chunks_and_long_lines(store, storage_client, bucket, monkeypatch):
    import worker.storage as storage_mod

    monkeypatch.setattr(storage_mod, "READ_CHUNK_BYTES", 256 * 1024)
    long_line = b"z" * (700 * 1024)
    _put(storage_client, bucket, "f.jsonl", b"a\r\n" + long_line + b"\n\nlast")
    [f] = store.list_inputs(GcsUri(bucket, "f.jsonl"))
    assert list(store.read_lines(f)) == [b"a", long_line, b"", b"last"]


def test_failed_output_never_appears(store, storage_client, bucket):
    uri = GcsUri(bucket, "out/f.jsonl")
    with pytest.raises(RuntimeError), store.open_output(uri, job_id="j", content_type="application/jsonl") as w:
        w.write(b"x" * (5 * 1024 * 1024))  # more than one upload chunk already sent
        raise RuntimeError("job died")
    assert storage_client.bucket(bucket).get_blob("out/f.jsonl") is None
    with store.open_output(uri, job_id="j", content_type="application/jsonl") as w:
        w.write(b"ok\n")
    blob = storage_client.bucket(bucket).get_blob("out/f.jsonl")
    assert blob.download_as_bytes() == b"ok\n" and blob.metadata == {"embedded-tf-job": "j"}


def test_model_versions_highest_wins(store, storage_client, bucket, model_dirs, tmp_path):
    from localdev.models import upload_folder

    for version in ("3", "12"):
        upload_folder(storage_client, model_dirs["mlp"], bucket, f"m/{version}")
    _put(storage_client, bucket, "m/notes/readme.txt")
    source = store.resolve_model(GcsUri(bucket, "m"))
    files = [p for p in model_dirs["mlp"].rglob("*") if p.is_file()]
    assert source.size == sum(p.stat().st_size for p in files) and len(source.blobs) == len(files)
    local = store.fetch_model(source, str(tmp_path))
    assert (local.version, str(local.uri)) == (12, f"gs://{bucket}/m/12/")
    assert os.path.isfile(os.path.join(local.path, "saved_model.pb"))
    again = store.fetch_model(store.resolve_model(GcsUri(bucket, "m/12/")), str(tmp_path))
    assert again.path == local.path  # unchanged model: reused, not downloaded again


def test_model_names_cannot_escape(tmp_path):
    with pytest.raises(errors.ModelError, match="would escape"):
        _safe_join(str(tmp_path), "../../etc/passwd")
    assert _safe_join(str(tmp_path), "variables/v.index").endswith("variables/v.index")
