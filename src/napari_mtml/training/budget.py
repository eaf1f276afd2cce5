"""Training to a time budget: measure what a step costs on the device at hand, plan the steps.

`train(config)` with `config.time_budget` (seconds for the whole command) calls
`measure_costs` once, after the data is read: a throw-away copy of the fold's model takes a few
real optimiser steps on real batches from the real loader (same batch size, workers and device),
then runs a validation forward pass and draws a few validation items. `plan_steps` spreads what
is left of the budget over the folds to train:

    per fold:  steps * step_s + n_val * val_size * 2 * forward_s + val_size * draw_s + setup_s

(`n_val` validations per fold, each feeding every validation item healthy and augmented). The
throw-away model never touches the run: its weights, its data stream and the global RNG state
are discarded, so a run planned to N steps is the very run that `max_steps = N` replays.

The machine may get slower or faster while the run trains (another job starts or ends): after
each fold `replan_steps` compares what the folds took with what the plan predicted and plans
the folds left again from the time left, with the costs scaled by that pace. A fold re-planned by
more than `REPLAN_TOLERANCE` gets its own step count, recorded in config.json's `fold_steps`
(which replays it); on a steady machine every fold keeps the first plan.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = [
    "StepCosts",
    "measure_costs",
    "plan_steps",
    "replan_steps",
    "fold_seconds",
    "VALIDATIONS_PER_FOLD",
    "REPLAN_TOLERANCE",
]

#: A schedule spanning the run validates this many times per fold (TrainConfig.resolve).
VALIDATIONS_PER_FOLD = 8
#: Fraction of the budget kept back for what is not modelled (checkpoints, logs, jitter).
SAFETY = 0.03
#: A re-plan changing a fold's steps by less than this fraction keeps the steps planned before.
REPLAN_TOLERANCE = 0.05
#: The fewest steps a re-planned fold gets, however late the run is.
MIN_REPLANNED_STEPS = 10


@dataclass
class StepCosts:
    """Measured seconds: one optimiser step (batch drawn, forward, backward, update), one
    validation forward pass of one item, drawing one validation item, and building a fold
    (model, optimiser, loader)."""

    step_s: float
    forward_s: float
    draw_s: float
    setup_s: float
    measured_steps: int

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def scaled(self, factor: float) -> StepCosts:
        """Every cost times `factor` (a machine that runs `factor` times slower)."""
        return StepCosts(
            self.step_s * factor,
            self.forward_s * factor,
            self.draw_s * factor,
            self.setup_s * factor,
            self.measured_steps,
        )

    @classmethod
    def from_dict(cls, d: dict) -> StepCosts:
        """The costs recorded in a run's `plan` (`to_dict` plus other keys, ignored)."""
        return cls(
            float(d["step_s"]),
            float(d["forward_s"]),
            float(d["draw_s"]),
            float(d["setup_s"]),
            int(d.get("measured_steps", 0)),
        )


