"""The pipeline with small fakes of our own Store / ModelProvider / Publisher / Predictor."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import errors, pipeline
from worker.jobs import Job, Options, Uri
from worker.pipeline import Limits, ModelHandle, dumps_line, run
from worker.serving import BatchRejected
from worker.storage import InputFile
from worker.storage.formats import _owned_lines


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
            data = b"".join(_owned_lines(iter([data[first:]]), first, f.start, f.end))
        yield data.splitlines()

    def can_cut(self, f: InputFile) -> bool:
        return not self.objects[f"{f.uri.bucket}/{f.uri.path}"].startswith(b"\x1f\x8b")

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


def _job(options: dict[str, Any] | None = None, job_id: str = "j1", inp: str = "gs://bkt/in/") -> Job:
    return Job.from_mapping(
        {"model": "gs://mdl/model/", "input": inp, "output": "gs://bkt/out/", "options": options or {}},
        default_job_id=job_id,
    )


def _run(store: FakeStore, job: Job, predictor: SumPredictor | None = None, batch_size: int = 4):
    pub = Published()
    outcome = run(
        job, store=store, models=FakeModels(predictor or SumPredictor()), publisher=pub, limits=Limits(batch_size)
    )
    return outcome, pub


def test_a_job_none_of_whose_instances_could_be_predicted_fails_with_its_first_error():
    """A CSV file read as JSON lines, say: every line an error line, written (nothing is lost), and
    the job FAILED saying why, not PARTIALLY_SUCCEEDED. A job of blank lines alone has nothing to fail."""
    store = FakeStore({"bkt/in/f.jsonl": b"id,a,b\n1,2,3\n\n4,5,6\n"})
    outcome, pub = _run(store, _job())
    assert outcome.status == "FAILED"
    assert outcome.manifest["totals"] == {"lines": 4, "instances": 3, "predictions": 0, "errors": 3, "skipped": 1}
    assert outcome.manifest["error"]["code"] == "INVALID_ARGUMENT"
    assert outcome.manifest["error"]["message"].startswith(
        "none of the 3 instances could be predicted; the first, line 1 of gs://bkt/in/f.jsonl: line 1 is not valid JSON"
    )
    assert "a row of column names (a CSV header?)" in outcome.manifest["error"]["message"]
    assert len(store.lines("bkt/out/f.jsonl")) == 3
    assert pub.messages == [(outcome.manifest, {"job_id": "j1", "status": "FAILED"})]

    store = FakeStore({"bkt/in/f.jsonl": b"\n  \n"})
    assert _run(store, _job())[0].status == "SUCCEEDED"


def test_one_bad_instance_costs_one_line_and_counts_add_up(caplog):
    lines = [json.dumps([k, 1]) for k in range(10)]
    lines[5] = json.dumps({"bad": True})
    lines.insert(2, "   ")
    lines.insert(7, "{oops")
    store = FakeStore({"bkt/in/f.jsonl": "\n".join(lines).encode()})
    predictor = SumPredictor()
    outcome, pub = _run(store, _job(), predictor)

    assert outcome.status == "PARTIALLY_SUCCEEDED"
    totals = outcome.manifest["totals"]
    assert totals == {"lines": 12, "instances": 11, "predictions": 9, "errors": 2, "skipped": 1}
    assert totals["lines"] == totals["instances"] + totals["skipped"]
    assert totals["instances"] == totals["predictions"] + totals["errors"]
    out = store.lines("bkt/out/f.jsonl")
    assert len(out) == 11
    assert [o.get("prediction") for o in out] == [1, 2, 3, 4, 5, None, None, 7, 8, 9, 10]
    assert out[5]["error"] == {"status": "INVALID_ARGUMENT", "message": "instances must be lists"}
    assert out[6]["error"]["message"].startswith("line 8 is not valid JSON")
    # What to fix, without opening the output: the first error line, in the file and in the job.
    assert outcome.manifest["files"][0]["first_error"] == {"line": 7, "message": "instances must be lists"}
    assert outcome.manifest["first_error"] == {
        "input": "gs://bkt/in/f.jsonl",
        "line": 7,
        "message": "instances must be lists",
    }
    assert (
        "gs://bkt/in/f.jsonl: 2 of 11 instances could not be predicted (error lines in gs://bkt/out/f.jsonl); "
        "the first, line 7: instances must be lists"
    ) in caplog.text
    assert pub.messages == [(outcome.manifest, {"job_id": "j1", "status": "PARTIALLY_SUCCEEDED"})]
    # The manifest is written, and last.
    assert list(store.objects)[-1] == "bkt/out/_manifest.json"


def test_the_jobs_first_error_is_the_first_in_input_order_and_a_clean_job_has_none():
    store = FakeStore({"bkt/in/a.jsonl": b"[1]\n[2]\n", "bkt/in/b.jsonl": b"[1]\n{}\n", "bkt/in/c.jsonl": b"{}\n"})
    outcome, _ = _run(store, _job())
    files = outcome.manifest["files"]
    assert "first_error" not in files[0]
    assert [f.get("first_error") for f in files[1:]] == [
        {"line": 2, "message": "instances must be lists"},
        {"line": 1, "message": "instances must be lists"},
    ]
    assert outcome.manifest["first_error"] == {
        "input": "gs://bkt/in/b.jsonl",
        "line": 2,
        "message": "instances must be lists",
    }
    clean, _ = _run(FakeStore({"bkt/in/a.jsonl": b"[1]\n"}), _job(job_id="j2"))
    assert clean.status == "SUCCEEDED"
    assert "first_error" not in clean.manifest
    assert "first_error" not in clean.manifest["files"][0]


def test_common_slips_in_input_files_say_what_to_fix():
    # A whole TF Serving request on one line, an indented JSON file, CSV rows and a CSV header: each
    # error says what to fix.
    lines = [
        json.dumps({"instances": [[1, 2]]}),
        json.dumps({"signature_name": "serving_default", "instances": [[1, 2]]}),
        "{",
        '  "instances": [',
        "]",
        "1, 2.5",
        "a,b",
        json.dumps({"inputs": [1]}),  # many models name their one input "inputs": no hint
        "[1, 2]",
        "  [3, 4],",
        "[3, 4,",
    ]
    store = FakeStore({"bkt/in/f.jsonl": "\n".join(lines).encode()})
    outcome, _ = _run(store, _job())
    out = store.lines("bkt/out/f.jsonl")
    messages = [o.get("error", {}).get("message") for o in out]
    request = (
        ' — this line is a whole TF Serving request ({"instances": […]}): '
        "write each of its instances on a line of its own"
    )
    assert messages[0] == messages[1] == "instances must be lists" + request
    indented = " — is the file indented JSON? Each line must hold one whole instance"
    assert messages[2].startswith("line 3 is not valid JSON: ") and indented in messages[2]
    assert messages[4].startswith("line 5 is not valid JSON: ") and indented in messages[4]
    assert messages[3].startswith("line 4 is not valid JSON: ") and "—" not in messages[3]
    csv = " — comma-separated values (CSV?) make one instance when written as a JSON array: [v1, v2, …]"
    assert messages[5].startswith("line 6 is not valid JSON: ") and messages[5].endswith(csv)
    header = " — a row of column names (a CSV header?): each line of JSON lines is one instance, an array [v1, v2, …]"
    assert messages[6].startswith("line 7 is not valid JSON: ") and header in messages[6]
    assert messages[7] == "instances must be lists"
    assert out[8] == {"instance": [1, 2], "prediction": 3}
    comma = " — remove the comma at its end (instances copied from a JSON array?): nothing separates JSON lines"
    assert messages[9].startswith("line 10 is not valid JSON: ") and messages[9].endswith(comma)
    assert messages[10].startswith("line 11 is not valid JSON: ") and "—" not in messages[10]
    assert outcome.manifest["first_error"]["message"] == messages[0]


def test_a_line_longer_than_the_limit_is_an_error_line_without_being_parsed():
    """A file that is one JSON document (an array of every instance) is a line as long as the file:
    parsed, it would take many times its size in memory. It is an error line saying what to fix;
    the lines around it are predicted."""
    whole = json.dumps([[k, 1] for k in range(200)])
    store = FakeStore({"bkt/in/f.jsonl": "\n".join(["[1, 2]", whole, "[3, 4]"]).encode()})
    predictor = SumPredictor()
    outcome = run(
        _job(), store=store, models=FakeModels(predictor), publisher=None, limits=Limits(4, max_line_bytes=100)
    )
    assert outcome.manifest["totals"] == {"lines": 3, "instances": 3, "predictions": 2, "errors": 1, "skipped": 0}
    out = store.lines("bkt/out/f.jsonl")
    assert [o.get("prediction") for o in out] == [3, None, 7]
    assert out[1]["instance"] == whole[:80] + "…"
    assert out[1]["error"]["message"] == (
        "line 2 is longer than 100 bytes (WORKER_MAX_LINE_BYTES) and was not read — is the file one JSON document "
        "(an array of every instance, say)? Write one instance per line, or raise WORKER_MAX_LINE_BYTES "
        "for instances this large"
    )
    assert predictor.calls == [2]  # the other two lines; the long one never went to the model


@pytest.mark.parametrize(("per", "asked", "expected"), [(1, 8, 8), (30, 8, 3), (30, None, 3), (500, 8, 1)])
def test_a_model_of_large_predictions_gets_batches_whose_predictions_fit_the_bound(per, asked, expected, caplog):
    """A model that predicts an image per instance (its signature says how many values): batches
    of the asked size would hold their predictions many times over as Python values and JSON
    text; they are made smaller, whether the size was the worker's or the job's."""
    caplog.set_level(logging.INFO, logger="worker.pipeline")
    predictor = SumPredictor()
    predictor.values_per_instance = per
    store = FakeStore({"bkt/in/f.jsonl": b"\n".join(b"[%d]" % k for k in range(10))})
    options = {"batch_size": asked} if asked else {}
    limits = Limits(batch_size=8, max_batch_output_values=100)
    outcome = run(_job(options), store=store, models=FakeModels(predictor), publisher=None, limits=limits)
    assert outcome.status == "SUCCEEDED"
    assert max(predictor.calls) == expected
    assert (f"batches of {expected} instances instead of 8" in caplog.text) == (expected != 8)


class MeasuringPredictor(SumPredictor):
    """A model whose outputs do not declare their shapes: it knows how many values it predicts per
    instance once it has predicted one (`measured`), as both backends do; None: never."""

    def __init__(self, measured: int | None) -> None:
        super().__init__()
        self.values_per_instance = None
        self.measured = measured

    def predict(self, instances: list[Any]) -> list[Any]:
        predictions = super().predict(instances)
        if self.measured is not None:
            self.values_per_instance = self.measured
        return predictions


@pytest.mark.parametrize(("measured", "expected"), [(30, [1, 3, 3, 3]), (2, [1, 8, 1]), (None, [1] * 10)])
def test_undeclared_predictions_are_measured_on_one_instance_before_batches_are_sized(measured, expected, caplog):
    """A model whose outputs do not declare their shapes (a fully convolutional one, say): its first
    batch is one instance, and the values that instance's prediction holds size the batches after
    it, as declared shapes do; a model that never tells goes one instance at a time until
    PROBE_BATCHES, then in the batches asked."""
    caplog.set_level(logging.INFO, logger="worker.pipeline")
    predictor = MeasuringPredictor(measured)
    store = FakeStore({"bkt/in/f.jsonl": b"\n".join(b"[%d]" % k for k in range(10))})
    limits = Limits(batch_size=8, max_batch_output_values=100)
    outcome = run(_job(), store=store, models=FakeModels(predictor), publisher=None, limits=limits)
    assert outcome.status == "SUCCEEDED" and outcome.manifest["totals"]["predictions"] == 10
    assert predictor.calls == expected
    assert ("batches of 3 instances instead of 8" in caplog.text) == (measured == 30)
    assert [json.loads(line)["prediction"] for line in store.objects["bkt/out/f.jsonl"].splitlines()] == list(range(10))

    n = pipeline.PROBE_BATCHES + 20
    predictor = MeasuringPredictor(None)
    store = FakeStore({"bkt/in/f.jsonl": b"\n".join(b"[%d]" % k for k in range(n))})
    run(_job(), store=store, models=FakeModels(predictor), publisher=None, limits=limits)
    assert predictor.calls == [1] * pipeline.PROBE_BATCHES + [8, 8, 4]


def test_key_field_and_predictions_format():
    store = FakeStore({"bkt/in/f.jsonl": b'{"id": "a", "v": 1, "w": 2, "z": 9}\n{"v": 3}\n'})
    _run(store, _job({"key_field": "id", "included_fields": ["v", "w"], "instance_type": "array"}))
    assert store.lines("bkt/out/f.jsonl") == [
        {"key": "a", "prediction": 3},
        {"instance": {"v": 3}, "error": {"status": "INVALID_ARGUMENT", "message": "line 2 has no key field 'id'"}},
    ]
    store = FakeStore({"bkt/in/f.jsonl": b"[1, 2]\n{}\n"})
    _run(store, _job({"output_format": "predictions"}))
    assert store.lines("bkt/out/f.jsonl") == [
        3,
        {"error": {"status": "INVALID_ARGUMENT", "message": "instances must be lists"}},
    ]


def test_max_error_ratio_fails_the_job():
    store = FakeStore({"bkt/in/f.jsonl": b"[1]\n{}\n{}\n"})
    outcome, pub = _run(store, _job({"max_error_ratio": 0.5}))
    assert outcome.status == "FAILED"
    assert outcome.manifest["error"]["message"].startswith("2 of 3 instances (66.7%) could not be predicted")
    assert (
        "; the first, line 2 of gs://bkt/in/f.jsonl: instances must be lists — " in outcome.manifest["error"]["message"]
    )
    assert pub.messages[0][1]["status"] == "FAILED"


def test_completed_job_is_skipped_and_not_reported_twice():
    store = FakeStore({"bkt/in/f.jsonl": b"[1]\n"})
    first, pub1 = _run(store, _job())
    second, pub2 = _run(store, _job())
    assert not first.skipped and second.skipped
    assert len(pub1.messages) == 1 and pub2.messages == []
    # A different job id on the same output runs again.
    third, pub3 = _run(store, _job(job_id="j2"))
    assert not third.skipped and len(pub3.messages) == 1


def test_permanent_errors_become_failed_manifests():
    store = FakeStore({})
    outcome, pub = _run(store, _job(inp="gs://bkt/in/missing.jsonl"))
    assert outcome.status == "FAILED"
    assert outcome.manifest["error"] == {
        "code": "NOT_FOUND",
        "message": "input gs://bkt/in/missing.jsonl does not exist",
    }
    assert pub.messages[0][1] == {"job_id": "j1", "status": "FAILED"}


def test_output_overwriting_input_is_refused():
    store = FakeStore({"bkt/out/f.jsonl": b"[1]\n"})
    job = Job.from_mapping(
        {"model": "gs://mdl/x/", "input": "gs://bkt/out/f.jsonl", "output": "gs://bkt/out/"}, default_job_id="j"
    )
    outcome, _ = _run(store, job)
    assert outcome.manifest["error"]["code"] == "INVALID_ARGUMENT"
    assert "would overwrite input" in outcome.manifest["error"]["message"]
    assert store.objects["bkt/out/f.jsonl"] == b"[1]\n"


def test_batches_are_bounded_and_bisection_isolates():
    store = FakeStore({"bkt/in/f.jsonl": "\n".join(json.dumps([k]) for k in range(8)).encode() + b"\n{}\n"})
    predictor = SumPredictor()
    _run(store, _job(), predictor, batch_size=4)
    assert max(predictor.calls) <= 4
    # 4 + 4 good; then the lone bad one. Each batch holds at most batch_size instances.
    assert predictor.calls[:2] == [4, 4]


class VocabularyPredictor(SumPredictor):
    """Like a model with an embedding of 100 ids: refuses a batch holding a larger one."""

    def predict(self, instances: list[Any]) -> list[Any]:
        self.calls.append(len(instances))
        if any(v >= 100 for i in instances for v in i):
            raise BatchRejected("indices[0,0] = 200 is not in [0, 100)")
        return [sum(i) for i in instances]


def test_after_a_batch_mostly_refused_the_next_refused_one_is_isolated_instance_by_instance():
    """Halving a refused batch costs up to 2n - 1 calls when the model refuses all of it (an id
    out of its vocabulary in every line, say): after a batch that was mostly refused, the next
    refused batch goes one instance at a time (n calls); after one with few refusals, in halves."""
    lines = ["[200]"] * 8 + ["[1]"] * 7 + ["[300]"] + ["[2]"] * 7 + ["[400]"]
    store = FakeStore({"bkt/in/f.jsonl": "\n".join(lines).encode()})
    predictor = VocabularyPredictor()
    outcome, _ = _run(store, _job(), predictor, batch_size=8)
    assert outcome.manifest["totals"]["errors"] == 10 and outcome.manifest["totals"]["predictions"] == 14
    assert predictor.calls == [
        *[8, 4, 2, 1, 1, 2, 1, 1, 4, 2, 1, 1, 2, 1, 1],  # all 8 refused, found by halving: 15 calls
        *[8, 1, 1, 1, 1, 1, 1, 1, 1],  # after it, one at a time: 9 calls for 1 refused of 8
        *[8, 4, 4, 2, 2, 1, 1],  # after that, in halves again
    ]


class RectangularPredictor(SumPredictor):
    """Like a model of variable-length inputs behind TF Serving: a batch must be lists of integers,
    all of one length."""

    def predict(self, instances: list[Any]) -> list[Any]:
        self.calls.append(len(instances))
        if any(not isinstance(i, list) or not all(type(v) is int for v in i) for i in instances):
            raise BatchRejected("instances must be lists of integers")
        if len({len(i) for i in instances}) > 1:
            raise BatchRejected("Expecting tensor size: 1 but got: 2")
        return [sum(i) for i in instances]


@pytest.mark.parametrize("output_format", ["results", "predictions"])
@pytest.mark.parametrize("not_json", [False, True])
def test_a_batch_refused_for_its_shapes_is_sent_again_one_shape_at_a_time(output_format, not_json):
    """Instances of several lengths make no rectangular batch: one request per length, not one per
    instance (halving a batch of mixed lengths ends one instance at a time)."""
    instances: list[Any] = [list(range(1 + k % 3)) for k in range(12)]  # lengths 1, 2, 3, 1, 2, 3 …
    instances[4] = [1, "two"]  # of length 2, refused for its values
    instances[9] = "nine"  # a string: a shape of its own
    lines = [json.dumps(i) for i in instances]
    if not_json:  # a batch with a line that is not JSON goes line by line
        lines.append("{oops")
    store = FakeStore({"bkt/in/f.jsonl": "\n".join(lines).encode()})
    predictor = RectangularPredictor()
    outcome, _ = _run(store, _job({"output_format": output_format}), predictor, batch_size=100)

    errors_ = 3 if not_json else 2
    assert outcome.manifest["totals"] == {
        "lines": len(lines), "instances": len(lines), "predictions": 10, "errors": errors_, "skipped": 0
    }  # fmt: skip
    out = store.lines("bkt/out/f.jsonl")
    got = [o.get("prediction") if output_format == "results" else o for o in out[:12]]
    assert [None if isinstance(g, dict) else g for g in got] == [
        None if n in (4, 9) else sum(i) for n, i in enumerate(instances)
    ]
    assert "error" in out[4] and "error" in out[9]
    # The whole batch, once; then each shape in the order it first appears: length 1 (3 of them);
    # length 2 (4, refused for [1, "two"]; its first half of 2 refused and sent one by one, its
    # second half taken); length 3 (4); the string alone (refused).
    assert predictor.calls == [12, 3, 4, 2, 1, 1, 2, 4, 1]


def test_a_model_that_took_a_batch_one_shape_at_a_time_gets_later_batches_so_without_the_whole_call():
    """A variable-length model refuses every batch of mixed lengths whole: once one went through
    one shape at a time with no refusal, later batches (and later jobs on the same predictor) go
    so straight away. A fixed-shape model that refused one bad instance is not taken for one."""
    instances = [list(range(1 + k % 3)) for k in range(18)]  # lengths 1, 2, 3, 1, 2, 3 …
    store = FakeStore({"bkt/in/f.jsonl": "\n".join(map(json.dumps, instances)).encode()})
    predictor = RectangularPredictor()
    outcome, _ = _run(store, _job(), predictor, batch_size=6)
    assert outcome.status == "SUCCEEDED"
    assert [o["prediction"] for o in store.lines("bkt/out/f.jsonl")] == [sum(i) for i in instances]
    # The first batch whole (refused), then each length; then each length of each later batch.
    assert predictor.calls == [6, 2, 2, 2] + [2, 2, 2] * 2
    predictor.calls.clear()
    _run(FakeStore({"bkt/in/f.jsonl": b"[1]\n[1, 2]\n[3]\n"}), _job(job_id="j2"), predictor, batch_size=6)
    assert predictor.calls == [2, 1]  # a later job: no whole-batch call
    fixed = SumPredictor()  # refuses the object, takes the lists
    _run(FakeStore({"bkt/in/f.jsonl": b"[1]\n{}\n[2]\n[3]\n[4]\n[5]\n"}), _job(job_id="j3"), fixed, batch_size=3)
    assert fixed.calls == [3, 2, 1, 3]  # the second batch whole, as the first


class PairPredictor(SumPredictor):
    """Like the in-process backend on a model of pairs: a batch of one shape that is not a pair is
    refused for that shape, which each of its instances has (`each`)."""

    def predict(self, instances: list[Any]) -> list[Any]:
        self.calls.append(len(instances))
        lengths = {len(i) for i in instances}
        if len(lengths) > 1:
            raise BatchRejected("instances are not rectangular arrays")
        if lengths != {2}:
            raise BatchRejected(f"expects instances of shape [2], got [{lengths.pop()}]", each=True)
        return [sum(i) for i in instances]


@pytest.mark.parametrize("output_format", ["results", "predictions"])
def test_instances_each_refused_for_the_same_reason_are_error_lines_without_more_calls(output_format):
    """A file of instances all of the wrong shape costs one call per batch, not one per instance
    and as many again for halving; in a batch of mixed shapes, one call per shape."""
    wrong = [[k, k, k] for k in range(10)]
    mixed = [[1, 2], [1, 2, 3], [3, 4], [4, 5, 6]]
    store = FakeStore(
        {
            "bkt/in/a.jsonl": "\n".join(map(json.dumps, wrong)).encode(),
            "bkt/in/b.jsonl": "\n".join(map(json.dumps, mixed)).encode(),
        }
    )
    predictor = PairPredictor()
    job = _job({"output_format": output_format})
    outcome = run(
        job, store=store, models=FakeModels(predictor), publisher=None, limits=Limits(100, file_concurrency=1)
    )

    assert predictor.calls == [10, 4, 2, 2]  # the wrong file once; the mixed one whole, then by shape
    assert [f["errors"] for f in outcome.manifest["files"]] == [10, 2]
    error = {"status": "INVALID_ARGUMENT", "message": "expects instances of shape [2], got [3]"}
    a, b = store.lines("bkt/out/a.jsonl"), store.lines("bkt/out/b.jsonl")
    if output_format == "results":
        assert a == [{"instance": i, "error": error} for i in wrong]
        assert [o.get("prediction", o.get("error")) for o in b] == [3, error, 7, error]
    else:
        assert a == [{"error": error}] * 10
        assert b == [3, {"error": error}, 7, {"error": error}]


def test_non_finite_numbers_are_written_as_strict_json():
    line = dumps_line({"instance": [float("nan")], "prediction": [float("inf"), -float("inf"), 1.5]})
    assert line == b'{"instance":["NaN"],"prediction":["Infinity","-Infinity",1.5]}'
    json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in output"))


def test_options_reject_unknown_and_bad_values():
    with pytest.raises(errors.InvalidJob, match="unknown option"):
        Options.parse({"nope": 1})
    with pytest.raises(errors.InvalidJob, match="batch_size must be an integer"):
        Options.parse({"batch_size": 0})
    with pytest.raises(errors.InvalidJob, match="needs included_fields"):
        Options.parse({"instance_type": "array"})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"options": {"batch_size": "64"}}, 'option batch_size must be an integer from 1 to 100000, got "64"'),
        ({"options": {"max_error_ratio": True}}, "option max_error_ratio must be a number from 0 to 1, got true"),
        (
            {"options": {"key_field": None, "signature_name": 5}},
            "option signature_name must be a non-empty string, got 5",
        ),
        ({"options": [1]}, "options must be a JSON object, got array"),
        ({"job_id": 7}, "job_id must be a non-empty string, got 7"),
        ({"model": ["gs://mdl/"]}, 'model must be a gs:// URI string, got ["gs://mdl/"]'),
    ],
)
def test_a_bad_job_field_is_quoted_as_json_as_it_was_sent(raw, message):
    """The values in a job's error messages are written as the JSON that was sent (null, true,
    "64"), not as Python writes them (None, True, '64')."""
    job = {"model": "gs://mdl/", "input": "gs://bkt/in.jsonl", "output": "gs://out/", **raw}
    with pytest.raises(errors.InvalidJob) as refused:
        Job.from_mapping(job, default_job_id="j")
    assert str(refused.value) == message


class FlakyPublisher(Published):
    """Fails its first `failures` publishes the way Pub/Sub being down does."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def publish(self, data: bytes, attributes: dict[str, str]) -> None:
        if self.failures:
            self.failures -= 1
            raise errors.TransientError("publishing: Pub/Sub unavailable")
        super().publish(data, attributes)


