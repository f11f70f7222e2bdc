"""TensorFlow Serving backend: `tensorflow_model_server` as a child process, spoken to over REST.

The server runs on 127.0.0.1 with free ports, the model laid out as `<base>/<name>/<version>/` (a
symlink to the downloaded folder). It is ready when `GET /v1/models/<name>` reports the version
`AVAILABLE`; a model it cannot load (`END` with an error), or whose metadata declares a scalar
output (refused by every row-format request) or one of a type it cannot write as JSON, is a
`ModelError`; a server that exits or never gets ready is transient. Its output is drained
continuously into the logs (a full pipe would block it). A batch answered 4xx is `BatchRejected`
with the server's message verbatim (the pipeline isolates what it refuses), or, when its instances
all have a shape or JSON types the signature's metadata says the input does not take, refused for
each instance with that reason; a 501 (an input type its REST API cannot fill from JSON, the same
for every request) is a `ModelError`; a 504 (a batch that outlived the server's timeout) or a 429
(out of memory for it) is sent again in halves, and later batches no bigger; a 500 (the model
failed on the batch: TensorFlow's UNKNOWN, INTERNAL or DATA_LOSS) is refused like a 4xx, so the
pipeline isolates the instances it fails on, as the in-process backend does; a connection error or
any other 5xx restarts the server and retries the batch a bounded number of times, then fails
transiently.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
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
from worker.serving import (
    BATCH_ADVICE,
    JSON_INPUT_ADVICE,
    MEMORY_ADVICE,
    BatchRejected,
    DeclaredOutput,
    SizeLimit,
    TooBig,
    check_outputs,
    count_values,
    numbers_refusal,
    shape_refusal,
    strings_refusal,
    values_per_instance,
)
from worker.serving.jsonvalues import (
    invalid_text_as_b64,
    named_inputs_refusal,
    not_numbers,
    not_strings,
    one_input_refusal,
)

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
# TF Serving's batch scheduler refusing a request of more instances than its max_batch_size.
_OVER_BATCH_LIMIT = re.compile(r"Task size (\d+) is larger than maximum (?:input )?batch size (\d+)")
BATCH_LIMIT_ADVICE = "raise max_batch_size in the model server's --batching_parameters_file"


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
                failure = f"HTTP {r.status_code}: {_error_message(r)}"
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
                log.info("the model server for %s is busy (%s): asking again", self.description, _error_message(r))
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


def _error_message(r: requests.Response) -> str:
    """TF Serving's `{"error": "…"}` message, verbatim; else the body's start."""
    try:
        body = r.json()
    except ValueError:
        return r.text[:500]
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return r.text[:500]


class TFServingModel:
    """A model served by its own `ModelServer`; `LoadedModel` for the pipeline."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server
        self._signatures: dict[str, Any] | None = None  # the server's signature_def, by name
        # One per signature, kept with the server: what it learned of request sizes lasts as long.
        self._predictors: dict[str, RestPredictor] = {}

    @classmethod
    def start(
        cls, config: ServerConfig, path: str, *, description: str, on_start: Callable[[], None] | None = None
    ) -> TFServingModel:
        server = ModelServer(config, path, description=description, on_start=on_start)
        try:
            server.start()
        except BaseException:
            server.close()
            raise
        return cls(server)

    def signature_names(self) -> list[str]:
        return sorted(self._signature_defs())

    def _signature_defs(self) -> dict[str, Any]:
        if self._signatures is None:
            r = self.server.call("GET", "/metadata")
            if r.status_code != 200:
                raise ModelError(f"model server metadata for {self.server.description}: {_error_message(r)}")
            defs = r.json().get("metadata", {}).get("signature_def", {}).get("signature_def", {})
            self._signatures = {k: v for k, v in defs.items() if not k.startswith("__")}
        return self._signatures

    def predictor(self, signature_name: str) -> RestPredictor:
        names = self.signature_names()
        if signature_name not in names:
            raise ModelError(
                f"model {self.server.description} has no signature {signature_name!r}; it has "
                f"{', '.join(names) or 'none'} — set options.signature_name"
            )
        if signature_name not in self._predictors:
            columnar = self.server.config.request_format == "columnar"
            signature = self._signature_defs()[signature_name]
            declared = _declared_outputs(signature)
            check_outputs(declared, self.server.description)
            self._predictors[signature_name] = RestPredictor(
                self.server,
                signature_name,
                columnar=columnar,
                values_per_instance=values_per_instance(declared),
                input_shapes=_input_shapes(signature),
                input_types=_input_types(signature),
            )
        return self._predictors[signature_name]

    def close(self) -> None:
        self.server.close()


