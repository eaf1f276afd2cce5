"""Sample scores that normalise the map's peak, against the smoothed peak, on saved predictions.

    python benchmarks/sample_scores_unseen.py --work W --pred LABEL-HASH [LABEL-HASH ...]
    python benchmarks/sample_scores_unseen.py --work W --pred builtin-HASH --tumour tumour-t15

Reads what `benchmarks/quality_unseen.py --work W` left: the test volumes and their masks
(`W/data-*/`) and a run's predictions (`W/pred/LABEL-HASH/NAME_anomaly.nii.gz`), and ranks the
30 lesioned volumes against the 8 healthy ones (and, per axial slice, the lesioned slices against
the others, as quality_unseen does) with each score, over the ground-truth brain ("brain") and
over the map's own non-zero voxels ("fg", what `mtml predict` sees without a mask):

- `max2`: the peak of the map smoothed by 2 mm (`napari_mtml.scores` "max" before it smoothed
  volumes by 4 mm);
- `max4`: the same at 4 mm (the "max" score of a volume since);
- `prom`, `p99`: the peak minus the median / the 99th percentile of the smoothed map;
- `z`: (peak - mean) / standard deviation of the smoothed map;
- `tophat`: the peak of the smoothed map minus a 15 mm smoothing of it;
- `ero5`, `ero10`: the peak at least 5 / 10 mm inside the region.

Per score: volume AUROC over all 38 volumes and the mean of the per-protocol AUROCs ("within").
`--tumour LABEL` also ranks the slices of the tumour sample (`W/pred/LABEL/brain1_image_anomaly`)
inside the automatic brain mask of quality_unseen. Nothing is trained or predicted here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from napari_mtml.metrics import roc_auc
from quality_unseen import SLICE_MIN_LESION_MM2, _load_masks, _read


def peak_scores(smooth: np.ndarray, region: np.ndarray) -> dict[str, float]:
    """The normalised-peak scores of one smoothed map over `region` (2D or 3D)."""
    v = smooth[region]
    return {
        "max2": float(v.max()),
        "prom": float(v.max() - np.median(v)),
        "p99": float(v.max() - np.percentile(v, 99)),
        "z": float((v.max() - v.mean()) / (v.std() + 1e-6)),
    }


def _smooth_2mm(anomaly: np.ndarray, sp: np.ndarray) -> np.ndarray:
    """The 2 mm Gaussian the `max2` family of scores is measured on (the package's "max"
    smoothing before it took 4 mm for volumes)."""
    return ndimage.gaussian_filter(anomaly, 2.0 / sp, mode="nearest")


def smoothings(anomaly: np.ndarray, spacing) -> dict[str, np.ndarray]:
    """The map smoothed by 2 mm (the scores' base here), by 4 mm (`napari_mtml.scores`' "max"
    of a volume), and the 15 mm background of the top-hat: once per volume, for every region."""
    sp = np.asarray(spacing, dtype=float)
    return {
        "s2": _smooth_2mm(anomaly, sp),
        "s4": ndimage.gaussian_filter(anomaly, 4.0 / sp, mode="nearest"),
        "background": ndimage.gaussian_filter(anomaly, 15.0 / sp, mode="nearest"),
    }


def volume_scores(smooth: dict[str, np.ndarray], region: np.ndarray, spacing) -> dict[str, float]:
    s2 = smooth["s2"]
    out = peak_scores(s2, region)
    out["max4"] = float(smooth["s4"][region].max())
    out["tophat"] = float((s2 - smooth["background"])[region].max())
    depth = ndimage.distance_transform_edt(region, sampling=np.asarray(spacing, dtype=float))
    for mm in (5, 10):
        inner = depth > mm
        out[f"ero{mm}"] = float(s2[inner].max()) if inner.any() else out["max2"]
    return out


def _auc(scores, labels) -> float:
    return float(roc_auc(np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)))


def run_volumes(data: Path, pred: Path) -> None:
    names = sorted(p.name[: -len(".nii.gz")] for p in data.glob("*.nii.gz"))
    names = [n for n in names if n.startswith(("healthy_", "lesion_"))]
    rows, slice_rows, slice_labels = [], [], []
    for name in names:
        scan = _read(data / f"{name}.nii.gz")
        masks = _load_masks(data / f"{name}_masks.npz")
        anomaly = _read(pred / f"{name}_anomaly.nii.gz").array.astype(np.float32)
        brain = masks["brain"]
        fg = anomaly > 0
        smooth = smoothings(anomaly, scan.spacing)
        scores = {}
        for region_name, region in (("brain", brain), ("fg", fg if fg.any() else brain)):
            for k, v in volume_scores(smooth, region, scan.spacing).items():
                scores[f"{region_name}:{k}"] = v
        rows.append((name, name.startswith("lesion_"), scores))
        # axial slices of the brain, as quality_unseen's slice table
        sp, s2 = scan.spacing, smooth["s2"]
        area = brain.reshape(len(brain), -1).sum(axis=1)
        lesion = masks.get("lesion")
        lesion_mm2 = (
            lesion.reshape(len(lesion), -1).sum(axis=1) * sp[1] * sp[2]
            if lesion is not None
            else np.zeros(len(brain))
        )
        for z in np.flatnonzero(area >= 0.25 * area.max()):
            if 0 < lesion_mm2[z] < SLICE_MIN_LESION_MM2:
                continue
            slice_rows.append(peak_scores(s2[z], brain[z]))
            slice_labels.append(bool(lesion_mm2[z] >= SLICE_MIN_LESION_MM2))
    labels = [r[1] for r in rows]
    protocols = sorted({"_".join(n.split("_")[-2:]) for n, _, _ in rows})
    print(f"{pred.name}: {sum(labels)} lesioned, {len(labels) - sum(labels)} healthy volumes")
    print("| score | volume AUROC | within protocol | slice AUROC (brain) |")
    print("|---|---|---|---|")
    for key in rows[0][2]:
        vals = [r[2][key] for r in rows]
        within = []
        for proto in protocols:
            sel = [i for i, (n, _, _) in enumerate(rows) if n.endswith(proto)]
            ys = [labels[i] for i in sel]
            if 0 < sum(ys) < len(ys):
                within.append(_auc([vals[i] for i in sel], ys))
        short = key.split(":")[1]
        sl = (
            f"{_auc([r[short] for r in slice_rows], slice_labels):.3f}"
            if key.startswith("brain:") and short in slice_rows[0]
            else ""
        )
        print(f"| {key} | {_auc(vals, labels):.3f} | {np.mean(within):.3f} | {sl} |")


def run_tumour(pred: Path) -> None:
    from napari_mtml.samples import load_sample
    from quality_unseen import tumour_brain_mask

    scan = load_sample("brain_tumour_image")
    tumour = load_sample("brain_tumour_label").array > 0.5
    has = tumour.reshape(len(tumour), -1).any(axis=1)
    brain, how = tumour_brain_mask(scan)
    anomaly = _read(pred / "brain1_image_anomaly.nii.gz").array.astype(np.float32)
    s2 = _smooth_2mm(anomaly, np.asarray(scan.spacing, dtype=float))
    rows, labels = [], []
    for z in range(len(anomaly)):
        if brain[z].any():
            rows.append(peak_scores(s2[z], brain[z]))
            labels.append(bool(has[z]))
    cells = ", ".join(f"{k} {_auc([r[k] for r in rows], labels):.3f}" for k in rows[0])
    print(f"tumour sample slices ({pred.name}, brain mask: {how}): slice AUROC {cells}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="quality_unseen's --work folder")
    p.add_argument("--pred", nargs="*", default=[], help="prediction folders under WORK/pred")
    p.add_argument("--tumour", nargs="*", default=[], help="tumour prediction folders")
    args = p.parse_args(argv)
    work = Path(args.work)
    data = sorted(d for d in work.glob("data-*") if d.is_dir() and not d.is_symlink())
    if not data:
        raise SystemExit(f"{work}: no data-* folder; run quality_unseen.py --work {work} first")
    for label in args.pred:
        run_volumes(data[-1], work / "pred" / label)
    for label in args.tumour:
        run_tumour(work / "pred" / label)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
