"""Synthetic test images shared by several test modules."""

import numpy as np


def noisy_disc(shape, seed, radius=0.8):
    """A noisy bright disc (2D) or ball (3D) of `radius` (in units of half the extent) on 0."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = sum(g**2 for g in grids) < radius**2
    return ((50 + 10 * rng.standard_normal(shape)) * inside).astype(np.float32)
