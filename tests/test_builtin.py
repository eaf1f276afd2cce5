"""The built-in brain T1 model shipped in the package: its files, loading, prediction, the CLI
and fine-tuning from it."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from napari_mtml.builtin import MODELS_DIR, builtin_models, is_builtin, resolve_run
from napari_mtml.cli import main
from napari_mtml.config import TrainConfig
from napari_mtml.inference import load_ensemble, load_fold_weights
from napari_mtml.io import Scan
from napari_mtml.samples import load_sample, sample_data_path

FOLDER = MODELS_DIR / "brain-t1"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_brain_model_ships_with_the_package():
    assert "brain-t1" in builtin_models()
    assert is_builtin("builtin:brain-t1") and not is_builtin("runs/brain-t1")
    assert resolve_run("builtin:brain-t1") == FOLDER
    with pytest.raises(ValueError, match="no such built-in model.*builtin:brain-t1"):
        resolve_run("builtin:brain-t2")


def test_shipped_files_are_small_weights_only_and_free_of_machine_paths():
    files = [f for f in FOLDER.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 6e6
    text = (FOLDER / "config.json").read_text()
    cfg = json.loads(text)
    assert cfg["healthy"] == [] and cfg["external"] is None and cfg["brain_mask"] is None
    assert "/tmp" not in text and "/home" not in text and "/work" not in text
    saved = TrainConfig.from_json(FOLDER / "config.json")
    assert saved.preset == "small" and saved.dims == 2 and saved.pos_encoding is False
    for k in range(5):
        blob = torch.load(FOLDER / f"fold_{k}" / "best.pt", weights_only=True)  # no pickle
        assert all(
            t.dtype == torch.float16 for t in blob["model"].values() if t.is_floating_point()
        )
        weights = load_fold_weights(FOLDER, k)
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_builtin_model_predicts_a_real_scan_deterministically():
    scan = load_sample("brain_tumour_image")
    ens = load_ensemble("builtin:brain-t1", device="cpu")
    assert len(ens.folds) == 5
    for model in ens.models:  # float16 on disk, float32 in the model
        assert all(p.dtype == torch.float32 for p in model.parameters())
    first = ens.predict(scan)
    again = ens.predict(scan)
    assert first.anomaly.shape == scan.array.shape
    assert np.isfinite(first.anomaly).all()
    assert first.anomaly.min() >= 0 and first.anomaly.max() <= 1
    assert first.anomaly.max() > 0  # not a blank map
    np.testing.assert_array_equal(first.anomaly, again.anomaly)


def test_builtin_model_predicts_any_voxel_size():
    """The model works at 2 mm whatever the input's spacing: a thin-slice volume and a
    thick-slice one of the same brain give maps on their own grids."""
    t1 = load_sample("mni152_t1")
    ens = load_ensemble("builtin:brain-t1", device="cpu")
    for step in (3, 6):
        arr = np.ascontiguousarray(t1.array[::step, ::2, ::2])
        scan = Scan(array=arr, spacing=(t1.spacing[0] * step, t1.spacing[1] * 2, t1.spacing[2] * 2))
        heat = ens.predict(scan).anomaly
        assert heat.shape == arr.shape and np.isfinite(heat).all()
        assert heat[arr == 0].max() == 0  # 0 outside the foreground by default


def test_cli_predict_takes_a_builtin_name(tmp_path, capsys):
    image = sample_data_path("brain_tumour_image")
    rc = main(
        [
            "predict",
            "builtin:brain-t1",
            str(image),
            "--out",
            str(tmp_path / "p"),
            "--no-png",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    assert (tmp_path / "p" / "brain1_image_anomaly.nii.gz").is_file()
    rows = list(csv.DictReader((tmp_path / "p" / "scores.csv").open()))
    assert len(rows) == 1 and 0 <= float(rows[0]["score"]) <= 1
    assert main(["predict", "builtin:nope", str(image), "--out", str(tmp_path / "q")]) == 2
    assert "no such built-in model" in capsys.readouterr().err


def test_an_xray_given_to_the_brain_model_is_predicted_with_a_warning(tmp_path, capsys):
    from napari_mtml.inference import ModalityWarning

    ens = load_ensemble("builtin:brain-t1", device="cpu")
    xray = load_sample("chest_xray")
    assert xray.metadata["modality"] == "CR"
    with pytest.warns(ModalityWarning, match=r"chest_xray_RG1_UNCR_half\.dcm is an X-ray"):
        pred = ens.predict(xray)
    assert len(pred.notes) == 1 and "trained on MRI" in pred.notes[0]
    assert pred.anomaly.shape == xray.array.shape  # still predicted: the user may know better
    brain = load_sample("brain_tumour_image")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ModalityWarning)
        assert ens.predict(brain).notes == ()  # a NIfTI says nothing of its modality
    # mtml predict says it on one line, the batch goes on, the map is written
    out = tmp_path / "p"
    args = ["predict", "builtin:brain-t1", str(sample_data_path("chest_xray")), "--out", str(out)]
    assert main([*args, "--no-png", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    line = [t for t in err.splitlines() if "is an X-ray" in t]
    assert len(line) == 1 and line[0].startswith("mtml predict: warning: ")
    assert (out / "chest_xray_RG1_UNCR_half_anomaly.nii.gz").is_file()


def test_fine_tuning_from_the_builtin_model_takes_its_settings(tmp_path):
    _, saved, _ = _one_step(tmp_path, "tuned", init="builtin:brain-t1")
    assert saved.init == "builtin:brain-t1" and saved.preset == "small"
    tuned = torch.load(tmp_path / "tuned" / "fold_0" / "best.pt", weights_only=True)["model"]
    base = load_fold_weights(FOLDER, 0)
    for k in base:  # one step at a vanishing rate: still the built-in weights
        torch.testing.assert_close(tuned[k].float(), base[k].float(), atol=1e-5, rtol=0)


def _disc_slices(n=8, size=64):
    from napari_mtml.data import HealthyCollection

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    fg = (yy - size // 2) ** 2 + (xx - size // 2) ** 2 < (size * 0.4) ** 2
    return HealthyCollection.from_arrays(
        [(rng.normal(size=fg.shape) * fg).astype(np.float32) for _ in range(n)], [fg] * n
    )


def _one_step(tmp_path, name, **kwargs):
    from napari_mtml.training import train
    from napari_mtml.training.events import Notice

    cfg = TrainConfig(
        out=str(tmp_path / name),
        fold=0,
        max_steps=1,
        batch_size=2,
        lr=1e-12,
        warmup_start=1.0,
        val_size=4,
        device="cpu",
        seed=2,
        **kwargs,
    )
    notices = [e.text for e in train(cfg, collection=_disc_slices()) if isinstance(e, Notice)]
    return cfg, TrainConfig.from_json(tmp_path / name / "config.json"), notices


def test_auto_init_starts_mri_slices_with_the_small_recipe_from_the_builtin_model(tmp_path):
    # init="auto" is the default: MRI read as 2D slices with the CPU's small recipe is the
    # built-in model's own network, so every fold starts from it, and the run says so
    cfg, saved, notices = _one_step(tmp_path, "auto", kind="mri")
    assert cfg.init == "auto"
    assert saved.init == "builtin:brain-t1"
    assert any("builtin:brain-t1" in t and "--init none" in t for t in notices)
    tuned = torch.load(tmp_path / "auto" / "fold_0" / "best.pt", weights_only=True)["model"]
    base = load_fold_weights(FOLDER, 0)
    for k in base:
        torch.testing.assert_close(tuned[k].float(), base[k].float(), atol=1e-5, rtol=0)
    # resuming keeps the choice the run made (a changed init would refuse to resume)
    _, again, notices = _one_step(tmp_path, "auto", kind="mri", resume=True)
    assert again.init == "builtin:brain-t1" and not any("builtin:" in t for t in notices)


@pytest.mark.parametrize(
    "settings",
    [
        {"kind": "mri", "init": "none"},  # asked for scratch
        {"kind": "mri", "base_features": 4},  # another network
        {"kind": "cxr"},  # not a brain
    ],
)
def test_auto_init_trains_from_scratch_otherwise(tmp_path, settings):
    _, saved, notices = _one_step(tmp_path, "scratch", **settings)
    assert saved.init is None
    assert not any("builtin:" in t for t in notices)
    if settings.get("base_features") is None:
        # the same network, not started from the built-in weights
        tuned = torch.load(tmp_path / "scratch" / "fold_0" / "best.pt", weights_only=True)
        base = load_fold_weights(FOLDER, 0)
        k = next(iter(base))
        assert not torch.allclose(tuned["model"][k].float(), base[k].float(), atol=1e-3)


def test_auto_init_without_the_builtin_model_trains_from_scratch_and_says_so(tmp_path, monkeypatch):
    # an installation that lacks the model's files still trains
    import napari_mtml.config

    monkeypatch.setattr(napari_mtml.config, "AUTO_INIT", "builtin:not-installed")
    _, saved, notices = _one_step(tmp_path, "missing", kind="mri")
    assert saved.init is None
    assert any("builtin:not-installed is unavailable" in t for t in notices)
