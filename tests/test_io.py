"""napari_mtml.io: NIfTI / DICOM / PNG reading with geometry, write_image round trips, bad input."""

from __future__ import annotations

import gzip
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path as NIB_DATA
from pydicom.data import get_testdata_file

from napari_mtml.io import ImageReadError, ImageReadWarning, Scan, read_image, write_image
from napari_mtml.samples import sample_data_path

PYDICOM_DATA = Path(get_testdata_file("CT_small.dcm")).parent


def _quiet_read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageReadWarning)
        return read_image(path)


def _anatomy(rng) -> np.ndarray:
    """An asymmetric test volume in RAS voxel order (x, y, z) = (6, 7, 5)."""
    return rng.normal(size=(6, 7, 5)).astype(np.float32)


def _flip_x(data, affine):
    """The same anatomy stored with the x axis reversed (RAS -> LAS)."""
    flip = np.eye(4)
    flip[0, 0] = -1
    flip[0, 3] = data.shape[0] - 1
    return data[::-1].copy(), affine @ flip


# --------------------------------------------------------------------------------------------
# NIfTI: orientation, round trips
# --------------------------------------------------------------------------------------------
def test_las_ras_lps_give_the_same_anatomy_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    ras = _anatomy(rng)
    aff_ras = np.diag([0.8, 1.1, 2.5, 1.0])
    aff_ras[:3, 3] = [-10, 20, 5]
    las, aff_las = _flip_x(ras, aff_ras)
    # LPS: x and y reversed
    flip_y = np.eye(4)
    flip_y[1, 1] = -1
    flip_y[1, 3] = ras.shape[1] - 1
    lps, aff_lps = las[:, ::-1].copy(), aff_las @ flip_y
    scans = {}
    for name, data, aff in (("ras", ras, aff_ras), ("las", las, aff_las), ("lps", lps, aff_lps)):
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, aff), path)
        scans[name] = read_image(path)
        assert scans[name].metadata["orientation"] == name.upper()
    expected = ras.transpose(2, 1, 0)  # (z, y, x)
    for name, scan in scans.items():
        assert scan.array.dtype == np.float32
        np.testing.assert_array_equal(scan.array, expected, err_msg=name)
        assert scan.spacing == pytest.approx((2.5, 1.1, 0.8))
        # every voxel of the array sits at the same world position whatever the file order
        np.testing.assert_allclose(scan.array_affine(), scans["ras"].array_affine(), atol=1e-9)
        out = tmp_path / f"{name}_back.nii"
        write_image(out, scan.array, like=scan)
        back = read_image(out)
        np.testing.assert_array_equal(back.array, scan.array)
        assert back.spacing == pytest.approx(scan.spacing)
        np.testing.assert_allclose(back.affine, scan.affine, atol=1e-6)
        # the written file is in the original voxel order, so it overlays the input file
        np.testing.assert_array_equal(
            np.asanyarray(nib.load(out).dataobj), {"ras": ras, "las": las, "lps": lps}[name]
        )


def test_a_written_map_lands_on_the_original_file_voxels(tmp_path):
    rng = np.random.default_rng(1)
    data = _anatomy(rng)
    las, aff = _flip_x(data, np.diag([1.0, 1.0, 1.0, 1.0]))
    path = tmp_path / "las.nii.gz"
    nib.save(nib.Nifti1Image(las, aff), path)
    scan = read_image(path)
    heat = (scan.array > 1.0).astype(np.float32)
    write_image(tmp_path / "heat.nii.gz", heat, like=scan)
    on_file = np.asanyarray(nib.load(tmp_path / "heat.nii.gz").dataobj)
    np.testing.assert_array_equal(on_file, (las > 1.0).astype(np.float32))


def test_brain1_shape_spacing_and_orientation():
    scan = read_image(sample_data_path("brain_tumour_image"))
    assert scan.array.shape == (25, 256, 256)
    assert scan.array.dtype == np.float32
    assert scan.spacing == pytest.approx((6.5, 0.78125, 0.78125))
    assert scan.metadata["orientation"] == "LAS"
    raw = nib.load(sample_data_path("brain_tumour_image"))
    np.testing.assert_array_equal(scan.affine, raw.affine)
    # LAS -> RAS flips x: the file's first x column is the array's last
    np.testing.assert_array_equal(scan.array[:, :, -1], np.asanyarray(raw.dataobj)[0].T)
    label = read_image(sample_data_path("brain_tumour_label"))
    assert label.array.shape == scan.array.shape
    assert int(label.array.sum()) == 4137
    lesion_slices = np.flatnonzero(label.array.any(axis=(1, 2)))
    assert lesion_slices.min() == 11 and lesion_slices.max() == 17


