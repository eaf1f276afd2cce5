"""The heatmap widget: prediction on the image's grid, threshold -> labels + table, reference,
save, and bad input as notifications (a tiny 2D run trained once for the module)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.qt

PLUGIN = "napari-mtml"


def _disc(shape, seed, radius=0.8):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = sum(g**2 for g in grids) < radius**2
    return ((50 + 10 * rng.standard_normal(shape)) * inside).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 1/4 run of one fold, 2D frame 64x64, light model, 2 steps: enough to predict with."""
    from napari_mtml.config import TrainConfig
    from napari_mtml.training import train

    root = tmp_path_factory.mktemp("heatmap")
    healthy = root / "healthy"
    healthy.mkdir()
    for i in range(6):
        nib.save(nib.Nifti1Image(_disc((96, 96), i).T, np.eye(4)), healthy / f"h{i}.nii.gz")
    config = TrainConfig(healthy=(str(healthy),), out=str(root / "run"), fold=0, max_steps=2,
                         dims=2, batch_size=2, val_interval=2, val_size=4, frame=(64, 64),
                         preset="light", depth=3, base_features=8, device="cpu",
                         pos_encoding=True)
    for _ in train(config):
        pass
    return root / "run"


def _predict(qtbot, widget):
    widget.predict()
    assert widget.wait(60)


def test_heatmap_prediction_threshold_reference_and_save(make_napari_viewer, qtbot, tiny_run,
                                                        tmp_path, napari_errors):
    from napari_mtml.io import read_image

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Heatmap")
    widget.set_run(str(tiny_run))
    layer = viewer.add_image(_disc((12, 40, 40), 7), name="vol", scale=(3.0, 0.9, 0.9),
                             translate=(10.0, -5.0, 2.0))
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
    assert "sample score" in widget.score_label.text()

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


def test_regions_above_counts_components():
    from napari_mtml._napari.heatmap_widget import regions_above

    heat = np.zeros((10, 12), np.float32)
    heat[1:3, 1:4] = 0.9  # 6 pixels, peak 0.9
    heat[6:9, 6:9] = 0.6  # 9 pixels
    heat[7, 7] = 0.95
    labels, regions = regions_above(heat, 0.5, (0.5, 2.0))
    assert [r.voxels for r in regions] == [9, 6]
    assert regions[0].label == 1 and (labels == 1).sum() == 9
    assert regions[0].size_mm == pytest.approx(9.0) and regions[0].peak == pytest.approx(0.95)
    assert regions[1].mean == pytest.approx(0.9)
    assert regions_above(heat, 0.99, (1.0, 1.0))[1] == []


def test_heatmap_2d_image_with_3d_run_notifies(make_napari_viewer, qtbot, tmp_path, napari_errors):
    from napari_mtml.config import TrainConfig
    from napari_mtml.training import train

    healthy = tmp_path / "healthy3d"
    healthy.mkdir()
    for i in range(6):
        nib.save(nib.Nifti1Image(_disc((24, 40, 40), i).T, np.diag([1.0, 1.0, 1.0, 1.0])),
                 healthy / f"v{i}.nii.gz")
    config = TrainConfig(healthy=(str(healthy),), out=str(tmp_path / "run3d"), fold=0,
                         max_steps=1, batch_size=1, val_interval=1, val_size=1,
                         frame=(16, 32, 32), preset="light", depth=3, base_features=4,
                         device="cpu")
    for _ in train(config):
        pass

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Heatmap")
    widget.set_run(config.out)
    viewer.add_image(_disc((40, 40), 3), name="flat")
    _predict(qtbot, widget)
    assert widget.heatmap_layer is None
    assert "3D" in napari_errors()[-1] and "2D" in napari_errors()[-1]
