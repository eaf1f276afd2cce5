"""A run's healthy calibration: how high its ensemble map goes on healthy scans.

```python
from napari_mtml.calibration import calibrate, read_calibration
cal = calibrate("runs/brain", healthy_scans)       # writes runs/brain/calibration.json
cal["thresholds"]["99"]                            # 99 % of healthy voxels stay under this
read_calibration("builtin:brain-t1")               # the shipped model's, or None
calibration_threshold(run, 99, contralateral=False)  # for maps without the two sides compared
```

A threshold that 99 % of the healthy foreground voxels stay under is the Heatmap widget's
starting threshold for the region table when the run has one (otherwise it keeps its fixed 0.5,
and "from reference" computes one from a healthy layer). `mtml calibrate RUN HEALTHY...` writes
the file; the built-in models ship theirs. The file names the SHA-256 of every fold's weights,
so a run retrained in the same folder no longer matches its old calibration, which is then
ignored.

`thresholds` are those of the maps `Ensemble.predict` makes by default, on a 3D MRI volume with
the two sides of the brain compared (`contralateral="auto"`), which lowers a healthy map's
peaks; where that comparison applied, the file also records `thresholds_uncompared`, those of
the models' own maps (`contralateral=False`, `mtml predict --contralateral off`, the widget's
"compare left and right" unticked), from the same predictions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CALIBRATION_FILE",
    "PERCENTILES",
    "calibrate",
    "calibration_threshold",
    "read_calibration",
    "thresholds_for",
    "weights_digest",
]

CALIBRATION_FILE = "calibration.json"
#: the percentiles of the healthy voxels' values recorded
PERCENTILES = (95.0, 99.0, 99.9)
_FORMAT = 1


def weights_digest(run_dir: str | os.PathLike, folds: Iterable[int]) -> dict[str, str]:
    """SHA-256 of each fold's `best.pt`: {"fold_K": hex digest}.

    Parameters
    ----------
    run_dir : str or PathLike
        A run folder (not a built-in name: resolve it first).
    folds : iterable of int

    Returns
    -------
    dict of str to str
    """
    out = {}
    for k in folds:
        h = hashlib.sha256()
        with open(Path(run_dir) / f"fold_{k}" / "best.pt", "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[f"fold_{k}"] = h.hexdigest()
    return out


def _key(p: float) -> str:
    return f"{p:g}"


def calibrate(
    run: str | os.PathLike,
    scans: Sequence[Any],
    masks: Sequence[np.ndarray | None] | None = None,
    *,
    device: str = "auto",
    write: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Predict healthy scans with a run's ensemble and record the percentiles of the map.

    Parameters
    ----------
    run : str or PathLike
        A run folder (`mtml train --out`); the folds trained so far.
    scans : sequence of napari_mtml.io.Scan
        Healthy scans of the kind the run was trained on.
    masks : sequence of bool arrays or None, optional
        Per scan, where to take the values (e.g. a brain mask); None = the scan's foreground
        (`napari_mtml.preprocess.foreground_mask`).
    device : str
        As `load_ensemble`.
    write : bool
        Write `RUN/calibration.json` (atomically).
    progress : callable(i, n), optional
        Called after each scan.

    Returns
    -------
    dict
        ``{"format", "thresholds": {"95": v, "99": v, "99.9": v}, "images", "voxels",
        "weights": weights_digest}``.

    Raises
    ------
    ValueError
        No scans, a mask of the wrong shape, or no voxel to take values from.
    """
    from napari_mtml.inference import load_ensemble
    from napari_mtml.preprocess import foreground_mask

    scans = list(scans)
    if not scans:
        raise ValueError("calibration needs at least one healthy scan")
    masks = list(masks) if masks is not None else [None] * len(scans)
    if len(masks) != len(scans):
        raise ValueError(f"{len(masks)} mask(s) for {len(scans)} scan(s)")
    from napari_mtml.inference import _compare_sides, _compares_sides_by_default

    ensemble = load_ensemble(run, device=device, folds="available")
    values, uncompared = [], []
    compared_any = False
    for i, (scan, mask) in enumerate(zip(scans, masks, strict=True)):
        where = foreground_mask(scan) if mask is None else np.asarray(mask, dtype=bool)
        if where.shape != tuple(scan.array.shape):
            raise ValueError(
                f"{scan.metadata.get('path') or f'scan {i + 1}'}: mask of shape {where.shape} for "
                f"an image of shape {tuple(scan.array.shape)}"
            )
        # the models' own map once, then the two sides compared where `predict`'s default
        # ("auto") compares them: both calibrations from one forward pass per scan
        raw = ensemble.predict(scan, mask=where, contralateral=False).anomaly
        heat = raw
        if _compares_sides_by_default(raw.ndim, ensemble.kind):
            array = np.asarray(scan.array)
            plane, heat, _, _ = _compare_sides(
                array, getattr(scan, "spacing", None), where, raw, ()
            )
            compared_any = compared_any or plane is not None
        values.append(heat[where].astype(np.float32, copy=False))
        uncompared.append(raw[where].astype(np.float32, copy=False))
        if progress is not None:
            progress(i + 1, len(scans))
    pooled = np.concatenate(values)
    if pooled.size == 0:
        raise ValueError("the healthy scans have no foreground voxel to calibrate on")
    result = {
        "format": _FORMAT,
        "thresholds": {_key(p): float(np.percentile(pooled, p)) for p in PERCENTILES},
    }
    if compared_any:
        raw_pooled = np.concatenate(uncompared)
        result["thresholds_uncompared"] = {
            _key(p): float(np.percentile(raw_pooled, p)) for p in PERCENTILES
        }
    result |= {
        "images": len(scans),
        "voxels": int(pooled.size),
        "weights": weights_digest(ensemble.run_dir, ensemble.folds),
    }
    if write:
        from napari_mtml.files import write_atomic

        text = json.dumps(result, indent=2) + "\n"
        write_atomic(Path(ensemble.run_dir) / CALIBRATION_FILE, text.encode())
    return result


