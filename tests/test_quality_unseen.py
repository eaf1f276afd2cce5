"""The unseen-lesion quality benchmark: its lesions, its data, its metrics, and (slow) the whole
harness end to end through the real CLI in its quick mode."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


lesions = _load("unseen_lesions")
qu = _load("quality_unseen")


@pytest.fixture(scope="module")
def template():
    return qu._template(quick=True)  # the packaged MNI152 at 2 mm


# --------------------------------------------------------------------------------------------
# Lesions
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(lesions.LESIONS))
def test_each_lesion_is_inside_the_brain_deterministic_and_local(template, kind):
    f = lesions.lesion_function(kind, "moderate")
    image, brain = template.image, template.brain
    out, mask = f(image, brain, template.spacing, np.random.default_rng(3))
    again, mask2 = f(image, brain, template.spacing, np.random.default_rng(3))
    other, mask3 = f(image, brain, template.spacing, np.random.default_rng(4))
    assert out.shape == image.shape and out.dtype == np.float32 and mask.dtype == bool
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, again)
    np.testing.assert_array_equal(mask, mask2)
    assert not np.array_equal(mask, mask3)
    assert mask.any() and not (mask & ~brain).any()
    assert not np.shares_memory(out, image)
    changed = np.abs(out - image) > 1e-3 * float(image.max())
    near = ndimage.binary_dilation(mask, iterations=3)
    assert changed.any()
    assert (changed & ~near).sum() <= 0.02 * changed.sum()
    assert not (changed & ~brain).any()


def test_lesion_kinds_look_like_what_they_claim(template):
    image, brain, sp = template.image, template.brain, template.spacing
    wm = np.percentile(image[brain], 90)
    rng = np.random.default_rng

    out, mask = lesions.ring_mass(image, brain, sp, rng(0), severity=2)
    assert (out[mask] > 1.1 * wm).sum() > 5  # enhancing rim
    assert (out[mask] < 0.6 * wm).sum() > 5  # necrotic core / oedema

    out, mask = lesions.cavity(image, brain, sp, rng(0), severity=2)
    assert out[mask].mean() < 0.75 * image[mask].mean()  # CSF-like
    depth = ndimage.distance_transform_edt(brain, sampling=sp)
    assert depth[mask].min() <= 2.0  # open to the brain surface

    out, mask = lesions.ms_foci(image, brain, sp, rng(0), severity=2)
    assert ndimage.label(mask)[1] >= 3  # several foci
    assert out[mask].mean() > image[mask].mean()  # bright
    assert mask.sum() * np.prod(sp) < 5000  # small (under 5 ml)

    out, mask = lesions.texture(image, brain, sp, rng(0), severity=2)
    diff = out[mask] - image[mask]
    assert abs(diff.mean()) < 0.05 * diff.std()  # no mean change ...
    assert diff.std() > 0.05 * wm  # ... but a texture change

    out, mask = lesions.stroke(image, brain, sp, rng(0), severity=2)
    assert out[mask].mean() < 0.9 * image[mask].mean()  # hypointense
    assert depth[mask].min() <= 2.0 and depth[mask].max() > 10.0  # cortex to deep


def test_severity_grows(template):
    image, brain, sp = template.image, template.brain, template.spacing
    for kind in ("ring_mass", "cavity", "texture"):
        sizes = [
            sum(
                lesions.lesion_function(kind, k)(image, brain, sp, np.random.default_rng(s))[
                    1
                ].sum()
                for s in range(2)
            )
            for k in range(3)
        ]
        assert sizes[0] < sizes[1] < sizes[2], (kind, sizes)
    with pytest.raises(ValueError, match="severity"):
        lesions.lesion_function("cavity", 3)
    with pytest.raises(ValueError, match="unknown lesion kind"):
        lesions.lesion_function("sink", 1)


# --------------------------------------------------------------------------------------------
# Data and metrics
# --------------------------------------------------------------------------------------------
def _settings(**over):
    base = {
        "version": qu.GEN_VERSION,
        "seed": 0,
        "quick": True,
        "n_train": 5,
        "n_calib": 1,
        "n_healthy": 2,
        "reps": 1,
        "kinds": ["cavity", "ms_foci"],
        "severities": [1],
        "source": "test",
    }
    base.update(over)
    return base


def test_run_steps_reports_the_checkpoint_the_run_kept(tmp_path):
    # the step the log marks best (the run's selection: AP here, with a lower loss elsewhere),
    # the validation before the first step of a fine-tuned fold included
    fold = tmp_path / "run" / "fold_0"
    fold.mkdir(parents=True)
    rows = [
        {"type": "validation", "step": 0, "val_loss": 0.05, "ap": {"sink": 0.6}, "best": True},
        *({"type": "step", "step": k, "loss": 0.1} for k in range(1, 5)),
        {"type": "validation", "step": 2, "val_loss": 0.01, "ap": {"sink": 0.5}, "best": False},
        {"type": "validation", "step": 4, "val_loss": 0.04, "ap": {"sink": 0.7}, "best": True},
    ]
    (fold / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = qu.run_steps(tmp_path / "run")
    assert out["folds"]["fold_0"] == {"steps": 4, "best_step": 4}
    assert out["total_steps"] == 4


def test_plan_balances_protocols_and_separates_seeds():
    items = qu.plan_items(
        _settings(
            n_train=16,
            n_calib=4,
            n_healthy=8,
            reps=2,
            kinds=list(lesions.LESIONS),
            severities=[0, 1, 2],
        )
    )
    names = [it["name"] for it in items]
    assert len(names) == len(set(names))
    keys = [tuple(it["keys"]) for it in items]
    assert len(keys) == len(set(keys))  # every volume its own seed stream
    for role, n in (("train", 16), ("calib", 4), ("healthy", 8), ("lesion", 30)):
        sel = [it for it in items if it["role"] == role]
        assert len(sel) == n
        counts = [sum(it["protocol"] == p for it in sel) for p in qu.PROTOCOLS]
        assert max(counts) - min(counts) <= 1, (role, counts)
    for kind in lesions.LESIONS:  # every kind is seen under every protocol
        assert {it["protocol"] for it in items if it["kind"] == kind} == set(qu.PROTOCOLS)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    work = tmp_path_factory.mktemp("qu")
    folder, items = qu.generate_data(work, _settings())
    return work, folder, items


def test_generated_data_is_cached_reproducible_and_readable(tiny_data, tmp_path):
    work, folder, items = tiny_data
    assert len(items) == 5 + 1 + 2 + 2
    again_folder, again = qu.generate_data(work, _settings())  # the cache
    assert again_folder == folder and again == items
    # elsewhere, from the same seed: the same volume (here the first lesioned one alone)
    other_folder, other = qu.generate_data(
        tmp_path, _settings(n_train=0, n_calib=0, n_healthy=0, kinds=["cavity"])
    )
    assert len(other) == 1
    name = other[0]["name"]
    assert name in {it["name"] for it in items}
    a = qu._read(folder / f"{name}.nii.gz")
    b = qu._read(other_folder / f"{name}.nii.gz")
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(
        qu._load_masks(folder / f"{name}_masks.npz")["lesion"],
        qu._load_masks(other_folder / f"{name}_masks.npz")["lesion"],
    )
    # another seed: another volume
    seeded_folder, _ = qu.generate_data(
        tmp_path, _settings(seed=1, n_train=0, n_calib=0, n_healthy=0, kinds=["cavity"])
    )
    c = qu._read(seeded_folder / f"{name}.nii.gz")
    assert c.array.shape != a.array.shape or not np.array_equal(c.array, a.array)
    for it in items:
        scan = qu._read(folder / f"{it['name']}.nii.gz")
        masks = qu._load_masks(folder / f"{it['name']}_masks.npz")
        assert scan.array.shape == tuple(it["shape"]) == masks["brain"].shape
        np.testing.assert_allclose(scan.spacing, it["spacing"], rtol=1e-5)
        assert ("lesion" in masks) == (it["role"] == "lesion")
        if it["role"] == "lesion":
            assert masks["lesion"].any() and not (masks["lesion"] & ~masks["brain"]).any()
        if not it["skull"]:
            assert (scan.array[~masks["brain"]] == 0).all()


@pytest.mark.filterwarnings("ignore:.*the image is constant")
def test_evaluation_scores_a_perfect_map_perfectly(tiny_data, tmp_path):
    """Maps equal to the ground truth (and constant maps) through the whole evaluation."""
    _, folder, items = tiny_data
    pred = tmp_path / "pred"
    pred.mkdir()
    for it in items:
        if it["role"] == "train":
            continue
        scan = qu._read(folder / f"{it['name']}.nii.gz")
        masks = qu._load_masks(folder / f"{it['name']}_masks.npz")
        perfect = (
            masks["lesion"].astype(np.float32)
            if "lesion" in masks
            else np.zeros(scan.array.shape, np.float32)
        )
        qu._write_volume(pred / f"{it['name']}_anomaly.nii.gz", perfect, scan.spacing)
    res = qu.evaluate_synthetic(folder, items, pred, seed=0)
    model = res["pixel"]["model"]
    assert model["all"]["ap"] == pytest.approx(1.0)
    assert model["all"]["auroc"] == pytest.approx(1.0)
    for kind in ("cavity", "ms_foci"):
        assert model[f"kind:{kind}"]["ap"] == pytest.approx(1.0)
    prevalence = model["all"]["n_pos"] / model["all"]["n"]
    rnd = res["pixel"]["random"]["all"]
    assert rnd["ap"] < 5 * prevalence and abs(rnd["auroc"] - 0.5) < 0.05
    for s in ("max_smooth", "top1", "area"):
        assert res["sample"]["model"]["brain"][s]["volume"]["auroc"] == pytest.approx(1.0)
    assert res["sample"]["model"]["brain"]["max_smooth"]["slice"]["auroc"] > 0.95
    assert res["peak_hit"]["model"]["all"] == 1.0
    assert res["volume_ap"]["model"]["all"] == pytest.approx(1.0)
    assert res["volume_ap"]["random"]["all"] < 0.1
    assert {row["name"] for row in res["volumes"]} == {
        it["name"] for it in items if it["role"] in ("healthy", "lesion")
    }


def test_compare_prints_runs_side_by_side(tmp_path, capsys):
    a = {
        "label": "before",
        "steps": {"total_steps": 1500},
        "synthetic": {
            "kinds": ["cavity"],
            "pixel": {"model": {"all": {"ap": 0.125}, "kind:cavity": {"ap": 0.5}}},
        },
    }
    b = {
        "label": "after",
        "steps": {"total_steps": 4000},
        "synthetic": {"kinds": ["cavity"], "pixel": {"model": {"all": {"ap": 0.25}}}},
        "tumour": {"methods": {"model": {"pixel_brain": {"ap": 0.3}}}},
    }
    paths = []
    for name, doc in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(doc))
        paths.append(str(tmp_path / name))
    assert qu.main(["--compare", *paths]) == 0
    out = capsys.readouterr().out
    header, *lines = out.splitlines()
    assert header.split() == ["before", "after"]
    row = {ln[:34].strip(): ln[34:].split() for ln in lines if ln.strip()}
    assert row["pixel AP, all"] == ["0.125", "0.250"]
    assert row["train steps (all folds)"] == ["1500", "4000"]
    assert row["AP cavity"] == ["0.500", "-"]
    assert row["tumour AP in brain"] == ["-", "0.300"]


def test_data_cache_key_ignores_docs_but_not_code(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('"""Doc."""\n\ndef g(x):\n    """Doc."""\n    return x + 1  # note\n')
    h0 = qu.code_hash([f])
    f.write_text('"""Other doc."""\n\ndef g(x):\n    """More."""\n    return x + 1\n')
    assert qu.code_hash([f]) == h0
    f.write_text('"""Doc."""\n\ndef g(x):\n    """Doc."""\n    return x + 2\n')
    assert qu.code_hash([f]) != h0


def test_rarity_scores_the_tails():
    r = qu.Rarity(np.random.default_rng(0).standard_normal(100_000), np.random.default_rng(1))
    s = r(np.array([0.0, 1.0, 2.5, -2.5, 6.0], dtype=np.float32))
    assert s[0] < s[1] < s[2] and abs(s[2] - s[3]) < 0.05 and s[4] == pytest.approx(1.0)
    assert ((s >= 0) & (s <= 1)).all()


def test_brain_mask_estimate_on_the_tumour_sample():
    from napari_mtml.preprocess import foreground_mask
    from napari_mtml.samples import load_sample

    scan = load_sample("brain_tumour_image")
    tumour = load_sample("brain_tumour_label").array > 0.5
    brain = qu.estimate_brain_mask(scan)
    head = foreground_mask(scan, kind="mri")
    assert not (brain & ~head).any()
    assert (brain & tumour).sum() > 0.85 * tumour.sum()
    assert 0.4 * head.sum() < brain.sum() < 0.85 * head.sum()  # the scalp and skull are out


# --------------------------------------------------------------------------------------------
# End to end (the real CLI)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path, capsys):
    out = tmp_path / "q.json"
    rc = qu.main(
        [
            "--quick",
            "--work",
            str(tmp_path / "w"),
            "--json",
            str(out),
            "--kinds",
            "cavity",
            "--n-healthy",
            "1",
            "--label",
            "t",
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "pixel AP inside the brain mask" in printed and "real tumour" in printed
    assert res["label"] == "t" and res["threads"] >= 1
    assert res["steps"]["total_steps"] == 5 * 4  # 5 folds x --max-steps 4
    assert res["tumour"]["steps"]["total_steps"] == 5 * 4
    for m in qu.METHODS:
        ap = res["synthetic"]["pixel"][m]["all"]["ap"]
        assert 0.0 <= ap <= 1.0
        t = res["tumour"]["methods"][m]["pixel_head"]
        assert 0.0 <= t["ap"] <= 1.0 and 0.0 <= t["auroc"] <= 1.0
    assert set(res["times_s"]) >= {
        "generate data",
        "train",
        "predict",
        "evaluate",
        "tumour: train",
        "tumour: predict",
        "tumour: evaluate",
    }
    # --run: evaluate the same run again without training
    out2 = tmp_path / "q2.json"
    assert (
        qu.main(
            [
                "--quick",
                "--work",
                str(tmp_path / "w"),
                "--json",
                str(out2),
                "--kinds",
                "cavity",
                "--n-healthy",
                "1",
                "--skip-tumour",
                "--run",
                res["run"],
            ]
        )
        == 0
    )
    res2 = json.loads(out2.read_text())
    assert "train" not in res2["times_s"] and "tumour" not in res2
    assert res2["train_record"] == res["train_record"] and res["train_record"]["train_s"] > 0
    assert res2["synthetic"]["pixel"]["model"]["all"] == res["synthetic"]["pixel"]["model"]["all"]
