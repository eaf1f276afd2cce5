"""The layering rule of ARCHITECTURE.md, checked on the source itself.

- only `napari_mtml._napari` imports napari, Qt or magicgui;
- `napari_mtml._napari` holds no science: it imports neither scipy nor the internals of
  `napari_mtml.anomalies` (only the package's public names);
- `napari_mtml.anomalies` imports nothing but numpy, scipy and the standard library;
- no module uses numpy's global random state or an unseeded generator.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "napari_mtml"
GUI = {"napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy"}
GLOBAL_RANDOM_OK = {"default_rng", "Generator", "SeedSequence", "PCG64", "BitGenerator"}
# The one unseeded generator: `synthesize(..., rng=None)` draws a fresh `default_rng()` when the
# caller asks for it by passing None (as scikit-image does); nothing inside the package does.
UNSEEDED_OK = {"anomalies/recipe.py"}


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _imported_modules(tree: ast.AST) -> set[str]:
    """Every module a file imports, fully named (relative imports resolved to `napari_mtml.`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _imported_roots(tree: ast.AST) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_only_the_napari_layer_imports_gui():
    offenders = [
        f"{p.relative_to(PKG)}: {sorted(_imported_roots(t) & GUI)}"
        for p, t in _modules()
        if "_napari" not in p.parts and _imported_roots(t) & GUI
    ]
    assert not offenders, offenders


def test_the_widgets_hold_no_science():
    offenders = []
    for path, tree in _modules():
        if "_napari" not in path.parts:
            continue
        for name in sorted(_imported_modules(tree)):
            if name.split(".")[0] == "scipy" or name.startswith("napari_mtml.anomalies."):
                if name.count(".") == 2 and name.rsplit(".", 1)[1] in _public_anomalies():
                    continue  # `from napari_mtml.anomalies import TASKS`: the public API
                offenders.append(f"{path.relative_to(PKG)}: {name}")
    assert not offenders, offenders


def _public_anomalies() -> set[str]:
    import napari_mtml.anomalies

    return set(napari_mtml.anomalies.__all__)


def test_anomalies_use_numpy_and_scipy_only():
    allowed = {"numpy", "scipy", "napari_mtml", "__future__"} | set(sys.stdlib_module_names)
    offenders = [
        f"{p.relative_to(PKG)}: {sorted(_imported_roots(t) - allowed)}"
        for p, t in _modules()
        if "anomalies" in p.parts and _imported_roots(t) - allowed
    ]
    assert not offenders, offenders


def test_no_global_random_state():
    offenders = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            # np.random.<fn>(...) other than constructing explicit generators
            if (
                isinstance(f, ast.Attribute)
                and isinstance(f.value, ast.Attribute)
                and f.value.attr == "random"
                and isinstance(f.value.value, ast.Name)
                and f.value.value.id in {"np", "numpy"}
                and f.attr not in GLOBAL_RANDOM_OK
            ):
                offenders.append(f"{path.relative_to(PKG)}:{node.lineno} np.random.{f.attr}")
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if (
                name == "default_rng"
                and not node.args
                and not node.keywords
                and str(path.relative_to(PKG)) not in UNSEEDED_OK
            ):
                offenders.append(f"{path.relative_to(PKG)}:{node.lineno} unseeded default_rng()")
            if (
                name in {"manual_seed", "seed"}
                and isinstance(f, ast.Attribute)
                and getattr(f.value, "id", "") in {"torch", "random"}
            ):
                offenders.append(f"{path.relative_to(PKG)}:{node.lineno} global {name}")
    assert not offenders, offenders


def test_core_import_pulls_no_gui():
    code = (
        "import sys, importlib, pkgutil, napari_mtml\n"
        "for m in pkgutil.walk_packages(napari_mtml.__path__, 'napari_mtml.'):\n"
        "    if '_napari' not in m.name and not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        f"bad = sorted(k for k in sys.modules if k.split('.')[0] in {GUI!r})\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
