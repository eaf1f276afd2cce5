"""Bringing scans into the model's fixed frame (METHOD.md section 7), and maps back out of it.

```python
from napari_mtml.preprocess import foreground_mask, to_frame, from_frame, FrameTransform
fg = foreground_mask(scan)
array, foreground, transform = to_frame(scan)        # float32 in the frame, bool, the recipe
heat = from_frame(map_in_frame, transform)           # float32 on scan.array's grid
```

Two pipelines:

- **MRI** (2D or 3D): z-score over the foreground (background set to 0), crop to the foreground's
  bounding box, downsample by an integer-like factor (linear interpolation after a Gaussian
  anti-aliasing filter of sigma `(factor - 1) / 2` voxels, as scikit-image's `rescale` does), zero
  outside the downsampled foreground, zero-pad centred into the frame.
  Default frames: 3D `(80, 112, 80)` (the paper's brain frame: a 160x224x160 mm crop at 1 mm,
  halved); 2D `(128, 128)`: an axial brain slice at ~1 mm halved fits it, and 128 is divisible by
  64, so the paper's 2D U-Net (6 downsamplings) runs on it.
- **CXR** (2D X-ray): resize to `frame * downsample` (512x512 by default; cubic, anti-aliased),
  clip to the DICOM window (WindowCenter +- WindowWidth / 2) if the file has one, histogram
  equalisation (256 bins), MONOCHROME1 inverted if the reader has not already done it, rescale to
  [-1, 1], resize to the frame (default 256x256; linear, anti-aliased). The aspect ratio is not
  kept, as in the paper. The frame's foreground is the whole frame (the paper used no X-ray mask).

Maps go back by the exact inverse geometry (un-pad, linear upsampling on the same pixel-centre
grid, un-crop; 0 outside the crop), so a heatmap predicted in the frame lands on the scan's voxels.
All arguments of `to_frame` are plain values (str, int, float, tuple) so that a run configuration
can record them and `predict` can repeat them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from napari_mtml.anomalies.boxes import bounding_box
from napari_mtml.bias import BIAS_CORRECTIONS, correct_bias
from napari_mtml.io import Scan
from napari_mtml.parallel import map_threads

__all__ = [
    "CXR_FRAME",
    "CXR_MODALITIES",
    "MRI_FRAME_2D",
    "MRI_FRAME_3D",
    "FrameFitError",
    "FrameTransform",
    "fill_holes",
    "foreground_mask",
    "from_frame",
    "content_shape",
    "fit_frame",
    "infer_kind",
    "KIND_MODALITIES",
    "kind_mismatch",
    "mask_to_frame",
    "mri_factors",
    "to_frame",
    "to_model_units",
]

MRI_FRAME_3D = (80, 112, 80)
MRI_FRAME_2D = (128, 128)
CXR_FRAME = (256, 256)
CXR_MODALITIES = ("CR", "DX", "XR", "MG")
#: the DICOM modalities each pipeline's models are made for (`kind_mismatch`)
KIND_MODALITIES = {"mri": ("MR",), "cxr": CXR_MODALITIES}
_KIND_WORDS = {"mri": "MRI", "cxr": "X-rays"}
_MODALITY_WORDS = {
    "CR": "an X-ray",
    "DX": "an X-ray",
    "XR": "an X-ray",
    "MG": "a mammogram",
    "CT": "a CT scan",
    "MR": "an MRI",
    "PT": "a PET scan",
    "NM": "a nuclear medicine image",
    "US": "an ultrasound image",
}
# A volume whose exact-minimum voxels make up at least this fraction is taken as skull-stripped
# (its background was set to one value); scanners' unstripped images have noisy backgrounds.
STRIPPED_BACKGROUND_FRACTION = 0.25


@dataclass(frozen=True)
class FrameTransform:
    """How a scan was brought into the frame; `from_frame` undoes it for maps.

    Attributes (all plain values)
    -----------------------------
    kind : "mri" or "cxr".
    scan_shape : shape of `scan.array`.
    frame : the frame shape of one image (2D or 3D).
    stacked : True when a 3D scan was cut into axial 2D slices (`dims=2`); arrays in the frame
        then have shape `(Z, *frame)`.
    crop : `(start, stop)` voxel range per scan axis that was kept (the foreground's bounding box
        for MRI; the whole image for CXR).
    scale : input voxels per frame voxel, per scan axis (1.0 on the stacked axis).
    scaled_shape : size of the cropped content after downsampling, per scan axis.
    offset : where the content starts inside the frame, per scan axis (0 on the stacked axis).
    mean, std : the z-score (MRI), in the scan's units; NaN for CXR.
    window : the intensity window clipped to (CXR), or None.
    """

    kind: str
    scan_shape: tuple
    frame: tuple
    stacked: bool
    crop: tuple
    scale: tuple
    scaled_shape: tuple
    offset: tuple
    mean: float = float("nan")
    std: float = float("nan")
    window: tuple | None = None

    @property
    def frame_array_shape(self) -> tuple:
        """Shape of `to_frame`'s array (and what `from_frame` expects)."""
        return (self.scan_shape[0], *self.frame) if self.stacked else tuple(self.frame)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _as_scan(scan) -> Scan:
    if isinstance(scan, Scan):
        return scan
    arr = np.asarray(scan)
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected a Scan or a 2D/3D array; got an array of shape {arr.shape}.")
    return Scan(array=arr, spacing=(1.0,) * arr.ndim)


