"""AP / AUROC vs scikit-learn, the streaming pooled version and its bound, slice/sample scores."""

import math

import numpy as np
import pytest

from napari_mtml.metrics import (
    SLICE_ANOMALY_FRACTION,
    PooledMetrics,
    average_precision,
    precision_recall_curve,
    roc_auc,
    roc_curve,
    sample_scores,
    slice_scores,
    summary_scores,
)

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed", range(6))
def test_equal_to_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 3000))
    levels = int(rng.integers(2, 40))  # few levels -> many ties
    scores = rng.integers(0, levels, n) / levels
    if seed % 2:
        scores = scores + rng.random(n) * (seed == 5)  # also continuous scores
    labels = rng.random(n) < rng.uniform(0.05, 0.6)
    labels[0], labels[1] = True, False
    ap = average_precision(scores, labels)
    auc = roc_auc(scores, labels)
    assert ap == pytest.approx(sklearn_metrics.average_precision_score(labels, scores), abs=1e-9)
    assert auc == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores), abs=1e-9)


def test_equal_to_sklearn_on_float32_maps_and_integer_labels():
    rng = np.random.default_rng(11)
    scores = rng.random((6, 7, 8)).astype(np.float32).round(2)
    labels = (rng.random((6, 7, 8)) < 0.3).astype(np.int16)
    ref_ap = sklearn_metrics.average_precision_score(labels.ravel(), scores.ravel())
    ref_auc = sklearn_metrics.roc_auc_score(labels.ravel(), scores.ravel())
    assert average_precision(scores, labels) == pytest.approx(ref_ap, abs=1e-9)
    assert roc_auc(scores, labels) == pytest.approx(ref_auc, abs=1e-9)


def test_curves_match_sklearn():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 10, 300) / 10
    labels = rng.random(300) < 0.4
    precision, recall = precision_recall_curve(scores, labels)
    p_ref, r_ref, _ = sklearn_metrics.precision_recall_curve(labels, scores)
    # scikit-learn lists from the lowest threshold up and ends at (recall 0, precision 1).
    np.testing.assert_allclose(precision, p_ref[::-1], atol=1e-12)
    np.testing.assert_allclose(recall, r_ref[::-1], atol=1e-12)
    fpr, tpr = roc_curve(scores, labels)
    f_ref, t_ref, _ = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f_ref, atol=1e-12)
    np.testing.assert_allclose(tpr, t_ref, atol=1e-12)


