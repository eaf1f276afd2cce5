"""Sample-level scores of anomaly maps (napari_mtml.scores)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mtml.metrics import summary_scores
from napari_mtml.scores import SAMPLE_SCORES, all_scores, sample_score, smoothed_map


def _map_with_lesion(value=0.9, size=5, shape=(40, 40)):
    heat = np.full(shape, 0.05, np.float32)
    heat[10 : 10 + size, 10 : 10 + size] = value
    return heat


def test_scores_at_known_maps():
    heat = _map_with_lesion()
    mask = np.ones(heat.shape, bool)
    assert sample_score(heat, mask, "mean") == pytest.approx((25 * 0.9 + 1575 * 0.05) / 1600)
    # top 1 % of 1600 voxels = 16 (>= 10), all inside the 25-voxel lesion
    assert sample_score(heat, mask, "top1") == pytest.approx(0.9)
    # the smoothed maximum: a 5x5 plateau keeps most of its height after sigma 1
    assert 0.7 < sample_score(heat, mask, "max") < 0.9
    assert sample_score(heat, mask, "area", threshold=0.5) == pytest.approx(25 / 1600)
    # a single hot voxel moves the smoothed max far less than the raw max
    spike = np.full((40, 40), 0.05, np.float32)
    spike[20, 20] = 1.0
    assert sample_score(spike, None, "max") < 0.3


def test_mask_restricts_the_score_and_bad_calls_refused():
    heat = _map_with_lesion()
    mask = np.zeros(heat.shape, bool)
    mask[20:, 20:] = True  # away from the lesion
    assert sample_score(heat, mask, "top1") == pytest.approx(0.05)
    assert sample_score(heat, np.zeros_like(mask), "top1") == pytest.approx(0.9)  # empty: all
    with pytest.raises(ValueError, match="threshold"):
        sample_score(heat, mask, "area")
    with pytest.raises(ValueError, match="unknown sample score"):
        sample_score(heat, mask, "median")
    with pytest.raises(ValueError, match="does not match"):
        sample_score(heat, mask[:5], "mean")


def test_lesion_ranks_above_healthy_with_top1_not_always_with_mean():
    rng = np.random.default_rng(0)
    healthy = [np.clip(rng.normal(0.1, 0.03, (64, 64)), 0, 1).astype(np.float32) for _ in range(5)]
    lesion = [h.copy() for h in healthy]
    for m in lesion:
        m[5:12, 5:12] = 0.8  # 1.2 % of the image
    healthy[0] += 0.02  # a slightly brighter normal map
    top_h = [sample_score(m, None, "top1") for m in healthy]
    top_l = [sample_score(m, None, "top1") for m in lesion]
    assert min(top_l) > max(top_h)
    assert set(all_scores(healthy[0])) == {"mean", "max", "top1"}
    assert set(all_scores(healthy[0], threshold=0.5)) == set(SAMPLE_SCORES)
    # the evaluation's summary carries the same top1
    assert summary_scores(lesion[0].ravel())["top1"] == pytest.approx(top_l[0])


def test_max_is_the_default_and_smooths_a_volume_by_four_millimetres():
    from scipy import ndimage as ndi

    from napari_mtml.scores import DEFAULT_SAMPLE_SCORE, SMOOTH_MM, SMOOTH_MM_2D, smoothing_mm

    assert DEFAULT_SAMPLE_SCORE == "max"
    assert (SMOOTH_MM, SMOOTH_MM_2D) == (4.0, 2.0)
    spike = np.zeros((24, 40, 40), np.float32)
    spike[12, 20, 20] = 1.0  # one noisy voxel hardly counts
    assert sample_score(spike, None, spacing=(1.0, 1.0, 1.0)) < 0.01
    # 6 mm slices: 4 mm is two thirds of a slice, so the spike keeps more of its value
    assert sample_score(spike, None, spacing=(6.0, 1.0, 1.0)) > 3 * sample_score(
        spike, None, spacing=(1.0, 1.0, 1.0)
    )
    # the sigma is 4 mm / spacing voxels per axis on a volume
    heat = ndi.gaussian_filter(np.random.default_rng(2).random((12, 30, 28)), 1.0)
    heat = heat.astype(np.float32)
    spacing = (5.0, 0.8, 1.0)
    expected = ndi.gaussian_filter(heat, [4.0 / s for s in spacing], mode="nearest")
    np.testing.assert_allclose(smoothed_map(heat, spacing), expected, rtol=1e-6)
    blob = np.zeros((40, 48, 48), np.float32)
    blob[8:32, 12:36, 12:36] = 0.9  # a 24 mm lesion keeps its peak
    assert sample_score(blob, None, spacing=(1.0, 1.0, 1.0)) == pytest.approx(0.9, abs=0.01)
    # a 2D map, and a one-slice volume (nothing to average across), smooth by 2 mm in-plane
    plane = heat[5]
    assert smoothing_mm(plane.shape) == smoothing_mm((1, *plane.shape)) == 2.0
    flat = ndi.gaussian_filter(plane, [2.0 / 0.8, 2.0], mode="nearest")
    assert sample_score(plane, None, spacing=(0.8, 1.0)) == pytest.approx(float(flat.max()))
    assert sample_score(plane[None], None, spacing=spacing) == pytest.approx(float(flat.max()))


def test_a_thin_bright_rim_ranks_below_a_lesion_at_four_millimetres_not_at_two():
    """Why a volume is smoothed by 4 mm: a map that lights a thin rim (a 4 mm band in one 6 mm
    slice, as where a slab cuts the brain's edge, at 0.9) against one that lights a lesion
    (three slices, 12 mm across, at 0.5). 4 mm puts the lesion first; 2 mm the rim."""
    from scipy import ndimage as ndi

    spacing = (6.0, 1.0, 1.0)
    rim = np.zeros((12, 48, 48), np.float32)
    rim[2, 8:40, 8:40] = 0.9
    rim[2, 12:36, 12:36] = 0.0
    lesion = np.zeros_like(rim)
    lesion[5:8, 18:30, 18:30] = 0.5
    assert sample_score(lesion, None, spacing=spacing) > sample_score(rim, None, spacing=spacing)

    def at_2mm(heat):
        return float(ndi.gaussian_filter(heat, [2.0 / s for s in spacing], mode="nearest").max())

    assert at_2mm(rim) > at_2mm(lesion)


@pytest.mark.parametrize("spacing", [None, (1.0, 0.5, 2.0), (3.0, 1.0, 1.0)])
def test_the_max_score_smoothing_a_box_equals_smoothing_the_whole_map(spacing):
    from scipy import ndimage as ndi

    rng = np.random.default_rng(5)
    heat = ndi.gaussian_filter(rng.random((30, 40, 36)), 1.5).astype(np.float32)
    heat[2, 3, 4] = 1.0  # a peak near the edge, outside the mask's box
    mask = np.zeros(heat.shape, bool)
    mask[8:20, 5:30, 0:12] = True  # touches one edge of the map
    mask[10, 12, 20] = True
    whole = float(smoothed_map(heat, spacing)[mask].max())
    assert sample_score(heat, mask, "max", spacing=spacing) == whole
    assert sample_score(heat, None, "max", spacing=spacing) == float(
        smoothed_map(heat, spacing).max()
    )
