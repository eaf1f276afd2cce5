"""Layers with their whole geometry (scale, translate, rotate, shear, affine): what the widgets
read from a layer, and the NIfTI writers (npe2 `writers`) with a round trip through our reader."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = [
    pytest.mark.qt,
    # napari says so for rotated 3D layers in a 2D view; these tests look at geometry, not slices
    pytest.mark.filterwarnings("ignore:Non-orthogonal slicing:UserWarning"),
]

PLUGIN = "napari-mtml"

# A rotation of 30 degrees in plane, a flip of the x axis and a shear: nothing diagonal.
ROTATE_3D = (0.0, 0.0, 30.0)


def _volume(shape=(4, 5, 6), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _oblique_affine(ndim: int) -> np.ndarray:
    """An extra `affine` as napari-nifti passes it: rotation, a flip and voxel sizes in mm."""
    angle = np.deg2rad(25.0)
    if ndim == 2:
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        linear = rot @ np.diag([0.5, -0.8])  # second axis flipped
    else:
        rot = np.array(
            [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
        )
        linear = rot @ np.diag([2.0, 0.5, -0.8])
    aff = np.eye(ndim + 1)
    aff[:ndim, :ndim] = linear
    aff[:ndim, ndim] = np.arange(1, ndim + 1) * 7.0
    return aff


def _world_of_every_voxel(matrix: np.ndarray, shape) -> np.ndarray:
    index = np.indices(shape).reshape(len(shape), -1).astype(float)
    return (matrix[:-1, :-1] @ index + matrix[:-1, -1:]).T


def test_layer_affine_is_what_napari_draws():
    from napari.layers import Image

    from napari_mtml._napari._common import layer_affine, layer_spacing, voxel_volume

    layer = Image(
        _volume(),
        scale=(3.0, -1.5, 2.0),
        translate=(1.0, 2.0, 3.0),
        rotate=ROTATE_3D,
        shear=(0.2, 0.0, 0.1),
        affine=_oblique_affine(3),
    )
    matrix = layer_affine(layer)
    for index in [(0, 0, 0), (3, 4, 5), (1, 2, 3)]:
        np.testing.assert_allclose(
            matrix @ (*index, 1.0), (*layer.data_to_world(index), 1.0), atol=1e-9
        )
    linear = matrix[:3, :3]
    np.testing.assert_allclose(layer_spacing(layer), np.linalg.norm(linear, axis=0))
    assert voxel_volume(layer) == pytest.approx(abs(np.linalg.det(linear)))
    # the flip and the outer affine's voxel sizes are in it: 3 * 2.0 (outer) = 6 mm on axis 0
    assert layer_spacing(layer)[0] == pytest.approx(6.0)


def test_scan_from_a_rotated_flipped_layer_has_its_mm_and_world():
    from napari.layers import Image

    from napari_mtml._napari._common import layer_affine, scan_from_layer

    layer = Image(_volume((6, 7)), scale=(1.0, 1.0), affine=_oblique_affine(2), name="cxr")
    scan = scan_from_layer(layer)
    assert scan.spacing == pytest.approx((0.5, 0.8))  # from the affine, not from `scale`
    # the Scan's array -> world map is the layer's (world axes as this plugin orders them)
    matrix = layer_affine(layer)
    array_world = scan.array_affine()
    for index in [(0, 0), (5, 6), (2, 3)]:
        expected = matrix @ (*index, 1.0)
        got = array_world @ (*index, 0.0, 1.0)
        np.testing.assert_allclose(got[:2][::-1], expected[:2], atol=1e-9)


def test_widget_outputs_carry_the_whole_transform(make_napari_viewer):
    from napari_mtml._napari._common import layer_affine, set_or_add_image, set_or_add_labels

    viewer = make_napari_viewer()
    src = viewer.add_image(
        _volume(), name="src", scale=(2.0, 1.0, -1.0), rotate=ROTATE_3D, affine=_oblique_affine(3)
    )
    heat = set_or_add_image(viewer, None, np.zeros(src.data.shape, np.float32), "heat", src)
    labels = set_or_add_labels(viewer, None, np.zeros(src.data.shape, np.int32), "lab", src)
    for out in (heat, labels):
        np.testing.assert_allclose(layer_affine(out), layer_affine(src), atol=1e-9)
    # in place, after the source moved
    src.affine = np.eye(4)
    src.rotate = (10.0, 0.0, 0.0)
    again = set_or_add_image(viewer, heat, np.ones(src.data.shape, np.float32), "heat", src)
    assert again is heat
    np.testing.assert_allclose(layer_affine(heat), layer_affine(src), atol=1e-9)
    # in place on an unchanged grid: the data changes, no transform is set again (each set
    # re-draws the layer; the preview updates its layers this way many times a second)
    moved = []
    for name in ("scale", "translate", "rotate", "shear", "affine"):
        getattr(heat.events, name).connect(lambda event, name=name: moved.append(name))
    twice = set_or_add_image(viewer, heat, np.full(src.data.shape, 2.0, np.float32), "heat", src)
    assert twice is heat and moved == [] and float(heat.data.max()) == 2.0
    np.testing.assert_allclose(layer_affine(heat), layer_affine(src), atol=1e-9)


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------
def _same_voxels_at_same_places(back, data, matrix):
    """Every voxel of the read-back Scan lies where the layer put the voxel of equal value."""
    # Scan.array_affine() gives RAS (x, y, z); this plugin's layer world axes are (z, y, x)
    world = _world_of_every_voxel(back.array_affine(), back.array.shape)[:, ::-1]
    inv = np.linalg.inv(matrix)
    index = world @ inv[:-1, :-1].T + inv[:-1, -1]
    rounded = np.rint(index)
    np.testing.assert_allclose(index, rounded, atol=1e-4)  # voxel centres coincide
    values = data[tuple(rounded.astype(int).T)]
    np.testing.assert_array_equal(values, back.array.reshape(-1))


@pytest.mark.parametrize("ndim", [3, 2])
def test_image_writer_round_trip_rotated_and_flipped(make_napari_viewer, tmp_path, ndim):
    from napari_mtml._napari._common import file_affine_from_layer_matrix, layer_affine
    from napari_mtml.io import read_image

    viewer = make_napari_viewer()
    data = _volume((4, 5, 6) if ndim == 3 else (5, 6))
    layer = viewer.add_image(
        data,
        name="rotated",
        scale=(1.0,) * (ndim - 1) + (-1.0,),
        rotate=ROTATE_3D if ndim == 3 else 30.0,
        affine=_oblique_affine(ndim),
    )
    path = tmp_path / "rotated.nii.gz"
    written = layer.save(str(path), plugin=PLUGIN)
    assert [str(path)] == list(written) and path.is_file()

    back = read_image(path)
    matrix = layer_affine(layer)
    np.testing.assert_allclose(back.affine, file_affine_from_layer_matrix(matrix), atol=1e-5)
    if ndim == 2:
        assert back.array.shape == (1, 5, 6)  # a 2D NIfTI reads as a one-slice volume
        matrix3 = np.eye(4)
        matrix3[1:, 1:] = matrix
        _same_voxels_at_same_places(back, data[None], matrix3)
    else:
        _same_voxels_at_same_places(back, data, matrix)
    assert nib.load(path).get_data_dtype() == np.float32


def test_labels_writer_keeps_integer_labels_and_a_reader_layer_keeps_its_file(
    make_napari_viewer, tmp_path
):
    from napari_mtml.io import read_image

    # A file stored L-R flipped with an oblique tilt: our reader reorients it to RAS.
    aff = np.array(
        [
            [-0.9, 0.1, 0.0, 60.0],
            [0.0, 1.1, 0.05, -40.0],
            [0.0, 0.0, 2.5, -10.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    labels_xyz = np.zeros((6, 7, 5), np.int16)
    labels_xyz[1:3, 2:5, 1:4] = 1
    labels_xyz[4, 5, 2] = 300  # needs more than 8 bits
    nib.save(nib.Nifti1Image(labels_xyz, aff), tmp_path / "seg.nii.gz")

    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "seg.nii.gz"), plugin=PLUGIN)
    labels = viewer.add_labels(
        np.asarray(layer.data).astype(np.int32),
        name="seg labels",
        scale=layer.scale,
        translate=layer.translate,
        metadata=dict(layer.metadata),
    )
    out = tmp_path / "seg_out.nii.gz"
    labels.save(str(out), plugin=PLUGIN)
    img = nib.load(out)
    assert img.get_data_dtype() == np.int16  # 300 does not fit uint8
    # still where the reader put it: written in the file's own voxel order and affine
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels_xyz)
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    np.testing.assert_array_equal(read_image(out).array, layer.data)

    # Moved by the user: the file geometry no longer applies; the layer's own is written.
    labels.translate = np.asarray(labels.translate) + (0.0, 5.0, 0.0)
    moved = tmp_path / "moved.nii"
    labels.save(str(moved), plugin=PLUGIN)
    back = read_image(moved)
    from napari_mtml._napari._common import layer_affine

    _same_voxels_at_same_places(back, np.asarray(labels.data), layer_affine(labels))


def test_heatmap_outputs_saved_together_as_a_folder(make_napari_viewer, tmp_path):
    from napari_mtml._napari._common import set_or_add_image, set_or_add_labels

    aff = np.diag([-1.2, 1.0, 3.0, 1.0])
    aff[:3, 3] = (40.0, -20.0, 5.0)
    image_xyz = _volume((6, 7, 5), seed=3)
    nib.save(nib.Nifti1Image(image_xyz, aff), tmp_path / "scan.nii.gz")
    viewer = make_napari_viewer()
    (src,) = viewer.open(str(tmp_path / "scan.nii.gz"), plugin=PLUGIN)
    heat = set_or_add_image(viewer, None, np.abs(src.data) / 5, "scan anomaly", src)
    spread = set_or_add_image(viewer, None, np.abs(src.data) / 9, "scan disagreement", src)
    regions = set_or_add_labels(
        viewer, None, (src.data > 1).astype(np.int32), "scan suspicious", src
    )
    viewer.layers.selection = {heat, spread, regions}
    folder = tmp_path / "outputs"
    written = viewer.layers.save(str(folder), selected=True, plugin=PLUGIN)
    names = sorted(p.split("/")[-1] for p in written)
    assert names == ["scan_anomaly.nii.gz", "scan_disagreement.nii.gz", "scan_suspicious.nii.gz"]
    for name in names:
        img = nib.load(folder / name)
        np.testing.assert_allclose(img.affine, aff, atol=1e-5)  # the source file's geometry
        assert img.shape == image_xyz.shape
    np.testing.assert_allclose(
        np.asarray(nib.load(folder / "scan_anomaly.nii.gz").dataobj),
        np.abs(image_xyz) / 5,
        rtol=1e-6,
    )
    assert nib.load(folder / "scan_suspicious.nii.gz").get_data_dtype() == np.uint8


def test_writers_refuse_what_nifti_cannot_hold(tmp_path):
    from napari_mtml._napari.writer import write_image_layer, write_labels_layer, write_layers

    with pytest.raises(ValueError, match=r"\.nii"):
        write_image_layer(str(tmp_path / "a.tif"), _volume(), {"name": "a"})
    with pytest.raises(ValueError, match="4 dimensions"):
        write_image_layer(str(tmp_path / "a.nii.gz"), np.zeros((2, 3, 4, 5)), {"name": "a"})
    with pytest.raises(ValueError, match="RGB"):
        write_image_layer(str(tmp_path / "a.nii.gz"), np.zeros((4, 5, 3)), {"rgb": True})
    with pytest.raises(ValueError, match="does not exist"):
        write_labels_layer(str(tmp_path / "no" / "a.nii"), np.zeros((4, 5), int), {})
    with pytest.raises(ValueError, match="folder"):
        write_layers(str(tmp_path / "many.nii.gz"), [(np.zeros((4, 5)), {}, "image")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain 2D image with no transform is fine
        (path,) = write_image_layer(str(tmp_path / "plain.nii"), np.ones((4, 5)), {})
    assert nib.load(path).shape == (5, 4, 1)
