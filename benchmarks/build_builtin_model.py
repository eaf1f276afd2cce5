"""Rebuild the built-in brain T1 model (`builtin:brain-t1`), deterministically per seed.

    python benchmarks/build_builtin_model.py --work /tmp/brain-t1 --max-steps 2000 --install

1. Healthy training heads and brains from the packaged MNI152 T1 (`napari_mtml.variants`: random
   affine and elastic warps, bias fields, Rician noise, contrast and gain changes), half with a
   synthetic head around the brain (skull on), half skull-stripped; voxel sizes drawn like the
   scans users bring (in-plane 0.7-1.2 mm; slices 1 mm, or 3-6.5 mm thick as clinical axial T1).
   Each volume is written as NIfTI with its brain mask (`WORK/data/`, `WORK/masks/`).
2. `mtml train` on them: the small recipe (2D axial slices at 2 mm, 8-64 U-Net, no positional
   encoding, cosine schedule), the 1/4 split, anomalies placed inside the brain masks, the
   MNI152 template as the external dataset of the inter-dataset blending task, `--seed`.
3. With `--install`: the five folds' weights (float16, weights-only torch files) and the run's
   config.json (paths removed) are copied into `src/napari_mtml/models/brain-t1/`, and its
   calibration.json is measured on 8 fresh healthy variants (another seed stream), with
   `Ensemble.predict`'s defaults (the two sides compared); `--calibrate-only` measures it again.

Everything random is seeded from `--seed`; with the same seed, number of threads and torch build
the weights are the same. The model card (docs/model_card_brain-t1.md) records the command and
the figures measured with benchmarks/quality_unseen.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
INSTALL_DIR = ROOT / "src" / "napari_mtml" / "models" / "brain-t1"


def make_data(work: Path, n: int, seed: int) -> tuple[Path, Path]:
    """`n` healthy variants of the MNI152 template: WORK/data/NAME.nii.gz and
    WORK/masks/NAME_mask.nii.gz (skipped when already there for this seed)."""
    from napari_mtml.io import Scan, write_image
    from napari_mtml.samples import load_sample
    from napari_mtml.variants import Template, make_variant

    data, masks = work / "data", work / "masks"
    stamp = work / "data.json"
    wanted = {"seed": seed, "n": n, "version": 1}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return data, masks
    for d in (data, masks):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    t1, brain = load_sample("mni152_t1"), load_sample("mni152_brain_mask")
    template = Template(t1.array, brain.array > 0, spacing=t1.spacing)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        skull = bool(i % 2)
        thick = rng.random() < 0.5
        inplane = float(rng.uniform(0.7, 1.2))
        z = float(rng.uniform(3.0, 6.5)) if thick else 1.0
        v = make_variant(template, rng, spacing=(z, inplane, inplane), skull=skull)
        name = f"brain{i:03d}_{'head' if skull else 'stripped'}_{z:.1f}mm"
        scan = Scan(array=v.image, spacing=v.spacing)
        write_image(data / f"{name}.nii.gz", v.image, like=scan)
        write_image(masks / f"{name}_mask.nii.gz", v.brain.astype(np.uint8), like=scan)
        print(f"  {name}: {v.image.shape}", file=sys.stderr, flush=True)
    stamp.write_text(json.dumps(wanted))
    return data, masks


NOTICE = """# builtin:brain-t1

