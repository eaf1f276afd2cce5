"""Ensemble inference: run folders -> heatmaps on the input's own grid."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_mtml.config import TrainConfig
from napari_mtml.inference import Ensemble, load_ensemble
from napari_mtml.io import Scan, read_image, write_image
from napari_mtml.model import UNet

TINY = {"preset": "light", "base_features": 4, "depth": 2, "max_features": 8, "recipe": "paper"}


def make_run(root, dims=2, frame=(16, 16), missing=(), train_tasks=1, **settings):
    """A run folder as `train` leaves it, with randomly initialised tiny U-Nets."""
    run = root / "run"
    run.mkdir()
    cfg = TrainConfig(
        healthy=("unused",),
        out=str(run),
        dims=dims,
        frame=frame,
        kind="mri",
        train_tasks=train_tasks,
        **{**TINY, **settings},
    ).resolve(dims, "mri", frame)
    cfg.to_json(run / "config.json")
    for k in range(math.comb(5, train_tasks)):
        if k in missing:
            continue
        (run / f"fold_{k}").mkdir()
        net = UNet(**cfg.model_kwargs(), init_seed=k)
        torch.save(net.state_dict(), run / f"fold_{k}" / "best.pt")
    return run


def disc_image(shape, rng, radius=0.3):
    """A bright noisy disc/ball on a zero background (skull-stripped-like), float32."""
    grids = np.meshgrid(*[np.linspace(-0.5, 0.5, n) for n in shape[-2:]], indexing="ij")
    inside = (grids[0] ** 2 + grids[1] ** 2) < radius**2
    img = np.where(inside, 100 + 10 * rng.standard_normal(shape), 0).astype(np.float32)
    return img


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_2d_prediction_on_the_input_grid(tmp_path, rng):
    ens = load_ensemble(make_run(tmp_path), device="cpu")
    assert ens.dims == 2 and ens.frame == (16, 16) and len(ens.models) == 5
    img = disc_image((30, 26), rng)
    before = img.copy()
    pred = ens.predict(Scan(array=img, spacing=(0.5, 0.5)), keep_folds=True, fold_scores=True)
    np.testing.assert_array_equal(img, before)  # input untouched
    for m in (pred.anomaly, pred.disagreement):
        assert m.shape == img.shape and m.dtype == np.float32
        assert np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1
    # Mean and std over the folds, maps taken back to the grid one by one (linear, so the same).
    folds = np.stack(pred.fold_maps)
    assert folds.shape == (5, *img.shape)
    np.testing.assert_allclose(pred.anomaly, folds.mean(0), atol=1e-5)
    assert np.all(pred.disagreement <= 0.5 + 1e-6)
    assert 0 <= pred.score <= 1 and len(pred.fold_scores) == 5
    # the mean is linear: the ensemble's mean score is the mean of the folds' mean scores
    by_mean = ens.predict(Scan(array=img, spacing=(0.5, 0.5)), score="mean", fold_scores=True)
    assert by_mean.score == pytest.approx(np.mean(by_mean.fold_scores), abs=1e-5)
    assert pred.score == pred.scores[pred.score_method] and pred.score_method == "max"
    assert pred.scores["top1"] >= pred.scores["mean"]
    plain = ens.predict(Scan(array=img, spacing=(0.5, 0.5)))  # no per-fold work unless asked
    assert plain.fold_scores == () and plain.fold_maps == ()
    np.testing.assert_array_equal(plain.anomaly, pred.anomaly)
    # Outside the foreground crop nothing was predicted.
    assert pred.anomaly[0, 0] == 0 and pred.disagreement[0, 0] == 0


class _Constant(torch.nn.Module):
    """A stand-in fold model whose output is one value everywhere."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full_like(x, self.value)


