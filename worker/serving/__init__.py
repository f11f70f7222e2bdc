"""Model serving: the `Predictor` interface and its backends.

The pipeline holds a `Predictor` and calls `predict(instances)`; it never knows which backend
answers. `BatchRejected` means the *instances* were refused (the pipeline isolates the bad ones);
anything else means the model or server failed.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

# What to do about a model input TF Serving cannot fill from JSON (its REST API answers HTTP 501).
JSON_INPUT_ADVICE = (
    "TF Serving's REST API takes float, double, int8, int16, int32, int64, uint8, uint32, uint64, "
    "bool and string inputs: export the model with one of those and cast inside it"
)


class BatchRejected(Exception):
    """The model refused this batch: because of its data (TF Serving's 400 INVALID_ARGUMENT), or
    running it failed (TF Serving's other 4xx answers; TensorFlow's errors in-process, out of memory
    included). The pipeline sends it again in parts."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Predictor(Protocol):
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
