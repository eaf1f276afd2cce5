"""Seconds per optimiser step inside a real training fold, this checkout beside another one.

    python benchmarks/bench_fold_steps.py --previous OTHER_CHECKOUT/src        # 3D light, batch 2
    python benchmarks/bench_fold_steps.py --dims 2 --model small --batch-size 8 --steps 30

Unlike `bench_training.py` (the model's step on its own), this runs `napari_mtml.training.train`
end to end (loader, anomaly synthesis in the loop, the optimiser, the fold's allocator set-up) on
five noisy copies of the packaged MNI152 T1 written to a temporary folder, fold 0 only, no
validation inside the timed steps, loader in the main process (`workers = 0`). Each set-up runs
in its own child process with its `src` first on `PYTHONPATH`; set-ups alternate round by round.
The figure is the median time between step events after the first two steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(args) -> int:
    import torch

    from napari_mtml.config import TrainConfig
    from napari_mtml.training import StepEvent, train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        healthy=(args.child[0],),
        out=args.child[1],
        dims=args.dims,
        fold=0,
        max_steps=args.steps,
        batch_size=args.batch_size,
        preset=args.model,
        recipe="paper" if args.model != "small" else "small",
        device="cpu",
        workers=args.workers,
        val_interval=10 * args.steps,
        seed=0,
    )
    stamps = []
    for event in train(cfg):
        if isinstance(event, StepEvent):
            stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps[2:], stamps[3:], strict=False)]
    print(json.dumps({"step_s": statistics.median(gaps), "n": len(gaps)}))
    return 0


def _write_healthy(folder: Path, copies: int = 5) -> None:
    import nibabel as nib
    import numpy as np

    from napari_mtml.samples import load_sample

    scan = load_sample("mni152_t1")
    rng = np.random.default_rng(0)
    affine = np.diag([*scan.spacing[::-1], 1.0])
    for k in range(copies):
        noisy = scan.array + rng.normal(0, 0.01 * float(scan.array.max()), scan.array.shape)
        noisy = np.where(scan.array > 0, noisy, 0).astype(np.float32)
        # nibabel's axes are (x, y, z): the scan's (z, y, x) reversed
        nib.save(nib.Nifti1Image(noisy.transpose(2, 1, 0), affine), folder / f"h{k}.nii.gz")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--previous", default=None, help="another checkout's src folder")
    p.add_argument("--dims", type=int, default=3)
    p.add_argument("--model", default="light", choices=("paper", "light", "small"))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="steps per fold (the first 2 untimed)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads; 0: the thread rule")
    p.add_argument("--workers", default="0", help="loader workers; a list (0,1) compares them")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.workers = int(args.workers)
        return _child(args)

    workers = [int(w) for w in str(args.workers).split(",")]
    setups = {f"this checkout, {w} worker(s)": (None, w) for w in workers}
    if args.previous:
        setups = {"previous": (os.path.abspath(args.previous), workers[0]), **setups}
    if len(setups) == 1:
        setups = {"this checkout": (None, workers[0])}
    times = {name: [] for name in setups}
    with tempfile.TemporaryDirectory() as tmp:
        healthy = Path(tmp) / "healthy"
        healthy.mkdir()
        _write_healthy(healthy)
        for r in range(args.rounds):
            for name, (src, n_workers) in setups.items():
                env = dict(os.environ)
                if args.threads:
                    env["MTML_THREADS"] = str(args.threads)
                if src:
                    env["PYTHONPATH"] = src
                out = Path(tmp) / f"run_{r}_{len(times)}_{n_workers}_{src is None}"
                cmd = [sys.executable, __file__, "--child", str(healthy), str(out)]
                cmd += ["--dims", str(args.dims), "--model", args.model]
                cmd += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
                cmd += ["--threads", str(args.threads), "--workers", str(n_workers)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise SystemExit(f"{name}: the training child failed:\n{done.stderr[-3000:]}")
                times[name].append(json.loads(done.stdout.strip().splitlines()[-1])["step_s"])
                print(f"round {r + 1} {name}: {times[name][-1]:.3f} s/step", file=sys.stderr)
    first = statistics.median(next(iter(times.values())))
    print(
        f"{args.dims}D {args.model} model, batch {args.batch_size}, "
        f"{args.threads or 'thread-rule'} thread(s), "
        f"{args.steps} steps per fold, {args.rounds} alternating rounds; load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    print("| set-up | s/step (median of rounds) | rounds | speed-up vs first |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        runs = ", ".join(f"{t:.3f}" for t in ts)
        print(f"| {name} | {med:.3f} | {runs} | {first / med:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
