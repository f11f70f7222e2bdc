"""Input formats side by side: the same instances as JSON lines and as CSV (the MLP), and the same
tf.Example records as JSON lines of {"b64": …} and as a TFRecord file (a model that parses them),
each job run by the worker on local paths in this process just after a pass of the floor on the
same instances; then the peak RSS of a CLI job on a larger file of each.

    PYTHONPATH=. .venv/bin/python -m benchmarks.formats            # about 3 minutes
    PYTHONPATH=. .venv/bin/python -m benchmarks.formats --quick    # a smoke run

÷ floor is the median over the jobs of each job's rate ÷ the floor pass just before it, and
÷ JSON lines the same for the format's jobs against the JSON-lines jobs beside them.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.measure import (
    RssSampler,
    Stopwatch,
    command_line,
    emit,
    human,
    median,
    parse_size,
    parse_with_defaults,
    table,
)
from localdev import models

FEATURES = 16
ROOT = Path(__file__).resolve().parents[1]


def _mlp_rows(n: int, seed: int = 0) -> np.ndarray:
    return np.round(np.random.default_rng(seed).normal(0, 1, (n, FEATURES)), 4)


def _jsonl(rows: np.ndarray) -> bytes:
    return "".join("[" + ",".join(f"{v:.4f}" for v in row) + "]\n" for row in rows).encode()


def _csv(rows: np.ndarray) -> bytes:
    header = ",".join(f"f{k}" for k in range(FEATURES)) + "\n"
    return (header + "".join(",".join(f"{v:.4f}" for v in row) + "\n" for row in rows)).encode()


def _examples(n: int, distinct: int = 10_000) -> list[bytes]:
    """Serialized tf.Examples of feature x (2 floats); `distinct` of them, repeated to `n`."""
    import tensorflow as tf

    values = np.random.default_rng(1).normal(0, 1, (min(n, distinct), 2))
    made = [
        tf.train.Example(
            features=tf.train.Features(feature={"x": tf.train.Feature(float_list=tf.train.FloatList(value=list(v)))})
        ).SerializeToString()
        for v in values
    ]
    return [made[i % len(made)] for i in range(n)]


def _tfrecord(records: list[bytes]) -> bytes:
    from worker.storage.formats import tfrecord_crc

    out = []
    for r in records:
        length = struct.pack("<Q", len(r))
        out += [length, struct.pack("<I", tfrecord_crc(length)), r, struct.pack("<I", tfrecord_crc(r))]
    return b"".join(out)


def _b64_jsonl(records: list[bytes]) -> bytes:
    return b"".join(b'{"b64":"' + base64.b64encode(r) + b'"}\n' for r in records)


@dataclasses.dataclass
class Case:
    """A model, the floor over its instances, and its input files by format."""

    model: Path
    floor: Callable[[], float]  # instances/s of one pass of the floor
    files: dict[str, Path]
    instances: int


def _mlp_case(tmp: Path, n: int, batch: int) -> Case:
    from benchmarks.run import _signature, floor_pass

    model = models.build_mlp(tmp / "mlp")
    rows = _mlp_rows(n)
    lines = _jsonl(rows)
    files = {"jsonl": tmp / "mlp-in" / "in.jsonl", "csv": tmp / "mlp-in" / "in.csv"}
    files["jsonl"].parent.mkdir()
    files["jsonl"].write_bytes(lines)
    files["csv"].write_bytes(_csv(rows))
    tf, fn = _signature(model)
    split = lines.splitlines()
    return Case(model, lambda: floor_pass(tf, fn, split, batch), files, n)


def _examples_case(tmp: Path, n: int, batch: int) -> Case:
    import orjson
    import tensorflow as tf

    from worker.serving.jsonvalues import tf_serving_floats

    model = models.build_parse_example(tmp / "parse")
    records = _examples(n)
    files = {"jsonl": tmp / "pe-in" / "in.jsonl", "tf-record": tmp / "pe-in" / "in.tfrecord"}
    files["jsonl"].parent.mkdir()
    files["jsonl"].write_bytes(_b64_jsonl(records))
    files["tf-record"].write_bytes(_tfrecord(records))
    fn = tf.saved_model.load(str(model)).signatures["serving_default"]
    lines = files["jsonl"].read_bytes().splitlines()

    def floor() -> float:
        """parse → decode → predict → encode in memory, the input line copied into the output line."""
        clock = Stopwatch()
        for i in range(0, len(lines), batch):
            chunk = lines[i : i + batch]
            data = [base64.b64decode(orjson.loads(line)["b64"]) for line in chunk]
            ys = tf_serving_floats(fn(examples=tf.constant(data))["y"].numpy()).tolist()
            b"".join(
                b'{"instance":' + line + b',"prediction":' + orjson.dumps(y) + b"}\n"
                for line, y in zip(chunk, ys, strict=True)
            )
        return len(lines) / clock.elapsed

    return Case(model, floor, files, n)


def _speed(case: Case, repeat: int, tmp: Path, batch: int) -> dict[str, dict[str, float]]:
    """Each format's jobs, in turn, each just after a floor pass; medians of the ratios."""
    from worker.app import Runtime
    from worker.config import Settings
    from worker.jobs import Job
    from worker.uris import Uri

    settings = Settings(work_dir=str(tmp / "work"), batch_size=batch, log_level="WARNING")
    rt = Runtime.from_settings(settings, publish=False, local=True)
    rates: dict[str, list[float]] = {fmt: [] for fmt in case.files}
    floors: dict[str, list[float]] = {fmt: [] for fmt in case.files}
    try:
        for k in range(repeat + 1):  # the first round warms the model up, and is not counted
            for fmt, path in case.files.items():
                floor = case.floor()
                out = tmp / "out" / f"{path.stem}-{fmt}-{k}"
                job = Job(f"bench-{fmt}-{k}", Uri.local(str(case.model), folder=True),
                          Uri.local(str(path), folder=False), Uri.local(str(out), folder=True))  # fmt: skip
                clock = Stopwatch()
                outcome = rt.run_job(job)
                elapsed = clock.elapsed
                assert outcome.manifest["totals"]["predictions"] == case.instances, outcome.manifest
                if k:
                    rates[fmt].append(case.instances / elapsed)
                    floors[fmt].append(floor)
    finally:
        rt.close()
    base = rates["jsonl"]
    return {
        fmt: {
            "rate": median(rates[fmt]),
            "floor": median(floors[fmt]),
            "of_floor": median(r / f for r, f in zip(rates[fmt], floors[fmt], strict=True)),
            "of_jsonl": median(r / b for r, b in zip(rates[fmt], base, strict=True)),
        }
        for fmt in case.files
    }


