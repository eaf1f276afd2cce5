"""Screenshots of the three widgets on the built-in real sample data.

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshots.py [--steps 60]
        [--heatmap-run mtml-demo/run]

Writes (the whole napari window, widget docked) docs/preview_widget.png, docs/training_widget.png,
docs/heatmap_widget.png (the region table with a region clicked: view centred on it, its label
selected), docs/heatmap_batch.png (a batch over open image layers, ranked by sample score) and
docs/heatmap_3d.png (the heatmap over the scan in napari's 3D view). The training screenshot
comes from a short real run (fold 0 of the 1/4 split, a small U-Net, axial slices of the healthy
MNI152 brain); the heatmap screenshots predict the clinical brain-tumour MRI with that run, or
with `--heatmap-run` (e.g. `mtml demo`'s OUT/run, trained on the tumour MRI's own lesion-free
slices). A short run is a demonstration of the GUI, not a trained detector.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
from PIL import Image as PILImage
from qtpy.QtWidgets import QApplication

from napari_mtml.samples import sample_data_path

DOCS = Path(__file__).resolve().parent
PLUGIN = "napari-mtml"


def _settle(seconds: float = 0.5) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.01)


def _wait(predicate, timeout: float = 600.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("the widget did not finish in time")
        QApplication.processEvents()
        time.sleep(0.01)


def _shot(viewer, name: str) -> None:
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    _settle(1.0)
    # let napari's own notifications ("Training finished", ...) time out as they do for a user
    # (their 4 s timer runs only while the window is active, which Xvfb without a window
    # manager does not keep up: start it as a mouse leaving the toast would)
    window = viewer.window._qt_window
    for toast in window.findChildren(NapariQtNotification):
        if toast.isVisible():
            toast.timer_start()
    _wait(
        lambda: not any(t.isVisible() for t in window.findChildren(NapariQtNotification)),
        timeout=20.0,
    )
    _settle(0.5)
    PILImage.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(DOCS / name)
    print(f"wrote {DOCS / name}")


def _show_slice(viewer, z: int) -> None:
    step = list(viewer.dims.current_step)
    step[0] = z
    viewer.dims.current_step = tuple(step)


def preview(viewer) -> None:
    # The isotropic 1 mm MNI brain: on the 6.5 mm slices of the tumour MRI the tasks' voxel-space
    # shapes look like thin slanted plates when cut by one slice.
    viewer.open_sample(PLUGIN, "healthy_brain")
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Anomaly preview")
    widget.image_combo.set_layer(viewer.layers["MNI152 T1"])
    widget.task_combo.setCurrentText("4 smooth_intensity")
    widget.sliders["intensity_scale"].setValue(0.5)
    widget.seed_spin.setValue(3)
    _wait(lambda: widget.n_updates > 0 and not widget.busy)
    label = widget.label_layer.data
    z = int(np.argmax(label.reshape(label.shape[0], -1).sum(axis=1)))
    _show_slice(viewer, z)
    viewer.layers["MNI152 T1"].visible = False
    _shot(viewer, "preview_widget.png")
    viewer.window.remove_dock_widget(dock)
    viewer.layers.clear()


def training(viewer, run_dir: Path, steps: int):
    viewer.open_sample(PLUGIN, "healthy_brain")
    _show_slice(viewer, 100)
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Training")
    widget.healthy_edit.setText(str(sample_data_path("mni152_t1")))
    widget.out_edit.setText(str(run_dir))
    widget.dims_combo.setCurrentText("2")
    widget.fold_combo.setCurrentText("0")
    widget.time_spin.setValue(0)
    widget.steps_spin.setValue(steps)
    widget.batch_spin.setValue(8)
    widget.val_spin.setValue(max(1, steps // 6))
    widget.val_size_spin.setValue(16)
    widget.preset_combo.setCurrentText("light")
    widget.depth_spin.setValue(4)
    widget.width_spin.setValue(8)
    widget.device_combo.setCurrentText("auto")
    widget.start()
    _wait(lambda: widget.worker is None)
    bar = widget.scroll_area.verticalScrollBar()  # the dock scrolls: show the live plot
    bar.setValue(bar.maximum())
    _shot(viewer, "training_widget.png")
    viewer.window.remove_dock_widget(dock)
    viewer.layers.clear()
    return widget.run_dir


def heatmap(viewer, run_dir: str, out_dir: Path) -> None:
    from napari_mtml._napari._common import viewer_camera

    viewer.open_sample(PLUGIN, "brain_tumour")
    image = viewer.layers["brain1 T1 (tumour)"]
    tumour = viewer.layers["tumour label"]
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Heatmap")
    widget.set_run(run_dir)
    widget.image_combo.set_layer(image)
    widget.predict()
    _wait(lambda: not widget.busy)
    if widget.prediction is None:
        raise RuntimeError(widget.status.text())
    heat = widget.prediction.anomaly
    widget.threshold_slider.setValue(float(np.quantile(heat[heat > 0], 0.99)))
    widget.apply_threshold()
    tumour.visible = False
    # the region table with a region clicked: the view centres on it, its label is selected
    inside = np.asarray(tumour.data) > 0
    labels = np.asarray(widget.labels_layer.data)
    overlap = [int(((labels == r.label) & inside).sum()) for r in widget.regions[:100]]
    row = int(np.argmax(overlap)) if max(overlap, default=0) > 0 else 0
    widget.table.selectRow(row)
    widget.table.scrollToItem(widget.table.item(row, 0))
    _shot(viewer, "heatmap_widget.png")

    # 3D: the scan faint, the heatmap as an attenuated MIP from 0.1 to its maximum
    widget.labels_layer.visible = False
    viewer.dims.ndisplay = 3
    viewer_camera(viewer).angles = (-20.0, 30.0, 120.0)
    viewer_camera(viewer).zoom = 2.2
    image.opacity = 0.35
    widget.heatmap_layer.contrast_limits = (0.1, float(heat.max()))
    widget.heatmap_layer.opacity = 0.9
    _shot(viewer, "heatmap_3d.png")
    viewer.dims.ndisplay = 2
    image.opacity = 1.0
    widget.heatmap_layer.contrast_limits = (0.0, 1.0)
    widget.heatmap_layer.opacity = 0.6

    # batch over open image layers: the scan and thick slabs of it (with and without tumour)
    for name, (z0, z1) in (
        ("slices 0-10 (no tumour)", (0, 11)),
        ("slices 11-17 (tumour)", (11, 18)),
        ("slices 18-24 (no tumour)", (18, 25)),
    ):
        translate = np.asarray(image.translate, dtype=float)
        translate[0] += z0 * image.scale[0]
        viewer.add_image(
            np.asarray(image.data)[z0:z1],
            name=name,
            scale=image.scale,
            translate=translate,
            colormap="gray",
            visible=False,
        )
    widget.batch_source_combo.setCurrentText("all open image layers")
    widget.batch_out_edit.setText(str(out_dir))
    widget.run_batch()
    _wait(lambda: not widget.busy)
    for layer in list(viewer.layers):  # the earlier results out of the way
        if layer.name.startswith("brain1 T1 (tumour) "):
            layer.visible = False
    widget.batch_table.selectRow(0)
    _shot(viewer, "heatmap_batch.png")
    viewer.window.remove_dock_widget(dock)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps of the demo run")
    parser.add_argument(
        "--heatmap-run",
        default=None,
        help="predict the heatmap with this run folder (e.g. `mtml demo`'s "
        "OUT/run, trained on the tumour MRI's own lesion-free slices) instead "
        "of the short MNI152 run of the training screenshot",
    )
    args = parser.parse_args()
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    # the active window, as on a desktop: napari's notifications then time out by themselves
    viewer.window._qt_window.activateWindow()
    _settle(1.0)
    preview(viewer)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = training(viewer, Path(tmp) / "run", args.steps)
        heatmap(viewer, args.heatmap_run or run_dir, Path(tmp) / "batch")
    viewer.close()


if __name__ == "__main__":
    main()
