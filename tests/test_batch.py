"""napari_mtml.batch: the batch-prediction generator behind `mtml predict` and the widget."""

from __future__ import annotations

import csv
import os

import nibabel as nib
import numpy as np
import pytest

from napari_mtml.batch import BatchItem, expand_images, image_name, predict_batch
from napari_mtml.inference import Ensemble
from napari_mtml.model import UNet

FRAME = (16, 16)


@pytest.fixture(scope="module")
def ensemble():
    """Two tiny untrained fold models: real inference, a second at most."""
    models = [
        UNet(dims=2, frame=FRAME, base_features=4, depth=2, max_features=8, init_seed=k)
        for k in range(2)
    ]
    return Ensemble(models, dims=2, frame=FRAME, kind="mri", device="cpu")


def _disc(path, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(*[np.linspace(-0.5, 0.5, 24)] * 2, indexing="ij")
    img = np.where(yy**2 + xx**2 < 0.1, 100 + 10 * rng.standard_normal((24, 24)), 0)
    nib.save(nib.Nifti1Image(img.T.astype(np.float32)[..., None], np.eye(4)), path)
    return path


def _rows(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_image_name_and_expand(tmp_path):
    assert image_name("a/case1.nii.gz") == "case1"
    assert image_name("b/x.PNG") == "x"
    assert image_name("series_folder") == "series_folder"
    d = tmp_path / "d"
    d.mkdir()
    for n in ("b.nii.gz", "a.png", "notes.txt", "s.dcm"):
        (d / n).write_bytes(b"x")
    assert [p.name for p in expand_images([d])] == ["a.png", "b.nii.gz"]
    with pytest.raises(ValueError, match="nope"):
        expand_images([tmp_path / "nope.nii.gz"])
    if hasattr(os, "mkfifo"):  # a named pipe is never taken (reading it would block)
        os.mkfifo(d / "c.nii.gz")
        assert [p.name for p in expand_images([d])] == ["a.png", "b.nii.gz"]
        with pytest.raises(ValueError, match="not a regular file"):
            expand_images([d / "c.nii.gz"])


def test_a_bad_input_among_good_ones_does_not_stop_the_batch(ensemble, tmp_path):
    good1 = _disc(tmp_path / "a,1.nii.gz", 0)  # a comma in the name: the csv module quotes it
    bad = tmp_path / 'b"q.nii.gz'
    bad.write_bytes(b"\x1f\x8b not a nifti")
    good2 = _disc(tmp_path / "c.nii.gz", 1)
    out = tmp_path / "out"
    gen = predict_batch(ensemble, [good1, bad, good2], out, png=False)
    items: list[BatchItem] = []
    while True:
        try:
            items.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert [i.index for i in items] == [0, 1, 2] and all(i.total == 3 for i in items)
    assert result.items == items
    assert [i.name for i in result.failures] == ['b"q']
    failed = result.failures[0]
    assert str(bad) in failed.error and "\n" not in failed.error
    assert failed.anomaly_path is None and not (out / 'b"q_anomaly.nii.gz').exists()
    for item in (items[0], items[2]):
        assert item.error is None and item.anomaly_path.is_file()
        assert item.disagreement_path.is_file() and item.overlay_path is None
        assert 0.0 <= item.score <= 1.0
    rows = _rows(result.scores_csv)
    assert rows[0][:4] == ["name", "score", "mean_disagreement", "anomaly_file"]
    assert rows[0][4:] == ["score_method", "mean", "max", "top1"]
    assert [r[0] for r in rows[1:]] == ["a,1", "c"]
    assert rows[1][3] == "a,1_anomaly.nii.gz"
    assert float(rows[1][1]) == pytest.approx(items[0].score, rel=1e-5)
    assert not list(out.glob(".scores*"))  # no temporary file left


def test_closing_early_writes_the_scores_of_what_is_done(ensemble, tmp_path):
    paths = [_disc(tmp_path / f"s{i}.nii.gz", i) for i in range(3)]
    out = tmp_path / "out"
    gen = predict_batch(ensemble, paths, out, png=True, predict_kwargs={"keep_folds": True})
    first = next(gen)
    assert first.overlay_path.is_file()
    assert not (out / "scores.csv").exists()  # nothing half-written while it runs
    gen.close()
    rows = _rows(out / "scores.csv")
    assert [r[0] for r in rows[1:]] == ["s0"]
    assert not (out / "s1_anomaly.nii.gz").exists()


def test_refusals_before_any_input_is_read(ensemble, tmp_path):
    a = _disc(tmp_path / "x.nii.gz", 0)
    (tmp_path / "sub").mkdir()
    b = _disc(tmp_path / "sub" / "x.nii", 0)
    with pytest.raises(ValueError, match="same output name"):
        predict_batch(ensemble, [a, b], tmp_path / "o")
    with pytest.raises(ValueError, match="no input"):
        predict_batch(ensemble, [], tmp_path / "o")
    with pytest.raises(ValueError, match="not a folder"):
        predict_batch(ensemble, [a], a)
