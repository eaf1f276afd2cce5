"""Healthy-image collections, fold assignment and the on-the-fly synthetic anomaly dataset.

Flow: files/folders -> `expand_paths` (sorted) -> `read_image` -> `to_frame` -> a
`HealthyCollection` of framed float32 arrays held in memory -> data folds (`assign_folds`) ->
`SyntheticDataset` (training items, fresh anomalies every time) and `make_validation_set` (drawn
once from a fixed seed).

Seeding. A training item is a pure function of (base seed, rank, epoch, index): its generator is
`numpy.random.Generator(PCG64(SeedSequence([seed, rank, epoch, index])))`. Which healthy image it
starts from is fixed by a per-epoch permutation (seeded by `(seed, epoch)`), of which rank r of W
takes every W-th entry (as `DistributedSampler` does). So the items do not depend on the number
of DataLoader workers nor on which worker builds them, no two workers or ranks repeat anomalies,
and a resumed run reproduces the exact batches of an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_mtml.config import SAMPLINGS
from napari_mtml.io import IMAGE_SUFFIXES, image_files

__all__ = [
    "IMAGE_SUFFIXES",
    "MIN_PLACEABLE_SHARE",
    "placeable_share",
    "takes_smallest_anomaly",
    "HealthySample",
    "HealthyCollection",
    "expand_paths",
    "assign_folds",
    "SyntheticDataset",
    "StepBatchSampler",
    "ValidationSet",
    "make_validation_set",
]

N_DATA_FOLDS = 5
_PERM_KEY = 0x5EED  # separates the per-epoch permutation streams from the per-item streams
_BIAS_KEY = 0xB1A5  # the per-item bias-field streams (`SyntheticDataset.bias_augment`)
_VAL_KEY = 0x7A1  # separates the validation stream


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files and folders of healthy scans -> a sorted list of readable items.

    A folder is searched recursively for NIfTI, DICOM and 2D image files. A folder whose DICOM
    files form one series (several files, one SeriesInstanceUID) is one item (a volume); other
    DICOM files are one item each (e.g. radiographs). The result is sorted by path, so the fold
    assignment does not depend on the file system's order.

    Parameters
    ----------
    paths : sequence of str or Path
        Files and folders.

    Returns
    -------
    list of Path
        Files, and folders that are one DICOM series.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    items: set[Path] = set()
    for p in paths:
        p = Path(p)
        if p.is_file():
            items.add(p)
        elif p.is_dir():
            found = _expand_folder(p)
            if not found:
                raise ValueError(
                    f"{p}: folder holds no NIfTI, DICOM or image files "
                    f"({', '.join(IMAGE_SUFFIXES)}); point at the healthy scans"
                )
            items.update(found)
        else:
            raise ValueError(f"{p}: no such file or folder; check the healthy-scan paths")
    if not items:
        raise ValueError("no healthy files given: pass at least five healthy scans or folders")
    return sorted(items, key=lambda q: str(q))


def _expand_folder(folder: Path) -> list[Path]:
    out: list[Path] = []
    dicoms: dict[Path, list[Path]] = {}
    for f in image_files(folder, recursive=True):
        if f.name.lower().endswith(".dcm"):
            dicoms.setdefault(f.parent, []).append(f)
        else:
            out.append(f)
    for parent, files in dicoms.items():
        if len(files) > 1 and _one_series(files):
            out.append(parent)
        else:
            out.extend(files)
    return out


def _one_series(files: list[Path]) -> bool:
    try:
        import pydicom
    except ImportError:  # pragma: no cover - pydicom is a dependency
        return False
    uids = set()
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except Exception:
            return False
        uids.add(str(getattr(ds, "SeriesInstanceUID", f)))
        if len(uids) > 1:
            return False
    return True


def assign_folds(
    n_items: int, groups: Sequence[int] | None = None, n_folds: int = N_DATA_FOLDS
) -> np.ndarray:
    """Data fold (0..n_folds-1) of each item: a contiguous split of the sorted item list.

    With at least `n_folds` groups, whole groups are split (slices of one volume never straddle
    folds, so train and validation data share no volume); with fewer groups the items
    themselves are split.

    Parameters
    ----------
    n_items : int
        Number of items (in sorted order).
    groups : sequence of int, (n_items,), optional
        Non-decreasing group id per item (e.g. the volume a 2D slice comes from).
    n_folds : int

    Returns
    -------
    ndarray of int64, (n_items,)
        Fold sizes differ by at most one unit (item or group).

    Examples
    --------
    >>> assign_folds(7).tolist()
    [0, 0, 1, 2, 2, 3, 4]
    """
    if n_items < n_folds:
        raise ValueError(
            f"{n_items} healthy item(s) is too few: the {n_folds} data folds need at "
            f"least {n_folds}; add more healthy scans (or use --dims 2 with volumes)"
        )
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (n_items,):
            raise ValueError(f"groups must have one entry per item ({n_items}), got {groups.shape}")
        uniq, inverse = np.unique(groups, return_inverse=True)
        if len(uniq) >= n_folds:
            return (np.arange(len(uniq)) * n_folds // len(uniq))[inverse].astype(np.int64)
    return (np.arange(n_items) * n_folds // n_items).astype(np.int64)


@dataclass
class HealthySample:
    """One healthy training item in the model's frame.

    image: float32 `(*frame)`; foreground: bool `(*frame)` or None (= everywhere, X-rays);
    name: the file name (with `[z=K]` for a slice of a volume); group: index of the file;
    zero: MRI, the z-value of intensity 0 in the scan (`-mean / std` of its z-score), around which
    a multiplicative bias field scales the image (`bias.apply_bias_field`); None when unknown
    (X-rays, `HealthyCollection.from_arrays`).
    """

    image: np.ndarray
    foreground: np.ndarray | None
    name: str
    group: int
    zero: float | None = None


class HealthyCollection:
    """Healthy images, framed and held in memory, in sorted order, with their data folds.

    Build with `from_paths` (files) or `from_arrays` (arrays already in a common frame, e.g. from
    napari layers or tests). Images whose foreground cannot take the smallest synthetic anomaly
    (`takes_smallest_anomaly`) are dropped here, before any training, with one entry in `notes`
    naming them: no image a fold may draw can then fail the anomaly placement in the middle of a
    run. Attributes: `samples` (list of `HealthySample`), `dims` (2 or 3),
    `kind` ("mri" or "cxr"), `frame` (tuple), `from_slices` (2D items cut from volumes),
    `folds` (int64 `(len(samples),)` data fold per sample, see `assign_folds`).
    """

    def __init__(
        self,
        samples: list[HealthySample],
        dims: int,
        kind: str,
        from_slices: bool = False,
        notes: Sequence[str] = (),
    ):
        if not samples:
            raise ValueError("no healthy images: pass at least five healthy scans")
        frame = samples[0].image.shape
        for s in samples:
            if s.image.shape != frame:
                raise ValueError(
                    f"{s.name}: framed shape {s.image.shape} differs from "
                    f"{frame} of {samples[0].name}; use one frame for all images"
                )
            if s.foreground is not None and s.foreground.shape != frame:
                raise ValueError(
                    f"{s.name}: foreground shape {s.foreground.shape} differs "
                    f"from its image's {frame}"
                )
        notes = list(notes)
        samples, unusable = _drop_unplaceable(samples)
        if unusable:
            notes.append(unplaceable_notice(unusable))
            if len(samples) < N_DATA_FOLDS:
                raise ValueError(
                    f"only {len(samples)} healthy image(s) left, the {N_DATA_FOLDS} "
                    f"data folds need at least {N_DATA_FOLDS}: "
                    f"{unplaceable_notice(unusable)}; add more healthy scans"
                )
        self.samples = samples
        self.dims = int(dims)
        self.kind = kind
        self.frame = tuple(int(v) for v in frame)
        self.from_slices = from_slices
        self.notes = notes
        groups = [s.group for s in samples]
        self.folds = assign_folds(len(samples), groups if from_slices else None)
        self.split_by = (
            "volume"
            if from_slices and len(set(groups)) >= N_DATA_FOLDS
            else ("slice" if from_slices else "file")
        )

    def __len__(self) -> int:
        return len(self.samples)

    def indices(self, data_folds: Sequence[int]) -> list[int]:
        """Sample indices whose data fold is in `data_folds` (sorted)."""
        return [i for i, f in enumerate(self.folds) if int(f) in set(data_folds)]

    def subset(self, data_folds: Sequence[int]) -> list[HealthySample]:
        return [self.samples[i] for i in self.indices(data_folds)]

    def names(self, data_folds: Sequence[int] | None = None) -> list[str]:
        idx = range(len(self)) if data_folds is None else self.indices(data_folds)
        return [self.samples[i].name for i in idx]

    @classmethod
    def from_arrays(
        cls,
        images: Sequence[np.ndarray] | np.ndarray,
        foregrounds: Sequence[np.ndarray | None] | None = None,
        names: Sequence[str] | None = None,
        kind: str = "mri",
        groups: Sequence[int] | None = None,
    ) -> HealthyCollection:
        """A collection of images already in one frame (float32 copies: inputs are never
        mutated).

        Parameters
        ----------
        images : ndarray (N, *frame) or a sequence of equal-shape arrays, 2D or 3D
        foregrounds : sequence of bool arrays (or None each), optional
        names : sequence of str, optional
        kind : {"mri", "cxr"}
        groups : sequence of int, optional
            The volume of each item when they are slices (contiguous split by group, see
            `assign_folds`).

        Returns
        -------
        HealthyCollection

        Examples
        --------
        >>> import numpy as np
        >>> images = np.random.default_rng(0).normal(size=(10, 32, 32)).astype(np.float32)
        >>> collection = HealthyCollection.from_arrays(images)
        >>> len(collection.samples), collection.dims, collection.frame
        (10, 2, (32, 32))"""
        images = list(images)
        if not images:
            raise ValueError("no healthy images given")
        if foregrounds is None:
            foregrounds = [None] * len(images)
        if names is None:
            names = [f"image_{i:04d}" for i in range(len(images))]
        if len(foregrounds) != len(images) or len(names) != len(images):
            raise ValueError("give one foreground and one name per image")
        samples = []
        for i, (im, fg, name) in enumerate(zip(images, foregrounds, names, strict=True)):
            im = np.array(im, dtype=np.float32, copy=True)
            if im.ndim not in (2, 3):
                raise ValueError(f"{name}: image has {im.ndim} dimensions; use 2D or 3D arrays")
            if not np.isfinite(im).all():
                raise ValueError(f"{name}: image holds NaN or infinite values; clean it first")
            fg = None if fg is None else np.array(fg, dtype=bool, copy=True)
            samples.append(
                HealthySample(im, fg, str(name), int(groups[i]) if groups is not None else i)
            )
        dims = {s.image.ndim for s in samples}
        if len(dims) > 1:
            raise ValueError("healthy images mix 2D and 3D arrays; use one kind")
        return cls(samples, dims.pop(), kind, from_slices=groups is not None)

    @classmethod
    def from_paths(
        cls,
        paths: Sequence[str | Path] | str | Path,
        dims: int | None = None,
        kind: str = "auto",
        frame: Sequence[int] | str | None = None,
        downsample: float = 2,
        min_foreground: float = 0.05,
        spacing: float | None = None,
        multiple: int | dict[int, int] = 16,
        brain_mask: str | Path | None = None,
        bias_correction: str = "none",
    ) -> HealthyCollection:
        """Read healthy scans from files/folders and bring each into the model's frame.

        Parameters
        ----------
        paths : str, Path or a sequence of them
            Files and folders (`expand_paths`).
        dims : {None, 2, 3}
            None: the scans' own; 2: 3D volumes become their axial slices (slices whose
            foreground covers less than `min_foreground` of the slice are dropped).
        kind, frame, downsample, spacing
            As `napari_mtml.preprocess.to_frame`; `frame="fit"` fits one frame to every
            scan's content (sizes multiples of `multiple`, or of `multiple[dims]`).
        min_foreground : float
        multiple : int or dict of int
        brain_mask : {None, "auto"} or a folder
            "auto": anomalies are placed inside an automatic brain mask of each volume
            (`napari_mtml.brainmask`; heads with the skull on), the image keeps its head; a
            folder: the masks of the same NAME there (`batch.mask_dir_lookup`); 2D images keep
            their foreground.
        bias_correction : {"none", "auto", "poly"}
            MRI: divide each scan by its estimated bias field first (`to_frame`; "auto":
            skull-stripped scans only).

        Returns
        -------
        HealthyCollection

        Raises
        ------
        ValueError
            Naming the file: unreadable files, 2D and 3D scans mixed, `dims=3` with 2D
            images, content too big for the frame, NaN values, fewer than five items in all.
        """
        files = expand_paths(paths)
        scans = [(path, _read_scan(path)) for path in files]
        foregrounds: dict[Path, np.ndarray] = {}
        if isinstance(frame, str):
            frame = _fit_collection_frame(
                scans, frame, dims, kind, downsample, spacing, multiple, foregrounds
            )
        samples: list[HealthySample] = []
        first: tuple[Path, int] | None = None
        kinds: set[str] = set()
        from_slices = False
        dropped = 0
        small_files: list[str] = []
        placer = _placement_masks(brain_mask) if brain_mask is not None else None
        for group, (path, scan) in enumerate(scans):
            scan_ndim = int(np.ndim(scan.array))
            # A 2D NIfTI reads as a one-slice volume: it is a 2D image, framed as its one slice.
            single_slice = scan_ndim == 3 and scan.array.shape[0] == 1
            if single_slice:
                scan_ndim = 2
            if scan_ndim not in (2, 3):
                raise ValueError(f"{path}: a {scan_ndim}D image; healthy scans must be 2D or 3D")
            if first is None:
                first = (path, scan_ndim)
            elif scan_ndim != first[1]:
                raise ValueError(
                    f"{path}: a {scan_ndim}D scan among {first[1]}D scans (first: "
                    f"{first[0]}); train 2D and 3D data separately"
                )
            if dims == 3 and scan_ndim != 3:
                raise ValueError(f"{path}: a 2D image but dims = 3; use --dims 2 or 3D volumes")
            placement = None
            if placer is not None and scan_ndim == 3 and not single_slice:
                placement = placer(path, scan)
            array, fg, item_kind, zero = _frame_scan(
                scan,
                path,
                kind,
                2 if single_slice else dims,
                frame,
                downsample,
                spacing,
                foregrounds.pop(path, None),
                placement,
                bias_correction,
            )
            if single_slice:
                array, fg = array[0], None if fg is None else fg[0]
            if not np.isfinite(array).all():
                raise ValueError(f"{path}: holds NaN or infinite values after preprocessing")
            kinds.add(item_kind)
            if dims == 2 and scan_ndim == 3:
                from_slices = True
                for z in range(array.shape[0]):
                    sl_fg = None if fg is None else fg[z]
                    if _cover(array[z], sl_fg) < max(min_foreground, 1e-12):
                        dropped += 1
                        continue
                    samples.append(
                        HealthySample(
                            np.ascontiguousarray(array[z], dtype=np.float32),
                            None if sl_fg is None else np.ascontiguousarray(sl_fg, dtype=bool),
                            f"{_display_name(path)}[z={z}]",
                            group,
                            zero,
                        )
                    )
            else:
                if array.ndim == 2 and _cover(array, fg) < max(min_foreground, 1e-12):
                    small_files.append(_display_name(path))  # as for slices cut from volumes
                    continue
                samples.append(
                    HealthySample(
                        np.asarray(array, dtype=np.float32),
                        None if fg is None else np.asarray(fg, dtype=bool),
                        _display_name(path),
                        group,
                        zero,
                    )
                )
        if not samples and small_files:
            raise ValueError(
                f"no usable images: all {len(small_files)} 2D image(s) have less "
                f"than {min_foreground:.0%} foreground ({_listed(small_files)}); "
                "lower min_foreground"
            )
        if not samples:
            raise ValueError(
                f"no usable slices: all {dropped} slices of {len(files)} volume(s) "
                f"have (almost) no foreground; lower min_foreground"
            )
        notes = []
        if dropped:
            notes.append(
                f"dropped {dropped} slice(s) with less than {min_foreground:.0%} foreground"
            )
        if small_files:
            notes.append(
                f"dropped {len(small_files)} 2D image(s) with less than "
                f"{min_foreground:.0%} foreground: {_listed(small_files)}"
            )
        out_dims = 2 if from_slices else first[1]
        return cls(
            samples,
            out_dims,
            kinds.pop() if len(kinds) == 1 else "mri",
            from_slices=from_slices,
            notes=notes,
        )


def _cover(image: np.ndarray, foreground: np.ndarray | None) -> float:
    """The foreground's share of a 2D item (nonzero pixels when it has no mask)."""
    n = np.count_nonzero(image) if foreground is None else np.count_nonzero(foreground)
    return n / image.size


