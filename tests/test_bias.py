"""The bias-field correction: known fields recovered, lesions kept, bad input refused, and the
setting carried from training to prediction."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_mtml.bias import correct_bias, estimate_bias
from napari_mtml.config import TrainConfig
from napari_mtml.io import Scan
from napari_mtml.preprocess import to_frame


def head_phantom(shape=(48, 56, 48), rng=None, noise=0.0):
    """A ball of two tissues (a tilted plane between them) on a zero background, float64."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    head = z**2 + y**2 + x**2 < 0.85
    tissue = np.where(z + 0.5 * x > 0.2, 80.0, 120.0)
    if noise:
        tissue = tissue * np.exp(noise * rng.standard_normal(shape))
    return tissue * head, head, (z, y, x)


def centred(values):
    return values - values.mean()


@pytest.mark.parametrize("which", ["linear", "quadratic", "cubic"])
def test_a_polynomial_field_on_one_tissue_is_recovered(which):
    image, head, (z, y, x) = head_phantom()
    field = {
        "linear": 0.3 * y - 0.1 * z,
        "quadratic": 0.3 * y**2 - 0.2 * x * z,
        "cubic": 0.2 * x**3 + 0.1 * y * z,
    }[which]
    one_tissue = np.where(head, 100.0, 0.0)
    estimate = estimate_bias(one_tissue * np.exp(field), head, spacing=(2.0, 2.0, 2.0))
    assert estimate.dtype == np.float32 and estimate.shape == image.shape
    assert np.all(estimate[~head] == 0)
    # the field is not extrapolated past the blocks it was fitted on, so compare inside them
    inner = z**2 + y**2 + x**2 < 0.5
    error = centred(estimate[inner]) - centred(field[inner])
    assert np.abs(error).max() < 0.01


def test_two_noisy_tissues_are_flattened():
    rng = np.random.default_rng(0)
    image, head, (z, y, x) = head_phantom(rng=rng, noise=0.05)
    tissue = image.copy()
    biased = image * np.exp(0.35 * y + 0.15 * y * x)
    flat = correct_bias(biased, head, spacing=(2.0, 2.0, 2.0))
    assert flat.dtype == np.float32
    before = np.log(biased[head] / tissue[head]).std()
    after = np.log(flat[head] / tissue[head]).std()
    assert after < 0.2 * before


def test_the_field_added_is_the_field_removed():
    """Equivariance: what the correction takes from a biased scan beyond what it takes from the
    same scan unbiased is the bias itself (the property a training set of varied scanners
    needs)."""
    rng = np.random.default_rng(1)
    image, head, (z, y, x) = head_phantom(rng=rng, noise=0.05)
    field = 0.25 * z - 0.2 * y**2
    plain = estimate_bias(image, head, (2.0, 2.0, 2.0))
    biased = estimate_bias(image * np.exp(field), head, (2.0, 2.0, 2.0))
    inner = z**2 + y**2 + x**2 < 0.5
    removed = centred((biased - plain)[inner])
    assert np.abs(removed - centred(field[inner])).std() < 0.15 * field[inner].std()


def test_a_small_lesion_keeps_its_contrast():
    image, head, (z, y, x) = head_phantom()
    lesion = (z - 0.1) ** 2 + (y + 0.3) ** 2 + (x + 0.4) ** 2 < 0.02
    image = np.where(lesion, 1.6 * image, image)
    biased = image * np.exp(0.3 * y)
    flat = correct_bias(biased, head, spacing=(2.0, 2.0, 2.0))
    ring = ((z - 0.1) ** 2 + (y + 0.3) ** 2 + (x + 0.4) ** 2 < 0.06) & ~lesion & head
    same_tissue = ring & (np.abs(image - image[lesion].mean() / 1.6) < 1)
    contrast = flat[lesion].mean() / flat[same_tissue].mean()
    assert contrast == pytest.approx(1.6, rel=0.03)


def test_2d_images_and_anisotropic_spacing():
    y, x = np.meshgrid(np.linspace(-1, 1, 120), np.linspace(-1, 1, 100), indexing="ij")
    head = y**2 + x**2 < 0.8
    field = 0.4 * x - 0.2 * y * x
    estimate = estimate_bias(np.where(head, 90.0, 0.0) * np.exp(field), head, (1.0, 1.0))
    inner = y**2 + x**2 < 0.4
    assert np.abs(centred(estimate[inner]) - centred(field[inner])).max() < 0.01
    # thick slices: one block per slice along z, the fit still holds in-plane
    image, head3, (z, y3, x3) = head_phantom(shape=(16, 64, 64))
    one = np.where(head3, 100.0, 0.0)
    est = estimate_bias(one * np.exp(0.3 * x3), head3, (6.0, 1.5, 1.5))
    inner3 = z**2 + y3**2 + x3**2 < 0.5
    assert np.abs(centred(est[inner3]) - centred(0.3 * x3[inner3])).max() < 0.02


