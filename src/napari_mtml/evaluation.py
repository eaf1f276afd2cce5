"""Score a folder of predictions against a folder of labels (``mtml evaluate``; METHOD.md §8).

Pairing rule (by name; ``.nii.gz`` and ``.nii`` both accepted):

- predictions: every ``PRED_DIR/NAME_anomaly.nii.gz`` (as ``mtml predict`` writes them; the
  ``*_disagreement`` maps and PNG overlays beside them are ignored);
- labels: ``LABEL_DIR/KEY.nii.gz`` (or ``.nii``; for 2D images also ``.png``, ``.tif``,
  ``.tiff``) where ``KEY`` is the file name without its extension and without one trailing
  ``_label``, ``_labels``, ``_gt``, ``_mask`` or ``_seg...`` part (``_seg``, ``_segmentation``,
  ...): ``NAME.nii.gz``, ``NAME_label.nii.gz`` and ``NAME_seg.nii.gz`` all label ``NAME``;
- foreground masks (optional): ``FOREGROUND_DIR/KEY.nii.gz`` (same extensions) with ``KEY`` the
  name without one trailing ``_foreground``, ``_fg``, ``_mask`` or ``_brainmask``.

Two label files with the same key, or no pair at all, raise ``ValueError``; predictions without a
label and labels without a prediction are left out with a ``UserWarning`` and listed in the
result. A matched pair without its foreground mask (when a foreground folder is given) raises.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np

from napari_mtml.metrics import (
    SCORE_NAMES,
    PooledMetrics,
    average_precision,
    roc_auc,
    sample_scores,
    slice_scores,
)
from napari_mtml.scores import DEFAULT_SAMPLE_SCORE

__all__ = ["evaluate_folder", "pair_files"]

# the slice and sample curves plot the default sample score (the one `mtml predict` writes)
_CURVE_SCORE = DEFAULT_SAMPLE_SCORE
_NIFTI = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$", re.IGNORECASE)
# Labels and foregrounds of 2D images may also be PNG/TIFF masks.
_MASK_FILE = re.compile(r"^(?P<stem>.+?)(\.nii(\.gz)?|\.png|\.tiff?)$", re.IGNORECASE)
_PRED_SUFFIX = "_anomaly"
_LABEL_SUFFIX = re.compile(r"_(label|labels|gt|mask|seg[a-z]*)$", re.IGNORECASE)
_FOREGROUND_SUFFIX = re.compile(r"_(foreground|fg|mask|brainmask)$", re.IGNORECASE)


def _nifti_stems(folder: Path, pattern: re.Pattern = _NIFTI) -> dict[str, Path]:
    out = {}
    for path in sorted(folder.iterdir()):
        m = pattern.match(path.name)
        if m and path.is_file():
            out[m.group("stem")] = path
    return out


def _keyed(folder: Path, suffix: re.Pattern, what: str) -> dict[str, Path]:
    keyed: dict[str, Path] = {}
    for stem, path in _nifti_stems(folder, _MASK_FILE).items():
        key = suffix.sub("", stem)
        if key in keyed:
            raise ValueError(
                f"{what} folder {folder}: both {keyed[key].name} and {path.name} belong to "
                f"'{key}'; keep one of them."
            )
        keyed[key] = path
    return keyed


def pair_files(pred_dir, label_dir, foreground_dir=None) -> tuple[list[tuple], list, list]:
    """Pair predictions with labels (and foregrounds) by name; see the module docstring.

    Returns
    -------
    pairs : list of ``(name, prediction_path, label_path, foreground_path_or_None)``, sorted.
    unmatched_predictions, unmatched_labels : lists of file names (str).

    Parameters
    ----------
    pred_dir, label_dir : str or Path
    foreground_dir : str or Path, optional
    """
    pred_dir, label_dir = Path(pred_dir), Path(label_dir)
    for folder, what in ((pred_dir, "prediction"), (label_dir, "label")) + (
        ((Path(foreground_dir), "foreground"),) if foreground_dir is not None else ()
    ):
        if not folder.is_dir():
            raise ValueError(f"{what} folder {folder} does not exist or is not a folder.")
    preds = {
        stem[: -len(_PRED_SUFFIX)]: path
        for stem, path in _nifti_stems(pred_dir).items()
        if stem.endswith(_PRED_SUFFIX) and len(stem) > len(_PRED_SUFFIX)
    }
    if not preds:
        raise ValueError(
            f"prediction folder {pred_dir} holds no NAME_anomaly.nii.gz file; pass the --out "
            "folder of `mtml predict`."
        )
    labels = _keyed(label_dir, _LABEL_SUFFIX, "label")
    foregrounds = (
        _keyed(Path(foreground_dir), _FOREGROUND_SUFFIX, "foreground")
        if foreground_dir is not None
        else None
    )
    names = sorted(set(preds) & set(labels))
    unmatched_predictions = [preds[n].name for n in sorted(set(preds) - set(labels))]
    unmatched_labels = [labels[n].name for n in sorted(set(labels) - set(preds))]
    if not names:
        raise ValueError(
            f"no prediction in {pred_dir} has a label in {label_dir}: predictions "
            f"{sorted(preds)[:5]}, label names {sorted(labels)[:5]}. A prediction NAME_anomaly"
            ".nii.gz needs a label NAME.nii.gz, NAME_label.nii.gz or NAME_seg.nii.gz."
        )
    pairs = []
    for name in names:
        fg = None
        if foregrounds is not None:
            fg = foregrounds.get(name)
            if fg is None:
                raise ValueError(
                    f"no foreground mask for {preds[name].name} in {foreground_dir}: add "
                    f"{name}.nii.gz (or {name}_mask.nii.gz) or evaluate without foregrounds."
                )
        pairs.append((name, preds[name], labels[name], fg))
    return pairs, unmatched_predictions, unmatched_labels


def _squeeze_2d(array: np.ndarray) -> np.ndarray:
    """io reads a 2D NIfTI as a ``(1, y, x)`` volume and a PNG as ``(y, x)``: compare as 2D."""
    return array[0] if array.ndim == 3 and array.shape[0] == 1 else array


def _metric_pair(scores, labels) -> dict:
    return {"ap": average_precision(scores, labels), "auroc": roc_auc(scores, labels)}


def _nan_to_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def _output_paths(out) -> tuple[Path, Path, Path]:
    from napari_mtml.files import check_output_file

    out = Path(out)
    if out.suffix.lower() != ".json":
        out = out / "metrics.json"
    paths = (out, out.with_name(out.stem + "_pr.png"), out.with_name(out.stem + "_roc.png"))
    for path in paths:
        check_output_file(path, "metrics")
    return paths


def _plot_curves(pr_path: Path, roc_path: Path, curves: dict) -> None:
    # The Agg canvas directly, not pyplot: no global backend switch inside a napari session.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for path, (xk, yk, xlabel, ylabel, title) in (
        (pr_path, ("recall", "precision", "recall", "precision", "Precision-recall")),
        (roc_path, ("fpr", "tpr", "false positive rate", "true positive rate", "ROC")),
    ):
        fig = Figure(figsize=(5, 5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for label, (c, metric) in curves.items():
            if c is None:
                continue
            value = metric["ap" if path is pr_path else "auroc"]
            step = "pre" if path is pr_path else None  # precision at R_k holds on (R_{k-1}, R_k]
            text = f"{label} ({'AP' if path is pr_path else 'AUROC'} {value:.3f})"
            if step:
                ax.step(c[xk], c[yk], where=step, label=text)
            else:
                ax.plot(c[xk], c[yk], label=text)
        if path is roc_path:
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=xlabel, ylabel=ylabel, title=title)
        ax.legend(loc="lower right" if path is roc_path else "lower left", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)


def _curve_of(scores, labels):
    from napari_mtml.metrics import precision_recall_curve, roc_curve

    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        return None
    precision, recall = precision_recall_curve(scores, labels)
    fpr, tpr = roc_curve(scores, labels)
    return {"precision": precision, "recall": recall, "fpr": fpr, "tpr": tpr}


def evaluate_folder(
    pred_dir: str | os.PathLike,
    label_dir: str | os.PathLike,
    foreground_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
) -> dict:
    """AP and AUROC of a folder of anomaly maps against ground-truth masks.

    Predictions are clipped to ``[0, 1]`` (METHOD.md §8); labels are binarised as ``> 0.5``.
    Files are read with ``napari_mtml.io.read_image`` and paired by name (module docstring).

    Parameters
    ----------
    pred_dir : folder of ``NAME_anomaly.nii.gz`` maps (float, any units; clipped to [0, 1]).
    label_dir : folder of label masks on the same grids.
    foreground_dir : optional folder of foreground masks (bool/0-1). When given, the pixel-wise
        and per-image metrics count foreground voxels only, and slice/sample scores are computed
        over foreground voxels (slices without foreground are left out).
    out : optional ``metrics.json`` path (or a folder, which gets ``metrics.json``). The PR and
        ROC curves are written beside it as ``<stem>_pr.png`` and ``<stem>_roc.png``.

    Returns
    -------
    dict
        ``n_images``; ``pixel``: pooled over all voxels of all images (``region`` says
        ``"foreground"`` or ``"all voxels"``): ``ap``, ``auroc``, ``n``, ``n_pos`` and the
        binned computation's ``ap_error_bound`` / ``auroc_error_bound`` (see
        ``PooledMetrics``); ``per_image``: ``{NAME: {"ap", "auroc", "n_pos"}}`` (exact, ``nan``
        without anomaly) and ``mean_per_image_ap`` over images with an anomaly; ``slice``
        (``None`` when no image is 3D): ``n``, ``n_pos`` and for each score of
        ``metrics.SCORE_NAMES`` (``mean``, ``p75``, ``top25_mean``, ``top1`` and ``max``, the
        peak of the map smoothed by 4 mm (2 mm on 2D maps) using the file's voxel spacing: the
        default sample score of ``mtml predict``) an ``{"ap", "auroc"}``; ``sample``: the same
        over images; the PR/ROC plots show the ``max`` score;
        ``unmatched_predictions``, ``unmatched_labels``; ``files`` (paths written, when ``out``).
        Undefined values (one class only) are ``nan`` here and ``null`` in the JSON file.

    Raises
    ------
    ValueError
        Missing folders, nothing to pair, a duplicate label, a missing foreground mask, or a
        prediction whose shape differs from its label's (or foreground's) (names both files).
    """
    from napari_mtml.io import read_image as _read_image

    if out is not None:
        _output_paths(out)  # a bad --out is said before the images are read

    def read_image(path):
        # An all-zero label (a healthy case) or a flat prediction is normal here, not an oddity.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*constant", category=UserWarning)
            return _read_image(path)

    pairs, unmatched_predictions, unmatched_labels = pair_files(pred_dir, label_dir, foreground_dir)
    if unmatched_predictions or unmatched_labels:
        warnings.warn(
            f"evaluate_folder: left out {len(unmatched_predictions)} prediction(s) without a "
            f"label {unmatched_predictions[:5]} and {len(unmatched_labels)} label(s) without a "
            f"prediction {unmatched_labels[:5]}.",
            UserWarning,
            stacklevel=2,
        )

    pooled = PooledMetrics()
    per_image = {}
    slice_parts = {name: [] for name in SCORE_NAMES}
    slice_labels = []
    sample = {name: [] for name in SCORE_NAMES}
    sample_labels = []
    any_3d = False
    for name, pred_path, label_path, fg_path in pairs:
        pred_scan = read_image(pred_path)
        pred = _squeeze_2d(pred_scan.array)
        spacing = getattr(pred_scan, "spacing", None)
        label = _squeeze_2d(read_image(label_path).array)
        if pred.shape != label.shape:
            raise ValueError(
                f"shape mismatch: prediction {pred_path} has shape {pred.shape} but label "
                f"{label_path} has {label.shape}; predict on the label's image (same grid)."
            )
        fg = None
        if fg_path is not None:
            fg = _squeeze_2d(read_image(fg_path).array)
            if fg.shape != pred.shape:
                raise ValueError(
                    f"shape mismatch: prediction {pred_path} has shape {pred.shape} but "
                    f"foreground {fg_path} has {fg.shape}; use masks on the images' grids."
                )
            fg = fg > 0.5
        if not np.isfinite(pred).all():
            raise ValueError(f"{pred_path}: the prediction holds NaN or infinite values.")
        pred = np.clip(pred, 0.0, 1.0)
        truth = label > 0.5

        pooled.update(pred, truth, mask=fg)
        inside_pred = pred if fg is None else pred[fg]
        inside_truth = truth if fg is None else truth[fg]
        if inside_pred.size:
            m = _metric_pair(inside_pred, inside_truth)
        else:
            m = {"ap": math.nan, "auroc": math.nan}
        per_image[name] = {**m, "n_pos": int(inside_truth.sum())}

        if pred.ndim == 3:
            any_3d = True
            s_scores, s_labels = slice_scores(
                pred, truth, foreground=fg, clip=False, spacing=spacing
            )
            for k in SCORE_NAMES:
                slice_parts[k].append(s_scores[k])
            slice_labels.append(s_labels)
        if fg is None or fg.any():
            scores, is_anomalous = sample_scores(
                pred, truth, foreground=fg, clip=False, spacing=spacing
            )
            for k in SCORE_NAMES:
                sample[k].append(scores[k])
            sample_labels.append(is_anomalous)

    region = "foreground" if foreground_dir is not None else "all voxels"
    pixel = {"region": region, **pooled.compute()}
    image_aps = [v["ap"] for v in per_image.values() if not math.isnan(v["ap"])]
    result = {
        "n_images": len(pairs),
        "pixel": pixel,
        "mean_per_image_ap": float(np.mean(image_aps)) if image_aps else math.nan,
        "per_image": per_image,
        "slice": None,
        "sample": None,
        "unmatched_predictions": unmatched_predictions,
        "unmatched_labels": unmatched_labels,
    }
    slice_truth = np.concatenate(slice_labels) if slice_labels else np.zeros(0, dtype=bool)
    slice_scores_all = {k: np.concatenate(v) if v else np.zeros(0) for k, v in slice_parts.items()}
    if any_3d:
        result["slice"] = {
            "n": int(slice_truth.size),
            "n_pos": int(slice_truth.sum()),
            **{k: _metric_pair(slice_scores_all[k], slice_truth) for k in SCORE_NAMES},
        }
    sample_truth = np.asarray(sample_labels, dtype=bool)
    result["sample"] = {
        "n": int(sample_truth.size),
        "n_pos": int(sample_truth.sum()),
        **{k: _metric_pair(np.asarray(sample[k]), sample_truth) for k in SCORE_NAMES},
    }

    if out is not None:
        json_path, pr_path, roc_path = _output_paths(out)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        result["files"] = {
            "metrics": str(json_path),
            "pr_curve": str(pr_path),
            "roc_curve": str(roc_path),
        }
        pixel_curve = pooled.curves() if not math.isnan(pixel["ap"]) else None
        curves = {f"pixel ({region})": (pixel_curve, pixel)}
        if any_3d:
            curves[f"slice ({_CURVE_SCORE})"] = (
                _curve_of(slice_scores_all[_CURVE_SCORE], slice_truth),
                result["slice"][_CURVE_SCORE],
            )
        curves[f"sample ({_CURVE_SCORE})"] = (
            _curve_of(np.asarray(sample[_CURVE_SCORE]), sample_truth),
            result["sample"][_CURVE_SCORE],
        )
        _plot_curves(pr_path, roc_path, curves)
        from napari_mtml.files import write_atomic

        write_atomic(json_path, json.dumps(_nan_to_none(result), indent=2) + "\n")
    return result
