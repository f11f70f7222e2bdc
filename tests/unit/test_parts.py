"""Jobs run as parts: files shared and cut into pieces, the last part combining the whole job."""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.fakes import FakeModels, FakeStore, Published, SumPredictor, make_job, run_job
from worker import errors
from worker.jobs import Job
from worker.parts import give_up_part, plan, run
from worker.pipeline import Limits
from worker.storage import InputFile
from worker.storage.formats import tfrecord_crc
from worker.uris import Uri


def _parts_of(
    store: FakeStore, options: dict[str, Any], job_id: str = "big", limits: Limits | None = None
) -> tuple[list[Job], Published, Any]:
    """Dispatch a job with `parts`: the part jobs it publishes (as the jobs topic would carry them)."""
    dispatched, pub = Published(), Published()
    limits = limits or Limits(4)
    outcome = run(
        make_job(options, job_id=job_id), store=store, models=FakeModels(SumPredictor()), publisher=pub,
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
    now = plan.share(store.list_inputs(Uri("bkt", "in/")), 2, 2)
    assert [f.rel for f in now] == ["a.jsonl", "b.jsonl", "c.jsonl", "d.jsonl"]
    del store.objects["bkt/in/d.jsonl"]
    with caplog.at_level(logging.WARNING, logger="worker.parts.plan"):
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
    whole, _ = run_job(alone, make_job(job_id="whole"))

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


class LengthPredictor(SumPredictor):
    """Predicts the length of each instance as JSON: takes any instance ({"b64": …} records too)."""

    def predict(self, instances: list[Any]) -> list[Any]:
        self.calls.append(len(instances))
        return [len(json.dumps(i)) for i in instances]


def _frame(data: bytes, *, data_crc: int | None = None) -> bytes:
    length = struct.pack("<Q", len(data))
    crc = tfrecord_crc(data) if data_crc is None else data_crc
    return length + struct.pack("<I", tfrecord_crc(length)) + data + struct.pack("<I", crc)


@pytest.mark.parametrize("options", [{}, {"instance_type": "object", "key_field": "id"}])
def test_a_csv_file_and_a_tf_record_file_are_cut_into_pieces_that_read_as_the_whole_files(options: dict[str, Any]):
    """`parts: 6` over a CSV file (a byte order mark, CRLF, quoted commas, a bad row) and a TFRecord
    file (a corrupt record): each is cut into pieces; each CSV piece names its rows by the file's
    header, each TFRecord piece begins at a record; joined, the outputs and the manifest's files are
    those of the job run whole, error lines numbered as in the file."""
    rows = [b'"id","name",x'] + [b'%d,"n, %d",%d.5' % (k, k, k) for k in range(40)]
    rows[23] = b'22,"unclosed,1.5'
    csv_data = codecs.BOM_UTF8 + b"\r\n".join(rows) + b"\r\n"
    records = b"".join(_frame(b"rec %d" % k, data_crc=1 if k == 25 else None) for k in range(30))
    objects = {"bkt/in/a.csv": csv_data, "bkt/in/b.tfrecord": records}
    alone = FakeStore(objects)
    whole, _ = run_job(alone, make_job(options, job_id="whole"), LengthPredictor())

    store = FakeStore(objects)
    parts, pub, _ = _parts_of(store, {**options, "parts": 6}, limits=Limits(4, min_piece_bytes=10))
    shares = json.loads(store.objects["bkt/out/_parts/files-of-6.json"])["shares"]
    pieces = [sum(c["rel"] == rel for s in shares for c in s) for rel in ("a.csv", "b.tfrecord")]
    assert min(pieces) >= 3 and len(parts) == 6
    for part in parts:
        _run_part(store, part, pub, LengthPredictor())
    [(manifest, attrs)] = pub.messages
    assert attrs["status"] == whole.manifest["status"]
    assert manifest["totals"] == whole.manifest["totals"]
    assert manifest["files"] == [{**f, "pieces": n} for f, n in zip(whole.manifest["files"], pieces, strict=True)]
    # The bad row; the corrupt record, or (keyed by a CSV column) the first record, which has no key.
    assert [f["first_error"]["line"] for f in manifest["files"]] == [24, 1 if options else 26]
    assert store.lines_before_calls == 1  # the CSV piece of the bad row; a TFRecord piece counts records
    for out in ("bkt/out/a.csv.jsonl", "bkt/out/b.tfrecord.jsonl"):
        assert store.objects[out] == alone.objects[out]


def test_a_tf_record_file_whose_pieces_do_not_meet_at_a_record_fails_its_job_saying_so():
    """A record whose data is itself framed records, cut in its data: the piece that begins there
    takes the inner records for the file's, and ends before they run into the outer record's
    checksum. The pieces do not meet: the job FAILED, saying so, nothing joined."""
    inner = b"".join(_frame(b"inner %d" % k) for k in range(3))
    data = _frame(b"first") + _frame(inner) + _frame(b"last")
    store = FakeStore({"bkt/in/b.tfrecord": data})
    parts, pub, _ = _parts_of(store, {"parts": 3}, limits=Limits(4, min_piece_bytes=10))
    shares = json.loads(store.objects["bkt/out/_parts/files-of-3.json"])["shares"]
    assert sorted(c["bytes"][0] for s in shares for c in s) == [0, len(data) // 3, 2 * len(data) // 3]
    for part in parts:
        _run_part(store, part, pub, LengthPredictor())
    [(manifest, attrs)] = pub.messages
    assert attrs["status"] == "FAILED" and manifest["error"]["code"] == "INVALID_ARGUMENT"
    assert manifest["error"]["message"].startswith("TFRecord input gs://bkt/in/b.tfrecord could not be cut at records")
    assert "bkt/out/b.tfrecord.jsonl" not in store.objects


def test_a_part_manifest_edited_to_say_nothing_of_its_records_fails_the_job_not_its_delivery():
    """A part's manifest whose piece no longer says where its records are (edited by hand): the
    job FAILED saying which piece, acknowledged — not an error each delivery of the last part meets."""
    data = b"".join(_frame(b"record %d" % k) for k in range(30))
    store = FakeStore({"bkt/in/b.tfrecord": data})
    parts, pub, _ = _parts_of(store, {"parts": 2}, limits=Limits(4, min_piece_bytes=10))
    _run_part(store, parts[0], pub, LengthPredictor())
    key = "bkt/out/_parts/part-1-of-2.json"
    edited = json.loads(store.objects[key])
    edited["files"][0]["piece"]["records"] = ["x", 3, 4]
    store.objects[key] = json.dumps(edited).encode()
    assert _run_part(store, parts[1], pub, LengthPredictor()).status == "SUCCEEDED"  # the part itself
    [(manifest, attrs)] = pub.messages
    assert attrs["status"] == "FAILED" and manifest["error"]["message"] == (
        "TFRecord input gs://bkt/in/b.tfrecord: the manifest of its piece 1 of 2 does not say where its records are "
        '(["x", 3, 4]) — send the job again with another job_id'
    )


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
    whole = make_job({"parts": 2}, job_id="big")
    good = {"rel": "b", "piece": [1, 2], "bytes": [0, 5], "generation": 3}
    value = {"job_id": "big", "input": "gs://bkt/in/", "shares": [[good], ["c"]]}
    assert plan._shares(value, whole, 2) == [
        [plan.Cut("b", 5, 3, (1, 2), 0, 5)],
        [plan.Cut("c", 0)],
    ]
    assert plan._shares({**value, "shares": [[good], [kept]]}, whole, 2) is None


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
    with caplog.at_level(logging.WARNING, logger="worker.parts.plan"):
        parts, _, outcome = _parts_of(store, {"parts": 3}, limits=Limits(4, min_piece_bytes=10))
    assert len(parts) == 2 and outcome.manifest["files"] == 2
    assert json.loads(store.objects["bkt/out/_parts/files-of-2.json"])["shares"] == [["big.jsonl.gz"], ["small.jsonl"]]
    said = "gs://bkt/in/big.jsonl.gz (102 bytes) is larger than a part's share but is not cut into pieces"
    assert said in caplog.text


def _dropped(rel: str, options: dict[str, Any]) -> Job:
    """The job of a file dropped at in/<rel>, as the runtime makes it: its manifest of its own."""
    job = make_job(options, job_id=f"bkt/in/{rel}#1", inp=f"gs://bkt/in/{rel}")
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
    wholes = {rel: run_job(alone, _dropped(rel, {}))[0] for rel in lines}

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
    assert str(plan.whole_job(part).manifest_uri) == "gs://bkt/m.json"


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
    with caplog.at_level(logging.WARNING, logger="worker.parts.plan"):
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
    outcome = run(
        make_job({"parts": 4}), store=store, models=FakeModels(SumPredictor()), publisher=pub, limits=Limits(4)
    )
    assert outcome.status == "FAILED" and outcome.manifest["error"]["message"].endswith(
        "needs the worker's WORKER_JOBS_TOPIC (the topic its job messages come from), to publish the parts to — set "
        "it, or send the job without parts"
    )
    assert pub.messages[0][1]["status"] == "FAILED"
    dropped, _ = run_job(store, _dropped("a.jsonl", {"parts": 2}))
    assert dropped.manifest["error"]["message"].endswith(
        "set it, or drop parts from the file's `options` metadata (or from WORKER_OPTIONS)"
    )
    parts, _, outcome = _parts_of(store, {"parts": 4})
    assert len(parts) == 2 and outcome.manifest["parts"] == 2
    # One object as input: one part, which completes the job.
    dispatched, pub = Published(), Published()
    one = make_job({"parts": 3}, job_id="one", inp="gs://bkt/in/b.jsonl")
    run(one, store=store, models=FakeModels(SumPredictor()), publisher=pub, limits=Limits(4), dispatcher=dispatched)
    [(data, _)] = dispatched.messages
    assert data["options"] == {"part": [1, 1]} and data["input"] == "gs://bkt/in/b.jsonl"
    _run_part(store, Job.from_mapping(data, default_job_id="unused"), pub)
    [(manifest, attrs)] = pub.messages
    assert attrs == {"job_id": "one", "status": "SUCCEEDED"} and [f["input"] for f in manifest["files"]] == [
        "gs://bkt/in/b.jsonl"
    ]
    with pytest.raises(errors.InvalidJob, match=r"option parts must be an integer from 1 to 100, got 0"):
        make_job({"parts": 0})
    with pytest.raises(errors.InvalidJob, match=r"option part must be \[k, n\]"):
        make_job({"part": [3, 2]})


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
    give_up_part(parts[1], store, pub, {"code": "UNAVAILABLE", "message": "storage unavailable"})
    [(manifest, attrs)] = pub.messages
    assert attrs == {"job_id": "big", "status": "FAILED"}
    assert manifest["error"] == {"code": "UNAVAILABLE", "message": "part 2 of 2: storage unavailable"}
    _run_part(store, parts[1], pub)
    assert [attrs["status"] for _, attrs in pub.messages] == ["FAILED", "SUCCEEDED"]
    assert json.loads(store.objects["bkt/out/_manifest.json"])["totals"]["predictions"] == 3
    _run_part(store, parts[0], pub)  # delivered again: nothing new
    assert len(pub.messages) == 2
