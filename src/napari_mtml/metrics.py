"""Average precision and ROC AUC at pixel, slice and sample level (METHOD.md §8), numpy only.

- :func:`average_precision` and :func:`roc_auc` give exactly what scikit-learn's
  ``average_precision_score`` and ``roc_auc_score`` give for binary labels, ties included
  (every distinct score is one threshold; AUROC is the trapezoid area of the ROC curve).
- :class:`PooledMetrics` pools any number of voxels in fixed memory: it counts positives and
  negatives in fine score bins on ``[0, 1]`` (scores are clipped to ``[0, 1]`` first, as §8 says
  to clip predictions). Its results equal the exact metrics of the scores rounded down to their
  bin, and :meth:`PooledMetrics.compute` also returns a guaranteed bound on the difference from
  the exact values of the clipped scores.
- :func:`slice_scores` and :func:`sample_scores` turn maps into per-slice / per-image scores and
  labels; their ``"max"`` is the peak of the map smoothed by 4 mm (`napari_mtml.scores`' default
  sample score, the one `mtml predict` writes), the others summarise the raw values.

Labels: ``bool``, or numbers binarised as ``label > 0.5`` (integer masks and soft labels alike).
When only one class is present AP and AUROC are undefined: they are returned as ``nan`` (no
exception, no warning), so that a batch or an image without anomalies can be skipped by the caller.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "average_precision",
    "roc_auc",
    "precision_recall_curve",
    "roc_curve",
    "PooledMetrics",
    "summary_scores",
    "slice_scores",
    "sample_scores",
    "SCORE_NAMES",
    "SLICE_ANOMALY_FRACTION",
]

#: Names of the per-slice / per-sample scores: mean, 75th percentile, mean of the top 25 %, mean
#: of the top 1 %, and "max", the peak of the map smoothed by 4 mm (the default sample score).
SCORE_NAMES = ("mean", "p75", "top25_mean", "top1", "max")
#: A slice is anomalous if more than this fraction of its pixels is (5 pixels of a 128x128 slice).
SLICE_ANOMALY_FRACTION = 5 / 128**2


def _as_binary(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels
    if not np.issubdtype(labels.dtype, np.number):
        raise ValueError(f"labels must be bool or numeric, got dtype {labels.dtype}.")
    return labels > 0.5


def _check_pair(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.shape != labels.shape:
        raise ValueError(
            f"scores and labels must have the same shape, got {scores.shape} and {labels.shape}."
        )
    if not np.issubdtype(scores.dtype, np.number) or np.iscomplexobj(scores):
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}.")
    scores = scores.ravel()
    if not np.isfinite(scores).all():
        raise ValueError(
            "scores contain NaN or infinite values; check the prediction (e.g. a failed "
            "inference) before computing metrics."
        )
    return scores, _as_binary(labels).ravel()


def _threshold_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positives and negatives per distinct score, from the highest score to the lowest."""
    order = np.argsort(scores, kind="stable")[::-1]
    s = scores[order]
    y = labels[order]
    # Last index of every run of equal scores: one threshold each, as scikit-learn does.
    ends = np.flatnonzero(np.diff(s)) if s.size else np.array([], dtype=np.int64)
    ends = np.append(ends, s.size - 1) if s.size else ends
    tps = np.cumsum(y, dtype=np.int64)[ends]
    fps = (ends + 1) - tps
    pos = np.diff(tps, prepend=0)
    neg = np.diff(fps, prepend=0)
    return pos, neg


def _ap_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """AP from per-threshold counts ordered from the highest threshold down."""
    tps = np.cumsum(pos, dtype=np.float64)
    fps = np.cumsum(neg, dtype=np.float64)
    n_pos = tps[-1] if tps.size else 0.0
    n_neg = fps[-1] if fps.size else 0.0
    if n_pos == 0 or n_neg == 0:
        return math.nan
    keep = pos > 0  # thresholds where recall does not move add nothing
    precision = tps[keep] / (tps[keep] + fps[keep])
    return float(np.sum(pos[keep] / n_pos * precision))


