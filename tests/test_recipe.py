"""The recipe and `synthesize` (METHOD.md §1): counts, sizes, foreground, determinism, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mtml.anomalies import TASKS, SynthesisResult, synthesize


def _phantom(shape, seed=0):
    """A smooth blob of z-score-like values on a zero background, and its foreground."""
    rng = np.random.default_rng(seed)
    grids = np.indices(shape).astype(np.float32)
    centre = (np.asarray(shape, dtype=np.float32) - 1) / 2
    rad = np.asarray(shape, dtype=np.float32) * 0.4
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, rad, strict=True))
    fg = r2 <= 1.0
    image = np.where(fg, rng.normal(size=shape) * 0.5 + 1.0 - r2, 0).astype(np.float32)
    return image, fg


def test_task_names_and_ids():
    assert TASKS == ("intra_blend", "inter_blend", "sink", "source", "smooth_intensity")
    image, fg = _phantom((32, 32))
    for i, name in enumerate(TASKS):
        a = synthesize(image, fg, task=i, rng=np.random.default_rng(3))
        b = synthesize(image, fg, task=name, rng=np.random.default_rng(3))
        assert a.task == b.task == name
        np.testing.assert_array_equal(a.image, b.image)


def test_anomaly_count_follows_the_coin_tosses():
    image, fg = _phantom((32, 32))
    rng = np.random.default_rng(11)
    n = 800
    counts = np.bincount(
        [synthesize(image, fg, task="smooth_intensity", rng=rng).n_anomalies for _ in range(n)],
        minlength=5,
    )[1:]
    expected = n * np.array([1 / 2, 1 / 4, 1 / 8, 1 / 8])
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27, (counts, chi2)  # chi-square, 3 dof, p = 0.001


def test_max_anomalies_and_repeat_prob_are_obeyed():
    image, fg = _phantom((32, 32))
    rng = np.random.default_rng(12)
    for _ in range(30):
        many = synthesize(image, fg, "sink", rng=rng, repeat_prob=1.0, max_anomalies=3)
        assert many.n_anomalies == 3
        assert synthesize(image, fg, "sink", rng=rng, repeat_prob=0.0).n_anomalies == 1


# blending spill adds voxels around the shape, so the rule is checked on the tasks whose mask is
# the shape itself (placement alone is checked for all shapes in test_shapes.py)
@pytest.mark.parametrize("task", ["sink", "source", "smooth_intensity"])
@pytest.mark.parametrize("dims", [(48, 48), (24, 32, 24)])
def test_every_anomaly_is_half_on_the_foreground(task, dims):
    image, fg = _phantom(dims, seed=1)
    fg = fg & (np.indices(dims)[-1] < dims[-1] // 2)  # half a blob: many positions fail
    rng = np.random.default_rng(13)
    for _ in range(15):
        res = synthesize(image, fg, task=task, rng=rng, max_anomalies=1)
        assert res.n_anomalies == 1
        assert fg[res.mask].sum() >= 0.5 * res.mask.sum()


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("dims", [(40, 40), (20, 28, 20)])
def test_outputs_types_ranges_and_purity(task, dims):
    image, fg = _phantom(dims, seed=2)
    image_copy, fg_copy = image.copy(), fg.copy()
    res = synthesize(image, fg, task=task, rng=np.random.default_rng(4))
    assert isinstance(res, SynthesisResult)
    assert res.image.dtype == np.float32 and res.image.shape == dims
    assert res.label.dtype == np.float32 and res.label.shape == dims
    assert res.mask.dtype == bool and res.mask.any()
    assert res.label.min() >= 0 and res.label.max() < 1
    assert res.label[res.mask].max() > 0  # the anomaly is labelled
    np.testing.assert_array_equal(res.image[~res.mask], image[~res.mask])
    assert res.image.min() >= image.min() and res.image.max() <= image.max()
    np.testing.assert_array_equal(image, image_copy)
    np.testing.assert_array_equal(fg, fg_copy)
    assert res.image is not image


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_output(task):
    image, fg = _phantom((24, 32, 24), seed=3)
    a = synthesize(image, fg, task=task, rng=np.random.default_rng(7))
    b = synthesize(image, fg, task=task, rng=np.random.default_rng(7))
    c = synthesize(image, fg, task=task, rng=np.random.default_rng(8))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.mask, c.mask)


def test_other_input_dtypes_give_float32():
    image, fg = _phantom((32, 32))
    for arr in (image.astype(np.float64), (image * 100).astype(np.int16)):
        res = synthesize(arr, fg.astype(np.uint8), task="source", rng=np.random.default_rng(0))
        assert res.image.dtype == np.float32 and res.label.dtype == np.float32


def test_source_forms_and_inputs_untouched():
    image, fg = _phantom((32, 32))
    other, other_fg = _phantom((40, 36), seed=5)
    keep = other.copy()
    for source in (other, (other, other_fg), (other, None), lambda r: (other, other_fg)):
        res = synthesize(image, fg, task="inter_blend", rng=np.random.default_rng(1), source=source)
        assert res.mask.any()
    np.testing.assert_array_equal(other, keep)


def _bad_inputs():
    image, fg = _phantom((32, 32))
    nan_image = image.copy()
    nan_image[3, 4] = np.nan
    speck = np.zeros_like(fg)
    speck[16, 16] = True  # every shape has >= 4 voxels here: no position reaches 50%
    return [
        ("empty", dict(image=image, foreground=np.zeros_like(fg))),
        ("NaN", dict(image=nan_image, foreground=fg)),
        ("2D", dict(image=image[0], foreground=None)),
        ("2D", dict(image=image[None, None], foreground=None)),
        ("smaller", dict(image=image[:4, :4], foreground=None)),
        ("shape", dict(image=image, foreground=fg[:30])),
        ("foreground", dict(image=image, foreground=speck)),
        ("task", dict(image=image, foreground=fg, task="warp")),
        ("task id", dict(image=image, foreground=fg, task=7)),
        ("unknown task parameter", dict(image=image, foreground=fg, radius=3)),
        ("min_size", dict(image=image, foreground=fg, min_size=0.9, max_size=0.5)),
        ("rng", dict(image=image, foreground=fg, rng=42)),
        ("dimensions", dict(image=image, foreground=fg, task=0, source=image[None])),
        ("NaN", dict(image=image, foreground=fg, task=1, source=nan_image)),
    ]


@pytest.mark.parametrize("match, kwargs", _bad_inputs())
def test_bad_input_raises_a_clear_value_error_quickly(match, kwargs):
    kwargs = dict(kwargs)
    kwargs.setdefault("task", "sink")
    kwargs.setdefault("rng", np.random.default_rng(0))
    with pytest.raises(ValueError, match=match):
        synthesize(**kwargs)


def test_rng_by_position_or_name_and_none_is_a_fresh_generator():
    """`rng` positional or by name gives the same result per seed; None draws a fresh
    `default_rng()` (never numpy's global state)."""
    image, fg = _phantom((32, 32))
    a = synthesize(image, fg, "sink", np.random.default_rng(0))
    b = synthesize(image, fg, "sink", rng=np.random.default_rng(0))
    np.testing.assert_array_equal(a.image, b.image)
    np.random.seed(0)  # noqa: NPY002
    state = np.random.get_state()[1].copy()  # noqa: NPY002
    assert synthesize(image, fg, "sink").n_anomalies >= 1
    assert synthesize(image, fg, "sink", None).n_anomalies >= 1
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # noqa: NPY002
