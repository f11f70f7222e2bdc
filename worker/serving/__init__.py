"""Model serving: the `Predictor` interface and its backends.

The pipeline holds a `Predictor` and calls `predict(instances)`; it never knows which backend
answers. `BatchRejected` means the *instances* were refused (the pipeline isolates the bad ones);
anything else means the model or server failed.

    __init__.py    the interface, the limits on a batch, one predictor per signature
    refusals.py    why instances are refused, said the same by both backends
    jsonvalues.py  TF Serving's JSON values to and from arrays (strings, bytes, float32 text)
    numbers.py     numbers an input takes as TF Serving's REST API does
    cache.py       models kept loaded, within a memory budget
    tfserving/     TF Serving as a child process, over its REST API
    tf_backend.py  the SavedModel run in-process by TensorFlow
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from worker.errors import ModelError

# What to do about a model input TF Serving cannot fill from JSON (its REST API answers HTTP 501).
JSON_INPUT_ADVICE = (
    "TF Serving's REST API takes float, double, int8, int16, int32, int64, uint8, uint32, uint64, "
    "bool and string inputs: export the model with one of those and cast inside it"
)


# What to do about a model that runs out of memory on one instance.
MEMORY_ADVICE = "give the worker more memory (Cloud Run: --memory), or use a smaller model"

# What to do about a model output without one row per instance.
BATCH_ADVICE = "export the model with a batch dimension first on every output"


# The output types TF Serving's REST API writes as JSON (`AddSingleValueAndAdvance` in its
# json_tensor.cc), by its names for them: any other fails every request.
JSON_OUTPUT_TYPES = (
    "float",
    "double",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint32",
    "uint64",
    "bool",
    "string",
)


# An output's declared shape (None for a dimension of any size; None for any rank) and type name,
# as TF Serving says it ("float", "half"; None where not declared).
DeclaredOutput = tuple[list[int | None] | None, str | None]

# Values a batch's predictions may hold at most, when the model declares its outputs' shapes:
# every value becomes a Python number and JSON text before its line is written (some 60 bytes
# at the peak), so a model of large outputs (an image per instance) gets smaller batches.
MAX_BATCH_OUTPUT_VALUES = 2**21


def check_outputs(outputs: Mapping[str, DeclaredOutput], description: str) -> None:
    """Refuse a signature with an output no request can be answered with, by its declared shape
    and type: a scalar has no row per instance (TF Serving refuses every row-format request of it:
    "has no shape information"), and a type TF Serving cannot write as JSON fails every request of it."""
    for name, (dims, type_name) in sorted(outputs.items()):
        if dims == []:
            raise ModelError(
                f"model {description}: output {name!r} is a scalar (shape []), not one row per instance; {BATCH_ADVICE}"
            )
        if type_name is not None and type_name not in JSON_OUTPUT_TYPES:
            keras = " (a Keras model under a mixed-precision policy: give its last layer dtype='float32')"
            raise ModelError(
                f"model {description}: output {name!r} is {type_name}, which TF Serving's REST API cannot write "
                f"as JSON — cast it inside the model to one of {', '.join(JSON_OUTPUT_TYPES)}"
                + (keras if type_name in ("half", "bfloat16") else "")
            )


def values_per_instance(outputs: Mapping[str, DeclaredOutput]) -> int | None:
    """How many values one instance's prediction holds, over all outputs, when every output
    declares every dimension after the batch's; else None."""
    total = 0
    for dims, _ in outputs.values():
        if dims is None or any(d is None for d in dims[1:]):
            return None
        count = 1
        for d in dims[1:]:
            count *= d or 0
        total += count
    return total


def count_values(prediction: Any) -> int:
    """How many values one JSON-ready prediction holds (numbers, strings, `{"b64": …}` each one):
    what a model whose outputs do not declare their shapes predicts per instance."""
    if isinstance(prediction, list):
        if prediction and not isinstance(prediction[0], (list, dict)):  # a tensor's innermost row
            return len(prediction)
        return sum(map(count_values, prediction))
    if isinstance(prediction, dict) and not (len(prediction) == 1 and "b64" in prediction):
        return sum(map(count_values, prediction.values()))
    return 1