def test_known_values():
    assert average_precision([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert roc_auc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert roc_auc([0.1, 0.2, 0.9], [1, 1, 0]) == 0.0
    # All tied: AUROC 1/2, AP = prevalence.
    assert roc_auc([0.5] * 4, [1, 0, 0, 0]) == 0.5
    assert average_precision([0.5] * 4, [1, 0, 0, 0]) == 0.25
    # Soft labels are binarised at 0.5.
    assert average_precision([0.9, 0.1], [0.7, 0.3]) == 1.0


def test_one_class_gives_nan_and_bad_input_raises():
    assert math.isnan(average_precision([0.1, 0.5], [0, 0]))
    assert math.isnan(roc_auc([0.1, 0.5], [1, 1]))
    assert math.isnan(average_precision([], []))
    with pytest.raises(ValueError, match="same shape"):
        average_precision([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0.1, np.nan], [1, 0])
    pm = PooledMetrics()
    pm.update(np.zeros(5), np.zeros(5))
    out = pm.compute()
    assert math.isnan(out["ap"]) and math.isnan(out["auroc"]) and out["n"] == 5
    with pytest.raises(ValueError, match="mask"):
        pm.update(np.zeros(5), np.zeros(5), mask=np.ones(4, bool))


def test_pooled_equals_exact_for_scores_on_the_bin_grid():
    rng = np.random.default_rng(0)
    bins = 64
    pm = PooledMetrics(bins=bins)
    all_s, all_y = [], []
    for _ in range(4):  # several images pooled
        s = rng.integers(0, bins, (10, 12)) / bins
        y = rng.random((10, 12)) < 0.25
        pm.update(s, y)
        all_s.append(s.ravel())
        all_y.append(y.ravel())
    s, y = np.concatenate(all_s), np.concatenate(all_y)
    out = pm.compute()
    assert out["n"] == s.size and out["n_pos"] == int(y.sum())
    assert out["ap"] == pytest.approx(sklearn_metrics.average_precision_score(y, s), abs=1e-12)
    assert out["auroc"] == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-12)
    # Every bin holds one exact score, so nothing is lost; the bound cannot know that (it only
    # sees counts) and is positive wherever a bin holds both classes.
    assert out["ap_error_bound"] > 0 and out["auroc_error_bound"] > 0


@pytest.mark.parametrize("bins", [16, 256, 65536])
def test_pooled_error_bound_holds(bins):
    rng = np.random.default_rng(bins)
    n = 40_000
    s = rng.random(n) ** 3
    y = rng.random(n) < 0.1 + 0.5 * s
    pm = PooledMetrics(bins=bins)
    for chunk in np.array_split(np.arange(n), 7):
        pm.update(s[chunk], y[chunk])
    out = pm.compute()
    exact_ap = sklearn_metrics.average_precision_score(y, s)
    exact_auc = sklearn_metrics.roc_auc_score(y, s)
    assert abs(out["ap"] - exact_ap) <= out["ap_error_bound"] + 1e-12
    assert abs(out["auroc"] - exact_auc) <= out["auroc_error_bound"] + 1e-12
    if bins == 65536:  # the default is fine enough for 4 decimals
        assert out["ap_error_bound"] < 1e-3 and out["auroc_error_bound"] < 1e-3
    if bins == 16:  # coarse bins really do lose something, and the bound says so
        assert out["ap_error_bound"] > 1e-3


def test_pooled_clips_masks_and_merges():
    rng = np.random.default_rng(5)
    s = rng.random((20, 20)) * 1.6 - 0.3  # outside [0, 1] on both sides
    y = rng.random((20, 20)) < 0.3
    fg = np.zeros((20, 20), bool)
    fg[2:15, 3:18] = True
    pm = PooledMetrics(bins=1 << 20)
    pm.update(s, y, mask=fg)
    out = pm.compute()
    clipped = np.clip(s, 0, 1)[fg]
    assert out["n"] == fg.sum()
    assert out["ap"] == pytest.approx(
        sklearn_metrics.average_precision_score(y[fg], clipped), abs=out["ap_error_bound"] + 1e-12
    )
    a, b = PooledMetrics(bins=1 << 20), PooledMetrics(bins=1 << 20)
    a.update(s[:10], y[:10], mask=fg[:10])
    b.update(s[10:], y[10:], mask=fg[10:])
    a.merge(b)
    assert a.compute() == out
    c = pm.curves()
    assert c["recall"][0] == 0 and c["recall"][-1] == pytest.approx(1.0)
    assert c["fpr"][-1] == pytest.approx(1.0) and np.all(np.diff(c["fpr"]) >= 0)


def test_pooled_memory_is_fixed():
    pm = PooledMetrics(bins=1024)
    size = pm.pos.nbytes + pm.neg.nbytes
    rng = np.random.default_rng(1)
    for _ in range(5):
        pm.update(rng.random(10_000), rng.random(10_000) < 0.2)
    assert pm.pos.nbytes + pm.neg.nbytes == size == 2 * 1024 * 8


def test_summary_scores():
    v = np.arange(1, 9, dtype=float)  # 1..8
    out = summary_scores(v)
    assert out["mean"] == 4.5
    assert out["p75"] == pytest.approx(np.percentile(v, 75))
    assert out["top25_mean"] == 7.5  # mean of the top 2 of 8
    assert summary_scores([3.0])["top25_mean"] == 3.0
    with pytest.raises(ValueError):
        summary_scores([])


def test_slice_scores():
    pred = np.zeros((4, 128, 128), np.float32)
    label = np.zeros((4, 128, 128), bool)
    label[1, :2, :3] = True  # 6 pixels > 5/128^2 of the slice: anomalous
    label[2, :5, :1] = True  # exactly 5 pixels: not "more than", normal
    pred[1, :20, :20] = 0.9
    pred[3] = 2.0  # clipped to 1
    scores, labels = slice_scores(pred, label)
    np.testing.assert_array_equal(labels, [False, True, False, False])
    assert scores["mean"][1] == pytest.approx(0.9 * 400 / 128**2, rel=1e-5)
    assert scores["mean"][3] == pytest.approx(1.0)
    assert scores["top25_mean"][1] == pytest.approx(0.9 * 400 / (128 * 128 / 4), rel=1e-5)
    assert scores["p75"][1] == 0.0
    assert SLICE_ANOMALY_FRACTION == 5 / 128**2
    # Along another axis, and with a foreground that empties slice 0.
    fg = np.ones_like(label)
    fg[0] = False
    scores, labels = slice_scores(pred, label, foreground=fg)
    assert labels.shape == (3,) and scores["mean"].shape == (3,)
    scores, labels = slice_scores(pred, label, axis=2)
    assert labels.shape == (128,) and labels[:3].all() and not labels[3:].any()
    with pytest.raises(ValueError, match="3D"):
        slice_scores(pred[0], label[0])


def test_sample_scores():
    pred = np.full((8, 8), 0.2, np.float32)
    pred[0, :4] = 1.5
    scores, is_anomalous = sample_scores(pred, np.zeros((8, 8)))
    assert not is_anomalous
    assert scores["mean"] == pytest.approx((60 * 0.2 + 4 * 1.0) / 64)
    assert scores["top25_mean"] == pytest.approx((4 * 1.0 + 12 * 0.2) / 16)
    lab = np.zeros((8, 8))
    lab[3, 3] = 1
    fg = np.zeros((8, 8), bool)
    fg[4:] = True
    scores, is_anomalous = sample_scores(pred, lab, foreground=fg)
    assert is_anomalous and scores["mean"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="same shape"):
        sample_scores(pred, lab[:4])
    with pytest.raises(ValueError, match="empty"):
        sample_scores(pred, lab, foreground=np.zeros((8, 8), bool))
