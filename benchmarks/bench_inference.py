"""Seconds per 5-fold ensemble prediction on CPU (randomly initialised weights: timing only).

    python benchmarks/bench_inference.py --threads 2                 # issue 11's table
    python benchmarks/bench_inference.py --threads 2 --repeats 3 --cases 3d-paper

Cases: a 2D X-ray in the 256x256 frame (the built-in chest radiograph) and a 3D brain in the
80x112x80 frame (the built-in MNI152 template), each with the paper's and the light U-Net
preset (`2d-paper`, `2d-light`, `3d-paper`, `3d-light`); and the packaged 2D model
`builtin:brain-t1` (trained weights) on the MNI152 volume (`builtin-mni`, 189 slices) and on the
tumour sample (`builtin-tumour`), where "before" does not apply. For every random-weight case a
run folder with 5 folds is built in a temporary directory, then three
set-ups are timed in turn (A B C A B C ...), loading (`load`) and predicting the scan end to end
(`predict`: preprocessing, 5 forward passes, mapping back):

- before: the models built as before issue 11 (random initialisation, then the weights
  loaded; default memory format), float32;
- float32: `load_ensemble(run)` (no random initialisation, channels-last 3D);
- bfloat16: `load_ensemble(run, precision="bfloat16")`, with the largest difference of its
  ensemble map from the float32 one (`max |diff|`; on random weights, which move more than
  trained ones).

- previous (with `--previous OTHER_CHECKOUT/src`): `load_ensemble(run)` of another checkout
  (e.g. the last release), run in a child process with that `src` first on `PYTHONPATH`, in the
  same rounds as the others, with the largest difference of its map from this float32 one.

`--contralateral off|auto|on` (default `off`): `Ensemble.predict`'s comparison of the two sides
of a brain (`napari_mtml.symmetry`), on by default for 3D MRI in `mtml predict` and the widget. Off
here by default so that the network's path is timed as in earlier releases (which had none);
`auto` adds the mid-sagittal plane fit and the mirror comparison to every 3D MRI prediction (the
2D X-ray cases have none either way). The `--previous` checkout is asked for the same where its
`predict` knows the option.

`--fold-scores`: `predict(..., fold_scores=True)`, the Heatmap widget's call (every fold's map
mapped back, compared across the two sides where the ensemble map is, and scored).

Goals (issue 11, 2 threads): 3D paper <= 6 s, 3D light <= 2.5 s.
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


def _build_run(root: Path, dims: int, kind: str, frame: tuple[int, ...], preset: str) -> Path:
    import torch

    from napari_mtml.config import TrainConfig
    from napari_mtml.model import UNet, count_parameters

    run = root / f"run_{dims}d_{preset}"
    run.mkdir()
    cfg = TrainConfig(
        healthy=("unused",),
        out=str(run),
        dims=dims,
        frame=frame,
        kind=kind,
        preset=preset,
        recipe="paper",
        # the network's time, as the previous release spends it; a run trained with the bias
        # correction ("auto", on skull-stripped scans) adds about 0.2 s per 1 mm head
        bias_correction="none",
    ).resolve(dims, kind, frame)
    cfg.to_json(run / "config.json")
    n_params = 0
    for k in range(5):
        (run / f"fold_{k}").mkdir()
        net = UNet(**cfg.model_kwargs(), init_seed=k)
        n_params = count_parameters(net)
        torch.save(net.state_dict(), run / f"fold_{k}" / "best.pt")
    return run, n_params


def _before(run, device):
    """The ensemble as `load_ensemble` built it before issue 11: random initialisation first,
    default memory format, float32."""
    import torch

    from napari_mtml.inference import Ensemble, _read_settings
    from napari_mtml.model import UNet

    settings, cfg = _read_settings(run)
    models = []
    for k in range(settings.n_folds):
        model = UNet(dims=settings.dims, frame=settings.frame, **settings.model_kwargs)
        model.load_state_dict(torch.load(run / f"fold_{k}" / "best.pt", weights_only=True))
        models.append(model.to(device).eval())
    return Ensemble(
        models,
        dims=settings.dims,
        frame=settings.frame,
        kind=settings.kind,
        downsample=settings.downsample,
        device=device,
        run_dir=run,
        config=cfg,
    )


def _predict_kwargs(ens, contralateral, fold_scores: bool = False) -> dict:
    """`contralateral=` for `ens.predict` where its release knows it (none before it existed);
    `fold_scores=True` (the Heatmap widget's call: every fold's map and score too) when asked."""
    import inspect

    kwargs = {"fold_scores": True} if fold_scores else {}
    if "contralateral" in inspect.signature(ens.predict).parameters:
        kwargs["contralateral"] = contralateral
    return kwargs


_CONTRALATERAL = {"off": False, "auto": "auto", "on": True}


def _child(
    run: str, scan_name: str, out: str, contralateral: str = "off", fold_scores: str = "0"
) -> int:
    """Time one set-up in this process (the `--previous` checkout's package)."""
    import numpy as np

    from napari_mtml.inference import load_ensemble
    from napari_mtml.samples import load_sample

    scan = load_sample(scan_name)
    t = time.perf_counter()
    ens = load_ensemble(run, device="cpu")
    load = time.perf_counter() - t
    kwargs = _predict_kwargs(ens, _CONTRALATERAL[contralateral], fold_scores == "1")
    ens.predict(scan, **kwargs)  # warm-up, as for the others
    t = time.perf_counter()
    pred = ens.predict(scan, **kwargs)
    predict = time.perf_counter() - t
    np.save(out, pred.anomaly)
    print(json.dumps({"load": load, "predict": predict}))
    return 0


def _previous(
    src: str, run, scan_name: str, out: Path, contralateral: str = "off", fold_scores=False
):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
    cmd = [sys.executable, __file__, "--child", str(run), scan_name, str(out), contralateral]
    cmd.append("1" if fold_scores else "0")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"--previous {src}: the child failed:\n{done.stderr[-2000:]}")
    times = json.loads(done.stdout.strip().splitlines()[-1])
    return times["load"], times["predict"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds per case")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: OMP_NUM_THREADS, else the thread rule)",
    )
    parser.add_argument("--cases", default="2d-paper,2d-light,3d-paper,3d-light")
    parser.add_argument("--setups", default="before,float32,bfloat16")
    parser.add_argument(
        "--previous", default=None, help="another checkout's src folder, timed side by side"
    )
    parser.add_argument(
        "--contralateral",
        choices=tuple(_CONTRALATERAL),
        default="off",
        help="compare the two sides of 3D MRI (Ensemble.predict's option; default off: the "
        "network's path, as earlier releases timed it)",
    )
    parser.add_argument(
        "--fold-scores",
        action="store_true",
        help="predict as the Heatmap widget does: every fold's map and sample score too "
        "(each compared across the two sides with --contralateral auto/on)",
    )
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(*args.child)

    import numpy as np
    import torch

    from napari_mtml.inference import load_ensemble
    from napari_mtml.samples import load_sample

    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or None
    if threads:
        os.environ["MTML_THREADS"] = str(threads)  # load_ensemble applies the thread rule
        torch.set_num_threads(threads)
    scan_names = {2: "chest_xray", 3: "mni152_t1"}
    setups = {2: ("cxr", (256, 256)), 3: ("mri", (80, 112, 80))}
    builtin_scans = {"builtin-mni": "mni152_t1", "builtin-tumour": "brain_tumour_image"}
    makers = {
        "before": lambda run: _before(run, "cpu"),
        "float32": lambda run: load_ensemble(run, device="cpu"),
        "bfloat16": lambda run: load_ensemble(run, device="cpu", precision="bfloat16"),
    }
    names = args.setups.split(",")
    if args.previous:
        names = ["previous", *names]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            if case in builtin_scans:
                # the packaged 2D model on a whole volume (trained weights, slice by slice)
                run, scan_name, preset = "builtin:brain-t1", builtin_scans[case], "builtin"
                n_params = sum(p.numel() for p in load_ensemble(run).models[0].parameters())
                label = f"2D builtin on {case.split('-')[1]}"
            else:
                dims, preset = int(case[0]), case.split("-")[1]
                kind, frame = setups[dims]
                run, n_params = _build_run(Path(tmp), dims, kind, frame, preset)
                scan_name = scan_names[dims]
                label = f"{dims}D {'x'.join(map(str, frame))}"
            scan = load_sample(scan_name)
            case_names = [n for n in names if not (n == "before" and preset == "builtin")]
            loads = {k: [] for k in case_names}
            predicts = {k: [] for k in case_names}
            maps = {}
            for _ in range(args.repeats):
                for name in case_names:
                    if name == "previous":
                        out = Path(tmp) / "previous.npy"
                        load_s, predict_s = _previous(
                            args.previous,
                            run,
                            scan_name,
                            out,
                            args.contralateral,
                            args.fold_scores,
                        )
                        loads[name].append(load_s)
                        predicts[name].append(predict_s)
                        maps[name] = np.load(out)
                        continue
                    t = time.perf_counter()
                    ens = makers[name](run)
                    loads[name].append(time.perf_counter() - t)
                    kwargs = _predict_kwargs(
                        ens, _CONTRALATERAL[args.contralateral], args.fold_scores
                    )
                    ens.predict(scan, **kwargs)  # warm-up (allocator, oneDNN kernels)
                    t = time.perf_counter()
                    pred = ens.predict(scan, **kwargs)
                    predicts[name].append(time.perf_counter() - t)
                    maps[name] = pred.anomaly
                    del ens
            for name in case_names:
                diff = ""
                if name in ("bfloat16", "previous") and "float32" in maps:
                    diff = f"{float(np.abs(maps[name] - maps['float32']).max()):.3f}"
                rows.append(
                    (
                        label,
                        preset,
                        n_params / 1e6,
                        name,
                        statistics.median(loads[name]),
                        statistics.median(predicts[name]),
                        min(predicts[name]),
                        max(predicts[name]),
                        diff,
                    )
                )
            print(f"done {case}", file=sys.stderr, flush=True)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU, 5 folds, "
        f"median of {args.repeats} interleaved rounds; contralateral {args.contralateral}"
        f"{', fold maps and scores' if args.fold_scores else ''}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("| frame | preset | M params | set-up | load s | predict s (min-max) | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for frame, preset, mp, name, tl, tp, lo, hi, diff in rows:
        print(
            f"| {frame} | {preset} | {mp:.1f} | {name} | {tl:.2f} | {tp:.2f} ({lo:.2f}-{hi:.2f}) "
            f"| {diff} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
