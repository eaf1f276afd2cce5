"""How much of a scanner's bias field does `napari_mtml.bias` take out? Volumes with a known
field, estimated with and without it.

    python benchmarks/bias_fit.py --work W                 # the 16 training volumes
    python benchmarks/bias_fit.py --work W --role healthy --degrees 1,2,3

Reads the data set that `benchmarks/quality_unseen.py --work W` generated (`W/data-*/`),
regenerates each volume of `--role` from its own seeds twice, as generated and without its bias
field (`bias_peaks.regenerate`), and estimates the log field of both with `estimate_bias` inside
their own foreground (`foreground_mask`, as training and prediction do). The field added is
`log(with / without)` inside the brain. What a correction leaves of it is the standard deviation,
inside the brain, of (estimate with - estimate without) - field added, each centred: 0 takes the
whole field out, 1 none of it. The estimates themselves also hold the template's own slow
variation (the same on every volume, so the difference cancels it); `estimate spread` is the
standard deviation of the estimate on the volume without bias, inside the brain: a large value
there is a distortion the correction adds (the dome a cubic fits to skull and scalp in thick
slices). Last, whether `bias_correction="auto"` corrects the volume (skull-stripped ones only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bias_peaks
import quality_unseen as qu


def _centred_std(values: np.ndarray) -> float:
    return float(np.std(values - values.mean()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="quality_unseen.py's --work folder")
    parser.add_argument("--data", default=None, help="the data-* folder inside --work")
    parser.add_argument("--role", default="train", help="train, healthy or calib (default train)")
    parser.add_argument("--degrees", default="1,3", help="polynomial degrees to compare")
    args = parser.parse_args(argv)
    from napari_mtml.bias import estimate_bias
    from napari_mtml.io import Scan
    from napari_mtml.preprocess import foreground_mask, looks_skull_stripped

    degrees = [int(d) for d in args.degrees.split(",")]
    folder = bias_peaks.data_folder(Path(args.work), args.data)
    manifest = json.loads((folder / "manifest.json").read_text())
    settings = manifest["settings"]
    items = [it for it in manifest["items"] if it["role"] == args.role]
    if not items:
        raise SystemExit(f"no {args.role} volumes in {folder}")
    template = qu._template(settings["quick"])
    seconds = dict.fromkeys(degrees, 0.0)
    rows = []
    for item in items:
        images = bias_peaks.regenerate(template, settings["seed"], settings["quick"], item)
        with_, without = images["with"], images["without"]
        ok = without.brain & (with_.image > 1e-3) & (without.image > 1e-3)
        added = np.log(with_.image[ok] / without.image[ok])
        estimates = {}
        for label, v in images.items():
            fg = foreground_mask(Scan(array=v.image, spacing=v.spacing))
            for d in degrees:
                t = time.perf_counter()
                estimates[label, d] = estimate_bias(v.image, fg, v.spacing, degree=d)
                seconds[d] += time.perf_counter() - t
        left = {
            d: _centred_std((estimates["with", d] - estimates["without", d])[ok] - added)
            / max(_centred_std(added), 1e-9)
            for d in degrees
        }
        spread = {d: _centred_std(estimates["without", d][ok]) for d in degrees}
        auto = "yes" if looks_skull_stripped(with_.image) else "no"
        rows.append((item["name"], _centred_std(added), left, spread, auto))
    print(f"data {folder.name}, {len(rows)} {args.role} volumes; left = the share of the field")
    print("added that correction leaves (0: all out); spread: std of the estimate without bias")
    head = " | ".join(f"left d{d} | spread d{d}" for d in degrees)
    print(f"| volume | field added (std of log) | {head} | corrected by auto |")
    print("|---|---|" + "---|---|" * len(degrees) + "---|")
    for name, added_std, left, spread, auto in rows:
        cells = " | ".join(f"{left[d]:.2f} | {spread[d]:.3f}" for d in degrees)
        print(f"| {name} | {added_std:.3f} | {cells} | {auto} |")
    for group in ("yes", "no"):
        members = [r for r in rows if r[4] == group]
        strong = [r for r in members if r[1] >= 0.03]
        if not strong:
            continue
        means = " | ".join(
            f"{np.mean([r[2][d] for r in strong]):.2f} | {np.mean([r[3][d] for r in members]):.3f}"
            for d in degrees
        )
        what = "skull-stripped" if group == "yes" else "skull on"
        print(f"| mean, {what} (left: the {len(strong)} with a field std >= 0.03) | | {means} | |")
    per = ", ".join(f"d{d} {seconds[d] / (2 * len(rows)):.2f} s" for d in degrees)
    print(f"seconds per estimate: {per}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
