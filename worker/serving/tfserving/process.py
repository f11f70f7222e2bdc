"""`tensorflow_model_server` as a child process: free ports, its model laid out as TF Serving
wants it, ready when the version is AVAILABLE, its output drained into the logs, restarted when it
dies, asked again while busy, stopped and reaped."""

from __future__ import annotations

import collections
import logging
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

from worker import codec
from worker.errors import ModelError, TransientError

log = logging.getLogger(__name__)

MODEL_NAME = "model"
MODEL_VERSION = 1
MAX_ATTEMPTS = 3  # per batch: the first try and two more, each after a restart
MODEL_FAILED = 500  # HTTP status of TF Serving's UNKNOWN, INTERNAL and DATA_LOSS
NOT_IMPLEMENTED = 501  # of its UNIMPLEMENTED
TIMED_OUT = 504  # of its DEADLINE_EXCEEDED: a request that outlived --rest_api_timeout_in_ms
OUT_OF_MEMORY = 429  # of its RESOURCE_EXHAUSTED: TensorFlow could not allocate for the batch
BUSY = 503  # of its UNAVAILABLE: with --enable_batching, its batch queue is full
# A busy server is asked again after 0.05, 0.1, 0.2 … s (5 s at most between tries), 60 s in all.
BUSY_FIRST_WAIT_S, BUSY_MAX_WAIT_S, BUSY_GIVE_UP_S = 0.05, 5.0, 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ServerConfig:
    command: str = "tensorflow_model_server"  # program and leading arguments (shell-split)
    extra_args: str = ""  # more flags: batching, threads…
    request_format: str = "row"  # or "columnar": {"inputs": …} instead of {"instances": …}
    start_timeout_s: float = 300.0
    predict_timeout_s: float = 300.0
    work_dir: str = field(default_factory=tempfile.gettempdir)

    def argv(self, *, grpc_port: int, rest_port: int, base_path: str) -> list[str]:
        timeout_ms = int(self.predict_timeout_s * 1000)
        return [
            *shlex.split(self.command),
            f"--port={grpc_port}",
            f"--rest_api_port={rest_port}",
            # The default 30 s would cut off a slow batch on a big model.
            f"--rest_api_timeout_in_ms={timeout_ms}",
            f"--model_name={MODEL_NAME}",
            f"--model_base_path={base_path}",
            *shlex.split(self.extra_args),
        ]

    def available(self) -> bool:
        """Whether the server program can be found (for WORKER_SERVING=auto)."""
        words = shlex.split(self.command)
        return bool(words) and shutil.which(words[0]) is not None


