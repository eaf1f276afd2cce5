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
        "Baugh", "Tan", "Müller", "Dombrowski", "Batten", "Kainz"]
    assert paper["year"] == 2023 and paper["volume"] == 14220
