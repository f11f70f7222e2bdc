"""The other two doors into the same pipeline: the CLI and the original HTTP interface."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import requests

from localdev import emulators, models
from tests.conftest import create_topology, read_lines, storage_event_headers, worker_env, write_lines
from tests.outputs import close_to

pytestmark = pytest.mark.integration


def _cli(*args: str, gcs_host: str, work_dir: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "STORAGE_EMULATOR_HOST": gcs_host,
        "WORKER_WORK_DIR": work_dir,
        "PYTHONPATH": str(emulators.REPO_ROOT),
    }
    env.pop("WORKER_RESULTS_TOPIC", None)
    return subprocess.run(
        [sys.executable, "-m", "worker", "run", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )


def test_cli_runs_a_job_and_prints_the_manifest(gcs_host, storage_client, bucket, model_uris, tmp_path):
    write_lines(storage_client, f"gs://{bucket}/in.jsonl", [json.dumps(i) for i in models.mlp_instances(5)] + ["{x"])
    args = ("--model", model_uris["mlp"], "--input", f"gs://{bucket}/in.jsonl", "--output", f"gs://{bucket}/o/")
    done = _cli(*args, "--job-id", "cli-1", gcs_host=gcs_host, work_dir=str(tmp_path))
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert (manifest["job_id"], manifest["status"]) == ("cli-1", "PARTIALLY_SUCCEEDED")
    assert manifest["totals"]["predictions"] == 5 and manifest["totals"]["errors"] == 1
    assert len(read_lines(storage_client, f"gs://{bucket}/o/in.jsonl")) == 6
    assert "files=1/1, lines=6" in done.stderr  # the job's progress bar, at its end
    # TensorFlow's load banners (oneDNN's notice, absl's) stay out of the terminal and the logs.
    assert "oneDNN" not in done.stderr and "absl::InitializeLog" not in done.stderr, done.stderr

    failed = _cli("--model", f"gs://{bucket}/nope/", *args[2:], gcs_host=gcs_host, work_dir=str(tmp_path))
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["error"]["code"] == "NOT_FOUND"

    bad = _cli("--model", "s3://x/y", *args[2:], gcs_host=gcs_host, work_dir=str(tmp_path))
    assert bad.returncode == 2
    assert "is neither a gs:// URI nor a local path" in bad.stderr


@pytest.fixture(scope="module")
def http_worker(gcs_host, tmp_path_factory):
    service, url = emulators.start_worker(
        {"STORAGE_EMULATOR_HOST": gcs_host, "WORKER_WORK_DIR": str(tmp_path_factory.mktemp("http"))},
        target="handle_http",
    )
    yield url
    service.stop()


def test_original_http_interface(http_worker, storage_client, bucket, model_uris):
    write_lines(storage_client, f"gs://{bucket}/in/x.jsonl", [json.dumps(i) for i in models.mlp_instances(3)])
    params = {"model": model_uris["mlp"], "input": f"gs://{bucket}/in/", "output": f"gs://{bucket}/out"}
    r = requests.get(http_worker + "/", params=params, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "SUCCEEDED" and r.json()["totals"]["predictions"] == 3
    assert [
        line["instance"] for line in read_lines(storage_client, f"gs://{bucket}/out/x.jsonl")
    ] == models.mlp_instances(3)

    r = requests.get(http_worker + "/", params={"model": model_uris["mlp"]}, timeout=30)
    assert r.status_code == 400
    assert (
        r.json()["error"]["message"] == "job is missing input, output: a job needs model, input and output gs:// URIs"
    )

    r = requests.get(http_worker + "/", params={**params, "input": f"gs://{bucket}/none/"}, timeout=60)
    assert r.status_code == 404 and r.json()["status"] == "FAILED"


def test_unavailable_storage_is_retried_not_acknowledged(tmp_path):
    """Cloud Storage down: the handler must answer 5xx so Pub/Sub redelivers, not report FAILED
    (after retrying each request for WORKER_STORAGE_RETRY_SECONDS, 120 by default)."""
    dead = f"http://127.0.0.1:{emulators.free_port()}"
    env = {"STORAGE_EMULATOR_HOST": dead, "WORKER_WORK_DIR": str(tmp_path), "WORKER_STORAGE_RETRY_SECONDS": "3"}
    service, url = emulators.start_worker(env)
    try:
        job = {"model": "gs://models-x/m/", "input": "gs://data-x/in/", "output": "gs://data-x/out/"}
        body = {
            "message": {"data": base64.b64encode(json.dumps(job).encode()).decode(), "messageId": "77"},
            "subscription": "projects/p/subscriptions/jobs",
        }
        headers = {
            "ce-id": "77",
            "ce-specversion": "1.0",
            "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
            "ce-source": "//pubsub.googleapis.com/projects/p/topics/jobs",
            "content-type": "application/json",
        }
        started = time.monotonic()
        r = requests.post(url + "/", json=body, headers=headers, timeout=180)
        assert r.status_code >= 500
        assert time.monotonic() - started < 60  # the setting bounds the retries, not the library's 120 s
        assert "Cloud Storage" in service.log_tail(200)
    finally:
        service.stop()


# A model server that cannot start: every delivery of its job fails transiently.
CRASHING_SERVER = f"{sys.executable} -c \"import sys; print('unknown flag --frobnicate'); sys.exit(3)\""


def _model_server_failure(topology, job_id: str, ending: str) -> dict:
    """The one FAILED completion of job `job_id`, given up on with CRASHING_SERVER's failure."""
    [(report, attrs)] = topology.completions(1)
    assert attrs == {"job_id": job_id, "status": "FAILED"}
    assert report["error"]["code"] == "UNAVAILABLE"
    message = report["error"]["message"]
    assert "exited with code 3" in message and "unknown flag --frobnicate" in message, message
    assert message.endswith(ending), message
    return report


