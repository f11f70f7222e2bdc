"""A model served by TF Serving: its server started, its signatures read from the server's
metadata and checked, a REST predictor per signature."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from worker.errors import ModelError
from worker.serving import PerSignature, check_outputs, no_signature, values_per_instance
from worker.serving.tfserving.metadata import input_shapes_of, input_types_of, outputs_declared
from worker.serving.tfserving.process import ModelServer, ServerConfig, server_error_message
from worker.serving.tfserving.rest import RestPredictor

log = logging.getLogger(__name__)


class TFServingModel:
    """A model served by its own `ModelServer`; `LoadedModel` for the pipeline."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server
        self._signatures: dict[str, Any] | None = None  # the server's signature_def, by name
        self._predictors = PerSignature(self._predictor)

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
                raise ModelError(f"model server metadata for {self.server.description}: {server_error_message(r)}")
            defs = r.json().get("metadata", {}).get("signature_def", {}).get("signature_def", {})
            self._signatures = {k: v for k, v in defs.items() if not k.startswith("__")}
        return self._signatures

    def predictor(self, signature_name: str) -> RestPredictor:
        names = self.signature_names()
        if signature_name not in names:
            raise no_signature(self.server.description, signature_name, names)
        return self._predictors(signature_name)

    def _predictor(self, signature_name: str) -> RestPredictor:
        signature = self._signature_defs()[signature_name]
        declared = outputs_declared(signature)
        check_outputs(declared, self.server.description)
        return RestPredictor(
            self.server,
            signature_name,
            columnar=self.server.config.request_format == "columnar",
            values_per_instance=values_per_instance(declared),
            input_shapes=input_shapes_of(signature),
            input_types=input_types_of(signature),
        )

    def close(self) -> None:
        self.server.close()