def test_completion_lost_to_a_failed_publish_is_sent_on_redelivery_once():
    store = FakeStore({"bkt/in/f.jsonl": b"[1]\n[2]\n"})
    models = FakeModels(SumPredictor())
    flaky = FlakyPublisher(failures=1)
    with pytest.raises(errors.TransientError):
        run(_job(), store=store, models=models, publisher=flaky, limits=Limits())
    assert "bkt/out/_manifest.json" in store.objects and flaky.messages == []
    assert "bkt/out/_manifest.json.lease" not in store.objects  # released although the job raised

    calls_before = list(models.predictor_.calls)
    redelivered = run(_job(), store=store, models=models, publisher=flaky, limits=Limits())
    assert redelivered.skipped and models.predictor_.calls == calls_before  # nothing recomputed
    assert [m[1] for m in flaky.messages] == [{"job_id": "j1", "status": "SUCCEEDED"}]
    assert flaky.messages[0][0]["totals"]["predictions"] == 2

    again = run(_job(), store=store, models=models, publisher=flaky, limits=Limits())
    assert again.skipped and len(flaky.messages) == 1


class RawPublished(Published):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def publish(self, data: bytes, attributes: dict[str, str]) -> None:
        self.sizes.append(len(data))
        super().publish(data, attributes)


