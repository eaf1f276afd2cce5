"""One configuration object per training run.

`TrainConfig` holds every setting of a run: the `mtml train` flags, the model, the preprocessing,
the optimiser schedule, validation and the synthetic task parameters. The CLI, the napari widget
and a TOML file all fill this same dataclass; `RUN/config.json` stores it (resolved: every `None`
default replaced by the value actually used) beside the checkpoints, so that inference can rebuild
the model and the preprocessing from the run folder alone.

Defaults that depend on the data (`None` below) follow the paper (METHOD.md sections 5-6):

=================  ==============================  ==============================
setting            brain MRI, 3D                   chest X-ray, 2D
=================  ==============================  ==============================
batch_size         8                               50
lr (peak)          1e-3                            5e-3
max_push           5.0                             10.0
flip (last axis)   yes, p = 0.5                    no
model "paper"      depth 5, 32 base, max 320       depth 7, 32 base, max 512
model "light"      depth 5, 16 base, max 160       depth 7, 16 base, max 256
=================  ==============================  ==============================

2D slices of MRI volumes (`dims=2` with volumes) use the MRI task settings (push 5, flip) and the
2D batch size, learning rate and model. When the preset's depth does not divide the frame (a U-Net
of depth d needs every frame size divisible by 2**(d-1)), `resolve` lowers the depth until it does
(an explicitly set `depth` is kept, and the model then reports the frame that would fit).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from napari_mtml.anomalies.tasks import TaskParams as _TaskParams
from napari_mtml.bias import BIAS_CORRECTIONS

__all__ = [
    "TrainConfig",
    "MODEL_PRESETS",
    "RECIPES",
    "RECIPE_NAMES",
    "AUTO_INIT",
    "recipe_for_device",
    "parse_duration",
    "parse_fold",
    "parse_frame",
    "Setting",
    "settings",
]

# (base_features, depth, max_features) per preset and number of spatial dimensions.
MODEL_PRESETS: dict[str, dict[int, tuple[int, int, int]]] = {
    "paper": {3: (32, 5, 320), 2: (32, 7, 512)},
    "light": {3: (16, 5, 160), 2: (16, 7, 256)},
    "small": {3: (8, 5, 64), 2: (8, 5, 64)},
}

#: What each recipe sets when the user leaves a setting unset (None). "auto" picks "small" on a
#: CPU, "light" on Apple's MPS and "paper" on CUDA (`recipe_for_device`). Figures behind the
#: choices: README "What a CPU run can and cannot do" and benchmarks/quality_unseen.py.
RECIPES: dict[str, dict[str, Any]] = {
    # METHOD.md sections 5-7: the paper's models, schedule and x2 downsampling, fixed frames,
    # 20,000 steps, positional encoding; dims from the data (3D brains).
    "paper": {
        "preset": "paper",
        "pos_encoding": True,
        "lr_schedule": "paper",
        "ema": 0.0,
        "max_steps": 20000,
        "downsample": 2.0,
        "fit_frame": False,
        "selection": "loss",
        "bias_augment": 0.0,
        "train_tasks": 1,
    },
    # Half the paper's widths, no positional encoding, the schedule spanning the run, frames
    # fitted to the data at a fixed physical spacing.
    "light": {
        "preset": "light",
        "pos_encoding": False,
        "lr_schedule": "cosine",
        "ema": 0.0,
        "max_steps": 2000,
        "spacing": 2.0,
        "fit_frame": True,
        "selection": "ap",
        "bias_augment": 0.5,
        "train_tasks": 1,
    },
    # What a CPU can train well in minutes: a 0.28 M-parameter U-Net on axial slices (2D models
    # read thick-slice clinical volumes too), batch 16, cosine schedule over the planned run.
    "small": {
        "preset": "small",
        "pos_encoding": False,
        "lr_schedule": "cosine",
        "ema": 0.0,
        "max_steps": 1500,
        "spacing": 2.0,
        "fit_frame": True,
        "dims": 2,
        "batch_size": {2: 16, 3: 4},
        "selection": "ap",
        # random bias fields on MRI training images: pixel AP on unseen lesions 0.287 -> 0.319
        # (README, "What a CPU run can and cannot do")
        "bias_augment": 0.5,
        # a 4/1 split (each model trains on four tasks, validated on the fifth): pixel AP on
        # unseen lesions 0.314 -> 0.356 over two seeds, the real tumour 0.61 -> 0.80 (README)
        "train_tasks": 4,
    },
}
RECIPE_NAMES = ("auto", *RECIPES)
#: The run `init="auto"` fine-tunes from where it is the same network (MRI slices, small
#: recipe). Started from it, 5 minutes of fine-tuning beat 15 from scratch on T1 brains, on
#: brains of an inverted (T2-like) contrast it never saw, and on the real tumour sample
#: (README, "What a CPU run can and cannot do").
AUTO_INIT = "builtin:brain-t1"
_SCHEDULES = ("cosine", "paper")
_SELECTIONS = ("loss", "ap")


def recipe_for_device(recipe: str, device_type: str) -> str:
    """The concrete recipe of `recipe`: "auto" goes by the device type (cuda "paper", mps
    "light", anything else "small"); the others are themselves.

    Parameters
    ----------
    recipe : {"auto", "small", "light", "paper"}
    device_type : str
        A torch device type ("cpu", "cuda", "mps").

    Returns
    -------
    str

    Examples
    --------
    >>> recipe_for_device("auto", "cpu"), recipe_for_device("auto", "cuda")
    ('small', 'paper')
    """
    if recipe != "auto":
        return recipe
    return {"cuda": "paper", "mps": "light"}.get(device_type, "small")


_KINDS = ("auto", "mri", "cxr")
_DEVICES = ("auto", "cpu", "cuda", "mps")


def parse_duration(value: str | float | int) -> float:
    """Seconds of a duration: a number (seconds), or text such as "90s", "15m", "1.5h", "1h30m".

    Parameters
    ----------
    value : str, float or int

    Returns
    -------
    float
        Seconds, > 0.

    Raises
    ------
    ValueError
        Text that is not a duration; the message lists the accepted forms.

    Examples
    --------
    >>> parse_duration("1h30m"), parse_duration("90s"), parse_duration(2.5)
    (5400.0, 90.0, 2.5)"""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        import re

        parts = re.fullmatch(
            r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?"
            r"(?:(\d+(?:\.\d+)?)s?)?",
            text,
        )
        if not text or parts is None or not any(parts.groups()):
            raise ValueError(
                f"duration {value!r} is invalid: use seconds or e.g. 90s, 15m, 1.5h, 1h30m"
            )
        h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
        seconds = 3600 * h + 60 * m + sec
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"duration {value!r} is invalid: it must be more than 0 seconds")
    return seconds


def parse_fold(text: str) -> int | str:
    """A fold of a text: "all" (any case) or a fold index.

    Parameters
    ----------
    text : str

    Returns
    -------
    int or "all"

    Raises
    ------
    ValueError
        Neither an integer nor "all".

    Examples
    --------
    >>> parse_fold("2"), parse_fold("ALL")
    (2, 'all')
    """
    if str(text).strip().lower() == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"fold must be an integer or 'all', got {text!r}") from None


def parse_frame(text: str) -> tuple[int, ...]:
    """The model frame of a text such as "80,112,80", "128x128" or "256, 256".

    Parameters
    ----------
    text : str

    Returns
    -------
    tuple of int
        2 or 3 positive sizes.

    Raises
    ------
    ValueError
        Not 2 or 3 positive integers (the message shows examples).

    Examples
    --------
    >>> parse_frame("80,112,80"), parse_frame("128x128")
    ((80, 112, 80), (128, 128))
    """
    try:
        frame = tuple(int(v) for v in str(text).replace("x", ",").split(",") if v.strip())
    except ValueError:
        frame = ()
    if len(frame) not in (2, 3) or min(frame) <= 0:
        raise ValueError(
            f"frame {text!r} is invalid: give 2 or 3 positive integers separated "
            "by commas, e.g. 80,112,80 or 256,256"
        )
    return frame


@dataclass(frozen=True)
class Setting:
    """What a `TrainConfig` field declares once, for `validate`, the `mtml train` flag and the
    training widget: its `help`, the values it takes and its CLI flag.

    `kind` (int, float or bool) and `choices` are what `validate` checks: an int is at least
    `minimum`; a float is finite, > 0 and at most `maximum`; `allowed` says what to use when the
    value is refused (default: from the rule). A field whose default is None may stay None
    (the recipe's or the data's value). `flag` is the `mtml train` option ("healthy": the
    positional argument; None: no flag), `metavar` its placeholder, `parse` the text parser
    (`ValueError` on bad text) where the type's own is not enough.
    """

    help: str
    kind: type | None = None
    choices: tuple | None = None
    minimum: int = 1
    maximum: float | None = None
    allowed: str | None = None
    flag: str | None = None
    metavar: str | None = None
    parse: Any = None

    def problem(self, value: Any) -> str | None:
        """What to use instead of `value` (the `allowed` text), or None when it is valid."""
        if self.choices is not None:
            numeric = all(isinstance(c, int) for c in self.choices)
            if (numeric and isinstance(value, bool)) or value not in self.choices:
                return self.allowed or f"use one of {', '.join(map(str, self.choices))}"
        elif self.kind is bool:
            if not isinstance(value, bool):
                return self.allowed or "use true or false"
        elif self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < self.minimum:
                return self.allowed or f"use an integer >= {self.minimum}"
        elif self.kind is float:
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                return self.allowed or "use a finite positive number"
            if value <= 0 or (self.maximum is not None and value > self.maximum):
                limit = f" and <= {self.maximum}" if self.maximum is not None else ""
                return self.allowed or f"use a number > 0{limit}"
        return None


#: Settings whose value is a table (a TOML table of these is the value, not a section).
_TABLE_SETTINGS = frozenset({"fold_steps", "plan"})


def _setting(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field with its `Setting` in the field's metadata."""
    return field(default=default, metadata={"setting": Setting(help, **spec)})


