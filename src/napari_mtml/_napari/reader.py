"""napari reader contribution: NIfTI, DICOM files and DICOM folders via `napari_mtml.io`.

A DICOM folder holding several series (a hospital export: localiser, T1, T2, DWI ...) gives one
layer per series, named by its SeriesDescription.

Layers sit in world millimetres with a diagonal `scale` (the spacing) and `translate` (the RAS
position of the first voxel): the array is already RAS-canonical, and an oblique acquisition's
residual tilt is not given to napari (a rotated volume cannot be sliced in 2D without
resampling). The file's own affine and the `Scan` itself are kept in `layer.metadata`
("affine", "scan", and "world_affine" = where the layer was put) so that maps can be written
back in the file's geometry. Layers of other readers keep their full transform: the widgets and
the writers read it with `_common.layer_affine`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from napari_mtml.io import (
    DICOM_SUFFIXES,
    NIFTI_SUFFIXES,
    ImageReadError,
    ImageReadWarning,
    Scan,
    image_kind,
    read_image,
)
from napari_mtml.io.scan import display_grid

__all__ = ["get_reader", "layer_data_from_scan", "read_layers"]

_READABLE = {"nifti", "dicom", "dicom-series"}


def _accepts(path) -> bool:
    if not str(path) or isinstance(path, bytes):
        return False
    p = Path(path)
    if not p.exists():
        return False
    if p.is_dir():
        # A DICOM folder: look at a few files only, so that the check stays instant.
        from napari_mtml.io.dicom import looks_like_dicom

        for i, (root, _dirs, files) in enumerate(os.walk(p)):
            for name in files[:20]:
                if looks_like_dicom(Path(root) / name):
                    return True
            if i > 20:
                break
        return False
    return image_kind(p) in _READABLE


def get_reader(path) -> Callable | None:
    """Return a reader function for a NIfTI/DICOM file or DICOM folder (or a list of them).

    Returns None for anything else; never raises.
    """
    try:
        paths = [path] if isinstance(path, str | os.PathLike) else list(path)
        if not paths or not all(_accepts(p) for p in paths):
            return None
    except Exception:
        return None
    return read_layers


def layer_data_from_scan(scan: Scan, name: str, layer_type: str = "image", **kwargs) -> tuple:
    """A napari LayerData tuple for a Scan: `scale` = spacing (mm), gray colormap, metadata.

    `layer_type` "labels" gives an integer Labels layer of the (rounded) array.
    """
    translate, scale = display_grid(scan)
    meta = dict(scan.metadata)
    meta["affine"] = np.asarray(scan.affine)
    meta["spacing"] = tuple(scan.spacing)
    meta["scan"] = scan
    # Where the layer is put: `scan_from_layer` trusts the file geometry only while the layer
    # is still there (a user may rotate or move it afterwards).
    world = np.eye(scan.ndim + 1)
    world[:-1, :-1] = np.diag(scale)
    world[:-1, -1] = translate
    meta["world_affine"] = world
    layer_kwargs = {"name": name, "scale": scale, "translate": translate, "metadata": meta}
    if layer_type == "labels":
        data = np.rint(scan.array).astype(np.int32)
    else:
        data = scan.array
        layer_kwargs["colormap"] = "gray"
        lo, hi = float(data.min()), float(data.max())
        if hi > lo:
            layer_kwargs["contrast_limits"] = (lo, hi)
    layer_kwargs.update(kwargs)
    return (data, layer_kwargs, layer_type)


def _layer_name(path: Path) -> str:
    """The file's name without its NIfTI or DICOM suffix (raster files keep theirs)."""
    name = path.name
    for suffix in sorted(NIFTI_SUFFIXES + DICOM_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _series_layers(folder: Path) -> list[tuple]:
    """One layer per DICOM series of a folder, named by SeriesDescription.

    A folder of one series gives one layer named after the folder. A series that cannot be read
    (e.g. compressed without a decoder) is left out with an `ImageReadWarning`, so that one odd
    series does not hide the others; if none can be read, the first error is raised.
    """
    from napari_mtml.io.dicom import read_each_series

    results = list(read_each_series(folder))
    if len(results) == 1:
        info, scan = results[0]
        if isinstance(scan, Exception):
            raise scan
        return [layer_data_from_scan(scan, _layer_name(folder))]
    layers, errors, used = [], [], set()
    for info, scan in results:
        if isinstance(scan, Exception):
            errors.append((info, scan))
            continue
        name = info.name
        if name in used:
            name = f"{name} ({info.number if info.number is not None else info.uid[-8:]})"
        used.add(name)
        layers.append(layer_data_from_scan(scan, name))
    if not layers:
        raise errors[0][1]
    for info, exc in errors:
        warnings.warn(
            f"series '{info.name}' ({info.uid}) was not opened: {exc}",
            ImageReadWarning,
            stacklevel=2,
        )
    return layers


def read_layers(path) -> list[tuple]:
    """Read one path (or a list of paths) into napari LayerData tuples.

    A DICOM folder gives one layer per series (see `_series_layers`). Raises `ImageReadError`
    with the file's name and the problem when a file cannot be read (napari shows it as a
    notification).
    """
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    layers = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            layers.extend(_series_layers(p))
            continue
        scan = read_image(p)
        layers.append(layer_data_from_scan(scan, _layer_name(p)))
    if not layers:
        raise ImageReadError("no file given to read.")
    return layers
