"""The `mtml` command: preview | train | predict | evaluate | demo.

Every subcommand is a thin layer over the plain Python API; heavy imports (torch) happen inside the
handlers so that `mtml --help` and `mtml preview` stay quick. Errors a user can fix (bad files, bad
flags) are `ValueError`s in the core, and operating-system errors (`OSError`: a file where a
folder is needed, permissions, a full disk) name their path; both are printed as one line and exit
with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _cmd_preview(args: argparse.Namespace) -> int:
    """Write a gallery of every synthetic anomaly task on an image."""
    from napari_mtml.gallery import write_gallery

    out = write_gallery(args.image, out=args.out, task=args.task, seed=args.seed)
    print(f"wrote {out}")
    return 0


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise); only rank 0 prints progress."""
    import os

    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _argument(parse, flag: str):
    """An argparse `type` from a core parser: its `ValueError` becomes argparse's one line."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{flag}: {exc}") from None

    return convert


def _parse_duration(text: str) -> float:
    from napari_mtml.config import parse_duration

    return _argument(parse_duration, "--time")(text)


def _render_training(gen, *, show: bool):
    """Drive a `train(config)` generator (`napari_mtml.generators.drive`): one tqdm bar per
    fold, a line per validation.

    Returns the generator's result (its `return` value). Ctrl-C closes the generator (training
    keeps its last good checkpoint) and propagates.
    """
    from napari_mtml.generators import drive

    progress = _TrainingProgress()
    try:
        return drive(gen, progress.show if show else None)
    finally:
        progress.close()


class _TrainingProgress:
    """The training events as the terminal shows them: a tqdm bar per fold and a line for each
    validation, finished fold, notice and the finished run."""

    def __init__(self):
        self.bar = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def write(self, text: str) -> None:
        (self.bar.write if self.bar is not None else print)(text)

    def show(self, event) -> None:
        from tqdm import tqdm

        from napari_mtml.training import events

        if isinstance(event, events.FoldStarted):
            self.close()
            self.bar = tqdm(
                total=event.max_steps,
                desc=f"fold {event.fold + 1}/{event.n_folds} "
                f"train {list(event.train_tasks)} val {list(event.val_tasks)}",
                unit="step",
                dynamic_ncols=True,
                # a log file (no terminal) gets a progress line every 30 s, not every step
                mininterval=0.5 if sys.stderr.isatty() else 30.0,
            )
        elif isinstance(event, events.StepEvent):
            if self.bar is not None:
                self.bar.update(max(0, event.step - self.bar.n))
                self.bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", refresh=False)
        elif isinstance(event, events.ValidationEvent):
            aps = " ".join(f"{k}={v:.3f}" for k, v in event.ap.items())
            mark = " *best*" if event.best else ""
            self.write(
                f"fold {event.fold} step {event.step}: val loss {event.val_loss:.5f} AP {aps}{mark}"
            )
        elif isinstance(event, events.FoldFinished):
            self.close()
            print(
                f"fold {event.fold} done: best step {event.best_step}, val loss "
                f"{event.best_val_loss:.5f} -> {event.checkpoint}"
            )
        elif isinstance(event, events.Notice):
            self.write(f"note: {event.text}")
        elif isinstance(event, events.RunFinished):
            print(f"run finished: {event.run_dir} ({len(event.folds)} fold(s))")


def _cmd_train(args: argparse.Namespace) -> int:
    """Train the task cross-validation ensemble on healthy scans.

    Train the T/(5-T) cross-validation over the five synthetic tasks on healthy scans. Flags
    left out keep the values of --config (a TOML file of TrainConfig fields), else the defaults;
    with --resume, those of the run's own config.json (`mtml train --out RUN --resume` alone
    continues a stopped run).
    """
    from napari_mtml.config import TrainConfig
    from napari_mtml.files import check_output_folder
    from napari_mtml.training import train

    # argparse defaults are None, so a flag left out keeps the --config TOML value or the default.
    if not args.healthy:  # argparse gives [] for no HEALTHY; let a --config value stand
        args.healthy = None
    base = None
    saved = Path(args.out) / "config.json" if args.out else None
    if args.resume and not args.config and saved is not None and saved.is_file():
        # `mtml train --out RUN --resume` alone continues the run with its saved settings
        # (data included); flags given still override them
        base = TrainConfig.from_json(saved).replace(resume=True)
    config = TrainConfig.from_args(args, base=base)
    if not config.healthy:
        raise ValueError(
            "no healthy scans given: pass files or folders (HEALTHY...) or set "
            "`healthy` in --config"
        )
    check_output_folder(config.out, "run (--out)")
    show = _rank() == 0
    if show:
        from napari_mtml.devices import with_device_recipe

        planned = with_device_recipe(config)  # the recipe, hence the split, follows the device
        print(
            f"training {planned.n_folds if config.fold == 'all' else 1} model(s) of the "
            f"{planned.split_label} split on {len(config.healthy)} input(s) -> {config.out}"
        )
    _render_training(train(config), show=show)
    return 0


def _mask_for(args: argparse.Namespace):
    """The `mask_for(path, scan)` of --mask-dir / --brain-mask auto (None: the foreground)."""
    from napari_mtml.batch import auto_brain_mask, mask_dir_lookup

    if args.mask_dir and args.brain_mask:
        raise ValueError("give either --mask-dir or --brain-mask, not both")
    if args.mask_dir:
        return mask_dir_lookup(args.mask_dir)
    if args.brain_mask == "auto":
        from napari_mtml.brainmask import INSTALL_HINT, available

        if not available():
            raise ValueError(f"--brain-mask auto needs the brain extra: {INSTALL_HINT}")
        return auto_brain_mask
    return None


def _cmd_predict(args: argparse.Namespace) -> int:
    """Ensemble anomaly heatmaps for images.

    Per input: NAME_anomaly.nii.gz (ensemble mean) and NAME_disagreement.nii.gz (std over folds)
    on the input's own grid and geometry, NAME_overlay.png, and scores.csv with the sample-level
    scores.
    """
    from tqdm import tqdm

    from napari_mtml.batch import expand_images, predict_batch
    from napari_mtml.generators import drive
    from napari_mtml.inference import load_ensemble

    paths = expand_images(args.images)
    mask_for = _mask_for(args)
    if args.threshold is not None and not args.regions:
        raise ValueError("--threshold sets the threshold of the region tables: add --regions")
    ensemble = load_ensemble(args.run, device=args.device, batch_size=args.batch_size)
    predict_kwargs = {
        "keep_background": args.keep_background,
        "score": args.score,
        "tta": args.tta,
        "contralateral": {"auto": "auto", "on": True, "off": False}[args.contralateral],
    }
    regions_at = None
    if args.regions:
        from napari_mtml.calibration import calibration_threshold

        regions_at = args.threshold
        if regions_at is None:  # the run's healthy 99th percentile, else 0.5
            healthy = calibration_threshold(args.run, contralateral=predict_kwargs["contralateral"])
            regions_at = 0.5 if healthy is None else healthy
    gen = predict_batch(
        ensemble,
        paths,
        args.out,
        png=not args.no_png,
        predict_kwargs=predict_kwargs,
        mask_for=mask_for,
        regions_at=regions_at,
    )
    print(f"{ensemble}")
    # One bar over the images on a terminal; none in a log file or a pipe (disable=None).
    bar = tqdm(total=len(paths), desc="predict", unit="image", disable=None, dynamic_ncols=True)

    def show(item) -> None:
        bar.update(1)
        where = f"[{item.index + 1}/{item.total}]"
        if item.error is None:
            bar.write(f"{where} {item.name}: score {item.score:.4f} -> {item.anomaly_path}")
        else:
            bar.write(f"{where} {item.name}: failed (see below)")

    try:
        result = drive(gen, show)  # Ctrl-C closes it: scores.csv for what succeeded
    finally:
        bar.close()
    failures = result.failures
    done = len(result.items) - len(failures)
    print(f"wrote {result.scores_csv} ({done} of {len(result.items)} input(s))")
    for item in failures:
        print(f"mtml predict: error: {item.error}", file=sys.stderr)
    return 2 if failures else 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    """Record how high a run's map goes on healthy scans.

    Predicts the healthy scans with the run's ensemble and writes RUN/calibration.json: the
    95th, 99th and 99.9th percentiles of the map inside their foreground (or --mask-dir /
    --brain-mask auto). The Heatmap widget then starts its region threshold at the 99th, and
    `mtml predict --regions` uses it when --threshold is left out.
    """
    from napari_mtml.batch import expand_images
    from napari_mtml.builtin import is_builtin
    from napari_mtml.calibration import calibrate
    from napari_mtml.io import read_image

    if is_builtin(args.run):
        raise ValueError(f"{args.run}: a built-in model ships its own calibration")
    mask_for = _mask_for(args)
    paths = expand_images(args.healthy)
    scans, masks = [], []
    for path in paths:
        scan = read_image(path)
        scans.append(scan)
        masks.append(mask_for(path, scan) if mask_for is not None else None)

    def show(i: int, n: int) -> None:
        print(f"[{i}/{n}] {paths[i - 1].name}")

    cal = calibrate(args.run, scans, masks, device=args.device, progress=show)
    levels = ", ".join(f"{k}th {v:.4f}" for k, v in cal["thresholds"].items())
    print(f"healthy percentiles over {cal['voxels']} voxels of {cal['images']} image(s): {levels}")
    if "thresholds_uncompared" in cal:
        raw = ", ".join(f"{k}th {v:.4f}" for k, v in cal["thresholds_uncompared"].items())
        print(f"  the same without the two sides compared (--contralateral off): {raw}")
    print(f"wrote {Path(args.run) / 'calibration.json'}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """AP / AUROC of predictions against label masks.

    Pairs PRED_DIR/NAME_anomaly.nii.gz with the label of the same NAME in LABEL_DIR; pixel
    (pooled), per-image, slice and sample-level AP and AUROC.
    """
    from napari_mtml.evaluation import evaluate_folder

    out = args.out
    metrics = evaluate_folder(
        args.pred_dir, args.label_dir, foreground_dir=args.foreground_dir, out=out
    )
    shown = dict(metrics)
    if len(shown.get("per_image") or {}) > 10:  # the JSON file has them all
        shown["per_image"] = f"{len(shown['per_image'])} images (see --out)"
    print(_format_metrics(shown))
    if out:
        print(f"wrote {out}")
    return 0


def _format_metrics(metrics, indent: str = "") -> str:
    """A readable nested listing of a metrics dict (numbers to 4 decimals, long lists elided)."""
    lines = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.append(_format_metrics(value, indent + "  "))
        elif isinstance(value, float):
            lines.append(f"{indent}{key}: {value:.4f}")
        elif isinstance(value, (list, tuple)) and len(value) > 8:
            lines.append(f"{indent}{key}: [{len(value)} values]")
        else:
            lines.append(f"{indent}{key}: {value}")
    return "\n".join(lines)


def _cmd_demo(args: argparse.Namespace) -> int:
    """The whole method end to end on the built-in sample data.

    Train a cross-validation over tasks (5 folds; on a CPU the small 2D recipe's 4/1 split,
    starting from the built-in brain model) for a few minutes on the
    lesion-free slices of the built-in brain tumour MRI, predict the volume, and score the
    heatmaps against the real tumour mask next to a random baseline.
    """
    from napari_mtml.demo import run_demo

    run_demo(
        args.out,
        time_budget=args.time_budget,
        max_steps=args.max_steps,
        recipe=args.recipe,
        brain_mask=args.brain_mask,
        device=args.device,
        seed=args.seed,
        workers=args.workers,
        render=lambda gen: _render_training(gen, show=True),
    )
    return 0


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """The `mtml train` flags, one per `TrainConfig` field that declares one
    (`napari_mtml.config.settings()`: help, choices, parser and flag name live with the field).
    Every default is None (a flag left out keeps the TOML's or the config's value)."""
    from napari_mtml.config import settings

    for name, s in settings().items():
        if s.flag is None:
            continue
        if s.flag == "healthy":  # the positional scans
            p.add_argument(name, nargs="*", default=None, metavar=s.metavar, help=s.help)
            continue
        if s.kind is bool:
            p.add_argument(s.flag, action="store_true", help=s.help)
            continue
        kw: dict = {"help": s.help, "metavar": s.metavar, "choices": s.choices}
        if s.flag != "--" + name.replace("_", "-"):
            kw["dest"] = name
        if s.parse in (int, float):
            kw["type"] = s.parse  # argparse's own message for a bad number
        elif s.parse is not None:
            kw["type"] = _argument(s.parse, s.flag)
        elif s.choices is not None:
            kw["type"] = type(s.choices[0])
        elif s.kind in (int, float):
            kw["type"] = s.kind
        if kw.get("type") is str:
            del kw["type"]
        p.add_argument(s.flag, **kw)


def _command(sub, func) -> argparse.ArgumentParser:
    """The subcommand `mtml NAME` of `_cmd_NAME`: its help is the first line of the function's
    docstring (without the full stop), its description the paragraph after it."""
    summary, _, description = func.__doc__.partition("\n\n")
    summary = summary.strip().rstrip(".")
    if summary[1:2].islower():  # argparse's style: "train the ...", but "AP / AUROC ..."
        summary = summary[0].lower() + summary[1:]
    p = sub.add_parser(
        func.__name__.removeprefix("_cmd_"),
        help=summary,
        description=" ".join(description.split()) or None,
    )
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtml",
        description="Many Tasks Make Light Work: synthetic anomaly tasks, cross-validation over "
        "tasks, ensemble anomaly heatmaps.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, _cmd_preview)
    p.add_argument("image", help="a NIfTI, DICOM or 2D image file (3D: a middle slice is shown)")
    p.add_argument("--task", default="all", help="a task name, or 'all' (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default="gallery.png",
        help="PNG file to write (default gallery.png), or an existing folder: NAME_preview.png "
        "inside it",
    )

    p = _command(sub, _cmd_train)
    _add_config_flags(p)
    p.add_argument("--config", metavar="run.toml", help="TOML file of TrainConfig fields")

    p = _command(sub, _cmd_predict)
    p.add_argument(
        "run",
        metavar="RUN",
        help="a run folder written by `mtml train`, or a built-in model (builtin:brain-t1)",
    )
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files, DICOM series folders, or folders of NIfTI/PNG files",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the heatmaps")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="B",
        help="frames per forward pass (default 16 in 2D, 1 in 3D)",
    )
    p.add_argument("--no-png", action="store_true", help="skip the overlay PNGs")
    p.add_argument(
        "--brain-mask",
        choices=("auto",),
        help="auto: keep the maps inside an automatic brain mask (brain MRI with the skull on; "
        "needs the brain extra: pip install 'napari-mtml[brain]'); written as NAME_mask.nii.gz",
    )
    p.add_argument(
        "--mask-dir",
        metavar="DIR",
        help="masks to keep the maps inside, one per input: DIR/NAME[_mask].nii.gz",
    )
    p.add_argument(
        "--keep-background",
        action="store_true",
        help="keep the maps outside the foreground (or mask) instead of setting them to 0",
    )
    p.add_argument(
        "--score",
        choices=("mean", "max", "top1"),
        help="the sample score of scores.csv (default max: the peak of the map smoothed by 4 mm, "
        "2 mm on a 2D map; "
        "every score is written as its own column too)",
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="also predict each image mirrored left-right and average (twice the time)",
    )
    p.add_argument(
        "--contralateral",
        choices=("auto", "on", "off"),
        default="auto",
        help="compare the two sides: each voxel of the map less the map near its mirror image "
        "across the fitted mid-sagittal plane, so that what both sides share (skull base, eyes, "
        "ventricles) drops out (auto, the default: on for 3D MRI volumes; off: the models' own "
        "map, e.g. for bilateral, symmetric disease; on: also 2D images, mirrored left-right)",
    )
    p.add_argument(
        "--regions",
        action="store_true",
        help="also write NAME_regions.csv: the connected regions of the map at or above "
        "--threshold with their size (mm^2/mm^3), peak, mean and centre (mm), largest first, "
        "as the heatmap widget's table",
    )
    p.add_argument(
        "--threshold",
        type=float,
        metavar="T",
        help="the threshold of --regions, in (0, 1] (default: the 99th percentile of the "
        "run's healthy calibration, `mtml calibrate`; 0.5 without one)",
    )

    p = _command(sub, _cmd_calibrate)
    p.add_argument("run", metavar="RUN", help="a run folder written by `mtml train`")
    p.add_argument(
        "healthy",
        nargs="+",
        metavar="HEALTHY",
        help="healthy scans: files, DICOM series folders, or folders of NIfTI/PNG files",
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--mask-dir",
        metavar="DIR",
        help="masks to take the values inside, one per scan: DIR/NAME[_mask].nii.gz",
    )
    p.add_argument(
        "--brain-mask",
        choices=("auto",),
        help="auto: take the values inside an automatic brain mask (needs the brain extra)",
    )

    p = _command(sub, _cmd_evaluate)
    p.add_argument("pred_dir", metavar="PRED_DIR")
    p.add_argument("label_dir", metavar="LABEL_DIR")
    p.add_argument(
        "--foreground-dir",
        metavar="DIR",
        help="foreground masks: pixel metrics are restricted to them",
    )
    p.add_argument("--out", metavar="metrics.json", help="write the metrics (and curves) here")

    p = _command(sub, _cmd_demo)
    p.add_argument(
        "--out", default="mtml-demo", metavar="DIR", help="output folder (default mtml-demo)"
    )
    p.add_argument(
        "--time",
        dest="time_budget",
        type=_parse_duration,
        metavar="4m",
        help="training time in all (default 4m; e.g. 90s, 10m)",
    )
    p.add_argument(
        "--max-steps", type=int, metavar="N", help="training steps per fold instead of --time"
    )
    p.add_argument(
        "--recipe",
        default="auto",
        choices=("auto", "small", "light", "paper"),
        help="as mtml train (default auto: small on a CPU)",
    )
    p.add_argument(
        "--brain-mask",
        default="auto",
        choices=("auto", "none"),
        help="auto (default): with the brain extra installed, anomalies and maps inside an "
        "automatic brain mask",
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--workers", type=int, default=0, metavar="W")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    return parser


def _one_line(text: str) -> str:
    """A message as one line: the error is one line of stderr, whatever the core put in it."""
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import warnings

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"mtml {args.command}: warning: {_one_line(str(message))}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning  # a reader's note: one line, no source line
            return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"mtml {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user gave: a file where a folder is needed, permissions
        from napari_mtml.files import os_error_message

        print(f"mtml {args.command}: error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mtml {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