def test_a_completion_too_big_for_pubsub_lists_the_files_that_fit_and_how_many_it_leaves_out(monkeypatch):
    """Pub/Sub refuses messages over 10 MB, which a manifest reaches at some 40,000 files (the client
    library raised MessageTooLargeError, and the job that had succeeded was reported FAILED as an
    internal error); subscribers' clients refuse over 4 MiB by default. The message is kept under
    COMPLETION_MAX_BYTES."""
    store = FakeStore({f"bkt/in/part-{k:04d}.jsonl": b"[1]\n" for k in range(300)})
    small = RawPublished()
    run(_job(), store=store, models=FakeModels(SumPredictor()), publisher=small, limits=Limits())
    manifest = json.loads(store.objects["bkt/out/_manifest.json"])
    assert small.messages[0][0] == manifest and "files_omitted" not in manifest  # under the bound: all of it
    assert manifest["manifest"] == "gs://bkt/out/_manifest.json" and len(manifest["files"]) == 300

    bound = small.sizes[0] // 3
    monkeypatch.setattr(pipeline.job, "COMPLETION_MAX_BYTES", bound)
    store = FakeStore({f"bkt/in/part-{k:04d}.jsonl": b"[1]\n" for k in range(300)})
    big = RawPublished()
    run(_job(), store=store, models=FakeModels(SumPredictor()), publisher=big, limits=Limits())
    message, attributes = big.messages[0]
    assert attributes == {"job_id": "j1", "status": "SUCCEEDED"}
    assert bound - 300 < big.sizes[0] <= bound  # as many files as fit
    kept = len(message["files"])
    assert 0 < kept < 300 and message["files_omitted"] == 300 - kept
    assert message["files"] == manifest["files"][:kept]
    assert {
        k: v for k, v in message.items() if k not in ("files", "files_omitted", "timings", "started_at", "finished_at")
    } == {k: v for k, v in manifest.items() if k not in ("files", "timings", "started_at", "finished_at")}
    assert len(json.loads(store.objects["bkt/out/_manifest.json"])["files"]) == 300  # the manifest has them all


