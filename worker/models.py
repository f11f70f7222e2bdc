"""A job's model: its version folder fetched from the store (skipped when an identical copy is on
local disk), room made on disk first, loaded once by the serving backend `WORKER_SERVING` chooses
and kept warm in the model cache between jobs."""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

from worker import errors
from worker.config import Settings
from worker.pipeline import ModelHandle
from worker.serving import LoadedModel, ServingStats
from worker.serving.cache import ModelCache
from worker.storage import LocalModel, ModelSource
from worker.uris import Uri

log = logging.getLogger(__name__)


class ModelStore(Protocol):
    def resolve_model(self, model: Uri) -> ModelSource: ...
    def fetch_model(self, source: ModelSource, work_dir: str) -> LocalModel: ...


class StoreModelProvider:
    """Fetches a model's files (skipped when an identical copy is on disk) and loads it once;
    room is made before a download and the files of a model evicted from the cache are deleted,
    so local disk stays within `max_disk_bytes`."""

    def __init__(
        self,
        store: ModelStore,
        load: Callable[[str, str], LoadedModel],
        work_dir: str,
        *,
        max_models: int = 2,
        max_disk_bytes: int | None = None,
        stats: ServingStats | None = None,
    ) -> None:
        self._store = store
        self._cache = ModelCache(
            load, max_models=max_models, max_bytes=max_disk_bytes, stats=stats, on_evict=self._delete_files
        )
        self._max_disk_bytes = max_disk_bytes
        self._work_dir = work_dir
        # Held from "is it on disk?" until the cache holds it, and while evicted files are deleted.
        self._disk_lock = threading.RLock()

    @property
    def stats(self) -> ServingStats:
        return self._cache.stats

    @contextlib.contextmanager
    def load(self, model: Uri) -> Iterator[ModelHandle]:
        with contextlib.ExitStack() as stack:
            with self._disk_lock:
                source = self._store.resolve_model(model)
                limit = self._max_disk_bytes
                if limit is not None and source.size > limit:
                    raise errors.ModelError(
                        f"model {source.folder} takes {source.size / 2**20:.1f} MiB, more than the "
                        f"{limit / 2**20:.0f} MiB of local disk WORKER_MAX_MODEL_DISK_MB allows — raise it "
                        "(on Cloud Run local files live in memory: raise the memory limit with it)"
                    )
                self._cache.make_room(source.fingerprint, source.size)
                local = self._store.fetch_model(source, self._work_dir)
                if local.downloaded:
                    self.stats.add("downloads")
                loaded = stack.enter_context(
                    self._cache.use(local.fingerprint, local.path, str(local.uri), size=source.size)
                )
            yield ModelHandle(local.uri, local.version, loaded)

    @property
    def local_bytes(self) -> int:
        return self._cache.local_bytes

    def _delete_files(self, path: str) -> None:
        with self._disk_lock:
            if self._cache.holds(path):
                return  # the same model was fetched again while its evicted copy was in use
            shutil.rmtree(path, ignore_errors=True)
            log.info("deleted local model files %s", path)

    def close(self) -> None:
        """Stop every model server and unload every model (process exit)."""
        self._cache.close_all()


def make_loader(settings: Settings, stats: ServingStats) -> Callable[[str, str], LoadedModel]:
    """The backend `WORKER_SERVING` chooses: TF Serving as a child process, or in-process TensorFlow."""
    from worker.serving.tfserving import ServerConfig, TFServingModel

    config = ServerConfig(
        command=settings.model_server,
        extra_args=settings.model_server_args,
        request_format=settings.request_format,
        start_timeout_s=float(settings.server_start_seconds),
        predict_timeout_s=float(settings.predict_timeout_seconds),
        work_dir=settings.work_dir,
    )
    serving = settings.serving
    if serving == "auto":
        serving = "tfserving" if config.available() else "tensorflow"
        log.info("WORKER_SERVING=auto: using %s", serving)
    if serving == "tfserving":

        def load_tfserving(path: str, description: str) -> LoadedModel:
            return TFServingModel.start(
                config, path, description=description, on_start=lambda: stats.add("server_starts")
            )

        return load_tfserving

    def load_tensorflow(path: str, description: str) -> LoadedModel:
        from worker.serving.tf_backend import TensorFlowModel

        return TensorFlowModel(path, description=description)

    return load_tensorflow