def _auc_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """Trapezoid ROC area from per-threshold counts ordered from the highest threshold down."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    n_pos = pos.sum()
    n_neg = neg.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # Each threshold step adds a trapezoid: width neg/N, mean height (tp_before + pos/2)/P.
    tp_before = np.cumsum(pos) - pos
    return float(np.sum(neg * (tp_before + 0.5 * pos)) / (n_pos * n_neg))


def average_precision(scores, labels) -> float:
    """Average precision, equal to ``sklearn.metrics.average_precision_score``.

    ``AP = sum_k (R_k - R_{k-1}) P_k`` over the distinct scores ``k`` from the highest down.

    Parameters
    ----------
    scores : array_like of float, any shape
        Higher = more anomalous. Must be finite.
    labels : array_like, same shape
        bool, or numbers binarised as ``> 0.5``.

    Returns
    -------
    float
        In ``[0, 1]``; ``nan`` if there is no positive or no negative.
    """
    scores, labels = _check_pair(scores, labels)
    return _ap_from_counts(*_threshold_counts(scores, labels))


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve, equal to ``sklearn.metrics.roc_auc_score`` for binary labels.

    Ties count one half (trapezoid rule). Same arguments as :func:`average_precision`; ``nan`` if
    only one class is present.

    Parameters
    ----------
    scores, labels
        As `average_precision`.

    Returns
    -------
    float

    Examples
    --------
    >>> roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    """
    scores, labels = _check_pair(scores, labels)
    return _auc_from_counts(*_threshold_counts(scores, labels))


def _curves(pos: np.ndarray, neg: np.ndarray) -> dict:
    tps = np.cumsum(pos, dtype=np.float64)
    fps = np.cumsum(neg, dtype=np.float64)
    n_pos = tps[-1] if tps.size else 0.0
    n_neg = fps[-1] if fps.size else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tps + fps > 0, tps / (tps + fps), 1.0)
        recall = tps / n_pos if n_pos else np.full_like(tps, np.nan)
        fpr = fps / n_neg if n_neg else np.full_like(fps, np.nan)
    return {
        "precision": np.concatenate([[1.0], precision]),
        "recall": np.concatenate([[0.0], recall]),
        "fpr": np.concatenate([[0.0], fpr]),
        "tpr": np.concatenate([[0.0], recall]),
    }


def precision_recall_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at every distinct score, from the highest threshold down.

    Parameters
    ----------
    scores : array_like of float
    labels : array_like of bool
        As for `average_precision`.

    Returns
    -------
    precision, recall : ndarray of float64
        Starting at the point ``(1, 0)``.
    """
    scores, labels = _check_pair(scores, labels)
    c = _curves(*_threshold_counts(scores, labels))
    return c["precision"], c["recall"]


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct score, starting at ``(0, 0)``.

    Parameters
    ----------
    scores, labels : array_like
        See `average_precision`.

    Returns
    -------
    fpr, tpr : ndarray of float64
        False and true positive rates.
    """
    scores, labels = _check_pair(scores, labels)
    c = _curves(*_threshold_counts(scores, labels))
    return c["fpr"], c["tpr"]


