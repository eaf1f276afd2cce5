"""The heatmap widget: prediction on the image's grid, threshold -> labels + table, reference,
save, and bad input as notifications (a tiny 2D run trained once for the module)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from phantoms import healthy_disc_folder, noisy_disc

pytest.importorskip("napari")
pytestmark = pytest.mark.qt

PLUGIN = "napari-mtml"


_disc = noisy_disc


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 1/4 run of one fold, 2D frame 64x64, light model, 2 steps: enough to predict with."""
    from napari_mtml.config import TrainConfig
    from napari_mtml.training import train

    root = tmp_path_factory.mktemp("heatmap")
    healthy = healthy_disc_folder(root / "healthy", (96, 96))
    config = TrainConfig(
        healthy=(str(healthy),),
        out=str(root / "run"),
        fold=0,
        max_steps=2,
        dims=2,
        batch_size=2,
        val_interval=2,
        val_size=4,
        frame=(64, 64),
        preset="light",
        depth=3,
        base_features=8,
        device="cpu",
        pos_encoding=True,
    )
    for _ in train(config):
        pass
    return root / "run"


def _predict(qtbot, widget):
    widget.predict()
    assert widget.wait(60)


def test_heatmap_prediction_threshold_reference_and_save(
    make_napari_viewer, qtbot, tiny_run, tmp_path, napari_errors
):
    from napari_mtml.io import read_image

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Heatmap")
    widget.set_run(str(tiny_run))
    layer = viewer.add_image(
        _disc((12, 40, 40), 7), name="vol", scale=(3.0, 0.9, 0.9), translate=(10.0, -5.0, 2.0)
    )
    healthy = viewer.add_image(_disc((12, 40, 40), 8), name="healthy ref", scale=(3.0, 0.9, 0.9))
    widget.image_combo.set_layer(layer)
    _predict(qtbot, widget)  # a 2D run predicts a volume slice by slice

    heat = widget.heatmap_layer
    assert heat is not None and heat.data.shape == layer.data.shape
    np.testing.assert_allclose(heat.scale, layer.scale)
    np.testing.assert_allclose(heat.translate, layer.translate)
    assert heat.colormap.name == "inferno" and heat.blending == "additive"
    assert tuple(heat.contrast_limits) == (0.0, 1.0) and heat.opacity == pytest.approx(0.6)
    assert not widget.disagreement_layer.visible
    # a volume's "max" score smooths by 4 mm, and the score line says so
    assert "sample score (peak of the map smoothed by 4 mm" in widget.score_label.text()

    # Threshold -> a Labels layer whose regions are exactly the voxels above it, and a table.
    data = heat.data
    thr = float(np.quantile(data, 0.9))
    widget.threshold_slider.setValue(thr)
    widget.apply_threshold()
    labels = widget.labels_layer
    assert labels is not None and labels.data.shape == layer.data.shape
    np.testing.assert_allclose(labels.scale, layer.scale)
    np.testing.assert_array_equal(labels.data > 0, data >= widget.threshold_slider.value())
    assert widget.table.rowCount() == min(len(widget.regions), 100) > 0
    voxel_mm3 = 3.0 * 0.9 * 0.9
    total = sum(r.voxels for r in widget.regions)
    assert total == int((labels.data > 0).sum())
    assert widget.regions[0].size_mm == pytest.approx(widget.regions[0].voxels * voxel_mm3)
    assert "mm³" in widget.table.item(0, 1).text()
    sizes = [r.voxels for r in widget.regions]
    assert sizes == sorted(sizes, reverse=True)
    n_layers = len(viewer.layers)
    widget.threshold_slider.setValue(min(thr + 0.01, 1.0))
    widget.apply_threshold()
    assert widget.labels_layer is labels and len(viewer.layers) == n_layers  # in place

    # From a healthy reference: the threshold becomes the 99th percentile of its foreground.
    widget.reference_combo.set_layer(healthy)
    widget.percentile_spin.setValue(99.0)
    widget.threshold_from_reference()
    assert widget.wait(60)
    ref_thr = widget.threshold_slider.value()
    assert 0.0 <= ref_thr <= 1.0
    assert not any("Heatmap" in m for m in napari_errors())

    # Save: a NIfTI that reads back on the image's grid.
    path = widget.save(tmp_path / "vol_anomaly.nii.gz")
    assert path is not None and path.is_file()
    back = read_image(path)
    assert back.array.shape == layer.data.shape
    np.testing.assert_allclose(back.array, data, atol=1e-6)
    np.testing.assert_allclose(back.spacing, layer.scale)


