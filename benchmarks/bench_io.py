"""Read + preprocess time for the MNI152 volume and the chest X-ray, next to bare library reads.

    OMP_NUM_THREADS=1 python benchmarks/bench_io.py [--repeat 5]

Uses the real images of ../shared/data (beside the project root), falling back to the package's
sample files. Prints a table of median / min wall time in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from napari_mtml.io import ImageReadWarning, read_image
from napari_mtml.preprocess import foreground_mask, to_frame
from napari_mtml.samples import sample_data_path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _files() -> tuple[Path, Path]:
    mni = SHARED / "mni152" / "mni152_t1_1mm.nii.gz"
    cxr = SHARED / "chest-xray" / "RG1_UNCR.dcm"
    if not mni.is_file():
        mni = sample_data_path("mni152_t1")
    if not cxr.is_file():
        cxr = sample_data_path("chest_xray")
    return mni, cxr


def _time(fn, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore", ImageReadWarning)
    mni, cxr = _files()
    mni_scan = read_image(mni)
    cxr_scan = read_image(cxr)
    rows = [
        ("MNI152 nibabel.load().get_fdata() (bare)", lambda: nib.load(str(mni)).get_fdata()),
        ("MNI152 read_image", lambda: read_image(mni)),
        ("MNI152 foreground_mask", lambda: foreground_mask(mni_scan)),
        ("MNI152 to_frame (80x112x80)", lambda: to_frame(mni_scan)),
        ("MNI152 read_image + to_frame", lambda: to_frame(read_image(mni))),
        (
            "CR pydicom.dcmread().pixel_array (bare)",
            lambda: np.asarray(pydicom.dcmread(str(cxr)).pixel_array),
        ),
        ("CR read_image", lambda: read_image(cxr)),
        ("CR to_frame (256x256)", lambda: to_frame(cxr_scan)),
        ("CR read_image + to_frame", lambda: to_frame(read_image(cxr))),
    ]
    print(
        f"files: {mni.name} {mni_scan.array.shape}, {cxr.name} {cxr_scan.array.shape}; "
        f"repeat {args.repeat}"
    )
    print(f"{'step':<44} {'median ms':>10} {'min ms':>10}")
    print("-" * 66)
    for name, fn in rows:
        med, best = _time(fn, args.repeat)
        print(f"{name:<44} {med:>10.1f} {best:>10.1f}")


if __name__ == "__main__":
    main()