def test_a_transient_failure_on_the_last_delivery_publishes_failed(
    pubsub_host, gcs_host, storage_client, bucket, model_uris, tmp_path
):
    """A push subscription with a dead-letter topic writes `deliveryAttempt` into each push body (the
    emulator does not, so the bodies are written here as Pub/Sub sends them). A model server that
    cannot start fails every delivery transiently; the last one (WORKER_MAX_DELIVERY_ATTEMPTS)
    publishes FAILED with the cause, and still answers 5xx so the message is dead-lettered."""
    topology = create_topology()
    env = worker_env(
        gcs_host, pubsub_host, topology, tmp_path,
        WORKER_SERVING="tfserving", WORKER_MODEL_SERVER=CRASHING_SERVER, WORKER_MAX_DELIVERY_ATTEMPTS="5",
    )  # fmt: skip
    write_lines(storage_client, f"gs://{bucket}/in.jsonl", ["[1]"])
    job = {"model": model_uris["mlp"], "input": f"gs://{bucket}/in.jsonl", "output": f"gs://{bucket}/o/"}
    service, url = emulators.start_worker(env)
    try:
        for attempt in (4, 5):
            body = {
                "message": {"data": base64.b64encode(json.dumps(job).encode()).decode(), "messageId": "4242"},
                "subscription": "projects/p/subscriptions/jobs",
                "deliveryAttempt": attempt,
            }
            r = requests.post(url + "/", json=body, timeout=180)
            assert r.status_code >= 500, (attempt, r.status_code)
        report = _model_server_failure(
            topology, "4242",
            "gave up after 5 deliveries (max_delivery_attempts): the message goes to the dead-letter topic; "
            "republish it from there once the cause is fixed",
        )  # fmt: skip
        assert report["delivery_attempt"] == 5
        assert topology.no_more_completions() == []  # delivery 4 published nothing
        assert storage_client.bucket(bucket).get_blob("o/_manifest.json") is None  # a republished job runs
    finally:
        service.stop()


