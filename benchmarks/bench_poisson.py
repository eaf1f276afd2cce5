"""Benchmark: the Poisson solve alone, ours against pie-torch's ``blend_dst_numpy``.

Run ``python benchmarks/bench_poisson.py``. Prints, per box, the median and 90th percentile
milliseconds of one call on one thread, and the ratio pie-torch / ours (>= 2 is the target of
METHOD.md §9 / issue 2).

Both sides do the same job: blend a box-sized source into a full-size float32 image with mixed
gradients, on the same box, and return a full-size image. Ours is `poisson_blend` (full-size
target, source and mask in; it finds the mask's box itself); pie-torch's is
``blend_dst_numpy(target, source_box, mask_box, corner, mix_gradients=True)``, the reference
implementation's solver (MIT package ``pie-torch`` on PyPI, not a dependency of this project:
``pip install pie-torch``; it is imported lazily and reported as "not installed" if absent).
Calls alternate between the solvers so that a busy machine slows both alike; the "cpu ratio"
uses each call's thread CPU time instead of wall time. "ours" grows the
box to a fast sine-transform length (``fast_box=True``); "minimal-box" is the default
``fast_box=False``, the mask's bounding box + 1 exactly, the same box pie-torch gets.

`poisson_rows()` returns the table rows so that ``benchmarks/bench_anomalies.py`` can print the
same table in its own run. A second table, `label_rows()`, times `flipped_gaussian_label` alone
against the reference's "label alone" figure of METHOD.md §9.
"""

from __future__ import annotations

import os

# One thread, set before numpy/scipy load their thread pools (no effect if already loaded).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import time  # noqa: E402

import numpy as np  # noqa: E402

from napari_mtml.anomalies.labelling import flipped_gaussian_label  # noqa: E402
from napari_mtml.anomalies.poisson import poisson_blend  # noqa: E402

#: (label, image shape, box shape): box sizes typical of the tasks' mask bounding boxes
CASES = (
    ("2D 256x256", (256, 256), (60, 60)),
    ("2D 256x256", (256, 256), (120, 120)),
    ("3D 80x112x80", (80, 112, 80), (20, 30, 20)),
    ("3D 80x112x80", (80, 112, 80), (40, 56, 40)),
)

COLUMNS = (
    "image",
    "box",
    "ours median ms",
    "ours p90 ms",
    "ours minimal-box median ms",
    "pie-torch median ms",
    "pie-torch p90 ms",
    "ratio",
    "cpu ratio",
)


def _load_pietorch():
    try:
        from pietorch import blend_dst_numpy
    except ImportError:
        return None
    return blend_dst_numpy


