"""Anomaly preview: see what the five synthetic tasks do to an open scan, live.

`AnomalyPreviewWidget(napari_viewer)` is a `QWidget` (docked through the manifest command
`napari-mtml.preview_widget`, display name "Anomaly preview"). Every change of the task, its
parameters, the seed or the source re-runs `napari_mtml.anomalies.synthesize` in a worker thread
and writes the result, in place, into ONE preview image layer and ONE label layer that sit on the
source layer (its whole transform). "Keep" copies the current pair into new layers.

The widget holds no science: `compute_preview` only gathers inputs for `synthesize`. Slider
changes are debounced, and while a preview is being computed further changes are coalesced into
a single follow-up run, so a slow 3D volume never queues up stale work or blocks the GUI.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QLabeledDoubleSlider, QLabeledSlider

from napari_mtml.anomalies import TASKS, synthesize
from napari_mtml.preprocess import to_model_units

from ._common import (
    LayerCombo,
    geometry_metadata,
    image_layer_array,
    layer_spacing,
    notify_error,
    on_grid_of,
    scan_from_layer,
    set_or_add_image,
    start_worker,
)

__all__ = ["AnomalyPreviewWidget", "PreviewInput", "PreviewResult", "compute_preview",
           "prepare_input"]

RANDOM_TASK = "random task"
MODE_VOLUME = "3D volume"
MODE_SLICE = "current axial slice (2D)"
BLEND_TASKS = ("intra_blend", "inter_blend")
PREVIEW_NAME = "mtml preview"
LABEL_NAME = "mtml preview label"
AUTO_FG = "(automatic)"
NO_FG = "(none: whole image)"
SAME_SOURCE = "(the image itself)"
FOLDER_SOURCE = "(external folder)"
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff")

# (keyword of synthesize, label, minimum, maximum, default, decimals; 0 = integer slider).
# Defaults are the paper's (METHOD.md); max_push is 5 for brain volumes and 10 for X-rays and is
# reset to that when the source layer's dimensionality changes.
PARAMS = (
    ("min_size", "min size (x image)", 0.01, 1.0, 0.06, 2),
    ("max_size", "max size (x image)", 0.02, 1.0, 0.8, 2),
    ("max_anomalies", "max anomalies", 1, 8, 4, 0),
    ("repeat_prob", "repeat probability", 0.0, 0.95, 0.5, 2),
    ("min_push", "min push (voxels)", 0.0, 20.0, 0.5, 1),
    ("max_push", "max push (voxels)", 0.1, 40.0, 5.0, 1),
    ("intensity_scale", "intensity scale", 0.01, 2.0, 0.2, 2),
    ("margin_base", "margin base (x size)", 0.0, 0.2, 0.02, 3),
    ("sigma", "label sigma", 0.02, 1.0, 0.2, 2),
)
# Which task uses which parameter (the rest are greyed out for that task).
TASK_PARAMS = {
    "intra_blend": set(),
    "inter_blend": set(),
    "sink": {"min_push", "max_push"},
    "source": {"min_push", "max_push"},
    "smooth_intensity": {"intensity_scale", "margin_base"},
}
COMMON_PARAMS = {"min_size", "max_size", "max_anomalies", "repeat_prob", "sigma"}


# --------------------------------------------------------------------------------------------
# The compute path (runs in a worker thread; also what benchmarks/bench_preview.py times)
# --------------------------------------------------------------------------------------------
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
    """`PreviewInput` for a layer's pixels (any real dtype) and an optional bool foreground."""
    data = np.asarray(layer_data, dtype=np.float32)
    fg = None if foreground is None else np.asarray(foreground).astype(bool)
    image, offset, scale = to_model_units(data, fg)
    return PreviewInput(image=image, foreground=fg, offset=offset, scale=scale)


def _slice_of(array, frac: float):
    """The axial slice at relative position `frac` of a 3D array; 2D arrays pass through."""
    if array is None or np.ndim(array) != 3:
        return array
    return array[int(round(frac * (array.shape[0] - 1)))]


