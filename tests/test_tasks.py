"""The five tasks (METHOD.md §2): sink/source geometry, smooth intensity, blending."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mtml.anomalies import synthesize
from napari_mtml.anomalies.placement import PlacedShape
from napari_mtml.anomalies.shapes import rasterise, ray_to_edge
from napari_mtml.anomalies.tasks import (
    TASK_OBJECTS,
    SourceImage,
    TaskContext,
    TaskParams,
    push_factor,
    radial_warp,
    sample_source_patch,
    smooth_intensity_change,
    warped_radius,
)


def _ramp(shape, weights):
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    return sum(w * g for w, g in zip(weights, grids, strict=False)).astype(np.float32)


def _expected_radius(r, big_r, f, kind):
    if kind == "source":
        return big_r * (r / big_r) ** f
    return big_r - (big_r - r) ** f / big_r ** (f - 1)


@pytest.mark.parametrize("kind", ["sink", "source"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_radial_warp_reads_from_r_prime(kind, ndim):
    """On a disc/ball with known centre and factor, the value landing at r comes from r'."""
    size, radius, f = 33, 12.0, 2.5
    centre = np.full(ndim, 16.0)
    image = _ramp((size,) * ndim, [0.5, 0.25, 0.125])
    grids = np.indices((size,) * ndim).astype(np.float64)
    dist = np.sqrt(((grids - centre.reshape((-1,) + (1,) * ndim)) ** 2).sum(0))
    mask = dist <= radius

    def edge(origin, directions):  # the disc is centred on `centre`; directions are columns
        return ray_to_edge("ellipse", np.full(ndim, radius), origin - centre, directions.T)

    out = radial_warp(image, mask, centre.astype(int), f, kind, edge)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[~mask], image[~mask])  # identity outside the shape
    moved = 0
    for r in (2.0, 4.0, 6.0, 8.0, 10.0):
        p = centre.copy()
        p[-1] += r  # a voxel on the ray along the last axis
        r_prime = _expected_radius(r, radius, f, kind)
        src = centre.copy()
        src[-1] += r_prime
        value_at_src = 0.5 * src[0] + 0.25 * src[1] + (0.125 * src[2] if ndim == 3 else 0)
        assert out[tuple(p.astype(int))] == pytest.approx(value_at_src, abs=2e-3)
        moved += abs(r_prime - r) > 1
    assert moved >= 3  # the check is not passed by the identity


@pytest.mark.parametrize("kind", ["sink", "source"])
def test_warped_radius_keeps_centre_and_edge(kind):
    r = np.array([0.0, 3.0, 10.0])
    out = warped_radius(r, np.full(3, 10.0), 3.0, kind)
    assert out[0] == pytest.approx(0) and out[2] == pytest.approx(10)
    # source: the value at r comes from nearer the centre (content pushed out); sink: the reverse
    assert (out[1] < 3.0) if kind == "source" else (out[1] > 3.0)


@pytest.mark.parametrize("task_id", [2, 3, 4])
def test_the_tasks_run_the_functions_tested_here(task_id, monkeypatch):
    """radial_warp, warped_radius and smooth_intensity_change are what the tasks compute with
    (not twins of them): a task's patch changes when one of them is replaced."""
    import napari_mtml.anomalies.tasks as tasks

    image = np.random.default_rng(1).normal(size=(48, 48)).astype(np.float32)
    placed = _placed("ellipse", 9.0, (10, 12))
    task = TASK_OBJECTS[task_id]
    before = task(image, placed, np.random.default_rng(0), _context(image)).values
    calls = []
    names = ("smooth_intensity_change",) if task_id == 4 else ("radial_warp", "warped_radius")
    for name in names:
        real = getattr(tasks, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs) * np.float32(0.5)  # a visible change

        monkeypatch.setattr(tasks, name, spy)
    after = task(image, placed, np.random.default_rng(0), _context(image)).values
    assert set(calls) == set(names)
    assert not np.array_equal(before, after)


@pytest.mark.parametrize("kind", ["sink", "source"])
def test_push_factor_range_for_a_ten_voxel_shape(kind):
    rng = np.random.default_rng(0)
    fs = np.array([push_factor(10.0, rng, kind, 0.5, 5.0) for _ in range(2000)])
    # METHOD.md §2: for A = 10, f in about [1.3, 12]
    assert fs.min() > 1.3 and fs.max() < 12.5
    assert fs.min() < 1.5 and fs.max() > 10
    assert push_factor(0.0, rng, kind) == 1.0


def _placed(kind, half, corner, ndim=2):
    shape = rasterise(kind, np.full(ndim, half), np.eye(ndim))
    return PlacedShape(shape, tuple(corner))


