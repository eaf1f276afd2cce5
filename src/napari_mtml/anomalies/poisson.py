"""N-D Poisson image editing with mixed gradients, solved by the discrete sine transform.

METHOD.md §2 "The N-D Poisson solve". On a box of size ``N_0 x ... x N_{n-1}`` the blended image
``u`` keeps the target's values on the box's border voxels (Dirichlet condition) and, on the
interior ``[1:-1]`` of every axis, satisfies the discrete Poisson equation

    sum_d (u[p + e_d] - 2 u[p] + u[p - e_d]) = sum_d (g_d[p] - g_d[p - e_d])

where ``g_d`` is the guidance field along axis ``d``: the forward difference of the source or of
the target (``f[p + e_d] - f[p]``). Inside the mask, with mixed gradients, each axis component keeps
whichever of the target's and the source's differences is larger in magnitude (the target on ties);
without mixing it takes the source's. Outside the mask it is the target's. The mask is read at the
voxel a forward difference starts from.

The interior system is diagonalised by the type-I discrete sine transform along every axis, with
eigenvalues ``sum_d (2 cos(pi (k_d + 1) / (N_d - 1)) - 2)``, so a solve costs ``O(V log V)`` for a
box of ``V`` voxels.

Functions here are pure: inputs are never modified, float32 comes out.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import scipy.fft

from napari_mtml.anomalies.boxes import bounding_box

__all__ = ["blend_box", "bounding_box", "fast_box_length", "poisson_blend", "solve_poisson_box"]


def poisson_blend(
    target: np.ndarray,
    source: np.ndarray,
    mask: np.ndarray,
    mix_gradients: bool = True,
    *,
    fast_box: bool = False,
    workers: int = 1,
    precision: str = "auto",
) -> np.ndarray:
    """Blend ``source`` into ``target`` where ``mask`` is set, by Poisson image editing.

    The solve runs on the bounding box of ``mask`` only, grown by the one voxel of target that
    the Dirichlet condition needs, clipped to the image (see `blend_box`: METHOD.md's box);
    with ``fast_box`` each side is then lengthened by a few voxels at most, where the image
    allows, to a length whose sine transform is fast. Everything outside that box, and the
    box's own border voxels, keep the target's values. The result is not clipped to the
    target's range: the blending tasks do that themselves.

    Parameters
    ----------
    target : ndarray, shape (*spatial), any real dtype
        The image blended into (2D ``(H, W)``, 3D ``(D, H, W)``, or any n >= 1 dims).
    source : ndarray, same shape as ``target``
        The image whose gradients are pasted, already resampled onto the target's grid.
    mask : ndarray of bool (or integer, nonzero = set), same shape as ``target``
        Where the source's gradients may be used. An empty mask returns a copy of ``target``.
    mix_gradients : bool
        True: per axis keep the larger-magnitude gradient of target and source inside the mask
        (the paper's setting). False: the source's gradient everywhere inside the mask.
    fast_box : bool
        False (default): the minimal box, exactly as METHOD.md states it. True: lengthen each
        side of the box to the next length ``L`` with a 5-smooth ``L - 1`` (see
        `fast_box_length`), centred on the mask and clipped to the image. The sine transform
        of an awkward length (a box side of 38 needs a 74 = 2 x 37 point FFT) costs up to 3x
        that of a nearby smooth one, so this makes one solve's cost steady; outside the mask
        the guidance is the target's own gradient, so the larger box is a blend with its fixed
        border moved out by a few voxels (10-14 % different inside the mask). Over whole
        labelled samples it buys no speed (benchmarks/bench_anomalies.py, README), so it is
        off by default.
    workers : int
        Threads for ``scipy.fft`` (default 1: data loaders already run one process per core).
    precision : {"auto", "float32", "float64"}
        Working precision of the solve (the output is float32 either way); see
        `solve_poisson_box`.

    Returns
    -------
    ndarray, float32, shape of ``target``
        A new array; the inputs are untouched.

    Raises
    ------
    ValueError
        Mismatched shapes, a 0-d array, a floating-point mask, or NaN/inf inside the solve box.

    Examples
    --------
    >>> import numpy as np
    >>> target, source = np.random.default_rng(0).normal(size=(2, 32, 32)).astype(np.float32)
    >>> mask = np.zeros((32, 32), bool)
    >>> mask[10:20, 12:22] = True
    >>> out = poisson_blend(target, source, mask)
    >>> out.shape, out.dtype
    ((32, 32), dtype('float32'))
    >>> bool(np.array_equal(out[:5], target[:5]))  # outside the solve box: the target
    True
    """
    target, source, mask = _check_inputs(target, source, mask, "poisson_blend")
    out = np.array(target, dtype=np.float32, copy=True)
    box = blend_box(mask, fast=fast_box)
    if box is None:
        return out
    # NaN/inf are looked for inside the box only: nowhere else can they reach the solve
    out[box] = _solve_box(
        target[box], source[box], mask[box], mix_gradients, workers, precision, "poisson_blend"
    )
    return out


def blend_box(mask: np.ndarray, fast: bool = False) -> tuple[slice, ...] | None:
    """The box `poisson_blend` solves on: the mask's bounding box grown by 1 voxel per side.

    Parameters
    ----------
    mask : ndarray of bool, shape (*spatial)
    fast : bool
        Also lengthen each side to `fast_box_length` of its length, the extra voxels split
        between both ends and shifted inwards at the image's edges (never beyond the image: an
        axis too short for the fast length is taken whole).

    Returns
    -------
    tuple of slices, one per axis, clipped to ``mask.shape``; None if the mask is empty.
    """
    mask = _as_bool_mask(np.asarray(mask), "blend_box")
    tight = bounding_box(mask)
    if tight is None:
        return None
    box = tuple(
        slice(max(side.start - 1, 0), min(side.stop + 1, n))
        for side, n in zip(tight, mask.shape, strict=True)
    )
    if fast:
        box = tuple(_lengthen(side, n) for side, n in zip(box, mask.shape, strict=True))
    return box


def _lengthen(side: slice, size: int) -> slice:
    length = side.stop - side.start
    wanted = min(fast_box_length(length), size)
    start = side.start - (wanted - length) // 2
    start = min(max(start, 0), size - wanted)
    return slice(start, start + wanted)


def solve_poisson_box(
    target: np.ndarray,
    source: np.ndarray,
    mask: np.ndarray,
    mix_gradients: bool = True,
    *,
    workers: int = 1,
    precision: str = "auto",
) -> np.ndarray:
    """Solve the mixed-gradient Poisson equation on one box (METHOD.md §2, steps 1-5).

    The box's border voxels are the Dirichlet condition and keep the target's values, so a mask
    voxel on the border is not blended: give the box a one-voxel margin around the mask (as
    `poisson_blend` does) to blend all of it.

    Parameters
    ----------
    target, source : ndarray, shape (N_0, ..., N_{n-1}), any real dtype
        Box-sized crops of the target and of the (already resampled) source.
    mask : ndarray of bool, same shape
        Where the source's gradients may be used.
    mix_gradients : bool
        See `poisson_blend`.
    workers : int
        Threads for ``scipy.fft``.
    precision : {"auto", "float32", "float64"}
        Working precision. "auto" (default) solves 3D (and higher) boxes in float32 and 2D (and
        1D) boxes in float64. Measured against a float64 sparse direct solve on white-noise
        content with a scattered mask (the hardest case for round-off), float32 stays below
        5e-7 relative error on 3D boxes up to 64x90x64, but reaches 1.5e-6 on 60x60 and 1.3e-5
        on 200x200 2D boxes, above the 1e-6 the project asks for; 2D boxes are small enough that
        float64 costs little there. Smooth content with a shape mask stays near 2e-7 in float32
        in both 2D and 3D.

    Returns
    -------
    ndarray, float32, same shape as ``target``
        The blended box. A box with an axis shorter than 3 has no interior: the target is
        returned (as float32).

    Raises
    ------
    ValueError
        Mismatched shapes, a 0-d array, a floating-point mask, or NaN/inf in target or source.
    """
    target, source, mask = _check_inputs(target, source, mask, "solve_poisson_box")
    return _solve_box(target, source, mask, mix_gradients, workers, precision, "solve_poisson_box")


def _solve_box(target, source, mask, mix_gradients, workers, precision, where) -> np.ndarray:
    """The blended box (float32), solved in the working precision; NaN/inf -> ValueError."""
    work = _working_dtype(precision, target.ndim)
    t = np.asarray(target, dtype=work)
    s = np.asarray(source, dtype=work)
    _check_finite(t, s, where)
    out = np.array(t, dtype=np.float32, copy=True)
    _blend_into(out, t, s, mask, mix_gradients, workers)
    return out


def _blend_into(out, t, s, mask, mix_gradients, workers) -> None:
    """Write the blend of box ``t``/``s``/``mask`` (working dtype) into the interior of ``out``.

    ``out`` (float32, the box's shape, possibly a view into a full image) already holds ``t``.
    """
    n = t.ndim
    shape = t.shape
    if min(shape) < 3 or not mask.any():
        return
    # Solve for the change w = u - target rather than for u itself. Both obey the same discrete
    # system (L u = div g with u = target on the border  <=>  L w = div(g - grad target) with
    # w = 0 on the border), but w is small and zero wherever the guidance is the target's own
    # gradient, so round-off scales with the blend's effect, not with the image's values (this
    # is what keeps float32 within ~2e-7 of a float64 sparse solve on typical content).
    inner = (slice(1, -1),) * n
    rhs = np.zeros(tuple(m - 2 for m in shape), dtype=t.dtype)
    for d in range(n):
        # Forward differences along d over the interior of the other axes only: the interior's
        # divergence needs exactly the differences that start at indices 0 .. N_d - 2 of axis d.
        ahead = inner[:d] + (slice(1, None),) + inner[d + 1 :]
        start = inner[:d] + (slice(None, -1),) + inner[d + 1 :]
        t_grad = t[ahead] - t[start]
        delta = s[ahead] - s[start]  # the source's gradient for now
        use_source = mask[start]
        if mix_gradients:
            use_source = use_source & (np.abs(delta) > np.abs(t_grad))
        delta -= t_grad
        # a multiply, not a masked assignment: branch-free, several times faster on a
        # scattered mask
        delta *= use_source
        # backward difference of the guidance change = its divergence along d on the interior
        rhs += delta[(slice(None),) * d + (slice(1, None),)]
        rhs -= delta[(slice(None),) * d + (slice(None, -1),)]
    if not rhs.any():
        return
    # The orthonormal DST-I is its own inverse, so no separate scaling pass is needed.
    spectrum = scipy.fft.dstn(rhs, type=1, norm="ortho", workers=workers, overwrite_x=True)
    spectrum *= _inverse_eigen_table(shape, np.dtype(t.dtype))
    change = scipy.fft.dstn(spectrum, type=1, norm="ortho", workers=workers, overwrite_x=True)
    # add in the working precision, round once
    change += t[inner]
    out[inner] = change


def _working_dtype(precision: str, ndim: int) -> type:
    if precision == "auto":
        return np.float64 if ndim <= 2 else np.float32
    if precision in ("float32", "float64"):
        return np.dtype(precision).type
    raise ValueError(f"precision must be 'auto', 'float32' or 'float64', got {precision!r}")


def _eigenvalues(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Eigenvalues of the interior Dirichlet Laplacian of a box, in ``dtype``, interior shape.

    n small 1D tables and n - 1 broadcast sums; see `_inverse_eigen_table` for its memoised
    inverse.
    """
    n = len(shape)
    total = None
    for d, size in enumerate(shape):
        eig = np.cos(np.arange(1, size - 1) * (np.pi / (size - 1)))
        eig = (2.0 * eig - 2.0).astype(dtype, copy=False)
        eig = eig.reshape((1,) * d + (-1,) + (1,) * (n - d - 1))
        total = eig if total is None else total + eig
    return total


# Boxes up to this many voxels (every 2D box of a 256x256 image) get their table memoised: 64
# tables of at most 512 KB each.
_CACHED_TABLE_VOXELS = 1 << 16


def _inverse_eigen_table(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``1 / _eigenvalues(shape, dtype)`` (all eigenvalues are negative, never zero).

    For small boxes building the table costs about a tenth of the whole solve and box shapes
    repeat (they come in a few fast lengths), so it is memoised; a multiply is also cheaper than
    a divide. Large (3D) boxes build it per call: there it is cheap next to the transforms, and
    caching would hold megabytes per shape.
    """
    if math.prod(shape) <= _CACHED_TABLE_VOXELS:
        return _cached_inverse_eigenvalues(shape, dtype)
    return 1.0 / _eigenvalues(shape, dtype)


@functools.lru_cache(maxsize=64)
def _cached_inverse_eigenvalues(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    inverse = 1.0 / _eigenvalues(shape, dtype)
    inverse.setflags(write=False)
    return inverse


@functools.lru_cache(maxsize=1024)
def fast_box_length(length: int) -> int:
    """The smallest box length >= ``length`` whose DST-I is fast.

    scipy computes a DST-I of ``M = length - 2`` interior points through a real FFT of
    ``2 (M + 1) = 2 (length - 1)`` points, so the box length ``L`` is fast when ``L - 1`` has only
    small prime factors (``scipy.fft.next_fast_len`` sizes the FFT, not the DST): this asks it
    for the first even, 5-smooth FFT length ``>= 2 (length - 1)``. `poisson_blend` grows its box
    to it (``fast_box=True``); a caller cropping its own box (a task choosing the margin around a
    shape) can do the same.
    """
    if length < 3:
        return length
    fft_length = scipy.fft.next_fast_len(2 * (length - 1), real=True)
    while fft_length % 2:  # the FFT of a DST-I has an even length
        fft_length = scipy.fft.next_fast_len(fft_length + 1, real=True)
    return fft_length // 2 + 1


def _check_inputs(target, source, mask, where: str):
    target = np.asarray(target)
    source = np.asarray(source)
    mask = np.asarray(mask)
    if target.ndim == 0:
        raise ValueError(f"{where}: the target is a scalar; pass an image array (2D or 3D)")
    if source.shape != target.shape or mask.shape != target.shape:
        raise ValueError(
            f"{where}: target {target.shape}, source {source.shape} and mask {mask.shape} must "
            "have the same shape; resample the source onto the target's grid (or crop all three "
            "to the same box) first"
        )
    mask = _as_bool_mask(mask, where)
    for name, arr in (("target", target), ("source", source)):
        if arr.dtype == bool or not (
            np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
        ):
            raise ValueError(f"{where}: the {name} must be a real array, got dtype {arr.dtype}")
    return target, source, mask


def _check_finite(target, source, where: str) -> None:
    for name, arr in (("target", target), ("source", source)):
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise ValueError(
                f"{where}: the {name} holds NaN or infinite values inside the blending box; "
                "replace them (e.g. np.nan_to_num) or keep the mask away from them"
            )


def _as_bool_mask(mask: np.ndarray, where: str) -> np.ndarray:
    if mask.dtype == bool:
        return mask
    if np.issubdtype(mask.dtype, np.integer):
        return mask != 0
    raise ValueError(
        f"{where}: the mask must be a bool (or integer 0/1) array, got dtype {mask.dtype}; "
        "pass e.g. mask > 0.5"
    )
