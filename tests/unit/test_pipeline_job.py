"""A job's run: skipped when done, leased, published once, its files in flight and their waits."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.fakes import FakeModels, FakeStore, Published, SumPredictor, make_job, run_job
from worker import errors, pipeline
from worker.jobs import Job
from worker.pipeline import Limits, run
from worker.storage import InputFile
from worker.uris import Uri


def test_key_field_and_predictions_format():
    store = FakeStore({"bkt/in/f.jsonl": b'{"id": "a", "v": 1, "w": 2, "z": 9}\n{"v": 3}\n'})
    run_job(store, make_job({"key_field": "id", "included_fields": ["v", "w"], "instance_type": "array"}))
    assert store.lines("bkt/out/f.jsonl") == [
        {"key": "a", "prediction": 3},
        {"instance": {"v": 3}, "error": {"status": "INVALID_ARGUMENT", "message": "line 2 has no key field 'id'"}},
    ]
    store = FakeStore({"bkt/in/f.jsonl": b"[1, 2]\n{}\n"})
    run_job(store, make_job({"output_format": "predictions"}))
    assert store.lines("bkt/out/f.jsonl") == [
        3,
        {"error": {"status": "INVALID_ARGUMENT", "message": "instances must be lists"}},
    ]


def test_max_error_ratio_fails_the_job():
    store = FakeStore({"bkt/in/f.jsonl": b"[1]\n{}\n{}\n"})
    outcome, pub = run_job(store, make_job({"max_error_ratio": 0.5}))
    assert outcome.status == "FAILED"
    assert outcome.manifest["error"]["message"].startswith("2 of 3 instances (66.7%) could not be predicted")
    assert (
        "; the first, line 2 of gs://bkt/in/f.jsonl: instances must be lists — " in outcome.manifest["error"]["message"]
    )
    assert pub.messages[0][1]["status"] == "FAILED"


def test_completed_job_is_skipped_and_not_reported_twice():
    store = FakeStore({"bkt/in/f.jsonl": b"[1]\n"})
    first, pub1 = run_job(store, make_job())
    second, pub2 = run_job(store, make_job())
    assert not first.skipped and second.skipped
    assert len(pub1.messages) == 1 and pub2.messages == []
    # A different job id on the same output runs again.
    third, pub3 = run_job(store, make_job(job_id="j2"))
    assert not third.skipped and len(pub3.messages) == 1


def test_permanent_errors_become_failed_manifests():
    store = FakeStore({})
    outcome, pub = run_job(store, make_job(inp="gs://bkt/in/missing.jsonl"))
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
    outcome, _ = run_job(store, job)
    assert outcome.manifest["error"]["code"] == "INVALID_ARGUMENT"
    assert "would overwrite input" in outcome.manifest["error"]["message"]
    assert store.objects["bkt/out/f.jsonl"] == b"[1]\n"


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
        run(make_job(), store=store, models=models, publisher=flaky, limits=Limits())
    assert "bkt/out/_manifest.json" in store.objects and flaky.messages == []
    assert "bkt/out/_manifest.json.lease" not in store.objects  # released although the job raised

    calls_before = list(models.predictor_.calls)
    redelivered = run(make_job(), store=store, models=models, publisher=flaky, limits=Limits())
    assert redelivered.skipped and models.predictor_.calls == calls_before  # nothing recomputed
    assert [m[1] for m in flaky.messages] == [{"job_id": "j1", "status": "SUCCEEDED"}]
    assert flaky.messages[0][0]["totals"]["predictions"] == 2

    again = run(make_job(), store=store, models=models, publisher=flaky, limits=Limits())
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
    run(make_job(), store=store, models=FakeModels(SumPredictor()), publisher=small, limits=Limits())
    manifest = json.loads(store.objects["bkt/out/_manifest.json"])
    assert small.messages[0][0] == manifest and "files_omitted" not in manifest  # under the bound: all of it
    assert manifest["manifest"] == "gs://bkt/out/_manifest.json" and len(manifest["files"]) == 300

    bound = small.sizes[0] // 3
    monkeypatch.setattr(pipeline.job, "COMPLETION_MAX_BYTES", bound)
    store = FakeStore({f"bkt/in/part-{k:04d}.jsonl": b"[1]\n" for k in range(300)})
    big = RawPublished()
    run(make_job(), store=store, models=FakeModels(SumPredictor()), publisher=big, limits=Limits())
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
    job = make_job()
    _held_lease(store, job, expires_in_s=60)
    with pytest.raises(errors.Busy, match="running on other-instance/1"):
        run_job(store, job)
    assert "bkt/out/f.jsonl" not in store.objects and "bkt/out/_manifest.json" not in store.objects
    assert "bkt/out/_manifest.json.lease" in store.objects  # the holder's lease is left alone


def test_an_expired_lease_is_taken_over():
    store = FakeStore({"bkt/in/f.jsonl": b"[1]\n"})
    job = make_job()
    _held_lease(store, job, expires_in_s=-1)
    outcome, pub = run_job(store, job)
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
            results.append(run(make_job(), store=store, models=models, publisher=pub, limits=Limits(batch_size=1)))
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
        make_job(),
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
        run(make_job(), store=store, models=FakeModels(predictor), publisher=None, limits=Limits(4, file_concurrency=1))


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
        outcome = run(make_job(), store=store, models=FakeModels(SumPredictor()), publisher=None, limits=limits)
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
    outcome = run(make_job(), store=store, models=FakeModels(predictor), publisher=pub, limits=Limits(batch_size=4))
    return outcome, pub


class ShortPredictor(SumPredictor):
    """A broken model: one prediction short for every batch."""

    def predict(self, instances: list[Any]) -> list[Any]:
        return super().predict(instances)[:-1]


def test_a_model_answering_too_few_predictions_fails_the_job_and_says_so():
    store = FakeStore({"bkt/in/f.jsonl": b"[1]\n[2]\n[3]"})
    outcome, _ = run_job(store, make_job(), ShortPredictor())
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
    job = make_job({"output_format": output_format})
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
    outcome, _ = run_job(store, make_job({"output_format": output_format}), SumPredictor(), batch_size=batch_size)
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


def test_a_delivery_while_the_holder_publishes_the_completion_waits_instead_of_sending_it_again():
    """The manifest is written and its completion not yet marked published, by a run that still
    holds the lease (it is publishing): another delivery must not publish it a second time."""
    store = FakeStore({"bkt/in/f.jsonl": b"[1]\n"})
    first = Published()
    run(make_job(), store=store, models=FakeModels(SumPredictor()), publisher=first, limits=Limits())
    manifest_key = "bkt/out/_manifest.json"
    store.metadata[manifest_key] = {}  # as between the manifest's write and its published mark
    _held_lease(store, make_job(), expires_in_s=60)
    second = Published()
    with pytest.raises(errors.Busy):
        run(make_job(), store=store, models=FakeModels(SumPredictor()), publisher=second, limits=Limits())
    assert second.messages == []
