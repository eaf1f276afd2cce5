"""Healthy variants of a template brain, for training and for testing (numpy + scipy only).

```python
from napari_mtml.samples import load_sample
from napari_mtml.variants import Template, make_variant
template = Template(load_sample("mni152_t1").array,             # the packaged MNI152 T1, 1 mm
                    load_sample("mni152_brain_mask").array > 0.5, spacing=(1.0, 1.0, 1.0))
v = make_variant(template, rng, skull=True, spacing=(6.0, 0.85, 0.85))   # a clinical-like head
v.image, v.brain, v.head, v.spacing      # float32 (Z, Y, X), bool, bool, mm per axis
```

One variant is the template seen through a random subject, pose and scanner, in this order:

1. **Head** (`skull=True`): a synthetic head is built around the brain, in the template's space:
   a CSF rim (also filling the sulci between the brain mask and its smooth envelope), the inner
   table of the skull (dark), the diploe (medium, fatty marrow), the outer table (dark), a thin
   muscle/galea layer, subcutaneous fat (brighter than white matter, as on T1) and skin. Every
   layer's thickness varies smoothly around the head, every layer has a faint texture, and the
   layer boundaries are softened by partial volume. `skull=False` gives a skull-stripped brain
   (zero outside the brain mask), as the packaged MNI152 T1 is.
2. **Lesion** (optional): a callable `lesion(image, brain, spacing, rng) -> (image, mask)` edits
   the template-space image, so that a lesion goes through the same warps, partial volume,
   contrast change, bias and noise as the anatomy around it (a lesion pasted after the noise would
   be given away by its missing noise).
3. **Geometry**: a random affine about the brain's centre (rotation about the three axes, scaling
   with a little anisotropy, small shear, translation) composed with a smooth elastic warp, then
   resampling onto the output grid (`spacing`, same field of view in mm as the template). Thick
   slices (`thickness`, default the output z spacing) are the mean over the slab (a box slice
   profile), as a clinical 2D acquisition averages its slice; finer in-plane output spacings than
   the template's are interpolated, coarser ones are Gaussian-filtered first (no aliasing).
   Masks go through the same map (linear interpolation, kept where >= 0.5).
4. **Scanner**: a gamma change of contrast, a smooth multiplicative bias field, Rician noise
   (the magnitude of a complex image with Gaussian noise in both channels: the dark background
   of a head becomes Rayleigh noise), and an arbitrary gain. A skull-stripped variant is then
   zeroed outside its brain mask, as stripping tools do.

Each stage draws from its own generator seeded from `rng` at the start, so that the same seed with
and without a head or a lesion gives the same subject, pose and scanner (paired healthy/lesioned
volumes). Everything is a pure function of its arguments; there is no file I/O here.

Axes are `(z, y, x)` with z axial (the order `napari_mtml.io.read_image` returns for RAS
volumes); spacings are mm per axis in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "LesionFunction",
    "SmoothField",
    "Template",
    "Variant",
    "VariantSettings",
    "make_variant",
    "random_affine",
    "rician_noise",
    "synthesize_head",
]

#: `lesion(image, brain, spacing, rng) -> (lesioned image, bool lesion mask)`, template space.
LesionFunction = Callable[
    [np.ndarray, np.ndarray, tuple, np.random.Generator], tuple[np.ndarray, np.ndarray]
]

# Stream indices of the per-stage generators (see the module docstring).
_HEAD, _LESION, _GEOMETRY, _CONTRAST, _BIAS, _NOISE = range(6)


# --------------------------------------------------------------------------------------------
# Smooth random fields
# --------------------------------------------------------------------------------------------
class SmoothField:
    """A smooth random field of unit standard deviation over a box of `extent_mm`.

    White noise on a lattice of step `scale_mm / 4` (two cells of margin beyond the box) is
    Gaussian-filtered (sigma 1.5 cells, about 0.4 `scale_mm`) and scaled to unit standard
    deviation; `on_grid` evaluates it at any axis-aligned grid of mm positions by separable
    linear interpolation (positions outside the box are clamped to its margin). Features are
    about `scale_mm` across.
    """

    _PAD = 2

    def __init__(self, extent_mm: Sequence[float], scale_mm: float, rng: np.random.Generator):
        if not scale_mm > 0:
            raise ValueError(f"SmoothField: scale_mm must be positive, got {scale_mm!r}")
        self.step = float(scale_mm) / 4.0
        shape = [int(math.ceil(float(e) / self.step)) + 2 * self._PAD + 1 for e in extent_mm]
        lattice = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5, mode="reflect")
        std = float(lattice.std())
        self.lattice = (lattice - lattice.mean()) / (std if std > 0 else 1.0)

    def on_grid(self, *coords_mm: np.ndarray) -> np.ndarray:
        """The field on the grid `coords_mm[0] x coords_mm[1] x ...` (1D arrays of mm
        positions, one per axis): float32 of shape `(len(c0), len(c1), ...)`."""
        if len(coords_mm) != self.lattice.ndim:
            raise ValueError(f"give {self.lattice.ndim} coordinate arrays, got {len(coords_mm)}")
        out = self.lattice
        for axis, pos in enumerate(coords_mm):
            n = self.lattice.shape[axis]
            idx = np.clip(
                np.asarray(pos, dtype=np.float64) / self.step + self._PAD, 0.0, n - 1.000001
            )
            i0 = np.floor(idx).astype(np.intp)
            w = (idx - i0).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
            lo = np.take(out, i0, axis=axis)
            hi = np.take(out, i0 + 1, axis=axis)
            out = lo + (hi - lo) * w
        return out.astype(np.float32)


def _convex_fill(mask: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """The pixels inside the convex hull of a 2D mask's pixels (the mask itself when it has
    fewer than three non-collinear pixels)."""
    from scipy.spatial import ConvexHull, QhullError

    pts = np.argwhere(mask)
    if len(pts) < 3:
        return mask.copy()
    try:
        hull = ConvexHull(pts)
    except QhullError:  # all pixels on one line
        return mask.copy()
    inside = np.ones(mask.shape, dtype=bool)
    for a, b, c in hull.equations:  # a*y + b*x + c <= 0 inside; half a pixel of tolerance
        inside &= a * yy + b * xx + c <= 0.5
    return inside | mask


def _grid_positions(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
    """Voxel-centre positions in mm along each axis: `(i + 0.5) * spacing`."""
    return [(np.arange(n) + 0.5) * float(s) for n, s in zip(shape, spacing, strict=True)]


# --------------------------------------------------------------------------------------------
# The template
# --------------------------------------------------------------------------------------------
@dataclass
class Template:
    """A healthy template brain: `image` float `(Z, Y, X)` (skull-stripped or not; only the
    voxels inside `brain` are used), `brain` bool of the same shape, `spacing` mm per axis.
    Derived quantities (tissue levels, the intracranial envelope and the distance from it) are
    computed once and cached, so build one `Template` and draw many variants from it."""

    image: np.ndarray
    brain: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        image = np.asarray(self.image, dtype=np.float32)
        brain = np.asarray(self.brain).astype(bool)
        if image.ndim != 3:
            raise ValueError(f"Template: image must be 3D (Z, Y, X), got shape {image.shape}")
        if brain.shape != image.shape:
            raise ValueError(
                f"Template: brain mask shape {brain.shape} differs from the image's {image.shape}"
            )
        if not np.isfinite(image).all():
            raise ValueError("Template: the image holds NaN or infinite values")
        if brain.sum() < 64:
            raise ValueError("Template: the brain mask is (almost) empty")
        spacing = tuple(float(s) for s in self.spacing)
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"Template: spacing must be 3 positive mm values, got {spacing}")
        self.image, self.brain, self.spacing = image, brain, spacing

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        return tuple(n * s for n, s in zip(self.image.shape, self.spacing, strict=True))

    @cached_property
    def centre_mm(self) -> np.ndarray:
        """The brain's centroid in mm (voxel centres at `(i + 0.5) * spacing`)."""
        idx = np.array(ndimage.center_of_mass(self.brain), dtype=np.float64)
        return (idx + 0.5) * np.asarray(self.spacing)

    @cached_property
    def levels(self) -> dict[str, float]:
        """Reference intensities inside the brain: `wm` (90th percentile: white matter on a
        T1), `csf` (1st percentile: ventricles and sulci), `median`, `p99`."""
        v = self.image[self.brain]
        p1, p50, p90, p99 = np.percentile(v, [1, 50, 90, 99])
        return {"wm": float(p90), "csf": float(p1), "median": float(p50), "p99": float(p99)}

    @cached_property
    def envelope(self) -> np.ndarray:
        """The intracranial envelope: the brain mask smoothed over ~3 mm (sulci at the surface
        filled), holes filled; bool, the template's shape."""
        sigma = [3.0 / s for s in self.spacing]
        env = ndimage.gaussian_filter(self.brain.astype(np.float32), sigma) > 0.2
        return ndimage.binary_fill_holes(env | self.brain)

    @cached_property
    def envelope_distance(self) -> np.ndarray:
        """Distance in mm from the envelope (0 inside), float32."""
        return ndimage.distance_transform_edt(~self.envelope, sampling=self.spacing).astype(
            np.float32
        )

    @cached_property
    def cranium(self) -> np.ndarray:
        """The inside of the skull: the convex hull of the envelope in every axial slice (a
        head's outline is convex there, and the skull base fills the notches between the
        temporal lobes, the cerebellum and the brainstem), smoothed over ~2 mm in 3D; bool."""
        hull = np.zeros(self.shape, dtype=bool)
        yy, xx = np.meshgrid(np.arange(self.shape[1]), np.arange(self.shape[2]), indexing="ij")
        for z in range(self.shape[0]):
            hull[z] = _convex_fill(self.envelope[z], yy, xx)
        sigma = [2.0 / s for s in self.spacing]
        smooth = ndimage.gaussian_filter(hull.astype(np.float32), sigma) >= 0.5
        return smooth | self.envelope

    @cached_property
    def cranium_distance(self) -> np.ndarray:
        """Distance in mm from the cranium (0 inside), float32."""
        return ndimage.distance_transform_edt(~self.cranium, sampling=self.spacing).astype(
            np.float32
        )


