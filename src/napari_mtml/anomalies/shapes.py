"""Random anomaly shapes: ellipse/ellipsoid or rectangle/cuboid, sheared and rotated (METHOD.md §1).

A `Shape` is rasterised on the integer grid of its own tight bounding box, so every later step
(placement, the tasks, the label) can work on that box instead of the whole image. It also knows
the exact distance from a point inside it to its edge along any ray, which the radial deformations
(sink, source) need.

Coordinates: a point of the shape's box is given in array-index units of the box (axis order of the
image, voxels); the shape's own frame is centred on the shape with its axes along the shape's
(un-sheared, un-rotated) sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from napari_mtml.anomalies.boxes import bounding_box

KINDS = ("ellipse", "rectangle")

#: the Gamma law of the per-axis size (METHOD.md §1): d = (0.03 + Gamma(2, 0.1)) * D
SIZE_OFFSET = 0.03
SIZE_GAMMA_SHAPE = 2.0
SIZE_GAMMA_SCALE = 0.1
SHEAR_STD = 0.2


@dataclass(frozen=True, eq=False)
class Shape:
    """One rasterised anomaly shape.

    Attributes
    ----------
    kind : "ellipse" or "rectangle" (ellipsoid / cuboid in 3D).
    half_sizes : (n,) float64, half side lengths (radii) in the shape's own frame, voxels.
    matrix : (n, n) float64, linear map from the shape's own frame to image axes (shear, rotation).
    mask : bool array, n-D, the shape on its tight bounding box (at least one voxel is set).
    centre : (n,) float64, the shape's centre in box coordinates (array indices of `mask`).
    inverse : (n, n) float64, ``np.linalg.inv(matrix)`` (computed from `matrix` when not given).
    """

    kind: str
    half_sizes: np.ndarray
    matrix: np.ndarray
    mask: np.ndarray
    centre: np.ndarray
    inverse: np.ndarray | None = None

    def __post_init__(self):
        if self.inverse is None:
            object.__setattr__(self, "inverse", np.linalg.inv(self.matrix))

    @property
    def ndim(self) -> int:
        return self.mask.ndim

    def to_own_frame(self, points: np.ndarray) -> np.ndarray:
        """Box coordinates `(..., n)` -> the shape's own frame `(..., n)` (float64)."""
        inv = self.inverse
        return (np.asarray(points, dtype=np.float64) - self.centre) @ inv.T

    def edge_distance(self, origin: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """Exact distance from `origin` to the shape's edge along each ray.

        Parameters
        ----------
        origin : (n,) box coordinates of a point inside the shape.
        directions : (m, n) unit vectors in image axes (voxel units).

        Returns
        -------
        (m,) float64, distance in voxels along each direction (the analytic shape, not the raster).
        """
        inv = self.inverse
        o = inv @ (np.asarray(origin, dtype=np.float64) - self.centre)
        u = np.asarray(directions, dtype=np.float64) @ inv.T
        return ray_to_edge(self.kind, self.half_sizes, o, u)


def ray_to_edge(kind: str, half_sizes: np.ndarray, origin: np.ndarray, directions: np.ndarray):
    """Distance `t >= 0` with `origin + t * directions` on the edge of an axis-aligned shape.

    Everything is in the shape's own frame, centred on the shape. The ellipse uses the positive
    root of the quadratic `sum(((o + t u) / r)^2) = 1`; the rectangle the slab test
    `|o_i + t u_i| <= h_i`. `directions` need not be unit vectors: `t` is in units of their length.

    Parameters
    ----------
    kind : {"ellipse", "rectangle"}
    half_sizes : ndarray, (n,)
        The semi-axes (ellipse) or half side lengths (rectangle).
    origin : ndarray, (n,)
        A point inside the shape.
    directions : ndarray, (m, n)

    Returns
    -------
    ndarray of float64, (m,)

    Examples
    --------
    >>> import numpy as np
    >>> axes = np.array([[1.0, 0.0], [0.0, -1.0]])
    >>> ray_to_edge("rectangle", np.array([2.0, 3.0]), np.zeros(2), axes)
    array([2., 3.])
    """
    u = np.atleast_2d(np.asarray(directions, dtype=np.float64))
    return _ray_to_edge_columns(kind, half_sizes, origin, u.T)


def _ray_to_edge_columns(kind, half_sizes, origin, directions):
    """`ray_to_edge` with directions as columns, (n, m): the layout the deformations work in."""
    h = np.asarray(half_sizes, dtype=np.float64)
    o = np.asarray(origin, dtype=np.float64)
    u = directions
    if kind == "ellipse":
        on = o / h
        un = u / h[:, None]
        a = np.einsum("im,im->m", un, un)
        b = 2.0 * (on @ un)
        c = float(on @ on) - 1.0
        # c <= 0 inside, so the discriminant is >= b^2 and the larger root is >= 0
        disc = np.sqrt(np.maximum(b * b - 4.0 * a * c, 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (disc - b) / (2.0 * a)
        return np.where(a > 0, np.maximum(t, 0.0), np.inf)
    if kind == "rectangle":
        with np.errstate(divide="ignore", invalid="ignore"):
            # leave through the face the ray points at, on every axis; the nearest one wins
            t_axis = (np.copysign(h[:, None], u) - o[:, None]) / u
        t_axis[u == 0] = np.inf
        return np.maximum(t_axis.min(axis=0), 0.0)
    raise ValueError(f"unknown shape kind {kind!r}: use one of {KINDS}")


def size_bounds(image_shape, min_size: float = 0.06, max_size: float = 0.8):
    """Per-axis size bounds `(lb, ub)` in voxels, int arrays (at least 1 voxel)."""
    # Python's round() is numpy's round-half-to-even on the same float64 products
    lb = [max(round(min_size * float(d)), 1) for d in image_shape]
    ub = [max(round(max_size * float(d)), low) for d, low in zip(image_shape, lb, strict=True)]
    return np.array(lb, dtype=np.int64), np.array(ub, dtype=np.int64)


def random_matrix(ndim: int, rng: np.random.Generator) -> np.ndarray:
    """Shear then rotate: one N(0, 0.2) shear per axis, a U(-pi/2, pi/2) rotation per axis pair."""
    t = np.eye(ndim)
    for d in range(ndim):
        others = [a for a in range(ndim) if a != d]
        t[d, others[int(rng.integers(ndim - 1))]] = rng.normal(0.0, SHEAR_STD)
    for i, j in combinations(range(ndim), 2):
        angle = rng.uniform(-np.pi / 2, np.pi / 2)
        cos, sin = np.cos(angle), np.sin(angle)
        # rotating in the (i, j) plane only mixes rows i and j
        row_i, row_j = t[i].copy(), t[j]
        t[i] = cos * row_i - sin * row_j
        t[j] = sin * row_i + cos * row_j
    return t


def rasterise(kind: str, half_sizes: np.ndarray, matrix: np.ndarray) -> Shape:
    """Rasterise a shape on the integer grid of its tight bounding box.

    Each grid point is mapped back into the shape's own frame and tested (ellipse:
    `sum((x / r)^2) <= 1`; rectangle: `|x_i| <= h_i`). A shape too thin to cover any grid point
    keeps its central voxel, so a shape is never empty.
    """
    h = np.asarray(half_sizes, dtype=np.float64)
    extent = 2.0 * (np.abs(matrix) @ h)
    box = np.maximum(np.ceil(extent).astype(np.int64), 1)
    centre = (box - 1) / 2.0
    inv = np.linalg.inv(matrix)
    # separable broadcasting: x_own = sum_j inv[:, j] / h * grid_j, every own coordinate at
    # once as an (n, *box) array; the sum runs over j left to right, as the sum of the
    # n (n, *box) broadcast terms would
    ndim = len(box)
    coef = inv / h[:, None]
    own = None
    for j, (b, c) in enumerate(zip(box.tolist(), centre.tolist(), strict=True)):
        shape = [ndim] + [1] * ndim
        shape[j + 1] = b
        term = (coef[:, j : j + 1] * (np.arange(b, dtype=np.float64) - c)).reshape(shape)
        own = term if own is None else own + term
    if kind == "ellipse":
        # the same left-to-right sum of the squares as sum(x * x for x in own)
        np.multiply(own, own, out=own)
        squares = own[0]
        for x in own[1:]:
            squares += x
        mask = squares <= 1.0
    elif kind == "rectangle":
        mask = (np.abs(own, out=own) <= 1.0).all(axis=0)
    else:
        raise ValueError(f"unknown shape kind {kind!r}: use one of {KINDS}")
    if mask.shape != tuple(box):
        mask = np.broadcast_to(mask, tuple(box))
    # trim to the tight bounding box so that placement is uniform over the valid corners
    tight_box = bounding_box(mask)
    if tight_box is None:
        # too thin to cover a grid point: keep the central voxel
        mask = np.zeros(tuple(box), dtype=bool)
        mask[tuple(int(c) for c in np.floor(centre))] = True
        tight_box = bounding_box(mask)
    lo = [s.start for s in tight_box]
    return Shape(
        kind=kind,
        half_sizes=h,
        matrix=np.asarray(matrix, dtype=np.float64),
        mask=np.ascontiguousarray(mask[tight_box]),
        centre=centre - np.asarray(lo, dtype=np.float64),
        inverse=inv,
    )


def random_shape(
    image_shape,
    rng: np.random.Generator,
    min_size: float = 0.06,
    max_size: float = 0.8,
    shape: str = "random",
) -> Shape:
    """Draw one anomaly shape for an image of `image_shape` (METHOD.md §1).

    Per axis, independently, `d_i = int(clip((0.03 + Gamma(2, 0.1)) * D_i, lb_i, ub_i))` voxels with
    `lb_i = round(min_size * D_i)`, `ub_i = round(max_size * D_i)`; kind 50/50 unless `shape` is
    `"ellipse"` or `"rectangle"`; a random shear and rotation; scaled down uniformly when its
    bounding box would exceed `ub_i` on any axis. Returns a rasterised `Shape`.

    Parameters
    ----------
    image_shape : tuple of int
        The image's spatial shape (2D or 3D).
    rng : numpy.random.Generator
    min_size, max_size : float
        Per-axis size bounds as fractions of the image size.
    shape : {"random", "ellipse", "rectangle"}

    Returns
    -------
    Shape
        `mask` (bool, its tight box), `kind`, `half_sizes`, `matrix`, `centre`.

    Examples
    --------
    >>> import numpy as np
    >>> shape = random_shape((64, 64), np.random.default_rng(0))
    >>> shape.kind in ("ellipse", "rectangle"), shape.mask.dtype, shape.mask.ndim
    (True, dtype('bool'), 2)
    """
    dims = np.asarray(image_shape, dtype=np.float64)
    ndim = dims.size
    if shape == "random":
        kind = KINDS[int(rng.integers(2))]
    elif shape in KINDS:
        kind = shape
    else:
        raise ValueError(f"shape={shape!r} is not valid: use 'random', 'ellipse' or 'rectangle'")
    lb, ub = size_bounds(image_shape, min_size, max_size)
    frac = SIZE_OFFSET + rng.gamma(SIZE_GAMMA_SHAPE, SIZE_GAMMA_SCALE, size=ndim)
    sizes = np.clip(frac * dims, lb, ub).astype(np.int64).astype(np.float64)
    matrix = random_matrix(ndim, rng)
    extent = np.abs(matrix) @ sizes
    # the same IEEE divisions as np.min(ub / extent), without the array round trip
    fit = min(float(u) / e for u, e in zip(ub.tolist(), extent.tolist(), strict=True))
    if fit < 1.0:
        sizes = sizes * fit
    return rasterise(kind, sizes / 2.0, matrix)
