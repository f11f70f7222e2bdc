"""What can be checked of the image without a Docker engine: the files it copies exist, it serves
the same source and targets the tests serve, and its TF Serving matches our TensorFlow."""

from __future__ import annotations

import re
from pathlib import Path

from worker import main
from worker.config import SERVING_CHOICES

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_copied_files_exist_and_entry_point_matches():
    copied = re.findall(r"^COPY\s+(?!--from)(\S+)\s", DOCKERFILE, flags=re.M)
    assert copied, "the Dockerfile copies nothing"
    for src in copied:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
        assert not any(src.startswith(ignored) for ignored in (ROOT / ".dockerignore").read_text().split())
    assert "--source worker/main.py" in DOCKERFILE
    target = re.search(r"FUNCTION_TARGET=(\w+)", DOCKERFILE)
    assert target and callable(getattr(main, target.group(1)))
    assert callable(main.handle_http)


def test_tf_serving_version_matches_tensorflow_in_requirements():
    serving = re.search(r"^ARG TF_SERVING_VERSION=(\d+\.\d+)\.\d+$", DOCKERFILE, flags=re.M)
    tensorflow = re.search(r"^tensorflow-cpu==(\d+\.\d+)\.\d+$", (ROOT / "requirements.txt").read_text(), flags=re.M)
    assert serving and tensorflow
    assert serving.group(1) == tensorflow.group(1)
    assert "FROM tensorflow/serving:${TF_SERVING_VERSION} AS tfserving-binary" in DOCKERFILE
    assert "COPY --from=tfserving-binary /usr/bin/tensorflow_model_server /usr/local/bin/" in DOCKERFILE


def test_both_serving_variants_are_stages_and_set_the_backend():
    default = re.search(r"^ARG SERVING=(\w+)$", DOCKERFILE, flags=re.M)
    assert default and default.group(1) == "tfserving"
    for backend in ("tfserving", "tensorflow"):
        assert backend in SERVING_CHOICES
        stage = re.search(rf"^FROM base AS serving-{backend}\n(.*?)(?=^FROM|\Z)", DOCKERFILE, flags=re.M | re.S)
        assert stage and f"ENV WORKER_SERVING={backend}" in stage.group(1)
    assert re.search(r"^FROM serving-\$\{SERVING\}$", DOCKERFILE, flags=re.M)


def test_runs_as_the_unprivileged_user_it_creates():
    uid = re.search(r"useradd .*--uid (\d+)", DOCKERFILE)
    user = re.search(r"^USER (\S+)$", DOCKERFILE, flags=re.M)
    assert uid and user and user.group(1) == uid.group(1) != "0"
