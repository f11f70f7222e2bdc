"""A job published to Pub/Sub, pushed by the emulator to the worker served over HTTP by
functions-framework: outputs checked line by line against TensorFlow, manifest, completion."""

from __future__ import annotations

import base64
import codecs
import json

import pytest
import requests

from localdev import models
from tests.conftest import create_topology, read_lines, storage_event_headers, write_lines
from tests.outputs import assert_same_output_lines, assert_same_predictions, parse_output

pytestmark = pytest.mark.integration


def test_pubsub_job_end_to_end(worker_service, storage_client, bucket, model_uris, model_dirs, reference):
    _, _, topo = worker_service
    instances = models.mlp_instances(20)
    write_lines(storage_client, f"gs://{bucket}/in/a.jsonl", [json.dumps(i) for i in instances[:13]])
    write_lines(storage_client, f"gs://{bucket}/in/sub/b.jsonl", [json.dumps(i) for i in instances[13:]])
    # A name-prefix neighbour outside the input folder must not be read.
    write_lines(storage_client, f"gs://{bucket}/in.jsonl.bak", ["not an instance"])

    message_id = topo.publish_job(
        {"model": model_uris["mlp"], "input": f"gs://{bucket}/in/", "output": f"gs://{bucket}/out/"}
    )
    [(manifest, attrs)] = topo.completions(1)

    assert attrs == {"job_id": message_id, "status": "SUCCEEDED"}
    assert manifest["job_id"] == message_id
    assert manifest["status"] == "SUCCEEDED"
    assert manifest["model"]["version"] == 1
    assert manifest["model"]["resolved"] == model_uris["mlp"] + "1/"
    assert manifest["totals"] == {"lines": 20, "instances": 20, "predictions": 20, "errors": 0, "skipped": 0}
    assert [(f["input"], f["output"], f["instances"]) for f in manifest["files"]] == [
        (f"gs://{bucket}/in/a.jsonl", f"gs://{bucket}/out/a.jsonl", 13),
        (f"gs://{bucket}/in/sub/b.jsonl", f"gs://{bucket}/out/sub/b.jsonl", 7),
    ]
    expected = reference(model_dirs["mlp"], instances)
    lines = read_lines(storage_client, f"gs://{bucket}/out/a.jsonl") + read_lines(
        storage_client, f"gs://{bucket}/out/sub/b.jsonl"
    )
    assert [line["instance"] for line in lines] == instances
    assert_same_predictions([line["prediction"] for line in lines], expected)
    stored = json.loads(storage_client.bucket(bucket).blob("out/_manifest.json").download_as_bytes())
    assert stored == manifest


def test_a_job_run_as_parts_comes_back_through_the_jobs_topic_and_completes_once(
    worker_service, storage_client, bucket, model_uris, model_dirs, reference
):
    """`parts: 3` over 4 files: the worker publishes 3 part jobs to the jobs topic it listens to,
    Pub/Sub pushes each back to a worker, and the last part to finish writes the job's manifest and
    publishes its one completion, as a job run in one piece would: same outputs, same counts."""
    _, _, topo = worker_service
    instances = models.mlp_instances(26, seed=3)
    cuts = {"a": (0, 11), "b": (11, 13), "c/d": (13, 20), "c/e": (20, 26)}
    for name, (lo, hi) in cuts.items():
        write_lines(storage_client, f"gs://{bucket}/parts/{name}.jsonl", [json.dumps(i) for i in instances[lo:hi]])
    job = {"model": model_uris["mlp"], "input": f"gs://{bucket}/parts/", "output": f"gs://{bucket}/parts-out/"}
    message_id = topo.publish_job({**job, "options": {"parts": 3}})
    [(manifest, attrs)] = topo.completions(1)
    assert attrs == {"job_id": message_id, "status": "SUCCEEDED"}
    assert manifest["totals"] == {"lines": 26, "instances": 26, "predictions": 26, "errors": 0, "skipped": 0}
    assert [f["input"] for f in manifest["files"]] == [f"gs://{bucket}/parts/{n}.jsonl" for n in cuts]
    assert len(manifest["parts"]) == 3 and manifest["options"] == {"parts": 3}
    lines = [line for n in cuts for line in read_lines(storage_client, f"gs://{bucket}/parts-out/{n}.jsonl")]
    assert [line["instance"] for line in lines] == instances
    expected = reference(model_dirs["mlp"], instances)
    assert_same_predictions([line["prediction"] for line in lines], expected)
    stored = json.loads(storage_client.bucket(bucket).blob("parts-out/_manifest.json").download_as_bytes())
    assert stored == manifest
    shares = json.loads(storage_client.bucket(bucket).blob("parts-out/_parts/files-of-3.json").download_as_bytes())
    assert sorted(rel for share in shares["shares"] for rel in share) == [f"{n}.jsonl" for n in cuts]
    assert topo.no_more_completions() == []


