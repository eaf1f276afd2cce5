"""Automatic brain extraction for brain MRI with the skull on (the optional `brain` extra).

```python
from napari_mtml.brainmask import brain_mask, available, dilate_mask, BrainMaskUnavailable
if available():                            # pip install "napari-mtml[brain]"
    mask = brain_mask(scan, dilate_mm=3.0)   # bool, scan.array's (z, y, x) grid
```

The extractor is **deepbet** (Fisch et al., "deepbet: Fast brain extraction of T1-weighted MRI
using Convolutional Neural Networks", Computers in Biology and Medicine 2024; MIT licence;
`pip install deepbet`): two small 3D LinkNets (2.1 M parameters each), one finding the brain's
box on a coarse 128^3 view of the head and one segmenting the brain inside that box at 256^3.
Its weights ship inside its wheel, so nothing is downloaded at any time. This module calls its
`BrainExtraction.run_model` in-process on an array (no temporary files), on the device asked
(the CPU by default) with whatever torch thread count the caller has set; what comes after the
network (back to the scan's grid, largest component, hole filling, dilation in mm) is ours.

**How the weights are loaded.** deepbet's weights are TorchScript archives (`model.pt`,
`bbox_model.pt`), loaded with `torch.jit.load` as deepbet itself does. TorchScript's loader reads
tensors and TorchScript code with torch's own restricted unpickler: no Python pickle is run, so
loading cannot call arbitrary Python. Before loading, the two files are checked against the
SHA-256 recorded in deepbet's installed wheel (`RECORD`), because deepbet installs them into a
generic top-level `data/models/` folder of site-packages that another package could overwrite.
(Checkpoints of this project are never loaded this way: they are weights-only / safetensors.)
`torch.jit.load` is deprecated in recent torch; its DeprecationWarning is silenced here, and a
torch that drops it makes `available()` still true but `brain_mask` raise `BrainMaskUnavailable`
with the reason.

**Grids.** deepbet expects a T1-weighted head in RAS orientation, as `read_image` gives
(`scan.array` is `(z, y, x)` RAS-canonical). Its networks see the whole field of view resized to
128^3 and the brain's box resized to 256^3 (nearest neighbour), whatever the voxel count, so a
thick-slice clinical volume (e.g. 0.78 x 0.78 x 6.5 mm, 25 slices) is given as it is by default
(`spacing_mm=None`). Resampling it linearly to 1 mm first (`spacing_mm=1.0`) was measured and
was no better: on the MNI152 template cut to every 6th axial slice, Dice against its brain mask
0.978 on the scan's own grid and 0.973 through a 1 mm grid (every 3rd slice: 0.980 and 0.978).
Either way the mask is made and returned on `scan.array`'s grid.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib
import threading
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from napari_mtml.io import Scan
from napari_mtml.preprocess import fill_holes

__all__ = [
    "INSTALL_HINT",
    "METHODS",
    "EXTRA_SUMMARY",
    "BrainMaskUnavailable",
    "available",
    "brain_mask",
    "brain_probability",
    "dilate_mask",
]

INSTALL_HINT = 'pip install "napari-mtml[brain]"'
METHODS = ("auto", "deepbet")
# What the extra adds, in one sentence, for widgets and CLI messages.
EXTRA_SUMMARY = (
    "automatic brain extraction for brain MRI with the skull on (deepbet, weights "
    "inside the package, a few seconds per volume on a CPU), so that maps stay "
    "inside the brain"
)

# Relative deviation from `spacing_mm` up to which a scan is given to the network on its own grid.
_SPACING_TOLERANCE = 0.1
_MIN_VOXELS_PER_AXIS = 4
_WEIGHT_FILES = ("model.pt", "bbox_model.pt")
# deepbet's model keeps per-call state (its box): one call at a time per loaded model.
_RUN_LOCK = threading.Lock()


class BrainMaskUnavailable(ValueError):
    """The brain extractor cannot run here (the `brain` extra is missing or broken).

    The message says what is missing and how to install it (`INSTALL_HINT`).
    """


def _import_deepbet():
    """deepbet's core module (`deepbet.bet`), or `BrainMaskUnavailable` saying how to install it.

    Only the core is imported: deepbet's GUI (customtkinter, tkinter) is never loaded.
    """
    try:
        return importlib.import_module("deepbet.bet")
    except ImportError as exc:
        raise BrainMaskUnavailable(
            f"automatic brain extraction needs the optional 'brain' extra ({exc.name or exc} "
            f"could not be imported); install it with: {INSTALL_HINT}"
        ) from exc


def _weight_paths() -> tuple[Path, ...]:
    """deepbet's two weight files, where deepbet itself looks for them."""
    data = Path(importlib.import_module("deepbet.utils").DATA_PATH) / "models"
    return tuple(data / name for name in _WEIGHT_FILES)