def _listed(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


#: An image "takes" an anomaly when the smallest anomaly the tasks draw has at least this share of
#: its positions with half of it on the foreground: then the placement's bounded random search
#: (100 positions x 4 shapes) fails with probability below (1 - 0.01) ** 400 ~ 2 % even at that
#: smallest size, and the dataset's fallback (`_smallest_anomaly_item`) retries many times more.
MIN_PLACEABLE_SHARE = 0.01


def placeable_share(
    foreground: np.ndarray | None, min_size: float | None = None, max_size: float | None = None
) -> float:
    """The share of positions where the smallest synthetic anomaly has half of it on `foreground`.

    The smallest anomaly is the axis-aligned ellipse (ellipsoid) whose diameters are the tasks'
    lower size bounds for this frame (`anomalies.shapes.size_bounds`, `min_size` of
    `TaskParams`); positions are those of its box inside the frame, as the placement draws them.

    Parameters
    ----------
    foreground : ndarray of bool, or None
        None (everywhere) gives 1.
    min_size, max_size : float, optional
        The tasks' size bounds (default: `TaskParams`').

    Returns
    -------
    float
        In [0, 1].
    """
    from scipy.signal import fftconvolve

    from napari_mtml.anomalies.placement import MIN_FOREGROUND_FRACTION
    from napari_mtml.anomalies.shapes import size_bounds
    from napari_mtml.anomalies.tasks import TaskParams

    if foreground is None:
        return 1.0
    fg = np.asarray(foreground, dtype=bool)
    if fg.all():
        return 1.0
    if not fg.any():
        return 0.0
    lb, _ = size_bounds(
        fg.shape,
        TaskParams.min_size if min_size is None else min_size,
        TaskParams.max_size if max_size is None else max_size,
    )
    axes = [(np.arange(n) - (n - 1) / 2) / (n / 2) for n in lb]
    radius2 = sum(
        a.reshape([-1 if i == j else 1 for j in range(len(lb))]) ** 2 for i, a in enumerate(axes)
    )
    kernel = (radius2 <= 1.0).astype(np.float32)
    need = MIN_FOREGROUND_FRACTION * float(kernel.sum())
    # the kernel is symmetric, so the convolution is the correlation: voxels on the foreground
    # for every corner of the box inside the frame ("valid")
    on = fftconvolve(fg.astype(np.float32), kernel, mode="valid")
    return float(np.mean(on >= need - 0.5))


def takes_smallest_anomaly(foreground: np.ndarray | None) -> bool:
    """Whether an image's foreground can take the smallest synthetic anomaly.

    Parameters
    ----------
    foreground : ndarray of bool, or None

    Returns
    -------
    bool
        `placeable_share(foreground) >= MIN_PLACEABLE_SHARE`.
    """
    return placeable_share(foreground) >= MIN_PLACEABLE_SHARE


def _drop_unplaceable(samples: list[HealthySample]) -> tuple[list[HealthySample], list[str]]:
    """The samples that take the smallest anomaly, and the names of those that do not."""
    kept, dropped = [], []
    for s in samples:
        (kept if takes_smallest_anomaly(s.foreground) else dropped).append(s)
    if not kept:
        raise ValueError(
            f"no healthy image can take a synthetic anomaly: the foregrounds of all "
            f"{len(samples)} image(s) are too small or too thin "
            f"({_listed([s.name for s in dropped])}); check the foreground masks "
            "or give images with more anatomy"
        )
    return kept, [s.name for s in dropped]


def unplaceable_notice(names: Sequence[str]) -> str:
    return (
        f"dropped {len(names)} image(s) whose foreground is too small or too thin to take "
        f"the smallest synthetic anomaly: {_listed(list(names))}"
    )


def _display_name(path: Path) -> str:
    return path.name


def _read_scan(path: Path):
    """`read_image(path)`, any failure as a `ValueError` naming the file."""
    from napari_mtml.io import read_image

    try:
        return read_image(path)
    except ValueError as exc:
        msg = str(exc)
        raise ValueError(msg if str(path.name) in msg else f"{path}: {msg}") from None
    except Exception as exc:  # a reader failing in an unforeseen way still names the file
        raise ValueError(f"{path}: could not be read ({type(exc).__name__}: {exc})") from None


def _scan_dims(scan, dims: int | None) -> int:
    """The dimensionality a scan is framed in: 2 for a one-slice volume (a 2D NIfTI)."""
    if scan.array.ndim == 3 and scan.array.shape[0] == 1:
        return 2
    return int(dims or scan.array.ndim)


def _fit_collection_frame(
    scans, frame: str, dims, kind, downsample, spacing, multiple, foregrounds: dict
) -> tuple[int, ...] | None:
    """One frame for every scan: the smallest holding each one's content (MRI); None (the
    default frame) for X-rays. Fills `foregrounds` (path -> mask) so they are computed once."""
    from napari_mtml.preprocess import content_shape, fit_frame, foreground_mask, infer_kind

    if frame != "fit":
        raise ValueError(f"frame {frame!r} is invalid: give sizes (e.g. 128,128) or 'fit'")
    contents: list[tuple[int, ...]] = []
    n_dims = None
    for path, scan in scans:
        d = _scan_dims(scan, dims)
        k = kind if kind in ("mri", "cxr") else infer_kind(scan)
        if k == "cxr":
            return None
        try:
            fg = foreground_mask(scan, kind="mri")
            size = content_shape(
                scan, kind="mri", dims=d, downsample=downsample, spacing=spacing, foreground=fg
            )
        except ValueError as exc:
            msg = str(exc)
            raise ValueError(msg if str(path.name) in msg else f"{path}: {msg}") from None
        foregrounds[path] = fg
        if n_dims is not None and len(size) != n_dims:
            return None  # mixed dimensionality: reported with its file by the framing loop
        n_dims = len(size)
        contents.append(size)
    if not contents:
        return None
    m = multiple.get(n_dims, 16) if isinstance(multiple, dict) else int(multiple)
    return fit_frame(tuple(max(c[i] for c in contents) for i in range(n_dims)), m)


def _placement_masks(source: str | Path) -> Callable:
    """`masks(path, scan)`: the brain mask of a healthy volume, automatic ("auto") or the file
    of the same name in the folder `source`; any failure names the file."""
    from napari_mtml.batch import mask_dir_lookup

    if str(source) != "auto":
        lookup = mask_dir_lookup(source)
        return lambda path, scan: _named(path, lambda: lookup(path, scan))
    from napari_mtml.brainmask import brain_mask

    return lambda path, scan: _named(path, lambda: brain_mask(scan))


def _named(path: Path, make: Callable) -> np.ndarray:
    try:
        return make()
    except ValueError as exc:
        msg = str(exc)
        raise ValueError(msg if str(path.name) in msg else f"{path}: {msg}") from None


def _frame_scan(
    scan,
    path: Path,
    kind: str,
    dims: int | None,
    frame: Sequence[int] | None,
    downsample: float,
    spacing: float | None = None,
    foreground=None,
    placement=None,
    bias_correction: str = "none",
) -> tuple[np.ndarray, np.ndarray | None, str, float | None]:
    """`to_frame` for one scan: (array, foreground, kind, zero); with dims=2 and a 3D scan, array
    and foreground are stacks `(Z, *frame2d)`. `placement`: a bool mask on the scan's grid that
    narrows the returned foreground (where anomalies go), e.g. the brain of a head. `zero`: MRI,
    the z-value of intensity 0 (`HealthySample.zero`), else None."""
    from napari_mtml.preprocess import infer_kind, mask_to_frame, to_frame

    try:
        array, fg, transform = to_frame(
            scan,
            kind=kind,
            dims=dims,
            frame=tuple(frame) if frame else None,
            downsample=downsample,
            spacing=spacing,
            foreground=foreground,
            bias_correction=bias_correction,
        )
    except ValueError as exc:
        msg = str(exc)
        raise ValueError(msg if str(path.name) in msg else f"{path}: {msg}") from None
    if placement is not None and fg is not None:
        fg = fg & mask_to_frame(placement, transform)
    item_kind = getattr(transform, "kind", None)
    if item_kind not in ("mri", "cxr"):
        item_kind = kind if kind in ("mri", "cxr") else infer_kind(scan)
    array = np.asarray(array, dtype=np.float32)
    fg = None if fg is None else np.asarray(fg, dtype=bool)
    mean, std = float(getattr(transform, "mean", math.nan)), float(getattr(transform, "std", 0))
    zero = -mean / std if item_kind == "mri" and math.isfinite(mean) and std > 0 else None
    return array, fg, item_kind, zero


# ------------------------------------------------------------------------------------- dataset

SourcePool = Sequence[HealthySample]


def _source_sampler(
    pool: SourcePool,
    exclude: HealthySample | None = None,
) -> Callable[[np.random.Generator], tuple]:
    """A `source(rng)` callable for the blending tasks: a random image of `pool` other than
    `exclude` (the target itself) whenever the pool has another one."""
    others = [s for s in pool if s is not exclude] or list(pool)

    def draw(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        s = others[int(rng.integers(len(others)))]
        return s.image, s.foreground

    return draw


def _synthesize_item(
    sample: HealthySample,
    task: int,
    rng: np.random.Generator,
    *,
    flip: bool,
    task_params: dict,
    intra: SourcePool,
    external: SourcePool | None,
    bias_augment: float = 0.0,
    bias_rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """(healthy, augmented, label, foreground, mask) for one item; healthy possibly flipped and,
    with `bias_augment` > 0 on an MRI sample (`sample.zero` known), multiplied by a random bias
    field drawn from `bias_rng` (`bias.random_bias_field`) before its anomalies: a healthy image
    under another coil's field, which the label keeps at 0."""
    from napari_mtml.anomalies import synthesize

    image, fg = sample.image, sample.foreground
    if flip and rng.random() < 0.5:
        image = np.ascontiguousarray(image[..., ::-1])
        fg = None if fg is None else np.ascontiguousarray(fg[..., ::-1])
    if bias_augment > 0 and sample.zero is not None and bias_rng is not None:
        from napari_mtml.bias import apply_bias_field, random_bias_field

        head = image != 0  # the frame's background is exactly 0; fg may be the brain only
        field = random_bias_field(image.shape, bias_rng, bias_augment, mask=head)
        image = apply_bias_field(image, field, sample.zero)
    pool = external if (task == 1 and external) else intra
    source = _source_sampler(pool, exclude=sample) if task in (0, 1) else None
    # A synthesis whose anomaly changed nothing would give an all-zero label: training items
    # must each hold an anomaly, so draw again (rare; bounded), then give up on this image:
    # the callers' ValueError path tries other images and the smallest anomalies.
    for _ in range(_EMPTY_LABEL_TRIES):
        result = synthesize(image, foreground=fg, task=task, rng=rng, source=source, **task_params)
        if float(result.label.max()) > 0:
            return image, result.image, result.label, fg, result.mask
    raise ValueError(
        f"{sample.name}: {_EMPTY_LABEL_TRIES} task-{task} anomalies in a row changed "
        "nothing (an all-zero label); check that the image is not flat"
    )


#: draws of one item before an all-zero label makes it try another image
_EMPTY_LABEL_TRIES = 4


_FALLBACK_TRIES = 10


def _smallest_anomaly_item(
    samples: SourcePool,
    sid: int,
    task: int,
    rng: np.random.Generator,
    error: Exception | None,
    **kw,
) -> tuple:
    """`(sid, *_synthesize_item(...))` with anomalies of the smallest size, on `samples[sid]`
    or other samples: what an item falls back to when its normal draw found no place."""
    from napari_mtml.anomalies.tasks import TaskParams

    params = dict(kw.pop("task_params") or {})
    params["max_size"] = params.get("min_size", TaskParams.min_size)
    for _ in range(_FALLBACK_TRIES):
        try:
            return (sid, *_synthesize_item(samples[sid], task, rng, task_params=params, **kw))
        except ValueError as exc:
            error = exc
            sid = int(rng.integers(len(samples)))
    raise ValueError(
        f"could not place a task-{task} anomaly even at the smallest size on "
        f"{_FALLBACK_TRIES} images ({error}); check the foreground masks"
    ) from error


def _item_on_some_image(
    samples: SourcePool, sid: int, task: int, rng: np.random.Generator, **kw
) -> tuple:
    """`(sid, *_synthesize_item(...))`: an item of `task` on `samples[sid]`, else on up to four
    other images drawn by `rng`, else with anomalies of the smallest size."""
    error: ValueError | None = None
    # Placement can fail on a thin foreground; try other healthy images before giving up.
    for _ in range(5):
        try:
            return (sid, *_synthesize_item(samples[sid], task, rng, **kw))
        except ValueError as exc:
            error = exc
            sid = int(rng.integers(len(samples)))
    # Every image took the smallest anomaly when the collection was built: fall back to
    # anomalies of that size rather than raise inside a loader worker in the middle of a run.
    return _smallest_anomaly_item(samples, sid, task, rng, error, **kw)


class SyntheticDataset:
    """Training items with fresh synthetic anomalies, a map-style torch dataset.

    `dataset[k]` for the rank's k-th item (k = 0, 1, 2, ... over the whole run; epoch
    e = k // items_per_epoch) returns `(image, label, task)`: float32 tensors `(1, *frame)` and
    the task id. The task is drawn uniformly from `tasks` per item; a blending task draws its
    source from `intra` (task 0; default: the training samples) or `external` (task 1; falls
    back to `intra` when None). With `flip`, the last axis is flipped with p = 0.5 (brain).

    Each epoch has one item per sample: with `sampling="scans"` (the default) draws in which
    every scan (`HealthySample.group`) comes up equally often and then one of its items (with
    replacement), with `sampling="slices"` a shuffled pass over `samples`; the two are the same
    permutation where every scan gives as many items. Both are fixed by `seed` and the epoch,
    so a resumed run draws the same items.

    samples: the fold's training data; seed: the fold's base seed; rank/world_size: DDP.
    """

    def __init__(
        self,
        samples: SourcePool,
        tasks: Sequence[int],
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        flip: bool = False,
        task_params: dict | None = None,
        intra: SourcePool | None = None,
        external: SourcePool | None = None,
        bias_augment: float = 0.0,
        sampling: str = "scans",
    ):
        if not samples:
            raise ValueError("the fold has no training samples; add more healthy scans")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}; got {sampling!r}")
        if not tasks:
            raise ValueError("no training tasks given")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.samples = list(samples)
        self.tasks = [int(t) for t in tasks]
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.flip = bool(flip)
        self.task_params = dict(task_params or {})
        self.intra = list(intra) if intra is not None else self.samples
        self.external = list(external) if external else None
        self.bias_augment = float(bias_augment)
        self.items_per_epoch = math.ceil(len(self.samples) / self.world_size)
        self._perms: dict[int, np.ndarray] = {}
        # "scans": each item's chance is 1 / (scans x that scan's items); None where that is
        # uniform anyway (every scan gives as many items), so the draw stays a permutation
        self.sampling = sampling
        self._weights = None
        if sampling == "scans":
            groups = np.asarray([s.group for s in self.samples])
            _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
            if counts.min() != counts.max():
                w = 1.0 / counts[inverse]
                self._weights = w / w.sum()

    def __len__(self) -> int:
        return self.items_per_epoch

    def locate(self, k: int) -> tuple[int, int, int]:
        """(epoch, index within the epoch, sample id) of the rank's k-th item."""
        epoch, index = divmod(int(k), self.items_per_epoch)
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) > 4:
                self._perms.clear()
            ss = np.random.SeedSequence([self.seed, epoch], spawn_key=(_PERM_KEY,))
            gen = np.random.Generator(np.random.PCG64(ss))
            n = len(self.samples)
            if self._weights is None:
                perm = gen.permutation(n)
            else:  # an epoch of n draws, each scan as often on average
                perm = gen.choice(n, size=n, p=self._weights)
            self._perms[epoch] = perm
        return epoch, index, int(perm[(self.rank + index * self.world_size) % len(perm)])

    def item_rng(self, k: int) -> np.random.Generator:
        epoch, index, _ = self.locate(k)
        ss = np.random.SeedSequence([self.seed, self.rank, epoch, index])
        return np.random.Generator(np.random.PCG64(ss))

    def draw(self, k: int) -> tuple[np.ndarray, np.ndarray, int]:
        """The k-th item as numpy arrays: (augmented (*frame), label (*frame), task id)."""
        epoch, index, sid = self.locate(k)
        rng = self.item_rng(k)
        task = self.tasks[int(rng.integers(len(self.tasks)))]
        bias_rng = None
        if self.bias_augment > 0:
            # its own stream: the anomalies drawn are the same with and without bias fields
            ss = np.random.SeedSequence(
                [self.seed, self.rank, epoch, index], spawn_key=(_BIAS_KEY,)
            )
            bias_rng = np.random.Generator(np.random.PCG64(ss))
        item = _item_on_some_image(
            self.samples,
            sid,
            task,
            rng,
            flip=self.flip,
            task_params=self.task_params,
            intra=self.intra,
            external=self.external,
            bias_augment=self.bias_augment,
            bias_rng=bias_rng,
        )
        return item[2], item[3], task

    def __getitem__(self, k: int):
        import torch

        aug, label, task = self.draw(k)
        return (
            torch.from_numpy(np.ascontiguousarray(aug, dtype=np.float32))[None],
            torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32))[None],
            task,
        )