def test_one_large_file_is_cut_into_pieces_for_its_parts_and_joined_into_one_output(
    worker_service, storage_client, bucket, model_uris, model_dirs, reference
):
    """`parts: 3` over one file of about 80 kB (pieces of at least 16 kB in this worker): the
    dispatch cuts it into 3 pieces at line starts, Pub/Sub pushes the 3 parts back, each predicts
    its piece with ranged reads, and the last joins the pieces (a compose) into the file's output:
    every line once, in order, its error lines numbered as in the file; one entry in the manifest."""
    _, _, topo = worker_service
    instances = models.mlp_instances(600, seed=5)
    lines = [json.dumps(i) for i in instances]
    lines[450] = '{"not": json'
    write_lines(storage_client, f"gs://{bucket}/one/big.jsonl", lines)
    job = {"model": model_uris["mlp"], "input": f"gs://{bucket}/one/big.jsonl", "output": f"gs://{bucket}/one-out/"}
    message_id = topo.publish_job({**job, "options": {"parts": 3}})
    [(manifest, attrs)] = topo.completions(1)
    assert attrs == {"job_id": message_id, "status": "PARTIALLY_SUCCEEDED"}
    assert manifest["totals"] == {"lines": 600, "instances": 600, "predictions": 599, "errors": 1, "skipped": 0}
    [entry] = manifest["files"]
    assert entry["output"] == f"gs://{bucket}/one-out/big.jsonl" and entry["pieces"] == 3
    assert manifest["first_error"]["line"] == 451 and "line 451 is not valid JSON" in manifest["first_error"]["message"]
    out = read_lines(storage_client, f"gs://{bucket}/one-out/big.jsonl")
    assert len(out) == 600 and out[450]["error"]["message"].startswith("line 451 is not valid JSON")
    good = [k for k in range(600) if k != 450]
    assert [out[k]["instance"] for k in good] == [instances[k] for k in good]
    expected = reference(model_dirs["mlp"], [instances[k] for k in good])
    assert_same_predictions([out[k]["prediction"] for k in good], expected)
    names = [b.name for b in storage_client.list_blobs(bucket, prefix="one-out/_parts/")]
    assert not [n for n in names if "/pieces/" in n]  # joined, then removed
    shares = json.loads(storage_client.bucket(bucket).blob("one-out/_parts/files-of-3.json").download_as_bytes())
    assert sorted(c["piece"] for share in shares["shares"] for c in share) == [[1, 3], [2, 3], [3, 3]]
    assert topo.no_more_completions() == []


