"""NIfTI-1 / NIfTI-2 reading (any endianness, .nii or .nii.gz) and writing, via nibabel."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from .scan import ImageReadError, Scan, canonicalise, check_values, to_file_order, warn

# A header claiming more than this is corrupt or not meant for this plugin; refusing early keeps
# nibabel from allocating the claimed size before it notices the file is short.
MAX_BYTES = 8 * 1024**3


def _load(path: Path):
    try:
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


def read_nifti(path: Path) -> Scan:
    """Read a NIfTI file as a RAS-canonical `(z, y, x)` float32 `Scan` (never resampled).

    A 4D file gives its first volume and a warning; 5D+, complex and RGB files are refused.
    """
    img = _load(path)
    hdr = img.header
    shape = tuple(int(s) for s in img.shape)
    dtype = hdr.get_data_dtype()
    metadata: dict = {"path": str(path), "format": "nifti", "modality": "", "window": None,
                      "warnings": []}
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
                warn(metadata, f"{path}: 4D image with {shape[3]} volumes; using the first "
                               "volume only.")
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
    affine = np.asarray(img.affine, dtype=float)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        warn(metadata, f"{path}: the header's affine is unusable; using the voxel sizes only.")
        affine = np.diag([*[float(z) or 1.0 for z in hdr.get_zooms()[:3]], 1.0])
    zooms = [float(z) for z in hdr.get_zooms()[:3]]
    zooms += [1.0] * (3 - len(zooms))
    if any(not np.isfinite(z) or z <= 0 for z in zooms):
        warn(metadata, f"{path}: voxel sizes {zooms} in the header are not positive; using the "
                       "affine's column lengths.")
        zooms = None
    array, spacing, geometry = canonicalise(data, affine, zooms)
    metadata.update(geometry)
    metadata["nifti_version"] = 2 if isinstance(img, nib.Nifti2Image) else 1
    metadata["qform_code"] = int(hdr["qform_code"])
    metadata["sform_code"] = int(hdr["sform_code"])
    metadata["file_zooms"] = tuple(float(z) for z in (zooms or np.sqrt(
        (affine[:3, :3] ** 2).sum(axis=0))))
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