class RestPredictor:
    """`Predictor` over TF Serving's REST predict API: row format (`instances` → `predictions`),
    or with `columnar` the columnar format (`inputs` → `outputs`), answered as rows either way."""

    def __init__(
        self,
        server: ModelServer,
        signature_name: str,
        *,
        columnar: bool = False,
        input_shapes: dict[str, list[int | None] | None] | None = None,
        input_types: dict[str, str] | None = None,
        values_per_instance: int | None = None,
    ) -> None:
        self._server = server
        self.values_per_instance = values_per_instance
        # Outputs that do not declare their shapes: values per instance measured from each answer.
        self._measure = values_per_instance is None
        self._signature_name = signature_name
        self._columnar = columnar
        # Each input's shape per instance as the signature declares it (None: not declared), and
        # the types of its numeric and string inputs ("float32", "string").
        self._input_shapes = input_shapes or {}
        self._input_types = input_types or {}
        # Instances per request at most, once a request of more timed out or ran out of memory.
        self._limit = SizeLimit(f"the model server for {server.description}", log)

    @property
    def most_per_call(self) -> int | None:
        return self._limit.cap

    def predict(self, instances: list[Any]) -> list[Any]:
        """Predictions for `instances`, in requests of at most the size that has not timed out or
        run out of memory: a request the server answers 504 or 429 is sent again in halves, and so
        are later ones (in requests of its max_batch_size, when it refuses one as larger)."""
        predictions = self._limit.predict(instances, self._predict_once)
        if self._measure and predictions:
            self.values_per_instance = max(self.values_per_instance or 0, count_values(predictions[0]), 1)
        return predictions

    def _predict_once(self, instances: list[Any]) -> list[Any]:
        columns = _columns(instances) if self._columnar else None
        try:
            if columns is None:
                predictions: list[Any] = self._call(
                    {"signature_name": self._signature_name, "instances": instances}, "predictions"
                )
                return predictions
            outputs = self._call({"signature_name": self._signature_name, "inputs": columns}, "outputs")
        except BatchRejected as e:
            refusal = self._shared_refusal(instances)
            if refusal is None:
                raise
            # Each instance alone would be refused just the same: the pipeline need not try them.
            raise BatchRejected(refusal, each=True) from e
        return _rows(outputs, len(instances))

    def _shared_refusal(self, instances: list[Any]) -> str | None:
        """After the server refused `instances`: when a signature of several inputs gets instances
        all alike that are not objects keyed by its inputs, that; when they all have one shape
        that an input's declared shape does not take, that (the server's own message may name the
        batch's size, "In[0]: [1024,15]", and so differ from one instance's); or when they all hold
        the same JSON types other than numbers for a numeric input (numbers written as strings)."""
        names = list(self._input_shapes)
        if len(names) > 1:
            refusals = {named_inputs_refusal(sorted(names), i) for i in instances}
            if refusals != {None}:
                # All alike without the inputs' names (lists, say): that; a mix: the server's messages.
                return refusals.pop() if len(refusals) == 1 else None
        elif all(isinstance(i, dict) and len(i) > 1 and names[0] in i for i in instances):
            # The input beside other keys (an id, say), which the server takes for inputs it lacks.
            refusals = {one_input_refusal(names[0], i) for i in instances}
            return refusals.pop() if len(refusals) == 1 else None
        for name in names:
            if len(names) == 1:
                values = [i[name] if isinstance(i, dict) and set(i) == {name} else i for i in instances]
            else:
                values = [i[name] for i in instances]
            shapes = {_dims(v) for v in values}
            if len(shapes) == 1 and (shape := shapes.pop()) is not None:
                refusal = shape_refusal(name, self._input_shapes[name], list(shape))
                if refusal is not None:
                    return refusal
            dtype = self._input_types.get(name)
            if dtype == "string":
                kinds = {frozenset(not_strings([v])) for v in values}
                if len(kinds) == 1 and (kind := kinds.pop()):
                    return strings_refusal(name, "/".join(sorted(kind)))
            elif dtype is not None:
                kinds = {frozenset(not_numbers([v])) for v in values}
                # Not for integers beyond 64 bits: a float input reads them (and refuses them only
                # as inexact), which the server's own message says.
                if len(kinds) == 1 and (kind := kinds.pop()) and "integer beyond 64 bits" not in kind:
                    return numbers_refusal(name, dtype, "/".join(sorted(kind)))
        return None

    def _call(self, body: dict[str, Any], key: str) -> Any:
        r = self._server.call("POST", ":predict", body)
        if r.status_code == NOT_IMPLEMENTED:
            raise ModelError(
                f"the model server for {self._server.description} cannot take this model's inputs from JSON "
                f"(HTTP 501: {_error_message(r)}) — {JSON_INPUT_ADVICE}"
            )
        if r.status_code == TIMED_OUT:
            timeout = f"WORKER_PREDICT_TIMEOUT_SECONDS ({self._server.config.predict_timeout_s:g} s)"
            raise TooBig(f"took longer than {timeout}", _error_message(r), "raise WORKER_PREDICT_TIMEOUT_SECONDS")
        if r.status_code == OUT_OF_MEMORY:
            raise TooBig("ran out of memory", _error_message(r), MEMORY_ADVICE)
        if r.status_code == 400 and (over := _OVER_BATCH_LIMIT.search(_error_message(r))):
            limit = int(over.group(2))
            raise TooBig(
                f"takes at most {limit} instances a request", over.group(0), BATCH_LIMIT_ADVICE, fits=max(1, limit)
            )
        if r.status_code != 200:
            raise BatchRejected(_error_message(r))
        try:
            answer = _answer(r.content)[key]
        except (ValueError, KeyError, TypeError) as e:
            raise ModelError(f"the model server answered without {key}: {r.text[:300]}") from e
        if key == "predictions" and not isinstance(answer, list):
            raise ModelError(f"the model server answered predictions that are not a list: {r.text[:300]}")
        return answer


