"""The anomaly preview's compute path: one `synthesize` call on an image in its own units.

The napari preview widget (`napari_mtml._napari.preview_widget`) and
`benchmarks/bench_preview.py` call these; nothing here knows Qt::

    from napari_mtml.preview import prepare_input, compute_preview
    inp = prepare_input(layer_data, foreground)          # once per image: to the tasks' units
    res = compute_preview(inp, task="sink", seed=0, params={"max_push": 5.0})
    res.image, res.label                                 # in the image's own units, [0, 1)

`PARAMS` lists the task parameters a user may turn (label, range, default, decimals), read from
`napari_mtml.anomalies.TaskParams`; `params_used(task)` says which of them a task uses.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_mtml.anomalies import BLEND_TASKS, CXR_MAX_PUSH, TASKS, TaskParams, synthesize
from napari_mtml.anomalies.recipe import task_object
from napari_mtml.anomalies.tasks import COMMON_PARAMS

__all__ = [
    "PARAMS",
    "FolderSource",
    "ParamSpec",
    "PreviewInput",
    "PreviewResult",
    "compute_preview",
    "default_max_push",
    "next_seed",
    "params_used",
    "prefers_slices",
    "prepare_input",
    "preview_input",
    "slice_source",
]


@dataclass(frozen=True)
class ParamSpec:
    """A task parameter a user may turn: the `synthesize` keyword `name`, its `label`, the range
    `low..high` offered, its `default` (the paper's) and the `decimals` shown (0: an integer)."""

    name: str
    label: str
    low: float
    high: float
    default: float
    decimals: int


#: The turnable task parameters, in `TaskParams` order (their metadata is the one source).
PARAMS = tuple(
    ParamSpec(f.name, f.metadata["label"], *f.metadata["range"], f.default, f.metadata["decimals"])
    for f in dataclasses.fields(TaskParams)
    if "range" in f.metadata
)


def params_used(task: str | None) -> set[str]:
    """The task parameters `task` uses (`None`: a random task, so any of them).

    Parameters
    ----------
    task : str or None
        A task name.

    Returns
    -------
    set of str
        Keywords of `napari_mtml.anomalies.synthesize`.
    """
    tasks = TASKS if task is None else (task,)
    return set(COMMON_PARAMS).union(*(task_object(t).params for t in tasks))


def default_max_push(ndim: int) -> float:
    """The paper's push limit for an image of `ndim` dimensions: 5 voxels for brain volumes,
    10 for 2D X-rays (`CXR_MAX_PUSH`).

    Parameters
    ----------
    ndim : int
        2 or 3.

    Returns
    -------
    float

    Examples
    --------
    >>> default_max_push(3), default_max_push(2)
    (5.0, 10.0)
    """
    return TaskParams.max_push if ndim == 3 else CXR_MAX_PUSH


def prefers_slices(spacing) -> bool:
    """Whether a volume of this voxel spacing (mm per axis) is better previewed slice by slice:
    thick slices (e.g. 6.5 mm over 0.8 mm pixels, more than twice the finest spacing) would
    make a 3D shape drawn on the voxel grid a sliver through one or two slices.

    Parameters
    ----------
    spacing : sequence of float
        mm per axis.

    Returns
    -------
    bool

    Examples
    --------
    >>> prefers_slices((6.5, 0.8, 0.8)), prefers_slices((1.0, 1.0, 1.0))
    (True, False)
    """
    spacing = np.asarray(spacing, dtype=float)
    return bool(spacing.min() > 0 and spacing.max() / spacing.min() > 2)


def next_seed(seed: int) -> int:
    """Another seed, derived deterministically from `seed` (the preview's "New seed").

    Parameters
    ----------
    seed : int

    Returns
    -------
    int
        In [0, 2**31).
    """
    return int(np.random.default_rng(seed).integers(0, 2**31 - 1))


@dataclass(frozen=True)
class PreviewInput:
    """An image brought into the tasks' intensity units, with its foreground.

    `image`: float32 `(H, W)` or `(D, H, W)` in model units (z-score inside the foreground for
    volumes, [-1, 1] for 2D images, as METHOD.md §7); `offset`, `scale`: `display = image * scale +
    offset` maps back to the layer's own units; `foreground`: bool, same shape, or `None`.
    """

    image: np.ndarray
    foreground: np.ndarray | None
    offset: float
    scale: float


@dataclass
class PreviewResult:
    """One preview: `image` float32 in the source layer's units, `label` float32 in [0, 1)."""

    image: np.ndarray
    label: np.ndarray
    task: str
    n_anomalies: int
    seconds: float
    layer_id: int = 0
    params: dict = field(default_factory=dict)
    slice_index: int | None = None  # the axial slice synthesised in 2D, if any


def prepare_input(layer_data: np.ndarray, foreground: np.ndarray | None) -> PreviewInput:
    """`PreviewInput` for an image's pixels (any real dtype) and an optional bool foreground.

    Parameters
    ----------
    layer_data : array_like, (H, W) or (D, H, W)
        The image in its own units (e.g. a napari layer's data).
    foreground : array_like of bool, same shape, or None
        Where anomalies may go; None for the whole image.

    Returns
    -------
    PreviewInput
        The image in the tasks' units (`napari_mtml.preprocess.to_model_units`), with the offset
        and scale back to its own units.
    """
    from napari_mtml.preprocess import to_model_units

    data = np.asarray(layer_data, dtype=np.float32)
    fg = None if foreground is None else np.asarray(foreground).astype(bool)
    image, offset, scale = to_model_units(data, fg)
    return PreviewInput(image=image, foreground=fg, offset=offset, scale=scale)


def preview_input(layer_data: np.ndarray, foreground, scan=None) -> PreviewInput:
    """`prepare_input` with the foreground chosen as the preview offers it.

    `foreground`: a bool array of the image's shape, `None` (the whole image) or `"auto"`: for a
    volume the scan's foreground (`preprocess.foreground_mask(scan)`, the whole image when it
    finds none), for a 2D image (an X-ray) the whole frame, as in the paper.

    Parameters
    ----------
    layer_data : ndarray
        The image, 2D or 3D.
    foreground : ndarray of bool, None or "auto"
    scan : napari_mtml.io.Scan, optional
        The image's scan (for the automatic foreground).

    Returns
    -------
    PreviewInput
    """
    if isinstance(foreground, str):
        if foreground != "auto":
            raise ValueError(f"foreground must be a mask, None or 'auto', got {foreground!r}")
        foreground = None
        if np.ndim(layer_data) == 3 and scan is not None:
            from napari_mtml.preprocess import foreground_mask

            found = foreground_mask(scan)
            foreground = found if found.any() else None
    return prepare_input(layer_data, foreground)


def _slice_of(array, frac: float):
    """The axial slice at relative position `frac` of a 3D array; 2D arrays pass through."""
    if array is None or np.ndim(array) != 3:
        return array
    return array[int(round(frac * (array.shape[0] - 1)))]


def slice_source(source, frac: float):
    """A blending `source` for a 2D slice synthesis: 3D sources give their slice at the same
    relative height `frac` in [0, 1] (a callable's images too), 2D sources are used as they are.

    Parameters
    ----------
    source
        A blending source (see `napari_mtml.anomalies.synthesize`).
    frac : float
        The slice's relative height.

    Returns
    -------
    the source for a 2D synthesis
    """
    if source is None:
        return None
    if callable(source):

        def sliced(rng):
            image, mask = source(rng)
            return _slice_of(image, frac), _slice_of(mask, frac)

        return sliced
    if isinstance(source, tuple):
        return _slice_of(source[0], frac), _slice_of(source[1], frac)
    return _slice_of(source, frac)


def compute_preview(
    inp: PreviewInput,
    task: str | None,
    seed: int,
    params: dict,
    source=None,
    slice_index: int | None = None,
) -> PreviewResult:
    """One call of `synthesize` for the preview; `task=None` draws a task from the seed.

    Parameters
    ----------
    inp : PreviewInput
        The image in the tasks' units (`prepare_input`).
    task : str or None
        A name of `TASKS`, or None for a task drawn from the seed.
    seed : int
        The seed of the call's `numpy.random.Generator`: the same seed gives the same preview.
    params : dict
        `synthesize` keywords (`TaskParams` fields).
    source : optional
        What `synthesize` accepts for the blending tasks (`None`, an array, an `(array, mask)`
        pair or a callable `source(rng)`); ignored by the other tasks.
    slice_index : int, optional
        For a 3D image, synthesise in 2D on that axial slice only (as a model trained on slices
        sees it; right for thick-slice scans, where a 3D shape drawn on the voxel grid is a
        sliver); the result is the volume with that slice changed and a label zero elsewhere.

    Returns
    -------
    PreviewResult
        The image back in its own units, the label, the task used, the number of anomalies and
        the seconds the call took.

    Raises
    ------
    ValueError
        From `synthesize` (bad parameters, no place for an anomaly) or a slice outside the image.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    if task is None:
        task = TASKS[int(rng.integers(len(TASKS)))]
    image, foreground = inp.image, inp.foreground
    if slice_index is not None:
        if image.ndim != 3:
            raise ValueError(f"a slice preview needs a 3D image, got {image.ndim}D")
        z = int(slice_index)
        if not 0 <= z < image.shape[0]:
            raise ValueError(f"slice {z} is outside the image's {image.shape[0]} slices")
        image = image[z]
        foreground = None if foreground is None else foreground[z]
        source = slice_source(source, z / max(inp.image.shape[0] - 1, 1))
    try:
        result = synthesize(
            image,
            foreground=foreground,
            task=task,
            rng=rng,
            source=source if task in BLEND_TASKS else None,
            **params,
        )
    except ValueError as exc:
        if slice_index is None:
            raise
        raise ValueError(f"slice {slice_index}: {exc}") from None
    out, label = result.image, np.asarray(result.label, dtype=np.float32)
    if slice_index is not None:
        out = inp.image.copy()
        out[slice_index] = result.image
        label = np.zeros(inp.image.shape, np.float32)
        label[slice_index] = result.label
    shown = (out * np.float32(inp.scale) + np.float32(inp.offset)).astype(np.float32)
    return PreviewResult(
        image=shown,
        label=label,
        task=str(result.task),
        n_anomalies=int(result.n_anomalies),
        seconds=time.perf_counter() - t0,
        params=dict(params),
        slice_index=slice_index,
    )


class FolderSource:
    """`source(rng)` for the blending tasks: a random image of a folder, in model units.

    Files are listed once (`napari_mtml.io.image_files`: sorted, so a seed gives the same picks
    everywhere) and each file is read with `napari_mtml.io.read_image` at most once. Raises
    `ValueError` for a missing or empty folder, or when no file in it has the image's
    dimensionality.
    """

    def __init__(self, folder: str | Path, ndim: int):
        from napari_mtml.io import image_files

        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise ValueError(
                f"external folder '{folder}' does not exist; choose a folder of "
                "NIfTI, DICOM or PNG images."
            )
        self.files = image_files(folder)
        if not self.files:
            raise ValueError(
                f"external folder '{folder}' holds no images (.nii, .nii.gz, .dcm, "
                ".png, .tif); choose a folder of images for the blending source."
            )
        self.folder = folder
        self.ndim = ndim
        self._cache: dict[Path, tuple[np.ndarray, np.ndarray | None] | None] = {}

    def _load(self, path: Path):
        if path not in self._cache:
            from napari_mtml.io import read_image
            from napari_mtml.preprocess import foreground_mask

            try:
                scan = read_image(path)
            except ValueError:
                self._cache[path] = None
                return None
            if scan.array.ndim != self.ndim:
                self._cache[path] = None
                return None
            fg = foreground_mask(scan) if self.ndim == 3 else None
            self._cache[path] = (prepare_input(scan.array, fg).image, fg)
        return self._cache[path]

    def __call__(self, rng: np.random.Generator):
        order = rng.permutation(len(self.files))
        for i in order:
            loaded = self._load(self.files[int(i)])
            if loaded is not None:
                return loaded
        raise ValueError(
            f"no image in external folder '{self.folder}' is {self.ndim}D and "
            "readable; choose a folder of images like the one being previewed."
        )
