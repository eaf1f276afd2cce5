"""Lesions of kinds the five synthetic tasks are not, for the quality benchmark (numpy + scipy).

Every function has the signature of `napari_mtml.variants.LesionFunction` once its severity is
bound (`lesion_function(kind, severity)`):

    f(image, brain, spacing, rng) -> (lesioned image float32, lesion mask bool)

`image` is a T1-weighted brain (skull-stripped or not) in any units, `brain` its bool brain mask,
`spacing` mm per `(z, y, x)` axis. Intensities are set relative to the brain's own tissue levels
(white matter = the 90th percentile inside the brain, CSF = the 1st), so the same lesion works on
any scaling. Lesions are placed inside the brain mask and their masks never leave it.
`make_variant(..., lesion=...)` applies them in the template's space, before the warps, the
partial volume of thick slices, the contrast change, the bias field and the noise, so that a
lesion is imaged like the tissue around it.

Kinds (none is one of the five tasks: no patch blended from another image, no radial sink/source
warp, no smooth intensity ramp in an ellipse); three severities each (0 mild, 1 moderate, 2 severe:
size and contrast grow together):

- `ring_mass`: glioblastoma-like ring-enhancing mass: an irregular, lobulated necrotic core
  (dark, textured), an enhancing rim of uneven thickness (brighter than white matter) and
  surrounding vasogenic oedema (T1-hypointense, irregular, finger-like into the white matter).
  Mask: core + rim + oedema (the "whole tumour").
- `cavity`: a resection-like cavity open to the brain surface, filled with CSF-like signal, with
  a thin hypointense gliotic rim. Mask: cavity + rim.
- `ms_foci`: several small ovoid bright foci (enhancing MS-like plaques), mostly in the
  periventricular white matter, the rest elsewhere in the white matter. Mask: the foci.
- `texture`: a region whose fine texture changes (granular, spatially correlated, zero-mean
  signal, about 1.5 mm grain) with no change of its mean. Mask: the region.
- `stroke`: a territorial infarct: a wedge from a deep apex out to the cortex with an irregular
  smooth border, T1-hypointense with the grey/white contrast washed out. Mask: the wedge.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable

import numpy as np
from scipy import ndimage

__all__ = ["LESIONS", "SEVERITIES", "lesion_function"]

SEVERITIES = ("mild", "moderate", "severe")

# Distance maps are the slow part; the template's brain mask is the same for every variant.
_CACHE: dict[tuple, np.ndarray] = {}
_CACHE_MAX = 8


def _key(*arrays: np.ndarray, extra: tuple = ()) -> tuple:
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return (h.hexdigest(), *extra)


def _cached(key: tuple, compute: Callable[[], np.ndarray]) -> np.ndarray:
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = compute()
    return _CACHE[key]


def _depth(brain: np.ndarray, spacing) -> np.ndarray:
    """Distance (mm) from each brain voxel to the outside of the brain mask."""
    return _cached(
        _key(np.packbits(brain), extra=("depth", tuple(spacing))),
        lambda: ndimage.distance_transform_edt(brain, sampling=spacing).astype(np.float32),
    )


def _levels(image: np.ndarray, brain: np.ndarray) -> dict[str, float]:
    v = image[brain]
    p1, p5, p35, p75, p90 = np.percentile(v, [1, 5, 35, 75, 90])
    return {
        "csf": float(p1),
        "dark": float(p5),
        "gm": float(p35),
        "wm_low": float(p75),
        "wm": float(p90),
    }


def _severity(severity) -> int:
    if isinstance(severity, str):
        if severity not in SEVERITIES:
            raise ValueError(f"severity {severity!r}: use one of {SEVERITIES} or 0, 1, 2")
        return SEVERITIES.index(severity)
    k = int(severity)
    if k not in (0, 1, 2):
        raise ValueError(f"severity {severity!r}: use one of {SEVERITIES} or 0, 1, 2")
    return k


def _pick(candidates: np.ndarray, rng: np.random.Generator, what: str) -> np.ndarray:
    idx = np.flatnonzero(candidates)
    if idx.size == 0:
        raise ValueError(f"no place for {what} inside the brain mask (brain too small?)")
    return np.array(np.unravel_index(idx[rng.integers(idx.size)], candidates.shape))


def _box(centre: np.ndarray, half_mm: float, spacing, shape) -> tuple[slice, ...]:
    out = []
    for c, s, n in zip(centre, spacing, shape, strict=True):
        h = int(math.ceil(half_mm / s)) + 2
        out.append(slice(max(0, int(c) - h), min(n, int(c) + h + 1)))
    return tuple(out)


def _offsets(box: tuple[slice, ...], centre: np.ndarray, spacing) -> list[np.ndarray]:
    """mm offsets from the centre voxel along each axis of the box, broadcastable."""
    out = []
    for axis, (sl, c, s) in enumerate(zip(box, centre, spacing, strict=True)):
        v = (np.arange(sl.start, sl.stop) - c) * s
        out.append(v.reshape([-1 if a == axis else 1 for a in range(3)]).astype(np.float32))
    return out


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _field(shape, spacing, scale_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth zero-mean unit-std noise with features about `scale_mm` across, on `shape`."""
    sigma = [max(0.5, 0.4 * scale_mm / s) for s in spacing]
    f = ndimage.gaussian_filter(
        rng.standard_normal(shape).astype(np.float32), sigma, mode="reflect"
    )
    std = float(f.std())
    return (f - f.mean()) / (std if std > 0 else 1.0)


