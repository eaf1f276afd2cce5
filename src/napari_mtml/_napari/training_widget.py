"""Training widget: fill a `TrainConfig`, run `napari_mtml.training.train` in the background.

`TrainingWidget(napari_viewer)` is a `QWidget` (manifest command `napari-mtml.training_widget`,
display name "Training"). Start builds a `napari_mtml.config.TrainConfig` from the fields and runs
the core's training generator in a thread worker; each yielded event updates a progress bar (in
the widget and in napari's activity dock) and a live plot of the training loss and of the
validation AP per held-out task, per fold. Cancel asks the worker to stop after the current step;
the generator is then closed in the worker thread, which keeps the last good checkpoint
(`RUN/fold_K/best.pt`). When a run finishes it is offered to every Heatmap widget.

The widget holds no science: it only fills the config and renders the events.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.layers import Image
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QWidget,
)

from napari_mtml.anomalies import TASKS
from napari_mtml.brainmask import EXTRA_SUMMARY, INSTALL_HINT
from napari_mtml.brainmask import available as brain_available
from napari_mtml.config import RECIPE_NAMES, TrainConfig, settings
from napari_mtml.training import events, train

from ._common import (
    RUN_BUS,
    ClosesWithItsDock,
    available_devices,
    browse_button,
    cancelable_bar,
    notify_error,
    notify_info,
    scan_from_layer,
    scrolling_layout,
    start_worker,
    theme_colours,
    wait_until,
)

__all__ = ["TrainingWidget", "available_devices"]

#: The GUI preset: what the widget asks for unless changed. The same as `mtml train --time 15m`
#: (the recipe for the device, to a time budget), so a napari user without a GPU gets a useful
#: map in minutes; every other setting is the recipe's.
GUI_MINUTES = 15
PRESET_FROM_RECIPE = "recipe's"
BRAIN_HEAD = "the head (no brain mask)"
BRAIN_AUTO = "an automatic brain mask"
FROM_FOLDER = "files / folder"
FROM_LAYERS = "open image layers"
#: the colour of a warning in the widget (the device note when training falls back to the CPU)
WARNING_COLOUR = "#e0a040"
#: one colour per task (index = task id) in the plot of the held-out tasks' AP
TASK_COLOURS = dict(
    zip(TASKS, ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"), strict=True)
)


def _write_layers(layers, folder: Path) -> list[str]:
    """Save image layers as NIfTI files for `TrainConfig.healthy` (worker thread)."""
    from napari_mtml.files import safe_name
    from napari_mtml.io import write_image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, layer in enumerate(layers):
        scan = scan_from_layer(layer, "training")
        safe = safe_name(layer.name)
        path = folder / f"{i:02d}_{safe}.nii.gz"
        write_image(path, scan.array, like=scan)
        paths.append(str(path))
    return paths


def _run_training(config: TrainConfig, layers=None):
    """The worker's generator: optional layer export, then the core's training events."""
    if layers:
        folder = Path(config.out) / "healthy_layers"
        yield events.Notice(f"writing {len(layers)} image layer(s) to {folder}")
        config = config.replace(healthy=tuple(_write_layers(layers, folder)))
    result = yield from train(config)
    return result


class TrainingWidget(ClosesWithItsDock, QWidget):
    """Train a T/(5-T) cross-validation ensemble from the viewer.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        Its image layers can serve as the healthy training data.

    Tests and scripts may use `config()` (the `TrainConfig` the fields describe), `start()`,
    `cancel()`, `worker`, `run_dir`, `events` (every event received), `message` (a `QLabel`) and
    the field widgets (`healthy_edit`, `out_edit`, `steps_spin`, ...).
    """

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.worker = None
        self.run_dir: str | None = None
        self.events: list = []
        self._pbar = None
        self._folds = 1
        self._fold_pos: dict[int, int] = {}
        self._max_steps = 1
        self._cancelled = False
        self._last_best: dict[int, str] = {}
        self._curves: dict = {}
        self._plot_dirty = False

        # --- data
        self.source_combo = QComboBox()
        self.source_combo.addItems([FROM_FOLDER, FROM_LAYERS])
        self.healthy_edit = QLineEdit()
        self.healthy_edit.setPlaceholderText("healthy scans: files or folders, ';'-separated")
        self.layer_list = QListWidget()
        self.layer_list.setMaximumHeight(70)
        self.external_edit = QLineEdit()
        self.external_edit.setPlaceholderText("optional: external images for task 1")
        self.out_edit = QLineEdit(str(Path.cwd() / "mtml_run"))
        # --- split and budget
        self.dims_combo = QComboBox()
        self.dims_combo.addItems(["auto", "2", "3"])
        self.frame_edit = QLineEdit()
        self.frame_edit.setPlaceholderText("auto (the recipe's: fitted to the data)")
        cpu_tasks = TrainConfig().tasks_per_model  # the "auto" recipe's split on a CPU
        self.tasks_spin = _field_spin(
            "train_tasks", unset=f"auto (the recipe's: {cpu_tasks} on a CPU)"
        )
        self.fold_combo = QComboBox()
        self.recipe_combo = QComboBox()
        self.recipe_combo.addItems(list(RECIPE_NAMES))
        self.recipe_combo.setToolTip(
            "model, batch, resolution and schedule together. auto: 'small' on a CPU (a 0.28 M "
            "U-Net on 2 mm axial slices), 'light' on Apple MPS, 'paper' (the published "
            "recipe) on a CUDA GPU; the fields below override it"
        )
        self.time_spin = _spin(0, 100_000, GUI_MINUTES)
        self.time_spin.setSuffix(" min")
        self.time_spin.setSpecialValueText("no time limit (steps)")
        self.time_spin.setToolTip(
            "train for this long in all: a short measured warm-up plans "
            "the steps of every fold (recorded in config.json)"
        )
        self.steps_spin = _spin(0, 10_000_000, 0)
        self.steps_spin.setSpecialValueText("planned / the recipe's")
        self.steps_spin.setToolTip("optimiser steps per fold (with a time budget: at most)")
        self.batch_spin = _field_spin("batch_size", 4096, unset="auto (the recipe's)")
        self.val_spin = _field_spin("val_interval", 1_000_000, unset="auto")
        self.val_size_spin = _field_spin("val_size", 100_000, unset="auto")
        self.val_size_spin.setToolTip(f"{self.val_size_spin.toolTip()} (auto: 16 in 3D, 64 in 2D)")
        self.preset_combo = QComboBox()
        self.preset_combo.addItems([PRESET_FROM_RECIPE, "small", "light", "paper"])
        self.preset_combo.setToolTip(
            "small: 8-64 features (0.28 M, for CPUs); light: half the "
            "paper's widths; paper: the published U-Net "
            "(13.9 M / 29.1 M parameters)"
        )
        self.init_edit = QLineEdit()
        self.init_edit.setPlaceholderText("auto (or builtin:brain-t1, a run folder, none)")
        self.init_edit.setToolTip(
            "fine-tune: each fold starts from that run's fold. auto: from the built-in brain "
            "model for MRI with the small recipe (a CPU's), else from scratch; none: from "
            "scratch"
        )
        self.brain_combo = QComboBox()
        self.brain_combo.addItems([BRAIN_HEAD, BRAIN_AUTO])
        self.brain_combo.setToolTip(
            "where the synthetic anomalies go in heads with the skull "
            "on: anywhere in the head, or inside an automatic brain mask"
        )
        if not brain_available():
            self.brain_combo.model().item(1).setEnabled(False)
            self.brain_combo.setToolTip(f"{INSTALL_HINT} adds {EXTRA_SUMMARY}")
        self.depth_spin = _field_spin("depth", 9, unset="preset")
        self.width_spin = _field_spin("base_features", 256, unset="preset")
        devices = available_devices()
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(devices.names))
        self.device_note = QLabel(devices.note)
        self.device_note.setWordWrap(True)
        if devices.cpu_only:  # a warning: training on the CPU is slow
            self.device_note.setStyleSheet(f"color: {WARNING_COLOUR}")
        self.workers_spin = _field_spin("workers", 64)
        self.seed_spin = _field_spin("seed", 2**31 - 1)
        self.resume_check = QCheckBox("resume from last.pt")
        # --- actions and feedback
        self.start_button = QPushButton("Start")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.progress_bar.setFormat("%v / %m steps")
        self.message = QLabel("Set the healthy data and press Start.")
        self.message.setWordWrap(True)
        self.figure = Figure(figsize=(4, 3.6), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(260)
        self.ax_loss = self.figure.add_subplot(211)
        self.ax_ap = self.figure.add_subplot(212)
        self._reset_plot()

        healthy_row = _row(self.healthy_edit, browse_button(self, self.healthy_edit, files=True))
        external_row = _row(self.external_edit, browse_button(self, self.external_edit))
        validation = _row(self.val_spin, QLabel("steps on"), self.val_size_spin)
        # depth and width on a row of their own: the three beside each other made the widget
        # wider than before
        shape = _row(self.depth_spin, QLabel("width"), self.width_spin)
        out_row = _row(self.out_edit, browse_button(self, self.out_edit))
        data = _section(
            "Data",
            ("healthy data", self.source_combo),
            ("", healthy_row),
            ("", self.layer_list),
            ("dims", self.dims_combo),
            ("frame", self.frame_edit),
            ("external", external_row),
        )
        training = _section(
            "Training",
            ("train tasks T", self.tasks_spin),
            ("fold", self.fold_combo),
            ("recipe", self.recipe_combo),
            ("train for", self.time_spin),
            ("max steps", self.steps_spin),
            ("batch size", self.batch_spin),
            ("validate every", validation),
            ("model", self.preset_combo),
            ("depth", shape),
            ("start from", self.init_edit),
            ("anomalies in", self.brain_combo),
        )
        machine = _section(
            "Output and machine",
            ("output folder", out_row),
            ("", self.resume_check),
            ("device", self.device_combo),
            ("", self.device_note),
            ("workers", self.workers_spin),
            ("seed", self.seed_spin),
        )
        layout = scrolling_layout(self)
        for part in (data, training, machine):
            layout.addWidget(part)
        layout.addLayout(_hbox(self.start_button, self.cancel_button))
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.message)
        layout.addWidget(self.canvas)

        self.source_combo.currentIndexChanged.connect(self._source_changed)
        self.tasks_spin.valueChanged.connect(self._tasks_changed)
        self.start_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        layer_events = napari_viewer.layers.events
        layer_events.inserted.connect(self._refresh_layers)
        layer_events.removed.connect(self._refresh_layers)
        self._redraw_timer = QTimer(self)
        # A redraw per step would starve the event loop (and slow the worker: a matplotlib redraw
        # holds the GIL for ~0.1 s); once a second is live enough.
        self._redraw_timer.setInterval(1000)
        self._redraw_timer.timeout.connect(self._redraw)
        self._tasks_changed()
        self._source_changed()
        theme_event = getattr(napari_viewer.events, "theme", None)
        if theme_event is not None:
            theme_event.connect(self._theme_changed)

    # ----------------------------------------------------------------------------- fields
    def _tasks_changed(self, *args) -> None:
        # unset (0): the recipe's split, 1/4 or 4/1, five folds either way
        n = math.comb(5, self.tasks_spin.value() or 1)
        self.fold_combo.clear()
        self.fold_combo.addItems(["all"] + [str(i) for i in range(n)])

    def _source_changed(self, *args) -> None:
        from_layers = self.source_combo.currentText() == FROM_LAYERS
        self.healthy_edit.setVisible(not from_layers)
        self.layer_list.setVisible(from_layers)
        self._refresh_layers()

    def _refresh_layers(self, event=None) -> None:
        checked = {
            self.layer_list.item(i).text()
            for i in range(self.layer_list.count())
            if self.layer_list.item(i).checkState() == Qt.CheckState.Checked
        }
        self.layer_list.clear()
        for layer in self.viewer.layers:
            if isinstance(layer, Image) and not layer.rgb:
                item = QListWidgetItem(layer.name)
                item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                item.setCheckState(
                    Qt.CheckState.Checked if layer.name in checked else Qt.CheckState.Unchecked
                )
                self.layer_list.addItem(item)

    def set_layers(self, names) -> None:
        """Use these image layers (by name) as the healthy data."""
        self.source_combo.setCurrentText(FROM_LAYERS)
        for i in range(self.layer_list.count()):
            item = self.layer_list.item(i)
            item.setCheckState(
                Qt.CheckState.Checked if item.text() in names else Qt.CheckState.Unchecked
            )

    def _chosen_layers(self) -> list:
        names = [
            self.layer_list.item(i).text()
            for i in range(self.layer_list.count())
            if self.layer_list.item(i).checkState() == Qt.CheckState.Checked
        ]
        return [self.viewer.layers[n] for n in names if n in self.viewer.layers]

    def config(self) -> TrainConfig:
        """The `TrainConfig` the fields describe; `ValueError` (the core's message) if invalid."""
        from_layers = self.source_combo.currentText() == FROM_LAYERS
        if from_layers:
            healthy: tuple[str, ...] = ()
            if not self._chosen_layers():
                raise ValueError(
                    "no healthy image layer is ticked: open healthy scans and tick "
                    "them, or choose 'files / folder'."
                )
        else:
            healthy = tuple(p.strip() for p in self.healthy_edit.text().split(";") if p.strip())
            if not healthy:
                raise ValueError(
                    "no healthy data given: type or browse a folder of healthy "
                    "scans (NIfTI, DICOM, PNG), or train on open image layers."
                )
            missing = [p for p in healthy if not Path(p).expanduser().exists()]
            if missing:
                raise ValueError(f"healthy data not found: {', '.join(missing)}; check the path.")
        fold = self.fold_combo.currentText()
        return TrainConfig(
            healthy=healthy,
            out=self.out_edit.text().strip(),
            dims=None
            if self.dims_combo.currentText() == "auto"
            else int(self.dims_combo.currentText()),
            frame=self.frame_edit.text().strip() or None,
            train_tasks=self.tasks_spin.value() or None,
            fold="all" if fold == "all" else int(fold),
            external=self.external_edit.text().strip() or None,
            max_steps=self.steps_spin.value() or None,
            time_budget=60.0 * self.time_spin.value() or None,
            recipe=self.recipe_combo.currentText(),
            init=self.init_edit.text().strip() or "auto",
            brain_mask="auto" if self.brain_combo.currentText() == BRAIN_AUTO else None,
            batch_size=self.batch_spin.value() or None,
            val_interval=self.val_spin.value() or None,
            val_size=self.val_size_spin.value() or None,
            preset=None
            if self.preset_combo.currentText() == PRESET_FROM_RECIPE
            else self.preset_combo.currentText(),
            depth=self.depth_spin.value() or None,
            base_features=self.width_spin.value() or None,
            device=self.device_combo.currentText(),
            workers=self.workers_spin.value(),
            seed=self.seed_spin.value(),
            resume=self.resume_check.isChecked(),
        )

    # ----------------------------------------------------------------------------- run
    def start(self) -> None:
        """Start training in a worker thread (errors in the fields become a notification)."""
        if self.worker is not None:
            return
        try:
            config = self.config()
        except ValueError as exc:
            self._error(exc)
            return
        layers = self._chosen_layers() if self.source_combo.currentText() == FROM_LAYERS else None
        self.events = []
        self.run_dir = config.out
        self._cancelled = False
        self._last_best = {}
        self._folds = len(config.fold_indices())
        self._fold_pos = {}
        self._max_steps = config.max_steps or 1
        self._reset_plot()
        # with a time budget the steps are known once planned (the first FoldStarted)
        total = self._folds * config.max_steps if config.max_steps and not config.time_budget else 0
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(0)
        self._pbar = cancelable_bar(total or None, "mtml training", self.cancel)
        self.message.setText(
            f"training into {config.out} …"
            if not config.time_budget
            else f"measuring a step, then training for "
            f"{config.time_budget / 60:g} min into {config.out} …"
        )
        self.start_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self._redraw_timer.start()
        self.worker = start_worker(_run_training, config, layers, **self._handlers())

    def cancel(self) -> None:
        """Stop after the current training step; the last good checkpoint is kept."""
        if self.worker is not None:
            self._cancelled = True
            self.message.setText("cancelling after the current step …")
            self.worker.quit()

    def showEvent(self, event) -> None:
        super().showEvent(event)
        # napari's style sheet gives spin boxes a fixed least width that is narrower than their
        # own text and "-"/"+" buttons: "preset" showed as "eset"
        for spin in self.findChildren(QSpinBox):
            spin.setMinimumWidth(max(spin.minimumWidth(), spin.minimumSizeHint().width()))
        self.scroll_area.updateGeometry()  # the dock widens to the new least width

    def closeEvent(self, event) -> None:
        self.cancel()  # closing the dock must not leave a run training in the background
        super().closeEvent(event)

    def wait(self, timeout_s: float = 60.0) -> bool:
        """Process events until the worker is done (scripts and tests); True if it ended."""
        return wait_until(lambda: self.worker is None, timeout_s)

    # ----------------------------------------------------------------------------- events
    def _handlers(self) -> dict:
        """What the widget does on each signal of the training worker."""
        return {
            "on_yield": self._on_event,
            "on_return": self._on_return,
            "on_error": self._error,
            "on_finish": self._on_finish,
            "on_abort": self._on_abort,
        }

    def _on_event(self, event) -> None:
        self.events.append(event)
        if isinstance(event, events.FoldStarted):
            self._fold_pos.setdefault(event.fold, len(self._fold_pos))
            self._max_steps = event.max_steps
            total = self._folds * event.max_steps
            if self.progress_bar.maximum() != total:  # planned from the time budget
                self.progress_bar.setRange(0, total)
                if self._pbar is not None:
                    self._pbar.total = total
            self.message.setText(
                f"fold {event.fold + 1}/{event.n_folds}: train on {', '.join(event.train_tasks)}"
                f"; validate on {', '.join(event.val_tasks)}"
            )
        elif isinstance(event, events.StepEvent):
            self._fold_pos.setdefault(event.fold, len(self._fold_pos))
            done = self._fold_pos[event.fold] * self._max_steps + event.step
            bar = self._pbar  # napari may process events (even _on_finish) while it draws
            if bar is not None:
                bar.update(max(0, done - self.progress_bar.value()))
            self.progress_bar.setValue(min(done, self.progress_bar.maximum()))
            self._curve(("loss", event.fold)).append((event.step, event.loss))
            self._plot_dirty = True
        elif isinstance(event, events.ValidationEvent):
            for task, ap in event.ap.items():
                self._curve(("ap", event.fold, task)).append((event.step, ap))
            self._plot_dirty = True
            if event.best:
                self._last_best[event.fold] = str(
                    Path(self.run_dir) / f"fold_{event.fold}" / "best.pt"
                )
            mean_ap = np.mean(list(event.ap.values())) if event.ap else float("nan")
            self.message.setText(
                f"fold {event.fold}, step {event.step}: val loss "
                f"{event.val_loss:.4f}, mean AP {mean_ap:.3f}"
                + (" (best so far)" if event.best else "")
            )
        elif isinstance(event, events.FoldFinished):
            self._last_best[event.fold] = event.checkpoint
        elif isinstance(event, events.Notice):
            notify_info(f"Training: {event.text}")
        elif isinstance(event, events.RunFinished):
            self.run_dir = event.run_dir

    def _on_return(self, result) -> None:
        run_dir = getattr(result, "run_dir", None) or self.run_dir
        self.run_dir = str(run_dir)
        self.progress_bar.setValue(self.progress_bar.maximum())
        self.message.setText(f"done: {self.run_dir} (offered to the Heatmap widget)")
        notify_info(f"Training finished: {self.run_dir}")
        RUN_BUS.run_finished.emit(self.run_dir)

    def _on_abort(self) -> None:
        kept = [p for p in self._last_best.values() if Path(p).exists()]
        if kept:
            text = "cancelled; the last good checkpoint is kept: " + ", ".join(kept)
        else:
            text = (
                "cancelled before the first validation: no checkpoint was selected yet "
                "(the run folder keeps last.pt for --resume, if one was written)"
            )
        self.message.setText(text)
        notify_info(f"Training {text}")

    def _error(self, exc) -> None:
        self.message.setText(f"error: {exc}")
        notify_error("Training", exc)

    def _on_finish(self) -> None:
        self.worker = None
        self.start_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self._redraw_timer.stop()
        self._redraw()
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None

    # ----------------------------------------------------------------------------- plot
    def _curve(self, key) -> list:
        return self._curves.setdefault(key, [])

    def _theme_changed(self, event=None) -> None:
        self._plot_dirty = True
        self._redraw()

    def _style_plot(self) -> dict[str, str]:
        """napari's theme on the figure: its background, text and grid colours."""
        colours = theme_colours(self.viewer)
        self.figure.set_facecolor(colours["background"])
        for ax in (self.ax_loss, self.ax_ap):
            ax.set_facecolor(colours["background"])
            ax.tick_params(colors=colours["text"], labelsize=7)
            for spine in ax.spines.values():
                spine.set_color(colours["grid"])
            ax.xaxis.label.set_color(colours["text"])
            ax.yaxis.label.set_color(colours["text"])
            ax.grid(color=colours["grid"], alpha=0.5)
        return colours

    def _reset_plot(self) -> None:
        self._curves = {}
        self._plot_dirty = True
        self._redraw()

    def _redraw(self) -> None:
        if not self._plot_dirty:
            return
        self._plot_dirty = False
        for ax in (self.ax_loss, self.ax_ap):
            ax.clear()
        colours = self._style_plot()
        self.ax_loss.set_ylabel("train loss", fontsize=8)
        self.ax_ap.set_ylabel("val AP", fontsize=8)
        self.ax_ap.set_xlabel("step", fontsize=8)
        self.ax_ap.set_ylim(0, 1.25)  # headroom for the legend above AP = 1
        self.ax_ap.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        markers = "os^vDP*X"
        seen_tasks = set()
        for key, points in sorted(self._curves.items(), key=lambda kv: str(kv[0])):
            if not points:
                continue
            x, y = np.asarray(points, dtype=float).T
            if key[0] == "loss":
                self.ax_loss.plot(x, y, lw=1, label=f"fold {key[1]}")
            else:
                _, fold, task = key
                label = task if task not in seen_tasks else None
                seen_tasks.add(task)
                self.ax_ap.plot(
                    x,
                    y,
                    marker=markers[fold % len(markers)],
                    ms=3,
                    lw=1,
                    color=TASK_COLOURS.get(task),
                    label=label,
                )
        legend_style = {
            "facecolor": colours["background"],
            "edgecolor": colours["grid"],
            "labelcolor": colours["text"],
        }
        if any(k[0] == "loss" for k in self._curves):
            self.ax_loss.legend(fontsize=6, loc="upper right", ncol=3, **legend_style)
            self.ax_loss.set_yscale("log")
        if seen_tasks:
            # one colour per held-out task; folds differ by marker
            self.ax_ap.legend(
                fontsize=6,
                loc="upper center",
                ncol=3,
                framealpha=0.7,
                handlelength=1.2,
                columnspacing=0.8,
                **legend_style,
            )
        self.canvas.draw_idle()


def _spin(lo: int, hi: int, value: int) -> QSpinBox:
    s = QSpinBox()
    s.setRange(lo, hi)
    s.setValue(value)
    return s


def _section(title: str, *rows: tuple[str, QWidget]) -> QGroupBox:
    """A titled part of the form: one `(label, widget)` row each."""
    box = QGroupBox(title)
    form = QFormLayout(box)
    for label, widget in rows:
        form.addRow(label, widget)
    return box


def _field_spin(name: str, hi: int | None = None, unset: str | None = None) -> QSpinBox:
    """A spin box for the `TrainConfig` field `name`, its range, default and tooltip from the
    field's declaration (`napari_mtml.config.settings()`); `hi` bounds an open range. With
    `unset`, 0 is shown as that text and leaves the field unset (the recipe's value)."""
    setting = settings()[name]
    default = TrainConfig.__dataclass_fields__[name].default
    if setting.choices is not None:
        lo, hi = 0 if unset is not None else min(setting.choices), max(setting.choices)
    else:
        lo = 0 if unset is not None else setting.minimum
    spin = _spin(lo, hi, default or 0)
    if unset is not None:
        spin.setSpecialValueText(unset)
    spin.setToolTip(setting.help)
    return spin


def _hbox(*widgets) -> QHBoxLayout:
    box = QHBoxLayout()
    for w in widgets:
        box.addWidget(w)
    return box


def _row(*widgets) -> QWidget:
    w = QWidget()
    box = _hbox(*widgets)
    box.setContentsMargins(0, 0, 0, 0)
    w.setLayout(box)
    return w