def test_nibabel_big_endian_4d_and_nifti2():
    big = Path(NIB_DATA) / "anatomical.nii"
    img = nib.load(big)
    assert img.header.endianness == ">"
    scan = read_image(big)
    expected = nib.as_closest_canonical(img).get_fdata().transpose(2, 1, 0)
    np.testing.assert_allclose(scan.array, expected, rtol=1e-6)
    assert scan.array.dtype.byteorder in ("=", "|", "<")

    with pytest.warns(ImageReadWarning, match="first volume"):
        four = read_image(Path(NIB_DATA) / "example4d.nii.gz")
    img4 = nib.load(Path(NIB_DATA) / "example4d.nii.gz")
    assert four.array.ndim == 3
    assert any("4D" in w for w in four.metadata["warnings"])
    first = nib.as_closest_canonical(img4).slicer[..., 0].get_fdata()
    np.testing.assert_allclose(four.array, first.transpose(2, 1, 0), rtol=1e-6)

    two = read_image(Path(NIB_DATA) / "example_nifti2.nii.gz")
    assert two.metadata["nifti_version"] == 2
    assert two.array.ndim == 3


# --------------------------------------------------------------------------------------------
# DICOM files
# --------------------------------------------------------------------------------------------
def test_ct_small_modality_lut_and_spacing():
    path = PYDICOM_DATA / "CT_small.dcm"
    scan = read_image(path)
    ds = pydicom.dcmread(path)
    assert scan.array.shape == (128, 128)
    assert scan.spacing == pytest.approx((0.661468, 0.661468))
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(scan.array, expected.astype(np.float32))
    assert scan.metadata["modality"] == "CT"
    # the affine puts pixel (row 0, col 0) at ImagePositionPatient, in RAS (x, y negated)
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(scan.affine[:3, 3], ipp * [-1, -1, 1], atol=1e-4)


def test_mr_small_little_and_big_endian_agree_and_window_recorded():
    little = read_image(PYDICOM_DATA / "MR_small.dcm")
    big = read_image(PYDICOM_DATA / "MR_small_bigendian.dcm")
    np.testing.assert_array_equal(little.array, big.array)
    assert little.metadata["window"] == (600.0, 1600.0)
    assert little.spacing == pytest.approx((0.3125, 0.3125))


def _mr_copy(tmp_path, name="mr.dcm", **changes):
    ds = pydicom.dcmread(PYDICOM_DATA / "MR_small.dcm")
    for key, value in changes.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    path = tmp_path / name
    ds.save_as(path)
    return path, ds


def test_multi_valued_window_takes_the_first_and_says_so(tmp_path):
    path, _ = _mr_copy(tmp_path, WindowCenter=[600, 300], WindowWidth=[1600, 800])
    with pytest.warns(ImageReadWarning, match="using the first"):
        scan = read_image(path)
    assert scan.metadata["window"] == (600.0, 1600.0)


def test_monochrome1_is_inverted_bright_means_dense(tmp_path):
    path, ds = _mr_copy(tmp_path, PhotometricInterpretation="MONOCHROME1")
    scan = read_image(path)
    raw = ds.pixel_array.astype(np.float64)
    assert scan.metadata["inverted"] is True
    # inverted about the stored range (BitsStored), so the ordering of values is reversed
    hi = (
        2.0 ** int(ds.BitsStored) - 1
        if int(ds.PixelRepresentation) == 0
        else 2.0 ** (int(ds.BitsStored) - 1) - 1
    )
    lo = 0.0 if int(ds.PixelRepresentation) == 0 else -(2.0 ** (int(ds.BitsStored) - 1))
    np.testing.assert_allclose(scan.array, lo + hi - raw)
    assert np.argmax(scan.array) == np.argmin(raw)
    c, w = scan.metadata["window"]
    assert c == pytest.approx(lo + hi - 600.0) and w == pytest.approx(1600.0)


