"""Command line: `embedded-tf run | describe | submit` (`python -m worker …` from a checkout).

parser.py   arguments, and each command's --help with the settings that apply to it
common.py   exit codes, the job a command line gives, reachability and credential checks
run.py      `run` (a job here, with a progress bar) and `describe` (a model's signatures)
submit.py   `submit` (a job for the deployed worker) and `--wait` for its completion
"""

from __future__ import annotations

import os
import sys

from worker import logs
from worker.cli.common import EXIT_FAILED, EXIT_TRANSIENT, EXIT_USAGE, CommandError
from worker.cli.parser import build_parser
from worker.config import Settings

__all__ = ["EXIT_FAILED", "EXIT_TRANSIENT", "EXIT_USAGE", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env(os.environ)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    logs.setup(settings.log_level, settings.log_format)
    try:
        if args.command == "describe":
            from worker.cli.run import describe_command

            return describe_command(args, settings)
        if args.command == "submit":
            from worker.cli.submit import submit_command

            return submit_command(args, settings)
        from worker.cli.run import run_command

        return run_command(args, settings)
    except CommandError as e:
        transient = " (transient, try again)" if e.status == EXIT_TRANSIENT else ""
        print(f"error{transient}: {e}", file=sys.stderr)
        return e.status