def _slice_source(source, frac: float):
    """A blending `source` for a 2D slice synthesis: 3D sources give their slice at the same
    relative height (a callable's images too), 2D sources are used as they are."""
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

    `source` is what `synthesize` accepts for the blending tasks (`None`, an array, an
    `(array, mask)` pair or a callable `source(rng)`); it is ignored by the other tasks.
    `slice_index`: for a 3D image, synthesise in 2D on that axial slice only (as a model trained
    on slices sees it; right for thick-slice scans, where a 3D shape drawn on the voxel grid is a
    sliver); the result is the volume with that slice changed and a label zero elsewhere.
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
        source = _slice_source(source, z / max(inp.image.shape[0] - 1, 1))
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

    Files are listed once (sorted, so a seed gives the same picks everywhere) and each file is
    read with `napari_mtml.io.read_image` at most once. Raises `ValueError` for a missing or
    empty folder, or when no file in it has the image's dimensionality.
    """

    def __init__(self, folder: str | Path, ndim: int):
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise ValueError(f"external folder '{folder}' does not exist; choose a folder of "
                             "NIfTI, DICOM or PNG images.")
        self.files = sorted(p for p in folder.iterdir()
                            if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
        if not self.files:
            raise ValueError(f"external folder '{folder}' holds no images (.nii, .nii.gz, .dcm, "
                             ".png, .tif); choose a folder of images for the blending source.")
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
        raise ValueError(f"no image in external folder '{self.folder}' is {self.ndim}D and "
                         "readable; choose a folder of images like the one being previewed.")


# --------------------------------------------------------------------------------------------
# Keyboard shortcuts (free in napari: none of its own or its menus' uses them)
# --------------------------------------------------------------------------------------------
SHORTCUTS = {"Shift-N": "new_seed", "Shift-K": "keep"}
# viewer -> [weak reference to the preview widget its shortcuts drive, the keys bound]
_SHORTCUTS_OF_VIEWER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bind_shortcuts(viewer, widget) -> list[str]:
    """Bind `SHORTCUTS` on the viewer once; a widget docked later in the same viewer takes them
    over. A key already bound by someone else (another plugin, the user) is left alone.
    Returns the keys that drive `widget`.
    """
    if viewer in _SHORTCUTS_OF_VIEWER:
        entry = _SHORTCUTS_OF_VIEWER[viewer]
        entry[0] = weakref.ref(widget)
        return list(entry[1])
    entry = [weakref.ref(widget), []]
    _SHORTCUTS_OF_VIEWER[viewer] = entry
    for key, method in SHORTCUTS.items():
        def action(v, _method=method):
            target = _SHORTCUTS_OF_VIEWER[v][0]() if v in _SHORTCUTS_OF_VIEWER else None
            if target is not None:
                getattr(target, _method)()

        action.__doc__ = f"napari-mtml anomaly preview: {method.replace('_', ' ')}"
        try:
            viewer.bind_key(key, action)
        except ValueError:
            continue  # taken: never override someone else's shortcut
        entry[1].append(key)
    return list(entry[1])


# --------------------------------------------------------------------------------------------
# The widget
# --------------------------------------------------------------------------------------------
class AnomalyPreviewWidget(QWidget):
    """Live preview of the synthetic anomaly tasks on an image layer.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer whose image layers are previewed; outputs are added to it.

    Attributes tests and scripts may use: `image_combo`, `foreground_combo`, `task_combo`,
    `source_combo`, `folder_edit`, `seed_spin`, `sliders` (keyword -> slider), `preview_layer`,
    `label_layer`, `last_result`, `n_updates`, `busy`, `shortcuts` (the keys bound in the
    viewer: Shift+N = `new_seed()`, Shift+K = `keep()`); methods `update_now()`, `new_seed()`,
    `keep()`, `stop()`.
    """

    DEBOUNCE_MS = 80

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.preview_layer: Image | None = None
        self.label_layer: Image | None = None
        self.last_result: PreviewResult | None = None
        self.n_updates = 0  # previews shown so far (lets scripts wait for the next one)
        self._worker = None
        self._pending = False
        self._last_error = ""
        self._inputs: dict = {}  # (id(layer), foreground key) -> PreviewInput
        self._folder_source: FolderSource | None = None
        self._last_ndim: int | None = None

        mine = self._is_output
        self.image_combo = LayerCombo(napari_viewer, Image, exclude=mine, auto_pick=True)
        self.foreground_combo = LayerCombo(napari_viewer, Labels, extras=(AUTO_FG, NO_FG))
        self.task_combo = QComboBox()
        self.task_combo.addItems([RANDOM_TASK] + [f"{i} {t}" for i, t in enumerate(TASKS)])
        self.mode_combo = QComboBox()
        self.mode_combo.addItems([MODE_VOLUME, MODE_SLICE])
        self.mode_combo.setToolTip(
            "3D images: synthesise in the whole volume, or in 2D on the axial slice shown (as a "
            "model trained with --dims 2 sees it). Thick-slice scans default to the slice.")
        self.source_combo = LayerCombo(napari_viewer, Image, extras=(SAME_SOURCE, FOLDER_SOURCE),
                                       exclude=mine)
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("folder of images (for the external source)")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.seed_spin.setValue(0)
        seed_button = QPushButton("New seed")
        seed_button.setToolTip("Another seed for the same task and parameters (Shift+N in the "
                               "viewer).")
        seed_button.clicked.connect(self.new_seed)
        self.live_check = QCheckBox("update live")
        self.live_check.setChecked(True)
        update_button = QPushButton("Update")
        update_button.clicked.connect(self.update_now)
        keep_button = QPushButton("Keep")
        keep_button.setToolTip("Copy the current preview and label into new layers "
                               "(Shift+K in the viewer).")
        keep_button.clicked.connect(self.keep)
        self.status = QLabel("Open an image to preview anomalies.")
        self.status.setWordWrap(True)

        self.sliders: dict[str, QLabeledDoubleSlider | QLabeledSlider] = {}
        param_box = QGroupBox("Task parameters")
        param_form = QFormLayout(param_box)
        for key, label, lo, hi, default, decimals in PARAMS:
            if decimals == 0:
                slider = QLabeledSlider(Qt.Orientation.Horizontal)
            else:
                slider = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
                slider.setDecimals(decimals)
            slider.setRange(lo, hi)
            slider.setValue(default)
            slider.valueChanged.connect(self._changed)
            self.sliders[key] = slider
            param_form.addRow(label, slider)
        self.shape_combo = QComboBox()
        self.shape_combo.addItems(["random", "ellipse", "rectangle"])
        param_form.addRow("shape", self.shape_combo)

        form = QFormLayout()
        form.addRow("image", self.image_combo)
        form.addRow("foreground", self.foreground_combo)
        form.addRow("task", self.task_combo)
        form.addRow("synthesise in", self.mode_combo)
        form.addRow("blend source", self.source_combo)
        folder_row = QHBoxLayout()
        folder_row.addWidget(self.folder_edit)
        folder_row.addWidget(browse)
        form.addRow("", _wrap(folder_row))
        seed_row = QHBoxLayout()
        seed_row.addWidget(self.seed_spin)
        seed_row.addWidget(seed_button)
        form.addRow("seed", _wrap(seed_row))
        buttons = QHBoxLayout()
        buttons.addWidget(self.live_check)
        buttons.addWidget(update_button)
        buttons.addWidget(keep_button)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(param_box)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(self.DEBOUNCE_MS)
        self._timer.timeout.connect(self.update_now)

        self.image_combo.currentIndexChanged.connect(self._image_changed)
        self.foreground_combo.currentIndexChanged.connect(self._changed)
        self.task_combo.currentIndexChanged.connect(self._task_changed)
        self.source_combo.currentIndexChanged.connect(self._changed)
        self.folder_edit.editingFinished.connect(self._folder_changed)
        self.seed_spin.valueChanged.connect(self._changed)
        self.shape_combo.currentIndexChanged.connect(self._changed)
        self.mode_combo.currentIndexChanged.connect(self._changed)
        napari_viewer.dims.events.current_step.connect(self._slice_moved)
        napari_viewer.layers.events.removed.connect(self._layer_removed)
        self.shortcuts = _bind_shortcuts(napari_viewer, self)
        self._task_changed()
        self._image_changed()

    # ----------------------------------------------------------------------------- state
    @property
    def busy(self) -> bool:
        """True while a preview is being computed or a change waits to be computed."""
        return self._worker is not None or self._pending or self._timer.isActive()

    def _is_output(self, layer) -> bool:
        return layer is self.preview_layer or layer is self.label_layer or \
            layer.name in (PREVIEW_NAME, LABEL_NAME)

    def task(self) -> str | None:
        """The chosen task name, or `None` for "random task"."""
        i = self.task_combo.currentIndex()
        return None if i == 0 else TASKS[i - 1]

    def params(self) -> dict:
        """The keyword arguments for `synthesize` (keyword names of docs/api.md)."""
        out = {key: s.value() for key, s in self.sliders.items()}
        out["max_anomalies"] = int(out["max_anomalies"])
        out["shape"] = self.shape_combo.currentText()
        return out

    # ----------------------------------------------------------------------------- events
    def _changed(self, *args) -> None:
        if self.live_check.isChecked():
            self._timer.start()

    def _task_changed(self, *args) -> None:
        task = self.task()
        used = COMMON_PARAMS | (set().union(*TASK_PARAMS.values()) if task is None
                                else TASK_PARAMS[task])
        for key, slider in self.sliders.items():
            slider.setEnabled(key in used)
        blend = task is None or task in BLEND_TASKS
        self.source_combo.setEnabled(blend)
        self.folder_edit.setEnabled(blend)
        self._changed()

    def _image_changed(self, *args) -> None:
        layer = self.image_combo.current_layer()
        ndim = None if layer is None else layer.ndim
        if ndim is not None and ndim != self._last_ndim:
            # The paper's push limit: 5 voxels for brain volumes, 10 for 2D X-rays.
            self.sliders["max_push"].setValue(5.0 if ndim == 3 else 10.0)
            self._last_ndim = ndim
        self.mode_combo.setEnabled(ndim == 3)
        if ndim == 3:
            # thick slices (e.g. 6.5 mm over 0.8 mm pixels): a 3D shape on the voxel grid would
            # be a sliver through one or two slices, so preview slice by slice
            spacing = np.asarray(layer_spacing(layer), dtype=float)
            thick = spacing.min() > 0 and spacing.max() / spacing.min() > 2
            self.mode_combo.blockSignals(True)
            self.mode_combo.setCurrentText(MODE_SLICE if thick else MODE_VOLUME)
            self.mode_combo.blockSignals(False)
        self._changed()

    def _slice_moved(self, *args) -> None:
        if self.slice_mode:
            self._changed()

    @property
    def slice_mode(self) -> bool:
        """True when a 3D image is previewed on its current axial slice only."""
        layer = self.image_combo.current_layer()
        return (layer is not None and layer.ndim == 3
                and self.mode_combo.currentText() == MODE_SLICE)

    def current_slice(self, layer) -> int:
        """Index (axis 0 of the layer's data) of the axial slice the viewer shows."""
        z = float(layer.world_to_data(self.viewer.dims.point)[0])
        return int(np.clip(round(z), 0, layer.data.shape[0] - 1))

    def _folder_changed(self) -> None:
        self._folder_source = None
        if self.folder_edit.text().strip():
            i = self.source_combo.findText(FOLDER_SOURCE)
            self.source_combo.setCurrentIndex(i)
        self._changed()

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "External images for blending")
        if folder:
            self.folder_edit.setText(folder)
            self._folder_changed()

    def _layer_removed(self, event=None) -> None:
        layer = getattr(event, "value", None)
        self._inputs = {k: v for k, v in self._inputs.items() if k[0] != id(layer)}
        if layer is self.preview_layer:
            self.preview_layer = None
        if layer is self.label_layer:
            self.label_layer = None

    def new_seed(self) -> None:
        """Move to another seed, deterministically derived from the current one."""
        nxt = int(np.random.default_rng(self.seed_spin.value()).integers(0, 2**31 - 1))
        self.seed_spin.setValue(nxt)

    # ----------------------------------------------------------------------------- compute
    def _source_for(self, layer):
        """What `synthesize` gets as `source`, built on the main thread (it reads layers)."""
        extra = self.source_combo.current_extra()
        if extra == SAME_SOURCE:
            return None
        if extra == FOLDER_SOURCE:
            folder = self.folder_edit.text().strip()
            if not folder:
                raise ValueError("blend source is an external folder but none is chosen: type "
                                 "or browse a folder, or pick another source.")
            if self._folder_source is None or self._folder_source.folder != Path(folder) or \
                    self._folder_source.ndim != layer.ndim:
                self._folder_source = FolderSource(folder, layer.ndim)
            return self._folder_source
        other = self.source_combo.current_layer()
        data = image_layer_array(other, "the blend source")
        if data.ndim != layer.ndim:
            raise ValueError(f"blend source '{other.name}' is {data.ndim}D but the image is "
                             f"{layer.ndim}D; pick a source with the same dimensionality.")
        return ("layer", other)

    def _foreground_for(self, layer):
        extra = self.foreground_combo.current_extra()
        if extra == NO_FG:
            return ("none", None)
        if extra == AUTO_FG:
            return ("auto", None)
        fg_layer = self.foreground_combo.current_layer()
        if tuple(fg_layer.data.shape) != tuple(layer.data.shape):
            raise ValueError(f"foreground '{fg_layer.name}' has shape {fg_layer.data.shape} but "
                             f"the image has {layer.data.shape}; pick a mask of the same grid.")
        return ("layer", fg_layer)

    def _input_for(self, layer, fg_spec) -> PreviewInput:
        """Cached `PreviewInput` (runs in the worker thread: casting and z-scoring a volume)."""
        kind, fg_layer = fg_spec
        key = (id(layer), id(layer.data), kind, id(fg_layer.data) if fg_layer else None)
        if key not in self._inputs:
            if kind == "auto" and layer.ndim == 3:
                from napari_mtml.preprocess import foreground_mask

                fg = foreground_mask(scan_from_layer(layer, "the anomaly preview"))
                if not fg.any():
                    fg = None
            elif kind == "auto":
                fg = None  # 2D X-rays: anomalies anywhere in the frame, as in the paper
            elif kind == "layer":
                fg = np.asarray(fg_layer.data) > 0
            else:
                fg = None
            self._inputs[key] = prepare_input(image_layer_array(layer, "the anomaly preview"), fg)
        return self._inputs[key]

    def update_now(self) -> None:
        """Compute a preview now (in a worker); coalesces with one already running."""
        self._timer.stop()
        if self._worker is not None:
            self._pending = True
            return
        self._pending = False
        layer = self.image_combo.current_layer()
        try:
            if layer is None:
                image_layer_array(None, "the anomaly preview")
            source = self._source_for(layer)
            fg_spec = self._foreground_for(layer)
        except ValueError as exc:
            self._fail(exc)
            return
        task, seed, params = self.task(), self.seed_spin.value(), self.params()
        slice_index = self.current_slice(layer) if self.slice_mode else None
        self.status.setText(f"computing on '{layer.name}'…")
        self._worker = start_worker(
            self._job, layer, fg_spec, task, seed, params, source, slice_index,
            on_return=self._show, on_error=self._fail, on_finish=self._done,
        )

    def _job(self, layer, fg_spec, task, seed, params, source, slice_index=None
             ) -> PreviewResult:
        inp = self._input_for(layer, fg_spec)
        if isinstance(source, tuple) and source[0] == "layer":
            other = source[1]
            src = prepare_input(image_layer_array(other, "the blend source"), None)
            source = (src.image, None)
        result = compute_preview(inp, task, seed, params, source, slice_index)
        result.layer_id = id(layer)
        return result

    def _show(self, result: PreviewResult) -> None:
        layer = self.image_combo.current_layer()
        if layer is None or id(layer) != result.layer_id:
            return  # the user switched images meanwhile: this result is stale
        self._last_error = ""
        self.last_result = result
        self.n_updates += 1
        lo, hi = (float(v) for v in layer.contrast_limits)
        self.preview_layer = set_or_add_image(
            self.viewer, self.preview_layer, result.image, PREVIEW_NAME, layer,
            colormap="gray", contrast_limits=(lo, hi),
        )
        self.label_layer = set_or_add_image(
            self.viewer, self.label_layer, result.label, LABEL_NAME, layer,
            colormap="inferno", blending="additive", contrast_limits=(0.0, 1.0), opacity=0.5,
        )
        self.status.setText(
            f"{result.task}: {result.n_anomalies} anomal{'y' if result.n_anomalies == 1 else 'ies'}"
            + ("" if result.slice_index is None else f" on slice {result.slice_index}")
            + f", {1000 * result.seconds:.0f} ms (seed {self.seed_spin.value()})"
        )

    def _fail(self, exc) -> None:
        msg = str(exc)
        self.status.setText(f"no preview: {msg}")
        if msg != self._last_error:  # a slider drag must not flood the notification area
            notify_error("Anomaly preview", exc)
        self._last_error = msg

    def _done(self) -> None:
        self._worker = None
        if self._pending:
            self.update_now()

    def keep(self) -> tuple[Image, Image] | None:
        """Copy the current preview and its label into two new layers; returns them."""
        result, layer = self.last_result, self.image_combo.current_layer()
        if result is None or layer is None or self.preview_layer is None:
            notify_error("Anomaly preview", "nothing to keep yet: wait for a preview first.")
            return None
        tag = f"{layer.name} {result.task} seed {self.seed_spin.value()}"
        grid = {**on_grid_of(layer), "metadata": geometry_metadata(layer)}
        img = self.viewer.add_image(result.image.copy(), name=tag, colormap="gray",
                                    contrast_limits=tuple(layer.contrast_limits), **grid)
        lab = self.viewer.add_image(result.label.copy(), name=f"{tag} label", colormap="inferno",
                                    blending="additive", contrast_limits=(0.0, 1.0), **grid)
        return img, lab

    def stop(self, timeout_ms: int = 10000) -> None:
        """Drop pending changes and wait for a running preview (for closing and tests)."""
        self._timer.stop()
        self._pending = False
        deadline = time.monotonic() + timeout_ms / 1000
        while self._worker is not None and time.monotonic() < deadline:
            QApplication.processEvents()
            time.sleep(0.005)


def _wrap(layout) -> QWidget:
    w = QWidget()
    layout.setContentsMargins(0, 0, 0, 0)
    w.setLayout(layout)
    return w
