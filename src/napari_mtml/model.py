"""The U-Net of the paper (METHOD.md §5): nnU-Net-style, 2D or 3D, with a positional encoding.

Layout for ``depth`` stages with widths ``w_s = min(base_features * 2**s, max_features)``:

- Encoder stage ``s``: two ``conv3 -> InstanceNorm(affine) -> GELU`` blocks; the first conv of
  every stage but the first has stride 2 (it replaces pooling).
- Bottleneck (the last encoder stage): its second conv already reduces to the width of the skip
  connection it will meet, ``w_{depth-2}``.
- Decoder stage for skip ``s``: (bi|tri)linear x2 upsampling (no parameters), concatenation with
  the skip (``2 w_s`` channels), then a conv ``2 w_s -> w_s`` and a conv ``w_s -> w_{s-1}`` (the
  last decoder stage keeps ``w_0``). This is how nnU-Net's generic U-Net reduces channels when it
  upsamples by interpolation instead of transposed convolutions; with it the presets have exactly
  the paper's sizes: 13,889,600 parameters in 3D (13.9 M) and 29,124,704 in 2D (29.1 M). (Other
  plausible designs miss: a 1x1 conv after upsampling gives 15.7 M / 31.4 M, concatenating the
  full upsampled width gives 16.6 M / 31.5 M.)
- Head: a 1x1 conv to one channel, no bias, no activation (regression against the soft label).

Positional encoding (``pos_encoding=True``): ``n`` channels of normalised coordinates in
``[-1, 1]`` and 64 Gaussian random Fourier features (``sin`` and ``cos`` of
``2 pi B u`` for the coordinates ``u`` in ``[0, 1)`` and a fixed ``32 x n`` matrix
``B ~ N(0, 1) * 12`` drawn from seed 42), so ``1 + n + 64`` input channels. The encoding is built
once for the model's fixed ``frame`` and kept as a buffer (not saved in the state dict: it is a
function of the constructor arguments).

Exact saving: the encoding is the same for every sample, so the first convolution is split into
its image part (1 input channel, run per sample) and its encoding part (``n + 64`` channels, run
once per forward with batch 1 and broadcast over the batch). Convolution is linear and the
padding is zeros, so this is the same function as one conv over the concatenated input; the
parameters and the state dict are those of that single conv. Without gradients (inference,
validation under ``torch.no_grad``) the encoding part is cached until the weights change.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_mtml.config import MODEL_PRESETS

__all__ = ["UNet", "count_parameters", "positional_encoding", "PAPER_PRESETS", "LIGHT_PRESETS"]


def _preset(name: str) -> dict[int, dict[str, int]]:
    # One table of presets for the whole package: the run configuration's (torch-free) one.
    return {
        dims: {"base_features": base, "depth": depth, "max_features": maxf}
        for dims, (base, depth, maxf) in MODEL_PRESETS[name].items()
    }


#: Constructor arguments of the paper's models (METHOD.md §5), by number of spatial dims:
#: 3D 32-64-128-256-320, depth 5; 2D depth 7 with widths capped at 512.
PAPER_PRESETS = _preset("paper")
#: Half the paper's widths everywhere, same depth: about a quarter of the parameters and of the
#: convolution work, for training on a workstation CPU.
LIGHT_PRESETS = _preset("light")

_FOURIER_FEATURES = 32
_FOURIER_SCALE = 12.0
_FOURIER_SEED = 42


def positional_encoding(frame: Sequence[int]) -> np.ndarray:
    """The paper's positional encoding for a spatial ``frame``.

    Parameters
    ----------
    frame : sequence of int
        Spatial size, ``(H, W)`` or ``(D, H, W)``.

    Returns
    -------
    numpy.ndarray
        float32, shape ``(n + 64, *frame)`` for ``n = len(frame)``: first ``n`` channels of
        coordinates going linearly from -1 to 1 along each axis (both ends included), then 32
        ``sin`` and 32 ``cos`` channels of ``2 pi B u``, ``u`` the coordinates in ``[0, 1)``
        (``i / size``) and ``B`` a ``32 x n`` matrix ``N(0, 1) * 12`` from a local generator with
        seed 42 (the same matrix in every process, no global random state).
    """
    frame = tuple(int(s) for s in frame)
    n = len(frame)
    coords = np.stack(
        np.meshgrid(*[np.linspace(-1.0, 1.0, s) for s in frame], indexing="ij"), axis=0
    )
    unit = np.stack(np.meshgrid(*[np.arange(s) / s for s in frame], indexing="ij"), axis=0)
    b = np.random.default_rng(_FOURIER_SEED).standard_normal((_FOURIER_FEATURES, n))
    b *= _FOURIER_SCALE
    phase = 2.0 * np.pi * np.tensordot(b, unit, axes=(1, 0))
    return np.concatenate([coords, np.sin(phase), np.cos(phase)], axis=0).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _encoding_tensor(frame: tuple[int, ...]) -> torch.Tensor:
    """`positional_encoding(frame)` as a ``(1, n + 64, *frame)`` tensor, built once per frame.

    Memoised: the models of an ensemble (and every model of a training run) share one frame, and
    the 3D encoding (67 x 80 x 112 x 80 floats, 192 MB) takes ~2 s to build. Nothing writes to
    it: the models hold it as a non-persistent buffer and only read it (moving a model to another
    device or dtype makes that model its own copy).
    """
    return torch.from_numpy(positional_encoding(frame))[None]


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``model``.

    Parameters
    ----------
    model : torch.nn.Module
    trainable_only : bool

    Returns
    -------
    int
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _autocast_state(t: torch.Tensor) -> tuple:
    """What autocast would do to ``t``'s ops now (part of the encoding cache key)."""
    dev = t.device.type
    try:
        on = torch.is_autocast_enabled(dev)
        return (on, torch.get_autocast_dtype(dev) if on else None)
    except (TypeError, AttributeError, RuntimeError):  # torch < 2.4, or a device without autocast
        return (torch.is_autocast_enabled(), torch.is_autocast_cpu_enabled())


