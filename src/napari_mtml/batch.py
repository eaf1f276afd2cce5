"""Batch prediction: ensemble heatmaps for many images into one folder (Qt-free core).

`mtml predict` and the napari batch widget both drive the same generator:

```python
from napari_mtml.batch import predict_batch, expand_images
gen = predict_batch(ensemble, expand_images(["scans/"]), "out", png=True)
try:
    while True:
        item = next(gen)              # a BatchItem after each input, failed ones included
except StopIteration as stop:
    result = stop.value               # BatchResult
# cancel: gen.close() -- scores.csv is still written for the inputs done so far
```

Per input NAME (`image_name`): `NAME_anomaly.nii.gz` (ensemble mean) and `NAME_disagreement.nii.gz`
(std over folds) on the input's own grid and geometry, `NAME_overlay.png` (with `png=True`), and
at the end `scores.csv` (csv module: `name, score, mean_disagreement, anomaly_file`) for the inputs
that succeeded. An input that cannot be read or predicted becomes an item with `error` set (one
line naming the file), its partial outputs are removed, and the batch goes on. `scores.csv` is
written atomically (temporary file + `os.replace`) both at the end and when the generator is
closed early, so no half-written table is ever left.
"""

from __future__ import annotations

import csv
import io as _io
import os
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_mtml.files import check_output_folder, safe_name, write_atomic
from napari_mtml.io import IMAGE_SUFFIXES, image_files, image_name

__all__ = [
    "BatchItem",
    "BatchResult",
    "IMAGE_SUFFIXES",
    "expand_images",
    "image_name",
    "predict_batch",
    "mask_dir_lookup",
    "auto_brain_mask",
]

SCORES_HEADER = (
    "name",
    "score",
    "mean_disagreement",
    "anomaly_file",
    "score_method",
    "mean",
    "max",
    "top1",
)


@dataclass
class BatchItem:
    """One input done (or failed).

    index : 0-based position of the input in the batch; total : number of inputs.
    path : the input (file or DICOM series folder); name : its NAME in the output file names.
    score : sample-level score (`Prediction.score`); mean_disagreement : mean of the disagreement
        map over the whole image; both None when the input failed.
    anomaly_path, disagreement_path, overlay_path : the files written (overlay None with
        `png=False`); all None when the input failed.
    regions_path : `NAME_regions.csv` with `regions_at` (else None).
    error : one line naming the file, when this input failed; None otherwise.
    notes : `Prediction.notes` of a successful input (e.g. an X-ray given to an MRI run).
    """

    index: int
    total: int
    path: Path
    name: str
    score: float | None = None
    mean_disagreement: float | None = None
    anomaly_path: Path | None = None
    disagreement_path: Path | None = None
    overlay_path: Path | None = None
    error: str | None = None
    scores: dict = field(default_factory=dict)
    score_method: str | None = None
    mask_path: Path | None = None
    regions_path: Path | None = None
    notes: tuple[str, ...] = ()


@dataclass
class BatchResult:
    """The whole batch: `items` in input order, `scores_csv` the table of the successful ones."""

    out_dir: Path
    items: list[BatchItem]
    scores_csv: Path

    @property
    def failures(self) -> list[BatchItem]:
        return [item for item in self.items if item.error is not None]


def expand_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The inputs of a batch, in order.

    A file is taken as given; a folder holding NIfTI/PNG/TIFF/JPEG files becomes those files
    (`napari_mtml.io.image_files`: sorted by name; only regular files, links resolved, are
    taken: a named pipe or socket is skipped and never opened); any other folder is one input
    (a DICOM series, for the reader).

    Raises
    ------
    ValueError : a path that does not exist, or that is neither a regular file nor a folder.

    Parameters
    ----------
    paths : iterable of str or os.PathLike

    Returns
    -------
    list of Path
    """
    out: list[Path] = []
    for text in paths:
        p = Path(text)
        if not p.exists():
            raise ValueError(f"{p}: no such file or folder")
        if p.is_dir():
            files = [f for f in image_files(p) if not f.name.lower().endswith(".dcm")]
            if files:
                out.extend(files)
                continue
        elif not p.is_file():
            raise ValueError(
                f"{p}: not a regular file (a named pipe, socket or device); give an image file "
                "or a folder"
            )
        out.append(p)
    return out


def _in_memory(item) -> bool:
    from napari_mtml.io import Scan

    return isinstance(item, Scan)


def _memory_name(scan) -> str:
    name = str(scan.metadata.get("name") or "").strip()
    if not name:
        raise ValueError(
            "an in-memory image (Scan) in a batch needs metadata['name'] for its output file names"
        )
    return safe_name(name)


def _one_line(path: Path, exc: BaseException) -> str:
    """The failure of one input as one line that names its file."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or text}"
    if str(path) not in text:
        text = f"{path}: {text}"
    return text


