"""The N-D DST Poisson solver (METHOD.md §2) against a direct sparse solve, and its contract."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import scipy.sparse
import scipy.sparse.linalg

from napari_mtml.anomalies.poisson import (
    blend_box,
    fast_box_length,
    poisson_blend,
    solve_poisson_box,
)


def _reference_blend(target, source, mask, mix_gradients=True):
    """METHOD.md §2 written out literally, solved with scipy.sparse.linalg.spsolve in float64.

    Forward differences with a mirror boundary, the per-axis mixing rule, backward-difference
    divergence, the (2n+1)-point Laplacian on the interior with the border voxels moved to the
    right-hand side.
    """
    t = np.asarray(target, np.float64)
    s = np.asarray(source, np.float64)
    n = t.ndim
    shape = t.shape
    div = np.zeros(shape)
    for d in range(n):
        pad = [(0, 0)] * n
        pad[d] = (0, 1)
        tg = np.diff(np.pad(t, pad, mode="reflect"), axis=d)
        sg = np.diff(np.pad(s, pad, mode="reflect"), axis=d)
        if mix_gradients:
            g = np.where(mask & ~(np.abs(tg) >= np.abs(sg)), sg, tg)
        else:
            g = np.where(mask, sg, tg)
        pad[d] = (1, 0)
        div += np.diff(np.pad(g, pad, mode="reflect"), axis=d)

    interior = np.zeros(shape, bool)
    interior[(slice(1, -1),) * n] = True
    index = -np.ones(shape, np.int64)
    index[interior] = np.arange(interior.sum())
    rows, cols, vals = [], [], []
    rhs = div[interior].copy()
    coords = np.argwhere(interior)
    for p, c in enumerate(coords):
        rows.append(p)
        cols.append(p)
        vals.append(-2.0 * n)
        for d in range(n):
            for step in (-1, 1):
                q = c.copy()
                q[d] += step
                q = tuple(q)
                if interior[q]:
                    rows.append(p)
                    cols.append(index[q])
                    vals.append(1.0)
                else:
                    rhs[p] -= t[q]
    size = len(coords)
    matrix = scipy.sparse.csc_matrix((vals, (rows, cols)), shape=(size, size))
    out = t.copy()
    out[interior] = scipy.sparse.linalg.spsolve(matrix, rhs)
    return out


def _random_case(rng, shape, smooth):
    if smooth:
        grids = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
        a, b = rng.uniform(2, 6, 2)
        target = np.sin(a * sum(grids)) + 0.05 * rng.standard_normal(shape)
        source = 3 * np.cos(b * grids[0] * grids[-1]) + 0.05 * rng.standard_normal(shape)
        centre = [(n - 1) / 2 for n in shape]
        radius = [max((n - 3) / 2, 0.5) for n in shape]
        mask = (
            sum(
                ((g * (n - 1) - c) / r) ** 2
                for g, n, c, r in zip(grids, shape, centre, radius, strict=True)
            )
            <= 1
        )
    else:
        target = rng.standard_normal(shape)
        source = 2 * rng.standard_normal(shape)
        mask = rng.random(shape) < 0.6
    return target.astype(np.float32), source.astype(np.float32), mask


def _relative_error(ours, ref):
    return np.linalg.norm(ours.astype(np.float64) - ref) / np.linalg.norm(ref)


CASES = [
    ((9,), False),
    ((23, 31), False),
    ((40, 37), True),
    ((44, 50), False),
    ((9, 13, 11), False),
    ((12, 10, 14), True),
    ((7, 16, 9), False),
]


@pytest.mark.parametrize(("shape", "smooth"), CASES)
@pytest.mark.parametrize("mix", [True, False])
def test_box_matches_sparse_direct_solve(shape, smooth, mix):
    rng = np.random.default_rng(sum(shape) + smooth + 10 * mix)
    target, source, mask = _random_case(rng, shape, smooth)
    ours = solve_poisson_box(target, source, mask, mix_gradients=mix)
    ref = _reference_blend(target, source, mask, mix_gradients=mix)
    assert ours.dtype == np.float32
    assert _relative_error(ours, ref) < 1e-6
    # and the change itself, not only the image it is added to, is right
    inner = (slice(1, -1),) * len(shape)
    change_err = np.linalg.norm(ours[inner] - ref[inner]) / np.linalg.norm(
        ref[inner] - target[inner]
    )
    assert change_err < 1e-5


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_explicit_precisions_match_sparse_solve(precision):
    rng = np.random.default_rng(5)
    target, source, mask = _random_case(rng, (10, 12, 9), smooth=False)
    ours = solve_poisson_box(target, source, mask, precision=precision)
    assert _relative_error(ours, _reference_blend(target, source, mask)) < 1e-6


def test_full_image_blend_is_the_box_solve():
    rng = np.random.default_rng(1)
    shape = (64, 70)
    target, source, _ = _random_case(rng, shape, smooth=True)
    mask = np.zeros(shape, bool)
    mask[20:33, 15:40] = rng.random((13, 25)) < 0.8
    for fast in (False, True):
        box = blend_box(mask, fast=fast)
        out = poisson_blend(target, source, mask, fast_box=fast)
        expected = solve_poisson_box(target[box], source[box], mask[box])
        np.testing.assert_array_equal(out[box], expected)
        outside = np.ones(shape, bool)
        outside[box] = False
        np.testing.assert_array_equal(out[outside], target[outside])
        # the blend does change something inside the mask
        assert np.abs(out - target)[mask].max() > 1e-3


def test_minimal_box_is_bbox_grown_by_one_and_clipped():
    mask = np.zeros((20, 30, 25), bool)
    mask[4:9, 0:3, 20:25] = True
    assert blend_box(mask) == (slice(3, 10), slice(0, 4), slice(19, 25))
    assert blend_box(np.zeros((5, 5), bool)) is None
    assert blend_box(mask, fast=True) is not None


def test_fast_box_contains_minimal_box_and_has_fast_lengths():
    rng = np.random.default_rng(2)
    shape = (80, 112, 80)
    for _ in range(20):
        mask = np.zeros(shape, bool)
        lo = rng.integers(0, 60, 3)
        size = rng.integers(1, 50, 3)
        mask[tuple(slice(a, a + b) for a, b in zip(lo, size, strict=True))] = True
        small = blend_box(mask)
        fast = blend_box(mask, fast=True)
        for s, f, n in zip(small, fast, shape, strict=True):
            assert 0 <= f.start <= s.start and s.stop <= f.stop <= n
            length = f.stop - f.start
            if length < n:  # an axis too short for the fast length is taken whole
                fft = 2 * (length - 1)
                assert scipy.fft.next_fast_len(fft, real=True) == fft
                assert length == fast_box_length(s.stop - s.start)


def test_fast_box_length_is_the_smallest_fast_one():
    for length in range(3, 300):
        fast = fast_box_length(length)
        assert fast >= length
        for candidate in range(length, fast + 1):
            fft = 2 * (candidate - 1)
            assert (scipy.fft.next_fast_len(fft, real=True) == fft) == (candidate == fast)
    assert fast_box_length(2) == 2


@pytest.mark.parametrize("shape", [(30, 40), (10, 12, 14)])
def test_source_equal_to_target_returns_target(shape):
    rng = np.random.default_rng(3)
    target = rng.standard_normal(shape).astype(np.float32)
    mask = rng.random(shape) < 0.5
    mask[(0,) * len(shape)] = False
    out = poisson_blend(target, target.copy(), mask, mix_gradients=False)
    np.testing.assert_array_equal(out, target)
    # ties go to the target: a source with the same gradients' magnitudes and opposite signs
    out = poisson_blend(target, -target, mask, mix_gradients=True)
    np.testing.assert_array_equal(out, target)


def test_border_values_kept():
    rng = np.random.default_rng(4)
    target, source, mask = _random_case(rng, (15, 18, 12), smooth=False)
    mask[:] = True  # even mask voxels on the box's border stay the target's
    out = solve_poisson_box(target, source, mask)
    border = np.ones(target.shape, bool)
    border[1:-1, 1:-1, 1:-1] = False
    np.testing.assert_array_equal(out[border], target[border])
    assert not np.allclose(out[~border], target[~border])


def test_mask_at_the_image_edge():
    rng = np.random.default_rng(6)
    target, source, _ = _random_case(rng, (30, 30), smooth=True)
    mask = np.zeros((30, 30), bool)
    mask[0:10, 25:30] = True
    out = poisson_blend(target, source, mask, fast_box=False)
    box = blend_box(mask)
    assert box == (slice(0, 11), slice(24, 30))
    ref = _reference_blend(target[box], source[box], mask[box])
    assert _relative_error(out[box], ref) < 1e-6
    np.testing.assert_array_equal(out[0], target[0])
    np.testing.assert_array_equal(out[:, -1], target[:, -1])


def test_inputs_untouched_and_float32_out():
    rng = np.random.default_rng(7)
    target, source, mask = _random_case(rng, (25, 27), smooth=True)
    target = target.astype(np.float64)
    copies = [a.copy() for a in (target, source, mask)]
    out = poisson_blend(target, source, mask)
    for before, after in zip(copies, (target, source, mask), strict=True):
        np.testing.assert_array_equal(before, after)
    assert out.dtype == np.float32 and out.shape == target.shape
    assert out is not target
    box_out = solve_poisson_box(target[:10, :10], source[:10, :10], mask[:10, :10])
    assert box_out.dtype == np.float32
    np.testing.assert_array_equal(target, copies[0])
    # integer images are accepted and come out as float32
    out_int = poisson_blend((target * 100).astype(np.int16), source, mask)
    assert out_int.dtype == np.float32


def test_empty_mask_and_tiny_box():
    target = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = poisson_blend(target, target * 2, np.zeros((3, 4), bool))
    np.testing.assert_array_equal(out, target)
    assert out is not target
    # an axis of 2 voxels has no interior: nothing to solve
    flat = solve_poisson_box(target[:2], target[:2] * 5, np.ones((2, 4), bool))
    np.testing.assert_array_equal(flat, target[:2])


@pytest.mark.parametrize(
    ("args", "kwargs", "words"),
    [
        ((np.zeros((5, 5)), np.zeros((5, 6)), np.ones((5, 5), bool)), {}, "same shape"),
        ((np.zeros((5, 5)), np.zeros((5, 5)), np.ones((5, 4), bool)), {}, "same shape"),
        ((np.float32(1), np.float32(1), np.True_), {}, "scalar"),
        ((np.zeros((5, 5)), np.zeros((5, 5)), np.ones((5, 5))), {}, "bool"),
        ((np.zeros((5, 5)), np.zeros((5, 5), complex), np.ones((5, 5), bool)), {}, "real"),
        (
            (np.zeros((5, 5)), np.zeros((5, 5)), np.ones((5, 5), bool)),
            {"precision": "half"},
            "precision",
        ),
    ],
)
def test_bad_inputs_raise(args, kwargs, words):
    for fn in (poisson_blend, solve_poisson_box):
        with pytest.raises(ValueError, match=words):
            fn(*args, **kwargs)


def test_nan_inside_the_box_raises_and_outside_is_ignored():
    target = np.zeros((20, 20), np.float32)
    source = np.ones((20, 20), np.float32)
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    bad = target.copy()
    bad[7, 7] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        poisson_blend(bad, source, mask)
    bad_source = source.copy()
    bad_source[6, 8] = np.inf
    with pytest.raises(ValueError, match="source"):
        poisson_blend(target, bad_source, mask)
    far = target.copy()
    far[19, 19] = np.nan  # never reaches the solve
    out = poisson_blend(far, source, mask, fast_box=False)
    assert np.isnan(out[19, 19]) and np.isfinite(out[:15, :15]).all()
