"""The paper's recipes on one CUDA GPU: step rate, loader rate, GPU busy share, memory, MFU.

    python benchmarks/bench_gpu.py                      # on a CUDA machine, ~5-10 min
    python benchmarks/bench_gpu.py --device cpu         # dry run of every code path, tiny sizes

For the paper's 2D recipe (29.1 M U-Net, 256x256, batch 50) and 3D recipe (13.9 M U-Net,
80x112x80, batch 8), with bf16 autocast as the trainer uses on CUDA, it prints one table:

- optimiser steps/s of the model alone (forward, MSE, backward, AdamW on a fixed batch);
- samples/s the data loader delivers (`SyntheticDataset`: a random task per item, anomalies
  synthesised on the fly) with 1, 2, 4, 8 and 16 worker processes (those the machine's cores
  allow), on the built-in MNI152 brain (2D slices / the volume);
- the GPU busy fraction of a real training loop fed by that loader (the most workers tried):
  GPU time of the steps (CUDA events) / wall time; below 1 the GPU waits on the CPU;
- peak GPU memory of a training step;
- MFU: the step's FLOPs (counted by torch's FlopCounterMode: forward + backward) x steps/s
  over the GPU's peak dense bf16 FLOP/s (a table of common GPUs, or --peak-tflops);
- the 5-fold ensemble prediction time of one scan (`load_ensemble(run).predict`).

Without CUDA it refuses (exit 2) unless `--device cpu` is given: then it runs the same code
paths with a tiny U-Net, tiny frames and a few steps, to check that the script works (the
figures mean nothing); `tests/test_bench_gpu.py` runs that dry run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

#: peak dense bf16 tensor FLOP/s (TFLOP/s) by a substring of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
}

RECIPES = {
    # name: dims, kind, frame, batch, model kwargs (None = the paper's preset)
    "2D": (2, "cxr", (256, 256), 50, None),
    "3D": (3, "mri", (80, 112, 80), 8, None),
}
DRY = {
    "2D": (2, "cxr", (32, 32), 2, {"base_features": 4, "depth": 3, "max_features": 8}),
    "3D": (3, "mri", (16, 16, 16), 2, {"base_features": 4, "depth": 3, "max_features": 8}),
}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(dims, frame, kwargs, device, initialise=True):
    from napari_mtml.devices import prepare_model_for_device
    from napari_mtml.model import UNet

    if kwargs is None:
        net = UNet.paper(dims, frame, init_seed=0, initialise=initialise)
    else:
        net = UNet(dims, frame, init_seed=0, initialise=initialise, **kwargs)
    return prepare_model_for_device(net, device)


def _train_step(net, opt, x, y, device):
    import torch

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        pred = net(x)
    loss = torch.nn.functional.mse_loss(pred.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def step_rate(dims, frame, batch, kwargs, device, steps):
    """(steps/s, peak memory bytes or None, FLOPs per step, parameters)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from napari_mtml.model import count_parameters

    net = _model(dims, frame, kwargs, device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 1, *frame), generator=gen).to(device)
    y = torch.rand((batch, 1, *frame), generator=gen).to(device)
    counter = FlopCounterMode(display=False)
    with counter:  # also the warm-up step (allocations, cuDNN autotuning)
        _train_step(net, opt, x, y, device)
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        _train_step(net, opt, x, y, device)
    _sync(device)
    rate = steps / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return rate, peak, flops, count_parameters(net)


def _healthy(dims, frame):
    """Healthy (image, foreground) samples in `frame`: MNI152 slices (2D) or the volume (3D)."""
    import numpy as np

    from napari_mtml.data import HealthyCollection
    from napari_mtml.preprocess import to_frame
    from napari_mtml.samples import load_sample

    if tuple(frame) not in ((256, 256), (80, 112, 80)):  # the dry run's tiny frames
        grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in frame], indexing="ij")
        fg = sum(g * g for g in grid) <= 0.8
        arr = (fg * np.cos(4 * grid[0])).astype(np.float32)
        return HealthyCollection.from_arrays([arr] * 5, [fg] * 5).samples
    scan = load_sample("mni152_t1")
    if dims == 2:  # 1 mm axial slices with at least 5% brain
        stack, fg, _ = to_frame(scan, kind="mri", dims=2, frame=frame, downsample=1)
        keep = np.flatnonzero(fg.reshape(len(fg), -1).mean(axis=1) >= 0.05)
        return HealthyCollection.from_arrays(stack[keep], fg[keep]).samples
    arr, fg, _ = to_frame(scan, kind="mri")  # one volume: five copies make a collection
    return HealthyCollection.from_arrays([arr] * 5, [fg] * 5).samples


