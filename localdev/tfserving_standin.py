"""A stand-in for `tensorflow_model_server`'s REST API, backed by TensorFlow, for development and
tests on machines where the real binary cannot be installed.

    python -m localdev.tfserving_standin --rest_api_port=8501 --model_name=m --model_base_path=/models/m

It takes the real server's flags (unknown ones are accepted and ignored), serves the highest
numeric version folder under `--model_base_path`, and answers like TF Serving:

- `GET /v1/models/NAME` — `model_version_status` (`LOADING`, then `AVAILABLE`, or `END` with the
  load error, as TF Serving reports a model it cannot load); `GET /v1/models/NAME/metadata` —
  the signatures with their inputs and outputs;
- `POST /v1/models/NAME[/versions/N]:predict` — row (`instances` → `predictions`) and columnar
  (`inputs` → `outputs`) formats, `signature_name`, `{"b64": …}`; errors as `{"error": "…"}` with
  400 (bad request or instances), 404 (unknown model, version or signature), 429 (TensorFlow ran
  out of memory for the batch), the status TF Serving gives each other TensorFlow error (500 for
  UNKNOWN, INTERNAL and DATA_LOSS), 501 (an input type TF Serving's REST API cannot fill from JSON,
  such as float16) or 504 (a request that took longer than `--rest_api_timeout_in_ms`); bare
  NaN/Infinity in predictions, as the real server writes them. For tests,
  `STANDIN_DELAY_MS_PER_INSTANCE` makes the model that slow.
- `--enable_batching` (with `--batching_parameters_file`): the limits of TF Serving's batch
  scheduler, not its batching. A request of more instances than `max_batch_size` (1000 by
  default) is refused as TF Serving refuses it (400, "Task size N is larger than maximum input
  batch size M"); `num_batch_threads` requests run at once, `max_enqueued_batches` more wait (10
  by default), and any more are answered 503 ("The batch scheduling queue to which this task was
  submitted is full"), TensorFlow's UNAVAILABLE.

What it does not do: gRPC (`--port` is accepted and ignored), merging requests into batches,
model config files, version policies, or hot-reloading new versions.
The worker runs it through exactly the code path it uses for the real binary
(`WORKER_MODEL_SERVER="python -m localdev.tfserving_standin"`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from worker.serving import TooBig
from worker.serving.jsonvalues import rows_from_array
from worker.serving.tf_backend import NotFromJson

_PREDICT = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?:predict$")
_STATUS = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?(/metadata)?$")


class Servable:
    """The model: loaded in the background so `LOADING` is observable, as with the real server."""

    def __init__(self, name: str, base_path: str) -> None:
        self.name = name
        self.base_path = base_path
        self.version: int | None = None
        self.state = "START"
        self.error = ""
        self.model: Any = None
        self._predictors: dict[str, Any] = {}
        self._lock = threading.Lock()

    def load(self) -> None:
        try:
            versions = sorted(int(v) for v in os.listdir(self.base_path) if v.isdigit())
        except OSError as e:
            self.state, self.error = "END", f"cannot read model base path: {e}"
            return
        if not versions:
            # The real server logs this and keeps waiting for a version to appear.
            print(f"No versions of servable {self.name} found under base path {self.base_path}", flush=True)
            return
        self.version = versions[-1]
        self.state = "LOADING"
        print(f"Loading servable: {self.name} version {self.version}", flush=True)
        try:
            from worker.serving.tf_backend import TensorFlowModel

            self.model = TensorFlowModel(os.path.join(self.base_path, str(self.version)), description=self.name)
        except Exception as e:
            self.state, self.error = "END", str(e)
            print(f"Loading servable {self.name} version {self.version} failed: {e}", flush=True)
            return
        self.state = "AVAILABLE"
        print(f"Successfully loaded servable version {{name: {self.name} version: {self.version}}}", flush=True)

    def signature(self, name: str) -> Any:
        with self._lock:
            if name not in self._predictors:
                self._predictors[name] = self.model.signature(name)
            return self._predictors[name]

    def signature_names(self) -> list[str]:
        return sorted(self.model._loaded.signatures) if self.model is not None else []


class BatchScheduler:
    """The limits TF Serving's batch scheduler puts on predict requests (`--enable_batching`),
    from its `BatchingParameters` text file (TF Serving's defaults otherwise)."""

    def __init__(self, parameters: str) -> None:
        given = {k: int(v) for k, v in re.findall(r"(\w+)\s*\{\s*value\s*:\s*(\d+)\s*\}", parameters)}
        self.max_batch_size = given.get("max_batch_size", 1000)
        self.threads = max(1, given.get("num_batch_threads", os.cpu_count() or 1))
        self.max_enqueued = given.get("max_enqueued_batches", 10)
        self._running = threading.BoundedSemaphore(self.threads)
        self._lock = threading.Lock()
        self._admitted = 0

    @contextlib.contextmanager
    def task(self, size: int) -> Iterator[str | None]:
        """Run a task of `size` instances: yields None, or why TF Serving refuses it."""
        if size > self.max_batch_size:
            yield f"Task size {size} is larger than maximum input batch size {self.max_batch_size}"
            return
        with self._lock:
            full = self._admitted >= self.threads + self.max_enqueued
            if not full:
                self._admitted += 1
        if full:
            yield "The batch scheduling queue to which this task was submitted is full"
            return
        try:
            with self._running:
                yield None
        finally:
            with self._lock:
                self._admitted -= 1


class Handler(BaseHTTPRequestHandler):
    servable: Servable
    timeout_s: float = 30.0  # --rest_api_timeout_in_ms
    delay_s_per_instance: float = 0.0  # STANDIN_DELAY_MS_PER_INSTANCE: a model that slow
    batching: BatchScheduler | None = None  # --enable_batching
    protocol_version = "HTTP/1.1"
    # The headers and the body go out in two writes: with Nagle's algorithm on, the body waits
    # for the client's delayed ACK of the headers, about 40 ms on every kept-alive request.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would flood the worker's logs

    def _send(self, status: int, body: Any) -> None:
        # allow_nan: the real server writes bare NaN too; and text as it is, valid UTF-8 or not.
        data = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogateescape")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message})

    def _check(self, name: str, version: str | None) -> bool:
        s = self.servable
        if name != s.name or s.state != "AVAILABLE" or (version is not None and int(version) != s.version):
            label = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
            self._error(404, f"Servable not found for request: {label}")
            return False
        return True

    def do_GET(self) -> None:
        m = _STATUS.match(self.path)
        s = self.servable
        if not m:
            self._error(404, f"Malformed request: GET {self.path}")
            return
        name, version, metadata = m.groups()
        if metadata:
            if not self._check(name, version):
                return
            self._send(200, {"model_spec": {"name": name, "version": str(s.version)}, "metadata": self._metadata()})
            return
        if name != s.name or s.version is None:
            self._error(404, f"Could not find any versions of model {name}")
            return
        code = "OK" if s.state != "END" else "UNKNOWN"
        status = {"version": str(s.version), "state": s.state, "status": {"error_code": code, "error_message": s.error}}
        self._send(200, {"model_version_status": [status]})

    def _metadata(self) -> dict[str, Any]:
        defs = {}
        for sig in self.servable.signature_names():
            p = self.servable.signature(sig)
            defs[sig] = {
                "inputs": {
                    k: {"dtype": _data_type(spec.dtype), "tensor_shape": _tensor_shape(spec.shape), "name": k}
                    for k, spec in p.inputs.items()
                },
                "outputs": {
                    k: {"dtype": _data_type(spec.dtype), "tensor_shape": _tensor_shape(spec.shape), "name": k}
                    for k, spec in p.output_specs.items()
                },
                "method_name": "tensorflow/serving/predict",
            }
        return {"signature_def": {"signature_def": defs}}

    def do_POST(self) -> None:
        m = _PREDICT.match(self.path)
        if not m:
            self._error(404, f"Malformed request: POST {self.path}")
            return
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if not self._check(*m.groups()):
            return
        try:
            body = json.loads(raw)
        except ValueError as e:
            self._error(400, f"JSON Parse error: {e}")
            return
        if not isinstance(body, dict):
            self._error(400, "JSON Value: not an object. Expecting object")
            return
        sig_name = body.get("signature_name", "serving_default")
        if sig_name not in self.servable.signature_names():
            self._error(404, f'Serving signature name: "{sig_name}" not found in signature def')
            return
        predictor = self.servable.signature(sig_name)
        has_rows, has_cols = "instances" in body, "inputs" in body
        if has_rows == has_cols:
            self._error(
                400, "Missing 'inputs' or 'instances' key" if not has_rows else "Not both 'inputs' and 'instances'"
            )
            return
        started = time.monotonic()
        try:
            if has_rows:
                instances = body["instances"]
                if not isinstance(instances, list) or not instances:
                    self._error(400, "'instances' must be a non-empty JSON array")
                    return
                outputs = self._scheduled(predictor, instances)
                answer = None if outputs is None else {"predictions": _row_format(outputs)}
            else:
                rows = _rows_from_columns(body["inputs"], list(predictor.inputs))
                outputs = self._scheduled(predictor, rows)
                answer = None if outputs is None else {"outputs": _columnar_format(outputs)}
            if answer is None:  # refused by the batch scheduler: answered
                return
            if time.monotonic() - started > self.timeout_s:
                # TF Serving's answer when a request outlives --rest_api_timeout_in_ms.
                self._error(504, "Timed out waiting for notification")
            else:
                self._send(200, answer)
        except NotFromJson as e:  # an input type TF Serving's REST API does not convert: 501
            self._error(501, e.tf_serving_message)
        except TooBig as e:  # TensorFlow's RESOURCE_EXHAUSTED: 429
            self._error(429, e.detail)
        except Exception as e:  # the row converter's BatchRejected and TensorFlow's own errors
            self._error(_http_status(e), getattr(e, "message", None) or str(e))

    def _scheduled(self, predictor: Any, instances: list[Any]) -> dict[str, Any] | None:
        """The outputs for `instances`, through the batch scheduler's limits when batching is on;
        None when it refused them (its answer sent: INVALID_ARGUMENT or UNAVAILABLE)."""
        if self.batching is None:
            return self._predict(predictor, instances)
        with self.batching.task(len(instances)) as refusal:
            if refusal is None:
                return self._predict(predictor, instances)
        self._error(400 if refusal.startswith("Task size") else 503, refusal)
        return None

    def _predict(self, predictor: Any, instances: list[Any]) -> dict[str, Any]:
        if self.delay_s_per_instance:
            time.sleep(self.delay_s_per_instance * len(instances))
        outputs: dict[str, Any] = predictor.outputs_once(instances)  # as TF Serving does: no halving
        return {
            name: _text(arr) if arr.dtype.kind in "OS" and not name.endswith("_bytes") else arr
            for name, arr in outputs.items()
        }


# TF Serving's HTTP status for each TensorFlow error code (`ToHTTPStatusCode` in its
# http_server.cc); a refusal of the worker's own row converter is a 400, as INVALID_ARGUMENT.
_HTTP_STATUS = {
    1: 499,  # CANCELLED
    2: 500,  # UNKNOWN
    3: 400,  # INVALID_ARGUMENT
    4: 504,  # DEADLINE_EXCEEDED
    5: 404,  # NOT_FOUND
    6: 409,  # ALREADY_EXISTS
    7: 403,  # PERMISSION_DENIED
    8: 429,  # RESOURCE_EXHAUSTED
    9: 400,  # FAILED_PRECONDITION
    10: 409,  # ABORTED
    11: 400,  # OUT_OF_RANGE
    12: 501,  # UNIMPLEMENTED
    13: 500,  # INTERNAL
    14: 503,  # UNAVAILABLE
    15: 500,  # DATA_LOSS
    16: 401,  # UNAUTHENTICATED
}


def _http_status(e: BaseException) -> int:
    """The status TF Serving answers a request with when running it raised `e`."""
    code = getattr(e.__cause__, "error_code", None)
    return _HTTP_STATUS.get(code, 500) if isinstance(code, int) else 400


def _data_type(dtype: Any) -> str:
    """A DataType as TF Serving's metadata names it: DT_FLOAT, DT_INT64, DT_STRING …"""
    from tensorflow.core.framework import types_pb2

    return str(types_pb2.DataType.Name(dtype.as_datatype_enum))


def _tensor_shape(shape: Any) -> dict[str, Any]:
    """A TensorShapeProto as TF Serving's metadata writes it: sizes as strings, -1 for any size."""
    if shape.rank is None:
        return {"dim": [], "unknown_rank": True}
    dims = [{"size": str(-1 if d is None else d), "name": ""} for d in shape.as_list()]
    return {"dim": dims, "unknown_rank": False}


def _rows_from_columns(inputs: Any, names: list[str]) -> list[Any]:
    if isinstance(inputs, dict) and len(names) > 1:
        if set(inputs) != set(names):
            raise ValueError(
                f"this model takes named inputs {names}: 'inputs' must be an object with exactly those keys, "
                f"got {sorted(inputs)}"
            )
        columns = [inputs[n] for n in names]
        return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]
    if isinstance(inputs, dict) and set(inputs) == set(names):
        inputs = inputs[names[0]]
    if not isinstance(inputs, list) or not inputs:
        raise ValueError("'inputs' must be a non-empty JSON array or an object of arrays")
    return inputs


