"""The napari manifest at the repository root is what napari loads, editable and from a wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "napari.yaml"


def _commands(manifest: dict) -> set[str]:
    return {c["python_name"] for c in manifest["contributions"]["commands"]}


def test_root_manifest_is_the_package_manifest():
    packaged = ROOT / "src" / "napari_mtml" / "napari.yaml"
    assert packaged.read_bytes() == MANIFEST.read_bytes()


def test_editable_install_loads_root_manifest():
    npe2 = pytest.importorskip("npe2")
    pm = npe2.PluginManifest.from_distribution("napari-mtml")
    root = yaml.safe_load(MANIFEST.read_text())
    assert pm.name == root["name"] == "napari-mtml"
    assert {c.python_name for c in pm.contributions.commands} == _commands(root)
    # every command named in the manifest resolves to a real object
    for cmd in pm.contributions.commands:
        module, _, attr = cmd.python_name.partition(":")
        mod = __import__(module, fromlist=[attr])
        assert callable(getattr(mod, attr)), cmd.python_name


@pytest.mark.slow
def test_built_wheel_carries_root_manifest(tmp_path):
    pytest.importorskip("npe2")
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = wheel_dir.glob("napari_mtml-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert zf.read("napari_mtml/napari.yaml") == MANIFEST.read_bytes()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        text = zf.read(entry_points).decode()
        assert "[napari.manifest]" in text and "napari_mtml:napari.yaml" in text
        assert any(n.startswith("napari_mtml/sample_data/") for n in names), "sample data missing"

    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    # In a fresh interpreter whose path puts the installed wheel first, npe2 must find the
    # manifest inside that wheel's files (not the editable checkout).
    probe = (
        "import npe2, napari_mtml, pathlib\n"
        "pm = npe2.PluginManifest.from_distribution('napari-mtml')\n"
        "print(pm.name, len(pm.contributions.commands))\n"
        "print(pathlib.Path(napari_mtml.__file__).resolve())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    ).stdout.split("\n")
    root = yaml.safe_load(MANIFEST.read_text())
    assert out[0] == f"napari-mtml {len(root['contributions']['commands'])}"
    assert Path(out[1]).is_relative_to(target.resolve())
