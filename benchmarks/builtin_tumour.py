"""The built-in model on the tumour sample: how long a heatmap takes on a CPU, and where the
tumour lands in the Heatmap widget's region table.

    python benchmarks/builtin_tumour.py [--run builtin:brain-t1] [--threads 2] [--repeats 3]
        [--contralateral auto|on|off]

No training: the run is used as shipped. Printed, per set-up (the whole head / inside an
automatic brain mask when the `brain` extra is installed):
- wall seconds to load the ensemble and to predict the 25x256x256 volume (median of
  `--repeats`; the brain mask's own time apart), threads used;
- pixel AP / AUROC of the map on the tumour slices (inside the head mask, as `mtml demo`, and
  inside the brain mask) beside a random map;
- the region table the widget shows (connected regions above a threshold, largest first) at
  0.5, at thresholds set, as the widget's "from reference" does, from the 99th / 99.9th
  percentile of the map on the healthy MNI152 T1, and (`cal99`) at the run's own healthy
  calibration's 99th percentile, where the widget starts for a run that ships one: the number
  of regions and the rank of the first region that touches the tumour (1 = first row).

`--contralateral` is `Ensemble.predict`'s comparison of the two sides of the brain (default
`auto`: on for this 3D volume, as `mtml predict` and the widget do; `off`: the models' own map),
used for every map above, the healthy reference's included.

The tumour sample was never used to build or choose the built-in model (see its model card);
this measures it, it must not tune it.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import numpy as np


def _regions(heat, threshold, spacing):
    try:
        from napari_mtml.regions import regions_above
    except ImportError:  # before the regions moved out of the widget
        from napari_mtml._napari.heatmap_widget import regions_above
    return regions_above(heat, threshold, spacing)


def _tumour_rank(labels, regions, tumour):
    for row, region in enumerate(regions, start=1):
        if np.any(tumour[labels == region.label]):
            return row
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="builtin:brain-t1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--contralateral", choices=("auto", "on", "off"), default="auto")
    args = p.parse_args(argv)
    contralateral = {"auto": "auto", "on": True, "off": False}[args.contralateral]

    import torch

    from napari_mtml.inference import load_ensemble
    from napari_mtml.metrics import average_precision, roc_auc
    from napari_mtml.preprocess import foreground_mask
    from napari_mtml.samples import load_sample

    torch.set_num_threads(args.threads)
    scan = load_sample("brain_tumour_image")
    tumour = load_sample("brain_tumour_label").array > 0
    healthy = load_sample("mni152_t1")
    head = foreground_mask(scan, kind="mri")
    slices = np.flatnonzero(tumour.reshape(tumour.shape[0], -1).any(axis=1))

    brain = None
    t_mask = None
    try:
        from napari_mtml.brainmask import brain_mask

        t0 = time.perf_counter()
        brain = brain_mask(scan)
        t_mask = time.perf_counter() - t0
    except ImportError as exc:
        print(f"no brain mask: {exc}")

    loads, preds = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ens = load_ensemble(args.run, device="cpu")
        t1 = time.perf_counter()
        # the option where this release's predict knows it (none before it existed)
        kw = (
            {"contralateral": contralateral}
            if "contralateral" in inspect.signature(ens.predict).parameters
            else {}
        )
        pred = ens.predict(scan, **kw)
        t2 = time.perf_counter()
        loads.append(t1 - t0)
        preds.append(t2 - t1)
    print(f"{args.run}: {ens}")
    print(
        f"threads {torch.get_num_threads()}; load {statistics.median(loads):.2f} s, predict "
        f"{statistics.median(preds):.2f} s (median of {args.repeats}); brain mask "
        + (f"{t_mask:.2f} s" if t_mask is not None else "-")
        + f"; contralateral {args.contralateral}"
    )
    ref = ens.predict(healthy, **kw).anomaly
    ref_values = ref[foreground_mask(healthy, kind="mri")]
    rng = np.random.default_rng(0)
    setups = [("head", head, pred.anomaly)]
    if brain is not None:
        setups.append(("brain", brain, ens.predict(scan, mask=brain, **kw).anomaly))
    print(
        f"\ntumour slices {slices.min()}-{slices.max()}; tumour kept by the brain mask: "
        + (f"{tumour[brain].sum() / tumour.sum():.0%}" if brain is not None else "-")
    )
    print(
        f"{'inside':<7}{'AP':>7}{'AUROC':>7}{'rand AP':>9}  region table: threshold -> "
        "regions, rank of the first touching the tumour"
    )
    for name, mask, heat in setups:
        sel = np.zeros_like(mask)
        sel[slices] = mask[slices]
        y, s = tumour[sel], heat[sel]
        ap, auc = average_precision(s, y), roc_auc(s, y)
        rap = average_precision(rng.random(y.size), y)
        cells = []
        thresholds = [
            ("0.5", 0.5),
            ("p99", float(np.percentile(ref_values, 99))),
            ("p99.9", float(np.percentile(ref_values, 99.9))),
        ]
        if ens.calibration:  # where the Heatmap widget starts: the run's healthy 99th percentile
            try:  # the thresholds of the maps predicted here (with or without the comparison)
                from napari_mtml.calibration import thresholds_for

                cal = thresholds_for(ens.calibration, contralateral)
            except ImportError:  # a release before there were two kinds
                cal = ens.calibration["thresholds"]
            thresholds.append(("cal99", float(cal["99"])))
        for label, thr in thresholds:
            labels, regions = _regions(heat, thr, scan.spacing)
            rank = _tumour_rank(labels, regions, tumour)
            cells.append(f"{label}={thr:.3f}: {len(regions)}, rank {rank or '-'}")
        print(f"{name:<7}{ap:>7.3f}{auc:>7.3f}{rap:>9.3f}  " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
