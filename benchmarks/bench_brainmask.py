"""Automatic brain extraction (napari_mtml.brainmask, the `brain` extra): time and quality.

    python benchmarks/bench_brainmask.py [--repeat 3] [--threads N]

Needs `pip install "napari-mtml[brain]"`. Uses the package's sample images: the MNI152 T1
template (1 mm, skull-stripped, with its brain mask) and the clinical tumour T1 (skull on,
0.78 x 0.78 x 6.5 mm, 25 slices, with its tumour mask). Prints three tables:

1. wall time per volume on the CPU (loading the networks once; the first call, which includes
   TorchScript's warm-up; the median of the following calls);
2. the tumour sample at dilations 0/1/3/5 mm: the share of the tumour's voxels inside the mask,
   the mask's volume, the share of the head (Otsu head mask of `preprocess.foreground_mask`)
   and of the scalp (the head's outer 5 mm in each axial slice) left outside the mask;
3. Dice against the template's own brain mask at the same dilations, and on thick-slice cuts
   of the template (every 3rd / 6th axial slice) given on their own grid or through 1 mm.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from importlib import metadata

import numpy as np
import torch
from scipy import ndimage as ndi

from napari_mtml import brainmask as bm
from napari_mtml.io import ImageReadWarning, Scan
from napari_mtml.preprocess import foreground_mask
from napari_mtml.samples import load_sample

DILATIONS = (0.0, 1.0, 3.0, 5.0)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _timed(fn, repeat: int):
    """(first call s, median wall s and median process CPU s of the next `repeat` calls,
    last result). CPU seconds are all threads together: on a busy shared machine they say
    what a call costs when wall time does not."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return first, statistics.median(wall), statistics.median(cpu), out


def _table(title: str, header: tuple[str, ...], rows: list[tuple]) -> None:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, r in enumerate(cells):
        print(
            "  "
            + "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeat", type=int, default=3, help="timed calls after the first one (default 3)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not bm.available():
        raise SystemExit(f"the brain extra is not installed: {bm.INSTALL_HINT}")
    warnings.simplefilter("ignore", ImageReadWarning)
    print(
        f"deepbet {metadata.version('deepbet')}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s), CPU; load average before: "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )

    mni = load_sample("mni152_t1")
    mni_ref = load_sample("mni152_brain_mask").array > 0
    tumour = load_sample("brain_tumour_image")
    label = load_sample("brain_tumour_label").array > 0

    t0 = time.perf_counter()
    bm._extractor("cpu")
    load_s = time.perf_counter() - t0

    def mask_of(scan, **kw):
        return lambda: bm.brain_mask(scan, dilate_mm=0.0, **kw)

    repeat = max(1, args.repeat)
    rows = [("load both networks (once per process)", "", f"{load_s:.2f}", "", "")]
    for label_, scan, kw in (
        ("MNI152 T1 1 mm 189x233x197", mni, {}),
        ("tumour T1 0.78x0.78x6.5 mm 25x256x256", tumour, {}),
        ("tumour T1 through a 1 mm grid (spacing_mm=1)", tumour, {"spacing_mm": 1.0}),
    ):
        first, wall, cpu, out = _timed(mask_of(scan, **kw), repeat)
        rows.append((label_, f"{first:.2f}", f"{wall:.2f}", f"{cpu:.2f}", f"{repeat}"))
        if scan is mni:
            mni_mask = out
        elif not kw:
            tum_mask = out
    _table(
        "1. brain_mask time per volume (s; the first call includes TorchScript's warm-up; "
        "median wall and CPU s of the next n)",
        ("input", "first", "wall", "CPU", "n"),
        rows,
    )

    head = foreground_mask(tumour, method="head")
    depth = np.stack([ndi.distance_transform_edt(h, sampling=tumour.spacing[1:]) for h in head])
    scalp = head & (depth <= 5.0)
    voxel_ml = float(np.prod(tumour.spacing)) / 1000.0
    rows = []
    for mm in DILATIONS:
        m = bm.dilate_mask(tum_mask, tumour.spacing, mm)
        rows.append(
            (
                f"{mm:g}",
                f"{100 * np.count_nonzero(m & label) / np.count_nonzero(label):.1f}",
                f"{np.count_nonzero(m) * voxel_ml:.0f}",
                f"{100 * np.count_nonzero(head & ~m) / np.count_nonzero(head):.1f}",
                f"{100 * np.count_nonzero(scalp & ~m) / np.count_nonzero(scalp):.1f}",
            )
        )
    _table(
        f"2. tumour sample (skull on; tumour {np.count_nonzero(label)} voxels, head "
        f"{np.count_nonzero(head) * voxel_ml:.0f} ml)",
        ("dilate mm", "tumour kept %", "mask ml", "head removed %", "scalp removed %"),
        rows,
    )

    rows = [
        (
            f"MNI152 1 mm, dilate {mm:g} mm",
            f"{_dice(bm.dilate_mask(mni_mask, mni.spacing, mm), mni_ref):.4f}",
        )
        for mm in DILATIONS
    ]
    for k in (3, 6):
        thick = Scan(array=mni.array[::k], spacing=(float(k), 1.0, 1.0))
        for spacing_mm, how in ((None, "own grid"), (1.0, "through 1 mm")):
            m = bm.brain_mask(thick, dilate_mm=0.0, spacing_mm=spacing_mm)
            rows.append(
                (f"MNI152 every {k}th slice ({k} mm), {how}", f"{_dice(m, mni_ref[::k]):.4f}")
            )
    _table("3. Dice against the template's brain mask", ("input", "Dice"), rows)


if __name__ == "__main__":
    main()