def loader_rate(samples, dims, workers, items, batch):
    """Samples/s the training loader delivers with `workers` processes."""
    from napari_mtml.data import SyntheticDataset, make_loader

    ds = SyntheticDataset(
        samples,
        [0, 1, 2, 3, 4],
        seed=0,
        flip=dims == 3,
        task_params={"max_push": 5.0 if dims == 3 else 10.0},
    )
    it = iter(make_loader(ds, batch_size=batch, workers=workers))
    next(it)  # worker start-up, paid once per run
    n, t0 = 0, time.perf_counter()
    while n < items:
        images, _, _ = next(it)
        n += images.shape[0]
    rate = n / (time.perf_counter() - t0)
    del it
    return rate


def busy_fraction(samples, dims, frame, batch, kwargs, device, workers, steps):
    """GPU time of the steps / wall time, training from the real loader."""
    import torch

    from napari_mtml.data import SyntheticDataset, make_loader

    net = _model(dims, frame, kwargs, device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.0)
    ds = SyntheticDataset(
        samples,
        [0, 1, 2, 3, 4],
        seed=0,
        flip=dims == 3,
        task_params={"max_push": 5.0 if dims == 3 else 10.0},
    )
    it = iter(make_loader(ds, batch_size=batch, workers=workers, pin_memory=device.type == "cuda"))
    images, labels, _ = next(it)
    _train_step(net, opt, images.to(device), labels.to(device), device)  # warm-up
    _sync(device)
    events, cpu_busy = [], 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        images, labels, _ = next(it)
        x = images.to(device, non_blocking=True)
        y = labels.to(device, non_blocking=True)
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _train_step(net, opt, x, y, device)
            stop.record()
            events.append((start, stop))
        else:  # the dry run: the step's own wall time stands in for the GPU's
            s = time.perf_counter()
            _train_step(net, opt, x, y, device)
            cpu_busy += time.perf_counter() - s
    _sync(device)
    wall = time.perf_counter() - t0
    del it
    busy = sum(a.elapsed_time(b) for a, b in events) / 1e3 if events else cpu_busy
    return busy / wall


