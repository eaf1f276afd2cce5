"""LICENSE and CITATION.cff agree with pyproject.toml (licence, version, the paper's DOI)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_license_file_is_the_declared_licence():
    text = (ROOT / "LICENSE").read_text()
    assert PROJECT["license"]["text"] == "BSD-3-Clause"
    assert text.startswith("BSD 3-Clause License")
    assert "Neither the name of the copyright holder" in text  # the third clause


def test_citation_names_this_version_and_the_paper():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    assert cff["version"] == PROJECT["version"] and cff["license"] == "BSD-3-Clause"
    paper = cff["preferred-citation"]
    assert PROJECT["urls"]["Paper"].endswith(paper["doi"])
    assert [a["family-names"] for a in paper["authors"]] == [
        "Baugh",
        "Tan",
        "Müller",
        "Dombrowski",
        "Batten",
        "Kainz",
    ]
    assert paper["year"] == 2023 and paper["volume"] == 14220


def test_api_page_has_a_section_per_public_module():
    """docs/api.md is organised by module (one `## napari_mtml.X` heading each), not by who
    added what."""
    import re

    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    headed = {name for line in headings for name in re.findall(r"`(napari_mtml[\w.]*)`", line)}
    package = ROOT / "src" / "napari_mtml"
    public = {f"napari_mtml.{p.stem}" for p in package.glob("*.py") if not p.stem.startswith("__")}
    public |= {f"napari_mtml.{p.name}" for p in package.iterdir() if (p / "__init__.py").is_file()}
    missing = sorted(public - headed)
    assert not missing, f"docs/api.md has no section for {missing}"
    assert "engineer" not in text and "Additions" not in text
