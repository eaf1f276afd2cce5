"""The training widget: a tiny run in a worker, cancel, bad input; the run offered onward."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.qt

PLUGIN = "napari-mtml"


def _healthy_folder(folder, n=6, shape=(96, 96)):
    """n small 2D 'brains' (textured discs on zero background) as 2D NIfTI files."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    for i in range(n):
        inside = (yy / 0.8) ** 2 + (xx / (0.6 + 0.03 * i)) ** 2 < 1
        img = (50 + 10 * rng.standard_normal(shape)) * inside
        nib.save(nib.Nifti1Image(img.astype(np.float32).T, np.eye(4)), folder / f"h{i}.nii.gz")
    return folder


def _fill(widget, healthy, out, steps):
    widget.healthy_edit.setText(str(healthy))
    widget.out_edit.setText(str(out))
    widget.frame_edit.setText("64,64")
    widget.dims_combo.setCurrentText("2")  # our io reads a 2D NIfTI as one (1, H, W) slice
    widget.fold_combo.setCurrentText("0")
    widget.time_spin.setValue(0)  # steps, not a time budget
    widget.steps_spin.setValue(steps)
    widget.batch_spin.setValue(2)
    widget.val_spin.setValue(2)
    widget.val_size_spin.setValue(4)
    widget.preset_combo.setCurrentText("light")
    widget.depth_spin.setValue(3)  # a tiny U-Net: the 64x64 frame gives 16x16 at the bottom
    widget.width_spin.setValue(8)
    widget.device_combo.setCurrentText("cpu")


def _start_long_run(make_napari_viewer, tmp_path):
    """A Training dock started on a run far longer than any test waits for: (viewer, dock,
    widget, the run folder)."""
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Training")
    out = tmp_path / "run"
    _fill(widget, _healthy_folder(tmp_path / "healthy"), out, steps=100_000)
    widget.start()
    return viewer, dock, widget, out


