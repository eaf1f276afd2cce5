"""Issue 9's causes, one regression test (or a few) each, on the core API.

The same inputs go through the `mtml` command in tests/test_bad_inputs.py; here each cause is
pinned where it was fixed: io's voxel-size rule (1), io never opening pipes (2), OS errors said in
one line (3), files read as files (4), the silent odd results (5), images that cannot take an
anomaly (6). Cause 7 (the suite needed ../shared/data) is fixed in the real-image tests
themselves, which now read the package's sample data.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_mtml.config import TrainConfig
from napari_mtml.files import check_output_file, os_error_message, read_text
from napari_mtml.io import ImageReadError, ImageReadWarning, read_image, write_image


def _disc(shape=(24, 24), seed=0, radius=0.3):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-0.5, 0.5, n) for n in shape], indexing="ij")
    inside = sum(g**2 for g in grids) < radius**2
    return np.where(inside, 100 + 10 * rng.standard_normal(shape), 0).astype(np.float32)


def _mkfifo(path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("named pipes need a POSIX system")
    os.mkfifo(path)
    return path


def _returns(fn, release_path: Path | None = None, timeout: float = 60.0):
    """`fn()` in a thread: (returned, raised); fails the test instead of hanging on a pipe."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        if release_path is not None:  # unblock the open() so that the thread ends
            try:
                os.close(os.open(release_path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        pytest.fail(f"blocked for {timeout} s")
    return box.get("value"), box.get("error")


# ------------------------------------------------------------- 1. one voxel-size rule in io/nifti


@pytest.mark.parametrize(
    "pixdim, spacing_xyz",
    [
        ([np.nan] * 3, (1.0, 1.0, 1.0)),
        ([0.0] * 3, (1.0, 1.0, 1.0)),
        ([1.0, -2.0, 1.0], (1.0, 1.0, 1.0)),
        ([np.nan, 2.0, 3.0], (1.0, 2.0, 3.0)),
    ],
    ids=["nan", "zero", "negative", "one-nan"],
)
def test_bad_voxel_sizes_without_qform_sform(tmp_path, nifti_with_pixdim, pixdim, spacing_xyz):
    path = nifti_with_pixdim(tmp_path / "odd.nii.gz", _disc((6, 24, 24)), pixdim)
    raw = nib.Nifti1Header.from_fileobj(nib.openers.ImageOpener(str(path)), check=False)
    np.testing.assert_array_equal(raw["pixdim"][1:4], np.asarray(pixdim, np.float32))
    with pytest.warns(ImageReadWarning, match="odd.nii.gz.*voxel size"):
        scan = read_image(path)
    sizes = [w for w in scan.metadata["warnings"] if "voxel size" in w]
    assert len(sizes) == 1 and "1 mm" in sizes[0]  # one rule, one warning
    assert scan.spacing == spacing_xyz[::-1]  # (z, y, x)
    # the spacing and the array's affine agree
    columns = np.linalg.norm(scan.array_affine()[:3, :3], axis=0)
    np.testing.assert_allclose(columns, scan.spacing)
    # a map written back and read again keeps that geometry
    write_image(tmp_path / "map.nii.gz", scan.array > 100, like=scan)
    back = read_image(tmp_path / "map.nii.gz")
    assert back.spacing == scan.spacing and not back.metadata["warnings"]


def test_bad_voxel_size_with_a_usable_sform_takes_the_affine(tmp_path):
    img = nib.Nifti1Image(_disc((6, 24, 24)).T.copy(), np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    img.header.set_qform(None, code=0)
    nib.save(img, tmp_path / "s.nii")
    raw = bytearray((tmp_path / "s.nii").read_bytes())
    raw[80:84] = np.float32(np.nan).tobytes()  # pixdim[1] (x), after nibabel's own checks
    (tmp_path / "s.nii").write_bytes(bytes(raw))
    with pytest.warns(ImageReadWarning, match="affine's 2 mm"):
        scan = read_image(tmp_path / "s.nii")
    assert scan.spacing == (2.0, 2.0, 2.0)


def test_good_files_read_without_a_voxel_size_warning(tmp_path, nifti_with_pixdim):
    path = nifti_with_pixdim(tmp_path / "ok.nii.gz", _disc(), [1.5, 1.5, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageReadWarning)
        scan = read_image(path)
    assert scan.spacing == (1.0, 1.5, 1.5)


# ------------------------------------------------------------------ 2. io never opens a pipe


def test_a_folder_holding_a_pipe_is_refused_not_waited_on(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    fifo = _mkfifo(d / "x.dcm")
    _, err = _returns(lambda: read_image(d), fifo)
    assert isinstance(err, ImageReadError) and "x.dcm" in str(err) and "regular" in str(err)
    _, err = _returns(lambda: read_image(fifo), fifo)
    assert isinstance(err, ImageReadError) and "not a regular file" in str(err)
    # the format readers themselves, called directly, refuse it too
    from napari_mtml.io import image_kind
    from napari_mtml.io.dicom import looks_like_dicom, read_dicom_file
    from napari_mtml.io.nifti import read_nifti
    from napari_mtml.io.raster import read_raster

    for reader in (read_dicom_file, read_nifti, read_raster):
        _, err = _returns(lambda r=reader: r(fifo), fifo)
        assert isinstance(err, ImageReadError) and "not a regular file" in str(err), reader
    plain = _mkfifo(tmp_path / "no_suffix")
    assert _returns(lambda: (looks_like_dicom(plain), image_kind(plain)), plain) == (
        (False, None),
        None,
    )


def test_a_pipe_beside_a_dicom_series_is_skipped_with_a_warning(tmp_path):
    from pydicom.data import get_testdata_file

    d = tmp_path / "series"
    d.mkdir()
    (d / "a.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    fifo = _mkfifo(d / "b.dcm")

    def read_quietly():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ImageReadWarning)
            return read_image(d)

    scan, err = _returns(read_quietly, fifo)
    assert err is None, err
    assert scan.array.shape == (128, 128)  # the one slice was read
    assert any("b.dcm" in w and "not a regular file" in w for w in scan.metadata["warnings"])


def test_writers_refuse_a_pipe_instead_of_blocking(tmp_path):
    from napari_mtml.gallery import gallery_path

    fifo = _mkfifo(tmp_path / "m.nii.gz")
    _, err = _returns(lambda: write_image(fifo, np.zeros((8, 8))), fifo)
    assert isinstance(err, ValueError) and "not a regular file" in str(err)
    with pytest.raises(ValueError, match="not a regular file"):
        check_output_file(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        gallery_path("img.nii.gz", fifo)


# ---------------------------------------------------------- 3. OS errors: one line, the path


def test_os_errors_are_one_line_naming_the_path(tmp_path):
    f = tmp_path / "FILE"
    f.write_text("x")
    with pytest.raises(FileExistsError) as exists:
        f.mkdir(parents=True, exist_ok=True)
    assert (
        os_error_message(exists.value) == f"{f}: exists and is not a folder (a folder is "
        "needed here)"
    )
    with pytest.raises(NotADirectoryError) as notdir:
        (f / "sub").mkdir(parents=True, exist_ok=True)
    assert os_error_message(notdir.value) == f"{f / 'sub'}: {f} is a file, not a folder"
    with pytest.raises(IsADirectoryError) as isdir:
        open(tmp_path)
    assert os_error_message(isdir.value) == f"{tmp_path}: is a folder, not a file"
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    assert os_error_message(full) == f"{tmp_path / 'x'}: no space left on the device"
    assert "\n" not in os_error_message(OSError("a\nb"))


def test_widgets_show_the_same_text_for_an_os_error(napari_errors, tmp_path):
    from napari_mtml._napari._common import notify_error

    exc = NotADirectoryError(errno.ENOTDIR, "Not a directory", str(tmp_path / "f" / "x"))
    (tmp_path / "f").write_text("x")
    notify_error("Training", exc)
    assert napari_errors()[-1] == f"Training: {os_error_message(exc)}"
    assert "is a file, not a folder" in napari_errors()[-1]


# ------------------------------------------------------------ 4. files are read as files


def test_read_text_names_the_file_and_the_problem(tmp_path):
    (tmp_path / "latin1.toml").write_bytes(b"a = 1\n# caf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1\.toml: not a UTF-8 .* 0xe9 at offset 11"):
        read_text(tmp_path / "latin1.toml")
    with pytest.raises(ValueError, match="is a folder"):
        read_text(tmp_path)
    with pytest.raises(ValueError, match=r"nope\.toml: file not found"):
        read_text(tmp_path / "nope.toml")
    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbfa = 1\n")
    assert read_text(tmp_path / "bom.toml") == "a = 1\n"


def test_config_from_json_takes_a_path_or_text_explicitly(tmp_path):
    cfg = TrainConfig(healthy=["a.nii.gz"], max_steps=7)
    assert TrainConfig.from_json(text=cfg.to_json()) == cfg
    path = tmp_path / "config.json"
    cfg.to_json(path)
    assert TrainConfig.from_json(path) == cfg and TrainConfig.from_json(str(path)) == cfg
    path.write_text("")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON \(the file is empty\)"):
        TrainConfig.from_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object.*list"):
        TrainConfig.from_json(path)
    path.write_text('{"max_steps": -1}')
    with pytest.raises(ValueError, match=r"config\.json: max_steps"):
        TrainConfig.from_json(path)
    with pytest.raises(ValueError, match="one of the two"):
        TrainConfig.from_json(path, text="{}")
    with pytest.raises(ValueError, match="text="):
        TrainConfig.from_json(cfg.to_json())  # JSON text is not a path
    (tmp_path / "run.toml").write_bytes(b"max_steps = 3\n# \xff\n")
    with pytest.raises(ValueError, match=r"run\.toml: not a UTF-8"):
        TrainConfig.from_toml(tmp_path / "run.toml")


def test_resume_drops_undecodable_log_lines(tmp_path):
    from napari_mtml.training.rundir import truncate_log

    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"type": "step", "step": s}) for s in (1, 2, 3)]
    log.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\x00 junk\n[1]\n")
    truncate_log(log, 2)
    assert log.read_text(encoding="utf-8").splitlines() == lines[:2]


def test_a_fold_restarted_from_scratch_keeps_no_log_of_the_earlier_try(tmp_path):
    from napari_mtml.data import HealthyCollection
    from napari_mtml.training import train

    fg = np.zeros((32, 32), bool)
    fg[6:26, 6:26] = True
    col = HealthyCollection.from_arrays([np.where(fg, 1.0 + i, 0.0) for i in range(5)], [fg] * 5)
    cfg = TrainConfig(
        out=str(tmp_path / "run"),
        fold=0,
        max_steps=2,
        batch_size=2,
        val_size=2,
        val_interval=2,
        warmup_steps=1,
        device="cpu",
        kind="mri",
        base_features=4,
        depth=2,
        max_features=8,
        resume=True,
    )
    log = tmp_path / "run" / "fold_0" / "log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text(json.dumps({"type": "step", "step": 1, "loss": 9.0}) + "\n")  # killed early
    for _ in train(cfg, collection=col):
        pass
    steps = [json.loads(x) for x in log.read_text().splitlines() if '"step"' in x]
    assert [e["step"] for e in steps if e["type"] == "step"] == [1, 2]
    assert all(e.get("loss") != 9.0 for e in steps)


# ------------------------------------------------------------------ 5. silent odd results


def test_write_image_refuses_complex_maps(tmp_path):
    with pytest.raises(ValueError, match=r"c\.nii\.gz: the map is complex"):
        write_image(tmp_path / "c.nii.gz", np.ones((8, 8), np.complex64))
    with pytest.raises(ValueError, match="of type"):
        write_image(tmp_path / "o.nii.gz", np.full((8, 8), "a"))
    assert not list(tmp_path.iterdir())


def test_checkpoints_record_their_frame_and_a_mismatch_names_both(tmp_path):
    from napari_mtml.training.checkpoint import check_frame, model_checkpoint

    ckpt = model_checkpoint({"w": torch.zeros(2)}, 2, (16, 16))
    assert ckpt["frame"] == [16, 16] and ckpt["dims"] == 2 and "w" in ckpt["model"]
    check_frame("best.pt", ckpt, 2, (16, 16), "config.json")  # the same frame passes
    check_frame("best.pt", {"w": torch.zeros(2)}, 2, (32, 32), "config.json")  # an old run
    with pytest.raises(ValueError, match=r"best\.pt .*\(16, 16\).*config\.json.*\(32, 32\)"):
        check_frame("best.pt", ckpt, 2, (32, 32), "config.json")


def test_ensemble_batch_size_is_validated():
    from napari_mtml.inference import Ensemble
    from napari_mtml.model import UNet

    net = [UNet(dims=2, frame=(16, 16), base_features=4, depth=2, max_features=8)]
    assert Ensemble(net, dims=2, frame=(16, 16)).batch_size == 16
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="batch size"):
            Ensemble(net, dims=2, frame=(16, 16), batch_size=bad)


def test_a_blank_image_is_not_told_to_retrain_with_a_larger_frame(tmp_path):
    from napari_mtml.inference import Ensemble
    from napari_mtml.io import Scan
    from napari_mtml.model import UNet

    net = [UNet(dims=2, frame=(16, 16), base_features=4, depth=2, max_features=8)]
    ens = Ensemble(net, dims=2, frame=(16, 16), kind="mri")
    blank = Scan(np.zeros((24, 24), np.float32), (1.0, 1.0), metadata={"path": "blank.png"})
    with pytest.raises(ValueError, match="blank.png") as exc:
        ens.predict(blank)
    assert "--frame" not in str(exc.value)
    big = Scan(_disc((64, 64), radius=0.45), (1.0, 1.0), metadata={"path": "big.png"})
    with pytest.raises(ValueError, match=r"big\.png.*--frame"):
        ens.predict(big)  # too large for the frame: there a larger frame does help


def test_gallery_names_the_file_and_writes_into_a_folder(tmp_path):
    from PIL import Image

    from napari_mtml.gallery import gallery_path, write_gallery

    thin = tmp_path / "thin.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (2000, 10), np.uint8)).save(thin)
    with pytest.raises(ValueError, match=r"thin\.png: "):
        write_gallery(thin, out=tmp_path / "g.png", task="sink")
    assert gallery_path("a/b1.nii.gz", tmp_path) == tmp_path / "b1_preview.png"
    assert gallery_path("a/b1.nii.gz", tmp_path / "prev") == tmp_path / "prev.png"


# -------------------------------------------------- 6. images that cannot take an anomaly


def test_images_too_small_for_the_smallest_anomaly_are_dropped_up_front():
    from napari_mtml.data import HealthyCollection, placeable_share, takes_smallest_anomaly

    frame = (64, 64)
    good = np.zeros(frame, bool)
    good[8:56, 8:56] = True
    speck = np.zeros(frame, bool)
    speck[30:32, 30:32] = True  # 4 pixels: the smallest anomaly (4 px across) cannot sit on it
    line = np.zeros(frame, bool)
    line[32, :] = True  # a thin line: never half of an anomaly
    assert placeable_share(good) > 0.3 and takes_smallest_anomaly(None)
    assert not takes_smallest_anomaly(speck) and not takes_smallest_anomaly(line)
    ims = [np.where(good, 1.0 + i, 0.0) for i in range(6)] + [speck * 1.0, line * 1.0]
    fgs = [good] * 6 + [speck, line]
    col = HealthyCollection.from_arrays(
        ims, fgs, names=[f"ok{i}" for i in range(6)] + ["speck", "line"]
    )
    assert len(col) == 6
    assert len(col.notes) == 1 and "speck" in col.notes[0] and "line" in col.notes[0]
    with pytest.raises(ValueError, match="no healthy image can take"):
        HealthyCollection.from_arrays([speck * 1.0] * 5, [speck] * 5)
    with pytest.raises(ValueError, match="only 4 healthy image.*need at least 5.*speck"):
        HealthyCollection.from_arrays(
            ims[:4] + [speck * 1.0], fgs[:4] + [speck], names=["a", "b", "c", "d", "speck"]
        )


def test_a_draw_that_finds_no_place_falls_back_instead_of_raising(monkeypatch):
    import napari_mtml.data as data
    from napari_mtml.anomalies.placement import PlacementError

    frame = (32, 32)
    fg = np.zeros(frame, bool)
    fg[6:26, 6:26] = True
    samples = data.HealthyCollection.from_arrays(
        [np.where(fg, 1.0 + i, 0.0) for i in range(5)], [fg] * 5
    ).samples
    real = data._synthesize_item
    sizes = []

    def picky(sample, task, rng, *, task_params, **kw):
        # only anomalies of the smallest size find a place (as on a thin foreground)
        sizes.append(task_params.get("max_size"))
        if task_params.get("max_size") is None:
            raise PlacementError("no position (stand-in)")
        return real(sample, task, rng, task_params=task_params, **kw)

    monkeypatch.setattr(data, "_synthesize_item", picky)
    ds = data.SyntheticDataset(samples, [2], seed=0)
    aug, label, task = ds.draw(0)
    assert task == 2 and label.max() > 0 and aug.shape == frame
    assert sizes[:5] == [None] * 5 and sizes[5] == pytest.approx(0.06)
    again = data.SyntheticDataset(samples, [2], seed=0).draw(0)
    np.testing.assert_array_equal(again[0], aug)  # still a pure function of (seed, item)
    val = data.make_validation_set(samples, [2], 3, seed=0)
    assert len(val) == 3 and val.label.max() > 0
