"""Speed of the five synthetic anomaly tasks, labelled, on one thread (METHOD.md §9).

    python benchmarks/bench_anomalies.py [--calls-2d 200] [--calls-3d 60] [--seed 0]

For each task: a 2D 256x256 and a 3D 80x112x80 float32 phantom with a foreground mask; median and
p90 milliseconds per `synthesize` call (the whole recipe: 1-4 anomalies and the label), next to
the reference implementation's median of METHOD.md §9 and the speed-up (reference / ours); then
the mean over the five tasks; then the Poisson solver side by side (`bench_poisson.poisson_rows`).
"""

from __future__ import annotations

import os

# one thread, set before numpy/scipy load their BLAS and FFT pools
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from napari_mtml.anomalies import TASKS, synthesize  # noqa: E402

#: the reference's median ms per labelled call, one core (METHOD.md §9)
REFERENCE_MS = {
    "intra_blend": (6.2, 39.2),
    "inter_blend": (6.9, 44.7),
    "sink": (5.1, 34.4),
    "source": (5.7, 32.5),
    "smooth_intensity": (4.3, 24.7),
}
SHAPES = {"2D": (256, 256), "3D": (80, 112, 80)}


def phantom(shape, seed: int = 0):
    """A brain-like phantom: smooth texture in an ellipsoid, zero outside; z-score-like units."""
    rng = np.random.default_rng(seed)
    grids = np.indices(shape).astype(np.float32)
    centre = (np.asarray(shape, dtype=np.float32) - 1) / 2
    r2 = sum(((g - c) / (0.42 * s)) ** 2 for g, c, s in zip(grids, centre, shape, strict=True))
    foreground = r2 <= 1.0
    texture = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 2.0) * 4
    image = np.where(foreground, texture + np.cos(3 * r2), 0).astype(np.float32)
    return image, foreground


def time_task(image, foreground, task, calls: int, seed: int):
    rng = np.random.default_rng(seed)
    synthesize(image, foreground, task=task, rng=rng)  # warm caches (FFT plans, imports)
    times, cpu = [], []
    for _ in range(calls):
        start, start_cpu = time.perf_counter(), time.thread_time()
        synthesize(image, foreground, task=task, rng=rng)
        cpu.append((time.thread_time() - start_cpu) * 1e3)
        times.append((time.perf_counter() - start) * 1e3)
    times = np.asarray(times)
    return (float(np.median(times)), float(np.percentile(times, 90)), float(times.mean()),
            float(np.median(cpu)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls-2d", type=int, default=200)
    parser.add_argument("--calls-3d", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    header = (f"{'task':<17} {'dims':<4} {'median ms':>9} {'p90 ms':>8} {'mean ms':>8} "
              f"{'cpu med':>8} {'ref ms':>7} {'speed-up':>8}")
    print("synthesize(...) per labelled call, one thread (wall clock; 'cpu med' = this thread's")
    print("CPU time, the figure to trust on a loaded machine; speed-up = reference / wall median)")
    print(header)
    print("-" * len(header))
    summary = {}
    for dims, shape in SHAPES.items():
        image, foreground = phantom(shape, args.seed)
        calls = args.calls_2d if dims == "2D" else args.calls_3d
        medians, refs, cpus = [], [], []
        for task in TASKS:
            med, p90, mean, cpu = time_task(image, foreground, task, calls, args.seed)
            ref = REFERENCE_MS[task][0 if dims == "2D" else 1]
            medians.append(med)
            cpus.append(cpu)
            refs.append(ref)
            flag = "" if med <= ref else "  SLOWER than reference"
            print(f"{task:<17} {dims:<4} {med:9.2f} {p90:8.2f} {mean:8.2f} {cpu:8.2f} {ref:7.1f} "
                  f"{ref / med:7.1f}x{flag}")
        summary[dims] = (float(np.mean(medians)), float(np.mean(refs)), float(np.mean(cpus)))
    print("-" * len(header))
    for dims, (ours, ref, cpu) in summary.items():
        print(f"mean of the five task medians, {dims}: {ours:.2f} ms vs reference {ref:.2f} ms "
              f"-> {ref / ours:.1f}x (cpu: {cpu:.2f} ms -> {ref / cpu:.1f}x; target >= 3x)")

    print()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from bench_poisson import poisson_rows
    except ImportError as exc:
        print(f"Poisson side-by-side skipped: benchmarks/bench_poisson.py unavailable ({exc})")
        return 0
    rows = list(poisson_rows())
    if rows:
        keys = list(rows[0].keys())
        print("Poisson solve alone (benchmarks/bench_poisson.py)")
        print("  ".join(f"{k:>14}" for k in keys))
        for row in rows:
            print("  ".join(
                f"{row[k]:>14.3f}" if isinstance(row[k], float) else f"{row[k]!s:>14}"
                for k in keys
            ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
