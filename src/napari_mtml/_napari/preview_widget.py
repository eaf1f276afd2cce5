"""Anomaly preview: see what the five synthetic tasks do to an open scan, live.

`AnomalyPreviewWidget(napari_viewer)` is a `QWidget` (docked through the manifest command
`napari-mtml.preview_widget`, display name "Anomaly preview"). Every change of the task, its
parameters, the seed or the source re-runs `napari_mtml.anomalies.synthesize` in a worker thread
and writes the result, in place, into ONE preview image layer and ONE label layer that sit on the
source layer (its whole transform). "Keep" copies the current pair into new layers.

The widget holds no science: the compute path is `napari_mtml.preview` (`prepare_input`,
`compute_preview`, `FolderSource`), the sliders' labels, ranges and defaults are
`napari_mtml.preview.PARAMS` (from `TaskParams`). Slider changes are debounced, and while a
preview is being computed further changes are coalesced into a single follow-up run, so a slow
3D volume never queues up stale work or blocks the GUI.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QSpinBox,
    QWidget,
)
from superqt import QLabeledDoubleSlider, QLabeledSlider

from napari_mtml.anomalies import BLEND_TASKS, TASKS
from napari_mtml.preview import (
    PARAMS,
    FolderSource,
    PreviewInput,
    PreviewResult,
    compute_preview,
    default_max_push,
    next_seed,
    params_used,
    prefers_slices,
    prepare_input,
    preview_input,
)

from ._common import (
    ClosesWithItsDock,
    LayerCombo,
    geometry_metadata,
    image_layer_array,
    layer_spacing,
    notify_error,
    on_grid_of,
    push_button,
    scan_from_layer,
    scrolling_layout,
    set_or_add_image,
    start_worker,
    wait_until,
)

__all__ = [
    "AnomalyPreviewWidget",
    "PreviewInput",
    "PreviewResult",
    "compute_preview",
    "prepare_input",
]

RANDOM_TASK = "random task"
MODE_VOLUME = "3D volume"
MODE_SLICE = "current axial slice (2D)"
PREVIEW_NAME = "mtml preview"
LABEL_NAME = "mtml preview label"
AUTO_FG = "(automatic)"
NO_FG = "(none: whole image)"
SAME_SOURCE = "(the image itself)"
FOLDER_SOURCE = "(external folder)"


# --------------------------------------------------------------------------------------------
# Keyboard shortcuts (free in napari: none of its own or its menus' uses them)
# --------------------------------------------------------------------------------------------
SHORTCUTS = {"Shift-N": "new_seed", "Shift-K": "keep"}
#: the tooltips of the buttons of those actions
TIPS = {
    "new_seed": "Another seed for the same task and parameters (Shift+N in the viewer).",
    "keep": "Copy the current preview and label into new layers (Shift+K in the viewer).",
}
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
class AnomalyPreviewWidget(ClosesWithItsDock, QWidget):
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
        self.closed = False  # set by closeEvent (napari's dock "x" included)
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
            "model trained with --dims 2 sees it). Thick-slice scans default to the slice."
        )
        self.source_combo = LayerCombo(
            napari_viewer, Image, extras=(SAME_SOURCE, FOLDER_SOURCE), exclude=mine
        )
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("folder of images (for the external source)")
        browse = push_button("Browse…", self._browse)
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.seed_spin.setValue(0)
        seed_button = push_button("New seed", self.new_seed, TIPS["new_seed"])
        self.live_check = QCheckBox("update live")
        self.live_check.setChecked(True)
        update_button = push_button("Update", self.update_now)
        keep_button = push_button("Keep", self.keep, TIPS["keep"])
        self.status = QLabel("Open an image to preview anomalies.")
        self.status.setWordWrap(True)

        self.sliders: dict[str, QLabeledDoubleSlider | QLabeledSlider] = {}
        param_box = QGroupBox("Task parameters")
        param_form = QFormLayout(param_box)
        for spec in PARAMS:
            if spec.decimals == 0:
                slider = QLabeledSlider(Qt.Orientation.Horizontal)
            else:
                slider = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
                slider.setDecimals(spec.decimals)
            slider.setRange(spec.low, spec.high)
            slider.setValue(spec.default)
            slider.valueChanged.connect(self._changed)
            self.sliders[spec.name] = slider
            param_form.addRow(spec.label, slider)
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

        layout = scrolling_layout(self)
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
        return (
            layer is self.preview_layer
            or layer is self.label_layer
            or layer.name in (PREVIEW_NAME, LABEL_NAME)
        )

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
        if self.live_check.isChecked() and not self.closed:
            self._timer.start()

    def _task_changed(self, *args) -> None:
        task = self.task()
        used = params_used(task)
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
            self.sliders["max_push"].setValue(default_max_push(ndim))
            self._last_ndim = ndim
        self.mode_combo.setEnabled(ndim == 3)
        if ndim == 3:
            slices = prefers_slices(layer_spacing(layer))
            self.mode_combo.blockSignals(True)
            self.mode_combo.setCurrentText(MODE_SLICE if slices else MODE_VOLUME)
            self.mode_combo.blockSignals(False)
        self._changed()

    def _slice_moved(self, *args) -> None:
        if self.slice_mode:
            self._changed()

    @property
    def slice_mode(self) -> bool:
        """True when a 3D image is previewed on its current axial slice only."""
        layer = self.image_combo.current_layer()
        return layer is not None and layer.ndim == 3 and self.mode_combo.currentText() == MODE_SLICE

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
        self.seed_spin.setValue(next_seed(self.seed_spin.value()))

    # ----------------------------------------------------------------------------- compute
    def _source_for(self, layer):
        """What `synthesize` gets as `source`, built on the main thread (it reads layers)."""
        extra = self.source_combo.current_extra()
        if extra == SAME_SOURCE:
            return None
        if extra == FOLDER_SOURCE:
            folder = self.folder_edit.text().strip()
            if not folder:
                raise ValueError(
                    "blend source is an external folder but none is chosen: type "
                    "or browse a folder, or pick another source."
                )
            if (
                self._folder_source is None
                or self._folder_source.folder != Path(folder)
                or self._folder_source.ndim != layer.ndim
            ):
                self._folder_source = FolderSource(folder, layer.ndim)
            return self._folder_source
        other = self.source_combo.current_layer()
        data = image_layer_array(other, "the blend source")
        if data.ndim != layer.ndim:
            raise ValueError(
                f"blend source '{other.name}' is {data.ndim}D but the image is "
                f"{layer.ndim}D; pick a source with the same dimensionality."
            )
        return ("layer", other)

    def _foreground_for(self, layer):
        extra = self.foreground_combo.current_extra()
        if extra == NO_FG:
            return ("none", None)
        if extra == AUTO_FG:
            return ("auto", None)
        fg_layer = self.foreground_combo.current_layer()
        if tuple(fg_layer.data.shape) != tuple(layer.data.shape):
            raise ValueError(
                f"foreground '{fg_layer.name}' has shape {fg_layer.data.shape} but "
                f"the image has {layer.data.shape}; pick a mask of the same grid."
            )
        return ("layer", fg_layer)

    def _input_for(self, layer, fg_spec) -> PreviewInput:
        """Cached `PreviewInput` (runs in the worker thread: casting and z-scoring a volume)."""
        kind, fg_layer = fg_spec
        key = (id(layer), id(layer.data), kind, id(fg_layer.data) if fg_layer else None)
        if key not in self._inputs:
            data = image_layer_array(layer, "the anomaly preview")
            if kind == "auto":
                scan = scan_from_layer(layer, "the anomaly preview") if layer.ndim == 3 else None
                self._inputs[key] = preview_input(data, "auto", scan)
            else:
                fg = np.asarray(fg_layer.data) > 0 if kind == "layer" else None
                self._inputs[key] = preview_input(data, fg)
        return self._inputs[key]

    def update_now(self) -> None:
        """Compute a preview now (in a worker); coalesces with one already running. A closed
        widget computes nothing."""
        self._timer.stop()
        if self.closed:
            return
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
        args = (layer, fg_spec, task, seed, params, source, slice_index)
        self._worker = start_worker(
            self._job, *args, on_return=self._show, on_error=self._fail, on_finish=self._done
        )

    def _job(self, layer, fg_spec, task, seed, params, source, slice_index=None) -> PreviewResult:
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
            self.viewer,
            self.preview_layer,
            result.image,
            PREVIEW_NAME,
            layer,
            colormap="gray",
            contrast_limits=(lo, hi),
        )
        self.label_layer = set_or_add_image(
            self.viewer,
            self.label_layer,
            result.label,
            LABEL_NAME,
            layer,
            colormap="inferno",
            blending="additive",
            contrast_limits=(0.0, 1.0),
            opacity=0.5,
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
        img = self.viewer.add_image(
            result.image.copy(),
            name=tag,
            colormap="gray",
            contrast_limits=tuple(layer.contrast_limits),
            **grid,
        )
        lab = self.viewer.add_image(
            result.label.copy(),
            name=f"{tag} label",
            colormap="inferno",
            blending="additive",
            contrast_limits=(0.0, 1.0),
            **grid,
        )
        return img, lab

    def closeEvent(self, event) -> None:
        # A closed preview computes no more: before, the widget napari took out of its dock
        # kept previewing on every layer change (adding preview layers to the viewer), and a
        # preview still running when napari quit aborted it.
        self.closed = True
        self.stop()
        super().closeEvent(event)

    def stop(self, timeout_ms: int = 10000) -> None:
        """Drop pending changes and wait for a running preview (for closing and tests)."""
        self._timer.stop()
        self._pending = False
        wait_until(lambda: self._worker is None, timeout_ms / 1000)


def _wrap(layout) -> QWidget:
    w = QWidget()
    layout.setContentsMargins(0, 0, 0, 0)
    w.setLayout(layout)
    return w
