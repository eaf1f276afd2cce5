"""Milliseconds per anomaly-preview update, 2D 256x256 and 3D 80x112x80 (targets 100 / 300 ms).

    OMP_NUM_THREADS=1 python benchmarks/bench_preview.py            # the worker's compute path
    OMP_NUM_THREADS=1 xvfb-run -a python benchmarks/bench_preview.py --widget   # + napari layers

The compute path (`napari_mtml.preview`) is exactly what the preview widget's worker runs per
slider change (`compute_preview` on the cached `PreviewInput`: one `synthesize` call, its label,
and the conversion back to the layer's units); it runs without napari or Qt (checked after the
table). `--widget` also times the whole round trip through a docked `AnomalyPreviewWidget` in a
(hidden) napari viewer: `update_now()` -> worker -> both preview layers updated in place.
Images: the real MNI152 brain and chest X-ray of ../shared/data brought into the model frames by
`napari_mtml.preprocess.to_frame` when present, else synthetic discs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from napari_mtml.anomalies import TASKS
from napari_mtml.preview import compute_preview, default_max_push, prepare_input

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _images() -> dict[str, tuple[np.ndarray, np.ndarray | None, str]]:
    """name -> (image, foreground or None, where it came from)."""
    out = {}
    try:
        from napari_mtml.io import read_image
        from napari_mtml.preprocess import to_frame

        brain, fg, _ = to_frame(read_image(DATA / "mni152" / "mni152_t1_1mm.nii.gz"), kind="mri")
        out["3D 80x112x80"] = (np.asarray(brain), np.asarray(fg, bool), "MNI152, to_frame")
        cxr, _, _ = to_frame(read_image(DATA / "chest-xray" / "RG1_UNCR.dcm"), kind="cxr")
        out["2D 256x256"] = (np.asarray(cxr), None, "chest X-ray, to_frame")
    except Exception as exc:  # any failure: fall back to synthetic data, and say so
        print(f"(real images unavailable: {exc}; using synthetic discs)")
    rng = np.random.default_rng(0)
    for name, shape in (("2D 256x256", (256, 256)), ("3D 80x112x80", (80, 112, 80))):
        if name not in out:
            grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
            fg = sum(g**2 for g in grids) < 0.8
            img = (rng.standard_normal(shape) * fg).astype(np.float32)
            out[name] = (img, fg if len(shape) == 3 else None, "synthetic")
    return dict(sorted(out.items()))


def bench_compute(repeats: int) -> None:
    threads = os.environ.get("OMP_NUM_THREADS", "unset (numpy/scipy defaults)")
    print(f"compute path only (napari_mtml.preview), OMP_NUM_THREADS={threads}")
    print(f"{'image':<14}{'task':<18}{'median ms':>10}{'p90 ms':>9}{'mean ms':>9}  source")
    for name, (image, fg, where) in _images().items():
        inp = prepare_input(image, fg)
        max_push = default_max_push(image.ndim)
        for task in [*TASKS, None]:
            times = []
            for seed in range(repeats):
                t0 = time.perf_counter()
                compute_preview(inp, task, seed, {"max_push": max_push})
                times.append(1000 * (time.perf_counter() - t0))
            times.sort()
            p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
            print(
                f"{name:<14}{task or 'random task':<18}{statistics.median(times):>10.1f}"
                f"{p90:>9.1f}{statistics.fmean(times):>9.1f}  {where}"
            )
    gui = sorted(m for m in sys.modules if m.split(".")[0] in ("napari", "qtpy", "PyQt6", "PyQt5"))
    print(f"GUI modules loaded by the compute path: {gui or 'none'}")


def bench_widget(repeats: int) -> None:
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=False)
    _, widget = viewer.window.add_plugin_dock_widget("napari-mtml", "Anomaly preview")
    print(f"\n{'image':<14}{'round trip':<18}{'median ms':>10}{'p90 ms':>9}")
    for name, (image, _fg, _where) in _images().items():
        layer = viewer.add_image(image, name=name)
        widget.image_combo.set_layer(layer)
        widget.task_combo.setCurrentIndex(0)
        widget.stop()
        times = []
        for seed in range(repeats):
            count = widget.n_updates
            widget.seed_spin.blockSignals(True)
            widget.seed_spin.setValue(seed)
            widget.seed_spin.blockSignals(False)
            t0 = time.perf_counter()
            widget.update_now()
            while widget.n_updates == count or widget.busy:
                QApplication.processEvents()
                time.sleep(0.0005)
            times.append(1000 * (time.perf_counter() - t0))
        times = sorted(times[1:])  # the first one builds the cached PreviewInput
        p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
        print(f"{name:<14}{'random task':<18}{statistics.median(times):>10.1f}{p90:>9.1f}")
        viewer.layers.clear()
    viewer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--widget",
        action="store_true",
        help="also time the round trip through the docked widget (needs X/Xvfb)",
    )
    args = parser.parse_args()
    bench_compute(args.repeats)
    if args.widget:
        bench_widget(args.repeats)


if __name__ == "__main__":
    main()