def test_the_healthy_threshold_follows_a_retrained_run(
    make_napari_viewer, qtbot, tiny_run, tmp_path, monkeypatch
):
    """The reference's scores are cached per layer and per run state: asking again predicts
    nothing, but a run retrained in the same folder (a new config.json) predicts again."""
    import os
    import shutil

    import napari_mtml._napari.heatmap_widget as hw

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    calls = []
    real = hw.healthy_scores
    monkeypatch.setattr(
        hw, "healthy_scores", lambda ens, scan, **kw: calls.append(kw) or real(ens, scan, **kw)
    )
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Heatmap")
    widget.set_run(str(run))
    widget.reference_combo.set_layer(viewer.add_image(_disc((40, 40), 8), name="healthy"))
    for expected in (1, 1):
        widget.threshold_from_reference()
        assert widget.wait(60) and len(calls) == expected
    config = run / "config.json"
    later = config.stat().st_mtime_ns + 2_000_000_000
    os.utime(config, ns=(later, later))  # retrained: config.json is written anew
    widget.threshold_from_reference()
    assert widget.wait(60) and len(calls) == 2
    widget.tta_check.setChecked(True)  # mirrored maps need the mirrored reference
    widget.threshold_from_reference()
    assert widget.wait(60) and len(calls) == 3
    assert calls[-1] == {"tta": True, "contralateral": "auto"}
    widget.contra_check.setChecked(False)  # maps not compared across sides: their own reference
    widget.threshold_from_reference()
    assert widget.wait(60) and len(calls) == 4
    assert calls[-1] == {"tta": True, "contralateral": False}


def test_heatmap_bad_input_notifies(make_napari_viewer, qtbot, tiny_run, tmp_path, napari_errors):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Heatmap")
    widget.set_run(str(tiny_run))
    widget.predict()  # no image layer
    assert widget.heatmap_layer is None and any("image layer" in m for m in napari_errors())

    viewer.add_image(_disc((40, 40), 1), name="img")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    widget.set_run(str(empty))
    _predict(qtbot, widget)  # an empty run folder
    assert widget.heatmap_layer is None and "error" in widget.status.text()

    widget.set_run(str(tiny_run))
    big = viewer.add_image(_disc((160, 160), 2, radius=0.95), name="too big")
    widget.image_combo.set_layer(big)
    n_errors = len(napari_errors())
    _predict(qtbot, widget)  # content larger than the run's 64x64 frame allows
    assert widget.heatmap_layer is None and len(napari_errors()) == n_errors + 1
    assert "frame" in napari_errors()[-1]

    widget.save(tmp_path / "nothing.nii.gz")  # nothing predicted yet
    assert "nothing to save" in napari_errors()[-1]


def test_heatmap_2d_image_with_3d_run_notifies(make_napari_viewer, qtbot, tmp_path, napari_errors):
    from napari_mtml.config import TrainConfig
    from napari_mtml.training import train

    healthy = tmp_path / "healthy3d"
    healthy.mkdir()
    for i in range(6):
        nib.save(
            nib.Nifti1Image(_disc((24, 40, 40), i).T, np.diag([1.0, 1.0, 1.0, 1.0])),
            healthy / f"v{i}.nii.gz",
        )
    config = TrainConfig(
        healthy=(str(healthy),),
        out=str(tmp_path / "run3d"),
        fold=0,
        max_steps=1,
        batch_size=1,
        val_interval=1,
        val_size=1,
        frame=(16, 32, 32),
        preset="light",
        depth=3,
        base_features=4,
        device="cpu",
    )
    for _ in train(config):
        pass

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Heatmap")
    widget.set_run(config.out)
    viewer.add_image(_disc((40, 40), 3), name="flat")
    _predict(qtbot, widget)
    assert widget.heatmap_layer is None
    assert "3D" in napari_errors()[-1] and "2D" in napari_errors()[-1]


