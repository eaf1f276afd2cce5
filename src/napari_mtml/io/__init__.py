"""Reading scans with their geometry (NIfTI, DICOM files and series, 2D PNG/TIFF) and writing maps.

```python
from napari_mtml.io import Scan, read_image, write_image, ImageReadError
scan = read_image(path)              # a file, or a folder holding DICOM series
list_series(folder)                  # the DICOM series of a folder; read_image(folder, series=uid)
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

from .dicom import DicomSeries, list_series, looks_like_dicom, read_dicom_file, read_dicom_series
from .nifti import read_nifti, write_nifti
from .raster import RASTER_SUFFIXES, read_raster
from .scan import ImageReadError, ImageReadWarning, Scan, read_head

__all__ = [
    "IMAGE_SUFFIXES",
    "DicomSeries",
    "ImageReadError",
    "ImageReadWarning",
    "Scan",
    "image_files",
    "image_kind",
    "image_name",
    "is_image_file",
    "list_series",
    "read_image",
    "read_map",
    "write_image",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: The suffixes that mark a file of a folder as an image (NIfTI, DICOM, 2D raster): what
#: training, batch prediction, mask folders and the preview's external folder pick files by,
#: and what `image_name` strips.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".dcm", ".png", ".tif", ".tiff", ".jpg", ".jpeg")


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether the name of `path` ends in one of `IMAGE_SUFFIXES` (case-insensitive).

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    bool

    Examples
    --------
    >>> is_image_file("CASE1.NII.GZ"), is_image_file("notes.txt")
    (True, False)
    """
    return Path(path).name.lower().endswith(IMAGE_SUFFIXES)