def _held_lease(store: FakeStore, job: Job, *, expires_in_s: float) -> None:
    body = {"job_id": job.job_id, "holder": "other-instance/1", "expires_at": time.time() + expires_in_s}
    store.write_json(job.lease_uri, body, job_id=job.job_id)


def test_a_job_running_elsewhere_is_not_started_twice():
    store = FakeStore({"bkt/in/f.jsonl": b"[1]\n"})
    job = _job()
    _held_lease(store, job, expires_in_s=60)
    with pytest.raises(errors.Busy, match="running on other-instance/1"):
        _run(store, job)
    assert "bkt/out/f.jsonl" not in store.objects and "bkt/out/_manifest.json" not in store.objects
    assert "bkt/out/_manifest.json.lease" in store.objects  # the holder's lease is left alone


def test_an_expired_lease_is_taken_over():
    store = FakeStore({"bkt/in/f.jsonl": b"[1]\n"})
    job = _job()
    _held_lease(store, job, expires_in_s=-1)
    outcome, pub = _run(store, job)
    assert outcome.status == "SUCCEEDED" and len(pub.messages) == 1
    assert "bkt/out/_manifest.json.lease" not in store.objects


def test_concurrent_deliveries_run_the_job_once():
    store = FakeStore({"bkt/in/f.jsonl": "\n".join(json.dumps([k]) for k in range(50)).encode()})
    predictor = SumPredictor()
    models = FakeModels(predictor)
    pub = Published()
    results: list[Any] = []

    def deliver() -> None:
        try:
            results.append(run(_job(), store=store, models=models, publisher=pub, limits=Limits(batch_size=1)))
        except errors.Busy as e:
            results.append(e)

    threads = [threading.Thread(target=deliver) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ran = [r for r in results if not isinstance(r, errors.Busy) and not r.skipped]
    assert len(ran) == 1 and len(pub.messages) == 1
    assert sum(predictor.calls) == 50
    # The others were told to retry later, or found the job complete.
    assert all(isinstance(r, errors.Busy) or r.skipped for r in results if r is not ran[0])


class BarrierPredictor(SumPredictor):
    """Each thread's first batch waits until `parties` threads are predicting at once: the job
    can only finish if that many files really are in flight together."""

    def __init__(self, parties: int, fail_on: int | None = None, timeout: float = 10, pause_s: float = 0) -> None:
        super().__init__()
        self._barrier = threading.Barrier(parties, timeout=timeout)
        self._seen = threading.local()
        self._fail_on = fail_on
        self._pause_s = pause_s
        self._lock = threading.Lock()

    def predict(self, instances: list[Any]) -> list[Any]:
        if not getattr(self._seen, "yes", False):
            self._seen.yes = True
            self._barrier.wait()
        if self._fail_on is not None and [self._fail_on] in instances:
            raise errors.ModelError("the model returned 0 predictions for 4 instances")
        time.sleep(self._pause_s)
        with self._lock:
            return super().predict(instances)


def _tree(files: int, lines_per_file: int) -> dict[str, bytes]:
    return {
        f"bkt/in/d{i % 3}/part-{i:02d}.jsonl": "\n".join(json.dumps([i, k]) for k in range(lines_per_file)).encode()
        for i in range(files)
    }


def test_files_run_concurrently_and_the_manifest_keeps_the_input_order():
    store = FakeStore(_tree(12, 30))
    seen: list[Any] = []
    outcome = run(
        _job(),
        store=store,
        models=FakeModels(BarrierPredictor(parties=4)),
        publisher=None,
        limits=Limits(batch_size=4, file_concurrency=4),
        progress=seen.append,
    )
    assert outcome.status == "SUCCEEDED"
    names = sorted(k for k in _tree(12, 30))
    assert [f["input"] for f in outcome.manifest["files"]] == [f"gs://{k}" for k in names]
    assert outcome.manifest["totals"] == {"lines": 360, "instances": 360, "predictions": 360, "errors": 0, "skipped": 0}
    for k in names:
        i = int(k[-8:-6])
        assert [o["prediction"] for o in store.lines(k.replace("/in/", "/out/"))] == [i + n for n in range(30)]
    last = seen[-1]
    assert (last.files_done, last.files, last.lines) == (12, 12, 360)
    assert last.bytes_read >= last.bytes_total == sum(len(v) for v in _tree(12, 30).values())
    assert [p.lines for p in seen] == sorted(p.lines for p in seen)  # one call at a time, never backwards


def test_with_one_file_at_a_time_no_second_file_is_in_flight():
    store = FakeStore(_tree(3, 5))
    predictor = BarrierPredictor(parties=2, timeout=0.5)
    with pytest.raises(threading.BrokenBarrierError):  # two files never predict at the same time
        run(_job(), store=store, models=FakeModels(predictor), publisher=None, limits=Limits(4, file_concurrency=1))


class SlowStore(FakeStore):
    """Each line arrives as a block of its own `block_delay_s` after asking, and an output is
    stored `store_delay_s` after the file is done with it."""

    def __init__(self, objects: dict[str, bytes], *, block_delay_s: float, store_delay_s: float) -> None:
        super().__init__(objects)
        self.block_delay_s, self.store_delay_s = block_delay_s, store_delay_s

    def read_blocks(self, f: InputFile, *, max_line_bytes: int = 2**30) -> Iterator[list[bytes]]:
        for line in super().read_blocks(f).__next__():
            time.sleep(self.block_delay_s)
            yield [line]

    @contextlib.contextmanager
    def open_output(self, uri: Uri, *, job_id: str, content_type: str) -> Iterator[io.BytesIO]:
        with super().open_output(uri, job_id=job_id, content_type=content_type) as buf:
            yield buf
            time.sleep(self.store_delay_s)


def test_the_manifest_says_how_long_files_waited_for_input_and_for_their_outputs(caplog):
    store = SlowStore(_tree(2, 3), block_delay_s=0.02, store_delay_s=0.1)
    limits = Limits(4, file_concurrency=1)
    with caplog.at_level(logging.INFO, logger="worker.pipeline"):
        outcome = run(_job(), store=store, models=FakeModels(SumPredictor()), publisher=None, limits=limits)
    assert outcome.status == "SUCCEEDED"
    timings = outcome.manifest["timings"]
    # Two files of three blocks each, one file at a time: each wait is counted, in its own place,
    # and once (together they fit in the files' time).
    assert timings["input_wait_s"] >= 6 * 0.02
    assert timings["output_wait_s"] >= 2 * 0.1
    assert timings["input_wait_s"] + timings["output_wait_s"] <= timings["predict_s"]
    counts = {"lines", "instances", "predictions", "errors", "skipped"}
    assert set(outcome.manifest["files"][0]) == {"input", "output", *counts}
    # Each file's log line says the same of that file.
    done = [r for r in caplog.records if "for the output to be stored" in r.getMessage()]
    assert len(done) == 2
    for record in done:
        seconds, input_wait, output_wait = record.args[-3:]
        assert input_wait >= 3 * 0.02 and output_wait >= 0.1 and input_wait + output_wait <= seconds


def test_a_failing_file_stops_the_others_and_fails_the_job_with_its_reason():
    objects = _tree(12, 400)
    objects["bkt/in/d0/part-00.jsonl"] = b"[7]\n[666]\n[8]"
    store = FakeStore(objects)
    # The other files take 5 ms a batch (0.5 s a file): far longer than the failure takes to stop them.
    outcome, pub = _run_with(store, BarrierPredictor(parties=4, fail_on=666, pause_s=0.005))
    assert outcome.status == "FAILED"
    assert outcome.manifest["error"] == {
        "code": "FAILED_PRECONDITION",
        "message": "the model returned 0 predictions for 4 instances",
    }
    listed = [f["output"] for f in outcome.manifest["files"]]
    written = sorted(f"gs://{k}" for k in store.objects if k.startswith("bkt/out/") and not k.endswith(".json"))
    assert listed == written  # every output written is in the manifest, in input order; no partial ones
    assert listed == []  # the files in flight stopped at their next batch, the queued ones never started
    assert outcome.manifest["totals"]["lines"] == 400 * len(listed)
    assert pub.messages[0][1]["status"] == "FAILED"


def _run_with(store: FakeStore, predictor: SumPredictor):
    pub = Published()
    outcome = run(_job(), store=store, models=FakeModels(predictor), publisher=pub, limits=Limits(batch_size=4))
    return outcome, pub


class ShortPredictor(SumPredictor):
    """A broken model: one prediction short for every batch."""

    def predict(self, instances: list[Any]) -> list[Any]:
        return super().predict(instances)[:-1]


def test_a_model_answering_too_few_predictions_fails_the_job_and_says_so():
    store = FakeStore({"bkt/in/f.jsonl": b"[1]\n[2]\n[3]"})
    outcome, _ = _run(store, _job(), ShortPredictor())
    assert outcome.status == "FAILED"
    assert outcome.manifest["error"] == {
        "code": "FAILED_PRECONDITION",
        "message": "the model returned 2 predictions for 3 instances; export the model with a batch dimension "
        "first on every output",
    }
    assert "bkt/out/f.jsonl" not in store.objects


class BlockStore(FakeStore):
    """Hands a file's lines over in blocks cut at the given line indexes, as downloaded chunks are."""

    def __init__(self, objects: dict[str, bytes], cuts: list[int]) -> None:
        super().__init__(objects)
        self.cuts = cuts

    def read_blocks(self, f: InputFile, *, max_line_bytes: int = 2**30) -> Iterator[list[bytes]]:
        lines = self.objects[f"{f.uri.bucket}/{f.uri.path}"].split(b"\n")
        edges = sorted({0, len(lines), *(c for c in self.cuts if 0 < c < len(lines))})
        for a, b in itertools.pairwise(edges):
            yield lines[a:b]


class RecordingPredictor(SumPredictor):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[Any]] = []

    def predict(self, instances: list[Any]) -> list[Any]:
        self.batches.append(list(instances))
        return super().predict(instances)


