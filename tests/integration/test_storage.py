"""Storage against fake-gcs-server with the real google-cloud-storage client."""

from __future__ import annotations

import bz2
import codecs
import dataclasses
import gzip
import io
import itertools
import lzma
import os
import zipfile
from typing import Any

import numpy as np
import pytest

import worker.storage.store as store_mod
import worker.storage.upload as upload_mod
from worker import errors
from worker.storage import WRITTEN_BY_KEY, GcsStore
from worker.storage.models import _safe_join
from worker.uris import Uri

pytestmark = pytest.mark.integration


@pytest.fixture
def store(storage_client):
    return GcsStore(storage_client)


@pytest.fixture(params=["pooled", "requests"])
def either_store(request, gcs_host, monkeypatch):
    """A store whose reads and small uploads go straight to the connection pools (no proxy
    variables), and one where requests sends them (proxy variables set, and bypassed here)."""
    for key in [k for k in os.environ if k.lower().endswith("_proxy")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_host)
    if request.param == "requests":
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    store = GcsStore.from_environment("local", environ=os.environ)
    assert store._client._http.trust_env == (request.param == "requests")
    return store


def _put(client, bucket, name, data=b"x\n"):
    client.bucket(bucket).blob(name).upload_from_string(data)


def test_single_object_is_exact_and_prefix_skips_output(store, storage_client, bucket):
    # With the parts an interrupted `gcloud storage cp` and `gsutil cp` of a large file leave behind.
    gcloud = "in/gcloud/tmp/parallel_composite_uploads/see_gcloud_storage_cp_help_for_details/6f1e_0"
    gsutil = "in/42/gsutil/tmp/parallel_composite_uploads/for_details_see/gsutil_help_cp/9a7c"
    for name in ("in/a.json", "in/a.json.bak", "in/sub/b.json", "in/out/old.json", "in/dir/", gcloud, gsutil):
        _put(storage_client, bucket, name)
    [one] = store.list_inputs(Uri(bucket, "in/a.json"))
    assert (one.uri.path, one.rel) == ("in/a.json", "a.json")
    files = store.list_inputs(Uri(bucket, "in/"), exclude=Uri(bucket, "in/out/"))
    assert [f.rel for f in files] == ["a.json", "a.json.bak", "sub/b.json"]


def test_a_wildcard_input_is_not_expanded_and_the_error_names_the_prefix_to_give(store, storage_client, bucket):
    _put(storage_client, bucket, "in/a.jsonl")
    _put(storage_client, bucket, "in/star*.jsonl")  # a name may hold a * of its own: read as it is
    [f] = store.list_inputs(Uri(bucket, "in/star*.jsonl"))
    assert f.rel == "star*.jsonl"
    with pytest.raises(errors.NotFound) as raised:
        store.list_inputs(Uri(bucket, "in/*.jsonl"))
    assert str(raised.value) == (
        f"input gs://{bucket}/in/*.jsonl does not exist, and wildcards (* ? [) are not expanded — give the prefix "
        f"the inputs are under, ending in / (gs://{bucket}/in/, say): every object under it is an input"
    )


def _lines(store: GcsStore, f: Any) -> list[bytes]:
    return [line for block in store.read_blocks(f) for line in block]


def test_lines_stream_across_chunks_and_long_lines(store, storage_client, bucket, monkeypatch):
    monkeypatch.setattr(store_mod, "READ_CHUNK_BYTES", 256 * 1024)
    long_line = b"z" * (700 * 1024)
    _put(storage_client, bucket, "f.jsonl", b"a\r\n" + long_line + b"\n\nmid\rdle\r\nlast")
    [f] = store.list_inputs(Uri(bucket, "f.jsonl"))
    blocks = list(store.read_blocks(f))
    assert [line for block in blocks for line in block] == [b"a", long_line, b"", b"mid\rdle", b"last"]
    assert all(blocks), "no empty block"


