"""The training loop: one readable loop per fold, as a generator of events.

`train(config)` reads the healthy data once, writes `RUN/config.json` (resolved) and
`RUN/folds.json`, then trains every fold of the T/(5-T) split (or the one of `config.fold`) in
turn, yielding `napari_mtml.training.events` and returning a `RunResult`. Closing the generator
(`gen.close()`) cancels: every file is written atomically between steps, so the last good
checkpoint stays intact and nothing is half-written.

Per fold (METHOD.md section 6): AdamW (weight decay 0); linear warm-up from 0.01 x lr over 100
steps, then x0.9997122 per step down to lr/20, then constant; MSE against the soft label; bf16
autocast on CUDA; validation every `val_interval` steps (val loss = MSE(healthy) + MSE(augmented),
pixel AP per held-out task); `best.pt` at the best selection score (the lowest val loss, the
paper's, or the highest held-out AP, the small recipe's); early stop `patience` steps after it;
`last.pt` at every validation and at the end. A fold that starts from trained weights (`init`)
is validated before its first step too, so that its start competes for `best.pt`.

Distributed: under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) each fold is
trained with DistributedDataParallel (gloo on CPU, nccl on CUDA); the global batch is split over
the ranks, each rank draws its own items (per-rank seeds), rank 0 validates, writes checkpoints
and logs, and broadcasts the validation loss so all ranks stop together.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_mtml.anomalies import TASKS
from napari_mtml.config import TrainConfig
from napari_mtml.data import (
    NO_EXTERNAL_NOTICE,
    HealthyCollection,
    SyntheticDataset,
    ValidationSet,
    make_loader,
    make_validation_set,
)
from napari_mtml.devices import (
    ThreadWatch,
    apply_thread_rule,
    autocast_dtype,
    pick_device,
    prepare_model_for_device,
    training_channels_last,
)
from napari_mtml.heap import keep_freed_memory_while_training
from napari_mtml.training.checkpoint import (
    FORMAT_VERSION,
    check_frame,
    frame_record,
    load_checkpoint,
    model_checkpoint,
    save_atomic,
)
from napari_mtml.training.crossval import FoldSplit, task_folds
from napari_mtml.training.events import (
    FoldFinished,
    FoldStarted,
    Notice,
    RunFinished,
    RunResult,
    StepEvent,
    ValidationEvent,
)
from napari_mtml.training.rundir import FoldPaths, prepare_run_dir, task_names, truncate_log
from napari_mtml.training.schedule import (
    WarmupCosineLR,
    WarmupExponentialLR,
    WeightAverage,
    make_schedule,
    make_scheduler,
)
from napari_mtml.training.step import train_step

__all__ = [
    "train",
    "WarmupExponentialLR",
    "WarmupCosineLR",
    "pick_device",
    "TrainingOutOfMemory",
    "TASK_NAMES",
]

TASK_NAMES = TASKS  # the task names, index = task id (napari_mtml.anomalies)

Event = Any
ModelFactory = Callable[[TrainConfig, int], torch.nn.Module]


class TrainingOutOfMemory(ValueError):
    """The accelerator ran out of memory (a `ValueError`: the user can fix it by a setting)."""


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_from_env() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    return _Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def _build_unet(cfg: TrainConfig, seed: int) -> torch.nn.Module:
    from napari_mtml.model import UNet

    return UNet(**cfg.model_kwargs(), init_seed=seed)


def _fold_seed(seed: int, fold: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(fold)]).generate_state(1)[0])


def train(
    config: TrainConfig,
    *,
    collection: HealthyCollection | None = None,
    external: HealthyCollection | None = None,
    model_factory: ModelFactory | None = None,
) -> Generator[Event, None, RunResult]:
    """Train the task cross-validation ensemble; a generator of events returning a `RunResult`.

    config: the run's `TrainConfig` (its `healthy` paths are read unless `collection` is given).
    collection / external: already-framed healthy data and external dataset (e.g. from napari
        layers or tests), instead of reading `config.healthy` / `config.external`.
    model_factory: `factory(resolved_config, seed) -> torch.nn.Module` builds the network
        (default: `UNet(**config.model_kwargs(), init_seed=seed)`, seed from (config.seed, fold)).

    Raises `ValueError` for bad input (files, settings, an existing run without `resume`).
    """
    config.validate()
    dist = _dist_from_env()
    device, cpu_notice = pick_device(config.device, dist.local_rank)
    if dist.active and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(
            backend=backend, rank=dist.rank, world_size=dist.world_size
        )
        dist.owns_group = True
    try:
        return (
            yield from _train_run(
                config, collection, external, model_factory, dist, device, cpu_notice
            )
        )
    finally:
        if dist.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train_run(config, collection, external, model_factory, dist, device, cpu_notice):
    # Everything that can fail on bad input happens before the first event.
    t_start = time.perf_counter()
    notices = [cpu_notice] if cpu_notice else []
    config = _with_init(config)
    config = config.with_recipe(device.type)
    if config.recipe == "auto" or config.time_budget is not None:
        notices.append(_recipe_notice(config, device))
    if collection is None:
        if not config.healthy:
            raise ValueError("no healthy scans given: pass files or folders of healthy images")
        collection = HealthyCollection.from_paths(
            config.healthy,
            dims=config.read_dims,
            kind=config.kind,
            frame=_frame_arg(config),
            min_foreground=config.min_foreground,
            multiple=_multiple(config),
            brain_mask=config.brain_mask if config.brain_mask != "none" else None,
            bias_correction=config.bias_correction,
            **config.resample,
        )
    if config.dims is not None and collection.dims != config.dims:
        raise ValueError(f"the healthy data is {collection.dims}D but dims = {config.dims}")
    if config.frame is not None and tuple(config.frame) != collection.frame:
        raise ValueError(
            f"frame {tuple(config.frame)} differs from the data's frame {collection.frame}"
        )
    kind = config.kind if config.kind in ("mri", "cxr") else collection.kind
    if config.resume and config.time_budget is not None:
        config = _saved_plan(config)
    cfg = config.resolve(collection.dims, kind, collection.frame, device.type)
    config, cfg, init_notice = _auto_init(config, cfg, collection, kind, model_factory is not None)
    if init_notice:
        notices.append(init_notice)
    if external is None and cfg.external:
        external = HealthyCollection.from_paths(
            cfg.external,
            dims=cfg.dims,
            kind=kind,
            frame="fit" if cfg.fit_frame else cfg.frame,
            min_foreground=cfg.min_foreground,
            multiple=_multiple(cfg),
            bias_correction=cfg.bias_correction,
            **cfg.resample,
        )
    if external is not None and external.dims != collection.dims:
        raise ValueError(
            f"the external dataset is {external.dims}D but the healthy data is "
            f"{collection.dims}D; give both as 2D images or both as volumes"
        )
    if cfg.batch_size % dist.world_size:
        raise ValueError(
            f"batch size {cfg.batch_size} does not split over {dist.world_size} "
            "ranks; use a multiple of the number of processes"
        )
    notices += collection.notes
    splits = [s for s in task_folds(cfg.train_tasks) if s.index in cfg.fold_indices()]
    _check_batch_size(cfg, collection, splits)
    if external is None and any(1 in s.train_tasks + s.val_tasks for s in splits):
        notices.append(NO_EXTERNAL_NOTICE)
    factory = model_factory or _build_unet
    if cfg.time_budget is not None and cfg.plan is None:  # measure, plan every fold's steps
        cfg, plan_notice = _plan(
            config, cfg, collection, external, splits, factory, dist, device, kind, t_start
        )
        notices.append(plan_notice)

    run_dir = Path(cfg.out)
    if dist.main:
        prepare_run_dir(run_dir, cfg, splits, collection)
        for text in notices:
            yield Notice(text)
    if dist.active:
        torch.distributed.barrier()

    run = _Run(cfg, collection, external, factory, dist, device, run_dir)
    # the same decision on every rank (only the main one holds the measured costs)
    replanning = cfg.time_budget is not None and cfg.plan is not None and not cfg.resume
    finished: list[FoldFinished] = []
    pace = _Pace()  # seconds the folds took, and were planned to take
    for i, split in enumerate(splits):
        if replanning and i:
            left = [s.index for s in splits[i:]]
            run, text = _replan(config, run, t_start, pace, finished[-1], left)
            if text and dist.main:
                yield Notice(text)
        steps = run.cfg.steps_of(split.index)
        fold_run = run
        if steps != run.cfg.max_steps:  # a fold of its own length: its own schedule
            own = {"max_steps": steps, "plan": run.cfg.plan, "fold_steps": run.cfg.fold_steps}
            if config.val_interval is None and steps < SHORT_FOLD_STEPS:
                own["val_interval"] = steps  # validated once, at its end (see SHORT_FOLD_STEPS)
            fold_cfg = config.replace(**own).resolve(
                collection.dims, kind, collection.frame, device.type
            )
            fold_run = dataclasses.replace(run, cfg=fold_cfg)
        t_fold = time.perf_counter()
        # 3D on the CPU: activations reuse freed pages instead of faulting new ones in (heap.py)
        with keep_freed_memory_while_training(device.type, fold_run.cfg.dims):
            finished.append((yield from _train_fold(fold_run, split)))
        pace.last_s = time.perf_counter() - t_fold
    if dist.main:
        yield RunFinished(str(run_dir), finished)
    return RunResult(str(run_dir), finished)


#: Settings a fine-tuned run takes from the run it starts from, unless given: the model must
#: be the same network, and the data must arrive at the same scale and dimensionality.
_INIT_SETTINGS = (
    "preset",
    "base_features",
    "depth",
    "max_features",
    "pos_encoding",
    "dims",
    "spacing",
    "downsample",
    "fit_frame",
    "kind",
    "resolved_recipe",
)


def _init_keyword(config: TrainConfig) -> str | None:
    """The keyword `config.init` is ("auto" or "none", any case), else None."""
    word = None if config.init is None else str(config.init).strip().lower()
    return word if word in ("auto", "none") else None


def _explicit_init(config: TrainConfig) -> str | None:
    """`config.init` as a run to load now: None for scratch, "none" and "auto" (decided
    once the data is read, `_auto_init`)."""
    return None if _init_keyword(config) else config.init


def _auto_init(
    config: TrainConfig,
    cfg: TrainConfig,
    collection: HealthyCollection,
    kind: str,
    custom_factory: bool,
) -> tuple[TrainConfig, TrainConfig, str | None]:
    """Resolve `init="auto"` once the data is read: the built-in brain model (`AUTO_INIT`)
    when it is the very network this run would train (MRI read as 2D slices, the same U-Net
    settings: the small recipe a CPU gets), else from scratch. Returns both configs with
    `init` set (the run's config.json records the choice, so `--max-steps` replays it) and a
    notice, or None when nothing was chosen."""
    from napari_mtml.config import AUTO_INIT

    choice = _init_keyword(config)
    if choice == "none":
        return config.replace(init=None), cfg.replace(init=None), None
    if choice != "auto":
        return config, cfg, None
    saved_path = Path(config.out) / "config.json"
    if config.resume and saved_path.is_file():  # what the run chose when it started
        chosen = TrainConfig.from_json(saved_path).init
        return config.replace(init=chosen), cfg.replace(init=chosen), None
    chosen = None
    if not custom_factory and kind == "mri" and collection.dims == 2:
        from napari_mtml.builtin import resolve_run

        try:
            saved = TrainConfig.from_json(resolve_run(AUTO_INIT) / "config.json")
            theirs = saved.resolve(2, "mri", tuple(saved.frame), "cpu").model_kwargs()
        except (OSError, ValueError) as exc:  # an installation without the model's files
            config, cfg = config.replace(init=None), cfg.replace(init=None)
            notice = f"the built-in model {AUTO_INIT} is unavailable ({exc}): training from scratch"
            return config, cfg, notice
        mine = cfg.model_kwargs()
        keys = ("dims", "base_features", "max_features", "depth", "pos_encoding")
        if all(mine[k] == theirs[k] for k in keys):
            chosen = AUTO_INIT
    config, cfg = config.replace(init=chosen), cfg.replace(init=chosen)
    if chosen is None:
        return config, cfg, None
    return (
        config,
        cfg,
        f"every fold starts from the built-in model {chosen} (--init auto, the default "
        "for MRI with this recipe; minutes of fine-tuning beat a longer run from scratch, "
        "on T1 and on other contrasts); --init none trains from scratch",
    )


def _with_init(config: TrainConfig) -> TrainConfig:
    """A config fine-tuning from `config.init` (a run folder or builtin:NAME) takes that run's
    model and preprocessing settings where it leaves them unset."""
    if not _explicit_init(config):
        return config
    from napari_mtml.builtin import resolve_run

    run = resolve_run(config.init)
    saved = TrainConfig.from_json(run / "config.json")
    fill = {}
    for key in _INIT_SETTINGS:
        mine, theirs = getattr(config, key), getattr(saved, key)
        if key == "kind" and mine == "auto":
            mine = None
        if key in ("spacing", "downsample") and (
            config.spacing is not None or config.downsample is not None
        ):
            continue
        if key == "kind":
            theirs = saved.resolved_kind or theirs
        if mine is None and theirs is not None:
            fill[key] = theirs
    if saved.pos_encoding and saved.frame is not None and config.frame is None:
        fill["frame"] = tuple(saved.frame)  # a positional encoding ties the model to its frame
    return config.replace(**fill)


def _frame_arg(cfg: TrainConfig):
    return cfg.frame if cfg.frame is not None else ("fit" if cfg.fit_frame else None)


def _multiple(cfg: TrainConfig) -> dict[int, int]:
    """Per number of dims, the size multiple a fitted frame needs: 2**(depth - 1)."""
    from napari_mtml.config import MODEL_PRESETS

    out = {}
    for dims in (2, 3):
        depth = cfg.depth or MODEL_PRESETS[cfg.preset or "paper"][dims][1]
        out[dims] = 2 ** (depth - 1)
    return out


def _recipe_notice(cfg: TrainConfig, device: torch.device) -> str:
    from napari_mtml.config import MODEL_PRESETS

    name = cfg.resolved_recipe
    base, depth, maxf = MODEL_PRESETS[cfg.preset][cfg.read_dims or 3]
    how = "chosen for the device" if cfg.recipe == "auto" else "as asked"
    res = (
        f"{cfg.spacing:g} mm voxels"
        if cfg.spacing is not None
        else f"downsampled x{cfg.downsample:g}"
    )
    dims = {None: "the data's own dimensions", 2: "2D (volumes as axial slices)", 3: "3D"}
    from napari_mtml.devices import autocast_dtype

    precision = "bf16 autocast" if autocast_dtype(device) is not None else "float32"
    if training_channels_last(device, cfg.read_dims or cfg.dims):
        precision += ", channels-last"
    return (
        f"recipe '{name}' ({how}, {device.type}): {cfg.preset} U-Net "
        f"{cfg.base_features or base}-{cfg.max_features or maxf} wide, depth "
        f"{cfg.depth or depth}, positional encoding {'on' if cfg.pos_encoding else 'off'}, "
        f"{dims.get(cfg.read_dims, cfg.read_dims)}, {res}, {cfg.lr_schedule} learning-rate "
        f"schedule, best checkpoint by the held-out tasks' "
        f"{'pixel AP' if cfg.selection == 'ap' else 'validation loss'}, {precision}"
        + (f", batch {cfg.batch_size}" if cfg.batch_size else "")
    )


def _saved_plan(config: TrainConfig) -> TrainConfig:
    """Resuming a run planned from a time budget: its planned steps, not a new plan."""
    path = Path(config.out) / "config.json"
    if not path.is_file():
        return config
    saved = TrainConfig.from_json(path)
    if saved.plan is None or saved.max_steps is None:
        return config
    return config.replace(max_steps=saved.max_steps, plan=saved.plan, fold_steps=saved.fold_steps)


def _plan(config, cfg, collection, external, splits, factory, dist, device, kind, t_start):
    """Measure a step on this device, plan `max_steps` from the time budget; the resolved
    config with the plan recorded, and a notice saying what was planned."""
    from napari_mtml.training.budget import measure_costs, plan_steps

    steps = 0
    if dist.main:
        split = splits[0]
        ext = external.samples if external is not None else None
        costs = measure_costs(
            cfg,
            collection.subset(split.train_data),
            split.train_tasks,
            factory,
            device,
            external=ext,
        )
        elapsed = time.perf_counter() - t_start
        try:
            steps = plan_steps(
                float(cfg.time_budget),
                elapsed,
                len(splits),
                costs,
                int(cfg.val_size),
                n_val=_validations_per_fold(cfg),
                cap=config.max_steps,
            )
        except ValueError as exc:
            if not dist.active:
                raise
            failure, steps = exc, -1  # the other ranks must hear it, not wait for a plan
    if dist.active:
        t = torch.tensor([steps], dtype=torch.int64, device=device)
        torch.distributed.broadcast(t, src=0)
        steps = int(t.item())
        if steps < 0:
            if dist.main:
                raise failure
            raise ValueError("the time budget is too short (rank 0 says why)")
    plan = {"time_budget_s": float(cfg.time_budget), "folds": len(splits), "planned_steps": steps}
    if dist.main:
        plan.update(costs.to_dict())
        plan["elapsed_before_training_s"] = round(elapsed, 3)
    planned = config.replace(max_steps=steps, plan=plan).resolve(
        collection.dims, kind, collection.frame, device.type
    )
    notice = (
        f"time budget {cfg.time_budget / 60:.1f} min: a step takes "
        f"{plan.get('step_s', float('nan')):.3f} s here, so {steps} steps for each of "
        f"{len(splits)} fold(s) (recorded in config.json; --max-steps {steps} replays it)"
    )
    return planned, notice


def _start_validations(cfg: TrainConfig) -> int:
    """1 when the run's folds start from trained weights and so are validated before their
    first step (`_train_fold`), else 0."""
    return 1 if cfg.init else 0


def _validations_per_fold(cfg: TrainConfig) -> int:
    """The validations a budget plans for in each fold: `VALIDATIONS_PER_FOLD`, and one more
    before the first step of a fold that starts from trained weights."""
    from napari_mtml.training.budget import VALIDATIONS_PER_FOLD

    return VALIDATIONS_PER_FOLD + _start_validations(cfg)


#: A fold given fewer steps than this of its own (a budget cut short by a slowdown) validates
#: once, at its end (besides the validation before its first step where it starts from
#: trained weights), unless `val_interval` is set: eight validations, each over every
#: validation image, would cost more than its steps, and it has no use for eight checkpoints.
SHORT_FOLD_STEPS = 80


@dataclass
class _Pace:
    """Seconds the folds of a budgeted run took (`earlier_s` before the last one, `last_s` the
    last one) and were planned to take (`earlier_planned_s`)."""

    earlier_s: float = 0.0
    earlier_planned_s: float = 0.0
    last_s: float = 0.0


def _replan(config, run, t_start, pace: _Pace, last: FoldFinished, left: list[int]):
    """After a fold of a time-budgeted run: the folds `left` (their indices) planned again at
    the pace the run goes (`budget.replan_steps`); the run (its config recording the new steps in
    `fold_steps`, config.json rewritten) and a notice, None when the plan stands."""
    from napari_mtml.training.budget import StepCosts, fold_seconds, replan_steps

    cfg, dist = run.cfg, run.dist
    steps = current = int(cfg.steps_of(last.fold))
    ratio = 1.0
    if dist.main and "step_s" in cfg.plan:
        costs = StepCosts.from_dict(cfg.plan)
        validations = math.ceil(last.steps / cfg.val_interval) if last.steps else 0
        validations += _start_validations(cfg)
        steps, ratio = replan_steps(
            float(cfg.time_budget),
            time.perf_counter() - t_start,
            len(left),
            costs,
            int(cfg.val_size),
            last_fold_s=pace.last_s,
            last_steps=last.steps,
            last_validations=validations,
            current=current,
            cap=config.max_steps,
            earlier_s=pace.earlier_s,
            earlier_planned_s=pace.earlier_planned_s,
            n_val=_validations_per_fold(cfg),
        )
        pace.earlier_s += pace.last_s
        pace.earlier_planned_s += fold_seconds(costs, last.steps, int(cfg.val_size), validations)
    if dist.active:
        t = torch.tensor([steps], dtype=torch.int64, device=run.device)
        torch.distributed.broadcast(t, src=0)
        steps = int(t.item())
    if steps == current:
        return run, None
    fold_steps = dict(cfg.fold_steps or {})
    fold_steps.update({str(k): steps for k in left})
    cfg = cfg.replace(fold_steps=fold_steps)
    if dist.main:
        cfg.to_json(run.run_dir / "config.json")
    text = (
        f"time budget: fold {last.fold} took {pace.last_s:.0f} s; at x{ratio:.2f} the planned "
        f"pace, {steps} steps (was {current}) for each of the {len(left)} fold(s) left "
        f"(recorded in config.json's fold_steps, which replays them)"
    )
    return dataclasses.replace(run, cfg=cfg), text


def _check_batch_size(
    cfg: TrainConfig, collection: HealthyCollection, splits: list[FoldSplit]
) -> None:
    """Refuse a batch far larger than the data: each step would repeat every training image
    many times over (and try to hold them all in memory at once)."""
    # the paper's batch for this kind of data (50 in 2D, 8 in 3D): the largest any recipe uses
    default = TrainConfig(recipe="paper").resolve(cfg.dims, cfg.resolved_kind, cfg.frame).batch_size
    n_train = min(len(collection.indices(s.train_data)) for s in splits)
    limit = max(default, n_train)
    if cfg.batch_size > limit:
        raise ValueError(
            f"batch size {cfg.batch_size} is far larger than the data: a fold "
            f"trains on {n_train} image(s); use --batch-size {limit} or less "
            "(each image is drawn with fresh anomalies every epoch anyway)"
        )


@dataclass
class _Fold:
    """What a fold trains: its model (and the weights' moving average), the optimiser, the
    learning-rate schedule, and where its data stream comes from (seed, rank, batch)."""

    model: torch.nn.Module
    ema: WeightAverage | None
    optimizer: torch.optim.Optimizer
    schedule: Any
    device: torch.device
    dist: _Dist
    seed: int
    local_batch: int

    @property
    def evaluated(self) -> torch.nn.Module:
        """What validation sees and best.pt holds: the moving average, else the model."""
        return self.ema.module if self.ema is not None else self.model


@dataclass
class _Progress:
    """Where a fold stands (what last.pt records besides the weights and RNG states)."""

    step: int = 0
    best_step: int = 0
    best_val: float = math.inf
    best_score: float = math.inf  # the selection criterion at best_step (lower is better)
    stopped_early: bool = False


def _train_fold(run: _Run, split: FoldSplit):
    cfg, dist, device = run.cfg, run.dist, run.device
    paths = FoldPaths.of(run.run_dir, split.index)
    fold = _new_fold(cfg, split.index, run.model_factory, dist, device)
    progress = _restore(cfg, fold, paths)
    if progress.stopped_early or progress.step >= cfg.max_steps:
        return (yield from _fold_finished(split, progress, paths, dist))

    net = fold.model
    if dist.active:
        net = torch.nn.parallel.DistributedDataParallel(
            fold.model, device_ids=[device.index] if device.type == "cuda" else None
        )
    loader, val_set = _fold_data(run, split, fold, progress.step)
    if dist.main:
        yield _fold_started(cfg, split, progress.step)
    batches = iter(loader)
    log = open(paths.log, "a") if dist.main else None  # closed in the finally below
    amp = autocast_dtype(device)  # bf16 on CUDA (CPU: opt-in, devices.py), else None
    scheduler = make_scheduler(fold.optimizer, fold.schedule, cfg.lr, progress.step)
    # the thread rule again while the fold trains: a job starting meanwhile gets its core back
    watch = ThreadWatch(cfg.workers) if device.type == "cpu" else None
    try:
        if _start_validations(cfg) and progress.step == 0 and progress.best_score == math.inf:
            # A fold that starts from trained weights is validated before its first step, so
            # that its start is a candidate for best.pt: a short or disrupted fine-tune never
            # ends on a model its own held-out tasks rank below the one it started from.
            event = _validate_and_save(cfg, fold, progress, val_set, paths, log)
            if dist.main:
                yield event
        net.train()
        while progress.step < cfg.max_steps:
            images, labels, _ = next(batches)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            lr = fold.optimizer.param_groups[0]["lr"]
            try:
                loss = train_step(net, fold.optimizer, images, labels, amp)
                scheduler.step()
                if fold.ema is not None:
                    fold.ema.update(fold.model, progress.step)
            except torch.OutOfMemoryError as exc:
                raise _out_of_memory(cfg, device, exc) from None
            progress.step += 1
            if watch is not None:
                watch.check()
            loss_value = _mean_loss(loss, dist, progress.step, split.index, cfg.lr)
            if dist.main:
                _log(log, type="step", step=progress.step, loss=loss_value, lr=lr)
                yield StepEvent(split.index, progress.step, cfg.max_steps, loss_value, lr)

            if progress.step % cfg.val_interval == 0 or progress.step == cfg.max_steps:
                event = _validate_and_save(cfg, fold, progress, val_set, paths, log)
                if dist.main:
                    yield event
                if progress.stopped_early:
                    break
    finally:
        del batches  # shuts loader workers down, also when the generator is closed
        if log is not None:
            log.close()
    if dist.active:
        torch.distributed.barrier()
    if dist.main and _start_validations(cfg) and progress.best_step == 0 and progress.step > 0:
        yield Notice(
            f"fold {split.index}: no validation in {progress.step} steps beat the weights it "
            f"started from ({cfg.init}), so best.pt holds them unchanged; more steps (--time, "
            "--max-steps) give it a chance to adapt to this data",
            fold=split.index,
        )
    return (yield from _fold_finished(split, progress, paths, dist))


@dataclass(frozen=True)
class _Run:
    """What every fold of a run shares."""

    cfg: TrainConfig
    collection: HealthyCollection
    external: HealthyCollection | None
    model_factory: ModelFactory
    dist: _Dist
    device: torch.device
    run_dir: Path


def _fold_started(cfg: TrainConfig, split: FoldSplit, step: int) -> FoldStarted:
    train, val = task_names(split.train_tasks), task_names(split.val_tasks)
    return FoldStarted(split.index, cfg.n_folds, train, val, cfg.max_steps, step)


def _out_of_memory(cfg: TrainConfig, device: torch.device, exc: BaseException):
    return TrainingOutOfMemory(
        f"out of {device.type} memory at batch size {cfg.batch_size} with the "
        f"'{cfg.preset}' model ({exc.__class__.__name__}); use a smaller "
        "--batch-size or --preset light"
    )


def _new_fold(
    cfg: TrainConfig, index: int, model_factory: ModelFactory, dist: _Dist, device: torch.device
) -> _Fold:
    """The fold's model (from its seed, or the `init` run's fold), optimiser and schedule."""
    seed = _fold_seed(cfg.seed, index)
    apply_thread_rule(cfg.workers, device)  # per fold: follows the machine's load (devices.py)
    model = model_factory(cfg, seed)  # initialised from the fold's seed, no global RNG
    if cfg.init:
        model.load_state_dict(_init_weights(cfg.init, index))
    dims = getattr(model, "dims", None)  # channels-last weights give channels-last activations
    prepare_model_for_device(model, device, channels_last=training_channels_last(device, dims))
    return _Fold(
        model=model,
        ema=WeightAverage(model, cfg.ema) if cfg.ema else None,
        optimizer=torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0),
        schedule=make_schedule(cfg),
        device=device,
        dist=dist,
        seed=seed,
        local_batch=cfg.batch_size // dist.world_size,
    )


def _restore(cfg: TrainConfig, fold: _Fold, paths: FoldPaths) -> _Progress:
    """With `resume` and a last.pt, the fold's weights, optimiser, RNG states and progress
    from it (the log cut back to its step); else a fresh start (the log emptied)."""
    if fold.dist.main:
        paths.folder.mkdir(parents=True, exist_ok=True)
    if not (cfg.resume and paths.last.is_file()):
        if fold.dist.main:
            truncate_log(paths.log, 0)  # from scratch: no lines of an earlier try stay in the log
        return _Progress()
    state = load_checkpoint(paths.last)
    check_frame(paths.last, state, cfg.dims, cfg.frame, paths.config)
    fold.model.load_state_dict(state["model"])
    fold.optimizer.load_state_dict(state["optimizer"])
    if fold.ema is not None:
        fold.ema.module.load_state_dict(state.get("ema") or state["model"])
    best_val = float(state["best_val_loss"])
    # A fold that stopped early is done; one that reached max_steps continues when the resumed
    # run allows more steps.
    progress = _Progress(
        step=int(state["step"]),
        best_step=int(state["best_step"]),
        best_val=best_val,
        best_score=float(state.get("best_score", best_val)),
        stopped_early=bool(state.get("stopped_early", False)),
    )
    torch.set_rng_state(state["rng"]["torch_cpu"])
    if fold.device.type == "cuda" and state["rng"].get("torch_cuda"):
        torch.cuda.set_rng_state_all(state["rng"]["torch_cuda"])
    if fold.dist.main:
        truncate_log(paths.log, progress.step)
    return progress


def _fold_data(run: _Run, split: FoldSplit, fold: _Fold, start_step: int):
    """The fold's endless training stream (this rank's items from `start_step` on; the
    loader's workers start when it is iterated) and, on rank 0, its fixed validation set of
    the held-out tasks and data."""
    cfg, collection = run.cfg, run.collection
    ext = run.external.samples if run.external is not None else None
    task_params = cfg.task_params()
    dataset = SyntheticDataset(
        collection.subset(split.train_data),
        split.train_tasks,
        seed=fold.seed,
        rank=fold.dist.rank,
        world_size=fold.dist.world_size,
        flip=bool(cfg.flip),
        task_params=task_params,
        external=ext,
        bias_augment=float(cfg.bias_augment or 0.0),
        sampling=cfg.sampling,
    )
    val_set = None
    if fold.dist.main:
        val_set = make_validation_set(
            collection.subset(split.val_data),
            split.val_tasks,
            int(cfg.val_size),
            fold.seed,
            task_params=task_params,
            external=ext,
        )
    pin = fold.device.type == "cuda"
    loader = make_loader(dataset, fold.local_batch, start_step, cfg.workers, pin_memory=pin)
    return loader, val_set


def _mean_loss(loss: torch.Tensor, dist: _Dist, step: int, fold: int, lr: float) -> float:
    """The step's loss as a float (averaged over the ranks); a NaN or infinite loss stops the
    run before it reaches last.pt, so the previous checkpoint stays resumable."""
    value = loss.detach()
    if dist.active:
        torch.distributed.all_reduce(value)
        value = value / dist.world_size
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(
            f"training diverged at step {step} of fold {fold} (loss {value}); "
            f"lower the learning rate (lr = {lr:g}) and resume or restart"
        )
    return value


def _validate_and_save(
    cfg: TrainConfig,
    fold: _Fold,
    progress: _Progress,
    val_set: ValidationSet | None,
    paths: FoldPaths,
    log,
) -> ValidationEvent:
    """Validate (rank 0; the result is broadcast), update the best step and the early stop,
    and save best.pt (when best), last.pt and the log line. Returns the validation's event."""
    val_loss, ap = math.nan, {}
    amp = autocast_dtype(fold.device)
    if fold.dist.main:
        val_loss, ap = _validate(fold.evaluated, val_set, fold.local_batch, fold.device, amp)
    score = _selection_score(cfg.selection, val_loss, ap)
    if fold.dist.active:
        t = torch.tensor([val_loss, score], dtype=torch.float64, device=fold.device)
        torch.distributed.broadcast(t, src=0)
        val_loss, score = float(t[0].item()), float(t[1].item())
    best = score < progress.best_score
    if best:
        progress.best_val, progress.best_score = val_loss, score
        progress.best_step = progress.step
    progress.stopped_early = progress.step - progress.best_step >= cfg.patience
    if fold.dist.main:
        if best:
            save_atomic(
                model_checkpoint(_cpu_state_dict(fold.evaluated), cfg.dims, cfg.frame), paths.best
            )
        finished = progress.stopped_early or progress.step >= cfg.max_steps
        save_atomic(
            _last_state(fold, progress, finished) | frame_record(cfg.dims, cfg.frame), paths.last
        )
        _log(log, type="validation", step=progress.step, val_loss=val_loss, ap=ap, best=best)
    return ValidationEvent(paths.index, progress.step, val_loss, ap, best)


def _fold_finished(split: FoldSplit, progress: _Progress, paths: FoldPaths, dist: _Dist):
    result = FoldFinished(
        split.index,
        progress.best_step,
        progress.best_val,
        str(paths.best),
        progress.stopped_early,
        progress.step,
    )
    if dist.main:
        yield result
    return result


def _log(log, **entry) -> None:
    log.write(json.dumps(entry) + "\n")
    log.flush()


def _init_weights(init: str, fold: int) -> dict[str, torch.Tensor]:
    """The weights fold `fold` of a fine-tuned run starts from: fold K of the `init` run (a
    run folder or builtin:NAME), or fold K mod its number of trained folds."""
    from napari_mtml.builtin import resolve_run
    from napari_mtml.inference import load_fold_weights

    return load_fold_weights(resolve_run(init), fold)


def _selection_score(selection: str | None, val_loss: float, ap: dict[str, float]) -> float:
    """What picks best.pt, lower is better: the validation loss ("loss", the paper's), or minus
    the mean pixel AP over the held-out tasks ("ap"; the loss when no AP is defined)."""
    if selection == "ap":
        values = [v for v in ap.values() if math.isfinite(v)]
        if values:
            return -float(np.mean(values))
    return float(val_loss)


def _cpu_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _last_state(fold: _Fold, progress: _Progress, finished: bool) -> dict:
    """last.pt's content (checkpoint.py): weights, optimiser, schedule, progress and the RNG
    states with the data stream's position, so that a resumed fold goes on as if never
    stopped."""
    rng = {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if fold.device.type == "cuda" else [],
        "data": {
            "seed": int(fold.seed),
            "rank": fold.dist.rank,
            "world_size": fold.dist.world_size,
            "next_item": int(progress.step * fold.local_batch),
        },
    }
    state = {
        "format": FORMAT_VERSION,
        "model": _cpu_state_dict(fold.model),
        "optimizer": fold.optimizer.state_dict(),
        "scheduler": fold.schedule.state_dict(),
        "step": int(progress.step),
        "best_step": int(progress.best_step),
        "best_val_loss": float(progress.best_val),
        "finished": bool(finished),
        "stopped_early": bool(progress.stopped_early),
        "rng": rng,
        "best_score": float(progress.best_score),
    }
    if fold.ema is not None:
        state["ema"] = _cpu_state_dict(fold.ema.module)
    return state


def _validate(
    model: torch.nn.Module,
    val: ValidationSet,
    batch: int,
    device: torch.device,
    amp: torch.dtype | bool | None,
) -> tuple[float, dict[str, float]]:
    """(val loss, AP per held-out task name): MSE(healthy, 0) + MSE(augmented, label) averaged
    over voxels; AP pooled over each task's items (healthy and augmented) inside the
    foreground, predictions clipped to [0, 1].

    ``amp``: the autocast dtype (or True for bf16, False/None for none). Each forward takes the
    healthy and the augmented images of ``batch`` items together (twice the training batch,
    one call instead of two), under `torch.inference_mode`."""
    from napari_mtml.metrics import average_precision

    dtype = torch.bfloat16 if amp is True else (amp or None)
    was_training = model.training
    model.eval()
    n = len(val)
    pred_h = np.empty(val.healthy.shape, np.float32)
    pred_a = np.empty(val.augmented.shape, np.float32)
    with torch.inference_mode():
        for lo in range(0, n, batch):
            hi = min(lo + batch, n)
            both = np.concatenate([val.healthy[lo:hi], val.augmented[lo:hi]])
            x = torch.from_numpy(both).unsqueeze(1).to(device)
            with torch.autocast(
                device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
            ):
                y = model(x)
            y = y.float().squeeze(1).cpu().numpy()
            pred_h[lo:hi], pred_a[lo:hi] = y[: hi - lo], y[hi - lo :]
    model.train(was_training)
    val_loss = float(
        np.mean(pred_h.astype(np.float64) ** 2)
        + np.mean((pred_a.astype(np.float64) - val.label) ** 2)
    )
    ap: dict[str, float] = {}
    for task in np.unique(val.tasks):
        sel = val.tasks == task
        fg = val.foreground[sel]
        scores = np.concatenate([np.clip(pred_a[sel][fg], 0, 1), np.clip(pred_h[sel][fg], 0, 1)])
        labels = np.concatenate([val.mask[sel][fg], np.zeros(int(fg.sum()), bool)])
        ap[TASK_NAMES[int(task)]] = (
            float(average_precision(scores, labels)) if labels.any() else math.nan
        )
    return val_loss, ap
