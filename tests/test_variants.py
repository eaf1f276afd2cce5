"""Healthy variants of a template brain (napari_mtml.variants)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_mtml.variants import (
    SmoothField,
    Template,
    VariantSettings,
    make_variant,
    rician_noise,
)

SPACING = (2.0, 2.0, 2.0)


def _phantom() -> Template:
    """A small brain-like phantom: an ellipsoid of 'white matter' in 'grey matter', dark
    ventricles, 0 outside the brain; 2 mm voxels, room around it for a head."""
    shape = (40, 48, 44)
    grids = np.meshgrid(
        *[(np.arange(n) + 0.5) * s for n, s in zip(shape, SPACING, strict=True)], indexing="ij"
    )
    centre = [n * s / 2 for n, s in zip(shape, SPACING, strict=True)]
    radii = (22.0, 28.0, 24.0)
    r = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grids, centre, radii, strict=True)))
    brain = r < 1.0
    image = np.where(r < 0.6, 220.0, 150.0).astype(np.float32)
    vent = (
        np.sqrt(
            ((grids[0] - centre[0]) / 5) ** 2
            + ((grids[1] - centre[1]) / 9) ** 2
            + ((grids[2] - centre[2]) / 3) ** 2
        )
        < 1.0
    )
    image[vent] = 55.0
    image[~brain] = 0.0
    return Template(image, brain, SPACING)


@pytest.fixture(scope="module")
def template() -> Template:
    return _phantom()


def _marker(value_factor: float = 3.0):
    """A lesion hook painting a bright cube off-centre; its mask is the cube."""

    def paint(image, brain, spacing, rng):
        out = image.copy()
        mask = np.zeros(image.shape, dtype=bool)
        c = np.array(ndimage.center_of_mass(brain)).astype(int) + np.array([3, 4, -4])
        mask[c[0] - 3 : c[0] + 3, c[1] - 3 : c[1] + 3, c[2] - 3 : c[2] + 3] = True
        mask &= brain
        out[mask] = value_factor * float(image[brain].max())
        return out, mask

    return paint


def test_same_seed_same_variant_and_different_seeds_differ(template):
    a = make_variant(template, np.random.default_rng(5), skull=True, spacing=(5.0, 2.0, 2.0))
    b = make_variant(template, np.random.default_rng(5), skull=True, spacing=(5.0, 2.0, 2.0))
    c = make_variant(template, np.random.default_rng(6), skull=True, spacing=(5.0, 2.0, 2.0))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.brain, b.brain)
    np.testing.assert_array_equal(a.head, b.head)
    assert a.params == b.params
    assert not np.array_equal(a.image, c.image)
    assert a.params["rotation_deg"] != c.params["rotation_deg"]


@pytest.mark.parametrize("skull", [False, True])
@pytest.mark.parametrize("spacing", [None, (6.0, 1.6, 1.6), (3.0, 2.5, 2.5)])
def test_shape_spacing_and_values(template, skull, spacing):
    v = make_variant(template, np.random.default_rng(1), skull=skull, spacing=spacing)
    want = spacing or SPACING
    assert v.spacing == tuple(want)
    extent = [n * s for n, s in zip(template.shape, SPACING, strict=True)]
    assert v.image.shape == tuple(round(e / s) for e, s in zip(extent, want, strict=True))
    assert v.image.dtype == np.float32
    assert np.isfinite(v.image).all() and v.image.min() >= 0
    assert v.brain.shape == v.head.shape == v.image.shape
    assert v.brain.dtype == bool and v.head.dtype == bool
    assert v.lesion is None
    assert (v.head | ~v.brain).all()  # the brain lies in the head
    # brain volume in mm^3 roughly kept (scale range 0.84-0.98 per axis)
    ratio = v.brain.sum() * np.prod(want) / (template.brain.sum() * np.prod(SPACING))
    assert 0.5 < ratio < 1.05


def test_skull_stripped_variant_is_zero_exactly_outside_its_brain(template):
    v = make_variant(template, np.random.default_rng(2), skull=False)
    assert (v.image[~v.brain] == 0).all()
    assert (v.image[v.brain] > 0).mean() > 0.99
    np.testing.assert_array_equal(v.head, v.brain)


def test_skull_variant_has_a_head_around_the_brain(template):
    v = make_variant(template, np.random.default_rng(3), skull=True)
    shell = v.head & ~v.brain
    assert shell.sum() > 0.3 * v.brain.sum()
    wm = np.percentile(v.image[v.brain], 90)
    # dark bone and bright fat both occur around the brain, as on a T1 head
    assert (v.image[shell] < 0.25 * wm).mean() > 0.05
    assert (v.image[shell] > 0.95 * wm).mean() > 0.02
    # outside the head: Rician (Rayleigh) background noise, low but not zero
    air = ~ndimage.binary_dilation(v.head, iterations=2)
    assert 0 < v.image[air].mean() < 0.1 * wm


def test_masks_follow_the_image_through_the_warps(template):
    """A bright marker painted in template space must land in the warped lesion mask."""
    for seed, spacing in ((0, None), (1, (6.0, 1.5, 1.5))):
        v = make_variant(
            template, np.random.default_rng(seed), skull=True, spacing=spacing, lesion=_marker()
        )
        assert v.lesion is not None and v.lesion.any()
        assert (v.brain | ~v.lesion).all()
        inside = v.image[v.lesion]
        around = v.image[v.brain & ~ndimage.binary_dilation(v.lesion, iterations=2)]
        assert inside.mean() > 2.0 * np.percentile(around, 99.5)


def test_identity_settings_keep_the_template_grid(template):
    still = VariantSettings(
        max_rotation_deg=(0.0, 0.0, 0.0),
        scale_range=(1.0, 1.0),
        anisotropy=0.0,
        max_shear=0.0,
        max_translation_mm=0.0,
        elastic_mm=0.0,
        gamma_range=(1.0, 1.0),
        bias_range=(0.0, 0.0),
        noise_range=(0.0, 0.0),
        gain_range=(1.0, 1.0),
    )
    v = make_variant(template, np.random.default_rng(0), settings=still)
    np.testing.assert_array_equal(v.brain, template.brain)
    # the image is the template up to the gain normalisation (white matter level -> 1)
    scale = float(np.percentile(template.image[template.brain], 90))
    np.testing.assert_allclose(v.image * scale, template.image, rtol=1e-4, atol=1e-3)


def test_lesion_twin_shares_subject_pose_and_scanner(template):
    """Same seed with and without a lesion: the same volume away from the lesion."""
    healthy = make_variant(template, np.random.default_rng(9), skull=True)
    lesioned = make_variant(template, np.random.default_rng(9), skull=True, lesion=_marker())
    np.testing.assert_array_equal(healthy.brain, lesioned.brain)
    far = ~ndimage.binary_dilation(lesioned.lesion, iterations=3)
    np.testing.assert_allclose(lesioned.image[far], healthy.image[far], rtol=1e-5, atol=1e-6)
    assert not np.allclose(lesioned.image[lesioned.lesion], healthy.image[lesioned.lesion])


def test_thick_slices_average_the_slab(template):
    """A 6 mm slice is the mean over its slab: a thin bright sheet is diluted, not kept."""

    def sheet(image, brain, spacing, rng):
        out = image.copy()
        mask = np.zeros(image.shape, dtype=bool)
        z = int(ndimage.center_of_mass(brain)[0])
        mask[z] = brain[z]  # one 2 mm template slice
        out[mask] = 1000.0
        return out, mask

    still = VariantSettings(
        max_rotation_deg=(0.0, 0.0, 0.0),
        scale_range=(1.0, 1.0),
        anisotropy=0.0,
        max_shear=0.0,
        max_translation_mm=0.0,
        elastic_mm=0.0,
        gamma_range=(1.0, 1.0),
        bias_range=(0.0, 0.0),
        noise_range=(0.0, 0.0),
        gain_range=(1.0, 1.0),
    )
    thin = make_variant(template, np.random.default_rng(0), settings=still, lesion=sheet)
    thick = make_variant(
        template, np.random.default_rng(0), settings=still, lesion=sheet, spacing=(6.0, 2.0, 2.0)
    )
    assert thin.lesion.any()
    assert not thick.lesion.any()  # a third of a slab is below the 0.5 partial volume
    peak_thin = thin.image.max()
    peak_thick = thick.image.max()
    assert peak_thick < 0.6 * peak_thin


def test_smooth_field_and_rician_noise():
    rng = np.random.default_rng(0)
    f = SmoothField((100.0, 100.0, 100.0), 20.0, rng)
    grid = [np.arange(0.5, 100.0, 1.0)] * 3
    v = f.on_grid(*grid)
    assert v.shape == (100, 100, 100) and v.dtype == np.float32
    assert 0.6 < v.std() < 1.4
    # smooth: neighbours 1 mm apart are nearly equal
    assert np.corrcoef(v[:, :, :-1].ravel(), v[:, :, 1:].ravel())[0, 1] > 0.98
    n = rician_noise(np.zeros((200, 200), np.float32), 2.0, np.random.default_rng(1))
    assert abs(n.mean() - 2.0 * np.sqrt(np.pi / 2)) < 0.05  # Rayleigh mean
    assert (n >= 0).all()


def test_bad_input_raises_clear_errors(template):
    with pytest.raises(ValueError, match="3D"):
        Template(np.zeros((4, 4)), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="shape"):
        Template(np.zeros((8, 8, 8)), np.ones((8, 8, 9), bool))
    with pytest.raises(ValueError, match="empty"):
        Template(np.zeros((8, 8, 8)), np.zeros((8, 8, 8), bool))
    with pytest.raises(ValueError, match="Generator"):
        make_variant(template, 0)
    with pytest.raises(ValueError, match="spacing"):
        make_variant(template, np.random.default_rng(0), spacing=(1.0, -1.0, 1.0))

    def broken(image, brain, spacing, rng):
        return image[:-1], brain

    with pytest.raises(ValueError, match="lesion function"):
        make_variant(template, np.random.default_rng(0), lesion=broken)
