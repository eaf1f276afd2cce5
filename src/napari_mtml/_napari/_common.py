"""Helpers shared by the three widgets: layers <-> `Scan`, in-place output layers, workers.

Nothing here is science. It turns napari layers into the core's inputs (a `Scan`, a float32
array and its voxel size in mm) and the core's outputs back into layers that sit exactly on the
source layer (its whole transform: scale, translate, rotate, shear and affine), and it runs the
core's long calls off the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QObject, QSize, Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFrame,
    QMenu,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import FunctionWorker, GeneratorWorker

__all__ = [
    "ClosesWithItsDock",
    "RUN_BUS",
    "available_devices",
    "cancelable_bar",
    "ClosingGeneratorWorker",
    "file_affine_from_layer_matrix",
    "geometry_metadata",
    "image_layer_array",
    "layer_affine",
    "layer_spacing",
    "notify_error",
    "on_grid_of",
    "scan_from_geometry",
    "scan_from_layer",
    "scrolling_layout",
    "set_or_add_image",
    "set_or_add_labels",
    "start_worker",
    "theme_colours",
    "viewer_camera",
    "voxel_volume",
    "wait_until",
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
def available_devices():
    """The device menu of this machine: `napari_mtml.devices.device_choices()` (`names`, a
    `note` saying what "auto" picks, `cpu_only` when that is the CPU)."""
    from napari_mtml.devices import device_choices

    return device_choices()


# --------------------------------------------------------------------------------------------
# napari's theme, for what napari does not style itself (matplotlib figures)
# --------------------------------------------------------------------------------------------
def _css_colour(value) -> str:
    """A theme colour as "#rrggbb": pydantic colours (napari >= 0.5) or "rgb(r, g, b)" text."""
    if hasattr(value, "as_hex"):
        hexa = value.as_hex()
        if len(hexa) == 4:  # "#fff" -> "#ffffff"
            hexa = "#" + "".join(c * 2 for c in hexa[1:])
        return hexa[:7]
    text = str(value).strip()
    if text.startswith("rgb"):
        r, g, b = (
            int(float(v)) for v in text[text.index("(") + 1 : text.index(")")].split(",")[:3]
        )
        return f"#{r:02x}{g:02x}{b:02x}"
    return text


def theme_colours(viewer) -> dict[str, str]:
    """`background`, `panel`, `text` and `grid` colours ("#rrggbb") of the viewer's theme."""
    import warnings

    from napari.utils.theme import get_theme

    theme_id = getattr(viewer, "theme", "dark") or "dark"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # napari 0.5 warns about get_theme's as_dict
        try:
            theme = get_theme(theme_id)
        except ValueError:
            theme = get_theme("dark")
    get = theme.get if isinstance(theme, dict) else (lambda key: getattr(theme, key))
    return {
        "background": _css_colour(get("background")),
        "panel": _css_colour(get("foreground")),
        "text": _css_colour(get("text")),
        "grid": _css_colour(get("highlight")),
    }


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
        raise ValueError(
            f"{what} needs an image layer: open a scan (File > Open, or a sample "
            "under File > Open Sample > Many Tasks Make Light Work) and pick it."
        )
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


def layer_affine(layer) -> np.ndarray:
    """The layer's full data-index -> world matrix, `(n + 1, n + 1)` for an n-D layer.

    Everything napari applies is in it: `scale`, `shear`, `rotate`, `translate` and the extra
    `affine` (what e.g. napari-nifti passes), read back through napari's own `data_to_world`
    so that it is exactly what the canvas shows.
    """
    n = layer.ndim
    origin = np.asarray(layer.data_to_world(np.zeros(n)), dtype=float)
    matrix = np.eye(n + 1)
    for axis in range(n):
        unit = np.zeros(n)
        unit[axis] = 1.0
        matrix[:n, axis] = np.asarray(layer.data_to_world(unit), dtype=float) - origin
    matrix[:n, n] = origin
    return matrix


