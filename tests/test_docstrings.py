"""The `Examples` of the public entry points run and show what they say (doctest)."""

from __future__ import annotations

import doctest
import importlib
import inspect
import warnings

import pytest

MODULES = [
    "napari_mtml.anomalies.recipe",
    "napari_mtml.anomalies.poisson",
    "napari_mtml.anomalies.labelling",
    "napari_mtml.anomalies.shapes",
    "napari_mtml.anomalies.placement",
    "napari_mtml.anomalies.boxes",
    "napari_mtml.io",
    "napari_mtml.preprocess",
    "napari_mtml.inference",
    "napari_mtml.config",
    "napari_mtml.data",
    "napari_mtml.files",
    "napari_mtml.generators",
    "napari_mtml.regions",
    "napari_mtml.builtin",
    "napari_mtml.samples",
    "napari_mtml.preview",
    "napari_mtml.batch",
    "napari_mtml.scores",
    "napari_mtml.devices",
    "napari_mtml.metrics",
    "napari_mtml.training.crossval",
    "napari_mtml.training.rundir",
]
#: the entry points that must show an example
ENTRY_POINTS = {
    "napari_mtml.anomalies": [
        "synthesize",
        "poisson_blend",
        "flipped_gaussian_label",
        "random_shape",
        "place_shape",
        "ray_to_edge",
        "task_name",
    ],
    "napari_mtml.io": ["read_image", "write_image", "list_series", "image_files", "image_name"],
    "napari_mtml.preprocess": ["to_frame", "from_frame", "foreground_mask", "mask_to_frame"],
    "napari_mtml.inference": ["load_ensemble", "Ensemble.predict"],
}


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for test in finder.find(module, name, globs=dict(vars(module))):
            if test.examples:
                runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} example(s) of {name} failed (see output)"


@pytest.mark.parametrize("package, names", ENTRY_POINTS.items())
def test_entry_points_have_an_example(package, names):
    module = importlib.import_module(package)
    for name in names:
        obj = module
        for part in name.split("."):
            obj = getattr(obj, part)
        doc = inspect.getdoc(obj) or ""
        assert "Examples\n--------" in doc, f"{package}.{name} has no Examples section"
        assert "Parameters\n----------" in doc, f"{package}.{name} has no Parameters section"
