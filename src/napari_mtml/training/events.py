"""The events that `napari_mtml.training.train` yields.

The CLI renders them as a progress bar, the napari widget as a progress bar and a live plot, and
tests iterate them directly. All are plain dataclasses of numbers, strings and small containers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "FoldStarted",
    "StepEvent",
    "ValidationEvent",
    "FoldFinished",
    "RunFinished",
    "Notice",
    "RunResult",
]


@dataclass
class FoldStarted:
    """A fold begins (or resumes: `start_step` > 0)."""

    fold: int
    n_folds: int
    train_tasks: tuple[str, ...]
    val_tasks: tuple[str, ...]
    max_steps: int
    start_step: int = 0


@dataclass
class StepEvent:
    """One optimiser step done; `loss` is the batch MSE (mean over ranks), `lr` the rate used."""

    fold: int
    step: int
    max_steps: int
    loss: float
    lr: float


@dataclass
class ValidationEvent:
    """Validation after `step`: val loss = MSE(healthy) + MSE(augmented); `ap` per held-out task
    name (pixel AP pooled over that task's validation items, inside the foreground); `best` when
    this is the lowest val loss so far (best.pt was just written)."""

    fold: int
    step: int
    val_loss: float
    ap: dict[str, float]
    best: bool


@dataclass
class FoldFinished:
    """A fold ended (max steps or early stop); `checkpoint` is the path of its best.pt;
    `steps` the steps it trained in all."""

    fold: int
    best_step: int
    best_val_loss: float
    checkpoint: str
    stopped_early: bool = False
    steps: int = 0


@dataclass
class RunFinished:
    run_dir: str
    folds: list[FoldFinished]


@dataclass
class Notice:
    """Something the user should know (CPU fallback, task 1 without an external dataset...)."""

    text: str
    fold: int | None = None


@dataclass
class RunResult:
    """What `train` returns (the `StopIteration.value` of its generator)."""

    run_dir: str
    folds: list[FoldFinished] = field(default_factory=list)