def layer_spacing(layer) -> tuple[float, ...]:
    """Millimetres per voxel along each data axis (the column lengths of `layer_affine`)."""
    linear = layer_affine(layer)[:-1, :-1]
    return tuple(float(v) for v in np.linalg.norm(linear, axis=0))


def voxel_volume(layer) -> float:
    """mm^2 (2D) or mm^3 (3D) of one voxel: |det| of the linear part (right under shear too)."""
    return float(abs(np.linalg.det(layer_affine(layer)[:-1, :-1])))


def file_affine_from_layer_matrix(matrix: np.ndarray) -> np.ndarray:
    """A NIfTI-style 4x4 affine (file voxel `(i, j, k)` = array `(x, y, z)` -> world) for a layer
    matrix over array axes `(z, y, x)` / `(y, x)`.

    This plugin's layers put world axis 0 = S, 1 = A, 2 = R (RAS read backwards, like the array
    axes), so both the array and the world axes are reversed. A 2D layer becomes a one-slice
    volume whose slice axis is the world's third axis. The inverse of `Scan.array_affine()`.
    """
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape == (3, 3):
        full = np.eye(4)
        full[1:3, 1:3] = matrix[:2, :2]
        full[1:3, 3] = matrix[:2, 2]
        matrix = full
    if matrix.shape != (4, 4):
        raise ValueError(f"a 2D or 3D layer is needed; got a {matrix.shape} transform.")
    reverse = np.eye(4)[[2, 1, 0, 3]]
    return reverse @ matrix @ reverse


# Scan metadata keys that describe the geometry of the file a Scan was read from; a Scan built
# from a layer's own geometry must not carry them over (write_image would reorient by them).
_FILE_GEOMETRY = (
    "scan",
    "affine",
    "spacing",
    "world_affine",
    "ornt",
    "file_shape",
    "array_affine",
    "file_zooms",
    "qform_code",
    "sform_code",
)


def scan_from_geometry(
    data: np.ndarray, matrix: np.ndarray, metadata: dict | None = None, name: str = "the layer"
):
    """A `Scan` of a layer's array given its full data -> world `matrix` and its `metadata`.

    While the layer is still where our reader put it (`metadata["world_affine"]` equals
    `matrix`), the file's own geometry (`metadata["scan"]`) is kept, so that maps written with
    `write_image(..., like=scan)` overlay the original file voxel for voxel. Otherwise the
    geometry is the matrix's: spacing = mm per data axis, `affine` = the matrix in NIfTI voxel
    order (`file_affine_from_layer_matrix`).
    """
    from napari_mtml.io import Scan

    meta = dict(metadata or {})
    matrix = np.asarray(matrix, dtype=float)
    original = meta.get("scan")
    placed = meta.get("world_affine")
    if (
        isinstance(original, Scan)
        and tuple(np.shape(original.array)) == tuple(data.shape)
        and placed is not None
        and np.shape(placed) == matrix.shape
        and np.allclose(placed, matrix, atol=1e-6)
    ):
        return Scan(
            array=data,
            spacing=tuple(original.spacing),
            affine=original.affine,
            metadata=dict(original.metadata),
        )
    spacing = tuple(float(v) for v in np.linalg.norm(matrix[:-1, :-1], axis=0))
    if not all(np.isfinite(v) and v > 0 for v in spacing):
        raise ValueError(
            f"{name} has a degenerate transform (an axis of zero length); fix its "
            "scale or affine first."
        )
    inner = {k: v for k, v in meta.items() if k not in _FILE_GEOMETRY}
    inner.setdefault("warnings", [])
    inner["layer_affine"] = matrix
    return Scan(
        array=data, spacing=spacing, affine=file_affine_from_layer_matrix(matrix), metadata=inner
    )


def scan_from_layer(layer, what: str = "this widget"):
    """A `napari_mtml.io.Scan` of an image (or labels) layer, with the layer's geometry.

    A layer opened by our reader, still where the reader put it, gives back the file's own
    `Scan` geometry. Any other layer (another reader's full `affine`, a rotated, flipped or
    sheared one) gets its geometry from `layer_affine` (see `scan_from_geometry`).
    """
    data = image_layer_array(layer, what)
    return scan_from_geometry(data, layer_affine(layer), layer.metadata, f"layer '{layer.name}'")


