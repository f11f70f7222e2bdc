"""JSON-lines logging that Cloud Logging reads (`severity`, `message`), with the job id bound per job."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

_job_fields: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("job_fields", default=None)


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


def setup(level: str = "INFO") -> None:
    """Route the root logger to stderr as JSON lines. Idempotent."""
    root = logging.getLogger()
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
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
