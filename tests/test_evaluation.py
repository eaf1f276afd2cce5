"""`evaluate_folder` end to end on tiny NIfTI folders written with nibabel."""

import json
import math
import warnings

import nibabel as nib
import numpy as np
import pytest

from napari_mtml.evaluation import evaluate_folder, pair_files

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _save(path, array_zyx):
    """Write a (z, y, x) array so that napari_mtml.io reads it back as (z, y, x) (RAS grid)."""
    data = np.ascontiguousarray(np.asarray(array_zyx).T)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def _case(rng, anomalous, shape=(6, 16, 16)):
    label = np.zeros(shape, np.uint8)
    if anomalous:
        z, y, x = (int(rng.integers(0, s - 4)) for s in shape)
        label[z : z + 3, y : y + 4, x : x + 4] = 1
    noise = rng.random(shape).astype(np.float32) * 0.5
    return label, noise


def _folders(tmp_path, perfect, n=4, label_style=("{}.nii.gz",), seed=0):
    rng = np.random.default_rng(seed)
    pred_dir, label_dir = tmp_path / "pred", tmp_path / "labels"
    pred_dir.mkdir()
    label_dir.mkdir()
    truth = {}
    for i in range(n):
        name = f"case{i}"
        label, noise = _case(rng, anomalous=i % 2 == 0)
        pred = label.astype(np.float32) if perfect else noise + 0.4 * label
        _save(pred_dir / f"{name}_anomaly.nii.gz", pred)
        _save(pred_dir / f"{name}_disagreement.nii.gz", noise)  # must be ignored
        style = label_style[i % len(label_style)]
        _save(label_dir / style.format(name), label)
        truth[name] = (pred, label)
    return pred_dir, label_dir, truth


def test_perfect_prediction_gives_ap_one(tmp_path):
    pred_dir, label_dir, _ = _folders(tmp_path, perfect=True)
    out = evaluate_folder(pred_dir, label_dir, out=tmp_path / "res" / "metrics.json")
    assert out["n_images"] == 4
    assert out["pixel"]["region"] == "all voxels"
    assert out["pixel"]["ap"] == 1.0 and out["pixel"]["auroc"] == 1.0
    assert out["pixel"]["ap_error_bound"] == 0.0
    assert out["per_image"]["case0"]["ap"] == 1.0
    assert math.isnan(out["per_image"]["case1"]["ap"])  # healthy image: AP undefined
    assert out["mean_per_image_ap"] == 1.0
    assert out["slice"]["mean"]["ap"] == 1.0 and out["slice"]["n"] == 4 * 6
    assert out["sample"]["n"] == 4 and out["sample"]["n_pos"] == 2
    assert out["sample"]["top25_mean"]["ap"] == 1.0
    files = out["files"]
    saved = json.loads((tmp_path / "res" / "metrics.json").read_text())
    assert saved["pixel"]["ap"] == 1.0
    assert saved["per_image"]["case1"]["ap"] is None  # nan is written as null
    for key in ("pr_curve", "roc_curve"):
        png = open(files[key], "rb").read(8)
        assert png == b"\x89PNG\r\n\x1a\n"


def test_noisy_prediction_matches_sklearn(tmp_path):
    pred_dir, label_dir, truth = _folders(
        tmp_path, perfect=False, label_style=("{}_label.nii.gz", "{}_seg.nii.gz", "{}.nii")
    )
    out = evaluate_folder(pred_dir, label_dir)
    preds = np.concatenate([np.clip(p, 0, 1).ravel() for p, _ in truth.values()])
    labels = np.concatenate([lab.ravel() for _, lab in truth.values()])
    assert out["n_images"] == 4
    ref = sklearn_metrics.average_precision_score(labels, preds)
    assert abs(out["pixel"]["ap"] - ref) <= out["pixel"]["ap_error_bound"] + 1e-12
    assert out["pixel"]["auroc"] == pytest.approx(
        sklearn_metrics.roc_auc_score(labels, preds), abs=out["pixel"]["auroc_error_bound"] + 1e-12
    )
    p0, l0 = truth["case0"]
    assert out["per_image"]["case0"]["ap"] == pytest.approx(
        sklearn_metrics.average_precision_score(l0.ravel(), p0.ravel()), abs=1e-9
    )
    assert 0 < out["pixel"]["ap"] < 1
    assert "files" not in out


def test_foreground_restricts_pixels(tmp_path):
    pred_dir, label_dir, truth = _folders(tmp_path, perfect=False)
    fg_dir = tmp_path / "fg"
    fg_dir.mkdir()
    masks = {}
    for name, (pred, _) in truth.items():
        fg = np.zeros(pred.shape, np.uint8)
        fg[:, 2:14, 2:14] = 1
        _save(fg_dir / f"{name}_mask.nii.gz", fg)
        masks[name] = fg.astype(bool)
    out = evaluate_folder(pred_dir, label_dir, foreground_dir=fg_dir)
    assert out["pixel"]["region"] == "foreground"
    assert out["pixel"]["n"] == sum(int(m.sum()) for m in masks.values())
    preds = np.concatenate([truth[n][0][m] for n, m in masks.items()])
    labels = np.concatenate([truth[n][1][m] for n, m in masks.items()])
    assert out["pixel"]["n_pos"] == int(labels.sum())
    ref = sklearn_metrics.average_precision_score(labels, np.clip(preds, 0, 1))
    assert abs(out["pixel"]["ap"] - ref) <= out["pixel"]["ap_error_bound"] + 1e-12


