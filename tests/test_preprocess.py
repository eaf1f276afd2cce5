"""napari_mtml.preprocess: foreground masks, the MRI and CXR frames, and the exact inverse."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

from napari_mtml.io import ImageReadWarning, Scan, read_image
from napari_mtml.preprocess import (
    FrameTransform,
    content_shape,
    fill_holes,
    fit_frame,
    foreground_mask,
    from_frame,
    infer_kind,
    mask_to_frame,
    mri_factors,
    to_frame,
    to_model_units,
)
from napari_mtml.samples import sample_data_path


def _ellipsoid(shape, radii, centre=None) -> np.ndarray:
    centre = [s / 2 for s in shape] if centre is None else centre
    grid = np.indices(shape, dtype=np.float32)
    r = sum(((g - c) / rad) ** 2 for g, c, rad in zip(grid, centre, radii, strict=True))
    return r <= 1.0


def _stripped_brain(rng, shape=(40, 60, 50)) -> Scan:
    """Skull-stripped look: tissue intensities inside an ellipsoid, exactly 0 outside."""
    brain = _ellipsoid(shape, (15, 24, 19))
    # smooth "tissue" contrast (white noise would be averaged away by the downsampling)
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 3.0)
    texture /= texture.std()
    img = np.where(brain, 300 + 40 * texture, 0).astype(np.float32)
    img[brain & (img <= 0)] = 1.0
    return Scan(array=img, spacing=(1.0, 1.0, 1.0), metadata={"modality": "MR"})


def _inside_within(back, fg, voxels: int):
    """back >= 0.5 on fg eroded by `voxels`, < 0.5 off fg dilated by `voxels`."""
    inner = ndimage.binary_erosion(fg, iterations=voxels)
    outer = ndimage.binary_dilation(fg, iterations=voxels)
    return bool((back[inner] >= 0.5).all()), bool((back[~outer] < 0.5).all())


# --------------------------------------------------------------------------------------------
# foreground_mask
# --------------------------------------------------------------------------------------------
def test_stripped_data_uses_the_nonzero_region_with_holes_filled():
    rng = np.random.default_rng(0)
    scan = _stripped_brain(rng)
    img = scan.array.copy()
    hole = _ellipsoid(img.shape, (3, 3, 3))
    img[hole] = 0.0  # a ventricle-like zero pocket inside: part of the brain all the same
    scan = Scan(array=img, spacing=scan.spacing, metadata=scan.metadata)
    fg = foreground_mask(scan)
    np.testing.assert_array_equal(fg, _ellipsoid(img.shape, (15, 24, 19)))
    np.testing.assert_array_equal(scan.array, img)  # input untouched


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_fill_holes_is_scipys_hole_filling(ndim):
    # random masks of every density, with holes in the middle and background open at the faces
    rng = np.random.default_rng(ndim)
    for _ in range(60):
        shape = tuple(int(s) for s in rng.integers(1, 24, ndim))
        mask = rng.random(shape) < rng.uniform(0.1, 0.9)
        if rng.random() < 0.5:
            mask = ndimage.binary_dilation(mask)
        expected = ndimage.binary_fill_holes(mask)
        got = fill_holes(mask)
        assert got.dtype == bool and got.shape == mask.shape
        np.testing.assert_array_equal(got, expected)
    # a closed shell is filled; the same shell cut open to a face is not
    shell = _ellipsoid((20, 20, 20), (8, 8, 8)) & ~_ellipsoid((20, 20, 20), (6, 6, 6))
    assert fill_holes(shell)[10, 10, 10]
    cut = shell.copy()
    cut[10:, 9:12, 9:12] = False  # a tunnel from the cavity to the last face
    assert not fill_holes(cut)[10, 10, 10]
    np.testing.assert_array_equal(fill_holes(cut), ndimage.binary_fill_holes(cut))
    # no background, all background
    assert fill_holes(np.ones((3, 4), bool)).all() and not fill_holes(np.zeros((3, 4), bool)).any()


def test_foreground_masks_of_the_samples_are_unchanged_by_the_faster_filling():
    # the head path (skull on) and the non-zero path (skull-stripped), on the real samples,
    # against the same masks built with scipy's hole filling
    import napari_mtml.preprocess as pre
    from napari_mtml.samples import load_sample

    stripped = load_sample("mni152_t1")
    stripped_array = np.where(load_sample("mni152_brain_mask").array > 0, stripped.array, 0).astype(
        np.float32
    )
    scans = [
        load_sample("brain_tumour_image"),
        stripped,
        Scan(array=stripped_array, spacing=stripped.spacing),
    ]
    fast = [foreground_mask(s, kind="mri") for s in scans]
    original = pre.fill_holes
    pre.fill_holes = ndimage.binary_fill_holes
    try:
        slow = [foreground_mask(s, kind="mri") for s in scans]
    finally:
        pre.fill_holes = original
    for a, b in zip(fast, slow, strict=True):
        assert a.any()
        np.testing.assert_array_equal(a, b)


def test_unstripped_head_gets_a_head_mask_without_background_noise():
    rng = np.random.default_rng(1)
    shape = (30, 64, 64)
    head = _ellipsoid(shape, (13, 28, 24))
    img = rng.normal(20, 8, size=shape)  # scanner noise, nonzero everywhere
    img[head] = 400 + 50 * rng.normal(size=int(head.sum()))
    dark = _ellipsoid(shape, (4, 8, 8))  # dark CSF/bone pocket inside the head
    img[dark] = 25
    img[0:2, 0:3, 0:3] = 600  # a bright speck outside: not the largest component
    fg = foreground_mask(Scan(array=img.astype(np.float32), spacing=(1, 1, 1)))
    assert fg[dark].all()
    assert not fg[0:2, 0:3, 0:3].any()
    agreement = (fg == head).mean()
    assert agreement > 0.99


def test_kind_mismatch_names_the_image_what_it_is_and_what_the_run_knows():
    from napari_mtml.preprocess import kind_mismatch

    def scan(modality, path="scans/x.dcm"):
        return Scan(
            array=np.ones((4, 4), np.float32),
            spacing=(1, 1),
            metadata={"modality": modality, "path": path},
        )

    note = kind_mismatch(scan("CR"), "mri")
    assert note is not None and note.startswith("scans/x.dcm is an X-ray (DICOM modality CR)")
    assert "trained on MRI" in note
    assert "a CT scan (DICOM modality CT)" in kind_mismatch(scan("ct"), "mri")
    assert "an MRI (DICOM modality MR)" in kind_mismatch(scan("MR"), "cxr")
    assert "trained on X-rays" in kind_mismatch(scan("MR"), "cxr")
    assert "an image (DICOM modality OT)" in kind_mismatch(scan("OT"), "mri")
    # fits, or nothing says what the image is, or not a pipeline: no note
    assert kind_mismatch(scan("MR"), "mri") is None
    for modality in ("CR", "DX", "XR", "MG"):
        assert kind_mismatch(scan(modality), "cxr") is None
    assert kind_mismatch(scan(""), "mri") is None and kind_mismatch(scan(""), "cxr") is None
    assert kind_mismatch(scan("CR"), "auto") is None
    assert kind_mismatch(np.ones((4, 4)), "mri") is None
    assert kind_mismatch(scan("CR", path=None), "mri").startswith("the image is an X-ray")


def test_foreground_of_an_xray_is_the_whole_image():
    scan = Scan(
        array=np.arange(12, dtype=np.float32).reshape(3, 4),
        spacing=(1, 1),
        metadata={"modality": "CR"},
    )
    assert infer_kind(scan) == "cxr"
    assert foreground_mask(scan).all()
    assert (
        infer_kind(Scan(array=np.zeros((3, 4)), spacing=(1, 1), metadata={"modality": "MR"}))
        == "mri"
    )


# --------------------------------------------------------------------------------------------
# MRI frame
# --------------------------------------------------------------------------------------------
def test_mri_3d_frame_zscored_centred_and_exactly_invertible():
    rng = np.random.default_rng(2)
    scan = _stripped_brain(rng, shape=(40, 60, 50))
    before = scan.array.copy()
    arr, fg, tr = to_frame(scan, frame=(32, 48, 32))
    assert isinstance(tr, FrameTransform)
    assert arr.shape == fg.shape == (32, 48, 32)
    assert arr.dtype == np.float32 and fg.dtype == bool
    np.testing.assert_array_equal(scan.array, before)
    assert np.all(arr[~fg] == 0)
    # z-scored over the foreground (approximately: downsampling smooths a little)
    assert abs(float(arr[fg].mean())) < 0.1
    assert 0.8 < float(arr[fg].std()) < 1.1
    # centred: the content box has equal margins (within one voxel) and holds the foreground
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(fg.any(axis=other))
        start, size = tr.offset[axis], tr.scaled_shape[axis]
        assert abs(start - (fg.shape[axis] - start - size)) <= 1
        assert start <= hits[0] <= start + 1 and start + size - 2 <= hits[-1] < start + size
    back = from_frame(fg.astype(np.float32), tr)
    assert back.shape == scan.array.shape and back.dtype == np.float32
    orig_fg = foreground_mask(scan)
    # a map that is 1 on the frame's foreground is 1 on the original foreground within a
    # frame voxel (2 scan voxels), and 0 away from it
    assert _inside_within(back, orig_fg, 2) == (True, True)


def test_mri_intensity_map_returns_to_the_same_place():
    rng = np.random.default_rng(3)
    scan = _stripped_brain(rng, shape=(40, 60, 50))
    arr, fg, tr = to_frame(scan, frame=(32, 48, 32))
    # a blob in the frame comes back where the same blob sits in the scan
    marker = np.zeros(scan.array.shape, dtype=np.float32)
    marker[18:24, 26:34, 20:28] = 1.0
    fg_marker = Scan(array=marker * 1000 + scan.array, spacing=scan.spacing)
    arr2, _, tr2 = to_frame(fg_marker, frame=(32, 48, 32), foreground=foreground_mask(scan))
    # same crop and geometry; only the intensities (and so the z-score) differ
    assert (tr2.crop, tr2.offset, tr2.scaled_shape) == (tr.crop, tr.offset, tr.scaled_shape)
    diff = arr2 * tr2.std + tr2.mean - (arr * tr.std + tr.mean)
    diff = from_frame((diff > 500).astype(np.float32), tr)
    assert _inside_within(diff, marker.astype(bool), 2) == (True, True)


def test_mri_2d_slice_and_default_2d_frame():
    rng = np.random.default_rng(4)
    scan3 = _stripped_brain(rng, shape=(9, 120, 100))
    slice2d = Scan(array=scan3.array[4], spacing=(1.0, 1.0), metadata={"modality": "MR"})
    arr, fg, tr = to_frame(slice2d)
    assert arr.shape == (128, 128) and tr.kind == "mri"
    back = from_frame(fg.astype(np.float32), tr)
    assert _inside_within(back, foreground_mask(slice2d), 2) == (True, True)


def test_dims_2_on_a_volume_stacks_slices_with_one_shared_crop():
    rng = np.random.default_rng(5)
    scan = _stripped_brain(rng, shape=(12, 90, 80))
    arr, fg, tr = to_frame(scan, dims=2, frame=(64, 64))
    assert tr.stacked and arr.shape == fg.shape == (12, 64, 64)
    assert tr.crop[0] == (0, 12)
    back = from_frame(fg.astype(np.float32), tr)
    assert back.shape == (12, 90, 80)
    orig = foreground_mask(scan)
    for z in range(12):
        if orig[z].sum() > 20:
            inner = ndimage.binary_erosion(orig[z], iterations=2)
            outer = ndimage.binary_dilation(orig[z], iterations=2)
            assert (back[z][inner] >= 0.5).all() and (back[z][~outer] < 0.5).all()
    with pytest.raises(ValueError, match="shape"):
        from_frame(np.zeros((64, 64)), tr)


@pytest.mark.parametrize("dims", [2, 3])
def test_to_frame_in_threads_gives_the_same_arrays(dims, monkeypatch):
    # the image and its foreground are resampled side by side with workers > 1: the same
    # frames, foreground and transform as one after the other
    import napari_mtml.preprocess as pre

    scan = _stripped_brain(np.random.default_rng(7), shape=(40, 70, 60))
    frame = (64, 64) if dims == 2 else (32, 48, 48)
    threads = []
    real = pre.map_threads

    def spy(func, items, workers):
        threads.append(workers)
        return real(func, items, workers)

    monkeypatch.setattr(pre, "map_threads", spy)
    one = to_frame(scan, kind="mri", dims=dims, frame=frame)
    two = to_frame(scan, kind="mri", dims=dims, frame=frame, workers=2)
    assert threads == [1, 2]
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])
    assert one[2] == two[2]


def test_target_spacing_brings_scans_of_any_voxel_size_to_one_scale():
    rng = np.random.default_rng(7)
    fine = _stripped_brain(rng, shape=(40, 60, 50))  # 1 mm
    coarse = Scan(array=ndimage.zoom(fine.array, 0.5, order=1), spacing=(2.0, 2.0, 2.0))
    assert mri_factors(fine, 3, spacing=2.0) == (2.0, 2.0, 2.0)
    assert mri_factors(coarse, 3, spacing=2.0) == (1.0, 1.0, 1.0)
    thick = Scan(array=fine.array[::5], spacing=(5.0, 1.0, 1.0))
    assert mri_factors(thick, 2, spacing=2.0) == (2.0, 2.0)  # in-plane only for slices
    assert mri_factors(thick, 3, spacing=2.0) == (0.4, 2.0, 2.0)  # thick slices upsampled
    a = content_shape(fine, spacing=2.0)
    b = content_shape(coarse, spacing=2.0)
    assert all(abs(x - y) <= 1 for x, y in zip(a, b, strict=True))
    arr, fg, tr = to_frame(fine, frame="fit", spacing=2.0, multiple=8)
    assert arr.shape == fit_frame(a, 8) and all(f % 8 == 0 for f in arr.shape)
    assert all(f - 8 < c <= f for f, c in zip(arr.shape, a, strict=True))  # the smallest fit
    assert tr.scale == (2.0, 2.0, 2.0)
    back = from_frame(arr, tr)
    assert back.shape == fine.array.shape
    with pytest.raises(ValueError, match="spacing"):
        mri_factors(fine, 3, spacing=-1)
    with pytest.raises(ValueError, match="'fit'"):
        to_frame(fine, frame="tight")


def test_mask_to_frame_follows_the_scan():
    rng = np.random.default_rng(8)
    scan = _stripped_brain(rng, shape=(12, 90, 80))
    for dims, frame in ((3, (16, 48, 48)), (2, (48, 48))):
        arr, fg, tr = to_frame(scan, dims=dims, frame=frame)
        # the foreground itself arrives exactly as to_frame's own
        np.testing.assert_array_equal(mask_to_frame(foreground_mask(scan), tr), fg)
        left = np.zeros(scan.array.shape, bool)
        left[..., :40] = True
        m = mask_to_frame(left, tr)
        assert m.shape == arr.shape and m.any() and not m.all()
    with pytest.raises(ValueError, match="shape"):
        mask_to_frame(np.ones((3, 3, 3), bool), tr)


def test_content_larger_than_the_frame_names_a_frame_that_fits():
    rng = np.random.default_rng(6)
    scan = _stripped_brain(rng, shape=(40, 60, 50))
    with pytest.raises(ValueError, match=r"frame=\(") as info:
        to_frame(scan, frame=(8, 8, 8))
    msg = str(info.value)
    fit = tuple(int(v) for v in msg.split("frame=(")[1].split(")")[0].split(","))
    arr, _, _ = to_frame(scan, frame=fit)  # the suggested frame does fit
    assert arr.shape == fit
    assert "downsample=" in msg


def test_mri_refuses_nan_empty_and_constant_foregrounds():
    img = np.zeros((10, 12, 14), np.float32)
    with pytest.raises(ValueError, match="empty"):
        to_frame(Scan(array=img, spacing=(1, 1, 1)), frame=(16, 16, 16))
    img[3:6, 3:6, 3:6] = 5.0
    with pytest.raises(ValueError, match="constant"):
        to_frame(Scan(array=img, spacing=(1, 1, 1)), frame=(16, 16, 16))
    img[4, 4, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        to_frame(Scan(array=img, spacing=(1, 1, 1)), frame=(16, 16, 16))


def test_bad_arguments_are_refused():
    scan = _stripped_brain(np.random.default_rng(7), shape=(20, 30, 24))
    with pytest.raises(ValueError, match="kind"):
        to_frame(scan, kind="ct")
    with pytest.raises(ValueError, match="frame"):
        to_frame(scan, frame=(80, 112))
    with pytest.raises(ValueError, match="downsample"):
        to_frame(scan, downsample=0)
    with pytest.raises(ValueError, match="2D image"):
        to_frame(scan, kind="cxr")
    flat = Scan(array=np.ones((5, 5)), spacing=(1, 1))
    with pytest.raises(ValueError, match="3D"):
        to_frame(flat, dims=3)


# --------------------------------------------------------------------------------------------
# CXR frame
# --------------------------------------------------------------------------------------------
def _xray(rng, photometric="MONOCHROME2", inverted=False):
    yy, xx = np.mgrid[0:300, 0:240]
    body = 1000 + 2000 * np.exp(-((xx - 120) ** 2) / 4000.0) + 50 * rng.normal(size=yy.shape)
    meta = {"modality": "CR", "window": (2000.0, 3000.0), "photometric": photometric}
    if inverted:
        meta["inverted"] = True
    return Scan(array=body.astype(np.float32), spacing=(0.2, 0.2), metadata=meta)


def test_cxr_frame_equalised_in_minus_one_one():
    rng = np.random.default_rng(8)
    scan = _xray(rng)
    arr, fg, tr = to_frame(scan)
    assert arr.shape == (256, 256) and arr.dtype == np.float32
    assert fg.all()
    assert arr.min() >= -1.0 and arr.max() <= 1.0
    assert arr.min() < -0.95 and arr.max() > 0.95
    # histogram equalisation spreads values evenly: about half the pixels below 0
    assert 0.35 < (arr < 0).mean() < 0.65
    # bright stays bright: the dense central band is the bright part of the frame
    assert arr[:, 118:138].mean() > arr[:, :20].mean() + 0.5
    back = from_frame(np.ones_like(arr), tr)
    assert back.shape == scan.array.shape and np.allclose(back, 1.0)


def test_cxr_monochrome1_not_yet_inverted_is_inverted_here():
    rng = np.random.default_rng(9)
    plain = _xray(rng)
    raw_m1 = Scan(
        array=plain.array,
        spacing=plain.spacing,
        metadata=dict(plain.metadata, photometric="MONOCHROME1"),
    )
    done_m1 = Scan(
        array=plain.array,
        spacing=plain.spacing,
        metadata=dict(plain.metadata, photometric="MONOCHROME1", inverted=True),
    )
    a, _, _ = to_frame(plain)
    b, _, _ = to_frame(raw_m1)
    c, _, _ = to_frame(done_m1)
    np.testing.assert_allclose(b, -a, atol=1e-5)
    np.testing.assert_array_equal(c, a)


def test_cxr_maps_return_to_the_right_pixels():
    rng = np.random.default_rng(10)
    scan = _xray(rng)
    _, _, tr = to_frame(scan)
    frame_map = np.zeros((256, 256), np.float32)
    frame_map[64:128, 128:192] = 1.0  # top-right quarter region of the frame
    back = from_frame(frame_map, tr)
    rows = np.flatnonzero(back.max(axis=1) >= 0.5)
    cols = np.flatnonzero(back.max(axis=0) >= 0.5)
    # the same fractions of the original image (300 x 240), within one frame pixel
    assert abs(rows[0] - 75) <= 2 and abs(rows[-1] + 1 - 150) <= 2
    assert abs(cols[0] - 120) <= 2 and abs(cols[-1] + 1 - 180) <= 2


# --------------------------------------------------------------------------------------------
# Real files
# --------------------------------------------------------------------------------------------
def test_mni152_fits_the_paper_frame_and_maps_back():
    scan = read_image(sample_data_path("mni152_t1"))
    arr, fg, tr = to_frame(scan)
    assert arr.shape == (80, 112, 80)
    mask = read_image(sample_data_path("mni152_brain_mask")).array > 0
    own = foreground_mask(scan)
    # the template's nonzero region covers its brain mask
    assert own[mask].mean() > 0.99
    back = from_frame(fg.astype(np.float32), tr)
    assert (back[ndimage.binary_erosion(own, iterations=2)] >= 0.5).all()


def test_brain1_slices_fit_the_2d_frame():
    scan = read_image(sample_data_path("brain_tumour_image"))
    arr, fg, tr = to_frame(scan, dims=2)
    assert arr.shape == (25, 128, 128)
    assert infer_kind(scan) == "mri"
    fg_head = foreground_mask(scan)
    # unstripped: the head mask keeps the tumour slices' whole head, not the air
    assert 0.3 < fg_head.mean() < 0.8
    label = read_image(sample_data_path("brain_tumour_label")).array > 0
    assert fg_head[label].all()


def test_chest_xray_file_into_the_frame():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageReadWarning)
        scan = read_image(sample_data_path("chest_xray"))
    arr, fg, tr = to_frame(scan)
    assert arr.shape == (256, 256) and tr.kind == "cxr"
    assert arr.min() >= -1 and arr.max() <= 1
    # lungs (air) are darker than the spine (bone) after inversion of MONOCHROME1
    assert arr[100:160, 60:100].mean() < arr[100:160, 120:136].mean()


def test_model_units_z_score_volumes_scale_2d_and_invert():
    rng = np.random.default_rng(0)
    vol = (50 + 10 * rng.standard_normal((6, 8, 8))).astype(np.float32)
    fg = np.zeros(vol.shape, bool)
    fg[1:5, 2:6, 2:6] = True
    z, offset, scale = to_model_units(vol, fg)
    assert z.dtype == np.float32
    np.testing.assert_allclose([z[fg].mean(), z[fg].std()], [0.0, 1.0], atol=1e-5)
    np.testing.assert_allclose(z * scale + offset, vol, rtol=1e-6)
    img = rng.uniform(100, 900, (10, 12)).astype(np.float32)
    u, offset, scale = to_model_units(img, None)
    assert np.isclose(u.min(), -1) and np.isclose(u.max(), 1)
    np.testing.assert_allclose(u * scale + offset, img, rtol=1e-6)
    flat, _, scale = to_model_units(np.full((4, 4), 3.0, np.float32), None)  # constant: no NaN
    assert scale == 1.0 and np.isfinite(flat).all()


@pytest.mark.parametrize(
    "shape, scale, out_shape",
    [
        ((20, 28, 20), (0.42, 0.41, 0.405), (47, 68, 49)),  # a map back on a scan
        ((33, 40), (2.0, 1.6), (16, 25)),  # downsampling
        ((1, 6), (0.5, 1.0), (2, 6)),  # an axis of one voxel
        ((7, 9, 5), (1.0, 0.5, 1.0), (7, 18, 5)),  # one axis only
    ],
)
def test_linear_resampling_equals_scipy_order_1(shape, scale, out_shape):
    from napari_mtml.preprocess import _linear_resample

    a = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    scale = np.asarray(scale)
    expected = ndimage.affine_transform(
        a, scale, offset=0.5 * scale - 0.5, output_shape=out_shape, order=1, mode="nearest"
    )
    got = _linear_resample(a, scale, out_shape)
    assert got.dtype == np.float32 and got.shape == tuple(out_shape)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got is not a
