"""The scanner's bias field: a smooth multiplicative drift of MRI intensity across the field of
view, estimated and divided out before the z-score.

```python
from napari_mtml.bias import correct_bias, estimate_bias
flat = correct_bias(volume, foreground, spacing=(1.0, 1.0, 1.0))   # same shape, float32
log_field = estimate_bias(volume, foreground, spacing)              # log of the field, 0 mean
```

Why: the smooth-intensity task teaches the model that a smooth change of brightness is an
anomaly, and a receive coil's bias field is one (a ratio of 0.8-1.4 across a brain is common).
On held-out healthy volumes the highest peaks of the map were those of the strongest fields
(`benchmarks/bias_peaks.py`). `TrainConfig.bias_correction` ("auto" by default) applies this
correction to the training scans and to every scan the run predicts.

Model: `log I = tissue + b + noise`, with `b` a polynomial of total degree `degree` in the
coordinates (Legendre products, the coordinates scaled to [-1, 1] over the foreground's bounding
box). Inside one tissue the gradient of `log I` is the gradient of `b`; at tissue edges it is
much larger. So the log image is averaged in blocks of about `grid_mm` mm and smoothed by
`smooth_mm` (both inside the foreground only), its gradient is taken by central differences
where a block and its neighbours lie wholly inside, and the polynomial's gradient is fitted to
it by least squares, `rounds` times, each time leaving out the blocks whose residual is more
than `cut` times the median (the edges between tissues, lesions, vessels). A gradient fit needs
no tissue classes: a class model fitted in turn with the field (tried first) left 56 % of the
field added (below), mistaking the rest for tissue. The field is then evaluated on the whole
grid (separably, one axis at a time), limited to the range it takes on the fitted blocks, and
shifted to a mean of 0 over the foreground, so the corrected image keeps the original's overall
brightness.

Measured by `benchmarks/bias_fit.py` on the 16 training variants of
`benchmarks/quality_unseen.py` (the packaged MNI152 with a known random field, the generator's
`bias_range`), each estimated with and without its field: the difference of the two estimates
leaves about 22 % of the field added (cubic; 59 % for a linear field). The estimate also
flattens the template's own slow variation, the same way on every scan. With the skull on in 5-6
mm slices, a cubic bends to the partial volume of skull, scalp and cortex into a dome of up to
2.7x across the brain (the same dome on every such scan, but a distortion); a linear field
cannot, but trained on, it lowered the maps' AP with the skull on (README), which is why "auto"
corrects skull-stripped scans only. The field is smooth by construction: it cannot follow a
lesion, so correction does not erase what the model must find.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.polynomial import legendre
from scipy import ndimage

from napari_mtml.anomalies.boxes import bounding_box

__all__ = ["correct_bias", "estimate_bias", "BIAS_CORRECTIONS"]

#: the values of `TrainConfig.bias_correction`: "none"; "poly" (this module's field on every
#: MRI scan); "auto" (on skull-stripped scans only, `preprocess.looks_skull_stripped`)
BIAS_CORRECTIONS = ("none", "poly", "auto")

_MIN_BLOCKS_PER_TERM = 10


def _check(array: np.ndarray, foreground, spacing) -> tuple[np.ndarray, np.ndarray, tuple]:
    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise ValueError(f"bias correction needs a 2D or 3D image; got {array.ndim}D")
    if foreground is None:
        fg = np.ones(array.shape, dtype=bool)
    else:
        fg = np.asarray(foreground, dtype=bool)
        if fg.shape != array.shape:
            raise ValueError(
                f"foreground of shape {fg.shape} does not match the image's {array.shape}"
            )
    sp = (1.0,) * array.ndim if spacing is None else tuple(float(s) for s in spacing)
    if len(sp) != array.ndim or not all(s > 0 and math.isfinite(s) for s in sp):
        raise ValueError(f"spacing {spacing} must give one positive mm value per axis")
    return array, fg, sp


def _terms(ndim: int, degree: int) -> list[tuple[int, ...]]:
    """Exponent tuples of the Legendre products of total degree 1..degree (the constant is the
    tissue's, not the field's)."""
    out = [()]
    for _ in range(ndim):
        out = [(*t, d) for t in out for d in range(degree + 1)]
    return [t for t in out if 0 < sum(t) <= degree]


def _on_grid(table: np.ndarray, bases: list[np.ndarray]) -> np.ndarray:
    """The sum over exponents t of `table[t] * prod_d bases[d][:, t_d]` on the whole grid, one
    axis at a time: `table` holds one coefficient per Legendre product, `(degree + 1,) * ndim`;
    `bases[d]` the polynomials at axis d's coordinates, `(n_d, degree + 1)`."""
    field = table
    for d in reversed(range(table.ndim)):
        field = np.moveaxis(np.tensordot(field, bases[d], axes=([d], [1])), -1, d)
    return field