def image_name(path: str | os.PathLike) -> str:
    """The file (or folder) name without its image suffix: the NAME of NAME_anomaly.nii.gz.

    Parameters
    ----------
    path : str or os.PathLike
        A file or a folder (a DICOM series).

    Returns
    -------
    str
        Its name without the first of `IMAGE_SUFFIXES` it ends in (case-insensitive).

    Examples
    --------
    >>> image_name("scans/case1.nii.gz")
    'case1'
    >>> image_name("series_folder")
    'series_folder'
    """
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def image_files(folder: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """The image files of a folder (`is_image_file`), sorted by path.

    Only regular files are taken (links resolved): a named pipe, socket or device is skipped and
    never opened. Hidden files (a leading ".", e.g. macOS "._scan.nii.gz" companions) are
    skipped. With `recursive`, sub-folders are searched too.

    Raises
    ------
    ValueError
        The folder cannot be listed (permissions, not a folder); the message names it.

    Parameters
    ----------
    folder : str or os.PathLike
    recursive : bool
        Also the files of its sub-folders.

    Returns
    -------
    list of Path

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> for name in ("b.nii.gz", "a.dcm", "notes.txt", ".hidden.nii"):
    ...     _ = (folder / name).write_bytes(b"")
    >>> [p.name for p in image_files(folder)]
    ['a.dcm', 'b.nii.gz']
    """
    folder = Path(folder)
    try:
        entries = sorted(folder.rglob("*") if recursive else folder.iterdir())
    except OSError as exc:
        raise ValueError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from None
    return [f for f in entries if not f.name.startswith(".") and is_image_file(f) and f.is_file()]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in (".nii.gz",):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _sniff(path: Path) -> str | None:
    """The format from the first bytes, for files without a known suffix (regular files only:
    opening a named pipe would block)."""
    head = read_head(path, 352)
    if head is None:
        return None
    if head[:2] == b"\x1f\x8b":
        return "nifti"  # gzip: in this plugin's world, a compressed NIfTI
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return "nifti"
    if looks_like_dicom(path):
        return "dicom"
    if (
        head[:8] == b"\x89PNG\r\n\x1a\n"
        or head[:4] in (b"II*\x00", b"MM\x00*")
        or head[:3] == b"\xff\xd8\xff"
        or head[:2] == b"BM"
    ):
        return "raster"
    return None


def image_kind(path: str | os.PathLike) -> str | None:
    """What `read_image` would read `path` as, from its suffix (or its first bytes); cheap.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    {"nifti", "dicom", "dicom-series", "raster", None}
        "dicom-series" for a folder; None for what is not an image.

    Examples
    --------
    >>> image_kind("scan.nii.gz"), image_kind("xray.dcm"), image_kind("photo.png")
    ('nifti', 'dicom', 'raster')
    """
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


def read_image(path: str | os.PathLike, series: str | None = None) -> Scan:
    """Read a scan: NIfTI-1/2 (.nii, .nii.gz), DICOM (file or series folder), PNG/TIFF (2D).

    Parameters
    ----------
    path : a file, or a folder holding DICOM slices (searched recursively; the largest series is
        read and the choice is recorded in `metadata["warnings"]`).
    series : for a folder, the SeriesInstanceUID of the series to read (`list_series(folder)`
        lists them); an unknown UID raises `ImageReadError` listing the folder's series.

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

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from napari_mtml.io import Scan, read_image, write_image
    >>> volume = np.random.default_rng(0).normal(100, 10, (4, 5, 6)).astype(np.float32)
    >>> path = write_image(Path(tempfile.mkdtemp()) / "scan.nii.gz", volume,
    ...                    like=Scan(array=volume, spacing=(2.0, 1.0, 1.0)))
    >>> scan = read_image(path)
    >>> scan.array.shape, scan.spacing, scan.metadata["format"]
    ((4, 5, 6), (2.0, 1.0, 1.0), 'nifti')
    >>> bool(np.array_equal(scan.array, volume))
    True
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: file or folder not found.")
    if path.is_dir():
        return read_dicom_series(path, series=series)
    if series is not None:
        raise ImageReadError(
            f"{path}: series={series!r} chooses a series inside a DICOM folder; give the folder, "
            "not a file."
        )
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


def write_image(path: str | os.PathLike, array, like: Scan | None = None, dtype=np.float32) -> Path:
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
    dtype : the voxel type written: float32 (maps), or an integer type for label images
        (values must fit it; they are written exactly).

    Returns
    -------
    Path
        The file written (`path`).

    Examples
    --------
    A heatmap written back in the geometry of the scan it was predicted on:

    >>> import tempfile
    >>> import numpy as np
    >>> scan = Scan(array=np.zeros((4, 5, 6), np.float32), spacing=(2.0, 1.0, 1.0))
    >>> heat = np.full(scan.array.shape, 0.5, np.float32)
    >>> path = write_image(Path(tempfile.mkdtemp()) / "scan_anomaly.nii.gz", heat, like=scan)
    >>> read_image(path).array.shape
    (4, 5, 6)
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
    dtype = np.dtype(dtype)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if dtype.kind == "i" or dtype.kind == "u":
        info = np.iinfo(dtype)
        if arr.size and (
            arr.min() < info.min or arr.max() > info.max or not np.array_equal(arr, np.rint(arr))
        ):
            raise ValueError(
                f"{path}: the values do not fit {dtype} exactly; write them as "
                "float32 or choose a wider integer type."
            )
    elif dtype != np.float32:
        raise ValueError(f"{path}: write_image writes float32 or integer voxels, not {dtype}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: the map holds NaN or infinite values; refusing to write it.")
    return write_nifti(path, arr.astype(dtype), like)


def read_map(path: str | os.PathLike, metadata: dict, ndim: int) -> np.ndarray:
    """A map that `write_image(path, map, like=scan)` wrote, back on `scan.array`'s grid.

    Parameters
    ----------
    path : str or os.PathLike
        The NIfTI file written.
    metadata, ndim : dict, int
        `scan.metadata` and `scan.ndim` of the scan the map belongs to (what undoes the
        reorientation to the file's voxel order).

    Returns
    -------
    ndarray of float32
        The map on the scan's array grid.
    """
    import nibabel as nib

    from .scan import from_file_order

    data = np.asarray(nib.load(os.fspath(path)).dataobj, dtype=np.float32)
    return from_file_order(data, metadata, ndim)