def test_a_dropped_file_still_failing_after_23_hours_of_eventarc_retries_publishes_failed(
    pubsub_host, gcs_host, storage_client, bucket, model_uris, tmp_path
):
    """Eventarc redelivers a storage event for a day without counting: the worker knows the event
    is near its end by its `ce-time`. The same event delivered just before and just after
    WORKER_GIVE_UP_AFTER_SECONDS (23 hours, the default) past that time, with a model server that
    cannot start: the first answers 5xx to be retried, the second publishes FAILED and is
    acknowledged. Then a job file's event as old."""
    topology = create_topology()
    env = worker_env(
        gcs_host, pubsub_host, topology, tmp_path,
        WORKER_SERVING="tfserving", WORKER_MODEL_SERVER=CRASHING_SERVER,
        WORKER_MODEL=model_uris["mlp"], WORKER_OUTPUT=f"gs://{bucket}/o/",
    )  # fmt: skip
    write_lines(storage_client, f"gs://{bucket}/drop/in.jsonl", ["[1]"])
    blob = storage_client.bucket(bucket).get_blob("drop/in.jsonl")
    resource = {"bucket": bucket, "name": blob.name, "generation": str(blob.generation), "size": str(blob.size)}
    service, url = emulators.start_worker(env)
    sent = time.time() - 23 * 3600 + 4  # the first delivery fails within 4 s (0.4 s here): before the limit
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sent)) + f".{int(sent % 1 * 1e6):06d}Z"
    headers = storage_event_headers(bucket, blob.name, event_id="80001", time=when)
    try:
        r = requests.post(url + "/", headers=headers, data=json.dumps(resource), timeout=180)
        assert r.status_code >= 500 and time.time() < sent + 23 * 3600, r.status_code
        time.sleep(max(0.0, sent + 23 * 3600 + 0.5 - time.time()))
        r = requests.post(url + "/", headers=headers, data=json.dumps(resource), timeout=180)
        assert r.status_code == 200, r.text
        report = _model_server_failure(
            topology, f"{bucket}/drop/in.jsonl#{blob.generation}",
            "gave up after retrying for 23.0 hours (WORKER_GIVE_UP_AFTER_SECONDS): the event is acknowledged; "
            "upload the object again once the cause is fixed",
        )  # fmt: skip
        assert 23 * 3600 <= report["event_age_s"] < 23 * 3600 + 60
        assert report["event"] == {"id": "80001", "type": "google.cloud.storage.object.v1.finalized",
                                   "source": headers["ce-source"], "subject": headers["ce-subject"]}  # fmt: skip
        assert topology.no_more_completions() == []  # the first delivery published nothing

        # A job file as old: reported under the job_id it sets, the one its completion is awaited under.
        job = {"model": model_uris["mlp"], "input": f"gs://{bucket}/drop/in.jsonl", "output": f"gs://{bucket}/j/"}
        job_file = storage_client.bucket(bucket).blob("jobs/nightly.job.json")
        job_file.upload_from_string(json.dumps({**job, "job_id": "nightly-42"}))
        resource = {"bucket": bucket, "name": job_file.name, "generation": str(job_file.generation)}
        headers = storage_event_headers(bucket, job_file.name, event_id="80002", time=when)
        r = requests.post(url + "/", headers=headers, data=json.dumps(resource), timeout=180)
        assert r.status_code == 200, r.text
        _model_server_failure(topology, "nightly-42", "acknowledged; upload the object again once the cause is fixed")
    finally:
        service.stop()


def test_on_the_last_delivery_a_job_held_by_a_dead_run_is_taken_over_and_completed(
    pubsub_host, gcs_host, storage_client, bucket, model_uris, tmp_path
):
    """A run that died holding the job's lease (its instance gone): a delivery before the last
    answers busy for Pub/Sub to retry; the last waits for the lease to expire, takes the job over
    and completes it, where it used to answer busy and have the message dead-lettered with no
    completion at all."""
    topology = create_topology()
    env = worker_env(gcs_host, pubsub_host, topology, tmp_path, WORKER_MAX_DELIVERY_ATTEMPTS="5")
    write_lines(storage_client, f"gs://{bucket}/in.jsonl", [json.dumps(i) for i in models.mlp_instances(2)])
    job = {"model": model_uris["mlp"], "input": f"gs://{bucket}/in.jsonl", "output": f"gs://{bucket}/o/"}
    lease = storage_client.bucket(bucket).blob("o/_manifest.json.lease")
    dead_run = {"job_id": "4343", "holder": "gone/1/dead", "ttl_s": 120}
    service, url = emulators.start_worker(env)
    try:
        for attempt, status in ((4, 500), (5, 200)):
            # The lease as its holder last renewed it: held a while yet.
            expires = time.time() + (120 if attempt == 4 else 4)
            lease.upload_from_string(json.dumps({**dead_run, "expires_at": expires}))
            body = {
                "message": {"data": base64.b64encode(json.dumps(job).encode()).decode(), "messageId": "4343"},
                "subscription": "projects/p/subscriptions/jobs",
                "deliveryAttempt": attempt,
            }
            r = requests.post(url + "/", json=body, timeout=180)
            assert r.status_code == status, (attempt, r.status_code, service.log_tail(20))
            if attempt == 4:
                assert topology.no_more_completions() == []  # busy: retried, nothing published
        assert time.time() >= expires
        [(report, attrs)] = topology.completions(1)
        assert attrs == {"job_id": "4343", "status": "SUCCEEDED"}
        assert report["totals"]["predictions"] == 2
        assert "taking over the expired lease" in service.log_tail(200)
    finally:
        service.stop()