def test_spacing_falls_back_to_imager_spacing_then_to_one_with_a_warning(tmp_path):
    path, _ = _mr_copy(tmp_path, "a.dcm", PixelSpacing=None, ImagerPixelSpacing=[0.2, 0.3])
    assert read_image(path).spacing == pytest.approx((0.2, 0.3))
    path, _ = _mr_copy(tmp_path, "b.dcm", PixelSpacing=None)
    with pytest.warns(ImageReadWarning, match="no PixelSpacing"):
        scan = read_image(path)
    assert scan.spacing == (1.0, 1.0)
    path, _ = _mr_copy(tmp_path, "c.dcm", PixelSpacing=[0.0, 0.0])
    with pytest.warns(ImageReadWarning, match="zero or invalid"):
        assert read_image(path).spacing == (1.0, 1.0)


def test_chest_xray_cr_is_2d_inverted_with_spacing_fallback():
    path = sample_data_path("chest_xray")
    with pytest.warns(ImageReadWarning, match="PixelSpacing"):
        scan = read_image(path)
    assert scan.array.shape == (977, 920)  # the package's copy is downsampled 2x2
    assert scan.spacing == (1.0, 1.0)
    assert scan.metadata["modality"] == "CR"
    assert scan.metadata["inverted"] is True
    assert any("falling back to 1.0" in w for w in scan.metadata["warnings"])
    raw = pydicom.dcmread(path).pixel_array
    # MONOCHROME1: the raw minimum (displayed white) becomes the brightest value
    assert np.unravel_index(np.argmax(scan.array), scan.shape) == np.unravel_index(
        np.argmin(raw), raw.shape
    )
    # the window moves with the inversion: 15000 of 0..32767 -> 17767
    assert scan.metadata["window"] == (pytest.approx(17767.0), pytest.approx(30000.0))


def test_multiframe_dicom_becomes_3d():
    scan = read_image(PYDICOM_DATA / "rtdose.dcm")
    ds = pydicom.dcmread(PYDICOM_DATA / "rtdose.dcm")
    assert scan.array.ndim == 3
    assert scan.array.shape[0] == int(ds.NumberOfFrames)
    offsets = np.asarray(ds.GridFrameOffsetVector, dtype=float)
    assert scan.spacing[0] == pytest.approx(abs(offsets[1] - offsets[0]))
    # a dose grid has no rescale: the stored values are kept, only reordered
    assert scan.array.sum() == pytest.approx(
        float(ds.pixel_array.astype(np.float64).sum()), rel=1e-6
    )


