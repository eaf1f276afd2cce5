"""napari writer contributions: image and labels layers to NIfTI (.nii, .nii.gz) with geometry.

File > Save Selected Layer(s) with one layer and a `.nii.gz` / `.nii` name writes that layer; with
several layers (e.g. the heatmap, the disagreement map and the suspicious regions) and a name
without extension, a folder of one `NAME.nii.gz` per layer.

Geometry: a layer still where our reader put it (and every output of our widgets on such a
layer) is written in the source file's own geometry, voxel order included; any other layer is
written with its whole transform (scale, translate, rotate, shear, affine), read the way napari
draws it. Reading the file back with our reader gives the same voxels at the same world positions.
Image layers are written as float32, labels as the smallest integer type that holds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_mtml.files import safe_name

from ._common import scan_from_geometry

__all__ = ["layer_matrix", "write_image_layer", "write_labels_layer", "write_layers"]

SUFFIXES = (".nii.gz", ".nii")


def layer_matrix(meta: dict[str, Any], ndim: int) -> np.ndarray:
    """The `(ndim + 1)`-square data -> world matrix of a layer from its state (`meta`):
    napari's `data2physical` (scale, shear, rotate, translate) followed by its `affine`."""
    from napari.utils.transforms import Affine, CompositeAffine

    inner = CompositeAffine(
        scale=meta.get("scale", (1.0,) * ndim),
        translate=meta.get("translate", (0.0,) * ndim),
        rotate=meta.get("rotate"),
        shear=meta.get("shear"),
        ndim=ndim,
    )
    outer = meta.get("affine")
    if outer is None:
        outer_matrix = np.eye(ndim + 1)
    elif isinstance(outer, Affine):
        outer_matrix = np.asarray(outer.affine_matrix, dtype=float)
    else:
        outer_matrix = np.asarray(outer, dtype=float)
    return outer_matrix @ np.asarray(inner.affine_matrix, dtype=float)


def _checked(path: str, data, meta: dict, what: str) -> tuple[Path, np.ndarray]:
    path = Path(path)
    if not path.name.lower().endswith(SUFFIXES):
        raise ValueError(f"{path}: name the file .nii.gz or .nii to save a {what} as NIfTI.")
    if meta.get("multiscale"):
        raise ValueError(
            f"{path}: '{meta.get('name', what)}' is multiscale; NIfTI holds one "
            "resolution. Save a single-resolution copy."
        )
    if meta.get("rgb"):
        raise ValueError(
            f"{path}: '{meta.get('name', what)}' is RGB; NIfTI maps here are greyscale."
        )
    array = np.asarray(data)
    if array.ndim not in (2, 3):
        raise ValueError(
            f"{path}: '{meta.get('name', what)}' has {array.ndim} dimensions "
            f"{array.shape}; only 2D and 3D layers are written as NIfTI."
        )
    if not path.parent.exists():
        raise ValueError(f"{path}: the folder {path.parent} does not exist; create it first.")
    return path, array


def _write(path: Path, array: np.ndarray, meta: dict, dtype) -> list[str]:
    from napari_mtml.io import write_image

    scan = scan_from_geometry(
        array,
        layer_matrix(meta, array.ndim),
        meta.get("metadata"),
        f"layer '{meta.get('name', path.name)}'",
    )
    write_image(path, array, like=scan, dtype=dtype)
    return [str(path)]


def write_image_layer(path: str, data, meta: dict) -> list[str]:
    """Write one Image layer (float32 NIfTI); returns the written path."""
    path, array = _checked(path, data, meta, "image layer")
    if not np.isfinite(np.asarray(array, dtype=np.float32)).all():
        raise ValueError(f"{path}: the layer holds NaN or infinite values.")
    return _write(path, array, meta, np.float32)


def _label_dtype(array: np.ndarray):
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    raise ValueError(f"label values {lo}..{hi} do not fit a 32-bit NIfTI label image.")


def write_labels_layer(path: str, data, meta: dict) -> list[str]:
    """Write one Labels layer (integer NIfTI, values kept exactly); returns the written path."""
    path, array = _checked(path, data, meta, "labels layer")
    return _write(path, array, meta, _label_dtype(array))


def write_layers(path: str, layer_data: list[tuple]) -> list[str]:
    """Several image/labels layers into the folder `path`, one `NAME.nii.gz` each."""
    folder = Path(path)
    if folder.name.lower().endswith(SUFFIXES):
        raise ValueError(
            f"{folder}: several layers are saved as a folder of NIfTI files; give a "
            "name without .nii/.nii.gz."
        )
    folder.mkdir(parents=True, exist_ok=True)
    written, used = [], set()
    for data, meta, layer_type in layer_data:
        stem = safe_name(str(meta.get("name", layer_type)))
        while stem in used:
            stem += "_"
        used.add(stem)
        target = str(folder / f"{stem}.nii.gz")
        if layer_type == "labels":
            written += write_labels_layer(target, data, meta)
        else:
            written += write_image_layer(target, data, meta)
    return written
