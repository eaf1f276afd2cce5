"""Reading scans with their geometry (NIfTI, DICOM files and series, 2D PNG/TIFF) and writing maps.

```python
from napari_mtml.io import Scan, read_image, write_image, ImageReadError
scan = read_image(path)              # a file, or a folder holding one DICOM series
write_image(out_path, heatmap, like=scan)   # a map on scan.array's grid, in the file's geometry
```
See `napari_mtml.io.scan` for the geometry convention. Every problem with an input file raises
`ImageReadError` (a `ValueError`) whose message names the file and says what to do; harmless
oddities (4D file, zero pixel spacing, several DICOM series, constant image) are read, recorded in
`scan.metadata["warnings"]` and emitted as `ImageReadWarning`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .dicom import looks_like_dicom, read_dicom_file, read_dicom_series
from .nifti import read_nifti, write_nifti
from .raster import RASTER_SUFFIXES, read_raster
from .scan import ImageReadError, ImageReadWarning, Scan

__all__ = [
    "ImageReadError",
    "ImageReadWarning",
    "Scan",
    "image_kind",
    "read_image",
    "write_image",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in (".nii.gz",):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _sniff(path: Path) -> str | None:
    """The format from the first bytes, for files without a known suffix (regular files only:
    opening a named pipe would block)."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as fh:
            head = fh.read(352)
    except OSError:
        return None
    if head[:2] == b"\x1f\x8b":
        return "nifti"  # gzip: in this plugin's world, a compressed NIfTI
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return "nifti"
    if looks_like_dicom(path):
        return "dicom"
    if head[:8] == b"\x89PNG\r\n\x1a\n" or head[:4] in (b"II*\x00", b"MM\x00*") or \
            head[:3] == b"\xff\xd8\xff" or head[:2] == b"BM":
        return "raster"
    return None


def image_kind(path: str | os.PathLike) -> str | None:
    """"nifti", "dicom", "dicom-series", "raster" or None: what `read_image` would try (cheap)."""
    path = Path(path)
    if path.is_dir():
        return "dicom-series"
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix in RASTER_SUFFIXES:
        return "raster"
    if path.is_file():
        return _sniff(path)
    return None


def read_image(path: str | os.PathLike) -> Scan:
    """Read a scan: NIfTI-1/2 (.nii, .nii.gz), DICOM (file or series folder), PNG/TIFF (2D).

    Parameters
    ----------
    path : a file, or a folder holding DICOM slices (searched recursively; the largest series is
        read and the choice is recorded in `metadata["warnings"]`).

    Returns
    -------
    Scan
        `array` float32: 3D as `(z, y, x)` in RAS-canonical orientation (flips/permutations only,
        never resampled), 2D as `(y, x)` as stored (rows, columns); `spacing` in mm per array
        axis; `affine` the file's voxel-to-world affine (RAS+ mm); `metadata` see `Scan`.
        A 4D NIfTI gives its first volume (+ warning); a multi-frame DICOM gives a 3D volume;
        a 2D NIfTI gives a `(1, y, x)` volume.

    Raises
    ------
    ImageReadError
        Missing, unreadable, truncated or corrupt files; DICOM without pixel data; compressed
        DICOM without an installed decoder (the message names the package to install); colour,
        5D or complex images; NaN or infinite values.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: file or folder not found.")
    if path.is_dir():
        return read_dicom_series(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: not a regular file.")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: the file is empty (0 bytes).")
    kind = image_kind(path)
    if kind == "nifti":
        return read_nifti(path)
    if kind == "dicom":
        return read_dicom_file(path)
    if kind == "raster":
        return read_raster(path)
    raise ImageReadError(
        f"{path}: unsupported file type '{_suffix(path) or '(no suffix)'}'; give a NIfTI "
        "(.nii, .nii.gz), DICOM (.dcm or a series folder) or PNG/TIFF file."
    )


def write_image(path: str | os.PathLike, array, like: Scan | None = None) -> Path:
    """Write a map that lies on `like.array`'s grid as a float32 NIfTI in `like`'s file geometry.

    The array is put back into the file's own voxel order (undoing the RAS reorientation of
    `read_image`) and saved with the file's affine, so it overlays the original scan in any
    viewer. Reading it back gives the same array, spacing and affine. DICOM and 2D inputs are
    written as NIfTI too (a 2D map as an `(x, y, 1)` volume with the scan's affine).

    Parameters
    ----------
    path : output file name ending in .nii or .nii.gz.
    array : real array with `like.array.shape` (a bool/int mask is written as float32 0/1);
        complex and other non-real arrays are refused (`ValueError`), never silently cut.
    like : the Scan the map belongs to; None = a plain 1 mm grid.
    """
    from napari_mtml.files import check_output_file

    path = check_output_file(path, "map")
    arr = np.asarray(array)
    if arr.dtype.kind not in "biuf":
        what = "complex" if arr.dtype.kind == "c" else f"of type {arr.dtype}"
        raise ValueError(
            f"{path}: the map is {what}; write_image writes real-valued maps (take .real, "
            "np.abs(...) or convert it yourself, as the case needs)."
        )
    if like is None:
        like = Scan(array=np.zeros(arr.shape, dtype=np.float32), spacing=(1.0,) * arr.ndim)
    if arr.shape != like.array.shape:
        raise ValueError(
            f"{path}: the map has shape {arr.shape} but the scan it belongs to has "
            f"{like.array.shape}; bring the map onto the scan's grid first (from_frame)."
        )
    if _suffix(path) not in (".nii", ".nii.gz"):
        raise ValueError(
            f"{path}: write_image writes NIfTI only; name the output file .nii or .nii.gz."
        )
    if not path.parent.exists():
        raise ValueError(f"{path}: the folder {path.parent} does not exist; create it first.")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: the map holds NaN or infinite values; refusing to write it.")
    return write_nifti(path, arr, like)
