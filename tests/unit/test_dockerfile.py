"""What can be checked of the image without a Docker engine: the files it copies exist, it serves
the same source and targets the tests serve, and its TF Serving matches our TensorFlow."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
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
    tensorflow = re.search(
        r"^tensorflow-cpu==(\d+\.\d+)\.\d+$", (ROOT / "requirements-tensorflow.txt").read_text(), flags=re.M
    )
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


def test_the_image_holds_the_workers_bytecode_so_that_a_cold_start_compiles_none_of_it(tmp_path):
    """The image's RUN compiling the copied worker/, run on a copy of it: the worker's modules are
    then loaded from bytecode, with the image's PYTHONDONTWRITEBYTECODE set, as none was before."""
    compile_run = re.search(r"^RUN (python -m compileall [^&\\]*worker)\b", DOCKERFILE, flags=re.M)
    assert compile_run and "PYTHONDONTWRITEBYTECODE=1" in DOCKERFILE
    assert DOCKERFILE.index("COPY worker/ worker/") < compile_run.start()
    shutil.copytree(ROOT / "worker", tmp_path / "worker", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(tmp_path)}

    def loaded_from() -> list[str]:
        verbose = subprocess.run(
            [sys.executable, "-v", "-c", "import worker.main"], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert verbose.returncode == 0, verbose.stderr[-2000:]
        return re.findall(rf"# code object from '?({re.escape(str(tmp_path))}\S*?)'?$", verbose.stderr, flags=re.M)

    before = loaded_from()
    assert before and all(path.endswith(".py") for path in before)
    argv = shlex.split(compile_run.group(1))
    subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, check=True)
    after = loaded_from()
    assert len(after) == len(before) and all(path.endswith(".pyc") for path in after)


def _requirements(name: str) -> dict[str, str]:
    """A requirements file's packages and pinned versions, with those of the files it includes."""
    pins: dict[str, str] = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            pins.update(_requirements(line[3:].strip()))
        elif line:
            package, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[\w.]+", version), f"{name}: {line!r} is not pinned exactly"
            pins[package.lower()] = version
    return pins


def test_the_tf_serving_image_installs_no_tensorflow_and_the_in_process_one_adds_only_it():
    """The default image pulls no 1.3 GB of TensorFlow it never imports (test_lean_worker.py
    proves that it does not); the in-process image adds TensorFlow and nothing else."""
    lean, full = _requirements("requirements.txt"), _requirements("requirements-tensorflow.txt")
    assert not [p for p in lean if p.startswith("tensorflow")]
    assert set(full) - set(lean) == {"tensorflow-cpu"}
    assert {p: full[p] for p in lean} == lean
    assert set(_requirements("requirements-dev.txt")) >= set(full)
    base = re.search(r"^FROM python:\S+ AS base\n(.*?)(?=^FROM)", DOCKERFILE, flags=re.M | re.S)
    assert base and "RUN pip install --no-cache-dir -r requirements.txt" in base.group(1)
    assert "tensorflow" not in base.group(1).replace("TF_CPP_MIN_LOG_LEVEL", "")
    stage = re.search(r"^FROM base AS serving-tensorflow\n(.*?)(?=^FROM)", DOCKERFILE, flags=re.M | re.S)
    assert stage and "RUN pip install --no-cache-dir -r requirements-tensorflow.txt" in stage.group(1)
    tfserving = re.search(r"^FROM base AS serving-tfserving\n(.*?)(?=^FROM)", DOCKERFILE, flags=re.M | re.S)
    assert tfserving and "pip install" not in tfserving.group(1)
