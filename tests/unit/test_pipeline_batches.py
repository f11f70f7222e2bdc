"""Batches: sized by count, bytes and predicted values; refused instances isolated, shapes apart."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from tests.unit.fakes import FakeModels, FakeStore, SumPredictor, make_job, run_job
from worker import pipeline
from worker.pipeline import Limits, run
from worker.serving import BatchRejected


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
    outcome = run(make_job(options), store=store, models=FakeModels(predictor), publisher=None, limits=limits)
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
    outcome = run(make_job(), store=store, models=FakeModels(predictor), publisher=None, limits=limits)
    assert outcome.status == "SUCCEEDED" and outcome.manifest["totals"]["predictions"] == 10
    assert predictor.calls == expected
    assert ("batches of 3 instances instead of 8" in caplog.text) == (measured == 30)
    assert [json.loads(line)["prediction"] for line in store.objects["bkt/out/f.jsonl"].splitlines()] == list(range(10))

    n = pipeline.PROBE_BATCHES + 20
    predictor = MeasuringPredictor(None)
    store = FakeStore({"bkt/in/f.jsonl": b"\n".join(b"[%d]" % k for k in range(n))})
    run(make_job(), store=store, models=FakeModels(predictor), publisher=None, limits=limits)
    assert predictor.calls == [1] * pipeline.PROBE_BATCHES + [8, 8, 4]


def test_batches_are_bounded_and_bisection_isolates():
    store = FakeStore({"bkt/in/f.jsonl": "\n".join(json.dumps([k]) for k in range(8)).encode() + b"\n{}\n"})
    predictor = SumPredictor()
    run_job(store, make_job(), predictor, batch_size=4)
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
    outcome, _ = run_job(store, make_job(), predictor, batch_size=8)
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
    outcome, _ = run_job(store, make_job({"output_format": output_format}), predictor, batch_size=100)

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
    outcome, _ = run_job(store, make_job(), predictor, batch_size=6)
    assert outcome.status == "SUCCEEDED"
    assert [o["prediction"] for o in store.lines("bkt/out/f.jsonl")] == [sum(i) for i in instances]
    # The first batch whole (refused), then each length; then each length of each later batch.
    assert predictor.calls == [6, 2, 2, 2] + [2, 2, 2] * 2
    predictor.calls.clear()
    run_job(FakeStore({"bkt/in/f.jsonl": b"[1]\n[1, 2]\n[3]\n"}), make_job(job_id="j2"), predictor, batch_size=6)
    assert predictor.calls == [2, 1]  # a later job: no whole-batch call
    fixed = SumPredictor()  # refuses the object, takes the lists
    run_job(FakeStore({"bkt/in/f.jsonl": b"[1]\n{}\n[2]\n[3]\n[4]\n[5]\n"}), make_job(job_id="j3"), fixed, batch_size=3)
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
    job = make_job({"output_format": output_format})
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