# --------------------------------------------------------------------------------------------
# Geometry, the region table, 3D, progress and cancel
# --------------------------------------------------------------------------------------------
def test_heatmap_on_a_rotated_flipped_layer_sits_on_it(make_napari_viewer, qtbot, tiny_run):
    from napari_mtml._napari._common import layer_affine

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Heatmap")
    widget.set_run(str(tiny_run))
    # another reader's layer: unit scale, the voxel size, a rotation and a flip in `affine`
    angle = np.deg2rad(30.0)
    outer = np.eye(3)
    outer[:2, :2] = np.array(
        [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    ) @ np.diag([0.5, -0.8])
    outer[:2, 2] = (12.0, -3.0)
    layer = viewer.add_image(_disc((40, 40), 4), name="oblique", rotate=10.0, affine=outer)
    widget.image_combo.set_layer(layer)
    _predict(qtbot, widget)
    assert widget.heatmap_layer is not None
    for out in (widget.heatmap_layer, widget.disagreement_layer, widget.labels_layer):
        np.testing.assert_allclose(layer_affine(out), layer_affine(layer), atol=1e-9)
    widget.threshold_slider.setValue(float(np.quantile(widget.prediction.anomaly, 0.8)))
    widget.apply_threshold()
    assert widget.regions
    # sizes in mm^2 from the layer's geometry (0.5 x 0.8 mm pixels), not from its unit scale
    r = widget.regions[0]
    assert r.size_mm == pytest.approx(r.voxels * 0.4)


def test_region_table_click_features_and_csv(make_napari_viewer, qtbot, tiny_run, tmp_path):
    import csv

    from napari_mtml._napari._common import viewer_camera

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Heatmap")
    widget.set_run(str(tiny_run))
    layer = viewer.add_image(
        _disc((12, 40, 40), 7), name="vol", scale=(3.0, 0.9, 0.9), translate=(10.0, -5.0, 2.0)
    )
    widget.image_combo.set_layer(layer)
    _predict(qtbot, widget)
    heat = widget.prediction.anomaly
    widget.threshold_slider.setValue(float(np.quantile(heat, 0.97)))
    widget.apply_threshold()
    regions = widget.regions
    assert len(regions) >= 2, "the test needs two regions to click between"
    labels = widget.labels_layer

    # features: one row per label, the table's numbers
    features = labels.features
    assert list(features["index"]) == [r.label for r in regions]
    np.testing.assert_allclose(features["size_mm"], [r.size_mm for r in regions])
    np.testing.assert_allclose(features["peak"], [r.peak for r in regions])

    for row in (1, 0):
        widget.table.selectRow(row)
        label = regions[row].label
        assert labels.selected_label == label
        # the slice shown and the camera centre lie inside that region
        z = viewer.dims.point[0]
        centre = (z, *viewer_camera(viewer).center[-2:])
        index = np.rint(labels.world_to_data(centre)).astype(int)
        assert labels.data[tuple(index)] == label

    path = widget.export_csv(tmp_path / "regions.csv")
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][0] == "threshold"
    assert float(rows[0][1]) == pytest.approx(widget.threshold_slider.value(), rel=1e-5)
    header, body = rows[1], rows[2:]
    assert header[:5] == ["label", "voxels", "size_mm3", "peak", "mean"]
    assert header[5:] == ["centre_z_mm", "centre_y_mm", "centre_x_mm"]
    assert [int(r[0]) for r in body] == [r.label for r in regions]
    assert float(body[0][2]) == pytest.approx(regions[0].voxels * 3.0 * 0.9 * 0.9, rel=1e-5)
    # the centre column is in world mm: inside the layer's extent along z
    zs = [float(r[5]) for r in body]
    assert all(10.0 <= z <= 10.0 + 11 * 3.0 for z in zs)


def test_heatmap_in_3d_view_renders(make_napari_viewer, qtbot, tiny_run):
    from napari_mtml._napari._common import viewer_camera

    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Heatmap")
    widget.set_run(str(tiny_run))
    layer = viewer.add_image(_disc((12, 40, 40), 7), name="vol", scale=(3.0, 0.9, 0.9))
    widget.image_combo.set_layer(layer)
    _predict(qtbot, widget)
    heat = widget.heatmap_layer
    assert heat.rendering == "attenuated_mip"
    heat.contrast_limits = (0.0, float(heat.data.max()) or 1.0)  # bright, to see it
    viewer.dims.ndisplay = 3
    viewer_camera(viewer).angles = (0.0, 30.0, 60.0)
    assert viewer.dims.ndisplay == 3
    with_heat = np.asarray(viewer.screenshot(canvas_only=False, flash=False))[..., :3]
    heat.visible = False
    widget.labels_layer.visible = False
    without = np.asarray(viewer.screenshot(canvas_only=False, flash=False))[..., :3]
    assert with_heat.shape == without.shape
    changed = np.abs(with_heat.astype(int) - without.astype(int)).sum(axis=-1) > 30
    assert changed.mean() > 0.01, "the heatmap is not visible in the 3D view"
    # inferno over grey: where it shows, red dominates blue
    r, b = with_heat[..., 0].astype(int), with_heat[..., 2].astype(int)
    assert (r[changed] > b[changed]).mean() > 0.5


