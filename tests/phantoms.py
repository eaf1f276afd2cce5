"""Synthetic test images shared by several test modules."""

import numpy as np


def noisy_disc(shape, seed, radius=0.8):
    """A noisy bright disc (2D) or ball (3D) of `radius` (in units of half the extent) on 0."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = sum(g**2 for g in grids) < radius**2
    return ((50 + 10 * rng.standard_normal(shape)) * inside).astype(np.float32)


def healthy_disc_folder(folder, shape, n=6):
    """`folder` (created) holding `n` NIfTI files h0..h{n-1} of `noisy_disc(shape, i)`, read
    back by napari_mtml.io as arrays of `shape` (a training set of healthy images)."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        nib.save(nib.Nifti1Image(noisy_disc(shape, i).T, np.eye(4)), folder / f"h{i}.nii.gz")
    return folder
