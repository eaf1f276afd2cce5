"""The `mtml` command: preview | train | predict | evaluate | demo.

Every subcommand is a thin layer over the plain Python API; heavy imports (torch) happen inside the
handlers so that `mtml --help` and `mtml preview` stay quick. Errors a user can fix (bad files, bad
flags) are `ValueError`s in the core; they are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_preview(args: argparse.Namespace) -> int:
    from napari_mtml.gallery import write_gallery

    out = write_gallery(args.image, out=args.out, task=args.task, seed=args.seed)
    print(f"wrote {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:  # filled by the training issue
    raise NotImplementedError("mtml train is not implemented yet")


def _cmd_predict(args: argparse.Namespace) -> int:  # filled by the training issue
    raise NotImplementedError("mtml predict is not implemented yet")


def _cmd_evaluate(args: argparse.Namespace) -> int:  # filled by the training issue
    raise NotImplementedError("mtml evaluate is not implemented yet")


def _cmd_demo(args: argparse.Namespace) -> int:  # filled by the training issue
    raise NotImplementedError("mtml demo is not implemented yet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtml",
        description="Many Tasks Make Light Work: synthetic anomaly tasks, cross-validation over "
        "tasks, ensemble anomaly heatmaps.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("preview", help="write a gallery of every synthetic anomaly task on an image")
    p.add_argument("image", help="a NIfTI, DICOM or 2D image file (3D: a middle slice is shown)")
    p.add_argument("--task", default="all", help="a task name, or 'all' (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="gallery.png", help="PNG file to write (default gallery.png)")
    p.set_defaults(func=_cmd_preview)

    p = sub.add_parser("train", help="train the task cross-validation ensemble on healthy scans")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("predict", help="ensemble anomaly heatmaps for images")
    p.set_defaults(func=_cmd_predict)
    p = sub.add_parser("evaluate", help="AP / AUROC of predictions against label masks")
    p.set_defaults(func=_cmd_evaluate)
    p = sub.add_parser("demo", help="the whole method end to end on the built-in sample data")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mtml {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mtml {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
