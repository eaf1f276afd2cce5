"""The `mtml` command end to end on tiny data, and its answers to bad input."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from cli_fixtures import FAST, TINY_TOML
from napari_mtml.cli import main


def _disc(shape, rng, radius):
    yy, xx = np.meshgrid(*[np.linspace(-0.5, 0.5, n) for n in shape], indexing="ij")
    inside = yy**2 + xx**2 < radius**2
    return np.where(inside, 100 + 10 * rng.standard_normal(shape), 0).astype(np.float32)


def _save(path, array_yx_or_zyx, spacing=1.0):
    """Save an array given in (y, x) / (z, y, x) order as NIfTI (x, y[, z]) with a RAS affine."""
    data = np.asarray(array_yx_or_zyx).T.copy()
    nib.save(nib.Nifti1Image(data, np.diag([spacing, spacing, spacing, 1.0])), path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Healthy 2D slices (6 files), a test image with a bright blob and its mask, a config."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(1)
    healthy = root / "healthy"
    healthy.mkdir()
    for i in range(6):
        _save(healthy / f"h{i}.nii.gz", _disc((28, 28), rng, 0.3 + 0.02 * i))
    test = root / "test"
    test.mkdir()
    img = _disc((28, 28), rng, 0.32)
    mask = np.zeros(img.shape, bool)
    mask[12:16, 12:16] = True
    img[mask] += 60
    _save(test / "case1.nii.gz", img)
    labels = root / "labels"
    labels.mkdir()
    _save(labels / "case1.nii.gz", mask.astype(np.uint8))
    toml = root / "tiny.toml"
    toml.write_text(TINY_TOML)
    return {"root": root, "healthy": healthy, "test": test, "labels": labels, "toml": toml}


@pytest.fixture(scope="module")
def trained(tiny):
    run = tiny["root"] / "run"
    rc = main(
        ["train", str(tiny["healthy"]), "--out", str(run), "--config", str(tiny["toml"]), *FAST]
    )
    assert rc == 0
    return run


def _fails(capsys, argv, *needles):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"mtml {argv[0]}: error:")
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_train_writes_a_run(trained):
    assert (trained / "config.json").is_file()
    for k in range(5):
        assert (trained / f"fold_{k}" / "best.pt").is_file()
        assert (trained / f"fold_{k}" / "log.jsonl").stat().st_size > 0


def test_predict_writes_maps_on_the_input_grid(trained, tiny, capsys):
    out = tiny["root"] / "pred"
    rc = main(
        [
            "predict",
            str(trained),
            str(tiny["test"] / "case1.nii.gz"),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    src = nib.load(tiny["test"] / "case1.nii.gz")
    for suffix in ("anomaly", "disagreement"):
        img = nib.load(out / f"case1_{suffix}.nii.gz")
        assert img.shape[:2] == src.shape[:2]
        np.testing.assert_allclose(img.affine, src.affine)
        data = img.get_fdata()
        assert np.isfinite(data).all() and data.min() >= 0 and data.max() <= 1
    assert (out / "case1_overlay.png").stat().st_size > 1000
    scores = (out / "scores.csv").read_text().splitlines()
    assert scores[0].startswith("name,score") and scores[1].startswith("case1,")


def test_predict_masks_scores_and_background(trained, tiny, capsys, monkeypatch):
    case = tiny["test"] / "case1.nii.gz"
    masks = tiny["root"] / "masks"
    masks.mkdir()
    half = np.zeros((28, 28), np.uint8)
    half[:, :14] = 1  # (y, x): the left half
    _save(masks / "case1_mask.nii.gz", half)
    out = tiny["root"] / "pred_masked"
    rc = main(
        [
            "predict",
            str(trained),
            str(case),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-png",
            "--mask-dir",
            str(masks),
            "--score",
            "max",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    heat = nib.load(out / "case1_anomaly.nii.gz").get_fdata().T.reshape(28, 28)
    assert np.all(heat[:, 14:] == 0) and (out / "case1_mask.nii.gz").is_file()
    import csv

    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert rows[0]["score_method"] == "max" and rows[0]["score"] == rows[0]["max"]
    assert float(rows[0]["top1"]) >= float(rows[0]["mean"])
    # without a mask the map is 0 outside the foreground (the disc) unless kept
    plain, kept = tiny["root"] / "pred_plain", tiny["root"] / "pred_kept"
    for folder, extra in ((plain, []), (kept, ["--keep-background"])):
        assert (
            main(
                [
                    "predict",
                    str(trained),
                    str(case),
                    "--out",
                    str(folder),
                    "--device",
                    "cpu",
                    "--no-png",
                    *extra,
                ]
            )
            == 0
        )
    corner = (slice(5, 7), slice(5, 7))  # inside the disc's box (the crop), outside the disc
    assert np.all(
        nib.load(plain / "case1_anomaly.nii.gz").get_fdata().T.reshape(28, 28)[corner] == 0
    )
    assert np.any(nib.load(kept / "case1_anomaly.nii.gz").get_fdata().T.reshape(28, 28)[corner] > 0)
    # a missing mask names the input and the folder; no extra: the install hint
    other = tiny["root"] / "no_masks"
    other.mkdir()
    rc = main(
        [
            "predict",
            str(trained),
            str(case),
            "--out",
            str(tiny["root"] / "p2"),
            "--device",
            "cpu",
            "--no-png",
            "--mask-dir",
            str(other),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "case1" in err and "no_masks" in err
    import napari_mtml.brainmask as bm

    monkeypatch.setattr(bm, "available", lambda: False)
    _fails(
        capsys,
        [
            "predict",
            str(trained),
            str(case),
            "--out",
            str(tiny["root"] / "p3"),
            "--brain-mask",
            "auto",
        ],
        "napari-mtml[brain]",
    )


def test_predict_regions_table_as_the_heatmap_widget(trained, tiny, capsys):
    import csv

    from napari_mtml.io import read_image
    from napari_mtml.regions import regions_above

    case = tiny["test"] / "case1.nii.gz"
    out = tiny["root"] / "pred_regions"
    heat_path = tiny["root"] / "pred" / "case1_anomaly.nii.gz"
    if not heat_path.is_file():
        assert (
            main(
                [
                    "predict",
                    str(trained),
                    str(case),
                    "--out",
                    str(heat_path.parent),
                    "--no-png",
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
    # a 2D NIfTI reads as a one-slice volume: its regions are 3D, as in the widget
    heat = nib.load(heat_path).get_fdata().T.reshape(1, 28, 28).astype(np.float32)
    threshold = float(np.quantile(heat[heat > 0], 0.8))
    rc = main(
        [
            "predict",
            str(trained),
            str(case),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-png",
            "--regions",
            "--threshold",
            f"{threshold:.6f}",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    with open(out / "case1_regions.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["threshold", f"{float(f'{threshold:.6f}'):.6g}"]
    assert rows[1] == [
        "label",
        "voxels",
        "size_mm3",
        "peak",
        "mean",
        "centre_z_mm",
        "centre_y_mm",
        "centre_x_mm",
    ]
    _, expected = regions_above(heat, float(f"{threshold:.6f}"), read_image(case).spacing)
    assert expected and [int(r[1]) for r in rows[2:]] == [r.voxels for r in expected]
    _fails(
        capsys,
        ["predict", str(trained), str(case), "--out", str(out), "--threshold", "0.5"],
        "--regions",
    )
    _fails(
        capsys,
        ["predict", str(trained), str(case), "--out", str(out), "--regions", "--threshold", "1.5"],
        "threshold",
    )


def test_evaluate_pairs_predictions_and_labels(trained, tiny, capsys):
    pred = tiny["root"] / "pred_eval"
    assert (
        main(
            [
                "predict",
                str(trained),
                str(tiny["test"]),
                "--out",
                str(pred),
                "--no-png",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    metrics_path = tiny["root"] / "metrics.json"
    rc = main(["evaluate", str(pred), str(tiny["labels"]), "--out", str(metrics_path)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert metrics_path.is_file()
    assert "ap" in captured.out.lower()


def test_predict_missing_fold(trained, tiny, capsys, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "fold_2" / "best.pt").unlink()
    _fails(
        capsys,
        ["predict", str(run), str(tiny["test"] / "case1.nii.gz"), "--out", str(tmp_path / "p")],
        "fold_2",
        "best.pt",
    )


def test_predict_bad_inputs(trained, tiny, capsys, tmp_path):
    _fails(
        capsys,
        ["predict", str(trained), str(tmp_path / "nope.nii.gz"), "--out", str(tmp_path / "p")],
        "nope.nii.gz",
    )
    _fails(
        capsys,
        [
            "predict",
            str(tmp_path),
            str(tiny["test"] / "case1.nii.gz"),
            "--out",
            str(tmp_path / "p"),
        ],
        "config.json",
    )


def test_train_without_healthy_files(tiny, capsys, tmp_path):
    _fails(capsys, ["train", "--out", str(tmp_path / "r"), *FAST], "no healthy")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, ["train", str(empty), "--out", str(tmp_path / "r"), *FAST], "empty")


def test_train_unreadable_file(tiny, capsys, tmp_path):
    bad = tmp_path / "healthy"
    bad.mkdir()
    for i in range(5):
        _save(bad / f"ok{i}.nii.gz", _disc((28, 28), np.random.default_rng(i), 0.3))
    (bad / "broken.nii.gz").write_bytes(b"\x1f\x8b this is no NIfTI")
    _fails(
        capsys,
        ["train", str(bad), "--out", str(tmp_path / "r"), "--config", str(tiny["toml"]), *FAST],
        "broken.nii.gz",
    )


def test_train_mixed_2d_and_3d(tiny, capsys, tmp_path):
    from PIL import Image

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray((_disc((28, 28), rng, 0.3) * 1.5).clip(0, 255).astype(np.uint8)).save(
            mixed / f"a{i}.png"
        )
    _save(mixed / "b_volume.nii.gz", np.stack([_disc((28, 28), rng, 0.3)] * 4))
    _fails(
        capsys,
        ["train", str(mixed), "--out", str(tmp_path / "r"), "--config", str(tiny["toml"]), *FAST],
        "3D",
        "2D",
    )


def test_train_frame_too_small(tiny, capsys, tmp_path):
    argv = [
        "train",
        str(tiny["healthy"]),
        "--out",
        str(tmp_path / "r"),
        "--config",
        str(tiny["toml"]),
        *FAST,
        "--frame",
        "8,8",
    ]
    _fails(capsys, argv, "frame", "would fit")


def test_train_fold_out_of_range(tiny, capsys, tmp_path):
    argv = ["train", str(tiny["healthy"]), "--out", str(tmp_path / "r"), *FAST, "--fold", "7"]
    _fails(capsys, argv, "fold", "0..4")
    with pytest.raises(SystemExit):  # argparse: not a number at all
        main(["train", str(tiny["healthy"]), "--fold", "seven"])


def test_module_entry_point_for_torchrun():
    out = subprocess.run(
        [sys.executable, "-m", "napari_mtml.cli", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--train-tasks" in out.stdout and "--resume" in out.stdout


def test_run_demo_tiny(tmp_path, capsys):
    """`mtml demo`'s whole path with a tiny U-Net and 2 steps per fold (the real demo takes
    minutes)."""
    from napari_mtml.demo import run_demo

    result = run_demo(
        tmp_path / "demo",
        max_steps=2,
        batch_size=2,
        val_size=2,
        device="cpu",
        base_features=4,
        depth=2,
        max_features=8,
    )
    out = capsys.readouterr().out
    assert "random" in out and "AP" in out
    for path in (result.anomaly, result.disagreement, result.overlay):
        assert path.is_file() and path.stat().st_size > 0
    assert nib.load(result.anomaly).shape == (256, 256, 25)
    m = result.metrics
    assert m["tumour_voxels"] > 1000 and 0 < m["prevalence"] < 0.2
    assert 0 <= m["ensemble"]["ap"] <= 1 and len(m["folds"]) == 5
    assert m["steps_per_fold"] == [2] * 5 and m["max_steps_per_fold"] == 2
    # The random baseline's AP is about the prevalence: a sanity check of the scoring.
    assert m["random"]["ap"] == pytest.approx(m["prevalence"], abs=0.02)
    # A run folder the demo did not write is never replaced.
    (tmp_path / "other" / "run").mkdir(parents=True)
    with pytest.raises(ValueError, match="not written by `mtml demo`"):
        run_demo(tmp_path / "other", max_steps=1)


# The `mtml train` flags outside scripts rely on: names and the TrainConfig fields they fill.
TRAIN_FLAGS = {
    "--out": "out",
    "--dims": "dims",
    "--train-tasks": "train_tasks",
    "--fold": "fold",
    "--external": "external",
    "--time": "time_budget",
    "--max-steps": "max_steps",
    "--recipe": "recipe",
    "--init": "init",
    "--batch-size": "batch_size",
    "--frame": "frame",
    "--model": "preset",
    "--kind": "kind",
    "--spacing": "spacing",
    "--downsample": "downsample",
    "--brain-mask": "brain_mask",
    "--bias-correction": "bias_correction",
    "--bias-augment": "bias_augment",
    "--sampling": "sampling",
    "--lr": "lr",
    "--lr-schedule": "lr_schedule",
    "--ema": "ema",
    "--val-every": "val_interval",
    "--device": "device",
    "--workers": "workers",
    "--seed": "seed",
    "--config": "config",
    "--resume": "resume",
}


def _train_parser():
    from napari_mtml.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices["train"]


def test_train_flags_come_from_the_config_fields():
    """Each flag's help, choices and parser are declared once, on its TrainConfig field."""
    from napari_mtml.config import settings

    actions = {
        a.option_strings[0] if a.option_strings else a.dest: a
        for a in _train_parser()._actions
        if a.dest != "help"
    }
    assert {k: a.dest for k, a in actions.items() if k != "healthy"} == TRAIN_FLAGS
    declared = settings()
    for flag, action in actions.items():
        if action.dest == "config":
            continue
        setting = declared[action.dest]
        assert action.help == setting.help, flag
        if setting.choices is not None:
            assert tuple(action.choices) == tuple(setting.choices), flag
        assert action.default in (None, False), flag  # a flag left out keeps the TOML's value