_LINE = st.one_of(
    st.tuples(st.just("ok"), st.integers(0, 40)),  # a valid instance, padded with that many spaces
    st.sampled_from([("blank", ""), ("blank", "  \t"), ("bad", "{oops")]),
)


@settings(max_examples=200, deadline=None)
@given(
    kinds=st.lists(_LINE, max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=6),
    batch_size=st.integers(1, 6),
    max_batch_bytes=st.integers(1, 120),
    output_format=st.sampled_from(["results", "predictions"]),
)
def test_batches_are_cut_by_count_and_bytes_wherever_blocks_end(
    kinds, cuts, batch_size, max_batch_bytes, output_format
):
    lines = []
    for n, (kind, arg) in enumerate(kinds, start=1):
        lines.append(json.dumps([n, 1]) + " " * arg if kind == "ok" else arg)
    store = BlockStore({"bkt/in/f.jsonl": "\n".join(lines).encode()}, cuts)
    predictor = RecordingPredictor()
    limits = Limits(batch_size=batch_size, max_batch_bytes=max_batch_bytes)
    job = _job({"output_format": output_format})
    outcome = run(job, store=store, models=FakeModels(predictor), publisher=Published(), limits=limits)

    # The batches a line-by-line reader makes: lines up to the count, or up to the line reaching the bytes.
    expected: list[list[Any]] = []
    batch: list[str] = []
    for i, line in enumerate(lines, start=1):
        if line.strip():
            batch.append(line)
        if batch and (len(batch) >= batch_size or sum(map(len, batch)) >= max_batch_bytes or i == len(lines)):
            valid = [json.loads(x) for x in batch if x != "{oops"]
            if valid:
                expected.append(valid)
            batch = []
    assert predictor.batches == expected

    shown = [n for n, line in enumerate(lines, start=1) if line.strip()]
    blanks = len(lines) - len(shown)
    totals = outcome.manifest["totals"] if lines else None
    if lines:
        assert totals["lines"] == len(lines) and totals["skipped"] == blanks
        out = store.lines("bkt/out/f.jsonl")
        assert len(out) == len(shown)
        for n, o in zip(shown, out, strict=True):
            if lines[n - 1] == "{oops":
                assert o["error"]["message"].startswith(f"line {n} is not valid JSON")
            elif output_format == "results":
                assert o == {"instance": [n, 1], "prediction": n + 1}
            else:
                assert o == n + 1


_ANY_LINE = st.sampled_from(["ok", "rejected", "bad", "blank"])


@settings(max_examples=200, deadline=None)
@given(
    kinds=st.lists(_ANY_LINE, max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=6),
    batch_size=st.integers(1, 6),
    output_format=st.sampled_from(["results", "predictions"]),
)
def test_every_line_is_answered_in_order_whichever_path_its_batch_takes(kinds, cuts, batch_size, output_format):
    # "rejected" lines are strict JSON the model refuses, so their batch takes the whole-batch path
    # first and is then isolated line by line; "bad" ones are not JSON and never reach the model.
    text = {"ok": "[{n}, 1]", "rejected": '{{"n": {n}}}', "bad": "{{oops", "blank": "  "}
    lines = [text[kind].format(n=n) for n, kind in enumerate(kinds, start=1)]
    store = BlockStore({"bkt/in/f.jsonl": "\n".join(lines).encode()}, cuts)
    outcome, _ = _run(store, _job({"output_format": output_format}), SumPredictor(), batch_size=batch_size)
    if not lines:
        return
    shown = [(n, kind) for n, kind in enumerate(kinds, start=1) if kind != "blank"]
    out = store.lines("bkt/out/f.jsonl")
    assert len(out) == len(shown)
    for (n, kind), o in zip(shown, out, strict=True):
        if kind == "ok":
            assert o == ({"instance": [n, 1], "prediction": n + 1} if output_format == "results" else n + 1)
        elif kind == "rejected":
            assert o["error"] == {"status": "INVALID_ARGUMENT", "message": "instances must be lists"}
        else:
            assert o["error"]["message"].startswith(f"line {n} is not valid JSON")
    totals = outcome.manifest["totals"]
    assert totals["lines"] == len(lines) and totals["skipped"] == kinds.count("blank")
    assert totals["predictions"] == kinds.count("ok")
    assert totals["errors"] == kinds.count("rejected") + kinds.count("bad")


def _parts_of(
    store: FakeStore, options: dict[str, Any], job_id: str = "big", limits: Limits | None = None
) -> tuple[list[Job], Published, Any]:
    """Dispatch a job with `parts`: the part jobs it publishes (as the jobs topic would carry them)."""
    dispatched, pub = Published(), Published()
    limits = limits or Limits(4)
    outcome = run(
        _job(options, job_id=job_id), store=store, models=FakeModels(SumPredictor()), publisher=pub,
        limits=limits, dispatcher=dispatched,
    )  # fmt: skip
    parts = [Job.from_mapping(data, default_job_id="unused") for data, _ in dispatched.messages]
    assert [attrs["job_id"] for _, attrs in dispatched.messages] == [p.job_id for p in parts]
    return parts, pub, outcome


def _run_part(store: FakeStore, part: Job, pub: Published, predictor: SumPredictor | None = None) -> Any:
    return run(part, store=store, models=FakeModels(predictor or SumPredictor()), publisher=pub, limits=Limits(4))


def test_a_job_run_as_parts_shares_its_files_and_the_last_part_completes_it():
    """`parts: 3` over 4 files: the job is published as 3 part jobs, each predicting a share of
    the files by size (the 3 largest first, each to its own part, the 4th to the lightest), none
    of them publishing a completion, until the last one writes the job's manifest, files in input
    order and counts summed, and publishes the job's one completion."""
    sizes = {"a": 5, "b": 1, "c": 3, "d": 2}  # lines per file
    store = FakeStore({f"bkt/in/{n}.jsonl": b"\n".join(b"[%d]" % k for k in range(c)) for n, c in sizes.items()})
    parts, pub, outcome = _parts_of(store, {"parts": 3, "output_format": "predictions"})
    assert outcome.status == "DISPATCHED" and outcome.manifest["parts"] == 3 and outcome.manifest["files"] == 4
    assert [p.job_id for p in parts] == ["big/part-1-of-3", "big/part-2-of-3", "big/part-3-of-3"]
    assert all(p.options.output_format == "predictions" and p.options.parts is None for p in parts)
    assert pub.messages == [] and "bkt/out/_manifest.json" not in store.objects

    counts = []
    for part in (parts[2], parts[0], parts[1]):  # in any order
        done = _run_part(store, part, pub)
        counts.append([f["input"].rsplit("/", 1)[1] for f in done.manifest["files"]])
        assert done.manifest["job_id"] == part.job_id and str(part.manifest_uri).startswith("gs://bkt/out/_parts/")
    assert counts == [["b.jsonl", "d.jsonl"], ["a.jsonl"], ["c.jsonl"]]  # parts 3, 1, 2
    [(manifest, attrs)] = pub.messages
    assert attrs == {"job_id": "big", "status": "SUCCEEDED"}
    assert manifest == json.loads(store.objects["bkt/out/_manifest.json"])
    assert manifest["totals"] == {"lines": 11, "instances": 11, "predictions": 11, "errors": 0, "skipped": 0}
    assert [f["input"] for f in manifest["files"]] == [f"gs://bkt/in/{n}.jsonl" for n in "abcd"]
    assert manifest["options"] == {"output_format": "predictions", "parts": 3}
    assert [p["status"] for p in manifest["parts"]] == ["SUCCEEDED"] * 3
    assert store.lines("bkt/out/a.jsonl") == [0, 1, 2, 3, 4]

    # Delivered again: a part and the job itself are skipped; no second completion.
    _run_part(store, parts[0], pub)
    again, _, _ = _parts_of(store, {"parts": 3, "output_format": "predictions"})
    assert again == [] and len(pub.messages) == 1