def _input_errors() -> tuple[type[BaseException], ...]:
    """What a bad input (not a bug) raises: the core's ValueErrors, the OS's errors, memory."""
    errors: list[type[BaseException]] = [ValueError, OSError, MemoryError]
    import sys

    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if isinstance(oom, type):
        errors.append(oom)
    return tuple(errors)


def _write_scores(path: Path, items: list[BatchItem]) -> Path:
    """`scores.csv` for the successful items, via a temporary file and `os.replace`."""
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SCORES_HEADER)
    for item in items:
        if item.error is not None:
            continue
        writer.writerow(
            (
                item.name,
                f"{item.score:.6g}",
                f"{item.mean_disagreement:.6g}",
                item.anomaly_path.name if item.anomaly_path is not None else "",
                item.score_method or "",
                *(f"{item.scores[k]:.6g}" if k in item.scores else "" for k in SCORES_HEADER[5:]),
            )
        )
    return write_atomic(path, buf.getvalue())


def predict_batch(
    ensemble: Any,
    paths: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    png: bool = True,
    predict_kwargs: Mapping[str, Any] | None = None,
    mask_for: Callable[[Path, Any], Any] | None = None,
    regions_at: float | None = None,
) -> Generator[BatchItem, None, BatchResult]:
    """Predict every input with `ensemble` into `out_dir`, one `BatchItem` yielded per input.

    Parameters
    ----------
    ensemble : a loaded `napari_mtml.inference.Ensemble` (anything with `.predict(scan, **kw)`
        returning a `Prediction`, and `.folds`).
    paths : image files or DICOM series folders (`expand_images` turns folders of files into
        their files); an item may also be a `napari_mtml.io.Scan` already in memory (e.g. a
        napari layer), named by its `metadata["name"]`, predicted as it is (its metadata, such
        as an X-ray's window, kept) and written in its geometry; its item's `path` is
        `Path(NAME)`.
    out_dir : the output folder (created with its parents).
    png : also write `NAME_overlay.png`.
    predict_kwargs : passed on as `ensemble.predict(scan, **predict_kwargs)`.
    mask_for : `mask_for(path, scan) -> bool array or None`, the mask the map of that input is
        kept inside (`Ensemble.predict(mask=...)`; see `mask_dir_lookup`, `auto_brain_mask`);
        a mask used is also written as `NAME_mask.nii.gz`.
    regions_at : a threshold in (0, 1]: also write `NAME_regions.csv`, the connected regions of
        the map at or above it (`napari_mtml.regions.write_regions_csv`, the heatmap widget's
        table: size in mm^2/mm^3, peak, mean, centre in the mm of `io.scan.display_grid`).

    Returns (the generator's return value)
    -------
    BatchResult : every item, and the `scores.csv` path.

    Raises (when called, before any input is read)
    ------
    ValueError : no inputs, or several inputs that would write the same NAME.
    ValueError : `out_dir` (or a parent) is a file; `regions_at` outside (0, 1].
    OSError : `out_dir` cannot be created (permissions, ...).
    """
    paths = [p if _in_memory(p) else Path(p) for p in paths]
    if regions_at is not None and not 0 < regions_at <= 1:
        raise ValueError(
            f"region threshold {regions_at} is invalid: the maps lie in [0, 1], "
            "use a threshold in (0, 1]"
        )
    if not paths:
        raise ValueError("no input images given")
    names = [_memory_name(p) if _in_memory(p) else image_name(p) for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(
            f"several inputs would write the same output name(s) {dupes}: predict them into "
            "separate output folders"
        )
    out = check_output_folder(out_dir, "predictions")
    out.mkdir(parents=True, exist_ok=True)
    return _run(ensemble, paths, names, out, png, dict(predict_kwargs or {}), mask_for, regions_at)


def _run(
    ensemble: Any,
    paths: list[Path],
    names: list[str],
    out: Path,
    png: bool,
    predict_kwargs: dict[str, Any],
    mask_for: Callable[[Path, Any], Any] | None = None,
    regions_at: float | None = None,
) -> Generator[BatchItem, None, BatchResult]:
    from napari_mtml.demo import write_overlay_png
    from napari_mtml.io import read_image, write_image

    errors = _input_errors()
    total = len(paths)
    result = BatchResult(out_dir=out, items=[], scores_csv=out / "scores.csv")
    try:
        for index, (source, name) in enumerate(zip(paths, names, strict=True)):
            path = Path(name) if _in_memory(source) else source  # what the item names
            anomaly_path = out / f"{name}_anomaly.nii.gz"
            disagreement_path = out / f"{name}_disagreement.nii.gz"
            overlay_path = out / f"{name}_overlay.png" if png else None
            written: list[Path] = []
            try:
                scan = source if _in_memory(source) else read_image(source)
                mask = mask_for(path, scan) if mask_for is not None else None
                kwargs = dict(predict_kwargs)
                mask_path = None
                if mask is not None:
                    kwargs["mask"] = mask
                pred = ensemble.predict(scan, **kwargs)
                if mask is not None:
                    mask_path = out / f"{name}_mask.nii.gz"
                    write_image(mask_path, mask.astype("uint8"), like=scan)
                    written.append(mask_path)
                write_image(anomaly_path, pred.anomaly, like=scan)
                written.append(anomaly_path)
                write_image(disagreement_path, pred.disagreement, like=scan)
                written.append(disagreement_path)
                regions_path = None
                if regions_at is not None:
                    regions_path = out / f"{name}_regions.csv"
                    written.append(regions_path)
                    _write_regions(regions_path, pred.anomaly, scan, regions_at)
                if overlay_path is not None:
                    written.append(overlay_path)
                    write_overlay_png(
                        overlay_path,
                        scan.array,
                        pred.anomaly,
                        spacing=scan.spacing,
                        title=f"{name}: ensemble of {len(ensemble.folds)} folds, "
                        f"score {pred.score:.3f}",
                    )
                item = BatchItem(
                    index,
                    total,
                    path,
                    name,
                    score=float(pred.score),
                    mean_disagreement=float(pred.disagreement.mean()),
                    anomaly_path=anomaly_path,
                    disagreement_path=disagreement_path,
                    overlay_path=overlay_path,
                    scores=dict(getattr(pred, "scores", {}) or {}),
                    score_method=getattr(pred, "score_method", None),
                    mask_path=mask_path,
                    regions_path=regions_path,
                    notes=tuple(getattr(pred, "notes", ()) or ()),
                )
            except errors as exc:
                for f in written:  # a failed input leaves none of its outputs behind
                    f.unlink(missing_ok=True)
                item = BatchItem(index, total, path, name, error=_one_line(path, exc))
            result.items.append(item)
            yield item
    finally:
        # Also on gen.close() (cancel) and on an unexpected error: the table of what succeeded.
        _write_scores(result.scores_csv, result.items)
    return result


def _write_regions(path: Path, anomaly, scan, threshold: float) -> Path:
    """`NAME_regions.csv`: the regions of `anomaly` at or above `threshold`, centres in mm."""
    import numpy as np

    from napari_mtml.io.scan import display_grid
    from napari_mtml.regions import regions_above, write_regions_csv

    translate, scale = display_grid(scan)
    _, regions = regions_above(anomaly, threshold, scan.spacing)

    def to_world(index):
        return np.asarray(translate) + np.asarray(index) * np.asarray(scale)

    return write_regions_csv(path, regions, threshold, scan.ndim, to_world)


def mask_dir_lookup(folder: str | os.PathLike) -> Callable[[Path, Any], Any]:
    """`mask_for` of `predict_batch` for a folder of masks: input NAME takes the file of the
    same NAME, optionally ending in `_mask`, `_brainmask`, `_foreground` or `_fg` (any image
    suffix). An input without a mask is an error naming both; a mask of another shape too.

    Parameters
    ----------
    folder : str or os.PathLike

    Returns
    -------
    callable
        `mask_for(path, scan) -> bool mask`.
    """
    import re

    import numpy as np

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: the mask folder does not exist (--mask-dir)")
    pattern = re.compile(r"_(mask|brainmask|foreground|fg)$", re.IGNORECASE)
    found: dict[str, Path] = {}
    for f in image_files(folder):
        found.setdefault(pattern.sub("", image_name(f)), f)

    def mask_for(path: Path, scan: Any):
        from napari_mtml.io import read_image

        name = image_name(path)
        if name not in found:
            raise ValueError(f"{path}: no mask named {name}[_mask].nii.gz in {folder}")
        mask = np.asarray(read_image(found[name]).array) > 0
        if mask.shape != tuple(scan.array.shape):
            raise ValueError(
                f"{found[name]}: mask shape {mask.shape} differs from {path}'s "
                f"{tuple(scan.array.shape)}"
            )
        return mask

    return mask_for


def auto_brain_mask(path: Path, scan: Any):
    """`mask_for` of `predict_batch`: an automatic brain mask (`napari_mtml.brainmask`, the
    `brain` extra) for volumes; 2D images keep their foreground (None).

    Parameters
    ----------
    path : Path
        The input (for messages).
    scan : napari_mtml.io.Scan

    Returns
    -------
    ndarray of bool or None
    """
    from napari_mtml.brainmask import brain_mask

    if scan.array.ndim != 3 or scan.array.shape[0] < 2:
        return None
    return brain_mask(scan)
