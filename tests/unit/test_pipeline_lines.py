"""Lines on their way to output lines: error lines that say what to fix, options, strict JSON."""

from __future__ import annotations

import json

import pytest

from tests.unit.fakes import FakeModels, FakeStore, SumPredictor, make_job, run_job
from worker import errors
from worker.jobs import Job, Options
from worker.pipeline import Limits, dumps_line, run


def test_a_job_none_of_whose_instances_could_be_predicted_fails_with_its_first_error():
    """A CSV file read as JSON lines, say: every line an error line, written (nothing is lost), and
    the job FAILED saying why, not PARTIALLY_SUCCEEDED. A job of blank lines alone has nothing to fail."""
    store = FakeStore({"bkt/in/f.jsonl": b"id,a,b\n1,2,3\n\n4,5,6\n"})
    outcome, pub = run_job(store, make_job())
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
    assert run_job(store, make_job())[0].status == "SUCCEEDED"


def test_one_bad_instance_costs_one_line_and_counts_add_up(caplog):
    lines = [json.dumps([k, 1]) for k in range(10)]
    lines[5] = json.dumps({"bad": True})
    lines.insert(2, "   ")
    lines.insert(7, "{oops")
    store = FakeStore({"bkt/in/f.jsonl": "\n".join(lines).encode()})
    predictor = SumPredictor()
    outcome, pub = run_job(store, make_job(), predictor)

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
    outcome, _ = run_job(store, make_job())
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
    clean, _ = run_job(FakeStore({"bkt/in/a.jsonl": b"[1]\n"}), make_job(job_id="j2"))
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
    outcome, _ = run_job(store, make_job())
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
        make_job(), store=store, models=FakeModels(predictor), publisher=None, limits=Limits(4, max_line_bytes=100)
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