# --------------------------------------------------------------------------------------------
# Settings and result
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VariantSettings:
    """Ranges of the random draws (every draw is uniform in its range unless said otherwise).

    Geometry: `max_rotation_deg` (about z: in the axial plane; about y; about x: nodding),
    `scale_range` (isotropic scale; the packaged MNI152 brain is ~10 % larger than an average
    adult's, hence the default below 1), `anisotropy` (extra per-axis scale, +-), `max_shear`,
    `max_translation_mm`, `elastic_mm` (standard deviation of the elastic displacement per axis)
    and `elastic_scale_mm` (its feature size).
    Scanner: `gamma_range` (log-uniform), `bias_range` (standard deviation of the log bias field)
    and `bias_scale_mm`, `noise_range` (Rician sigma as a fraction of the white-matter level),
    `gain_range` (log-uniform overall scale of the stored values).
    Head: `csf_mm`, `inner_table_mm`, `diploe_mm`, `outer_table_mm`, `muscle_mm`, `fat_mm`,
    `skin_mm` (layer thickness ranges), `thickness_variation` (relative spatial variation of
    each layer), and intensities as fractions of the white-matter level.
    Set a range to a single value `(v, v)` to fix it; `elastic_mm=0`, `bias_range=(0, 0)`,
    `noise_range=(0, 0)` switch those stages off.
    """

    max_rotation_deg: tuple[float, float, float] = (10.0, 6.0, 12.0)
    scale_range: tuple[float, float] = (0.84, 0.98)
    anisotropy: float = 0.04
    max_shear: float = 0.04
    max_translation_mm: float = 5.0
    elastic_mm: float = 2.0
    elastic_scale_mm: float = 40.0
    gamma_range: tuple[float, float] = (0.75, 1.35)
    bias_range: tuple[float, float] = (0.0, 0.2)
    bias_scale_mm: float = 90.0
    noise_range: tuple[float, float] = (0.01, 0.05)
    gain_range: tuple[float, float] = (0.5, 8.0)
    # head layers (mm)
    csf_mm: tuple[float, float] = (1.0, 3.0)  # cerebrospinal fluid, brain to skull
    inner_table_mm: tuple[float, float] = (1.0, 2.0)
    diploe_mm: tuple[float, float] = (1.0, 3.0)
    outer_table_mm: tuple[float, float] = (0.8, 1.5)
    muscle_mm: tuple[float, float] = (0.5, 1.5)
    fat_mm: tuple[float, float] = (1.5, 4.0)  # subcutaneous fat of the scalp
    skin_mm: tuple[float, float] = (0.8, 1.3)
    thickness_variation: float = 0.35
    # head intensities (fractions of the white-matter level; CSF relative to the template's)
    csf_level: tuple[float, float] = (0.8, 1.1)
    bone_level: tuple[float, float] = (0.03, 0.1)  # the inner table (the outer: x 0.8-1.25)
    diploe_level: tuple[float, float] = (0.35, 0.7)
    muscle_level: tuple[float, float] = (0.35, 0.5)  # the scalp muscle layer
    fat_level: tuple[float, float] = (1.0, 1.3)
    skin_level: tuple[float, float] = (0.5, 0.7)
    texture: float = 0.06


