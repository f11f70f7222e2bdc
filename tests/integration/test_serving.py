"""Both serving backends through the whole pipeline: in-process TensorFlow, and TF Serving as a
child process (the TensorFlow-backed stand-in, launched through exactly the code path the image
uses for `tensorflow_model_server`). Same jobs, same output lines; a server killed mid-job; a
model that cannot load; the warm cache."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from localdev import emulators, models
from tests.conftest import make_bucket, read_lines, write_lines
from tests.outputs import assert_same_output_lines, assert_same_predictions, close_to
from worker import errors
from worker.app import Runtime
from worker.config import Settings
from worker.jobs import Job
from worker.pipeline import JobProgress

pytestmark = pytest.mark.integration

STANDIN = f"{sys.executable} -m localdev.tfserving_standin"
MakeRuntime = Callable[..., Runtime]


@pytest.fixture
def make_runtime(gcs_host: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeRuntime]:
    monkeypatch.setenv("PYTHONPATH", str(emulators.REPO_ROOT))  # for the stand-in child process
    made: list[Runtime] = []

    def make(serving: str, **settings: Any) -> Runtime:
        work_dir = tmp_path / f"work-{len(made)}"
        rt = Runtime.from_settings(
            Settings(**{"serving": serving, "model_server": STANDIN, "work_dir": str(work_dir), **settings}),
            publish=False,
        )
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


def _job(model: str, inp: str, out: str, **options: Any) -> Job:
    return Job.from_mapping({"model": model, "input": inp, "output": out, "options": options}, default_job_id=out)


def _server_processes(marker: str) -> list[int]:
    """Pids of live processes whose command line mentions `marker` (a test's work folder)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(entry))
    return pids


def test_both_backends_and_both_request_formats_write_the_same_lines(make_runtime, storage_client, bucket, model_uris):
    good = models.mlp_instances(64, seed=7)
    wrong_shape = [json.dumps(i) for i in good]
    wrong_shape[10] = json.dumps(good[10][:3])
    wrong_dtype = [json.dumps(i) for i in good]
    wrong_dtype[40] = json.dumps(["a"] * 16)
    write_lines(storage_client, f"gs://{bucket}/mlp/shape.jsonl", wrong_shape)
    write_lines(storage_client, f"gs://{bucket}/mlp/dtype.jsonl", wrong_dtype)
    write_lines(
        storage_client,
        f"gs://{bucket}/two.jsonl",
        [json.dumps({"a": [1, 2, 3, 4], "b": 2}), json.dumps({"a": [0, 0, 0, 0], "b": 0}), json.dumps({"a": [1]})],
    )
    # A list among strings for a string input of shape [?]: one error line, the others predicted.
    text = [json.dumps("abc"), json.dumps(["de"]), json.dumps({"b64": "/3o="})]
    write_lines(storage_client, f"gs://{bucket}/text.jsonl", text)

    outputs: dict[str, list[Any]] = {}
    for serving, request_format in (("tensorflow", "row"), ("tfserving", "row"), ("tfserving", "columnar")):
        rt = make_runtime(serving, request_format=request_format)
        out = f"gs://{bucket}/{serving}-{request_format}"
        mlp = rt.run_job(_job(model_uris["mlp"], f"gs://{bucket}/mlp/", f"{out}/mlp/"))
        assert mlp.status == "PARTIALLY_SUCCEEDED"
        # One bad instance inside a batch of 64 costs one error line; 63 predictions each.
        assert [(f["predictions"], f["errors"]) for f in mlp.manifest["files"]] == [(63, 1), (63, 1)]
        rt.run_job(_job(model_uris["two_io"], f"gs://{bucket}/two.jsonl", f"{out}/two/"))
        rt.run_job(_job(model_uris["strings"], f"gs://{bucket}/text.jsonl", f"{out}/text/"))
        outputs[f"{serving}-{request_format}"] = [
            read_lines(storage_client, f"{out}/{name}")
            for name in ("mlp/dtype.jsonl", "mlp/shape.jsonl", "two/two.jsonl", "text/text.jsonl")
        ]
    assert outputs["tfserving-row"] == outputs["tensorflow-row"]
    # Columnar requests: the same predictions; the bad instances are error lines too, with the
    # server's message for a columnar request.
    assert _without_messages(outputs["tfserving-columnar"]) == _without_messages(outputs["tensorflow-row"])
    assert "named inputs ['a', 'b']" in outputs["tfserving-columnar"][2][2]["error"]["message"]
    dtype_lines, shape_lines, two_lines, text_lines = outputs["tfserving-row"]
    assert [line.get("prediction", {}).get("length") for line in text_lines] == [3, None, 2]
    assert text_lines[1]["error"]["message"] == "input 'text' expects instances of shape [], got [1]"
    assert "expects instances of shape [16], got [3]" in shape_lines[10]["error"]["message"]
    assert "expects float32 numbers" in dtype_lines[40]["error"]["message"]
    assert two_lines[1]["prediction"] == {"ratio": "NaN", "total": 0.0}  # the server's bare NaN, made strict
    assert "error" in two_lines[2]


def test_a_saved_model_in_text_format_runs_through_both_backends(
    make_runtime, storage_client, bucket, model_dirs, reference, tmp_path
):
    """saved_model.pbtxt (TF 1's builders wrote it with as_text=True) instead of saved_model.pb:
    TensorFlow and TF Serving load either, and so does the worker, from a base path or the file."""
    import shutil

    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    text = tmp_path / "text"
    shutil.copytree(model_dirs["mlp"], text)
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((text / "saved_model.pb").read_bytes())
    (text / "saved_model.pbtxt").write_text(text_format.MessageToString(proto))
    (text / "saved_model.pb").unlink()
    models.upload_folder(storage_client, text, bucket, "textmodel/3")
    instances = models.mlp_instances(5, seed=2)
    write_lines(storage_client, f"gs://{bucket}/textin.jsonl", [json.dumps(i) for i in instances])
    want = reference(model_dirs["mlp"], instances)
    for serving, model in (
        ("tensorflow", f"gs://{bucket}/textmodel/"),
        ("tfserving", f"gs://{bucket}/textmodel/3/saved_model.pbtxt"),
    ):
        out = f"gs://{bucket}/textout-{serving}/"
        outcome = make_runtime(serving).run_job(_job(model, f"gs://{bucket}/textin.jsonl", out))
        assert outcome.status == "SUCCEEDED", (serving, outcome.manifest)
        assert outcome.manifest["model"]["version"] == 3
        lines = read_lines(storage_client, f"{out}textin.jsonl")
        assert_same_predictions([line["prediction"] for line in lines], want, serving)


def test_keras_models_exported_by_model_export_run_through_both_backends(
    make_runtime, storage_client, bucket, tmp_path
):
    """Keras names what it exports itself (input `keras_tensor`, outputs `output_0`, `output_1`);
    the predictions must be those of the exported signature called on tensors directly."""
    import numpy as np
    import tensorflow as tf

    built = {
        "seq": models.build_keras_sequential(tmp_path / "seq"),
        "two": models.build_keras_two_inputs(tmp_path / "two"),
    }
    for name, path in built.items():
        models.upload_folder(storage_client, path, bucket, f"keras/{name}/1")
    rng = np.random.default_rng(11)
    seq_x = rng.normal(0, 1, (20, 4)).round(3)
    two_a, two_b = rng.normal(0, 1, (20, 3)).round(3), rng.normal(0, 1, (20, 2)).round(3)
    write_lines(storage_client, f"gs://{bucket}/kin/seq.jsonl", [json.dumps(row) for row in seq_x.tolist()])
    write_lines(
        storage_client,
        f"gs://{bucket}/kin/two.jsonl",
        [json.dumps({"a": a, "b": b}) for a, b in zip(two_a.tolist(), two_b.tolist(), strict=True)],
    )
    seq_fn = tf.saved_model.load(str(built["seq"])).signatures["serving_default"]
    two_fn = tf.saved_model.load(str(built["two"])).signatures["serving_default"]
    seq_want = seq_fn(keras_tensor=tf.constant(seq_x, tf.float32))["output_0"].numpy().tolist()
    two_out = two_fn(a=tf.constant(two_a, tf.float32), b=tf.constant(two_b, tf.float32))
    two_want = [
        {"output_0": s, "output_1": p}
        for s, p in zip(two_out["output_0"].numpy().tolist(), two_out["output_1"].numpy().tolist(), strict=True)
    ]

    for serving in ("tensorflow", "tfserving"):
        rt = make_runtime(serving)
        out = f"gs://{bucket}/kout-{serving}"
        for name, want in (("seq", seq_want), ("two", two_want)):
            outcome = rt.run_job(
                _job(f"gs://{bucket}/keras/{name}/", f"gs://{bucket}/kin/{name}.jsonl", f"{out}/{name}/")
            )
            assert outcome.status == "SUCCEEDED", (serving, name, outcome.manifest)
            lines = read_lines(storage_client, f"{out}/{name}/{name}.jsonl")
            assert len(lines) == 20
            assert_same_predictions([line["prediction"] for line in lines], want, (serving, name))


def test_a_model_of_variable_length_inputs_takes_every_length_through_both_backends(
    make_runtime, storage_client, bucket, tmp_path
):
    """Token ids of any length (a [?, ?] input): a batch of several lengths is refused whole by the
    model, yet every instance is predicted as the signature predicts it alone; ids beyond the
    model's table and ragged instances are error lines."""
    import random

    import tensorflow as tf

    path = models.build_tokens(tmp_path / "tokens")
    models.upload_folder(storage_client, path, bucket, "tokens/1")
    rng = random.Random(5)
    instances: list[Any] = [[rng.randrange(100) for _ in range(rng.randint(1, 6))] for _ in range(60)]
    instances[10] = [3, 100]  # beyond the table of 100
    instances[20] = [[1], [2, 3]]  # ragged
    write_lines(storage_client, f"gs://{bucket}/tin/t.jsonl", [json.dumps(i) for i in instances])
    fn = tf.saved_model.load(str(path)).signatures["serving_default"]
    want = [None if n in (10, 20) else fn(tokens=tf.constant([i], tf.int64))["mean"].numpy()[0].tolist()
            for n, i in enumerate(instances)]  # fmt: skip

    for serving in ("tensorflow", "tfserving"):
        rt = make_runtime(serving)
        out = f"gs://{bucket}/tout-{serving}/"
        outcome = rt.run_job(_job(f"gs://{bucket}/tokens/", f"gs://{bucket}/tin/t.jsonl", out))
        assert outcome.status == "PARTIALLY_SUCCEEDED", (serving, outcome.manifest)
        assert outcome.manifest["totals"]["predictions"] == 58 and outcome.manifest["totals"]["errors"] == 2
        lines = read_lines(storage_client, f"{out}t.jsonl")
        assert [line["instance"] for line in lines] == instances
        # TensorFlow's cause, as TF Serving's first line gives it: not "Graph execution error:".
        assert lines[10]["error"]["message"].startswith("indices[0,1] = 100 is not in [0, 100)"), (serving, lines[10])
        assert "rectangular" in lines[20]["error"]["message"], (serving, lines[20])
        for n, (line, w) in enumerate(zip(lines, want, strict=True)):
            if w is None:
                assert line["error"]["status"] == "INVALID_ARGUMENT", (serving, n, line)
            else:
                assert close_to(line["prediction"], w), (serving, n, line)


def test_a_file_all_of_a_shape_or_type_the_model_does_not_take_costs_one_call_per_batch_in_both_backends(
    make_runtime, storage_client, bucket, model_uris, monkeypatch
):
    """15 numbers on every line for a 16-float input, 16 numbers written as strings, arrays for a
    model of named inputs, objects keyed by another name, numbers for text (common slips): every line is an error
    line saying so, and the model is asked once per batch, not once per instance after halving
    each batch down (2 × 300 − 1 calls here). Behind TF Serving, the declared inputs, shapes and
    types come from the server's metadata, and the server still refuses the batch first."""
    from worker.serving.tf_backend import TensorFlowSignature
    from worker.serving.tfserving import RestPredictor

    calls: list[int] = []
    for cls, name in ((TensorFlowSignature, "predict_once"), (RestPredictor, "_call")):
        real = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, *a, _real=real, **k: calls.append(1) or _real(self, *a, **k))
    instances = models.mlp_instances(300, seed=11)
    cases = {
        "short": ([i[:15] for i in instances], "input 'x' expects instances of shape [16], got [15]"),
        # Numbers written as strings, as a CSV export may leave them.
        "quoted": (
            [[str(v) for v in i] for i in instances],
            "input 'x' expects float32 numbers, got values of JSON type string",
        ),
    }
    # Arrays for a model of two inputs, which takes objects keyed by them; objects keyed by another
    # name for a model of one.
    named = "this model takes named inputs ['a', 'b']: each instance must be an object with exactly those keys"
    cases["unnamed"] = ([[1.0, 2.0, 3.0, 4.0]] * 300, f"{named}, got array")
    keyed = (
        'this model takes one input, \'x\': an instance that is an object must be {"x": …} (or {"b64": …} for bytes)'
    )
    cases["misnamed"] = ([{"features": i} for i in instances], f"{keyed}, got one with keys ['features']")
    # An id beside the input(s): what to set to keep it out of the model.
    hint = "'id' is not an input — name it in options.key_field to write it as each line's key, or leave it out "
    hint += "with options.excluded_fields"
    cases["with_id"] = (
        [{"id": k, "x": i} for k, i in enumerate(instances)],
        f"{keyed}, got one with keys ['id', 'x']: {hint}",
    )
    cases["with_ids"] = (
        [{"id": k, "a": [1.0, 2.0, 3.0, 4.0], "b": 2.0} for k in range(300)],
        f"{named}, got ['a', 'b', 'id']: {hint}",
    )
    # Numbers for a model of text (token ids where it takes raw strings).
    cases["ids"] = (
        [i[0] * 100 for i in instances],
        "input 'text' expects strings (or {\"b64\": …} for bytes), got values of JSON type number",
    )
    model = {"unnamed": "two_io", "ids": "strings", "with_ids": "two_io"}
    for case, (wrong, message) in cases.items():
        write_lines(storage_client, f"gs://{bucket}/{case}/in.jsonl", [json.dumps(i) for i in wrong])
        for serving in ("tensorflow", "tfserving"):  # both say the same
            expected = message
            rt = make_runtime(serving)
            calls.clear()
            out = f"gs://{bucket}/{case}-{serving}/"
            outcome = rt.run_job(
                _job(model_uris[model.get(case, "mlp")], f"gs://{bucket}/{case}/in.jsonl", out, batch_size=100)
            )
            assert len(calls) == 3, (case, serving)  # 3 batches of 100
            assert outcome.status == "FAILED", (case, serving)  # no instance could be predicted
            assert outcome.manifest["error"]["message"].startswith("none of the 300 instances could be predicted")
            assert outcome.manifest["totals"] == {
                "lines": 300, "instances": 300, "predictions": 0, "errors": 300, "skipped": 0
            }, (case, serving)  # fmt: skip
            assert outcome.manifest["first_error"] == {
                "input": f"gs://{bucket}/{case}/in.jsonl",
                "line": 1,
                "message": expected,
            }, (case, serving)
            error = {"status": "INVALID_ARGUMENT", "message": expected}
            lines = read_lines(storage_client, f"{out}in.jsonl")
            assert lines == [{"instance": i, "error": error} for i in wrong], (case, serving)


