"""Measuring tools for the benchmarks: peak RSS of process trees, medians, sizes, input files."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
UNITS = {"KB": 2**10, "MB": 2**20, "GB": 2**30}


def parse_size(text: str) -> int:
    """'10MB' → 10485760 (binary units, as the table prints them)."""
    text = text.strip().upper()
    for unit, factor in UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def human(n_bytes: float) -> str:
    for unit in ("GB", "MB", "KB"):
        if n_bytes >= UNITS[unit]:
            return f"{n_bytes / UNITS[unit]:.0f}{unit}"
    return f"{n_bytes:.0f}B"


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pids: Iterable[int]) -> list[int]:
    """These processes and all their descendants."""
    tree = _children()
    todo, seen = list(pids), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(tree.get(pid, ()))
    return sorted(seen)


def tree_cpu_s(pids: Iterable[int]) -> float:
    """CPU seconds (user + system) used so far by these processes and their live descendants."""
    total = 0
    for pid in _descendants(pids):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLOCK_TICKS


def tree_rss(pids: Iterable[int]) -> int:
    """Resident bytes of these processes and all their descendants."""
    total = 0
    for pid in _descendants(pids):
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            pass
    return total


class RssSampler:
    """Samples the RSS of process trees every `interval_s` in a thread; `peak` is the highest sum.
    With `cap_bytes`, kills the trees (SIGKILL to their process groups) once they exceed it."""

    def __init__(self, pids: Iterable[int], *, interval_s: float = 0.05, cap_bytes: int | None = None) -> None:
        self.pids = list(pids)
        self.interval_s = interval_s
        self.cap_bytes = cap_bytes
        self.peak = 0
        self.capped = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = tree_rss(self.pids)
            self.peak = max(self.peak, rss)
            if self.cap_bytes is not None and rss > self.cap_bytes and not self.capped:
                self.capped = True
                for pid in self.pids:
                    with contextlib.suppress(OSError):
                        os.killpg(os.getpgid(pid), signal.SIGKILL)
            self._stop.wait(self.interval_s)


def instance_block(rows: int, features: int, seed: int = 0) -> bytes:
    """`rows` JSON lines of `features` floats (4 decimals), like a typical exported feature file."""
    rng = np.random.default_rng(seed)
    values = rng.normal(0, 1, (rows, features))
    return "".join("[" + ",".join(f"{v:.4f}" for v in row) + "]\n" for row in values).encode()


def write_input(path: Path, n_bytes: int, *, features: int = 16, block_rows: int = 20_000) -> int:
    """A JSON-lines file of about `n_bytes` (whole lines); returns its line count."""
    block = instance_block(block_rows, features)
    lines_per_block = block.count(b"\n")
    written = lines = 0
    with path.open("wb") as f:
        while written + len(block) <= n_bytes:
            f.write(block)
            written += len(block)
            lines += lines_per_block
        rest = block[: max(0, n_bytes - written)]
        rest = rest[: rest.rfind(b"\n") + 1]
        f.write(rest)
        lines += rest.count(b"\n")
    return lines


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def command_line(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first paragraph says what it does, the rest (the
    commands) goes after the options, and --quick selects the smoke run."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help=quick_help)
    return parser


def parse_with_defaults(
    parser: argparse.ArgumentParser, argv: list[str] | None, quick: Mapping[str, Any], full: Mapping[str, Any]
) -> argparse.Namespace:
    """The arguments, each one not given taken from `quick` or `full` as --quick says."""
    args = parser.parse_args(argv)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def emit(text: str, results: Any, json_path: str | None) -> None:
    """Print a benchmark's report, and write its figures as JSON when --json names a file (objects
    written as their attributes)."""
    print(text)
    if json_path:
        Path(json_path).write_text(json.dumps(results, default=lambda o: o.__dict__, indent=2))