class _ConvNormAct(nn.Sequential):
    """``conv(kernel 3, padding 1, bias) -> InstanceNorm(affine) -> GELU``."""

    def __init__(self, dims: int, c_in: int, c_out: int, stride: int = 1, device=None):
        conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(
            c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=True, device=device
        )
        norm = (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(
            c_out, affine=True, device=device
        )
        super().__init__(OrderedDict(conv=conv, norm=norm, act=nn.GELU()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        return self.norm_act(_conv_nd(x, conv.weight, conv.bias, conv.stride[0]))

    def norm_act(self, h: torch.Tensor) -> torch.Tensor:
        """``act(norm(h))`` of a conv output; in place on `h` when no graph needs it."""
        if h.requires_grad or h.dtype != torch.float32:
            return self.act(self.norm(h))
        return _instance_norm_gelu_(h, self.norm)


def _direct_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a 3D float32 convolution without a graph should call oneDNN directly.

    torch picks its reference ("slow") 3D convolution for a batch of one whose
    ``channels x depth x height`` is at most 20,480: the image share of the first conv (one
    channel) and the 10x14x10 bottleneck of the 80x112x80 frame; oneDNN runs them 1.8-3x faster
    (`benchmarks/bench_inference.py`). Training (a graph, autocast) keeps torch's own choice.
    """
    return (
        x.ndim == 5
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def _conv_nd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1
) -> torch.Tensor:
    """A kernel-3, padding-1 convolution (2D or 3D from `x`), oneDNN directly where
    `_direct_onednn` says so; the same sums up to float rounding."""
    n = x.ndim - 2
    if _direct_onednn(x, weight):
        return torch.mkldnn_convolution(x, weight, bias, [1] * n, [stride] * n, [1] * n, 1)
    return (F.conv2d if n == 2 else F.conv3d)(x, weight, bias, stride=stride, padding=1)


def _upsample2_cat(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``cat([interpolate(h, size=skip's, linear, align_corners=False), skip], dim=1)`` without a
    graph, for a skip exactly twice `h`'s size on every axis: one axis at a time (an output
    voxel is 3/4 of its nearest input and 1/4 of the next, the edge repeated), the last pass
    written straight into the joined tensor (torch's trilinear kernel and the separate copy of
    `cat` took 0.3 s of a 5-fold 3D light prediction). Float rounding apart, the same values."""
    c = h.shape[1]
    joined = torch.empty(
        (h.shape[0], c + skip.shape[1], *skip.shape[2:]), dtype=h.dtype, device=h.device
    )
    joined[:, c:].copy_(skip)
    x = h
    last = h.ndim - 1
    for axis in range(2, h.ndim):
        n = x.shape[axis]
        if axis == last:
            out = joined[:, :c]
        else:
            shape = list(x.shape)
            shape[axis] = 2 * n
            out = torch.empty(shape, dtype=x.dtype, device=x.device)
        pairs = out.unflatten(axis, (n, 2))
        even, odd = pairs.select(axis + 1, 0), pairs.select(axis + 1, 1)
        if n > 1:
            torch.lerp(
                x.narrow(axis, 1, n - 1),
                x.narrow(axis, 0, n - 1),
                0.25,
                out=even.narrow(axis, 1, n - 1),
            )
            torch.lerp(
                x.narrow(axis, 0, n - 1),
                x.narrow(axis, 1, n - 1),
                0.25,
                out=odd.narrow(axis, 0, n - 1),
            )
        even.narrow(axis, 0, 1).copy_(x.narrow(axis, 0, 1))
        odd.narrow(axis, n - 1, 1).copy_(x.narrow(axis, n - 1, 1))
        x = out
    return joined


def _instance_norm_gelu_(h: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """``GELU(InstanceNorm(h))`` in place on a float32 tensor no graph needs (inference,
    validation): two passes over `h` for the statistics and two in place, where the norm and the
    activation each wrote a new tensor (a 5-fold 3D light prediction spent 0.6 s in them).
    The same function to float32 rounding: mean first, then the biased variance of the centred
    values, as `torch.instance_norm` computes them."""
    spatial = tuple(range(2, h.ndim))
    shape = (1, -1) + (1,) * (h.ndim - 2)
    h.sub_(h.mean(spatial, keepdim=True))
    n = math.prod(h.shape[2:])
    var = torch.linalg.vector_norm(h, dim=spatial, keepdim=True).square_().div_(n)
    scale = torch.rsqrt(var.add_(norm.eps)).mul_(norm.weight.view(shape))
    h.mul_(scale).add_(norm.bias.view(shape))
    return torch.ops.aten.gelu_(h)


class UNet(nn.Module):
    """nnU-Net-style U-Net with one output channel and no final activation.

    Parameters
    ----------
    dims : {2, 3}
        Number of spatial dimensions.
    frame : sequence of int, or None
        The fixed spatial input size, ``(H, W)`` or ``(D, H, W)``; every entry must be divisible
        by ``2 ** (depth - 1)``. Required with ``pos_encoding`` (the encoding is built for it);
        ``None`` without it accepts any divisible size.
    base_features : int
        Width of the first stage (32 in the paper). Widths double per stage.
    max_features : int or None
        Width cap; ``None`` = the paper's (320 in 3D, 512 in 2D).
    depth : int or None
        Number of stages (``depth - 1`` stride-2 downsamplings), at least 2; ``None`` = the
        paper's (5 in 3D, 7 in 2D).
    pos_encoding : bool
        Append the positional encoding (``n + 64`` channels) to the image (default on).
    init_seed : int or None
        Seed of a local ``torch.Generator`` for the He-normal initialisation: the same seed gives
        the same weights; ``None`` draws from torch's default generator (never seeded here).
    initialise : bool
        ``False`` skips every initialisation (torch's default and the He-normal one): the
        parameters are allocated uninitialised, to be filled by ``load_state_dict`` (what
        `napari_mtml.inference.load_ensemble` does; 5 paper models load ~1 s faster).

    Forward: ``(B, 1, *frame)`` float -> ``(B, 1, *frame)``, same dtype (float32 in, float32 out;
    under ``torch.autocast`` the autocast dtype). Anything else raises ``ValueError``.

    Attributes
    ----------
    split_encoding : bool
        ``True`` (default) computes the encoding's share of the first convolution once per
        forward (see the module docstring); ``False`` runs the plain conv over the concatenated
        input (for checks and benchmarks; same function, same parameters).
    """

    def __init__(
        self,
        dims: int,
        frame: Sequence[int] | None,
        base_features: int = 32,
        max_features: int | None = None,
        depth: int | None = None,
        pos_encoding: bool = True,
        init_seed: int | None = None,
        initialise: bool = True,
    ):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"UNet: dims must be 2 or 3, got {dims!r}.")
        preset = PAPER_PRESETS[dims]
        max_features = preset["max_features"] if max_features is None else int(max_features)
        depth = preset["depth"] if depth is None else int(depth)
        base_features = int(base_features)
        if depth < 2:
            raise ValueError(f"UNet: depth must be at least 2 (one downsampling), got {depth}.")
        if base_features < 1 or max_features < base_features:
            raise ValueError(
                f"UNet: need 1 <= base_features <= max_features, got base_features="
                f"{base_features}, max_features={max_features}."
            )
        if frame is None:
            if pos_encoding:
                raise ValueError(
                    "UNet: the positional encoding needs a fixed frame; pass frame=(H, W) or "
                    "(D, H, W), or pos_encoding=False."
                )
        else:
            frame = tuple(int(s) for s in frame)
            self._check_frame(frame, dims, depth)

        self.dims = dims
        self.frame = frame
        self.base_features = base_features
        self.max_features = max_features
        self.depth = depth
        self.pos_encoding = bool(pos_encoding)
        self.init_seed = init_seed
        self.split_encoding = True
        self.widths = [min(base_features * 2**s, max_features) for s in range(depth)]
        self._upsample_mode = "bilinear" if dims == 2 else "trilinear"
        self._conv_fn = F.conv2d if dims == 2 else F.conv3d
        self._encoding_cache: tuple[tuple, torch.Tensor] | None = None

        n_encoding = dims + 2 * _FOURIER_FEATURES if self.pos_encoding else 0
        if self.pos_encoding:
            self.register_buffer("encoding", _encoding_tensor(tuple(frame)), persistent=False)
        else:
            self.encoding = None

        w = self.widths
        # without initialisation the layers are built on the meta device (no memory, no random
        # draws) and materialised uninitialised below
        device = None if initialise else torch.device("meta")
        self.encoder = nn.ModuleList()
        c_in = 1 + n_encoding
        for s in range(depth):
            # The bottleneck's second conv reduces to the width of the skip it is joined with.
            c_out2 = w[s] if s < depth - 1 else w[depth - 2]
            self.encoder.append(
                nn.Sequential(
                    _ConvNormAct(dims, c_in, w[s], stride=1 if s == 0 else 2, device=device),
                    _ConvNormAct(dims, w[s], c_out2, device=device),
                )
            )
            c_in = w[s]
        self.decoder = nn.ModuleList()
        for s in range(depth - 2, -1, -1):
            c_out2 = w[s - 1] if s > 0 else w[0]
            self.decoder.append(
                nn.Sequential(
                    _ConvNormAct(dims, 2 * w[s], w[s], device=device),
                    _ConvNormAct(dims, w[s], c_out2, device=device),
                )
            )
        self.head = (nn.Conv2d if dims == 2 else nn.Conv3d)(
            w[0], 1, kernel_size=1, bias=False, device=device
        )
        if initialise:
            self._init_weights(init_seed)
        else:
            for module in (self.encoder, self.decoder, self.head):
                module.to_empty(device="cpu")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def paper(cls, dims: int, frame: Sequence[int], **kwargs) -> UNet:
        """The paper's model: 3D 32-64-128-256-320 (13.9 M), 2D 7 stages capped at 512 (29.1 M)."""
        return cls(dims, frame, **{**PAPER_PRESETS[dims], **kwargs})

    @classmethod
    def light(cls, dims: int, frame: Sequence[int], **kwargs) -> UNet:
        """Half the paper's widths (16 base features), same depth: 3.5 M (3D) / 7.3 M (2D)."""
        return cls(dims, frame, **{**LIGHT_PRESETS[dims], **kwargs})

    def model_kwargs(self) -> dict:
        """Plain (JSON-able) constructor arguments: ``UNet(**net.model_kwargs())`` rebuilds it."""
        return {
            "dims": self.dims,
            "frame": None if self.frame is None else list(self.frame),
            "base_features": self.base_features,
            "max_features": self.max_features,
            "depth": self.depth,
            "pos_encoding": self.pos_encoding,
            "init_seed": self.init_seed,
        }

    @property
    def divisor(self) -> int:
        """Every spatial input size must be a multiple of this (``2 ** (depth - 1)``)."""
        return 2 ** (self.depth - 1)

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_frame(frame: tuple, dims: int, depth: int) -> None:
        if len(frame) != dims:
            raise ValueError(
                f"UNet: frame {frame} has {len(frame)} axes but dims={dims}; give one size per "
                "spatial axis."
            )
        div = 2 ** (depth - 1)
        if any(s < 1 or s % div for s in frame):
            fit = tuple(max(div, math.ceil(s / div) * div) for s in frame)
            raise ValueError(
                f"UNet: every frame size must be a positive multiple of 2**(depth-1) = {div} "
                f"(depth {depth}); got {frame}. Pad to {fit} or use a smaller depth."
            )
        if math.prod(s // div for s in frame) < 2:
            raise ValueError(
                f"UNet: the frame {frame} shrinks to a single voxel after {depth - 1} "
                "downsamplings, where instance normalisation is undefined; use a larger frame "
                "or a smaller depth."
            )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.dims + 2 or x.shape[1] != 1:
            raise ValueError(
                f"UNet: expected input of shape (batch, 1, *spatial) with {self.dims} spatial "
                f"axes, got {tuple(x.shape)}."
            )
        spatial = tuple(x.shape[2:])
        if self.pos_encoding and spatial != self.frame:
            raise ValueError(
                f"UNet: this model is tied to the frame {self.frame} (its positional encoding "
                f"is built for it) but the input's spatial size is {spatial}; bring the image "
                "into the frame first (napari_mtml.preprocess.to_frame)."
            )
        if not self.pos_encoding and spatial != self.frame:
            # fully convolutional without the encoding: any size the U-Net divides
            self._check_frame(spatial, self.dims, self.depth)

    # ------------------------------------------------------------------ weights
    def _init_weights(self, seed: int | None) -> None:
        generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        # He-normal init as in nnU-Net (leaky slope 1e-2, close to GELU's behaviour near 0).
        gain = math.sqrt(2.0 / (1.0 + 1e-2**2))
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                    fan_in = m.weight[0].numel()
                    w = torch.randn(m.weight.shape, generator=generator, dtype=m.weight.dtype)
                    m.weight.copy_(w * (gain / math.sqrt(fan_in)))
                    if m.bias is not None:
                        m.bias.zero_()

    # ------------------------------------------------------------------ forward
    def _encoding_term(self, weight: torch.Tensor) -> torch.Tensor:
        """The encoding's share of the first conv, shape ``(1, w0, *frame)``."""
        needs_graph = torch.is_grad_enabled() and weight.requires_grad
        # In-place updates (optimiser steps, load_state_dict) bump _version: the key goes stale.
        try:
            version = weight._version
        except RuntimeError:  # an inference tensor keeps no version counter: do not cache
            version = None
        key = (id(weight), version, weight.data_ptr(), weight.device, weight.dtype)
        key += _autocast_state(weight)
        if version is None:
            needs_graph = True  # (never cached below)
        if not needs_graph and self._encoding_cache is not None:
            cached_key, cached = self._encoding_cache
            if cached_key == key:
                return cached
        encoding = self.encoding.to(dtype=weight.dtype)
        term = self._conv_fn(encoding, weight[:, 1:], None, stride=1, padding=1)
        if needs_graph:
            # A graph-holding value must not outlive this forward.
            self._encoding_cache = None
        else:
            self._encoding_cache = (key, term.detach())
        return term

    def _first_conv(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.encoder[0][0].conv
        if not self.pos_encoding:
            return _conv_nd(x, conv.weight, conv.bias)
        if not self.split_encoding:
            encoding = self.encoding.to(dtype=x.dtype).expand(x.shape[0], *self.encoding.shape[1:])
            return conv(torch.cat([x, encoding], dim=1))
        image_term = _conv_nd(x, conv.weight[:, :1], conv.bias)
        term = self._encoding_term(conv.weight)
        if image_term.requires_grad or image_term.dtype != term.dtype:
            return image_term + term
        return image_term.add_(term)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """The 1x1 head as one matrix product over the voxels (the same sums: oneDNN's 1x1
        conv to one channel ran at 0.5 GFLOPS, 45 ms of a 3D light forward against 5)."""
        weight = self.head.weight
        b, c = h.shape[:2]
        flat = h.reshape(b, c, -1)
        out = torch.matmul(weight.reshape(1, c).to(flat.dtype), flat)
        return out.reshape(b, 1, *h.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, *frame)`` -> ``(B, 1, *frame)`` anomaly map (unbounded regression output)."""
        self._check_input(x)
        skips = []
        h = x
        for s, stage in enumerate(self.encoder):
            if s == 0:
                first = stage[0]
                h = first.norm_act(self._first_conv(x))
                h = stage[1](h)
            else:
                h = stage(h)
            skips.append(h)
        h = skips.pop()
        for stage in self.decoder:
            skip = skips.pop()
            if not h.requires_grad and skip.shape[2:] == tuple(2 * s for s in h.shape[2:]):
                h = stage(_upsample2_cat(h, skip))
                continue
            h = F.interpolate(h, size=skip.shape[2:], mode=self._upsample_mode, align_corners=False)
            h = stage(torch.cat([h, skip], dim=1))
        return self._head(h)

    def extra_repr(self) -> str:
        return (
            f"dims={self.dims}, frame={self.frame}, widths={self.widths}, "
            f"pos_encoding={self.pos_encoding}"
        )
