"""The README documents every setting the worker reads."""

from __future__ import annotations

from pathlib import Path

from worker.config import ENV_VARS

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_in_the_readme_configuration_table():
    table = [line for line in README.read_text().splitlines() if line.startswith("| `")]
    missing = [var for var, _, _ in ENV_VARS if not any(f"`{var}`" in row for row in table)]
    assert missing == []
