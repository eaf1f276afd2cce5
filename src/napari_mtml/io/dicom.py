"""DICOM reading via pydicom: single files (2D, multi-frame) and series folders.

Intensities: the modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence) is applied; a VOI
LUT Sequence (a non-linear display table that a window cannot express) is applied too; the window
(WindowCenter/Width) is only recorded in `metadata["window"]`, never clipped here. MONOCHROME1
images are inverted so that bright means dense, and the recorded window is inverted with them.

Geometry: positions and directions (DICOM LPS) become a NIfTI-style RAS+ affine of the file's voxel
order `(i, j, k)` = (column, row, slice); 3D volumes are then reoriented like NIfTI files.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .scan import (
    ImageReadError,
    Scan,
    array_affine_from,
    canonicalise,
    check_values,
    read_head,
    require_regular_file,
    warn,
)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# What to install for each compressed transfer syntax pydicom cannot decode by itself.
_DECODERS = {
    "jpeg": "pylibjpeg and pylibjpeg-libjpeg (`pip install pylibjpeg pylibjpeg-libjpeg`) or "
    "python-gdcm",
    "jpegls": "pylibjpeg and pylibjpeg-libjpeg (`pip install pylibjpeg pylibjpeg-libjpeg`), "
    "pyjpegls or python-gdcm",
    "j2k": "pylibjpeg and pylibjpeg-openjpeg (`pip install pylibjpeg pylibjpeg-openjpeg`) or "
    "python-gdcm",
    "rle": "pylibjpeg-rle (`pip install pylibjpeg pylibjpeg-rle`)",
    "other": "pylibjpeg with its plugins (`pip install pylibjpeg pylibjpeg-libjpeg "
    "pylibjpeg-openjpeg`) or python-gdcm",
}
_SYNTAX_FAMILY = {
    "1.2.840.10008.1.2.4.50": "jpeg",
    "1.2.840.10008.1.2.4.51": "jpeg",
    "1.2.840.10008.1.2.4.57": "jpeg",
    "1.2.840.10008.1.2.4.70": "jpeg",
    "1.2.840.10008.1.2.4.80": "jpegls",
    "1.2.840.10008.1.2.4.81": "jpegls",
    "1.2.840.10008.1.2.4.90": "j2k",
    "1.2.840.10008.1.2.4.91": "j2k",
    "1.2.840.10008.1.2.4.201": "j2k",
    "1.2.840.10008.1.2.4.202": "j2k",
    "1.2.840.10008.1.2.4.203": "j2k",
    "1.2.840.10008.1.2.5": "rle",
}
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# A folder walk stops here: a user pointing at a whole disk gets an error, not a hang.
MAX_FOLDER_FILES = 20000


def looks_like_dicom(path: Path) -> bool:
    """True for a file with the "DICM" marker, or a raw (no preamble) dataset from group 8.

    Only regular files (links resolved) are opened: a named pipe would block the read forever.
    """
    head = read_head(path, 132)
    if head is None:
        return False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    return head[:2] in (b"\x08\x00", b"\x00\x08") and len(head) >= 8


def _dcmread(path: Path, stop_before_pixels: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    if Path(path).is_dir():
        raise ImageReadError(f"{path}: is a folder; give the folder itself to read a series.")
    require_regular_file(path)
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found.") from None
    except IsADirectoryError:
        raise ImageReadError(
            f"{path}: is a folder; give the folder itself to read a series."
        ) from None
    except InvalidDicomError:
        if not looks_like_dicom(path):
            raise ImageReadError(
                f"{path}: not a DICOM file (no 'DICM' marker and no DICOM data elements at the "
                "start). Check that it is a DICOM image and was copied completely."
            ) from None
    except Exception as exc:
        raise ImageReadError(
            f"{path}: could not parse the DICOM file ({type(exc).__name__}: {exc}); it is "
            "truncated or corrupt."
        ) from None
    # A raw dataset without the 128-byte preamble (old ACR-NEMA style).
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels, force=True)
    except Exception as exc:
        raise ImageReadError(
            f"{path}: could not parse the DICOM file ({type(exc).__name__}: {exc}); it is "
            "truncated or corrupt."
        ) from None


def _floats(value, n: int | None = None) -> list[float] | None:
    """A DICOM numeric value (single or multi) as floats, or None if absent/unparsable."""
    if value is None:
        return None
    try:
        seq = (
            list(value)
            if isinstance(value, list | tuple)
            or hasattr(value, "__iter__")
            and not isinstance(value, str | bytes)
            else [value]
        )
        out = [float(v) for v in seq]
    except (TypeError, ValueError):
        return None
    if n is not None and len(out) < n:
        return None
    return out


def _functional(ds, seq_name: str, attr: str, frame: int | None = None):
    """An attribute from the per-frame or shared functional groups of an enhanced file."""
    groups = []
    if frame is not None and "PerFrameFunctionalGroupsSequence" in ds:
        per = ds.PerFrameFunctionalGroupsSequence
        if frame < len(per):
            groups.append(per[frame])
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    for group in groups:
        if seq_name in group and len(group[seq_name]):
            item = group[seq_name][0]
            if attr in item:
                return item[attr].value
    return None


def _get(ds, attr: str, seq_name: str | None = None, frame: int | None = None):
    if attr in ds and ds[attr].value not in (None, ""):
        return ds[attr].value
    if seq_name is not None:
        return _functional(ds, seq_name, attr, frame)
    return None


def _check_greyscale(ds, path: Path) -> None:
    if not any(tag in ds for tag in _PIXEL_TAGS):
        what = ""
        sop = ds.get("SOPClassUID")
        if sop is not None:
            what = f" (it is a '{getattr(sop, 'name', sop)}' object)"
        raise ImageReadError(
            f"{path}: the DICOM file holds no pixel data{what}; give an image file instead."
        )
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        raise ImageReadError(
            f"{path}: colour image ({photometric}, {samples} samples per pixel); this plugin needs "
            "greyscale scans. Convert it to greyscale (MONOCHROME2) first."
        )


def _decode(ds, path: Path) -> np.ndarray:
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    try:
        return ds.pixel_array
    except (RuntimeError, NotImplementedError, ImportError) as exc:
        family = _SYNTAX_FAMILY.get(syntax, "other")
        name = getattr(getattr(ds.file_meta, "TransferSyntaxUID", None), "name", syntax)
        raise ImageReadError(
            f"{path}: the pixel data is compressed ({name}) and no installed decoder could read "
            f"it; install {_DECODERS[family]}, or convert the file to an uncompressed transfer "
            f"syntax. (pydicom said: {str(exc).splitlines()[0]})"
        ) from None
    except MemoryError:
        raise ImageReadError(f"{path}: not enough memory to decode the pixel data.") from None
    except Exception as exc:
        raise ImageReadError(
            f"{path}: the pixel data is truncated or corrupt ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})."
        ) from None


def _stored_range(ds) -> tuple[float, float] | None:
    """The range stored pixel values can take, from BitsStored / PixelRepresentation."""
    bits = ds.get("BitsStored")
    if bits is None:
        return None
    bits = int(bits)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _window(ds, metadata: dict, path: Path, frame: int | None = None, record: bool = True):
    center = _get(ds, "WindowCenter", "FrameVOILUTSequence", frame)
    width = _get(ds, "WindowWidth", "FrameVOILUTSequence", frame)
    centers, widths = _floats(center), _floats(width)
    if not centers or not widths:
        return None
    if record and (len(centers) > 1 or len(widths) > 1):
        warn(
            metadata,
            f"{path}: {max(len(centers), len(widths))} windows are given "
            f"(WindowCenter {centers}, WindowWidth {widths}); using the first.",
        )
    if widths[0] <= 0:
        return None
    return centers[0], widths[0]


def _intensities(
    ds, raw: np.ndarray, path: Path, metadata: dict, frame: int | None = None, record: bool = True
):
    """Modality LUT, VOI LUT Sequence, MONOCHROME1 inversion. Returns float64 array."""
    from pydicom.pixels import apply_modality_lut, apply_voi

    slope = _get(ds, "RescaleSlope", "PixelValueTransformationSequence", frame)
    intercept = _get(ds, "RescaleIntercept", "PixelValueTransformationSequence", frame)
    lo_hi = _stored_range(ds)
    if "ModalityLUTSequence" in ds:
        arr = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
        lo_hi = None
    else:
        s = float(slope) if _floats(slope) else 1.0
        b = float(intercept) if _floats(intercept) else 0.0
        arr = raw.astype(np.float64) * s + b
        if lo_hi is not None:
            lo_hi = tuple(sorted((lo_hi[0] * s + b, lo_hi[1] * s + b)))
    window = _window(ds, metadata, path, frame, record)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        arr = np.asarray(apply_voi(arr, ds, 0), dtype=np.float64)
        metadata["voi_lut_applied"] = True
        window, lo_hi = None, None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    metadata["photometric"] = photometric
    if photometric == "MONOCHROME1":
        # Invert about the range the values can take (not the image's own min/max), so that
        # every file of a series is inverted the same way; bright = dense afterwards.
        lo, hi = lo_hi if lo_hi is not None else (float(arr.min()), float(arr.max()))
        arr = (lo + hi) - arr
        if window is not None:
            window = (lo + hi - window[0], window[1])
        metadata["inverted"] = True
    metadata["window"] = window
    return arr


def _spacing_2d(ds, path: Path, metadata: dict, frame: int | None = None):
    """(row spacing, column spacing) in mm: PixelSpacing, else ImagerPixelSpacing, else 1.0."""
    for attr, seq in (("PixelSpacing", "PixelMeasuresSequence"), ("ImagerPixelSpacing", None)):
        value = _floats(_get(ds, attr, seq, frame), 2)
        if value is None:
            continue
        if all(np.isfinite(v) and v > 0 for v in value[:2]):
            if attr == "ImagerPixelSpacing":
                metadata["spacing_source"] = "ImagerPixelSpacing (at the detector)"
            return value[0], value[1]
        warn(
            metadata,
            f"{path}: {attr} is {value[:2]} (zero or invalid); falling back to "
            "1.0 mm per pixel, so sizes in mm are not physical.",
        )
        return 1.0, 1.0
    warn(
        metadata,
        f"{path}: no PixelSpacing or ImagerPixelSpacing; falling back to 1.0 mm per "
        "pixel, so sizes in mm are not physical.",
    )
    return 1.0, 1.0


def _directions(ds, frame: int | None = None):
    iop = _floats(_get(ds, "ImageOrientationPatient", "PlaneOrientationSequence", frame), 6)
    if iop is None:
        return None
    row_dir, col_dir = np.array(iop[:3]), np.array(iop[3:6])
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(normal) < 1e-6:
        return None
    return row_dir, col_dir, normal / np.linalg.norm(normal)


def _position(ds, frame: int | None = None):
    return _floats(_get(ds, "ImagePositionPatient", "PlanePositionSequence", frame), 3)


def _affine_lps(row_dir, col_dir, normal, origin, row_sp, col_sp, slice_sp) -> np.ndarray:
    """LPS affine of (i=column, j=row, k=slice): column index moves along the row direction."""
    aff = np.eye(4)
    aff[:3, 0] = row_dir * col_sp
    aff[:3, 1] = col_dir * row_sp
    aff[:3, 2] = normal * slice_sp
    aff[:3, 3] = origin
    return aff


def _base_metadata(ds, path: Path, fmt: str) -> dict:
    return {
        "path": str(path),
        "format": fmt,
        "modality": str(ds.get("Modality", "") or ""),
        "orientation": None,
        "window": None,
        "warnings": [],
        "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "series_description": str(ds.get("SeriesDescription", "") or ""),
    }


def read_dicom_file(path: Path) -> Scan:
    """One DICOM file: a 2D `(y, x)` Scan, or a 3D `(z, y, x)` Scan for a multi-frame file."""
    ds = _dcmread(path)
    _check_greyscale(ds, path)
    raw = _decode(ds, path)
    metadata = _base_metadata(ds, path, "dicom")
    n_frames = (
        int(_floats(ds.get("NumberOfFrames"), 1)[0]) if _floats(ds.get("NumberOfFrames"), 1) else 1
    )
    if raw.ndim == 2 or n_frames <= 1:
        arr = _intensities(ds, raw.reshape(raw.shape[-2:]), path, metadata)
        row_sp, col_sp = _spacing_2d(ds, path, metadata)
        dirs, pos = _directions(ds), _position(ds)
        if dirs is not None and pos is not None:
            affine = LPS_TO_RAS @ _affine_lps(*dirs, np.array(pos), row_sp, col_sp, 1.0)
        else:
            affine = np.diag([col_sp, row_sp, 1.0, 1.0])
        array = arr.astype(np.float32)
        metadata["file_shape"] = (array.shape[1], array.shape[0], 1)
        metadata["array_affine"] = array_affine_from(affine, None, None, 2)
        check_values(array, path, metadata)
        return Scan(array=array, spacing=(row_sp, col_sp), affine=affine, metadata=metadata)
    return _multiframe(ds, raw, path, metadata)


def _multiframe(ds, raw: np.ndarray, path: Path, metadata: dict) -> Scan:
    per_frame = "PerFrameFunctionalGroupsSequence" in ds
    frames = [
        _intensities(ds, raw[f], path, metadata, f if per_frame else None, record=f == 0)
        for f in range(raw.shape[0])
    ]
    vol = np.stack(frames).astype(np.float32)  # (frames, rows, cols)
    row_sp, col_sp = _spacing_2d(ds, path, metadata, 0)
    dirs = _directions(ds, 0)
    positions = [_position(ds, f) for f in range(raw.shape[0])] if per_frame else []
    offsets = _floats(ds.get("GridFrameOffsetVector"))
    origin = _position(ds, 0)
    slice_sp = None
    if dirs is not None and positions and all(p is not None for p in positions):
        proj = np.array([np.dot(p, dirs[2]) for p in positions])
        order = np.argsort(proj, kind="stable")
        vol, proj = vol[order], proj[order]
        origin = positions[int(order[0])]
        slice_sp = _slice_spacing(proj, path, metadata)
    elif offsets is not None and len(offsets) == raw.shape[0] and raw.shape[0] > 1:
        # RT dose style: frame offsets along the normal, relative to the first frame's position.
        offs = np.asarray(offsets, dtype=float)
        order = np.argsort(offs, kind="stable")
        if len(np.unique(offs)) == len(offs):
            vol = vol[order]
            if origin is not None and dirs is not None:
                origin = list(np.asarray(origin) + (offs[order[0]] - offs[0]) * dirs[2])
            slice_sp = _slice_spacing(offs[order], path, metadata)
    if slice_sp is None:
        for attr in ("SpacingBetweenSlices", "SliceThickness"):
            v = _floats(_get(ds, attr, "PixelMeasuresSequence", 0), 1)
            if v and v[0] > 0:
                slice_sp = v[0]
                break
    if slice_sp is None:
        warn(metadata, f"{path}: no frame positions or slice spacing; using 1.0 mm between frames.")
        slice_sp = 1.0
    if dirs is None or origin is None:
        warn(
            metadata,
            f"{path}: no patient orientation/position; the frames are kept in file "
            "order as (frame, row, column) and not reoriented.",
        )
        affine = np.diag([col_sp, row_sp, slice_sp, 1.0])
        data_xyz = vol.transpose(2, 1, 0)
        metadata["file_shape"] = tuple(data_xyz.shape)
        metadata["array_affine"] = array_affine_from(affine, None, None, 3)
        check_values(vol, path, metadata)
        return Scan(array=vol, spacing=(slice_sp, row_sp, col_sp), affine=affine, metadata=metadata)
    affine = LPS_TO_RAS @ _affine_lps(*dirs, np.array(origin), row_sp, col_sp, slice_sp)
    array, spacing, geometry = canonicalise(
        vol.transpose(2, 1, 0), affine, (col_sp, row_sp, slice_sp)
    )
    metadata.update(geometry)
    check_values(array, path, metadata)
    return Scan(array=array, spacing=spacing, affine=affine, metadata=metadata)


def _slice_spacing(proj: np.ndarray, path, metadata: dict) -> float | None:
    """Spacing (mm) from sorted slice positions; warns when the gaps are not all equal."""
    if len(proj) < 2:
        return None
    gaps = np.diff(np.sort(proj))
    spacing = float(np.median(gaps))
    if spacing <= 0:
        return None
    if np.max(np.abs(gaps - spacing)) > max(0.01 * spacing, 1e-3):
        warn(
            metadata,
            f"{path}: slice gaps are not uniform ({gaps.min():.3g} to "
            f"{gaps.max():.3g} mm); the volume uses the median gap {spacing:.4g} mm "
            "and is not resampled, so positions between unequal gaps are approximate.",
        )
    return spacing


def _folder_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The regular files under `folder` (recursively, sorted), and the other entries skipped.

    Named pipes, sockets, devices and broken links are never opened (reading a pipe blocks).
    """
    files: list[Path] = []
    special: list[Path] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            f = Path(root) / name
            if not f.is_file():  # follows links; False for FIFOs, sockets, devices
                special.append(f)
                continue
            files.append(f)
            if len(files) > MAX_FOLDER_FILES:
                raise ImageReadError(
                    f"{folder}: more than {MAX_FOLDER_FILES} files under this folder; point at "
                    "the folder of one DICOM series."
                )
    return files, special


