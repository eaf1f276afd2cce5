"""The napari reader and sample data, through napari itself (Qt under Xvfb)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from pydicom.data import get_testdata_file

from napari_mtml._napari.reader import get_reader
from napari_mtml.io import ImageReadWarning, read_image
from napari_mtml.samples import SAMPLE_DIR, SAMPLES, load_sample, sample_data_path

PYDICOM_DATA = Path(get_testdata_file("CT_small.dcm")).parent
pytestmark = pytest.mark.qt


# --------------------------------------------------------------------------------------------
# get_reader: None for what it cannot read, never raises (no viewer needed)
# --------------------------------------------------------------------------------------------
def test_get_reader_accepts_nifti_dicom_and_dicom_folders(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), np.eye(4)), tmp_path / "a.nii.gz")
    assert callable(get_reader(str(tmp_path / "a.nii.gz")))
    assert callable(get_reader(str(PYDICOM_DATA / "CT_small.dcm")))
    assert callable(get_reader(str(PYDICOM_DATA / "dicomdirtests" / "77654033" / "CT2")))
    assert callable(get_reader([str(tmp_path / "a.nii.gz"), str(PYDICOM_DATA / "MR_small.dcm")]))


def test_get_reader_returns_none_and_never_raises(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    for odd in (
        str(tmp_path / "notes.txt"),
        str(tmp_path / "empty"),
        str(tmp_path / "gone.nii"),
        [],
        [str(tmp_path / "notes.txt")],
        None,
        42,
        b"\x00",
        "",
    ):
        assert get_reader(odd) is None


# --------------------------------------------------------------------------------------------
# Sample files (core helper)
# --------------------------------------------------------------------------------------------
def test_sample_files_ship_with_notices_and_stay_small():
    total = sum(p.stat().st_size for p in SAMPLE_DIR.iterdir() if p.is_file())
    assert total < 8 * 1024 * 1024
    notice = (SAMPLE_DIR / "NOTICE.md").read_text()
    for file, _ in SAMPLES.values():
        assert sample_data_path(next(k for k, v in SAMPLES.items() if v[0] == file)).is_file()
        assert file in notice
    for words in ("Harvard Medical School", "Louis Collins", "Dicom in Python"):
        assert words in notice
    with pytest.raises(ValueError, match="unknown sample"):
        sample_data_path("nope")


def test_core_sample_helper_gives_scans_without_napari_layers():
    image = load_sample("brain_tumour_image")
    label = load_sample("brain_tumour_label")
    assert image.array.shape == label.array.shape == (25, 256, 256)
    assert int(label.array.sum()) == 4137
    brain = load_sample("mni152_t1")
    mask = load_sample("mni152_brain_mask")
    assert brain.array.shape == mask.array.shape == (189, 233, 197)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageReadWarning)
        cxr = load_sample("chest_xray")
    assert cxr.array.ndim == 2 and max(cxr.array.shape) <= 1024
    assert cxr.metadata["modality"] == "CR" and cxr.metadata["inverted"]


# --------------------------------------------------------------------------------------------
# Through napari
# --------------------------------------------------------------------------------------------
def test_viewer_opens_nifti_with_spacing_and_affine(make_napari_viewer):
    viewer = make_napari_viewer()
    path = sample_data_path("brain_tumour_image")
    layers = viewer.open(str(path), plugin="napari-mtml")
    assert len(layers) == 1
    layer = layers[0]
    assert layer.data.shape == (25, 256, 256)
    np.testing.assert_allclose(layer.scale, (6.5, 0.78125, 0.78125))
    scan = read_image(path)
    np.testing.assert_allclose(layer.metadata["affine"], scan.affine)
    assert layer.colormap.name == "gray"
    # translate = world position (RAS mm) of the first voxel, so label files overlay it
    np.testing.assert_allclose(layer.translate, (-78.0, -99.609375, -99.609375))


def test_viewer_opens_dicom_file_and_series_folder(make_napari_viewer):
    viewer = make_napari_viewer()
    ct = viewer.open(str(PYDICOM_DATA / "CT_small.dcm"), plugin="napari-mtml")[0]
    assert ct.data.shape == (128, 128)
    np.testing.assert_allclose(ct.scale, (0.661468, 0.661468))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageReadWarning)
        series = viewer.open(
            str(PYDICOM_DATA / "dicomdirtests" / "77654033" / "CT2"), plugin="napari-mtml"
        )[0]
    assert series.data.shape == (4, 16, 16)
    np.testing.assert_allclose(series.scale, (1.25, 0.488281, 0.488281))
    assert series.metadata["format"] == "dicom-series"


@pytest.mark.parametrize("key", ["brain_tumour", "healthy_brain", "chest_xray"])
def test_every_sample_opens(make_napari_viewer, key):
    viewer = make_napari_viewer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageReadWarning)
        layers = viewer.open_sample("napari-mtml", key)
    kinds = [type(layer).__name__ for layer in layers]
    if key == "brain_tumour":
        assert kinds == ["Image", "Labels"]
        assert int((layers[1].data > 0).sum()) == 4137
        np.testing.assert_allclose(layers[0].scale, layers[1].scale)
        np.testing.assert_allclose(layers[0].translate, layers[1].translate)
    elif key == "healthy_brain":
        assert kinds == ["Image", "Labels"]
        assert layers[0].data.shape == layers[1].data.shape == (189, 233, 197)
        assert set(np.unique(layers[1].data)) == {0, 1}
    else:
        assert kinds == ["Image"]
        assert layers[0].data.ndim == 2
        assert any("PixelSpacing" in w for w in layers[0].metadata["warnings"])
    assert all(np.isfinite(layer.data).all() for layer in layers)