def test_shape_mismatch_names_both_files(tmp_path):
    pred_dir, label_dir, _ = _folders(tmp_path, perfect=True, n=2)
    _save(label_dir / "case1.nii.gz", np.zeros((6, 16, 12), np.uint8))
    with pytest.raises(ValueError, match="case1_anomaly.nii.gz.*case1.nii.gz") as err:
        evaluate_folder(pred_dir, label_dir)
    assert "shape" in str(err.value)


def test_unmatched_files_warn_or_raise(tmp_path):
    pred_dir, label_dir, _ = _folders(tmp_path, perfect=True, n=2)
    _save(label_dir / "other.nii.gz", np.zeros((6, 16, 16), np.uint8))
    _save(pred_dir / "lonely_anomaly.nii.gz", np.zeros((6, 16, 16), np.float32))
    with pytest.warns(UserWarning, match="left out 1 prediction"):
        out = evaluate_folder(pred_dir, label_dir)
    assert out["unmatched_predictions"] == ["lonely_anomaly.nii.gz"]
    assert out["unmatched_labels"] == ["other.nii.gz"]
    assert out["n_images"] == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no prediction .* has a label"):
        evaluate_folder(pred_dir, empty)
    with pytest.raises(ValueError, match="holds no NAME_anomaly"):
        evaluate_folder(empty, label_dir)
    with pytest.raises(ValueError, match="does not exist"):
        evaluate_folder(tmp_path / "missing", label_dir)
    _save(label_dir / "case0_label.nii.gz", np.zeros((6, 16, 16), np.uint8))
    with pytest.raises(ValueError, match="keep one of them"):
        pair_files(pred_dir, label_dir)


def test_missing_foreground_raises(tmp_path):
    pred_dir, label_dir, _ = _folders(tmp_path, perfect=True, n=2)
    fg_dir = tmp_path / "fg"
    fg_dir.mkdir()
    _save(fg_dir / "case0.nii.gz", np.ones((6, 16, 16), np.uint8))
    with pytest.raises(ValueError, match="no foreground mask for case1_anomaly"):
        evaluate_folder(pred_dir, label_dir, foreground_dir=fg_dir)


def test_2d_images_have_no_slice_metrics(tmp_path):
    pred_dir, label_dir = tmp_path / "p", tmp_path / "l"
    pred_dir.mkdir()
    label_dir.mkdir()
    for i in range(3):
        label = np.zeros((16, 16), np.uint8)
        label[4 : 8 + i, 5:9] = i > 0
        nib.save(
            nib.Nifti1Image(label.T.astype(np.float32), np.eye(4)),
            str(pred_dir / f"x{i}_anomaly.nii.gz"),
        )
        nib.save(nib.Nifti1Image(label.T, np.eye(4)), str(label_dir / f"x{i}.nii.gz"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all-zero maps and labels are not worth a warning
        out = evaluate_folder(pred_dir, label_dir, out=tmp_path / "o")
    assert out["slice"] is None
    assert out["pixel"]["ap"] == 1.0 and out["sample"]["mean"]["ap"] == 1.0
    assert (tmp_path / "o" / "metrics.json").is_file()
    assert (tmp_path / "o" / "metrics_roc.png").is_file()


def test_png_labels_pair_with_2d_predictions(tmp_path):
    from PIL import Image

    pred_dir, label_dir = tmp_path / "p", tmp_path / "l"
    pred_dir.mkdir()
    label_dir.mkdir()
    label = np.zeros((12, 20), np.uint8)
    label[3:6, 4:9] = 1
    pred = np.where(label > 0, 0.9, 0.1).astype(np.float32)
    # What write_image does with a 2D map: an (x, y, 1) volume.
    nib.save(nib.Nifti1Image(pred.T[..., None], np.eye(4)), str(pred_dir / "cxr_anomaly.nii.gz"))
    Image.fromarray(label * 255).save(label_dir / "cxr_mask.png")
    out = evaluate_folder(pred_dir, label_dir)
    assert out["pixel"]["n"] == label.size and out["pixel"]["n_pos"] == 15
    assert out["pixel"]["ap"] == 1.0 and out["slice"] is None


def test_max_score_is_the_smoothed_peak_with_the_file_spacing(tmp_path):
    """`mtml evaluate` reports `mtml predict`'s default sample score ("max": the peak of the map
    smoothed by 4 mm), using each prediction file's voxel spacing: the same spike is smoothed
    less on a 5 mm-slice grid (the healthy scan here) than on a 1 mm grid (the lesioned one),
    so the healthy scan ranks first; ignoring the spacing would tie them."""
    from napari_mtml.io import Scan, write_image

    pred_dir, label_dir = tmp_path / "pred", tmp_path / "labels"
    pred_dir.mkdir()
    label_dir.mkdir()
    shape = (7, 16, 16)
    for name, spacing, lesion in (("healthy", (5.0, 1.0, 1.0), False), ("ill", (1.0,) * 3, True)):
        heat = np.full(shape, 0.1, np.float32)
        heat[3, 8, 8] = 1.0
        label = np.zeros(shape, np.uint8)
        label[3, 7:10, 7:10] = lesion
        like = Scan(array=heat, spacing=spacing)
        write_image(pred_dir / f"{name}_anomaly.nii.gz", heat, like=like)
        write_image(label_dir / f"{name}.nii.gz", label, like=like)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = evaluate_folder(pred_dir, label_dir, out=tmp_path / "metrics.json")
    assert out["sample"]["n"] == 2 and out["sample"]["n_pos"] == 1
    assert out["sample"]["max"]["auroc"] == 0.0  # the healthy 5 mm scan peaks higher
    assert out["sample"]["mean"]["auroc"] == 0.5  # the raw values are the same
    assert "max" in out["slice"]
