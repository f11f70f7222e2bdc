"""Batches over TF Serving's REST predict API (row or columnar), its answers read back as rows,
and what each status means: refused instances, a batch too big, a model that failed, a server to
restart."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from worker import codec
from worker.errors import ModelError
from worker.serving import (
    BATCH_ADVICE,
    JSON_INPUT_ADVICE,
    MEMORY_ADVICE,
    BatchRejected,
    SizeLimit,
    TooBig,
    count_values,
)
from worker.serving.jsonvalues import invalid_text_as_b64
from worker.serving.refusals import inputs_of, numbers_refused, shape_refusal, strings_refused
from worker.serving.tfserving.metadata import dims_of
from worker.serving.tfserving.process import (
    NOT_IMPLEMENTED,
    OUT_OF_MEMORY,
    TIMED_OUT,
    ModelServer,
    server_error_message,
)

log = logging.getLogger(__name__)

# TF Serving's batch scheduler refusing a request of more instances than its max_batch_size.
_OVER_BATCH_LIMIT = re.compile(r"Task size (\d+) is larger than maximum (?:input )?batch size (\d+)")
BATCH_LIMIT_ADVICE = "raise max_batch_size in the model server's --batching_parameters_file"


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
        columns = to_columns(instances) if self._columnar else None
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
        return rows_of(outputs, len(instances))

    def _shared_refusal(self, instances: list[Any]) -> str | None:
        """After the server refused `instances`: why, when every instance is refused alike (see
        `worker.serving.refusals`) — instances that are not what the signature's inputs take, of
        one shape that an input's declared shape does not take, or of JSON types an input does
        not take; None otherwise (the server's own messages then say why, instance by instance)."""
        try:
            inputs = inputs_of(sorted(self._input_shapes), instances)
        except BatchRejected as e:
            return e.message if e.each else None
        return next(filter(None, (self._input_refusal(name, values) for name, values in inputs.items())), None)

    def _input_refusal(self, name: str, values: list[Any]) -> str | None:
        """Why input `name` refuses all its `values` alike: their one shape, or their JSON types."""
        shapes = {dims_of(v) for v in values}
        if len(shapes) == 1 and (shape := shapes.pop()) is not None:
            refusal = shape_refusal(name, self._input_shapes[name], list(shape))
            if refusal is not None:
                return refusal
        dtype = self._input_types.get(name)
        if dtype is None:
            return None
        refused = strings_refused(name, values) if dtype == "string" else numbers_refused(name, dtype, values)
        return refused.message if refused is not None and refused.each else None

    def _call(self, body: dict[str, Any], key: str) -> Any:
        r = self._server.call("POST", ":predict", body)
        if r.status_code == NOT_IMPLEMENTED:
            raise ModelError(
                f"the model server for {self._server.description} cannot take this model's inputs from JSON "
                f"(HTTP 501: {server_error_message(r)}) — {JSON_INPUT_ADVICE}"
            )
        if r.status_code == TIMED_OUT:
            timeout = f"WORKER_PREDICT_TIMEOUT_SECONDS ({self._server.config.predict_timeout_s:g} s)"
            raise TooBig(f"took longer than {timeout}", server_error_message(r), "raise WORKER_PREDICT_TIMEOUT_SECONDS")
        if r.status_code == OUT_OF_MEMORY:
            raise TooBig("ran out of memory", server_error_message(r), MEMORY_ADVICE)
        if r.status_code == 400 and (over := _OVER_BATCH_LIMIT.search(server_error_message(r))):
            limit = int(over.group(2))
            raise TooBig(
                f"takes at most {limit} instances a request", over.group(0), BATCH_LIMIT_ADVICE, fits=max(1, limit)
            )
        if r.status_code != 200:
            raise BatchRejected(server_error_message(r))
        try:
            answer = read_answer(r.content)[key]
        except (ValueError, KeyError, TypeError) as e:
            raise ModelError(f"the model server answered without {key}: {r.text[:300]}") from e
        if key == "predictions" and not isinstance(answer, list):
            raise ModelError(f"the model server answered predictions that are not a list: {r.text[:300]}")
        return answer


def read_answer(content: bytes) -> Any:
    """TF Serving's answer, bare NaN included. It writes a string output as its bytes, valid UTF-8
    or not (rapidjson, unvalidated): a string that is not valid UTF-8 is read as its bytes,
    `{"b64": …}`, as the in-process backend gives it."""
    try:
        return codec.loads(content)
    except UnicodeDecodeError:
        return invalid_text_as_b64(json.loads(content.decode("utf-8", "surrogateescape")))


def to_columns(instances: list[Any]) -> Any:
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


def rows_of(outputs: Any, n: int) -> list[Any]:
    """Columnar `outputs` (one list, or an object of lists) as one prediction per instance."""
    if isinstance(outputs, dict):
        if not all(isinstance(v, list) and len(v) == n for v in outputs.values()):
            raise ModelError(f"the model server answered outputs without one row per instance ({n}); {BATCH_ADVICE}")
        names = list(outputs)
        return [{name: outputs[name][k] for name in names} for k in range(n)]
    if not isinstance(outputs, list) or len(outputs) != n:
        raise ModelError(f"the model server answered outputs without one row per instance ({n}); {BATCH_ADVICE}")
    return outputs
