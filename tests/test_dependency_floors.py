"""The dependency floors in pyproject.toml are true: the code imports nothing undeclared, declares
nothing it does not import, and no floor is older than an API the code uses.

How the floors were determined (keep this table when you change a floor or use a newer API):

- For each runtime dependency, the APIs of this package that are younger than the dependency's
  first Python 3.11 release, each with the version that introduced it (from the project's
  release notes / changelog, named in the `source` column) and a regular expression that finds
  the API in `src/`. An entry whose expression no longer matches anything fails the test, so
  the table cannot keep a floor alive for code that is gone.
- `requires-python >= 3.11` (napari 0.9, current, requires 3.11; CI runs 3.11); so every compiled
  dependency's floor is at least its first release with CPython 3.11 wheels. Those entries have
  no expression: the first 3.11 wheel on PyPI was found with
  `pip install --dry-run --no-deps --only-binary=:all: --python-version 3.11 NAME==VERSION`
  (the release before it has no such wheel).

The check is one way: a floor may be higher than the evidence (e.g. to match napari's own
floors), never lower. When you use an API that is newer than a floor, add a row here and raise
the floor in the same commit.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "napari_mtml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# import name -> distribution name, where they differ
DIST_OF_MODULE = {"PIL": "pillow", "skimage": "scikit-image", "yaml": "pyyaml"}

# (distribution, API, first version with it, regex over src/ or None = Python 3.11 wheels, source)
EVIDENCE = [
    ("numpy", "CPython 3.11 wheels", "1.23.2", None, "PyPI files of numpy 1.23.2 (1.23.1: none)"),
    (
        "scipy",
        "scipy.fft.dstn(..., workers=)",
        "1.4",
        r"scipy\.fft\.dstn\(",
        "SciPy 1.4.0 release notes: the scipy.fft module (workers=)",
    ),
    ("scipy", "CPython 3.11 wheels", "1.9.2", None, "PyPI files of scipy 1.9.2 (1.9.1: none)"),
    (
        "torch",
        "torch.OutOfMemoryError",
        "2.5",
        r"torch\.OutOfMemoryError",
        "PyTorch 2.5 release notes: OutOfMemoryError exposed as torch.OutOfMemoryError",
    ),
    (
        "torch",
        "torch.get_autocast_dtype(device)",
        "2.4",
        r"torch\.get_autocast_dtype\(",
        "PyTorch 2.4 release notes: device-generic autocast API",
    ),
    (
        "torch",
        "torch.load(weights_only=True)",
        "1.13",
        r"weights_only\s*=\s*True",
        "PyTorch 1.13 release notes: torch.load(weights_only=)",
    ),
    ("torch", "CPython 3.11 wheels", "2.0", None, "PyPI files of torch 2.0.0 (1.13: none)"),
    ("nibabel", "CPython 3.11 support", "5.0", None, "nibabel 5.0.0 changelog: Python 3.11"),
    (
        "pydicom",
        "pydicom.pixels (apply_modality_lut, apply_voi)",
        "3.0",
        r"pydicom\.pixels",
        "pydicom 3.0.0 release notes: the pixels backend module replaces pixel_data_handlers",
    ),
    (
        "napari",
        "napari.utils.cancelable_progress",
        "0.5.0",
        r"cancelable_progress",
        "napari 0.5.0 release notes (napari/napari#5728: cancellation of progress)",
    ),
    (
        "superqt",
        "superqt.utils thread workers",
        "0.2.5",
        r"from superqt\.utils import",
        "napari/napari#3668: 'superqt 0.2.5 including the threadworker code'",
    ),
    (
        "scikit-image",
        "CPython 3.11 wheels",
        "0.20",
        None,
        "PyPI files of scikit-image 0.20.0 (0.19.3: none)",
    ),
    (
        "matplotlib",
        "matplotlib.backends.backend_qtagg (Qt6)",
        "3.5",
        r"matplotlib\.backends\.backend_qtagg",
        "Matplotlib 3.5.0 release notes: Qt6 support",
    ),
    ("matplotlib", "CPython 3.11 wheels", "3.6.0", None, "PyPI files of matplotlib 3.6.0"),
    ("pillow", "CPython 3.11 wheels", "9.2.0", None, "PyPI files of Pillow 9.2.0 (9.1.0: none)"),
    ("qtpy", "Qt6 bindings (PyQt6)", "2.0", r"from qtpy", "QtPy 2.0.0 changelog: PyQt6 support"),
]


def _requirements(group: str | None = None) -> dict[str, Requirement]:
    project = PYPROJECT["project"]
    items = project["dependencies"] if group is None else project["optional-dependencies"][group]
    reqs = [Requirement(r) for r in items]
    return {r.name.lower(): r for r in reqs}


def _floor(req: Requirement) -> Version | None:
    """The lowest version the specifier allows (>=, >, ==, ~=), or None if unbounded below."""
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", ">", "==", "~=")]
    return max(lows) if lows else None


def _sources() -> dict[Path, str]:
    return {p: p.read_text() for p in sorted(SRC.rglob("*.py"))}


def _optional_import_lines(tree: ast.AST) -> set[int]:
    """Lines of imports inside `except ImportError` handlers (optional fallbacks)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            for handler in node.handlers:
                names = ast.unparse(handler.type) if handler.type is not None else ""
                if "ImportError" in names or "ModuleNotFoundError" in names:
                    for sub in handler.body:
                        lines.update(n.lineno for n in ast.walk(sub) if hasattr(n, "lineno"))
    return lines