def _blob(
    box,
    centre,
    spacing,
    shape,
    radius_mm: float,
    rng: np.random.Generator,
    irregularity: float,
    elongation: float = 1.25,
) -> np.ndarray:
    """An irregular lobulated blob in `box`: an ellipsoid of mean radius `radius_mm` (axes
    within `1/elongation .. elongation`, random orientation) whose normalised radius is
    perturbed by smooth noise; the component holding the centre, holes filled."""
    dz, dy, dx = _offsets(box, centre, spacing)
    rot = _random_rotation(rng)
    axes = radius_mm * np.exp(rng.uniform(-math.log(elongation), math.log(elongation), 3))
    u = [(rot[k, 0] * dz + rot[k, 1] * dy + rot[k, 2] * dx) / axes[k] for k in range(3)]
    r = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
    sub = tuple(s.stop - s.start for s in box)
    noise = _field(sub, spacing, max(2.0, 0.7 * radius_mm), rng)
    inside = (r + irregularity * noise) < 1.0
    local = tuple(int(c) - s.start for c, s in zip(centre, box, strict=True))
    inside[local] = True
    lab, _ = ndimage.label(inside)
    return ndimage.binary_fill_holes(lab == lab[local])


def _soft(mask: np.ndarray, spacing, sigma_mm: float = 0.7) -> np.ndarray:
    """A soft (partial volume) version of a bool mask, in [0, 1]."""
    return np.clip(
        ndimage.gaussian_filter(mask.astype(np.float32), [sigma_mm / s for s in spacing]), 0.0, 1.0
    )


def _bbox(mask: np.ndarray) -> list[tuple[int, int]]:
    out = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        out.append((int(hits[0]), int(hits[-1]) + 1))
    return out


def _inside_distance(mask: np.ndarray, spacing) -> np.ndarray:
    return ndimage.distance_transform_edt(mask, sampling=spacing).astype(np.float32)


def _outside_distance(mask: np.ndarray, spacing) -> np.ndarray:
    return ndimage.distance_transform_edt(~mask, sampling=spacing).astype(np.float32)


def _prepare(image, brain, spacing):
    image = np.asarray(image, dtype=np.float32)
    brain = np.asarray(brain).astype(bool)
    if image.ndim != 3 or brain.shape != image.shape:
        raise ValueError(
            f"lesions need a 3D image and a brain mask of its shape; got "
            f"{image.shape} and {brain.shape}"
        )
    spacing = tuple(float(s) for s in spacing)
    return image.copy(), brain, spacing


# --------------------------------------------------------------------------------------------
# The lesions
# --------------------------------------------------------------------------------------------
def ring_mass(image, brain, spacing, rng: np.random.Generator, severity=1):
    """Ring-enhancing mass with necrotic core and oedema (see the module docstring)."""
    k = _severity(severity)
    out, brain, spacing = _prepare(image, brain, spacing)
    lv = _levels(out, brain)
    radius = (6.0, 9.0, 13.0)[k] * rng.uniform(0.85, 1.15)
    oedema = (3.0, 7.0, 11.0)[k] * rng.uniform(0.8, 1.2)
    depth = _depth(brain, spacing)
    centre = _pick(brain & (depth >= radius + 3.0), rng, "a mass")
    box = _box(centre, radius * 1.5 + oedema * 1.6 + 4.0, spacing, out.shape)
    mass = _blob(box, centre, spacing, out.shape, radius, rng, irregularity=0.3)
    sub_brain = brain[box]
    mass &= sub_brain
    rim_mm = (1.5, 2.5, 3.5)[k] * rng.uniform(0.8, 1.2)
    rim_var = 1.0 + 0.4 * _field(mass.shape, spacing, 6.0, rng)
    core = mass & (_inside_distance(mass, spacing) > rim_mm * rim_var)
    rim = mass & ~core
    # oedema: irregular fingers, spreading further into the white matter than into grey matter
    reach = _outside_distance(mass, spacing)
    wm_like = ndimage.gaussian_filter(out[box], 1.0) > lv["gm"]
    limit = (
        oedema * (1.0 + 0.5 * _field(mass.shape, spacing, 8.0, rng)) * np.where(wm_like, 1.0, 0.45)
    )
    edema = sub_brain & ~mass & (reach <= limit)
    tissue = out[box]
    a_edema = (0.35, 0.55, 0.75)[k]
    target_edema = 0.62 * lv["wm"]
    tissue = tissue + _soft(edema, spacing) * a_edema * (target_edema - tissue)
    a_core = (0.6, 0.8, 0.95)[k]
    target_core = (
        lv["csf"] * rng.uniform(1.0, 1.6) * (1.0 + 0.15 * _field(mass.shape, spacing, 2.0, rng))
    )
    tissue = tissue + _soft(core, spacing) * a_core * (target_core - tissue)
    target_rim = (
        lv["wm"] * (1.08, 1.2, 1.35)[k] * (1.0 + 0.05 * _field(mass.shape, spacing, 3.0, rng))
    )
    tissue = tissue + _soft(rim, spacing, 0.5) * (target_rim - tissue)
    out[box] = np.where(sub_brain, tissue, out[box])
    mask = np.zeros(out.shape, dtype=bool)
    mask[box] = (mass | edema) & sub_brain
    return out, mask


