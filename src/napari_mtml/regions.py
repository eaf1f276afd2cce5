"""Suspicious regions of a heatmap and the threshold that finds them (Qt-free).

The heatmap widget's threshold, region table and CSV export, and `mtml predict --threshold T
--regions`, are these functions::

    from napari_mtml.regions import regions_above, write_regions_csv
    labels, regions = regions_above(heat, 0.5, spacing=(1.0, 1.0, 1.0))  # label 1 = the largest
    write_regions_csv("case1_regions.csv", regions, threshold=0.5, ndim=3)

A threshold can come from a healthy reference scan (`healthy_scores` then
`percentile_threshold`): the score that a chosen percentile of that scan's foreground voxels
stays under.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = [
    "Region",
    "healthy_scores",
    "nearest_voxel",
    "percentile_threshold",
    "region_table",
    "regions_above",
    "write_regions_csv",
]

#: index -> world coordinates (the array's axis order, mm), e.g. a napari layer's data_to_world
ToWorld = Callable[[Sequence[float]], Sequence[float]]


@dataclass(frozen=True)
class Region:
    """One connected region above the threshold: `label` (its value in the label image),
    `voxels`, `size_mm` (mm^2 in 2D, mm^3 in 3D), `peak` and `mean` heatmap score, and
    `centroid` (its centre of mass in array index coordinates, `(y, x)` or `(z, y, x)`)."""

    label: int
    voxels: int
    size_mm: float
    peak: float
    mean: float
    centroid: tuple[float, ...] = ()


def regions_above(
    heat: np.ndarray,
    threshold: float,
    spacing: Sequence[float],
    voxel_size: float | None = None,
) -> tuple[np.ndarray, list[Region]]:
    """Connected regions of `heat >= threshold` (face connectivity), largest first.

    Parameters
    ----------
    heat : ndarray of float, (H, W) or (D, H, W)
        An anomaly map (e.g. `Prediction.anomaly`).
    threshold : float
        Voxels at or above it belong to a region.
    spacing : sequence of float
        mm per axis.
    voxel_size : float, optional
        mm^2 / mm^3 of one voxel when the grid is sheared (default: the product of `spacing`).

    Returns
    -------
    labels : ndarray of int32, the shape of `heat`
        0 = background, 1 = the largest region, 2 = the next, ...
    regions : list of Region
        One per label, in label order.

    Examples
    --------
    >>> heat = np.zeros((8, 8), np.float32)
    >>> heat[1:3, 1:3] = 0.9
    >>> heat[5:8, 4:8] = 0.6
    >>> labels, regions = regions_above(heat, 0.5, spacing=(1.0, 2.0))
    >>> [(r.label, r.voxels, r.size_mm) for r in regions]
    [(1, 12, 24.0), (2, 4, 8.0)]
    """
    labels, n = ndimage.label(heat >= threshold)
    if n == 0:
        return labels.astype(np.int32), []
    flat = labels.ravel()
    voxels = np.bincount(flat, minlength=n + 1)[1:]
    sums = np.bincount(flat, weights=heat.ravel().astype(np.float64), minlength=n + 1)[1:]
    peaks = np.asarray(ndimage.maximum(heat, labels, index=np.arange(1, n + 1)), dtype=float)
    centroids = np.asarray(
        ndimage.center_of_mass(labels > 0, labels, np.arange(1, n + 1)), dtype=float
    ).reshape(n, heat.ndim)
    order = np.argsort(-voxels, kind="stable")
    # Renumber so that label 1 is the largest region (the table's first row).
    remap = np.zeros(n + 1, dtype=np.int32)
    remap[order + 1] = np.arange(1, n + 1, dtype=np.int32)
    voxel_mm = float(np.prod(spacing)) if voxel_size is None else float(voxel_size)
    regions = [
        Region(
            int(remap[i + 1]),
            int(voxels[i]),
            float(voxels[i] * voxel_mm),
            float(peaks[i]),
            float(sums[i] / voxels[i]),
            tuple(float(c) for c in centroids[i]),
        )
        for i in order
    ]
    return remap[labels], regions


def region_table(
    regions: Sequence[Region], ndim: int, to_world: ToWorld | None = None
) -> dict[str, list]:
    """The regions as columns: `index` (the label), `voxels`, `size_mm` (mm^2 in 2D, mm^3 in
    3D), `peak`, `mean` and `centre_z`/`centre_y`/`centre_x`: each region's centre of mass in
    world mm through `to_world(index_coordinates)` (default: the index coordinates).

    Parameters
    ----------
    regions : sequence of Region
    ndim : int
        2 or 3.
    to_world : callable, optional
        Index coordinates (N, ndim) -> world mm.

    Returns
    -------
    dict of str to list
        Column name -> one value per region.
    """
    axes = ("z", "y", "x")[-ndim:] if ndim else ()
    table: dict[str, list] = {"index": [], "voxels": [], "size_mm": [], "peak": [], "mean": []}
    for a in axes:
        table[f"centre_{a}"] = []
    for r in regions:
        table["index"].append(r.label)
        table["voxels"].append(r.voxels)
        table["size_mm"].append(r.size_mm)
        table["peak"].append(r.peak)
        table["mean"].append(r.mean)
        world = to_world(r.centroid) if to_world is not None else r.centroid
        for a, w in zip(axes, list(world)[-ndim:], strict=True):
            table[f"centre_{a}"].append(float(w))
    return table


def write_regions_csv(
    path: str | Path,
    regions: Sequence[Region],
    threshold: float,
    ndim: int,
    to_world: ToWorld | None = None,
) -> Path:
    """Write the region table as CSV: a `threshold` line, then `label, voxels, size_mm2|mm3,
    peak, mean, centre_*_mm`, one row per region (numbers to 6 significant digits). Written
    atomically (`napari_mtml.files.write_atomic`); returns the path.

    Parameters
    ----------
    path : str or Path
    regions : sequence of Region
    threshold : float
    ndim : int
    to_world : callable, optional
        As `region_table`.

    Returns
    -------
    Path
    """
    from napari_mtml.files import check_output_file, write_atomic

    path = check_output_file(path, "region table")
    table = region_table(regions, ndim, to_world)
    unit = "mm2" if ndim == 2 else "mm3"
    header = [
        "label"
        if k == "index"
        else f"size_{unit}"
        if k == "size_mm"
        else f"{k}_mm"
        if k.startswith("centre_")
        else k
        for k in table
    ]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["threshold", f"{threshold:.6g}"])
    writer.writerow(header)
    for row in zip(*table.values(), strict=True):
        writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
    return write_atomic(path, buf.getvalue())


def nearest_voxel(labels: np.ndarray, region: Region) -> np.ndarray | None:
    """The voxel of `region` (in `labels`) nearest its centre of mass: always inside the
    region, even a curved one (where to centre a view on it). None if it has no voxel.

    Parameters
    ----------
    labels : ndarray of int
        The label image `regions_above` returned.
    region : Region

    Returns
    -------
    ndarray of int or None
        Index coordinates of the voxel.
    """
    voxels = np.argwhere(np.asarray(labels) == region.label)
    if len(voxels) == 0:
        return None
    return voxels[np.argmin(((voxels - np.asarray(region.centroid)) ** 2).sum(axis=1))]


def healthy_scores(ensemble, scan, tta: bool = False, contralateral="auto") -> np.ndarray:
    """The ensemble's scores on a healthy reference scan: its map inside the scan's foreground
    (`preprocess.foreground_mask`), or the whole map when the foreground is empty.

    Parameters
    ----------
    ensemble : napari_mtml.inference.Ensemble
    scan : napari_mtml.io.Scan
        A healthy reference scan.
    tta : bool
        Predict it mirrored as well (`Ensemble.predict(tta=True)`), as the maps the
        threshold will be applied to.
    contralateral : "auto", True or False
        `Ensemble.predict(contralateral=...)`, as the maps the threshold will be applied to.

    Returns
    -------
    ndarray of float32, 1D
        The map's values inside the foreground.
    """
    from napari_mtml.preprocess import foreground_mask

    heat = ensemble.predict(scan, tta=tta, contralateral=contralateral).anomaly
    fg = np.asarray(foreground_mask(scan), dtype=bool)
    return heat[fg] if fg.any() else heat.ravel()


def percentile_threshold(scores: np.ndarray, percentile: float) -> float:
    """The threshold that `percentile` % of healthy `scores` stay under (`np.percentile`).

    Parameters
    ----------
    scores : ndarray
        `healthy_scores`.
    percentile : float
        In [0, 100].

    Returns
    -------
    float

    Examples
    --------
    >>> percentile_threshold(np.linspace(0.0, 1.0, 101), 99.0)
    0.99
    """
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile {percentile} is outside 0..100")
    return float(np.percentile(scores, percentile))