@pytest.mark.parametrize("declared", [True, False])
@pytest.mark.parametrize("serving", ["tensorflow", "tfserving"])
def test_a_model_of_large_predictions_gets_batches_whose_predictions_stay_bounded_in_both_backends(
    make_runtime, storage_client, bucket, tmp_path, monkeypatch, serving, declared
):
    """A signature declaring 512 × 512 values per instance: batches of 1024 would hold 268 million
    values as Python numbers and JSON text (a 128 × 128 × 3 decoder took 7.7 GB in process and
    5.7 GB behind TF Serving for 2,048 instances). Batches are cut to the 8 instances whose
    predictions fit MAX_BATCH_OUTPUT_VALUES (2**21), from the signature in process and from the
    server's metadata behind TF Serving. A signature that does not declare its output's shape
    ([?, ?, ?]) has its first batch of one instance, and the values its prediction holds cut the
    batches after it alike."""
    from worker.serving.tf_backend import TensorFlowSignature
    from worker.serving.tfserving import RestPredictor

    sizes: list[int] = []
    for cls, name in ((TensorFlowSignature, "predict_once"), (RestPredictor, "_predict_once")):
        real = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, batch, _real=real: sizes.append(len(batch)) or _real(self, batch))
    name = "large" if declared else "large-undeclared"
    built = models.build_large_output(tmp_path / name, 512, declared=declared)
    models.upload_folder(storage_client, built, bucket, f"{name}/1")
    write_lines(storage_client, f"gs://{bucket}/in.jsonl", [json.dumps([k, 0]) for k in range(9)])
    rt = make_runtime(serving)
    outcome = rt.run_job(
        _job(f"gs://{bucket}/{name}/", f"gs://{bucket}/in.jsonl", f"gs://{bucket}/out/", output_format="predictions")
    )
    assert outcome.status == "SUCCEEDED", outcome.manifest
    assert sizes == ([8, 1] if declared else [1, 8])
    lines = storage_client.bucket(bucket).blob("out/in.jsonl").download_as_bytes().splitlines()
    assert len(lines) == 9
    last = json.loads(lines[-1])
    assert len(last) == 512 and len(last[0]) == 512 and last[511][511] == 8.0


