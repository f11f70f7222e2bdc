"""`make local`: the local cloud (see `localdev.cloud`) kept running until Ctrl-C, for trying the
worker from another terminal: `source .local-cloud.env`, then `embedded-tf submit --wait …`,
`embedded-tf run …` on gs:// paths, or any client library.

Run: make local   (or: PYTHONPATH=. .venv/bin/python -m localdev.local [ENV_FILE])
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from localdev import cloud

ENV_FILE = Path(__file__).resolve().parents[1] / ".local-cloud.env"


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def main(argv: list[str]) -> int:
    env_file = Path(argv[0]) if argv else ENV_FILE
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    local = cloud.start(say)
    try:
        lines = [f"export {name}={shlex.quote(value)}" for name, value in local.exports.items()]
        env_file.write_text("\n".join(lines) + "\n")
        say(f"running; in another terminal, `source {os.path.relpath(env_file)}` (or paste these lines):")
        print("\n".join(lines))
        say(
            f"the example model is gs://{cloud.MODELS_BUCKET}/mlp/, 250 instances are under "
            f"gs://{cloud.DATA_BUCKET}/in/; the worker takes jobs from {local.jobs_topic} "
            f"(its log: {local.worker.log_path}). Ctrl-C stops everything."
        )
        stop.wait()
        return 0
    finally:
        say("stopping the worker and the emulators")
        env_file.unlink(missing_ok=True)
        local.stop()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