class PooledMetrics:
    """AP and AUROC pooled over any number of voxels in fixed memory.

    Scores are clipped to ``[0, 1]`` and counted per class in ``bins`` equal bins (bin ``b`` holds
    ``[b / bins, (b + 1) / bins)``, the last bin includes 1). Memory: two int64 arrays of
    ``bins`` entries (1 MiB for the default 65,536 bins), whatever the number of voxels.

    Error bound (returned by :meth:`compute`): the histogram result is the exact metric of the
    scores rounded down to their bin, so it can only differ from the exact metric of the clipped
    scores through the order of positives and negatives *within* a bin. With ``p_b``, ``n_b`` the
    bin's counts and ``T_b``, ``F_b`` the positives and negatives in higher bins:

    - AUROC: ``|error| <= sum_b p_b n_b / (2 P N)`` (pairs in one bin count 1/2 instead of 0 or 1);
    - AP: ``|error| <= sum_b (p_b / P) [(T_b + p_b)/(T_b + F_b + p_b) - (T_b + 1)/(T_b + F_b + 1 +
      n_b)]`` (every positive's precision lies between its best and worst order in the bin).

    Both bounds are zero when no bin holds both classes, and shrink as bins get finer.

    Example
    -------
    >>> pm = PooledMetrics()
    >>> for pred, lab in pairs: pm.update(pred, lab, mask=brain)   # doctest: +SKIP
    >>> pm.compute()["ap"]                                          # doctest: +SKIP
    """

    def __init__(self, bins: int = 65536):
        bins = int(bins)
        if bins < 2:
            raise ValueError(f"PooledMetrics: bins must be at least 2, got {bins}.")
        self.bins = bins
        self.pos = np.zeros(bins, dtype=np.int64)
        self.neg = np.zeros(bins, dtype=np.int64)

    def update(self, scores, labels, mask=None) -> None:
        """Add voxels.

        Parameters
        ----------
        scores : array_like of float, any shape
            Predictions; clipped to ``[0, 1]``. Must be finite.
        labels : array_like, same shape
            bool, or numbers binarised as ``> 0.5``.
        mask : array_like of bool, same shape, optional
            Only voxels where it is true are added (e.g. the foreground).
        """
        scores = np.asarray(scores)
        labels = np.asarray(labels)
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != scores.shape:
                raise ValueError(
                    f"mask must have the scores' shape {scores.shape}, got {mask.shape}."
                )
            if labels.shape != scores.shape:
                raise ValueError(
                    f"scores and labels must have the same shape, got {scores.shape} and "
                    f"{labels.shape}."
                )
            mask = mask.astype(bool, copy=False)
            scores = scores[mask]
            labels = labels[mask]
        scores, labels = _check_pair(scores, labels)
        idx = np.clip(scores.astype(np.float64, copy=False), 0.0, 1.0) * self.bins
        idx = np.minimum(idx.astype(np.int64), self.bins - 1)
        self.pos += np.bincount(idx[labels], minlength=self.bins)
        self.neg += np.bincount(idx[~labels], minlength=self.bins)

    def merge(self, other: PooledMetrics) -> None:
        """Add another accumulator's counts (same ``bins``), e.g. from another worker."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge PooledMetrics with {other.bins} and {self.bins} bins.")
        self.pos += other.pos
        self.neg += other.neg

    def _descending(self) -> tuple[np.ndarray, np.ndarray]:
        used = (self.pos + self.neg) > 0
        return self.pos[used][::-1], self.neg[used][::-1]

    def compute(self) -> dict:
        """Pooled metrics so far.

        Returns
        -------
        dict
            ``ap``, ``auroc`` (float, ``nan`` if one class is missing), ``n`` and ``n_pos``
            (int, voxels added), ``ap_error_bound`` and ``auroc_error_bound`` (float, see the
            class docstring).
        """
        pos, neg = self._descending()
        n_pos = int(pos.sum())
        n = n_pos + int(neg.sum())
        ap = _ap_from_counts(pos, neg)
        auroc = _auc_from_counts(pos, neg)
        if math.isnan(ap):
            ap_bound = auc_bound = math.nan
        else:
            p = pos.astype(np.float64)
            q = neg.astype(np.float64)
            t_before = np.cumsum(p) - p
            f_before = np.cumsum(q) - q
            with np.errstate(invalid="ignore", divide="ignore"):
                best = (t_before + p) / (t_before + f_before + p)
                worst = (t_before + 1) / (t_before + f_before + 1 + q)
            spread = np.where(p > 0, best - worst, 0.0)
            ap_bound = float(np.sum(p / n_pos * spread))
            auc_bound = float(np.sum(p * q) / (2.0 * n_pos * (n - n_pos)))
        return {
            "ap": ap,
            "auroc": auroc,
            "n": n,
            "n_pos": n_pos,
            "ap_error_bound": ap_bound,
            "auroc_error_bound": auc_bound,
        }

    def curves(self) -> dict:
        """PR and ROC curves of the binned scores: float64 arrays ``precision``, ``recall``,
        ``fpr``, ``tpr``, from the highest threshold down, starting at recall 0 / fpr 0."""
        return _curves(*self._descending())


def summary_scores(values) -> dict:
    """The scores of a set of values: ``mean``, ``p75`` (75th percentile, linear
    interpolation), ``top25_mean`` (mean of the ``ceil(N / 4)`` largest values) and ``top1``
    (mean of the highest 1 %, at least 10 values, as `napari_mtml.scores`' "top1").

    Parameters
    ----------
    values : array_like of float
        Any shape, at least one element.

    Returns
    -------
    dict of str to float
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("summary_scores needs at least one value.")
    k = max(1, math.ceil(v.size / 4))
    top = np.partition(v, v.size - k)[v.size - k :]
    from napari_mtml.scores import sample_score

    return {
        "mean": float(v.mean()),
        "p75": float(np.percentile(v, 75)),
        "top25_mean": float(top.mean()),
        "top1": sample_score(v, None, "top1"),
    }


def _prepare_map(prediction, label, foreground, clip: bool):
    prediction = np.asarray(prediction, dtype=np.float32)
    label = _as_binary(label)
    if prediction.shape != label.shape:
        raise ValueError(
            f"prediction and label must have the same shape, got {prediction.shape} and "
            f"{label.shape}."
        )
    if not np.isfinite(prediction).all():
        raise ValueError("prediction contains NaN or infinite values.")
    if foreground is not None:
        foreground = np.asarray(foreground).astype(bool, copy=False)
        if foreground.shape != prediction.shape:
            raise ValueError(
                f"foreground must have the prediction's shape {prediction.shape}, got "
                f"{foreground.shape}."
            )
    if clip:
        prediction = np.clip(prediction, 0.0, 1.0)
    return prediction, label, foreground


def slice_scores(
    prediction,
    label,
    foreground=None,
    axis: int = 0,
    min_fraction: float = SLICE_ANOMALY_FRACTION,
    clip: bool = True,
    spacing=None,
) -> tuple[dict, np.ndarray]:
    """Per-slice scores and labels of a 3D map (slice-wise evaluation, METHOD.md §8).

    Parameters
    ----------
    prediction : array_like of float, shape ``(D, H, W)``
        Anomaly map; clipped to ``[0, 1]`` when ``clip``.
    label : array_like, same shape
        Ground truth (bool, or numbers binarised as ``> 0.5``).
    foreground : array_like of bool, same shape, optional
        When given, a slice's scores are computed over its foreground pixels only and slices
        without any foreground pixel are left out.
    axis : int
        The slicing axis; 0 is axial for arrays read by ``napari_mtml.io`` (``(z, y, x)``).
    min_fraction : float
        A slice is anomalous if more than this fraction of all its pixels is (default 5/128^2).
    clip : bool
        Clip the prediction to ``[0, 1]`` first.
    spacing : sequence of 3 float, optional
        mm per axis, for the 3D smoothing of the ``"max"`` score (1 voxel without it).

    Returns
    -------
    scores : dict
        ``{name: float64 array (S,)}`` for the names in :data:`SCORE_NAMES`.
    labels : numpy.ndarray
        bool, shape ``(S,)``, one per kept slice (``S`` = number of kept slices).
    """
    prediction, label, foreground = _prepare_map(prediction, label, foreground, clip)
    if prediction.ndim != 3:
        raise ValueError(f"slice_scores needs a 3D map, got shape {prediction.shape}.")
    from napari_mtml.scores import smoothed_map

    peak = np.moveaxis(smoothed_map(prediction, spacing), axis, 0)
    prediction = np.moveaxis(prediction, axis, 0)
    label = np.moveaxis(label, axis, 0)
    if foreground is not None:
        foreground = np.moveaxis(foreground, axis, 0)
    area = prediction[0].size
    scores = {name: [] for name in SCORE_NAMES}
    labels = []
    for z in range(prediction.shape[0]):
        values = prediction[z] if foreground is None else prediction[z][foreground[z]]
        if values.size == 0:
            continue
        for name, value in summary_scores(values).items():
            scores[name].append(value)
        scores["max"].append(
            float((peak[z] if foreground is None else peak[z][foreground[z]]).max())
        )
        labels.append(label[z].sum() > min_fraction * area)
    return (
        {name: np.asarray(v, dtype=np.float64) for name, v in scores.items()},
        np.asarray(labels, dtype=bool),
    )


def sample_scores(
    prediction, label, foreground=None, clip: bool = True, spacing=None
) -> tuple[dict, bool]:
    """Scores and label of one image (sample-wise evaluation, METHOD.md §8).

    Parameters
    ----------
    prediction : ndarray of float
        Any shape (clipped to ``[0, 1]`` when ``clip``).
    label : ndarray
        Same shape.
    foreground : ndarray of bool, optional
        Restricts the scores (not the label) to its voxels.
    clip : bool
        Clip the prediction to ``[0, 1]`` first.
    spacing : sequence of float, optional
        mm per axis, for the smoothing of the ``"max"`` score (1 voxel without it).

    Returns
    -------
    scores : dict of str to float
    is_anomalous : bool
        ``any(label)``.
    """
    prediction, label, foreground = _prepare_map(prediction, label, foreground, clip)
    values = prediction if foreground is None else prediction[foreground]
    if values.size == 0:
        raise ValueError("sample_scores: the foreground mask is empty; nothing to score.")
    from napari_mtml.scores import sample_score

    peak = sample_score(prediction, foreground, "max", spacing=spacing)
    return {**summary_scores(values), "max": peak}, bool(label.any())
