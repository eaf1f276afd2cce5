"""Healthy collections, fold assignment, on-the-fly dataset seeding, the fixed validation set."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import napari_mtml.anomalies as anomalies
from napari_mtml import data as data_mod
from napari_mtml.data import (
    HealthyCollection,
    SyntheticDataset,
    assign_folds,
    expand_paths,
    make_loader,
    make_validation_set,
)


def _stand_in_synthesize(image, foreground=None, task=0, rng=None, source=None, **params):
    # A tiny engine stand-in (one random box, brighter) behind spies that check what the
    # dataset hands the engine.
    img = np.array(image, np.float32)
    box = tuple(slice(int(a), int(a) + 3) for a in (rng.integers(0, s - 3) for s in img.shape))
    if source is not None:
        source(rng)
    mask = np.zeros(img.shape, bool)
    mask[box] = True
    img[box] += rng.uniform(0.5, 1.5)
    label = np.where(mask, 1 - np.exp(-((img - image) ** 2) / 0.08), 0).astype(np.float32)
    return SimpleNamespace(image=img, label=label, mask=mask, task=task, n_anomalies=1)


def _images(n, shape=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = rng.normal(size=shape).astype(np.float32)
        out.append(im)
    return out


def _fg(shape):
    fg = np.zeros(shape, bool)
    fg[tuple(slice(2, s - 2) for s in shape)] = True
    return fg


# --------------------------------------------------------------------------- fold assignment


def test_assign_folds_contiguous_balanced_deterministic():
    folds = assign_folds(12)
    assert folds.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]
    assert np.array_equal(folds, assign_folds(12))
    assert np.all(np.diff(folds) >= 0)
    counts = np.bincount(folds, minlength=5)
    assert counts.max() - counts.min() <= 1


def test_assign_folds_by_volume_when_enough_volumes():
    groups = np.repeat(np.arange(6), 4)  # 6 volumes of 4 slices
    folds = assign_folds(len(groups), groups)
    for g in range(6):  # no volume straddles two folds
        assert len(set(folds[groups == g])) == 1
    assert set(folds) == set(range(5))


def test_assign_folds_by_slice_with_few_volumes():
    groups = np.repeat(np.arange(2), 10)  # 2 volumes: split the slices instead
    folds = assign_folds(len(groups), groups)
    assert np.array_equal(folds, assign_folds(20))


def test_too_few_items():
    with pytest.raises(ValueError, match="at least 5"):
        assign_folds(4)


# --------------------------------------------------------------------------- paths


def test_expand_paths_sorted_and_recursive(tmp_path):
    for name in ["b.nii.gz", "a.png", "sub/c.nii", "notes.txt", ".hidden.png"]:
        p = tmp_path / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x")
    found = expand_paths([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.png", "b.nii.gz", "sub/c.nii"]
    assert expand_paths([tmp_path / "sub/c.nii", tmp_path]) == found


def test_expand_paths_dicom_series_folder_is_one_item(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    src = pydicom.data.get_testdata_file("CT_small.dcm")
    series = tmp_path / "series"
    series.mkdir()
    for i in range(3):
        shutil.copy(src, series / f"slice{i}.dcm")
    shutil.copy(src, tmp_path / "single.dcm")
    assert expand_paths([tmp_path]) == [series, tmp_path / "single.dcm"]


def test_expand_paths_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        expand_paths([tmp_path / "missing.nii"])
    with pytest.raises(ValueError, match="holds no NIfTI"):
        expand_paths([tmp_path])
    with pytest.raises(ValueError, match="no healthy files"):
        expand_paths([])


# --------------------------------------------------------------------------- collections


def _fake_io(monkeypatch, shapes):
    """Stand-ins for read_image and to_frame: file name -> array shape (or "bad")."""

    def read(path):
        if shapes[path.name] == "bad":
            raise ValueError(f"{path}: not a NIfTI file")
        return SimpleNamespace(array=np.ones(shapes[path.name], np.float32))

    def frame(
        scan,
        path,
        kind,
        dims,
        frame,
        downsample,
        spacing=None,
        foreground=None,
        placement=None,
        bias_correction="none",
    ):
        arr = scan.array
        if arr.ndim == 3 and dims == 2:
            fg = np.zeros(arr.shape, bool)
            fg[1:-1, 2:-2, 2:-2] = True  # first and last slice empty
            return arr * fg, fg, "mri", None
        return arr, None, "mri", None

    monkeypatch.setattr(data_mod, "_read_scan", read)
    monkeypatch.setattr(data_mod, "_frame_scan", frame)


def _touch(tmp_path, names):
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    return [tmp_path / n for n in names]


def test_from_paths_slices_of_volumes(tmp_path, monkeypatch):
    names = [f"v{i}.nii.gz" for i in range(6)]
    _fake_io(monkeypatch, {n: (4, 16, 16) for n in names})
    _touch(tmp_path, names)
    col = HealthyCollection.from_paths([tmp_path], dims=2)
    assert col.dims == 2 and col.frame == (16, 16) and col.from_slices
    assert len(col) == 6 * 2  # the empty first/last slices dropped
    assert col.split_by == "volume"
    assert col.samples[0].name == "v0.nii.gz[z=1]"
    assert any("dropped 12" in n for n in col.notes)


def test_from_paths_mixed_dims(tmp_path, monkeypatch):
    names = ["a.nii.gz", "b.png"]
    _fake_io(monkeypatch, {"a.nii.gz": (8, 8, 8), "b.png": (8, 8)})
    with pytest.raises(ValueError, match=r"b\.png.*2D scan among 3D"):
        HealthyCollection.from_paths(_touch(tmp_path, names))


def test_from_paths_dims3_with_2d(tmp_path, monkeypatch):
    _fake_io(monkeypatch, {"b.png": (8, 8)})
    with pytest.raises(ValueError, match=r"b\.png.*dims = 3"):
        HealthyCollection.from_paths(_touch(tmp_path, ["b.png"]), dims=3)


def test_from_paths_unreadable_names_file(tmp_path, monkeypatch):
    _fake_io(monkeypatch, {"x.nii": "bad"})
    with pytest.raises(ValueError, match=r"x\.nii"):
        HealthyCollection.from_paths(_touch(tmp_path, ["x.nii"]))


def _write_volumes(folder, n=5, seed=0):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(seed)
    i, j, k = np.mgrid[:20, :20, :12]
    blob = ((i - 10) / 7) ** 2 + ((j - 10) / 7) ** 2 + ((k - 6) / 5) ** 2 <= 1
    folder.mkdir(exist_ok=True)
    for v in range(n):
        arr = (blob * (100 + 10 * rng.random(blob.shape))).astype(np.int16)
        nib.save(nib.Nifti1Image(arr, np.eye(4)), folder / f"vol{v}.nii.gz")
    return folder


def test_from_paths_real_files_3d_and_slices(tmp_path):
    folder = _write_volumes(tmp_path / "healthy")
    col = HealthyCollection.from_paths([folder], dims=3, frame=(16, 16, 16), downsample=1)
    assert (col.dims, col.kind, col.frame, len(col)) == (3, "mri", (16, 16, 16), 5)
    assert col.names() == [f"vol{v}.nii.gz" for v in range(5)]
    s = col.samples[0]
    assert s.image.dtype == np.float32 and s.foreground.dtype == bool and s.foreground.any()
    assert not s.image[~s.foreground].any()  # background stays 0 after z-scoring
    sl = HealthyCollection.from_paths([folder], dims=2, frame=(16, 16), downsample=1)
    assert sl.dims == 2 and sl.frame == (16, 16) and sl.split_by == "volume"
    # empty slices dropped; each kept slice carries foreground
    assert all(x.foreground.mean() >= 0.05 for x in sl.samples)
    for v in range(5):  # no volume straddles folds
        assert len({int(f) for f, x in zip(sl.folds, sl.samples, strict=True) if x.group == v}) == 1


def test_from_paths_2d_nifti_is_a_2d_image(tmp_path):
    """A 2D NIfTI reads as a one-slice volume; training takes it as the 2D image it is."""
    nib = pytest.importorskip("nibabel")
    i, j = np.mgrid[:20, :24]
    disc = ((i - 10) / 8) ** 2 + ((j - 12) / 9) ** 2 <= 1
    for v in range(5):
        arr = (disc * (100.0 + v + i + j)).astype(np.float32)
        nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / f"xr{v}.nii.gz")
    col = HealthyCollection.from_paths([tmp_path], frame=(16, 16), downsample=2)
    assert (col.dims, col.frame, len(col)) == (2, (16, 16), 5)
    assert all(x.image.shape == (16, 16) for x in col.samples)


def test_from_paths_real_bad_inputs(tmp_path):
    folder = _write_volumes(tmp_path / "healthy")
    with pytest.raises(ValueError, match=r"vol0\.nii\.gz.*larger than the frame"):
        HealthyCollection.from_paths([folder], dims=3, frame=(8, 8, 8), downsample=1)
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match=r"broken\.nii\.gz"):
        HealthyCollection.from_paths([bad])
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "xray.png")
    with pytest.raises(ValueError, match=r"xray\.png.*2D scan among 3D"):
        HealthyCollection.from_paths([folder], frame=(16, 16, 16), downsample=1)


def test_from_arrays_bad_inputs():
    with pytest.raises(ValueError, match="mix 2D and 3D"):
        HealthyCollection.from_arrays([np.zeros((8, 8)), np.zeros((8, 8, 8))] * 3)
    with pytest.raises(ValueError, match="NaN"):
        HealthyCollection.from_arrays([np.full((8, 8), np.nan)] * 5)
    with pytest.raises(ValueError, match="differs"):
        HealthyCollection.from_arrays([np.zeros((8, 8))] * 4 + [np.zeros((8, 9))])
    with pytest.raises(ValueError, match="at least 5"):
        HealthyCollection.from_arrays([np.zeros((8, 8))] * 4)


def test_from_arrays_copies_and_keeps_inputs():
    ims = _images(5)
    before = [im.copy() for im in ims]
    col = HealthyCollection.from_arrays(ims)
    col.samples[0].image[:] = 7
    assert all(np.array_equal(a, b) for a, b in zip(ims, before, strict=True))


# --------------------------------------------------------------------------- dataset seeding


def _dataset(n=6, **kw):
    samples = HealthyCollection.from_arrays(_images(n), [_fg((32, 32))] * n).samples
    kw.setdefault("seed", 3)
    return SyntheticDataset(samples, [2, 3, 4], **kw)


def test_items_reproducible_and_distinct():
    ds = _dataset()
    a, la, ta = ds.draw(5)
    b, lb, tb = ds.draw(5)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and ta == tb
    items = [ds.draw(k)[0] for k in range(8)]
    for i in range(8):
        for j in range(i + 1, 8):
            assert not np.array_equal(items[i], items[j])
    assert all(ds.draw(k)[1].max() > 0 for k in range(4))  # every item holds an anomaly


def test_epochs_permute_all_samples_and_differ():
    ds = _dataset(n=6)
    ids_e0 = [ds.locate(k)[2] for k in range(6)]
    ids_e1 = [ds.locate(k)[2] for k in range(6, 12)]
    assert sorted(ids_e0) == sorted(ids_e1) == list(range(6))
    assert [ds.locate(k)[:2] for k in (0, 5, 6, 13)] == [(0, 0), (0, 5), (1, 0), (2, 1)]
    # the same index in another epoch is another random stream
    assert ds.item_rng(0).random() != ds.item_rng(6).random()


def test_ranks_split_the_epoch_and_draw_different_anomalies():
    r0, r1 = _dataset(n=6, rank=0, world_size=2), _dataset(n=6, rank=1, world_size=2)
    ids0 = [r0.locate(k)[2] for k in range(3)]
    ids1 = [r1.locate(k)[2] for k in range(3)]
    assert sorted(ids0 + ids1) == list(range(6))
    assert r0.item_rng(0).random() != r1.item_rng(0).random()
    assert not np.array_equal(r0.draw(0)[0], r1.draw(0)[0])


def test_loader_items_do_not_depend_on_workers():
    ds = _dataset()
    ref = [ds.draw(k) for k in range(6)]
    for workers in (0, 2):
        loader = make_loader(ds, batch_size=3, start_step=0, workers=workers)
        it = iter(loader)
        got = [next(it), next(it)]
        del it
        images = torch.cat([b[0] for b in got])
        for k in range(6):
            assert np.array_equal(images[k, 0].numpy(), ref[k][0]), (workers, k)
    # resuming at step 1 starts at item 3
    it = iter(make_loader(ds, batch_size=3, start_step=1))
    assert np.array_equal(next(it)[0][0, 0].numpy(), ref[3][0])


def test_flip_only_when_asked(monkeypatch):
    seen = []

    def spy(image, foreground=None, **kw):
        seen.append(image.copy())
        return _stand_in_synthesize(image, foreground, **kw)

    monkeypatch.setattr(anomalies, "synthesize", spy)
    im = np.arange(32 * 32, dtype=np.float32).reshape(32, 32)
    samples = HealthyCollection.from_arrays([im] * 5).samples
    for flip in (False, True):
        seen.clear()
        ds = SyntheticDataset(samples, [4], seed=0, flip=flip)
        for k in range(40):
            ds.draw(k)
        flipped = sum(np.array_equal(s, im[:, ::-1]) for s in seen)
        assert flipped == 0 if not flip else 5 < flipped < 35


def test_scan_sampling_draws_every_scan_equally_often():
    # a "1 mm" scan of 30 slices and a "5 mm" one of 6, as 2D items of two groups
    groups = [0] * 30 + [1] * 6
    samples = HealthyCollection.from_arrays(
        _images(36), [_fg((32, 32))] * 36, groups=groups
    ).samples
    assert [s.group for s in samples] == groups

    def share_of_thick(ds, epochs=100):
        ids = [ds.locate(k)[2] for k in range(36 * epochs)]
        return np.mean([samples[i].group == 1 for i in ids]), ids

    slices, _ = share_of_thick(SyntheticDataset(samples, [2], seed=4, sampling="slices"))
    scans, ids = share_of_thick(SyntheticDataset(samples, [2], seed=4))  # the default
    assert slices == pytest.approx(6 / 36)  # a shuffled pass: exactly each slice once
    assert 0.45 < scans < 0.55  # 3,600 draws: a binomial sd of 0.008
    assert set(ids) == set(range(36))  # every slice still comes up
    # fixed by the seed and the epoch: a resumed run draws the same items
    again = SyntheticDataset(samples, [2], seed=4, sampling="scans")
    assert [again.locate(k)[2] for k in range(200, 300)] == ids[200:300]
    other = SyntheticDataset(samples, [2], seed=5, sampling="scans")
    assert [other.locate(k)[2] for k in range(100)] != ids[:100]


def test_scan_sampling_is_the_permutation_where_scans_give_as_many_items():
    samples = HealthyCollection.from_arrays(
        _images(6), [_fg((32, 32))] * 6, groups=[0, 0, 1, 1, 2, 2]
    ).samples
    a = SyntheticDataset(samples, [2], seed=3, sampling="slices")
    b = SyntheticDataset(samples, [2], seed=3, sampling="scans")
    assert [a.locate(k) for k in range(18)] == [b.locate(k) for k in range(18)]
    with pytest.raises(ValueError, match="sampling"):
        SyntheticDataset(samples, [2], seed=3, sampling="volumes")


def test_dataset_bad_inputs():
    with pytest.raises(ValueError, match="no training samples"):
        SyntheticDataset([], [0], seed=0)
    with pytest.raises(ValueError, match="rank"):
        _dataset(rank=2, world_size=2)


# --------------------------------------------------------------------------- validation set


def test_validation_set_fixed_by_seed():
    samples = HealthyCollection.from_arrays(_images(5), [_fg((32, 32))] * 5).samples
    a = make_validation_set(samples, [1, 3], size=6, seed=11)
    b = make_validation_set(samples, [1, 3], size=6, seed=11)
    c = make_validation_set(samples, [1, 3], size=6, seed=12)
    for name in ("healthy", "augmented", "label", "mask", "foreground", "tasks"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert not np.array_equal(a.augmented, c.augmented)
    assert a.tasks.tolist() == [1, 3, 1, 3, 1, 3]
    assert a.augmented.shape == (6, 32, 32) and a.augmented.dtype == np.float32
    assert a.mask.any(axis=(1, 2)).all()
    # healthy images are the held-out samples themselves
    assert all(any(np.array_equal(h, s.image) for s in samples) for h in a.healthy)


def test_blending_sources(monkeypatch):
    calls = []

    def spy(image, foreground=None, task=0, rng=None, source=None, **kw):
        calls.append((task, image, source(rng)[0] if source is not None else None))
        return _stand_in_synthesize(image, foreground, task=task, rng=rng)

    monkeypatch.setattr(anomalies, "synthesize", spy)
    samples = HealthyCollection.from_arrays(_images(5)).samples
    external = HealthyCollection.from_arrays(_images(5, seed=9)).samples
    ds = SyntheticDataset(samples, [0, 1, 4], seed=0, external=external)
    for k in range(30):
        ds.draw(k)
    ext_ids = {id(s.image) for s in external}
    own_ids = {id(s.image) for s in samples}
    for task, image, src in calls:
        if task == 0:  # another image of the training data, never the target itself
            assert id(src) in own_ids and src is not image
        elif task == 1:
            assert id(src) in ext_ids
        else:
            assert src is None
    assert {c[0] for c in calls} == {0, 1, 4}
    # without an external dataset, task 1 falls back to the training data
    calls.clear()
    SyntheticDataset(samples, [1], seed=0).draw(0)
    assert id(calls[0][2]) in own_ids


def test_from_paths_places_anomalies_inside_given_brain_masks(tmp_path):
    """brain_mask=FOLDER: each volume's placement foreground is its mask of the same name,
    taken into the frame; the image keeps its whole head."""
    import nibabel as nib

    rng = np.random.default_rng(4)
    scans, masks = tmp_path / "scans", tmp_path / "masks"
    scans.mkdir()
    masks.mkdir()
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in (12, 40, 40)], indexing="ij")
    head = (yy**2 + xx**2) < 0.8
    brain = (yy**2 + xx**2) < 0.5
    for i in range(5):
        img = np.where(head, 50.0, 0.0) + np.where(brain, 50.0, 0.0)
        img = (img + head * rng.normal(0, 5, head.shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(img.T.copy(), np.eye(4)), scans / f"s{i}.nii.gz")
        nib.save(
            nib.Nifti1Image(brain.T.astype(np.uint8).copy(), np.eye(4)), masks / f"s{i}_mask.nii.gz"
        )
    plain = HealthyCollection.from_paths([scans], dims=2, frame=(48, 48))
    inside = HealthyCollection.from_paths([scans], dims=2, frame=(48, 48), brain_mask=masks)
    assert len(plain) == len(inside)
    for a, b in zip(plain.samples, inside.samples, strict=True):
        np.testing.assert_array_equal(a.image, b.image)  # the image keeps its head
        assert b.foreground.sum() < 0.7 * a.foreground.sum()  # 0.5 / 0.8 of the area
        assert not (b.foreground & ~a.foreground).any()
    (masks / "s3_mask.nii.gz").unlink()
    with pytest.raises(ValueError, match="s3"):
        HealthyCollection.from_paths([scans], dims=2, frame=(48, 48), brain_mask=masks)


def test_every_item_holds_an_anomaly(monkeypatch):
    """A draw whose anomaly changed nothing (an all-zero label) is drawn again, then another
    image is tried: no training or validation item silently gets an all-zero label."""
    calls = []

    def empty_first(image, foreground=None, **kw):
        calls.append(1)
        result = _stand_in_synthesize(image, foreground, **kw)
        if len(calls) <= 5:  # more than one image's tries
            result.label = np.zeros_like(result.label)
        return result

    monkeypatch.setattr(anomalies, "synthesize", empty_first)
    samples = HealthyCollection.from_arrays(_images(5)).samples
    _, label, _ = SyntheticDataset(samples, [2], seed=0).draw(0)
    assert len(calls) == 6 and label.max() > 0
    calls.clear()
    val = make_validation_set(samples, [2], 2, seed=0)
    assert all(lab.max() > 0 for lab in val.label)


def test_an_image_that_never_takes_an_anomaly_is_an_error(monkeypatch):
    def never(image, foreground=None, **kw):
        result = _stand_in_synthesize(image, foreground, **kw)
        result.label = np.zeros_like(result.label)
        return result

    monkeypatch.setattr(anomalies, "synthesize", never)
    samples = HealthyCollection.from_arrays(_images(5)).samples
    with pytest.raises(ValueError, match="all-zero label"):
        SyntheticDataset(samples, [2], seed=0).draw(0)
