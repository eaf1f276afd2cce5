"""Ensemble inference: load a trained run and predict anomaly heatmaps on an image's own grid.

A run folder (see docs/api.md) holds `config.json` and one `fold_K/best.pt` per cross-validation
fold. `load_ensemble` rebuilds each fold's U-Net from the run's settings and loads its best
weights (`torch.load(..., weights_only=True)`: no arbitrary unpickling). `Ensemble.predict`

1. brings the scan into the run's frame with the run's own preprocessing (`to_frame`),
2. runs every fold model on it (batched, under `torch.inference_mode`), clips each output to
   [0, 1] (the models regress a label in [0, 1) without a final activation),
3. takes the mean over folds (the paper's ensemble) and the standard deviation over folds (the
   fold disagreement, population std, ddof=0),
4. maps both back onto the scan's grid (`from_frame`).

Dimensionality: a 3D run predicts 3D volumes; a 2D run predicts 2D images, and 3D volumes slice by
slice along the first (axial, z) axis, all slices batched. A 2D image given to a 3D run is refused.

An image plainly unlike the run's training data (its DICOM modality says X-ray to an MRI run, CT to
an MRI run, MRI to an X-ray run: `preprocess.kind_mismatch`) is still predicted, with a
`ModalityWarning` and the same line in `Prediction.notes` (`mtml predict` prints it; the Heatmap
widget shows it under the map).

Volumes larger than the frame: the frame must hold the preprocessed foreground (cropped to its
bounding box and downsampled by the run's factor). When it does not, prediction is refused with a
`ValueError` that names the image, the run's frame and the frame that would fit: the models carry a
positional encoding tied to the frame, so neither tiling nor a silent extra downsampling (which
changes the physical scale the models learnt anomalies at) would give trustworthy maps. Retrain with
a larger `--frame`, or crop the image to the region of interest.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_mtml.devices import apply_thread_rule, prepare_model_for_device, resolve_device
from napari_mtml.heap import keep_freed_memory

__all__ = [
    "Ensemble",
    "ModalityWarning",
    "Prediction",
    "load_ensemble",
    "resolve_device",
    "run_stamp",
]


class ModalityWarning(UserWarning):
    """An image predicted by a run trained on another kind of image (`Prediction.notes`)."""


@dataclass(frozen=True)
class Prediction:
    """An ensemble prediction on the input's own grid.

    Attributes
    ----------
    anomaly : float32 array, the input's shape; ensemble mean of the fold outputs, in [0, 1].
    disagreement : float32 array, the input's shape; standard deviation over folds (ddof=0), in
        [0, 0.5].
    score : float; sample-level anomaly score of the ensemble map inside `mask`, by the method
        `score_method` (`napari_mtml.scores`; default "max": its peak after a 4 mm smoothing,
        2 mm on a 2D map).
    fold_scores : tuple of float; the same score for each fold model on its own (only with
        `predict(..., fold_scores=True)`, as the Heatmap widget asks; empty otherwise).
    fold_maps : tuple of float32 arrays of the input's shape, each fold's own clipped map
        (only with `predict(..., keep_folds=True)`; empty otherwise).
    mask : bool array of the input's shape: where the map may be non-zero (the foreground, or
        the brain mask given); None when the background was kept.
    scores : every sample score of the ensemble map (`napari_mtml.scores.all_scores`).
    score_method : the name of the method behind `score`.
    notes : tuple of str; one line each about the input that the map's reader should know (an
        image unlike the run's training data: `preprocess.kind_mismatch`; a volume in which no
        mirror symmetry was found for the left-right comparison); empty normally.
    midplane : the mirror plane (`napari_mtml.symmetry.MidPlane`) the map was compared across
        (`predict(..., contralateral=...)`): the map holds what one side has and the other has
        not; None when the map is the models' own.
    """

    anomaly: np.ndarray
    disagreement: np.ndarray
    score: float
    fold_scores: tuple[float, ...] = field(default=())
    fold_maps: tuple[np.ndarray, ...] = field(default=())
    mask: np.ndarray | None = None
    scores: dict = field(default_factory=dict)
    score_method: str = "max"
    notes: tuple[str, ...] = ()
    midplane: Any = None


# --------------------------------------------------------------------------------------------
# Run settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunSettings:
    """What inference needs from a run's config.json."""

    dims: int
    frame: tuple[int, ...]
    kind: str
    downsample: float
    spacing: float | None
    model_kwargs: dict[str, Any]
    n_folds: int

    def geometry(self) -> dict[str, Any]:
        """The model's input grid: `Ensemble`'s `dims`, `frame`, `kind`, `downsample` and
        `spacing` arguments."""
        names = ("dims", "frame", "kind", "downsample", "spacing")
        return {name: getattr(self, name) for name in names}