def test_train_flags_fill_the_config():
    from napari_mtml.config import TrainConfig

    args = _train_parser().parse_args(
        [
            "a.nii.gz",
            "--model",
            "light",
            "--val-every",
            "7",
            "--time",
            "2m",
            "--fold",
            "all",
            "--frame",
            "64,64",
            "--ema",
            "0.5",
            "--resume",
        ]
    )
    cfg = TrainConfig.from_args(args)
    assert (
        cfg.healthy,
        cfg.preset,
        cfg.val_interval,
        cfg.time_budget,
        cfg.fold,
        cfg.frame,
        cfg.ema,
        cfg.resume,
    ) == (("a.nii.gz",), "light", 7, 120.0, "all", (64, 64), 0.5, True)
    with pytest.raises(SystemExit):
        _train_parser().parse_args(["--ema", "x"])


def test_validate_checks_every_declared_rule():
    """`validate` loops over the fields' declared rules: a value outside one names the field."""
    from napari_mtml.config import TrainConfig, settings

    for name, setting in settings().items():
        if setting.choices is not None:
            bad = "nonsense" if isinstance(setting.choices[0], str) else 99
        elif setting.kind is int:
            bad = setting.minimum - 1
        elif setting.kind is float:
            bad = -1.0
        elif setting.kind is bool:
            bad = "yes"
        else:
            continue
        with pytest.raises(ValueError, match=rf"^{name} = "):
            TrainConfig(**{name: bad})


