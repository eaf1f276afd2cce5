"""The anomaly preview widget, docked through the plugin manifest, on a real Qt viewer (Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.qt

PLUGIN = "napari-mtml"


def _dock(viewer, name="Anomaly preview"):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def _disc(shape, rng):
    """A bright textured disc/ball on a zero background: a foreground that tasks can use."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum(g**2 for g in grids) < 0.7
    image = (100 + 20 * rng.standard_normal(shape)) * inside
    return image.astype(np.float32)


def _next_update(qtbot, widget, after: int):
    qtbot.waitUntil(lambda: widget.n_updates > after and not widget.busy, timeout=20000)


def test_preview_updates_layers_in_place(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    rng = np.random.default_rng(0)
    image = _disc((64, 72), rng)
    layer = viewer.add_image(image, name="scan", scale=(0.5, 0.7), translate=(3.0, -4.0))
    before = image.copy()
    _next_update(qtbot, widget, 0)  # opening an image picks it and previews it

    assert widget.image_combo.current_layer() is layer
    preview, label = widget.preview_layer, widget.label_layer
    for out in (preview, label):
        assert out in viewer.layers
        np.testing.assert_allclose(out.scale, layer.scale)
        np.testing.assert_allclose(out.translate, layer.translate)
        assert out.data.shape == image.shape and out.data.dtype == np.float32
    assert label.blending == "additive"
    assert 0 <= label.data.min() and label.data.max() < 1
    assert label.data.max() > 0, "an anomaly must be labelled"
    np.testing.assert_array_equal(layer.data, before)  # the source is never touched
    n_layers = len(viewer.layers)

    # A slider change recomputes into the SAME two layers.
    old = preview.data.copy()
    count = widget.n_updates
    widget.task_combo.setCurrentIndex(1 + 4)  # smooth_intensity
    widget.sliders["intensity_scale"].setValue(1.5)
    _next_update(qtbot, widget, count)
    assert widget.last_result.task == "smooth_intensity"
    assert widget.preview_layer is preview and widget.label_layer is label
    assert len(viewer.layers) == n_layers
    assert not np.array_equal(preview.data, old)

    # Sink with a new seed: same layers again, different result; the seed gives reproducibility.
    count = widget.n_updates
    widget.task_combo.setCurrentIndex(1 + 2)
    seed = widget.seed_spin.value()
    widget.new_seed()
    assert widget.seed_spin.value() != seed
    _next_update(qtbot, widget, count)
    first = preview.data.copy()
    assert widget.last_result.task == "sink" and len(viewer.layers) == n_layers

    # Keep: two new layers on the same grid, the preview pair stays.
    kept = widget.keep()
    assert kept is not None and len(viewer.layers) == n_layers + 2
    for out in kept:
        np.testing.assert_allclose(out.scale, layer.scale)
    np.testing.assert_array_equal(kept[0].data, first)

    count = widget.n_updates
    widget.update_now()
    _next_update(qtbot, widget, count)
    np.testing.assert_array_equal(preview.data, first)  # same seed, same parameters, same image
    widget.stop()


def test_preview_3d_random_task_and_layer_source(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    rng = np.random.default_rng(1)
    vol = viewer.add_image(_disc((20, 28, 24), rng), name="vol", scale=(2.0, 1.0, 1.0))
    other = viewer.add_image(_disc((16, 24, 24), rng), name="other")
    widget.image_combo.set_layer(vol)
    widget.source_combo.set_layer(other)
    widget.task_combo.setCurrentIndex(1)  # intra_blend from the other layer
    count = widget.n_updates
    widget.update_now()
    _next_update(qtbot, widget, count)
    assert widget.last_result.task == "intra_blend"
    assert widget.preview_layer.data.shape == vol.data.shape
    np.testing.assert_allclose(widget.label_layer.scale, vol.scale)

    widget.task_combo.setCurrentIndex(0)  # random task: drawn from the seed
    tasks = set()
    for seed in range(6):
        count = widget.n_updates
        widget.seed_spin.setValue(seed)
        widget.update_now()
        _next_update(qtbot, widget, count)
        tasks.add(widget.last_result.task)
    assert len(tasks) >= 2
    widget.stop()


def test_preview_bad_input_notifies(make_napari_viewer, qtbot, tmp_path, napari_errors):
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    widget.update_now()  # no image layer at all
    assert widget.preview_layer is None
    assert any("image layer" in m for m in napari_errors())

    rng = np.random.default_rng(2)
    viewer.add_image(_disc((40, 40), rng), name="scan")
    _next_update(qtbot, widget, 0)
    widget.task_combo.setCurrentIndex(2)  # inter_blend
    widget.folder_edit.setText(str(tmp_path))  # an empty folder
    widget._folder_changed()
    widget.update_now()
    assert any("holds no images" in m for m in napari_errors())

    # The same folder with two PNG images: inter-dataset blending takes its source from there.
    from PIL import Image as PILImage

    for i in range(2):
        pixels = (rng.random((30, 50)) * 255).astype(np.uint8)
        PILImage.fromarray(pixels).save(tmp_path / f"ext{i}.png")
    widget._folder_changed()
    count = widget.n_updates
    widget.update_now()
    _next_update(qtbot, widget, count)
    assert widget.last_result.task == "inter_blend"
    assert widget.label_layer.data.max() > 0
    widget.stop()


def test_preview_on_builtin_sample(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    viewer.open_sample(PLUGIN, "chest_xray")
    layer = viewer.layers[-1]
    _next_update(qtbot, widget, 0)
    assert widget.preview_layer.data.shape == layer.data.shape
    np.testing.assert_allclose(widget.preview_layer.scale, layer.scale)
    widget.stop()


def test_thick_slices_preview_the_current_slice_in_2d(make_napari_viewer, qtbot):
    from napari_mtml._napari.preview_widget import MODE_SLICE, MODE_VOLUME

    viewer = make_napari_viewer()
    widget = _dock(viewer)
    rng = np.random.default_rng(3)
    vol = viewer.add_image(_disc((12, 48, 48), rng), name="thick", scale=(6.5, 0.8, 0.8))
    widget.image_combo.set_layer(vol)
    assert widget.mode_combo.currentText() == MODE_SLICE  # 6.5 mm over 0.8 mm: slice by slice
    widget.task_combo.setCurrentIndex(5)  # smooth_intensity
    viewer.dims.set_current_step(0, 6)
    count = widget.n_updates
    widget.update_now()
    _next_update(qtbot, widget, count)
    z = widget.current_slice(vol)
    assert z == 6 and widget.last_result.slice_index == 6
    label = widget.label_layer.data
    assert label.shape == vol.data.shape and label[z].max() > 0
    assert not np.delete(label, z, axis=0).any()  # only the shown slice carries an anomaly
    changed = np.abs(widget.preview_layer.data - vol.data) > 1e-3
    assert changed[z].any() and not np.delete(changed, z, axis=0).any()

    count = widget.n_updates
    viewer.dims.set_current_step(0, 4)  # moving through the volume re-runs on that slice
    _next_update(qtbot, widget, count)
    assert widget.last_result.slice_index == 4 and widget.label_layer.data[4].max() > 0

    widget.mode_combo.setCurrentText(MODE_VOLUME)
    count = widget.n_updates
    widget.update_now()
    _next_update(qtbot, widget, count)
    assert widget.last_result.slice_index is None
    widget.stop()


def test_keyboard_shortcuts_new_seed_and_keep(make_napari_viewer, qtbot):
    from napari._app_model import get_app_model
    from napari.utils.shortcuts import default_shortcuts

    from napari_mtml._napari.preview_widget import SHORTCUTS

    viewer = make_napari_viewer()
    widget = _dock(viewer)
    assert sorted(widget.shortcuts) == sorted(SHORTCUTS)
    # none of them is one of napari's own (viewer, layers, menus)
    napari_keys = {str(k) for keys in default_shortcuts.values() for k in keys}
    napari_keys |= {str(kb.keybinding) for kb in get_app_model().keybindings}
    ours = {key.replace("-", "+") for key in SHORTCUTS}
    assert not ours & napari_keys, ours & napari_keys

    keymap = {str(k): action for k, action in viewer.keymap.items()}
    viewer.add_image(_disc((48, 48), np.random.default_rng(1)), name="scan")
    _next_update(qtbot, widget, 0)
    seed = widget.seed_spin.value()
    keymap["Shift+N"](viewer)  # what napari calls for Shift+N on the canvas
    assert widget.seed_spin.value() != seed
    _next_update(qtbot, widget, widget.n_updates - 1)
    n_layers = len(viewer.layers)
    keymap["Shift+K"](viewer)
    assert len(viewer.layers) == n_layers + 2  # the kept preview and its label

    # a second preview widget in the same viewer takes the shortcuts over, without a clash
    from napari_mtml._napari.preview_widget import AnomalyPreviewWidget

    other = AnomalyPreviewWidget(viewer)
    assert other is not widget and sorted(other.shortcuts) == sorted(SHORTCUTS)
    seed = other.seed_spin.value()
    keymap["Shift+N"](viewer)
    assert other.seed_spin.value() != seed
    widget.stop()
    other.stop()


def test_the_dock_s_x_stops_the_preview_for_good(make_napari_viewer, qtbot):
    """napari's dock "x" only un-parents the widget (no close event): the widget notices,
    waits for its running preview and previews nothing more, whatever the layers do."""
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    layer = viewer.add_image(_disc((64, 64), np.random.default_rng(1)), name="scan")
    _next_update(qtbot, widget, 0)
    widget.update_now()  # a preview running when the dock closes
    viewer.window.remove_dock_widget(widget)
    assert widget.closed and widget._worker is None  # waited for it
    n, n_layers = widget.n_updates, len(viewer.layers)
    viewer.add_image(_disc((48, 48), np.random.default_rng(2)), name="another")
    widget.sliders["intensity_scale"].setValue(1.2)
    layer.data = layer.data * 1.01
    qtbot.wait(400)  # longer than the live preview's debounce
    assert widget.n_updates == n and widget._worker is None and not widget.busy
    assert len(viewer.layers) == n_layers + 1  # only the image added, no new preview layers


def test_every_dock_scrolls_instead_of_outgrowing_a_laptop_screen(make_napari_viewer):
    """The Training widget's form is ~1,050 px tall: in a scroll area its dock can be as short
    as a laptop screen allows, and where there is room it still asks for all of it. Each
    widget closes (cancelling its work) when napari takes it out of its dock."""
    viewer = make_napari_viewer()
    for name in ("Anomaly preview", "Training", "Heatmap"):
        widget = _dock(viewer, name)
        content = widget.scroll_area.widget()
        assert widget.minimumSizeHint().height() <= 200 < content.minimumSizeHint().height()
        assert widget.sizeHint().height() >= content.sizeHint().height()
        assert widget.minimumSizeHint().width() >= content.minimumSizeHint().width()
        closed = []
        widget.closeEvent = lambda event, w=widget, seen=closed: seen.append(w)  # its close
        viewer.window.remove_dock_widget(widget)  # the dock's "x"
        assert closed == [widget]