def cavity(image, brain, spacing, rng: np.random.Generator, severity=1):
    """Resection-like CSF-filled cavity open to the brain surface, with a gliotic rim."""
    k = _severity(severity)
    out, brain, spacing = _prepare(image, brain, spacing)
    lv = _levels(out, brain)
    radius = (6.0, 10.0, 15.0)[k] * rng.uniform(0.85, 1.15)
    depth = _depth(brain, spacing)
    centre = _pick(brain & (depth >= 0.3 * radius) & (depth <= 0.8 * radius), rng, "a cavity")
    box = _box(centre, radius * 1.6 + 5.0, spacing, out.shape)
    hole = _blob(box, centre, spacing, out.shape, radius, rng, irregularity=0.3) & brain[box]
    rim = brain[box] & ~hole & (_outside_distance(hole, spacing) <= rng.uniform(1.5, 2.5))
    tissue = out[box]
    target = (
        lv["csf"] * rng.uniform(0.9, 1.2) * (1.0 + 0.05 * _field(hole.shape, spacing, 3.0, rng))
    )
    a = (0.7, 0.9, 1.0)[k]
    tissue = tissue * (1.0 - _soft(rim, spacing) * (0.05, 0.1, 0.15)[k])
    tissue = tissue + _soft(hole, spacing, 0.5) * a * (target - tissue)
    out[box] = np.where(brain[box], tissue, out[box])
    mask = np.zeros(out.shape, dtype=bool)
    mask[box] = hole | rim
    return out, mask


def _white_matter(image, brain, spacing, lv) -> tuple[np.ndarray, np.ndarray]:
    """(white matter at least 6 mm deep, its part within 10 mm of the ventricles)."""
    depth = _depth(brain, spacing)
    smooth = ndimage.gaussian_filter(image, [1.0 / s for s in spacing])
    white = brain & (smooth >= lv["wm_low"]) & (depth >= 6.0)
    ventricles = brain & (smooth <= lv["dark"]) & (depth >= 15.0)
    if not ventricles.any():
        return white, white
    peri = white & (_outside_distance(ventricles, spacing) <= 10.0)
    return white, (peri if peri.any() else white)


def ms_foci(image, brain, spacing, rng: np.random.Generator, severity=1):
    """Several small ovoid bright foci in the (mostly periventricular) white matter."""
    k = _severity(severity)
    out, brain, spacing = _prepare(image, brain, spacing)
    lv = _levels(out, brain)
    white, peri = _cached(
        _key(np.packbits(brain), out[brain], extra=("white", spacing)),
        lambda: _white_matter(out, brain, spacing, lv),
    )
    n = (3, 5, 8)[k] + int(rng.integers(0, 3))
    contrast = (1.12, 1.25, 1.4)[k]
    mask = np.zeros(out.shape, dtype=bool)
    for _ in range(n):
        pool = peri if rng.random() < 0.6 else white
        centre = _pick(pool, rng, "a focus")
        radius = rng.uniform(1.5, 3.0) + (0.0, 0.5, 1.0)[k]
        box = _box(centre, radius * 2.2 + 2.0, spacing, out.shape)
        dz, dy, dx = _offsets(box, centre, spacing)
        rot = _random_rotation(rng)
        elong = rng.uniform(1.3, 2.0)
        axes = radius * np.array([elong, 1.0 / math.sqrt(elong), 1.0 / math.sqrt(elong)])
        u = [(rot[j, 0] * dz + rot[j, 1] * dy + rot[j, 2] * dx) / axes[j] for j in range(3)]
        r2 = u[0] ** 2 + u[1] ** 2 + u[2] ** 2
        inside = (r2 < 1.0) & brain[box]
        # nodular: brightest in the middle, fading to the edge (no hard step)
        weight = np.where(r2 < 1.6, np.exp(-1.2 * r2), 0.0).astype(np.float32) * brain[box]
        target = lv["wm"] * contrast * rng.uniform(0.95, 1.05)
        tissue = out[box]
        out[box] = tissue + weight * np.maximum(0.0, target - tissue)
        mask[box] |= inside
    return out, mask