def test_what_cannot_be_estimated_is_left_as_it_is():
    image, head, _ = head_phantom(shape=(12, 12, 12))
    assert not estimate_bias(np.zeros((20, 20, 20)), None, None).any()  # nothing positive
    assert not estimate_bias(image, head, (1.0, 1.0, 1.0), grid_mm=8.0).any()  # too few blocks
    np.testing.assert_array_equal(correct_bias(image, head, (1.0, 1.0, 1.0), grid_mm=8.0), image)
    with pytest.raises(ValueError, match="does not match"):
        estimate_bias(image, head[:-1])
    with pytest.raises(ValueError, match="2D or 3D"):
        estimate_bias(np.ones(5))
    with pytest.raises(ValueError, match="spacing"):
        estimate_bias(image, head, (1.0, 0.0, 1.0))
    # non-finite values outside the foreground are not read
    bad = image.copy()
    bad[~head] = np.nan
    assert np.isfinite(estimate_bias(bad, head, (1.0, 1.0, 1.0))).all()


def test_to_frame_corrects_only_when_asked():
    image, head, (z, y, x) = head_phantom()
    scan = Scan(array=(image * np.exp(0.4 * y)).astype(np.float32), spacing=(2.0, 2.0, 2.0))
    plain, fg, _ = to_frame(scan, kind="mri", frame=(48, 64, 48), downsample=1, foreground=head)
    flat, fg2, _ = to_frame(
        scan,
        kind="mri",
        frame=(48, 64, 48),
        downsample=1,
        foreground=head,
        bias_correction="poly",
    )
    np.testing.assert_array_equal(fg, fg2)
    truth, _, _ = to_frame(
        Scan(array=image.astype(np.float32), spacing=(2.0, 2.0, 2.0)),
        kind="mri",
        frame=(48, 64, 48),
        downsample=1,
        foreground=head,
    )
    assert np.abs(flat - truth)[fg].mean() < 0.2 * np.abs(plain - truth)[fg].mean()
    with pytest.raises(ValueError, match="bias_correction"):
        to_frame(scan, kind="mri", bias_correction="n4")


def test_auto_corrects_skull_stripped_scans_only():
    """ "auto": a scan whose background is one value (skull-stripped) is corrected as "poly"
    corrects it; a head with a noisy background (the skull on) is left as read."""
    image, head, (z, y, x) = head_phantom()
    biased = (image * np.exp(0.4 * y)).astype(np.float32)
    noisy = biased + np.abs(np.random.default_rng(0).normal(0, 2, biased.shape)).astype(np.float32)
    common = {"kind": "mri", "frame": (48, 64, 48), "downsample": 1, "foreground": head}
    for array, corrected in ((biased, True), (noisy, False)):
        scan = Scan(array=array, spacing=(2.0, 2.0, 2.0))
        auto, _, _ = to_frame(scan, bias_correction="auto", **common)
        poly, _, _ = to_frame(scan, bias_correction="poly", **common)
        none, _, _ = to_frame(scan, bias_correction="none", **common)
        np.testing.assert_array_equal(auto, poly if corrected else none)
        assert not np.array_equal(poly, none)


def test_the_setting_is_a_config_field_and_a_flag(tmp_path):
    cfg = TrainConfig(healthy=("a",), out="r", bias_correction="poly")
    cfg.to_json(tmp_path / "config.json")
    assert TrainConfig.from_json(tmp_path / "config.json").bias_correction == "poly"
    assert TrainConfig().bias_correction == "auto"
    # a run saved before the setting existed was trained without it, and predicts so
    saved = TrainConfig(healthy=("a",), out="r").to_dict()
    del saved["bias_correction"]
    assert TrainConfig.from_json(text=json.dumps(saved)).bias_correction == "none"
    assert TrainConfig(bias_correction="auto").bias_correction == "auto"
    with pytest.raises(ValueError, match="bias_correction"):
        TrainConfig(bias_correction="n4")


def test_training_collections_are_corrected_when_asked(tmp_path):
    """`HealthyCollection.from_paths(bias_correction="poly")` (what `mtml train
    --bias-correction poly` reads its scans with) flattens a field written into the files."""
    import nibabel as nib

    from napari_mtml.data import HealthyCollection
    from napari_mtml.io import read_image

    image, head, (z, y, x) = head_phantom(shape=(24, 56, 48))
    image = np.where(head, 100.0, 0.0) * np.exp(0.05 * np.random.default_rng(0).random(z.shape))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    files = []
    for i in range(5):
        biased = (image * np.exp(0.4 * x - 0.1 * i * y)).astype(np.float32)
        files.append(tmp_path / f"s{i}.nii.gz")
        nib.save(nib.Nifti1Image(biased.T.copy(), affine), files[-1])
    nib.save(nib.Nifti1Image(image.astype(np.float32).T.copy(), affine), tmp_path / "t.nii.gz")
    common = {"dims": 3, "frame": (32, 64, 48), "downsample": 1}
    plain = HealthyCollection.from_paths(files, **common)
    flat = HealthyCollection.from_paths(files, bias_correction="poly", **common)
    truth, inside, _ = to_frame(read_image(tmp_path / "t.nii.gz"), kind="mri", **common)
    for a, b in zip(plain.samples, flat.samples, strict=True):
        err_plain = np.abs(a.image - truth)[inside].mean()
        err_flat = np.abs(b.image - truth)[inside].mean()
        assert err_flat < 0.3 * err_plain