def _input_shapes(signature_def: Any) -> dict[str, list[int | None] | None]:
    """Each input's declared shape per instance, from the server's metadata (`tensor_shape`: the
    batch dimension first, -1 for any size); None where it declares none, or none per instance."""
    inputs = signature_def.get("inputs") if isinstance(signature_def, dict) else None
    return {name: dims[1:] if (dims := _declared_shape(info)) else None for name, info in (inputs or {}).items()}


def _answer(content: bytes) -> Any:
    """TF Serving's answer, bare NaN included. It writes a string output as its bytes, valid UTF-8
    or not (rapidjson, unvalidated): a string that is not valid UTF-8 is read as its bytes,
    `{"b64": …}`, as the in-process backend gives it."""
    try:
        return codec.loads(content)
    except UnicodeDecodeError:
        return invalid_text_as_b64(json.loads(content.decode("utf-8", "surrogateescape")))


def _declared_outputs(signature_def: Any) -> dict[str, DeclaredOutput]:
    """Each output's shape and type ("float", "half") as the server's metadata declares them: a
    `TensorShapeProto` with no `dim` and no `unknown_rank` is a scalar; None where not declared."""
    declared: dict[str, DeclaredOutput] = {}
    outputs = signature_def.get("outputs") if isinstance(signature_def, dict) else None
    for name, info in (outputs or {}).items():
        dtype = info.get("dtype") if isinstance(info, dict) else None
        type_name = dtype[3:].lower() if isinstance(dtype, str) and dtype.startswith("DT_") else None
        declared[name] = (_declared_shape(info), type_name)
    return declared


