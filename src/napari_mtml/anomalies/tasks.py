"""The five synthetic anomaly tasks (METHOD.md §2), ids 0..4.

Every task is a small callable object with the same signature::

    patch = task(image, placed, rng, context)

`image` is the current (possibly already changed) float32 image, which the task does not modify;
`placed` a `PlacedShape`; `context` the call's `TaskContext`. The task returns a `Patch`: a box of
the image, the new float32 values on that box and the bool mask of the voxels that changed (the
anomaly). Only the box is ever touched: the cost is that of the box, not of the image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
from scipy import ndimage

from napari_mtml.anomalies.placement import PlacedShape
from napari_mtml.anomalies.shapes import KINDS, _ray_to_edge_columns

#: the `shape` task parameter: a random kind per anomaly, or always one kind
SHAPE_CHOICES = ("random", *KINDS)
#: the parameters every task uses (through the recipe, the shapes and the label)
COMMON_PARAMS = ("min_size", "max_size", "max_anomalies", "repeat_prob", "sigma", "shape")
#: spill rule of the blending tasks: a voxel of the box that changed more than this joins the mask
SPILL_THRESHOLD = 0.001
#: voxels of context around a box for the cubic spline's prefilter. The spline interpolates the
#: crop's grid values exactly whatever the crop's border; between grid points the border's effect
#: decays as 0.268^k with the distance k to it, so 3 voxels keep it near 2% of a local step at the
#: box's very edge (where the deformations barely move anything) and the prefilter's cost low
SPLINE_MARGIN = 3


#: The paper's push limit for 2D chest X-rays (voxels); brain volumes keep `TaskParams.max_push`.
CXR_MAX_PUSH = 10.0


def _knob(default, label: str, low: float, high: float, decimals: int):
    """A task parameter a user may turn (the preview's sliders): its label, the range offered
    and the decimals shown (0: an integer)."""
    return field(
        default=default, metadata={"label": label, "range": (low, high), "decimals": decimals}
    )


@dataclass(frozen=True)
class TaskParams:
    """The task parameters the paper varies, with its defaults (brain; CXR uses max_push=10).

    Sizes are fractions of the image size per axis; push distances are voxels; `intensity_scale` is
    in image units (z-score for brain MRI, [-1, 1] for X-rays); `margin_base` is a fraction of the
    smallest image side. The fields a user may turn carry their label, the range a slider offers
    and its decimals in their `metadata` (`napari_mtml.preview.PARAMS` reads them).
    """

    min_size: float = _knob(0.06, "min size (x image)", 0.01, 1.0, 2)
    max_size: float = _knob(0.8, "max size (x image)", 0.02, 1.0, 2)
    max_anomalies: int = _knob(4, "max anomalies", 1, 8, 0)
    repeat_prob: float = _knob(0.5, "repeat probability", 0.0, 0.95, 2)
    min_push: float = _knob(0.5, "min push (voxels)", 0.0, 20.0, 1)
    max_push: float = _knob(5.0, "max push (voxels)", 0.1, 40.0, 1)
    intensity_scale: float = _knob(0.2, "intensity scale", 0.01, 2.0, 2)
    margin_base: float = _knob(0.02, "margin base (x size)", 0.0, 0.2, 3)
    sigma: float = _knob(0.2, "label sigma", 0.02, 1.0, 2)
    shape: str = field(default="random", metadata={"choices": SHAPE_CHOICES})
    max_attempts: int = 100
    #: blending tasks: False (default) solves on the exact box of METHOD.md (mask box + 1 voxel);
    #: True grows it to a fast sine-transform length (see `poisson.poisson_blend`), which
    #: measured no faster per labelled sample (README, bench_anomalies.py)
    fast_box: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first parameter out of its range."""
        checks = [
            (0 < self.min_size <= self.max_size <= 1, "need 0 < min_size <= max_size <= 1"),
            (int(self.max_anomalies) >= 1, "max_anomalies must be >= 1"),
            (0 <= self.repeat_prob <= 1, "repeat_prob must be in [0, 1]"),
            (0 <= self.min_push <= self.max_push, "need 0 <= min_push <= max_push"),
            (self.intensity_scale >= 0, "intensity_scale must be >= 0"),
            (self.margin_base > 0, "margin_base must be > 0"),
            (self.sigma > 0, "sigma must be > 0"),
            (self.shape in SHAPE_CHOICES, "shape must be 'random', 'ellipse' or 'rectangle'"),
            (int(self.max_attempts) >= 1, "max_attempts must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"bad task parameter: {message} (got {self})")


@dataclass(frozen=True)
class SourceImage:
    """A blending source: float32 array, optional bool foreground mask, its global value range."""

    array: np.ndarray
    mask: np.ndarray | None
    low: float
    high: float


@dataclass(frozen=True)
class TaskContext:
    """What a task needs besides the image and the shape.

    `value_range` is the image's global (min, max), to which every task clips; `source` returns a
    `SourceImage` for the blending tasks (called once per blended anomaly).
    """

    params: TaskParams
    value_range: tuple[float, float]
    source: Callable[[np.random.Generator], SourceImage] | None = None


@dataclass(frozen=True, eq=False)
class Patch:
    """A task's output: `values` (float32) on the image's `box`; `mask` (bool) marks the anomaly."""

    box: tuple[slice, ...]
    values: np.ndarray
    mask: np.ndarray


def _shape_in_box(placed: PlacedShape, image_shape, margin: int, lengthen=None):
    """The shape's box grown by `margin` (clipped to the image): image slices, the shape's mask on
    that box, and the shape box's offset in it. `lengthen(n) -> m >= n`, if given, grows each
    side further to a preferred length (centred, shifted inwards at the image's edges)."""
    outer, inner = placed.padded_box(image_shape, margin)
    if lengthen is not None:
        grown = []
        for side, dim in zip(outer, image_shape, strict=True):
            length = side.stop - side.start
            wanted = min(lengthen(length), dim)
            start = min(max(side.start - (wanted - length) // 2, 0), dim - wanted)
            grown.append(slice(start, start + wanted))
        outer = tuple(grown)
        inner = tuple(
            slice(c - o.start, c - o.start + n)
            for c, o, n in zip(placed.corner, outer, placed.mask.shape, strict=True)
        )
    size = tuple(s.stop - s.start for s in outer)
    mask = np.zeros(size, dtype=bool)
    mask[inner] = placed.mask
    offset = np.array([s.start for s in inner], dtype=np.float64)
    return outer, mask, offset


# ---------------------------------------------------------------- sink / source (tasks 2 and 3)


def push_factor(
    mean_radius: float,
    rng: np.random.Generator,
    kind: str,
    min_push: float = 0.5,
    max_push: float = 5.0,
) -> float:
    """The deformation factor f from a random push distance (METHOD.md §2).

    `mean_radius` is A, the mean distance (voxels) from the centre to the shape's boundary voxels.
    `p ~ U(max(0.1 A/sqrt2, min_push), min(0.9 A/sqrt2, max_push))`, `m± = A/2 ± p/sqrt2`; source
    `f = ln(m-/A) / ln(m+/A)`, sink `f = ln(1 - m+/A) / ln(1 - m-/A)`. Returns 1 (identity) for a
    shape too small to push (A = 0).
    """
    a = float(mean_radius)
    if a <= 0:
        return 1.0
    low = max(0.1 * a / np.sqrt(2), min_push)
    high = min(0.9 * a / np.sqrt(2), max_push)
    push = rng.uniform(low, high) if high > low else high
    # never past 0.9 A / sqrt2, where m- would approach 0 and f blow up
    push = min(max(push, 0.0), 0.9 * a / np.sqrt(2))
    m_minus = a / 2 - push / np.sqrt(2)
    m_plus = a / 2 + push / np.sqrt(2)
    if kind == "source":
        return float(np.log(m_minus / a) / np.log(m_plus / a))
    if kind == "sink":
        return float(np.log(1 - m_plus / a) / np.log(1 - m_minus / a))
    raise ValueError(f"kind must be 'sink' or 'source', got {kind!r}")


def _radial_profile(ratio: np.ndarray, factor: float, kind: str) -> np.ndarray:
    """r'/R as a function of r/R (Eqs. 1-2 divided by R)."""
    if kind == "source":
        return ratio**factor
    if kind == "sink":
        return 1.0 - (1.0 - ratio) ** factor
    raise ValueError(f"kind must be 'sink' or 'source', got {kind!r}")


def warped_radius(
    r: np.ndarray, edge: np.ndarray, factor: float, kind: str, *, edge_beyond: bool = False
) -> np.ndarray:
    """Paper Eqs. 1-2: where the value landing at radius `r` is read from.

    source `r' = R (r / R)^f`, sink `r' = R - (R - r)^f / R^(f-1)`, with R = `edge`, the distance
    from the centre to the shape's edge along the ray. Both keep r' = r at 0 and at R.
    `edge_beyond=True` promises `edge >= r > 0` (no voxel past the edge, none at the centre)
    and skips the guards for those cases; the values are the same.
    """
    if edge_beyond:
        ratio = r / edge
    else:
        edge = np.maximum(edge, r)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(edge > 0, r / edge, 0.0)
    return edge * _radial_profile(ratio, factor, kind)


def radial_warp(
    image: np.ndarray,
    mask: np.ndarray,
    centre,
    factor: float,
    kind: str,
    edge_distance: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    centre_index: int | None = None,
) -> np.ndarray:
    """Sink or source deformation of `image` inside `mask` around `centre` (deterministic part).

    Parameters
    ----------
    image : float32 n-D array (a box of the image with context around the shape).
    mask : bool array, same shape, the shape's voxels.
    centre : (n,) index of a voxel of `mask`.
    factor : f > 0.
    kind : "sink" or "source".
    edge_distance : `(origin (n,), directions (n, m)) -> (m,)`: for each ray the parameter `t`
        with `origin + t * direction` on the shape's edge (in units of the direction's length).

    centre_index : optional position of `centre` among the shape's voxels (`np.nonzero(mask)`
        order), which spares a comparison per voxel; the result is the same.

    Returns
    -------
    float32 array, a copy of `image` where every shape voxel at `c + r u` holds the cubic-spline
    (order 3, mode nearest) sample of `image` at `c + r' u`; identity outside the shape.
    """
    out = np.array(image, dtype=np.float32, copy=True)
    points = np.nonzero(mask)
    c = np.asarray(centre, dtype=np.float64)
    sources = _warp_sources(points, c, factor, kind, edge_distance, centre_index)
    out[points] = _cubic_samples(image, sources)
    return out


def _warp_sources(points, c, factor, kind, edge_distance, centre_index=None) -> np.ndarray:
    """Where each shape voxel reads from, (n, m) float64.

    With `delta = p - c` and `t` the edge parameter of the ray `c + t delta` (so R = t r and
    r / R = 1 / t), the source point `c + r' u` is `c + t * profile(1 / t) * delta`: no norms or
    unit vectors needed.
    """
    delta = np.array(points, dtype=np.float64)
    delta -= c[:, None]
    if centre_index is None:
        moving = np.any(delta != 0, axis=0)
    else:  # the points are distinct voxels: only the centre's own offset is zero
        moving = np.ones(delta.shape[1], dtype=bool)
        moving[centre_index] = False
    t = np.ones(delta.shape[1])
    t[moving] = np.maximum(edge_distance(c, delta[:, moving]), 1.0)
    # Eqs. 1-2 are scale-free: a voxel at r on a ray whose edge lies at t r reads from
    # r * warped_radius(1, t) (t >= 1: no guards needed)
    scale = warped_radius(1.0, t, factor, kind, edge_beyond=True)
    scale[~moving] = 0.0
    delta *= scale
    delta += c[:, None]
    return delta


def _cubic_samples(image: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Cubic spline samples (order 3, mode nearest) of `image` at `coords` (n, m), float32."""
    # the float32 prefilter halves the memory traffic of the float64 one map_coordinates uses
    coeffs = ndimage.spline_filter(
        np.asarray(image, dtype=np.float32), order=3, output=np.float32, mode="nearest"
    )
    return ndimage.map_coordinates(
        coeffs,
        np.ascontiguousarray(coords),
        order=3,
        mode="nearest",
        prefilter=False,
        output=np.float32,
    )


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Shape voxels with a face neighbour outside the shape (mask XOR its erosion; outside the
    array counts as outside)."""
    interior = mask.copy()
    for d in range(mask.ndim):
        lo = tuple(slice(None, -1) if e == d else slice(None) for e in range(mask.ndim))
        hi = tuple(slice(1, None) if e == d else slice(None) for e in range(mask.ndim))
        interior[hi] &= mask[lo]
        interior[lo] &= mask[hi]
        first = tuple(0 if e == d else slice(None) for e in range(mask.ndim))
        last = tuple(-1 if e == d else slice(None) for e in range(mask.ndim))
        interior[first] = False
        interior[last] = False
    return mask & ~interior


class _RadialTask:
    """Sink (2) or source (3): move intensities radially, never change them (METHOD.md §2)."""

    params = ("min_push", "max_push")
    blends = False

    def __init__(self, name: str, task_id: int):
        self.name = name
        self.id = task_id

    def __call__(self, image, placed: PlacedShape, rng, context: TaskContext) -> Patch:
        params = context.params
        # geometry on the shape's tight box; only the spline needs the context around it
        mask = placed.mask
        points = np.nonzero(mask)
        pick = int(rng.integers(points[0].size))
        centre = np.array([p[pick] for p in points], dtype=np.float64)
        # squared distances of the boundary voxels in exact integer arithmetic from their flat
        # indices: the same float64 values, in the same order, as from their coordinates
        rest = np.flatnonzero(_boundary(mask))
        squared = np.zeros(rest.size, dtype=np.int64)
        for d in range(mask.ndim - 1, -1, -1):
            rest, coord = np.divmod(rest, mask.shape[d])
            coord -= points[d][pick]
            squared += coord * coord
        mean_radius = float(np.sqrt(squared.astype(np.float64)).mean())
        factor = push_factor(mean_radius, rng, self.name, params.min_push, params.max_push)
        # the deterministic warp on the shape's box grown by the spline's margin of context
        outer, padded, offset = _shape_in_box(placed, image.shape, SPLINE_MARGIN)
        shape = placed.shape
        inv = shape.inverse

        def edge(origin, directions):  # in the grown box: the shape's centre sits at offset
            own = inv @ (origin - offset - shape.centre)
            return _ray_to_edge_columns(shape.kind, shape.half_sizes, own, inv @ directions)

        warped = radial_warp(
            image[outer], padded, centre + offset, factor, self.name, edge, centre_index=pick
        )
        # the spline can overshoot a little: stay in the image's range like every task
        np.clip(warped, *context.value_range, out=warped)
        inner = tuple(slice(o, o + n) for o, n in zip(offset.astype(int), mask.shape, strict=True))
        return Patch(placed.box, warped[inner], mask)


# ---------------------------------------------------------------- smooth intensity (task 4)


def edge_distance(mask: np.ndarray) -> np.ndarray:
    """The Euclidean distance of each shape voxel to the nearest voxel outside the shape
    (voxels; 1 on its edge voxels, 0 outside); outside the array counts as outside."""
    inner = (slice(1, -1),) * mask.ndim
    padded = np.zeros(tuple(n + 2 for n in mask.shape), dtype=bool)  # np.pad(mask, 1)
    padded[inner] = mask
    return ndimage.distance_transform_edt(padded)[inner]


def smooth_intensity_change(
    image, mask, amplitude: float, margin: float, distance: np.ndarray | None = None
) -> np.ndarray:
    """Add `w * amplitude` inside `mask`, `w = min(dist / margin, 1)` (deterministic part).

    `dist` is the Euclidean distance transform of the shape (`edge_distance`; 1 on its edge
    voxels), so the change ramps up over `margin` voxels from the edge; pass it as `distance`
    when it is already known. Returns a float32 copy of `image`, unchanged outside `mask` (no
    clipping here).
    """
    dist = edge_distance(mask) if distance is None else distance
    weight = np.minimum(dist[mask] / max(float(margin), 1e-12), 1.0)
    out = np.array(image, dtype=np.float32, copy=True)
    out[mask] += (weight * amplitude).astype(np.float32)
    return out


class _SmoothIntensityTask:
    """Smooth intensity change (4): a ramped offset of Gamma amplitude (METHOD.md §2)."""

    name = "smooth_intensity"
    id = 4
    params = ("intensity_scale", "margin_base")
    blends = False

    def __call__(self, image, placed: PlacedShape, rng, context: TaskContext) -> Patch:
        params = context.params
        box = placed.box
        mask = placed.mask
        dist = edge_distance(mask)
        margin = min(
            min(image.shape) * (params.margin_base + rng.gamma(3.0, 0.01)), float(dist.max())
        )
        s = params.intensity_scale
        amplitude = (s / 2 + rng.gamma(3.0, s)) * (1.0 if rng.random() < 0.5 else -1.0)
        values = smooth_intensity_change(image[box], mask, amplitude, margin, distance=dist)
        np.clip(values, *context.value_range, out=values)
        return Patch(box, values, mask.copy())


# ---------------------------------------------------------------- Poisson blending (tasks 0 and 1)


def _rotation(ndim: int, rng: np.random.Generator, max_angle: float) -> np.ndarray:
    rot = np.eye(ndim)
    for i, j in combinations(range(ndim), 2):
        angle = rng.uniform(-max_angle, max_angle)
        r = np.eye(ndim)
        cos, sin = np.cos(angle), np.sin(angle)
        r[i, i], r[i, j], r[j, i], r[j, j] = cos, -sin, sin, cos
        rot = r @ rot
    return rot


def sample_source_patch(
    source: SourceImage,
    out_shape,
    rng: np.random.Generator,
    needed: np.ndarray | None = None,
    fill: np.ndarray | None = None,
) -> np.ndarray:
    """A randomly rotated and scaled window of the source, resampled to `out_shape` (float32).

    `needed` (bool, `out_shape`) restricts the resampling to those voxels; the others take `fill`
    (same shape) or 0. The blend reads the source only where its gradients can enter, so sampling
    only there saves most of the cubic interpolation.

    Backward map target -> source: rotation U(-pi/4, pi/4) per axis pair, scale `1 + Exp(0.1)` or
    its inverse (p = 0.5), shrunk so the mapped window fits in 0.8 of the source on every axis; the
    window's centre is uniform over the positions that keep it inside the source (with a source
    mask: a centre voxel on the mask); cubic spline resampling; clipped to the source's range.
    """
    src = source.array
    ndim = src.ndim
    out = np.asarray(out_shape, dtype=np.float64)
    dims = np.asarray(src.shape, dtype=np.float64)
    scale = 1.0 + rng.exponential(0.1)
    if rng.random() < 0.5:
        scale = 1.0 / scale
    matrix = scale * _rotation(ndim, rng, np.pi / 4)
    extent = np.abs(matrix) @ out
    # the same IEEE operations as np.min(0.8 * dims / extent), on Python floats
    fit = min(0.8 * d / e for d, e in zip(dims.tolist(), extent.tolist(), strict=True))
    if fit < 1.0:
        matrix *= fit
        extent *= fit
    low = np.ceil(extent / 2).astype(np.int64)
    high = np.maximum(np.floor(dims - 1 - extent / 2).astype(np.int64), low)
    centre = _window_centre(source, low, high, rng)
    shape = tuple(int(s) for s in out)
    if needed is None:
        needed = np.ones(shape, dtype=bool)
    points = np.nonzero(needed)
    coords = matrix @ np.array(points, dtype=np.float64)
    coords += (centre - matrix @ ((out - 1) / 2))[:, None]
    # prefilter only the source region the samples fall in (the rotated window's own bounding
    # box can be several times larger in 3D)
    lo = np.maximum(np.floor(coords.min(axis=1)).astype(np.int64) - SPLINE_MARGIN, 0)
    hi = np.minimum(np.ceil(coords.max(axis=1)).astype(np.int64) + SPLINE_MARGIN + 1, src.shape)
    crop = src[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
    values = _cubic_samples(crop, coords - lo[:, None])
    np.clip(values, source.low, source.high, out=values)
    patch = np.zeros(shape, np.float32) if fill is None else np.array(fill, np.float32, copy=True)
    patch[needed] = values  # the same voxels, in the same (C) order as `points`
    return patch


def _window_centre(source: SourceImage, low, high, rng, attempts: int = 100) -> np.ndarray:
    if source.mask is None:
        return np.array([rng.integers(a, b + 1) for a, b in zip(low, high, strict=True)], float)
    for _ in range(attempts):
        c = tuple(int(rng.integers(a, b + 1)) for a, b in zip(low, high, strict=True))
        if source.mask[c]:
            return np.asarray(c, dtype=np.float64)
    # a thin source foreground: choose among its voxels directly rather than keep guessing
    region = tuple(slice(a, b + 1) for a, b in zip(low, high, strict=True))
    candidates = np.nonzero(source.mask[region])
    if candidates[0].size == 0:
        raise ValueError(
            "the blending source's foreground mask has no voxel where a source window fits: pass a "
            "source with a larger foreground, or mask=None"
        )
    pick = int(rng.integers(candidates[0].size))
    return np.array([c[pick] + a for c, a in zip(candidates, low, strict=True)], dtype=np.float64)


class _BlendTask:
    """Poisson blending (0 intra-dataset, 1 inter-dataset): mixed gradients on the mask's box."""

    params = ()
    blends = True

    def __init__(self, name: str, task_id: int):
        self.name = name
        self.id = task_id

    def __call__(self, image, placed: PlacedShape, rng, context: TaskContext) -> Patch:
        # imported here so that the other tasks never depend on the solver's module
        from napari_mtml.anomalies.poisson import _blend_into, _working_dtype, fast_box_length

        if context.source is None:
            raise ValueError(f"task {self.name!r} needs a blending source")
        # one voxel of target around the shape is the Dirichlet border of the solve; each side is
        # then grown to a length whose sine transform is fast (as `poisson_blend` does by default)
        lengthen = fast_box_length if context.params.fast_box else None
        outer, mask, _ = _shape_in_box(placed, image.shape, 1, lengthen)
        target = np.asarray(image[outer], dtype=np.float32)
        # the forward differences that start on the mask read the source there and one voxel
        # further along each axis: nowhere else does the solve look at the source
        needed = mask.copy()
        for d in range(mask.ndim):
            head = tuple(slice(None, -1) if e == d else slice(None) for e in range(mask.ndim))
            tail = tuple(slice(1, None) if e == d else slice(None) for e in range(mask.ndim))
            needed[tail] |= mask[head]
        patch = sample_source_patch(context.source(rng), target.shape, rng, needed, target)
        # solve_poisson_box(target, patch, mask, mix_gradients=True) without its input checks:
        # the image and the source were checked finite, the patch is clipped to the source's range
        work = _working_dtype("auto", target.ndim)
        blended = np.array(target, dtype=np.float32, copy=True)
        _blend_into(
            blended, np.asarray(target, dtype=work), np.asarray(patch, dtype=work), mask, True, 1
        )
        np.clip(blended, *context.value_range, out=blended)
        spill = np.abs(blended - target) > SPILL_THRESHOLD
        changed = mask | spill
        values = np.where(changed, blended, target).astype(np.float32, copy=False)
        return Patch(outer, values, changed)


def _make_tasks():
    return (
        _BlendTask("intra_blend", 0),
        _BlendTask("inter_blend", 1),
        _RadialTask("sink", 2),
        _RadialTask("source", 3),
        _SmoothIntensityTask(),
    )


#: the five tasks, index = task id
TASK_OBJECTS = _make_tasks()