def _third_party_imports() -> dict[str, list[str]]:
    """Top-level module -> files importing it (stdlib, our own package and fallbacks left out)."""
    found: dict[str, list[str]] = {}
    for path, text in _sources().items():
        tree = ast.parse(text)
        optional = _optional_import_lines(tree)
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in optional:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("napari_mtml", "__future__"):
                    continue
                found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def test_every_dependency_has_a_floor():
    for group in (None, *PYPROJECT["project"]["optional-dependencies"]):
        for name, req in _requirements(group).items():
            assert _floor(req) is not None, f"{name} in {group or 'dependencies'} has no floor"


def test_the_code_imports_exactly_the_declared_runtime_dependencies():
    imported = {
        DIST_OF_MODULE.get(m, m).lower(): files for m, files in _third_party_imports().items()
    }
    declared = set(_requirements())
    undeclared = {m: files[:3] for m, files in imported.items() if m not in declared}
    assert not undeclared, f"imported by src/ but not in [project] dependencies: {undeclared}"
    unused = declared - set(imported)
    assert not unused, f"declared in [project] dependencies but imported nowhere in src/: {unused}"


def test_requires_python_and_ruff_target_agree():
    spec = PYPROJECT["project"]["requires-python"]
    assert Requirement(f"python{spec}").specifier.contains("3.11")
    assert not Requirement(f"python{spec}").specifier.contains("3.10")
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"


@pytest.mark.parametrize(
    "dist, api, version, pattern, source", EVIDENCE, ids=[f"{e[0]}:{e[1]}" for e in EVIDENCE]
)
def test_floor_is_not_older_than_what_the_code_uses(dist, api, version, pattern, source):
    req = _requirements()[dist]
    if pattern is not None:
        users = [
            str(p.relative_to(ROOT)) for p, text in _sources().items() if re.search(pattern, text)
        ]
        assert users, (
            f"{api}: nothing in src/ matches {pattern!r} any more; drop or update "
            "this evidence row (and maybe the floor)"
        )
    floor = _floor(req)
    assert floor >= Version(version), (
        f"{dist} floor {floor} is older than {version}, which the code needs for {api} "
        f"({source}); raise the floor in pyproject.toml"
    )


def test_qt_extra_is_napari_s_recommended_binding():
    assert set(_requirements("all")) == {"pyqt6"}
    assert _floor(_requirements("all")["pyqt6"]) > Version("6.5")
