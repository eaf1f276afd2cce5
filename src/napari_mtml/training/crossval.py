"""Cross-validation over tasks (METHOD.md section 4).

Five tasks (ids 0..4) and five data folds: data fold i belongs to task i. A T/(5-T) split trains
one model per combination of T tasks (C(5, T) = 5, 10, 10, 5 models for T = 1..4) on those tasks'
data folds and validates it on the remaining tasks with their folds. When the validation data
would be larger than the training data (T = 1, 2) the *data* lists are swapped (not the tasks),
so a model always trains on the larger share: 4/5 of the data for T in {1, 4}, 3/5 for T in {2, 3}.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

__all__ = ["N_TASKS", "FoldSplit", "task_folds"]

N_TASKS = 5


@dataclass(frozen=True)
class FoldSplit:
    """One model of the cross-validation.

    index: the fold number, 0..C(5, T)-1, in `itertools.combinations` order (for T = 1 the
        fold index equals its training task).
    train_tasks / val_tasks: disjoint task ids whose union is 0..4.
    train_data / val_data: disjoint data-fold ids whose union is 0..4 (after the swap rule).
    """

    index: int
    train_tasks: tuple[int, ...]
    val_tasks: tuple[int, ...]
    train_data: tuple[int, ...]
    val_data: tuple[int, ...]

    def to_dict(self) -> dict:
        return {
            "fold": self.index,
            "train_tasks": list(self.train_tasks),
            "val_tasks": list(self.val_tasks),
            "train_data_folds": list(self.train_data),
            "val_data_folds": list(self.val_data),
        }


def task_folds(train_tasks: int = 1) -> list[FoldSplit]:
    """Every fold of the T/(5-T) split, T = `train_tasks` in 1..4.

    Parameters
    ----------
    train_tasks : int
        T in 1..4.

    Returns
    -------
    list of FoldSplit
        C(5, T) of them.

    Examples
    --------
    >>> folds = task_folds(1)
    >>> len(folds), folds[0].train_tasks, folds[0].val_tasks
    (5, (0,), (1, 2, 3, 4))
    """
    if isinstance(train_tasks, bool) or train_tasks not in (1, 2, 3, 4):
        raise ValueError(f"train_tasks = {train_tasks!r}: the T of a T/(5-T) split is 1, 2, 3 or 4")
    splits = []
    for index, train in enumerate(itertools.combinations(range(N_TASKS), train_tasks)):
        val = tuple(t for t in range(N_TASKS) if t not in train)
        train_data, val_data = train, val
        if len(val_data) > len(train_data):
            train_data, val_data = val_data, train_data
        splits.append(FoldSplit(index, tuple(train), val, tuple(train_data), tuple(val_data)))
    return splits