# --------------------------------------------------------------------------------------------
# DICOM series folders
# --------------------------------------------------------------------------------------------
def test_pydicom_four_slice_ct_series():
    folder = PYDICOM_DATA / "dicomdirtests" / "77654033" / "CT2"
    scan = _quiet_read(folder)
    assert scan.array.shape == (4, 16, 16)
    assert scan.spacing == pytest.approx((1.25, 0.488281, 0.488281))
    # slices sorted from inferior to superior: the first slice is the lowest position
    zs = []
    for f in sorted(folder.iterdir()):
        zs.append(float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    assert scan.array_affine()[2, 3] == pytest.approx(min(zs))
    # the gaps of this series are not uniform (one slice is 202 mm away): that is reported
    assert any("not uniform" in w for w in scan.metadata["warnings"])


def test_folder_with_several_series_reads_the_largest_and_says_which():
    folder = PYDICOM_DATA / "dicomdirtests" / "77654033"
    with pytest.warns(ImageReadWarning, match="4 series found"):
        scan = read_image(folder)
    assert scan.array.shape == (4, 16, 16)
    assert scan.metadata["modality"] == "CT"


def _write_series(folder: Path, zs, uid: str, name_prefix: str):
    base = pydicom.dcmread(PYDICOM_DATA / "CT_small.dcm")
    folder.mkdir(parents=True, exist_ok=True)
    for i, z in enumerate(zs):
        ds = base.copy()
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = f"{uid}.{i}"
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.InstanceNumber = len(zs) - i  # deliberately not in position order
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.PixelData = np.full((128, 128), int(z), dtype=np.int16).tobytes()
        ds.save_as(folder / f"{name_prefix}{(7 * i) % len(zs)}_{i}.dcm")


def test_series_sorted_by_position_spacing_from_positions(tmp_path):
    folder = tmp_path / "series"
    zs = [20.0, 5.0, 15.0, 0.0, 10.0]  # 5 mm apart, files in scrambled order
    _write_series(folder, zs, "1.2.3.4.100", "s")
    _write_series(folder / "other", [0.0, 3.0], "1.2.3.4.200", "o")
    (folder / "notes.txt").write_text("not a DICOM file")
    with pytest.warns(ImageReadWarning, match="1.2.3.4.100"):
        scan = read_image(folder)
    assert scan.array.shape == (5, 128, 128)
    assert scan.spacing[0] == pytest.approx(5.0)  # SliceThickness of CT_small is not used
    np.testing.assert_array_equal(scan.array[:, 0, 0], [0, 5, 10, 15, 20])
    assert scan.metadata["series_uid"] == "1.2.3.4.100"


def test_series_writes_back_as_nifti_on_its_grid(tmp_path):
    folder = tmp_path / "series"
    _write_series(folder, [0.0, 2.0, 4.0], "1.2.3.9", "s")
    scan = read_image(folder)
    write_image(tmp_path / "map.nii.gz", scan.array, like=scan)
    back = read_image(tmp_path / "map.nii.gz")
    np.testing.assert_array_equal(back.array, scan.array)
    np.testing.assert_allclose(back.array_affine(), scan.array_affine(), atol=1e-5)


def test_2d_dicom_map_is_written_as_nifti_with_the_scan_affine(tmp_path):
    scan = read_image(PYDICOM_DATA / "CT_small.dcm")
    out = write_image(tmp_path / "ct_map.nii", scan.array, like=scan)
    img = nib.load(out)
    np.testing.assert_allclose(img.affine, scan.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj)[:, :, 0], scan.array.T)


