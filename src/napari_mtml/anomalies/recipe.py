"""The shared recipe of every task and the task registry (METHOD.md §1).

One anomaly, then on a coin toss (`repeat_prob`) another, up to `max_anomalies`; each one a fresh
random shape placed with the foreground rule and applied on the already changed image; the union of
their masks is the anomaly mask; the flipped-Gaussian label is computed once at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from napari_mtml.anomalies.placement import PlacementError, place_shape
from napari_mtml.anomalies.shapes import random_shape
from napari_mtml.anomalies.tasks import TASK_OBJECTS, SourceImage, TaskContext, TaskParams

#: task names, index = task id (METHOD.md §2): the one place they are written is
#: `tasks.TASK_OBJECTS`
TASKS = tuple(t.name for t in TASK_OBJECTS)
#: the tasks that blend in another image (they take `synthesize`'s `source`)
BLEND_TASKS = tuple(t.name for t in TASK_OBJECTS if t.blends)
#: every spatial axis needs this many voxels: the smallest shape plus room for blending borders
MIN_IMAGE_SIDE = 8
#: fresh shapes tried per anomaly when one finds no valid position (each with `max_attempts`)
SHAPE_TRIES = 4

_PARAM_NAMES = tuple(f.name for f in dataclasses.fields(TaskParams))


@dataclass(frozen=True, eq=False)
class SynthesisResult:
    """The output of `synthesize`.

    Attributes
    ----------
    image : float32, the image's shape, the anomalous image.
    label : float32 in [0, 1), the image's shape, the flipped-Gaussian label.
    mask : bool, the image's shape, union of the anomaly masks (spill of blending included).
    task : the task name used.
    n_anomalies : how many anomalies were applied (1..max_anomalies).
    """

    image: np.ndarray
    label: np.ndarray
    mask: np.ndarray
    task: str
    n_anomalies: int


def task_name(task) -> str:
    """A task name from a name or an integer id (ValueError otherwise).

    Parameters
    ----------
    task : str or int
        A name of `TASKS` or its index 0..4.

    Returns
    -------
    str
        The task's name.

    Examples
    --------
    >>> task_name(2), task_name("source")
    ('sink', 'source')
    """
    if isinstance(task, (int, np.integer)) and not isinstance(task, bool):
        if 0 <= int(task) < len(TASKS):
            return TASKS[int(task)]
        raise ValueError(f"task id {task} is out of range: use 0..{len(TASKS) - 1} ({TASKS})")
    if isinstance(task, str) and task in TASKS:
        return task
    raise ValueError(f"unknown task {task!r}: use one of {TASKS} or an id 0..{len(TASKS) - 1}")


def task_object(task):
    """The task object (`tasks.TASK_OBJECTS`) of a task name or id: its `name`, `id`,
    `params` (the task parameters it uses besides the common ones) and `blends`."""
    return TASK_OBJECTS[TASKS.index(task_name(task))]


def _finite_range(array: np.ndarray, what: str) -> tuple[float, float]:
    # min/max propagate NaN and show inf, so one pass each also checks finiteness
    low, high = float(np.min(array)), float(np.max(array))
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(
            f"{what} contains NaN or infinite values: replace them (e.g. np.nan_to_num)"
        )
    return low, high


def _check_image(image, what: str) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(
            f"{what} must be a 2D (H, W) or 3D (D, H, W) array, got shape {image.shape}: "
            "squeeze channel axes and pass one image at a time"
        )
    if not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        raise ValueError(f"{what} must hold real numbers, got dtype {image.dtype}")
    if min(image.shape) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"{what} of shape {image.shape} is smaller than the smallest anomaly needs: every axis "
            f"must have at least {MIN_IMAGE_SIDE} voxels"
        )
    return image


def _check_mask(mask, shape, what: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(
            f"{what} has shape {mask.shape} but its image has shape {tuple(shape)}: pass a mask "
            "on the image's grid"
        )
    if mask.dtype != bool:
        mask = mask != 0
    if not mask.any():
        raise ValueError(f"{what} is empty: no voxel to place an anomaly on; pass None for all")
    return mask


def _source_provider(source, image, foreground, image_range) -> Callable:
    """Normalise `source` to `rng -> SourceImage`, validating what it gives."""

    def checked(array, mask, value_range=None) -> SourceImage:
        array = np.asarray(array)
        if array.ndim != image.ndim:
            raise ValueError(
                f"the blending source is {array.ndim}D but the image is {image.ndim}D: "
                "give a source with the same number of dimensions"
            )
        array = _check_image(array, "the blending source")
        array = np.asarray(array, dtype=np.float32)
        if mask is not None:
            mask = _check_mask(mask, array.shape, "the blending source's mask")
        low, high = value_range or _finite_range(array, "the blending source")
        return SourceImage(array, mask, low, high)

    if source is None:
        fixed = SourceImage(image, foreground, *image_range)
        return lambda rng: fixed
    if callable(source):

        def call(rng):
            got = source(rng)
            if not (isinstance(got, tuple) and len(got) == 2):
                raise ValueError("a source callable must return a tuple (array, mask_or_None)")
            return checked(*got)

        return call
    if isinstance(source, tuple):
        if len(source) != 2:
            raise ValueError(
                "source must be an array, an (array, mask_or_None) tuple or a callable"
            )
        fixed = checked(*source)
    else:
        fixed = checked(source, None)
    return lambda rng: fixed


def synthesize(
    image,
    foreground=None,
    task="sink",
    rng: np.random.Generator | None = None,
    source=None,
    **task_params,
) -> SynthesisResult:
    """Apply one task's synthetic anomalies to an image and compute the label (METHOD.md §1-3).

    Parameters
    ----------
    image : 2D (H, W) or 3D (D, H, W) real array (float32 preferred; never modified); every axis
        at least 8 voxels.
    foreground : bool array of the image's shape, or None (= the whole image). Every anomaly has at
        least half of its voxels on it.
    task : a name from `TASKS` or its id 0..4.
    rng : numpy.random.Generator, or None for a fresh ``np.random.default_rng()`` (as
        scikit-image does; pass ``np.random.default_rng(seed)`` to repeat a result). numpy's
        global random state is never used.
    source : blending tasks only: None (= the image itself with its foreground), an array, an
        (array, mask_or_None) tuple, or a callable `source(rng) -> (array, mask_or_None)` called
        once per blended anomaly. Same number of dimensions as the image; any size.
    **task_params : the `TaskParams` fields (min_size, max_size, max_anomalies, repeat_prob,
        min_push, max_push, intensity_scale, margin_base, sigma, shape, max_attempts).

    Returns
    -------
    SynthesisResult with float32 `image`, float32 `label` in [0, 1), bool `mask`, `task`,
    `n_anomalies`.

    Raises
    ------
    ValueError for bad input (wrong dimensionality, NaN, mismatched shapes, empty foreground, image
    too small, unknown task or parameter) and when no placement satisfies the foreground rule.

    Examples
    --------
    >>> import numpy as np
    >>> from napari_mtml.anomalies import synthesize
    >>> image = np.random.default_rng(0).normal(0, 0.1, (64, 64)).astype(np.float32)
    >>> result = synthesize(image, task="sink", rng=np.random.default_rng(0))
    >>> result.image.shape, result.label.dtype, result.task
    ((64, 64), dtype('float32'), 'sink')
    >>> bool(0 < result.label.max() < 1 and result.mask.any())
    True
    """
    from napari_mtml.anomalies.labelling import flipped_gaussian_label_of_boxes

    if rng is None:
        rng = np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator: pass np.random.default_rng(seed)")
    unknown = sorted(set(task_params) - set(_PARAM_NAMES))
    if unknown:
        raise ValueError(f"unknown task parameter(s) {unknown}: use {list(_PARAM_NAMES)}")
    params = TaskParams(**task_params)
    params.validate()
    name = task_name(task)
    image = _check_image(image, "the image")
    if foreground is not None:
        foreground = _check_mask(foreground, image.shape, "the foreground mask")
    original = np.asarray(image, dtype=np.float32)
    value_range = _finite_range(original, "the image")

    apply = task_object(name)
    provider = None
    if apply.blends:
        provider = _source_provider(source, original, foreground, value_range)
    context = TaskContext(params=params, value_range=value_range, source=provider)

    work = original.copy()
    union = np.zeros(image.shape, dtype=bool)
    count = 0
    boxes, masks = [], []
    while True:
        placed = _draw_placed(image.shape, foreground, rng, params)
        patch = apply(work, placed, rng, context)
        region = work[patch.box]
        np.copyto(region, patch.values, where=patch.mask)
        union[patch.box] |= patch.mask
        boxes.append(patch.box)
        masks.append(patch.mask)
        count += 1
        if count >= params.max_anomalies or rng.random() >= params.repeat_prob:
            break
    # the same label as flipped_gaussian_label(work, original, union), with the components found
    # near the patches rather than on the union's bounding box
    label = flipped_gaussian_label_of_boxes(work, original, boxes, masks, sigma=params.sigma)
    return SynthesisResult(
        image=work,
        label=np.asarray(label, dtype=np.float32),
        mask=union,
        task=name,
        n_anomalies=count,
    )


def _draw_placed(image_shape, foreground, rng, params: TaskParams):
    error = None
    for _ in range(SHAPE_TRIES):
        shape = random_shape(image_shape, rng, params.min_size, params.max_size, params.shape)
        try:
            return place_shape(shape, image_shape, rng, foreground, params.max_attempts)
        except PlacementError as exc:
            error = exc
    raise error
