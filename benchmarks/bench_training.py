"""Training throughput on CPU: model steps per second next to the loader's samples per second.

    OMP_NUM_THREADS=1 python benchmarks/bench_training.py            # a few minutes
    python benchmarks/bench_training.py --steps 3 --items 24 --threads 2
    python benchmarks/bench_training.py --variants --threads 1       # CPU step set-ups
    python benchmarks/bench_training.py --contention                 # thread rule vs load

`--variants`: one optimiser step of the demo's small U-Net (widths 8-64, depth 5, no positional
encoding, 2D 128x128, batch 8) and of the 'light' preset (2D 256x256, batch 8) in several
set-ups, interleaved step by step (A B C A B C ...) so that a busy machine slows all alike:
plain float32, channels-last, bf16 autocast, both, and torch.compile (when it works here;
otherwise the reason is printed). Median steps/s over `--steps` steps (default 12) and the ratio
to plain float32, with the lowest and highest ratio of 3 equal thirds of the steps.

`--contention`: the demo model's step rate with torch's threads set by
`napari_mtml.devices.torch_thread_count` (the thread rule), with 1 and with every core, first
alone and then beside a competing process (a second copy of the same training step with torch's
default threads, the situation of two users or two runs on one machine); alternating blocks.

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
    cfg = TrainConfig(preset=preset, recipe="paper").resolve(
        dims, "cxr" if dims == 2 else "mri", frame
    )
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
            col = HealthyCollection.from_paths(
                [path], dims=2, kind="mri", frame=(256, 256), downsample=1
            )
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
    ds = SyntheticDataset(
        samples,
        [0, 1, 2, 3, 4],
        seed=0,
        flip=dims == 3,
        task_params={"max_push": 5.0 if dims == 3 else 10.0},
    )
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
    p.add_argument("--variants", action="store_true", help="CPU step set-ups (see above)")
    p.add_argument("--contention", action="store_true", help="thread rule alone / under load")
    p.add_argument("--cases", default="demo,light", help="--variants: demo and/or light")
    p.add_argument("--no-compile", action="store_true", help="--variants: skip torch.compile")
    p.add_argument(
        "--seconds", type=float, default=20.0, help="--contention: seconds per block (default 20)"
    )
    p.add_argument("--competitor", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    if args.competitor:
        return _compete()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print()
    if args.variants:
        if args.steps == 1:
            args.steps = 12
        _variants_table(args)
        return 0
    if args.contention:
        _contention_table(args)
        return 0
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
            print(
                f"| model {name} | {preset} | {n / 1e6:.1f} M | {batch} | {sps:.3f} | "
                f"{sps * batch:.2f} |",
                flush=True,
            )
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


# ------------------------------------------------------------------------------ --variants

DEMO_KW = {"base_features": 8, "depth": 5, "max_features": 64, "pos_encoding": False}


def _make_case(case: str):
    """(model kwargs, frame, batch) of a --variants case."""
    if case == "demo":
        return {"dims": 2, "frame": (128, 128), **DEMO_KW}, 8
    if case == "light":
        from napari_mtml.config import TrainConfig

        cfg = TrainConfig(preset="light", recipe="paper").resolve(2, "cxr", (256, 256))
        return cfg.model_kwargs(), 8
    raise ValueError(f"unknown case {case!r}: use demo or light")


class _Variant:
    """One training set-up: its own model (same initial weights), optimiser and step."""

    def __init__(self, name, kwargs, batch, channels_last=False, bf16=False, compile=False):
        import torch

        from napari_mtml.devices import prepare_model_for_device
        from napari_mtml.model import UNet

        self.name, self.bf16 = name, bf16
        self.model = UNet(**kwargs, init_seed=0)
        prepare_model_for_device(self.model, "cpu", channels_last=channels_last)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.0)
        gen = torch.Generator().manual_seed(0)
        frame = tuple(kwargs["frame"])
        self.x = torch.randn((batch, 1, *frame), generator=gen)
        self.y = torch.rand((batch, 1, *frame), generator=gen)
        self.forward = self.model
        self.error = None
        if compile:
            from napari_mtml.devices import compile_model

            self.forward, self.error = compile_model(self.model)
            if self.error is None:
                try:  # compiling happens on the first call: pay it here, untimed
                    self.step()
                except Exception as exc:  # a compiler missing or failing: report, skip
                    self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"

    def step(self) -> float:
        import torch

        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            pred = self.forward(self.x)
        loss = torch.nn.functional.mse_loss(pred.float(), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0


def _variants_table(args) -> None:
    import torch

    print("| case | set-up | steps/s (median) | vs float32 (min-max of 3 thirds) |")
    print("|---|---|---|---|")
    for case in args.cases.split(","):
        kwargs, batch = _make_case(case)
        specs = [
            ("float32", {}),
            ("channels-last", {"channels_last": True}),
            ("bf16 autocast", {"bf16": True}),
            ("channels-last + bf16", {"channels_last": True, "bf16": True}),
        ]
        if not args.no_compile:
            specs.append(("torch.compile", {"compile": True}))
        variants = []
        for name, kw in specs:
            v = _Variant(name, kwargs, batch, **kw)
            if v.error:
                print(f"| {case} | {name} | unavailable: {v.error} | |", flush=True)
                continue
            v.step()  # warm-up: allocations, oneDNN primitive caches
            variants.append(v)
        times = {v.name: [] for v in variants}
        for _ in range(args.steps):
            for v in variants:
                times[v.name].append(v.step())
        base = times["float32"]
        third = max(1, args.steps // 3)
        for v in variants:
            t = times[v.name]
            ratios = [
                statistics.median(base[k : k + third]) / statistics.median(t[k : k + third])
                for k in range(0, third * 3, third)
                if t[k : k + third]
            ]
            rate, ratio = 1 / statistics.median(t), statistics.median(base) / statistics.median(t)
            print(
                f"| {case} {'x'.join(map(str, kwargs['frame']))} b{batch} | {v.name} | "
                f"{rate:.2f} | {ratio:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |",
                flush=True,
            )
    print(f"\n{torch.get_num_threads()} torch thread(s), {args.steps} interleaved steps per set-up")


# ---------------------------------------------------------------------------- --contention


def _demo_step_loop(threads: int, seconds: float) -> float:
    """Steps/s of the demo model's optimiser step over `seconds` with `threads` threads."""
    import torch

    from napari_mtml.model import UNet

    torch.set_num_threads(threads)
    net = UNet(2, (128, 128), init_seed=0, **DEMO_KW)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((8, 1, 128, 128), generator=gen)
    y = torch.rand((8, 1, 128, 128), generator=gen)

    def step():
        loss = torch.nn.functional.mse_loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 2:
        step()
        n += 1
    return n / (time.perf_counter() - t0)