def read_calibration(run: str | os.PathLike) -> dict[str, Any] | None:
    """The run's calibration, or None when it has none, it is unreadable, or its weights
    digest no longer matches the fold files (the run was retrained).

    Parameters
    ----------
    run : str or PathLike
        A run folder or builtin:NAME.

    Returns
    -------
    dict or None
    """
    from napari_mtml.builtin import resolve_run

    folder = resolve_run(run)
    try:
        cal = json.loads((folder / CALIBRATION_FILE).read_text(encoding="utf-8"))
        folds = sorted(int(name.split("_", 1)[1]) for name in cal["weights"])
        present = sorted(int(p.parent.name.split("_", 1)[1]) for p in folder.glob("fold_*/best.pt"))
        if cal.get("format") != _FORMAT or folds != present:
            return None  # another format, or folds trained (or removed) since
        if weights_digest(folder, folds) != cal["weights"]:
            return None
        thresholds = {k: float(v) for k, v in cal["thresholds"].items()}
        raw = cal.get("thresholds_uncompared")
        if raw is not None:
            raw = {k: float(v) for k, v in raw.items()}
            if not all(math.isfinite(v) for v in raw.values()):
                return None
            cal["thresholds_uncompared"] = raw
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None
    if not all(math.isfinite(v) for v in thresholds.values()):
        return None
    cal["thresholds"] = thresholds
    return cal


def calibration_threshold(
    run: str | os.PathLike, percentile: float = 99.0, contralateral: bool | str = "auto"
) -> float | None:
    """The healthy threshold of `run` at `percentile` (one of `PERCENTILES`), or None.

    Parameters
    ----------
    run : str or PathLike
        A run folder or builtin:NAME.
    percentile : float
    contralateral : "auto", True or False
        The maps the threshold is for (`Ensemble.predict(contralateral=...)`): False takes
        the file's `thresholds_uncompared` where it has them (a calibration of 3D MRI).

    Returns
    -------
    float or None
    """
    cal = read_calibration(run)
    if cal is None:
        return None
    return thresholds_for(cal, contralateral).get(_key(percentile))


def thresholds_for(cal: dict[str, Any], contralateral: bool | str = "auto") -> dict[str, float]:
    """A calibration's thresholds for maps predicted with `contralateral` ("auto", True or
    False): `thresholds_uncompared` for False where the file has them, else `thresholds`.

    Parameters
    ----------
    cal : dict
        `read_calibration`'s result (or `Ensemble.calibration`).
    contralateral : "auto", True or False

    Returns
    -------
    dict of str to float
    """
    if not isinstance(contralateral, str) and not contralateral:
        return cal.get("thresholds_uncompared") or cal["thresholds"]
    return cal["thresholds"]