def test_a_batch_out_of_memory_goes_in_halves_and_one_instance_out_of_memory_fails_the_job_in_both_backends(
    make_runtime, storage_client, bucket, tmp_path, caplog
):
    """TensorFlow's out-of-memory error (TF Serving's 429): the batch is predicted again in halves,
    and later ones no bigger; an instance too big alone fails the job saying what to do."""
    models.upload_folder(storage_client, models.build_greedy(tmp_path / "greedy"), bucket, "greedy/1")
    fit = [[0, k] for k in range(6)]
    write_lines(storage_client, f"gs://{bucket}/gin/fit.jsonl", [json.dumps(i) for i in fit])
    write_lines(storage_client, f"gs://{bucket}/gin/big.jsonl", [json.dumps(i) for i in [[0, 1], [1, 2]]])

    for serving, logger in (("tensorflow", "worker.serving.tf_backend"), ("tfserving", "worker.serving.tfserving")):
        rt = make_runtime(serving, batch_size=4)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=logger):
            outcome = rt.run_job(
                _job(f"gs://{bucket}/greedy/", f"gs://{bucket}/gin/fit.jsonl", f"gs://{bucket}/g-{serving}/")
            )
        assert outcome.status == "SUCCEEDED", (serving, outcome.manifest)
        lines = read_lines(storage_client, f"gs://{bucket}/g-{serving}/fit.jsonl")
        assert [line["prediction"] for line in lines] == [float(k) for k in range(6)]
        halved = [r.getMessage() for r in caplog.records if "from now on" in r.getMessage()]
        # 4 instances ran out of memory, then 2: one at a time from then on, the second batch too.
        assert len(halved) == 2 and "ran out of memory (OOM when allocating tensor" in halved[0], (serving, halved)
        assert halved[1].endswith("on 2 instances: at most 1 per call from now on"), (serving, halved)

        outcome = rt.run_job(
            _job(f"gs://{bucket}/greedy/", f"gs://{bucket}/gin/big.jsonl", f"gs://{bucket}/gb-{serving}/")
        )
        assert outcome.status == "FAILED" and outcome.manifest["error"]["code"] == "FAILED_PRECONDITION"
        message = outcome.manifest["error"]["message"]
        assert "ran out of memory on one instance (OOM when allocating tensor" in message, (serving, message)
        assert message.endswith("give the worker more memory (Cloud Run: --memory), or use a smaller model")


