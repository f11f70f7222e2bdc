"""What can be checked of the image without a Docker engine: the files it copies exist, and it
serves the same source and targets the tests serve."""

from __future__ import annotations

import re
from pathlib import Path

from worker import main

ROOT = Path(__file__).resolve().parents[2]


def test_copied_files_exist_and_entry_point_matches():
    text = (ROOT / "Dockerfile").read_text()
    copied = re.findall(r"^COPY\s+(\S+)\s", text, flags=re.M)
    assert copied, "the Dockerfile copies nothing"
    for src in copied:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert "--source worker/main.py" in text
    target = re.search(r"FUNCTION_TARGET=(\w+)", text)
    assert target and callable(getattr(main, target.group(1)))
    assert callable(main.handle_http)
    assert "USER worker" in text
