"""NIfTI-1 / NIfTI-2 reading (any endianness, .nii or .nii.gz) and writing, via nibabel."""

from __future__ import annotations

import gzip
import logging
import zlib
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import imageglobals
from nibabel.openers import ImageOpener
from nibabel.volumeutils import shape_zoom_affine

from .scan import (
    ImageReadError,
    Scan,
    canonicalise,
    check_values,
    require_regular_file,
    to_file_order,
    warn,
)

# A header claiming more than this is corrupt or not meant for this plugin; refusing early keeps
# nibabel from allocating the claimed size before it notices the file is short.
MAX_BYTES = 8 * 1024**3


@contextmanager
def _quiet_nibabel():
    """nibabel's header checks log (and fix) zero/negative voxel sizes on stderr; `_geometry`
    reports them itself, as one warning. (nibabel's own LoggingOutputSuppressor loses the
    logger's handler on exit, so it is not used.)"""
    logger = imageglobals.logger
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load(path: Path):
    require_regular_file(path)
    try:
        with _quiet_nibabel():
            img = nib.load(str(path))
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found.") from None
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile) as exc:
        raise ImageReadError(
            f"{path}: could not read the NIfTI header ({exc}); the file is truncated or corrupt."
        ) from None
    except Exception as exc:  # nibabel raises many kinds for a bad header
        raise ImageReadError(
            f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})."
        ) from None
    if not isinstance(img, nib.Nifti1Pair):
        raise ImageReadError(
            f"{path}: nibabel reads it as {type(img).__name__}, not NIfTI; convert it to .nii.gz."
        )
    return img


def _raw_pixdim(path: Path, img) -> np.ndarray:
    """pixdim[1:4] as stored in the file: nibabel's loaded header has zero/negative ones fixed."""
    try:
        with ImageOpener(str(path), "rb") as fh:
            raw = type(img.header).from_fileobj(fh, check=False)
        return np.asarray(raw["pixdim"][1:4], dtype=float)
    except Exception:  # unreadable here means nibabel read a header we cannot: keep its values
        return np.asarray(img.header["pixdim"][1:4], dtype=float)


def _geometry(path: Path, img, metadata: dict) -> tuple[np.ndarray, list[float]]:
    """The file's voxel-to-world affine and voxel sizes (mm, file axes i, j, k), agreeing.

    One rule for the voxel sizes (pixdim[1:4]): a NaN, infinite, zero or negative one is not
    trusted. With a usable stored affine (qform or sform code > 0, finite, invertible) that axis
    takes the affine's column length; without one it takes 1 mm, and the affine is built from the
    voxel sizes (nibabel's convention for files without an orientation). Either way one warning
    names the file and the axes, and the spacing and the affine agree.
    """
    hdr = img.header
    n_spatial = min(len(img.shape), 3)
    raw = _raw_pixdim(path, img)
    bad = [ax for ax in range(n_spatial) if not (np.isfinite(raw[ax]) and raw[ax] > 0)]
    zooms = [float(raw[ax]) if ax < n_spatial and ax not in bad else 1.0 for ax in range(3)]
    stored = None
    if int(hdr["qform_code"]) > 0 or int(hdr["sform_code"]) > 0:
        with np.errstate(all="ignore"):
            aff = np.asarray(img.affine, dtype=float)
            ok = np.isfinite(aff).all() and abs(np.linalg.det(aff[:3, :3])) > 1e-12
        if ok:
            stored = aff
        else:
            warn(
                metadata,
                f"{path}: the header's qform/sform affine is unusable (not finite or "
                "singular); placing the image by its voxel sizes only.",
            )
    axes = ", ".join("ijk"[ax] for ax in bad)
    values = ", ".join(f"{raw[ax]:g}" for ax in bad)
    if stored is not None:
        columns = np.sqrt((stored[:3, :3] ** 2).sum(axis=0))
        for ax in bad:
            zooms[ax] = float(columns[ax])
        if bad:
            warn(
                metadata,
                f"{path}: voxel size(s) {values} (axis {axes}) in the header are not "
                "positive numbers; using the affine's "
                f"{', '.join(f'{zooms[ax]:g}' for ax in bad)} mm.",
            )
        return stored, zooms
    if bad:
        warn(
            metadata,
            f"{path}: voxel size(s) {values} (axis {axes}) in the header are not "
            "positive numbers and there is no usable qform/sform; using 1 mm for "
            f"axis {axes}.",
        )
    shape = tuple(int(s) for s in img.shape[:3]) + (1,) * (3 - n_spatial)
    return shape_zoom_affine(shape, zooms, x_flip=True), zooms


