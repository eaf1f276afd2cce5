"""Training throughput on CPU: model steps per second next to the loader's samples per second.

    OMP_NUM_THREADS=1 python benchmarks/bench_training.py            # a few minutes
    python benchmarks/bench_training.py --steps 3 --items 24 --threads 2

Model: one optimiser step (forward, MSE, backward, AdamW) of the U-Net on random input, for the
2D 256x256 frame at batch 8 and the 3D 80x112x80 frame at batch 2, with the paper's and the light
preset; one warm-up step, then the median of `--steps` timed steps (default 1: the paper 3D model
takes over a minute per step on one core).

Loader: `SyntheticDataset` items (a random task of the five per item, anomalies synthesised on the
fly, label included) through a torch DataLoader with 0, 1 and 2 workers, on healthy images in the
frame (slices of the built-in MNI152 brain for 2D and the volume for 3D when the sample data is
installed, else smooth synthetic ellipsoids). The loader keeps up when its samples/s is at least
batch x steps/s of the model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _model_steps_per_s(dims: int, preset: str, batch: int, steps: int) -> tuple[float, int]:
    import torch

    from napari_mtml.config import TrainConfig
    from napari_mtml.model import UNet, count_parameters

    frame = (256, 256) if dims == 2 else (80, 112, 80)
    cfg = TrainConfig(preset=preset).resolve(dims, "cxr" if dims == 2 else "mri", frame)
    net = UNet(**cfg.model_kwargs(), init_seed=0)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 1, *frame), generator=gen)
    y = torch.rand((batch, 1, *frame), generator=gen)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step allocates and warms caches
            times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times), count_parameters(net)


def _healthy(dims: int):
    import numpy as np

    from napari_mtml.data import HealthyCollection

    try:
        from napari_mtml.samples import sample_data_path  # the package's built-in sample data

        path = sample_data_path("mni152_t1")
        if dims == 2:  # 1 mm slices in the 256x256 frame
            col = HealthyCollection.from_paths([path], dims=2, kind="mri", frame=(256, 256),
                                               downsample=1)
        else:  # one volume: five copies make a collection (timing only)
            from napari_mtml.io import read_image
            from napari_mtml.preprocess import to_frame

            arr, fg, _ = to_frame(read_image(path), kind="mri")
            col = HealthyCollection.from_arrays([arr] * 5, [fg] * 5)
        return col.samples, f"MNI152 {'slices' if dims == 2 else 'volume'}"
    except Exception:
        pass
    frame = (256, 256) if dims == 2 else (80, 112, 80)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in frame], indexing="ij")
    rng = np.random.default_rng(0)
    samples = []
    for k in range(6):
        r = sum((g / (0.7 + 0.05 * k)) ** 2 for g in grid)
        fg = r <= 1
        img = (fg * (np.cos(6 * grid[0]) + 0.1 * rng.normal(size=frame))).astype(np.float32)
        samples.append((img, fg))
    col = HealthyCollection.from_arrays([s[0] for s in samples], [s[1] for s in samples])
    return col.samples, "synthetic ellipsoids"


def _loader_samples_per_s(dims: int, workers: int, items: int) -> float:
    import torch

    from napari_mtml.data import SyntheticDataset, make_loader

    samples, _ = _healthy(dims)
    ds = SyntheticDataset(samples, [0, 1, 2, 3, 4], seed=0, flip=dims == 3,
                          task_params={"max_push": 5.0 if dims == 3 else 10.0})
    batch = 2
    loader = make_loader(ds, batch_size=batch, workers=workers)
    it = iter(loader)
    next(it)  # worker start-up is paid once per run, not per item
    t0 = time.perf_counter()
    n = 0
    while n < items:
        images, labels, _ = next(it)
        assert torch.isfinite(images).all()
        n += images.shape[0]
    dt = time.perf_counter() - t0
    del it
    return n / dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1, help="timed model steps per case (default 1)")
    p.add_argument("--items", type=int, default=12, help="loader items per case (default 12)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as set)")
    p.add_argument("--skip-paper-3d", action="store_true", help="skip the slowest case")
    p.add_argument("--only", choices=("model", "loader"), help="run one of the two tables")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs")
    print()
    if args.only != "loader":
        _model_table(args)
    if args.only != "model":
        _loader_table(args)
    return 0


def _model_table(args) -> None:
    print("| case | preset | params | batch | steps/s | samples/s |")
    print("|---|---|---|---|---|---|")
    for dims, batch in ((2, 8), (3, 2)):
        for preset in ("paper", "light"):
            if dims == 3 and preset == "paper" and args.skip_paper_3d:
                continue
            sps, n = _model_steps_per_s(dims, preset, batch, args.steps)
            name = "2D 256x256" if dims == 2 else "3D 80x112x80"
            print(f"| model {name} | {preset} | {n / 1e6:.1f} M | {batch} | {sps:.3f} | "
                  f"{sps * batch:.2f} |", flush=True)
    print()


def _loader_table(args) -> None:
    print("| loader | healthy data | workers | samples/s |")
    print("|---|---|---|---|")
    for dims in (2, 3):
        _, source = _healthy(dims)
        for workers in (0, 1, 2):
            try:
                rate = _loader_samples_per_s(dims, workers, args.items)
                shown = f"{rate:.1f}"
            except Exception as exc:  # e.g. the engine not installed: say so, keep going
                shown = f"failed: {type(exc).__name__}: {exc}"[:120]
            name = "2D 256x256" if dims == 2 else "3D 80x112x80"
            print(f"| {name} | {source} | {workers} | {shown} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
