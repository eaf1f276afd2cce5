"""How much of a healthy volume's peak is its scanner bias field? The same volumes with and
without it, through a trained run.

    python benchmarks/bias_peaks.py --work W --run RUN
    python benchmarks/bias_peaks.py --work W --run builtin:brain-t1 --names healthy_003_thick_skull

Reads the data set that `benchmarks/quality_unseen.py --work W` generated (`W/data-*/`, the first
T1 one unless `--data` names another), regenerates each named volume (default: its 8 healthy test
volumes) from its own seeds twice, once as generated (checked equal to the saved file) and once
with the bias field turned off (`VariantSettings(bias_range=(0, 0))`: the bias draws from its
own random stream, so the pose, warp, contrast and noise stay as they were), predicts both with
`mtml predict RUN` and prints, per volume, the bias field's spread inside the brain (1st and
99th percentile of its ratio) and the sample score quality_unseen ranks volumes by: the peak of
the map smoothed as `mtml predict`'s "max" score (4 mm) inside the ground-truth brain mask.

A model whose healthy peaks fall when the bias is removed flags the bias field as an anomaly
(the smooth-intensity task teaches it to flag smooth intensity changes): the false positives
that hold its volume ranking down.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_unseen as qu


def data_folder(work: Path, data: str | None) -> Path:
    if data:
        return work / data
    for folder in sorted(work.glob("data-*")):
        manifest = folder / "manifest.json"
        if manifest.is_file() and "contrast" not in json.loads(manifest.read_text())["settings"]:
            return folder
    raise SystemExit(f"no quality_unseen data set in {work}: run quality_unseen.py --work first")


def regenerate(template, seed: int, quick: bool, item: dict) -> dict:
    """{"with": variant, "without": variant}: one non-lesioned volume of a quality_unseen data
    set from its own seeds, as generated and with its bias field turned off (the bias draws
    from its own random stream, so pose, warp, contrast and noise stay as they were)."""
    from napari_mtml.variants import VariantSettings, make_variant

    spacing, thickness, skull = qu._protocol_geometry(
        item["protocol"], qu._rng(seed, *item["keys"], 0), quick
    )
    return {
        label: make_variant(
            template,
            qu._rng(seed, *item["keys"], 1, item["attempt"]),
            spacing=spacing,
            thickness=thickness,
            skull=skull,
            settings=scanner,
        )
        for label, scanner in (
            ("with", VariantSettings()),
            ("without", VariantSettings(bias_range=(0.0, 0.0))),
        )
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="quality_unseen.py's --work folder")
    parser.add_argument("--run", required=True, help="a run folder or a built-in model name")
    parser.add_argument("--data", default=None, help="the data-* folder inside --work")
    parser.add_argument("--names", default=None, help="comma-separated volumes (default: healthy)")
    args = parser.parse_args(argv)

    folder = data_folder(Path(args.work), args.data)
    manifest = json.loads((folder / "manifest.json").read_text())
    settings, items = manifest["settings"], {it["name"]: it for it in manifest["items"]}
    names = (
        args.names.split(",")
        if args.names
        else [n for n, it in items.items() if it["role"] == "healthy"]
    )
    for name in names:
        if name not in items:
            raise SystemExit(f"{name}: no such volume in {folder}")
        if items[name]["kind"] is not None:
            raise SystemExit(
                f"{name}: a lesioned volume; give healthy, calibration or training volumes"
            )
    template = qu._template(settings["quick"])
    seed = settings["seed"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label in ("with", "without"):
            (tmp / label).mkdir()
        spreads, spacings = {}, {}
        for name in names:
            item = items[name]
            images = regenerate(template, seed, settings["quick"], item)
            for label, v in images.items():
                qu._write_volume(tmp / label / f"{name}.nii.gz", v.image, v.spacing)
            saved = qu._read(folder / f"{name}.nii.gz").array
            if not np.array_equal(images["with"].image, saved):
                raise SystemExit(f"{name}: regenerated volume differs from the saved one")
            brain = images["without"].brain
            ratio = images["with"].image[brain] / np.maximum(images["without"].image[brain], 1e-3)
            spreads[name] = np.percentile(ratio, [1, 99])
            spacings[name] = images["with"].spacing
        for label in ("with", "without"):
            qu.predict(
                args.run,
                sorted((tmp / label).glob("*.nii.gz")),
                tmp / f"pred-{label}",
                [],
            )
        for name in names:
            brain = qu._load_masks(folder / f"{name}_masks.npz")["brain"]
            peaks = [
                # quality_unseen's max_smooth score inside the brain
                float(
                    qu.smoothed(
                        qu._read(tmp / f"pred-{label}" / f"{name}_anomaly.nii.gz").array,
                        spacings[name],
                    )[brain].max()
                )
                for label in ("with", "without")
            ]
            rows.append((name, *spreads[name], *peaks))
    print(f"run {args.run}; data {folder.name}; peak = the 'max' score in the brain")
    print("| volume | bias ratio p1-p99 | peak with bias | peak without | change |")
    print("|---|---|---|---|---|")
    for name, lo, hi, with_bias, without in rows:
        print(
            f"| {name} | {lo:.2f}-{hi:.2f} | {with_bias:.3f} | {without:.3f} | "
            f"{without - with_bias:+.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