class ModelServer:
    """One server process for one model; restartable; thread-safe."""

    def __init__(
        self, config: ServerConfig, model_path: str, *, description: str, on_start: Callable[[], None] | None = None
    ) -> None:
        self.config = config
        self.description = description
        self._on_start = on_start
        self._root = tempfile.mkdtemp(prefix="tfserving-", dir=_ensure(os.path.join(config.work_dir, "servers")))
        self.base_path = os.path.join(self._root, MODEL_NAME)
        os.makedirs(self.base_path)
        os.symlink(os.path.abspath(model_path), os.path.join(self.base_path, str(MODEL_VERSION)))
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.epoch = 0  # bumped on every (re)start, so concurrent failures restart it once
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self._lock = threading.RLock()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            rest_port = _free_port()
            argv = self.config.argv(grpc_port=_free_port(), rest_port=rest_port, base_path=self.base_path)
            log.info("starting model server for %s: %s", self.description, shlex.join(argv))
            self._tail.clear()
            try:
                self.proc = subprocess.Popen(
                    argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            except OSError as e:
                raise TransientError(f"cannot start the model server {argv[0]!r}: {e}") from e
            threading.Thread(target=self._drain, args=(self.proc,), name="model-server-output", daemon=True).start()
            self.url = f"http://127.0.0.1:{rest_port}/v1/models/{MODEL_NAME}"
            self.epoch += 1
            if self._on_start:
                self._on_start()
            try:
                self._wait_ready()
            except BaseException:
                self._stop_process()
                raise

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._tail.append(line)
                log.debug("model server: %s", line)

    def tail(self) -> str:
        return "\n".join(self._tail)

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.config.start_timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                time.sleep(0.2)  # let the drain thread catch the last lines
                raise TransientError(
                    f"the model server exited with code {code} before {self.description} was available:\n{self.tail()}"
                )
            try:
                r = requests.get(self.url, timeout=2)
                if r.status_code == 200:
                    for status in r.json().get("model_version_status", []):
                        if status.get("state") == "AVAILABLE":
                            log.info("model server ready for %s at %s", self.description, self.url)
                            return
                        error = status.get("status") or {}
                        if status.get("state") == "END" and error.get("error_code", "OK") != "OK":
                            raise ModelError(
                                f"TensorFlow Serving cannot load model {self.description}: "
                                f"{error.get('error_message') or error.get('error_code')}"
                            )
            except (requests.RequestException, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TransientError(
                    f"the model server did not make {self.description} available within "
                    f"{self.config.start_timeout_s:.0f}s:\n{self.tail()}"
                )
            time.sleep(0.1)

    def restart(self, seen_epoch: int) -> None:
        """Restart, unless another thread already did since `seen_epoch`."""
        with self._lock:
            if self.epoch != seen_epoch and self.proc is not None and self.proc.poll() is None:
                return
            code = self.proc.poll() if self.proc else None
            log.warning(
                "restarting the model server for %s (%s)",
                self.description,
                f"it exited with code {code}" if code is not None else "it failed a request",
            )
            self._stop_process()
            self.start()

    def _stop_process(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def close(self) -> None:
        """Stop the server (terminate, wait, kill) and remove its model layout."""
        with self._lock:
            self._stop_process()
            shutil.rmtree(self._root, ignore_errors=True)

    # -- requests ----------------------------------------------------------------------------

    def call(self, method: str, suffix: str, body: Any = None) -> requests.Response:
        """One request, restarting the server and retrying on a connection error or a 5xx that
        is not the model's answer; a busy server (503) is asked again, not restarted."""
        failure = ""
        data = None if body is None else codec.dumps_request(body)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            with self._lock:
                if self.proc is None:
                    self.start()
                epoch, url = self.epoch, self.url
            try:
                r = self._request(method, url + suffix, data)
                # Answers, not server failures: 500 for the model failing on these instances
                # (TensorFlow's UNKNOWN, INTERNAL or DATA_LOSS: an input it cannot decompress, say;
                # the server itself answered), 501 for an input type its REST API cannot fill from
                # JSON (the same for every request), 504 for a batch too slow to finish.
                if r.status_code < 500 or r.status_code in (MODEL_FAILED, NOT_IMPLEMENTED, TIMED_OUT):
                    return r
                failure = f"HTTP {r.status_code}: {server_error_message(r)}"
                if r.status_code == BUSY:  # up, and busy for longer than we waited: no restart
                    raise TransientError(
                        f"the model server for {self.description} was busy for {BUSY_GIVE_UP_S:g} s: {failure}"
                    )
            except requests.RequestException as e:
                failure = f"{type(e).__name__}: {e}"
            log.warning("model server request failed (attempt %d of %d): %s", attempt, MAX_ATTEMPTS, failure)
            if attempt < MAX_ATTEMPTS:
                self.restart(epoch)
        raise TransientError(f"the model server for {self.description} failed {MAX_ATTEMPTS} times: {failure}")

    def _request(self, method: str, url: str, data: bytes | None) -> requests.Response:
        """One request, asked again while the server answers that it is busy (503: with
        --enable_batching, its batch queue is full) for up to BUSY_GIVE_UP_S: it is up and will
        take the request once the batches before it are done; restarting it would not help."""
        wait, waited = BUSY_FIRST_WAIT_S, 0.0
        while True:
            r = _session().request(
                method,
                url,
                data=data,
                headers={"Content-Type": "application/json"},
                timeout=(10, self.config.predict_timeout_s + 10),
            )
            if r.status_code != BUSY or waited >= BUSY_GIVE_UP_S:
                return r
            if not waited:
                log.info(
                    "the model server for %s is busy (%s): asking again", self.description, server_error_message(r)
                )
            time.sleep(wait)
            waited += wait
            wait = min(wait * 2, BUSY_MAX_WAIT_S)


_local = threading.local()


def _session() -> requests.Session:
    """One keep-alive session per thread (a Session is not meant to be shared across threads)."""
    s: requests.Session | None = getattr(_local, "session", None)
    if s is None:
        s = _local.session = requests.Session()
    return s


def _ensure(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def server_error_message(r: requests.Response) -> str:
    """TF Serving's `{"error": "…"}` message, verbatim; else the body's start."""
    try:
        body = r.json()
    except ValueError:
        return r.text[:500]
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return r.text[:500]
