"""`pip install .` gives the `embedded-tf` command with the worker's whole package, and its
declared dependencies take exactly the versions the image installs (requirements*.txt)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            package, _, version = line.partition("==")
            pins[package.lower()] = version
    return pins


def test_the_declared_dependencies_take_the_pinned_versions():
    declared = {r.name.lower(): r for r in map(Requirement, PROJECT["dependencies"])}
    pins = _pins("requirements.txt")
    assert set(declared) == set(pins)
    assert all(declared[p].specifier.contains(v) for p, v in pins.items()), declared
    [tensorflow] = map(Requirement, PROJECT["optional-dependencies"]["tensorflow"])
    assert tensorflow.specifier.contains(_pins("requirements-tensorflow.txt")[tensorflow.name])


def test_pip_install_gives_the_embedded_tf_command(tmp_path):
    """Installed without dependencies into a folder (this environment has them), the command runs
    from the installed copy, subpackages included."""
    # From a copy of the tree: setuptools builds in the source folder, and a build/ left there by
    # an earlier install would hand on modules pyproject no longer lists.
    source, target = tmp_path / "source", tmp_path / "site"
    shutil.copytree(ROOT / "worker", source / "worker", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    # Every module of the checkout's package is in the installed copy (a subpackage left out of
    # pyproject's list would be missing).
    modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "worker").rglob("*.py"))
    assert modules and [m for m in modules if not (target / m).exists()] == []
    env = {**os.environ, "PYTHONPATH": str(target)}
    for argv in (["--help"], ["run", "--help"], ["--version"]):
        done = subprocess.run(
            [sys.executable, str(target / "bin" / "embedded-tf"), *argv],
            env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "embedded-tf 0.1.0"
    helped = subprocess.run(
        [sys.executable, str(target / "bin" / "embedded-tf"), "--help"], env=env, capture_output=True, text=True
    )
    assert helped.stdout.startswith("usage: embedded-tf ")