def _read_settings(run_dir: Path) -> tuple[_RunSettings, dict[str, Any]]:
    """The run's settings from `RUN/config.json` (a resolved `TrainConfig`), and its raw dict."""
    from napari_mtml.config import TrainConfig

    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise ValueError(
            f"run folder {run_dir} does not exist: pass the --out folder of `mtml train`"
        )
    if not path.is_file():
        raise ValueError(
            f"{path} is missing: {run_dir} is not a napari-mtml run folder (train one with "
            "`mtml train HEALTHY... --out RUN`)"
        )
    try:
        config = TrainConfig.from_json(path)  # errors name the file
    except ValueError as exc:
        raise ValueError(f"{exc}; re-create the run") from None
    try:
        model_kwargs = config.model_kwargs()
    except ValueError as exc:
        raise ValueError(
            f"{path} has no resolved model settings (dims/frame unset): {exc}; did training "
            "start? re-run `mtml train`"
        ) from exc
    kind = config.resolved_kind or config.kind
    dims = int(model_kwargs.pop("dims"))
    frame = tuple(int(f) for f in model_kwargs.pop("frame"))
    settings = _RunSettings(
        dims,
        frame,
        kind,
        config.resample["downsample"],
        config.spacing,
        model_kwargs,
        config.n_folds,
    )
    return settings, config.to_dict()


def _present_folds(run_dir: Path, n_folds: int) -> list[int]:
    """The folds of a run that have their `fold_K/best.pt`."""
    return [k for k in range(n_folds) if (run_dir / f"fold_{k}" / "best.pt").is_file()]


def _find_folds(
    run_dir: Path, settings: _RunSettings, folds: Sequence[int] | str | None
) -> list[int]:
    """The fold indices to load; every one must have its `best.pt` (else a ValueError naming it).

    Default: every fold of the split. A run trained one fold per job (`--fold K`) shares one
    folder whose config.json names the last job's fold; it is loaded once all its folds exist.
    `"available"`: the folds that have a `best.pt` (a run still training, or cancelled).
    """
    if isinstance(folds, str):
        if folds != "available":
            raise ValueError(
                f"folds={folds!r}: give fold indices, None (every fold) or "
                "'available' (the folds trained so far)"
            )
        wanted = None
    elif folds is not None:
        wanted = sorted({int(k) for k in folds})
        bad = [k for k in wanted if not 0 <= k < settings.n_folds]
        if bad:
            raise ValueError(
                f"fold(s) {bad} out of range for {run_dir}: it has folds 0..{settings.n_folds - 1}"
            )
        if not wanted:
            raise ValueError("folds=[] selects no model: pass None for every fold of the run")
    else:
        wanted = list(range(settings.n_folds))
    present = _present_folds(run_dir, settings.n_folds)
    if not present:
        raise ValueError(
            f"{run_dir} holds no trained fold (no fold_K/best.pt): training did not finish a "
            "validation; train it (again) with `mtml train ... --out RUN`"
        )
    if wanted is None:
        return present
    missing = [k for k in wanted if k not in present]
    if missing:
        files = ", ".join(str(run_dir / f"fold_{k}" / "best.pt") for k in missing)
        raise ValueError(
            f"missing fold checkpoint(s): {files}; train them with `mtml train ... --fold K "
            f"--out {run_dir}` or load only the present folds {present} (folds=...)"
        )
    return wanted