def _declared_shape(info: Any) -> list[int | None] | None:
    """A tensor's shape as the server's metadata declares it (`tensor_shape`, the batch dimension
    first): its sizes, None for a size of any value (-1); [] for a scalar (a `TensorShapeProto`
    with no `dim` and no `unknown_rank`); None when it declares no rank."""
    shape = info.get("tensor_shape") if isinstance(info, dict) else None
    if not isinstance(shape, dict) or shape.get("unknown_rank"):
        return None
    dims = shape.get("dim", [])
    return [_size(d) for d in dims] if isinstance(dims, list) else None


def _size(dim: Any) -> int | None:
    """A `TensorShapeProto.Dim`'s size as JSON gives it ({"size": "3"}); None for -1 (any size)."""
    try:
        size = int(dim.get("size", -1)) if isinstance(dim, dict) else -1
    except (TypeError, ValueError):
        return None
    return size if size >= 0 else None


# TF Serving's numeric and string types, by the names the in-process backend's messages give them.
_TYPES = {
    "DT_FLOAT": "float32",
    "DT_DOUBLE": "float64",
    **{f"DT_{t.upper()}": t for t in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")},
    "DT_STRING": "string",
}


def _input_types(signature_def: Any) -> dict[str, str]:
    """The signature's numeric and string inputs and their types, from the server's metadata."""
    inputs = signature_def.get("inputs") if isinstance(signature_def, dict) else None
    return {
        name: _TYPES[info["dtype"]]
        for name, info in (inputs or {}).items()
        if isinstance(info, dict) and info.get("dtype") in _TYPES
    }


def _dims(value: Any) -> tuple[int, ...] | None:
    """The shape of a JSON value as a tensor: () for a number, a string or `{"b64": …}`; the sizes
    of nested arrays; None when they are ragged, hold other objects, or nest too deep to walk."""
    if isinstance(value, dict):
        return () if set(value) == {"b64"} else None
    if not isinstance(value, list):
        return ()
    if not any(isinstance(v, (list, dict)) for v in value):
        return (len(value),)
    try:
        inner = {_dims(v) for v in value}
    except RecursionError:
        return None
    if len(inner) != 1 or (sub := inner.pop()) is None:
        return None
    return (len(value), *sub)


def _columns(instances: list[Any]) -> Any:
    """Row instances as columnar `inputs`: a list when the instances are bare values, an object of
    lists when they are objects with the same keys; None when they mix (sent as rows instead)."""
    if all(isinstance(i, dict) for i in instances):
        keys = instances[0].keys() if instances else ()
        if any(i.keys() != keys for i in instances):
            return None
        return {k: [i[k] for i in instances] for k in keys}
    if any(isinstance(i, dict) for i in instances):
        return None
    return list(instances)


def _rows(outputs: Any, n: int) -> list[Any]:
    """Columnar `outputs` (one list, or an object of lists) as one prediction per instance."""
    if isinstance(outputs, dict):
        if not all(isinstance(v, list) and len(v) == n for v in outputs.values()):
            raise ModelError(f"the model server answered outputs without one row per instance ({n}); {BATCH_ADVICE}")
        names = list(outputs)
        return [{name: outputs[name][k] for name in names} for k in range(n)]
    if not isinstance(outputs, list) or len(outputs) != n:
        raise ModelError(f"the model server answered outputs without one row per instance ({n}); {BATCH_ADVICE}")
    return outputs