def measure_costs(
    cfg,
    samples,
    tasks,
    model_factory,
    device: torch.device,
    *,
    external=None,
    min_steps: int = 4,
    max_steps: int = 12,
    min_seconds: float = 4.0,
) -> StepCosts:
    """Time a few real training steps and validation pieces of `cfg` (resolved, any
    `max_steps`) on `samples` (a fold's training data) with the fold's `tasks`.

    Takes 2 untimed steps (allocations, loader start-up), then timed steps until `min_steps`
    and `min_seconds` are both reached (at most `max_steps`); the median step is kept, so one
    slow step (another process) does not skew the plan.

    Parameters
    ----------
    cfg : TrainConfig
        Resolved (any `max_steps`).
    samples : list of HealthySample
        A fold's training data.
    tasks : sequence of int
        The fold's training tasks.
    model_factory : callable
        `(cfg, seed) -> torch.nn.Module`.
    device : torch.device
    external : list of HealthySample, optional
    min_steps, max_steps : int
    min_seconds : float

    Returns
    -------
    StepCosts
    """
    from napari_mtml.data import SyntheticDataset, make_loader, make_validation_set
    from napari_mtml.devices import (
        apply_thread_rule,
        autocast_dtype,
        prepare_model_for_device,
        training_channels_last,
    )
    from napari_mtml.heap import keep_freed_memory_while_training
    from napari_mtml.training.step import train_step

    apply_thread_rule(int(cfg.workers), device)  # as each fold will: measure what it will get
    rng_state = torch.get_rng_state()
    # The first optimiser a process makes imports torch's compiler stack (0.7-2 s, once): paid
    # here, outside the clock, or `setup_s` would charge that one-time cost to every fold.
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    t0 = time.perf_counter()
    model = model_factory(cfg, 0)
    dims = getattr(model, "dims", None)  # in the memory format each fold will train in
    prepare_model_for_device(model, device, channels_last=training_channels_last(device, dims))
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(cfg.lr), weight_decay=0.0)
    task_params = cfg.task_params()
    dataset = SyntheticDataset(
        samples,
        tasks,
        seed=0x71AE,
        flip=bool(cfg.flip),
        task_params=task_params,
        external=external,
        bias_augment=float(cfg.bias_augment or 0.0),
        sampling=cfg.sampling,
    )
    loader = make_loader(
        dataset, int(cfg.batch_size), workers=int(cfg.workers), pin_memory=device.type == "cuda"
    )
    batches = iter(loader)
    setup_s = time.perf_counter() - t0
    amp = autocast_dtype(device)
    times: list[float] = []
    # the fold's allocator set-up too: it makes 3D CPU steps ~1.4x faster
    with keep_freed_memory_while_training(device.type, cfg.dims):
        try:
            model.train()
            for i in range(max_steps + 2):
                t = time.perf_counter()
                images, labels, _ = next(batches)
                train_step(model, optimizer, images.to(device), labels.to(device), amp)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= 2:
                    times.append(time.perf_counter() - t)
                    if len(times) >= min_steps and sum(times) >= min_seconds:
                        break
            n_val = max(1, min(4, int(cfg.val_size)))
            t = time.perf_counter()
            val = make_validation_set(
                samples, tasks, n_val, seed=0x71AE, task_params=task_params, external=external
            )
            draw_s = (time.perf_counter() - t) / n_val
            model.eval()
            x = torch.from_numpy(np.concatenate([val.healthy, val.augmented])).unsqueeze(1)
            with (
                torch.inference_mode(),
                torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None),
            ):
                model(x.to(device))  # untimed: first call of a new batch size
                t = time.perf_counter()
                model(x.to(device))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            forward_s = (time.perf_counter() - t) / len(x)
        finally:
            del batches
            torch.set_rng_state(rng_state)
    return StepCosts(float(np.median(times)), forward_s, draw_s, setup_s, len(times))


def plan_steps(
    budget_s: float,
    elapsed_s: float,
    n_folds: int,
    costs: StepCosts,
    val_size: int,
    *,
    n_val: int = VALIDATIONS_PER_FOLD,
    cap: int | None = None,
) -> int:
    """Optimiser steps per fold so that `n_folds` folds end within `budget_s` seconds of which
    `elapsed_s` are spent.

    Parameters
    ----------
    budget_s : float
    elapsed_s : float
    n_folds : int
    costs : StepCosts
        `measure_costs`.
    val_size : int
    n_val : int
        Validations per fold planned for.
    cap : int, optional
        At most this many steps.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        Not even a few steps per fold fit.
    """
    left = budget_s * (1.0 - SAFETY) - elapsed_s
    per_fold = left / max(1, n_folds)
    fixed = fold_seconds(costs, 0, val_size, n_val)
    steps = math.floor((per_fold - fixed) / costs.step_s) if costs.step_s > 0 else 0
    if steps < 10:
        need = elapsed_s + n_folds * (fixed + 10 * costs.step_s)
        raise ValueError(
            f"a time budget of {budget_s:.0f} s is too short: {elapsed_s:.0f} s went on reading "
            f"the data and measuring, and one step takes {costs.step_s:.2f} s, so fewer than 10 "
            f"steps per fold would fit in {n_folds} fold(s); give at least "
            f"{math.ceil(need / 60)} min, fewer folds (--fold K), or a smaller --batch-size"
        )
    return min(steps, cap) if cap else steps


