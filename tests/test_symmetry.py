"""The left-right comparison: mid-sagittal plane fit, mirror images, contralateral maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from napari_mtml.symmetry import MidPlane, contralateral, fit_midplane, mirror_values

SPACING = (2.0, 1.5, 1.5)
SHAPE = (40, 64, 64)


def _points(shape, spacing):
    idx = np.indices(shape).reshape(len(shape), -1).T.astype(np.float64)
    return idx * np.asarray(spacing)


def symmetric_head(plane: MidPlane, rng, shape=SHAPE, spacing=SPACING, noise=0.02):
    """A head-like volume exactly mirror-symmetric about `plane` (up to `noise`): an ellipsoid
    whose inside is a smooth random texture g(p) + g(mirror(p))."""
    pts = _points(shape, spacing)
    centre = np.asarray(plane.point)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 3.0).astype(np.float64)
    field /= field.std()

    def g(p):
        return ndimage.map_coordinates(field, (p / np.asarray(spacing)).T, order=1, mode="nearest")

    texture = g(pts) + g(plane.reflect(pts))
    radii = np.array([30.0, 40.0, 36.0])

    def ellipsoid(p):
        return (((p - centre) / radii) ** 2).sum(axis=1) < 1.0

    inside = ellipsoid(pts) & ellipsoid(plane.reflect(pts))  # the outline is symmetric too
    image = np.where(inside, 100.0 + 15.0 * texture, 0.0)
    image = image + noise * 100.0 * rng.standard_normal(image.shape) * inside
    return image.reshape(shape).astype(np.float32), inside.reshape(shape)


def _tilted(deg_a: float, deg_b: float, offset_mm: float) -> MidPlane:
    n = np.array([math.tan(math.radians(deg_a)), math.tan(math.radians(deg_b)), 1.0])
    n /= np.linalg.norm(n)
    centre = np.asarray(SHAPE) * np.asarray(SPACING) / 2.0
    return MidPlane(tuple(n), tuple(centre + offset_mm * n), 1.0)


def _angle_deg(a, b) -> float:
    return math.degrees(math.acos(min(1.0, abs(float(np.dot(a, b))))))


def _mirror_error_mm(fit: MidPlane, truth: MidPlane, inside: np.ndarray) -> tuple[float, float]:
    """Mean and largest distance (mm) between the two planes' mirror images of the voxels of
    `inside`: what a wrong plane costs the comparison."""
    pts = np.argwhere(inside).astype(np.float64) * np.asarray(SPACING)
    d = np.linalg.norm(fit.reflect(pts) - truth.reflect(pts), axis=1)
    return float(d.mean()), float(d.max())


@pytest.mark.parametrize("deg_a, deg_b, offset", [(0.0, 0.0, 0.0), (8.0, -10.0, 4.0), (-5, 12, -6)])
def test_fit_recovers_a_known_plane(deg_a, deg_b, offset):
    truth = _tilted(deg_a, deg_b, offset)
    image, inside = symmetric_head(truth, np.random.default_rng(1))
    fit = fit_midplane(image, SPACING, inside)
    # within a few degrees, and the mirror images within a voxel or two of the true ones
    assert _angle_deg(fit.normal, truth.normal) < 3.0
    mean, worst = _mirror_error_mm(fit, truth, inside)
    assert mean < 2.0 and worst < 4.0
    assert 0.5 < fit.correlation <= 1.0


def test_fit_ignores_a_bias_field_across_the_head():
    truth = _tilted(6.0, 0.0, 3.0)
    image, inside = symmetric_head(truth, np.random.default_rng(2))
    x = np.arange(SHAPE[2], dtype=np.float32) / SHAPE[2]
    biased = image * (0.6 + 0.8 * x)[None, None, :]  # one side up to 2.3x the other
    fit = fit_midplane(biased, SPACING, inside)
    assert _angle_deg(fit.normal, truth.normal) < 3.0
    mean, worst = _mirror_error_mm(fit, truth, inside)
    assert mean < 2.0 and worst < 4.0


def test_noise_has_no_mirror_symmetry():
    rng = np.random.default_rng(3)
    pts = _points(SHAPE, SPACING)
    centre = np.asarray(SHAPE) * np.asarray(SPACING) / 2.0
    inside = ((((pts - centre) / [30.0, 40.0, 36.0]) ** 2).sum(axis=1) < 1).reshape(SHAPE)
    image = np.where(inside, 100 + 30 * rng.standard_normal(SHAPE), 0).astype(np.float32)
    assert fit_midplane(image, SPACING, inside).correlation < 0.3


def test_reflection_is_an_involution_and_mirror_values_flip_a_centred_plane():
    plane = _tilted(7.0, -4.0, 2.5)
    pts = np.random.default_rng(4).uniform(0, 80, size=(50, 3))
    np.testing.assert_allclose(plane.reflect(plane.reflect(pts)), pts, atol=1e-9)
    # a plane through the centre of the last axis, untilted: the mirror is a flip of that axis
    shape, sp = (4, 6, 9), (1.0, 1.0, 2.0)
    flip = MidPlane((0.0, 0.0, 1.0), (0.0, 0.0, (shape[2] - 1) * sp[2] / 2), 1.0)
    vol = np.random.default_rng(5).random(shape).astype(np.float32)
    np.testing.assert_allclose(mirror_values(vol, sp, flip), vol[..., ::-1], atol=1e-6)
    where = vol > 0.5
    part = mirror_values(vol, sp, flip, where=where)
    np.testing.assert_allclose(part[where], vol[..., ::-1][where], atol=1e-6)
    assert np.all(part[~where] == 0)


def test_mirror_values_grid_pass_matches_voxel_by_voxel_mirror_images():
    # a tilted, offset plane and anisotropic voxels: the one-pass affine map of the grid and the
    # sparse path (each voxel's mirror image interpolated on its own) give the same values
    plane = _tilted(9.0, -6.0, 3.0)
    sp = np.asarray(SPACING, dtype=np.float64)
    vol = np.random.default_rng(8).random(SHAPE).astype(np.float32)
    full = mirror_values(vol, sp, plane)
    idx = np.indices(SHAPE).reshape(3, -1).T.astype(np.float64)
    q = plane.reflect(idx * sp) / sp
    direct = ndimage.map_coordinates(vol, q.T, order=1, mode="nearest")
    np.testing.assert_allclose(full.reshape(-1), direct, atol=1e-5)
    zero = ndimage.map_coordinates(vol, q.T, order=1, mode="constant", cval=0.0)
    np.testing.assert_allclose(
        mirror_values(vol, sp, plane, mode="constant").reshape(-1), zero, atol=1e-5
    )
    sparse = np.zeros(SHAPE, dtype=bool)
    sparse[::7, ::9, ::11] = True  # under 2 % of the voxels: the voxel-by-voxel path
    assert sparse.mean() < 0.02
    part = mirror_values(vol, sp, plane, where=sparse)
    np.testing.assert_allclose(part[sparse], full[sparse], atol=1e-5)
    assert np.all(part[~sparse] == 0)
    assert np.abs(full).max() > 0.5  # the mirror lands inside the volume


@pytest.mark.parametrize("where", ["inside", "edges", "sparse"])
@pytest.mark.parametrize("workers", [1, 3])
def test_contralateral_on_the_maps_box_equals_the_whole_volume_computation(where, workers):
    """`contralateral` filters and mirrors on boxes around the map's non-zero voxels, in slabs
    of `workers` threads: the same values as the whole volume's maximum filter and each voxel's
    mirror image interpolated on its own ("nearest" beyond the volume), whether the map lies
    inside the volume, reaches its first and last slices and sides, or is a few voxels."""
    rng = np.random.default_rng(31)
    plane = _tilted(8.0, -5.0, 4.0)
    sp = np.asarray(SPACING, dtype=np.float64)
    heat = np.zeros(SHAPE, dtype=np.float32)
    if where == "inside":
        heat[10:30, 12:50, 8:40] = rng.random((20, 38, 32))
    elif where == "edges":
        heat[:, :, :20] = rng.random((SHAPE[0], SHAPE[1], 20))
        heat[0, 30:40, 40:64] = 0.9
        heat[-1, :5, 50:] = 0.7
    else:
        heat[rng.random(SHAPE) < 0.005] = 0.8
    size = tuple(int(v) for v in 2 * np.round(3.0 / sp).astype(int) + 1)
    near = ndimage.maximum_filter(heat, size=size, mode="constant", cval=0.0)
    idx = np.argwhere(heat > 0).astype(np.float64)
    q = plane.reflect(idx * sp) / sp
    expected = np.zeros(SHAPE, dtype=np.float32)
    expected[heat > 0] = heat[heat > 0] - ndimage.map_coordinates(
        near, q.T, order=1, mode="nearest"
    )
    expected = np.maximum(expected, 0.0)
    got = contralateral(heat, sp, plane, workers=workers)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got[heat == 0].max() == 0.0 and float(got.max()) > 0.3
    # and mirror_values' slabs: the same values in threads as in one pass
    np.testing.assert_allclose(
        mirror_values(near, sp, plane, workers=workers), mirror_values(near, sp, plane), atol=1e-6
    )
    assert np.array_equal(contralateral(np.zeros(SHAPE, np.float32), sp, plane), np.zeros(SHAPE))


def test_the_plane_fits_resampling_on_the_masks_box_equals_the_whole_arrays(monkeypatch):
    """The plane fit's masked blurs run on the mask's box grown by the kernel's reach, in
    threads: the same grid values as the blurs over the whole array, with the mask inside the
    volume or touching its edges."""
    import napari_mtml.symmetry as sym

    rng = np.random.default_rng(41)
    sp = np.array([1.0, 1.0, 1.0])
    img = rng.random(SHAPE).astype(np.float32)
    for box in [
        (slice(5, 30), slice(10, 50), slice(12, 52)),
        (slice(0, 8), slice(0, 20), slice(44, 64)),
    ]:
        mask = np.zeros(SHAPE, dtype=bool)
        mask[box] = rng.random(mask[box].shape) > 0.2
        got = sym._resampled(img, mask, sp, 4.0, workers=2)
        # the same resampling with the bounds of the whole array: the blurs over all of it
        monkeypatch.setattr(sym, "bounding_box", lambda m: tuple(slice(0, n) for n in m.shape))
        whole = sym._resampled(img, mask, sp, 4.0, workers=1)
        monkeypatch.undo()
        np.testing.assert_array_equal(got[0], whole[0])
        np.testing.assert_array_equal(got[1], whole[1])


def test_a_mirror_image_beyond_the_end_slices_takes_the_end_slice():
    # a plane tilted across thick slices sends the mirror images of the first slice's voxels
    # below it: what lies there was not acquired, so the first slice stands for it, and a map
    # the same on both sides is not kept there as one-sided
    sp = np.array([6.5, 1.0, 1.0])
    shape = (6, 40, 60)
    plane = MidPlane(tuple(np.array([0.08, 0.0, 1.0]) / np.hypot(0.08, 1.0)), (0.0, 0.0, 29.5), 1.0)
    # a band 10-20 mm from the plane on each side: mirror images of each other
    pts = np.indices(shape).reshape(3, -1).T * sp
    d = np.abs((pts - np.asarray(plane.point)) @ np.asarray(plane.normal)).reshape(shape)
    heat = np.where((d >= 10) & (d <= 20), 0.8, 0.0).astype(np.float32)
    heat[:, :10] = heat[:, 30:] = 0.0
    kept = contralateral(heat, sp, plane)
    assert float(kept[0].max()) < 0.05 and float(kept[-1].max()) < 0.05
    band = heat[0] > 0
    zero = mirror_values(heat, sp, plane, mode="constant")[0][band]  # 0 beyond the volume
    edge = mirror_values(heat, sp, plane)[0][band]
    assert float(np.median(edge)) > 0.7 and float(edge.mean()) > float(zero.mean()) + 0.1
    assert float(contralateral(heat, sp, plane)[0].max()) < 0.05


def test_contralateral_keeps_one_sided_spots_and_drops_shared_ones():
    plane = _tilted(5.0, 3.0, 1.0)
    pts = _points(SHAPE, SPACING)
    heat = np.zeros(len(pts))

    def spot(centre, value, sigma=4.0):
        d2 = ((pts - centre) ** 2).sum(axis=1)
        return value * np.exp(-d2 / (2 * sigma**2))

    shared = np.array([40.0, 50.0, 30.0])
    heat += spot(shared, 0.8) + spot(plane.reflect(shared[None])[0], 0.7)  # both sides
    lone = np.array([40.0, 35.0, 28.0])
    heat += spot(lone, 0.9)  # one side only
    heat = np.clip(heat, 0, 1).reshape(SHAPE).astype(np.float32)
    heat[heat < 1e-3] = 0.0
    out = contralateral(heat, SPACING, plane, radius_mm=3.0)
    assert out.dtype == np.float32 and out.shape == heat.shape
    assert np.all(out >= 0) and np.all(out <= heat + 1e-7)
    assert np.all(out[heat == 0] == 0)
    lone_idx = tuple(np.round(lone / SPACING).astype(int))
    shared_idx = tuple(np.round(shared / SPACING).astype(int))
    assert out[lone_idx] > 0.85 * heat[lone_idx]
    # the stronger side of a shared pair keeps little more than its excess over the other
    # (0.8 - 0.7, and what the 1.5-2 mm grid loses of the weaker one's peak)
    assert out[shared_idx] < 0.2 * heat[shared_idx]
    assert out.max() == pytest.approx(out[lone_idx], abs=0.05)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: fit_midplane(np.zeros((4, 4, 4, 4)), None), "2D or 3D"),
        (lambda: fit_midplane(np.ones((8, 8, 8)), (1.0, 1.0)), "spacing"),
        (lambda: fit_midplane(np.ones((8, 8, 8)), None, np.zeros((8, 8, 8), bool)), "empty"),
        (lambda: fit_midplane(np.ones((8, 8, 8)), None, np.ones((8, 8, 7), bool)), "shape"),
        (lambda: fit_midplane(np.full((8, 8, 8), np.nan), None, np.ones((8, 8, 8), bool)), "NaN"),
        (lambda: contralateral(np.ones((8, 8, 8)), (1, 1, -1), _tilted(0, 0, 0)), "spacing"),
    ],
)
def test_bad_input_is_refused_with_a_reason(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_volume_of_one_slice_is_compared_in_plane():
    truth = _tilted(0.0, 6.0, 2.0)
    image, inside = symmetric_head(truth, np.random.default_rng(7))
    one = image[20:21]
    fit = fit_midplane(one, SPACING, inside[20:21])
    assert np.isfinite(fit.correlation) and all(np.isfinite(fit.normal))
    out = contralateral(np.where(inside[20:21], 0.5, 0.0).astype(np.float32), SPACING, fit)
    assert out.shape == one.shape and np.all(np.isfinite(out))


def test_2d_images_fit_a_mirror_line():
    rng = np.random.default_rng(6)
    shape, sp = (80, 90), (1.0, 1.0)
    angle = math.radians(7.0)
    n = np.array([math.sin(angle), math.cos(angle)])
    truth = MidPlane(tuple(n), (40.0, 47.0), 1.0)
    pts = _points(shape, sp)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 2.5)

    def g(p):
        return ndimage.map_coordinates(field, p.T, order=1, mode="nearest")

    inside = ((((pts - [40.0, 47.0]) / [35.0, 30.0]) ** 2).sum(axis=1) < 1).reshape(shape)
    image = np.where(inside, 100 + 200 * (g(pts) + g(truth.reflect(pts))).reshape(shape), 0)
    fit = fit_midplane(image.astype(np.float32), sp, inside, step_mm=2.0)
    assert _angle_deg(fit.normal, truth.normal) < 2.0
