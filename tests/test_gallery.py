"""`mtml preview` / `write_gallery`: a PNG gallery of the tasks on a small NIfTI or 2D image."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from napari_mtml.cli import main
from napari_mtml.gallery import prepare_image, write_gallery
from napari_mtml.samples import sample_data_path


def _small_brain(path, shape=(24, 28, 24)):
    rng = np.random.default_rng(0)
    grids = np.indices(shape).astype(np.float32)
    centre = (np.asarray(shape) - 1) / 2
    r2 = sum(((g - c) / (0.4 * s)) ** 2 for g, c, s in zip(grids, centre, shape, strict=True))
    data = np.where(r2 <= 1, 100 + 40 * (1 - r2) + rng.normal(0, 5, shape), 0).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return data


def test_mtml_preview_on_a_small_nifti_writes_a_png(tmp_path, capsys):
    src = tmp_path / "brain.nii.gz"
    _small_brain(src)
    out = tmp_path / "figs" / "gallery.png"
    assert main(["preview", str(src), "--out", str(out), "--seed", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.format == "PNG"
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    # six rows (image + five tasks) of three panels: taller than wide, and not blank
    assert pixels.shape[0] > 1.5 * pixels.shape[1]
    assert pixels.std() > 10


def test_single_task_gallery_from_a_png_and_same_seed_same_figure(tmp_path):
    yy, xx = np.mgrid[0:300:1, 0:200:1]
    picture = (127 + 100 * np.sin(xx / 15.0) * np.cos(yy / 20.0)).astype(np.uint8)
    src = tmp_path / "xray.png"
    Image.fromarray(picture).save(src)
    a = write_gallery(src, tmp_path / "a.png", task="sink", seed=1)
    b = write_gallery(src, tmp_path / "b.png", task=2, seed=1)
    with Image.open(a) as ia, Image.open(b) as ib:
        assert ia.size == ib.size
        # two rows (image + one task): wider than tall
        assert ia.size[0] > ia.size[1]
        np.testing.assert_array_equal(np.asarray(ia), np.asarray(ib))


def test_prepare_image_z_scores_the_foreground_and_rescales_2d():
    vol = np.zeros((16, 16, 16), dtype=np.float32)
    vol[4:12, 4:12, 4:12] = np.linspace(10, 30, 8)
    image, fg, params = prepare_image(vol)
    assert fg.sum() == 8**3 and np.all(image[~fg] == 0)
    assert abs(image[fg].mean()) < 1e-5 and abs(image[fg].std() - 1) < 1e-4
    assert params == {}
    flat, none_fg, params2 = prepare_image(np.arange(600, dtype=np.float32).reshape(20, 30))
    assert none_fg is None and params2["max_push"] == 10
    assert flat.min() == -1 and flat.max() == 1


def test_preview_rejects_bad_input(tmp_path, capsys):
    src = tmp_path / "zeros.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), str(src))
    assert main(["preview", str(src), "--out", str(tmp_path / "z.png")]) == 2
    assert "all zero" in capsys.readouterr().err
    good = tmp_path / "brain.nii.gz"
    _small_brain(good)
    with pytest.raises(ValueError, match="unknown task"):
        write_gallery(good, tmp_path / "x.png", task="melt")
    assert not (tmp_path / "x.png").exists()


def test_gallery_of_the_real_brain_template(tmp_path):
    """The real MNI template end to end (one task: the 3D synthesis at full size takes a moment)."""
    path = sample_data_path("mni152_t1")
    out = write_gallery(path, tmp_path / "brain.png", task="smooth_intensity", seed=0)
    with Image.open(out) as im:
        assert np.asarray(im.convert("L")).std() > 10