def fold_seconds(costs: StepCosts, steps: int, val_size: int, n_val: int) -> float:
    """The seconds a fold of `steps` steps and `n_val` validations is planned to take.

    Parameters
    ----------
    costs : StepCosts
    steps, val_size, n_val : int

    Returns
    -------
    float
    """
    return (
        steps * costs.step_s
        + n_val * val_size * 2 * costs.forward_s
        + val_size * costs.draw_s
        + costs.setup_s
    )


def replan_steps(
    budget_s: float,
    elapsed_s: float,
    n_folds: int,
    costs: StepCosts,
    val_size: int,
    *,
    last_fold_s: float,
    last_steps: int,
    last_validations: int,
    current: int,
    cap: int | None = None,
    earlier_s: float = 0.0,
    earlier_planned_s: float = 0.0,
    n_val: int = VALIDATIONS_PER_FOLD,
) -> tuple[int, float]:
    """Steps for each of the `n_folds` folds still to train, planned again after a fold.

    The pace is the seconds taken per second planned by the fold just trained (`last_steps`
    steps, `last_validations` validations, `last_fold_s` seconds) when it is slower than all
    the folds so far (`earlier_s` taken for `earlier_planned_s` planned before it): a
    slowdown counts at once. When it is faster (the load went away, or the warm-up's steps
    were the slowest), the pace is halfway between it and the overall one, so that one quick
    fold does not swing the plan and a past slowdown does not hold the run back for good.
    The folds left share what is left of the budget at that pace. A change of less than
    `REPLAN_TOLERANCE` keeps `current`; a run already late gets `MIN_REPLANNED_STEPS` (it
    never stops training a fold for lack of time).

    Parameters
    ----------
    budget_s, elapsed_s : float
        The whole budget, and the seconds spent so far.
    n_folds : int
        Folds left to train.
    costs : StepCosts
        As measured before the first fold.
    val_size : int
    last_fold_s : float
    last_steps, last_validations : int
    current : int
        The steps planned so far.
    cap : int, optional
        At most this many steps.
    earlier_s, earlier_planned_s : float
        Seconds the folds before the last one took, and were planned to take.
    n_val : int
        Validations per fold planned for the folds left (`plan_steps`).

    Returns
    -------
    steps : int
    pace : float
        Seconds taken per second planned, as used.

    Examples
    --------
    >>> costs = StepCosts(step_s=0.5, forward_s=0.0, draw_s=0.0, setup_s=0.0, measured_steps=8)
    >>> # 100 steps planned at 50 s took 100 s: the 2 folds left share 400 x 0.97 - 150 s
    >>> # at 1 s a step
    >>> replan_steps(400.0, 150.0, 2, costs, 4, last_fold_s=100.0, last_steps=100,
    ...              last_validations=8, current=100)
    (119, 2.0)
    """
    planned = fold_seconds(costs, last_steps, val_size, last_validations)
    pace = last_fold_s / planned if planned > 0 and last_fold_s > 0 else 1.0
    if earlier_planned_s > 0 and planned > 0:
        overall = (earlier_s + last_fold_s) / (earlier_planned_s + planned)
        if pace < overall:  # faster than the run so far: half of the speed-up counts
            pace = 0.5 * (pace + overall)
    try:
        steps = plan_steps(
            budget_s, elapsed_s, n_folds, costs.scaled(pace), val_size, n_val=n_val, cap=cap
        )
    except ValueError:  # already too late for 10 steps per fold: train the fewest
        steps = MIN_REPLANNED_STEPS
    if current and abs(steps - current) < REPLAN_TOLERANCE * current:
        steps = current
    return steps, pace
