"""Does the 1/4 task cross-validation learn anything on a CPU budget? A held-out quality check.

    OMP_NUM_THREADS=2 python benchmarks/quality_heldout.py            # ~5-10 min on 2 cores
    python benchmarks/quality_heldout.py --steps 600 --frame 128,128  # longer, bigger

Data: axial slices of the built-in healthy MNI152 brain (skull-stripped T1 template, 1 mm,
z-scored, cropped, downsampled x2, in a 2D frame). Slices with less than 5% brain are dropped.
A central band of slices is held out as the *test* set, with a gap of `--gap` slices on each
side so that no test slice is a near copy of a training slice; the remaining slices are the
healthy training data of the 1/4 run (5 data folds, contiguous by slice; each model trains on one
synthetic task and is validated on the other four).

After a fixed number of steps per fold, it reports:
- per fold: pixel AP of its selected checkpoint on its held-out tasks (the training's own
  validation, drawn once), and on the test slices, per task (held-out tasks marked with *);
- the ensemble (mean of the 5 folds) on the test slices, per task and over all tasks;
- a random score on the same voxels (its AP is about the anomaly prevalence).
Test items: every test slice with an anomaly of each of the five tasks (fixed seed), plus the
healthy slice itself (target zero); AP pooled over the brain voxels of all of them.

Measured once on a shared, loaded 2-core machine (1 thread, defaults, ~8 min): ensemble AP 0.348
(AUROC 0.739) against 0.146 for a random score; with `--pos-encoding` 0.186 (AUROC 0.613).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per fold")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--frame", default="96,96", help="2D frame (default 96,96)")
    parser.add_argument("--base-features", type=int, default=16)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--max-features", type=int, default=128)
    parser.add_argument(
        "--pos-encoding",
        action="store_true",
        help="use the paper's positional encoding (default off: at this step "
        "budget the encoded models learn frame positions more than content)",
    )
    parser.add_argument("--test-slices", type=int, default=12, help="central band held out")
    parser.add_argument("--gap", type=int, default=6, help="slices dropped around the band")
    parser.add_argument("--val-interval", type=int, default=50)
    parser.add_argument("--val-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from napari_mtml.anomalies import TASKS, synthesize
    from napari_mtml.config import TrainConfig
    from napari_mtml.data import HealthyCollection
    from napari_mtml.inference import load_ensemble
    from napari_mtml.metrics import average_precision, roc_auc
    from napari_mtml.preprocess import to_frame
    from napari_mtml.samples import load_sample
    from napari_mtml.training import FoldFinished, FoldStarted, ValidationEvent, train

    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or None
    if threads:
        torch.set_num_threads(threads)
    frame = tuple(int(v) for v in args.frame.split(","))
    t0 = time.perf_counter()

    # ---- data: framed axial slices, a held-out central band ----
    scan = load_sample("mni152_t1")
    stack, fg, _ = to_frame(scan, kind="mri", dims=2, frame=frame, downsample=2)
    keep = np.flatnonzero(fg.reshape(len(fg), -1).mean(axis=1) >= 0.05)
    mid = len(keep) // 2
    lo, hi = mid - args.test_slices // 2, mid - args.test_slices // 2 + args.test_slices
    test_idx = keep[lo:hi]
    train_idx = np.concatenate([keep[: max(0, lo - args.gap)], keep[hi + args.gap :]])
    collection = HealthyCollection.from_arrays(
        stack[train_idx],
        fg[train_idx],
        names=[f"mni152[z={z}]" for z in train_idx],
        kind="mri",
        groups=[0] * len(train_idx),
    )

    # ---- train the 1/4 run ----
    val_ap: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        config = TrainConfig(
            healthy=(),
            out=str(run),
            dims=2,
            train_tasks=1,
            frame=frame,
            kind="mri",
            recipe="paper",
            init=None,
            preset="light",
            base_features=args.base_features,
            depth=args.depth,
            max_features=args.max_features,
            pos_encoding=args.pos_encoding,
            max_steps=args.steps,
            batch_size=args.batch_size,
            val_interval=args.val_interval,
            val_size=args.val_size,
            device="cpu",
            workers=args.workers,
            seed=args.seed,
            warmup_steps=min(100, args.steps // 5),
        )
        best_ap: dict[int, dict[str, float]] = {}
        gen = train(config, collection=collection)
        for event in gen:
            if isinstance(event, FoldStarted):
                print(
                    f"fold {event.fold}: train {event.train_tasks}, held out {event.val_tasks} ...",
                    file=sys.stderr,
                    flush=True,
                )
            elif isinstance(event, ValidationEvent) and event.best:
                best_ap[event.fold] = dict(event.ap)
            elif isinstance(event, FoldFinished):
                val_ap[event.fold] = best_ap.get(event.fold, {})
        t_train = time.perf_counter() - t0
        ensemble = load_ensemble(run, device="cpu")

        # ---- test items: each test slice x each task, plus the healthy slice ----
        rng = np.random.default_rng(10_000 + args.seed)
        test_imgs, test_fgs = stack[test_idx], fg[test_idx]
        pool = [(test_imgs[j], test_fgs[j]) for j in range(len(test_idx))]

        def source(r):
            return pool[int(r.integers(len(pool)))]

        items, masks, fgs, tasks = [], [], [], []
        for j in range(len(test_idx)):
            items.append(test_imgs[j])
            masks.append(np.zeros(frame, bool))
            fgs.append(test_fgs[j])
            tasks.append(-1)
            for t in range(len(TASKS)):
                res = synthesize(
                    test_imgs[j],
                    test_fgs[j],
                    task=t,
                    rng=rng,
                    source=source if t in (0, 1) else None,
                    max_push=5.0,
                )
                items.append(res.image)
                masks.append(res.mask)
                fgs.append(test_fgs[j])
                tasks.append(t)
        items, masks, fgs, tasks = (
            np.stack(items),
            np.stack(masks),
            np.stack(fgs),
            np.asarray(tasks),
        )
        mean, _, per_fold = ensemble.predict_frames(items)

    random_scores = rng.random(items.shape).astype(np.float32)

    def ap_on(scores, task):
        sel = (tasks == task) | (tasks == -1)
        m = fgs & sel[:, None, None]
        return float(average_precision(scores[m], masks[m]))

    def all_tasks(scores):
        return (
            float(average_precision(scores[fgs], masks[fgs])),
            float(roc_auc(scores[fgs], masks[fgs])),
        )

    names = [TASKS[t] for t in range(len(TASKS))]
    short = {
        "intra_blend": "intra",
        "inter_blend": "inter",
        "sink": "sink",
        "source": "source",
        "smooth_intensity": "smooth",
    }
    print(
        f"\nMNI152 axial slices, frame {frame}, {len(train_idx)} training slices, "
        f"{len(test_idx)} test slices (gap {args.gap}); {args.steps} steps/fold, batch "
        f"{args.batch_size}, U-Net {args.base_features}/{args.depth}/{args.max_features}, "
        f"positional encoding {'on' if args.pos_encoding else 'off'}; "
        f"{torch.get_num_threads()} thread(s); training {t_train / 60:.1f} min"
    )
    print(
        "\npixel AP on the test slices (healthy copies included; * = a task held out from "
        "that model)"
    )
    header = (
        f"{'model':<10}{'val AP held-out':>16}"
        + "".join(f"{short[n]:>9}" for n in names)
        + f"{'all':>8}{'AUROC':>8}"
    )
    print(header)
    for f, fold_map in enumerate(per_fold):
        va = val_ap.get(ensemble.folds[f], {})
        va_mean = np.nanmean(list(va.values())) if va else float("nan")
        cells = []
        for t, n in enumerate(names):
            mark = "*" if n in va else " "
            cells.append(f"{ap_on(fold_map, t):>8.3f}{mark}")
        ap_all, auc_all = all_tasks(fold_map)
        print(
            f"{'fold ' + str(ensemble.folds[f]):<10}{va_mean:>16.3f}"
            + "".join(cells)
            + f"{ap_all:>8.3f}{auc_all:>8.3f}"
        )
    cells = "".join(f"{ap_on(mean, t):>8.3f} " for t in range(len(names)))
    ap_all, auc_all = all_tasks(mean)
    print(f"{'ensemble':<10}{'':>16}{cells}{ap_all:>8.3f}{auc_all:>8.3f}")
    cells = "".join(f"{ap_on(random_scores, t):>8.3f} " for t in range(len(names)))
    ap_all, auc_all = all_tasks(random_scores)
    print(f"{'random':<10}{'':>16}{cells}{ap_all:>8.3f}{auc_all:>8.3f}")
    print(f"\ntotal {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