def test_the_parts_predict_the_files_shared_at_dispatch_whatever_the_input_holds_when_they_run(
    caplog: pytest.LogCaptureFixture,
):
    """The dispatch keeps each part's files: a file added to the input after it (which would move
    the shares) is in no part, and no file is predicted by two parts or by none; a file deleted
    after it is left out by its part, which says so. Sent again, the job keeps those shares."""
    sizes = {"a": 5, "b": 1, "c": 3, "d": 2}  # lines per file (19, 3, 11 and 7 bytes): parts a and b+c+d
    store = FakeStore({f"bkt/in/{n}.jsonl": b"\n".join(b"[%d]" % k for k in range(c)) for n, c in sizes.items()})
    parts, pub, outcome = _parts_of(store, {"parts": 2})
    assert outcome.manifest["files"] == 4
    assert json.loads(store.objects["bkt/out/_parts/files-of-2.json"]) == {
        "job_id": "big",
        "input": "gs://bkt/in/",
        "shares": [["a.jsonl"], ["b.jsonl", "c.jsonl", "d.jsonl"]],
    }
    assert _run_part(store, parts[0], pub).manifest["totals"]["instances"] == 5
    # A large file added: shared now, it would go to part 1 and a.jsonl to part 2 (a second time).
    store.objects["bkt/in/e.jsonl"] = b"\n".join(b"[%d]" % k for k in range(10))
    now = pipeline.fanout.share(store.list_inputs(Uri("bkt", "in/")), 2, 2)
    assert [f.rel for f in now] == ["a.jsonl", "b.jsonl", "c.jsonl", "d.jsonl"]
    del store.objects["bkt/in/d.jsonl"]
    with caplog.at_level(logging.WARNING, logger="worker.fanout"):
        done = _run_part(store, parts[1], pub)
    assert [f["input"] for f in done.manifest["files"]] == ["gs://bkt/in/b.jsonl", "gs://bkt/in/c.jsonl"]
    assert "big/part-2-of-2: 1 of its 3 files were deleted after the job was dispatched (d.jsonl)" in caplog.text
    [(manifest, attrs)] = pub.messages
    assert attrs == {"job_id": "big", "status": "SUCCEEDED"}
    assert [f["input"] for f in manifest["files"]] == [f"gs://bkt/in/{n}.jsonl" for n in "abc"]
    assert manifest["totals"]["instances"] == 9 and "bkt/out/e.jsonl" not in store.objects

    # Failed, then sent again with the input changed: the parts keep their files.
    store.write_json(Uri("bkt", "out/_manifest.json"), {**manifest, "status": "FAILED"}, job_id="big")
    store.write_json(Uri("bkt", "out/_parts/part-2-of-2.json"), {**done.manifest, "status": "FAILED"}, job_id="x")
    store.objects["bkt/in/d.jsonl"] = b"[1]"
    parts, pub, outcome = _parts_of(store, {"parts": 2})
    assert outcome.manifest["files"] == 4
    assert _run_part(store, parts[0], pub).skipped
    done = _run_part(store, parts[1], pub)
    assert [f["input"] for f in done.manifest["files"]] == [f"gs://bkt/in/{n}.jsonl" for n in "bcd"]
    [(manifest, _)] = pub.messages
    assert [f["input"] for f in manifest["files"]] == [f"gs://bkt/in/{n}.jsonl" for n in "abcd"]


