"""Learning-rate schedules (as factors of the peak rate) and the moving average of the weights.

Both schedules are plain factor functions of the number of optimiser steps already taken; the
training loop drives them with `torch.optim.lr_scheduler.LambdaLR` (`make_scheduler`).

- `WarmupExponentialLR`, the paper's (METHOD.md section 6): linear warm-up, then a fixed decay
  per step down to a floor. Tuned for 20,000-step runs: a run of a few hundred steps never leaves
  the peak rate.
- `WarmupCosineLR`: linear warm-up, then a half cosine from the peak down to the floor at the
  last planned step, so that the whole schedule fits the run whatever its length (a run planned
  from a time budget ends annealed).

`WeightAverage` keeps an exponential moving average of a model's weights (with the usual
warm-up of the decay, `min(decay, (1 + t) / (10 + t))`, so that early steps are not averaged
with the random initialisation for long).
"""

from __future__ import annotations

import copy
import math

import torch

__all__ = [
    "WarmupExponentialLR",
    "WarmupCosineLR",
    "make_schedule",
    "make_scheduler",
    "WeightAverage",
]


class _Warmup:
    """A factor function with a linear warm-up from `start` to 1 over `warmup_steps`, then the
    subclass's `after_warmup(steps since the warm-up)`. Its state is its settings and `kind`."""

    kind = ""
    warmup_steps: int
    start: float

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start + (1.0 - self.start) * step / self.warmup_steps
        return self.after_warmup(step - self.warmup_steps)

    __call__ = factor

    def after_warmup(self, step: int) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"kind": self.kind, **vars(self)}


class WarmupExponentialLR(_Warmup):
    """Learning-rate factor per step: linear warm-up from `start` to 1 over `warmup_steps`,
    then `decay ** (step - warmup_steps)` down to `floor`, then constant.

    With the paper's numbers (0.01, 100, 0.9997122, 1/20) the floor is reached at step ~10,508.
    """

    kind = "paper"

    def __init__(
        self,
        warmup_steps: int = 100,
        start: float = 0.01,
        decay: float = 0.9997122,
        floor: float = 0.05,
    ):
        self.warmup_steps, self.start, self.decay, self.floor = warmup_steps, start, decay, floor

    def after_warmup(self, step: int) -> float:
        return max(self.decay**step, self.floor)


class WarmupCosineLR(_Warmup):
    """Learning-rate factor per step: linear warm-up from `start` to 1 over `warmup_steps`,
    then `floor + (1 - floor) * (1 + cos(pi * t)) / 2` with `t` going from 0 to 1 at
    `total_steps` (constant `floor` after it)."""

    kind = "cosine"

    def __init__(
        self, total_steps: int, warmup_steps: int = 100, start: float = 0.01, floor: float = 0.05
    ):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.start, self.floor = start, floor

    def after_warmup(self, step: int) -> float:
        t = min(1.0, step / max(1, self.total_steps - self.warmup_steps))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def make_schedule(cfg) -> WarmupExponentialLR | WarmupCosineLR:
    """The factor function of a resolved `TrainConfig` (`lr_schedule`, `max_steps`, ...).

    Parameters
    ----------
    cfg : TrainConfig
        Resolved.

    Returns
    -------
    WarmupExponentialLR or WarmupCosineLR
    """
    if cfg.lr_schedule == "cosine":
        return WarmupCosineLR(
            int(cfg.max_steps), int(cfg.warmup_steps), cfg.warmup_start, cfg.final_lr_fraction
        )
    return WarmupExponentialLR(
        int(cfg.warmup_steps), cfg.warmup_start, cfg.lr_decay, cfg.final_lr_fraction
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule, peak_lr: float, step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """`LambdaLR` over `schedule`'s factors from the peak rate, positioned at `step` (the number
    of optimiser steps already taken: the next step uses `peak_lr * schedule(step)`).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
    schedule : callable
        A factor function (`make_schedule`).
    peak_lr : float
    step : int

    Returns
    -------
    torch.optim.lr_scheduler.LambdaLR
    """
    for group in optimizer.param_groups:
        group["lr"] = peak_lr
        group["initial_lr"] = peak_lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch=int(step) - 1)


class WeightAverage:
    """Exponential moving average of a model's parameters and buffers.

    `update(step)` after each optimiser step; `module` is the averaged copy (eval mode, no
    gradients) to validate and save. State: `state_dict()` / `load_state_dict()` of `module`.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        for avg, cur in zip(self.module.parameters(), model.parameters(), strict=True):
            avg.lerp_(cur.detach(), 1.0 - d)
        for avg, cur in zip(self.module.buffers(), model.buffers(), strict=True):
            avg.copy_(cur)
