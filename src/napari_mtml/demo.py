"""`mtml demo`: the whole method end to end on the built-in sample data, in minutes on a CPU.

What it does (`run_demo`):

1. Reads the built-in brain MRI with a tumour (a real clinical axial T1, skull on, 0.78 x 0.78 mm
   in-plane, 6.5 mm slices) and its tumour mask. Slices with tumour (11-17) are set aside; the
   lesion-free slices (0-10 and 18-24) are the *healthy* training data, written as one volume
   `data/brain1_lesion_free_slices.nii.gz` (18 slices).
2. Trains a task cross-validation of 5 models with the recipe for the device (on a CPU the
   "small" one: a 0.28 M-parameter 2D U-Net without positional encoding on 2 mm axial slices,
   a 4/1 split, each model trained on four synthetic tasks and validated on the fifth; on a
   CUDA GPU the paper's, its 1/4 split) for `DEMO_TIME`
   seconds, planned from a measured warm-up (`--time`). Split rule:
   one volume holds all healthy slices, so the five data folds are contiguous runs of slices
   (sorted by slice index: 4, 4, 3, 4, 3 slices); each model's training and validation slices
   are disjoint. The built-in healthy MNI152 brain (skull-stripped template) is the external
   dataset of the inter-dataset blending task. The foreground is a head mask (the skull is on).
3. Predicts the whole volume slice by slice with the ensemble (mean over the 5 folds) and writes
   `brain1_anomaly.nii.gz` and `brain1_disagreement.nii.gz` on the input's grid and geometry.
4. Scores the heatmap against the real tumour mask on the tumour slices (never seen in training),
   inside the head mask: pixel AP and AUROC, pooled, next to a random score. Writes
   `metrics.json` and `overlay.png` (image, heatmap, tumour contour).

It is a demonstration of the pipeline, not a validated detector: one patient, 18 training slices,
a small model and a few hundred CPU steps per fold.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DemoResult", "run_demo", "write_overlay_png"]

#: Default training time (seconds): the recipe for the device ("small" on a CPU: a 0.28 M
#: parameter 2D U-Net without positional encoding, 2 mm slices, cosine schedule) for this long.
DEMO_TIME = 240.0
#: the demo's run: 2D MRI models, every fold (the split is the recipe's)
DEMO_RUN = {"dims": 2, "fold": "all", "kind": "mri"}
_MARKER = ".mtml-demo"


@dataclass
class DemoResult:
    """What `run_demo` produced: paths of the outputs and the metrics dict (also metrics.json)."""

    out_dir: Path
    run_dir: Path
    anomaly: Path
    disagreement: Path
    overlay: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def write_overlay_png(
    path: str | Path,
    image: np.ndarray,
    anomaly: np.ndarray,
    *,
    disagreement: np.ndarray | None = None,
    contour: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    slices: Sequence[int] | None = None,
    title: str = "",
    origin: str | None = None,
) -> Path:
    """Write a PNG: the image, the heatmap over it (with an optional mask contour), and the fold
    disagreement when given.

    Parameters
    ----------
    image, anomaly : 2D `(Y, X)` or 3D `(Z, Y, X)` arrays of one shape; anomaly in [0, 1].
    disagreement : optional array of the same shape (std over folds), drawn in a third column.
    contour : optional bool mask of the same shape (e.g. a tumour), drawn as a cyan line.
    spacing : mm per axis (sets the aspect ratio); default isotropic.
    slices : 3D only: axial slices to show, one row each; default the slice with the highest mean
        anomaly (said in its row title).
    origin : "lower" or "upper" for imshow; default "lower" for 3D (RAS arrays: anterior up),
        "upper" for 2D images (row 0 at the top, as X-rays are stored).
    """
    import matplotlib
    import matplotlib.cm
    import matplotlib.colors
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = np.asarray(image, dtype=np.float32)
    anomaly = np.asarray(anomaly, dtype=np.float32)
    if image.shape != anomaly.shape or image.ndim not in (2, 3):
        raise ValueError(
            f"overlay: image {image.shape} and anomaly {anomaly.shape} must be one 2D or 3D shape"
        )
    for name, extra in (("disagreement", disagreement), ("contour", contour)):
        if extra is not None and np.shape(extra) != image.shape:
            raise ValueError(f"overlay: {name} has shape {np.shape(extra)}, not {image.shape}")
    spacing = tuple(spacing) if spacing is not None else (1.0,) * image.ndim
    if origin is None:
        origin = "lower" if image.ndim == 3 else "upper"
    if image.ndim == 2:
        rows = [(None, "")]
    else:
        if slices is None:
            peak = int(np.argmax(anomaly.reshape(anomaly.shape[0], -1).mean(axis=1)))
            rows = [(peak, f"slice z={peak} (highest mean anomaly)")]
        else:
            rows = [(int(z), f"slice z={int(z)}") for z in slices]
    aspect = float(spacing[-2]) / float(spacing[-1])
    n_cols = 3 if disagreement is not None else 2
    fig = Figure(figsize=(3.6 * n_cols, 3.6 * len(rows) + (0.4 if title else 0)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for r, (z, label) in enumerate(rows):
        pick = lambda a, z=z: a if z is None else a[z]  # noqa: E731
        img = pick(image)
        lo, hi = np.percentile(img, [1, 99.5]) if img.size else (0, 1)
        hi = hi if hi > lo else lo + 1
        ax = axes[r, 0]
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin=origin, aspect=aspect)
        ax.set_title(f"image {label}".strip(), fontsize=9)
        ax = axes[r, 1]
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin=origin, aspect=aspect)
        heat = np.clip(pick(anomaly), 0.0, 1.0)
        # opacity grows with the score: low scores leave the anatomy visible, high ones stand out
        rgba = matplotlib.colormaps["inferno"](heat)
        rgba[..., 3] = 0.85 * np.clip(heat / 0.5, 0.0, 1.0)
        ax.imshow(rgba, origin=origin, aspect=aspect)
        scale = matplotlib.cm.ScalarMappable(
            norm=matplotlib.colors.Normalize(0.0, 1.0), cmap="inferno"
        )
        fig.colorbar(scale, ax=ax, fraction=0.046, pad=0.02)
        if contour is not None and np.any(pick(contour)):
            ax.contour(
                pick(contour).astype(float),
                levels=[0.5],
                colors="cyan",
                linewidths=0.8,
                origin=origin,
            )
        ax.set_title(
            "anomaly (ensemble mean)" + (", tumour: cyan" if contour is not None else ""),
            fontsize=9,
        )
        if disagreement is not None:
            ax = axes[r, 2]
            d = pick(disagreement)
            shown = ax.imshow(
                d,
                cmap="viridis",
                vmin=0,
                vmax=max(float(d.max()), 1e-3),
                origin=origin,
                aspect=aspect,
            )
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
            ax.set_title("fold disagreement (std)", fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------


def _sample_paths() -> dict[str, Path]:
    """The built-in sample files the demo needs: tumour image, tumour mask, MNI152 brain."""
    from napari_mtml.samples import sample_data_path

    return {
        "image": sample_data_path("brain_tumour_image"),
        "label": sample_data_path("brain_tumour_label"),
        # The template file alone: its folder also holds the brain mask, not an image.
        "external": sample_data_path("mni152_t1"),
    }


def _quiet(gen: Generator) -> Any:
    """Drive a training generator, printing one line per finished fold."""
    from napari_mtml.generators import drive
    from napari_mtml.training.events import FoldFinished, Notice

    def show(event) -> None:
        if isinstance(event, FoldFinished):
            print(
                f"fold {event.fold}: best validation loss {event.best_val_loss:.4f} "
                f"at step {event.best_step}"
            )
        elif isinstance(event, Notice):
            print(f"note: {event.text}")

    return drive(gen, show)


def _pixel_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from napari_mtml.metrics import average_precision, roc_auc

    return {
        "ap": float(average_precision(scores, labels)),
        "auroc": float(roc_auc(scores, labels)),
    }


def _slice_auroc(
    heat: np.ndarray, region: np.ndarray, lesion: np.ndarray, method: str
) -> dict[str, float]:
    """Slice-level AUROC/AP: each axial slice scored by `method` inside `region`, lesion
    slices (any lesion voxel) against the others."""
    from napari_mtml.metrics import average_precision, roc_auc
    from napari_mtml.scores import sample_score

    keep = [z for z in range(heat.shape[0]) if region[z].any()]
    scores = np.array([sample_score(heat[z], region[z], method) for z in keep])
    labels = np.array([bool(lesion[z].any()) for z in keep])
    return {
        "auroc": float(roc_auc(scores, labels)),
        "ap": float(average_precision(scores, labels)),
        "slices": len(keep),
    }


def run_demo(
    out_dir: str | Path = "mtml-demo",
    *,
    time_budget: float | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    recipe: str = "auto",
    device: str = "auto",
    seed: int = 0,
    workers: int = 0,
    val_interval: int | None = None,
    val_size: int | None = None,
    brain_mask: str = "auto",
    render: Callable[[Generator], Any] | None = None,
    **model: Any,
) -> DemoResult:
    """Train, predict and score on the built-in brain tumour MRI (see the module docstring).

    Parameters
    ----------
    out_dir : folder for everything (created). A previous demo's `run/` inside it is replaced;
        any other existing run there is refused.
    time_budget : seconds for the training (default `DEMO_TIME`, unless `max_steps` is given).
    max_steps : optimiser steps per fold instead of (or, with `time_budget`, as a cap on) the
        time budget.
    batch_size, recipe, device, seed, workers, val_interval, val_size : as `TrainConfig`
        (unset: the recipe's; "auto" is the small recipe on a CPU).
    brain_mask : "auto": when the `brain` extra is installed, anomalies are placed inside an
        automatic brain mask in training and the maps are kept inside it; "none": head mask.
    render : drives the training generator (the CLI passes its progress bar); default prints
        one line per fold.
    model : `base_features`, `depth`, `max_features`, `pos_encoding` overriding the recipe
        (tests use a tiny U-Net).

    Returns a `DemoResult`; also prints a short summary.
    """
    from napari_mtml import brainmask
    from napari_mtml.config import TrainConfig
    from napari_mtml.devices import with_device_recipe
    from napari_mtml.inference import load_ensemble
    from napari_mtml.io import Scan, read_image, write_image
    from napari_mtml.preprocess import foreground_mask
    from napari_mtml.training import train

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    if run_dir.exists():
        if not (out / _MARKER).is_file():
            raise ValueError(
                f"{run_dir} exists and was not written by `mtml demo`: choose another --out"
            )
        shutil.rmtree(run_dir)
    (out / _MARKER).write_text("written by mtml demo; its run/ folder is replaced on re-runs\n")
    if time_budget is None and max_steps is None:
        time_budget = DEMO_TIME
    use_brain = brain_mask == "auto" and brainmask.available()

    paths = _sample_paths()
    scan = read_image(paths["image"])
    tumour = read_image(paths["label"]).array > 0.5
    if tumour.shape != scan.array.shape:
        raise ValueError(
            f"{paths['label']}: mask shape {tumour.shape} differs from the image's "
            f"{scan.array.shape}"
        )
    has_tumour = tumour.reshape(tumour.shape[0], -1).any(axis=1)
    lesion_slices = np.flatnonzero(has_tumour)
    healthy_slices = np.flatnonzero(~has_tumour)

    # The healthy slices as one volume: data.py then splits its slices contiguously into the
    # five data folds (one volume < five volumes), which is the split by slice wanted here.
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    healthy_path = data_dir / "brain1_lesion_free_slices.nii.gz"
    healthy_scan = Scan(array=scan.array[healthy_slices], spacing=scan.spacing)
    write_image(healthy_path, healthy_scan.array, like=healthy_scan)

    chosen = {
        "max_steps": max_steps,
        "time_budget": time_budget,
        "batch_size": batch_size,
        "recipe": recipe,
        "device": device,
        "workers": workers,
        "seed": seed,
        "val_interval": val_interval,
        "val_size": val_size,
    }
    config = TrainConfig(
        healthy=(str(healthy_path),),
        out=str(run_dir),
        external=str(paths["external"]),
        brain_mask="auto" if use_brain else None,
        **DEMO_RUN,
        **chosen,
        **model,
    )
    budget = f"{time_budget / 60:.1f} min" if time_budget else f"{max_steps} steps per fold"
    planned = with_device_recipe(config)  # the split is the recipe's
    print(
        f"mtml demo: {planned.split_label} task cross-validation ({planned.n_folds} models) "
        f"for {budget} on {len(healthy_slices)} lesion-free slices of {paths['image'].name}; "
        f"external dataset for inter-dataset blending: {paths['external'].name}; brain mask: "
        + (
            "automatic (deepbet)"
            if use_brain
            else "none (head mask; pip install 'napari-mtml[brain]' adds one)"
        )
    )
    result = (render or _quiet)(train(config))
    t_train = time.perf_counter() - t0
    trained = TrainConfig.from_json(run_dir / "config.json")
    fold_steps = [int(trained.steps_of(k)) for k in trained.fold_indices()]
    steps = (
        str(fold_steps[0])
        if len(set(fold_steps)) == 1
        else f"{min(fold_steps)}-{max(fold_steps)}"  # a budget re-planned some folds
    )

    ensemble = load_ensemble(run_dir, device=device)
    head = foreground_mask(scan, kind="mri")
    brain = brainmask.brain_mask(scan) if use_brain else None
    pred = ensemble.predict(scan, keep_folds=True, mask=brain)
    anomaly_path = write_image(out / "brain1_anomaly.nii.gz", pred.anomaly, like=scan)
    disagreement_path = write_image(
        out / "brain1_disagreement.nii.gz", pred.disagreement, like=scan
    )

    def pixel(region: np.ndarray) -> dict[str, Any]:
        sel = np.zeros_like(region)
        sel[lesion_slices] = region[lesion_slices]
        labels = tumour[sel]
        rng = np.random.default_rng(seed)
        random_scores = rng.random(labels.shape, dtype=np.float64).astype(np.float32)
        return {
            "voxels": int(labels.size),
            "tumour_voxels": int(labels.sum()),
            "prevalence": float(labels.mean()),
            "ensemble": _pixel_metrics(pred.anomaly[sel], labels),
            "random": _pixel_metrics(random_scores, labels),
            "folds": {
                f"fold_{k}": _pixel_metrics(m[sel], labels)
                for k, m in zip(ensemble.folds, pred.fold_maps, strict=True)
            },
        }

    in_head = pixel(head)
    metrics: dict[str, Any] = {
        "what": "pixel AP / AUROC pooled over the voxels of the tumour slices "
        f"{lesion_slices.tolist()} (never used in training) inside the head mask, and inside "
        "the automatic brain mask when the brain extra is installed; slice-level AUROC of the "
        f"sample score ({pred.score_method}) of every slice, tumour slices against the others "
        "(which were the training data)",
        **in_head,
        "slice_level": _slice_auroc(pred.anomaly, head, tumour, pred.score_method),
        "max_steps_per_fold": int(trained.max_steps),
        "steps_per_fold": fold_steps,
        "train_seconds": round(t_train, 1),
        "time_budget_seconds": time_budget,
    }
    if brain is not None:
        metrics["in_brain_mask"] = pixel(brain)
        metrics["in_brain_mask"]["tumour_kept"] = float(brain[tumour].mean())
        metrics["in_brain_mask"]["slice_level"] = _slice_auroc(
            pred.anomaly, brain, tumour, pred.score_method
        )
    shown_region = metrics.get("in_brain_mask", in_head)
    ens_m, rnd_m = shown_region["ensemble"], shown_region["random"]
    fold_metrics = shown_region["folds"]
    where = "the brain mask" if brain is not None else "the head mask"
    del result

    area = tumour[lesion_slices].reshape(len(lesion_slices), -1).sum(axis=1)
    peak = int(lesion_slices[np.argmax(area)])
    # The slice with the most tumour and two more tumour slices, two apart where possible.
    near = sorted(lesion_slices.tolist(), key=lambda z: (abs(z - peak) % 2, abs(z - peak)))
    show = sorted(near[:3])
    overlay_path = write_overlay_png(
        out / "overlay.png",
        scan.array,
        pred.anomaly,
        disagreement=pred.disagreement,
        contour=tumour,
        spacing=scan.spacing,
        slices=show,
        title=f"mtml demo: tumour-slice pixel AP {ens_m['ap']:.3f} in {where} "
        f"(random {rnd_m['ap']:.3f})",
    )
    metrics["total_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    ratio = ens_m["ap"] / max(rnd_m["ap"], 1e-12)
    fold_aps = [m["ap"] for m in fold_metrics.values()]
    sl = shown_region.get("slice_level", metrics["slice_level"])
    summary = "\n".join(
        [
            f"tumour slices {lesion_slices.min()}-{lesion_slices.max()}, inside {where} "
            f"({shown_region['voxels']} voxels, {shown_region['prevalence']:.2%} tumour):",
            f"  ensemble pixel AP {ens_m['ap']:.3f}, AUROC {ens_m['auroc']:.3f}",
            f"  random score     AP {rnd_m['ap']:.3f}, AUROC "
            f"{rnd_m['auroc']:.3f}  (ensemble AP = {ratio:.1f}x random)",
            f"  single folds     AP {min(fold_aps):.3f} to {max(fold_aps):.3f}",
            f"  slice level: tumour slices against the others, AUROC {sl['auroc']:.3f}",
            f"  one patient, {len(healthy_slices)} training slices with the skull on, a small "
            f"model and {steps} CPU steps per fold: a demonstration of the pipeline, not a "
            "validated detector (the paper trains for hours on hundreds of skull-stripped "
            "volumes); overlay.png shows where the map responds.",
            f"wrote {anomaly_path.name}, {disagreement_path.name}, {overlay_path.name}, "
            f"metrics.json in {out} ({metrics['total_seconds']:.0f} s)",
        ]
    )
    print(summary)
    return DemoResult(out, run_dir, anomaly_path, disagreement_path, overlay_path, metrics, summary)