def texture(image, brain, spacing, rng: np.random.Generator, severity=1):
    """A region of changed fine texture (granular, ~1.5 mm grain) with its mean unchanged."""
    k = _severity(severity)
    out, brain, spacing = _prepare(image, brain, spacing)
    lv = _levels(out, brain)
    radius = (10.0, 14.0, 18.0)[k] * rng.uniform(0.85, 1.15)
    depth = _depth(brain, spacing)
    centre = _pick(brain & (depth >= 0.6 * radius), rng, "a texture change")
    box = _box(centre, radius * 1.6 + 3.0, spacing, out.shape)
    region = _blob(box, centre, spacing, out.shape, radius, rng, irregularity=0.35) & brain[box]
    grain = _field(region.shape, spacing, rng.uniform(1.2, 2.0), rng)
    amp = (0.06, 0.1, 0.16)[k] * lv["wm"]
    weight = _soft(region, spacing, 1.0)
    added = amp * grain * weight
    inside = region & (weight > 0)
    added[inside] -= added[inside].mean()  # the region's mean is unchanged
    out[box] = np.where(brain[box], out[box] + added, out[box])
    mask = np.zeros(out.shape, dtype=bool)
    mask[box] = region
    return out, mask


def stroke(image, brain, spacing, rng: np.random.Generator, severity=1):
    """A wedge-shaped territorial infarct from a deep apex to the cortex."""
    k = _severity(severity)
    out, brain, spacing = _prepare(image, brain, spacing)
    lv = _levels(out, brain)
    depth = _depth(brain, spacing)
    deep = depth >= 0.6 * float(depth.max())
    apex = _pick(brain & deep, rng, "a stroke's apex")
    # mostly in the axial plane (lateral, anterior or posterior territories), a little up/down
    direction = np.array([rng.uniform(-0.35, 0.35), *rng.standard_normal(2)])
    direction /= np.linalg.norm(direction)
    half = math.radians((9.0, 14.0, 20.0)[k] * rng.uniform(0.85, 1.15))
    start = rng.uniform(10.0, 20.0)
    box = tuple(slice(a, b) for a, b in _bbox(brain))
    dz, dy, dx = _offsets(box, apex, spacing)
    dist = np.sqrt(dz**2 + dy**2 + dx**2) + 1e-6
    cos = (direction[0] * dz + direction[1] * dy + direction[2] * dx) / dist
    border = half * (1.0 + 0.3 * _field(dist.shape, spacing, 15.0, rng))
    wedge = (np.arccos(np.clip(cos, -1.0, 1.0)) < border) & (dist >= start) & brain[box]
    if not wedge.any():
        raise ValueError("the stroke wedge missed the brain")
    lab, _ = ndimage.label(wedge)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    wedge = lab == int(np.argmax(sizes))
    a = (0.4, 0.6, 0.8)[k]
    target = (
        0.55
        * lv["wm"]
        * rng.uniform(0.9, 1.1)
        * (1.0 + 0.04 * _field(wedge.shape, spacing, 4.0, rng))
    )
    tissue = out[box]
    tissue = tissue + _soft(wedge, spacing, 1.0) * a * (target - tissue)
    out[box] = np.where(brain[box], tissue, out[box])
    mask = np.zeros(out.shape, dtype=bool)
    mask[box] = wedge
    return out, mask


LESIONS: dict[str, Callable] = {
    "ring_mass": ring_mass,
    "cavity": cavity,
    "ms_foci": ms_foci,
    "texture": texture,
    "stroke": stroke,
}


def lesion_function(kind: str, severity) -> Callable:
    """`f(image, brain, spacing, rng) -> (image, mask)` for a kind of `LESIONS` and a severity
    (0/1/2 or a name of `SEVERITIES`)."""
    if kind not in LESIONS:
        raise ValueError(f"unknown lesion kind {kind!r}; choose one of {sorted(LESIONS)}")
    return functools.partial(LESIONS[kind], severity=_severity(severity))
