"""Shapes, ray-to-edge distance and placement (METHOD.md §1)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mtml.anomalies.placement import PlacementError, place_shape
from napari_mtml.anomalies.shapes import random_matrix, random_shape, rasterise, ray_to_edge


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.mark.parametrize("ndim", [2, 3])
def test_ellipse_ray_to_edge_lands_on_the_edge(ndim):
    rng = np.random.default_rng(1)
    h = rng.uniform(2, 9, ndim)
    origin = rng.uniform(-0.5, 0.5, ndim) * h  # inside
    u = _unit(rng.normal(size=(200, ndim)))
    t = ray_to_edge("ellipse", h, origin, u)
    hit = origin + t[:, None] * u
    np.testing.assert_allclose(((hit / h) ** 2).sum(axis=1), 1.0, atol=1e-10)
    assert np.all(t > 0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_rectangle_ray_to_edge_lands_on_the_edge(ndim):
    rng = np.random.default_rng(2)
    h = rng.uniform(2, 9, ndim)
    origin = rng.uniform(-0.8, 0.8, ndim) * h
    u = _unit(rng.normal(size=(200, ndim)))
    t = ray_to_edge("rectangle", h, origin, u)
    hit = origin + t[:, None] * u
    np.testing.assert_allclose(np.max(np.abs(hit) / h, axis=1), 1.0, atol=1e-10)


def test_ray_to_edge_known_values():
    h = np.array([2.0, 3.0])
    o = np.zeros(2)
    dirs = _unit([[1, 0], [0, -1], [1, 1]])
    # the rectangle's diagonal ray leaves through the x = 2 face: t = 2 sqrt2
    np.testing.assert_allclose(ray_to_edge("rectangle", h, o, dirs), [2, 3, 2 * np.sqrt(2)])
    # ellipse x^2/4 + y^2/9 = 1 along (1, 1)/sqrt2: t^2/2 (1/4 + 1/9) = 1
    t_diag = np.sqrt(2 / (1 / 4 + 1 / 9))
    np.testing.assert_allclose(ray_to_edge("ellipse", h, o, dirs), [2, 3, t_diag])
    # from an off-centre origin, along +x: the edge is at x = 2 -> t = 2 - 0.5
    np.testing.assert_allclose(ray_to_edge("ellipse", h, np.array([0.5, 0]), dirs[:1]), [1.5])


@pytest.mark.parametrize("kind", ["ellipse", "rectangle"])
def test_shape_edge_distance_in_image_axes(kind):
    """Rotated and sheared: the edge point, taken back to the shape's frame, is on the edge."""
    rng = np.random.default_rng(3)
    shape = rasterise(kind, np.array([6.0, 4.0, 5.0]), random_matrix(3, rng))
    pts = np.stack(np.nonzero(shape.mask), axis=1).astype(float)
    origin = pts[len(pts) // 3]
    u = _unit(rng.normal(size=(50, 3)))
    t = shape.edge_distance(origin, u)
    own = shape.to_own_frame(origin + t[:, None] * u) / shape.half_sizes
    if kind == "ellipse":
        np.testing.assert_allclose((own**2).sum(axis=1), 1.0, atol=1e-9)
    else:
        np.testing.assert_allclose(np.abs(own).max(axis=1), 1.0, atol=1e-9)
    # every raster voxel passes the analytic test: the raster never leaves the shape
    own_pts = shape.to_own_frame(pts) / shape.half_sizes
    inside = (
        (own_pts**2).sum(1) <= 1 + 1e-9
        if kind == "ellipse"
        else (np.abs(own_pts).max(1) <= 1 + 1e-9)
    )
    assert inside.all()


def test_axis_aligned_ellipse_area():
    shape = rasterise("ellipse", np.array([20.0, 12.0]), np.eye(2))
    assert shape.mask.shape == (40, 24)
    assert abs(shape.mask.sum() / (np.pi * 20 * 12) - 1) < 0.03


@pytest.mark.parametrize("dims", [(256, 256), (80, 112, 80)])
def test_random_shapes_respect_bounds_and_the_gamma_law(dims):
    rng = np.random.default_rng(4)
    n = 400 if len(dims) == 2 else 150
    D = np.asarray(dims)
    ub = np.round(0.8 * D)
    sizes, kinds = [], []
    for _ in range(n):
        s = random_shape(dims, rng)
        assert s.mask.any() and s.mask.dtype == bool
        assert np.all(np.asarray(s.mask.shape) <= ub)
        sizes.append(2 * s.half_sizes / D)
        kinds.append(s.kind)
    sizes = np.concatenate(sizes)
    # (0.03 + Gamma(2, 0.1)) has median 0.198; int() truncation moves it down by < 1 voxel
    assert 0.16 < np.median(sizes) < 0.225
    lo, hi = np.quantile(sizes, [0.05, 0.95])
    assert 0.055 < lo < 0.1 and 0.4 < hi < 0.6
    # 50/50 kind: within 4 binomial standard deviations
    assert abs(kinds.count("ellipse") / n - 0.5) < 4 * np.sqrt(0.25 / n)


def test_shape_kind_can_be_forced_and_bad_kind_is_rejected():
    rng = np.random.default_rng(5)
    assert all(random_shape((64, 64), rng, shape="rectangle").kind == "rectangle" for _ in range(5))
    with pytest.raises(ValueError, match="shape"):
        random_shape((64, 64), rng, shape="triangle")


def test_placement_keeps_half_on_the_foreground():
    rng = np.random.default_rng(6)
    fg = np.zeros((64, 64), dtype=bool)
    fg[:, :20] = True  # a strip: many positions fail, all accepted ones must pass
    for _ in range(100):
        shape = random_shape(fg.shape, rng, max_size=0.3)
        placed = place_shape(shape, fg.shape, rng, fg, max_attempts=1000)
        on = fg[placed.box][shape.mask].sum()
        assert on >= 0.5 * shape.mask.sum()
        assert all(s.stop <= d for s, d in zip(placed.box, fg.shape, strict=True))


def test_placement_is_uniform_without_foreground():
    rng = np.random.default_rng(7)
    shape = rasterise("rectangle", np.array([2.0, 2.0]), np.eye(2))  # a 4x4 box
    corners = np.array([place_shape(shape, (20, 20), rng).corner for _ in range(2000)])
    assert corners.min() == 0 and corners.max() == 16
    counts = np.bincount(corners[:, 0], minlength=17)
    # 17 equally likely corners: ~118 each; a fixed or biased corner would break this
    assert counts.min() > 70 and counts.max() < 170


def test_placement_fails_clearly_on_a_thin_foreground():
    rng = np.random.default_rng(8)
    fg = np.zeros((64, 64), dtype=bool)
    fg[32, :] = True
    shape = rasterise("ellipse", np.array([6.0, 6.0]), np.eye(2))
    with pytest.raises(PlacementError, match="foreground"):
        place_shape(shape, fg.shape, rng, fg, max_attempts=50)
    with pytest.raises(ValueError, match="does not fit"):
        place_shape(shape, (8, 8), rng)


@pytest.mark.parametrize("ndim", [2, 3])
def test_raster_is_trimmed_to_its_tight_box(ndim):
    rng = np.random.default_rng(11 + ndim)
    for k in range(60):
        # thin sheared shapes as well as fat ones: the raster often misses the box's last row
        half = rng.uniform(0.3 if k % 3 == 0 else 2.0, 9.0, ndim)
        shape = rasterise(("ellipse", "rectangle")[k % 2], half, random_matrix(ndim, rng))
        mask = shape.mask
        assert mask.any()
        for d in range(ndim):
            for end in (0, -1):
                assert mask[(slice(None),) * d + (end,)].any()
