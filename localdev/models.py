"""Small SavedModels built with TensorFlow, for the demo, the tests and the benchmarks.

- `mlp`: x float32[?,16] → one output (3 scores); deterministic weights.
- `two_io`: inputs a float32[?,4] and b int64[?] → outputs total float32[?], ratio float32[?]
  (ratio = sum(a)/b: Infinity when b is 0, NaN when both are 0).
- `strings`: text string[?] → length int32[?] and upper_bytes string[?] (base64 in TF Serving JSON).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

MODEL_NAMES = ("mlp", "two_io", "strings")


def _tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def build_mlp(path: str | Path, *, width: int = 32, features: int = 16, outputs: int = 3, seed: int = 7) -> Path:
    tf = _tf()
    rng = np.random.default_rng(seed)

    class Mlp(tf.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.w1 = tf.Variable(rng.normal(0, 0.3, (features, width)).astype("float32"))
            self.b1 = tf.Variable(rng.normal(0, 0.1, (width,)).astype("float32"))
            self.w2 = tf.Variable(rng.normal(0, 0.3, (width, outputs)).astype("float32"))
            self.b2 = tf.Variable(rng.normal(0, 0.1, (outputs,)).astype("float32"))

        @tf.function(input_signature=[tf.TensorSpec([None, features], tf.float32, name="x")])
        def serve(self, x: Any) -> Any:
            hidden = tf.nn.relu(tf.matmul(x, self.w1) + self.b1)
            return {"scores": tf.nn.softmax(tf.matmul(hidden, self.w2) + self.b2)}

    module = Mlp()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return Path(path)


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

    module = TwoIO()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return Path(path)


def build_strings(path: str | Path) -> Path:
    tf = _tf()

    class Strings(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def serve(self, text: Any) -> Any:
            return {"length": tf.strings.length(text), "upper_bytes": tf.strings.upper(text)}

    module = Strings()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return Path(path)


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
