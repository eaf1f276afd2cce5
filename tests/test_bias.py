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


# ------------------------------------------------------------------ bias fields as augmentation


@pytest.mark.parametrize("shape", [(40, 48), (24, 32, 28)])
def test_random_fields_span_the_ratio_asked_and_keep_the_level(shape):
    from napari_mtml.bias import random_bias_field

    mask = np.zeros(shape, bool)
    mask[tuple(slice(3, n - 5) for n in shape)] = True
    ratios = []
    for seed in range(30):
        field = random_bias_field(shape, np.random.default_rng(seed), 0.5, mask=mask)
        assert field.shape == shape and field.dtype == np.float32
        inside = field[mask].astype(np.float64)
        ratios.append(inside.max() / inside.min())
        assert abs(np.log(inside).mean()) < 1e-5  # tilts the brightness, keeps its level
        again = random_bias_field(shape, np.random.default_rng(seed), 0.5, mask=mask)
        np.testing.assert_array_equal(field, again)  # one seed, one field
    ratios = np.array(ratios)
    assert ratios.min() >= 1.0 - 1e-5 and ratios.max() <= 1.5 + 1e-5
    assert ratios.max() > 1.3 and ratios.min() < 1.2  # drawn across the range, not fixed
    flat = random_bias_field(shape, np.random.default_rng(0), 0.0, mask=mask)
    np.testing.assert_array_equal(flat, np.ones(shape, np.float32))


def test_a_field_on_a_small_head_in_a_large_frame_stays_finite():
    """A head a few voxels wide (the tip of a skull in an axial slice) scales the polynomial by
    thousands outside its box: the field must not overflow there (training printed "overflow
    encountered in multiply"), and inside the head it keeps its ratio and level."""
    from napari_mtml.bias import apply_bias_field, random_bias_field

    shape = (112, 96)
    mask = np.zeros(shape, bool)
    mask[2:6, 3:8] = True  # 20 voxels in a corner of the frame
    image = np.where(mask, np.float32(1.5), np.float32(0.0))
    for seed in range(20):
        with np.errstate(over="raise", invalid="raise"):
            field = random_bias_field(shape, np.random.default_rng(seed), 0.5, mask=mask)
            out = apply_bias_field(image, field, zero=-2.0)
        assert np.isfinite(field).all()
        inside = field[mask].astype(np.float64)
        assert inside.max() / inside.min() <= 1.5 + 1e-5
        assert abs(np.log(inside).mean()) < 1e-5
        # clamped outside to the range inside: no larger ratio anywhere
        assert field.max() <= inside.max() and field.min() >= inside.min()
        assert (out[~mask] == 0).all() and np.isfinite(out).all()


def test_random_fields_are_smooth():
    """A cubic over the mask's box: neighbouring voxels differ by a tiny fraction of the span."""
    from napari_mtml.bias import random_bias_field

    field = random_bias_field((64, 64), np.random.default_rng(3), 0.5)
    log = np.log(field.astype(np.float64))
    span = log.max() - log.min()
    assert span > 0
    assert np.abs(np.diff(log, axis=0)).max() < 0.15 * span
    assert np.abs(np.diff(log, axis=1)).max() < 0.15 * span


def test_random_field_input_is_checked():
    from napari_mtml.bias import random_bias_field

    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="2D or 3D"):
        random_bias_field((8,), rng, 0.4)
    with pytest.raises(ValueError, match="max_ratio"):
        random_bias_field((8, 8), rng, -0.1)
    with pytest.raises(ValueError, match="mask of shape"):
        random_bias_field((8, 8), rng, 0.4, mask=np.ones((8, 9), bool))


def test_a_field_on_the_z_score_is_the_field_on_the_scan():
    """`apply_bias_field(z, b, -mean/std)` equals the z-score (same mean and std) of the scan
    multiplied by `b`; the frame's background stays 0."""
    from napari_mtml.bias import apply_bias_field, random_bias_field

    rng = np.random.default_rng(1)
    raw = np.abs(rng.normal(100.0, 20.0, (48, 40)))
    head = np.zeros(raw.shape, bool)
    head[6:42, 5:35] = True
    mean, std = raw[head].mean(), raw[head].std()
    z = np.where(head, (raw - mean) / std, 0.0).astype(np.float32)
    field = random_bias_field(raw.shape, rng, 0.5, mask=head)
    out = apply_bias_field(z, field, -mean / std)
    expected = np.where(head, (raw * field - mean) / std, 0.0)
    np.testing.assert_allclose(out, expected, atol=1e-4)
    assert not np.any(out[~head]) and out.dtype == np.float32
    with pytest.raises(ValueError, match="does not match"):
        apply_bias_field(z, field[:-1], 0.0)


