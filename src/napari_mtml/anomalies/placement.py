"""Placement of a shape in the image with the foreground rule (METHOD.md §1).

The corner of the shape's box is uniform in `[0, D - box]`; with a foreground mask a position is
accepted only when at least half of the shape's voxels lie on the foreground. The reference looped
forever where no position qualifies; here the attempts are bounded and a clear `ValueError` says
why.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from napari_mtml.anomalies.shapes import Shape

MIN_FOREGROUND_FRACTION = 0.5


class PlacementError(ValueError):
    """No position of a shape satisfies the foreground rule within the allowed attempts."""


@dataclass(frozen=True, eq=False)
class PlacedShape:
    """A shape at a position in the image.

    Attributes
    ----------
    shape : the rasterised `Shape`.
    corner : (n,) int, index of the box's first voxel in the image.
    """

    shape: Shape
    corner: tuple[int, ...]

    @functools.cached_property
    def box(self) -> tuple[slice, ...]:
        """Slices of the image covered by the shape's box."""
        return tuple(
            slice(c, c + s) for c, s in zip(self.corner, self.shape.mask.shape, strict=True)
        )

    @property
    def mask(self) -> np.ndarray:
        """The shape's voxels on its box (bool)."""
        return self.shape.mask

    def padded_box(self, image_shape, margin: int) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """The box grown by `margin` voxels per side, clipped to the image.

        Returns `(outer, inner)`: slices of the image for the grown box, and slices of the grown box
        that hold the shape's own box.
        """
        outer, inner = [], []
        for c, s, dim in zip(self.corner, self.shape.mask.shape, image_shape, strict=True):
            lo = max(c - margin, 0)
            hi = min(c + s + margin, dim)
            outer.append(slice(lo, hi))
            inner.append(slice(c - lo, c - lo + s))
        return tuple(outer), tuple(inner)


def place_shape(
    shape: Shape,
    image_shape,
    rng: np.random.Generator,
    foreground: np.ndarray | None = None,
    max_attempts: int = 100,
) -> PlacedShape:
    """Choose a position for `shape` in an image of `image_shape`.

    Parameters
    ----------
    shape : the rasterised shape; its box must fit in the image.
    image_shape : the image's spatial shape.
    rng : the random generator.
    foreground : bool array of `image_shape`, or None (= everywhere is foreground).
    max_attempts : corners tried before giving up.

    Raises
    ------
    PlacementError (a ValueError) when the box does not fit or no tried position has at least 50% of
    the shape's voxels on the foreground.

    Returns
    -------
    PlacedShape
        `box` (the image slices of the shape's box), `corner`, and the shape.

    Examples
    --------
    >>> import numpy as np
    >>> from napari_mtml.anomalies import random_shape
    >>> rng = np.random.default_rng(0)
    >>> placed = place_shape(random_shape((64, 64), rng), (64, 64), rng)
    >>> image = np.zeros((64, 64), np.float32)
    >>> image[placed.box][placed.shape.mask] = 1.0
    >>> int(image.sum()) == int(placed.shape.mask.sum())
    True
    """
    box = shape.mask.shape
    dims = tuple(int(d) for d in image_shape)
    room = [d - b for d, b in zip(dims, box, strict=True)]
    if min(room) < 0:
        raise PlacementError(
            f"the anomaly shape {tuple(box)} does not fit in an image of {tuple(dims)}: "
            "use a larger image or a smaller max_size"
        )
    n_voxels = int(np.count_nonzero(shape.mask))
    need = MIN_FOREGROUND_FRACTION * n_voxels
    for _ in range(max(int(max_attempts), 1)):
        corner = tuple(int(rng.integers(0, r + 1)) for r in room)
        placed = PlacedShape(shape, corner)
        if foreground is None:
            return placed
        on = np.count_nonzero(foreground[placed.box] & shape.mask)
        if on >= need:
            return placed
    raise PlacementError(
        f"no position with at least {MIN_FOREGROUND_FRACTION:.0%} of a {tuple(box)} anomaly on the "
        f"foreground was found in {max_attempts} attempts: the foreground "
        f"({int(np.count_nonzero(foreground))} voxels) is too small or too thin; pass a larger "
        "foreground mask, foreground=None, or a smaller max_size"
    )
