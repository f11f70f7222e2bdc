"""Small SavedModels built with TensorFlow, for the demo, the tests and the benchmarks.

- `mlp`: x float32[?,16] → one output (3 scores); deterministic weights.
- `dense` (benchmarks only, not in BUILDERS): the same signature through three dense layers of 1024 units.
- `two_io`: inputs a float32[?,4] and b int64[?] → outputs total float32[?], ratio float32[?]
  (ratio = sum(a)/b: Infinity when b is 0, NaN when both are 0).
- `strings`: text string[?] → length int32[?] and upper_bytes string[?] (base64 in TF Serving JSON).
- `tokens` (tests only, not in BUILDERS): token ids int64[?,?], of any length → the mean of
  their 4-float embeddings `mean` float32[?,4] (a table of 100: an id beyond it is refused).
- `greedy` (tests only): x float32[?,2] → y = x[0] + x[1], asking TensorFlow for 2**64 bytes (out
  of memory, refused at once) for a batch of more than one, or for an instance whose x[0] is 1.
- `unbatched` (tests only): x float32[?,2] → `total`, a scalar, or `first`, the first row alone:
  outputs without one row per instance.
- `inflate` (tests only): data string[?] of zlib-compressed bytes → `size` int32[?], failing with
  DATA_LOSS (TF Serving: HTTP 500) on bytes that are not.
- `parse_example` (tests only): examples string[?] of serialized tf.Example protos → `y`
  float32[?], the sum of feature x (2 floats): a model that refuses made-up values.
- `typed_output` (tests only): x float32[?,2] → `y`, their sum as the type asked for.
- `first_byte` (tests only): text string[?] → `first` string[?], its first byte (not valid UTF-8
  alone when the text starts with "é").
- `large_output` (tests only): x float32[?,2] → `image` float32[?,side,side]: predictions far
  larger than their instances.
- Keras models exported as Keras users export them (tests only, not in BUILDERS): a Sequential
  model, whose input is named `keras_tensor` and output `output_0`, and a functional model of two
  inputs `a` and `b` and two outputs (`output_0`, `output_1`).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np

MODEL_NAMES = ("mlp", "two_io", "strings")


def _tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def _save(tf: Any, module: Any, path: str | Path) -> Path:
    """`module` saved at `path` with its `serve` function as the serving_default signature."""
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return Path(path)


def build_mlp(
    path: str | Path, *, hidden: tuple[int, ...] = (32,), features: int = 16, outputs: int = 3, seed: int = 7
) -> Path:
    """x float32[?,features] → relu dense layers of `hidden` units → softmax `scores` [?,outputs]."""
    tf = _tf()
    rng = np.random.default_rng(seed)
    sizes = [features, *hidden, outputs]

    class Mlp(tf.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.weights = [
                tf.Variable(rng.normal(0, (2 / n_in) ** 0.5, (n_in, n_out)).astype("float32"))
                for n_in, n_out in itertools.pairwise(sizes)
            ]
            self.biases = [tf.Variable(rng.normal(0, 0.1, (n,)).astype("float32")) for n in sizes[1:]]

        @tf.function(input_signature=[tf.TensorSpec([None, features], tf.float32, name="x")])
        def serve(self, x: Any) -> Any:
            for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
                x = tf.nn.relu(tf.matmul(x, w) + b)
            return {"scores": tf.nn.softmax(tf.matmul(x, self.weights[-1]) + self.biases[-1])}

    return _save(tf, Mlp(), path)


def build_dense(path: str | Path) -> Path:
    """The bigger model of the benchmarks: 16 floats → three dense layers of 1024 units → 3 scores."""
    return build_mlp(path, hidden=(1024, 1024, 1024))


def build_two_io(path: str | Path) -> Path:
    tf = _tf()

    class TwoIO(tf.Module):  # type: ignore[misc]
        @tf.function(
            input_signature=[
                tf.TensorSpec([None, 4], tf.float32, name="a"),
                tf.TensorSpec([None], tf.int64, name="b"),
            ]
        )
        def serve(self, a: Any, b: Any) -> Any:
            s = tf.reduce_sum(a, axis=1)
            return {"total": s + tf.cast(b, tf.float32), "ratio": s / tf.cast(b, tf.float32)}

    return _save(tf, TwoIO(), path)


def build_strings(path: str | Path) -> Path:
    tf = _tf()

    class Strings(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def serve(self, text: Any) -> Any:
            return {"length": tf.strings.length(text), "upper_bytes": tf.strings.upper(text)}

    return _save(tf, Strings(), path)


def build_typed(path: str | Path, dtype: str) -> Path:
    """4 numbers of type `dtype` → their sum as a float32: a model whose input type is the point."""
    tf = _tf()

    class Typed(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[tf.TensorSpec([None, 4], getattr(tf, dtype), name="x")])
        def serve(self, x: Any) -> Any:
            return {"sum": tf.reduce_sum(tf.cast(x, tf.float32), axis=1)}

    return _save(tf, Typed(), path)


def build_tokens(path: str | Path) -> Path:
    """A model of variable-length inputs, as text models take token ids: batches must be rectangular."""
    tf = _tf()
    table = np.random.default_rng(13).normal(0, 1, (100, 4)).astype("float32")

    class Tokens(tf.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = tf.Variable(table)

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int64, name="tokens")])
        def serve(self, tokens: Any) -> Any:
            return {"mean": tf.reduce_mean(tf.gather(self.embeddings, tokens), axis=1)}

    return _save(tf, Tokens(), path)


def build_greedy(path: str | Path) -> Path:
    """A model that runs out of memory for batches of more than one instance, and for [1, …] alone."""
    tf = _tf()

    class Greedy(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def serve(self, x: Any) -> Any:
            # 2**64 bytes: refused at once (TensorFlow's allocator waits 10 s for a size that may fit).
            n = tf.shape(x, out_type=tf.int64)[0] - 1 + tf.cast(tf.reduce_max(x[:, 0]), tf.int64)
            wanted = tf.ones(tf.stack([tf.minimum(n, 1) * 2**62]))
            return {"y": tf.reduce_sum(x, axis=1) + tf.reduce_sum(wanted)}

    return _save(tf, Greedy(), path)


def build_keras_sequential(path: str | Path) -> Path:
    """A Keras Sequential model, 4 floats → 8 relu units → 2 softmax scores, by `model.export`."""
    _tf()
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [keras.Input(shape=(4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2, activation="softmax")]
    )
    model.export(str(path), verbose=False)
    return Path(path)


def build_keras_two_inputs(path: str | Path) -> Path:
    """A Keras functional model: inputs a float32[?,3] and b float32[?,2] → a score [?,1] and 2
    softmax scores [?,2], by `model.export`."""
    _tf()
    import keras

    keras.utils.set_random_seed(5)
    a, b = keras.Input(shape=(3,), name="a"), keras.Input(shape=(2,), name="b")
    joined = keras.layers.Concatenate()([a, b])
    outputs = [keras.layers.Dense(1, name="score")(joined), keras.layers.Dense(2, activation="softmax")(joined)]
    keras.Model(inputs=[a, b], outputs=outputs).export(str(path), verbose=False)
    return Path(path)


def build_unbatched(path: str | Path, output: str) -> Path:
    """x float32[?,2] → an output without one row per instance, as a model exported by mistake
    has: `total`, the sum over the whole batch (a scalar), or `first`, the batch's first row alone."""
    tf = _tf()

    class Unbatched(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def serve(self, x: Any) -> Any:
            return {"total": tf.reduce_sum(x)} if output == "total" else {"first": x[:1]}

    return _save(tf, Unbatched(), path)


def build_inflate(path: str | Path) -> Path:
    """data string[?] (zlib-compressed bytes) → `size` int32[?], the length once decompressed: a
    model that fails on an instance it cannot decompress with TensorFlow's DATA_LOSS error, which
    TF Serving answers with HTTP 500."""
    tf = _tf()

    class Inflate(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="data")])
        def serve(self, data: Any) -> Any:
            return {"size": tf.strings.length(tf.io.decode_compressed(data, compression_type="ZLIB"))}

    return _save(tf, Inflate(), path)


