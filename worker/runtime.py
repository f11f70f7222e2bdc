"""The one room behind every door (event handler, HTTP handler, CLI): builds the collaborators
from `Settings` once per process and runs jobs and triggers with them."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import posixpath
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from worker import errors, events, logs
from worker.config import Settings
from worker.jobs import MANIFEST_NAME, STATUS_FAILED, Job, Uri, failure, is_upload_part, parse_json_object
from worker.notify import PubSubPublisher
from worker.pipeline import Limits, ModelHandle, Outcome, ProgressFn, Publisher, Store, give_up_part, run
from worker.serving import LoadedModel, ServingStats
from worker.serving.cache import ModelCache
from worker.storage import WRITTEN_BY_KEY, GcsStore, LocalModel, ModelSource

log = logging.getLogger(__name__)

JOB_FILE_SUFFIX = ".job.json"
# Under the output prefix: one manifest per dropped input file, mirroring its path.
MANIFESTS_FOLDER = "_manifests/"


class ModelStore(Protocol):
    def resolve_model(self, model: Uri) -> ModelSource: ...
    def fetch_model(self, source: ModelSource, work_dir: str) -> LocalModel: ...


class JobStore(Store, ModelStore, Protocol):
    """All a runtime needs of storage: `GcsStore`, or `LocalStore` for the command line's local paths."""

    def read_bytes(self, uri: Uri) -> bytes: ...


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