def available() -> bool:
    """True when the `brain` extra is installed: deepbet and its weight files are present.

    The first call imports deepbet's core module (well under a second; no network, no GPU).
    """
    try:
        _import_deepbet()
        return all(p.is_file() for p in _weight_paths())
    except (BrainMaskUnavailable, AttributeError, OSError):
        return False


def _recorded_sha256() -> dict[str, str]:
    """`{relative path: urlsafe-base64 sha256}` of deepbet's weight files from its wheel RECORD."""
    from importlib import metadata

    try:
        files = metadata.files("deepbet") or []
    except metadata.PackageNotFoundError:
        return {}
    out = {}
    for f in files:
        if f.name in _WEIGHT_FILES and f.hash is not None and f.hash.mode == "sha256":
            out[f.name] = f.hash.value
    return out


def _check_weights(paths: tuple[Path, ...]) -> None:
    recorded = _recorded_sha256()
    for path in paths:
        if not path.is_file():
            raise BrainMaskUnavailable(
                f"deepbet is installed but its weight file {path} is missing; reinstall the "
                f"extra: {INSTALL_HINT} (or pip install --force-reinstall deepbet)"
            )
        expected = recorded.get(path.name)
        if expected is None:
            continue  # installed without a RECORD hash (e.g. from source): nothing to check
        digest = hashlib.sha256(path.read_bytes()).digest()
        actual = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        if actual != expected:
            raise BrainMaskUnavailable(
                f"deepbet's weight file {path} does not match the file its wheel installed "
                "(another package may have overwritten site-packages/data/models); reinstall "
                "it: pip install --force-reinstall deepbet"
            )


@functools.lru_cache(maxsize=2)
def _extractor(device: str):
    """deepbet's `BrainExtraction` with both networks on `device` (loaded once per device)."""
    import torch

    bet = _import_deepbet()
    model_path, bbox_path = _weight_paths()
    _check_weights((model_path, bbox_path))
    try:
        with warnings.catch_warnings():
            # torch >= 2.10 deprecates torch.jit.load; deepbet's archives are TorchScript.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            extractor = bet.BrainExtraction(
                no_gpu=True, model_path=str(model_path), bbox_model_path=str(bbox_path)
            )
    except (RuntimeError, AttributeError) as exc:
        raise BrainMaskUnavailable(
            f"deepbet's networks could not be loaded with this torch ({torch.__version__}): {exc}"
        ) from exc
    dev = torch.device(device)
    extractor.model = extractor.model.to(dev)
    extractor.bbox_model = extractor.bbox_model.to(dev)
    return extractor


def _name(scan: Scan) -> str:
    path = scan.metadata.get("path") if isinstance(scan.metadata, dict) else None
    return str(path) if path else "the image"


def _check_scan(scan) -> Scan:
    if not isinstance(scan, Scan):
        raise ValueError(
            f"brain_mask needs a napari_mtml.io.Scan (from read_image, or Scan(array, spacing)); "
            f"got {type(scan).__name__}."
        )
    name = _name(scan)
    if scan.ndim != 3:
        raise ValueError(
            f"{name}: automatic brain extraction needs a 3D brain MRI volume; this image is 2D "
            f"{scan.shape}."
        )
    if min(scan.shape) < _MIN_VOXELS_PER_AXIS:
        raise ValueError(
            f"{name}: the volume {scan.shape} has fewer than {_MIN_VOXELS_PER_AXIS} voxels along "
            "an axis; brain extraction needs a volume covering the head."
        )
    arr = scan.array
    if not np.isfinite(arr).all():
        raise ValueError(
            f"{name}: the volume holds NaN or infinite values; replace them (e.g. with 0) first."
        )
    if float(arr.min()) == float(arr.max()):
        raise ValueError(
            f"{name}: the volume is constant; there is no head to extract a brain from."
        )
    return scan