def _special_note(folder: Path, special: list[Path]) -> str:
    shown = ", ".join(p.name for p in special[:5]) + (" ..." if len(special) > 5 else "")
    return (
        f"{folder}: skipped {len(special)} entr{'y' if len(special) == 1 else 'ies'} that "
        f"{'is' if len(special) == 1 else 'are'} not a regular file (named pipe, socket, "
        f"device or broken link): {shown}"
    )


@dataclass(frozen=True)
class DicomSeries:
    """One image series found in a folder (`list_series`).

    `uid` (SeriesInstanceUID, or "(no SeriesInstanceUID)"), `description` (SeriesDescription,
    "" if absent), `number` (SeriesNumber or None), `modality`, `n_files` (image files of the
    series), `rows`, `columns` (of its first file) and `files` (their paths, sorted).
    """

    uid: str
    description: str
    number: int | None
    modality: str
    n_files: int
    rows: int
    columns: int
    files: tuple[Path, ...]

    @property
    def name(self) -> str:
        """A short display name: the description, else "series N", else the UID's tail."""
        if self.description:
            return self.description
        if self.number is not None:
            return f"series {self.number}"
        return f"series {self.uid[-12:]}"


def _index_folder(folder: Path) -> tuple[dict[str, list], int, list[Path]]:
    """Headers of every DICOM image file under `folder`, grouped by SeriesInstanceUID.

    Returns `(series uid -> [(path, dataset without pixels), ...], skipped files, entries that
    are not regular files)`.
    """
    files, special = _folder_files(folder)
    series: dict[str, list] = defaultdict(list)
    skipped = 0
    for f in files:
        if not looks_like_dicom(f):
            skipped += 1
            continue
        try:
            ds = _dcmread(f, stop_before_pixels=True)
        except ImageReadError:
            skipped += 1
            continue
        if "Rows" not in ds or "Columns" not in ds:
            continue  # a report, plan or structure set: no image
        series[str(ds.get("SeriesInstanceUID", "") or "(no SeriesInstanceUID)")].append((f, ds))
    if not series:
        raise ImageReadError(
            f"{folder}: no DICOM images found in this folder ({len(files)} file(s) looked at"
            f"{'; ' + _special_note(folder, special).split(': ', 1)[1] if special else ''}); "
            "point at a folder holding the slices of one DICOM series, or at a single file."
        )
    return series, skipped, special