def _block_sums(a: np.ndarray, steps: tuple[int, ...]) -> np.ndarray:
    """Sums over blocks of `steps` voxels (the array zero-padded to whole blocks)."""
    pad = [(0, (-n) % s) for n, s in zip(a.shape, steps, strict=True)]
    a = np.pad(a, pad)
    shape = []
    for n, s in zip(a.shape, steps, strict=True):
        shape += [n // s, s]
    return a.reshape(shape).sum(axis=tuple(range(1, 2 * a.ndim, 2)))


def _fit_gradient(
    logs: np.ndarray,
    inside: np.ndarray,
    coords: list[np.ndarray],
    mm_per_unit: list[float],
    step_mm: tuple[float, ...],
    degree: int,
    rounds: int,
    cut: float,
) -> tuple[list[tuple[int, ...]], np.ndarray] | None:
    """Least-squares polynomial whose gradient matches that of `logs` on the blocks `inside`
    (and their two neighbours along every axis); None without enough blocks."""
    ndim = logs.ndim
    centre = inside.copy()
    for d in range(ndim):
        centre &= np.roll(inside, 1, axis=d) & np.roll(inside, -1, axis=d)
        edge = [slice(None)] * ndim
        edge[d] = [0, -1]
        centre[tuple(edge)] = False
    terms = _terms(ndim, degree)
    idx = np.nonzero(centre)
    if idx[0].size < _MIN_BLOCKS_PER_TERM * len(terms):
        return None
    u = [c[i] for c, i in zip(coords, idx, strict=True)]
    values = [legendre.legvander(x, degree) for x in u]
    eye = np.eye(degree + 1)
    # d/du of P_k at u, k = 0..degree
    slopes = [
        np.stack([legendre.legval(x, legendre.legder(eye[k])) for k in range(degree + 1)], 1)
        for x in u
    ]
    design, target = [], []
    for d in range(ndim):
        after, before = list(idx), list(idx)
        after[d] = idx[d] + 1
        before[d] = idx[d] - 1
        target.append((logs[tuple(after)] - logs[tuple(before)]) / (2.0 * step_mm[d]))
        cols = []
        for t in terms:
            col = slopes[d][:, t[d]] / mm_per_unit[d]
            for e in range(ndim):
                if e != d:
                    col = col * values[e][:, t[e]]
            cols.append(col)
        design.append(np.stack(cols, axis=1))
    a = np.stack(design)  # (ndim, blocks, terms)
    y = np.stack(target)  # (ndim, blocks)
    # start from the flatter half of the blocks: inside a tissue the gradient is the field's,
    # small; across an edge between tissues it is large
    norm = np.sqrt((y**2).sum(axis=0))
    keep = norm <= np.median(norm)
    coef = np.zeros(len(terms))
    for _ in range(rounds):
        if keep.sum() < _MIN_BLOCKS_PER_TERM * len(terms):
            break
        rows, rhs = a[:, keep].reshape(-1, len(terms)), y[:, keep].reshape(-1)
        # normal equations: a few dozen Legendre columns are well conditioned
        coef = np.linalg.solve(rows.T @ rows, rows.T @ rhs)
        norm = np.sqrt(((y - a @ coef) ** 2).sum(axis=0))
        keep = norm <= cut * np.median(norm)
    return terms, coef


def estimate_bias(
    array: np.ndarray,
    foreground: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    *,
    degree: int = 3,
    grid_mm: float = 4.0,
    smooth_mm: float = 2.0,
    rounds: int = 5,
    cut: float = 2.5,
) -> np.ndarray:
    """The log of the bias field on the image's grid (float32; 0 where it cannot be estimated).

    Parameters
    ----------
    array : 2D or 3D intensities (any real dtype); positive inside the tissue.
    foreground : bool mask of the same shape where the field is fitted and applied (the head
        or the brain); default the whole image.
    spacing : mm per axis, in the array's axis order; default 1 mm.
    degree : total degree of the polynomial field (3: a smooth field with a bend per axis).
    grid_mm : size in mm of the blocks the fit works on (the voxel itself where coarser).
    smooth_mm : standard deviation in mm of the Gaussian smoothing of the block means.
    rounds : least-squares rounds, each dropping the blocks of large residual.
    cut : a block is dropped when its residual exceeds `cut` times the median.

    Returns
    -------
    float32 array of `array`'s shape: `log(field)`, mean 0 over the foreground's positive
    voxels, 0 outside `foreground`. All zeros when the foreground holds too few whole blocks
    (10 per polynomial term): such an image is left as it is.
    """
    array, fg, sp = _check(array, foreground, spacing)
    if degree < 1 or rounds < 1 or not (grid_mm > 0 and smooth_mm >= 0 and cut > 0):
        raise ValueError("degree >= 1, rounds >= 1, grid_mm > 0, smooth_mm >= 0, cut > 0")
    out = np.zeros(array.shape, dtype=np.float32)
    region = fg & np.isfinite(array) & (array > 0)
    if not region.any():
        return out
    crop = bounding_box(region)
    box = [(sl.start, sl.stop) for sl in crop]
    steps = tuple(max(1, int(round(grid_mm / s))) for s in sp)
    step_mm = tuple(st * s for st, s in zip(steps, sp, strict=True))
    inside = region[crop]
    logs = np.log(np.where(inside, array[crop], 1.0).astype(np.float32, copy=False))
    counts = _block_sums(inside.astype(np.float32), steps).astype(np.float64)
    full = counts >= math.prod(steps) - 0.5  # blocks wholly inside the foreground
    means = _block_sums(logs, steps).astype(np.float64) / np.maximum(counts, 1.0)
    if smooth_mm > 0:  # normalised convolution: the smoothing does not reach outside
        sigma = [smooth_mm / m for m in step_mm]
        weight = ndimage.gaussian_filter(full.astype(np.float64), sigma, mode="constant")
        means = ndimage.gaussian_filter(np.where(full, means, 0.0), sigma, mode="constant")
        means /= np.maximum(weight, 1e-12)
        full &= weight > 0.99 * ndimage.gaussian_filter(np.ones_like(weight), sigma)
    # block centres in [-1, 1] over the crop; mm per unit of that coordinate
    extent = [max(hi - lo - 1, 1) for lo, hi in box]
    coords = [
        (np.arange(n) * st + (st - 1) / 2.0) / e * 2.0 - 1.0
        for n, st, e in zip(means.shape, steps, extent, strict=True)
    ]
    mm_per_unit = [e * s / 2.0 for e, s in zip(extent, sp, strict=True)]
    fitted = _fit_gradient(means, full, coords, mm_per_unit, step_mm, degree, rounds, cut)
    if fitted is None:
        return out
    terms, coef = fitted
    # the whole crop, one axis at a time: sum over terms of c_t * prod_d P_{t_d}(u_d)
    axes = [
        legendre.legvander(np.arange(hi - lo) / e * 2.0 - 1.0, degree).astype(np.float32)
        for (lo, hi), e in zip(box, extent, strict=True)
    ]
    table = np.zeros((degree + 1,) * array.ndim, dtype=np.float32)
    for t, c in zip(terms, coef, strict=True):
        table[t] = c
    field = _on_grid(table, axes)
    # no extrapolation beyond what the fitted blocks saw
    fitted_voxels = full
    for d, st in enumerate(steps):
        fitted_voxels = np.repeat(fitted_voxels, st, axis=d)
    fitted_voxels = fitted_voxels[tuple(slice(0, n) for n in field.shape)]
    seen = fitted_voxels if fitted_voxels.any() else inside
    lo_f = float(np.min(field, where=seen, initial=np.inf))
    hi_f = float(np.max(field, where=seen, initial=-np.inf))
    field = np.clip(field, lo_f, hi_f)
    field -= float(np.mean(field, where=inside))
    out[crop] = np.where(fg[crop], field, 0.0)
    return out


def correct_bias(
    array: np.ndarray,
    foreground: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    **options,
) -> np.ndarray:
    """`array` divided by its estimated bias field inside `foreground` (float32, same shape;
    outside unchanged). `options` are `estimate_bias`'s keywords.

    Examples
    --------
    >>> import numpy as np
    >>> z, y, x = np.mgrid[-1:1:40j, -1:1:48j, -1:1:40j]
    >>> tissue = 100 * np.exp(0.05 * np.random.default_rng(0).standard_normal(z.shape))
    >>> head = z**2 + y**2 + x**2 < 0.9
    >>> biased = tissue * np.exp(0.3 * y) * head                       # a 1.8x drift along y
    >>> flat = correct_bias(biased, head, spacing=(2.0, 2.0, 2.0))
    >>> ratio = flat[head] / tissue[head]
    >>> bool(ratio.max() / ratio.min() < 1.05)
    True
    """
    log_field = estimate_bias(array, foreground, spacing, **options)  # validates the input
    # the log field is 0 outside the foreground: a factor of exactly 1 there
    return np.asarray(array, dtype=np.float32) * np.exp(-log_field)


# ------------------------------------------------------------------------ training augmentation


def random_bias_field(
    shape: Sequence[int],
    rng: np.random.Generator,
    max_ratio: float,
    mask: np.ndarray | None = None,
    degree: int = 3,
) -> np.ndarray:
    """A random smooth multiplicative field, float32 of `shape`, for training augmentation.

    The log field is a polynomial of total degree `degree` (Legendre products, normal
    coefficients halved for each degree above 1, so that slow drifts dominate as in real coils),
    the coordinates scaled to [-1, 1] over `mask`'s bounding box (default: the whole grid). It
    is scaled so that its largest / smallest value inside `mask` is `1 + U(0, max_ratio)` (0.4
    is the "40 % intensity non-uniformity" of the BrainWeb simulator) and shifted to a mean log
    of 0 there, so it tilts the brightness without changing its overall level. Outside `mask`
    the field is clamped to its range inside (finite everywhere, the same ratio overall).

    Examples
    --------
    >>> import numpy as np
    >>> f = random_bias_field((64, 64), np.random.default_rng(0), max_ratio=0.4)
    >>> f.shape, f.dtype, bool(1.0 <= f.max() / f.min() <= 1.4 + 1e-5)
    ((64, 64), dtype('float32'), True)
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"a bias field needs a 2D or 3D shape; got {shape}")
    if not (math.isfinite(max_ratio) and max_ratio >= 0):
        raise ValueError(f"max_ratio must be a finite number >= 0; got {max_ratio}")
    inside = np.ones(shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if inside.shape != shape:
        raise ValueError(f"mask of shape {inside.shape} does not match the field's {shape}")
    ratio = 1.0 + float(rng.uniform(0.0, max_ratio))
    if ratio == 1.0 or not inside.any():
        return np.ones(shape, dtype=np.float32)
    box = bounding_box(inside)
    bases = []  # per axis: (n, degree + 1), the Legendre polynomials at the coordinates
    for n, sl in zip(shape, box, strict=True):
        centre, half = 0.5 * (sl.start + sl.stop - 1), max(0.5 * (sl.stop - sl.start - 1), 1.0)
        u = (np.arange(n, dtype=np.float64) - centre) / half
        bases.append(legendre.legvander(u, degree).astype(np.float32))
    coeffs = np.zeros((degree + 1,) * len(shape), dtype=np.float32)
    for term in _terms(len(shape), degree):
        coeffs[term] = float(rng.standard_normal()) * 0.5 ** (sum(term) - 1)
    log = _on_grid(coeffs, bases)
    lo_v = float(np.min(log, where=inside, initial=np.inf))
    hi_v = float(np.max(log, where=inside, initial=-np.inf))
    if not hi_v > lo_v:
        return np.ones(shape, dtype=np.float32)
    # Outside the mask's box the polynomial runs off (a head a few voxels wide in a large frame
    # scales it by thousands): clamp it to its range inside the mask first, so that the field
    # stays finite everywhere and its values inside the mask are unchanged.
    np.clip(log, np.float32(lo_v), np.float32(hi_v), out=log)
    log *= np.float32(math.log(ratio) / (hi_v - lo_v))
    log -= np.float32(np.mean(log, where=inside, dtype=np.float64))
    return np.exp(log, out=log)


def apply_bias_field(image: np.ndarray, field: np.ndarray, zero: float) -> np.ndarray:
    """A z-scored frame image as if its scan had been multiplied by `field` before the z-score.

    A z-score `z = (I - mean) / std` of a scan multiplied by `b` is `zero + (z - zero) * b` with
    `zero = -mean / std` (the z-value of intensity 0, `HealthySample.zero`), taking the same mean
    and std. The frame's background (exactly 0) stays 0. Returns a float32 copy.
    """
    image = np.asarray(image, dtype=np.float32)
    field = np.asarray(field, dtype=np.float32)
    if field.shape != image.shape:
        raise ValueError(f"field of shape {field.shape} does not match the image's {image.shape}")
    z0 = np.float32(zero)
    out = z0 + (image - z0) * field
    return np.where(image != 0, out, np.float32(0.0)).astype(np.float32, copy=False)
