"""The CLI as a person runs it, in a subprocess: log lines a person reads at a terminal (JSON for
Cloud Logging otherwise, or when asked), and one plain `error:` line when the job fails."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import socket
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from localdev import models
from tests.conftest import PROJECT, write_lines
from worker.cli.common import NO_CREDENTIALS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _run_cli(argv: list[str], env: dict[str, str], *, terminal: bool, timeout: float = 120) -> tuple[int, str, str]:
    """Run `python -m worker ARGV`; its stderr a terminal (a pseudo-terminal) or a pipe."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    command = [sys.executable, "-m", "worker", *argv]
    if not terminal:
        done = subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout, done.stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal's size
    proc = subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE, stderr=follower, text=True)
    os.close(follower)
    err = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        err += chunk
    out, _ = proc.communicate(timeout=120)
    os.close(leader)
    return proc.returncode, out, err.decode("utf-8", "replace").replace("\r\n", "\n")


@pytest.mark.parametrize(
    ("terminal", "log_format", "text"),
    [(True, "", True), (False, "", False), (True, "json", False), (False, "text", True)],
    ids=["terminal", "pipe", "terminal-json", "pipe-text"],
)
def test_logs_are_text_at_a_terminal_json_otherwise_and_a_failed_job_ends_in_one_error_line(
    gcs_host, storage_client, bucket, model_uris, tmp_path, terminal, log_format, text
):
    env = {"STORAGE_EMULATOR_HOST": gcs_host, "WORKER_WORK_DIR": str(tmp_path), "WORKER_LOG_FORMAT": log_format}
    argv = ["run", "--model", model_uris["mlp"], "--input", f"gs://{bucket}/none/", "--output", f"gs://{bucket}/o/"]
    code, out, err = _run_cli([*argv, "--job-id", "cli-log-test", "--quiet"], env, terminal=terminal)
    assert code == 1, err
    assert json.loads(out)["status"] == "FAILED"
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == (
        f"error: job cli-log-test FAILED (NOT_FOUND): input gs://{bucket}/none/ matches no object — check the "
        "prefix and that files were uploaded"
    )
    logged = lines[:-1]
    assert logged, err
    if text:  # "12:01:02 INFO message"
        assert all(not line.startswith("{") for line in logged), logged
        assert any(" INFO starting job cli-log-test" in line for line in logged), logged
    else:
        entries = [json.loads(line) for line in logged]
        assert any(e["message"].startswith("starting job cli-log-test") and e["severity"] == "INFO" for e in entries)


def test_an_unknown_log_format_is_a_usage_error(tmp_path):
    code, _, err = _run_cli(["run", "--help"], {"WORKER_LOG_FORMAT": "xml"}, terminal=False)
    assert code == 0  # --help needs no settings
    code, _, err = _run_cli(
        ["run", "--model", "gs://m/m/", "--input", "gs://i/i", "--output", "gs://o/o/"],
        {"WORKER_LOG_FORMAT": "xml", "WORKER_WORK_DIR": str(tmp_path)},
        terminal=False,
    )
    assert code == 2 and err.strip() == "error: WORKER_LOG_FORMAT='xml' is not one of auto, json, text"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _no_cloud(tmp_path: Path) -> dict[str, str]:
    """No credentials anywhere: a fresh home and gcloud folder, no key file, no metadata server
    probed (NO_GCE_CHECK), no emulator."""
    return {
        "HOME": str(tmp_path),
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
        "GOOGLE_APPLICATION_CREDENTIALS": "",
        "NO_GCE_CHECK": "true",
        "STORAGE_EMULATOR_HOST": "",
        "PUBSUB_EMULATOR_HOST": "",
        "WORKER_WORK_DIR": str(tmp_path / "work"),
    }


@pytest.mark.parametrize("command", ["describe", "run", "submit"])
def test_no_credentials_is_one_line_saying_how_to_log_in(tmp_path, command):
    argv = ["--model", "gs://bkt/model/"]
    if command != "describe":
        argv += ["--input", "gs://bkt/in/", "--output", "gs://bkt/out/"]
    if command == "submit":
        argv += ["--topic", "projects/p/topics/jobs"]
    code, out, err = _run_cli([command, *argv], _no_cloud(tmp_path), terminal=False)
    assert (code, out) == (2, ""), err
    assert err.strip() == f"error: {NO_CREDENTIALS}"
    assert "gcloud auth application-default login" in err


@pytest.mark.parametrize(
    ("command", "variable"),
    [("run", "STORAGE_EMULATOR_HOST"), ("describe", "STORAGE_EMULATOR_HOST"), ("submit", "PUBSUB_EMULATOR_HOST")],
)
def test_an_emulator_that_refuses_connections_is_named_at_once(tmp_path, command, variable):
    """Not after the client libraries' minutes of retries: the subprocess is given 60 s at most."""
    port = _closed_port()
    value = f"http://127.0.0.1:{port}" if variable == "STORAGE_EMULATOR_HOST" else f"127.0.0.1:{port}"
    argv = ["--model", "gs://bkt/model/"]
    if command != "describe":
        argv += ["--input", "gs://bkt/in/", "--output", "gs://bkt/out/"]
    if command == "submit":
        argv += ["--topic", "projects/p/topics/jobs"]
    env = {**_no_cloud(tmp_path), variable: value}
    code, out, err = _run_cli([command, *argv], env, terminal=False, timeout=60)
    assert (code, out) == (75, ""), err
    assert err.strip() == (
        f"error (transient, try again): cannot connect to 127.0.0.1:{port}, which {variable} names (Connection "
        f"refused) — start the emulator, or unset {variable}"
    )


