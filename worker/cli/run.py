"""`run`: one job in this process, with a progress bar from the model's download on, its manifest
printed on stdout; and `describe`: what a model takes and gives."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any

from worker import errors, logs
from worker.cli.common import (
    EXIT_FAILED,
    EXIT_TRANSIENT,
    EXIT_USAGE,
    CommandError,
    check_credentials,
    check_reachable,
    job_of,
    locate,
)
from worker.config import Settings
from worker.jobs import STATUS_FAILED
from worker.pipeline import JobProgress


class ProgressBar:
    """One tqdm bar for the job, advanced in bytes over all its files, its stage on its left."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None
        self._logs = contextlib.ExitStack()

    def __call__(self, p: JobProgress) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=p.bytes_total, unit="B", unit_scale=True, file=sys.stderr, desc=p.stage)
            self._logs.enter_context(logs.above_bar(lambda line: tqdm.write(line, file=sys.stderr)))
        if self._bar.desc != p.stage:
            self._bar.set_description_str(p.stage)
        self._bar.update(min(p.bytes_read, p.bytes_total) - self._bar.n)
        self._bar.set_postfix(files=f"{p.files_done}/{p.files}", lines=p.lines)

    def close(self) -> None:
        if self._bar is not None:
            self._logs.close()
            self._bar.close()
            self._bar = None


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    from worker.app import Runtime

    try:
        job = job_of(args, local=True)
    except errors.InvalidJob as e:
        raise CommandError(str(e), EXIT_USAGE) from None
    publish = not args.no_publish and bool(settings.results_topic)
    if not job.input.is_local:
        check_reachable(os.environ, "STORAGE_EMULATOR_HOST")
        check_credentials(os.environ, "STORAGE_EMULATOR_HOST")
    if publish:
        check_reachable(os.environ, "PUBSUB_EMULATOR_HOST")
        check_credentials(os.environ, "PUBSUB_EMULATOR_HOST")
    try:
        rt = Runtime.from_settings(settings, publish=publish, local=job.input.is_local)
    except ValueError as e:
        raise CommandError(str(e), EXIT_USAGE) from None
    bar = ProgressBar(enabled=not args.quiet)
    try:
        outcome = rt.run_job(job, progress=bar)
    except errors.TransientError as e:
        raise CommandError(str(e), EXIT_TRANSIENT) from None
    finally:
        bar.close()
        rt.close()
    print(json.dumps(outcome.manifest, indent=2))
    if outcome.status == STATUS_FAILED:
        error = outcome.manifest.get("error") or {}
        print(f"error: job {job.job_id} FAILED ({error.get('code')}): {error.get('message')}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def describe_command(args: argparse.Namespace, settings: Settings) -> int:
    from worker.app import store_for
    from worker.describe import describe

    try:
        model = locate(args.model, "model")
    except errors.InvalidJob as e:
        raise CommandError(str(e), EXIT_USAGE) from None
    if not model.is_local:
        check_reachable(os.environ, "STORAGE_EMULATOR_HOST")
        check_credentials(os.environ, "STORAGE_EMULATOR_HOST")
    store = store_for(settings, local=model.is_local)
    try:
        described = describe(store, model, settings.work_dir, args.signature_name)
    except errors.InvalidJob as e:
        raise CommandError(str(e), EXIT_USAGE) from None
    except errors.TransientError as e:
        raise CommandError(str(e), EXIT_TRANSIENT) from None
    except errors.PermanentError as e:
        raise CommandError(str(e), EXIT_FAILED) from None
    print(json.dumps(described, indent=2))
    return 0