def _peak_rss(case: Case, tmp: Path, fmt: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORKER_WORK_DIR": str(tmp / "work-cli"), "NO_GCE_CHECK": "true"}
    out = tmp / "out-mem" / fmt
    argv = ["run", "--model", str(case.model), "--input", str(case.files[fmt]), "--output", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "worker", *argv, "--quiet", "--output-format", "predictions"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    with RssSampler([proc.pid]) as sampler:
        _, err = proc.communicate()
    assert proc.returncode == 0, err
    return sampler.peak


def measure(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="embedded-tf-formats-") as tmp_dir:
        tmp = Path(tmp_dir)
        for name, make in (("mlp", _mlp_case), ("parse_example", _examples_case)):
            case = make(tmp / name, args.instances, args.batch_size)
            results[name] = {"speed": _speed(case, args.repeat, tmp / name, args.batch_size)}
            big = make(tmp / f"{name}-big", args.memory_instances, args.batch_size)
            results[name]["memory"] = {
                fmt: {"bytes": path.stat().st_size, "peak_rss": _peak_rss(big, tmp / f"{name}-big", fmt)}
                for fmt, path in big.files.items()
            }
    results["instances"], results["memory_instances"] = args.instances, args.memory_instances
    return results


def report(results: dict[str, Any]) -> str:
    parts = []
    for name in ("mlp", "parse_example"):
        speed, memory = results[name]["speed"], results[name]["memory"]
        rows = [
            [
                fmt,
                f"{s['rate']:,.0f}",
                f"{s['floor']:,.0f}",
                f"{s['of_floor']:.2f}",
                f"{s['of_jsonl']:.2f}",
                human(memory[fmt]["bytes"]),
                f"{memory[fmt]['peak_rss'] / 2**20:,.0f} MB",
            ]
            for fmt, s in speed.items()
        ]
        heading = (
            f"{name}: {results['instances']:,} instances; peak RSS of a CLI job on {results['memory_instances']:,}"
        )
        headers = ["format", "instances/s", "floor beside", "÷ floor", "÷ JSON lines", "file (memory run)", "peak RSS"]
        parts.append(heading + "\n\n" + table(headers, rows))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = command_line(__doc__ or "", "a smoke run: fewer instances, one repeat")
    parser.add_argument("--instances", type=lambda s: int(parse_size(s)), help="instances per job (default 200000)")
    parser.add_argument(
        "--memory-instances", type=lambda s: int(parse_size(s)), help="for the memory runs (default 2000000)"
    )
    parser.add_argument("--repeat", type=int, help="jobs per format (default 5)")
    parser.add_argument("--batch-size", type=int, default=1024, help="instances per prediction call (1024)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parse_with_defaults(
        parser,
        argv,
        quick={"instances": 5000, "memory_instances": 20_000, "repeat": 1},
        full={"instances": 200_000, "memory_instances": 2_000_000, "repeat": 5},
    )
    results = measure(args)
    emit(report(results), results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