def test_single_prediction_progress_and_cancel(make_napari_viewer, qtbot, tiny_run, monkeypatch):
    import threading

    from napari_mtml.inference import Ensemble

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Heatmap")
    widget.set_run(str(tiny_run))
    layer = viewer.add_image(_disc((40, 40), 5), name="img")
    widget.image_combo.set_layer(layer)

    entered, release = threading.Event(), threading.Event()
    original = Ensemble.predict

    def slow_predict(self, scan, *args, **kwargs):
        entered.set()
        release.wait(30)
        return original(self, scan, *args, **kwargs)

    monkeypatch.setattr(Ensemble, "predict", slow_predict)
    widget.predict()
    assert widget.busy and widget.cancel_button.isEnabled()
    assert widget.progress is not None and widget.progress.total == 2
    qtbot.waitUntil(entered.is_set, timeout=30000)
    assert widget.progress.n >= 1  # "loading the run" done, "predicting" under way
    widget.progress.cancel()  # what the Cancel button of napari's activity dock calls
    assert "cancelling" in widget.status.text()
    release.set()
    assert widget.wait(60)
    assert widget.heatmap_layer is None and widget.prediction is None
    assert "cancelled" in widget.status.text()
    assert widget.progress is None and not widget.cancel_button.isEnabled()

    # the next prediction runs normally
    monkeypatch.setattr(Ensemble, "predict", original)
    _predict(qtbot, widget)
    assert widget.heatmap_layer is not None


# --------------------------------------------------------------------------------------------
# Batch: a folder or every open layer, ranked table, click, cancel
# --------------------------------------------------------------------------------------------
def _batch_folder(root, n=3):
    folder = root / "batch_in"
    folder.mkdir()
    for i in range(n):
        # different sizes of disc: different sample scores
        img = _disc((40, 40), 20 + i, radius=0.5 + 0.12 * i)
        nib.save(nib.Nifti1Image(img.T, np.diag([0.8, 0.8, 1.0, 1.0])), folder / f"img{i}.nii.gz")
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    return folder


def test_mirror_tta_checkbox_reaches_predict_reference_and_batch(
    make_napari_viewer, qtbot, tiny_run, tmp_path
):
    """TTA: predict mirrored too": Predict, the healthy reference and the batch all give the
    maps of `Ensemble.predict(tta=True)`, which differ from the plain ones on an asymmetric
    image."""
    from napari_mtml.inference import load_ensemble
    from napari_mtml.io import Scan, read_image
    from napari_mtml.regions import healthy_scores, percentile_threshold

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Heatmap")
    widget.set_run(str(tiny_run))
    assert not widget.tta_check.isChecked()  # off by default, as `mtml predict`
    image = _disc((40, 40), 9)
    image[5:12, 28:36] += 40.0  # a bright patch on one side: the mirror sees another image
    layer = viewer.add_image(image, name="lopsided")
    widget.image_combo.set_layer(layer)
    ens = load_ensemble(tiny_run, folds="available")  # the widget's load
    scan = Scan(array=image.astype(np.float32), spacing=(1.0, 1.0))
    plain = ens.predict(scan).anomaly
    mirrored = ens.predict(scan, tta=True).anomaly
    assert np.abs(plain - mirrored).max() > 1e-4

    widget.tta_check.setChecked(True)
    _predict(qtbot, widget)
    np.testing.assert_allclose(widget.heatmap_layer.data, mirrored, atol=1e-6)

    widget.reference_combo.set_layer(layer)
    widget.percentile_spin.setValue(90.0)
    widget.threshold_from_reference()
    assert widget.wait(60)
    expected = percentile_threshold(healthy_scores(ens, scan, tta=True), 90.0)
    assert widget.threshold_slider.value() == pytest.approx(expected, abs=1e-3)

    widget.batch_source_combo.setCurrentText("all open image layers")
    out = tmp_path / "tta_batch"
    widget.batch_out_edit.setText(str(out))
    widget.batch_png_check.setChecked(False)
    widget.run_batch()
    assert widget.wait(60)
    back = read_image(out / "lopsided_anomaly.nii.gz").array
    np.testing.assert_allclose(back.reshape(mirrored.shape), mirrored, atol=1e-5)


