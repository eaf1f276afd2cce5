"""Bounding boxes of bool arrays (numpy only): the one `bounding_box` every module uses."""

from __future__ import annotations

import numpy as np

__all__ = ["bounding_box"]


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The tight bounding box of a bool array, one slice per axis; None if it is empty.

    Parameters
    ----------
    mask : ndarray of bool, any number of dimensions

    Returns
    -------
    tuple of slice or None
        `mask[box]` holds every True voxel of `mask` and has a True voxel on each face.

    Examples
    --------
    >>> mask = np.zeros((4, 5), bool)
    >>> mask[1:3, 2] = True
    >>> bounding_box(mask)
    (slice(1, 3, None), slice(2, 3, None))
    """
    box = []
    rest = np.asarray(mask)
    for _ in range(rest.ndim):
        # Profile of the leading axis, then the remaining axes from the slab between its first
        # and last set index only: one full pass over the mask, then ever smaller ones (faster
        # than np.nonzero or ndimage.find_objects on a large, mostly empty mask).
        profile = np.flatnonzero(rest.reshape(rest.shape[0], -1).any(axis=1))
        if profile.size == 0:
            return None
        lo, hi = int(profile[0]), int(profile[-1]) + 1
        box.append(slice(lo, hi))
        rest = rest[lo:hi].any(axis=0)
    return tuple(box)