def _check_finite(array: np.ndarray, what: str) -> None:
    if not np.isfinite(array).all():
        raise ValueError(f"{what} holds NaN or infinite values; replace them (e.g. with 0) first.")


def _name(scan: Scan) -> str:
    path = scan.metadata.get("path")
    return f"{path}" if path else "the image"


def kind_mismatch(scan: Scan, kind: str) -> str | None:
    """A note when an image is plainly not what a run's models were trained on, else None.

    Parameters
    ----------
    scan : Scan
        Its `metadata["modality"]` (DICOM) decides.
    kind : {"mri", "cxr"}
        The run's pipeline (`Ensemble.kind`); any other value gives None.

    Returns
    -------
    str or None
        One line naming the image, what it is and what the run was trained on, when the image's
        DICOM modality is known and not one of `KIND_MODALITIES[kind]` (an X-ray given to a
        brain MRI run, a CT to an MRI run, an MRI to an X-ray run). None when the modality is
        unknown (NIfTI, PNG: nothing says what they are) or fits. (A 3D volume given to an
        X-ray run is refused by `to_frame`, not noted.)

    Examples
    --------
    >>> xray = Scan(array=np.ones((4, 4)), spacing=(1.0, 1.0), metadata={"modality": "CR"})
    >>> kind_mismatch(xray, "mri").split(":")[0]
    'the image is an X-ray (DICOM modality CR) but the run was trained on MRI'
    >>> kind_mismatch(xray, "cxr") is None
    True
    """
    scan = _as_scan(scan)
    if kind not in KIND_MODALITIES:
        return None
    modality = str(scan.metadata.get("modality", "") or "").upper()
    if not modality or modality in KIND_MODALITIES[kind]:
        return None
    what = f"{_MODALITY_WORDS.get(modality, 'an image')} (DICOM modality {modality})"
    return (
        f"{_name(scan)} is {what} but the run was trained on {_KIND_WORDS[kind]}: its map says "
        "nothing about this image; use a run trained on images like it"
    )


def infer_kind(scan: Scan) -> str:
    """The preprocessing pipeline of a scan.

    Parameters
    ----------
    scan : Scan
        Its dimensionality and `metadata["modality"]` decide.

    Returns
    -------
    {"cxr", "mri"}
        "cxr" for 2D images with modality CR/DX/XR/MG or none (plain 2D files); else "mri".
    """
    scan = _as_scan(scan)
    if scan.ndim != 2:
        return "mri"
    modality = str(scan.metadata.get("modality", "") or "").upper()
    return "cxr" if modality in CXR_MODALITIES or modality == "" else "mri"


def _resample(array: np.ndarray, scale, out_shape, order: int, anti_alias: bool) -> np.ndarray:
    """`out[o] = array[scale * (o + 0.5) - 0.5]` per axis (pixel-centre aligned), float32.

    With `anti_alias`, a Gaussian of sigma `max(0, (scale - 1) / 2)` input voxels is applied
    first, so that downsampling does not alias.
    """
    scale = np.asarray(scale, dtype=np.float64)
    a = np.asarray(array, dtype=np.float32)
    if anti_alias:
        sigma = np.maximum(0.0, (scale - 1.0) / 2.0)
        if np.any(sigma > 0):
            a = ndimage.gaussian_filter(a, sigma, mode="nearest")
    if np.all(scale == 1.0) and tuple(out_shape) == a.shape:
        return a.copy() if a is array else a
    offset = 0.5 * scale - 0.5
    return ndimage.affine_transform(
        a,
        scale,
        offset=offset,
        output_shape=tuple(int(s) for s in out_shape),
        order=order,
        mode="nearest",
        prefilter=order > 1,
    ).astype(np.float32, copy=False)