def test_the_common_options_are_flags(model_dirs, tmp_path):
    """--key-field, --excluded-fields, --output-format and --max-error-ratio reach the job (its
    manifest's options) and act on its lines; a flag overrides the same key of --options."""
    rows = [{"id": f"r{k}", "x": x, "note": "n"} for k, x in enumerate(models.mlp_instances(4))]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    argv = ["run", "--model", str(model_dirs["mlp"]), "--input", str(tmp_path / "in.jsonl"), "--quiet"]
    flags = ["--key-field", "id", "--excluded-fields", "note", "--max-error-ratio", "0.5"]
    code, out, err = _run_cli(
        [*argv, "--output", str(tmp_path / "o1"), *flags, "--options", '{"key_field": "other", "batch_size": 2}'],
        _no_cloud(tmp_path),
        terminal=False,
    )
    assert code == 0, err
    manifest = json.loads(out)
    assert manifest["options"] == {
        "batch_size": 2, "key_field": "id", "excluded_fields": ["note"], "max_error_ratio": 0.5,
    }  # fmt: skip
    lines = [json.loads(line) for line in (tmp_path / "o1" / "in.jsonl").read_text().splitlines()]
    assert [line["key"] for line in lines] == ["r0", "r1", "r2", "r3"]
    assert all(len(line["prediction"]) == 3 for line in lines)

    code, out, err = _run_cli(
        [*argv, "--output", str(tmp_path / "o2"), "--output-format", "predictions", "--included-fields", "x"],
        _no_cloud(tmp_path),
        terminal=False,
    )
    assert code == 0, err
    assert json.loads(out)["options"] == {"output_format": "predictions", "included_fields": ["x"]}
    bare = [json.loads(line) for line in (tmp_path / "o2" / "in.jsonl").read_text().splitlines()]
    assert len(bare) == 4 and all(isinstance(p, list) and len(p) == 3 for p in bare)

    code, _, err = _run_cli([*argv, "--output", str(tmp_path / "o3"), "--max-error-ratio", "2"], {}, terminal=False)
    assert code == 2 and err.strip() == "error: option max_error_ratio must be a number from 0 to 1, got 2.0"


def test_submit_wait_prints_its_own_job_s_completion_and_exits_as_run_does(
    worker_service, gcs_host, pubsub_host, storage_client, bucket, model_uris
):
    """Two `submit --wait` at once, against the Pub/Sub emulator and a served worker: each prints
    its own job's completion (the emulator applies no subscription filter: each sees both) and
    exits 0 or 1 as `run` would; their temporary subscriptions are gone afterwards."""
    from google.cloud import pubsub_v1

    _, _, topo = worker_service
    write_lines(storage_client, f"gs://{bucket}/in/a.jsonl", [json.dumps(r) for r in models.mlp_instances(5)])
    env = {"STORAGE_EMULATOR_HOST": gcs_host, "PUBSUB_EMULATOR_HOST": pubsub_host, "GOOGLE_CLOUD_PROJECT": PROJECT}
    env |= {"WORKER_JOBS_TOPIC": topo.jobs_topic, "WORKER_RESULTS_TOPIC": topo.results_topic}
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}

    def submit(job_id: str, inp: str) -> subprocess.Popen[str]:
        argv = ["submit", "--wait", "--timeout", "120", "--job-id", job_id, "--model", model_uris["mlp"]]
        argv += ["--input", inp, "--output", f"gs://{bucket}/out-{job_id}/"]
        command = [sys.executable, "-m", "worker", *argv]
        return subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    good, bad = submit("wait-good", f"gs://{bucket}/in/"), submit("wait-bad", f"gs://{bucket}/none/")
    out, err = good.communicate(timeout=150)
    assert good.returncode == 0, err
    completion = json.loads(out)
    assert (completion["job_id"], completion["status"]) == ("wait-good", "SUCCEEDED")
    assert completion["totals"]["predictions"] == 5
    assert f"submitted job wait-good; waiting for its completion on {topo.results_topic}" in err
    out, err = bad.communicate(timeout=150)
    assert bad.returncode == 1 and json.loads(out)["job_id"] == "wait-bad", err
    assert err.splitlines()[-1] == (
        f"error: job wait-bad FAILED (NOT_FOUND): input gs://{bucket}/none/ matches no object — check the prefix "
        "and that files were uploaded"
    )
    subscriber = pubsub_v1.SubscriberClient()
    names = [s.name for s in subscriber.list_subscriptions(request={"project": f"projects/{PROJECT}"})]
    assert not [name for name in names if "/embedded-tf-wait-" in name]
    # The shared results subscription got both completions too: taken, for the tests after this one.
    assert sorted(data["job_id"] for data, _ in topo.completions(2)) == ["wait-bad", "wait-good"]