def _without_messages(files: list[list[Any]]) -> list[list[Any]]:
    return [[{**line, "error": "…"} if "error" in line else line for line in lines] for lines in files]


def test_a_server_killed_mid_job_is_restarted_and_every_line_written_once(
    make_runtime, storage_client, bucket, model_uris
):
    instances = models.mlp_instances(1000, seed=8)
    write_lines(storage_client, f"gs://{bucket}/in.jsonl", [json.dumps(i) for i in instances])
    rt = make_runtime("tfserving", batch_size=8)
    # Warm the server, then kill it with SIGKILL after a few batches of the real job.
    rt.run_job(_job(model_uris["mlp"], f"gs://{bucket}/in.jsonl", f"gs://{bucket}/warm/"))
    starts = rt.models.stats.snapshot()["server_starts"]
    killed: list[int] = []

    def kill_once(progress: JobProgress) -> None:
        if progress.lines >= 40 and not killed:
            pids = _server_processes(rt.settings.work_dir)
            assert len(pids) == 1
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    outcome = rt.run_job(_job(model_uris["mlp"], f"gs://{bucket}/in.jsonl", f"gs://{bucket}/out/"), progress=kill_once)
    assert killed and outcome.status == "SUCCEEDED"
    assert outcome.manifest["totals"]["predictions"] == 1000
    assert rt.models.stats.snapshot()["server_starts"] == starts + 1
    lines = read_lines(storage_client, f"gs://{bucket}/out/in.jsonl")
    assert [line["instance"] for line in lines] == instances
    assert_same_output_lines(lines, read_lines(storage_client, f"gs://{bucket}/warm/in.jsonl"))


def test_a_model_the_server_cannot_load_fails_the_job_and_leaves_no_process(
    make_runtime, storage_client, bucket, tmp_path
):
    storage_client.bucket(bucket).blob("broken/1/saved_model.pb").upload_from_string(b"not a protobuf")
    write_lines(storage_client, f"gs://{bucket}/in.jsonl", ["[1]"])
    rt = make_runtime("tfserving")
    outcome = rt.run_job(_job(f"gs://{bucket}/broken/", f"gs://{bucket}/in.jsonl", f"gs://{bucket}/out/"))
    assert outcome.status == "FAILED"
    assert outcome.manifest["error"]["code"] == "FAILED_PRECONDITION"
    assert outcome.manifest["error"]["message"].startswith(
        f"TensorFlow Serving cannot load model gs://{bucket}/broken/1/"
    )
    assert _server_processes(rt.settings.work_dir) == []


