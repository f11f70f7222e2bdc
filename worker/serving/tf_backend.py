"""In-process TensorFlow backend: loads a SavedModel once and runs a signature on batches.

Accepts instances in TF Serving's REST row format and answers in its JSON shapes, so output is
the same whichever backend serves the model. TensorFlow is imported lazily, once per process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from worker.errors import ModelError
from worker.serving import (
    JSON_INPUT_ADVICE,
    MEMORY_ADVICE,
    BatchRejected,
    DeclaredOutput,
    PerSignature,
    SizeLimit,
    TooBig,
    check_outputs,
    no_signature,
    numbers,
    values_per_instance,
)
from worker.serving.jsonvalues import decode_strings, rows_from_array
from worker.serving.refusals import inputs_of, not_numbers_refusal, ragged_refusal, shape_refusal, strings_refused

log = logging.getLogger(__name__)
_import_lock = threading.Lock()


# Lines TensorFlow's C++ libraries print to stderr as they load, before TF_CPP_MIN_LOG_LEVEL
# applies (oneDNN's notice, twice, each after absl's warning that logging is not set up yet).
_LOAD_BANNERS = (b"absl::InitializeLog()", b"oneDNN custom operations are on")


def import_tensorflow() -> Any:
    """TensorFlow, imported on first use (3-5 s), quietly: its load banners go to the DEBUG log,
    not as bare lines into the worker's JSON logs."""
    with _import_lock:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if sys.modules.get("tensorflow") is not None:
            return sys.modules["tensorflow"]
        try:
            with _banners_to_debug_log():
                import tensorflow as tf
        except ModuleNotFoundError as e:
            if e.name != "tensorflow":
                raise
            raise ModelError(TENSORFLOW_MISSING) from None
        return tf


# The default image serves models with TF Serving and installs no TensorFlow in Python.
TENSORFLOW_MISSING = (
    "TensorFlow is not installed here (the TF Serving image leaves it out): the in-process backend and "
    "`describe` need it — install requirements-tensorflow.txt (`make setup` does, and so does the image built "
    "with --build-arg SERVING=tensorflow), or serve models with TF Serving (WORKER_SERVING=tfserving)"
)