def geometry_metadata(layer) -> dict[str, Any]:
    """The file-geometry entries of a layer's metadata, for outputs on the same grid (so that
    saving an output writes it in the source file's geometry, see `scan_from_geometry`)."""
    meta = layer.metadata or {}
    return {k: meta[k] for k in ("scan", "world_affine", "affine", "spacing") if k in meta}


def on_grid_of(layer) -> dict[str, Any]:
    """Layer keyword arguments that put an output exactly on `layer`: its scale, translate,
    rotate, shear and affine (the whole transform, not only the diagonal part)."""
    return {
        "scale": tuple(layer.scale),
        "translate": tuple(layer.translate),
        "rotate": np.array(layer.rotate, dtype=float),
        "shear": np.array(layer.shear, dtype=float),
        "affine": np.array(layer.affine.affine_matrix, dtype=float),
    }


def _place(target, grid: dict) -> None:
    """Put `target` on the grid of `on_grid_of`; only what differs is set (each set transform
    re-draws the layer: a preview updating its layers in place kept the same grid and spent
    ~20 ms per update re-setting it)."""
    for key, value in grid.items():
        if key == "affine":
            current = np.asarray(target.affine.affine_matrix, dtype=float)
        else:
            current = np.asarray(getattr(target, key), dtype=float)
        wanted = np.asarray(value, dtype=float)
        if current.shape != wanted.shape or not np.array_equal(current, wanted):
            setattr(target, key, value)


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
    return _set_or_add(
        viewer.add_image, viewer, layer, data, name, grid_of, kwargs, again=("contrast_limits",)
    )


def set_or_add_labels(viewer, layer, data: np.ndarray, name: str, grid_of, **kwargs):
    """Same as `set_or_add_image`, for a Labels layer (integer data)."""
    return _set_or_add(viewer.add_labels, viewer, layer, data, name, grid_of, kwargs)


def _set_or_add(add, viewer, layer, data, name, grid_of, kwargs, again=()):
    grid = on_grid_of(grid_of)
    geometry = geometry_metadata(grid_of)
    if _alive(viewer, layer) and layer.data.ndim == data.ndim:
        layer.data = data
        _place(layer, grid)
        layer.metadata = {**layer.metadata, **geometry}
        for key in again:
            if key in kwargs:
                setattr(layer, key, kwargs[key])
        return layer
    if _alive(viewer, layer):
        viewer.layers.remove(layer)
    return add(data, name=name, metadata=geometry, **grid, **kwargs)


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
                    if self.abort_requested:  # cancelled during the last step: drop its result
                        self.aborted.emit()
                        return None
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


def wait_until(done: Callable[[], bool], timeout_s: float) -> bool:
    """Process Qt events until `done()` is true or `timeout_s` seconds have passed (the
    widgets' `wait()`/`stop()` for scripts, tests and closing); returns `done()`."""
    import time

    from qtpy.QtWidgets import QApplication

    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.005)
    return done()


def viewer_camera(viewer):
    """The viewer's camera (`viewer.scene.camera` from napari 0.9, `viewer.camera` before)."""
    scene = getattr(viewer, "scene", None)
    camera = getattr(scene, "camera", None)
    return camera if camera is not None else viewer.camera


def cancelable_bar(total: int, desc: str, on_cancel: Callable[[], None]):
    """A napari progress bar (activity dock) with a Cancel button that calls `on_cancel` at once.

    napari's `cancelable_progress` only remembers a click (`is_canceled`) and acts on it when
    the bar is iterated; our bars are updated by events from a worker, so the click is passed on
    to `on_cancel` (e.g. `worker.quit`) right away. Close the bar when the work ends.
    """
    from napari.utils import cancelable_progress

    class _Bar(cancelable_progress):
        def cancel(self) -> None:
            already = self.is_canceled
            super().cancel()
            if not already:
                on_cancel()

    return _Bar(total=total, desc=desc)