def _resolve_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown brain-mask method {method!r}; choose one of {METHODS}.")
    return "deepbet"  # the only extractor wired in; "auto" leaves room for others


def _zoom_to(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear resampling of `array` onto `shape` over the same field of view (voxel edges
    aligned, so that going there and back keeps the geometry)."""
    if tuple(array.shape) == tuple(shape):
        return array
    factors = [n / o for n, o in zip(shape, array.shape, strict=True)]
    return ndi.zoom(array, factors, output=np.float32, order=1, mode="nearest", grid_mode=True)


def _work_shape(scan: Scan, spacing_mm: float | None) -> tuple[int, ...]:
    if spacing_mm is None:
        return scan.shape
    sp = np.asarray(scan.spacing, dtype=float)
    if np.all(np.abs(sp - spacing_mm) <= _SPACING_TOLERANCE * spacing_mm):
        return scan.shape
    return tuple(
        max(1, int(round(n * s / spacing_mm))) for n, s in zip(scan.shape, sp, strict=True)
    )


def brain_probability(
    scan: Scan, *, method: str = "auto", spacing_mm: float | None = None, device: str = "cpu"
) -> np.ndarray:
    """The extractor's brain probability on `scan.array`'s grid: float32 in [0, 1].

    Parameters
    ----------
    scan : a 3D `Scan` whose `array` is `(z, y, x)` in RAS orientation (as `read_image` gives);
        a T1-weighted head, skull on or off.
    method : "auto" (the best installed extractor) or "deepbet".
    spacing_mm : None (default) = the network sees the scan's own grid; a number = an isotropic
        grid (mm) the scan is resampled to linearly first (unless all its voxels are within 10 %
        of it), the probability being brought back to the scan's grid linearly.
    device : torch device for the networks ("cpu" by default).

    Raises
    ------
    BrainMaskUnavailable : the `brain` extra is not installed (the message says how to install).
    ValueError : 2D or too small volumes, NaN/inf values, a constant volume, no head found; the
        message names the file.
    """
    scan = _check_scan(scan)
    _resolve_method(method)
    if spacing_mm is not None and not (np.isfinite(spacing_mm) and spacing_mm > 0):
        raise ValueError(f"spacing_mm must be a positive number of mm or None; got {spacing_mm}.")
    _import_deepbet()  # cheap once imported; says how to install the extra when it is missing
    extractor = _extractor(str(device))
    work_shape = _work_shape(scan, spacing_mm)
    work = _zoom_to(scan.array, work_shape)
    # deepbet works on RAS arrays indexed (x, y, z); run_model overwrites its input.
    x = np.array(work.transpose(2, 1, 0), dtype=np.float32, order="C")
    with _RUN_LOCK:
        try:
            prob = extractor.run_model(x)
        except AssertionError as exc:  # deepbet asserts when its box network finds no head
            raise ValueError(
                f"{_name(scan)}: the brain extractor found no head in this volume ({exc}); is "
                "it a T1-weighted brain MRI?"
            ) from None
    prob = np.ascontiguousarray(np.asarray(prob, dtype=np.float32).transpose(2, 1, 0))
    prob = _zoom_to(prob, scan.shape)
    return np.clip(prob, 0.0, 1.0, out=prob)


def dilate_mask(mask: np.ndarray, spacing, mm: float) -> np.ndarray:
    """Grow a bool mask by `mm` millimetres: every voxel whose centre lies within `mm` of a
    mask voxel's centre (Euclidean, in mm with the voxel `spacing`) joins it.

    Parameters
    ----------
    mask : ndarray of bool
    spacing : sequence of float
        mm per array axis. Along an axis whose spacing exceeds `mm` the mask does not grow (no
        voxel centre lies that close).
    mm : float
        0 returns a copy.

    Returns
    -------
    ndarray of bool
        A new array.
    """
    mask = np.asarray(mask, dtype=bool)
    spacing = tuple(float(s) for s in np.atleast_1d(spacing))
    if len(spacing) != mask.ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(
            f"spacing must give one positive mm value per axis of the "
            f"{mask.ndim}D mask; got {spacing}."
        )
    if not (np.isfinite(mm) and mm >= 0):
        raise ValueError(f"the dilation must be a non-negative number of mm; got {mm}.")
    out = mask.copy()
    if mm == 0 or not mask.any():
        return out
    # Only a box around the mask can change: the distance transform runs there alone.
    pad = [int(np.ceil(mm / s)) + 1 for s in spacing]
    idx = np.nonzero(mask)
    box = tuple(
        slice(max(0, int(i.min()) - p), min(n, int(i.max()) + 1 + p))
        for i, p, n in zip(idx, pad, mask.shape, strict=True)
    )
    dist = ndi.distance_transform_edt(~mask[box], sampling=spacing)
    # A hair of tolerance so that a distance of exactly `mm` (e.g. 3 voxels of 1 mm) is kept.
    out[box] |= dist <= mm * (1 + 1e-9)
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def brain_mask(
    scan: Scan,
    *,
    method: str = "auto",
    dilate_mm: float = 3.0,
    threshold: float = 0.5,
    spacing_mm: float | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """A brain mask of a T1-weighted head MRI: bool, `scan.array`'s shape and grid.

    The extractor's probability (`brain_probability`) is thresholded on the scan's grid, its
    largest connected component kept, its holes filled (3D), then grown by `dilate_mm` mm
    (`dilate_mask`) so that lesions at the brain's edge stay in.

    Parameters
    ----------
    scan : a 3D `Scan`, `(z, y, x)` RAS (as `read_image` gives), skull on or skull-stripped;
        1 mm research volumes and thick-slice clinical ones alike (see `spacing_mm`).
    method : "auto" (the best installed extractor: deepbet) or "deepbet".
    dilate_mm : growth of the mask in mm (>= 0). The default 3 mm is about 3 voxels at 1 mm and
        4 in-plane voxels at 0.78 mm; along 6.5 mm slices it adds no slice.
    threshold : probability above which a voxel is brain (deepbet's default 0.5).
    spacing_mm, device : see `brain_probability`.

    Deterministic: the same scan gives the same mask (CPU). Cost: about 6 CPU-seconds per
    volume (about 3 s on two idle cores), whatever the voxel count, as the network always runs
    at 256^3 inside the brain's box; the first call of a process adds TorchScript's warm-up and
    the networks load once per process (0.2-0.4 s). `benchmarks/bench_brainmask.py` measures it.

    Raises
    ------
    BrainMaskUnavailable (a ValueError) : the `brain` extra is missing; the message says
        `pip install "napari-mtml[brain]"`.
    ValueError : 2D or too small input, NaN/inf, constant volume, unknown method, bad
        `dilate_mm`/`threshold`, or no brain found; the message names the file.
    """
    if not (np.isfinite(dilate_mm) and dilate_mm >= 0):
        raise ValueError(f"dilate_mm must be a non-negative number of mm; got {dilate_mm}.")
    if not (np.isfinite(threshold) and 0 < threshold < 1):
        raise ValueError(f"threshold must lie strictly between 0 and 1; got {threshold}.")
    prob = brain_probability(scan, method=method, spacing_mm=spacing_mm, device=device)
    mask = prob > threshold
    if not mask.any():
        raise ValueError(
            f"{_name(scan)}: the brain extractor found no brain in this volume; is it a "
            "T1-weighted brain MRI in RAS orientation?"
        )
    mask = _largest_component(mask)
    mask = fill_holes(mask)
    return dilate_mask(mask, scan.spacing, dilate_mm)
