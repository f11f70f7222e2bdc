"""The benchmark's --quick mode as a smoke test: it must run to the end and report every figure.
It asserts no speed: figures are measured and printed by the benchmark, not judged by tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from worker.config import Settings

REPO = Path(__file__).resolve().parents[2]


def _run_quick(module: str, figures: Path) -> subprocess.CompletedProcess[str]:
    """`python -m <module> --quick`, which must run to the end."""
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--json", str(figures)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_quick_benchmark_runs_and_reports_every_figure(tmp_path):
    figures = tmp_path / "bench.json"
    proc = _run_quick("benchmarks.run", figures)
    headings = (
        "limit: signature on tensors",
        "worker, event (warm)",
        "floor beside it",
        "storage alone",
        "original approach",
        "cold (new process)",
        "Where an event job's time goes",
        "files waited for output",
        "same job, no storage I/O",
        "the import measured next to each cold start",
    )
    for heading in (*headings, "Memory bound", "with the files in flight together"):
        assert heading in proc.stdout
    mlp = json.loads(figures.read_text())["mlp"]
    # The curve of --quick, and the worker's own batch size added to it.
    assert set(mlp["limit"]) == set(mlp["floor"]) == {"64", "256", str(Settings.batch_size)}
    for label in ("1MB", "4MB", "1MB in 10 files"):
        run = mlp["event"][label]
        assert run["instances"] > 0 and run["seconds"] > 0 and run["peak_rss"] > 0
        assert run["output_bytes"] > 0 and mlp["storage_s"][label] > 0
        # Each job is paired with a pass of the floor run just before it.
        assert run["floor_rate"] > 0 and run["paired_ratio"] > 0
        # CPU seconds are read from /proc in clock ticks (10 ms): fake-gcs-server can serve a
        # 1 MB job within one tick, so 0.0 is a true reading. The worker parses and predicts
        # thousands of lines, many ticks' worth, on any machine.
        assert run["cpu_s"] > 0 and run["emulator_cpu_s"] >= 0
        # From the manifest: every output is stored after its last batch, which takes time.
        assert run["input_wait_s"] > 0 and run["output_wait_s"] > 0
        # The same job without storage I/O predicted every line the event job did, beside a floor.
        alone = mlp["no_io"][label]
        assert alone["instances"] == run["instances"] and alone["seconds"] > 0
        assert alone["floor_rate"] > 0 and alone["paired_ratio"] > 0
    assert mlp["event"]["cold_s"] > 0 and mlp["event"]["cold_import_s"] > 0
    assert {"1MB", "4MB", "1MB in 10 files", "1MB in 10 files (one file at a time)"} <= set(mlp["cli"])
    assert set(mlp["memory"]) == {"1MB", "16MB"}
    assert mlp["memory"]["16MB"]["instances"] > mlp["memory"]["1MB"]["instances"] > 0
    assert {"1MB", "4MB", "1MB in 10 files"} <= set(mlp["original"])


def test_quick_files_in_flight_benchmark_runs_and_reports_every_figure(tmp_path):
    figures = tmp_path / "flight.json"
    proc = _run_quick("benchmarks.files_in_flight", figures)
    assert "| added latency | 1 in flight | 8 in flight |" in proc.stdout
    rates = json.loads(figures.read_text())["rates"]
    assert set(rates) == {"0.0", "20.0"}
    assert all(set(r) == {"1", "8"} and min(r.values()) > 0 for r in rates.values())


def test_quick_parts_benchmark_runs_and_reports_every_figure(tmp_path):
    figures = tmp_path / "parts.json"
    proc = _run_quick("benchmarks.parts", figures)
    assert "| input, job | seconds | instances/s |" in proc.stdout
    runs = json.loads(figures.read_text())["runs"]
    assert set(runs) == {"tree, one job", "tree, parts: 2", "one file, one job", "one file, parts: 2"}
    assert all(r["seconds"] > 0 and r["cpu_s"] > 0 for r in runs.values())