class StepBatchSampler:
    """Batches of item indices for steps `start_step, start_step + 1, ...` (endless).

    Step s holds the rank's items `s * batch .. (s + 1) * batch - 1`, so a run resumed at step s
    draws exactly the batches an uninterrupted run would have drawn."""

    def __init__(self, batch_size: int, start_step: int = 0):
        self.batch_size = int(batch_size)
        self.start_step = int(start_step)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield list(range(step * self.batch_size, (step + 1) * self.batch_size))
            step += 1


def _worker_init(_: int) -> None:
    import torch

    # Loader workers do numpy/scipy work; one thread each avoids oversubscribing the cores.
    torch.set_num_threads(1)


def make_loader(
    dataset: SyntheticDataset,
    batch_size: int,
    start_step: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
):
    """A torch DataLoader over `dataset` yielding `(images, labels, tasks)` batches from
    `start_step` on; items do not depend on `workers`."""
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_sampler=StepBatchSampler(batch_size, start_step),
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if workers else None,
        persistent_workers=False,
    )


# ------------------------------------------------------------------------------------ validation


@dataclass
class ValidationSet:
    """Validation items drawn once: for item j, `healthy[j]` (target all zero) and
    `augmented[j]` (target `label[j]`), both float32 `(*frame)`, stacked `(N, *frame)`;
    `mask` bool (anomaly mask, the AP ground truth), `foreground` bool (where AP is scored),
    `tasks` int64 `(N,)` the task of each augmented item, `names` the healthy image names."""

    healthy: np.ndarray
    augmented: np.ndarray
    label: np.ndarray
    mask: np.ndarray
    foreground: np.ndarray
    tasks: np.ndarray
    names: list[str]

    def __len__(self) -> int:
        return len(self.tasks)


