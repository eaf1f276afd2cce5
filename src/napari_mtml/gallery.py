"""`mtml preview`: a gallery of every synthetic anomaly task applied to one image.

The figure has one row for the image itself (with its foreground outline), then one row per task:
the anomalous image, its label and the anomaly mask's outline over the anomalous image.

How the image is prepared, so that the task parameters are in the units METHOD.md assumes:
- 3D (MRI): z-scored over its nonzero voxels (background stays 0); the foreground is
  `binary_fill_holes(image != 0)`. The synthesis runs in 3D on the whole volume at its own
  resolution; the figure shows, for each task, the axial slice (array axis 0, RAS-canonical `z`)
  that holds the most label mass, i.e. the slice through the most visible anomaly.
- 2D (X-ray, PNG/TIFF): brought to the X-ray frame's scale (longest side 256, linear resampling),
  rescaled to [-1, 1], no foreground mask (anomalies anywhere), `max_push=10` as for CXR.
The blending tasks use the image itself as their source (a single image has no collection or
external folder to draw from).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_mtml.anomalies import TASKS, synthesize, task_name

#: the X-ray frame's side (METHOD.md §7): 2D images are shown at this scale
XRAY_SIDE = 256


def prepare_image(array: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Bring a scan's array into the units the tasks assume.

    Parameters
    ----------
    array : 2D (H, W) or 3D (D, H, W) real array (a (1, H, W) volume counts as 2D).

    Returns
    -------
    (image float32, foreground bool or None, task parameters dict) as described in the module
    docstring.
    """
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3:
        nonzero = array != 0
        if not nonzero.any():
            raise ValueError("the volume is all zero: nothing to z-score or place anomalies on")
        values = array[nonzero]
        std = float(values.std()) or 1.0
        image = np.where(nonzero, (array - float(values.mean())) / std, 0).astype(np.float32)
        foreground = ndimage.binary_fill_holes(nonzero)
        return image, foreground, {}
    if array.ndim != 2:
        raise ValueError(f"expected a 2D or 3D image, got shape {array.shape}")
    factor = XRAY_SIDE / max(array.shape)
    if factor < 1:
        array = ndimage.zoom(array, factor, order=1, grid_mode=True, mode="nearest")
    low, high = float(array.min()), float(array.max())
    if high <= low:
        raise ValueError("the image is constant: there is nothing to show anomalies against")
    image = (2 * (array - low) / (high - low) - 1).astype(np.float32)
    return image, None, {"max_push": 10.0}


def _tasks(task) -> list[str]:
    if isinstance(task, str) and task.lower() == "all":
        return list(TASKS)
    if isinstance(task, str) and task.isdigit():
        task = int(task)
    return [task_name(task)]


def _view(volume: np.ndarray, index: int | None):
    """A 2D view: the axial slice `index` of a volume, or the image itself."""
    return volume if index is None else volume[index]


def write_gallery(
    image_path: str | os.PathLike,
    out: str | os.PathLike = "gallery.png",
    task: str | int = "all",
    seed: int = 0,
) -> Path:
    """Write a PNG gallery of the synthetic anomaly tasks applied to an image.

    Parameters
    ----------
    image_path : a NIfTI, DICOM or 2D image file (anything `napari_mtml.io.read_image` reads).
    out : the PNG file to write (its folder is created if needed); an existing folder means
        `out/NAME_preview.png` (see `gallery_path`).
    task : "all", a task name from `TASKS` or its id (int or digit string).
    seed : each task's row uses `numpy.random.default_rng([seed, task_id])`, so a row does not
        depend on which other tasks are shown.

    Returns
    -------
    The path actually written.

    Raises
    ------
    ValueError for unreadable images (naming the file) and unknown tasks.
    """
    # a bare Figure on the Agg canvas: no pyplot, so no global backend switch inside a GUI session
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from napari_mtml.io import read_image

    names = _tasks(task)
    out = gallery_path(image_path, out)  # refused before any work when it cannot be written
    scan = read_image(image_path)
    try:
        image, foreground, params = prepare_image(scan.array)
        results = []
        for name in names:
            rng = np.random.default_rng([int(seed), TASKS.index(name)])
            results.append(synthesize(image, foreground, task=name, rng=rng, **params))
    except ValueError as exc:  # the image's content, not the call: name the file
        raise ValueError(f"{image_path}: {exc}") from None

    volumetric = image.ndim == 3
    shown_fg = foreground if foreground is not None else np.ones(image.shape, dtype=bool)
    low, high = np.percentile(image[shown_fg], [0.5, 99.5])
    origin = "lower" if volumetric else "upper"  # RAS (z, y, x): anterior up
    grey = dict(cmap="gray", vmin=low, vmax=high, origin=origin, interpolation="nearest")

    rows = 1 + len(results)
    height, width = image.shape[-2:]
    panel = 3.0
    fig = Figure(figsize=(3 * panel, rows * panel * max(height / width, 0.5)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 3, squeeze=False)
    mid = image.shape[0] // 2 if volumetric else None
    axes[0, 0].imshow(_view(image, mid), **grey)
    axes[0, 0].set_title("image" + (f" (axial slice {mid})" if volumetric else ""), fontsize=9)
    axes[0, 1].imshow(_view(image, mid), **grey)
    if foreground is not None:
        axes[0, 1].contour(_view(foreground, mid), levels=[0.5], colors="cyan", linewidths=0.8)
        axes[0, 1].set_title("foreground", fontsize=9)
    else:
        axes[0, 1].set_title("foreground: whole image", fontsize=9)
    axes[0, 2].axis("off")
    axes[0, 2].text(
        0.0,
        0.5,
        f"{Path(image_path).name}\nshape {image.shape}\nseed {seed}\n"
        + ("z-scored on the nonzero voxels" if volumetric else "rescaled to [-1, 1]"),
        fontsize=9,
        va="center",
    )
    for row, res in enumerate(results, start=1):
        index = int(np.argmax(res.label.sum(axis=(1, 2)))) if volumetric else None
        where = f" (slice {index})" if volumetric else ""
        axes[row, 0].imshow(_view(res.image, index), **grey)
        axes[row, 0].set_title(
            f"{res.task}: {res.n_anomalies} anomal{'y' if res.n_anomalies == 1 else 'ies'}{where}",
            fontsize=9,
        )
        axes[row, 1].imshow(
            _view(res.label, index),
            cmap="magma",
            vmin=0,
            vmax=1,
            origin=origin,
            interpolation="nearest",
        )
        axes[row, 1].set_title("label", fontsize=9)
        axes[row, 2].imshow(_view(res.image, index), **grey)
        mask = _view(res.mask, index)
        if mask.any():
            axes[row, 2].contour(mask, levels=[0.5], colors="red", linewidths=0.8)
        axes[row, 2].set_title("mask outline", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def gallery_path(image_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The file `write_gallery` writes for `out`: an existing folder gets NAME_preview.png
    inside it, a name without a suffix gets ".png" (what the PNG writer would add anyway).
    Refused (`ValueError`) when a pipe or a file in place of a folder is in the way."""
    from napari_mtml.batch import image_name
    from napari_mtml.files import check_output_file

    out = Path(out)
    if out.is_dir():
        out = out / f"{image_name(image_path)}_preview.png"
    elif not out.suffix:
        out = out.with_suffix(".png")
    return check_output_file(out, "gallery PNG")