def test_a_dropped_file_with_parts_is_cut_for_parts_that_keep_beside_its_own_manifest(
    worker_service, storage_client, bucket, model_uris, model_dirs, reference
):
    """A large file dropped with `parts: 3` in its `options` metadata, its storage event delivered
    as Eventarc delivers it: the job is cut into 3 parts, published to the jobs topic and pushed
    back; what the parts keep is beside the file's own manifest (other files dropped into the
    same output folder share `_parts/`), and the last part joins the pieces and publishes the
    file's one completion, under the file's job id. A small file dropped so is predicted whole."""
    _, url, topo = worker_service
    instances = models.mlp_instances(600, seed=6)
    blob = storage_client.bucket(bucket).blob("drops/big.jsonl")
    out = f"gs://{bucket}/drops-out/"
    blob.metadata = {"model": model_uris["mlp"], "output": out, "options": json.dumps({"parts": 3})}
    blob.upload_from_string("".join(json.dumps(i) + "\n" for i in instances))
    resource = {k: str(v) for k, v in blob._properties.items() if k in ("bucket", "name", "generation", "size")}
    headers = storage_event_headers(bucket, blob.name, event_id="drop-1", time=blob._properties["timeCreated"])
    r = requests.post(url + "/", headers=headers, data=json.dumps({**resource, "metadata": blob.metadata}), timeout=120)
    assert r.status_code == 200, r.text
    [(manifest, attrs)] = topo.completions(1)
    assert attrs == {"job_id": f"{bucket}/drops/big.jsonl#{blob.generation}", "status": "SUCCEEDED"}
    assert manifest["manifest"] == f"{out}_manifests/big.jsonl.json"
    assert manifest["totals"] == {"lines": 600, "instances": 600, "predictions": 600, "errors": 0, "skipped": 0}
    [entry] = manifest["files"]
    assert entry["output"] == f"{out}big.jsonl" and entry["pieces"] == 3 and len(manifest["parts"]) == 3
    lines = read_lines(storage_client, f"{out}big.jsonl")
    assert [line["instance"] for line in lines] == instances
    expected = reference(model_dirs["mlp"], instances)
    assert_same_predictions([line["prediction"] for line in lines], expected)
    stored = json.loads(storage_client.bucket(bucket).blob("drops-out/_manifests/big.jsonl.json").download_as_bytes())
    assert stored == manifest
    kept = sorted(b.name for b in storage_client.list_blobs(bucket, prefix="drops-out/_manifests/big.jsonl.parts/"))
    assert [n.rsplit("/", 1)[1] for n in kept] == ["files-of-3.json", *(f"part-{k}-of-3.json" for k in (1, 2, 3))]
    assert list(storage_client.list_blobs(bucket, prefix="drops-out/_parts/")) == []
    assert topo.no_more_completions() == []

    # A small file dropped with the same options: predicted where it arrived, whole.
    small = storage_client.bucket(bucket).blob("drops/small.jsonl")
    small.metadata = blob.metadata
    small.upload_from_string("".join(json.dumps(i) + "\n" for i in instances[:5]))
    resource = {k: str(v) for k, v in small._properties.items() if k in ("bucket", "name", "generation", "size")}
    headers = storage_event_headers(bucket, small.name, event_id="drop-2", time=small._properties["timeCreated"])
    body = json.dumps({**resource, "metadata": small.metadata})
    r = requests.post(url + "/", headers=headers, data=body, timeout=120)
    assert r.status_code == 200, r.text
    [(manifest, attrs)] = topo.completions(1)
    assert attrs == {"job_id": f"{bucket}/drops/small.jsonl#{small.generation}", "status": "SUCCEEDED"}
    assert manifest["totals"]["predictions"] == 5 and "parts" not in manifest
    assert list(storage_client.list_blobs(bucket, prefix="drops-out/_manifests/small.jsonl.parts/")) == []


