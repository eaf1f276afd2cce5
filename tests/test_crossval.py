"""Cross-validation over tasks: C(5, T) folds, disjoint tasks and data, the data-swap rule."""

from __future__ import annotations

import math

import pytest

from napari_mtml.training.crossval import task_folds


@pytest.mark.parametrize("t, n", [(1, 5), (2, 10), (3, 10), (4, 5)])
def test_number_of_folds(t, n):
    folds = task_folds(t)
    assert len(folds) == n == math.comb(5, t)
    assert [f.index for f in folds] == list(range(n))
    # every combination exactly once
    assert len({f.train_tasks for f in folds}) == n


@pytest.mark.parametrize("t", [1, 2, 3, 4])
def test_tasks_and_data_disjoint_and_complete(t):
    for f in task_folds(t):
        assert len(f.train_tasks) == t
        assert not set(f.train_tasks) & set(f.val_tasks)
        assert set(f.train_tasks) | set(f.val_tasks) == set(range(5))
        assert not set(f.train_data) & set(f.val_data)
        assert set(f.train_data) | set(f.val_data) == set(range(5))


@pytest.mark.parametrize("t, n_train_data", [(1, 4), (2, 3), (3, 3), (4, 4)])
def test_swap_rule_trains_on_the_larger_share(t, n_train_data):
    for f in task_folds(t):
        assert len(f.train_data) == n_train_data
        if t <= 2:  # swapped: the data lists, not the tasks
            assert f.train_data == f.val_tasks and f.val_data == f.train_tasks
        else:
            assert f.train_data == f.train_tasks and f.val_data == f.val_tasks


def test_headline_split_fold_i_is_task_i():
    for i, f in enumerate(task_folds(1)):
        assert f.train_tasks == (i,)
        assert f.val_data == (i,)


@pytest.mark.parametrize("bad", [0, 5, True, "2"])
def test_bad_train_tasks(bad):
    with pytest.raises(ValueError, match="1, 2, 3 or 4"):
        task_folds(bad)
