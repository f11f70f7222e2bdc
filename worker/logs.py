"""Logging: JSON lines that Cloud Logging reads (`severity`, `message`), with the job id bound per
job; or, for a person at a terminal, plain lines of time, level and message."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

_job_fields: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("job_fields", default=None)
# While a progress bar is drawn on stderr: how a log line is written above it instead of into it.
_write_through: Callable[[str], None] | None = None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": record.levelname,
            "message": record.getMessage(),
            "logger": record.name,
        }
        entry.update(_job_fields.get() or {})
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["stack_trace"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """`12:01:02 INFO message` — for a terminal; the job id is in the CLI's own output."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines to stderr, through the progress bar's writer while there is one (`above_bar`)."""

    def emit(self, record: logging.LogRecord) -> None:
        write = _write_through
        if write is None:
            super().emit(record)
            return
        try:
            write(self.format(record))
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def above_bar(write: Callable[[str], None]) -> Iterator[None]:
    """Inside the block, log lines go through `write` (a progress bar's: it clears the bar, writes
    the line and draws the bar again below it)."""
    global _write_through
    _write_through = write
    try:
        yield
    finally:
        _write_through = None


def setup(level: str = "INFO", fmt: str = "json") -> None:
    """Route the root logger to stderr: JSON lines, or text lines (`fmt` "text", or "auto" when
    stderr is a terminal). Idempotent."""
    text = fmt == "text" or (fmt == "auto" and sys.stderr.isatty())
    formatter: logging.Formatter = TextFormatter() if text else JsonFormatter()
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h.formatter, (JsonFormatter, TextFormatter))]
    if ours:
        ours[0].setFormatter(formatter)
    else:
        handler = _StderrHandler(sys.stderr)
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("urllib3", "google", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


@contextlib.contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Add `fields` (e.g. job_id) to every log entry written inside the block."""
    token = _job_fields.set({**(_job_fields.get() or {}), **fields})
    try:
        yield
    finally:
        _job_fields.reset(token)