def test_ensemble_mean_std_of_clipped_fold_outputs(rng):
    values = [-0.5, 0.2, 0.4, 1.7]  # clipped to 0, 0.2, 0.4, 1
    ens = Ensemble([_Constant(v) for v in values], dims=2, frame=(16, 16), kind="mri")
    img = disc_image((28, 28), rng)
    pred = ens.predict_array(img, spacing=(1.0, 1.0))
    clipped = np.clip(values, 0, 1)
    inside = pred.anomaly > 0
    assert inside.sum() > 0.2 * img.size  # the crop around the disc
    np.testing.assert_allclose(pred.anomaly[inside], clipped.mean(), atol=1e-6)
    np.testing.assert_allclose(pred.disagreement[inside], clipped.std(), atol=1e-6)
    assert pred.scores["top1"] == pytest.approx(clipped.mean(), abs=1e-6)
    assert pred.score == pytest.approx(clipped.mean(), abs=1e-3)  # "max": smoothed by 2 mm (2D)


def test_tta_averages_the_maps_of_the_image_and_of_its_mirror(tmp_path, rng):
    """`predict(scan, tta=True)`: every fold also sees the preprocessed frames mirrored
    left-right; its two maps (the mirrored one mirrored back) are averaged per fold."""
    ens = load_ensemble(make_run(tmp_path), device="cpu")
    img = disc_image((30, 26), rng)
    img[:, :12] *= 1.3  # not symmetric: the mirror changes what the folds see
    scan = Scan(array=img, spacing=(1.0, 1.0))
    calls = []
    real = ens.predict_frames

    def spy(frames):
        calls.append(np.array(frames))
        return real(frames)

    ens.predict_frames = spy
    off = ens.predict(scan, keep_folds=True)
    assert len(calls) == 1
    calls.clear()
    tta = ens.predict(scan, tta=True, keep_folds=True)
    assert len(calls) == 2
    np.testing.assert_array_equal(calls[1], calls[0][..., ::-1])

    def mirrored_only(frames):  # every fold on the mirrored frames, mirrored back
        per_fold = np.ascontiguousarray(real(np.ascontiguousarray(frames[..., ::-1]))[2][..., ::-1])
        return per_fold.mean(0), per_fold.std(0), per_fold

    ens.predict_frames = mirrored_only
    mirror = ens.predict(scan, keep_folds=True)
    assert not np.allclose(mirror.anomaly, off.anomaly, atol=1e-4)
    np.testing.assert_allclose(tta.anomaly, (off.anomaly + mirror.anomaly) / 2, atol=1e-5)
    for k in range(5):
        want = (off.fold_maps[k] + mirror.fold_maps[k]) / 2
        np.testing.assert_allclose(tta.fold_maps[k], want, atol=1e-5)
    for bad in ("off", 2, [True]):
        with pytest.raises(ValueError, match="tta must be True or False"):
            ens.predict(scan, tta=bad)


def test_2d_run_on_a_3d_volume_slice_by_slice(tmp_path, rng):
    run = make_run(tmp_path)
    vol = np.stack([disc_image((30, 30), rng, radius=r) for r in (0.2, 0.3, 0.35, 0.3, 0.25)])
    scan = Scan(array=vol, spacing=(5.0, 0.6, 0.6))
    pred = load_ensemble(run, device="cpu", batch_size=16).predict(scan)
    assert pred.anomaly.shape == vol.shape and pred.disagreement.shape == vol.shape
    # Batching must not mix slices: one slice per forward gives the same maps.
    one = load_ensemble(run, device="cpu", batch_size=1).predict(scan)
    np.testing.assert_allclose(pred.anomaly, one.anomaly, atol=1e-5)
    # An empty (all background) slice stays 0 everywhere (outside the content).
    vol2 = vol.copy()
    vol2[0] = 0
    pred2 = load_ensemble(run, device="cpu").predict(Scan(array=vol2, spacing=(5.0, 0.6, 0.6)))
    assert pred2.anomaly.shape == vol.shape