def run_stamp(run_dir: str | Path) -> tuple:
    """What identifies a run's trained state on disk: the modification times (ns) of its
    config.json and of every `fold_K/best.pt`. A run retrained in the same folder gets another
    stamp, so a cache of loaded ensembles or of thresholds keyed by it never serves stale ones.

    Parameters
    ----------
    run_dir : str or Path
        A run folder or builtin:NAME.

    Returns
    -------
    tuple
        Hashable; equal for the same trained state.
    """
    from napari_mtml.builtin import resolve_run

    folder = resolve_run(run_dir).expanduser()
    files = [folder / "config.json", *sorted(folder.glob("fold_*/best.pt"))]
    return (
        str(folder.resolve()),
        *(
            (f.name if f.name == "config.json" else f.parent.name, f.stat().st_mtime_ns)
            for f in files
            if f.is_file()
        ),
    )


def _load_state_dict(
    path: Path, device: torch.device, settings: _RunSettings | None = None
) -> dict[str, torch.Tensor]:
    from napari_mtml.training.checkpoint import check_frame

    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged zip/pickle
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc}); re-train this fold"
        ) from exc
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        if settings is not None:
            check_frame(
                path, dict(obj), settings.dims, settings.frame, path.parent.parent / "config.json"
            )
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a model state dict; re-train this fold")
    bad = [k for k, v in obj.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(
            f"{path} holds NaN or infinite weights ({len(bad)} tensor(s), e.g. "
            f"{bad[0]}); this fold's training diverged or the file is damaged: "
            "re-train this fold"
        )
    return dict(obj)


def load_fold_weights(run_dir: str | Path, fold: int) -> dict[str, torch.Tensor]:
    """The state dict of fold `fold` of a run (a folder or "builtin:NAME"): its
    `fold_K/best.pt`, or that of fold `fold mod n` over its n trained folds when the run has
    fewer (e.g. fine-tuning a 2/3 split from a 1/4 run). `ValueError` naming the file when it
    is missing or not a model state dict."""
    from napari_mtml.builtin import resolve_run

    run_dir = resolve_run(run_dir)
    settings, _ = _read_settings(run_dir)
    present = _present_folds(run_dir, settings.n_folds)
    if not present:
        raise ValueError(f"{run_dir} holds no trained fold (no fold_K/best.pt) to start from")
    k = fold if fold in present else present[fold % len(present)]
    return _load_state_dict(run_dir / f"fold_{k}" / "best.pt", torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# The ensemble
# --------------------------------------------------------------------------------------------


def _fold_mean_std(per_fold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel mean and std (ddof=0) over the folds (axis 0) of float32 maps in [0, 1],
    float32, in two passes: a handful of values in [0, 1] per voxel needs no float64, which
    numpy's `std(dtype=float64)` took 0.3 s for on a 189-slice volume (now a few hundredths;
    the same to 1e-7)."""
    mean = per_fold.mean(axis=0)
    deviation = per_fold - mean
    np.square(deviation, out=deviation)
    std = np.sqrt(deviation.mean(axis=0))
    return mean.astype(np.float32, copy=False), std.astype(np.float32, copy=False)


class Ensemble:
    """The fold models of one run, ready to predict.

    Build it with `load_ensemble`. Attributes: `run_dir` (Path), `dims` (2 or 3), `frame` (tuple of
    int, voxels), `kind` ("mri", "cxr" or "auto"), `downsample` (float), `folds` (the fold indices
    loaded), `models` (list of `torch.nn.Module` in eval mode), `device`, `config` (the run's
    config.json as a dict). `batch_size`: frames per forward call (default: 16 in 2D, 1 in 3D).
    `precision`: "float32" (default) or "bfloat16" (autocast; on CPUs with native bf16 about
    2.5x faster, but the maps move by up to a few 1e-2: see `predict_frames`).
    """

    def __init__(
        self,
        models: Sequence[torch.nn.Module],
        *,
        dims: int,
        frame: Sequence[int],
        kind: str = "auto",
        downsample: float = 2,
        spacing: float | None = None,
        fixed_frame: bool = True,
        folds: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
        run_dir: Path | None = None,
        config: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
        precision: str = "float32",
    ) -> None:
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.models = list(models)
        self.dims = int(dims)
        self.frame = tuple(int(f) for f in frame)
        self.kind = kind
        self.downsample = downsample
        self.spacing = spacing
        self.fixed_frame = bool(fixed_frame)
        self.min_foreground = float((config or {}).get("min_foreground", 0.05) or 0.0)
        #: MRI preprocessing the run trained with (`TrainConfig.bias_correction`)
        self.bias_correction = str((config or {}).get("bias_correction") or "none")
        self.folds = tuple(folds) if folds is not None else tuple(range(len(self.models)))
        self.device = resolve_device(device)
        self.run_dir = run_dir
        self.config = dict(config or {})
        #: the run's healthy calibration (`napari_mtml.calibration`), set by `load_ensemble`
        self.calibration: dict | None = None
        if batch_size is None:
            batch_size = 16 if self.dims == 2 else 1
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, (int, np.integer))
            or batch_size < 1
        ):
            raise ValueError(
                f"batch size {batch_size!r} is invalid: give a positive number of "
                "frames per forward pass (--batch-size B), or leave it out for "
                "the default (16 in 2D, 1 in 3D)"
            )
        self.batch_size = int(batch_size)
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be 'float32' or 'bfloat16', got {precision!r}")
        self.precision = precision
        for m in self.models:
            m.eval()

    @property
    def n_folds(self) -> int:
        """The number of folds of the run's T/(5-T) split, C(5, T) (`folds` are those loaded)."""
        return (
            math.comb(5, int(self.config.get("train_tasks", 1))) if self.config else len(self.folds)
        )

    def __repr__(self) -> str:
        return (
            f"Ensemble({len(self.models)} folds {list(self.folds)}, {self.dims}D frame "
            f"{self.frame}, kind={self.kind!r}, device={self.device})"
        )

    # ---- the forward pass in the frame ----

    def predict_frames(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run every fold on a batch of frames.

        Parameters
        ----------
        frames : float array `(N, *frame)` (preprocessed, as `to_frame` returns them).

        Returns
        -------
        mean, std : float32 `(N, *frame)`; per-voxel mean and std (ddof=0) over folds of the
            fold outputs clipped to [0, 1].
        per_fold : float32 `(F, N, *frame)`; the clipped output of each fold.
        """
        frames = np.asarray(frames, dtype=np.float32)
        if frames.ndim != self.dims + 1 or (self.fixed_frame and frames.shape[1:] != self.frame):
            raise ValueError(
                f"frames of shape {frames.shape[1:]} given to a run with frame {self.frame}"
            )
        n = frames.shape[0]
        per_fold = np.empty((len(self.models), *frames.shape), dtype=np.float32)
        x_all = torch.from_numpy(frames).unsqueeze(1)  # (N, 1, *frame): one input channel
        bf16 = self.precision == "bfloat16"
        with (
            keep_freed_memory(),
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16),
        ):
            # each batch goes to the device once and through every fold
            for start in range(0, n, self.batch_size):
                x = x_all[start : start + self.batch_size].to(self.device)
                for f, model in enumerate(self.models):
                    y = model(x).float().clamp_(0.0, 1.0)
                    per_fold[f, start : start + x.shape[0]] = y[:, 0].cpu().numpy()
        mean, std = _fold_mean_std(per_fold)
        return mean, std, per_fold

    # ---- on a scan's own grid ----

    def predict(
        self,
        scan: Any,
        *,
        keep_folds: bool = False,
        mask: np.ndarray | None = None,
        keep_background: bool = False,
        score: str | None = None,
        tta: bool = False,
        fold_scores: bool = False,
        contralateral: bool | str = "auto",
    ) -> Prediction:
        """Ensemble heatmaps for one scan, on the scan's own grid.

        Parameters
        ----------
        scan : `napari_mtml.io.Scan` (2D `(Y, X)` or 3D `(Z, Y, X)` float32 array with spacing
            in mm). A 3D scan given to a 2D run is predicted slice by slice along axis 0.
        keep_folds : also map each fold's output back (`Prediction.fold_maps`).
        fold_scores : also score each fold's map on its own (`Prediction.fold_scores`; it
            maps every fold's output back, which costs about a quarter of a 3D prediction).
        mask : bool array of the scan's shape (e.g. a brain mask): the maps are 0 outside it
            and the sample score is taken inside it. Default: the scan's foreground
            (`preprocess.foreground_mask`: the head, or the non-zero voxels of a skull-stripped
            scan; everything for an X-ray).
        keep_background : keep the maps outside the mask as the models made them (the score is
            still taken inside the mask).
        score : the sample score (`napari_mtml.scores.SAMPLE_SCORES`); default
            `scores.DEFAULT_SAMPLE_SCORE`.
        tta : also predict the image mirrored along its last axis (the models train with that
            flip for MRI) and average both.
        contralateral : "auto" (default), True or False. Compare the two sides of the body:
            fit the image's mid-sagittal plane (`napari_mtml.symmetry.fit_midplane`, over the
            mask or foreground) and take from each voxel the highest value of the map within
            3 mm of its mirror image (`symmetry.contralateral`), so that what both sides share
            (the skull base, the eyes, the ventricles' rims on a healthy head) drops out and
            what one side has alone stays. "auto": for 3D volumes of MRI runs, where the last
            axis is left-right (the readers' RAS-canonical order); True: any 2D or 3D image,
            mirrored along its last axis. A lesion with a mirror image on the other side
            (bilateral, symmetric disease) is suppressed with it: use False there. Where the
            fit finds no symmetry (correlation under `symmetry.MIN_CORRELATION`) the map is
            left as the models made it and a note says so.

        A 2D run on a volume leaves the map at 0 on slices whose foreground covers less of the
        frame than the run's `min_foreground` (training dropped such slices: the models never
        saw the tip of a head and would score its edges).

        Returns
        -------
        Prediction with `anomaly` and `disagreement` float32 of `scan.array.shape`.

        Raises
        ------
        ValueError : a 2D image for a 3D run, content that does not fit the run's frame, a mask
            of the wrong shape.

        Examples
        --------
        >>> from napari_mtml.samples import load_sample
        >>> ensemble = load_ensemble("builtin:brain-t1", device="cpu")
        >>> prediction = ensemble.predict(load_sample("brain_tumour_image"), keep_folds=True)
        >>> len(prediction.fold_maps) == len(ensemble.folds), float(prediction.anomaly.max()) <= 1
        (True, True)
        """
        # scan-sized arrays and 3D activations reuse pages instead of faulting new ones in
        with keep_freed_memory():
            options = (keep_folds, mask, keep_background, score, tta, fold_scores, contralateral)
            return self._predict(scan, *options)

    def _predict(
        self, scan, keep_folds, mask, keep_background, score, tta, fold_scores, contralateral
    ):
        from napari_mtml.parallel import map_threads
        from napari_mtml.preprocess import (
            FrameFitError,
            content_shape,
            fit_frame,
            foreground_mask,
            from_frame,
            kind_mismatch,
            to_frame,
        )
        from napari_mtml.scores import DEFAULT_SAMPLE_SCORE, all_scores, sample_score

        array = np.asarray(scan.array)
        name = _scan_name(scan)
        method = score or DEFAULT_SAMPLE_SCORE
        if isinstance(tta, str) or (tta is not None and tta not in (0, 1)):
            # a string such as "off" would have been true: the full augmentation
            raise ValueError(f"tta must be True or False, got {tta!r}")
        tta = bool(tta)
        if contralateral not in ("auto", True, False, 0, 1) or isinstance(contralateral, float):
            raise ValueError(f"contralateral must be 'auto', True or False, got {contralateral!r}")
        if array.ndim not in (2, 3):
            raise ValueError(f"{name}: expected a 2D or 3D image, got shape {array.shape}")
        if array.ndim == 2 and self.dims == 3:
            raise ValueError(
                f"{name} is a 2D image but the run's models are 3D (frame {self.frame}): use a "
                "run trained with --dims 2 for 2D images"
            )
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != array.shape:
                raise ValueError(
                    f"{name}: the mask has shape {mask.shape} but the image {array.shape}; give "
                    "a mask on the image's own grid"
                )
        mismatch = kind_mismatch(scan, self.kind)
        notes = (mismatch,) if mismatch else ()
        for note in notes:
            warnings.warn(note, ModalityWarning, stacklevel=3)
        try:
            foreground = foreground_mask(scan, kind=self.kind)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
        resample = {"downsample": self.downsample, "spacing": self.spacing}
        # scan-sized array work in as many threads as the models have (scipy and numpy release
        # the GIL); the same arrays with any number
        workers = max(1, torch.get_num_threads())
        frame = self.frame
        kind = self.kind
        try:
            if not self.fixed_frame:
                # a fully convolutional run: a frame at least the training one, grown to hold
                # this image's content
                need = fit_frame(
                    content_shape(
                        scan, kind=kind, dims=self.dims, foreground=foreground, **resample
                    ),
                    self.models[0].divisor if hasattr(self.models[0], "divisor") else 16,
                )
                if len(need) == len(frame):
                    frame = tuple(max(a, b) for a, b in zip(frame, need, strict=True))
            frames, frame_fg, transform = to_frame(
                scan,
                kind=kind,
                dims=self.dims,
                frame=frame,
                foreground=foreground,
                bias_correction=self.bias_correction,
                workers=workers,
                **resample,
            )
        except FrameFitError as exc:
            res = (
                f"{self.spacing:g} mm"
                if self.spacing is not None
                else f"downsample {self.downsample:g}"
            )
            raise ValueError(
                f"{name} does not fit the run's {self.dims}D frame {self.frame} at {res}: "
                f"{exc} (crop the image, or retrain with a larger --frame)"
            ) from exc
        except ValueError as exc:  # a blank image, a wrong kind...: a larger frame cannot help
            msg = str(exc)
            raise ValueError(msg if name in msg else f"{name}: {msg}") from exc
        frames = np.asarray(frames, dtype=np.float32)
        frame_fg = np.asarray(frame_fg, dtype=bool)
        stacked = frames.ndim == self.dims + 1  # dims=2 on a 3D scan: (Z, *frame2d)
        if not stacked:
            frames = frames[None]
        mean, std, per_fold = self.predict_frames(frames)
        if tta:
            m2, s2, f2 = self.predict_frames(np.ascontiguousarray(frames[..., ::-1]))
            per_fold = 0.5 * (per_fold + f2[..., ::-1])
            mean, std = _fold_mean_std(per_fold)
        if stacked:
            # Slices with less foreground than training kept (the top and bottom of a head)
            # were never shown to the models: they would score their edges, not anomalies.
            cover = frame_fg.reshape(len(frame_fg), -1).sum(axis=1) / math.prod(self.frame)
            unseen = cover < self.min_foreground
            if unseen.any() and not unseen.all():
                for a in (mean, std):
                    a[unseen] = 0.0
                per_fold[:, unseen] = 0.0
        else:
            mean, std, per_fold = mean[0], std[0], per_fold[:, 0]
        region = foreground if mask is None else mask
        if not region.any():
            region = np.ones_like(region)

        def back(m: np.ndarray) -> np.ndarray:
            return np.clip(np.asarray(from_frame(m, transform), dtype=np.float32), 0.0, 1.0)

        folds_back = list(per_fold) if keep_folds or fold_scores else []
        anomaly, disagreement, *folds_back = map_threads(back, [mean, std, *folds_back], workers)
        if anomaly.shape != array.shape:  # a contract breach upstream, not a user error
            raise RuntimeError(
                f"from_frame returned shape {anomaly.shape} for a scan of shape {array.shape}"
            )
        fold_maps = tuple(folds_back)
        if not keep_background:
            for m in (anomaly, disagreement, *fold_maps):
                m[~region] = 0.0
        spacing = getattr(scan, "spacing", None)
        if contralateral == "auto":
            contralateral = _compares_sides_by_default(array.ndim, self.kind)
        midplane = None
        if contralateral:
            midplane, anomaly, fold_maps, note = _compare_sides(
                array, spacing, region, anomaly, fold_maps
            )
            if note:
                notes = (*notes, f"{name}: {note}")
        scores = all_scores(anomaly, region, spacing=spacing)
        value = (
            scores[method]
            if method in scores
            else sample_score(anomaly, region, method, spacing=spacing)
        )
        per_fold_scores = _fold_scores(fold_maps, region, method, spacing) if fold_scores else ()
        return Prediction(
            anomaly,
            disagreement,
            value,
            per_fold_scores,
            fold_maps if keep_folds else (),
            None if keep_background else region,
            scores,
            method,
            notes,
            midplane,
        )

    def predict_array(
        self,
        array: np.ndarray,
        spacing: Sequence[float] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> Prediction:
        """`predict` for a plain array (e.g. a napari layer's data).

        Parameters
        ----------
        array : 2D `(Y, X)` or 3D `(Z, Y, X)` numeric array; converted to float32, not mutated.
        spacing : mm per axis in the array's axis order (a layer's `scale`); default 1 mm.
        metadata : optional Scan metadata (e.g. `{"modality": "CR"}` for `kind="auto"` runs).
        """
        from napari_mtml.io import Scan

        arr = np.asarray(array, dtype=np.float32)
        if arr.ndim not in (2, 3):
            raise ValueError(f"expected a 2D or 3D array, got shape {arr.shape}")
        spacing = tuple(float(s) for s in (spacing or (1.0,) * arr.ndim))
        if len(spacing) != arr.ndim or not all(s > 0 and math.isfinite(s) for s in spacing):
            raise ValueError(
                f"spacing {spacing} must give one positive mm value per axis of the "
                f"{arr.ndim}D array"
            )
        # The array axes are (z, y, x); a NIfTI voxel-to-world affine is indexed (x, y, z).
        affine = np.diag([*spacing[::-1], *([1.0] * (4 - arr.ndim))]).astype(np.float64)
        meta = {"path": None, "warnings": []}
        meta.update(metadata or {})
        return self.predict(Scan(array=arr, spacing=spacing, affine=affine, metadata=meta))


def _fold_scores(fold_maps, region, method, spacing) -> tuple[float, ...]:
    """Each fold map's sample score, in as many threads as the models had (scipy's smoothing
    releases the GIL; the same scores, in fold order)."""
    from napari_mtml.parallel import map_threads
    from napari_mtml.scores import sample_score

    def score(f):
        return sample_score(f, region, method, spacing=spacing)

    return tuple(map_threads(score, fold_maps, max(1, torch.get_num_threads())))


def _compares_sides_by_default(ndim: int, kind: str) -> bool:
    """`contralateral="auto"`: the two sides are compared for 3D volumes of a body that has
    them (MRI), not for 2D images or X-rays."""
    return ndim == 3 and kind != "cxr"


def _compare_sides(array, spacing, region, anomaly, fold_maps):
    """`Ensemble.predict(contralateral=True)`: the fitted mid-sagittal plane and the maps less
    their mirror images (`napari_mtml.symmetry`), or (None, the maps, a note) where the image has
    no mirror symmetry to use."""
    from napari_mtml.symmetry import MIN_CORRELATION, contralateral, fit_midplane

    sp = np.asarray(spacing if spacing is not None else (1.0,) * array.ndim, dtype=np.float64)
    sp = sp[-array.ndim :]
    # as many threads as the models had (scipy's filters release the GIL)
    workers = max(1, torch.get_num_threads())
    try:
        plane = fit_midplane(array, sp, region, workers=workers)
    except ValueError as exc:
        return None, anomaly, fold_maps, f"the two sides were not compared ({exc})"
    if not plane.correlation >= MIN_CORRELATION:
        return (
            None,
            anomaly,
            fold_maps,
            f"no left-right mirror symmetry found (correlation {plane.correlation:.2f} < "
            f"{MIN_CORRELATION}): the map is not compared across the two sides",
        )
    anomaly = contralateral(anomaly, sp, plane, workers=workers)
    fold_maps = tuple(contralateral(f, sp, plane, workers=workers) for f in fold_maps)
    return plane, anomaly, fold_maps, None


def _scan_name(scan: Any) -> str:
    meta = getattr(scan, "metadata", None) or {}
    path = meta.get("path") if isinstance(meta, Mapping) else None
    return str(path) if path else "the image"


def load_ensemble(
    run_dir: str | Path,
    device: str | torch.device = "auto",
    *,
    folds: Sequence[int] | str | None = None,
    batch_size: int | None = None,
    precision: str = "float32",
) -> Ensemble:
    """Load every fold of a trained run.

    Parameters
    ----------
    run_dir : the folder `mtml train --out RUN` wrote (`config.json`, `fold_K/best.pt`).
    device : "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps".
    folds : fold indices to load (default: every fold of the run's T/(5-T) split, C(5, T) of
        them), or "available": the folds that have a `best.pt` so far (a run trained fold by
        fold, still training or cancelled); `Ensemble.n_folds` tells how many the split has.
    batch_size : frames per forward call (default 16 for 2D runs, 1 for 3D).
    precision : "float32" (default) or "bfloat16" (see `Ensemble`).

    The models are built without random initialisation (their weights come from the
    checkpoints), put in the memory format that runs fastest on the device
    (`napari_mtml.devices.prepare_model_for_device`), and torch's CPU thread count is set by
    the thread rule (`napari_mtml.devices.apply_thread_rule`).

    Raises
    ------
    ValueError : naming the file, for a missing folder/config, no trained fold, a missing fold
        checkpoint, a corrupt checkpoint or one that does not match the run's model settings.

    Examples
    --------
    >>> from napari_mtml.inference import load_ensemble
    >>> from napari_mtml.samples import load_sample
    >>> ensemble = load_ensemble("builtin:brain-t1", device="cpu")  # or RUN of mtml train
    >>> ensemble.folds
    (0, 1, 2, 3, 4)
    >>> scan = load_sample("brain_tumour_image")
    >>> prediction = ensemble.predict(scan)
    >>> prediction.anomaly.shape == scan.array.shape, prediction.score_method
    (True, 'max')

    `folds="available"` loads the folds trained so far (a run still training), and a built-in
    model goes wherever a run folder does: ``load_ensemble("builtin:brain-t1")``.
    """
    from napari_mtml.builtin import resolve_run
    from napari_mtml.model import UNet

    run_dir = resolve_run(run_dir)
    settings, cfg = _read_settings(run_dir)
    dev = resolve_device(device)
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision must be 'float32' or 'bfloat16', got {precision!r}")
    wanted = _find_folds(run_dir, settings, folds)
    apply_thread_rule(0, dev)
    models = []
    for k in wanted:
        path = run_dir / f"fold_{k}" / "best.pt"
        state = _load_state_dict(path, dev, settings)
        model = UNet(
            dims=settings.dims, frame=settings.frame, **settings.model_kwargs, initialise=False
        )
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ValueError(
                f"{path} does not match the model described in {run_dir / 'config.json'} "
                f"({first}); was the config edited? re-train this fold"
            ) from exc
        models.append(prepare_model_for_device(model, dev).eval())
    from napari_mtml.calibration import read_calibration

    ensemble = Ensemble(
        models,
        **settings.geometry(),
        fixed_frame=bool(settings.model_kwargs.get("pos_encoding", True)),
        folds=wanted,
        device=dev,
        run_dir=run_dir,
        config=cfg,
        batch_size=batch_size,
        precision=precision,
    )
    ensemble.calibration = read_calibration(run_dir)
    return ensemble