def _check_writable(outputs: dict[str, Any]) -> None:
    """TF Serving's refusal of an output of a type it cannot write as JSON (float16, say)."""
    for arr in outputs.values():
        kind = {"float16": "half"}.get(arr.dtype.name, arr.dtype.name)
        if arr.dtype.kind == "c" or kind in ("half", "uint16") or arr.dtype.name == "bfloat16":
            raise ValueError(f"Failed to write JSON value for tensor type: {kind}")


def _text(arr: Any) -> Any:
    """A string output whose name does not end in _bytes, as TF Serving writes it: its bytes as
    they are, valid UTF-8 or not (held here as surrogate escapes, raw bytes in the answer)."""
    return np.vectorize(lambda b: b.decode("utf-8", "surrogateescape"), otypes=[object])(arr)


def _row_format(outputs: dict[str, Any]) -> list[Any]:
    """Output arrays as TF Serving's row format writes them (`MakeRowFormatJsonFromTensors` in its
    json_tensor.cc): one row per index of the outputs' first dimension, whatever the instances."""
    _check_writable(outputs)
    batch = 0
    for name, arr in outputs.items():
        if arr.ndim == 0:
            raise ValueError(f"Tensor name: {name} has no shape information ")
        if arr.shape[0] < 1:
            raise ValueError(f"Tensor name: {name} has invalid batch size: {arr.shape[0]}")
        if batch and arr.shape[0] != batch:
            raise ValueError(f"Tensor name: {name} has inconsistent batch size: {arr.shape[0]} expecting: {batch}")
        batch = arr.shape[0]
    columns = {name: rows_from_array(name, arr, batch) for name, arr in outputs.items()}
    if len(columns) == 1:
        return next(iter(columns.values()))
    return [{name: column[k] for name, column in columns.items()} for k in range(batch)]


