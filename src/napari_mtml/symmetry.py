"""Left-right comparison of a map: what is anomalous on one side of a brain only.

A brain is nearly mirror-symmetric about its mid-sagittal plane, and so are many of the places
where an anomaly map lights up on healthy heads (the skull base, the eyes, the skull's edge,
the ventricles' rims); a tumour, a stroke, a cavity is usually on one side. `contralateral`
takes from each voxel of the map the highest value of the map near its mirror image across the
fitted mid-sagittal plane, so that what both sides share drops out and what one side has
alone stays:

```python
from napari_mtml.symmetry import fit_midplane, contralateral
plane = fit_midplane(scan.array, scan.spacing, mask=head)     # MidPlane(normal, point, correlation)
kept = contralateral(heat, scan.spacing, plane)               # heat - max near the mirror, >= 0
```

`Ensemble.predict(contralateral="auto")` (`mtml predict --contralateral`) does this for 3D MRI
volumes. A lesion with a mirror image on the other side (symmetric, bilateral disease) is
suppressed with it: turn it off there (`--contralateral off`).

The plane: the image, divided by its local mean over 20 mm (so that a bias field does not pull
the plane), and its mirror image are compared (Pearson correlation over `mask`, on a grid of
about `step_mm` mm), starting from a mirror along the left-right axis (the last axis of the
package's RAS-canonical `(z, y, x)` volumes) through the mask's centroid; the best of a coarse
look over tilts and offsets is refined by a local simplex search (tilts within 20 degrees, the
offset within 30 mm). The map's mirror is taken at `radius_mm` tolerance (a maximum filter of
that half-width) so that a plane a few mm off, or a brain a little asymmetric, still cancels
what both sides share.

`workers` (every function): threads that split the work (scipy's filters and interpolation
release the GIL): slabs of the first axis for the maps, the two blurs of the plane's
resampling side by side; the same values (up to float rounding in the mirror's coordinates).
`Ensemble.predict` passes torch's thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, optimize

from napari_mtml.anomalies.boxes import bounding_box
from napari_mtml.parallel import map_threads

__all__ = ["MidPlane", "fit_midplane", "mirror_values", "contralateral", "MIN_CORRELATION"]

#: a fit below this correlation finds no mirror symmetry worth using (`Ensemble.predict` then
#: leaves the map as it is and says so)
MIN_CORRELATION = 0.3
#: largest tilt of the plane from the left-right axis (radians, 20 degrees) and offset (mm)
_MAX_TILT = math.radians(20.0)
_MAX_OFFSET_MM = 30.0
#: mm of the local mean the image is divided by before the comparison (bias fields)
FLATTEN_MM = 20.0
#: below this share of the voxels, `mirror_values(where=...)` maps the voxels one by one
_SPARSE = 0.02
#: the fewest first-axis rows a worker's slab gets (below it fewer workers are used)
_MIN_SLAB = 4


def _workers(workers) -> int:
    n = int(workers)
    if n < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    return n


def _slabs(n_rows: int, workers: int) -> list[tuple[int, int]]:
    """`(start, stop)` ranges of the first axis, one per worker, at least `_MIN_SLAB` rows."""
    k = max(1, min(int(workers), n_rows // _MIN_SLAB))
    edges = np.linspace(0, n_rows, k + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


@dataclass(frozen=True)
class MidPlane:
    """A mirror plane in the array's mm coordinates (index x spacing, axis order of the array).

    `normal` is a unit vector, `point` a point of the plane, `correlation` the Pearson
    correlation of the image with its mirror image over the mask (1 for a perfect mirror).
    """

    normal: tuple[float, ...]
    point: tuple[float, ...]
    correlation: float

    def reflect(self, points_mm: np.ndarray) -> np.ndarray:
        """The mirror images of points `(..., ndim)` in mm."""
        n = np.asarray(self.normal, dtype=np.float64)
        d = (points_mm - np.asarray(self.point, dtype=np.float64)) @ n
        return points_mm - 2.0 * d[..., None] * n


def _normal(tilts: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    n = np.zeros(ndim)
    n[axis] = 1.0
    others = [i for i in range(ndim) if i != axis]
    for t, i in zip(tilts, others, strict=True):
        n[i] = math.tan(float(t))
    return n / np.linalg.norm(n)


def _check(image: np.ndarray, spacing, what: str) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"{what}: expected a 2D or 3D array, got shape {image.shape}")
    sp = np.asarray(spacing if spacing is not None else (1.0,) * image.ndim, dtype=np.float64)
    sp = sp[-image.ndim :]
    if sp.shape != (image.ndim,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"{what}: spacing {spacing!r} must give one positive mm value per axis")
    return image, sp


def fit_midplane(
    image: np.ndarray,
    spacing=None,
    mask: np.ndarray | None = None,
    *,
    axis: int = -1,
    step_mm: float = 4.0,
    workers: int = 1,
) -> MidPlane:
    """The plane that mirrors `image` best onto itself (its mid-sagittal plane for a head).

    Parameters
    ----------
    image : 2D or 3D array (a 3D volume `(z, y, x)` in RAS-canonical order: x left-right)
    spacing : mm per axis (default 1)
    mask : bool array of the image's shape: the voxels compared (default: the image's voxels
        above its 2nd percentile, i.e. everything but an empty background)
    axis : the left-right axis (the plane's normal starts along it)
    step_mm : the grid the comparison runs on (the image is resampled to it)
    workers : threads (the resampling's two blurs side by side)

    Raises
    ------
    ValueError : wrong dimensionality or spacing, a mask of another shape, an empty mask, a
        non-finite image.
    """
    image, sp = _check(image, spacing, "fit_midplane")
    ndim = image.ndim
    axis = axis % ndim
    img = np.asarray(image, dtype=np.float32)
    if mask is None:
        finite = img[np.isfinite(img)]
        if finite.size == 0:
            raise ValueError("fit_midplane: the image has no finite value")
        mask = img > np.percentile(finite, 2.0)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != img.shape:
        raise ValueError(f"fit_midplane: mask of shape {mask.shape} for an image {img.shape}")
    if not mask.any():
        raise ValueError("fit_midplane: the mask is empty")
    if not np.all(np.isfinite(img[mask])):
        raise ValueError("fit_midplane: the image has NaN or infinite values inside the mask")
    # the search: a coarse look over tilts and offsets on a grid twice as coarse (a head may be
    # turned by 10-15 degrees, and the mask's centroid is not on the plane of an asymmetric
    # mask), then a local simplex search on the `step_mm` grid from the best (steps of 3
    # degrees and 2 mm: the comparison has narrow peaks on fine texture, which a line search
    # over the whole range jumps across)
    grid = _resampled(img, mask, sp, float(step_mm), _workers(workers))
    fine, centre = _comparison(*grid, axis)
    coarse, _ = _comparison(*_resampled(*grid, 2.0 * float(step_mm)), axis, centre)
    tilts = np.radians([-16.0, -8.0, 0.0, 8.0, 16.0])
    grids = np.meshgrid(*([tilts] * (ndim - 1)), [-8.0, 0.0, 8.0], indexing="ij")
    starts = np.stack([g.ravel() for g in grids], axis=1)
    start = starts[int(np.argmax([coarse(t) for t in starts]))]
    limits = np.array([_MAX_TILT] * (ndim - 1) + [_MAX_OFFSET_MM])
    seen: dict[str, object] = {"best": -np.inf, "theta": None}

    def cost(theta: np.ndarray) -> float:
        if np.any(np.abs(theta) > limits):
            return 1.0  # outside the tilts and offsets a head takes
        c = fine(theta)
        if c > seen["best"]:  # the search may wander off; the best point seen is the answer
            seen["best"], seen["theta"] = c, np.array(theta, dtype=np.float64)
        return -c

    cost(start)
    simplex = np.vstack([start, start + np.diag([math.radians(3.0)] * (ndim - 1) + [2.0])])
    optimize.minimize(
        cost,
        start,
        method="Nelder-Mead",
        options={"initial_simplex": simplex, "xatol": 2e-3, "fatol": 5e-4, "maxfev": 300},
    )
    res = optimize.OptimizeResult(x=seen["theta"], fun=-float(seen["best"]))
    theta = np.asarray(res.x, dtype=np.float64)
    n = _normal(theta[:-1], ndim, axis)
    return MidPlane(tuple(n.tolist()), tuple((centre + theta[-1] * n).tolist()), -float(res.fun))


def _resampled(img, mask, sp, step_mm, workers: int = 1):
    """The image on a grid of about `step_mm` (never finer than it), its values averaged from
    the mask's voxels only; with the grid's mask and its mm per voxel."""
    zoom = np.minimum(1.0, sp / step_mm)
    # smoothed inside the mask before it is sampled (no aliasing of fine texture into a false
    # asymmetry, and no ramp at the mask's edge)
    inside = np.where(mask, img, 0.0).astype(np.float32)
    blur = 0.5 * np.maximum(1.0 / zoom - 1.0, 0.0)
    if np.any(blur > 0):
        # both are 0 beyond the mask, so the blurs run on its box grown by the kernel's reach
        # (scipy's: 4 sigma): beyond it they are exactly 0, and where the box stays inside the
        # array its edge reflects zeros as the array's would; the same values
        reach = [int(4.0 * float(b) + 0.5) for b in blur]
        box = tuple(
            slice(max(0, s.start - r), min(n, s.stop + r))
            for s, r, n in zip(bounding_box(mask), reach, mask.shape, strict=True)
        )
        w, blurred = (np.zeros(mask.shape, dtype=np.float32) for _ in range(2))
        pieces = map_threads(
            lambda a: ndimage.gaussian_filter(a[box], blur),
            [mask.astype(np.float32), inside],
            workers,
        )
        w[box], blurred[box] = pieces
        inside = np.where(mask, blurred / np.maximum(w, 1e-3), 0.0)
    # values at the grid's voxels from the mask's voxels only (the mask's share divided out)
    share = ndimage.zoom(mask.astype(np.float32), zoom, order=1)
    small_mask = share > 0.5
    small = ndimage.zoom(inside.astype(np.float32), zoom, order=1) / np.maximum(share, 1e-3)
    small = np.where(small_mask, small, 0.0).astype(np.float32)
    if small_mask.sum() < 8:  # a tiny mask: compare at full resolution
        return np.where(mask, img, 0.0).astype(np.float32), mask, sp
    # mm between the grid's voxels (`ndimage.zoom` keeps the first and the last voxel's centres)
    n_in, n_out = np.asarray(img.shape), np.asarray(small.shape)
    step = np.where(n_out > 1, sp * (n_in - 1) / np.maximum(n_out - 1, 1), sp * n_in)
    return small, small_mask, step


def _comparison(small, small_mask, step, axis, centre=None):
    """The correlation of a resampled image (`_resampled`) with its mirror image as a function
    of the plane's `(tilts..., offset)`; and the point offsets are measured from (the mask's
    centroid, or `centre`)."""
    ndim = small.ndim
    # divide out slow intensity changes (a bias field brightens one side of a head) by the
    # image's local mean over FLATTEN_MM, taken inside the mask only
    sigma = FLATTEN_MM / step
    weight = ndimage.gaussian_filter(small_mask.astype(np.float32), sigma)
    local = ndimage.gaussian_filter(np.where(small_mask, small, 0.0).astype(np.float32), sigma)
    local = local / np.maximum(weight, 1e-3)
    small = np.where(small_mask & (local > 0), small / np.where(local > 0, local, 1.0), 0.0)
    small = small.astype(np.float32)
    pts = np.argwhere(small_mask).astype(np.float64) * step
    vals = small[small_mask].astype(np.float64)
    vals = (vals - vals.mean()) / (vals.std() + 1e-12)
    centre = pts.mean(axis=0) if centre is None else np.asarray(centre, dtype=np.float64)
    coords_scale = 1.0 / step

    def correlation(theta: np.ndarray) -> float:
        n = _normal(theta[:-1], ndim, axis)
        p = centre + theta[-1] * n
        q = pts - 2.0 * ((pts - p) @ n)[:, None] * n
        r = ndimage.map_coordinates(small, (q * coords_scale).T, order=1, mode="constant")
        sd = r.std()
        if sd == 0:
            return 0.0
        return float(np.mean(vals * (r - r.mean())) / sd)

    return correlation, centre


def mirror_values(
    volume: np.ndarray,
    spacing,
    plane: MidPlane,
    where: np.ndarray | None = None,
    *,
    mode: str = "nearest",
    workers: int = 1,
) -> np.ndarray:
    """`volume` at the mirror image of each voxel (linear interpolation).

    With `where` (bool, the volume's shape) only those voxels are computed; the others are 0.
    `mode` is how the volume goes on beyond its edges (scipy.ndimage's modes): "nearest" (the
    default) repeats the edge, so that a mirror image that leaves the volume through its first
    or last slice (a tilted plane) takes that slice's value, as the anatomy beyond the
    acquired slab is unknown, not empty; "constant" is 0 outside. `workers` threads each map a
    slab of the first axis.
    """
    volume, sp = _check(volume, spacing, "mirror_values")
    workers = _workers(workers)
    vol = np.asarray(volume, dtype=np.float32)
    if where is not None:
        where = np.asarray(where, dtype=bool)
        if where.shape != vol.shape:
            raise ValueError(f"mirror_values: where {where.shape} is not the volume's {vol.shape}")
    zero = (0,) * vol.ndim
    return _mirror(vol, zero, sp, plane, zero, vol.shape, where, mode, workers)


def _mirror(src, src_origin, sp, plane, out_origin, out_shape, where, mode, workers):
    """The mirror images of the voxels of a box of the volume's grid (`out_shape` voxels from
    index `out_origin`), read from `src`, the part of the volume from index `src_origin` (what
    lies beyond `src` is what `mode` makes of its edges: the volume's own edges when `src`
    reaches them); `where` (bool, `out_shape`, or None: all) the voxels computed, 0 elsewhere."""
    src_origin = np.asarray(src_origin, dtype=np.float64)
    out_origin = np.asarray(out_origin, dtype=np.float64)
    if where is not None and np.count_nonzero(where) < _SPARSE * where.size:
        # a few voxels: their mirror images one by one
        idx = np.argwhere(where).astype(np.float64) + out_origin
        q = plane.reflect(idx * sp) / sp - src_origin
        out = np.zeros(out_shape, dtype=np.float32)
        out[where] = ndimage.map_coordinates(src, q.T, order=1, mode=mode, cval=0.0)
        return out
    # the mirror is an affine map of voxel indices, i -> S^-1 (I - 2 n n^T) S i + 2 (p.n) S^-1 n
    # (S the spacing): one pass over the grid, no coordinate arrays (4-5x faster than the points);
    # in the boxes' own indices its offset moves by M out_origin - src_origin
    n = np.asarray(plane.normal, dtype=np.float64)
    p = np.asarray(plane.point, dtype=np.float64)
    matrix = (np.eye(src.ndim) - 2.0 * np.outer(n, n)) * sp[None, :] / sp[:, None]
    offset = 2.0 * float(p @ n) * n / sp + matrix @ out_origin - src_origin
    out = np.empty(out_shape, dtype=np.float32)

    def slab(rows: tuple[int, int]) -> None:
        # output rows start..stop: the same map with its offset moved by `start` rows
        start, stop = rows
        out[start:stop] = ndimage.affine_transform(
            src,
            matrix,
            offset=offset + matrix[:, 0] * start,
            output_shape=(stop - start, *out_shape[1:]),
            order=1,
            mode=mode,
            cval=0.0,
        )

    map_threads(slab, _slabs(out_shape[0], workers), workers)
    if where is not None:
        out[~where] = 0.0
    return out


def contralateral(
    heat: np.ndarray,
    spacing,
    plane: MidPlane,
    *,
    radius_mm: float = 3.0,
    workers: int = 1,
) -> np.ndarray:
    """`heat` minus the highest value of `heat` within `radius_mm` of each voxel's mirror
    image, clipped at 0: what one side has and the other has not.

    Parameters
    ----------
    heat : 2D or 3D map in [0, 1]
    spacing : mm per axis
    plane : the mirror (`fit_midplane`)
    radius_mm : the tolerance of the mirror (a maximum filter of half-width `radius_mm`, at
        least one voxel across on each axis)
    workers : threads, each on a slab of the first axis

    Returns
    -------
    float32 array of `heat`'s shape, in [0, heat]; 0 where `heat` is 0.
    """
    heat, sp = _check(heat, spacing, "contralateral")
    h = np.asarray(heat, dtype=np.float32)
    size = tuple(int(s) for s in (2 * np.round(float(radius_mm) / sp).astype(int) + 1))
    # the filter before the mirror: the mirror of a box's maximum is the maximum over the
    # mirrored box, and only the voxels where the map is non-zero need their mirror. Both run
    # on boxes: the map's non-zero voxels' box (`inner`; 0 outside it, in the map and in the
    # result) and, for the filtered map, that box grown by the filter's reach and one voxel
    # more (`outer`; the filtered map is 0 beyond the reach, so the zero layer at the outer
    # box's edge stands for the rest of the volume, in "nearest" as in "constant" mode; where
    # the box meets the volume's edge, that edge is the volume's own): the same values as
    # over the whole volume, for a head that fills a fraction of it
    workers = _workers(workers)
    where = h > 0
    out = np.zeros(h.shape, dtype=np.float32)
    tight = bounding_box(where)
    if tight is None:
        return out
    reach = [s_ // 2 for s_ in size]
    inner = [(s.start, s.stop) for s in tight]
    outer = [
        (max(0, a - r - 1), min(n_, b + r + 1))
        for (a, b), r, n_ in zip(inner, reach, h.shape, strict=True)
    ]
    src_box = tuple(slice(a, b) for a, b in outer)
    part = np.maximum(h[src_box], 0.0)  # a map is >= 0 (a negative value counts as 0)
    near = np.empty_like(part)

    def slab(rows: tuple[int, int]) -> None:
        # the filter of rows start..stop needs `reach` rows more on each side (0 beyond the
        # box, as beyond the volume): the same maxima
        start, stop = rows
        lo, hi = max(0, start - reach[0]), min(part.shape[0], stop + reach[0])
        piece = ndimage.maximum_filter(part[lo:hi], size=size, mode="constant", cval=0.0)
        near[start:stop] = piece[start - lo : stop - lo]

    map_threads(slab, _slabs(part.shape[0], workers), workers)
    box = tuple(slice(a, b) for a, b in inner)
    other = _mirror(
        near,
        [a for a, _ in outer],
        sp,
        plane,
        [a for a, _ in inner],
        tuple(b - a for a, b in inner),
        where[box],
        "nearest",
        workers,
    )
    kept = h[box] - other
    np.maximum(kept, 0.0, out=kept)
    out[box] = kept
    return out