def read_nifti(path: Path) -> Scan:
    """Read a NIfTI file as a RAS-canonical `(z, y, x)` float32 `Scan` (never resampled).

    A 4D file gives its first volume and a warning; 5D+, complex and RGB files are refused.
    """
    img = _load(path)
    hdr = img.header
    shape = tuple(int(s) for s in img.shape)
    dtype = hdr.get_data_dtype()
    metadata: dict = {
        "path": str(path),
        "format": "nifti",
        "modality": "",
        "window": None,
        "warnings": [],
    }
    if dtype.names is not None or dtype.kind == "c":
        raise ImageReadError(
            f"{path}: voxel type {dtype} (RGB or complex) is not a greyscale intensity; save one "
            "greyscale channel as a float or integer NIfTI."
        )
    if len(shape) > 4 and any(s > 1 for s in shape[4:]):
        raise ImageReadError(
            f"{path}: {len(shape)}D image {shape}; a single 3D volume is needed (vector or "
            "multi-channel NIfTI is not supported). Extract one volume first."
        )
    n_bytes = int(np.prod(shape[:4], dtype=np.int64)) * dtype.itemsize
    if n_bytes > MAX_BYTES:
        raise ImageReadError(
            f"{path}: the header claims {shape} voxels ({n_bytes / 1024**3:.1f} GiB); the header "
            "is corrupt or the image is far too large for this plugin."
        )
    if str(path).lower().endswith(".nii"):
        offset = int(hdr.get_data_offset())
        size = Path(path).stat().st_size
        if size < offset + n_bytes:
            raise ImageReadError(
                f"{path}: truncated: the header needs {n_bytes} bytes of voxel data after byte "
                f"{offset}, but the file has only {size} bytes in all. Copy the file again."
            )
    try:
        proxy = img.dataobj
        if len(shape) >= 4:
            index = (slice(None),) * 3 + (0,) * (len(shape) - 3)
            if shape[3] > 1:
                warn(
                    metadata,
                    f"{path}: 4D image with {shape[3]} volumes; using the first volume only.",
                )
            data = np.asarray(proxy[index], dtype=np.float32)
        else:
            data = np.asarray(proxy, dtype=np.float32)
    except MemoryError:
        raise ImageReadError(f"{path}: not enough memory to read {shape} voxels.") from None
    except Exception as exc:
        raise ImageReadError(
            f"{path}: could not read the voxel data ({type(exc).__name__}: {exc}); the file is "
            "truncated or corrupt."
        ) from None
    while data.ndim < 3:
        data = data[..., None]
    affine, zooms = _geometry(path, img, metadata)
    array, spacing, geometry = canonicalise(data, affine, zooms)
    metadata.update(geometry)
    metadata["nifti_version"] = 2 if isinstance(img, nib.Nifti2Image) else 1
    metadata["qform_code"] = int(hdr["qform_code"])
    metadata["sform_code"] = int(hdr["sform_code"])
    metadata["file_zooms"] = tuple(zooms)
    metadata["file_dtype"] = str(dtype)
    check_values(array, path, metadata)
    return Scan(array=array, spacing=spacing, affine=affine, metadata=metadata)


def write_nifti(path: Path, array: np.ndarray, like: Scan) -> Path:
    """Write `array` (on `like.array`'s grid) as NIfTI-1 in `like`'s file geometry, keeping its
    voxel type (float32 maps, integer labels)."""
    array = np.asarray(array)
    dtype = array.dtype if array.dtype.kind in "iu" else np.dtype(np.float32)
    data = np.ascontiguousarray(to_file_order(array.astype(dtype, copy=False), like.metadata))
    affine = np.asarray(like.affine, dtype=float)
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    qcode = int(like.metadata.get("qform_code", 1) or 0)
    scode = int(like.metadata.get("sform_code", 1) or 0)
    if qcode == 0 and scode == 0:
        scode = 1  # an image written by us always says where it is
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    zooms = like.metadata.get("file_zooms")
    if zooms is not None and len(zooms) == 3 and data.ndim == 3:
        hdr.set_zooms(tuple(float(z) for z in zooms))
    hdr.set_xyzt_units("mm")
    hdr.set_data_dtype(dtype)
    try:
        nib.save(img, str(path))
    except OSError as exc:
        raise ValueError(f"{path}: could not write the NIfTI file ({exc}).") from None
    return Path(path)