def test_unloadable_model_fails_with_tensorflows_reason(gcs_host, storage_client, bucket, tmp_path):
    storage_client.bucket(bucket).blob("bad/1/saved_model.pb").upload_from_string(b"\x00not a protobuf")
    write_lines(storage_client, f"gs://{bucket}/in.jsonl", ["[1.0]"])
    done = _cli(
        "--model", f"gs://{bucket}/bad/", "--input", f"gs://{bucket}/in.jsonl", "--output", f"gs://{bucket}/o/",
        gcs_host=gcs_host, work_dir=str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["code"] == "FAILED_PRECONDITION"
    assert error["message"].startswith(f"TensorFlow cannot load model gs://{bucket}/bad/1/: ")
    assert len(error["message"]) > len(f"TensorFlow cannot load model gs://{bucket}/bad/1/: ")


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """The root logger as it was: the CLI's `main`, called in this process, routes it to the
    stderr of the moment (which pytest closes after the test)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in ("urllib3", "google", "absl", "tensorflow")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, was in noisy.items():
        logging.getLogger(name).setLevel(was)


def test_cli_describes_a_model_with_an_example_line_it_predicts(
    storage_client, bucket, model_uris, model_dirs, reference, tmp_path, monkeypatch, capsys, logging_restored
):
    """What to write in input files, without reading the model's code: `python -m worker describe`."""
    from worker import cli

    monkeypatch.setenv("WORKER_WORK_DIR", str(tmp_path))
    assert cli.main(["describe", "--model", model_uris["mlp"]]) == 0
    described = json.loads(capsys.readouterr().out)
    assert (described["resolved"], described["version"]) == (model_uris["mlp"] + "1/", 1)
    [(name, sig)] = described["signatures"].items()
    assert name == "serving_default"
    assert sig["inputs"] == {"x": {"dtype": "float", "shape": [-1, 16]}}
    assert sig["outputs"] == {"scores": {"dtype": "float", "shape": [-1, 3]}}
    assert sig["example_line"] == json.dumps([0.0] * 16, separators=(",", ":"))
    assert close_to(sig["example_prediction"], reference(model_dirs["mlp"], [[0.0] * 16])[0])

    # Two named inputs: the example is an object; its prediction written as output lines write it.
    assert cli.main(["describe", "--model", model_uris["two_io"], "--signature-name", "serving_default"]) == 0
    sig = json.loads(capsys.readouterr().out)["signatures"]["serving_default"]
    assert sig["inputs"] == {"a": {"dtype": "float", "shape": [-1, 4]}, "b": {"dtype": "int64", "shape": [-1]}}
    assert sig["example_instance"] == {"a": [0.0] * 4, "b": 0}
    assert sig["example_prediction"] == {"ratio": "NaN", "total": 0.0}

    # A model that refuses the example (it parses tf.Example protos) says why, as its error line would.
    models.upload_folder(storage_client, models.build_parse_example(tmp_path / "pe"), bucket, "parse/1")
    assert cli.main(["describe", "--model", f"gs://{bucket}/parse/"]) == 0
    sig = json.loads(capsys.readouterr().out)["signatures"]["serving_default"]
    assert sig["example_line"] == '""' and "example_prediction" not in sig
    assert "Feature: x (data type: float) is required but could not be found" in sig["example_error"]

    assert cli.main(["describe", "--model", model_uris["mlp"], "--signature-name", "nope"]) == 1
    assert "has no signature 'nope'; it has serving_default" in capsys.readouterr().err
    assert cli.main(["describe", "--model", f"gs://{bucket}/no-model/"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["describe", "--model", "s3://x/y"]) == 2