def _compete() -> int:
    """The competing process: the same training step, torch's default threads, until killed."""
    import torch

    _demo_step_loop(torch.get_num_threads(), 1e9)
    return 0


def _contention_table(args) -> None:
    import subprocess

    import torch

    from napari_mtml.devices import available_cores, torch_thread_count

    cores = available_cores()
    settings = [("thread rule", None), ("1 thread", 1), (f"{cores} threads (all cores)", cores)]
    rows = {}
    for situation in ("alone", "beside a competing process"):
        competitor = None
        if situation != "alone":
            competitor = subprocess.Popen(
                [sys.executable, __file__, "--competitor"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(3.0)  # let it start stepping
        try:
            for name, threads in settings:
                chosen = torch_thread_count(0) if threads is None else threads
                rate = _demo_step_loop(chosen, args.seconds)
                rows[(situation, name)] = (chosen, rate)
                print(
                    f"  {situation}: {name} -> {chosen} thread(s), {rate:.2f} steps/s",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            if competitor is not None:
                competitor.terminate()
                competitor.wait()
    print(
        f"demo model (widths 8-64, depth 5, 2D 128x128, batch 8), {cores} usable cores, "
        f"{args.seconds:.0f} s per cell"
    )
    print(
        "| threads | alone: threads, steps/s | beside a competitor: threads, steps/s | slow-down |"
    )
    print("|---|---|---|---|")
    for name, _ in settings:
        (na, ra), (nb, rb) = rows[("alone", name)], rows[("beside a competing process", name)]
        print(f"| {name} | {na}, {ra:.2f} | {nb}, {rb:.2f} | {ra / rb:.1f}x |")
    del torch


if __name__ == "__main__":
    sys.exit(main())