def _series_number(ds) -> int | None:
    try:
        value = ds.get("SeriesNumber")
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _describe(uid: str, members: list) -> DicomSeries:
    ds = members[0][1]
    return DicomSeries(
        uid=uid,
        description=str(ds.get("SeriesDescription", "") or "").strip(),
        number=_series_number(ds),
        modality=str(ds.get("Modality", "") or ""),
        n_files=len(members),
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        files=tuple(f for f, _ in members),
    )


def _ordered(series: dict[str, list]) -> list[tuple[str, list]]:
    """Series in the scanner's order: SeriesNumber, then UID (unnumbered ones last)."""

    def key(item):
        number = _series_number(item[1][0][1])
        return (number is None, number if number is not None else 0, item[0])

    return sorted(series.items(), key=key)


def list_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """Every DICOM image series under `folder` (searched recursively), in SeriesNumber order.

    Only headers are read. A hospital export typically holds a localiser, T1, T2, DWI ... as
    separate series; `read_image(folder, series=s.uid)` reads one of them.

    Raises `ImageReadError` for a missing folder or one without DICOM images.

    Parameters
    ----------
    folder : str or os.PathLike

    Returns
    -------
    list of DicomSeries

    Examples
    --------
    >>> for s in list_series("export/"):  # doctest: +SKIP
    ...     print(s.number, s.description, s.n_files)
    1 localiser 3
    2 T1 MPRAGE 176
    >>> t1 = read_image("export/", series=list_series("export/")[1].uid)  # doctest: +SKIP
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(f"{folder}: not a folder; list_series needs a folder of DICOM files.")
    series, _skipped, _special = _index_folder(folder)
    return [_describe(uid, members) for uid, members in _ordered(series)]


def read_dicom_series(folder: Path, series: str | None = None) -> Scan:
    """A folder (searched recursively) holding DICOM slices: one series as one volume.

    `series`: the SeriesInstanceUID to read (see `list_series`); `None` reads the largest series
    and records the others in `metadata["warnings"]`. Slices of one series are sorted by
    ImagePositionPatient projected on the slice normal; the z spacing comes from those
    positions (not SliceThickness).
    """
    index, skipped, special = _index_folder(folder)
    if series is not None:
        uid = str(series)
        if uid not in index:
            found = "; ".join(
                f"{s.uid} ({s.name}, {s.n_files} file(s))"
                for s in (_describe(u, m) for u, m in _ordered(index))
            )
            raise ImageReadError(
                f"{folder}: no series with SeriesInstanceUID {uid}; the folder holds: {found}."
            )
        members = index[uid]
        first_meta = _base_metadata(members[0][1], folder, "dicom-series")
    else:
        ranked = sorted(index.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        uid, members = ranked[0]
        first_meta = _base_metadata(members[0][1], folder, "dicom-series")
        if len(ranked) > 1:
            others = ", ".join(f"{u} ({len(m)} file(s))" for u, m in ranked[1:])
            desc = first_meta["series_description"]
            warn(
                first_meta,
                f"{folder}: {len(ranked)} series found; reading the largest, {uid}"
                f"{f' ({desc})' if desc else ''} with {len(members)} file(s). "
                f"Others: {others}. Choose one with read_image(folder, "
                "series=UID) (list_series lists them).",
            )
    if skipped:
        first_meta["skipped_files"] = skipped
    if special:
        warn(first_meta, _special_note(folder, special) + ".")
    return _read_members(folder, members, first_meta)


def read_each_series(folder: Path):
    """Every series of a folder, headers indexed once: yields `(DicomSeries, Scan)` pairs, or
    `(DicomSeries, ImageReadError)` for a series that cannot be read (the others still are).

    In SeriesNumber order, like `list_series`; what the napari reader uses for one layer per
    series.
    """
    index, _skipped, special = _index_folder(Path(folder))
    for uid, members in _ordered(index):
        info = _describe(uid, members)
        meta = _base_metadata(members[0][1], folder, "dicom-series")
        if special:
            warn(meta, _special_note(Path(folder), special) + ".")
        try:
            scan = _read_members(Path(folder), members, meta)
        except ImageReadError as exc:
            yield info, exc
        else:
            yield info, scan


def _read_members(folder: Path, members: list, first_meta: dict) -> Scan:
    if len(members) == 1 or int(members[0][1].get("NumberOfFrames", 1) or 1) > 1:
        scan = read_dicom_file(members[0][0])
        scan.metadata["warnings"] = first_meta["warnings"] + scan.metadata["warnings"]
        scan.metadata["path"] = str(folder)
        return scan
    return _stack_series(folder, members, first_meta)


def _stack_series(folder: Path, members: list, metadata: dict) -> Scan:
    # Localisers in other planes sometimes share the series UID: keep the main plane only.
    planes: dict = defaultdict(list)
    for f, ds in members:
        dirs = _directions(ds)
        key = None if dirs is None else tuple(np.round(np.concatenate(dirs[:2]), 3))
        planes[key].append((f, ds))
    if len(planes) > 1:
        main = max(planes.values(), key=len)
        warn(
            metadata,
            f"{folder}: the series holds slices in {len(planes)} different planes; "
            f"kept the {len(main)} slice(s) of the most common plane and ignored "
            f"{len(members) - len(main)}.",
        )
        members = main
        if len(members) == 1:
            scan = read_dicom_file(members[0][0])
            scan.metadata["warnings"] = metadata["warnings"] + scan.metadata["warnings"]
            scan.metadata["path"] = str(folder)
            return scan
    ds0 = members[0][1]
    dirs = _directions(ds0)
    positions = [_position(ds) for _, ds in members]
    if dirs is not None and all(p is not None for p in positions):
        proj = np.array([np.dot(p, dirs[2]) for p in positions])
        order = list(np.argsort(proj, kind="stable"))
        sorted_by = "position"
    else:
        warn(
            metadata,
            f"{folder}: slices lack ImageOrientationPatient/ImagePositionPatient; "
            "sorted by InstanceNumber, and the volume is not reoriented.",
        )
        numbers = [float(ds.get("InstanceNumber", i) or i) for i, (_, ds) in enumerate(members)]
        order = list(np.argsort(numbers, kind="stable"))
        proj = None
        sorted_by = "InstanceNumber"
    if proj is not None:
        # Several slices at one position: echoes or time points mixed in one series.
        keep, seen = [], set()
        for i in order:
            key = round(float(proj[i]), 3)
            if key not in seen:
                seen.add(key)
                keep.append(i)
        if len(keep) < len(order):
            warn(
                metadata,
                f"{folder}: {len(order) - len(keep)} slice(s) repeat a position "
                "already taken (several echoes or time points?); kept the first at "
                "each position.",
            )
        order = keep
    slices, shape = [], None
    for i in order:
        path, _ = members[i]
        ds = _dcmread(path)
        _check_greyscale(ds, path)
        raw = _decode(ds, path)
        if shape is None:
            shape = raw.shape
        elif raw.shape != shape:
            raise ImageReadError(
                f"{path}: slice of shape {raw.shape} in a series of {shape} slices; the series "
                f"in {folder} is inconsistent. Remove the odd file(s)."
            )
        slices.append(_intensities(ds, raw, path, {}, record=False))
    # The window of the first (lowest) slice stands for the series.
    first = _dcmread(members[order[0]][0], stop_before_pixels=True)
    _intensities(first, np.zeros((1, 1), dtype=np.uint16), folder, metadata)
    vol = np.stack(slices).astype(np.float32)  # (slices, rows, cols)
    row_sp, col_sp = _spacing_2d(ds0, folder, metadata)
    slice_sp = _slice_spacing(proj[order], folder, metadata) if proj is not None else None
    if slice_sp is None:
        v = _floats(ds0.get("SpacingBetweenSlices"), 1) or _floats(ds0.get("SliceThickness"), 1)
        slice_sp = v[0] if v and v[0] > 0 else 1.0
        warn(
            metadata,
            f"{folder}: slice spacing not derivable from positions; using {slice_sp:g} mm.",
        )
    metadata["n_slices"] = len(order)
    metadata["sorted_by"] = sorted_by
    if dirs is None or proj is None:
        affine = np.diag([col_sp, row_sp, slice_sp, 1.0])
        metadata["file_shape"] = tuple(vol.transpose(2, 1, 0).shape)
        metadata["array_affine"] = array_affine_from(affine, None, None, 3)
        check_values(vol, folder, metadata)
        return Scan(array=vol, spacing=(slice_sp, row_sp, col_sp), affine=affine, metadata=metadata)
    origin = np.array(positions[order[0]])
    affine = LPS_TO_RAS @ _affine_lps(*dirs, origin, row_sp, col_sp, slice_sp)
    array, spacing, geometry = canonicalise(
        vol.transpose(2, 1, 0), affine, (col_sp, row_sp, slice_sp)
    )
    metadata.update(geometry)
    check_values(array, folder, metadata)
    return Scan(array=array, spacing=spacing, affine=affine, metadata=metadata)