def test_a_file_larger_than_a_parts_share_is_cut_into_pieces_the_parts_share_and_the_last_joins():
    """`parts: 3` over one large file and a small one: the large one is cut at line starts into 3
    pieces (each about a part's share of the bytes), the parts predict a piece each (and the small
    file), and the last to finish joins the pieces into the file's output: the same bytes as the
    job run whole, error lines numbered as in the file, one entry for the file in the manifest,
    the pieces removed. The file's lines before a piece are counted only for a piece with errors."""
    lines = [b"[%d]" % k for k in range(30)]
    lines[16], lines[28] = b"{not json", b"[oops"
    objects = {"bkt/in/big.jsonl": b"\n".join(lines) + b"\n", "bkt/in/small.jsonl": b"[7]"}
    alone = FakeStore(objects)
    whole, _ = _run(alone, _job(job_id="whole"))

    store = FakeStore(objects)
    parts, pub, outcome = _parts_of(store, {"parts": 3}, limits=Limits(4, min_piece_bytes=10))
    assert outcome.manifest["parts"] == 3 and outcome.manifest["files"] == 2
    shares = json.loads(store.objects["bkt/out/_parts/files-of-3.json"])["shares"]
    size = len(objects["bkt/in/big.jsonl"])
    assert sorted((c["piece"], c["bytes"]) for s in shares for c in s if isinstance(c, dict)) == [
        ([1, 3], [0, size // 3]), ([2, 3], [size // 3, 2 * size // 3]), ([3, 3], [2 * size // 3, size])
    ]  # fmt: skip
    assert sum(c == "small.jsonl" for s in shares for c in s) == 1
    for part in (parts[2], parts[0], parts[1]):
        done = _run_part(store, part, pub)
        assert all(f["output"] == "gs://bkt/out/big.jsonl" for f in done.manifest["files"] if "piece" in f)
    [(manifest, attrs)] = pub.messages
    assert attrs == {"job_id": "big", "status": "PARTIALLY_SUCCEEDED"}
    assert manifest["totals"] == whole.manifest["totals"]
    assert manifest["files"][0] == {**whole.manifest["files"][0], "pieces": 3}
    assert manifest["first_error"] == whole.manifest["first_error"]
    assert manifest["first_error"]["line"] == 17
    assert store.objects["bkt/out/big.jsonl"] == alone.objects["bkt/out/big.jsonl"]
    assert [k for k in store.objects if k.startswith("bkt/out/_parts/pieces/")] == []
    assert store.lines_before_calls == 2  # once for each piece with error lines that does not begin the file

    # A part delivered again once the pieces are joined and removed: skipped, nothing published.
    assert _run_part(store, parts[0], pub).skipped and len(pub.messages) == 1


@pytest.mark.parametrize(
    "kept",
    [
        {"rel": "a", "piece": ["x", 2], "bytes": [0, 5], "generation": 3},
        {"rel": "a", "piece": [3, 2], "bytes": [0, 5], "generation": 3},
        {"rel": "a", "piece": [1, 2, 3], "bytes": [0, 5], "generation": 3},
        {"rel": "a", "piece": [1, 2], "bytes": [5, 0], "generation": 3},
        {"rel": "a", "piece": [1, 2], "bytes": [0, 5]},
        5,
    ],
)
def test_shares_kept_with_a_piece_that_makes_no_sense_are_not_taken_as_this_jobs(kept: Any) -> None:
    whole = _job({"parts": 2}, job_id="big")
    good = {"rel": "b", "piece": [1, 2], "bytes": [0, 5], "generation": 3}
    value = {"job_id": "big", "input": "gs://bkt/in/", "shares": [[good], ["c"]]}
    assert pipeline.fanout._shares(value, whole, 2) == [
        [pipeline.fanout.Cut("b", 5, 3, (1, 2), 0, 5)],
        [pipeline.fanout.Cut("c", 0)],
    ]
    assert pipeline.fanout._shares({**value, "shares": [[good], [kept]]}, whole, 2) is None


def test_pieces_joined_before_the_jobs_manifest_could_be_written_count_as_joined_when_it_is_retried():
    """Cloud Storage deletes the pieces as it joins them: when writing the job's manifest then fails
    (a transient error: the part is delivered again), the part sent again finds them gone and the
    output this job's, and completes the job."""

    class ManifestFailsOnce(FakeStore):
        failed = False

        def write_json(self, uri: Uri, value: Any, **kw: Any) -> int:
            if uri.path == "out/_manifest.json" and not self.failed:
                self.failed = True
                raise errors.TransientError("writing gs://bkt/out/_manifest.json: 503")
            return super().write_json(uri, value, **kw)

    lines = b"\n".join(b"[%d]" % k for k in range(40))
    store = ManifestFailsOnce({"bkt/in/big.jsonl": lines})
    parts, pub, _ = _parts_of(store, {"parts": 2}, limits=Limits(4, min_piece_bytes=10))
    _run_part(store, parts[0], pub)
    with pytest.raises(errors.TransientError):
        _run_part(store, parts[1], pub)
    assert [line["prediction"] for line in store.lines("bkt/out/big.jsonl")] == list(range(40))
    assert not [k for k in store.objects if "/pieces/" in k]
    assert _run_part(store, parts[1], pub).skipped  # the part's own manifest was written before
    [(manifest, attrs)] = pub.messages
    assert attrs["status"] == "SUCCEEDED" and manifest["files"][0]["pieces"] == 2


def test_a_large_file_that_cannot_be_read_in_pieces_goes_whole_to_one_part_saying_so(
    caplog: pytest.LogCaptureFixture,
):
    store = FakeStore({"bkt/in/big.jsonl.gz": b"\x1f\x8b" + b"\0" * 100, "bkt/in/small.jsonl": b"[1]"})
    with caplog.at_level(logging.WARNING, logger="worker.fanout"):
        parts, _, outcome = _parts_of(store, {"parts": 3}, limits=Limits(4, min_piece_bytes=10))
    assert len(parts) == 2 and outcome.manifest["files"] == 2
    assert json.loads(store.objects["bkt/out/_parts/files-of-2.json"])["shares"] == [["big.jsonl.gz"], ["small.jsonl"]]
    said = "gs://bkt/in/big.jsonl.gz (102 bytes) is larger than a part's share but is not cut into pieces"
    assert said in caplog.text


def _dropped(rel: str, options: dict[str, Any]) -> Job:
    """The job of a file dropped at in/<rel>, as the runtime makes it: its manifest of its own."""
    job = _job(options, job_id=f"bkt/in/{rel}#1", inp=f"gs://bkt/in/{rel}")
    return dataclasses.replace(job, manifest=Uri("bkt", f"out/_manifests/{rel}.json"))


def test_dropped_files_run_as_parts_keep_their_parts_apart_beside_their_own_manifests():
    """Two large files dropped into one folder, each with `parts: 2` (from WORKER_OPTIONS, say):
    each job is cut, shared and combined in a folder beside its own manifest (the output folder,
    and its `_parts/`, is both files'), its part messages carrying where that manifest goes; each
    completes as the file run whole would, and nothing of its parts is left."""
    lines = {rel: [b"[%d]" % k for k in range(first, first + 24)] for rel, first in (("a.jsonl", 0), ("b.jsonl", 50))}
    lines["b.jsonl"][13] = b"{not json"
    objects = {f"bkt/in/{rel}": b"\n".join(ls) + b"\n" for rel, ls in lines.items()}
    alone = FakeStore(objects)
    wholes = {rel: _run(alone, _dropped(rel, {}))[0] for rel in lines}

    store, pub, parts = FakeStore(objects), Published(), {}
    for rel in lines:
        dispatched = Published()
        outcome = run(
            _dropped(rel, {"parts": 2}), store=store, models=FakeModels(SumPredictor()), publisher=pub,
            limits=Limits(4, min_piece_bytes=10), dispatcher=dispatched,
        )  # fmt: skip
        assert outcome.status == "DISPATCHED" and outcome.manifest["manifest"] == f"gs://bkt/out/_manifests/{rel}.json"
        assert [data["manifest"] for data, _ in dispatched.messages] == [outcome.manifest["manifest"]] * 2
        parts[rel] = [Job.from_mapping(data, default_job_id="unused") for data, _ in dispatched.messages]
        shares = json.loads(store.objects[f"bkt/out/_manifests/{rel}.parts/files-of-2.json"])["shares"]
        assert sorted(c["piece"] for s in shares for c in s) == [[1, 2], [2, 2]] and all(len(s) == 1 for s in shares)
    assert not any(k.startswith("bkt/out/_parts/") for k in store.objects)

    for part in (parts["b.jsonl"][1], parts["a.jsonl"][0], parts["b.jsonl"][0], parts["a.jsonl"][1]):
        assert str(part.manifest_uri).startswith(f"gs://bkt/out/_manifests/{part.input.path[3:]}.parts/part-")
        assert _run_part(store, part, pub).status in ("SUCCEEDED", "PARTIALLY_SUCCEEDED")
    completions = {attrs["job_id"]: (manifest, attrs) for manifest, attrs in pub.messages}
    assert sorted(completions) == ["bkt/in/a.jsonl#1", "bkt/in/b.jsonl#1"]
    for rel, whole in wholes.items():
        manifest, attrs = completions[f"bkt/in/{rel}#1"]
        assert attrs["status"] == whole.status
        assert manifest == json.loads(store.objects[f"bkt/out/_manifests/{rel}.json"])
        assert manifest["totals"] == whole.manifest["totals"]
        assert manifest["files"][0] == {**whole.manifest["files"][0], "pieces": 2}
        assert store.objects[f"bkt/out/{rel}"] == alone.objects[f"bkt/out/{rel}"]
    assert completions["bkt/in/b.jsonl#1"][0]["first_error"]["line"] == 14
    assert [k for k in store.objects if ".parts/pieces/" in k] == []


def test_a_dropped_file_too_small_to_cut_is_predicted_in_place_not_sent_as_one_part():
    """`parts` in WORKER_OPTIONS applies to every dropped file: one that makes a single part is
    predicted where it arrived, whole, as without `parts` (no trip through Pub/Sub, no part
    manifest); unless a dispatch of the same job has kept shares before, which its parts use."""
    store = FakeStore({"bkt/in/small.jsonl": b"[1]\n[2]\n", "bkt/in/again.jsonl": b"[3]\n"})
    dispatched, pub = Published(), Published()
    outcome = run(
        _dropped("small.jsonl", {"parts": 4}), store=store, models=FakeModels(SumPredictor()), publisher=pub,
        limits=Limits(4, min_piece_bytes=10), dispatcher=dispatched,
    )  # fmt: skip
    assert dispatched.messages == [] and outcome.status == "SUCCEEDED"
    [(manifest, attrs)] = pub.messages
    assert attrs == {"job_id": "bkt/in/small.jsonl#1", "status": "SUCCEEDED"}
    assert manifest == json.loads(store.objects["bkt/out/_manifests/small.jsonl.json"])
    assert manifest["totals"]["predictions"] == 2 and "parts" not in manifest and "parts" not in manifest["options"]
    assert store.lines("bkt/out/small.jsonl") == [
        {"instance": [1], "prediction": 1},
        {"instance": [2], "prediction": 2},
    ]
    assert not [k for k in store.objects if ".parts/" in k]

    again = _dropped("again.jsonl", {"parts": 4})
    store.write_json(again.parts_folder.child("files-of-1.json"), {}, job_id="earlier")  # dispatched before
    run(again, store=store, models=FakeModels(SumPredictor()), publisher=pub, limits=Limits(4), dispatcher=dispatched)
    [(data, _)] = dispatched.messages
    assert data["options"] == {"part": [1, 1]} and data["manifest"] == "gs://bkt/out/_manifests/again.jsonl.json"


def test_a_part_message_names_a_manifest_only_for_a_part():
    """`manifest` is the worker's, on the parts of a dropped file's job: a job message sent with it
    is refused as any unknown field."""
    raw = {
        "model": "gs://mdl/x/",
        "input": "gs://bkt/in.jsonl",
        "output": "gs://bkt/out/",
        "manifest": "gs://bkt/m.json",
    }
    with pytest.raises(errors.InvalidJob, match="unknown job field\\(s\\) 'manifest'"):
        Job.from_mapping(raw, default_job_id="j")
    part = Job.from_mapping({**raw, "options": json.dumps({"part": [1, 2]})}, default_job_id="j/part-1-of-2")
    assert str(part.manifest_uri) == "gs://bkt/m.parts/part-1-of-2.json"
    assert str(pipeline.fanout.whole_job(part).manifest_uri) == "gs://bkt/m.json"


def test_a_piece_of_a_file_replaced_after_the_dispatch_fails_its_part_and_the_job_saying_so():
    store = FakeStore({"bkt/in/big.jsonl": b"\n".join(b"[%d]" % k for k in range(40))})
    parts, pub, _ = _parts_of(store, {"parts": 2}, limits=Limits(4, min_piece_bytes=10))
    assert _run_part(store, parts[0], pub).status == "SUCCEEDED"
    store.write_json(Uri("bkt", "in/big.jsonl"), [1, 2], job_id="someone")  # a new generation
    assert _run_part(store, parts[1], pub).status == "FAILED"
    [(manifest, attrs)] = pub.messages
    assert attrs["status"] == "FAILED"
    assert manifest["error"]["message"].startswith(
        "part 2 of 2: input gs://bkt/in/big.jsonl was replaced after the job was dispatched, and this part predicts a "
        "piece of it"
    )
    assert "bkt/out/big.jsonl" not in store.objects  # never joined from pieces of two generations


def test_pieces_gone_before_they_are_joined_fail_the_job_unless_another_part_joined_them():
    """A piece removed by hand before the last part joins them: the job FAILED, saying which. Two
    parts combining at once: the one that lost the race to write the job's manifest finds the
    pieces removed by the other as it joins them, and stops there without an error."""
    lines = b"\n".join(b"[%d]" % k for k in range(40))
    store = FakeStore({"bkt/in/big.jsonl": lines})
    parts, pub, _ = _parts_of(store, {"parts": 2}, limits=Limits(4, min_piece_bytes=10))
    _run_part(store, parts[0], pub)
    [piece] = [k for k in store.objects if k.startswith("bkt/out/_parts/pieces/")]
    del store.objects[piece]
    _run_part(store, parts[1], pub)
    [(manifest, attrs)] = pub.messages
    assert attrs["status"] == "FAILED" and manifest["error"]["message"] == (
        f"cannot join the pieces of gs://bkt/out/big.jsonl: its piece gs://{piece} is not there — send the job "
        "again with another job_id"
    )

    class Racing(FakeStore):
        """The other part combines the job while this one composes."""

        def compose(self, sources: list[Uri], uri: Uri, **kw: Any) -> None:
            whole = {**json.loads(self.objects["bkt/out/_parts/part-1-of-2.json"]), "job_id": "big"}
            self.write_json(Uri("bkt", "out/_manifest.json"), {**whole, "status": "SUCCEEDED"}, job_id="big")
            for s in sources:
                del self.objects[f"{s.bucket}/{s.path}"]
            super().compose(sources, uri, **kw)

    store = Racing({"bkt/in/big.jsonl": lines})
    parts, pub, _ = _parts_of(store, {"parts": 2}, limits=Limits(4, min_piece_bytes=10))
    for part in parts:
        assert _run_part(store, part, pub).status == "SUCCEEDED"
    assert pub.messages == []  # the other part published the job's completion


def test_parts_published_without_kept_shares_share_the_input_as_listed_when_they_run(
    caplog: pytest.LogCaptureFixture,
):
    """Parts of a job dispatched before shares were kept (by an earlier version of the worker)."""
    store = FakeStore({"bkt/in/a.jsonl": b"[1]\n[2]", "bkt/in/b.jsonl": b"[3]"})
    parts, pub, _ = _parts_of(store, {"parts": 2})
    del store.objects["bkt/out/_parts/files-of-2.json"]
    with caplog.at_level(logging.WARNING, logger="worker.fanout"):
        assert [len(_run_part(store, part, pub).manifest["files"]) for part in parts] == [1, 1]
    assert "big/part-1-of-2: no shares kept at gs://bkt/out/_parts/files-of-2.json" in caplog.text
    [(manifest, attrs)] = pub.messages
    assert attrs["status"] == "SUCCEEDED" and manifest["totals"]["predictions"] == 3


def test_a_job_run_as_parts_fails_when_a_part_fails_or_errors_exceed_the_ratio():
    """A part that fails (an input it cannot read) fails the whole job, its error naming the part;
    max_error_ratio is the whole job's, not each part's: a part of all errors alone does not fail."""
    store = FakeStore({"bkt/in/a.jsonl": b"[1]\n[2]\n[3]\n[4]", "bkt/in/b.jsonl": b'"x"'})
    parts, pub, _ = _parts_of(store, {"parts": 2, "max_error_ratio": 0.5})
    for part in parts:
        assert _run_part(store, part, pub).status in ("SUCCEEDED", "PARTIALLY_SUCCEEDED")
    [(manifest, attrs)] = pub.messages
    assert attrs["status"] == "PARTIALLY_SUCCEEDED" and manifest["totals"]["errors"] == 1

    store = FakeStore({"bkt/in/a.jsonl": b'"x"\n"y"', "bkt/in/b.jsonl": b"[1]"})
    parts, pub, _ = _parts_of(store, {"parts": 2, "max_error_ratio": 0.5})
    for part in parts:
        _run_part(store, part, pub)
    [(manifest, _)] = pub.messages
    assert manifest["status"] == "FAILED" and "2 of 3 instances (66.7%)" in manifest["error"]["message"]

    class Unreadable(FakeStore):
        def read_blocks(self, f: InputFile, *, max_line_bytes: int = 2**30) -> Iterator[list[bytes]]:
            if f.rel == "b.jsonl":
                raise errors.InvalidJob("input gs://bkt/in/b.jsonl is not gzip")
            yield from super().read_blocks(f, max_line_bytes=max_line_bytes)

    store = Unreadable({"bkt/in/a.jsonl": b"[1]\n[2]", "bkt/in/b.jsonl": b"[2]"})
    parts, pub, _ = _parts_of(store, {"parts": 2})
    assert [_run_part(store, part, pub).status for part in parts] == ["SUCCEEDED", "FAILED"]
    [(manifest, attrs)] = pub.messages
    assert attrs == {"job_id": "big", "status": "FAILED"}
    assert manifest["error"] == {
        "code": "INVALID_ARGUMENT",
        "message": "part 2 of 2: input gs://bkt/in/b.jsonl is not gzip",
    }

    # The file fixed, the job sent again: its FAILED manifest and its failed part's are removed, so
    # the part that succeeded before (skipped now) does not combine the old failure again.
    fixed = FakeStore({})
    fixed.objects, fixed.generations, fixed.metadata = store.objects, store.generations, store.metadata
    parts, pub, _ = _parts_of(fixed, {"parts": 2})
    assert "bkt/out/_manifest.json" not in fixed.objects and "bkt/out/_parts/part-2-of-2.json" not in fixed.objects
    assert [_run_part(fixed, part, pub).status for part in parts] == ["SUCCEEDED", "SUCCEEDED"]
    [(manifest, attrs)] = pub.messages
    assert attrs == {"job_id": "big", "status": "SUCCEEDED"} and manifest["totals"]["predictions"] == 3


def test_a_job_with_parts_needs_the_jobs_topic_and_no_more_parts_than_files():
    store = FakeStore({"bkt/in/a.jsonl": b"[1]", "bkt/in/b.jsonl": b"[2]"})
    pub = Published()
    outcome = run(_job({"parts": 4}), store=store, models=FakeModels(SumPredictor()), publisher=pub, limits=Limits(4))
    assert outcome.status == "FAILED" and outcome.manifest["error"]["message"].endswith(
        "needs the worker's WORKER_JOBS_TOPIC (the topic its job messages come from), to publish the parts to — set "
        "it, or send the job without parts"
    )
    assert pub.messages[0][1]["status"] == "FAILED"
    dropped, _ = _run(store, _dropped("a.jsonl", {"parts": 2}))
    assert dropped.manifest["error"]["message"].endswith(
        "set it, or drop parts from the file's `options` metadata (or from WORKER_OPTIONS)"
    )
    parts, _, outcome = _parts_of(store, {"parts": 4})
    assert len(parts) == 2 and outcome.manifest["parts"] == 2
    # One object as input: one part, which completes the job.
    dispatched, pub = Published(), Published()
    one = _job({"parts": 3}, job_id="one", inp="gs://bkt/in/b.jsonl")
    run(one, store=store, models=FakeModels(SumPredictor()), publisher=pub, limits=Limits(4), dispatcher=dispatched)
    [(data, _)] = dispatched.messages
    assert data["options"] == {"part": [1, 1]} and data["input"] == "gs://bkt/in/b.jsonl"
    _run_part(store, Job.from_mapping(data, default_job_id="unused"), pub)
    [(manifest, attrs)] = pub.messages
    assert attrs == {"job_id": "one", "status": "SUCCEEDED"} and [f["input"] for f in manifest["files"]] == [
        "gs://bkt/in/b.jsonl"
    ]
    with pytest.raises(errors.InvalidJob, match=r"option parts must be an integer from 1 to 100, got 0"):
        _job({"parts": 0})
    with pytest.raises(errors.InvalidJob, match=r"option part must be \[k, n\]"):
        _job({"part": [3, 2]})


def test_the_part_that_combined_a_job_publishes_its_completion_when_delivered_again_after_failing_to():
    """Publishing the whole job's completion fails (transient: the part's message comes again). The
    manifest is written; the part, delivered again, is skipped and publishes the completion then;
    another part delivered again publishes nothing (the combining part answers for it)."""

    class Flaky(Published):
        fail = True

        def publish(self, data: bytes, attributes: dict[str, str]) -> None:
            if self.fail:
                self.fail = False
                raise errors.TransientError("publishing failed")
            super().publish(data, attributes)

    store = FakeStore({"bkt/in/a.jsonl": b"[1]", "bkt/in/b.jsonl": b"[2]\n[3]"})
    parts, _, _ = _parts_of(store, {"parts": 2})
    pub = Flaky()
    _run_part(store, parts[0], pub)
    with pytest.raises(errors.TransientError):
        _run_part(store, parts[1], pub)
    assert "bkt/out/_manifest.json" in store.objects and pub.messages == []
    _run_part(store, parts[0], pub)
    assert pub.messages == []
    _run_part(store, parts[1], pub)
    [(manifest, attrs)] = pub.messages
    assert attrs == {"job_id": "big", "status": "SUCCEEDED"} and manifest["combined_by"] == "big/part-2-of-2"
    _run_part(store, parts[1], pub)
    assert len(pub.messages) == 1


def test_a_part_given_up_on_fails_the_job_and_succeeding_when_sent_again_replaces_that_outcome():
    """A part that fails transiently on its message's last delivery writes its FAILED manifest:
    the whole job completes FAILED, naming it. Sent again from the dead-letter topic, it succeeds
    and the job's outcome becomes SUCCEEDED, with a completion saying so."""
    store = FakeStore({"bkt/in/a.jsonl": b"[1]", "bkt/in/b.jsonl": b"[2]\n[3]"})
    parts, _, _ = _parts_of(store, {"parts": 2})
    pub = Published()
    _run_part(store, parts[0], pub)
    pipeline.give_up_part(parts[1], store, pub, {"code": "UNAVAILABLE", "message": "storage unavailable"})
    [(manifest, attrs)] = pub.messages
    assert attrs == {"job_id": "big", "status": "FAILED"}
    assert manifest["error"] == {"code": "UNAVAILABLE", "message": "part 2 of 2: storage unavailable"}
    _run_part(store, parts[1], pub)
    assert [attrs["status"] for _, attrs in pub.messages] == ["FAILED", "SUCCEEDED"]
    assert json.loads(store.objects["bkt/out/_manifest.json"])["totals"]["predictions"] == 3
    _run_part(store, parts[0], pub)  # delivered again: nothing new
    assert len(pub.messages) == 2
