"""The CLI as a person runs it, in a subprocess: log lines a person reads at a terminal (JSON for
Cloud Logging otherwise, or when asked), and one plain `error:` line when the job fails."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _run_cli(argv: list[str], env: dict[str, str], *, terminal: bool) -> tuple[int, str, str]:
    """Run `python -m worker ARGV`; its stderr a terminal (a pseudo-terminal) or a pipe."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    command = [sys.executable, "-m", "worker", *argv]
    if not terminal:
        done = subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=120)
        return done.returncode, done.stdout, done.stderr
    leader, follower = pty.openpty()
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
