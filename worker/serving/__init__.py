"""Model serving: the `Predictor` interface and its backends.

The pipeline holds a `Predictor` and calls `predict(instances)`; it never knows which backend
answers. `BatchRejected` means the *instances* were refused (the pipeline isolates the bad ones);
anything else means the model or server failed.
"""

from __future__ import annotations

from typing import Any, Protocol


class BatchRejected(Exception):
    """The model refused this batch because of its data (TF Serving's 400 INVALID_ARGUMENT)."""

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