# --------------------------------------------------------------------------------------------
# 2D raster files
# --------------------------------------------------------------------------------------------
def test_png_and_tiff_read_as_greyscale_float32(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    grey16 = rng.integers(0, 60000, size=(20, 30), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "x.png")
    scan = read_image(tmp_path / "x.png")
    assert scan.array.dtype == np.float32 and scan.array.shape == (20, 30)
    np.testing.assert_array_equal(scan.array, grey16)
    assert _grey_rgb_png_reads_as_grey(tmp_path)
    flt = rng.normal(size=(12, 9)).astype(np.float32)
    Image.fromarray(flt).save(tmp_path / "x.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "x.tif").array, flt)


def _grey_rgb_png_reads_as_grey(tmp_path) -> bool:
    from PIL import Image

    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgbgrey.png")
    return np.array_equal(read_image(tmp_path / "rgbgrey.png").array, grey)


# --------------------------------------------------------------------------------------------
# Bad input: every case raises ImageReadError naming the file
# --------------------------------------------------------------------------------------------
def _bad(path, match):
    with pytest.raises(ImageReadError, match=match) as info:
        _quiet_read(path)
    assert isinstance(info.value, ValueError)
    assert Path(path).name in str(info.value)


def test_missing_file_and_empty_file(tmp_path):
    _bad(tmp_path / "nope.nii.gz", "not found")
    (tmp_path / "empty.dcm").write_bytes(b"")
    _bad(tmp_path / "empty.dcm", "empty")


def test_truncated_and_corrupt_nifti(tmp_path):
    rng = np.random.default_rng(4)
    img = nib.Nifti1Image(rng.normal(size=(10, 10, 10)).astype(np.float32), np.eye(4))
    nib.save(img, tmp_path / "full.nii")
    raw = (tmp_path / "full.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) // 2])
    _bad(tmp_path / "cut.nii", "truncated")
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(raw)[: len(raw) // 4])
    _bad(tmp_path / "cut.nii.gz", "truncated or corrupt")
    (tmp_path / "header_only.nii").write_bytes(raw[:200])
    _bad(tmp_path / "header_only.nii", "NIfTI|truncated|corrupt")
    (tmp_path / "noise.nii.gz").write_bytes(rng.bytes(4000))
    _bad(tmp_path / "noise.nii.gz", "NIfTI|corrupt")


def test_random_bytes_named_dcm(tmp_path):
    (tmp_path / "noise.dcm").write_bytes(np.random.default_rng(5).bytes(5000))
    _bad(tmp_path / "noise.dcm", "not a DICOM file")


def test_dicom_without_pixel_data():
    _bad(PYDICOM_DATA / "rtplan.dcm", "no pixel data")


def test_truncated_dicom_pixel_data():
    _bad(PYDICOM_DATA / "MR_truncated.dcm", "truncated or corrupt")


def test_compressed_dicom_without_decoder_names_the_package():
    path = PYDICOM_DATA / "MR_small_jpeg_ls_lossless.dcm"
    try:
        pydicom.dcmread(path).pixel_array  # noqa: B018
    except Exception:
        pass
    else:
        pytest.skip("a JPEG-LS decoder is installed here, so the file decodes")
    _bad(path, "compressed .*pylibjpeg")


def test_colour_5d_and_rgb_refused(tmp_path):
    from PIL import Image

    _bad(PYDICOM_DATA / "SC_rgb_rle.dcm", "colour")
    rgb = np.zeros((6, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    _bad(tmp_path / "colour.png", "colour")
    nib.save(
        nib.Nifti1Image(np.zeros((4, 4, 4, 2, 3), dtype=np.float32), np.eye(4)),
        tmp_path / "five.nii.gz",
    )
    _bad(tmp_path / "five.nii.gz", "5D")
    rgb_dtype = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    img = nib.Nifti1Image(np.zeros((4, 4, 4), dtype=rgb_dtype), np.eye(4))
    nib.save(img, tmp_path / "rgb.nii")
    _bad(tmp_path / "rgb.nii", "RGB")


def test_nan_and_inf_refused_constant_warned(tmp_path):
    data = np.ones((5, 5, 5), dtype=np.float32)
    data[2, 2, 2] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    _bad(tmp_path / "nan.nii.gz", "NaN")
    data[2, 2, 2] = np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "inf.nii.gz")
    _bad(tmp_path / "inf.nii.gz", "infinite")
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.int16), np.eye(4)), tmp_path / "zero.nii")
    with pytest.warns(ImageReadWarning, match="constant"):
        scan = read_image(tmp_path / "zero.nii")
    assert scan.array.shape == (5, 5, 5)


def test_unsupported_type_and_empty_folder(tmp_path):
    (tmp_path / "notes.xyz").write_text("hello")
    _bad(tmp_path / "notes.xyz", "unsupported")
    (tmp_path / "empty_folder").mkdir()
    _bad(tmp_path / "empty_folder", "no DICOM images")


def test_write_image_refuses_bad_requests(tmp_path):
    scan = Scan(array=np.zeros((3, 4, 5), np.float32), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        write_image(tmp_path / "a.nii.gz", np.zeros((3, 4)), like=scan)
    with pytest.raises(ValueError, match="NIfTI only"):
        write_image(tmp_path / "a.dcm", scan.array, like=scan)
    bad = scan.array.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_image(tmp_path / "a.nii.gz", bad, like=scan)


def test_scan_built_by_hand_validates_and_copies_nothing_it_need_not():
    arr = np.zeros((2, 3, 4), np.float32)
    scan = Scan(array=arr, spacing=(2, 1, 1))
    assert scan.spacing == (2.0, 1.0, 1.0)
    assert scan.affine[0, 0] == 1.0 and scan.affine[2, 2] == 2.0
    assert scan.metadata["warnings"] == []
    with pytest.raises(ValueError, match="spacing"):
        Scan(array=arr, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="2D"):
        Scan(array=np.zeros((2, 2, 2, 2)), spacing=(1, 1, 1, 1))


def test_reading_never_mutates_or_keeps_the_file_open(tmp_path):
    src = PYDICOM_DATA / "MR_small.dcm"
    copy = tmp_path / "mr.dcm"
    shutil.copy(src, copy)
    before = copy.read_bytes()
    read_image(copy)
    assert copy.read_bytes() == before
    copy.unlink()  # would fail on some systems if a handle were left open