def test_a_line_longer_than_the_limit_is_cut_and_the_rest_of_it_never_held(store, storage_client, bucket, monkeypatch):
    """A file that is one JSON document, 1.5 MiB on one line, read in chunks of 256 KiB with lines
    limited to 100 kB: the line comes cut to the limit and one byte (so it still reads as too
    long), and the lines after it come whole; the cut line's rest was dropped as it arrived."""
    monkeypatch.setattr(store_mod, "READ_CHUNK_BYTES", 256 * 1024)
    limit = 100_000
    document = b"[" + b"[0.5, 1.5], " * (1536 * 1024 // 12) + b"[0]]"
    _put(storage_client, bucket, "doc.json", b"[1]\n" + document + b"\r\n[2]\n" + b"y" * 5 + b"\n" + b"w" * 200_000)
    [f] = store.list_inputs(Uri(bucket, "doc.json"))
    lines = [line for block in store.read_blocks(f, max_line_bytes=limit) for line in block]
    assert lines == [b"[1]", document[: limit + 1], b"[2]", b"yyyyy", b"w" * (limit + 1)]


def test_after_a_line_longer_than_the_limit_the_file_is_still_read_in_whole_chunks(
    store, storage_client, bucket, monkeypatch
):
    """The rest of the file after a cut line comes in chunks of READ_CHUNK_BYTES, not in the small
    reads a piece makes past its end for its last line."""
    monkeypatch.setattr(store_mod, "READ_CHUNK_BYTES", 256 * 1024)
    monkeypatch.setattr(store_mod, "TAIL_CHUNK_BYTES", 1000)
    rest = b"".join(b"[%d]\n" % i for i in range(150_000))
    _put(storage_client, bucket, "long-first.jsonl", b"z" * 300_000 + b"\n" + rest)
    [f] = store.list_inputs(Uri(bucket, "long-first.jsonl"))
    reads = []
    real = store._media.read
    monkeypatch.setattr(
        store._media, "read", lambda url, start, end: reads.append(end - start + 1) or real(url, start, end)
    )
    lines = [line for block in store.read_blocks(f, max_line_bytes=100_000) for line in block]
    assert lines == [b"z" * 100_001, *rest.splitlines()]
    assert len(reads) == -(-f.size // (256 * 1024))


@pytest.mark.parametrize("size", [0, 1, 256 * 1024 - 1, 256 * 1024, 256 * 1024 + 1, 3 * 256 * 1024])
def test_every_byte_is_read_at_chunk_boundaries(store, storage_client, bucket, monkeypatch, size):
    monkeypatch.setattr(store_mod, "READ_CHUNK_BYTES", 256 * 1024)
    data = b"".join(b"%07d\n" % i for i in range(size // 8 + 1))[:size]
    _put(storage_client, bucket, "edge.jsonl", data)
    [f] = store.list_inputs(Uri(bucket, "edge.jsonl"))
    assert b"\n".join(_lines(store, f)) + (b"\n" if data.endswith(b"\n") else b"") == data


def test_a_file_replaced_after_listing_is_never_mixed_and_retried(store, storage_client, bucket):
    _put(storage_client, bucket, "v.jsonl", b"old\n")
    [f] = store.list_inputs(Uri(bucket, "v.jsonl"))
    _put(storage_client, bucket, "v.jsonl", b"new, and longer\n")
    with pytest.raises(errors.TransientError, match=r"v.jsonl was replaced or deleted while it was read"):
        list(_lines(store, f))
    [again] = store.list_inputs(Uri(bucket, "v.jsonl"))
    assert list(_lines(store, again)) == [b"new, and longer"]


# Characters that must be escaped in a URL path or would end it (#, ?), and non-ASCII ones.
ODD_NAMES = ["in/a b+c%20d.jsonl", "in/q?x=1#frag.jsonl", "in/données/é ü.jsonl", "in/semi;colon&amp.jsonl"]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_objects_with_any_name_are_read_and_written_exactly(either_store, storage_client, bucket, name):
    store = either_store
    _put(storage_client, bucket, name, b"[1]\n[2]\n")
    [f] = store.list_inputs(Uri(bucket, name))
    assert _lines(store, f) == [b"[1]", b"[2]"]
    out = "out/" + name
    with store.open_output(Uri(bucket, out), job_id="j", content_type="application/jsonl") as w:
        w.write(b"answer\n")
    blob = storage_client.bucket(bucket).get_blob(out)
    assert blob.download_as_bytes() == b"answer\n"
    assert (blob.metadata, blob.content_type) == ({"embedded-tf-job": "j"}, "application/jsonl")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "utf-8-sig"])
def test_a_file_with_a_byte_order_mark_is_read_as_utf8_text(store, storage_client, bucket, monkeypatch, encoding):
    """Windows PowerShell's `>` writes UTF-16 with a byte order mark and CRLF line endings: read
    split on bytes, every line kept a NUL byte and the mark stayed on the first. Read chunks of an
    odd size (characters cut across them) give the same lines as a UTF-8 file would."""
    monkeypatch.setattr(store_mod, "READ_CHUNK_BYTES", 256 * 1024 + 1)
    lines = [f'{{"text": "naïve café ☕ {i}"}}' for i in range(20_000)]
    text = "\r\n".join(lines) + "\r\n"
    stored = text.encode(encoding) if encoding != "utf-16-be" else codecs.BOM_UTF16_BE + text.encode(encoding)
    _put(storage_client, bucket, "in/win.jsonl", stored)
    [f] = store.list_inputs(Uri(bucket, "in/win.jsonl"))
    assert _lines(store, f) == [line.encode() for line in lines]


def test_a_file_whose_byte_order_mark_lies_fails_its_job_saying_so(store, storage_client, bucket):
    _put(storage_client, bucket, "in/odd.jsonl", codecs.BOM_UTF16_LE + b"[\x001\x00]\x00\n")  # one byte short
    [f] = store.list_inputs(Uri(bucket, "in/odd.jsonl"))
    with pytest.raises(errors.InvalidJob, match=f"^input gs://{bucket}/in/odd.jsonl begins as utf-16 text"):
        _lines(store, f)


@pytest.mark.parametrize("lines", [10, 120_000])  # one read chunk, and several
def test_a_gzip_file_stored_as_it_is_is_read_decompressed(store, storage_client, bucket, monkeypatch, lines):
    """A `.jsonl.gz` stored without Content-Encoding (a BigQuery export with GZIP compression, say),
    made of two gzip members (`cat a.gz b.gz`): every line is read once, decompressed, in pieces no
    larger than a read chunk however much the data expands."""
    monkeypatch.setattr(store_mod, "READ_CHUNK_BYTES", 256 * 1024)
    data = b"".join(b"[%d, 0.5]\n" % i for i in range(lines)) + b"[0, 0]\n" * lines * 4  # the tail compresses 500:1
    half = len(data) // 3
    _put(storage_client, bucket, "in/z.jsonl.gz", gzip.compress(data[:half]) + gzip.compress(data[half:]))
    [f] = store.list_inputs(Uri(bucket, "in/z.jsonl.gz"))
    blocks = list(store.read_blocks(f))
    assert b"\n".join(line for block in blocks for line in block) + b"\n" == data
    assert max(sum(map(len, block)) + len(block) for block in blocks) <= 2 * 256 * 1024


def _tfrecord(tmp_path: Any, compression: str = "") -> bytes:
    """A TFRecord file of two serialized tf.Example protos, as TensorFlow writes one."""
    from worker.serving.tf_backend import import_tensorflow

    tf = import_tensorflow()
    path = str(tmp_path / "data.tfrecord")
    with tf.io.TFRecordWriter(path, options=compression or None) as writer:
        for v in (0.5, 1.5):
            feature = {"x": tf.train.Feature(float_list=tf.train.FloatList(value=[v, v]))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    with open(path, "rb") as f:
        return f.read()


def _zipped(data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("in.jsonl", data)
    return buf.getvalue()


def _npy(rows: list[list[float]]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array(rows))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (_tfrecord, "a TFRecord file"),
        (lambda tmp: _tfrecord(tmp, "GZIP"), "a TFRecord file"),  # read through gzip first
        (lambda tmp: _zipped(b"[1]\n"), "a zip archive"),
        (lambda tmp: bz2.compress(b"[1]\n" * 9), "bzip2-compressed"),
        (lambda tmp: lzma.compress(b"[1]\n" * 9), "xz-compressed"),
        (lambda tmp: _npy([[1.0, 2.0]]), "a NumPy array file"),
        (lambda tmp: b"PAR1\x15\x04\x15\x10\x15\x14L\x15\x02\x15\x00\x12\x00\x00", "a Parquet file"),
        (lambda tmp: b"Obj\x01\x04\x14avro.codec\x08null", "an Avro file"),
    ],
)
def test_a_file_of_another_format_fails_its_job_naming_the_format(store, storage_client, bucket, tmp_path, make, what):
    """Not an error line per record of garbage: the job says what the file is and what to write instead."""
    _put(storage_client, bucket, "in/data", make(tmp_path))
    [f] = store.list_inputs(Uri(bucket, "in/data"))
    with pytest.raises(errors.InvalidJob, match=f"^input gs://{bucket}/in/data is {what}, not JSON lines — "):
        _lines(store, f)


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        (gzip.compress(b"[1]\n" * 1000, mtime=0)[:-30], "is gzip-compressed but ends before its compressed data does"),
        (b"\x1f\x8b\x07" + gzip.compress(b"[1]\n", mtime=0)[3:], "is gzip-compressed but cannot be decompressed"),
    ],
    ids=["cut-short", "corrupt"],
)
def test_a_gzip_file_cut_short_or_corrupt_fails_its_job_saying_so(store, storage_client, bucket, stored, message):
    _put(storage_client, bucket, "in/bad.jsonl.gz", stored)
    [f] = store.list_inputs(Uri(bucket, "in/bad.jsonl.gz"))
    with pytest.raises(errors.InvalidJob, match=f"^input gs://{bucket}/in/bad.jsonl.gz {message}"):
        _lines(store, f)