def _columnar_format(outputs: dict[str, Any]) -> Any:
    """Output arrays as TF Serving's columnar format writes them: each whole, by name when several."""
    _check_writable(outputs)
    columns = {
        name: rows_from_array(name, arr, len(arr)) if arr.ndim else arr.tolist() for name, arr in outputs.items()
    }
    return next(iter(columns.values())) if len(columns) == 1 else columns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--rest_api_port", type=int, default=0)
    parser.add_argument("--rest_api_host", default="127.0.0.1")
    parser.add_argument("--model_name", default="default")
    parser.add_argument("--model_base_path", required=True)
    parser.add_argument("--rest_api_timeout_in_ms", type=int, default=30000)
    parser.add_argument("--enable_batching", nargs="?", const="true", default="false")
    parser.add_argument("--batching_parameters_file", default="")
    args, ignored = parser.parse_known_args(argv)
    if args.rest_api_port == 0:
        print("--rest_api_port is 0: the REST API is off (as with tensorflow_model_server)", flush=True)
        return 2
    if ignored:
        print(f"stand-in ignores flags: {' '.join(ignored)}", flush=True)
    servable = Servable(args.model_name, args.model_base_path)
    bound = {
        "servable": servable,
        "timeout_s": args.rest_api_timeout_in_ms / 1000,
        "delay_s_per_instance": float(os.environ.get("STANDIN_DELAY_MS_PER_INSTANCE") or 0) / 1000,
    }
    if args.enable_batching.lower() in ("true", "1"):
        parameters = ""
        if args.batching_parameters_file:
            with open(args.batching_parameters_file) as f:
                parameters = f.read()
        bound["batching"] = BatchScheduler(parameters)
    handler = type("BoundHandler", (Handler,), bound)
    server = ThreadingHTTPServer((args.rest_api_host, args.rest_api_port), handler)
    server.daemon_threads = True
    threading.Thread(target=servable.load, daemon=True).start()
    print(f"Exporting HTTP/REST API at:{args.rest_api_host}:{args.rest_api_port} ...", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