def build_parse_example(path: str | Path) -> Path:
    """examples string[?] of serialized tf.Example protos → `y` float32[?], the sum of their
    feature x (2 floats), as Estimator-era models take their input: a model that needs real values."""
    tf = _tf()

    class ParseExample(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
        def serve(self, examples: Any) -> Any:
            features = tf.io.parse_example(examples, {"x": tf.io.FixedLenFeature([2], tf.float32)})
            return {"y": tf.reduce_sum(features["x"], axis=1)}

    return _save(tf, ParseExample(), path)


def build_typed_output(path: str | Path, dtype: str) -> Path:
    """x float32[?,2] → `y`, their sum as a `dtype`: a model whose output type is the point."""
    tf = _tf()

    class TypedOutput(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def serve(self, x: Any) -> Any:
            return {"y": tf.cast(tf.reduce_sum(x, axis=1), getattr(tf, dtype))}

    return _save(tf, TypedOutput(), path)


def build_first_byte(path: str | Path) -> Path:
    """text string[?] → `first` string[?], its first byte: text that is not valid UTF-8 for any
    text that does not start with an ASCII character (TF Serving writes it as it is)."""
    tf = _tf()

    class FirstByte(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def serve(self, text: Any) -> Any:
            return {"first": tf.strings.substr(text, 0, 1)}

    return _save(tf, FirstByte(), path)


def build_large_output(path: str | Path, side: int, *, declared: bool = True) -> Path:
    """x float32[?,2] → `image` float32[?,side,side], every value x[0]: a model whose predictions
    are many times larger than its instances (a decoder, a segmentation mask). Not `declared`:
    the image's size depends on the values (always `side`), so the signature says [?,?,?]."""
    tf = _tf()

    class LargeOutput(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def serve(self, x: Any) -> Any:
            size = side if declared else tf.cast(tf.reduce_min(x[:, 1]), tf.int32) * 0 + side
            return {"image": tf.zeros([tf.shape(x)[0], size, size]) + x[:, :1, None]}

    return _save(tf, LargeOutput(), path)


BUILDERS = {"mlp": build_mlp, "two_io": build_two_io, "strings": build_strings}


def upload_folder(client: Any, local: str | Path, bucket: str, prefix: str) -> int:
    """Upload every file under `local` to gs://bucket/prefix/…; returns the number of files."""
    local = Path(local)
    count = 0
    b = client.bucket(bucket)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            b.blob(f"{prefix.rstrip('/')}/{p.relative_to(local).as_posix()}").upload_from_filename(str(p))
            count += 1
    return count


def mlp_instances(n: int, *, features: int = 16, seed: int = 0) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    return [[round(float(v), 4) for v in row] for row in rng.normal(0, 1, (n, features))]
