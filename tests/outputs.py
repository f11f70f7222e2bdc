"""Comparing predictions made by runs whose batches differ, on any CPU.

TensorFlow's float32 kernels sum in an order that depends on the batch size and on the CPU's
vector width, so the same instance predicted in a batch of 8 and in a batch of 400 (or on an Intel
and an AMD machine) agrees in all but the last digits: `0.319400638` against `0.319400668`, one
float32 ULP. Every test that compares predictions of differently batched runs (pieces against
the whole file, halved or capped batches, the two backends, parts against one job, a reference
computed in one batch) compares them here: the same lines in the same order, instances, keys and
error lines exactly, and floats within `REL_TOL`/`ABS_TOL`. Where two runs' batches are the same
by construction, a test may compare bytes, and says so.
"""

from __future__ import annotations

import json
import math
from typing import Any

# About 80 float32 ULP: room for sums whose terms cancel (the differences seen are 1–2 ULP), still
# four orders of magnitude below any real mistake (another instance's prediction, a dropped line).
REL_TOL = 1e-5
# For predictions near zero, where a relative tolerance means nothing.
ABS_TOL = 1e-6


def close_to(a: Any, b: Any) -> bool:
    """Equal JSON values, floats within the float32 tolerance above; everything else (strings such as
    "NaN", integers, booleans, keys, lengths) exactly equal."""
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(close_to(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close_to(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
        return numbers and (math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL) or (math.isnan(a) and math.isnan(b)))
    return bool(type(a) is type(b) and a == b)


def assert_same_predictions(got: list[Any], want: list[Any], where: object = "") -> None:
    """`got[k]` is `want[k]` within the tolerance, for every k; the first difference is named
    (with `where`, the case a test is in)."""
    assert len(got) == len(want), f"{where}: {len(got)} predictions, {len(want)} expected"
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert close_to(g, w), f"{where}: prediction {k}: {json.dumps(g)} is not {json.dumps(w)}"


def assert_same_output_lines(got: list[Any], want: list[Any]) -> None:
    """Two runs' output lines (parsed) agree: as many, in the same order, every field but
    `prediction` exactly equal (instance or key, error lines whole), predictions within the tolerance."""
    assert len(got) == len(want), f"{len(got)} output lines, {len(want)} expected"
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        if not (isinstance(g, dict) and isinstance(w, dict)):  # output_format "predictions": bare values
            assert close_to(g, w), f"line {k + 1}: {json.dumps(g)} is not {json.dumps(w)}"
            continue
        assert g.keys() == w.keys(), f"line {k + 1}: fields {sorted(g)} are not {sorted(w)}"
        rest = {key: value for key, value in g.items() if key != "prediction"}
        assert rest == {key: w[key] for key in rest}, f"line {k + 1}: {json.dumps(g)} is not {json.dumps(w)}"
        if "prediction" in g:
            assert close_to(g["prediction"], w["prediction"]), (
                f"line {k + 1}: prediction {json.dumps(g['prediction'])} is not {json.dumps(w['prediction'])}"
            )


def parse_output(data: bytes) -> list[Any]:
    """An output object's lines, each parsed; every line, the last included, ends in a newline."""
    assert data == b"" or data.endswith(b"\n"), "the output's last line has no newline"
    return [json.loads(line) for line in data.split(b"\n")[:-1]]