def _framed_collection(tmp_path, n=5):
    import nibabel as nib

    from napari_mtml.data import HealthyCollection

    image, head, _ = head_phantom(shape=(20, 40, 36), rng=np.random.default_rng(0), noise=0.05)
    files = []
    for i in range(n):
        files.append(tmp_path / f"h{i}.nii.gz")
        scaled = (image * (1 + 0.1 * i)).astype(np.float32)
        nib.save(nib.Nifti1Image(scaled.T.copy(), np.diag([2.0, 2.0, 2.0, 1.0])), files[-1])
    collection = HealthyCollection.from_paths(
        files, dims=2, frame=(48, 48), downsample=1, bias_correction="none"
    )
    return collection, image, head


def test_collections_know_the_z_value_of_zero_intensity(tmp_path):
    from napari_mtml.data import HealthyCollection

    collection, image, head = _framed_collection(tmp_path)
    values = image[head]
    for s in collection.samples:
        i = int(s.name.split("h")[1][0])
        scaled = values * (1 + 0.1 * i)
        assert s.zero == pytest.approx(-scaled.mean() / scaled.std(), rel=1e-4)
    arrays = HealthyCollection.from_arrays(np.zeros((5, 16, 16), np.float32) + 1)
    assert all(s.zero is None for s in arrays.samples)


def test_training_items_carry_a_bias_field_only_when_asked(tmp_path):
    """`bias_augment` changes the healthy image under the anomalies (deterministically per seed)
    and leaves the background at 0; 0, or a sample without `zero`, leaves items as they were."""
    from napari_mtml.data import HealthyCollection, SyntheticDataset

    collection, _, _ = _framed_collection(tmp_path)
    kw = {"tasks": [4], "seed": 7}
    plain = SyntheticDataset(collection.samples, **kw)
    biased = SyntheticDataset(collection.samples, bias_augment=0.6, **kw)
    changed = 0
    for k in range(6):
        a, la, ta = plain.draw(k)
        b, lb, tb = biased.draw(k)
        assert ta == tb
        assert np.all(b[a == 0] == 0)  # background kept
        assert 0 <= lb.min() and lb.max() <= 1
        b2, lb2, _ = SyntheticDataset(collection.samples, bias_augment=0.6, **kw).draw(k)
        np.testing.assert_array_equal(b, b2)
        np.testing.assert_array_equal(lb, lb2)
        changed += not np.allclose(a, b, atol=1e-3)
    assert changed >= 5
    # without the z-value of 0 (arrays given already framed) no field can be applied
    arrays = HealthyCollection.from_arrays([s.image for s in collection.samples])
    off = SyntheticDataset(arrays.samples, **kw)
    on = SyntheticDataset(arrays.samples, bias_augment=0.6, **kw)
    for k in range(3):
        np.testing.assert_array_equal(off.draw(k)[0], on.draw(k)[0])


def test_bias_augment_is_a_config_field_and_a_flag(tmp_path):
    cfg = TrainConfig(healthy=("a",), out="r", bias_augment=0.3)
    cfg.to_json(tmp_path / "config.json")
    assert TrainConfig.from_json(tmp_path / "config.json").bias_augment == 0.3
    saved = TrainConfig(healthy=("a",), out="r").to_dict()
    del saved["bias_augment"]
    # a run saved before the setting existed trained without fields
    assert TrainConfig.from_json(text=json.dumps(saved)).bias_augment == 0.0
    # unset: the recipe's for MRI (METHOD's paper recipe has none), never for X-rays
    unset = TrainConfig(healthy=("a",), out="r", max_steps=10)
    for recipe, expected in (("small", 0.5), ("light", 0.5), ("paper", 0.0)):
        resolved = unset.replace(recipe=recipe).resolve(2, "mri", (64, 64))
        assert resolved.bias_augment == expected
        assert unset.replace(recipe=recipe).resolve(2, "cxr", (64, 64)).bias_augment == 0.0
    given = unset.replace(recipe="paper", bias_augment=0.2)
    assert given.resolve(2, "mri", (64, 64)).bias_augment == 0.2
    for bad in (-0.1, 5.0, True, "x"):
        with pytest.raises(ValueError, match="bias_augment"):
            TrainConfig(bias_augment=bad).validate()
