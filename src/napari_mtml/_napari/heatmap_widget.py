"""Heatmap widget: predict an image layer with a trained ensemble and inspect the result.

`HeatmapWidget(napari_viewer)` is a `QWidget` (manifest command `napari-mtml.heatmap_widget`,
display name "Heatmap"). Predict loads the run with `napari_mtml.inference.load_ensemble` and calls
`Ensemble.predict` on the chosen layer, in a worker thread, with a progress bar in napari's
activity dock that can cancel it (as can the widget's Cancel). It adds, on the image's grid (the
source layer's whole transform: scale, translate, rotate, shear, affine):

- `<image> anomaly`: the ensemble mean, an Image layer (inferno, additive, opacity 0.6, contrast
  limits 0-1; in 3D view rendered as an attenuated maximum intensity projection);
- `<image> disagreement`: the standard deviation over folds (hidden);
- `<image> suspicious`: a Labels layer of the connected regions above the threshold, listed in a
  table with their size (mm^2 in 2D, mm^3 in 3D, from the layer's transform), peak and mean
  score. The table is also the Labels layer's `features`; a click on a row centres the view on
  that region and selects its label; Export writes it as CSV.

The threshold can be set from a healthy reference layer: the score that a chosen percentile of
that scan's foreground voxels stays under. Save writes the heatmap as NIfTI on the image's
original geometry (`napari_mtml.io.write_image`, using the layer's metadata).

Batch: every image of a folder, or every open image layer, through `napari_mtml.batch.
predict_batch` (the core of `mtml predict`) in a worker, with a cancelable napari progress bar.
It writes `NAME_anomaly.nii.gz`, `NAME_disagreement.nii.gz` (and `NAME_overlay.png`) and
`scores.csv` into the output folder (cancelling keeps `scores.csv` for the images done). A
table ranks the images by sample score; a click opens the image with its heatmap, which then
becomes the widget's current result (threshold, regions, save).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)
from superqt import QLabeledDoubleSlider

from napari_mtml.brainmask import EXTRA_SUMMARY, INSTALL_HINT
from napari_mtml.brainmask import available as brain_available
from napari_mtml.builtin import builtin_models
from napari_mtml.files import safe_name
from napari_mtml.regions import (
    Region,
    healthy_scores,
    nearest_voxel,
    percentile_threshold,
    region_table,
    regions_above,
    write_regions_csv,
)
from napari_mtml.scores import SAMPLE_SCORES, score_description

from ._common import (
    RUN_BUS,
    ClosesWithItsDock,
    LayerCombo,
    available_devices,
    browse_button,
    cancelable_bar,
    layer_spacing,
    notify_error,
    notify_info,
    notify_warning,
    push_button,
    scan_from_layer,
    scrolling_layout,
    set_or_add_image,
    set_or_add_labels,
    start_worker,
    viewer_camera,
    voxel_volume,
    wait_until,
)

__all__ = ["HeatmapWidget", "Region", "regions_above"]  # the regions live in napari_mtml.regions

BUILTIN_PICK = "built-in model…"
MASK_FOREGROUND = "the image's foreground"
MASK_AUTO = "automatic brain mask"
BATCH_FOLDER = "a folder of images"
BATCH_LAYERS = "all open image layers"

ANOMALY = " anomaly"
DISAGREEMENT = " disagreement"
#: how the maps of a prediction are shown, by their layer name's suffix
MAP_STYLES = {
    ANOMALY: {
        "colormap": "inferno",
        "blending": "additive",
        "opacity": 0.6,
        "contrast_limits": (0.0, 1.0),
        "rendering": "attenuated_mip",
        "attenuation": 0.3,
    },
    DISAGREEMENT: {
        "colormap": "viridis",
        "blending": "additive",
        "contrast_limits": (0.0, 0.5),
        "visible": False,
        "rendering": "attenuated_mip",
    },
}
SUSPICIOUS = " suspicious"
MAX_ROWS = 100


class HeatmapWidget(ClosesWithItsDock, QWidget):
    """Predict with a trained run and show heatmap, disagreement and suspicious regions.

    Parameters
    ----------
    napari_viewer : napari.Viewer

    Tests and scripts may use `run_edit`, `image_combo`, `reference_combo`, `percentile_spin`,
    `threshold_slider`, `tta_check` (mirror TTA for every prediction), `contra_check` (compare
    left and right, `Ensemble.predict(contralateral=...)`), `table`, `score_label`,
    `predict()`, `cancel()`, `threshold_from_reference()`, `show_region(label)`,
    `export_csv(path)`, `save(path)`, `regions`, `prediction`, `heatmap_layer`,
    `disagreement_layer`, `labels_layer`, `busy`,
    `progress` (the napari progress bar while a prediction runs) and `wait()`; for batches
    `batch_source_combo`, `batch_folder_edit`, `batch_out_edit`, `batch_png_check`,
    `batch_table`, `run_batch()`, `batch_items` (the `BatchItem`s so far, ranked),
    `batch_result` and `open_batch_item(row)`.
    """

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.prediction = None
        self.regions: list[Region] = []
        self.heatmap_layer: Image | None = None
        self.disagreement_layer: Image | None = None
        self.labels_layer: Labels | None = None
        self.progress = None
        self._source_layer = None
        self._worker = None
        self._cancelled = False
        self._ensembles: dict = {}
        self._calibrated_run = None  # the run whose healthy threshold the slider last took
        self._reference_cache: dict = {}
        self.batch_items: list = []
        self.batch_result = None
        self._batch_running = False
        self._batch_sources: dict = {}  # NAME -> (layer, Scan metadata, ndim) for layer inputs
        self._batch_opened: dict = {}  # input path -> the image layer a click opened

        self.run_edit = QLineEdit()
        self.run_edit.setPlaceholderText("run folder (config.json, fold_K/best.pt) or builtin:NAME")
        browse = QPushButton("…")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse)
        self.builtin_combo = QComboBox()
        self.builtin_combo.addItem(BUILTIN_PICK)
        for name, text in builtin_models().items():
            self.builtin_combo.addItem(f"builtin:{name}")
            self.builtin_combo.setItemData(
                self.builtin_combo.count() - 1, text, Qt.ItemDataRole.ToolTipRole
            )
        self.builtin_combo.setToolTip(
            "a trained model that ships with napari-mtml: no training "
            "needed (see its model card in the docs)"
        )
        self.builtin_combo.currentTextChanged.connect(self._builtin_chosen)
        mine = self._is_output
        self.mask_combo = LayerCombo(
            napari_viewer, Labels, extras=(MASK_FOREGROUND, MASK_AUTO), exclude=mine
        )
        self.mask_combo.setToolTip(
            "where the map may be non-zero and the sample score is taken: the image's "
            "foreground (default), an automatic brain mask (brain MRI with the skull on), or a "
            "Labels layer (its non-zero voxels)"
        )
        self.mask_note = QLabel(
            ""
            if brain_available()
            else f"automatic brain mask: {INSTALL_HINT} adds {EXTRA_SUMMARY}."
        )
        self.mask_note.setWordWrap(True)
        self.image_combo = LayerCombo(napari_viewer, Image, exclude=mine, auto_pick=True)
        devices = available_devices()
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(devices.names))
        self.device_combo.setToolTip(devices.note)
        self.tta_check = QCheckBox("predict mirrored too")
        self.tta_check.setToolTip(
            "predict the image mirrored left-right as well and average both maps (the models "
            "train with that flip): about twice the time; used by Predict, the healthy "
            "reference and the batch (mtml predict --tta)"
        )
        self.contra_check = QCheckBox("compare left and right")
        self.contra_check.setChecked(True)
        self.contra_check.setToolTip(
            "3D MRI: each voxel of the map less the map near its mirror image across the "
            "fitted mid-sagittal plane, so that what both sides share (skull base, eyes, "
            "ventricles) drops out and what one side has alone stays; untick it for bilateral, "
            "symmetric disease (mtml predict --contralateral)"
        )
        self.predict_button = push_button("Predict", self.predict)
        self.cancel_button = push_button("Cancel", self.cancel)
        self.cancel_button.setEnabled(False)
        self.cancel_button.setToolTip("Stop the running prediction; its result is dropped.")
        self.score_label = QLabel("sample score: -")
        self.score_label.setWordWrap(True)
        self.threshold_slider = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
        self.threshold_slider.setRange(0.0, 1.0)
        self.threshold_slider.setDecimals(3)
        self.threshold_slider.setValue(0.5)
        self.reference_combo = LayerCombo(napari_viewer, Image, exclude=mine)
        self.percentile_spin = QDoubleSpinBox()
        self.percentile_spin.setRange(50.0, 100.0)
        self.percentile_spin.setDecimals(2)
        self.percentile_spin.setValue(99.0)
        self.percentile_spin.setSuffix(" %")
        self.reference_button = push_button("From healthy reference", self.threshold_from_reference)
        self.reference_button.setToolTip(
            "Predict the reference layer and set the threshold to the "
            "score this percentile of its foreground stays under."
        )
        self.table = _table(
            ["region", "size", "peak", "mean"],
            140,
            "Click a region to centre the view on it and select its label.",
        )
        self.table.itemSelectionChanged.connect(self._row_selected)
        self.export_button = push_button("Export table (CSV)…", self.export_csv)
        self.save_button = push_button("Save heatmap (NIfTI)…", self.save)
        self.status = QLabel("Choose a run folder and an image, then Predict.")
        self.status.setWordWrap(True)

        self.batch_source_combo = QComboBox()
        self.batch_source_combo.addItems([BATCH_FOLDER, BATCH_LAYERS])
        self.batch_folder_edit = QLineEdit()
        self.batch_folder_edit.setPlaceholderText("folder of NIfTI / DICOM / PNG images")
        self.batch_out_edit = QLineEdit()
        self.batch_out_edit.setPlaceholderText("output folder (maps and scores.csv)")
        self.batch_png_check = QCheckBox("PNG overlays")
        self.batch_png_check.setChecked(True)
        self.batch_button = push_button("Predict batch", self.run_batch)
        self.batch_cancel_button = push_button("Cancel", self.cancel)
        self.batch_cancel_button.setEnabled(False)
        self.batch_table = _table(
            ["image", "score", "disagreement", "status"],
            120,
            "Ranked by sample score; click an image to open it with its heatmap.",
        )
        self.batch_table.itemSelectionChanged.connect(self._batch_row_selected)
        self.batch_source_combo.currentIndexChanged.connect(
            lambda *_: self.batch_folder_edit.setEnabled(
                self.batch_source_combo.currentText() == BATCH_FOLDER
            )
        )

        form = QFormLayout()
        run_row = QHBoxLayout()
        run_row.setContentsMargins(0, 0, 0, 0)
        run_row.addWidget(self.run_edit)
        run_row.addWidget(browse)
        run_widget = QWidget()
        run_widget.setLayout(run_row)
        form.addRow("run", run_widget)
        form.addRow("", self.builtin_combo)
        form.addRow("image", self.image_combo)
        form.addRow("keep inside", self.mask_combo)
        if self.mask_note.text():
            form.addRow("", self.mask_note)
        form.addRow("device", self.device_combo)
        form.addRow("TTA", self.tta_check)
        form.addRow("sides", self.contra_check)
        form.addRow(_pair(self.predict_button, self.cancel_button))
        form.addRow(self.score_label)
        form.addRow("threshold", self.threshold_slider)
        form.addRow("healthy reference", self.reference_combo)
        form.addRow("percentile", self.percentile_spin)
        form.addRow(self.reference_button)
        batch_box = QGroupBox("Batch")
        batch_form = QFormLayout(batch_box)
        batch_form.addRow("images", self.batch_source_combo)
        batch_form.addRow(
            "folder", _pair(self.batch_folder_edit, browse_button(self, self.batch_folder_edit))
        )
        batch_form.addRow(
            "output", _pair(self.batch_out_edit, browse_button(self, self.batch_out_edit))
        )
        batch_form.addRow(_pair(self.batch_png_check, self.batch_button, self.batch_cancel_button))
        batch_form.addRow(self.batch_table)
        layout = scrolling_layout(self)
        layout.addLayout(form)
        layout.addWidget(self.table)
        layout.addWidget(_pair(self.export_button, self.save_button))
        layout.addWidget(batch_box)
        layout.addWidget(self.status)

        self._threshold_timer = QTimer(self)
        self._threshold_timer.setSingleShot(True)
        self._threshold_timer.setInterval(60)
        self._threshold_timer.timeout.connect(self.apply_threshold)
        self.threshold_slider.valueChanged.connect(lambda *_: self._threshold_timer.start())
        napari_viewer.layers.events.removed.connect(self._layer_removed)
        RUN_BUS.run_finished.connect(self.set_run)
        if RUN_BUS.last_run:
            self.set_run(RUN_BUS.last_run)

    # ----------------------------------------------------------------------------- state
    @property
    def busy(self) -> bool:
        return self._worker is not None

    def wait(self, timeout_s: float = 60.0) -> bool:
        """Process events until the running prediction is done; True if it ended."""
        return wait_until(lambda: self._worker is None, timeout_s)

    def _is_output(self, layer) -> bool:
        return layer in (self.heatmap_layer, self.disagreement_layer) or layer.name.endswith(
            (ANOMALY, DISAGREEMENT)
        )

    def set_run(self, run_dir: str) -> None:
        """Use this run folder (the training widget calls it when a run finishes)."""
        self.run_edit.setText(str(run_dir))
        self.status.setText(f"run {run_dir} ready: choose an image and Predict.")

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Run folder (mtml train --out)")
        if folder:
            self.set_run(folder)

    def _layer_removed(self, event=None) -> None:
        layer = getattr(event, "value", None)
        for attr in ("heatmap_layer", "disagreement_layer", "labels_layer"):
            if getattr(self, attr) is layer:
                setattr(self, attr, None)
        if layer is self._source_layer:
            self._source_layer = None
        self._reference_cache = {
            k: v for k, v in self._reference_cache.items() if k[0] != id(layer)
        }

    def closeEvent(self, event) -> None:
        self.cancel()  # closing the dock must not leave a prediction running
        super().closeEvent(event)

    # ----------------------------------------------------------------------------- predict
    def _ensemble(self, run_dir: str, device: str):
        """The loaded run (cached per folder, device and the run's files on disk; worker
        thread). A run trained fold by fold (or cancelled) is still usable: its folds that have
        a best.pt are loaded, and the score line says how many of the split's folds they are."""
        from napari_mtml.builtin import resolve_run
        from napari_mtml.inference import load_ensemble, run_stamp

        folder = resolve_run(run_dir).expanduser()
        if not folder.is_dir():
            raise ValueError(
                f"run folder '{folder}' does not exist: choose the folder that "
                "training wrote (it holds config.json and fold_K/best.pt)."
            )
        key = (run_stamp(folder), device)
        if key not in self._ensembles:
            self._ensembles = {key: load_ensemble(folder, device=device, folds="available")}
        return key, self._ensembles[key]

    def _contralateral(self):
        """What the "compare left and right" box asks of `Ensemble.predict` (read in the GUI
        thread)."""
        return "auto" if self.contra_check.isChecked() else False

    def _job(self, run_dir, device, scan, mask_choice, tta=False, contralateral="auto"):
        """The worker: load the run, the mask, then predict (mirrored too with `tta`); each
        step can be cancelled before it."""
        yield "loading the run"
        _, ensemble = self._ensemble(run_dir, device)
        mask = mask_choice
        if isinstance(mask_choice, str):  # MASK_AUTO
            from napari_mtml.batch import auto_brain_mask

            yield "finding the brain"
            mask = auto_brain_mask(None, scan)  # 2D images keep their foreground
        yield f"predicting with {len(ensemble.folds)} fold model(s)"
        return ensemble.predict(
            scan, mask=mask, fold_scores=True, tta=tta, contralateral=contralateral
        )

    def _builtin_chosen(self, text: str) -> None:
        if text and text != BUILTIN_PICK:
            self.set_run(text)

    def _mask_choice(self, scan):
        """What the mask combo asks for: None (the foreground), MASK_AUTO, or a bool array from
        a Labels layer on the image's grid (ValueError when its shape differs)."""
        if self.mask_combo.current_extra() == MASK_AUTO:
            if not brain_available():
                raise ValueError(f"the automatic brain mask needs the brain extra: {INSTALL_HINT}")
            return MASK_AUTO
        layer = self.mask_combo.current_layer()
        if layer is None:
            return None
        mask = np.asarray(layer.data) > 0
        if mask.shape != tuple(scan.array.shape):
            raise ValueError(
                f"the Labels layer '{layer.name}' has shape {mask.shape}, the image "
                f"{tuple(scan.array.shape)}: choose a mask drawn on this image"
            )
        return mask

    def _check_run_chosen(self) -> None:
        if not self.run_edit.text().strip():
            raise ValueError(
                "no run folder chosen: train one with the Training widget or "
                "`mtml train`, then choose its folder."
            )

    def _start(self, job, args: tuple, desc: str, steps: int, on_return) -> None:
        """Run the generator `job(run_dir, device, *args)` (the run folder and the device the
        fields name) with the buttons, a napari progress bar of `steps` and cancel wired."""
        self._cancelled = False
        for button in (self.predict_button, self.reference_button, self.batch_button):
            button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.batch_cancel_button.setEnabled(True)
        self.progress = cancelable_bar(steps, desc, self.cancel)
        run = (self.run_edit.text().strip(), self.device_combo.currentText())
        self._worker = start_worker(
            job,
            *run,
            *args,
            on_yield=self._step,
            on_return=on_return,
            on_error=self._error,
            on_finish=self._done,
            on_abort=self._aborted,
        )

    def _step(self, event) -> None:
        from napari_mtml.batch import BatchItem

        if isinstance(event, BatchItem):
            self._batch_item(event)
            text = f"{event.index + 1}/{event.total} {event.name}"
        else:
            text = str(event)
            self.status.setText(f"{text} …")
        bar = self.progress  # napari may process events while it draws the bar
        if bar is not None:
            bar.set_description(text)
            bar.update(1)

    def predict(self) -> None:
        """Predict the chosen image layer in a worker thread (progress bar, cancelable)."""
        if self._worker is not None:
            return
        layer = self.image_combo.current_layer()
        try:
            self._check_run_chosen()
            scan = scan_from_layer(layer, "Predict")
            mask_choice = self._mask_choice(scan)
        except ValueError as exc:
            self._error(exc)
            return
        self.status.setText(f"predicting '{layer.name}' …")
        steps = 3 if isinstance(mask_choice, str) else 2  # an automatic mask is a step
        show = partial(self._show, layer)
        args = (scan, mask_choice, self.tta_check.isChecked(), self._contralateral())
        self._start(self._job, args, f"mtml heatmap: {layer.name}", steps, show)

    def cancel(self) -> None:
        """Stop the running prediction after its current step; its result is dropped."""
        if self._worker is not None and not self._cancelled:
            self._cancelled = True
            self.status.setText("cancelling after the current step …")
            self._worker.quit()

    def _aborted(self) -> None:
        if self.batch_items and self._batch_running:
            done = sum(item.error is None for item in self.batch_items)
            self.status.setText(
                f"batch cancelled after {len(self.batch_items)} image(s); "
                f"scores.csv lists the {done} done."
            )
        else:
            self.status.setText("cancelled: nothing was changed.")
        notify_info("Heatmap: cancelled")

    def _map_layer(self, current, data, source, suffix: str):
        """The layer that shows the map `data` of the image layer `source` (named after it and
        `suffix`, styled by `MAP_STYLES`): `current` updated, or a new one."""
        return set_or_add_image(
            self.viewer, current, data, source.name + suffix, source, **MAP_STYLES[suffix]
        )

    def _show(self, layer, prediction) -> None:
        if prediction is None or layer not in self.viewer.layers:
            return
        if layer is not self._source_layer:
            # another image: its own output layers (the previous image keeps its heatmap)
            self.heatmap_layer = self.disagreement_layer = self.labels_layer = None
        self.prediction = prediction
        self._source_layer = layer
        self.heatmap_layer = self._map_layer(self.heatmap_layer, prediction.anomaly, layer, ANOMALY)
        self.disagreement_layer = self._map_layer(
            self.disagreement_layer, prediction.disagreement, layer, DISAGREEMENT
        )
        folds = ", ".join(f"{s:.3f}" for s in getattr(prediction, "fold_scores", ()))
        ens = next(iter(self._ensembles.values()), None)
        note = ""
        if ens is not None:
            note = f"\n{len(ens.folds)} of {ens.n_folds} fold models: {list(ens.folds)}"
        method = getattr(prediction, "score_method", "")
        how = (
            score_description(method, np.shape(prediction.anomaly))
            if method in SAMPLE_SCORES
            else None
        )
        # a note on the input stays beside the score it qualifies until the next prediction
        warned = "".join(f"\nwarning: {n}" for n in getattr(prediction, "notes", ()))
        self.score_label.setText(
            ("sample score" + (f" ({how})" if how else "") + f": {prediction.score:.4f}")
            + (f"\nper fold: {folds}" if folds else "")
            + note
            + warned
        )
        self.status.setText(f"heatmap of '{layer.name}' ready.")
        healthy = self._calibrated_threshold(ens, prediction)
        if healthy is not None:
            self.threshold_slider.setValue(healthy)
        self.apply_threshold()
        if healthy is not None:
            self.status.setText(
                f"{self.status.text()}; the run's healthy threshold: 99 % of healthy "
                "voxels stay under it"
            )
        for note in getattr(prediction, "notes", ()):  # an image unlike the run's training data
            notify_warning(f"Heatmap: {note}")

    def _calibrated_threshold(self, ens, prediction=None) -> float | None:
        """The run's healthy 99th percentile (`napari_mtml.calibration`) the first time a run
        with a calibration predicts; None afterwards (the user's threshold stays) or without.
        That of the maps with the two sides compared where this prediction compared them,
        else that of the models' own maps where the calibration has it."""
        from napari_mtml.calibration import thresholds_for

        cal = getattr(ens, "calibration", None)
        if not cal or self._calibrated_run == ens.run_dir:
            return None
        self._calibrated_run = ens.run_dir
        compared = getattr(prediction, "midplane", None) is not None
        return thresholds_for(cal, "auto" if compared else False).get("99")

    def _error(self, exc) -> None:
        self.status.setText(f"error: {exc}")
        notify_error("Heatmap", exc)

    def _done(self) -> None:
        self._worker = None
        self._batch_running = False
        for button in (self.predict_button, self.reference_button, self.batch_button):
            button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.batch_cancel_button.setEnabled(False)
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    # ----------------------------------------------------------------------------- batch
    def _batch_inputs(self) -> tuple[list, int]:
        """What the batch predicts: paths (a folder) or in-memory Scans (the open layers)."""
        if self.batch_source_combo.currentText() == BATCH_LAYERS:
            layers = [
                ly
                for ly in self.viewer.layers
                if isinstance(ly, Image)
                and not self._is_output(ly)
                and not getattr(ly, "rgb", False)
            ]
            if not layers:
                raise ValueError("no image layers are open: open scans first, or predict a folder.")
            scans, used = [], set()
            self._batch_sources = {}
            for layer in layers:
                scan = scan_from_layer(layer, "Batch")
                name = safe_name(layer.name)
                while name in used:
                    name += "_"
                used.add(name)
                scan.metadata["name"] = name
                self._batch_sources[name] = (layer, dict(scan.metadata), scan.ndim)
                scans.append(scan)
            return scans, len(scans)
        from napari_mtml.batch import expand_images

        folder = self.batch_folder_edit.text().strip()
        if not folder:
            raise ValueError(
                "no input folder chosen: type or browse a folder of images, or "
                "predict all open image layers."
            )
        if not Path(folder).expanduser().is_dir():
            raise ValueError(f"input folder '{folder}' does not exist.")
        paths = expand_images([Path(folder).expanduser()])
        self._batch_sources = {}
        return paths, len(paths)

    def run_batch(self) -> None:
        """Predict every image of the folder (or every open image layer) in a worker."""
        if self._worker is not None:
            return
        out_dir = self.batch_out_edit.text().strip()
        try:
            self._check_run_chosen()
            if not out_dir:
                raise ValueError(
                    "no output folder chosen: choose where the maps and scores.csv go."
                )
            inputs, n = self._batch_inputs()
            auto_mask = self.mask_combo.current_extra() == MASK_AUTO
            if auto_mask and not brain_available():
                # the same refusal as a single Predict: a batch must not quietly drop the mask
                raise ValueError(f"the automatic brain mask needs the brain extra: {INSTALL_HINT}")
        except (ValueError, OSError) as exc:
            self._error(exc)
            return
        self.batch_items = []
        self.batch_result = None
        self.batch_table.setRowCount(0)
        self._batch_running = True
        self.status.setText(f"batch of {n} image(s) into {out_dir} …")
        # the widgets are read here, in the GUI thread, not by the worker
        args = (
            inputs,
            Path(out_dir).expanduser(),
            self.batch_png_check.isChecked(),
            auto_mask,
            self.tta_check.isChecked(),
            self._contralateral(),
        )
        self._start(self._batch_job, args, "mtml batch", n + 1, self._batch_done)

    def _batch_job(
        self,
        run_dir,
        device,
        inputs,
        out_dir,
        png,
        auto_mask=False,
        tta=False,
        contralateral="auto",
    ):
        """The worker: the run, then the core's batch generator (closing this closes it)."""
        from napari_mtml.batch import predict_batch

        yield "loading the run"
        _, ensemble = self._ensemble(run_dir, device)
        mask_for = None
        if auto_mask:
            from napari_mtml.batch import auto_brain_mask

            mask_for = auto_brain_mask
        result = yield from predict_batch(
            ensemble,
            inputs,
            out_dir,
            png=png,
            mask_for=mask_for,
            predict_kwargs={"tta": bool(tta), "contralateral": contralateral},
        )
        return result

    def _batch_item(self, item) -> None:
        self.batch_items.append(item)
        # ranked: highest sample score first, failures last
        self.batch_items.sort(
            key=lambda it: (
                it.error is not None,
                -(it.score if it.score is not None else 0.0),
                it.index,
            )
        )
        self._fill_batch_table()

    def _fill_batch_table(self) -> None:
        self.batch_table.blockSignals(True)
        self.batch_table.clearSelection()
        self.batch_table.setRowCount(len(self.batch_items))
        for row, item in enumerate(self.batch_items):
            ok = item.error is None
            shown = (
                self._batch_sources[item.name][0].name
                if item.name in self._batch_sources
                else item.name
            )  # a layer by its own name
            notes = getattr(item, "notes", ())
            cells = (
                shown,
                f"{item.score:.4f}" if ok else "-",
                f"{item.mean_disagreement:.4f}" if ok else "-",
                ("done, with a warning" if notes else "done") if ok else "failed",
            )
            for col, text in enumerate(cells):
                cell = QTableWidgetItem(text)
                cell.setFlags(cell.flags() & ~Qt.ItemFlag.ItemIsEditable)
                if not ok:
                    cell.setToolTip(item.error)
                elif notes:
                    cell.setToolTip("\n".join(notes))
                self.batch_table.setItem(row, col, cell)
        self.batch_table.blockSignals(False)

    def _batch_done(self, result) -> None:
        if result is None:
            return
        self.batch_result = result
        failed = len(result.failures)
        warned = sum(1 for item in result.items if getattr(item, "notes", ()))
        self.status.setText(
            f"batch done: {len(result.items) - failed} of {len(result.items)} "
            f"image(s) predicted; {result.scores_csv}"
            + (f"; {failed} failed (hover the table)" if failed else "")
            + (f"; {warned} with a warning (hover the table)" if warned else "")
        )
        notify_info(f"Heatmap: batch written to {result.out_dir}")

    def _batch_row_selected(self) -> None:
        rows = {i.row() for i in self.batch_table.selectedItems()}
        if len(rows) == 1:
            self.open_batch_item(rows.pop())

    def open_batch_item(self, row: int) -> None:
        """Open the image of a batch row (or reuse its layer) with its heatmap, which becomes
        the widget's current result (threshold, regions, save)."""
        if not 0 <= row < len(self.batch_items):
            return
        item = self.batch_items[row]
        if item.error is not None:
            notify_error("Heatmap", item.error)
            return
        try:
            layer, anomaly, spread = self._load_batch_item(item)
        except (ValueError, OSError) as exc:
            self._error(exc)
            return
        layer.visible = True
        self.viewer.layers.selection.active = layer
        self._show(
            layer,
            SimpleNamespace(
                anomaly=anomaly,
                disagreement=spread,
                score=item.score,
                score_method=item.score_method or "",
                fold_scores=(),
                notes=tuple(item.notes),
            ),
        )
        for out in (self.heatmap_layer, self.labels_layer):
            if out is not None:
                out.visible = True
        # show the image where its heatmap peaks
        self._go_to(layer, np.unravel_index(int(np.argmax(anomaly)), anomaly.shape))
        self.status.setText(
            f"{layer.name}: sample score {item.score:.4f} (batch rank "
            f"{row + 1} of {len(self.batch_items)})"
        )

    def _load_batch_item(self, item):
        """(image layer, anomaly, disagreement) of a batch item, the maps on the layer's grid."""
        from napari_mtml.io import read_image, read_map

        from .reader import layer_data_from_scan

        if item.name in self._batch_sources:  # a layer input: maps back onto its grid
            layer, metadata, ndim = self._batch_sources[item.name]
            if layer not in self.viewer.layers:
                raise ValueError(
                    f"layer '{item.name}' was closed; its maps are in {item.anomaly_path.parent}."
                )
            maps = [
                read_map(p, metadata, ndim) for p in (item.anomaly_path, item.disagreement_path)
            ]
            return layer, maps[0], maps[1]
        layer = self._batch_opened.get(str(item.path))
        scan = read_image(item.path)
        if layer is None or layer not in self.viewer.layers:
            data, kwargs, _ = layer_data_from_scan(scan, item.name)
            layer = self.viewer.add_image(data, **kwargs)
            self._batch_opened[str(item.path)] = layer
        # the maps were written in the input's own geometry: read back on the same grid
        maps = [
            read_map(p, scan.metadata, scan.ndim)
            for p in (item.anomaly_path, item.disagreement_path)
        ]
        return layer, maps[0], maps[1]

    # ----------------------------------------------------------------------------- threshold
    def apply_threshold(self) -> None:
        """Labels layer, its `features` and the table of the regions above the threshold."""
        self._threshold_timer.stop()
        layer = self._source_layer
        if self.prediction is None or layer is None:
            return
        ndim = self.prediction.anomaly.ndim
        spacing = layer_spacing(layer)[-ndim:]
        labels, self.regions = regions_above(
            self.prediction.anomaly,
            self.threshold_slider.value(),
            spacing,
            voxel_size=voxel_volume(layer),
        )
        self.labels_layer = set_or_add_labels(
            self.viewer, self.labels_layer, labels, layer.name + SUSPICIOUS, layer, opacity=0.5
        )
        if self.heatmap_layer is not None:  # for "iso" rendering in 3D: the same surface
            self.heatmap_layer.iso_threshold = float(self.threshold_slider.value())
        self.labels_layer.features = self.region_table()
        unit = "mm²" if ndim == 2 else "mm³"
        shown = self.regions[:MAX_ROWS]
        self.table.blockSignals(True)
        self.table.clearSelection()
        self.table.setRowCount(len(shown))
        for row, r in enumerate(shown):
            for col, text in enumerate(
                (str(r.label), f"{r.size_mm:.1f} {unit}", f"{r.peak:.3f}", f"{r.mean:.3f}")
            ):
                item = QTableWidgetItem(text)
                item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
                self.table.setItem(row, col, item)
        self.table.blockSignals(False)
        more = f" (table shows the {MAX_ROWS} largest)" if len(self.regions) > MAX_ROWS else ""
        self.status.setText(
            f"{len(self.regions)} region(s) at threshold {self.threshold_slider.value():.3f}{more}"
        )

    def region_table(self) -> dict[str, list]:
        """The regions as columns (also the Labels layer's `features`; `index` = label value).

        `size_mm` is mm^2 (2D) or mm^3 (3D); `centre_*` is the world position (the viewer's
        axes, in mm) of the region's centre of mass (`napari_mtml.regions.region_table`).
        """
        ndim = 0 if self.prediction is None else self.prediction.anomaly.ndim
        return region_table(self.regions, ndim, self._to_world())

    def _to_world(self):
        layer = self._source_layer
        return None if layer is None else layer.data_to_world

    def _row_selected(self) -> None:
        rows = {i.row() for i in self.table.selectedItems()}
        if len(rows) == 1:
            item = self.table.item(rows.pop(), 0)
            if item is not None:
                self.show_region(int(item.text()))

    def show_region(self, label: int) -> None:
        """Centre the view on a region (its voxel nearest its centre of mass: always inside it,
        even for a curved region) and make its label the selected one of the Labels layer."""
        labels = self.labels_layer
        region = next((r for r in self.regions if r.label == label), None)
        if labels is None or region is None:
            return
        centre = nearest_voxel(labels.data, region)
        if centre is None:
            return
        self._go_to(labels, centre)
        labels.selected_label = int(label)
        labels.visible = True

    def _go_to(self, layer, index) -> None:
        """Move the sliders to the data `index` of `layer` and centre the camera on it."""
        world = np.asarray(layer.data_to_world(np.asarray(index, dtype=float)), dtype=float)
        dims = self.viewer.dims
        offset = dims.ndim - len(world)  # the viewer may hold layers with more dimensions
        for axis in range(len(world)):
            if offset + axis not in dims.displayed:
                dims.set_point(offset + axis, float(world[axis]))
        shown = [float(world[d - offset]) for d in dims.displayed if d - offset >= 0]
        viewer_camera(self.viewer).center = tuple(shown)

    def export_csv(self, path: str | Path | None = None) -> Path | None:
        """Write the region table as CSV (one row per region); returns the path."""
        if not self.regions:
            notify_error(
                "Heatmap",
                "no regions to export: Predict an image and set a threshold "
                "with at least one region above it.",
            )
            return None
        if path is None:
            name = self._source_layer.name if self._source_layer is not None else "regions"
            path, _ = QFileDialog.getSaveFileName(
                self, "Export regions", f"{name}_regions.csv", "CSV (*.csv)"
            )
            if not path:
                return None
        path = Path(path)
        try:
            write_regions_csv(
                path,
                self.regions,
                self.threshold_slider.value(),
                self.prediction.anomaly.ndim,
                self._to_world(),
            )
        except ValueError as exc:
            self._error(exc)
            return None
        except OSError as exc:
            self._error(ValueError(f"{path}: could not write the CSV file ({exc})."))
            return None
        self.status.setText(f"exported {len(self.regions)} region(s) to {path}")
        return path

    def threshold_from_reference(self) -> None:
        """Set the threshold to the chosen percentile of a healthy layer's foreground scores."""
        if self._worker is not None:
            return
        ref = self.reference_combo.current_layer()
        pct = self.percentile_spin.value()
        try:
            self._check_run_chosen()
            scan = scan_from_layer(ref, "the healthy reference")
        except ValueError as exc:
            self._error(exc)
            return
        self.status.setText(f"predicting the healthy reference '{ref.name}' …")
        desc = f"mtml reference: {ref.name}"
        args = (scan, ref, pct, self.tta_check.isChecked(), self._contralateral())
        self._start(self._reference_job, args, desc, 2, self._set_threshold)

    def _reference_job(self, run_dir, device, scan, ref, pct, tta=False, contralateral="auto"):
        yield "loading the run"
        run_key, ensemble = self._ensemble(run_dir, device)
        # the run's files are in the key: a run retrained in the same folder predicts again;
        # a threshold for mirrored maps comes from the reference's mirrored map
        key = (id(ref), id(ref.data), run_key, bool(tta), contralateral)
        if key not in self._reference_cache:
            yield "predicting the healthy reference"
            self._reference_cache[key] = healthy_scores(
                ensemble, scan, tta=tta, contralateral=contralateral
            )
        return percentile_threshold(self._reference_cache[key], pct), ref.name

    def _set_threshold(self, value_and_name) -> None:
        if value_and_name is None:
            return
        value, name = value_and_name
        self.threshold_slider.setValue(value)
        self.apply_threshold()
        notify_info(
            f"Heatmap: threshold {value:.4f} = {self.percentile_spin.value():g}th "
            f"percentile of '{name}' foreground scores"
        )

    # ----------------------------------------------------------------------------- save
    def save(self, path: str | Path | None = None) -> Path | None:
        """Write the heatmap as NIfTI on the image's original geometry; returns the path."""
        from napari_mtml.io import write_image

        layer = self._source_layer
        if self.prediction is None or layer is None:
            notify_error("Heatmap", "nothing to save: Predict an image first.")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self, "Save heatmap", f"{layer.name}_anomaly.nii.gz", "NIfTI (*.nii.gz *.nii)"
            )
            if not path:
                return None
        path = Path(path)
        if not path.name.endswith((".nii", ".nii.gz")):
            path = path.with_name(path.name + ".nii.gz")
        try:
            write_image(path, self.prediction.anomaly, like=scan_from_layer(layer, "Save"))
        except (ValueError, OSError) as exc:
            self._error(exc)
            return None
        self.status.setText(f"saved {path}")
        return path


def _table(headers: list[str], min_height: int, tip: str) -> QTableWidget:
    """A table of whole rows, one selectable at a time, its columns sharing the width."""
    table = QTableWidget(0, len(headers))
    table.setHorizontalHeaderLabels(headers)
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
    table.verticalHeader().setVisible(False)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    table.setToolTip(tip)
    table.setMinimumHeight(min_height)
    return table


def _pair(*widgets) -> QWidget:
    box = QHBoxLayout()
    box.setContentsMargins(0, 0, 0, 0)
    for w in widgets:
        box.addWidget(w)
    holder = QWidget()
    holder.setLayout(box)
    return holder