def test_left_right_checkbox_reaches_predict(make_napari_viewer, qtbot, tiny_run):
    """ "compare left and right" (on by default, as `mtml predict`): Predict on a volume gives
    the maps of `Ensemble.predict(contralateral="auto")`; unticked, the models' own."""
    from napari_mtml.inference import load_ensemble
    from napari_mtml.io import Scan

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Heatmap")
    widget.set_run(str(tiny_run))
    assert widget.contra_check.isChecked()
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in (10, 40, 40)], indexing="ij")
    inside = z**2 + y**2 + x**2 < 0.8
    rng = np.random.default_rng(3)
    image = np.where(inside, 50 + 15 * np.cos(6 * y) * np.cos(5 * x) + rng.normal(0, 1, z.shape), 0)
    image[4:7, 10:16, 26:33] += 40.0  # one side only
    image = image.astype(np.float32)
    layer = viewer.add_image(image, name="head", scale=(3.0, 1.0, 1.0))
    widget.image_combo.set_layer(layer)
    ens = load_ensemble(tiny_run, folds="available")
    scan = Scan(array=image, spacing=(3.0, 1.0, 1.0))
    compared = ens.predict(scan)
    own = ens.predict(scan, contralateral=False)
    assert compared.midplane is not None and own.midplane is None
    assert np.abs(compared.anomaly - own.anomaly).max() > 1e-3
    _predict(qtbot, widget)
    np.testing.assert_allclose(widget.heatmap_layer.data, compared.anomaly, atol=1e-6)
    widget.contra_check.setChecked(False)
    _predict(qtbot, widget)
    np.testing.assert_allclose(widget.heatmap_layer.data, own.anomaly, atol=1e-6)


def test_batch_of_a_folder_ranks_writes_and_opens(make_napari_viewer, qtbot, tiny_run, tmp_path):
    import csv

    from napari_mtml.io import read_image

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Heatmap")
    widget.set_run(str(tiny_run))
    folder = _batch_folder(tmp_path)
    out = tmp_path / "batch_out"
    widget.batch_folder_edit.setText(str(folder))
    widget.batch_out_edit.setText(str(out))
    widget.batch_png_check.setChecked(False)
    widget.run_batch()
    assert widget.busy and widget.progress is not None and widget.progress.total == 5
    assert widget.wait(120)

    items = widget.batch_items
    assert len(items) == 4 and widget.batch_result is not None
    ok = [it for it in items if it.error is None]
    assert [it.name for it in items[3:]] == ["broken"] and "broken.nii.gz" in items[3].error
    scores = [it.score for it in ok]
    assert scores == sorted(scores, reverse=True)  # ranked by sample score
    assert widget.batch_table.rowCount() == 4
    assert widget.batch_table.item(0, 0).text() == ok[0].name
    assert widget.batch_table.item(3, 3).text() == "failed"
    for it in ok:
        assert (out / f"{it.name}_anomaly.nii.gz").is_file()
        assert (out / f"{it.name}_disagreement.nii.gz").is_file()
    with open(out / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["name"] for r in rows) == ["img0", "img1", "img2"]

    # A click opens the image with its heatmap: the map of the file, on the image's grid.
    n_layers = len(viewer.layers)
    widget.batch_table.selectRow(1)
    image = viewer.layers[ok[1].name]
    assert image.data.shape == (1, 40, 40)
    np.testing.assert_allclose(
        widget.heatmap_layer.data, read_image(out / f"{ok[1].name}_anomaly.nii.gz").array
    )
    np.testing.assert_allclose(widget.heatmap_layer.scale, image.scale)
    assert len(viewer.layers) > n_layers and widget.labels_layer is not None
    assert widget.prediction.score == pytest.approx(ok[1].score)
    # the score line names the batch's score, as after Predict
    assert "(peak of the map smoothed by 2 mm" in widget.score_label.text()
    widget.batch_table.selectRow(1)  # again: the same layers, not new copies
    assert sum(ly.name == ok[1].name for ly in viewer.layers) == 1