@pytest.fixture(scope="module")
def half_model(storage_client: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A model whose input is float16, which TF Serving's REST API cannot fill from JSON."""
    path = models.build_typed(tmp_path_factory.mktemp("half") / "half", "float16")
    bucket = make_bucket(storage_client, "half")
    models.upload_folder(storage_client, path, bucket, "half/1")
    return f"gs://{bucket}/half/"


@pytest.mark.parametrize("serving", ["tensorflow", "tfserving"])
def test_an_input_type_tf_serving_cannot_fill_from_json_fails_the_job_with_what_to_do(
    make_runtime, storage_client, bucket, half_model, serving
):
    # TF Serving answers every such request 501: the job fails at once, is not retried, and the
    # in-process backend refuses the model the same way instead of working where TF Serving won't.
    write_lines(storage_client, f"gs://{bucket}/in.jsonl", [json.dumps([0.5, 1, 2, 3])] * 5)
    rt = make_runtime(serving)
    outcome = rt.run_job(_job(half_model, f"gs://{bucket}/in.jsonl", f"gs://{bucket}/out/"))
    assert outcome.status == "FAILED"
    error = outcome.manifest["error"]
    assert error["code"] == "FAILED_PRECONDITION"
    assert "Conversion of JSON Value: 0.5 to type: half" in error["message"]
    assert error["message"].endswith("export the model with one of those and cast inside it")
    assert rt.models.stats.snapshot()["server_starts"] == (1 if serving == "tfserving" else 0)
    assert storage_client.bucket(bucket).get_blob("out/in.jsonl") is None


@pytest.fixture(scope="module")
def unbatched_models(storage_client: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    bucket = make_bucket(storage_client, "unbatched")
    for output in ("total", "first"):
        path = models.build_unbatched(tmp_path_factory.mktemp("unbatched") / output, output)
        models.upload_folder(storage_client, path, bucket, f"{output}/1")
    return {output: f"gs://{bucket}/{output}/" for output in ("total", "first")}


@pytest.mark.parametrize(
    ("serving", "request_format"), [("tensorflow", "row"), ("tfserving", "row"), ("tfserving", "columnar")]
)
def test_a_model_whose_outputs_have_no_row_per_instance_fails_the_job_in_both_backends(
    make_runtime, storage_client, bucket, unbatched_models, serving, request_format
):
    """A scalar output is refused from the signature, before any line is read (TF Serving would
    refuse every request of it: "has no shape information"); an output of the wrong number of rows
    fails the job at its first batch. Neither leaves an output, and both say what to fix."""
    write_lines(storage_client, f"gs://{bucket}/in.jsonl", ["[1, 2]", "[3, 4]"])
    rt = make_runtime(serving, request_format=request_format)
    advice = "not one row per instance; export the model with a batch dimension first on every output"

    scalar = rt.run_job(_job(unbatched_models["total"], f"gs://{bucket}/in.jsonl", f"gs://{bucket}/o1/"))
    assert scalar.status == "FAILED"
    assert scalar.manifest["error"] == {
        "code": "FAILED_PRECONDITION",
        "message": f"model {unbatched_models['total']}1/: output 'total' is a scalar (shape []), {advice}",
    }
    assert scalar.manifest["files"] == []

    first = rt.run_job(_job(unbatched_models["first"], f"gs://{bucket}/in.jsonl", f"gs://{bucket}/o2/"))
    assert first.status == "FAILED"
    message = first.manifest["error"]["message"]
    assert first.manifest["error"]["code"] == "FAILED_PRECONDITION"
    assert message.endswith("; export the model with a batch dimension first on every output"), message
    assert ("1 predictions for 2 instances" in message) or ("(2)" in message), message
    for out in ("o1", "o2"):
        assert storage_client.bucket(bucket).get_blob(f"{out}/in.jsonl") is None


@pytest.mark.parametrize("serving", ["tensorflow", "tfserving"])
def test_an_output_type_tf_serving_cannot_write_as_json_fails_the_job_from_the_signature(
    make_runtime, storage_client, bucket, tmp_path, serving
):
    """TF Serving fails every request of a model with a float16 output ("Failed to write JSON value
    for tensor type: half"): both backends refuse the signature before any line is read, saying
    what to do, where every line used to be an error line behind TF Serving and in process the
    model worked where TF Serving would not."""
    models.upload_folder(storage_client, models.build_typed_output(tmp_path / "half", "float16"), bucket, "half/1")
    write_lines(storage_client, f"gs://{bucket}/in.jsonl", ["[1, 2]", "[3, 4]"])
    rt = make_runtime(serving)
    outcome = rt.run_job(_job(f"gs://{bucket}/half/", f"gs://{bucket}/in.jsonl", f"gs://{bucket}/out/"))
    assert outcome.status == "FAILED"
    assert outcome.manifest["error"] == {
        "code": "FAILED_PRECONDITION",
        "message": f"model gs://{bucket}/half/1/: output 'y' is half, which TF Serving's REST API cannot write "
        "as JSON — cast it inside the model to one of float, double, int8, int16, int32, int64, uint8, uint32, "
        "uint64, bool, string (a Keras model under a mixed-precision policy: give its last layer dtype='float32')",
    }
    assert outcome.manifest["files"] == []
    assert storage_client.bucket(bucket).get_blob("out/in.jsonl") is None


@pytest.mark.parametrize(
    ("serving", "request_format"), [("tensorflow", "row"), ("tfserving", "row"), ("tfserving", "columnar")]
)
def test_a_text_output_that_is_not_valid_utf8_is_written_as_its_bytes_in_both_backends(
    make_runtime, storage_client, bucket, tmp_path, serving, request_format
):
    """TF Serving writes a text output as its bytes, valid UTF-8 or not; the worker reads the
    invalid ones as `{"b64": …}`, as the in-process backend writes them, instead of failing the job
    on an answer it cannot decode."""
    models.upload_folder(storage_client, models.build_first_byte(tmp_path / "first"), bucket, "first/1")
    lines = [json.dumps("été"), json.dumps("ab"), json.dumps({"b64": base64.b64encode(b"\xff\x00").decode()})]
    write_lines(storage_client, f"gs://{bucket}/in.jsonl", lines)
    rt = make_runtime(serving, request_format=request_format)
    outcome = rt.run_job(_job(f"gs://{bucket}/first/", f"gs://{bucket}/in.jsonl", f"gs://{bucket}/out/"))
    assert outcome.status == "SUCCEEDED", outcome.manifest
    predictions = [line["prediction"] for line in read_lines(storage_client, f"gs://{bucket}/out/in.jsonl")]
    assert predictions == [{"b64": base64.b64encode("é".encode()[:1]).decode()}, "a", {"b64": "/w=="}]


@pytest.mark.parametrize("serving", ["tensorflow", "tfserving"])
def test_an_instance_the_model_fails_on_with_an_internal_error_is_one_error_line_in_both_backends(
    make_runtime, storage_client, bucket, tmp_path, serving
):
    """TensorFlow's DATA_LOSS (bytes that do not decompress) is TF Serving's HTTP 500: the model's
    answer about these instances, not a server to restart. The instance is one error line and the
    others are predicted, as in process; the server is started once and never restarted."""
    models.upload_folder(storage_client, models.build_inflate(tmp_path / "inflate"), bucket, "inflate/1")
    good = [{"b64": base64.b64encode(zlib.compress(b"x" * n)).decode()} for n in (3, 5, 8)]
    lines = [
        json.dumps(good[0]),
        json.dumps({"b64": base64.b64encode(b"not zlib").decode()}),
        *map(json.dumps, good[1:]),
    ]
    write_lines(storage_client, f"gs://{bucket}/in.jsonl", lines)
    rt = make_runtime(serving)
    outcome = rt.run_job(_job(f"gs://{bucket}/inflate/", f"gs://{bucket}/in.jsonl", f"gs://{bucket}/out/"))
    assert outcome.status == "PARTIALLY_SUCCEEDED", outcome.manifest
    assert outcome.manifest["totals"] == {"lines": 4, "instances": 4, "predictions": 3, "errors": 1, "skipped": 0}
    out = read_lines(storage_client, f"gs://{bucket}/out/in.jsonl")
    assert [line.get("prediction") for line in out] == [3, None, 5, 8]
    assert out[1]["error"]["status"] == "INVALID_ARGUMENT"
    assert "inflate() failed" in out[1]["error"]["message"], out[1]
    assert rt.models.stats.snapshot()["server_starts"] == (1 if serving == "tfserving" else 0)


def test_a_server_with_enable_batching_gets_requests_no_larger_than_its_max_batch_size(
    make_runtime, storage_client, bucket, model_uris, model_dirs, reference, tmp_path, monkeypatch, caplog
):
    """TF Serving with --enable_batching refuses a request of more instances than its
    max_batch_size (1000 by default, below the worker's 1024) with a 400, "Task size 6 is larger
    than maximum input batch size 4": not the instances' fault. The worker sends that batch again
    in requests of the size the server named, with one warning, and makes its later batches no
    larger (not batches of 6 each sent as 4 and 2)."""
    params = tmp_path / "batching.txt"
    params.write_text("max_batch_size { value: 4 }\nbatch_timeout_micros { value: 0 }\n")
    instances = models.mlp_instances(18, seed=4)
    write_lines(storage_client, f"gs://{bucket}/b/one.jsonl", [json.dumps(i) for i in instances[:10]])
    write_lines(storage_client, f"gs://{bucket}/b/two.jsonl", [json.dumps(i) for i in instances[10:]])
    args = f"--enable_batching --batching_parameters_file={params}"
    rt = make_runtime("tfserving", model_server_args=args, file_concurrency=1)
    from worker.serving.tfserving import ModelServer

    sent: list[int] = []
    real = ModelServer.call

    def call(self: ModelServer, method: str, suffix: str, body: Any = None) -> Any:
        if body is not None:
            sent.append(len(body["instances"]))
        return real(self, method, suffix, body)

    monkeypatch.setattr(ModelServer, "call", call)
    with caplog.at_level(logging.WARNING, logger="worker.serving.tfserving"):
        outcome = rt.run_job(_job(model_uris["mlp"], f"gs://{bucket}/b/", f"gs://{bucket}/b-out/", batch_size=6))
    assert outcome.status == "SUCCEEDED", outcome.manifest
    lines = read_lines(storage_client, f"gs://{bucket}/b-out/one.jsonl") + read_lines(
        storage_client, f"gs://{bucket}/b-out/two.jsonl"
    )
    assert_same_predictions([line["prediction"] for line in lines], reference(model_dirs["mlp"], instances))
    # The first batch of 6 refused, then sent as 4 and 2; the job's batches are of 4 from then on.
    assert sent == [6, 4, 2, 4, 4, 4]
    assert rt.models.stats.snapshot()["server_starts"] == 1
    capped = [r.getMessage() for r in caplog.records if "per call from now on" in r.getMessage()]
    assert len(capped) == 1 and "Task size 6 is larger than maximum input batch size 4" in capped[0], capped
    assert "at most 4 per call" in capped[0]


def test_a_server_whose_batch_queue_is_full_is_asked_again_not_restarted(
    make_runtime, storage_client, bucket, model_uris, model_dirs, reference, tmp_path, monkeypatch, caplog
):
    """TF Serving with --enable_batching answers 503 (UNAVAILABLE, "The batch scheduling queue to
    which this task was submitted is full") when more requests come than its batch threads and
    queue hold: here one thread and no queue, and 6 files in flight. The server is up and busy:
    the worker asks again after a pause, without restarting it, and every line is predicted."""
    monkeypatch.setenv("STANDIN_DELAY_MS_PER_INSTANCE", "20")
    params = tmp_path / "batching.txt"
    params.write_text("num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 0 }\n")
    instances = models.mlp_instances(30, seed=6)
    for k in range(6):
        write_lines(storage_client, f"gs://{bucket}/q/{k}.jsonl", [json.dumps(i) for i in instances[k * 5 : k * 5 + 5]])
    args = f"--enable_batching=true --batching_parameters_file={params}"
    rt = make_runtime("tfserving", model_server_args=args, file_concurrency=6)
    with caplog.at_level(logging.INFO, logger="worker.serving.tfserving"):
        outcome = rt.run_job(_job(model_uris["mlp"], f"gs://{bucket}/q/", f"gs://{bucket}/q-out/"))
    assert outcome.status == "SUCCEEDED", outcome.manifest
    lines = [line for k in range(6) for line in read_lines(storage_client, f"gs://{bucket}/q-out/{k}.jsonl")]
    assert_same_predictions([line["prediction"] for line in lines], reference(model_dirs["mlp"], instances))
    assert rt.models.stats.snapshot()["server_starts"] == 1
    busy = [r.getMessage() for r in caplog.records if "is busy" in r.getMessage()]
    assert busy and "batch scheduling queue to which this task was submitted is full" in busy[0]
    assert not [r for r in caplog.records if "restarting" in r.getMessage()]


def test_a_server_busy_for_longer_than_the_worker_waits_fails_the_job_as_transient_without_a_restart(
    make_runtime, storage_client, bucket, model_uris, tmp_path, monkeypatch
):
    """One batch thread, no queue, and a model that takes 1 s an instance: while one file's request
    runs, the other's is answered 503 until the worker stops asking (BUSY_GIVE_UP_S, 60 s, made
    short here). The job fails as transient, to be delivered again, and the server was never
    restarted (a restart would kill the request that was running)."""
    from worker.serving.tfserving import process

    monkeypatch.setattr(process, "BUSY_GIVE_UP_S", 0.3)
    monkeypatch.setenv("STANDIN_DELAY_MS_PER_INSTANCE", "1000")
    params = tmp_path / "batching.txt"
    params.write_text("num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 0 }\n")
    for k in range(2):
        write_lines(storage_client, f"gs://{bucket}/busy/{k}.jsonl", [json.dumps(i) for i in models.mlp_instances(3)])
    args = f"--enable_batching --batching_parameters_file={params}"
    rt = make_runtime("tfserving", model_server_args=args, file_concurrency=2)
    with pytest.raises(errors.TransientError, match=r"was busy for 0.3 s: HTTP 503: The batch scheduling queue"):
        rt.run_job(_job(model_uris["mlp"], f"gs://{bucket}/busy/", f"gs://{bucket}/busy-out/"))
    assert rt.models.stats.snapshot()["server_starts"] == 1


def test_a_batch_that_outlives_the_server_s_timeout_is_sent_in_halves_and_so_are_later_ones(
    make_runtime, storage_client, bucket, model_uris, model_dirs, reference, monkeypatch, caplog
):
    # The stand-in takes 100 ms per instance and answers 504 past its 1 s timeout, as TF Serving
    # does past --rest_api_timeout_in_ms: 12 instances time out, 6 do not.
    monkeypatch.setenv("STANDIN_DELAY_MS_PER_INSTANCE", "100")
    instances = models.mlp_instances(24, seed=9)
    write_lines(storage_client, f"gs://{bucket}/in.jsonl", [json.dumps(i) for i in instances])
    rt = make_runtime("tfserving", predict_timeout_seconds=1, batch_size=12)
    with caplog.at_level(logging.WARNING, logger="worker.serving.tfserving"):
        outcome = rt.run_job(_job(model_uris["mlp"], f"gs://{bucket}/in.jsonl", f"gs://{bucket}/out/"))
    assert outcome.status == "SUCCEEDED"
    lines = read_lines(storage_client, f"gs://{bucket}/out/in.jsonl")
    assert_same_predictions([line["prediction"] for line in lines], reference(model_dirs["mlp"], instances))
    assert rt.models.stats.snapshot()["server_starts"] == 1  # not taken for a crash
    # Halved once, on the first batch; the second batch went as two requests of 6 from the start.
    halved = [r.getMessage() for r in caplog.records if "per call from now on" in r.getMessage()]
    assert len(halved) == 1 and "on 12 instances" in halved[0] and "at most 6 per call" in halved[0]


def test_an_instance_that_outlives_the_server_s_timeout_fails_the_job_saying_to_raise_it(
    make_runtime, storage_client, bucket, model_uris, monkeypatch
):
    monkeypatch.setenv("STANDIN_DELAY_MS_PER_INSTANCE", "1200")
    write_lines(storage_client, f"gs://{bucket}/in.jsonl", [json.dumps(models.mlp_instances(1)[0])])
    rt = make_runtime("tfserving", predict_timeout_seconds=1)
    outcome = rt.run_job(_job(model_uris["mlp"], f"gs://{bucket}/in.jsonl", f"gs://{bucket}/out/"))
    assert outcome.status == "FAILED"
    assert outcome.manifest["error"]["code"] == "FAILED_PRECONDITION"
    assert outcome.manifest["error"]["message"].endswith(
        "on one instance (Timed out waiting for notification) — raise WORKER_PREDICT_TIMEOUT_SECONDS"
    )
    assert rt.models.stats.snapshot()["server_starts"] == 1


def test_a_server_that_exits_at_start_is_a_transient_failure_with_its_output(
    make_runtime, storage_client, bucket, model_uris
):
    write_lines(storage_client, f"gs://{bucket}/in.jsonl", ["[1]"])
    crash = f"{sys.executable} -c \"import sys; print('unknown flag --frobnicate'); sys.exit(3)\""
    rt = make_runtime("tfserving", model_server=crash)
    with pytest.raises(errors.TransientError, match=r"exited with code 3[\s\S]*unknown flag --frobnicate"):
        rt.run_job(_job(model_uris["mlp"], f"gs://{bucket}/in.jsonl", f"gs://{bucket}/out/"))


def test_warm_jobs_reuse_the_server_and_a_reuploaded_model_is_reloaded(
    make_runtime, storage_client, bucket, model_dirs
):
    for name in ("mlp", "two_io"):
        models.upload_folder(storage_client, model_dirs[name], bucket, f"{name}/1")
    write_lines(storage_client, f"gs://{bucket}/in.jsonl", [json.dumps(i) for i in models.mlp_instances(5)])
    write_lines(storage_client, f"gs://{bucket}/two.jsonl", [json.dumps({"a": [1, 2, 3, 4], "b": 2})])
    rt = make_runtime("tfserving", max_models=1)

    def job(model: str, inp: str, n: int) -> None:
        out = rt.run_job(_job(f"gs://{bucket}/{model}/", f"gs://{bucket}/{inp}", f"gs://{bucket}/o{n}/"))
        assert out.status == "SUCCEEDED"

    job("mlp", "in.jsonl", 1)
    job("mlp", "in.jsonl", 2)
    assert rt.models.stats.snapshot() == {"downloads": 1, "loads": 1, "hits": 1, "evictions": 0, "server_starts": 1}

    models.upload_folder(storage_client, model_dirs["mlp"], bucket, "mlp/1")  # new generations
    job("mlp", "in.jsonl", 3)
    stats = rt.models.stats.snapshot()
    assert (stats["downloads"], stats["loads"], stats["server_starts"], stats["evictions"]) == (2, 2, 2, 1)
    assert len(_server_processes(rt.settings.work_dir)) == 1  # the stale server was stopped

    job("two_io", "two.jsonl", 4)  # max_models=1: the mlp is evicted, its server stopped, its files deleted
    assert len(_server_processes(rt.settings.work_dir)) == 1
    assert len(os.listdir(os.path.join(rt.settings.work_dir, "models"))) == 1


def _upload_padded(storage_client: Any, model_dir: Path, bucket: str, prefix: str, pad_bytes: int) -> None:
    """The model with an asset of `pad_bytes` beside it: as big on disk as a real model may be."""
    models.upload_folder(storage_client, model_dir, bucket, prefix)
    storage_client.bucket(bucket).blob(f"{prefix}/assets/padding.bin").upload_from_string(b"\0" * pad_bytes)


def test_local_model_files_stay_within_the_disk_bound(make_runtime, storage_client, bucket, model_dirs):
    for name in ("mlp", "two_io"):
        _upload_padded(storage_client, model_dirs[name], bucket, f"{name}/1", 1200 * 1024)
    write_lines(storage_client, f"gs://{bucket}/in.jsonl", [json.dumps(i) for i in models.mlp_instances(3)])
    write_lines(storage_client, f"gs://{bucket}/two.jsonl", [json.dumps({"a": [1, 2, 3, 4], "b": 2})])
    # Room for one of the two (each is about 1.2 MiB), though five models may stay warm.
    rt = make_runtime("tensorflow", max_models=5, max_model_disk_mb=2)
    models_dir = os.path.join(rt.settings.work_dir, "models")

    out = rt.run_job(_job(f"gs://{bucket}/mlp/", f"gs://{bucket}/in.jsonl", f"gs://{bucket}/o1/"))
    assert out.status == "SUCCEEDED" and len(os.listdir(models_dir)) == 1
    out = rt.run_job(_job(f"gs://{bucket}/two_io/", f"gs://{bucket}/two.jsonl", f"gs://{bucket}/o2/"))
    assert out.status == "SUCCEEDED"
    assert rt.models.stats.snapshot()["evictions"] == 1
    assert len(os.listdir(models_dir)) == 1  # the mlp's files were deleted to make room
    assert rt.models.local_bytes < 2 * 2**20


def test_a_model_larger_than_the_disk_bound_fails_before_any_download(make_runtime, storage_client, bucket, model_dirs):
    _upload_padded(storage_client, model_dirs["mlp"], bucket, "big/1", 2 * 2**20)
    write_lines(storage_client, f"gs://{bucket}/in.jsonl", ["[1]"])
    rt = make_runtime("tensorflow", max_model_disk_mb=2)
    outcome = rt.run_job(_job(f"gs://{bucket}/big/", f"gs://{bucket}/in.jsonl", f"gs://{bucket}/out/"))
    assert outcome.status == "FAILED"
    assert outcome.manifest["error"]["code"] == "FAILED_PRECONDITION"
    assert f"model gs://{bucket}/big/1/ takes 2.0 MiB, more than the 2 MiB" in outcome.manifest["error"]["message"]
    assert "WORKER_MAX_MODEL_DISK_MB" in outcome.manifest["error"]["message"]
    assert rt.models.stats.snapshot()["downloads"] == 0