Weights of napari-mtml's built-in brain T1 model (BSD-3-Clause, with the project); the model card
is docs/model_card_brain-t1.md in the project's repository. They were trained on images derived
from the MNI ICBM152 2009a template, whose notice travels with them:

Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
Institute, McGill University. Permission to use, copy, modify, and distribute this data and its
documentation for any purpose and without fee is granted, provided that the copyright notice
appears in all copies; provided "as is" without express or implied warranty.
"""


def install(run: Path, dest: Path = INSTALL_DIR) -> Path:
    """Copy a trained run into the package: float16 weights-only fold files, config.json
    without machine paths."""
    import torch

    from napari_mtml.inference import load_fold_weights

    cfg = json.loads((run / "config.json").read_text())
    cfg["healthy"] = []
    cfg["external"] = None
    cfg["brain_mask"] = None
    cfg["out"] = "builtin:brain-t1"
    cfg["resume"] = False
    cfg["init"] = None
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (dest / "NOTICE.md").write_text(NOTICE)
    for k in range(5):
        state = load_fold_weights(run, k)
        half = {n: (t.half() if t.is_floating_point() else t) for n, t in state.items()}
        (dest / f"fold_{k}").mkdir()
        torch.save(
            {"format": 1, "model": half, "dims": cfg["dims"], "frame": cfg["frame"]},
            dest / f"fold_{k}" / "best.pt",
        )
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    shown = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest
    print(f"installed {shown} ({size / 1e6:.2f} MB)")
    return dest


def calibrate_installed(work: Path, seed: int, n: int = 8, dest: Path = INSTALL_DIR) -> dict:
    """The installed model's healthy calibration (`napari_mtml.calibration`, calibration.json):
    `n` fresh healthy variants from another seed stream than the training data (`seed + 1000`),
    the map's percentiles inside their foreground (what the Heatmap widget shows by default)."""
    from napari_mtml.calibration import calibrate
    from napari_mtml.io import read_image

    data, _ = make_data(work / "calibration", n, seed + 1000)
    scans = [read_image(p) for p in sorted(data.glob("*.nii.gz"))]
    cal = calibrate(dest, scans, device="cpu")
    print(f"calibration on {n} fresh healthy volumes: {cal['thresholds']}")
    if "thresholds_uncompared" in cal:
        print(f"  without the two sides compared: {cal['thresholds_uncompared']}")
    return cal


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for data and the run")
    parser.add_argument("--n", type=int, default=24, help="healthy training volumes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time", help="training time in all (e.g. 60m); or --max-steps")
    parser.add_argument("--max-steps", type=int, help="steps per fold")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-args", default="", help="more `mtml train` flags")
    parser.add_argument(
        "--v1",
        action="store_true",
        help="the first shipped model's recipe (1/4 split, no bias handling, every slice "
        "equally often, anomalies inside the brain masks; with --n 24 --max-steps 2000)",
    )
    parser.add_argument(
        "--install",
        action="store_true",
        help="copy the weights into src/napari_mtml/models/brain-t1/",
    )
    parser.add_argument(
        "--calibrate-only",
        action="store_true",
        help="only measure the installed model's calibration.json again (after a change to "
        "what `Ensemble.predict` makes of the maps by default)",
    )
    args = parser.parse_args(argv)
    if args.calibrate_only:
        import torch

        torch.set_num_threads(args.threads)
        calibrate_installed(args.work, args.seed)
        return 0
    if not args.time and not args.max_steps:
        parser.error("give --time or --max-steps")

    import shlex

    import torch

    from napari_mtml.cli import main as mtml
    from napari_mtml.samples import sample_data_path

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    data, masks = make_data(args.work, args.n, args.seed)
    t_data = time.perf_counter() - t0
    run = args.work / "run"
    shutil.rmtree(run, ignore_errors=True)
    budget = ["--time", args.time] if args.time else []
    steps = ["--max-steps", str(args.max_steps)] if args.max_steps else []
    if args.v1:
        # the first shipped model's settings (before these existed): its scans as read, no
        # random bias fields, the 1/4 split, every slice equally often, anomalies inside the
        # brain masks
        recipe = ["--bias-correction", "none", "--bias-augment", "0", "--train-tasks", "1"]
        recipe += ["--sampling", "slices", "--brain-mask", str(masks)]
    else:
        # `mtml train`'s defaults for the small recipe (the 4/1 split, bias-field correction
        # and augmentation, every scan drawn equally often, anomalies anywhere in the head:
        # see the README's measurements), spelled out so that a change of default does not
        # change what this builds
        recipe = ["--bias-correction", "auto", "--bias-augment", "0.5", "--train-tasks", "4"]
        recipe += ["--sampling", "scans"]
    argv_train = [
        "train",
        str(data),
        "--out",
        str(run),
        "--recipe",
        "small",
        "--init",
        "none",  # from scratch, not from the model this rebuilds
        *recipe,
        "--external",
        str(sample_data_path("mni152_t1")),
        "--seed",
        str(args.seed),
        "--device",
        "cpu",
        *budget,
        *steps,
        *shlex.split(args.train_args),
    ]
    print("mtml " + " ".join(argv_train[:1] + ["WORK/data"] + argv_train[2:]), flush=True)
    rc = mtml(argv_train)
    if rc:
        return rc
    t_train = time.perf_counter() - t0 - t_data
    print(
        f"data {t_data / 60:.1f} min, training {t_train / 60:.1f} min, "
        f"{torch.get_num_threads()} thread(s)"
    )
    if args.install:
        install(run)
        calibrate_installed(args.work, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