def test_submit_without_wait_prints_the_job_and_where_its_manifest_will_be(pubsub_host, tmp_path):
    from google.cloud import pubsub_v1

    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = publisher.create_topic(name=publisher.topic_path(PROJECT, "submit-jobs")).name
    sub = subscriber.create_subscription(name=subscriber.subscription_path(PROJECT, "submit-jobs"), topic=topic).name
    env = {"PUBSUB_EMULATOR_HOST": pubsub_host, "GOOGLE_CLOUD_PROJECT": PROJECT, "WORKER_WORK_DIR": str(tmp_path)}
    argv = ["submit", "--topic", "submit-jobs", "--model", "gs://bkt/m/", "--input", "gs://bkt/in/"]
    code, out, err = _run_cli([*argv, "--output", "gs://bkt/out", "--key-field", "id"], env, terminal=False)
    assert code == 0, err
    printed = json.loads(out)
    assert printed["topic"] == topic and printed["manifest"] == "gs://bkt/out/_manifest.json"
    [received] = subscriber.pull(request={"subscription": sub, "max_messages": 5}, timeout=30).received_messages
    assert json.loads(received.message.data) == {
        "job_id": printed["job_id"], "model": "gs://bkt/m/", "input": "gs://bkt/in/", "output": "gs://bkt/out/",
        "options": {"key_field": "id"},
    }  # fmt: skip


def test_at_a_terminal_log_lines_go_above_the_progress_bar_which_starts_at_the_model_s_load(
    gcs_host, storage_client, bucket, model_uris, tmp_path
):
    write_lines(storage_client, f"gs://{bucket}/in/a.jsonl", [json.dumps(r) for r in models.mlp_instances(20)])
    env = {"STORAGE_EMULATOR_HOST": gcs_host, "WORKER_WORK_DIR": str(tmp_path), "WORKER_LOG_FORMAT": ""}
    argv = ["run", "--model", model_uris["mlp"], "--input", f"gs://{bucket}/in/", "--output", f"gs://{bucket}/o/"]
    code, out, err = _run_cli(argv, env, terminal=True)
    assert code == 0 and json.loads(out)["status"] == "SUCCEEDED", err
    assert "loading model:" in err and "predicting:" in err  # the bar's stage, on its left
    logged = [line for line in err.splitlines() if " INFO " in line]
    assert any("fetching model" in line for line in logged), err  # logged while the bar is drawn
    for line in logged:
        # What is left after the last carriage return is the log line alone: the bar was cleared
        # before it was written, and drawn again on the next line.
        assert re.match(r"\d\d:\d\d:\d\d INFO ", line.rsplit("\r", 1)[-1]), repr(line)


def test_a_job_none_of_whose_lines_could_be_predicted_fails_with_its_first_error_and_the_csv_hint(model_dirs, tmp_path):
    """CSV rows in a file read as JSON lines (not named *.csv): every line an error, so the job is
    FAILED (exit 1), its error line quoting the first error line and what to do about it."""
    (tmp_path / "rows.txt").write_text("f0,f1,f2\n1,2,3\n4,5,6\n")
    argv = ["run", "--model", str(model_dirs["mlp"]), "--input", str(tmp_path / "rows.txt")]
    code, out, err = _run_cli([*argv, "--output", str(tmp_path / "out"), "--job-id", "all-bad", "--quiet"],
                              _no_cloud(tmp_path), terminal=False)  # fmt: skip
    assert code == 1 and json.loads(out)["status"] == "FAILED", err
    last = err.splitlines()[-1]
    assert last.startswith(
        f"error: job all-bad FAILED (INVALID_ARGUMENT): none of the 3 instances could be predicted; the first, "
        f"line 1 of {tmp_path}/rows.txt: line 1 is not valid JSON"
    ), last
    assert "a row of column names (a CSV header?)" in last


@pytest.mark.parametrize(
    ("command", "listed", "not_listed"),
    [
        ("run", ["WORKER_BATCH_SIZE", "STORAGE_EMULATOR_HOST", "--key-field"], ["WORKER_MODEL ", "WORKER_GIVE_UP"]),
        ("describe", ["WORKER_WORK_DIR", "STORAGE_EMULATOR_HOST"], ["WORKER_BATCH_SIZE", "PUBSUB_EMULATOR_HOST"]),
        ("submit", ["WORKER_JOBS_TOPIC", "PUBSUB_EMULATOR_HOST", "--wait"], ["WORKER_WORK_DIR", "STORAGE_EMULATOR"]),
    ],
)
def test_each_command_s_help_lists_the_settings_that_apply_to_it(tmp_path, command, listed, not_listed):
    code, out, err = _run_cli([command, "--help"], {}, terminal=False)
    assert code == 0, err
    assert all(text in out for text in listed), out
    assert not any(text in out for text in not_listed), out