def make_validation_set(
    samples: SourcePool,
    tasks: Sequence[int],
    size: int,
    seed: int,
    *,
    task_params: dict | None = None,
    external: SourcePool | None = None,
) -> ValidationSet:
    """Draw the validation set once, deterministically from `seed`.

    Parameters
    ----------
    samples : sequence of HealthySample
        The held-out data; each item's healthy image is taken in a seeded random order over
        them (cycled when `size` > len(samples)).
    tasks : sequence of int
        The held-out tasks, assigned round-robin to the `size` items.
    size : int
    seed : int
    task_params : dict, optional
        `napari_mtml.anomalies.synthesize` keywords.
    external : sequence of HealthySample, optional
        Blending sources of task 1 (else the held-out samples; task 0 always blends other
        held-out samples). No flip.

    Returns
    -------
    ValidationSet
    """
    if not samples:
        raise ValueError("no validation samples; add more healthy scans")
    if not tasks:
        raise ValueError("no validation tasks given")
    samples = list(samples)
    root = np.random.SeedSequence([int(seed)], spawn_key=(_VAL_KEY,))
    order_rng, *item_seeds = [np.random.Generator(np.random.PCG64(s)) for s in root.spawn(size + 1)]
    order = order_rng.permutation(len(samples))
    healthy, augmented, labels, masks, fgs, task_ids, names = [], [], [], [], [], [], []
    for j in range(size):
        task = int(tasks[j % len(tasks)])
        sid, h, aug, label, fg, mask = _item_on_some_image(
            samples,
            int(order[j % len(order)]),
            task,
            item_seeds[j],
            flip=False,
            task_params=task_params or {},
            intra=samples,
            external=external,
        )
        healthy.append(h)
        augmented.append(aug)
        labels.append(label)
        masks.append(mask)
        fgs.append(np.ones(h.shape, bool) if fg is None else fg)
        task_ids.append(task)
        names.append(samples[sid].name)
    return ValidationSet(
        np.stack(healthy).astype(np.float32),
        np.stack(augmented).astype(np.float32),
        np.stack(labels).astype(np.float32),
        np.stack(masks).astype(bool),
        np.stack(fgs),
        np.asarray(task_ids, dtype=np.int64),
        names,
    )


NO_EXTERNAL_NOTICE = (
    "no external dataset given (--external): the inter-dataset blending task (task 1) draws its "
    "sources from the healthy training data instead, like the intra-dataset task (task 0)"
)