def _phantom(shape, box, rng):
    """Smooth float32 target and source with texture, an ellipse/ellipsoid mask in the box.

    The mask leaves one voxel of the box free on every side, so the box `poisson_blend` derives
    from the full-size mask is exactly ``box``.
    """
    grids = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
    radius2 = sum(g * g for g in grids)
    target = (np.cos(3 * radius2) + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    source = (np.sin(5 * grids[0]) + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    corner = tuple((n - b) // 3 for n, b in zip(shape, box, strict=True))
    local = np.meshgrid(*(np.arange(b, dtype=np.float64) for b in box), indexing="ij")
    centre = [(b - 1) / 2 for b in box]
    semi = [(b - 2) / 2 for b in box]
    mask_box = sum(((x - c) / r) ** 2 for x, c, r in zip(local, centre, semi, strict=True)) <= 1
    mask = np.zeros(shape, dtype=bool)
    region = tuple(slice(c, c + b) for c, b in zip(corner, box, strict=True))
    mask[region] = mask_box
    return target, source, mask, mask_box, np.asarray(corner), region


def _stats(times_s):
    ms = np.asarray(times_s) * 1e3
    return float(np.median(ms)), float(np.percentile(ms, 90))


def poisson_rows(repeats: int | None = None, seed: int = 0) -> list[dict]:
    """Time both solvers on every case of `CASES`; one dict per case, keys = `COLUMNS`.

    ``repeats`` calls per solver and case (default 60 in 2D, 30 in 3D), after 3 warm-up calls.
    pie-torch's columns and the ratio are None when it is not installed.
    """
    rng = np.random.default_rng(seed)
    pietorch_blend = _load_pietorch()
    rows = []
    for label, shape, box in CASES:
        target, source, mask, mask_box, corner, region = _phantom(shape, box, rng)
        source_box = np.ascontiguousarray(source[region])
        n = repeats or (60 if len(shape) == 2 else 30)
        # pie-torch zeroes its mask's edges in place: give each call a fresh copy, made untimed
        masks = [mask_box.copy() for _ in range(n + 3)]
        calls = ["ours", "minimal"] + (["pie-torch"] if pietorch_blend is not None else [])
        wall = {k: [] for k in calls}
        cpu = {k: [] for k in calls}
        for i in range(n + 3):
            for name in calls:
                start, start_cpu = time.perf_counter(), time.thread_time()
                if name == "ours":
                    poisson_blend(target, source, mask, mix_gradients=True, fast_box=True)
                elif name == "minimal":
                    poisson_blend(target, source, mask, mix_gradients=True, fast_box=False)
                else:
                    pietorch_blend(target, source_box, masks[i], corner, True)
                stop_cpu, stop = time.thread_time(), time.perf_counter()
                if i >= 3:
                    wall[name].append(stop - start)
                    cpu[name].append(stop_cpu - start_cpu)
        ours_med, ours_p90 = _stats(wall["ours"])
        row = {
            "image": label,
            "box": "x".join(map(str, box)),
            "ours median ms": ours_med,
            "ours p90 ms": ours_p90,
            "ours minimal-box median ms": _stats(wall["minimal"])[0],
            "pie-torch median ms": None,
            "pie-torch p90 ms": None,
            "ratio": None,
            "cpu ratio": None,
        }
        if "pie-torch" in wall:
            their_med, their_p90 = _stats(wall["pie-torch"])
            row.update(
                {
                    "pie-torch median ms": their_med,
                    "pie-torch p90 ms": their_p90,
                    "ratio": their_med / ours_med,
                    "cpu ratio": _stats(cpu["pie-torch"])[0] / _stats(cpu["ours"])[0],
                }
            )
        rows.append(row)
    return rows


#: the reference's "label alone" median ms (METHOD.md §9), by image
LABEL_REFERENCE_MS = {"2D 256x256": 7.1, "3D 80x112x80": 17.3}
LABEL_COLUMNS = ("image", "anomaly", "ours median ms", "ours p90 ms", "reference ms", "ratio")


def label_rows(repeats: int | None = None, seed: int = 0) -> list[dict]:
    """Time `flipped_gaussian_label` alone on two anomalies per image size.

    "ring": an ellipse/ellipsoid whose intensity change is 0 at its centre and largest half-way
    out, with 30% multiplicative noise (a deformation-like label with a hole to fill); "dome":
    the same shape with a change largest at the centre (nothing to fill). Sizes are those of a
    typical anomaly (about 0.2-0.4 of the image per axis). Reference = METHOD.md §9's figure.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for label, shape, radius in (
        ("2D 256x256", (256, 256), (25, 30)),
        ("3D 80x112x80", (80, 112, 80), (10, 14, 10)),
    ):
        grids = np.indices(shape, dtype=np.float32)
        centre = [n / 2 for n in shape]
        r = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grids, centre, radius, strict=True)))
        mask = r <= 1
        original = (0.05 * rng.standard_normal(shape)).astype(np.float32)
        noise = 1 + 0.3 * rng.standard_normal(shape)
        profiles = {
            "ring": np.sin(np.pi * np.clip(r, 0, 1)),
            "dome": np.cos(0.5 * np.pi * np.clip(r, 0, 1)),
        }
        n = repeats or (60 if len(shape) == 2 else 30)
        for name, profile in profiles.items():
            augmented = (original + 0.5 * profile * noise * mask).astype(np.float32)
            times = []
            for i in range(n + 3):
                start = time.perf_counter()
                flipped_gaussian_label(augmented, original, mask)
                if i >= 3:
                    times.append(time.perf_counter() - start)
            med, p90 = _stats(times)
            ref = LABEL_REFERENCE_MS[label]
            rows.append(
                {
                    "image": label,
                    "anomaly": name,
                    "ours median ms": med,
                    "ours p90 ms": p90,
                    "reference ms": ref,
                    "ratio": ref / med,
                }
            )
    return rows


def format_table(rows: list[dict], columns=COLUMNS) -> str:
    """Rows (of `poisson_rows` or, with ``columns=LABEL_COLUMNS``, `label_rows`) as text."""

    def cell(value):
        if value is None:
            return "not installed"
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    table = [list(columns)] + [[cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    print("Poisson solve alone, one thread: ours (poisson_blend) vs pie-torch blend_dst_numpy")
    if _load_pietorch() is None:
        print("pie-torch: not installed (pip install pie-torch to compare)")
    print(format_table(poisson_rows()))
    print("ratio = pie-torch median / ours median, wall clock (target >= 2); cpu ratio = the same")
    print("with each call's own thread CPU time, less sensitive to a busy machine")
    print()
    print("Flipped-Gaussian label alone, one thread, vs the reference's figure (METHOD.md §9)")
    print(format_table(label_rows(), LABEL_COLUMNS))


if __name__ == "__main__":
    main()
