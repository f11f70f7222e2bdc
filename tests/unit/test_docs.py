"""The docs and `--help` document every setting the worker reads, with its default; the benchmarks
doc holds the latest tables; the README stays a short front door whose links all lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from worker.cli import build_parser
from worker.cli.parser import _DESCRIBE, _EVENTS_ONLY, _SUBMIT
from worker.config import ENV_VARS, Settings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"


def test_every_setting_is_in_the_configuration_table():
    table = [line for line in CONFIGURATION.read_text().splitlines() if line.startswith("| `")]
    missing = [var for var, _, _ in ENV_VARS if not any(f"`{var}`" in row for row in table)]
    assert missing == []


def _default_cells() -> dict[str, str]:
    """The configuration table's default cell of each variable."""
    cells = {}
    for line in CONFIGURATION.read_text().splitlines():
        if line.startswith("| `"):
            variables, default = line.split("|")[1:3]
            for var in variables.replace("`", "").split(","):
                cells[var.strip()] = default.strip().strip("`")
    return cells


def test_the_configuration_table_s_defaults_are_the_worker_s():
    cells, defaults = _default_cells(), Settings()
    for var, name, _ in ENV_VARS:
        default = getattr(defaults, name)
        if var == "WORKER_WORK_DIR":
            assert cells[var] == "$TMPDIR/embedded-tf" and default.endswith("/embedded-tf")
        elif default in ("", 0):  # not set
            assert cells[var].startswith("—"), var
        else:
            assert cells[var] == str(default), var


@pytest.mark.parametrize("command", ["run", "describe", "submit"])
def test_each_command_s_help_gives_the_settings_that_apply_to_it_with_their_defaults(
    capsys: pytest.CaptureFixture[str], command: str
):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    defaults = Settings()
    environment = text.split("environment (default in brackets):")[1].splitlines()
    listed = {line.split()[0] for line in environment if line.startswith("  ")}
    applies = {
        "run": {var for var, _, _ in ENV_VARS} - _EVENTS_ONLY | {"STORAGE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST"},
        "describe": _DESCRIBE | {"STORAGE_EMULATOR_HOST"},
        "submit": _SUBMIT | {"PUBSUB_EMULATOR_HOST"},
    }[command]
    assert listed == applies
    for var, name, _ in ENV_VARS:
        if var in listed:
            line = next(line for line in environment if line.strip().startswith(var + " "))
            default = getattr(defaults, name)
            assert (f"[{default}]" in line) == (default not in ("", 0)), line
    if command == "run":
        assert f"WORKER_BATCH_SIZE or {defaults.batch_size})" in " ".join(text.split())
        assert "WORKER_MODEL " not in text and "WORKER_GIVE_UP_AFTER_SECONDS" not in text


def test_the_benchmarks_doc_holds_the_tables_of_every_model():
    """docs/benchmarks.md holds the latest run's tables, under the benchmark's own headings, with
    the columns it prints now."""
    from benchmarks.run import MODEL_TEXT

    section = BENCHMARKS.read_text()
    for model, description in MODEL_TEXT.items():
        heading = f"#### {model} ({description})"
        assert heading in section, heading
        part = section[section.index(heading) :]
        assert "| batch | limit: signature on tensors | floor: parse → predict → encode |" in part
        assert "| input | worker, event (warm) | floor beside it | ÷ floor | storage alone |" in part
        rows = [line for line in part.splitlines()[:40] if line.startswith(("| 10MB", "| 100MB"))]
        assert len(rows) >= 3 * 2, (model, rows)  # 10 MB, its tree and 100 MB, in both tables


def test_the_readme_is_a_short_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 300 and len(text.encode()) <= 15 * 1024
    assert "make demo" in text and "make test" in text


@pytest.mark.parametrize("doc", [README, ROOT / "DEVELOPMENT.md", *sorted((ROOT / "docs").glob("*.md"))])
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(doc):
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        assert linked.exists(), f"{doc.name} links to {target}"
        if anchor:
            headings = [_anchor(h) for h in re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)]
            assert anchor in headings, f"{doc.name} links to {target}: no such heading"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
