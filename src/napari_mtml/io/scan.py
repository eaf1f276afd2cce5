"""The `Scan` record, the read error, and the geometry helpers every reader shares.

Geometry convention (the same for NIfTI and DICOM):

- `Scan.affine` is the file's voxel-to-world affine in NIfTI terms: it maps the file's voxel
  index `(i, j, k)` (for DICOM: `i` = column, `j` = row, `k` = slice or frame) to RAS+ millimetres
  (DICOM's LPS positions are converted by negating x and y).
- `Scan.array` of a 3D scan is the file's voxels flipped/permuted to the closest RAS+ orientation
  and transposed to `(z, y, x)`; nothing is resampled. `metadata["ornt"]` records that
  flip/permutation so that `write_image` can put a map back into the file's own voxel order.
- `metadata["array_affine"]` maps the array's `(z, y, x)` index to the same RAS+ world: its
  diagonal part is what a viewer uses as `scale` / `translate`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt2axcodes

__all__ = ["ImageReadError", "ImageReadWarning", "Scan"]


class ImageReadError(ValueError):
    """A file could not be read as a greyscale scan; the message names the file and the problem."""


class ImageReadWarning(UserWarning):
    """Something about a file was unusual but it was read (also kept in `metadata["warnings"]`)."""


@dataclass
class Scan:
    """One greyscale image with its geometry.

    Attributes
    ----------
    array : numpy.ndarray
        float32, 2D `(y, x)` or 3D `(z, y, x)`; 3D arrays read from files are in RAS-canonical
        orientation (see the module docstring).
    spacing : tuple of float
        Voxel size in mm per array axis, same order as `array`.
    affine : numpy.ndarray
        `(4, 4)` float64 voxel-to-world affine of the *file's* voxel order (NIfTI convention,
        RAS+ mm). For a Scan built by hand without one, a diagonal affine from `spacing`
        (x, y, z order) is used.
    metadata : dict
        "path", "format" ("nifti", "dicom", "dicom-series", "raster" or absent), "modality"
        (DICOM modality or "" if unknown), "orientation" (original axis codes, e.g. "LAS", or
        None), "window" ((center, width) in the array's units, or None), "warnings" (list of str),
        and the geometry keys "ornt", "file_shape", "array_affine" used by `write_image`.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        arr = np.asarray(self.array)
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        if arr.ndim not in (2, 3):
            raise ValueError(
                f"Scan.array must be 2D (y, x) or 3D (z, y, x); got shape {arr.shape}. "
                "Take one channel / time point first."
            )
        self.array = arr
        spacing = tuple(float(s) for s in np.atleast_1d(np.asarray(self.spacing, dtype=float)))
        if len(spacing) != arr.ndim:
            raise ValueError(
                f"Scan.spacing has {len(spacing)} values for a {arr.ndim}D array; give one mm "
                "value per array axis."
            )
        if not all(np.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"Scan.spacing must be positive finite mm values; got {spacing}.")
        self.spacing = spacing
        if self.affine is None:
            aff = np.eye(4)
            for i, s in enumerate(spacing[::-1]):
                aff[i, i] = s
            self.affine = aff
        else:
            aff = np.array(self.affine, dtype=np.float64)
            if aff.shape != (4, 4) or not np.isfinite(aff).all():
                raise ValueError(f"Scan.affine must be a finite 4x4 matrix; got shape {aff.shape}.")
            self.affine = aff
        self.metadata = dict(self.metadata or {})
        self.metadata.setdefault("warnings", [])

    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def array_affine(self) -> np.ndarray:
        """`(4, 4)` map from the array index (`(z, y, x)` or `(y, x)`) to world mm (RAS+)."""
        stored = self.metadata.get("array_affine")
        if stored is not None:
            aff = np.asarray(stored, dtype=float)
            if aff.shape == (4, 4):
                return aff
        return array_affine_from(
            self.affine, self.metadata.get("ornt"), self.metadata.get("file_shape"), self.ndim
        )


def display_grid(scan: Scan) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`(translate, scale)` of a scan shown on a diagonal grid, in world mm per array axis:
    `scale` is the spacing, `translate` the RAS position of the first voxel read backwards
    (S, A, R) for a volume, 0 for a 2D image (shown in its own plane: its world tilt has no 2D
    meaning). The napari reader puts layers there, and `mtml predict --regions` gives region
    centres in the same millimetres: `translate + index * scale`."""
    aff = scan.array_affine()
    # Diagonal part only: for RAS-canonical arrays the off-diagonal terms are an oblique tilt
    # that a diagonal grid cannot show without resampling.
    if scan.ndim == 3:
        translate = (aff[2, 3], aff[1, 3], aff[0, 3])
    else:
        translate = (0.0, 0.0)
    return tuple(float(t) for t in translate), tuple(float(s) for s in scan.spacing)


def array_affine_from(affine, ornt, file_shape, ndim: int) -> np.ndarray:
    """Affine of the `(z, y, x)` / `(y, x)` array index, from the file affine and the reorientation.

    For 2D arrays the file voxel is `(i, j) = (x, y)`; the third column (slice) is kept.
    """
    affine = np.asarray(affine, dtype=float)
    if ornt is not None and file_shape is not None:
        ornt = np.asarray(ornt, dtype=float)
        canon = affine @ inv_ornt_aff(ornt, tuple(file_shape)[:3])
    else:
        canon = affine
    # (x, y, z) -> (z, y, x): permute the first three columns.
    perm = np.eye(4)
    if ndim == 3:
        perm[:3, :3] = np.eye(3)[:, ::-1]
        return canon @ perm
    # (y, x) -> (x, y, 0)
    perm = np.zeros((4, 4))
    perm[0, 1] = 1.0
    perm[1, 0] = 1.0
    perm[2, 2] = 1.0
    perm[3, 3] = 1.0
    return canon @ perm


def canonicalise(data_xyz: np.ndarray, affine: np.ndarray, zooms=None):
    """Flip/permute a file-ordered 3D volume to the closest RAS+ orientation, as `(z, y, x)`.

    Parameters
    ----------
    data_xyz : array `(I, J, K)` in the file's voxel order.
    affine : `(4, 4)` voxel-to-world (RAS+) affine of that voxel order.
    zooms : voxel sizes (mm) of `(I, J, K)` from the header; defaults to the affine's column norms.

    Returns
    -------
    array : `(Z, Y, X)` view/copy of the data (not resampled), spacing : `(z, y, x)` mm,
    geometry : dict with "ornt", "file_shape", "array_affine", "orientation".
    """
    affine = np.asarray(affine, dtype=float)
    ornt = io_orientation(affine)
    canon = apply_orientation(data_xyz, ornt)
    if zooms is None:
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    zooms = [float(z) for z in zooms[:3]]
    canon_zooms = [0.0, 0.0, 0.0]
    for src_axis, (dst_axis, _flip) in enumerate(ornt):
        canon_zooms[int(dst_axis)] = zooms[src_axis]
    array = np.ascontiguousarray(canon.transpose(2, 1, 0))
    geometry = {
        "ornt": ornt.tolist(),
        "file_shape": tuple(int(s) for s in data_xyz.shape),
        "orientation": "".join(ornt2axcodes(ornt_of(affine))),
    }
    geometry["array_affine"] = array_affine_from(affine, ornt, data_xyz.shape, 3)
    return array, tuple(canon_zooms[::-1]), geometry


def ornt_of(affine) -> np.ndarray:
    """The file's own axis orientation as a nibabel `ornt` (for its axis codes)."""
    return io_orientation(np.asarray(affine, dtype=float))


def to_file_order(array: np.ndarray, metadata: dict) -> np.ndarray:
    """Inverse of `canonicalise`: a `(z, y, x)` array back to the file's `(i, j, k)` order."""
    from nibabel.orientations import ornt_transform

    if array.ndim == 2:
        return array.T[:, :, None]
    data = array.transpose(2, 1, 0)
    ornt = metadata.get("ornt")
    if ornt is None:
        return data
    ornt = np.asarray(ornt, dtype=float)
    identity = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    return apply_orientation(data, ornt_transform(identity, ornt))


def from_file_order(data: np.ndarray, metadata: dict, ndim: int) -> np.ndarray:
    """Inverse of `to_file_order`: a map stored in a file's `(i, j, k)` voxel order (as
    `write_image(..., like=scan)` wrote it) back onto `scan.array`'s grid (`ndim` = its ndim)."""
    data = np.asarray(data)
    if ndim == 2:
        return data.reshape(data.shape[:2]).T
    ornt = metadata.get("ornt")
    if ornt is not None:
        data = apply_orientation(data, np.asarray(ornt, dtype=float))
    return data.transpose(2, 1, 0)


def read_head(path, n: int) -> bytes | None:
    """The first `n` bytes of a regular file (links resolved), or None when it is not one or
    cannot be read: a named pipe is never opened (reading it would block)."""
    if not Path(path).is_file():
        return None
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return None


def require_regular_file(path) -> None:
    """`ImageReadError` unless `path` is a regular file (links resolved): a named pipe, socket or
    device is never opened (reading a pipe would block forever)."""
    from napari_mtml.files import not_a_regular_file

    problem = not_a_regular_file(path)
    if problem:
        raise ImageReadError(problem)


def warn(metadata: dict, message: str) -> None:
    """Record a reader warning in `metadata["warnings"]` and emit it as `ImageReadWarning`."""
    metadata.setdefault("warnings", []).append(message)
    warnings.warn(message, ImageReadWarning, stacklevel=3)


def check_values(array: np.ndarray, path: Path | str, metadata: dict) -> None:
    """Refuse NaN/inf and empty arrays; warn about a constant image."""
    if array.size == 0:
        raise ImageReadError(f"{path}: the image holds no voxels (shape {array.shape}).")
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        raise ImageReadError(
            f"{path}: {bad} voxel(s) are NaN or infinite; replace them (e.g. with 0) in the file "
            "before using it."
        )
    lo, hi = float(array.min()), float(array.max())
    if lo == hi:
        warn(
            metadata,
            f"{path}: the image is constant (every voxel is {lo:g}); it carries no "
            "anatomy to learn from or to find anomalies in.",
        )
