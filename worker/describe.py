"""What a model takes and gives, for writing its input files: `python -m worker describe --model gs://…`.

The model is found as a job finds it (a version folder, or the highest of numeric versions),
downloaded, and loaded with TensorFlow. For each signature: its inputs and outputs with TF
Serving's type names and shapes (-1 where any size goes, the batch first), an example instance
line in the row format the worker reads, and that example predicted (or why it could not be:
a model may need real values, or parse its strings as tf.Example protos).
"""

from __future__ import annotations

import json
from typing import Any

from worker import codec
from worker.errors import ModelError
from worker.serving import BatchRejected, TooBig
from worker.serving.tf_backend import TensorFlowModel, TensorFlowSignature, serving_type
from worker.uris import Uri

_FLOATS = ("float", "double", "half", "bfloat16")


def describe(store: Any, model: Uri, work_dir: str, signature_name: str | None = None) -> dict[str, Any]:
    """The model at `model` described: every signature, or `signature_name` alone."""
    source = store.resolve_model(model)
    local = store.fetch_model(source, work_dir)
    loaded = TensorFlowModel(local.path, description=str(local.uri))
    names = [signature_name] if signature_name else loaded.signature_names()
    return {
        "model": str(model),
        "resolved": str(local.uri),
        "version": local.version,
        "signatures": {name: _signature(loaded.signature(name)) for name in names},
    }


def _signature(sig: TensorFlowSignature) -> dict[str, Any]:
    inputs = {name: _tensor(spec.shape, serving_type(spec.dtype)) for name, spec in sig.inputs.items()}
    outputs = {name: _tensor(spec.shape, serving_type(spec.dtype)) for name, spec in sig.output_specs.items()}
    values = {name: _example(t["shape"] and t["shape"][1:], t["dtype"]) for name, t in inputs.items()}
    example = next(iter(values.values())) if len(values) == 1 else values
    described: dict[str, Any] = {
        "inputs": inputs,
        "outputs": outputs,
        "example_instance": example,
        "example_line": codec.dumps(example).decode(),  # as a line of an input file
        **other_formats(inputs),
    }
    try:
        [prediction] = sig.predict([example])
        described["example_prediction"] = json.loads(codec.dumps(prediction))  # NaN as "NaN", as output lines
    except (BatchRejected, TooBig, ModelError) as e:  # as the example's error line (or job) would say
        described["example_error"] = str(e)
    return described


_NUMBERS = (*_FLOATS, "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def other_formats(inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How the signature's instances can come in the other input formats: a CSV header and row
    when every instance is a row of numbers (one input, a vector of them; or numbers, one per input,
    keyed by the header), and a note on TFRecord when its one input is a string per instance (a
    serialized tf.Example, say)."""
    shapes = {name: t["shape"] for name, t in inputs.items()}
    numeric = all(t["dtype"] in _NUMBERS for t in inputs.values())
    if len(inputs) == 1:
        return _one_input_formats(next(iter(inputs.values())), numeric=numeric)
    if numeric and all(shape == [-1] for shape in shapes.values()):
        header = ",".join(inputs)
        row = ",".join(codec.dumps(_example([], t["dtype"])).decode() for t in inputs.values())
        return {"example_csv": f"{header}\n{row}\n", "example_csv_options": {"instance_type": "object"}}
    return {}


def _one_input_formats(tensor: dict[str, Any], *, numeric: bool) -> dict[str, Any]:
    """`other_formats` for a signature of one input, `tensor`."""
    shape = tensor["shape"]
    if numeric and shape is not None and len(shape) == 2 and shape[1] > 0:
        header = ",".join(f"c{k}" for k in range(shape[1]))
        row = ",".join(codec.dumps(_example([], tensor["dtype"])).decode() for _ in range(shape[1]))
        return {"example_csv": f"{header}\n{row}\n"}
    if tensor["dtype"] == "string" and shape == [-1]:
        return {
            "example_tf_record": 'each record of a TFRecord file (*.tfrecord, or input_format "tf-record") is '
            'sent as {"b64": "<the record>"}: a serialized tf.Example, say'
        }
    return {}


def _tensor(shape: Any, dtype: str) -> dict[str, Any]:
    dims = None if shape.rank is None else [-1 if d is None else d for d in shape.as_list()]
    return {"dtype": dtype, "shape": dims}


def _example(dims: list[int] | None, dtype: str) -> Any:
    """A value of one instance of an input: zeros (false, "") in its shape, 1 where any size goes."""
    if dtype in _FLOATS:
        value: Any = 0.0
    elif dtype == "bool":
        value = False
    elif dtype == "string":
        value = ""
    else:
        value = 0
    for d in reversed(dims or []):
        value = [value] * (1 if d < 0 else d)
    return value