def test_a_file_of_odd_lines_cut_into_pieces_gives_the_lines_the_job_run_whole_gives(
    worker_service, storage_client, bucket, model_uris
):
    """A UTF-8 byte order mark, `\r\n` endings then `\n` ones, blank and whitespace lines, a line
    that is not JSON, a line of 20 kB and no newline at the end: the output joined from the 4
    pieces of the job run as parts has the lines of the output of the job run whole (predictions
    within float32's tolerance: the pieces are predicted in other batches), with the same counts
    and the same first error line."""
    _, _, topo = worker_service
    lines = [json.dumps(i) for i in models.mlp_instances(400, seed=9)]
    lines[10], lines[50], lines[99] = "", "   ", "[1, 2"
    lines[200] += " " * 20_000
    data = codecs.BOM_UTF8 + "\r\n".join(lines[:150]).encode() + b"\r\n" + "\n".join(lines[150:]).encode()
    storage_client.bucket(bucket).blob("odd/odd.jsonl").upload_from_string(data)
    job = {"model": model_uris["mlp"], "input": f"gs://{bucket}/odd/odd.jsonl"}
    whole_id = topo.publish_job({**job, "output": f"gs://{bucket}/odd-whole/"})
    cut_id = topo.publish_job({**job, "output": f"gs://{bucket}/odd-cut/", "options": {"parts": 4}})
    done = {attrs["job_id"]: manifest for manifest, attrs in topo.completions(2)}
    whole, cut = done[whole_id], done[cut_id]
    assert whole["status"] == cut["status"] == "PARTIALLY_SUCCEEDED"
    assert whole["totals"] == cut["totals"] == {
        "lines": 400, "instances": 398, "predictions": 397, "errors": 1, "skipped": 2
    }  # fmt: skip
    assert cut["first_error"] == whole["first_error"] and whole["first_error"]["line"] == 100
    assert cut["files"] == [{**whole["files"][0], "output": f"gs://{bucket}/odd-cut/odd.jsonl", "pieces": 4}]
    cut_lines = parse_output(storage_client.bucket(bucket).blob("odd-cut/odd.jsonl").download_as_bytes())
    whole_lines = parse_output(storage_client.bucket(bucket).blob("odd-whole/odd.jsonl").download_as_bytes())
    assert_same_output_lines(cut_lines, whole_lines)


def test_named_inputs_and_b64_strings(worker_service, storage_client, bucket, model_uris):
    _, _, topo = worker_service
    write_lines(
        storage_client,
        f"gs://{bucket}/two.jsonl",
        [
            json.dumps({"a": [1, 2, 3, 4], "b": 2}),
            json.dumps({"a": [1, 1, 1, 1], "b": 0}),
            json.dumps({"a": [0, 0, 0, 0], "b": 0}),
        ],
    )
    write_lines(
        storage_client,
        f"gs://{bucket}/text.jsonl",
        [json.dumps("abc"), json.dumps({"b64": base64.b64encode(b"\xffz").decode()})],
    )
    topo.publish_job(
        {"model": model_uris["two_io"], "input": f"gs://{bucket}/two.jsonl", "output": f"gs://{bucket}/o1"}
    )
    topo.publish_job(
        {"model": model_uris["strings"], "input": f"gs://{bucket}/text.jsonl", "output": f"gs://{bucket}/o2/"}
    )
    done = topo.completions(2)
    assert sorted(a["status"] for _, a in done) == ["SUCCEEDED", "SUCCEEDED"]

    two = read_lines(storage_client, f"gs://{bucket}/o1/two.jsonl")
    assert [line["prediction"] for line in two] == [
        {"ratio": 5.0, "total": 12.0},
        {"ratio": "Infinity", "total": 4.0},
        {"ratio": "NaN", "total": 0.0},
    ]
    text = read_lines(storage_client, f"gs://{bucket}/o2/text.jsonl")
    assert [line["prediction"] for line in text] == [
        {"length": 3, "upper_bytes": {"b64": base64.b64encode(b"ABC").decode()}},
        {"length": 2, "upper_bytes": {"b64": base64.b64encode(b"\xffZ").decode()}},
    ]


def test_a_job_sent_as_attributes_alone_is_pushed_and_run(worker_service, storage_client, bucket, model_uris):
    """A message with no data, pushed by the emulator (which writes an empty `data` field)."""
    _, _, topo = worker_service
    write_lines(storage_client, f"gs://{bucket}/attrs.jsonl", [json.dumps(i) for i in models.mlp_instances(3)])
    job = {"model": model_uris["mlp"], "input": f"gs://{bucket}/attrs.jsonl", "output": f"gs://{bucket}/o/"}
    message_id = topo.publish_job(b"", **job, options=json.dumps({"batch_size": 2}))
    [(manifest, attrs)] = topo.completions(1)
    assert attrs == {"job_id": message_id, "status": "SUCCEEDED"}
    assert manifest["totals"]["predictions"] == 3 and manifest["options"] == {"batch_size": 2}
    assert len(read_lines(storage_client, f"gs://{bucket}/o/attrs.jsonl")) == 3