@dataclass
class Runtime:
    settings: Settings
    store: JobStore
    models: StoreModelProvider
    publisher: Publisher | None
    dispatcher: Publisher | None = None  # the jobs topic, for the parts of a job run as parts

    @classmethod
    def from_settings(cls, settings: Settings, *, publish: bool = True, local: bool = False) -> Runtime:
        """The runtime of a process; with `local`, of the command line's run on local paths."""
        store: JobStore
        if local:
            from worker.storage.local import LocalStore

            store = LocalStore()
        else:
            store = GcsStore.from_environment(
                settings.project,
                download_threads=settings.download_threads,
                # A download and an upload per file in flight, model files, leases and manifests.
                concurrent_requests=2 * settings.file_concurrency + settings.download_threads + 4,
                retry_s=settings.storage_retry_seconds,
            )
        stats = ServingStats()
        models = StoreModelProvider(
            store,
            make_loader(settings, stats),
            settings.work_dir,
            max_models=settings.max_models,
            max_disk_bytes=settings.max_model_disk_mb * 2**20,
            stats=stats,
        )
        topic, jobs = settings.results_topic_path, settings.jobs_topic_path
        publisher = PubSubPublisher(topic) if publish and topic else None
        dispatcher = PubSubPublisher(jobs, var="WORKER_JOBS_TOPIC", what="part job") if publish and jobs else None
        return cls(settings, store, models, publisher, dispatcher)

    @property
    def limits(self) -> Limits:
        return Limits(
            batch_size=self.settings.batch_size,
            max_batch_bytes=self.settings.max_batch_bytes,
            max_line_bytes=self.settings.max_line_bytes,
            lease_s=float(self.settings.lease_seconds),
            file_concurrency=self.settings.file_concurrency,
            min_piece_bytes=self.settings.min_piece_bytes,
        )

    def run_job(self, job: Job, *, progress: ProgressFn | None = None) -> Outcome:
        with logs.bound(job_id=job.job_id):
            log.info("starting job %s: %s → %s with model %s", job.job_id, job.input, job.output, job.model)
            outcome = run(
                job,
                store=self.store,
                models=self.models,
                publisher=self.publisher,
                limits=self.limits,
                progress=progress,
                dispatcher=self.dispatcher,
            )
            log.info("serving counters: %s", self.models.stats.snapshot())
            return outcome

    def close(self) -> None:
        """Stop every model server and unload every model (process exit)."""
        self.models.close()

    def handle(self, trigger: events.Trigger) -> Outcome | None:
        """Run what a trigger asks for; None when there is nothing to do."""
        if isinstance(trigger, events.Ignored):
            log.info("event ignored: %s", trigger.reason)
            return None
        if isinstance(trigger, events.ObjectTrigger):
            job = self.job_for_object(trigger)
            if job is None:
                return None
        else:
            job = trigger.job
        return self.run_job(job)

    def job_for_object(self, obj: events.ObjectTrigger) -> Job | None:
        """A finalized object as a job: `*.job.json` holds one; any other object is an input file.
        Objects the worker wrote, and anything under the configured output, start nothing."""
        uri = f"gs://{obj.bucket}/{obj.name}"
        if WRITTEN_BY_KEY in obj.metadata or obj.name.endswith("/" + MANIFEST_NAME) or obj.name == MANIFEST_NAME:
            log.info("ignoring %s: written by the worker", uri)
            return None
        default_output = self.settings.default_output
        if default_output and default_output.startswith("gs://"):
            out = Uri.parse(default_output, what="WORKER_OUTPUT").as_prefix()
            if out.bucket == obj.bucket and obj.name.startswith(out.path):
                log.info("ignoring %s: under the output prefix %s", uri, out)
                return None
        if obj.name.endswith("/"):
            return None
        if is_upload_part(obj.name):
            log.info("ignoring %s: a part of a parallel composite upload, not a file", uri)
            return None
        if obj.name.endswith(JOB_FILE_SUFFIX):
            raw = parse_json_object(self.store.read_bytes(Uri(obj.bucket, obj.name)), what=f"job file {uri}")
            return Job.from_mapping(raw, default_job_id=obj.job_id)
        return self._input_file_job(obj, uri)

    def _input_file_job(self, obj: events.ObjectTrigger, uri: str) -> Job | None:
        """A dropped input file: `WORKER_INPUT/a/b.jsonl` → `WORKER_OUTPUT/a/b.jsonl`, or
        `<output metadata>/b.jsonl`; its manifest is `<output>/_manifests/<same path>.json`."""
        settings = self.settings
        inputs = Uri.parse(settings.input_prefix, what="WORKER_INPUT").as_prefix() if settings.input_prefix else None
        if inputs is not None and (obj.bucket != inputs.bucket or not obj.name.startswith(inputs.path)):
            log.info("ignoring %s: not under the input prefix %s (WORKER_INPUT)", uri, inputs)
            return None
        model = obj.metadata.get("model") or settings.default_model
        output = obj.metadata.get("output") or settings.default_output
        if not model or not output:
            raise errors.InvalidJob(
                f"input file {uri} has no `model`/`output` custom metadata and the worker has no "
                "WORKER_MODEL/WORKER_OUTPUT default — set one of them"
            )
        if obj.metadata.get("output"):
            rel = posixpath.basename(obj.name)
        else:
            rel = obj.name[len(inputs.path) :] if inputs is not None else obj.name
        out = Uri.parse(output, what="output").as_prefix()
        folder = posixpath.dirname(rel)
        raw: dict[str, Any] = {"model": model, "input": uri, "output": str(out.child(folder + "/" if folder else ""))}
        if obj.metadata.get("options"):
            raw["options"] = parse_json_object(obj.metadata["options"], what=f"`options` metadata of {uri}")
        elif settings.default_options:
            raw["options"] = parse_json_object(settings.default_options, what="WORKER_OPTIONS")
        job = Job.from_mapping(raw, default_job_id=obj.job_id)
        return dataclasses.replace(job, manifest=out.child(f"{MANIFESTS_FOLDER}{rel}.json"))

    def report_failure(
        self, job_id: str, error: errors.WorkerError, context: dict[str, Any], *, job: Job | None = None
    ) -> dict[str, Any]:
        """Publish FAILED for an event that never became a runnable job (malformed message), or
        whose job failed transiently on its message's last delivery. The part of a job run as
        parts writes its FAILED manifest instead: the whole job's completion, once the other parts
        are done, says that it failed and why."""
        report = {"job_id": job_id, "status": STATUS_FAILED, "error": failure(error.code, str(error)), **context}
        with logs.bound(job_id=job_id):
            log.error("job failed: %s", error)
            if job is not None and job.options.part is not None:
                give_up_part(job, self.store, self.publisher, report["error"])
            elif self.publisher is not None:
                self.publisher.publish(json.dumps(report).encode(), {"job_id": job_id, "status": STATUS_FAILED})
        return report
