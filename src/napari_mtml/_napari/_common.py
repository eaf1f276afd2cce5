"""Helpers shared by the three widgets: layers <-> `Scan`, in-place output layers, workers.

Nothing here is science. It turns napari layers into the core's inputs (a `Scan`, a float32
array and its voxel size in mm) and the core's outputs back into layers that sit exactly on the
source layer (same `scale` and `translate`), and it runs the core's long calls off the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QComboBox
from superqt.utils import FunctionWorker, GeneratorWorker

__all__ = [
    "RUN_BUS",
    "available_devices",
    "ClosingGeneratorWorker",
    "image_layer_array",
    "notify_error",
    "on_grid_of",
    "scan_from_layer",
    "set_or_add_image",
    "set_or_add_labels",
    "start_worker",
]


# --------------------------------------------------------------------------------------------
# Runs handed from the training widget to the heatmap widget
# --------------------------------------------------------------------------------------------
class _RunBus(QObject):
    """Process-wide signal: a training run finished and its folder can be predicted with.

    The training widget emits `run_finished(run_dir)`; every heatmap widget (docked now or later,
    see `last_run`) takes it as its run folder.
    """

    run_finished = Signal(str)

    def __init__(self):
        super().__init__()
        self.last_run: str | None = None
        self.run_finished.connect(self._remember)

    def _remember(self, run_dir: str) -> None:
        self.last_run = run_dir


RUN_BUS = _RunBus()


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------
def available_devices() -> tuple[list[str], str]:
    """Device choices for this machine and a note for the user.

    Returns `(["auto", "cpu", "cuda", "cuda:1", "mps", ...], note)`; the note says what "auto"
    will pick and warns when that is the CPU (training the paper's model there is slow).
    """
    import torch

    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        devices += ["cuda"] + [f"cuda:{i}" for i in range(1, n)]
        note = f"auto = cuda ({torch.cuda.get_device_name(0)})"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
        note = "auto = mps (Apple GPU)"
    else:
        note = ("No GPU found (CUDA or MPS): training falls back to the CPU. Prefer the light "
                "model and a few hundred steps.")
    return devices, note


# --------------------------------------------------------------------------------------------
# Notifications
# --------------------------------------------------------------------------------------------
def notify_error(what: str, exc: BaseException | str) -> None:
    """Show the core's message as a napari error notification (no traceback for bad input).

    `ValueError`s are the core's "bad input" errors: their message already says what to do, so it
    is shown as is; an `OSError` is said as `mtml` says it (`napari_mtml.files.os_error_message`).
    Anything else is unexpected; its type is kept in the message for bug reports.
    """
    if isinstance(exc, str):
        msg = exc
    elif isinstance(exc, ValueError):
        msg = str(exc)
    elif isinstance(exc, OSError):  # the same one line `mtml` prints: the path and the problem
        from napari_mtml.files import os_error_message

        msg = os_error_message(exc)
    else:
        msg = f"{type(exc).__name__}: {exc}"
    show_error(f"{what}: {msg}" if what else msg)


notify_info = show_info
notify_warning = show_warning


# --------------------------------------------------------------------------------------------
# Layers -> core inputs
# --------------------------------------------------------------------------------------------
def image_layer_array(layer, what: str = "this widget") -> np.ndarray:
    """The layer's pixels as a float32 array `(H, W)` or `(D, H, W)`, checked for this plugin.

    Raises `ValueError` (for a notification) for no layer, multiscale, RGB or 4D+ data.
    """
    if layer is None:
        raise ValueError(f"{what} needs an image layer: open a scan (File > Open, or a sample "
                         "under File > Open Sample > Many Tasks Make Light Work) and pick it.")
    if getattr(layer, "multiscale", False):
        raise ValueError(f"layer '{layer.name}' is multiscale; open a single-resolution image.")
    if getattr(layer, "rgb", False):
        raise ValueError(f"layer '{layer.name}' is RGB; convert it to greyscale first.")
    data = np.asarray(layer.data, dtype=np.float32)
    if data.ndim not in (2, 3):
        raise ValueError(
            f"layer '{layer.name}' has {data.ndim} dimensions {data.shape}; this plugin works on "
            "2D images (H, W) and 3D volumes (D, H, W). Split time series or channels first."
        )
    if not np.isfinite(data).all():
        raise ValueError(f"layer '{layer.name}' holds NaN or infinite values; clean it first.")
    return data


def _layer_affine(layer, ndim: int) -> np.ndarray:
    """A 4x4 voxel-to-world affine for a layer that was not read by our reader (diagonal)."""
    aff = np.eye(4)
    scale = np.asarray(layer.scale[-ndim:], dtype=float)
    translate = np.asarray(layer.translate[-ndim:], dtype=float)
    # napari axes are (z, y, x) / (y, x); a NIfTI affine maps (i, j, k) = (x, y, z).
    for i, (s, t) in enumerate(zip(scale[::-1], translate[::-1], strict=True)):
        aff[i, i] = s
        aff[i, 3] = t
    return aff


def scan_from_layer(layer, what: str = "this widget"):
    """A `napari_mtml.io.Scan` for an image layer, keeping the file's geometry when known.

    Our reader stores the original `Scan` (or its `affine`) in `layer.metadata`; then maps written
    with `write_image(..., like=scan)` land on the file's own geometry. For any other layer the
    geometry comes from the layer's `scale` (mm per voxel) and `translate`.
    """
    from napari_mtml.io import Scan

    data = image_layer_array(layer, what)
    meta = dict(layer.metadata or {})
    original = meta.get("scan")
    spacing = tuple(float(s) for s in layer.scale[-data.ndim:])
    if isinstance(original, Scan) and tuple(np.shape(original.array)) == data.shape:
        return Scan(array=data, spacing=tuple(original.spacing), affine=original.affine,
                    metadata=dict(original.metadata))
    affine = meta.get("affine")
    affine = np.asarray(affine, dtype=float) if affine is not None else _layer_affine(layer,
                                                                                     data.ndim)
    inner = {k: v for k, v in meta.items() if k not in ("scan", "affine")}
    inner.setdefault("warnings", [])
    return Scan(array=data, spacing=spacing, affine=affine, metadata=inner)


def on_grid_of(layer) -> dict[str, Any]:
    """Layer keyword arguments that put an output exactly on `layer` (scale, translate)."""
    return {"scale": tuple(layer.scale), "translate": tuple(layer.translate)}


# --------------------------------------------------------------------------------------------
# Core outputs -> layers, in place
# --------------------------------------------------------------------------------------------
def _alive(viewer, layer) -> bool:
    return layer is not None and layer in viewer.layers


def set_or_add_image(viewer, layer, data: np.ndarray, name: str, grid_of, **kwargs):
    """Replace `layer`'s data in place (or add a new Image layer if it was deleted).

    `kwargs` (colormap, blending, opacity, contrast_limits, visible) are applied only when the
    layer is created, so that a user's later changes to its display survive updates; contrast
    limits given as `contrast_limits` are re-applied each time (the data range may change).
    Returns the layer.
    """
    grid = on_grid_of(grid_of)
    if _alive(viewer, layer) and layer.data.ndim == data.ndim:
        layer.data = data
        layer.scale = grid["scale"]
        layer.translate = grid["translate"]
        if "contrast_limits" in kwargs:
            layer.contrast_limits = kwargs["contrast_limits"]
        return layer
    if _alive(viewer, layer):
        viewer.layers.remove(layer)
    return viewer.add_image(data, name=name, **grid, **kwargs)


def set_or_add_labels(viewer, layer, data: np.ndarray, name: str, grid_of, **kwargs):
    """Same as `set_or_add_image`, for a Labels layer (integer data)."""
    grid = on_grid_of(grid_of)
    if _alive(viewer, layer) and layer.data.ndim == data.ndim:
        layer.data = data
        layer.scale = grid["scale"]
        layer.translate = grid["translate"]
        return layer
    if _alive(viewer, layer):
        viewer.layers.remove(layer)
    return viewer.add_labels(data, name=name, **grid, **kwargs)


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------
class ClosingGeneratorWorker(GeneratorWorker):
    """A generator worker that closes its generator in the worker thread when it stops.

    superqt's worker only stops *pulling* when `quit()` is called; closing the generator is what
    lets the core's `finally` blocks run (e.g. the trainer keeping its last good checkpoint), and
    doing it here keeps that work off the event loop.
    """

    def work(self):
        # Our own loop rather than superqt's: superqt returns (and so hides) a RuntimeError
        # raised by the generator, and torch reports most failures as RuntimeError.
        try:
            while True:
                if self.abort_requested:
                    self.aborted.emit()
                    return None
                try:
                    event = next(self._gen)
                except StopIteration as stop:
                    return stop.value
                self.yielded.emit(event)
        finally:
            self._gen.close()


def start_worker(
    func: Callable,
    *args,
    on_yield: Callable | None = None,
    on_return: Callable | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_finish: Callable[[], None] | None = None,
    on_abort: Callable[[], None] | None = None,
    **kwargs,
):
    """Run `func(*args, **kwargs)` in Qt's thread pool; generator functions yield events.

    Callbacks run on the main thread (queued Qt signals). Errors go to `on_error` (never to
    napari's traceback dialog): the widgets turn them into notifications with the core's message.
    Returns the started worker; `worker.quit()` asks a generator to stop after its current step.
    """
    import inspect

    if inspect.isgeneratorfunction(func):
        worker = ClosingGeneratorWorker(func, *args, **kwargs)
        if on_yield is not None:
            worker.yielded.connect(on_yield)
        if on_abort is not None:
            worker.aborted.connect(on_abort)
    else:
        worker = FunctionWorker(func, *args, **kwargs)
    if on_return is not None:
        worker.returned.connect(on_return)
    if on_error is not None:
        worker.errored.connect(on_error)
    if on_finish is not None:
        worker.finished.connect(on_finish)
    worker.start()
    return worker


# --------------------------------------------------------------------------------------------
# A combo box of the viewer's layers that follows the layer list
# --------------------------------------------------------------------------------------------
class LayerCombo(QComboBox):
    """Choose one layer of a given type; the list follows layers being added, removed, renamed.

    `extras` are fixed entries shown first (e.g. "(none)"); `current_layer()` returns `None` for
    them and `current_extra()` their text. `exclude(layer)` hides layers (e.g. our own outputs).
    With `auto_pick`, a newly added layer is selected while no layer is selected.
    """

    def __init__(self, viewer, layer_type, extras=(), exclude=None, auto_pick=False, parent=None):
        super().__init__(parent)
        self._auto_pick = auto_pick
        self._viewer = viewer
        self._type = layer_type
        self._extras = tuple(extras)
        self._exclude = exclude or (lambda layer: False)
        self._layers: list = []
        self.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        events = viewer.layers.events
        events.inserted.connect(self._on_inserted)
        events.removed.connect(self.refresh)
        events.reordered.connect(self.refresh)
        for layer in viewer.layers:
            layer.events.name.connect(self.refresh)
        self.refresh()

    def _on_inserted(self, event=None):
        layer = getattr(event, "value", None)
        if layer is not None and hasattr(layer.events, "name"):
            layer.events.name.connect(self.refresh)
        had_none = self.current_layer() is None
        self.refresh()
        # A freshly opened scan is what the user wants to work on next.
        if self._auto_pick and had_none and self._is_choice(layer):
            self.set_layer(layer)

    def _is_choice(self, layer) -> bool:
        return isinstance(layer, self._type) and not self._exclude(layer)

    def refresh(self, event=None) -> None:
        keep = self.current_layer()
        keep_extra = self.current_extra()
        self._layers = [ly for ly in self._viewer.layers if self._is_choice(ly)][::-1]
        self.blockSignals(True)
        self.clear()
        self.addItems(list(self._extras) + [ly.name for ly in self._layers])
        if keep is not None and keep in self._layers:
            self.setCurrentIndex(len(self._extras) + self._layers.index(keep))
        elif keep_extra is not None:
            self.setCurrentIndex(self._extras.index(keep_extra))
        self.blockSignals(False)
        if self.current_layer() is not keep or (keep is None and self.current_extra() !=
                                                 keep_extra):
            self.currentIndexChanged.emit(self.currentIndex())

    def current_layer(self):
        i = self.currentIndex() - len(self._extras)
        return self._layers[i] if 0 <= i < len(self._layers) else None

    def current_extra(self) -> str | None:
        i = self.currentIndex()
        return self._extras[i] if 0 <= i < len(self._extras) else None

    def set_layer(self, layer) -> None:
        if layer in self._layers:
            self.setCurrentIndex(len(self._extras) + self._layers.index(layer))