def _context(image, **params):
    return TaskContext(TaskParams(**params), (float(image.min()), float(image.max())))


@pytest.mark.parametrize("task_id", [2, 3])
def test_radial_tasks_only_move_values_inside_the_shape(task_id):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(48, 48)).astype(np.float32)
    placed = _placed("ellipse", 9.0, (10, 12))
    patch = TASK_OBJECTS[task_id](image, placed, rng, _context(image))
    region = image[patch.box]
    np.testing.assert_array_equal(patch.values[~patch.mask], region[~patch.mask])
    assert np.count_nonzero(patch.values[patch.mask] != region[patch.mask]) > 10
    assert patch.values.min() >= image.min() and patch.values.max() <= image.max()


def test_smooth_intensity_change_ramps_to_full_amplitude_at_the_margin():
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:35, 8:32] = True
    image = np.zeros((40, 40), dtype=np.float32)
    out = smooth_intensity_change(image, mask, amplitude=0.8, margin=4.0)
    assert np.all(out[~mask] == 0)
    # distance transform of the rectangle: the edge voxels are at 1, the 5th ring at 5
    assert out[5, 20] == pytest.approx(0.8 / 4)  # dist 1
    assert out[7, 20] == pytest.approx(0.8 * 3 / 4)  # dist 3
    assert out[8, 20] == pytest.approx(0.8)  # dist 4 = margin
    assert np.allclose(out[9:31, 12:28], 0.8)  # beyond the margin: flat


def test_smooth_intensity_task_changes_only_the_shape():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(64, 64)).astype(np.float32) * 0.1
    image[0, 0], image[-1, -1] = -5, 5  # a wide range: no clipping at the shape
    placed = _placed("rectangle", 10.0, (20, 20))
    amplitudes = []
    for _ in range(30):
        patch = TASK_OBJECTS[4](image, placed, rng, _context(image, intensity_scale=0.2))
        diff = patch.values - image[patch.box]
        assert np.all(diff[~patch.mask] == 0)
        amplitudes.append(diff[10, 10])  # the shape's centre, beyond any margin here
    amplitudes = np.abs(amplitudes)
    # |a| = 0.1 + Gamma(3, 0.2): median ~0.63, never below 0.1 (clipping aside)
    assert amplitudes.min() > 0.09 and 0.35 < np.median(amplitudes) < 0.95


def test_source_patch_centre_lies_on_the_source_mask():
    rng = np.random.default_rng(3)
    src = np.zeros((60, 60), dtype=np.float32)
    mask = np.zeros_like(src, dtype=bool)
    mask[25:35, 25:35] = True
    src[mask] = 1.0
    source = SourceImage(src, mask, 0.0, 1.0)
    for _ in range(20):
        patch = sample_source_patch(source, (7, 7), rng)
        assert patch.shape == (7, 7) and patch.dtype == np.float32
        assert patch[3, 3] == pytest.approx(1.0, abs=0.05)
        assert patch.min() >= 0 and patch.max() <= 1


def test_source_patch_fits_in_a_small_source():
    rng = np.random.default_rng(4)
    src = _ramp((20, 24), [1.0, 0.0])
    patch = sample_source_patch(SourceImage(src, None, 0.0, 19.0), (40, 40), rng)
    # the window is shrunk to 0.8 of the source: its rows span at most 16 of the source's
    assert patch.shape == (40, 40)
    assert np.ptp(patch) <= 16.01


@pytest.mark.parametrize("task", ["intra_blend", "inter_blend"])
@pytest.mark.parametrize("dims", [(48, 48), (24, 28, 24)])
def test_blending_changes_only_the_mask_and_stays_in_range(task, dims):
    rng = np.random.default_rng(5)
    image = rng.normal(size=dims).astype(np.float32)
    other = (rng.normal(size=dims) * 3).astype(np.float32)
    res = synthesize(image, None, task=task, rng=rng, source=other)
    assert res.image.dtype == np.float32 and res.mask.any()
    np.testing.assert_array_equal(res.image[~res.mask], image[~res.mask])
    assert res.image.min() >= image.min() and res.image.max() <= image.max()
    assert np.abs(res.image - image)[res.mask].max() > 0.1


def test_blending_source_callable_is_called_once_per_anomaly():
    rng = np.random.default_rng(6)
    image = rng.normal(size=(40, 40)).astype(np.float32)
    calls = []

    def provider(r):
        calls.append(1)
        return (r.normal(size=(50, 30)).astype(np.float32), None)

    for seed in range(6):
        calls.clear()
        res = synthesize(image, task=1, rng=np.random.default_rng(seed), source=provider)
        assert len(calls) == res.n_anomalies
