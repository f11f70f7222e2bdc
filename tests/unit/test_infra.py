"""What can be checked of infra/ without downloading providers: the wiring, parsed with python-hcl2."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import hcl2
import pytest

INFRA = Path(__file__).resolve().parents[2] / "infra"


def _norm(value: Any) -> Any:
    """python-hcl2 keeps the quotes of strings and block labels; drop them and its markers."""
    if isinstance(value, dict):
        return {_norm(k): _norm(v) for k, v in value.items() if not (isinstance(k, str) and k.startswith("__"))}
    if isinstance(value, list):
        return [_norm(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    merged: dict[str, Any] = {"resource": {}, "variable": {}, "output": {}, "data": {}}
    for path in sorted(INFRA.glob("*.tf")):
        with path.open() as f:
            parsed = _norm(hcl2.load(f))
        for kind in merged:
            for block in parsed.get(kind, []):
                for type_, named in block.items():
                    if kind in ("variable", "output"):
                        merged[kind][type_] = named
                    else:
                        merged[kind].setdefault(type_, {}).update(named)
    return merged


def _resources(config: dict[str, Any], type_: str) -> dict[str, Any]:
    return config["resource"].get(type_, {})


def _all_strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _all_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _all_strings(v)]
    return [value] if isinstance(value, str) else []


def test_every_trigger_targets_the_worker_service(config):
    service = "${google_cloud_run_v2_service.worker.name}"
    triggers = _resources(config, "google_eventarc_trigger")
    types = {}
    for name, trigger in triggers.items():
        assert trigger["destination"][0]["cloud_run_service"][0]["service"] == service, name
        assert trigger["service_account"] == "${google_service_account.invoker.email}", name
        types[name] = {c["attribute"]: c["value"] for c in trigger["matching_criteria"]}
    assert types["object_finalized"] == {
        "type": "google.cloud.storage.object.v1.finalized",
        "bucket": "${var.input_bucket}",
    }
    assert types["jobs_published"]["type"] == "google.cloud.pubsub.topic.v1.messagePublished"
    assert triggers["jobs_published"]["transport"][0]["pubsub"][0]["topic"] == "${google_pubsub_topic.jobs.id}"

    push = _resources(config, "google_pubsub_subscription")["jobs_push"]
    assert push["topic"] == "${google_pubsub_topic.jobs.id}"
    assert push["push_config"][0]["push_endpoint"] == "${google_cloud_run_v2_service.worker.uri}"
    assert push["push_config"][0]["oidc_token"][0]["service_account_email"] == "${google_service_account.invoker.email}"


def test_job_messages_have_the_long_ack_deadline_retries_and_a_dead_letter_topic(config):
    push = _resources(config, "google_pubsub_subscription")["jobs_push"]
    assert push["ack_deadline_seconds"] == 600
    assert push["retry_policy"][0]["maximum_backoff"] == "600s"
    dead = push["dead_letter_policy"][0]
    assert dead["dead_letter_topic"] == "${google_pubsub_topic.dead_letter.id}"
    assert dead["max_delivery_attempts"] == "${var.max_delivery_attempts}"
    # The worker knows which delivery is the last, to publish FAILED on it.
    main_tf = (INFRA / "main.tf").read_text()
    told = re.search(r"^\s*WORKER_MAX_DELIVERY_ATTEMPTS\s*=\s*(.+)$", main_tf, flags=re.M)
    assert told and told.group(1).strip() == "tostring(var.max_delivery_attempts)"
    assert set(_resources(config, "google_pubsub_topic")) == {"jobs", "results", "dead_letter"}
    # Pub/Sub's agent may move messages there.
    grants = _resources(config, "google_pubsub_topic_iam_member")
    assert any(g["topic"] == "${google_pubsub_topic.dead_letter.id}" for g in grants.values())


def test_the_worker_account_has_no_project_wide_role_and_only_what_it_needs(config):
    worker = "${google_service_account.worker.member}"
    for name, grant in _resources(config, "google_project_iam_member").items():
        assert grant["member"] != worker, f"project-wide role {grant['role']} for the worker ({name})"
    assert not _resources(config, "google_project_iam_binding")
    buckets = {
        g["bucket"]: g["role"]
        for g in _resources(config, "google_storage_bucket_iam_member").values()
        if g["member"] == worker
    }
    assert buckets == {
        "${each.value}": "roles/storage.objectViewer",  # model buckets
        "${var.input_bucket}": "roles/storage.objectViewer",
        "${var.output_bucket}": "roles/storage.objectUser",
    }
    topics = [g for g in _resources(config, "google_pubsub_topic_iam_member").values() if g["member"] == worker]
    # Completions go to the results topic, and the parts of a job run as parts to the jobs topic.
    assert sorted((g["topic"], g["role"]) for g in topics) == [
        ("${google_pubsub_topic.jobs.id}", "roles/pubsub.publisher"),
        ("${google_pubsub_topic.results.id}", "roles/pubsub.publisher"),
    ]
    service = _resources(config, "google_cloud_run_v2_service")["worker"]
    assert service["template"][0]["service_account"] == "${google_service_account.worker.email}"


def test_nothing_is_public(config):
    everything = _all_strings(config["resource"])
    assert not [s for s in everything if "allUsers" in s or "allAuthenticatedUsers" in s]
    invokers = _resources(config, "google_cloud_run_v2_service_iam_member")
    assert [g["member"] for g in invokers.values()] == ["${google_service_account.invoker.member}"]


def test_the_service_passes_the_settings_the_worker_reads(config):
    from worker.config import ENV_VARS

    service = _resources(config, "google_cloud_run_v2_service")["worker"]
    template = service["template"][0]
    assert template["max_instance_request_concurrency"] == "${var.concurrency}"
    assert template["timeout"] == "${var.timeout_seconds}s"
    known = {var for var, _, _ in ENV_VARS}
    main_tf = (INFRA / "main.tf").read_text()
    env_block = re.search(r"worker_env = merge\(\s*\{(.*?)^\s*\},", main_tf, flags=re.S | re.M)
    assert env_block
    names = set(re.findall(r"^\s*([A-Z_]+)\s*=", env_block.group(1), flags=re.M))
    assert names - {"GOOGLE_CLOUD_PROJECT"} <= known, names - known
    assert {"WORKER_RESULTS_TOPIC", "WORKER_JOBS_TOPIC", "WORKER_INPUT", "WORKER_OUTPUT"} <= names


def test_variables_are_described_and_the_example_sets_only_known_ones(config):
    for name, var in config["variable"].items():
        assert var.get("description"), f"variable {name} has no description"
    for name, out in config["output"].items():
        assert out.get("description"), f"output {name} has no description"
    example = (INFRA / "terraform.tfvars.example").read_text()
    assigned = set(re.findall(r"^([a-z_]+)\s*=", example, flags=re.M))
    assert assigned <= set(config["variable"]), assigned - set(config["variable"])
    required = {n for n, v in config["variable"].items() if "default" not in v}
    assert required <= assigned, required - assigned


@pytest.mark.parametrize("doc", ["README.md", "docs/deploy.md"])
def test_the_deploy_commands_read_outputs_that_exist(config, doc):
    text = (INFRA.parent / doc).read_text()
    used = set(re.findall(r"terraform output -raw (\w+)", text))
    assert used, f"the deploy commands of {doc} read terraform outputs"
    assert used - set(config["output"]) == set()


@pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform is not installed")
@pytest.mark.parametrize(("memory", "disk_mib"), [("4Gi", 1024), ("2048Mi", 512), ("32Gi", 8192)])
def test_the_model_disk_bound_is_a_quarter_of_the_instance_memory(tmp_path, memory, disk_mib):
    """The expressions of main.tf's locals, evaluated by terraform itself (no provider needed)."""
    main_tf = (INFRA / "main.tf").read_text()
    mib = re.search(r"^\s*memory_mib\s*=\s*(.+)$", main_tf, flags=re.M)
    disk = re.search(r"^\s*WORKER_MAX_MODEL_DISK_MB\s*=\s*(.+)$", main_tf, flags=re.M)
    assert mib and disk
    (tmp_path / "main.tf").write_text(
        f'variable "memory" {{\n  type = string\n}}\n\nlocals {{\n  memory_mib = {mib.group(1)}\n}}\n'
    )
    result = subprocess.run(
        ["terraform", "console", f"-var=memory={memory}"],
        input=disk.group(1) + "\n",
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f'"{disk_mib}"'


def test_the_service_starts_instances_with_startup_cpu_boost(config):
    """More CPU while an instance starts (the runtime, the worker, its first model), then the
    CPU only while requests run."""
    service = _resources(config, "google_cloud_run_v2_service")["worker"]
    [resources] = service["template"][0]["containers"][0]["resources"]
    assert resources["startup_cpu_boost"] is True and resources["cpu_idle"] is True