def test_batch_of_open_layers_maps_back_onto_each_layer(
    make_napari_viewer, qtbot, tiny_run, tmp_path
):
    from napari_mtml._napari._common import layer_affine, scan_from_layer
    from napari_mtml.inference import load_ensemble

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Heatmap")
    widget.set_run(str(tiny_run))
    flat = viewer.add_image(_disc((40, 40), 30), name="flat one", scale=(0.7, 0.7))
    tilted = viewer.add_image(
        _disc((40, 40), 31, radius=0.6), name="tilted", scale=(0.9, -0.9), rotate=20.0
    )
    widget.batch_source_combo.setCurrentText("all open image layers")
    widget.batch_out_edit.setText(str(tmp_path / "layers_out"))
    widget.run_batch()
    assert widget.wait(120)
    names = sorted(it.name for it in widget.batch_items)
    assert names == ["flat_one", "tilted"] and all(it.error is None for it in widget.batch_items)
    assert (tmp_path / "layers_out" / "tilted_anomaly.nii.gz").is_file()

    ensemble = load_ensemble(tiny_run, device="cpu", folds=[0])
    for layer, name in ((tilted, "tilted"), (flat, "flat_one")):
        row = [it.name for it in widget.batch_items].index(name)
        widget.open_batch_item(row)
        heat = widget.heatmap_layer
        np.testing.assert_allclose(layer_affine(heat), layer_affine(layer), atol=1e-9)
        direct = ensemble.predict(scan_from_layer(layer)).anomaly  # the same, on the layer
        np.testing.assert_allclose(heat.data, direct, atol=1e-5)