def test_3d_run_on_3d_volume_and_refuses_2d(tmp_path, rng):
    run = make_run(tmp_path, dims=3, frame=(8, 16, 16))
    vol = np.stack([disc_image((28, 28), rng, radius=r) for r in (0.1, 0.25, 0.3, 0.3, 0.25, 0.1)])
    ens = load_ensemble(run, device="cpu")
    pred = ens.predict(Scan(array=vol, spacing=(1.0, 1.0, 1.0)))
    assert pred.anomaly.shape == vol.shape and pred.anomaly.dtype == np.float32
    with pytest.raises(ValueError, match="2D image but the run's models are 3D"):
        ens.predict(Scan(array=vol[2], spacing=(1.0, 1.0)))


def test_too_large_for_the_frame_names_a_frame_that_fits(tmp_path, rng):
    ens = load_ensemble(make_run(tmp_path), device="cpu")
    big = disc_image((90, 90), rng, radius=0.45)  # ~80 px disc -> 40 px after x2: > 16
    with pytest.raises(ValueError, match=r"frame \(16, 16\).*would fit"):
        ens.predict(Scan(array=big, spacing=(1.0, 1.0)))


def test_a_run_without_positional_encoding_grows_its_frame_to_the_image(tmp_path, rng):
    ens = load_ensemble(make_run(tmp_path, recipe="small", pos_encoding=False), device="cpu")
    assert not ens.fixed_frame and ens.spacing == 2.0
    big = disc_image((90, 90), rng, radius=0.45)  # ~80 mm disc -> 40 px at 2 mm: > 16
    pred = ens.predict(Scan(array=big, spacing=(1.0, 1.0)))
    assert pred.anomaly.shape == big.shape and np.isfinite(pred.anomaly).all()
    # the map is 0 outside the foreground unless the background is kept
    outside = big == 0
    assert outside.any() and np.all(pred.anomaly[outside] == 0)
    kept = ens.predict(Scan(array=big, spacing=(1.0, 1.0)), keep_background=True)
    assert kept.mask is None and np.any(kept.anomaly[outside] > 0)
    # a given mask restricts the map and the score
    half = np.zeros(big.shape, bool)
    half[:, :45] = True
    masked = ens.predict(Scan(array=big, spacing=(1.0, 1.0)), mask=half)
    assert np.all(masked.anomaly[~half] == 0) and masked.mask is not None
    with pytest.raises(ValueError, match="mask has shape"):
        ens.predict(Scan(array=big, spacing=(1.0, 1.0)), mask=half[:10])


def test_written_maps_keep_the_file_geometry(tmp_path, rng):
    """LAS file in, the heatmap NIfTI has the file's own shape and affine."""
    vol = np.stack([disc_image((32, 30), rng, radius=0.3) for _ in range(4)])  # (z, y, x)
    affine = np.array([[-0.7, 0, 0, 90.0], [0, 0.7, 0, -120.0], [0, 0, 4.0, -30.0], [0, 0, 0, 1]])
    path = tmp_path / "las.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(vol, (2, 1, 0)).copy(), affine), path)
    scan = read_image(path)
    pred = load_ensemble(make_run(tmp_path), device="cpu").predict(scan)
    out = write_image(tmp_path / "las_anomaly.nii.gz", pred.anomaly, like=scan)
    back = nib.load(out)
    assert back.shape == (30, 32, 4)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    np.testing.assert_allclose(read_image(out).array, pred.anomaly, atol=1e-6)


def test_missing_fold_names_the_file(tmp_path):
    run = make_run(tmp_path, missing=(3,))
    with pytest.raises(ValueError, match=r"fold_3.best\.pt"):
        load_ensemble(run, device="cpu")
    ens = load_ensemble(run, device="cpu", folds=[0, 1, 2, 4])  # the present ones, on request
    assert ens.folds == (0, 1, 2, 4)
    with pytest.raises(ValueError, match="out of range"):
        load_ensemble(run, device="cpu", folds=[5])


