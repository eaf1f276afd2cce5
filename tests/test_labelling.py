"""The flipped-Gaussian label with per-component closing and hole filling (METHOD.md §3)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_mtml.anomalies.labelling import (
    close_grey,
    fill_holes_grey,
    flipped_gaussian_label,
    flipped_gaussian_label_of_boxes,
)

BELOW_ONE = np.nextafter(np.float32(1), np.float32(0))


def _slow_fill_holes(image):
    """Reconstruction by erosion, literally: seed = image on the border, its max inside; erode
    with the 2-connectivity footprint and keep >= image until nothing changes."""
    footprint = ndimage.generate_binary_structure(image.ndim, 2)
    marker = np.full_like(image, image.max())
    border = np.ones(image.shape, bool)
    border[(slice(1, -1),) * image.ndim] = False
    marker[border] = image[border]
    while True:
        step = np.maximum(ndimage.grey_erosion(marker, footprint=footprint), image)
        if np.array_equal(step, marker):
            return marker
        marker = step


def _slow_label(augmented, original, mask, sigma=0.2):
    """METHOD.md §3 with scipy's grey_closing and the literal reconstruction, one component at
    a time on its own bounding box, combined by maximum."""
    footprint = ndimage.generate_binary_structure(mask.ndim, 2)
    x = np.abs(augmented.astype(np.float32) - original.astype(np.float32))
    y = (-np.expm1(-(x * x) * np.float32(1 / (2 * sigma**2)))).astype(np.float32)
    y = np.minimum(y, BELOW_ONE)
    components, _ = ndimage.label(mask)
    out = np.zeros(mask.shape, np.float32)
    for k, box in enumerate(ndimage.find_objects(components), start=1):
        own = np.where(components[box] == k, y[box], 0).astype(np.float32)
        closed = ndimage.grey_closing(own, footprint=footprint)
        out[box] = np.maximum(out[box], _slow_fill_holes(closed))
    return out


def _smooth_field(rng, shape, blur=1.5):
    field = ndimage.gaussian_filter(rng.random(shape), blur)
    return ((field - field.min()) / (field.max() - field.min())).astype(np.float32)


def _disc(shape, centre, radius):
    grids = np.indices(shape, dtype=np.float64)
    r2 = sum(((g - c) / radius) ** 2 for g, c in zip(grids, centre, strict=True))
    return np.sqrt(r2)


def test_known_values():
    original = np.zeros((8, 9), np.float32)
    mask = np.zeros((8, 9), bool)
    mask[2:6, 3:7] = True  # a rectangle is its own bounding box: no closing effect
    for x, expected in [(0.2, 0.3935), (0.4, 0.8647), (0.6, 0.9889), (0.0, 0.0)]:
        augmented = original + np.float32(x) * mask
        label = flipped_gaussian_label(augmented, original, mask, sigma=0.2)
        np.testing.assert_allclose(label[mask], expected, atol=1e-4)
        assert (label[~mask] == 0).all()
    # sigma scales x: x = 0.1 with sigma 0.1 is x = 0.2 with sigma 0.2
    label = flipped_gaussian_label(original + np.float32(0.1) * mask, original, mask, sigma=0.1)
    np.testing.assert_allclose(label[mask], 1 - np.exp(-0.5), rtol=1e-6)
    # decreases and increases count alike
    label = flipped_gaussian_label(original - np.float32(0.2) * mask, original, mask)
    np.testing.assert_allclose(label[mask], 0.3935, atol=1e-4)


def test_range_dtype_and_empty_mask():
    rng = np.random.default_rng(0)
    original = rng.standard_normal((30, 40)).astype(np.float32)
    augmented = original + rng.standard_normal((30, 40)).astype(np.float32) * 50
    mask = rng.random((30, 40)) < 0.5
    label = flipped_gaussian_label(augmented, original, mask)
    assert label.dtype == np.float32 and label.shape == mask.shape
    assert label.min() >= 0 and label.max() < 1
    assert label.max() == BELOW_ONE  # huge differences saturate just below 1
    empty = flipped_gaussian_label(augmented, original, np.zeros((30, 40), bool))
    assert empty.dtype == np.float32 and empty.shape == (30, 40) and not empty.any()
    empty3 = flipped_gaussian_label(
        np.ones((4, 5, 6)), np.zeros((4, 5, 6)), np.zeros((4, 5, 6), bool)
    )
    assert empty3.shape == (4, 5, 6) and not empty3.any()


@pytest.mark.parametrize("shape", [(41, 47), (19, 23, 21)])
def test_ring_label_is_filled(shape):
    """A deformation-like change: 0 at the centre, strong on a ring: the centre gets filled."""
    centre = tuple((n - 1) / 2 for n in shape)
    r = _disc(shape, centre, (min(shape) - 3) / 2)
    mask = r <= 1
    original = np.zeros(shape, np.float32)
    augmented = (0.5 * np.sin(np.pi * np.clip(r, 0, 1)) * mask).astype(np.float32)
    raw = -np.expm1(-(augmented**2) / np.float32(0.08))
    label = flipped_gaussian_label(augmented, original, mask)
    middle = tuple(int(round(c)) for c in centre)
    assert raw[middle] < 1e-6
    # every path from the centre to the edge crosses this shell, several voxels thick
    shell_floor = raw[(r > 0.3) & (r < 0.7)].min()
    assert shell_floor > 0.5
    assert label[middle] >= shell_floor
    assert (label[r <= 0.3] >= shell_floor).all()
    np.testing.assert_array_equal(label, _slow_label(augmented, original, mask))


@pytest.mark.parametrize("shape", [(37, 43), (64, 30), (15, 18, 13), (12, 9, 16)])
def test_matches_slow_reference(shape):
    rng = np.random.default_rng(sum(shape))
    change = _smooth_field(rng, shape) * np.float32(0.7)
    original = rng.standard_normal(shape).astype(np.float32) * np.float32(0.1)
    augmented = original + change
    # several components of various shapes, some with bounding boxes that overlap
    mask = ndimage.binary_opening(_smooth_field(rng, shape, blur=2.0) > 0.55)
    mask |= _smooth_field(rng, shape, blur=1.0) > 0.8
    assert ndimage.label(mask)[1] >= 2
    label = flipped_gaussian_label(augmented, original, mask)
    np.testing.assert_array_equal(label, _slow_label(augmented, original, mask))


@pytest.mark.parametrize("shape", [(2, 2), (2, 9), (9, 2), (3, 5), (1, 6), (6, 1)])
def test_closing_of_thin_and_strided_2d_arrays(shape):
    rng = np.random.default_rng(shape[0] * 10 + shape[1])
    image = rng.random(shape).astype(np.float32)
    footprint = ndimage.generate_binary_structure(2, 2)
    for view in (image, np.asfortranarray(image), np.repeat(image, 2, axis=1)[:, ::2]):
        expected = ndimage.grey_closing(view, footprint=footprint)
        np.testing.assert_array_equal(close_grey(view), expected)


@pytest.mark.parametrize("shape", [(30, 34), (40, 41), (13, 16, 11), (8, 20, 9)])
def test_closing_and_filling_equal_their_definitions(shape):
    rng = np.random.default_rng(len(shape) * 100 + shape[0])
    for blur in (0.0, 1.0, 2.5):
        image = _smooth_field(rng, shape, blur) if blur else rng.random(shape).astype(np.float32)
        footprint = ndimage.generate_binary_structure(len(shape), 2)
        np.testing.assert_array_equal(
            close_grey(image), ndimage.grey_closing(image, footprint=footprint)
        )
        filled = fill_holes_grey(image)
        np.testing.assert_array_equal(filled, _slow_fill_holes(image))
        assert (filled >= image).all()


def test_filling_matches_skimage_reconstruction():
    morphology = pytest.importorskip("skimage.morphology")
    rng = np.random.default_rng(9)
    for shape in [(33, 29), (14, 17, 12)]:
        image = _smooth_field(rng, shape, 1.2)
        seed = image.copy()
        seed[(slice(1, -1),) * len(shape)] = image.max()
        footprint = ndimage.generate_binary_structure(len(shape), 2)
        expected = morphology.reconstruction(seed, image, method="erosion", footprint=footprint)
        np.testing.assert_array_equal(fill_holes_grey(image), expected.astype(np.float32))


def test_filling_uses_diagonal_steps():
    """A ring broken only diagonally drains in 2D (8-connected paths): no filling."""
    image = np.zeros((7, 7), np.float32)
    image[1:6, 1:6] = 1.0
    image[2:5, 2:5] = 0.0
    image[1, 1] = 0.0  # the diagonal corner gap leads from the hole to the border
    filled = fill_holes_grey(image)
    np.testing.assert_array_equal(filled, image)
    image[1, 1] = 1.0  # closed ring: the hole fills up to the ring
    assert (fill_holes_grey(image)[2:5, 2:5] == 1.0).all()


def test_components_are_independent():
    shape = (40, 40)
    rng = np.random.default_rng(4)
    original = np.zeros(shape, np.float32)
    augmented = _smooth_field(rng, shape) * np.float32(0.6)
    a = np.zeros(shape, bool)
    a[5:30, 5:9] = True
    a[26:30, 5:30] = True  # an L whose bounding box holds the second component
    b = np.zeros(shape, bool)
    b[12:18, 14:20] = True
    both = flipped_gaussian_label(augmented, original, a | b)
    alone_a = flipped_gaussian_label(augmented, original, a)
    alone_b = flipped_gaussian_label(augmented, original, b)
    np.testing.assert_array_equal(both, np.maximum(alone_a, alone_b))
    # what b's voxels hold does not change a's label outside b
    other = augmented.copy()
    other[b] = 0.9
    changed = flipped_gaussian_label(other, original, a | b)
    np.testing.assert_array_equal(
        changed[a], np.maximum(alone_a, flipped_gaussian_label(other, original, b))[a]
    )
    np.testing.assert_array_equal(flipped_gaussian_label(other, original, a), alone_a)


@pytest.mark.parametrize("seed", range(6))
def test_label_of_boxes_equals_label_of_their_union(seed):
    """Boxes that touch face to face, overlap, nest or lie apart (and masks that only touch
    diagonally) give the label of the union, bit for bit."""
    rng = np.random.default_rng(seed)
    shape = (36, 40) if seed % 2 else (14, 16, 15)
    original = _smooth_field(rng, shape)
    augmented = original + _smooth_field(rng, shape) * np.float32(0.5)
    boxes, masks = [], []
    union = np.zeros(shape, bool)
    for _ in range(int(rng.integers(1, 6))):
        lo = [int(rng.integers(0, n - 3)) for n in shape]
        box = tuple(
            slice(a, min(a + int(rng.integers(2, 9)), n)) for a, n in zip(lo, shape, strict=True)
        )
        mask = rng.random([s.stop - s.start for s in box]) < 0.7
        boxes.append(box)
        masks.append(mask)
        union[box] |= mask
    # a pair touching face to face across adjacent boxes, and one touching only diagonally
    for box in ((slice(0, 3),) * len(shape), tuple(slice(3, 5) for _ in shape)):
        boxes.append(box)
        masks.append(np.ones([s.stop - s.start for s in box], bool))
        union[box] = True
    np.testing.assert_array_equal(
        flipped_gaussian_label_of_boxes(augmented, original, boxes, masks),
        flipped_gaussian_label(augmented, original, union),
    )


def test_single_component_shortcut_is_only_taken_for_one_component():
    from napari_mtml.anomalies.labelling import _single_component_2d

    rng = np.random.default_rng(8)
    taken = 0
    for trial in range(300):
        shape = (int(rng.integers(1, 9)), int(rng.integers(1, 9)))
        mask = rng.random(shape) < rng.uniform(0.3, 1.0)
        if trial % 3 == 0:  # runs per row, sometimes only touching diagonally
            mask[:] = False
            for r in range(shape[0]):
                a = int(rng.integers(0, shape[1]))
                mask[r, a : a + int(rng.integers(1, 4))] = True
        box = _single_component_2d(mask)
        components, count = ndimage.label(mask)
        if box is not None:
            taken += 1
            assert count == 1
            assert box == ndimage.find_objects(components)[0]
    assert taken > 30
    assert _single_component_2d(_disc((30, 40), (14, 20), 11) <= 1) == (slice(3, 26), slice(9, 32))


def test_inputs_untouched_and_channels():
    rng = np.random.default_rng(5)
    original = rng.standard_normal((3, 20, 22)).astype(np.float32)
    augmented = original + rng.standard_normal((3, 20, 22)).astype(np.float32) * 0.3
    mask = np.zeros((20, 22), bool)
    mask[4:15, 6:18] = True
    copies = [a.copy() for a in (augmented, original, mask)]
    label = flipped_gaussian_label(augmented, original, mask)
    for before, after in zip(copies, (augmented, original, mask), strict=True):
        np.testing.assert_array_equal(before, after)
    mean_diff = np.abs(augmented - original).mean(axis=0)
    expected = flipped_gaussian_label(mean_diff, np.zeros_like(mean_diff), mask)
    np.testing.assert_allclose(label, expected, atol=1e-6)
    # float64 and integer images are accepted
    label64 = flipped_gaussian_label(augmented[0].astype(np.float64), original[0], mask)
    assert label64.dtype == np.float32
    label_int = flipped_gaussian_label(
        np.ones((5, 5), np.int16), np.zeros((5, 5), np.int16), np.ones((5, 5), np.uint8)
    )
    np.testing.assert_allclose(label_int, 1 - np.exp(-1 / 0.08), rtol=1e-6)


@pytest.mark.parametrize(
    ("augmented", "original", "mask", "kwargs", "words"),
    [
        (np.zeros((5, 5)), np.zeros((5, 6)), np.ones((5, 5), bool), {}, "same shape"),
        (np.zeros((5, 5)), np.zeros((5, 5)), np.ones((4, 5), bool), {}, "spatial shape"),
        (np.zeros((5, 5)), np.zeros((5, 5)), np.ones((5, 5)), {}, "bool"),
        (np.zeros(()), np.zeros(()), np.ones((), bool), {}, "scalar"),
        (np.zeros((5, 5)), np.zeros((5, 5)), np.ones((5, 5), bool), {"sigma": 0}, "sigma"),
        (np.zeros((5, 5)), np.zeros((5, 5)), np.ones((5, 5), bool), {"sigma": np.nan}, "sigma"),
        (np.zeros((5, 5)), np.zeros((5, 5)), np.ones((5, 5), bool), {"sigma": "x"}, "sigma"),
        (np.zeros((5, 5), complex), np.zeros((5, 5)), np.ones((5, 5), bool), {}, "real"),
    ],
)
def test_bad_inputs_raise(augmented, original, mask, kwargs, words):
    with pytest.raises(ValueError, match=words):
        flipped_gaussian_label(augmented, original, mask, **kwargs)


def test_nan_inside_the_mask_raises_outside_is_ignored():
    original = np.zeros((10, 10), np.float32)
    augmented = original.copy()
    mask = np.zeros((10, 10), bool)
    mask[2:5, 2:5] = True
    augmented[8, 8] = np.nan
    assert np.isfinite(flipped_gaussian_label(augmented, original, mask)).all()
    augmented[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        flipped_gaussian_label(augmented, original, mask)