def test_batch_cancel_keeps_scores_of_the_images_done(
    make_napari_viewer, qtbot, tiny_run, tmp_path, monkeypatch
):
    import threading

    from napari_mtml.inference import Ensemble

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Heatmap")
    widget.set_run(str(tiny_run))
    folder = _batch_folder(tmp_path)
    out = tmp_path / "cancelled"
    widget.batch_folder_edit.setText(str(folder))
    widget.batch_out_edit.setText(str(out))
    widget.batch_png_check.setChecked(False)

    second, release = threading.Event(), threading.Event()
    original = Ensemble.predict
    calls = []

    def counted(self, scan, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # hold the second image until the test has cancelled
            second.set()
            release.wait(30)
        return original(self, scan, *args, **kwargs)

    monkeypatch.setattr(Ensemble, "predict", counted)
    widget.run_batch()
    qtbot.waitUntil(second.is_set, timeout=60000)
    widget.batch_cancel_button.click()
    release.set()
    assert widget.wait(60)
    assert len(calls) == 2  # nothing after the cancelled image
    assert "cancelled" in widget.status.text() and widget.batch_result is None
    lines = (out / "scores.csv").read_text().splitlines()
    assert lines[0].startswith("name,score") and 1 <= len(lines) - 1 <= 2
    assert not widget.cancel_button.isEnabled() and widget.progress is None


def test_heatmap_keeps_the_map_inside_a_labels_mask(
    make_napari_viewer, qtbot, tiny_run, napari_errors, monkeypatch, tmp_path
):
    from napari_mtml._napari import heatmap_widget as hw

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Heatmap")
    widget.set_run(str(tiny_run))
    img = viewer.add_image(_disc((48, 48), 7), name="img")
    widget.image_combo.set_layer(img)
    half = np.zeros((48, 48), np.uint8)
    half[:, :24] = 1
    mask = viewer.add_labels(half, name="left half")
    widget.mask_combo.set_layer(mask)
    _predict(qtbot, widget)
    heat = widget.heatmap_layer.data
    assert np.all(heat[:, 24:] == 0) and np.any(heat[:, :24] > 0)
    assert "smoothed by 2 mm" in widget.score_label.text()
    # a mask of another shape is refused with the layer named
    viewer.add_labels(np.ones((10, 10), np.uint8), name="tiny labels")
    widget.mask_combo.set_layer(viewer.layers["tiny labels"])
    widget.predict()
    assert "tiny labels" in napari_errors()[-1]
    # the automatic mask without the extra names the install command
    monkeypatch.setattr(hw, "brain_available", lambda: False)
    widget.mask_combo.setCurrentIndex(1)
    assert widget.mask_combo.current_extra() == hw.MASK_AUTO
    widget.predict()
    assert "napari-mtml[brain]" in napari_errors()[-1]
    # and so is a batch asked for it: refused before it starts, not run without the mask
    widget.batch_folder_edit.setText(str(_batch_folder(tmp_path)))
    widget.batch_out_edit.setText(str(tmp_path / "batch_out"))
    n_errors = len(napari_errors())
    widget.run_batch()
    assert len(napari_errors()) == n_errors + 1 and "napari-mtml[brain]" in napari_errors()[-1]
    assert not widget.busy and not (tmp_path / "batch_out").exists()


def test_heatmap_starts_at_the_runs_healthy_threshold(
    make_napari_viewer, qtbot, tiny_run, tmp_path, napari_errors
):
    """A run with a healthy calibration sets the region threshold on its first prediction;
    the user's threshold is kept afterwards; a run without one keeps the slider as it is."""
    import json
    import shutil

    from napari_mtml.calibration import CALIBRATION_FILE, weights_digest

    run = shutil.copytree(tiny_run, tmp_path / "run")
    cal = {"format": 1, "thresholds": {"95": 0.1, "99": 0.123, "99.9": 0.2}, "images": 1,
           "voxels": 10, "weights": weights_digest(run, [0])}  # fmt: skip
    (run / CALIBRATION_FILE).write_text(json.dumps(cal))
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Heatmap")
    widget.set_run(str(run))
    widget.image_combo.set_layer(viewer.add_image(_disc((48, 48), 3), name="img"))
    _predict(qtbot, widget)
    assert widget.threshold_slider.value() == pytest.approx(0.123, abs=1e-3)
    assert "healthy" in widget.status.text()
    widget.threshold_slider.setValue(0.7)
    _predict(qtbot, widget)
    assert widget.threshold_slider.value() == pytest.approx(0.7, abs=1e-3)
    widget.set_run(str(tiny_run))  # no calibration: the slider stays
    _predict(qtbot, widget)
    assert widget.threshold_slider.value() == pytest.approx(0.7, abs=1e-3)
    # a calibration with the models' own maps' thresholds too (a 3D MRI run's): this 2D image
    # is not compared across two sides, so the slider takes those
    run2 = shutil.copytree(tiny_run, tmp_path / "run2")
    cal2 = dict(cal, thresholds_uncompared={"95": 0.2, "99": 0.31, "99.9": 0.4})
    (run2 / CALIBRATION_FILE).write_text(json.dumps(cal2))
    widget.set_run(str(run2))
    _predict(qtbot, widget)
    assert widget.heatmap_layer is not None
    assert widget.threshold_slider.value() == pytest.approx(0.31, abs=1e-3)


def test_an_xray_predicted_by_the_brain_model_says_so(make_napari_viewer, qtbot, tmp_path):
    """An image unlike the run's training data (an X-ray for the brain MRI model) gets its map
    and a warning under its score, a napari warning and, in a batch, the table's row."""
    from napari.utils.notifications import notification_manager

    viewer = make_napari_viewer()
    (layer,) = viewer.open_sample(PLUGIN, "chest_xray")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Heatmap")
    widget.set_run("builtin:brain-t1")
    widget.device_combo.setCurrentText("cpu")
    widget.image_combo.set_layer(layer)
    _predict(qtbot, widget)
    assert widget.heatmap_layer is not None
    assert "warning:" in widget.score_label.text() and "X-ray" in widget.score_label.text()
    widget.threshold_slider.setValue(0.6)  # a new threshold: the warning stays with the score
    assert "trained on MRI" in widget.score_label.text()
    warned = [
        str(n.message)
        for n in notification_manager.records
        if getattr(n.severity, "value", n.severity) == "warning"
    ]
    assert any("trained on MRI" in m for m in warned)

    widget.batch_source_combo.setCurrentText("all open image layers")
    widget.batch_out_edit.setText(str(tmp_path / "batch"))
    widget.run_batch()
    assert widget.wait(60)
    assert widget.batch_table.rowCount() == 1  # the X-ray (the maps are outputs, not inputs)
    assert widget.batch_table.item(0, 3).text() == "done, with a warning"
    assert "X-ray" in widget.batch_table.item(0, 3).toolTip()
    assert "1 with a warning" in widget.status.text()