@contextlib.contextmanager
def _banners_to_debug_log() -> Iterator[None]:
    """Point file descriptor 2 at a temporary file for the block; then log the banner lines at
    DEBUG and write everything else back to stderr as it was (other threads' logs included)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                captured.seek(0)
                for line in captured:
                    if any(banner in line for banner in _LOAD_BANNERS):
                        log.debug("tensorflow: %s", line.decode("utf-8", "replace").rstrip())
                    else:
                        os.write(2, line)
    finally:
        os.close(saved)


class TensorFlowModel:
    """A SavedModel loaded with `tf.saved_model.load`."""

    def __init__(self, path: str, *, description: str) -> None:
        tf = import_tensorflow()
        self._tf = tf
        self.description = description
        try:
            self._loaded = tf.saved_model.load(path)
        except Exception as e:  # TensorFlow raises many types here; all mean "cannot load".
            raise ModelError(f"TensorFlow cannot load model {description}: {e}") from e
        self.predictor = PerSignature(self._predictor)

    def _predictor(self, signature_name: str) -> TensorFlowSignature:
        predictor = self.signature(signature_name)
        check_outputs(predictor.declared_outputs, self.description)
        return predictor

    def signature_names(self) -> list[str]:
        return sorted(self._loaded.signatures)

    def signature(self, signature_name: str) -> TensorFlowSignature:
        """The signature as it is, without the checks of `predictor` (the TF Serving stand-in
        serves a model as TF Serving does, whatever its outputs)."""
        signatures = self._loaded.signatures
        if signature_name not in signatures:
            raise no_signature(self.description, signature_name, list(signatures))
        return TensorFlowSignature(self._tf, signatures[signature_name], description=self.description)


class NotFromJson(ModelError):
    """A model input of a type TF Serving's REST API cannot fill from JSON (float16, bfloat16,
    uint16, complex…): TF Serving answers every request 501, so this backend refuses it too
    rather than let a model work here that cannot work behind the real server."""

    def __init__(self, name: str, type_name: str, values: list[Any]) -> None:
        first = values[0] if values else None
        while isinstance(first, list) and first:
            first = first[0]
        # TF Serving's own words, for the stand-in to answer with.
        self.tf_serving_message = f"Conversion of JSON Value: {json.dumps(first)} to type: {type_name}"
        super().__init__(
            f"input {name!r} is {type_name}, which TF Serving's REST API cannot fill from JSON "
            f"({self.tf_serving_message}) — {JSON_INPUT_ADVICE}"
        )


class TensorFlowSignature:
    """One concrete signature function, fed TF Serving row-format instances."""

    def __init__(self, tf: Any, fn: Any, *, description: str = "in-process") -> None:
        self._tf = tf
        self._fn = fn
        # Instances per call at most, once a call of more ran out of memory.
        self._limit = SizeLimit(f"model {description}", log)
        _, kwargs = fn.structured_input_signature
        self.inputs: dict[str, Any] = dict(sorted(kwargs.items()))
        self.output_specs: dict[str, Any] = dict(sorted(fn.structured_outputs.items()))
        self.output_names = list(self.output_specs)
        # Each output's shape and type, as TF Serving's messages name types ("float", "half").
        self.declared_outputs: dict[str, DeclaredOutput] = {
            k: (None if v.shape.rank is None else v.shape.as_list(), serving_type(v.dtype))
            for k, v in self.output_specs.items()
        }
        self.values_per_instance = values_per_instance(self.declared_outputs)
        # Outputs that do not declare their shapes: values per instance measured from each call.
        self._measure = self.values_per_instance is None
        self._floats = (tf.float32, tf.float64)
        # The types TF Serving's REST API fills from JSON (`AddValueToTensor` in its
        # json_tensor.cc); for any other it answers 501 for every request.
        self._from_json = {
            *self._floats,
            *(tf.int8, tf.int16, tf.int32, tf.int64, tf.uint8, tf.uint32, tf.uint64),
            *(tf.bool, tf.string),
        }

    def _column(self, name: str, values: list[Any]) -> Any:
        spec = self.inputs[name]
        if spec.dtype in self._floats:
            try:
                # TensorFlow reads nested lists of numbers several times faster than NumPy does. It
                # refuses strings, nulls, objects and ragged lists (NumPy's route below then says
                # why) and gives the values NumPy's would, except that integers
                # beyond 64 bits become the nearest float, and float32 subnormals zero, as
                # TensorFlow's kernels flush them anyway. What it takes that TF Serving refuses
                # (booleans, lossy integers, overflows) is refused after, by `numbers`.
                tensor = self._tf.constant(values, dtype=spec.dtype)
            except (TypeError, ValueError):
                pass
            else:
                self._check_shape(name, spec, list(tensor.shape))
                numbers.check_floats(name, values, tensor.numpy())
                return tensor
        if spec.dtype not in self._from_json:
            raise NotFromJson(name, "half" if spec.dtype == self._tf.float16 else spec.dtype.name, values)
        arr = self._strings(name, values) if spec.dtype == self._tf.string else self._numbers(name, spec, values)
        self._check_shape(name, spec, list(arr.shape))
        try:
            return self._tf.constant(arr, dtype=spec.dtype)
        except (TypeError, ValueError) as e:  # what the checks above did not foresee: these instances' fault
            raise BatchRejected(f"input {name!r}: {e}") from None

    def _strings(self, name: str, values: list[Any]) -> np.ndarray:
        """The values of string input `name` as an array of bytes objects."""
        try:
            decoded = [decode_strings(v) for v in values]
        except BatchRejected as e:
            # Other types than strings (numbers for a text input, say); else all strings or
            # {"b64": …}, of which one does not decode.
            raise strings_refused(name, values) or BatchRejected(f"input {name!r}: {e.message}") from None
        arr = np.asarray(decoded, dtype=object)
        # An object array takes instances of several shapes without a word (["a"] and "b" make
        # an array of 2 elements, a list and bytes): they are not one batch, not each refused.
        if any(type(v) is list for v in arr.reshape(-1)):
            raise BatchRejected(ragged_refusal(name))
        return arr

    def _numbers(self, name: str, spec: Any, values: list[Any]) -> np.ndarray:
        """The values of numeric input `name` as an array of its type, refused as TF Serving would."""
        try:
            arr = np.asarray(values)
        except ValueError:  # NumPy's message names the batch's dimensions, not the instance's
            raise BatchRejected(ragged_refusal(name)) from None
        target = np.dtype(spec.dtype.as_numpy_dtype)
        if arr.dtype.kind not in "biuf":  # the batch made an array: its instances have one shape
            raise not_numbers_refusal(name, spec.dtype.name, values)
        if target.kind in "iu":
            arr = numbers.integers(name, spec.dtype.name, values, arr, target)
        elif target.kind == "b":
            numbers.check_booleans(name, arr)
        with np.errstate(over="ignore"):  # beyond float32's range: infinity, refused below
            arr = arr.astype(target, copy=False)
        numbers.check_floats(name, values, arr)
        return arr

    @staticmethod
    def _check_shape(name: str, spec: Any, shape: list[int]) -> None:
        refusal = shape_refusal(name, None if spec.shape.rank is None else spec.shape.as_list()[1:], shape[1:])
        if refusal is not None:
            raise BatchRejected(refusal, each=True)  # every instance has that shape: each alone is refused

    @property
    def most_per_call(self) -> int | None:
        return self._limit.cap

    def predict(self, instances: list[Any]) -> list[Any]:
        """Predictions for `instances`, in calls of at most the size that has not run out of memory:
        a batch TensorFlow cannot allocate for is predicted again in halves, and so are later ones."""
        return self._limit.predict(instances, self.predict_once)

    def predict_once(self, instances: list[Any]) -> list[Any]:
        """Predictions for `instances` in one call; `TooBig` when TensorFlow runs out of memory."""
        outputs = self.outputs_once(instances)
        n = len(instances)
        if self._measure and n:
            now = -(-sum(a.size for a in outputs.values()) // n)
            self.values_per_instance = max(self.values_per_instance or 0, now, 1)
        columns = {name: rows_from_array(name, outputs[name], n) for name in self.output_names}
        if len(columns) == 1:
            return next(iter(columns.values()))
        return [{name: columns[name][k] for name in self.output_names} for k in range(n)]

    def outputs_once(self, instances: list[Any]) -> dict[str, np.ndarray]:
        """The signature's outputs for `instances`, in one call, as arrays."""
        inputs = inputs_of(list(self.inputs), instances)
        feeds = {name: self._column(name, values) for name, values in inputs.items()}
        try:
            outputs = self._fn(**feeds)
        except self._tf.errors.ResourceExhaustedError as e:
            raise TooBig("ran out of memory", _cause(e.message), MEMORY_ADVICE) from None
        except self._tf.errors.OpError as e:
            # Refused instances (InvalidArgumentError), and whatever else running them raised (a
            # model that fails on every instance: each line then says why). TF Serving answers
            # these with an error, never predictions.
            raise BatchRejected(_cause(e.message)) from e  # the cause keeps TensorFlow's error code
        return {name: outputs[name].numpy() for name in self.output_names}


def serving_type(dtype: Any) -> str:
    """A TensorFlow dtype by TF Serving's name for it: "float" for float32, "half" for float16."""
    from tensorflow.core.framework import types_pb2

    return str(types_pb2.DataType.Name(dtype.as_datatype_enum))[3:].lower()


# Lines of a TensorFlow error around its cause: its heading, where the node was defined, the node.
_ERROR_FRAMING = ("Graph execution error", "Detected at node", "<stack traces unavailable>", "Node:")


def _cause(message: str) -> str:
    """The line of a TensorFlow error that says what is wrong, as TF Serving's first line does
    ("indices[0,1] = 100 is not in [0, 100)"), without the framing of a graph's errors: its
    heading, the node's stack trace, `{{function_node …}}`, `[[{{node …}}]]` and `[Op:…]`."""
    for line in message.splitlines():
        text = line.strip()
        if text and not line[0].isspace() and not text.startswith(_ERROR_FRAMING):
            return re.sub(r"\s*\[Op:[^\]]*\]$", "", re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", text))
    return message.strip() or "the model refused the instances"