def _linear_resample(a: np.ndarray, scale, out_shape) -> np.ndarray:
    """`_resample`'s order 1 without anti-aliasing, one axis at a time (it is separable).

    The same values as `ndimage.affine_transform(order=1, mode="nearest")` on the same grid (to
    float32 rounding) in a fraction of the time: an 80x112x80 map back to a 189x233x197 scan took
    0.38 s there (8 neighbours per voxel, weights in float64) and 0.11 s here.
    """
    out = a
    for axis, (step, n_out) in enumerate(zip(scale, out_shape, strict=True)):
        n_out = int(n_out)
        n_in = out.shape[axis]
        if step == 1.0 and n_out == n_in:
            continue
        # mode "nearest": a coordinate beyond the first or last voxel takes that voxel's value
        coord = np.clip(step * (np.arange(n_out) + 0.5) - 0.5, 0.0, n_in - 1)
        lo = np.minimum(np.floor(coord).astype(np.intp), max(n_in - 2, 0))
        hi = np.minimum(lo + 1, n_in - 1)
        shape = [1] * out.ndim
        shape[axis] = n_out
        weight = (coord - lo).astype(np.float32).reshape(shape)
        below = np.take(out, lo, axis=axis)
        above = np.take(out, hi, axis=axis)
        above -= below
        above *= weight
        below += above
        out = below
    return out if out is not a else a.copy()


