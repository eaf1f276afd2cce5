"""Folders holding several DICOM series (a hospital export): list_series, read_image(series=),
and one napari layer per series named by SeriesDescription.

The export is built in each test from pydicom's own test files (CT_small.dcm, MR_small.dcm) with
new SeriesInstanceUID / SeriesDescription / positions, so the folder is small and known exactly.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from napari_mtml.io import (
    DicomSeries,
    ImageReadError,
    ImageReadWarning,
    list_series,
    read_image,
)

CT = Path(get_testdata_file("CT_small.dcm"))
MR = Path(get_testdata_file("MR_small.dcm"))

LOCALISER = "1.2.826.0.1.999.1"
T2 = "1.2.826.0.1.999.2"
T1 = "1.2.826.0.1.999.3"
NAMELESS = "1.2.826.0.1.999.7"


def _series(
    folder: Path,
    template: Path,
    uid: str,
    number: int,
    description: str | None,
    zs,
    value_of_z=lambda z: int(z) + 1,
) -> None:
    """Write one series: a slice per position in `zs` (files deliberately not in z order)."""
    base = pydicom.dcmread(template)
    folder.mkdir(parents=True, exist_ok=True)
    shape = (int(base.Rows), int(base.Columns))
    for i, z in enumerate(zs):
        ds = base.copy()
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = f"{uid}.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = number
        if description is None:
            if "SeriesDescription" in ds:
                del ds.SeriesDescription
        else:
            ds.SeriesDescription = description
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.InstanceNumber = i + 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        # the slice's value plus a ramp along the columns (a constant image would be warned of)
        ramp = np.arange(shape[1], dtype=np.int16)[None, :] * 100
        ds.PixelData = (np.full(shape, value_of_z(z), dtype=np.int16) + ramp).tobytes()
        ds.save_as(folder / f"IM{number:02d}{i:03d}")


@pytest.fixture
def export(tmp_path) -> Path:
    """A study folder: localiser (1 CT image), T2 (2 MR slices), T1 (4 MR slices, in a
    subfolder) and an undescribed series (2 slices), plus a file that is not DICOM."""
    root = tmp_path / "export"
    _series(root, CT, LOCALISER, 1, "SCOUT localiser", [0.0])
    _series(root, MR, T2, 2, "T2 AX", [0.0, 4.0])
    _series(root / "DIR001", MR, T1, 3, "T1 AX", [15.0, 5.0, 10.0, 0.0])
    _series(root, MR, NAMELESS, 7, None, [0.0, 2.0])
    (root / "REPORT.txt").write_text("not an image")
    return root


def test_list_series_finds_every_series_in_scanner_order(export):
    series = list_series(export)
    assert [s.uid for s in series] == [LOCALISER, T2, T1, NAMELESS]  # SeriesNumber order
    assert all(isinstance(s, DicomSeries) for s in series)
    assert [s.description for s in series] == ["SCOUT localiser", "T2 AX", "T1 AX", ""]
    assert [s.name for s in series] == ["SCOUT localiser", "T2 AX", "T1 AX", "series 7"]
    assert [s.n_files for s in series] == [1, 2, 4, 2]
    assert [s.modality for s in series] == ["CT", "MR", "MR", "MR"]
    assert (series[0].rows, series[0].columns) == (128, 128)
    assert (series[2].rows, series[2].columns) == (64, 64)
    assert all(f.parent.name == "DIR001" for f in series[2].files)


def test_read_image_reads_the_chosen_series(export):
    t1 = read_image(export, series=T1)
    assert t1.array.shape == (4, 64, 64)
    assert t1.metadata["series_uid"] == T1 and t1.metadata["series_description"] == "T1 AX"
    # sorted by position, not by file name or InstanceNumber
    np.testing.assert_array_equal(t1.array.min(axis=(1, 2)), [1, 6, 11, 16])
    assert t1.spacing[0] == pytest.approx(5.0)

    t2 = read_image(export, series=T2)
    assert t2.array.shape == (2, 64, 64) and t2.spacing[0] == pytest.approx(4.0)
    localiser = read_image(export, series=LOCALISER)
    assert localiser.array.shape == (128, 128) and localiser.metadata["modality"] == "CT"


def test_read_image_without_series_reads_the_largest_and_names_the_others(export):
    with pytest.warns(ImageReadWarning, match="4 series found") as record:
        scan = read_image(export)
    assert scan.metadata["series_uid"] == T1
    text = " ".join(str(w.message) for w in record)
    assert LOCALISER in text and "list_series" in text


def test_unknown_series_and_series_of_a_file_are_clear_errors(export, tmp_path):
    with pytest.raises(ImageReadError, match="no series with SeriesInstanceUID 9.9.9") as info:
        read_image(export, series="9.9.9")
    message = str(info.value)
    assert str(export) in message and "T1 AX" in message and T2 in message
    with pytest.raises(ImageReadError, match="give the folder"):
        read_image(CT, series=T1)
    with pytest.raises(ImageReadError, match="not a folder"):
        list_series(CT)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ImageReadError, match="no DICOM images"):
        list_series(tmp_path / "nothing")


@pytest.mark.qt
def test_napari_reader_gives_one_layer_per_series(export, make_napari_viewer):
    pytest.importorskip("napari")
    viewer = make_napari_viewer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageReadWarning)
        layers = viewer.open(str(export), plugin="napari-mtml")
    assert [layer.name for layer in layers] == ["SCOUT localiser", "T2 AX", "T1 AX", "series 7"]
    shapes = [layer.data.shape for layer in layers]
    assert shapes == [(128, 128), (2, 64, 64), (4, 64, 64), (2, 64, 64)]
    assert [layer.metadata["series_uid"] for layer in layers] == [LOCALISER, T2, T1, NAMELESS]
    np.testing.assert_allclose(layers[2].scale, (5.0, 0.3125, 0.3125))

    # A folder of a single series still gives one layer, named after the folder.
    single = export / "DIR001"
    (layer,) = viewer.open(str(single), plugin="napari-mtml")
    assert layer.name == "DIR001" and layer.data.shape == (4, 64, 64)


def test_reader_keeps_the_readable_series_when_one_is_broken(export):
    from napari_mtml._napari.reader import read_layers

    # Make the T2 series inconsistent (one slice of another size): it cannot be stacked.
    broken = sorted(p for p in export.iterdir() if p.name.startswith("IM02"))[0]
    ds = pydicom.dcmread(broken)
    ds.Rows = 32
    ds.PixelData = np.zeros((32, 64), np.int16).tobytes()
    ds.save_as(broken)
    with pytest.warns(ImageReadWarning, match="'T2 AX'.*not opened"):
        layers = read_layers(str(export))
    assert [kwargs["name"] for _, kwargs, _ in layers] == ["SCOUT localiser", "T1 AX", "series 7"]
