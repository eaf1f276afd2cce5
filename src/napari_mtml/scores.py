"""Sample-level scores of an anomaly map: "is this scan abnormal?" as one number.

```python
from napari_mtml.scores import sample_score, SAMPLE_SCORES
sample_score(heat, mask, "max", spacing=(6.5, 0.8, 0.8))   # peak of the map smoothed by 4 mm
all_scores(heat, mask, threshold=0.3)    # {"mean": ..., "max": ..., "top1": ..., "area": ...}
```

Methods (each over the voxels of `mask`; the whole map without one):

- ``"mean"``: the mean of the map (METHOD.md section 8; dominated by the many normal voxels, so a
  small lesion hardly moves it).
- ``"max"`` (the default): the maximum of the map after a Gaussian smoothing (sigma
  `mm / spacing` voxels per axis; 1 voxel without a spacing), so that a single noisy voxel or a
  thin rim does not decide: 4 mm (`SMOOTH_MM`) for a volume, 2 mm (`SMOOTH_MM_2D`) for a 2D map
  (an X-ray, a single slice; `smoothing_mm`).
- ``"top1"``: the mean of the highest 1 % of the map (at least 10 voxels): a lesion of a
  percent of the organ fills it; normal scans keep it low.
- ``"area"``: the fraction of the voxels above `threshold` (a value calibrated on healthy scans,
  e.g. the run's `calibration.json`); needs the threshold.

The default (`DEFAULT_SAMPLE_SCORE`) was chosen by measurement on held-out lesions unlike the
training tasks (benchmarks/quality_unseen.py, where it is `max_smooth`; the figures are in the
README): it ranked lesioned volumes and slices above healthy ones better than the others on
every run measured (volume AUROC 0.64 against 0.56 for top1 with the built-in model), and the
tumour sample's slices too (slice AUROC 0.96 against 0.94). The smoothing of volumes was 2 mm
until measured on four sets of that benchmark's maps: 4 mm ranked lesioned volumes above healthy
ones better on three (volume AUROC 0.679 -> 0.722 and 0.646 -> 0.674 with the built-in model on
two independent draws, 0.624 -> 0.697 with a 15-minute run's maps) and level on the fourth
(T2-like heads, 0.711 -> 0.699), slices better on all four (+0.02) and the tumour sample's as
well, because it averages across slices: the healthy thick-slice maps peak on the thin rim
where a slab cuts the brain's edge, which a smoothing within each slice alone (2D) does not damp
(0.626 -> 0.640 and 0.633 -> 0.628), so 2D maps keep 2 mm.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from napari_mtml.anomalies.boxes import bounding_box

__all__ = [
    "SAMPLE_SCORES",
    "DEFAULT_SAMPLE_SCORE",
    "SMOOTH_MM",
    "SMOOTH_MM_2D",
    "sample_score",
    "all_scores",
    "smoothed_map",
    "smoothing_mm",
    "score_description",
]

SAMPLE_SCORES = ("mean", "max", "top1", "area")
DEFAULT_SAMPLE_SCORE = "max"
#: mm of the Gaussian smoothing of the "max" score on a volume (`smoothing_mm`)
SMOOTH_MM = 4.0
#: mm of the same smoothing on a 2D map (an X-ray, a single slice)
SMOOTH_MM_2D = 2.0
_TOP_FRACTION = 0.01
_TOP_MIN = 10


def _mask_for(heat: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """`mask` as bool of `heat`'s shape (ValueError otherwise), None for none."""
    if mask is None:
        return None
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != heat.shape:
        raise ValueError(f"mask of shape {mask.shape} does not match the map's {heat.shape}")
    return mask


