"""Keeps loaded models (or their running servers) between jobs: one load per model fingerprint,
bounded in number, least recently used evicted — but only closed once no job uses it."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from worker.serving import LoadedModel, ServingStats

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    model: LoadedModel
    path: str
    users: int = 0
    evicted: bool = False


class ModelCache:
    def __init__(
        self,
        load: Callable[[str, str], LoadedModel],
        *,
        max_models: int = 2,
        stats: ServingStats | None = None,
        on_evict: Callable[[str], None] | None = None,
    ) -> None:
        self._load = load  # (local path, description) -> LoadedModel
        self._max = max_models
        self.stats = stats or ServingStats()
        self._on_evict = on_evict  # (local path) -> None, once the evicted model is closed
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._key_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def use(self, fingerprint: str, path: str, description: str) -> Iterator[LoadedModel]:
        """The loaded model for the duration of the block (it is not closed while in use)."""
        entry = self._acquire(fingerprint, path, description)
        try:
            yield entry.model
        finally:
            with self._lock:
                entry.users -= 1
                close = entry.evicted and entry.users == 0
            if close:
                self._close(entry)

    def _acquire(self, fingerprint: str, path: str, description: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(fingerprint)
            if entry is not None:
                self._entries.move_to_end(fingerprint)
                entry.users += 1
                self.stats.add("hits")
                return entry
            key_lock = self._key_locks.setdefault(fingerprint, threading.Lock())
        # Load outside the cache lock so other models stay usable, but only once per model.
        with key_lock:
            with self._lock:
                entry = self._entries.get(fingerprint)
                if entry is not None:
                    entry.users += 1
                    self.stats.add("hits")
                    return entry
            log.info("loading model %s", description)
            model = self._load(path, description)
            self.stats.add("loads")
            to_close = []
            with self._lock:
                entry = self._entries[fingerprint] = _Entry(model, path, users=1)
                while len(self._entries) > self._max:
                    key, old = self._entries.popitem(last=False)
                    self._key_locks.pop(key, None)
                    old.evicted = True
                    self.stats.add("evictions")
                    log.info("evicting model %s (least recently used)", key)
                    if old.users == 0:
                        to_close.append(old)
            for old in to_close:
                self._close(old)
            return entry

    def _close(self, entry: _Entry) -> None:
        close = getattr(entry.model, "close", None)
        if close is not None:
            close()
        if self._on_evict is not None:
            self._on_evict(entry.path)

    def close_all(self) -> None:
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            self._close(entry)