@dataclass
class Variant:
    """One variant: `image` float32 `(Z, Y, X)`, `brain` and `head` bool masks on the same grid
    (`head` is the brain for a skull-stripped variant), `lesion` the bool lesion mask (None
    without a lesion), `spacing` mm per axis, `params` the values drawn (plain floats, lists
    and bools)."""

    image: np.ndarray
    brain: np.ndarray
    head: np.ndarray
    spacing: tuple[float, float, float]
    lesion: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)


def _uniform(rng: np.random.Generator, bounds: Sequence[float]) -> float:
    lo, hi = float(bounds[0]), float(bounds[1])
    if hi < lo:
        raise ValueError(f"a range ({lo}, {hi}) has its upper bound below its lower bound")
    return lo if hi == lo else float(rng.uniform(lo, hi))


def _log_uniform(rng: np.random.Generator, bounds: Sequence[float]) -> float:
    lo, hi = float(bounds[0]), float(bounds[1])
    if not 0 < lo <= hi:
        raise ValueError(f"a log-uniform range ({lo}, {hi}) needs 0 < low <= high")
    return lo if hi == lo else float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


# --------------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------------
def synthesize_head(
    template: Template, rng: np.random.Generator, settings: VariantSettings | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A head with the skull on around the template's brain, on the template's grid.

    Returns `(image float32, head bool, params)`: the template inside the brain mask, the layers
    of the module docstring outside it, 0 (air) beyond the skin; `head` is everything inside the
    skin. Thicknesses and intensities are drawn from `settings`' ranges.

    Parameters
    ----------
    template : Template
    rng : numpy.random.Generator
    settings : VariantSettings, optional

    Returns
    -------
    image : ndarray of float32
    head : ndarray of bool
    params : dict
        The values drawn.
    """
    s = settings or VariantSettings()
    wm, csf = template.levels["wm"], template.levels["csf"]
    names = ("csf", "inner_table", "diploe", "outer_table", "muscle", "fat", "skin")
    thick = [_uniform(rng, getattr(s, f"{n}_mm")) for n in names]
    bone = _uniform(rng, s.bone_level) * wm
    level = {
        "csf": _uniform(rng, s.csf_level) * csf,
        "inner_table": bone,
        "diploe": _uniform(rng, s.diploe_level) * wm,
        "outer_table": bone * _uniform(rng, (0.8, 1.25)),
        "muscle": _uniform(rng, s.muscle_level) * wm,
        "fat": _uniform(rng, s.fat_level) * wm,
        "skin": _uniform(rng, s.skin_level) * wm,
    }
    extent = template.extent_mm
    grid = _grid_positions(template.shape, template.spacing)
    # Skull layers and scalp layers vary independently around the head.
    vary = [SmoothField(extent, 30.0, rng).on_grid(*grid) for _ in range(2)]
    texture = SmoothField(extent, 5.0, rng).on_grid(*grid)

    dist = template.cranium_distance
    env_dist = template.envelope_distance
    total = sum(thick) * (1.0 + 2.0 * s.thickness_variation) + 1.0
    shell = (dist > 0) & (dist <= total)
    d = dist[shell]
    bounds = []
    acc = np.zeros(d.shape, dtype=np.float32)
    for k, t in enumerate(thick):
        f = vary[0][shell] if k < 4 else vary[1][shell]
        acc = acc + np.maximum(0.3, 1.0 + s.thickness_variation * f) * np.float32(t)
        bounds.append(acc)
    layer = np.full(d.shape, len(names), dtype=np.int8)  # beyond the skin: air
    for k in range(len(names) - 1, -1, -1):
        layer[d <= bounds[k]] = k
    # CSF lines the brain's envelope only: next to the skull-base filling the first layer is bone
    layer[(layer == 0) & (env_dist[shell] > bounds[0] + 1.0)] = 1
    values = np.array([level[n] for n in names] + [0.0], dtype=np.float32)[layer]
    values *= 1.0 + np.float32(s.texture) * texture[shell]

    outside = np.zeros(template.shape, dtype=np.float32)
    outside[shell] = values
    # the sulci and the rim between the brain mask and its envelope hold CSF
    sulcal = template.envelope & ~template.brain
    outside[sulcal] = level["csf"] * (1.0 + np.float32(s.texture) * texture[sulcal])
    # skull base (inside the cranium, outside the envelope): CSF next to the brain, then a
    # patchy mix of cortical bone and fatty marrow
    base = template.cranium & ~template.envelope
    near = base & (env_dist <= thick[0])
    outside[near] = level["csf"]
    far = base & ~near
    patch = np.clip(0.4 + 0.6 * SmoothField(extent, 8.0, rng).on_grid(*grid)[far], 0.0, 1.0)
    outside[far] = (level["inner_table"] + (level["diploe"] - level["inner_table"]) * patch) * (
        1.0 + np.float32(s.texture) * texture[far]
    )
    composite = np.where(template.brain, template.image, outside)
    sigma = [0.6 / sp for sp in template.spacing]  # partial volume at the layer boundaries
    soft = ndimage.gaussian_filter(composite, sigma)
    image = np.where(template.brain, template.image, soft).astype(np.float32)
    head = template.cranium.copy()
    head[shell] = layer < len(names)
    params = {f"{n}_mm": round(t, 3) for n, t in zip(names, thick, strict=True)}
    params.update({f"{n}_level": round(float(v) / wm, 3) for n, v in level.items()})
    return image, head, params


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------
def _rotation(axis_plane: tuple[int, int], angle: float) -> np.ndarray:
    r = np.eye(3)
    i, j = axis_plane
    c, s = math.cos(angle), math.sin(angle)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def random_affine(
    rng: np.random.Generator, settings: VariantSettings | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A random 3x3 matrix (rotation @ scale @ shear, in `(z, y, x)` mm) and a translation (mm).

    Rotations: about z (in the axial (y, x) plane), about y (the (z, x) plane) and about x (the
    (z, y) plane, nodding), each uniform within +- `settings.max_rotation_deg`. Returns
    `(matrix, translation, params)`: a template point `p` appears in the variant at
    `c + matrix @ (p - c) + translation`, `c` the brain's centre.

    Parameters
    ----------
    rng : numpy.random.Generator
    settings : VariantSettings, optional

    Returns
    -------
    matrix : ndarray (3, 3)
    translation : ndarray (3,)
        mm.
    params : dict
        The values drawn.
    """
    s = settings or VariantSettings()
    angles = [math.radians(_uniform(rng, (-a, a))) for a in s.max_rotation_deg]
    rot = _rotation((1, 2), angles[0]) @ _rotation((0, 2), angles[1]) @ _rotation((0, 1), angles[2])
    iso = _uniform(rng, s.scale_range)
    scale = np.diag([iso * (1.0 + _uniform(rng, (-s.anisotropy, s.anisotropy))) for _ in range(3)])
    shear = np.eye(3)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        shear[i, j] = _uniform(rng, (-s.max_shear, s.max_shear))
    translation = np.array(
        [_uniform(rng, (-s.max_translation_mm, s.max_translation_mm)) for _ in range(3)]
    )
    matrix = rot @ scale @ shear
    params = {
        "rotation_deg": [round(math.degrees(a), 2) for a in angles],
        "scale": [round(float(v), 4) for v in np.diag(scale)],
        "shear": [round(float(shear[i, j]), 4) for i, j in ((0, 1), (0, 2), (1, 2))],
        "translation_mm": [round(float(v), 2) for v in translation],
    }
    return matrix, translation, params


def _warp(
    arrays: Sequence[np.ndarray],
    template: Template,
    out_shape: tuple[int, ...],
    out_spacing: tuple[float, ...],
    thickness: float,
    matrix: np.ndarray,
    translation: np.ndarray,
    elastic: Sequence[SmoothField] | None,
    elastic_mm: float,
) -> list[np.ndarray]:
    """Backward-map each template-space array onto the output grid (linear interpolation),
    averaging `thickness` mm along z per output slice (box slice profile)."""
    t_sp = np.asarray(template.spacing)
    extent = np.asarray(template.extent_mm)
    centre = template.centre_mm
    inv = np.linalg.inv(matrix)
    # Output voxel centres, the output grid centred in the template's field of view.
    pos = [
        (np.arange(n) + 0.5) * s + (e - n * s) / 2.0
        for n, s, e in zip(out_shape, out_spacing, extent, strict=True)
    ]
    n_sub = max(1, int(math.ceil(thickness / t_sp[0] - 1e-6)))
    offsets = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * thickness
    ny, nx = out_shape[1], out_shape[2]
    chunk = max(1, int(2_000_000 // (n_sub * ny * nx)))
    outs = [np.empty(out_shape, dtype=np.float32) for _ in arrays]
    y = pos[1] - centre[1] - translation[1]
    x = pos[2] - centre[2] - translation[2]
    for start in range(0, out_shape[0], chunk):
        stop = min(out_shape[0], start + chunk)
        zs = (pos[0][start:stop, None] + offsets[None, :]).ravel()
        z = zs - centre[0] - translation[0]
        d = (z[:, None, None], y[None, :, None], x[None, None, :])
        coords = np.empty((3, len(zs), ny, nx), dtype=np.float64)
        for k in range(3):
            p = centre[k] + inv[k, 0] * d[0] + inv[k, 1] * d[1] + inv[k, 2] * d[2]
            if elastic is not None:
                p = p + elastic_mm * elastic[k].on_grid(zs, pos[1], pos[2])
            coords[k] = p / t_sp[k] - 0.5
        for a, out in zip(arrays, outs, strict=True):
            v = ndimage.map_coordinates(
                a, coords, order=1, mode="constant", cval=0.0, prefilter=False
            )
            out[start:stop] = v.reshape(stop - start, n_sub, ny, nx).mean(axis=1)
    return outs


# --------------------------------------------------------------------------------------------
# Scanner
# --------------------------------------------------------------------------------------------
def rician_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """`|image + n1 + i n2|` with `n1, n2 ~ N(0, sigma^2)`: the magnitude image of a complex
    acquisition (Rayleigh noise where the signal is 0). float32, `image`'s shape.

    Parameters
    ----------
    image : ndarray
    sigma : float
    rng : numpy.random.Generator

    Returns
    -------
    ndarray of float32
        `image`'s shape.
    """
    image = np.asarray(image, dtype=np.float32)
    if sigma <= 0:
        return image.copy()
    re = image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    im = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    return np.hypot(re, im).astype(np.float32)


# --------------------------------------------------------------------------------------------
# A variant
# --------------------------------------------------------------------------------------------
def make_variant(
    template: Template,
    rng: np.random.Generator,
    *,
    spacing: Sequence[float] | None = None,
    thickness: float | None = None,
    skull: bool = False,
    lesion: LesionFunction | None = None,
    settings: VariantSettings | None = None,
) -> Variant:
    """One random healthy (or lesioned) variant of `template` (see the module docstring).

    Parameters
    ----------
    template : the `Template`.
    rng : `numpy.random.Generator`; the same generator state gives the same variant.
    spacing : output voxel size `(z, y, x)` in mm; default the template's. The output grid
        covers the template's field of view (its shape is `round(extent / spacing)`).
    thickness : slice thickness in mm (the z extent averaged per output slice); default
        `spacing[0]`. E.g. `spacing=(6.0, 0.85, 0.85)` is a clinical axial 2D T1.
    skull : True: the synthetic head of `synthesize_head`; False: skull-stripped (0 outside
        the brain mask).
    lesion : optional `lesion(image, brain, spacing, rng) -> (image, mask)` applied in the
        template's space before the warps (its mask is warped like the brain mask and
        intersected with it).
    settings : `VariantSettings` (ranges of the random draws).

    Returns
    -------
    Variant with float32 `image`, bool `brain`, `head`, `lesion` on the output grid.
    """
    if not isinstance(template, Template):
        raise ValueError("make_variant: pass a Template (Template(image, brain, spacing))")
    if not isinstance(rng, np.random.Generator):
        raise ValueError("make_variant: rng must be a numpy.random.Generator")
    s = settings or VariantSettings()
    out_spacing = tuple(float(v) for v in (spacing if spacing is not None else template.spacing))
    if len(out_spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in out_spacing):
        raise ValueError(f"make_variant: spacing must be 3 positive mm values, got {spacing}")
    thick = float(thickness) if thickness is not None else out_spacing[0]
    if not (math.isfinite(thick) and thick > 0):
        raise ValueError(f"make_variant: thickness must be a positive mm value, got {thickness}")
    streams = [np.random.default_rng(int(v)) for v in rng.integers(0, 2**63 - 1, size=6)]
    params: dict[str, Any] = {
        "skull": bool(skull),
        "spacing": list(out_spacing),
        "thickness": thick,
    }

    # 1. head (template space)
    if skull:
        image, head, head_params = synthesize_head(template, streams[_HEAD], s)
        params["head"] = head_params
    else:
        image = np.where(template.brain, template.image, np.float32(0.0)).astype(np.float32)
        head = template.brain
    # 2. lesion (template space)
    lesion_mask = None
    if lesion is not None:
        edited, lesion_mask = lesion(image, template.brain, template.spacing, streams[_LESION])
        edited = np.asarray(edited, dtype=np.float32)
        lesion_mask = np.asarray(lesion_mask).astype(bool)
        if edited.shape != image.shape or lesion_mask.shape != image.shape:
            raise ValueError(
                f"make_variant: the lesion function returned shapes "
                f"{edited.shape} / {lesion_mask.shape}, not {image.shape}"
            )
        if not np.isfinite(edited).all():
            raise ValueError("make_variant: the lesion function returned NaN or inf values")
        image = edited if skull else np.where(template.brain, edited, np.float32(0.0))
        lesion_mask &= template.brain
    # 3. geometry
    g = streams[_GEOMETRY]
    matrix, translation, geo_params = random_affine(g, s)
    params.update(geo_params)
    extent = template.extent_mm
    out_shape = tuple(max(1, int(round(e / v))) for e, v in zip(extent, out_spacing, strict=True))
    elastic = (
        [SmoothField(extent, s.elastic_scale_mm, g) for _ in range(3)] if s.elastic_mm > 0 else None
    )
    # anti-aliasing for in-plane output spacings coarser than the template's (z: the slab mean)
    sigma = [0.0] + [
        max(0.0, (o / t - 1.0) / 2.0)
        for o, t in zip(out_spacing[1:], template.spacing[1:], strict=True)
    ]
    arrays = [image, template.brain.astype(np.float32), head.astype(np.float32)]
    if lesion_mask is not None:
        arrays.append(lesion_mask.astype(np.float32))
    if any(v > 0 for v in sigma):
        arrays[0] = ndimage.gaussian_filter(arrays[0], sigma)
    warped = _warp(
        arrays, template, out_shape, out_spacing, thick, matrix, translation, elastic, s.elastic_mm
    )
    image = warped[0]
    brain = warped[1] >= 0.5
    head = (warped[2] >= 0.5) | brain
    lesion_out = (warped[3] >= 0.5) & brain if lesion_mask is not None else None
    if not brain.any():
        raise ValueError(
            "make_variant: the brain left the field of view (spacing or translation too large)"
        )

    # 4. scanner: contrast, bias, noise, gain
    # (levels from the healthy template, so that a lesion does not change the scanner's draws)
    np.maximum(image, 0.0, out=image)
    ref = template.levels["p99"] or 1.0
    gamma = _log_uniform(streams[_CONTRAST], s.gamma_range)
    image = (ref * (image / ref) ** gamma).astype(np.float32)
    wm_level = ref * (template.levels["wm"] / ref) ** gamma
    bias_std = _uniform(streams[_BIAS], s.bias_range)
    if bias_std > 0:
        out_extent = [n * v for n, v in zip(out_shape, out_spacing, strict=True)]
        f = SmoothField(out_extent, s.bias_scale_mm, streams[_BIAS])
        image *= np.exp(np.float32(bias_std) * f.on_grid(*_grid_positions(out_shape, out_spacing)))
    noise = _uniform(streams[_NOISE], s.noise_range)
    image = rician_noise(image, noise * wm_level, streams[_NOISE])
    gain = _log_uniform(streams[_CONTRAST], s.gain_range)
    image *= np.float32(gain / max(wm_level, 1e-6))
    if not skull:
        image[~brain] = 0.0
    params.update(
        {
            "gamma": round(gamma, 4),
            "bias_std": round(bias_std, 4),
            "noise": round(noise, 4),
            "gain": round(gain, 4),
        }
    )
    return Variant(
        image.astype(np.float32, copy=False), brain, head, out_spacing, lesion_out, params
    )