def _values(heat: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    heat = np.asarray(heat, dtype=np.float32)
    mask = _mask_for(heat, mask)
    if mask is None:
        return heat.ravel()
    return heat[mask] if mask.any() else heat.ravel()


def smoothing_mm(shape) -> float:
    """mm of the "max" score's smoothing for a map of `shape`: `SMOOTH_MM` for a volume (three
    axes, each longer than one voxel), `SMOOTH_MM_2D` otherwise (a 2D map, or a ``(1, y, x)``
    slice, which has nothing to average across).

    >>> smoothing_mm((40, 200, 180)), smoothing_mm((1, 200, 180)), smoothing_mm((512, 512))
    (4.0, 2.0, 2.0)
    """
    shape = tuple(shape)
    return SMOOTH_MM if len(shape) == 3 and min(shape) > 1 else SMOOTH_MM_2D


def score_description(method: str, shape=None) -> str:
    """A short phrase that says what a sample score of a map of `shape` is, for a label.

    >>> score_description("max", (40, 200, 180))
    'peak of the map smoothed by 4 mm inside the mask'
    """
    if method == "max":
        mm = SMOOTH_MM if shape is None else smoothing_mm(shape)
        return f"peak of the map smoothed by {mm:g} mm inside the mask"
    return {
        "top1": "mean of the map's highest 1 % inside the mask",
        "mean": "mean of the map inside the mask",
        "area": "fraction of the mask above the healthy threshold",
    }.get(method, method)


def smoothed_map(heat: np.ndarray, spacing=None) -> np.ndarray:
    """The map the "max" score takes its peak of: a Gaussian smoothing of `smoothing_mm` mm.

    Parameters
    ----------
    heat : ndarray of float, 2D or 3D
    spacing : sequence of float, optional
        mm per axis (sigma `smoothing_mm / spacing` voxels); 1 voxel per axis without it (or for an
        axis whose spacing is missing, zero or not finite). A longer spacing (a 2D map of a
        ``(1, y, x)`` scan) uses its last entries.

    Returns
    -------
    ndarray of float32, the shape of `heat`

    Examples
    --------
    >>> import numpy as np
    >>> heat = np.zeros((9, 9), np.float32); heat[4, 4] = 1.0
    >>> smooth = smoothed_map(heat, spacing=(1.0, 1.0))
    >>> bool(smooth.max() < 1.0), int(smooth.argmax())
    (True, 40)
    """
    heat = np.asarray(heat, dtype=np.float32)
    return ndimage.gaussian_filter(heat, _sigmas(heat.shape, spacing), mode="nearest")


def _sigmas(shape, spacing) -> list[float]:
    """`smoothed_map`'s sigma per axis, in voxels."""
    ndim = len(shape)
    if spacing is None:
        return [1.0] * ndim
    spacing = tuple(spacing)
    if len(spacing) < ndim:
        raise ValueError(f"spacing {spacing} does not match a {ndim}D map")
    spacing = spacing[len(spacing) - ndim :]
    mm = smoothing_mm(shape)
    return [mm / float(s) if s and math.isfinite(s) and s > 0 else 1.0 for s in spacing]


def _smoothed_peak(heat: np.ndarray, mask: np.ndarray | None, spacing) -> float:
    """The peak of `smoothed_map` inside `mask`, smoothing only the mask's bounding box grown by
    the Gaussian's reach (scipy's: 4 sigma): every value inside the box sees the same
    neighbours as on the whole map, or the same edge of the map, so the peak is the same; a
    brain inside a head volume is a fraction of it."""
    mask = _mask_for(heat, mask)
    tight = None if mask is None else bounding_box(mask)
    if tight is None:  # no mask, or an empty one: the whole map
        return float(smoothed_map(heat, spacing).max())
    sigma = _sigmas(heat.shape, spacing)
    reaches = [int(4.0 * sd + 0.5) for sd in sigma]
    box = tuple(
        slice(max(0, s.start - reach), min(n, s.stop + reach))
        for s, n, reach in zip(tight, mask.shape, reaches, strict=True)
    )
    smooth = ndimage.gaussian_filter(heat[box], sigma, mode="nearest")
    return float(smooth[mask[box]].max())


def sample_score(
    heat: np.ndarray,
    mask: np.ndarray | None = None,
    method: str = DEFAULT_SAMPLE_SCORE,
    *,
    threshold: float | None = None,
    spacing=None,
) -> float:
    """One sample-level score of an anomaly map (see the module docstring for `method`).

    Parameters
    ----------
    heat : ndarray of float, 2D or 3D
        Values in [0, 1].
    mask : ndarray of bool, optional
        Same shape; an empty mask counts as none.
    method : str
        A name of `SAMPLE_SCORES`.
    threshold : float, optional
        For "area".
    spacing : sequence of float, optional
        mm per axis: "max" smooths by `smoothing_mm` mm along each axis (1 voxel without it).

    Returns
    -------
    float
    """
    if method not in SAMPLE_SCORES:
        raise ValueError(f"unknown sample score {method!r}; use one of {', '.join(SAMPLE_SCORES)}")
    heat = np.asarray(heat, dtype=np.float32)
    if method == "mean":
        return float(_values(heat, mask).mean(dtype=np.float64))
    if method == "max":
        return _smoothed_peak(heat, mask, spacing)
    values = _values(heat, mask)
    if method == "top1":
        k = min(values.size, max(_TOP_MIN, math.ceil(_TOP_FRACTION * values.size)))
        return float(
            np.partition(values, values.size - k)[values.size - k :].mean(dtype=np.float64)
        )
    if threshold is None or not math.isfinite(threshold):
        raise ValueError("the 'area' sample score needs a threshold calibrated on healthy scans")
    return float(np.mean(values > threshold))


def all_scores(
    heat: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    threshold: float | None = None,
    spacing=None,
) -> dict[str, float]:
    """Every sample score of `SAMPLE_SCORES` ("area" only with a threshold).

    Parameters
    ----------
    heat, mask, threshold, spacing
        As `sample_score`.

    Returns
    -------
    dict of str to float
        Method -> score.
    """
    out = {m: sample_score(heat, mask, m, spacing=spacing) for m in ("mean", "max", "top1")}
    if threshold is not None:
        out["area"] = sample_score(heat, mask, "area", threshold=threshold)
    return out
