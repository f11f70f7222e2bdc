"""Small fakes of our own interfaces (Store, ModelProvider, Publisher, Predictor) for the pipeline's unit tests."""

from __future__ import annotations

import codecs
import contextlib
import io
import itertools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from worker import errors
from worker.jobs import Job
from worker.parts import run
from worker.pipeline import Limits, ModelHandle
from worker.serving import BatchRejected
from worker.storage import InputFile
from worker.storage.formats import can_cut_head, owned_lines
from worker.uris import Uri


@dataclass(frozen=True)
class Stored:
    value: Any
    generation: int
    metadata: dict[str, str]


class FakeStore:
    """Objects in a dict, with generations and ifGenerationMatch preconditions as GCS has them."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = dict(objects)  # "bucket/path" -> bytes
        self.generations = {k: 1 for k in objects}
        self.metadata: dict[str, dict[str, str]] = {}
        self._next_generation = itertools.count(2)
        self.lines_before_calls = 0
        self._lock = threading.Lock()

    def list_inputs(self, input_uri: Uri, *, exclude: Uri | None = None) -> list[InputFile]:
        key = f"{input_uri.bucket}/{input_uri.path}"
        if not input_uri.is_prefix:
            if key not in self.objects:
                raise errors.NotFound(f"input {input_uri} does not exist")
            return [
                InputFile(input_uri, input_uri.path.rsplit("/", 1)[-1], len(self.objects[key]), self.generation(key))
            ]
        return [
            InputFile(Uri(input_uri.bucket, k.split("/", 1)[1]), k[len(key) :], len(v), self.generation(k))
            for k, v in sorted(self.objects.items())
            if k.startswith(key)
        ]

    def generation(self, key: str) -> int:
        return self.generations.setdefault(key, 1)

    def read_blocks(self, f: InputFile, *, max_line_bytes: int = 2**30) -> Iterator[list[bytes]]:
        data = self.objects[f"{f.uri.bucket}/{f.uri.path}"]
        if f.piece is not None:  # the lines that begin in its bytes, as Cloud Storage's reads give them
            assert f.end is not None
            first = max(0, f.start - 1)
            data = b"".join(owned_lines(iter([data[first:]]), first, f.start, f.end))
        if f.start == 0:  # a UTF-8 byte order mark goes, as Cloud Storage's reads take it
            data = data.removeprefix(codecs.BOM_UTF8)
        yield data.splitlines()

    def read_data(self, f: InputFile) -> Iterator[bytes]:
        data = self.objects[f"{f.uri.bucket}/{f.uri.path}"]
        yield data[f.start :]

    def can_cut(self, f: InputFile, read_as: str) -> bool:
        return can_cut_head(self.objects[f"{f.uri.bucket}/{f.uri.path}"][:16], read_as)

    def lines_before(self, f: InputFile) -> int:
        self.lines_before_calls += 1
        return self.objects[f"{f.uri.bucket}/{f.uri.path}"][: f.start - 1].count(b"\n") + 1 if f.start else 0

    def names_under(self, prefix: Uri) -> set[str]:
        key = f"{prefix.bucket}/{prefix.path}"
        return {k.split("/", 1)[1] for k in self.objects if k.startswith(key)}

    def compose(self, sources: list[Uri], uri: Uri, *, scratch: Uri, job_id: str, content_type: str) -> None:
        """As Cloud Storage composes with deleteSourceObjects: the sources go."""
        if gone := [s for s in sources if f"{s.bucket}/{s.path}" not in self.objects]:
            raise errors.NotFound(f"composing {uri}: {gone[0]} does not exist")
        key = f"{uri.bucket}/{uri.path}"
        self.objects[key] = b"".join(self.objects.pop(f"{s.bucket}/{s.path}") for s in sources)
        self.metadata[key] = {"embedded-tf-job": job_id}

    def written_by(self, uri: Uri) -> str | None:
        key = f"{uri.bucket}/{uri.path}"
        return self.metadata.get(key, {}).get("embedded-tf-job") if key in self.objects else None

    @contextlib.contextmanager
    def open_output(self, uri: Uri, *, job_id: str, content_type: str) -> Iterator[io.BytesIO]:
        buf = io.BytesIO()
        yield buf
        self.objects[f"{uri.bucket}/{uri.path}"] = buf.getvalue()

    def write_json(self, uri: Uri, value: Any, *, job_id: str, if_generation_match: int | None = None) -> int:
        key = f"{uri.bucket}/{uri.path}"
        with self._lock:
            if if_generation_match is not None and self.generations.get(key, 0) != if_generation_match:
                raise errors.Conflict(f"writing {uri}: precondition failed")
            self.objects.pop(key, None)  # a new generation is a new object: it goes last
            self.objects[key] = json.dumps(value).encode()
            self.generations[key] = next(self._next_generation)
            self.metadata[key] = {}
            return self.generations[key]

    def read_json(self, uri: Uri) -> Stored | None:
        key = f"{uri.bucket}/{uri.path}"
        with self._lock:
            if key not in self.objects:
                return None
            return Stored(json.loads(self.objects[key]), self.generations[key], dict(self.metadata.get(key, {})))

    def mark(self, uri: Uri, key: str, value: str) -> None:
        self.metadata.setdefault(f"{uri.bucket}/{uri.path}", {})[key] = value

    def delete(self, uri: Uri, *, if_generation_match: int | None = None) -> None:
        key = f"{uri.bucket}/{uri.path}"
        with self._lock:
            if if_generation_match is not None and self.generations.get(key, 0) != if_generation_match:
                raise errors.Conflict(f"deleting {uri}: precondition failed")
            self.objects.pop(key, None)
            self.generations.pop(key, None)

    def lines(self, key: str) -> list[Any]:
        return [json.loads(line) for line in self.objects[key].splitlines()]


class SumPredictor:
    """Predicts sum(instance); rejects any batch holding a non-list (like a 400 from the model)."""

    values_per_instance: int | None = 1
    most_per_call: int | None = None

    def __init__(self) -> None:
        self.calls: list[int] = []

    def predict(self, instances: list[Any]) -> list[Any]:
        self.calls.append(len(instances))
        if any(not isinstance(i, list) for i in instances):
            raise BatchRejected("instances must be lists")
        return [sum(i) for i in instances]


class FakeModels:
    def __init__(self, predictor: SumPredictor) -> None:
        self.predictor_ = predictor

    @contextlib.contextmanager
    def load(self, model: Uri) -> Iterator[ModelHandle]:
        outer = self

        class Loaded:
            def predictor(self, signature_name: str) -> SumPredictor:
                return outer.predictor_

        yield ModelHandle(model, 1, Loaded())


class Published:
    def __init__(self) -> None:
        self.messages: list[tuple[dict[str, Any], dict[str, str]]] = []

    def publish(self, data: bytes, attributes: dict[str, str]) -> None:
        self.messages.append((json.loads(data), attributes))


def make_job(options: dict[str, Any] | None = None, job_id: str = "j1", inp: str = "gs://bkt/in/") -> Job:
    return Job.from_mapping(
        {"model": "gs://mdl/model/", "input": inp, "output": "gs://bkt/out/", "options": options or {}},
        default_job_id=job_id,
    )


def run_job(store: FakeStore, job: Job, predictor: SumPredictor | None = None, batch_size: int = 4):
    pub = Published()
    outcome = run(
        job, store=store, models=FakeModels(predictor or SumPredictor()), publisher=pub, limits=Limits(batch_size)
    )
    return outcome, pub