@pytest.mark.parametrize("lines", [10, 200_000])  # one read, and several read chunks once decompressed
def test_a_gzip_encoded_input_is_read_decompressed(either_store, storage_client, bucket, monkeypatch, lines):
    """An object stored with Content-Encoding gzip (`gcloud storage cp --gzip-local`, `gsutil cp -Z`)
    is served decompressed, whole, longer than its listed size: every line is read, once."""
    monkeypatch.setattr(store_mod, "READ_CHUNK_BYTES", 256 * 1024)
    data = b"".join(b"[%d, 0.5]\n" % i for i in range(lines))
    blob = storage_client.bucket(bucket).blob("in/z.jsonl")
    blob.content_encoding = "gzip"
    blob.upload_from_string(gzip.compress(data), content_type="application/jsonl")
    [f] = either_store.list_inputs(Uri(bucket, "in/z.jsonl"))
    assert f.size < len(data)
    blocks = list(either_store.read_blocks(f))
    assert b"\n".join(line for block in blocks for line in block) + b"\n" == data
    assert len(blocks) == (1 if lines == 10 else -(-len(data) // (256 * 1024)))
    early = either_store.read_blocks(f)  # a reader that stops after its first block
    assert next(early) == blocks[0]
    early.close()  # stops the reading thread, then the stream: nothing hangs or raises


# The second is over one upload chunk (a quarter more), in writes of about 1 kB.
@pytest.mark.parametrize(
    "blocks", [[b"small\n"], [b"x" * 1000 + b"\n"] * (upload_mod.WRITE_CHUNK_BYTES * 5 // 4 // 1001)]
)
def test_outputs_small_and_past_one_upload_chunk_are_exact(store, storage_client, bucket, blocks):
    uri = Uri(bucket, "out/exact.jsonl")
    with store.open_output(uri, job_id="j", content_type="application/jsonl") as w:
        for block in blocks:
            w.write(block)
    blob = storage_client.bucket(bucket).get_blob("out/exact.jsonl")
    assert blob.download_as_bytes() == b"".join(blocks)
    assert (blob.metadata, blob.content_type) == ({"embedded-tf-job": "j"}, "application/jsonl")


@pytest.mark.parametrize("size", [256 * 1024, 256 * 1024 + 1, 3 * 256 * 1024, 7 * 256 * 1024, 12 * 256 * 1024 + 12345])
def test_outputs_at_upload_chunk_boundaries_are_exact_and_checked(store, storage_client, bucket, monkeypatch, size):
    """Chunks of 256 KiB, 512 KiB, then 1 MiB, cut from blocks of uneven sizes (one bigger than a
    chunk), the last one exact or empty; the object's CRC32C is the one the upload computed."""
    monkeypatch.setattr(upload_mod, "FIRST_CHUNK_BYTES", 256 * 1024)
    monkeypatch.setattr(upload_mod, "WRITE_CHUNK_BYTES", 1024 * 1024)
    data = os.urandom(size)
    cuts = [c for c in (0, 1, 1000, 70_000, 70_001, 400_000) if c < size] + [size]
    uri = Uri(bucket, "out/edges.jsonl")
    with store.open_output(uri, job_id="j", content_type="application/jsonl") as w:
        for a, b in itertools.pairwise(cuts):
            w.write(data[a:b])
    blob = storage_client.bucket(bucket).get_blob("out/edges.jsonl")
    assert blob.download_as_bytes() == data
    assert (blob.metadata, blob.content_type) == ({"embedded-tf-job": "j"}, "application/jsonl")


def test_failed_output_never_appears(store, storage_client, bucket):
    uri = Uri(bucket, "out/f.jsonl")
    with pytest.raises(RuntimeError), store.open_output(uri, job_id="j", content_type="application/jsonl") as w:
        w.write(b"x" * (upload_mod.WRITE_CHUNK_BYTES + 1024 * 1024))  # more than one upload chunk already sent
        raise RuntimeError("job died")
    assert storage_client.bucket(bucket).get_blob("out/f.jsonl") is None
    with pytest.raises(RuntimeError), store.open_output(uri, job_id="j", content_type="application/jsonl") as w:
        w.write(b"small\n")  # still held for a one-request upload
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
    source = store.resolve_model(Uri(bucket, "m"))
    files = [p for p in model_dirs["mlp"].rglob("*") if p.is_file()]
    assert source.size == sum(p.stat().st_size for p in files) and len(source.blobs) == len(files)
    local = store.fetch_model(source, str(tmp_path))
    assert (local.version, str(local.uri)) == (12, f"gs://{bucket}/m/12/")
    assert os.path.isfile(os.path.join(local.path, "saved_model.pb"))
    again = store.fetch_model(store.resolve_model(Uri(bucket, "m/12/")), str(tmp_path))
    assert again.path == local.path  # unchanged model: reused, not downloaded again


def test_a_model_path_without_a_saved_model_says_what_it_holds_instead(store, storage_client, bucket):
    """The slips of a first deployment: the model's bucket folder above the exported version (the
    seed's `mymodel/export/exporter/1546446862/`), a Keras file, an archive of the SavedModel."""
    for name in ("mymodel/export/exporter/1546446862/saved_model.pb", "mymodel/export/exporter/1546446862/"
                 "variables/variables.index", "keras/churn.keras", "keras/notes.txt", "zip/model.zip"):  # fmt: skip
        _put(storage_client, bucket, name)
    cases = {
        "mymodel/": "model gs://{b}/mymodel/ has no saved_model.pb, nor numeric version folders holding one; there "
        "is one deeper, in gs://{b}/mymodel/export/exporter/1546446862/ — point `model` at that folder (or at the "
        "folder of its numeric versions)",
        "keras/": "model gs://{b}/keras/ has no saved_model.pb; churn.keras is a Keras model file, not a SavedModel: "
        "export a SavedModel with Keras 3's `model.export(folder)` — point `model` at the version folder that "
        "holds saved_model.pb and variables/, or at its parent holding numeric version folders",
        "keras/churn.keras": "model gs://{b}/keras/churn.keras is one object, not a folder; churn.keras is a Keras "
        "model file, not a SavedModel: export a SavedModel with Keras 3's `model.export(folder)` — point "
        "`model` at the folder that holds saved_model.pb and variables/",
        "zip/model.zip": "model gs://{b}/zip/model.zip is one object, not a folder; model.zip is an archive, not a "
        "SavedModel: unpack it into the bucket — point `model` at the folder that holds "
        "saved_model.pb and variables/",
    }
    for path, message in cases.items():
        with pytest.raises(errors.ModelError) as raised:
            store.resolve_model(Uri(bucket, path))
        assert str(raised.value) == message.format(b=bucket)


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "variables/..", "variables/.", "./saved_model.pb", "a//b", "/etc/x", "a\\..\\b", ".."]
)
def test_model_names_cannot_escape_or_name_the_folder_itself(tmp_path, name):
    with pytest.raises(errors.ModelError, match="is not a plain path in the model folder"):
        _safe_join(str(tmp_path), name)


def test_model_names_below_the_folder_are_joined(tmp_path):
    assert _safe_join(str(tmp_path), "variables/v.index") == str(tmp_path / "variables" / "v.index")
    assert _safe_join(str(tmp_path), "assets/..vocab") == str(tmp_path / "assets" / "..vocab")


@pytest.mark.parametrize(("pool", "dropped"), [(10, True), (24, False)])
def test_connections_are_kept_for_every_request_in_flight(storage_client, bucket, caplog, pool, dropped):
    """20 downloads at once: a pool of requests' default 10 drops connections (and opens new
    ones next time); a pool sized for the files in flight keeps them all."""
    import threading

    _put(storage_client, bucket, "big.bin", b"x" * (4 * 1024 * 1024))
    store = GcsStore.from_environment(None, environ=os.environ, concurrent_requests=pool)
    [f] = store.list_inputs(Uri(bucket, "big.bin"))
    start = threading.Barrier(20)
    sizes: list[int] = []

    def read() -> None:
        start.wait()
        sizes.append(sum(len(line) for line in _lines(store, f)))

    with caplog.at_level("WARNING", logger="urllib3.connectionpool"):
        threads = [threading.Thread(target=read) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sizes == [4 * 1024 * 1024] * 20
    assert any("Connection pool is full" in r.getMessage() for r in caplog.records) == dropped


def test_the_environment_is_read_once_when_it_names_no_proxy(gcs_host, storage_client, bucket, monkeypatch):
    for key in [k for k in os.environ if k.lower().endswith("_proxy")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_host)
    store = GcsStore.from_environment("local", environ=os.environ)
    _put(storage_client, bucket, "once.jsonl", b"[1]\n")
    # A proxy named afterwards (a closed port) is not consulted on each request.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    [f] = store.list_inputs(Uri(bucket, "once.jsonl"))
    assert _lines(store, f) == [b"[1]"]


def test_proxy_variables_keep_their_per_request_rules(gcs_host, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_host)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "metadata.google.internal")
    session = GcsStore.from_environment("local", environ=os.environ)._client._http
    settings = session.merge_environment_settings("https://storage.googleapis.com/x", {}, None, None, None)
    assert settings["proxies"].get("https") == "http://proxy.internal:3128"
    bypassed = session.merge_environment_settings("https://metadata.google.internal/x", {}, None, None, None)
    assert "https" not in bypassed["proxies"]


def test_a_file_read_in_pieces_gives_each_line_to_one_piece_whole_with_its_number(
    store, storage_client, bucket, monkeypatch
):
    """A file of 1 MiB and more, read in chunks of 256 KiB, cut at bytes in lines, on newlines, in
    `\\r\\n`, in a long line, and at chunk boundaries: read as pieces with ranged reads, the
    pieces' lines are the file's in order, each once and whole; the lines before each piece are
    counted as they are numbered in the file. A UTF-8 byte order mark goes with the first piece."""
    monkeypatch.setattr(store_mod, "READ_CHUNK_BYTES", 256 * 1024)
    monkeypatch.setattr(store_mod, "TAIL_CHUNK_BYTES", 1000)
    lines = [b"[%d, 0.5]" % i for i in range(60_000)]
    lines[30_000] = b"z" * 300_000
    data = codecs.BOM_UTF8 + b"\r\n".join(lines[:100]) + b"\r\n" + b"\n".join(lines[100:]) + b"\n"
    _put(storage_client, bucket, "in/cut.jsonl", data)
    [f] = store.list_inputs(Uri(bucket, "in/cut.jsonl"))
    assert store.can_cut(f, "jsonl")
    long_at = data.index(b"z" * 1000)
    cuts = sorted({1, 2, 700, data.index(b"\r\n", 500) + 1, long_at + 5, long_at + 300_001, 256 * 1024, 512 * 1024})
    bounds = [0, *cuts, f.size]
    read, numbers = [], []
    for i, (start, end) in enumerate(itertools.pairwise(bounds), 1):
        piece = dataclasses.replace(f, piece=(i, len(bounds) - 1), start=start, end=end)
        got = [line for block in store.read_blocks(piece) for line in block]
        numbers.append((store.lines_before(piece), len(got)))
        read += got
    assert read == lines
    assert all(before == sum(n for _, n in numbers[:k]) for k, (before, _) in enumerate(numbers) if numbers[k][1])


def test_only_a_file_read_as_stored_utf8_lines_can_be_cut(store, storage_client, bucket):
    _put(storage_client, bucket, "in/plain.jsonl", codecs.BOM_UTF8 + b"[1]\n[2]\n")
    _put(storage_client, bucket, "in/tiny.jsonl", b"[")
    _put(storage_client, bucket, "in/gz.jsonl.gz", gzip.compress(b"[1]\n[2]\n"))
    _put(storage_client, bucket, "in/utf16.jsonl", "[1]\n[2]\n".encode("utf-16"))
    _put(storage_client, bucket, "in/xz.jsonl.xz", lzma.compress(b"[1]\n[2]\n"))
    blob = storage_client.bucket(bucket).blob("in/encoded.jsonl")
    blob.content_encoding = "gzip"
    blob.upload_from_string(gzip.compress(b"[1]\n[2]\n" * 100), content_type="application/jsonl")
    files = {f.rel: store.can_cut(f, "jsonl") for f in store.list_inputs(Uri(bucket, "in/"))}
    assert files == {
        "plain.jsonl": True,
        "tiny.jsonl": True,
        "gz.jsonl.gz": False,
        "utf16.jsonl": False,
        "xz.jsonl.xz": False,
        "encoded.jsonl": False,
    }


@pytest.mark.parametrize("count", [1, 32, 70])
def test_pieces_are_composed_into_one_object_that_appears_whole(store, storage_client, bucket, count):
    """Up to 32 sources in one request; more in groups first, under the scratch prefix, removed after;
    the output marked as the job's."""
    sources = [Uri(bucket, f"out/_parts/pieces/f.jsonl/{i}-of-{count}.jsonl") for i in range(1, count + 1)]
    for i, uri in enumerate(sources):
        _put(storage_client, bucket, uri.path, b"%d\n" % i)
    scratch = Uri(bucket, "out/_parts/pieces/f.jsonl/")
    store.compose(sources, Uri(bucket, "out/f.jsonl"), scratch=scratch, job_id="j", content_type="application/jsonl")
    blob = storage_client.bucket(bucket).get_blob("out/f.jsonl")
    assert blob.download_as_bytes() == b"".join(b"%d\n" % i for i in range(count))
    assert blob.metadata == {WRITTEN_BY_KEY: "j"} and blob.content_type == "application/jsonl"
    assert store.written_by(Uri(bucket, "out/f.jsonl")) == "j" and store.written_by(scratch.child("x")) is None
    # The groups joined first are removed (the sources too in Cloud Storage; fake-gcs-server keeps them).
    assert not [name for name in store.names_under(scratch) if "group-" in name]