def test_a_push_without_data_as_cloud_pubsub_sends_it_runs_the_job(worker_service, storage_client, bucket, model_uris):
    """Cloud Pub/Sub leaves empty fields out of a push: a message of attributes alone has no
    `data`, which functions-framework's conversion of push bodies requires (it answered 400, so
    the message was redelivered until it was dead-lettered, and the job never ran)."""
    _, url, topo = worker_service
    write_lines(storage_client, f"gs://{bucket}/push.jsonl", [json.dumps(i) for i in models.mlp_instances(2)])
    job = {"model": model_uris["mlp"], "input": f"gs://{bucket}/push.jsonl", "output": f"gs://{bucket}/p/"}
    body = {
        "message": {
            "attributes": job,
            "messageId": "9876543210",
            "message_id": "9876543210",
            "publishTime": "2026-12-02T18:00:00.000Z",
            "publish_time": "2026-12-02T18:00:00.000Z",
        },
        "subscription": "projects/p/subscriptions/jobs-push",
    }
    assert requests.post(url + "/", json=body, timeout=120).status_code == 200
    [(manifest, attrs)] = topo.completions(1)
    assert attrs == {"job_id": "9876543210", "status": "SUCCEEDED"}
    assert manifest["totals"]["predictions"] == 2


def test_the_largest_completion_message_is_one_pubsub_takes(pubsub_host):
    """A completion message is cut to COMPLETION_MAX_BYTES of data (a job of many files): a
    message of that size, with its attributes, must be one Pub/Sub publishes and a subscriber at
    its client's default settings receives whole (over 4 MiB, the pull below is refused)."""
    from worker.notify import PubSubPublisher
    from worker.pipeline import COMPLETION_MAX_BYTES, completion_data

    topology = create_topology()
    files = [
        {"input": f"gs://b/in/part-{k:06d}.jsonl", "output": f"gs://b/out/part-{k:06d}.jsonl"} for k in range(150_000)
    ]
    manifest = {"job_id": "many-files", "status": "SUCCEEDED", "files": files, "totals": {"instances": 150_000}}
    data = completion_data(manifest, COMPLETION_MAX_BYTES)
    assert COMPLETION_MAX_BYTES - 100 < len(data) <= COMPLETION_MAX_BYTES
    PubSubPublisher(topology.results_topic).publish(data, {"job_id": "many-files", "status": "SUCCEEDED"})
    ((got, attributes),) = topology.completions(1)
    assert attributes == {"job_id": "many-files", "status": "SUCCEEDED"}
    assert got["files"] == files[: len(got["files"])] and got["files_omitted"] == 150_000 - len(got["files"])


def test_a_push_unwrapped_with_its_metadata_as_headers_runs_the_job(worker_service, storage_client, bucket, model_uris):
    """A push subscription with payload unwrapping and "write metadata": the body is the job itself,
    the message id and the attributes come as headers (here from the emulator's own push)."""
    from google.cloud import pubsub_v1

    _, url, topo = worker_service
    subscriber = pubsub_v1.SubscriberClient()
    topic = pubsub_v1.PublisherClient().create_topic(name=topo.jobs_topic + "-unwrapped").name
    subscriber.create_subscription(
        request={
            "name": subscriber.subscription_path(topo.project, "unwrapped-" + topo.jobs_topic.rsplit("-", 1)[1]),
            "topic": topic,
            "push_config": {"push_endpoint": url + "/", "no_wrapper": {"write_metadata": True}},
            "ack_deadline_seconds": 600,
        }
    )
    write_lines(storage_client, f"gs://{bucket}/unwrapped.jsonl", [json.dumps(i) for i in models.mlp_instances(3)])
    job = {"model": model_uris["mlp"], "input": f"gs://{bucket}/unwrapped.jsonl", "output": f"gs://{bucket}/u/"}
    message_id = pubsub_v1.PublisherClient().publish(topic, json.dumps(job).encode(), origin="test").result(timeout=30)
    [(manifest, attrs)] = topo.completions(1)
    assert attrs == {"job_id": message_id, "status": "SUCCEEDED"}
    assert manifest["totals"]["predictions"] == 3
    assert len(read_lines(storage_client, f"gs://{bucket}/u/unwrapped.jsonl")) == 3