# --------------------------------------------------------------------------------------------
# Path fields
# --------------------------------------------------------------------------------------------
def push_button(text: str, slot, tip: str | None = None) -> QPushButton:
    """A button that calls `slot()` when clicked, with an optional tooltip."""
    button = QPushButton(text)
    button.clicked.connect(lambda *_: slot())
    if tip:
        button.setToolTip(tip)
    return button


def browse_button(parent, edit, *, files: bool = False) -> QPushButton:
    """A "…" button that fills the line edit `edit` with a folder chosen in a dialog; with
    `files`, its menu also offers "Files…": several files at once, written as `a; b; c` (the
    form the training widget's healthy-data field takes)."""
    button = QPushButton("…")
    button.setMaximumWidth(30)

    def folder() -> None:
        path = QFileDialog.getExistingDirectory(parent, "Choose a folder")
        if path:
            edit.setText(path)

    def several() -> None:
        paths, _ = QFileDialog.getOpenFileNames(parent, "Choose files")
        if paths:
            edit.setText("; ".join(paths))

    if files:
        menu = QMenu(button)
        menu.addAction("Folder…", folder)
        menu.addAction("Files…", several)
        button.setMenu(menu)
    else:
        button.clicked.connect(folder)
    return button


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
        if self.current_layer() is not keep or (
            keep is None and self.current_extra() != keep_extra
        ):
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


class _DockScrollArea(QScrollArea):
    """A scroll area that asks for its whole content's height (so a dock with room shows it
    all, as before) and its least width, but can shrink to a short dock, scrolling instead of
    squeezing its labels."""

    #: the least height it accepts: a few rows of the form stay visible
    MIN_HEIGHT = 160

    def _bar(self) -> int:
        # the vertical bar's room (napari's style draws it wider than its size hint says)
        bar = self.verticalScrollBar()
        return max(bar.sizeHint().width(), bar.width() if bar.isVisible() else 0) + 4

    def sizeHint(self) -> QSize:
        # as narrow as the content allows (as the dock was before), as tall as it wants
        inner = self.widget()
        if inner is None:
            return QSize(0, 0)
        return QSize(inner.minimumSizeHint().width() + self._bar(), inner.sizeHint().height())

    def minimumSizeHint(self) -> QSize:
        inner = self.widget().minimumSizeHint() if self.widget() is not None else QSize(0, 0)
        return QSize(inner.width() + self._bar(), min(inner.height(), self.MIN_HEIGHT))


def scrolling_layout(widget: QWidget) -> QVBoxLayout:
    """The layout for a dock widget's content, inside a scroll area (`widget.scroll_area`).

    Without it a dock cannot be shorter than its content: the Training widget alone needs
    about 1,050 px, so napari's window grew taller than a laptop's screen, and a short dock
    squeezed the Heatmap widget's labels until their text was cut. With it the dock opens at
    its content's size where there is room and scrolls where there is not.
    """
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    area = _DockScrollArea(widget)
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    # never sideways: the area is never narrower than its content's least width
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    content = QWidget()
    area.setWidget(content)
    outer.addWidget(area)
    widget.scroll_area = area
    return QVBoxLayout(content)


class ClosesWithItsDock:
    """Mixin for the dock widgets (first among the bases, before `QWidget`): the widget closes
    itself, so that its `closeEvent` stops its work, when napari takes it out of its dock.

    napari's dock "x" (`Window.remove_dock_widget`) only calls `setParent(None)` on the widget:
    no close event reaches it, so a widget that must stop its work when closed (a prediction, a
    training run, live previews) watches for that parent change.
    """

    def event(self, event: QEvent) -> bool:
        if (
            event.type() == QEvent.Type.ParentChange
            and self.parent() is None
            and not getattr(self, "_closed_by_dock", False)
        ):
            self._closed_by_dock = True
            self.close()
        return super().event(event)