class BatchRejected(Exception):
    """The model refused this batch: because of its data (TF Serving's 400 INVALID_ARGUMENT), or
    running it failed (TF Serving's other 4xx answers; TensorFlow's errors in-process, out of memory
    included). The pipeline sends it again in parts, unless `each`: every instance of the batch
    would be refused alone, for this same reason (one they all share, such as their shape), so
    each is an error line at once."""

    def __init__(self, message: str, *, each: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.each = each


class TooBig(Exception):
    """One call's batch was too big for the model: it outlived the server's timeout, ran out of
    memory, or was over the model server's batch size limit. `what` says which ("took longer than
    …"), `detail` is the model's own message, `advice` what to do when even one instance is too
    big, and `fits` how many instances a call takes, when the model says so."""

    def __init__(self, what: str, detail: str, advice: str, *, fits: int | None = None) -> None:
        super().__init__(f"{what} ({detail})")
        self.what = what
        self.detail = detail
        self.advice = advice
        self.fits = fits


class SizeLimit:
    """The most instances a model has taken in one call since it found a batch too big: the batch
    refused as `TooBig` is sent again in halves, and every later one in parts no bigger. A single
    instance still too big is the model's fault: a `ModelError` that says what to do."""

    def __init__(self, model: str, log: logging.Logger) -> None:
        self._model = model
        self._log = log
        self.cap: int | None = None

    def predict(self, instances: list[Any], once: Callable[[list[Any]], list[Any]]) -> list[Any]:
        if self.cap is None or len(instances) <= self.cap:  # the common case: one call, no copies
            try:
                return once(instances)
            except TooBig as e:
                self._shrink(e, len(instances))
        predictions: list[Any] = []
        start = 0
        while start < len(instances):
            n = min(self.cap or len(instances), len(instances) - start)
            try:
                predictions += once(instances[start : start + n])
            except TooBig as e:
                self._shrink(e, n)
                continue
            start += n
        return predictions

    def _shrink(self, e: TooBig, n: int) -> None:
        """After `n` instances were too big: at most as many as fit, else half as many, from now on."""
        if n == 1:
            raise ModelError(f"{self._model} {e.what} on one instance ({e.detail}) — {e.advice}") from None
        fits = min(e.fits, n - 1) if e.fits else n // 2
        self.cap = fits if self.cap is None else min(self.cap, fits)
        self._log.warning("%s: %s on %d instances: at most %d per call from now on", self._model, e, n, self.cap)


P = TypeVar("P")


class PerSignature(Generic[P]):
    """A model's predictors, one per signature, each made once (files in flight may ask for it at
    once) and kept with the model: what one learns of batch sizes lasts as long as the model."""

    def __init__(self, make: Callable[[str], P]) -> None:
        self._make = make
        self._made: dict[str, P] = {}
        self._lock = threading.Lock()

    def __call__(self, signature_name: str) -> P:
        with self._lock:
            if signature_name not in self._made:
                self._made[signature_name] = self._make(signature_name)
            return self._made[signature_name]


def no_signature(description: str, signature_name: str, names: list[str]) -> ModelError:
    """A model asked for a signature it does not have."""
    return ModelError(
        f"model {description} has no signature {signature_name!r}; it has "
        f"{', '.join(sorted(names)) or 'none'} — set options.signature_name"
    )


class Predictor(Protocol):
    # How many values one instance's prediction holds: as the signature declares it, else as
    # measured from the predictions so far (None: not declared, and nothing predicted yet).
    values_per_instance: int | None

    @property
    def most_per_call(self) -> int | None:
        """The most instances one call takes, once a call of more was too big (None: no limit)."""
        ...

    def predict(self, instances: list[Any]) -> list[Any]:
        """One prediction per instance, in order, as JSON-ready values; raises BatchRejected."""
        ...


class LoadedModel(Protocol):
    """A model loaded once and used by many jobs; one predictor per signature."""

    def predictor(self, signature_name: str) -> Predictor: ...


class ServingStats:
    """The worker's own counters of model work, for logs and tests: downloads, loads (cache
    misses), hits, evictions and model server starts (restarts included)."""

    FIELDS = ("downloads", "loads", "hits", "evictions", "server_starts")

    def __init__(self) -> None:
        self._counts = dict.fromkeys(self.FIELDS, 0)
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
