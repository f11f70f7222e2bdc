"""Keeps loaded models (or their running servers) between jobs: one load per model fingerprint,
bounded in number and in local bytes, least recently used evicted — but only closed (and its
files deleted) once no job uses it."""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from worker.serving import LoadedModel, ServingStats

log = logging.getLogger(__name__)


# Container objects allocated (less those freed) between two collections of the youngest
# generation; Python's default is 700. A batch of 1024 parsed instances alone allocates over a
# thousand lists, so with 8 files in flight each young collection would walk the 8 batches being
# worked on, over and over. Objects without reference cycles are freed by reference counting
# either way; only cyclic garbage waits longer.
YOUNG_COLLECTION_THRESHOLD = 50_000


def settle_collector() -> None:
    """Set the garbage collector for a process holding loaded models.

    Everything alive now (TensorFlow, the loaded models) is taken out of the collector's sight.
    With TensorFlow loaded a process holds about 300,000 tracked objects, and every full
    collection, which batches of parsed instances set off every few seconds, would walk all of
    them with every thread stopped; frozen, they are not walked. What is frozen is still freed by
    reference counting; its reference cycles (a closed model's) wait for the next call, which
    unfreezes and collects everything first. Young collections are spaced out
    (YOUNG_COLLECTION_THRESHOLD)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)


@dataclass
class Entry:
    model: LoadedModel
    path: str
    size: int = 0  # bytes of its local files
    users: int = 0
    evicted: bool = False


class ModelCache:
    def __init__(
        self,
        load: Callable[[str, str], LoadedModel],
        *,
        max_models: int = 2,
        max_bytes: int | None = None,
        stats: ServingStats | None = None,
        on_evict: Callable[[str], None] | None = None,
    ) -> None:
        self._load = load  # (local path, description) -> LoadedModel
        self._max = max_models
        self._max_bytes = max_bytes
        self.stats = stats or ServingStats()
        self._on_evict = on_evict  # (local path) -> None, once the evicted model is closed
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._draining_bytes = 0  # files of evicted models that a running job still uses
        self._key_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._collect_closed = False

    @property
    def local_bytes(self) -> int:
        """Bytes of local model files: the cached models' and those of evicted ones still in use."""
        with self._lock:
            return self._local_bytes()

    def _local_bytes(self) -> int:
        return sum(e.size for e in self._entries.values()) + self._draining_bytes

    def make_room(self, fingerprint: str, size: int) -> None:
        """Before a model that is not cached is downloaded: evict least recently used models until
        one more model, and `size` more bytes, fit the bounds."""
        with self._lock:
            if fingerprint in self._entries:
                return
            to_close = self._evict(incoming=1, incoming_bytes=size)
        for old in to_close:
            self._close(old)

    @contextlib.contextmanager
    def use(self, fingerprint: str, path: str, description: str, *, size: int = 0) -> Iterator[LoadedModel]:
        """The loaded model for the duration of the block (it is not closed while in use)."""
        entry = self._acquire(fingerprint, path, description, size)
        try:
            yield entry.model
        finally:
            with self._lock:
                entry.users -= 1
                close = entry.evicted and entry.users == 0
                if close:
                    self._draining_bytes -= entry.size
            if close:
                self._close(entry)

    def _evict(self, *, incoming: int, incoming_bytes: int) -> list[Entry]:
        """Under the lock: evict least recently used models (never the most recent, which is the
        one being loaded) while the bounds are exceeded; the ones nobody uses are returned to close."""
        to_close = []

        def over() -> bool:
            if len(self._entries) + incoming > self._max:
                return True
            return self._max_bytes is not None and self._local_bytes() + incoming_bytes > self._max_bytes

        while over() and len(self._entries) > 1 - incoming:
            key, old = self._entries.popitem(last=False)
            self._key_locks.pop(key, None)
            old.evicted = True
            self.stats.add("evictions")
            log.info("evicting model %s (least recently used, %d bytes on local disk)", key, old.size)
            if old.users == 0:
                to_close.append(old)
            else:
                self._draining_bytes += old.size
        if over() and self._max_bytes is not None:
            log.warning(
                "local model files take %d bytes, over the bound of %d, until the running jobs "
                "that use evicted models finish",
                self._local_bytes() + incoming_bytes,
                self._max_bytes,
            )
        return to_close

    def _acquire(self, fingerprint: str, path: str, description: str, size: int) -> Entry:
        if self._collect_closed:
            self._collect_closed = False
            settle_collector()
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
            settle_collector()
            self.stats.add("loads")
            with self._lock:
                entry = self._entries[fingerprint] = Entry(model, path, size, users=1)
                to_close = self._evict(incoming=0, incoming_bytes=0)
            for old in to_close:
                self._close(old)
            return entry

    def holds(self, path: str) -> bool:
        """Whether a cached model's files are at `path` (an evicted copy may share it)."""
        with self._lock:
            return any(e.path == path for e in self._entries.values())

    def _close(self, entry: Entry) -> None:
        close = getattr(entry.model, "close", None)
        if close is not None:
            close()
        if self._on_evict is not None:
            self._on_evict(entry.path)
        self._collect_closed = True  # its reference cycles, at the next job's start

    def close_all(self) -> None:
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            self._close(entry)