def ensemble_time(dims, kind, frame, kwargs, device, repeats):
    """Median seconds of `load_ensemble(run).predict(scan)` for a 5-fold run (random weights)."""
    import numpy as np
    import torch

    from napari_mtml.config import TrainConfig
    from napari_mtml.inference import load_ensemble
    from napari_mtml.io import Scan
    from napari_mtml.samples import load_sample

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        extra = {} if kwargs is None else dict(kwargs)
        cfg = TrainConfig(
            healthy=("unused",),
            out=str(run),
            dims=dims,
            frame=frame,
            kind=kind,
            recipe="paper",
            preset="paper",
            **extra,
        ).resolve(dims, kind, frame)
        cfg.to_json(run / "config.json")
        for k in range(5):
            (run / f"fold_{k}").mkdir()
            net = _model(dims, frame, kwargs, torch.device("cpu"))
            torch.save(net.state_dict(), run / f"fold_{k}" / "best.pt")
        if kwargs is None:
            scan = load_sample("chest_xray" if dims == 2 else "mni152_t1")
        else:  # the dry run: an image that fits the tiny frame
            rng = np.random.default_rng(0)
            arr = rng.normal(size=tuple(2 * f for f in frame)).astype(np.float32)
            scan = Scan(
                array=arr,
                spacing=(1.0,) * dims,
                affine=np.eye(4),
                metadata={"path": None, "warnings": [], "modality": "MR"},
            )
        ens = load_ensemble(run, device=device)
        ens.predict(scan)  # warm-up
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            ens.predict(scan)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_tflops(device, given):
    import torch

    if given:
        return float(given), "given"
    if device.type != "cuda":
        return None, "n/a on CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, name
    return None, f"{name}: unknown peak, pass --peak-tflops"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device",
        default="cuda",
        help="cuda (default), cuda:N, or cpu for a dry run with tiny sizes",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20)")
    parser.add_argument(
        "--items",
        type=int,
        default=None,
        help="loader items per worker count (default 64 in 2D, 24 in 3D)",
    )
    parser.add_argument("--workers", default="1,2,4,8,16")
    parser.add_argument("--recipes", default="2D,3D")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the GPU's peak dense bf16 TFLOP/s, if not in the table",
    )
    args = parser.parse_args(argv)

    import torch

    from napari_mtml.devices import available_cores

    dry = args.device == "cpu"
    if not dry:
        if not torch.cuda.is_available():
            print(
                "bench_gpu.py: no CUDA device is available to torch here (torch "
                f"{torch.__version__}); this benchmark measures a GPU. Run it on a CUDA "
                "machine, or pass --device cpu for a dry run of its code paths.",
                file=sys.stderr,
            )
            return 2
        if not args.device.startswith("cuda"):
            print(
                f"bench_gpu.py: --device {args.device!r}: use cuda, cuda:N or cpu", file=sys.stderr
            )
            return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    steps = args.steps or (2 if dry else 20)
    cores = available_cores()
    worker_counts = [int(w) for w in args.workers.split(",") if int(w) <= max(cores, 1)]
    if dry:
        worker_counts = worker_counts[:2]
    peak, peak_src = peak_tflops(device, args.peak_tflops)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(
        f"bench_gpu: {where}; torch {torch.__version__}; {cores} CPU cores; "
        f"{torch.get_num_threads()} torch threads; bf16 autocast "
        f"{'on' if device.type == 'cuda' else 'off'}; peak {peak or 'n/a'} TFLOP/s "
        f"({peak_src})"
    )
    print(
        "| recipe | params | batch | steps/s | samples/s | peak memory | GFLOP/step | MFU | "
        "5-fold predict s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    loader_rows, busy_rows, need = [], [], {}
    for name in args.recipes.split(","):
        dims, kind, frame, batch, kwargs = (DRY if dry else RECIPES)[name]
        rate, mem, flops, n_params = step_rate(dims, frame, batch, kwargs, device, steps)
        mfu = f"{100 * flops * rate / (peak * 1e12):.1f} %" if peak else "n/a"
        mem_s = f"{mem / 2**30:.2f} GiB" if mem is not None else "n/a"
        need[name] = rate * batch
        predict = ensemble_time(dims, kind, frame, kwargs, device, 1 if dry else 3)
        print(
            f"| {name} {'x'.join(map(str, frame))} | {n_params / 1e6:.2f} M | {batch} | "
            f"{rate:.2f} | {rate * batch:.1f} | {mem_s} | {flops / 1e9:.3g} | {mfu} | "
            f"{predict:.3g} |",
            flush=True,
        )
        samples = _healthy(dims, frame)
        items = args.items or (4 if dry else (64 if dims == 2 else 24))
        for w in worker_counts:
            loader_rows.append((name, w, loader_rate(samples, dims, w, items, min(batch, 8))))
        busy_workers = max(worker_counts) if worker_counts else 0
        busy_rows.append(
            (
                name,
                busy_workers,
                busy_fraction(
                    samples, dims, frame, batch, kwargs, device, busy_workers, max(2, steps // 2)
                ),
            )
        )
    print()
    print("| recipe | loader workers | samples/s | share of what the model consumes |")
    print("|---|---|---|---|")
    for name, w, r in loader_rows:
        print(f"| {name} | {w} | {r:.1f} | {r / need[name]:.2f} |")
    print()
    print("| recipe | loader workers | GPU busy fraction (training from the loader) |")
    print("|---|---|---|")
    for name, w, frac in busy_rows:
        print(f"| {name} | {w} | {frac:.2f} |")
    if dry:
        print("\ndry run on the CPU: the code paths work; the figures are not GPU figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