def _bbox(mask: np.ndarray) -> tuple:
    """The `(start, stop)` voxel range per axis of a non-empty mask's bounding box."""
    return tuple((s.start, s.stop) for s in bounding_box(mask))


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a sample (scikit-image's, over a `bins`-bin histogram of its range)."""
    from skimage.filters import threshold_otsu

    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return lo  # scikit-image would warn and return the value; say it without the warning
    return float(threshold_otsu(np.asarray(values), nbins=bins))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """`scipy.ndimage.binary_fill_holes(mask)` (its default face connectivity), the same voxels,
    from one labelling of the background: a background component that touches no face of the
    array is a hole. scipy grows the outside in from the array's faces one voxel per pass: on a
    1 mm head's mask 0.25 s against 0.11 s here, on the tumour sample's 25 x 256 x 256 32
    against 17 ms."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 0 or mask.size == 0:
        return mask.copy()
    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask.copy()
    outside = np.zeros(n + 1, dtype=bool)
    for axis in range(mask.ndim):
        for index in (0, -1):
            outside[np.take(labels, index, axis=axis)] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[labels]


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Hole filling in N-D, then per axial slice (holes open at the volume's top or bottom)."""
    filled = fill_holes(mask)
    if filled.ndim == 3:
        for z in range(filled.shape[0]):
            if filled[z].any():
                filled[z] = fill_holes(filled[z])
    return filled


# --------------------------------------------------------------------------------------------
# Foreground
# --------------------------------------------------------------------------------------------
def looks_skull_stripped(array: np.ndarray) -> bool:
    """True when at least `STRIPPED_BACKGROUND_FRACTION` of the voxels hold exactly the
    minimum value: a background set to one value by skull-stripping (or masking)."""
    array = np.asarray(array)
    return bool(np.mean(array == array.min()) >= STRIPPED_BACKGROUND_FRACTION)


def foreground_mask(scan, kind: str = "auto", method: str = "auto") -> np.ndarray:
    """The anatomy to z-score over and to place anomalies on: bool, `scan.array`'s shape.

    Parameters
    ----------
    scan : Scan
    kind : {"auto", "mri", "cxr"}
    method : {"auto", "nonzero", "head", "all"}
        How the foreground is found:

    "nonzero" (skull-stripped data): `binary_fill_holes(array != background)`, where the
        background is the array's minimum value (0 for skull-stripped MRI), as in the paper.
    "head" (unstripped scans): Otsu's threshold, the largest connected component, one binary
        closing to bridge thin gaps, then hole filling in 3D and per axial slice (dark bone,
        CSF and air spaces inside the head are included).
    "all": every voxel (X-rays: the paper placed anomalies anywhere in the frame).
    "auto": "all" for X-rays (`kind` "cxr", or "auto" resolved by `infer_kind`); otherwise
        "nonzero" when at least 25% of the voxels hold exactly the minimum value (a background
        set to one value by skull-stripping), else "head".

    Returns
    -------
    ndarray of bool, `scan.array`'s shape

    Raises
    ------
    ValueError
        NaN/inf values, or an unknown `method` or `kind`.

    Examples
    --------
    >>> import numpy as np
    >>> from napari_mtml.io import Scan
    >>> zz, yy, xx = np.mgrid[:96, :120, :100]
    >>> head = ((zz - 48) / 40) ** 2 + ((yy - 60) / 50) ** 2 + ((xx - 50) / 42) ** 2 < 1
    >>> volume = np.where(head, np.random.default_rng(0).normal(100, 5, head.shape), 0)
    >>> scan = Scan(array=volume.astype(np.float32), spacing=(1.0, 1.0, 1.0))
    >>> fg = foreground_mask(scan)  # a skull-stripped-like volume: "nonzero"
    >>> fg.shape, bool(np.array_equal(fg, head))
    ((96, 120, 100), True)
    """
    scan = _as_scan(scan)
    arr = scan.array
    _check_finite(arr, _name(scan))
    if kind == "auto":
        kind = infer_kind(scan)
    if kind not in ("mri", "cxr"):
        raise ValueError(f"kind must be 'mri', 'cxr' or 'auto'; got {kind!r}.")
    if method == "auto":
        if kind == "cxr":
            method = "all"
        else:
            method = "nonzero" if looks_skull_stripped(arr) else "head"
    if method == "all":
        return np.ones(arr.shape, dtype=bool)
    if method == "nonzero":
        inside = arr != arr.min()
        if not inside.any():
            return inside
        box = tuple(slice(a, b) for a, b in _bbox(inside))
        out = np.zeros(arr.shape, dtype=bool)
        out[box] = fill_holes(inside[box])
        return out
    if method != "head":
        raise ValueError(f"method must be 'auto', 'nonzero', 'head' or 'all'; got {method!r}.")
    if arr.min() == arr.max():
        return np.zeros(arr.shape, dtype=bool)
    # Otsu on a subsample: the threshold needs the histogram's shape, not every voxel.
    step = max(1, int(round((arr.size / 2_000_000) ** (1 / arr.ndim))))
    thr = _otsu(arr[(slice(None, None, step),) * arr.ndim].ravel())
    above = arr > thr
    labels, n = ndimage.label(above)
    if n == 0:
        return np.zeros(arr.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = labels == int(np.argmax(sizes))
    box = _bbox(largest)
    # Work on the bounding box plus a margin so that the closing can reach past the edge.
    pad = 2
    sl = tuple(
        slice(max(0, a - pad), min(s, b + pad)) for (a, b), s in zip(box, arr.shape, strict=True)
    )
    sub = ndimage.binary_closing(largest[sl], iterations=1)
    sub = _fill_holes(sub | largest[sl])
    out = np.zeros(arr.shape, dtype=bool)
    out[sl] = sub
    return out


# --------------------------------------------------------------------------------------------
# Into the frame
# --------------------------------------------------------------------------------------------
def _plain_frame(frame, n: int, default: tuple) -> tuple:
    if frame is None:
        return default
    try:
        out = tuple(int(f) for f in frame)
    except TypeError:
        raise ValueError(f"frame must be a tuple of {n} positive ints; got {frame!r}.") from None
    if (
        len(out) != n
        or any(f <= 0 for f in out)
        or any(float(f) != float(g) for f, g in zip(out, frame, strict=True))
    ):
        raise ValueError(f"frame must be a tuple of {n} positive ints; got {frame!r}.")
    return out


def _plain_factors(downsample, n: int) -> tuple:
    values = np.atleast_1d(np.asarray(downsample, dtype=float))
    if values.size == 1:
        values = np.repeat(values, n)
    if values.size != n or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(
            f"downsample must be a positive number or a tuple of {n}; got {downsample!r}."
        )
    return tuple(float(v) for v in values)


class FrameFitError(ValueError):
    """The image's content does not fit the frame (the message names the frame that would)."""


def _fit_error(
    content: tuple, frame: tuple, factors: tuple, crop_shape: tuple, what: str, multiple: int
) -> ValueError:
    need = tuple(int(math.ceil(c / multiple) * multiple) for c in content)
    fit = tuple(max(f, n) for f, n in zip(frame, need, strict=True))
    ds = max(math.ceil(max(c / f for c, f in zip(crop_shape, frame, strict=True))), 1)
    return FrameFitError(
        f"{what}: the foreground crop {crop_shape} downsampled by {factors} is {content} voxels, "
        f"larger than the frame {frame}. A frame of {fit} would fit (frame={fit}), or "
        f"downsample={ds} keeps this frame."
    )


def to_model_units(
    array: np.ndarray, foreground: np.ndarray | None
) -> tuple[np.ndarray, float, float]:
    """Affine intensity map into the units the task parameters are defined in.

    Volumes (3D): z-score over the foreground (METHOD.md §7, brain); 2D images: [min, max] ->
    [-1, 1] (§7, X-ray). Unlike `to_frame` it keeps the image's grid and never raises: a
    constant image gets scale 1.

    Parameters
    ----------
    array : ndarray, 2D or 3D
    foreground : ndarray of bool, or None (the whole image)

    Returns
    -------
    array : ndarray of float32
    offset, scale : float
        `array * scale + offset` gives back the input (a preview is shown in the layer's own
        units).

    Examples
    --------
    >>> import numpy as np
    >>> units, offset, scale = to_model_units(np.array([[0.0, 50.0], [100.0, 100.0]]), None)
    >>> units.tolist(), offset, scale
    ([[-1.0, 0.0], [1.0, 1.0]], 50.0, 50.0)
    """
    if array.ndim == 3:
        inside = array[foreground] if foreground is not None and foreground.any() else array
        offset, scale = float(inside.mean()), float(inside.std())
    else:
        lo, hi = float(array.min()), float(array.max())
        offset, scale = (hi + lo) / 2.0, (hi - lo) / 2.0
    scale = scale if scale > 0 else 1.0
    return ((array - offset) / scale).astype(np.float32), offset, scale


def to_frame(
    scan,
    kind: str = "auto",
    dims: int | None = None,
    frame=None,
    downsample=2,
    foreground=None,
    spacing: float | None = None,
    multiple: int = 16,
    bias_correction: str = "none",
    *,
    workers: int = 1,
):
    """Bring a scan into the model's frame (see the module docstring for both pipelines).

    Parameters
    ----------
    scan : Scan (or a 2D/3D array, taken as 1 mm, modality unknown).
    kind : "mri", "cxr" or "auto" (`infer_kind`: 2D CR/DX/XR/MG or plain 2D files -> "cxr").
    dims : None (the scan's own), 3, or 2. `dims=2` on a 3D scan cuts it into axial slices that
        share one in-plane crop (the foreground's bounding box over all slices) and one z-score.
    frame : frame shape of one image; default MRI 3D (80, 112, 80), MRI 2D (128, 128),
        CXR (256, 256). MRI also takes "fit": the smallest frame holding the content whose
        sizes are multiples of `multiple` (see `fit_frame`); CXR then uses its default.
    downsample : MRI: input voxels per frame voxel (a number, or one per frame axis); CXR: the
        intermediate resize is `frame * downsample` (2 -> 512x512, as in the paper).
    foreground : optional bool array of `scan.array`'s shape; default `foreground_mask(scan)`.
    spacing : MRI: target voxel size in mm of the frame (in-plane for `dims=2` on a volume);
        replaces `downsample` (the factor per axis becomes `spacing / scan.spacing`, so scans of
        any voxel size arrive at one physical scale). Ignored for CXR.
    multiple : the size multiple of a fitted frame (a U-Net of depth d needs 2**(d-1)).
    bias_correction : MRI: "poly" divides the scan by its bias field estimated inside the
        foreground (`napari_mtml.bias.correct_bias`) before the z-score; "auto" does so for
        skull-stripped scans only (`looks_skull_stripped`: with the skull on, the fit takes
        skull and scalp for a field); "none" (default). Ignored for CXR.
    workers : MRI: threads that resample the image and its foreground side by side
        (`napari_mtml.parallel.map_threads`; the same arrays with any number).

    Returns
    -------
    array : float32, the frame's shape (`(Z, *frame)` when stacked); MRI in z-score units with
        0 outside the foreground, CXR in [-1, 1].
    foreground : bool, same shape as `array`.
    transform : FrameTransform for `from_frame`.

    Raises
    ------
    ValueError
        NaN/inf values, an empty foreground, a constant foreground, content that does not fit
        the frame (the message gives a frame that fits), bad arguments.

    Examples
    --------
    >>> import numpy as np
    >>> from napari_mtml.io import Scan
    >>> brain = np.random.default_rng(0).normal(100, 5, (60, 80, 70)).astype(np.float32)
    >>> scan = Scan(array=np.pad(brain, 20), spacing=(1.0, 1.0, 1.0))  # 0 around the brain
    >>> array, foreground, transform = to_frame(scan, kind="mri")  # 3D: (80, 112, 80), x2
    >>> array.shape, foreground.dtype, transform.frame_array_shape
    ((80, 112, 80), dtype('bool'), (80, 112, 80))
    >>> slices, _, _ = to_frame(scan, kind="mri", dims=2)  # every axial slice in the 2D frame
    >>> slices.shape
    (100, 128, 128)
    """
    scan = _as_scan(scan)
    name = _name(scan)
    _check_finite(scan.array, name)
    if kind == "auto":
        kind = infer_kind(scan)
    if kind not in ("mri", "cxr"):
        raise ValueError(f"kind must be 'mri', 'cxr' or 'auto'; got {kind!r}.")
    if bias_correction not in BIAS_CORRECTIONS:
        raise ValueError(
            f"bias_correction must be one of {', '.join(BIAS_CORRECTIONS)}; "
            f"got {bias_correction!r}."
        )
    if dims is None:
        dims = scan.ndim
    if dims not in (2, 3):
        raise ValueError(f"dims must be None, 2 or 3; got {dims!r}.")
    if dims > scan.ndim:
        raise ValueError(f"{name} is {scan.ndim}D; dims={dims} needs a 3D volume.")
    if foreground is not None:
        foreground = np.asarray(foreground, dtype=bool)
        if foreground.shape != scan.array.shape:
            raise ValueError(
                f"foreground has shape {foreground.shape} but {name} has {scan.array.shape}."
            )
    if kind == "cxr":
        if scan.ndim != 2:
            raise ValueError(
                f"{name} is a 3D volume; the X-ray pipeline (kind='cxr') needs a 2D image."
            )
        return _cxr_to_frame(
            scan,
            _plain_frame(None if isinstance(frame, str) else frame, 2, CXR_FRAME),
            _plain_factors(downsample, 2),
            name,
        )
    stacked = scan.ndim == 3 and dims == 2
    factors = mri_factors(scan, dims, downsample=downsample, spacing=spacing)
    if isinstance(frame, str):
        if frame != "fit":
            raise ValueError(f"frame must be a tuple of {dims} ints or 'fit'; got {frame!r}.")
        fg = foreground_mask(scan, kind="mri") if foreground is None else foreground
        _check_foreground(fg, name)
        foreground = fg
        frame = fit_frame(_content(fg, factors, stacked), multiple)
    frame = _plain_frame(frame, dims, MRI_FRAME_2D if dims == 2 else MRI_FRAME_3D)
    return _mri_to_frame(
        scan, frame, factors, stacked, foreground, name, bias_correction, int(workers)
    )


def mri_factors(
    scan, dims: int | None = None, downsample=2, spacing: float | None = None
) -> tuple[float, ...]:
    """Input voxels per frame voxel along the frame's axes (the last `dims` axes of the scan).

    Parameters
    ----------
    scan : Scan
    dims : {None, 2, 3}
        None: the scan's own.
    downsample : float or sequence of float
        Used without `spacing`: a number, or one per axis.
    spacing : float, optional
        The frame's voxel size in mm: `spacing / scan.spacing` per axis (below 1 upsamples,
        e.g. thick slices in 3D).

    Returns
    -------
    tuple of float
    """
    scan = _as_scan(scan)
    dims = scan.ndim if dims is None else int(dims)
    if spacing is None:
        return _plain_factors(downsample, dims)
    try:
        target = float(spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be a positive number of mm; got {spacing!r}.") from None
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"spacing must be a positive number of mm; got {spacing!r}.")
    return tuple(target / float(s) for s in scan.spacing[-dims:])


def fit_frame(content, multiple: int = 16) -> tuple[int, ...]:
    """The smallest frame holding `content` (voxels per axis) whose sizes are multiples of
    `multiple` (at least one multiple per axis).

    Parameters
    ----------
    content : sequence of int
    multiple : int
        E.g. 16 for a U-Net of depth 5.

    Returns
    -------
    tuple of int

    Examples
    --------
    >>> fit_frame((70, 97, 81), 16)
    (80, 112, 96)
    """
    m = int(multiple)
    if m < 1:
        raise ValueError(f"multiple must be a positive integer; got {multiple!r}.")
    return tuple(max(m, int(math.ceil(int(c) / m) * m)) for c in content)


def content_shape(
    scan,
    kind: str = "auto",
    dims: int | None = None,
    downsample=2,
    spacing: float | None = None,
    foreground=None,
) -> tuple[int, ...]:
    """Voxels per frame axis that an MRI scan's foreground crop takes after resampling: what a
    frame must hold (`fit_frame(content_shape(...), multiple)` is the frame `"fit"` gives).
    X-rays fill their fixed frame: their default frame is returned.

    Parameters
    ----------
    scan : Scan
    kind, dims, downsample, spacing, foreground
        As `to_frame`.

    Returns
    -------
    tuple of int
    """
    scan = _as_scan(scan)
    if kind == "auto":
        kind = infer_kind(scan)
    if kind == "cxr":
        return CXR_FRAME
    dims = scan.ndim if dims is None else int(dims)
    fg = (
        foreground_mask(scan, kind="mri")
        if foreground is None
        else np.asarray(foreground, dtype=bool)
    )
    _check_foreground(fg, _name(scan))
    stacked = scan.ndim == 3 and dims == 2
    return _content(fg, mri_factors(scan, dims, downsample, spacing), stacked)


def _check_foreground(fg: np.ndarray, name: str) -> None:
    if not fg.any():
        raise ValueError(
            f"{name}: the foreground is empty (the image is blank or constant); nothing to "
            "z-score or to place anomalies on. Check the file or pass a foreground mask."
        )


def _content(fg: np.ndarray, factors, stacked: bool) -> tuple[int, ...]:
    box = _bbox(fg)
    if stacked:
        box = box[1:]
    return tuple(int(math.ceil((b - a) / s)) for (a, b), s in zip(box, factors, strict=True))


def _mri_to_frame(
    scan: Scan, frame, factors, stacked, foreground, name, bias_correction="none", workers=1
):
    arr = scan.array
    fg = foreground_mask(scan, kind="mri") if foreground is None else foreground
    _check_foreground(fg, name)
    # "auto": with the skull on, the fit takes the partial volume of skull, scalp and cortex
    # for a field (a dome of up to 2.7x in 5-6 mm slices); a linear field avoids the dome but
    # lowered the maps' AP (benchmarks/quality_unseen.py, README), so such scans stay as read
    if bias_correction == "poly" or (bias_correction == "auto" and looks_skull_stripped(arr)):
        arr = correct_bias(arr, fg, scan.spacing)
    values = arr[fg].astype(np.float64)
    mean, std = float(values.mean()), float(values.std())
    if not std > 0:
        raise ValueError(
            f"{name}: the image is constant inside its foreground ({mean:g}); a z-score is "
            "undefined. Check the file."
        )
    box = list(_bbox(fg))
    if stacked:
        box[0] = (0, arr.shape[0])  # every slice is kept, so that maps return to (Z, Y, X)
        scale = (1.0, *factors)
    else:
        scale = tuple(factors)
    crop = tuple(box)
    sl = tuple(slice(a, b) for a, b in crop)
    crop_shape = tuple(b - a for a, b in crop)
    scaled = tuple(int(math.ceil(n / s)) for n, s in zip(crop_shape, scale, strict=True))
    content = scaled[1:] if stacked else scaled
    if any(c > f for c, f in zip(content, frame, strict=True)):
        raise _fit_error(
            content,
            frame,
            tuple(factors),
            crop_shape[1:] if stacked else crop_shape,
            name,
            64 if len(frame) == 2 else 16,
        )
    z = np.where(fg[sl], (arr[sl] - np.float32(mean)) / np.float32(std), np.float32(0.0))
    # the image and its foreground side by side (scipy's filters and resampling release the GIL)
    small, small_fg = map_threads(
        lambda a: _resample(a, scale, scaled, order=1, anti_alias=True),
        [z, fg[sl].astype(np.float32)],
        workers,
    )
    small_fg = small_fg >= 0.5
    small[~small_fg] = 0.0
    offset = tuple((f - c) // 2 for f, c in zip(frame, content, strict=True))
    if stacked:
        offset = (0, *offset)
    out_shape = (arr.shape[0], *frame) if stacked else tuple(frame)
    out = np.zeros(out_shape, dtype=np.float32)
    out_fg = np.zeros(out_shape, dtype=bool)
    place = tuple(slice(o, o + s) for o, s in zip(offset, scaled, strict=True))
    out[place] = small
    out_fg[place] = small_fg
    transform = FrameTransform(
        kind="mri",
        scan_shape=tuple(arr.shape),
        frame=tuple(frame),
        stacked=stacked,
        crop=crop,
        scale=tuple(float(s) for s in scale),
        scaled_shape=scaled,
        offset=offset,
        mean=mean,
        std=std,
        window=None,
    )
    return out, out_fg, transform


def _equalise(x: np.ndarray, lo: float, hi: float, bins: int = 256) -> np.ndarray:
    """Histogram equalisation to [0, 1] (scikit-image's `equalize_hist`), float32.

    `x` is already clipped to the window `[lo, hi]`; the histogram spans the values `x` takes.
    """
    from skimage.exposure import equalize_hist

    return np.asarray(equalize_hist(x, nbins=bins), dtype=np.float32)


def _cxr_to_frame(scan: Scan, frame, factors, name):
    arr = scan.array
    mid = tuple(int(round(f * d)) for f, d in zip(frame, factors, strict=True))
    x = _resample(
        arr, [n / m for n, m in zip(arr.shape, mid, strict=True)], mid, order=3, anti_alias=True
    )
    window = scan.metadata.get("window")
    if window is not None:
        c, w = float(window[0]), float(window[1])
        lo, hi = c - w / 2, c + w / 2
    else:
        lo, hi = float(arr.min()), float(arr.max())
    x = np.clip(x, lo, hi)
    if not hi > lo or float(x.max()) == float(x.min()):
        raise ValueError(
            f"{name}: the X-ray is constant inside its window [{lo:g}, {hi:g}]; there is "
            "nothing to equalise. Check the file (or its WindowCenter/WindowWidth)."
        )
    eq = _equalise(x, lo, hi)
    if str(scan.metadata.get("photometric", "")).upper() == "MONOCHROME1" and not scan.metadata.get(
        "inverted", False
    ):
        eq = 1.0 - eq  # a raw MONOCHROME1 array: bright would mean air otherwise
    mn, mx = float(eq.min()), float(eq.max())
    eq = (2.0 * (eq - mn) / (mx - mn) - 1.0).astype(np.float32)
    out = _resample(
        eq, [m / f for m, f in zip(mid, frame, strict=True)], frame, order=1, anti_alias=True
    )
    np.clip(out, -1.0, 1.0, out=out)
    scale = tuple(n / f for n, f in zip(arr.shape, frame, strict=True))
    transform = FrameTransform(
        kind="cxr",
        scan_shape=tuple(arr.shape),
        frame=tuple(frame),
        stacked=False,
        crop=tuple((0, n) for n in arr.shape),
        scale=scale,
        scaled_shape=tuple(frame),
        offset=(0, 0),
        window=None if window is None else (lo + (hi - lo) / 2, hi - lo),
    )
    return out, np.ones(frame, dtype=bool), transform


def mask_to_frame(mask, transform: FrameTransform) -> np.ndarray:
    """A bool mask on the scan's grid (e.g. a brain mask) taken into the frame by the same
    crop, resampling (linear, kept where >= 0.5) and padding as the scan.

    Parameters
    ----------
    mask : array of bool, `transform.scan_shape`
    transform : FrameTransform
        What `to_frame` returned for the scan.

    Returns
    -------
    ndarray of bool, `transform.frame_array_shape`

    Examples
    --------
    >>> import numpy as np
    >>> from napari_mtml.io import Scan
    >>> inside = np.zeros((100, 120, 100), bool)
    >>> inside[20:80, 20:100, 15:85] = True
    >>> values = np.random.default_rng(2).normal(80, 3, inside.shape)
    >>> scan = Scan(array=np.where(inside, values, 0).astype(np.float32), spacing=(1.0,) * 3)
    >>> transform = to_frame(scan, kind="mri", foreground=inside)[2]
    >>> inner = mask_to_frame(inside & (np.arange(100) > 50)[:, None, None], transform)
    >>> inner.shape, bool(inner.any())
    ((80, 112, 80), True)
    """
    if not isinstance(transform, FrameTransform):
        raise ValueError("transform must be the FrameTransform returned by to_frame.")
    m = np.asarray(mask, dtype=bool)
    if m.shape != tuple(transform.scan_shape):
        raise ValueError(
            f"the mask has shape {m.shape}; the scan has {tuple(transform.scan_shape)}."
        )
    crop = m[tuple(slice(a, b) for a, b in transform.crop)].astype(np.float32)
    small = (
        _resample(crop, transform.scale, transform.scaled_shape, order=1, anti_alias=True) >= 0.5
    )
    out = np.zeros(transform.frame_array_shape, dtype=bool)
    out[
        tuple(
            slice(o, o + s) for o, s in zip(transform.offset, transform.scaled_shape, strict=True)
        )
    ] = small
    return out


# --------------------------------------------------------------------------------------------
# Out of the frame
# --------------------------------------------------------------------------------------------
def from_frame(map_in_frame, transform: FrameTransform, fill: float = 0.0) -> np.ndarray:
    """A map in the frame (e.g. a heatmap) back on the scan's grid, float32 `transform.scan_shape`.

    The content region is un-padded, upsampled linearly on the same pixel-centre grid that
    `to_frame` downsampled on, and put back at the crop; voxels outside the crop get `fill`.

    Parameters
    ----------
    map_in_frame : array, `transform.frame_array_shape`
    transform : FrameTransform
        The scan's, from `to_frame`.
    fill : float
        The value outside the crop.

    Returns
    -------
    ndarray of float32, `transform.scan_shape`
        The map on the scan's grid, `fill` outside the crop.

    Examples
    --------
    >>> import numpy as np
    >>> from napari_mtml.io import Scan
    >>> volume = np.pad(np.random.default_rng(1).normal(50, 4, (64, 90, 72)), 16)
    >>> scan = Scan(array=volume.astype(np.float32), spacing=(1.0, 1.0, 1.0))
    >>> _, foreground, transform = to_frame(scan, kind="mri")
    >>> heat = from_frame(np.where(foreground, 0.5, 0.0), transform)  # a map back on the scan
    >>> heat.shape, heat.dtype
    ((96, 122, 104), dtype('float32'))
    """
    if not isinstance(transform, FrameTransform):
        raise ValueError("transform must be the FrameTransform returned by to_frame.")
    m = np.asarray(map_in_frame, dtype=np.float32)
    expected = transform.frame_array_shape
    if m.shape != expected:
        raise ValueError(f"the map has shape {m.shape}; this transform's frame is {expected}.")
    _check_finite(m, "the map")
    place = tuple(
        slice(o, o + s) for o, s in zip(transform.offset, transform.scaled_shape, strict=True)
    )
    content = m[place]
    crop_shape = tuple(b - a for a, b in transform.crop)
    inverse = [1.0 / s for s in transform.scale]
    # (scipy's order 1 on the way in: a mask thresholded at 0.5 after it keeps its ties)
    up = _linear_resample(content, inverse, crop_shape)
    out = np.full(transform.scan_shape, fill, dtype=np.float32)
    out[tuple(slice(a, b) for a, b in transform.crop)] = up
    return out
