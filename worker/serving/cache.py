"""Keeps loaded models between jobs: one load per model fingerprint, least recently used evicted."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

from worker.serving import LoadedModel

log = logging.getLogger(__name__)


class ModelCache:
    def __init__(self, load: Callable[[str, str], LoadedModel], *, max_models: int = 2) -> None:
        self._load = load  # (local path, description) -> LoadedModel
        self._max = max_models
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._key_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, fingerprint: str, path: str, description: str) -> LoadedModel:
        with self._lock:
            if fingerprint in self._models:
                self._models.move_to_end(fingerprint)
                return self._models[fingerprint]
            key_lock = self._key_locks.setdefault(fingerprint, threading.Lock())
        # Load outside the cache lock so other models stay usable, but only once per model.
        with key_lock:
            with self._lock:
                if fingerprint in self._models:
                    return self._models[fingerprint]
            log.info("loading model %s", description)
            model = self._load(path, description)
            with self._lock:
                self._models[fingerprint] = model
                while len(self._models) > self._max:
                    evicted, _ = self._models.popitem(last=False)
                    self._key_locks.pop(evicted, None)
                    log.info("evicted model %s from memory", evicted)
            return model
