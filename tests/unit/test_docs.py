"""Docs that code and configs lean on exist, and the README's settings table is complete."""

from __future__ import annotations

import re
from pathlib import Path

from editserve.config import Settings

ROOT = Path(__file__).resolve().parents[2]
CITED_DOC = re.compile(r"\bdocs/[\w.-]+\.md\b")


def _citing_files() -> list[Path]:
    found = [ROOT / "README.md", ROOT / "Dockerfile", ROOT / "Makefile"]
    for pattern in ("configs/**/*.yaml", "methods/configs/**/*.yaml", "docs/**/*.md"):
        found += ROOT.glob(pattern)
    for package in ("editserve", "methods", "memory", "bench", "tests"):
        found += (ROOT / package).rglob("*.py")
    return found


def test_every_cited_doc_exists() -> None:
    missing = sorted(
        f"{path.relative_to(ROOT)} cites {doc}"
        for path in _citing_files()
        for doc in set(CITED_DOC.findall(path.read_text(encoding="utf-8")))
        if not (ROOT / doc).is_file()
    )
    assert not missing, missing


def test_the_method_configs_cite_only_docs_that_exist() -> None:
    # The narrow case on its own: a config's comment is where a tuned value is justified.
    yamls = list((ROOT / "methods" / "configs").rglob("*.yaml"))
    assert yamls
    cited = {doc for path in yamls for doc in CITED_DOC.findall(path.read_text(encoding="utf-8"))}
    assert all((ROOT / doc).is_file() for doc in cited), cited


def _readme_settings_table() -> set[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return {name for row in rows for name in re.findall(r"`(EDITSERVE_[A-Z0-9_]+)`", row)}


def test_every_setting_is_in_the_readme_table() -> None:
    settings = {f"EDITSERVE_{name.upper()}" for name in Settings.model_fields}
    settings.add("EDITSERVE_CONFIG")  # read by Settings.load, not a field
    missing = sorted(settings - _readme_settings_table())
    assert not missing, f"settings missing from the README's table: {missing}"