_BOOL_OR_UNSET = "use true, false, or leave unset"
#: the values of `TrainConfig.sampling` (`napari_mtml.data.SyntheticDataset`)
SAMPLINGS = ("slices", "scans")


@dataclass
class TrainConfig:
    """Every setting of one training run (all folds).

    Parameters
    ----------
    healthy
        files or folders of healthy scans (NIfTI, DICOM, PNG/TIFF/JPEG).
    out
        the run folder (`config.json`, `folds.json`, `fold_K/`).
    dims
        2 or 3, or None for the scans' own number of dimensions (3D volumes with
        `dims=2` train on their axial slices).
    train_tasks
        T of the T/(5-T) split, 1..4 (C(5, T) models); None: the recipe's (4 in the small
        recipe, 1, the paper's, in the light and paper ones).
    fold
        the fold index to train (0..C(5,T)-1), or "all" (sequentially).
    external
        folder of the external dataset for the inter-dataset blending task (task 1);
        None = task 1 draws its sources from the training data (announced by a `Notice`).
    max_steps
        optimiser steps per fold (upper bound; early stopping may end sooner);
        None = the recipe's, or planned from `time_budget`.
    time_budget
        seconds for the whole command (all folds it trains, data loading
        included): a short measured warm-up on the device plans `max_steps`, which
        config.json records (with the measured costs in `plan`) so that `max_steps`
        replays the run exactly. With `max_steps` also given, that is an upper bound.
    batch_size
        global batch (split over DDP ranks); None = the recipe's, else 8 (3D) /
        50 (2D).
    frame
        the model's input shape, None = the preprocessing default for the data.
    device
        "auto" (cuda > mps > cpu), "cpu", "cuda" or "mps" ("cuda:1" also accepted).
    workers
        DataLoader worker processes generating anomalies (0 = in the training process).
    seed
        base seed of everything random (model init, batches, validation set).
    resume
        continue each fold from its `last.pt`.
    recipe
        "auto" (by device: "small" on a CPU, "light" on MPS, "paper" on CUDA),
        "small", "light" or "paper": fills every setting left unset (see `RECIPES`).
    init
        fine-tune from a trained run: a run folder or "builtin:NAME"; fold K starts
        from that run's fold K (or its fold K mod its number of folds). "auto" (default):
        the built-in brain model (`AUTO_INIT`) where it is the same network as the run
        (MRI read as 2D slices with the small recipe: a CPU's default), else from scratch;
        "none" (or None): from scratch.
    preset
        "paper", "light" or "small"; base_features / depth / max_features override it.
    pos_encoding
        add the coordinate + Fourier-feature input channels (ties the model to
        its frame; without it the U-Net is fully convolutional and predicts any size).
    kind
        "auto", "mri" or "cxr". MRI resampling: `spacing` (target mm per frame voxel,
        in-plane for 2D slices) or `downsample` (a factor; the paper's 2).
    fit_frame
        with `frame` unset, fit the frame to the data (the smallest multiple of the
        U-Net's divisor holding every scan's content) instead of the fixed default frames.
    min_foreground
        with `dims=2` from volumes, slices whose foreground covers less than this
        fraction of the slice are dropped (no brain, nothing to learn).
    brain_mask
        where the synthetic anomalies go in heads with the skull on: "auto" = an
        automatic brain mask (`napari_mtml.brainmask`, the `brain` extra), or a folder of
        masks named like the scans (NAME[_mask].nii.gz); unset = the head.
    bias_correction
        MRI: "poly" divides every scan (trained on and predicted) by its estimated bias
        field before the z-score (`napari_mtml.bias`); "auto" (default): skull-stripped
        scans only (with the skull on, the fit takes skull and scalp for a field); "none"
        leaves intensities as read (and runs saved before the setting existed).
    bias_augment
        MRI: each healthy training image is multiplied by a random smooth bias field (a cubic
        polynomial, `bias.random_bias_field`) whose max/min ratio inside the head is drawn in
        [1, 1 + bias_augment], before its anomalies, so that the model learns such drifts
        are normal; 0 = off; unset = the recipe's (0.5 small and light, 0 paper: METHOD's
        recipe); X-rays never.
    lr
        peak learning rate, None = 1e-3 (3D) / 5e-3 (2D).
    warmup_steps, warmup_start
        linear warm-up from `warmup_start * lr` over `warmup_steps`.
    lr_schedule
        "paper" (after warm-up, x`lr_decay` per step down to
        `final_lr_fraction * lr`, then constant: tuned for 20,000 steps) or "cosine"
        (after warm-up, a half cosine from lr down to `final_lr_fraction * lr` at the
        last planned step: the whole schedule fits any run length).
    lr_decay
        multiplicative factor per step after warm-up (0.9997122 in the paper),
        down to `final_lr_fraction * lr` (1/20), then constant.
    ema
        decay of an exponential moving average of the weights used for validation and
        saved as best.pt (0 = none).
    val_interval
        validate every this many steps (and at the last step).
    patience
        early stop this many steps after the best validation loss.
    val_size
        number of augmented validation items (each with its healthy image);
        None = 16 (3D) / 64 (2D). Drawn once, from `seed`, over the held-out tasks.
    selection
        what picks best.pt among the validations: "loss" (the lowest validation
        loss, the paper's) or "ap" (the highest mean pixel AP over the held-out tasks, the
        healthy validation images' voxels counted as negatives). Short CPU runs: the loss
        is lowest early, when the model still predicts little anywhere, so "loss" keeps
        an under-trained model; measured in the README.
    min_push, max_push, intensity_scale, sigma, max_anomalies, min_size
        the task parameters of `napari_mtml.anomalies.synthesize` (`TaskParams`; max_push
        None = 5 for MRI, 10 for CXR; sigma: the label's).
    flip
        left-right flips of the training images; None = yes for MRI, no for CXR.
    sampling
        how training draws its items: "scans" (default; each scan equally often, then one of
        its items: with 2D slices of volumes of mixed slice counts, a 5 mm clinical scan of
        28 slices is drawn as often as a 1 mm one of 150) or "slices" (a shuffled pass over
        every item, each equally often; runs saved before the setting existed). The same
        draws where every scan gives as many items (3D volumes, X-rays, one volume's slices).
    fold_steps
        per fold index (str), the steps of that fold instead of `max_steps`: a time budget
        records here the folds it planned again because the machine's pace changed
        (`napari_mtml.training.budget.replan_steps`); given back, they replay the run.

    Notes
    -----
    The fields come in groups: the data and the run; the model (`napari_mtml.model.UNet`);
    the preprocessing (`napari_mtml.preprocess.to_frame`); the optimisation (METHOD.md
    section 6); validation and selection; the task parameters. Each field also declares its
    help, choices and bounds once (`Setting`, `settings()`), from which `validate`, the
    `mtml train` flags and the training widget's fields are made.

    Examples
    --------
    >>> cfg = TrainConfig(healthy=["scans/"], out="run", fold=0, preset="light")
    >>> cfg.fold_indices(), cfg.n_folds
    ([0], 5)
    >>> cfg.replace(max_steps=100).max_steps
    100
    >>> TrainConfig.from_json(text=cfg.to_json()) == cfg
    True
    """

    # A table, one declaration per setting, kept compact:
    # fmt: off
    healthy: tuple[str, ...] = _setting(
        (), "healthy scans: files or folders (NIfTI, DICOM, PNG/TIFF)", flag="healthy",
        metavar="HEALTHY")
    out: str = _setting(
        "mtml_run", "run folder to write (config.json, fold_K/ checkpoints and logs)",
        flag="--out")
    dims: int | None = _setting(
        None, "model dimensionality; 2 with 3D volumes trains on their axial slices",
        choices=(2, 3), allowed="use 2, 3, or leave unset for the scans' own", flag="--dims")
    train_tasks: int | None = _setting(
        None, "tasks each model trains on: T/(5-T) split, C(5,T) folds (default: the "
        "recipe's, 4 in the small recipe, 1 in the light and paper ones)",
        choices=(1, 2, 3, 4), allowed="the T of a T/(5-T) split is 1, 2, 3 or 4",
        flag="--train-tasks", metavar="T")
    fold: int | str = _setting(
        "all", "train only fold K (one job per fold), or all (default)", parse=parse_fold,
        flag="--fold", metavar="K|all")
    external: str | None = _setting(
        None, "external dataset folder for the inter-dataset blending task", flag="--external",
        metavar="DIR")
    max_steps: int | None = _setting(
        None, "training steps per fold (with --time: an upper bound)", kind=int, minimum=1,
        flag="--max-steps", metavar="N")
    time_budget: float | None = _setting(
        None, "train for this long in all (e.g. 90s, 15m, 1.5h): a measured warm-up plans the "
        "steps of every fold, recorded in config.json (--max-steps then replays it)",
        kind=float, parse=parse_duration, flag="--time", metavar="15m")
    batch_size: int | None = _setting(
        None, "the global batch (split over the ranks of a distributed run)", kind=int,
        minimum=1, flag="--batch-size", metavar="B")
    frame: tuple[int, ...] | None = _setting(
        None, "the model's fixed input frame, voxels per axis", parse=parse_frame,
        flag="--frame", metavar="80,112,80")
    device: str = _setting("auto", "auto (default), cpu, cuda, cuda:N or mps", flag="--device")
    workers: int = _setting(
        0, "data loader worker processes", kind=int, minimum=0, flag="--workers", metavar="W")
    seed: int = _setting(
        0, "the base seed of everything random (model, batches, validation set)", kind=int,
        minimum=0, allowed="use a non-negative integer", flag="--seed", metavar="S")
    resume: bool = _setting(
        False, "continue an interrupted run from its last checkpoints", kind=bool,
        flag="--resume")
    recipe: str = _setting(
        "auto", "model, batch, resolution and schedule together: auto (default) = small on a "
        "CPU, light on Apple MPS, paper on a CUDA GPU; flags given here override it",
        choices=RECIPE_NAMES, flag="--recipe")
    init: str | None = _setting(
        "auto", "fine-tune from a trained run folder or a built-in model (builtin:brain-t1); "
        "auto (default): from builtin:brain-t1 for MRI with the small recipe (a CPU's), else "
        "from scratch; none: from scratch",
        flag="--init", metavar="auto|none|RUN")
    # model
    preset: str | None = _setting(
        None, "U-Net preset: the paper's widths, light (half), or small (8-64, for CPUs)",
        choices=tuple(MODEL_PRESETS), flag="--model")
    base_features: int | None = _setting(
        None, "features of the first stage (doubled per stage)", kind=int, minimum=1)
    depth: int | None = _setting(
        None, "U-Net stages (downsamplings + 1); the frame must be divisible by 2^(depth-1)",
        kind=int, minimum=1)
    max_features: int | None = _setting(None, "the widest stage's features", kind=int, minimum=1)
    pos_encoding: bool | None = _setting(
        None, "the coordinate and Fourier-feature input channels", kind=bool,
        allowed=_BOOL_OR_UNSET)
    # preprocessing
    kind: str = _setting("auto", "preprocessing pipeline", choices=_KINDS,
                         flag="--kind")
    downsample: float | None = _setting(
        None, "MRI: downsample by this factor instead of to a spacing (the paper's 2)",
        kind=float, flag="--downsample", metavar="F")
    spacing: float | None = _setting(
        None, "MRI: resample to this voxel size in mm (in-plane for 2D models)", kind=float,
        flag="--spacing", metavar="MM")
    fit_frame: bool | None = _setting(
        None, "fit the frame to the data instead of the fixed default frames", kind=bool,
        allowed=_BOOL_OR_UNSET)
    min_foreground: float = _setting(
        0.05, "2D slices of volumes: drop slices whose foreground covers less of the slice")
    brain_mask: str | None = _setting(
        None, "place the synthetic anomalies inside the brain of heads with the skull on: auto "
        "= an automatic brain mask (needs the brain extra: pip install 'napari-mtml[brain]'), "
        "or a folder of masks named like the scans (NAME[_mask].nii.gz)",
        flag="--brain-mask", metavar="auto|DIR")
    bias_correction: str = _setting(
        "auto", "MRI: divide every scan by its estimated scanner bias field before the "
        "z-score: auto (default: skull-stripped scans only), poly (every scan), none; the run "
        "keeps it, so predictions are corrected the same way",
        choices=BIAS_CORRECTIONS, flag="--bias-correction")
    bias_augment: float | None = _setting(
        None, "MRI: multiply each healthy training image by a random smooth bias field whose "
        "max/min ratio inside the head is up to 1 + R, so that the model learns such fields "
        "are normal (0 = off; unset: the recipe's, 0.5 small and light, 0 paper)",
        parse=float, flag="--bias-augment", metavar="R")
    # optimisation
    lr: float | None = _setting(None, "peak learning rate", kind=float, flag="--lr")
    lr_schedule: str | None = _setting(
        None, "cosine: warm-up then a half cosine to the last planned step; paper: x0.9997122 "
        "per step (tuned for 20,000 steps)", choices=_SCHEDULES, flag="--lr-schedule")
    warmup_steps: int | None = _setting(
        None, "steps of the linear warm-up", kind=int, minimum=0)
    warmup_start: float = _setting(
        0.01, "the warm-up's first learning rate, a fraction of lr", kind=float, maximum=1.0)
    lr_decay: float = _setting(
        0.9997122, "the paper's schedule: factor per step after the warm-up", kind=float,
        maximum=1.0)
    final_lr_fraction: float = _setting(
        0.05, "the schedule's last learning rate, a fraction of lr", kind=float, maximum=1.0)
    ema: float | None = _setting(
        None, "validate and save a moving average of the weights with this decay (0 = off)",
        parse=float, flag="--ema", metavar="D")
    # validation and selection
    val_interval: int | None = _setting(
        None, "validate every N steps", kind=int, minimum=1, flag="--val-every", metavar="N")
    patience: int = _setting(
        5000, "stop this many steps after the best validation", kind=int, minimum=1)
    val_size: int | None = _setting(
        None, "augmented validation items, drawn once from the seed", kind=int, minimum=1)
    selection: str | None = _setting(
        None, "what picks best.pt: the lowest validation loss or the highest mean AP",
        choices=_SELECTIONS)
    # task parameters
    # (the engine's defaults, the paper's; max_push is resolved per modality)
    min_push: float = _setting(_TaskParams.min_push, "the radial tasks' smallest push",
                               kind=float)
    max_push: float | None = _setting(
        None, "the radial tasks' largest push (None: 5 MRI / 10 CXR)", kind=float)
    intensity_scale: float = _setting(
        _TaskParams.intensity_scale, "the smooth-intensity task's largest change", kind=float)
    sigma: float = _setting(_TaskParams.sigma, "the width of the label's Gaussian", kind=float)
    max_anomalies: int = _setting(
        _TaskParams.max_anomalies, "anomalies per image at most", kind=int, minimum=1)
    min_size: float = _setting(
        _TaskParams.min_size, "the smallest anomaly, per axis, as a fraction of the image",
        kind=float, maximum=0.8)
    flip: bool | None = _setting(None, "left-right flips of the training images", kind=bool,
                                 allowed=_BOOL_OR_UNSET)
    sampling: str = _setting(
        "scans", "2D slices of volumes: scans (default: every scan drawn equally often, its "
        "slices sharing its turns, so thick-slice scans weigh as much as 1 mm ones) or slices "
        "(every slice equally often)", choices=SAMPLINGS, flag="--sampling")
    # fmt: on
    # filled by `resolve` once the data is known; saved in config.json
    resolved_kind: str | None = field(default=None)
    resolved_recipe: str | None = field(default=None)
    # filled when a time budget planned the steps: the measured costs behind `max_steps`
    plan: dict | None = field(default=None)
    # the folds re-planned from a time budget (or given to replay them): index -> steps
    fold_steps: dict | None = field(default=None)

    def __post_init__(self) -> None:
        # Normalise the container types that JSON/TOML/argparse hand over as lists or strings.
        if isinstance(self.healthy, (str, Path)):
            self.healthy = (str(self.healthy),)
        self.healthy = tuple(str(p) for p in self.healthy)
        self.out = str(self.out)
        if self.external is not None:
            self.external = str(self.external)
        if isinstance(self.frame, str):
            self.frame = parse_frame(self.frame)
        if self.frame is not None:
            self.frame = tuple(int(v) for v in self.frame)
        if isinstance(self.fold, str):
            self.fold = parse_fold(self.fold)
        if self.fold_steps is not None:
            try:
                self.fold_steps = {str(int(k)): int(v) for k, v in dict(self.fold_steps).items()}
            except (TypeError, ValueError):
                raise ValueError(
                    f"fold_steps = {self.fold_steps!r} is invalid: map fold indices to steps, "
                    "e.g. {0: 300, 1: 250}"
                ) from None
        self.validate()

    # ----------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise `ValueError` naming the setting, the bad value and what is allowed: the rule
        each field declares (`Setting`), then the rules that join fields or read free text."""

        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name} = {getattr(self, name)!r} is invalid: {allowed}")

        for f in fields(self):
            value = getattr(self, f.name)
            if "setting" not in f.metadata or (value is None and f.default is None):
                continue  # unset: the recipe's or the data's value
            problem = f.metadata["setting"].problem(value)
            if problem:
                raise bad(f.name, problem)
        n_folds = self.n_folds
        if self.fold != "all" and (
            isinstance(self.fold, bool)
            or not isinstance(self.fold, int)
            or not 0 <= self.fold < n_folds
        ):
            raise bad(
                "fold",
                f"with train_tasks = {self.tasks_per_model} there are {n_folds} folds: "
                f"use 0..{n_folds - 1} or 'all'",
            )
        if self.init is not None and not str(self.init).strip():
            raise bad("init", "give a run folder or builtin:NAME")
        if self.frame is not None and (
            len(self.frame) not in (2, 3) or any(v < 8 for v in self.frame)
        ):
            raise bad("frame", "use 2 or 3 sizes of at least 8, e.g. 80,112,80 or 256,256")
        if self.frame is not None and self.dims is not None and len(self.frame) != self.dims:
            raise ValueError(
                f"frame {self.frame} has {len(self.frame)} sizes but dims = "
                f"{self.dims}: give one size per spatial axis"
            )
        if str(self.device).split(":")[0] not in _DEVICES:
            raise bad("device", f"use one of {', '.join(_DEVICES)} (or cuda:N)")
        if self.brain_mask is not None and not str(self.brain_mask).strip():
            raise bad(
                "brain_mask",
                "use 'auto' (an automatic brain mask), a folder of masks "
                "named like the scans, or leave unset",
            )
        if not 0 <= self.min_foreground < 1:
            raise bad("min_foreground", "use a fraction in [0, 1)")
        if self.ema is not None and (
            isinstance(self.ema, bool)
            or not isinstance(self.ema, (int, float))
            or not 0 <= self.ema < 1
        ):
            raise bad("ema", "use a decay in [0, 1) (0 = no moving average)")
        if self.bias_augment is not None and (
            isinstance(self.bias_augment, bool)
            or not isinstance(self.bias_augment, (int, float))
            or not 0 <= self.bias_augment <= 4
        ):
            raise bad("bias_augment", "use a ratio in [0, 4] (0 = no bias fields; 0.4 = 40 %)")
        if self.max_push is not None and self.max_push < self.min_push:
            raise ValueError(
                f"max_push = {self.max_push} is below min_push = {self.min_push}: "
                "raise max_push or lower min_push"
            )
        if not self.out:
            raise bad("out", "give a run folder")
        if self.fold_steps is not None and any(
            not 0 <= int(k) < n_folds or v < 1 for k, v in self.fold_steps.items()
        ):
            raise bad("fold_steps", f"map fold indices 0..{n_folds - 1} to at least 1 step")

    # ----------------------------------------------------------------------------- overrides
    def replace(self, **overrides: Any) -> TrainConfig:
        """A validated copy with some settings changed; unknown names raise `ValueError`."""
        _check_names(overrides, "replace()")
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_args(cls, namespace: Any, base: TrainConfig | None = None) -> TrainConfig:
        """Fill a config from an argparse namespace.

        Attributes named like fields (dashes become underscores) that are not `None` override
        `base` (default: a `TrainConfig()`, or the TOML file of `namespace.config` when that
        attribute is set). So declare argparse defaults as `None` to let TOML values stand;
        `resume` is taken when true. Attributes that are not fields (`command`, `func`,
        `config`) are ignored.
        """
        values = dict(vars(namespace))
        toml = values.pop("config", None)
        if base is None:
            base = cls.from_toml(toml) if toml else cls()
        names = {f.name for f in fields(cls)}
        overrides = {}
        for key, value in values.items():
            key = key.replace("-", "_")
            if key in names and value is not None and not (key == "resume" and value is False):
                overrides[key] = value
        return dataclasses.replace(base, **overrides)

    # ----------------------------------------------------------------------------- files
    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a TOML file: flat `key = value` pairs named like the fields, optionally grouped
        in tables (`[model]`, `[training]`, ... whose keys are field names). Relative paths in
        `healthy`, `external` and `out` are taken relative to the TOML file's folder."""
        path = Path(path)
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ModuleNotFoundError:
                raise ValueError(
                    f"{path}: reading TOML on Python 3.10 needs the 'tomli' "
                    "package: pip install tomli"
                ) from None
        from napari_mtml.files import read_text

        text = read_text(path, "config file")
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML ({exc}); fix the file") from None
        flat: dict[str, Any] = {}
        for key, value in raw.items():
            # a table is a section of settings, but for the settings that are tables themselves
            is_section = isinstance(value, dict) and key.replace("-", "_") not in _TABLE_SETTINGS
            items = value.items() if is_section else [(key, value)]
            for k, v in items:
                flat[k.replace("-", "_")] = v
        _check_names(flat, str(path))
        base = path.parent
        if "healthy" in flat:
            h = flat["healthy"]
            flat["healthy"] = [str(base / p) for p in ([h] if isinstance(h, str) else h)]
        for key in ("external", "out"):
            if isinstance(flat.get(key), str):
                flat[key] = str(base / flat[key])
        flat.update(overrides)
        try:
            return cls(**flat)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["healthy"] = list(self.healthy)
        d["frame"] = list(self.frame) if self.frame is not None else None
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        """The config as JSON text; with `path`, also written there atomically."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            from napari_mtml.files import write_atomic

            # jobs of one run (one per fold) may write config.json at once: each its own temp
            write_atomic(path, text)
        return text

    @classmethod
    def from_json(
        cls, path: str | os.PathLike | None = None, *, text: str | None = None
    ) -> TrainConfig:
        """Read a config from a JSON file (`path`, e.g. a run's config.json) or from JSON
        `text` (as `to_json()` returns it): exactly one of the two. Errors name the file."""
        if (path is None) == (text is None):
            raise ValueError("from_json takes a file path or text=JSON text (one of the two)")
        if path is not None:
            from napari_mtml.files import read_text

            name = str(path)
            try:
                text = read_text(path, "config file")
            except ValueError:
                if isinstance(path, str) and path.lstrip().startswith("{"):
                    raise ValueError(
                        "from_json(path) was given JSON text, not a file: pass it "
                        "as from_json(text=...)"
                    ) from None
                raise
        else:
            name = "JSON text"
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            why = "the file is empty" if not text.strip() else str(exc)
            raise ValueError(f"{name}: not valid JSON ({why})") from None
        if not isinstance(data, dict):
            raise ValueError(
                f"{name}: expected a JSON object of settings ({{...}}), found a "
                f"{type(data).__name__}"
            )
        _check_names(data, name)
        # a run saved before the setting existed was trained on scans as read
        data.setdefault("bias_correction", "none")
        data.setdefault("bias_augment", 0.0)
        data.setdefault("sampling", "slices")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: {exc}") from None

    # ----------------------------------------------------------------------------- resolution
    def with_recipe(self, device_type: str = "cpu") -> TrainConfig:
        """A copy with the recipe's settings filled in where this config leaves them unset.

        `device_type` ("cpu", "cuda", "mps") resolves `recipe="auto"` (`recipe_for_device`).
        Explicit settings always win; `downsample` or `spacing` given by the user replaces the
        recipe's resampling. `max_steps` comes from the recipe only without a `time_budget`
        (a budget plans the steps instead). Idempotent."""
        name = self.resolved_recipe or recipe_for_device(self.recipe, device_type)
        values = dict(RECIPES[name])
        fill: dict[str, Any] = {"resolved_recipe": name}
        resampling_given = self.downsample is not None or self.spacing is not None
        for key, value in values.items():
            if key in ("downsample", "spacing") and resampling_given:
                continue
            if key == "max_steps" and self.time_budget is not None:
                continue
            if key in ("dims", "batch_size"):  # `read_dims`; per dims, in `resolve`
                continue
            if getattr(self, key) is None:
                fill[key] = value
        return self.replace(**fill)

    @property
    def read_dims(self) -> int | None:
        """How to read scan files: the `dims` given, else the recipe's preference (the small
        recipe trains 2D models on the axial slices of volumes), else the scans' own."""
        if self.dims is not None:
            return self.dims
        if self.frame is not None:  # a frame of 3 sizes is a 3D model
            return len(self.frame)
        name = self.resolved_recipe or recipe_for_device(self.recipe, "cpu")
        return RECIPES[name].get("dims")

    @property
    def resample(self) -> dict[str, Any]:
        """`to_frame` keywords of this config's resampling: `spacing` (mm) or `downsample`."""
        if self.spacing is not None:
            return {"spacing": float(self.spacing), "downsample": 2}
        return {"downsample": self.downsample if self.downsample is not None else 2}

    def resolve(
        self, dims: int, kind: str, frame: tuple[int, ...], device_type: str = "cpu"
    ) -> TrainConfig:
        """A copy with every default filled in: the recipe's (`with_recipe`), then those that
        depend on the data: `dims` (2 or 3), its preprocessing `kind` ("mri" or "cxr") and the
        model input `frame`. `max_steps` must be known (given, from the recipe, or planned
        from a time budget) for the warm-up and validation interval to follow from it."""
        if dims not in (2, 3) or kind not in ("mri", "cxr"):
            raise ValueError(f"resolve needs dims 2 or 3 and kind mri or cxr, got {dims}, {kind}")
        cfg = self.with_recipe(device_type)
        base, depth, maxf = MODEL_PRESETS[cfg.preset][dims]
        if cfg.depth is None:
            # lower the depth until every frame size divides and the bottleneck keeps more than
            # one voxel (instance normalisation is undefined on a single voxel)
            while depth > 2 and (
                any(v % 2 ** (depth - 1) for v in frame)
                or math.prod(v // 2 ** (depth - 1) for v in frame) < 2
            ):
                depth -= 1
        steps = cfg.max_steps
        paper = cfg.lr_schedule == "paper"
        if steps is None:
            warmup, interval = cfg.warmup_steps, cfg.val_interval
        else:
            # the paper's 100 warm-up steps and validation every 250 steps suit its 20,000-step
            # runs; a schedule spanning a shorter run warms up over 5% of it and validates 8 times
            warmup = (
                cfg.warmup_steps
                if cfg.warmup_steps is not None
                else (100 if paper else max(1, min(100, round(0.05 * steps))))
            )
            interval = (
                cfg.val_interval
                if cfg.val_interval is not None
                else (250 if paper else max(1, math.ceil(steps / 8)))
            )
        return cfg.replace(
            dims=dims,
            frame=tuple(int(v) for v in frame),
            resolved_kind=kind,
            batch_size=cfg.batch_size
            or RECIPES[cfg.resolved_recipe].get("batch_size", {}).get(dims)
            or (8 if dims == 3 else 50),
            lr=cfg.lr or (1e-3 if dims == 3 else 5e-3),
            max_push=cfg.max_push if cfg.max_push is not None else (5.0 if kind == "mri" else 10.0),
            flip=cfg.flip if cfg.flip is not None else (kind == "mri"),
            bias_augment=float(cfg.bias_augment or 0.0) if kind == "mri" else 0.0,
            val_size=cfg.val_size or (16 if dims == 3 else 64),
            base_features=cfg.base_features or base,
            depth=cfg.depth or depth,
            max_features=cfg.max_features or maxf,
            warmup_steps=warmup,
            val_interval=interval,
            ema=cfg.ema if cfg.ema is not None else 0.0,
            lr_schedule=cfg.lr_schedule or "paper",
            selection=cfg.selection or "loss",
        )

    def steps_of(self, index: int) -> int | None:
        """The steps fold `index` trains: its `fold_steps` entry, else `max_steps`."""
        if self.fold_steps and str(index) in self.fold_steps:
            return self.fold_steps[str(index)]
        return self.max_steps

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `napari_mtml.model.UNet` for this (resolved) config:
        `UNet(**TrainConfig.from_json(run / "config.json").model_kwargs())` rebuilds a fold's
        network (then load its `best.pt`)."""
        if self.dims is None or self.frame is None:
            raise ValueError(
                "model_kwargs needs a resolved config (dims and frame known): "
                "call resolve() or read the run's config.json"
            )
        base, depth, maxf = MODEL_PRESETS[self.preset or "paper"][self.dims]
        return {
            "dims": self.dims,
            "frame": tuple(self.frame),
            "base_features": self.base_features or base,
            "max_features": self.max_features or maxf,
            "depth": self.depth or depth,
            "pos_encoding": bool(self.pos_encoding) if self.pos_encoding is not None else True,
        }

    def task_params(self) -> dict[str, Any]:
        """Keyword arguments for `napari_mtml.anomalies.synthesize` (resolved config)."""
        return {
            "min_push": self.min_push,
            "max_push": self.max_push if self.max_push is not None else _TaskParams.max_push,
            "intensity_scale": self.intensity_scale,
            "sigma": self.sigma,
            "max_anomalies": self.max_anomalies,
            "min_size": self.min_size,
        }

    @property
    def tasks_per_model(self) -> int:
        """T of the T/(5-T) split: `train_tasks` when set, else the recipe's (`RECIPES`; "auto"
        resolved as for a CPU until `with_recipe` knows the device)."""
        if self.train_tasks is not None:
            return int(self.train_tasks)
        name = self.resolved_recipe or recipe_for_device(self.recipe, "cpu")
        return int(RECIPES[name]["train_tasks"])

    @property
    def split_label(self) -> str:
        """The T/(5-T) split as messages write it, e.g. ``"4/1"``."""
        t = self.tasks_per_model
        return f"{t}/{5 - t}"

    @property
    def n_folds(self) -> int:
        """C(5, T): the number of models of the T/(5-T) split."""
        return math.comb(5, self.tasks_per_model)

    def fold_indices(self) -> list[int]:
        """The folds this config trains: all of them, or the one of `fold`."""
        return list(range(self.n_folds)) if self.fold == "all" else [int(self.fold)]


def settings() -> dict[str, Setting]:
    """The `Setting` of every `TrainConfig` field that declares one, in field order."""
    return {f.name: f.metadata["setting"] for f in fields(TrainConfig) if "setting" in f.metadata}


def _check_names(values: dict[str, Any], where: str) -> None:
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"{where}: unknown setting(s) {', '.join(unknown)}; known settings: "
            f"{', '.join(sorted(names))}"
        )