def test_no_fold_and_no_config(tmp_path):
    run = make_run(tmp_path, missing=range(5))
    with pytest.raises(ValueError, match="no trained fold"):
        load_ensemble(run, device="cpu")
    (run / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json is missing"):
        load_ensemble(run, device="cpu")
    with pytest.raises(ValueError, match="does not exist"):
        load_ensemble(tmp_path / "nowhere", device="cpu")


def test_corrupt_or_mismatched_checkpoint(tmp_path):
    run = make_run(tmp_path)
    (run / "fold_1" / "best.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"fold_1.best\.pt is not a readable checkpoint"):
        load_ensemble(run, device="cpu")
    other = UNet(dims=2, frame=(16, 16), base_features=6, depth=2, max_features=12)
    torch.save(other.state_dict(), run / "fold_1" / "best.pt")
    with pytest.raises(ValueError, match=r"fold_1.best\.pt does not match the model"):
        load_ensemble(run, device="cpu")
    (run / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="config.json"):
        load_ensemble(run, device="cpu")


def test_two_task_split_expects_ten_folds(tmp_path):
    run = make_run(tmp_path, train_tasks=2)
    assert len(load_ensemble(run, device="cpu").models) == 10


def test_bad_device(tmp_path):
    with pytest.raises(ValueError, match="device"):
        load_ensemble(make_run(tmp_path), device="tpu")


def test_slices_with_less_foreground_than_training_kept_get_no_map(tmp_path, rng):
    ens = load_ensemble(make_run(tmp_path), device="cpu")
    assert ens.min_foreground == pytest.approx(0.05)
    vol = np.stack([disc_image((40, 40), rng, radius=r) for r in (0.05, 0.3, 0.3, 0.3)])
    pred = ens.predict(Scan(array=vol, spacing=(1.0, 1.0, 1.0)), keep_background=True)
    assert np.all(pred.anomaly[0] == 0)  # a tip of a head: never seen in training
    assert all(np.any(pred.anomaly[z] > 0) for z in (1, 2, 3))


def test_predictions_keep_freed_memory_while_they_run(tmp_path, rng, monkeypatch):
    from napari_mtml import heap

    calls = []

    class Lib:
        def mallopt(self, param, value):
            calls.append((param, value))

        def malloc_trim(self, pad):
            calls.append(("trim", pad))

    monkeypatch.setattr(heap, "_libc_cache", [Lib()])
    monkeypatch.delenv("MTML_KEEP_FREED", raising=False)
    vol = np.stack([disc_image((28, 28), rng, radius=r) for r in (0.1, 0.25, 0.3, 0.3, 0.25, 0.1)])
    for dims, frame in ((2, (16, 16)), (3, (8, 16, 16))):
        calls.clear()
        (tmp_path / str(dims)).mkdir()
        make_run(tmp_path / str(dims), dims=dims, frame=frame)
        ens = load_ensemble(tmp_path / str(dims) / "run", device="cpu")
        ens.predict(Scan(vol, (1.0, 1.0, 1.0)))
        assert calls[:2] == [
            (heap._M_MMAP_MAX, 0),
            (heap._M_TRIM_THRESHOLD, heap._KEEP_TRIM_THRESHOLD),
        ]
        assert calls[-1] == ("trim", 0) and calls.count(("trim", 0)) == 1  # nested: once
        assert heap._depth == 0


def test_a_run_trained_with_bias_correction_predicts_with_it(tmp_path, rng, monkeypatch):
    """The run's `bias_correction` is applied to every scan it predicts, as in training."""
    import napari_mtml.preprocess as preprocess

    calls = []
    real = preprocess.correct_bias

    def spy(array, foreground, spacing, **options):
        calls.append(array.shape)
        return real(array, foreground, spacing, **options)

    monkeypatch.setattr(preprocess, "correct_bias", spy)
    img = disc_image((40, 36), rng)
    plain = load_ensemble(make_run(tmp_path, bias_correction="none"), device="cpu")
    assert plain.bias_correction == "none"
    plain.predict_array(img)
    assert calls == []
    (tmp_path / "b").mkdir()
    corrected = load_ensemble(make_run(tmp_path / "b", bias_correction="poly"), device="cpu")
    assert corrected.bias_correction == "poly"
    corrected.predict_array(img)
    assert calls == [img.shape]


def _two_sided_head(shape=(10, 40, 40), seed=3):
    """A ball with a left-right symmetric texture and a bright patch on one side only."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = z**2 + y**2 + x**2 < 0.8
    rng = np.random.default_rng(seed)
    texture = 15 * np.cos(6 * y) * np.cos(5 * x) + rng.normal(0, 1, z.shape)
    image = np.where(inside, 50 + texture, 0)
    image[4:7, 10:16, 26:33] += 40.0
    return image.astype(np.float32)


def test_contralateral_compares_the_two_sides_of_a_volume(tmp_path):
    from napari_mtml.symmetry import contralateral

    ens = load_ensemble(make_run(tmp_path, frame=(32, 32)), device="cpu")
    scan = Scan(array=_two_sided_head(), spacing=(3.0, 1.0, 1.0))
    own = ens.predict(scan, contralateral=False, keep_folds=True)
    auto = ens.predict(scan, keep_folds=True, fold_scores=True)  # the default: "auto"
    assert own.midplane is None and auto.midplane is not None
    assert auto.midplane.correlation >= 0.3 and not auto.notes
    # the plane of this phantom is x = its centre, untilted
    assert abs(auto.midplane.normal[2]) > 0.99
    assert auto.midplane.point[2] == pytest.approx(19.5, abs=1.0)
    expected = contralateral(own.anomaly, scan.spacing, auto.midplane)
    np.testing.assert_allclose(auto.anomaly, expected, atol=1e-6)
    assert np.all(auto.anomaly <= own.anomaly + 1e-6)
    for mine, theirs in zip(auto.fold_maps, own.fold_maps, strict=True):
        np.testing.assert_allclose(
            mine, contralateral(theirs, scan.spacing, auto.midplane), atol=1e-6
        )
    np.testing.assert_allclose(auto.disagreement, own.disagreement)  # the std is not compared
    assert auto.score <= own.score + 1e-6 and len(auto.fold_scores) == 5


def test_contralateral_auto_leaves_2d_images_and_refuses_bad_values(tmp_path):
    ens = load_ensemble(make_run(tmp_path, frame=(32, 32)), device="cpu")
    img = _two_sided_head()[5]
    scan = Scan(array=img, spacing=(1.0, 1.0))
    auto = ens.predict(scan)
    assert auto.midplane is None
    np.testing.assert_array_equal(auto.anomaly, ens.predict(scan, contralateral=False).anomaly)
    assert ens.predict(scan, contralateral=True).midplane is not None  # asked for: a 2D mirror
    for bad in ("on", "off", 2, 0.5):
        with pytest.raises(ValueError, match="contralateral"):
            ens.predict(scan, contralateral=bad)


def test_a_volume_without_mirror_symmetry_keeps_its_map_and_says_so(tmp_path, rng):
    ens = load_ensemble(make_run(tmp_path, frame=(32, 32)), device="cpu")
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in (10, 40, 40)], indexing="ij")
    noise = np.where(z**2 + y**2 + x**2 < 0.8, 50 + 20 * rng.standard_normal(z.shape), 0)
    scan = Scan(array=noise.astype(np.float32), spacing=(3.0, 1.0, 1.0))
    pred = ens.predict(scan)
    assert pred.midplane is None
    assert any("no left-right mirror symmetry" in n for n in pred.notes)
    np.testing.assert_array_equal(pred.anomaly, ens.predict(scan, contralateral=False).anomaly)
