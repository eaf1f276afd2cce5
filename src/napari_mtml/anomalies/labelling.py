"""The flipped-Gaussian anomaly label with per-component closing and hole filling (METHOD.md §3).

``x = |augmented - original|`` inside the anomaly mask (0 outside), ``y = 1 - exp(-x^2 / (2
sigma^2))``; then, per connected component of the mask, on the component's bounding box: a grey
closing and a grey-level hole filling (morphological reconstruction by erosion seeded from the
box's border), so that dips inside an anomaly (the centre of a sink or source deformation, voxels
where a blend kept the target's gradient) do not punch holes in its label.

Exactness and speed: the closing runs as separable 1D max/min filters (the footprints, the full
3x3 square in 2D and the 18-neighbourhood in 3D, are unions of 3x3 planes, each the product of
two 1D windows), which gives exactly ``scipy.ndimage.grey_closing`` with that footprint. The hole
filling starts from an upper bound of the result that is already exact wherever the label has no
enclosed dip (straight-line paths to the border, via ``np.maximum.accumulate``), and iterates the
geodesic erosion only on the box around the voxels that bound leaves undecided, until nothing
changes. The iteration decreases monotonically onto the unique fixed point, which is the
reconstruction; the tests check it against a plain implementation of the definition.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import ndimage

from napari_mtml.anomalies.boxes import bounding_box

__all__ = ["flipped_gaussian_label", "fill_holes_grey", "close_grey"]

#: the largest float32 below 1: the label lives in [0, 1)
_BELOW_ONE = np.nextafter(np.float32(1), np.float32(0))


def flipped_gaussian_label(
    augmented: np.ndarray,
    original: np.ndarray,
    mask: np.ndarray,
    sigma: float = 0.2,
) -> np.ndarray:
    """The soft anomaly label of METHOD.md §3 for an augmented image.

    Parameters
    ----------
    augmented, original : ndarray, shape (*spatial) or (C, *spatial), real
        The image after and before the anomalies, in image intensity units (z-score for brain
        MRI, [-1, 1] for chest X-rays). With a leading channel axis ``C`` (one more dimension
        than ``mask``), ``x`` is the mean over channels of the absolute difference.
    mask : ndarray of bool (or integer, nonzero = set), shape (*spatial), 1 to 3+ dims
        The union of the anomaly masks. Connected components are face-connected (4 in 2D, 6 in
        3D).
    sigma : float
        Standard deviation, in intensity units, of the flipped Gaussian (the paper's 0.2:
        x = 0.2 -> 0.39, 0.4 -> 0.86, 0.6 -> 0.99).

    Returns
    -------
    ndarray, float32, shape (*spatial), values in [0, 1)
        0 outside the components' bounding boxes. Inside a box, closing and hole filling may
        lift voxels just outside the mask (a notch or an enclosed gap of a component), never
        above the component's largest value. Components are processed independently (each
        sees only its own voxels, zero elsewhere in its box) and overlapping boxes combine by
        maximum, so the result does not depend on the order of components.

    Raises
    ------
    ValueError
        Mismatched shapes, a 0-d mask, a floating-point mask, a sigma that is not a positive
        finite number, or NaN/inf in either image inside the mask.

    Examples
    --------
    >>> import numpy as np
    >>> original = np.zeros((16, 16), np.float32)
    >>> augmented = original.copy()
    >>> augmented[4:8, 4:8] = 0.4
    >>> label = flipped_gaussian_label(augmented, original, augmented != original)
    >>> round(float(label.max()), 2), float(label[0, 0])
    (0.86, 0.0)
    """
    augmented = np.asarray(augmented)
    original = np.asarray(original)
    mask = np.asarray(mask)
    _check(augmented, original, mask, sigma)
    mask = mask if mask.dtype == bool else mask != 0
    channels = augmented.ndim == mask.ndim + 1
    out = np.zeros(mask.shape, dtype=np.float32)
    whole = bounding_box(mask)
    if whole is not None:
        # face connectivity (ndimage.label's default), on the mask's bounding box only: labelling
        # the whole image would cost more than everything else here for a small anomaly
        _label_region(out, augmented, original, mask[whole], whole, channels, sigma)
    return out


def flipped_gaussian_label_of_boxes(
    augmented: np.ndarray,
    original: np.ndarray,
    boxes,
    masks,
    sigma: float = 0.2,
) -> np.ndarray:
    """`flipped_gaussian_label` of the union of masks given on boxes of the image (no channels).

    The result equals ``flipped_gaussian_label(augmented, original, union)`` with ``union`` the
    OR of every ``masks[i]`` placed at ``boxes[i]``, bit for bit, but the connected components
    are found on groups of nearby boxes instead of on the union's bounding box, which for a few
    anomalies spread over an image is much larger than the anomalies (`synthesize` knows the
    boxes of its patches). Boxes whose one-voxel-grown extents are disjoint cannot hold
    face-adjacent voxels, so each group of overlapping (grown) boxes is labelled on its own.

    Parameters
    ----------
    augmented, original : float32 ndarray, shape (*spatial), finite inside the masks.
    boxes : sequence of tuples of slices (step 1, inside the image), one per mask.
    masks : sequence of bool arrays, each of its box's shape.
    sigma : float, positive.

    Returns
    -------
    ndarray, float32, shape (*spatial), values in [0, 1).
    """
    augmented = np.asarray(augmented)
    original = np.asarray(original)
    out = np.zeros(augmented.shape, dtype=np.float32)
    # groups: [lo, hi, member indices]; merged while their grown extents meet
    groups = []
    for i, box in enumerate(boxes):
        groups.append(([s.start for s in box], [s.stop for s in box], [i]))
    merged = True
    while merged and len(groups) > 1:
        merged = False
        for a, b in itertools.combinations(range(len(groups)), 2):
            (lo_a, hi_a, m_a), (lo_b, hi_b, m_b) = groups[a], groups[b]
            sides = zip(lo_a, hi_a, lo_b, hi_b, strict=True)
            if all(la <= hb and lb <= ha for la, ha, lb, hb in sides):
                groups[a] = (
                    np.minimum(lo_a, lo_b).tolist(),
                    np.maximum(hi_a, hi_b).tolist(),
                    m_a + m_b,
                )
                del groups[b]
                merged = True
                break
    for lo, hi, members in groups:
        region = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        if len(members) == 1:
            local = np.asarray(masks[members[0]], dtype=bool)
        else:
            local = np.zeros([b - a for a, b in zip(lo, hi, strict=True)], dtype=bool)
            for i in members:
                inner = tuple(
                    slice(s.start - a, s.stop - a) for s, a in zip(boxes[i], lo, strict=True)
                )
                local[inner] |= masks[i]
        _label_region(out, augmented, original, local, region, False, sigma)
    return out


def _label_region(out, augmented, original, mask, whole, channels, sigma) -> None:
    """Label every face-connected component of ``mask`` (bool, on the image's box ``whole``)
    into ``out`` (the image's float32 label, combined by maximum)."""
    single = _single_component_2d(mask) if mask.ndim == 2 else None
    if single is not None:
        # one component: its voxels are the mask's, no labelling needed
        components, objects = mask, [single]
    else:
        components, count = ndimage.label(mask)
        objects = ndimage.find_objects(components, max_label=count)
    scale = np.float32(1.0 / (2.0 * float(sigma) ** 2))
    for k, local in enumerate(objects, start=1):
        region = tuple(
            slice(w.start + s.start, w.start + s.stop) for w, s in zip(whole, local, strict=True)
        )
        inside = components[local] if single is not None else components[local] == k
        if channels:
            diff = np.abs(
                np.asarray(augmented[(slice(None), *region)], np.float32)
                - np.asarray(original[(slice(None), *region)], np.float32)
            ).mean(axis=0)
        else:
            diff = np.abs(
                np.asarray(augmented[region], np.float32) - np.asarray(original[region], np.float32)
            )
        x = np.where(inside, diff, np.float32(0))
        if not np.isfinite(x).all():
            raise ValueError(
                "flipped_gaussian_label: the augmented or original image holds NaN or infinite "
                f"values inside the anomaly mask (component at {_describe(region)}); replace "
                "them before labelling"
            )
        # 1 - exp(-t) through expm1: exact for the small differences that matter most
        np.square(x, out=x)
        x *= -scale
        y = np.expm1(x, out=x)
        np.negative(y, out=y)
        np.minimum(y, _BELOW_ONE, out=y)
        filled = fill_holes_grey(close_grey(y))
        np.maximum(out[region], filled, out=out[region])


def _single_component_2d(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The tight bounding box of a 2D bool mask when a cheap sufficient test proves it is one
    face-connected component, else None (then it may or may not be).

    The test: the set rows are consecutive, each row's voxels are one run, and every two
    consecutive runs share a column (so they touch face to face). The raster of one convex
    anomaly shape usually passes it, for a fraction of the cost of ``ndimage.label``.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0 or rows[-1] - rows[0] + 1 != rows.size:
        return None
    band = mask[rows[0] : rows[-1] + 1]
    first = band.argmax(axis=1)
    last = band.shape[1] - 1 - band[:, ::-1].argmax(axis=1)
    # a row holds at most last - first + 1 voxels, so equal totals mean every row is one run
    if np.count_nonzero(band) != int((last - first).sum()) + band.shape[0]:
        return None
    if not (np.maximum(first[:-1], first[1:]) <= np.minimum(last[:-1], last[1:])).all():
        return None
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(first.min()), int(last.max()) + 1)


def close_grey(image: np.ndarray) -> np.ndarray:
    """Grey closing with the ``generate_binary_structure(n, 2)`` footprint, reflect boundary.

    Equal to ``scipy.ndimage.grey_closing(image, footprint=generate_binary_structure(n, 2))``
    (full 3x3 in 2D, 18-neighbourhood in 3D) for any n >= 1, computed with separable 1D filters.

    Parameters
    ----------
    image : ndarray, shape (*spatial), float

    Returns
    -------
    ndarray, same shape and dtype
    """
    image = np.asarray(image)
    if image.ndim == 0:
        return image.copy()
    if image.ndim == 2 and min(image.shape) >= 2:
        image = np.ascontiguousarray(image)
        return _square_filter_2d(_square_filter_2d(image, np.maximum), np.minimum)
    return _plane_union_filter(_plane_union_filter(image, np.maximum), np.minimum)


def _square_filter_2d(image: np.ndarray, op) -> np.ndarray:
    """`_plane_union_filter` of a C-contiguous 2D array (both sides >= 2) on its flat view:
    contiguous 1-D slices instead of short strided rows. Along the rows a flat shift wraps
    from one row's end to the next row's start, so the first and last columns are redone
    with their own (edge-repeating) neighbours afterwards."""
    w = image.shape[1]
    flat = image.reshape(-1)
    cols = np.empty_like(flat)  # the width-3 filter along axis 0
    op(flat[:-w], flat[w:], out=cols[w:])
    cols[:w] = flat[:w]
    op(cols[:-w], flat[w:], out=cols[:-w])
    out = np.empty_like(flat)  # then along axis 1
    op(cols[:-1], cols[1:], out=out[1:])
    op(out[:-1], cols[1:], out=out[:-1])
    cols, out = cols.reshape(image.shape), out.reshape(image.shape)
    op(cols[:, 0], cols[:, 1], out=out[:, 0])
    op(cols[:, -2], cols[:, -1], out=out[:, -1])
    return out


def fill_holes_grey(image: np.ndarray) -> np.ndarray:
    """Grey-level hole filling: reconstruction by erosion seeded from the array's border.

    The result at a voxel is the smallest, over all paths from it to the array's border
    (steps within the ``generate_binary_structure(n, 2)`` neighbourhood), of the largest value
    along the path: the same as ``skimage.morphology.reconstruction(seed, image,
    method="erosion", footprint=generate_binary_structure(n, 2))`` with ``seed`` = ``image`` on
    the border and ``image.max()`` inside.

    Parameters
    ----------
    image : ndarray, shape (*spatial), float

    Returns
    -------
    ndarray, same shape and dtype, >= image, equal to it on the border. A new array.
    """
    image = np.asarray(image)
    if image.ndim == 0 or min(image.shape) < 3:
        return image.copy()
    bound = _straight_path_bound(image, axes=(0,) if image.ndim == 2 else None)
    undecided = bound > image
    if not undecided.any():
        return bound  # == image: nothing is enclosed
    # Outside `undecided` the bound equals the image and hence the result; iterate on the box
    # around the undecided voxels only, its border (decided voxels) held by the image itself.
    box = bounding_box(undecided)
    box = tuple(slice(s.start - 1, s.stop + 1) for s in box)  # undecided never on the border
    marker = bound[box]  # a view: the result ends up in `bound`
    floor = np.ascontiguousarray(image[box])
    # Two contiguous buffers with the same (fixed) border, swapped each step; the iterates only
    # decrease, so two equal consecutive ones mean convergence: compare on every second step.
    # Every view and scratch array of a step is made once: on the small boxes here a step is a
    # handful of ufunc calls, and rebuilding slices each time cost more than the arithmetic.
    buffers = (np.ascontiguousarray(marker), np.array(marker, order="C"))
    steps = [_erosion_step(buffers[i], buffers[1 - i], floor) for i in (0, 1)]
    same = _equality_test(*buffers)
    for step in range(marker.size + 2):
        for ufunc, first, second, out in steps[step % 2]:
            ufunc(first, second, out=out)
        if step % 2 and same():
            break
    marker[...] = buffers[(step + 1) % 2]
    return bound


def _straight_path_bound(image: np.ndarray, axes=None) -> np.ndarray:
    """Upper bound of the hole filling: the best straight path along each axis, in each
    direction, to the border (the minimum over the axes of min(running max from the start,
    running max from the end)). A new C-contiguous array of the image's shape and dtype.

    ``axes`` (default all) limits the paths to those axes; the border, where the filling is
    the image itself, is then set to the image. In 2D the leading axis alone, which needs no
    transposed copy, is cheaper overall: the iteration that follows finishes the job in a few
    more steps than after the full bound."""
    bound = None
    for d in range(image.ndim) if axes is None else axes:
        # the axis first and contiguous: a shift along it is then a shift of the flat array
        lines = np.ascontiguousarray(image if d == 0 else np.moveaxis(image, d, 0))
        flat = lines.reshape(-1)
        forward = _running_max(flat, lines.shape[0], reverse=False)
        np.minimum(forward, _running_max(flat, lines.shape[0], reverse=True), out=forward)
        along = forward.reshape(lines.shape)
        if d:
            along = np.moveaxis(along, 0, d)
        if bound is None:
            bound = np.ascontiguousarray(along)
        else:
            np.minimum(bound, along, out=bound)
    if axes is not None:
        for d in set(range(image.ndim)) - set(axes):
            for end in (0, -1):
                face = (slice(None),) * d + (end,)
                bound[face] = image[face]
    return bound


def _running_max(flat: np.ndarray, length: int, reverse: bool) -> np.ndarray:
    """Running maximum along the leading axis (``length`` long) of a C-contiguous array given
    flat, from its start (or its end with ``reverse``): the same values as
    ``np.maximum.accumulate``, by ceil(log2(length)) doubling steps, each one contiguous
    ``np.maximum`` over all lines at once (``accumulate`` runs element by element, several
    times slower). Returns a new flat array; ``flat`` is not modified."""
    stride = flat.size // length
    source, out = flat, np.empty_like(flat)
    shift = 1
    while shift < length:
        k = shift * stride
        if reverse:  # out[i] = max(source[i], source[i + shift]) where that exists
            np.maximum(source[:-k], source[k:], out=out[:-k])
            out[-k:] = source[-k:]
        else:
            np.maximum(source[k:], source[:-k], out=out[k:])
            out[:k] = source[:k]
        # ping-pong between two scratch buffers, never writing into `flat`
        source, out = out, (np.empty_like(flat) if source is flat else source)
        shift *= 2
    return source.copy() if source is flat else source


def _erosion_step(source: np.ndarray, target: np.ndarray, floor: np.ndarray) -> list:
    """One step of the geodesic erosion as a list of ``(ufunc, a, b, out)`` calls on fixed views.

    ``source``, ``target`` and ``floor`` are C-contiguous arrays of one shape whose border
    voxels hold the same values (the fixed border of the reconstruction). Running the calls
    sets ``target = max(erosion(source), floor)`` on the interior, the erosion taken over the
    ``generate_binary_structure(n, 2)`` footprint (the union of the 3x3 planes through the
    centre, as in `_plane_union_filter`), and leaves the border as it was.

    Every call works on the flattened arrays, where a step along axis ``d`` is a shift by its
    stride: 1-D contiguous slices cost a fraction of the 2-D/3-D strided ones, whose short
    rows made numpy loop row by row. Shifts wrap from one row's end to the next row's start;
    that only matters on border voxels, and there the minimum, which always includes the voxel
    itself, is at most its value, so the maximum with ``floor`` restores it exactly.
    """
    n = source.ndim
    size = source.size
    if not (source.flags.c_contiguous and target.flags.c_contiguous and floor.flags.c_contiguous):
        raise AssertionError("_erosion_step needs C-contiguous arrays (flat views)")
    src, dst, low = source.reshape(-1), target.reshape(-1), floor.reshape(-1)
    strides = [math.prod(source.shape[d + 1 :]) for d in range(n)]
    lo = sum(strides)  # the first interior voxel's flat index; the last is size - 1 - lo
    hi = size - lo
    result = dst[lo:hi]
    calls = []

    def min3(array, start, stop, step, out, fold):
        """out[k - start'] = min(array[k - step], array[k], array[k + step]) for k in
        [start, stop), where ``array`` holds flat indices [start - step, stop + step)."""
        parts = [
            array[: stop - start],
            array[step : step + stop - start],
            array[2 * step : 2 * step + stop - start],
        ]
        if not fold:
            calls.append((np.minimum, parts[0], parts[1], out))
            parts = parts[2:]
        calls.extend((np.minimum, out, part, out) for part in parts)

    if n == 1:
        min3(src, lo, hi, 1, result, fold=False)
    else:
        started = False
        for a in range(n - 1):
            # the line minimum along axis a, on the flat range the planes (a, b > a) read
            reach = strides[a + 1]
            first, last = lo - reach, hi + reach
            line = np.empty(last - first, source.dtype)
            min3(
                src[first - strides[a] : last + strides[a]],
                first,
                last,
                strides[a],
                line,
                fold=False,
            )
            for b in range(a + 1, n):
                skip = reach - strides[b]  # line starts at `first`; the plane reads from lo - s_b
                view = line[skip : skip + (hi - lo) + 2 * strides[b]]
                min3(view, lo, hi, strides[b], result, fold=started)
                started = True
    calls.append((np.maximum, result, low[lo:hi], result))
    return calls


def _equality_test(first: np.ndarray, second: np.ndarray):
    """A no-argument test that two same-shape contiguous arrays hold equal bytes: comparing raw
    bytes is the cheapest way for small arrays, a ufunc for large ones."""
    if first.nbytes <= 16384:
        return lambda: first.tobytes() == second.tobytes()
    scratch = np.empty(first.shape, bool)
    return lambda: not np.not_equal(first, second, out=scratch).any()


def _plane_union_filter(image, op):
    """Flat max/min filter (``op`` = np.maximum / np.minimum) over the footprint
    ``generate_binary_structure(n, 2)``, reflect boundary, same shape as ``image``.

    That footprint is the union of the full 3x3 planes through the centre spanned by every
    pair of axes (in 2D a single plane: the full 3x3 square), and each plane's filter is two
    1D filters of width 3.
    """
    n = image.ndim
    if n == 1:
        return _filter3(image, 0, op)
    lines = {}
    result = None
    for a, b in itertools.combinations(range(n), 2):
        if a not in lines:
            lines[a] = _filter3(image, a, op)
        plane = _filter3(lines[a], b, op)
        result = plane if result is None else op(result, plane, out=result)
    return result


def _filter3(image, axis, op):
    """Width-3 running max/min along ``axis`` with scipy's "reflect" boundary (the edge voxel
    repeats), by slicing: ``minimum_filter1d`` costs several times more on small arrays."""
    lead = (slice(None),) * axis
    head = (*lead, slice(None, -1))
    tail = (*lead, slice(1, None))
    out = np.empty_like(image)
    if image.shape[axis] == 1:
        out[...] = image
        return out
    out[(*lead, 0)] = image[(*lead, 0)]
    op(image[head], image[tail], out=out[tail])  # out[i] = op(a[i-1], a[i]), i >= 1
    op(out[head], image[tail], out=out[head])  # then with a[i+1], i <= N - 2
    return out


def _describe(region) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in region) + "]"


def _check(augmented, original, mask, sigma) -> None:
    where = "flipped_gaussian_label"
    if mask.ndim == 0:
        raise ValueError(f"{where}: the mask is a scalar; pass a 2D or 3D bool array")
    if mask.dtype != bool:
        if not np.issubdtype(mask.dtype, np.integer):
            raise ValueError(
                f"{where}: the mask must be a bool (or integer 0/1) array, got dtype "
                f"{mask.dtype}; pass e.g. mask > 0.5"
            )
    if augmented.shape != original.shape:
        raise ValueError(
            f"{where}: augmented {augmented.shape} and original {original.shape} must have the "
            "same shape"
        )
    if augmented.shape != mask.shape and augmented.shape[1:] != mask.shape:
        raise ValueError(
            f"{where}: the images {augmented.shape} and the mask {mask.shape} must have the same "
            "spatial shape (the images may have one extra, leading channel axis)"
        )
    for name, arr in (("augmented", augmented), ("original", original)):
        if arr.dtype == bool or not (
            np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
        ):
            raise ValueError(f"{where}: the {name} image must be real, got dtype {arr.dtype}")
    try:
        ok = np.isfinite(float(sigma)) and float(sigma) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{where}: sigma must be a positive finite number, got {sigma!r}")