def test_training_runs_to_the_end_and_offers_the_run(make_napari_viewer, qtbot, tmp_path):
    from napari_mtml.training.events import RunFinished, StepEvent, ValidationEvent

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Training")
    _, heat = viewer.window.add_plugin_dock_widget(PLUGIN, "Heatmap")
    # Healthy data from open image layers (written to RUN/healthy_layers as NIfTI for the core).
    healthy = _healthy_folder(tmp_path / "healthy")
    names = []
    for path in sorted(healthy.iterdir()):
        names.append(path.name.split(".")[0])
        viewer.add_image(np.asarray(nib.load(path).dataobj).T, name=names[-1])
    out = tmp_path / "run"
    _fill(widget, tmp_path / "unused", out, steps=4)
    widget.set_layers(names)
    config = widget.config()
    assert config.max_steps == 4 and config.fold == 0 and config.frame == (64, 64)

    widget.start()
    assert widget.worker is not None and not widget.start_button.isEnabled()
    assert widget.wait(120), "the tiny run did not finish"
    steps = [e.step for e in widget.events if isinstance(e, StepEvent)]
    assert steps[-1] == 4
    assert any(isinstance(e, ValidationEvent) for e in widget.events)
    assert isinstance(widget.events[-1], RunFinished)
    assert widget.progress_bar.value() == widget.progress_bar.maximum() == 4
    assert (out / "fold_0" / "best.pt").is_file() and (out / "config.json").is_file()
    assert len(list((out / "healthy_layers").glob("*.nii.gz"))) == len(names)
    assert widget.ax_loss.lines and widget.ax_ap.lines  # the live plot drew loss and AP
    assert heat.run_edit.text() == str(out)  # offered to the heatmap widget
    assert widget.start_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_cancel_stops_within_a_step_and_keeps_the_checkpoint(
    make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    import torch

    import napari_mtml._napari.training_widget as tw
    from napari_mtml.training.events import RunFinished, StepEvent

    # Count the steps the core produced in the worker thread (the GUI sees them a little later).
    produced = []
    real_train = tw.train

    def counting_train(config):
        for event in real_train(config):
            if isinstance(event, StepEvent):
                produced.append(event.step)
            yield event

    monkeypatch.setattr(tw, "train", counting_train)
    _, _, widget, out = _start_long_run(make_napari_viewer, tmp_path)
    qtbot.waitUntil(lambda: len(produced) >= 3, timeout=60000)  # past the first validation
    widget.cancel()
    n_at_cancel = len(produced)
    assert widget.wait(30)
    assert len(produced) <= n_at_cancel + 1, "more than one step ran after Cancel"
    assert not any(isinstance(e, RunFinished) for e in widget.events)
    best = out / "fold_0" / "best.pt"
    assert best.is_file() and "kept" in widget.message.text()
    state = torch.load(best, weights_only=True)
    assert isinstance(state, dict) and state
    assert widget.start_button.isEnabled()


def test_closing_the_dock_cancels_the_run_and_keeps_the_checkpoint(
    make_napari_viewer, qtbot, tmp_path
):
    """napari's dock "x" sends the widget no close event, only takes it out of the dock: the
    widget notices and cancels its run as Cancel does (before, it trained on unseen)."""
    from napari_mtml.training.events import RunFinished, StepEvent

    viewer, dock, widget, out = _start_long_run(make_napari_viewer, tmp_path)
    qtbot.waitUntil(
        lambda: sum(isinstance(e, StepEvent) for e in widget.events) >= 3, timeout=60000
    )
    dock.close()  # the dock's "hide" (eye) button: training goes on
    n = sum(isinstance(e, StepEvent) for e in widget.events)
    qtbot.waitUntil(lambda: sum(isinstance(e, StepEvent) for e in widget.events) > n + 2)
    assert widget.worker is not None
    viewer.window.remove_dock_widget(widget)  # its "x": cancelled
    assert widget.wait(30), "the run went on after its dock was closed"
    assert not any(isinstance(e, RunFinished) for e in widget.events)
    assert (out / "fold_0" / "best.pt").is_file()


def test_training_bad_input_notifies(make_napari_viewer, qtbot, tmp_path, napari_errors):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Training")
    widget.start()  # nothing filled in
    assert widget.worker is None
    assert any("no healthy data" in m for m in napari_errors())

    empty = tmp_path / "empty"
    empty.mkdir()
    _fill(widget, empty, tmp_path / "run", steps=2)
    widget.start()  # the folder exists but holds nothing: the core says so, in a notification
    assert widget.wait(60)
    assert "error" in widget.message.text()
    assert len(napari_errors()) >= 2

    widget.source_combo.setCurrentText("open image layers")
    widget.start()  # no layer ticked
    assert any("no healthy image layer" in m for m in napari_errors())


def test_device_list_and_cpu_note(make_napari_viewer):
    import torch

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Training")
    items = [widget.device_combo.itemText(i) for i in range(widget.device_combo.count())]
    assert items[:2] == ["auto", "cpu"]
    if not torch.cuda.is_available():
        assert "cuda" not in items
        assert "CPU" in widget.device_note.text()


@pytest.mark.parametrize(
    "auto, note", [("cpu", "training runs on the CPU"), ("cuda", "auto = cuda (no fallback)")]
)
def test_the_device_note_is_a_warning_when_auto_is_the_cpu(
    make_napari_viewer, monkeypatch, auto, note
):
    """The colour follows what "auto" picks, not a word of the note's text."""
    import napari_mtml.devices as devices
    from napari_mtml._napari.training_widget import WARNING_COLOUR

    monkeypatch.setattr(
        devices, "device_choices", lambda: devices.DeviceChoices(("auto", "cpu"), auto, note)
    )
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Training")
    assert widget.device_note.text() == note
    assert (WARNING_COLOUR in widget.device_note.styleSheet()) == (auto == "cpu")


def test_live_plot_follows_napari_s_theme(make_napari_viewer):
    from matplotlib.colors import to_rgb

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Training")

    def luminance(colour) -> float:
        r, g, b = to_rgb(colour)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    viewer.theme = "dark"
    widget._theme_changed()
    assert luminance(widget.figure.get_facecolor()) < 0.3  # no white box in a dark window
    assert luminance(widget.ax_loss.get_facecolor()) < 0.3
    tick = widget.ax_ap.yaxis.get_ticklabels()[0]
    assert luminance(tick.get_color()) > 0.7  # readable text
    assert luminance(widget.ax_ap.yaxis.label.get_color()) > 0.7

    viewer.theme = "light"  # the theme event restyles the plot
    assert luminance(widget.figure.get_facecolor()) > 0.7
    assert luminance(widget.ax_ap.yaxis.get_ticklabels()[0].get_color()) < 0.3


def test_defaults_train_the_recipe_for_the_device_to_a_time_budget(make_napari_viewer, tmp_path):
    from napari_mtml.training.events import FoldStarted

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Training")
    widget.healthy_edit.setText(str(_healthy_folder(tmp_path / "healthy")))
    config = widget.config()
    assert (config.recipe, config.time_budget, config.max_steps) == ("auto", 900.0, None)
    assert config.preset is None and config.batch_size is None and config.val_interval is None
    assert config.init == "auto"  # the built-in model where it fits, decided with the data
    widget.init_edit.setText("builtin:brain-t1")
    widget.preset_combo.setCurrentText("small")
    config = widget.config()
    assert config.init == "builtin:brain-t1" and config.preset == "small"
    # the planned steps arrive with the first fold: the progress bar takes them
    widget._folds = 5
    widget._on_event(FoldStarted(0, 5, ("sink",), ("source",), 700))
    assert widget.progress_bar.maximum() == 3500


def test_browse_picks_healthy_files_or_a_folder(make_napari_viewer, monkeypatch):
    """The healthy-data field takes files as well as folders: its Browse offers both."""
    from qtpy.QtWidgets import QFileDialog

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Training")
    monkeypatch.setattr(
        QFileDialog,
        "getOpenFileNames",
        staticmethod(lambda *a, **k: (["/d/a.nii.gz", "/d/b.nii.gz"], "")),
    )
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", staticmethod(lambda *a, **k: "/d"))
    button = widget.healthy_edit.parent().findChildren(type(widget.start_button))
    menus = [b.menu() for b in button if b.menu() is not None]
    assert len(menus) == 1
    actions = {a.text(): a for a in menus[0].actions()}
    actions["Files…"].trigger()
    assert widget.healthy_edit.text() == "/d/a.nii.gz; /d/b.nii.gz"
    actions["Folder…"].trigger()
    assert widget.healthy_edit.text() == "/d"


def test_spin_ranges_and_tooltips_come_from_the_config(make_napari_viewer):
    from napari_mtml.config import settings

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Training")
    declared = settings()
    # 0 is "auto": the recipe's split
    assert (widget.tasks_spin.minimum(), widget.tasks_spin.maximum()) == (0, 4)
    assert widget.tasks_spin.value() == 0 and widget.tasks_spin.specialValueText()
    for spin, name in (
        (widget.tasks_spin, "train_tasks"),
        (widget.batch_spin, "batch_size"),
        (widget.depth_spin, "depth"),
        (widget.width_spin, "base_features"),
        (widget.seed_spin, "seed"),
        (widget.workers_spin, "workers"),
    ):
        assert spin.toolTip() == declared[name].help, name