def test_resume_alone_continues_a_run_with_its_saved_settings(tiny, tmp_path):
    """`mtml train --out RUN --resume` needs neither the data nor the flags again: the run's
    config.json supplies them (here: fold 0 trained first, then fold 1 from the saved settings)."""
    import json

    run = tmp_path / "run"
    argv = ["train", str(tiny["healthy"]), "--out", str(run), "--config", str(tiny["toml"])]
    assert main([*argv, *FAST, "--fold", "0", "--spacing", "1.5"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert main(["train", "--out", str(run), "--resume", "--fold", "1"]) == 0
    assert (run / "fold_1" / "best.pt").is_file()
    again = json.loads((run / "config.json").read_text())
    for key in ("healthy", "spacing", "max_steps", "frame", "base_features", "seed"):
        assert again[key] == saved[key], key
    # a flag that contradicts the saved run is still refused
    assert main(["train", "--out", str(run), "--resume", "--fold", "1", "--seed", "5"]) == 2


def test_predict_contralateral_flag_reaches_the_ensemble(trained, tiny, capsys, monkeypatch):
    from napari_mtml.inference import Ensemble

    seen = []
    real = Ensemble.predict

    def spy(self, scan, **kwargs):
        seen.append(kwargs.get("contralateral"))
        return real(self, scan, **kwargs)

    monkeypatch.setattr(Ensemble, "predict", spy)
    case = tiny["test"] / "case1.nii.gz"
    for i, extra in enumerate(([], ["--contralateral", "on"], ["--contralateral", "off"])):
        out = tiny["root"] / f"pred_sides_{i}"
        argv = ["predict", str(trained), str(case), "--out", str(out), "--no-png", *extra]
        assert main([*argv, "--device", "cpu"]) == 0, capsys.readouterr().err
    assert seen == ["auto", True, False]
    with pytest.raises(SystemExit):
        main(["predict", str(trained), str(case), "--out", "x", "--contralateral", "maybe"])
