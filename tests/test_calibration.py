"""A run's healthy calibration: percentiles of its maps on healthy scans, written next to the
run, ignored once the weights change; `mtml calibrate`; the built-in model's."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from napari_mtml.calibration import (
    CALIBRATION_FILE,
    calibrate,
    calibration_threshold,
    read_calibration,
    weights_digest,
)
from napari_mtml.cli import main
from napari_mtml.io import Scan, read_image
from phantoms import healthy_disc_folder, noisy_disc

_disc = noisy_disc


@pytest.fixture(scope="module")
def run_and_healthy(tmp_path_factory):
    from napari_mtml.config import TrainConfig
    from napari_mtml.training import train

    root = tmp_path_factory.mktemp("cal")
    healthy = healthy_disc_folder(root / "healthy", (64, 64))
    cfg = TrainConfig(
        healthy=(str(healthy),), out=str(root / "run"), fold="all", max_steps=2, dims=2,
        batch_size=2, val_interval=2, val_size=4, preset="small", depth=3, device="cpu",
    )  # fmt: skip
    for _ in train(cfg):
        pass
    return root / "run", healthy


def test_calibration_records_increasing_percentiles_and_reads_back(run_and_healthy, tmp_path):
    run, healthy = run_and_healthy
    run = shutil.copytree(run, tmp_path / "run")
    scans = [read_image(p) for p in sorted(healthy.glob("*.nii.gz"))]
    seen = []
    cal = calibrate(run, scans, device="cpu", progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 6) for i in range(1, 7)]
    t = cal["thresholds"]
    assert list(t) == ["95", "99", "99.9"]
    assert 0 <= t["95"] <= t["99"] <= t["99.9"] <= 1
    # the values are those of the maps inside the foreground
    from napari_mtml.inference import load_ensemble
    from napari_mtml.preprocess import foreground_mask

    ens = load_ensemble(run, device="cpu")
    pooled = np.concatenate(
        [ens.predict(s, mask=foreground_mask(s)).anomaly[foreground_mask(s)] for s in scans]
    )
    assert t["99"] == pytest.approx(float(np.percentile(pooled, 99)), abs=1e-6)
    assert cal["voxels"] == pooled.size and cal["images"] == 6
    assert read_calibration(run)["thresholds"] == t
    assert calibration_threshold(run, 99.0) == t["99"]
    assert load_ensemble(run, device="cpu").calibration["thresholds"] == t


def test_a_retrained_run_ignores_its_old_calibration(run_and_healthy, tmp_path):
    run, healthy = run_and_healthy
    run = shutil.copytree(run, tmp_path / "run")
    calibrate(run, [read_image(next(healthy.glob("*.nii.gz")))], device="cpu")
    assert read_calibration(run) is not None
    blob = torch.load(run / "fold_0" / "best.pt", weights_only=True)
    k = next(iter(blob["model"]))
    blob["model"][k] = blob["model"][k] + 1  # other weights in the same folder
    torch.save(blob, run / "fold_0" / "best.pt")
    assert read_calibration(run) is None and calibration_threshold(run) is None
    (run / CALIBRATION_FILE).write_text("{not json")
    assert read_calibration(run) is None


def test_calibration_refuses_bad_input(run_and_healthy):
    run, healthy = run_and_healthy
    with pytest.raises(ValueError, match="at least one"):
        calibrate(run, [], write=False)
    scan = Scan(array=_disc((64, 64), 1), spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="mask of shape"):
        calibrate(run, [scan], [np.ones((8, 8), bool)], write=False)
    with pytest.raises(ValueError, match="1 mask"):
        calibrate(run, [scan, scan], [None], write=False)


def test_cli_calibrate_writes_the_file_and_predict_regions_use_it(
    run_and_healthy, tmp_path, capsys
):
    run, healthy = run_and_healthy
    run = shutil.copytree(run, tmp_path / "run")
    assert main(["calibrate", str(run), str(healthy), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "99th" in out
    cal = json.loads((run / CALIBRATION_FILE).read_text())
    assert cal["weights"] == weights_digest(run, range(5))
    # predict --regions without --threshold: the regions at the calibrated threshold
    cal["thresholds"]["99"] = 1e-6  # every foreground voxel above: one region
    (run / CALIBRATION_FILE).write_text(json.dumps(cal))
    image = next(healthy.glob("*.nii.gz"))
    assert main(["predict", str(run), str(image), "--out", str(tmp_path / "p"), "--no-png",
                 "--regions", "--device", "cpu"]) == 0  # fmt: skip
    rows = (tmp_path / "p" / f"{image.name.split('.')[0]}_regions.csv").read_text().splitlines()
    assert rows[0] == "threshold,1e-06" and len(rows) == 3  # the threshold, header, one region
    # --contralateral off: the threshold of the models' own maps, where the file has one
    cal["thresholds_uncompared"] = {"95": 1e-7, "99": 2e-6, "99.9": 1e-5}
    (run / CALIBRATION_FILE).write_text(json.dumps(cal))
    assert main(["predict", str(run), str(image), "--out", str(tmp_path / "q"), "--no-png",
                 "--regions", "--device", "cpu", "--contralateral", "off"]) == 0  # fmt: skip
    rows = (tmp_path / "q" / f"{image.name.split('.')[0]}_regions.csv").read_text().splitlines()
    assert rows[0] == "threshold,2e-06"
    assert main(["calibrate", "builtin:brain-t1", str(image)]) == 2
    assert "ships its own calibration" in capsys.readouterr().err


def test_the_builtin_model_ships_a_valid_calibration():
    cal = read_calibration("builtin:brain-t1")
    assert cal is not None and cal["images"] == 8
    t = cal["thresholds"]
    assert 0 < t["95"] < t["99"] < t["99.9"] < 1


def test_3d_mri_calibration_records_the_maps_with_and_without_the_two_sides_compared():
    # a 2 mm MNI152 head through the built-in 2D model: predict compares the two sides by
    # default, so the file keeps both sets of percentiles from the same predictions
    from scipy import ndimage

    from napari_mtml.calibration import thresholds_for
    from napari_mtml.inference import load_ensemble
    from napari_mtml.preprocess import foreground_mask
    from napari_mtml.samples import load_sample

    mni = load_sample("mni152_t1")
    array = ndimage.zoom(np.asarray(mni.array, dtype=np.float32), 0.5, order=1)
    scan = Scan(array=array, spacing=(2.0, 2.0, 2.0))
    cal = calibrate("builtin:brain-t1", [scan], device="cpu", write=False)
    where = foreground_mask(scan)
    ens = load_ensemble("builtin:brain-t1", device="cpu")
    compared = ens.predict(scan, mask=where)
    assert compared.midplane is not None  # the comparison applied
    own = ens.predict(scan, mask=where, contralateral=False).anomaly[where]
    for key, values in (("thresholds", compared.anomaly[where]), ("thresholds_uncompared", own)):
        assert cal[key]["99"] == pytest.approx(float(np.percentile(values, 99)), abs=1e-6)
    # the comparison lowers the healthy map's high values
    assert cal["thresholds"]["99"] < cal["thresholds_uncompared"]["99"]
    assert thresholds_for(cal, "auto") is cal["thresholds"]
    assert thresholds_for(cal, True) is cal["thresholds"]
    assert thresholds_for(cal, False) is cal["thresholds_uncompared"]
    # a calibration without them (2D runs, older files) serves its thresholds for both
    assert thresholds_for({"thresholds": {"99": 0.2}}, False) == {"99": 0.2}


def test_the_builtin_calibration_serves_both_kinds_of_map():
    compared = calibration_threshold("builtin:brain-t1", 99.0)
    own = calibration_threshold("builtin:brain-t1", 99.0, contralateral=False)
    assert compared is not None and own is not None and 0 < compared < own < 1
    assert calibration_threshold("builtin:brain-t1", 99.0, contralateral="auto") == compared
