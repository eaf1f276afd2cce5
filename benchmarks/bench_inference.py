"""Seconds per 5-fold ensemble prediction on CPU (randomly initialised weights: timing only).

    OMP_NUM_THREADS=1 python benchmarks/bench_inference.py            # 1 thread
    python benchmarks/bench_inference.py --threads 2 --repeats 3

Cases: a 2D X-ray in the 256x256 frame (the built-in chest radiograph) and a 3D brain in the
80x112x80 frame (the built-in MNI152 template), each with the paper's and the light U-Net
preset. For every case a run folder with 5 folds is built in a temporary directory, then
`load_ensemble(run).predict(scan)` is timed end to end (preprocessing, 5 forward passes, mapping
back), next to the forward passes alone. Target (issue 4): <= 5 s for the 3D paper preset.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _build_run(root: Path, dims: int, kind: str, frame: tuple[int, ...], preset: str) -> Path:
    import torch

    from napari_mtml.config import TrainConfig
    from napari_mtml.model import UNet, count_parameters

    run = root / f"run_{dims}d_{preset}"
    run.mkdir()
    cfg = TrainConfig(
        healthy=("unused",), out=str(run), dims=dims, frame=frame, kind=kind, preset=preset
    ).resolve(dims, kind, frame)
    cfg.to_json(run / "config.json")
    n_params = 0
    for k in range(5):
        (run / f"fold_{k}").mkdir()
        net = UNet(**cfg.model_kwargs(), init_seed=k)
        n_params = count_parameters(net)
        torch.save(net.state_dict(), run / f"fold_{k}" / "best.pt")
    return run, n_params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed predictions per case")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                        "OMP_NUM_THREADS, else torch's default)")
    parser.add_argument("--cases", default="2d-paper,2d-light,3d-paper,3d-light")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from napari_mtml.inference import load_ensemble
    from napari_mtml.preprocess import to_frame
    from napari_mtml.samples import load_sample

    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or None
    if threads:
        torch.set_num_threads(threads)
    scans = {2: load_sample("chest_xray"), 3: load_sample("mni152_t1")}
    setups = {2: ("cxr", (256, 256)), 3: ("mri", (80, 112, 80))}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            dims, preset = int(case[0]), case.split("-")[1]
            kind, frame = setups[dims]
            run, n_params = _build_run(Path(tmp), dims, kind, frame, preset)
            t = time.perf_counter()
            ens = load_ensemble(run, device="cpu")
            t_load = time.perf_counter() - t
            scan = scans[dims]
            ens.predict(scan)  # warm-up (allocator, oneDNN kernels)
            totals = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                pred = ens.predict(scan)
                totals.append(time.perf_counter() - t)
            frames, _, _ = to_frame(scan, kind=kind, dims=dims, frame=frame)
            frames = np.asarray(frames)[None]
            t = time.perf_counter()
            ens.predict_frames(frames)
            t_fwd = time.perf_counter() - t
            rows.append((f"{dims}D {'x'.join(map(str, frame))}", preset, n_params / 1e6, t_load,
                         statistics.median(totals), t_fwd, pred.anomaly.shape))
            print(f"done {case}", file=sys.stderr, flush=True)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU, 5 folds, "
          f"median of {args.repeats}")
    print(f"{'frame':<16}{'preset':<8}{'M params':>9}{'load s':>8}{'predict s':>11}"
          f"{'forward s':>11}  input grid")
    for frame, preset, mp, tl, tp, tf, shape in rows:
        print(f"{frame:<16}{preset:<8}{mp:>9.1f}{tl:>8.2f}{tp:>11.2f}{tf:>11.2f}  {shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
