"""napari_mtml.preview: the preview's compute path and its parameter table, without Qt."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from napari_mtml.anomalies import TASKS, TaskParams
from napari_mtml.preview import (
    PARAMS,
    FolderSource,
    compute_preview,
    default_max_push,
    params_used,
    prefers_slices,
    prepare_input,
    preview_input,
)


def _ball(shape, seed=0):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum(g**2 for g in grids) < 0.7
    return ((100 + 20 * rng.standard_normal(shape)) * inside).astype(np.float32), inside


def test_the_parameter_table_is_taskparams():
    fields = {f.name: f for f in dataclasses.fields(TaskParams)}
    assert [p.name for p in PARAMS] == [n for n in fields if "range" in fields[n].metadata]
    for p in PARAMS:
        assert p.default == getattr(TaskParams(), p.name)  # the paper's defaults, one place
        assert p.low <= p.default <= p.high
        assert (p.decimals == 0) == isinstance(p.default, int)
    assert default_max_push(3) == TaskParams.max_push and default_max_push(2) == 10.0


def test_params_used_per_task():
    assert {"min_push", "max_push"} <= params_used("sink")
    assert "intensity_scale" not in params_used("sink")
    assert {"intensity_scale", "margin_base"} <= params_used("smooth_intensity")
    assert not {"min_push", "intensity_scale"} & params_used("intra_blend")
    assert params_used(None) == set().union(*(params_used(t) for t in TASKS))


def test_compute_preview_is_reproducible_and_in_the_image_units():
    image, fg = _ball((48, 48))
    inp = prepare_input(image + 1000.0, fg)  # an offset: the result comes back in these units
    a = compute_preview(inp, "smooth_intensity", 3, {"intensity_scale": 1.0})
    b = compute_preview(inp, "smooth_intensity", 3, {"intensity_scale": 1.0})
    np.testing.assert_array_equal(a.image, b.image)
    changed = a.label > 0
    assert changed.any() and a.n_anomalies >= 1 and a.task == "smooth_intensity"
    np.testing.assert_allclose(a.image[~changed & ~fg], 1000.0, atol=1e-3)
    assert compute_preview(inp, None, 3, {}).task in TASKS  # a random task from the seed


def test_slice_preview_changes_one_slice_only():
    image, fg = _ball((12, 40, 40))
    inp = preview_input(image, fg)
    res = compute_preview(inp, "sink", 0, {"max_push": 10.0}, slice_index=6)
    assert res.slice_index == 6 and res.label[6].max() > 0
    assert not np.delete(res.label, 6, axis=0).any()
    np.testing.assert_allclose(
        np.delete(res.image, 6, axis=0), np.delete(image, 6, axis=0), atol=1e-3
    )
    with pytest.raises(ValueError, match="outside"):
        compute_preview(inp, "sink", 0, {}, slice_index=12)
    assert prefers_slices((6.5, 0.8, 0.8)) and not prefers_slices((1.0, 1.0, 1.2))


def test_folder_source_refuses_missing_or_empty_folders(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        FolderSource(tmp_path / "nope", 2)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no images"):
        FolderSource(tmp_path, 2)
