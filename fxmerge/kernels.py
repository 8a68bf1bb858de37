"""Exact composition algebra for convolutions: no graph code, float64 inside.

Everything here rests on one representation. Inside a linear span, every tensor
``t`` is an affine function of the span's input ``x`` (``x`` already padded by the
span's total padding, the *front-padded layout*)::

    t[n, o, p] = bias[o] + sum_{i, d} weight[o, i, d] * x[n, i, p * stride + offset + d]

for every output channel ``o`` and spatial index ``p`` (``p``, ``d``, ``stride`` and
``offset`` are tuples over the spatial dims). That is a :class:`LinearMap`. Each
linear op maps a LinearMap to a LinearMap exactly:

* an unpadded conv ``w`` (stride ``s``, dilation ``r``) after ``t`` gives stride
  ``s * stride`` and kernel ``sum_c sum_k w[:, c, k] * weight[c, :, d - k * r * stride]``,
  a full correlation computed with ``conv_transpose`` — kernel size
  ``k1 + (k2 - 1) * s1`` for two dense convs; the bias becomes
  ``b2 + (sum over taps of w) @ b1``;
* a per-channel affine (eval BatchNorm with its own eps, a constant scale/shift)
  scales rows of ``weight`` and maps the bias;
* cropping ``r`` leading elements (how a skip is aligned inside a span) adds
  ``r * stride`` to ``offset``;
* ``add`` of two maps with one stride sums their kernels placed at their offsets
  (an identity skip is a Dirac kernel at the aligned tap, a projection shortcut its
  kernel at the matching offset); ``cat`` stacks output channels;
* a *side bias* — a tensor ``s`` of one value per sample and channel (``(N, C, 1, …)``,
  computed outside the span: a diffusion time embedding) added inside the span — is
  carried as a term ``A @ s[n]`` of the map (``LinearMap.sides``): :func:`add_side`
  starts it with ``A = I``; a later conv maps it to ``(Σ_spatial w) @ A``, exactly as
  it maps the bias, because ``s`` is constant over space and the conv is unpadded
  (the span's padding is in front), so every tap reads it, borders included; an
  affine scales its rows; ``add`` sums the terms of one tensor, ``cat`` stacks them.

At the end :func:`to_conv` reads the map back as one ``nn.Conv`` applied to the
*unpadded* input with padding ``P - offset``; the merged span computes that conv
plus ``A @ s`` for each side term (``merge`` emits those). Grouped and depthwise kernels are
expanded to dense block-diagonal ones for the algebra; a boolean channel
*connectivity* matrix travels alongside, and the result is emitted with the
coarsest grouping that connectivity allows (depthwise again when every factor was
depthwise). Connectivity is structural, so the grouping never depends on weight
values.

Why the padding layout matters: a conv that pads its own input sees zeros at the
border, but those zeros are not the previous conv applied to a zero-padded input
(the previous conv's bias and its receptive field make them non-zero). Moving all of
a span's padding in front of its first conv — ``P = sum_k p_k * prod_{j<k} s_j``,
later convs unpadded — makes the chain one affine map of the padded input, so the
merged conv is exact everywhere, borders included (:func:`span_padding`).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

Ints = tuple[int, ...]

_TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _tuple(value, dims: int) -> Ints:
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(int(v) for v in value)
    if len(value) == 1 and dims > 1:
        return value * dims
    return value


@dataclass(frozen=True)
class ConvParams:
    """A convolution's tensors and settings (what ``nn.Conv1d/2d`` holds)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: Ints
    padding: Ints
    dilation: Ints
    groups: int = 1
    padding_mode: str = "zeros"
    transposed: bool = False

    @property
    def dims(self) -> int:
        return self.weight.dim() - 2

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel_size(self) -> Ints:
        return tuple(self.weight.shape[2:])

    def to_module(self) -> torch.nn.Module:
        cls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[self.dims]
        module = cls(
            self.in_channels,
            self.out_channels,
            tuple(self.weight.shape[2:]),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
        ).to(dtype=self.weight.dtype, device=self.weight.device)
        with torch.no_grad():
            module.weight.copy_(self.weight)
            if self.bias is not None:
                module.bias.copy_(self.bias)
        return module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[self.dims]
        return conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


@dataclass(frozen=True)
class Footprint:
    """The geometry of a linear map, without weights: what one merged conv will look like.

    ``t[o, p]`` reads input positions ``p * stride + offset + d`` for ``d`` below
    ``kernel``; ``groups`` is the grouping the composition keeps. This is the single
    definition of how geometry composes: the span graph uses it to predict the merged
    conv of every option (and the latency table times that prediction), and
    :class:`LinearMap` uses it for the geometry of the conv ``merge`` emits.
    """

    kernel: Ints
    stride: Ints
    offset: Ints
    groups: int
    channels_in: int
    channels_out: int

    @classmethod
    def identity(cls, channels: int, dims: int) -> Footprint:
        return cls((1,) * dims, (1,) * dims, (0,) * dims, channels, channels, channels)

    @classmethod
    def of_conv(cls, conv) -> Footprint:
        """A conv (anything with kernel_size, stride, padding, dilation, groups, in/out_channels)."""
        kernel = tuple((k - 1) * d + 1 for k, d in zip(conv.kernel_size, conv.dilation))
        offset = tuple(-p for p in conv.padding)
        return cls(kernel, tuple(conv.stride), offset, conv.groups, conv.in_channels, conv.out_channels)

    def then(self, after: Footprint) -> Footprint:
        """``after`` applied to this map's output: extents grow by ``(k - 1) * stride``."""
        return Footprint(
            kernel=tuple((ka - 1) * s + k for ka, s, k in zip(after.kernel, self.stride, self.kernel)),
            stride=tuple(sa * s for sa, s in zip(after.stride, self.stride)),
            offset=tuple(o + oa * s for o, oa, s in zip(self.offset, after.offset, self.stride)),
            groups=math.gcd(self.groups, after.groups),
            channels_in=self.channels_in,
            channels_out=after.channels_out,
        )

    def crop(self, leading: Ints) -> Footprint:
        """Drop ``leading`` output elements per spatial dim (how a skip is aligned)."""
        offset = tuple(o + r * s for o, r, s in zip(self.offset, leading, self.stride))
        return replace(self, offset=offset)

    @staticmethod
    def combine(parts: list[Footprint], kind: str) -> Footprint:
        """The common frame of maps of one input joined by ``add`` or channel ``cat``."""
        strides = {p.stride for p in parts}
        if len(strides) != 1:
            raise ValueError(f"cannot join maps with different strides {sorted(strides)}: their grids do not align")
        dims = len(parts[0].kernel)
        offset = tuple(min(p.offset[d] for p in parts) for d in range(dims))
        kernel = tuple(max(p.offset[d] + p.kernel[d] for p in parts) - offset[d] for d in range(dims))
        if kind == "add":
            groups, out = math.gcd(*[p.groups for p in parts]), parts[0].channels_out
        else:
            groups, out = (parts[0].groups if len(parts) == 1 else 1), sum(p.channels_out for p in parts)
        return Footprint(kernel, parts[0].stride, offset, groups, parts[0].channels_in, out)


# --------------------------------------------------------------------- LinearMap
Sides = tuple[tuple[Hashable, torch.Tensor], ...]


@dataclass(frozen=True)
class LinearMap:
    """``t[n, o, p] = bias[o] + sum_k (A_k @ s_k[n])[o] + sum weight[o, i, d] * x[n, i, p * stride + offset + d]``.

    ``weight`` is dense float64 ``[C_out, C_in, *kernel]``; ``connectivity`` is a
    bool ``[C_out, C_in]`` saying which channel pairs are structurally connected.
    ``sides`` holds one ``(key, A_k)`` per side bias ``s_k`` (``key`` names it, e.g. its
    FX node; ``A_k`` is float64 ``[C_out, C_k]``): per-sample terms constant over space.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    stride: Ints
    offset: Ints
    connectivity: torch.Tensor
    sides: Sides = ()

    @property
    def dims(self) -> int:
        return self.weight.dim() - 2

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def kernel_size(self) -> Ints:
        return tuple(self.weight.shape[2:])

    @property
    def footprint(self) -> Footprint:
        """The map's geometry (its grouping is read off ``connectivity`` by :func:`to_conv`)."""
        return Footprint(self.kernel_size, self.stride, self.offset, 1, self.in_channels, self.out_channels)


def identity(channels: int, dims: int, *, device=None) -> LinearMap:
    """The span input itself: a Dirac kernel of size 1."""
    weight = torch.zeros((channels, channels) + (1,) * dims, dtype=torch.float64, device=device)
    eye = torch.eye(channels, dtype=torch.float64, device=device)
    weight.view(channels, channels)[...] = eye
    return LinearMap(
        weight=weight,
        bias=torch.zeros(channels, dtype=torch.float64, device=device),
        stride=(1,) * dims,
        offset=(0,) * dims,
        connectivity=eye.bool(),
    )


def _is_identity(value: LinearMap) -> bool:
    if value.in_channels != value.out_channels or any(k != 1 for k in value.kernel_size):
        return False
    if any(s != 1 for s in value.stride) or any(o != 0 for o in value.offset):
        return False
    eye = torch.eye(value.out_channels, dtype=value.weight.dtype, device=value.weight.device)
    return bool(torch.equal(value.weight.reshape(eye.shape), eye))


def dense_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Expand a grouped kernel ``[C_out, C_in / g, *k]`` to block-diagonal ``[C_out, C_in, *k]``."""
    if groups == 1:
        return weight
    c_out, c_in_per_group = weight.shape[:2]
    out_per_group = c_out // groups
    dense = weight.new_zeros((c_out, c_in_per_group * groups) + tuple(weight.shape[2:]))
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        cols = slice(g * c_in_per_group, (g + 1) * c_in_per_group)
        dense[rows, cols] = weight[rows]
    return dense


def group_connectivity(c_out: int, c_in: int, groups: int) -> torch.Tensor:
    out_group = torch.arange(c_out) // (c_out // groups)
    in_group = torch.arange(c_in) // (c_in // groups)
    return out_group[:, None] == in_group[None, :]


def then_conv(
    value: LinearMap,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Ints,
    dilation: Ints,
    groups: int = 1,
) -> LinearMap:
    """Apply an *unpadded* conv to ``value``; exact for any stride, dilation and groups."""
    dims = value.dims
    stride, dilation = _tuple(stride, dims), _tuple(dilation, dims)
    if weight.dim() - 2 != dims:
        raise ValueError(f"cannot compose a {weight.dim() - 2}-d conv with a {dims}-d span")
    c_in = weight.shape[1] * groups
    if c_in != value.out_channels:
        raise ValueError(
            f"channel mismatch: the conv expects {c_in} input channels but its input has {value.out_channels}"
        )
    w = weight.detach().to(torch.float64)
    c_out, c_mid = w.shape[0], c_in
    kernel = tuple(w.shape[2:])
    per_out, per_mid = c_out // groups, c_mid // groups
    if all(k == 1 for k in kernel):
        # a pointwise conv mixes channels only: a (block-diagonal) matrix product
        old = value.weight.reshape(groups, per_mid, -1)
        combined = torch.bmm(w.reshape(groups, per_out, per_mid), old).reshape((c_out,) + tuple(value.weight.shape[1:]))
    elif _is_identity(value) and all(d == 1 for d in dilation):
        combined = dense_weight(w, groups)  # the first conv of a span is its own kernel
    else:
        # full correlation of the earlier kernel with this one, dilated by dilation * stride:
        # new[o, i, t] = sum_c sum_k w[o, c, k] * old[c, i, t - k * dilation * stride],
        # as a transposed conv over the batch of the earlier kernel's input channels;
        # grouped kernels stay grouped ([C_mid, C_out / g, *k] per group)
        step = tuple(r * s for r, s in zip(dilation, value.stride))
        transposed = w.reshape((groups, per_out, per_mid) + kernel).transpose(1, 2).reshape((c_mid, per_out) + kernel)
        combined = _TRANSPOSED[dims](value.weight.transpose(0, 1), transposed, dilation=step, groups=groups).transpose(
            0, 1
        )
    spatial_sums = w.flatten(2).sum(-1).reshape(groups, per_out, per_mid)
    new_bias = torch.bmm(spatial_sums, value.bias.reshape(groups, per_mid, 1)).reshape(c_out)
    sides = tuple(
        (key, torch.bmm(spatial_sums, matrix.reshape(groups, per_mid, -1)).reshape(c_out, -1))
        for key, matrix in value.sides
    )
    if bias is not None:
        new_bias = new_bias + bias.detach().to(torch.float64)
    reach = value.connectivity.reshape(groups, per_mid, -1).any(dim=1)  # [g, C_in(span)]
    connectivity = reach.repeat_interleave(per_out, dim=0)
    geometry = value.footprint.then(Footprint.of_conv(_UnpaddedConv(kernel, stride, dilation, groups, c_in, c_out)))
    if tuple(combined.shape[2:]) != geometry.kernel:  # pragma: no cover - the two algebras disagree
        raise AssertionError(f"composed kernel {tuple(combined.shape[2:])} != footprint {geometry.kernel}")
    return LinearMap(
        weight=combined.contiguous(),
        bias=new_bias,
        stride=geometry.stride,
        offset=geometry.offset,
        connectivity=connectivity,
        sides=sides,
    )


@dataclass(frozen=True)
class _UnpaddedConv:
    """The geometry of a conv inside a span (its padding moved in front)."""

    kernel_size: Ints
    stride: Ints
    dilation: Ints
    groups: int
    in_channels: int
    out_channels: int

    @property
    def padding(self) -> Ints:
        return (0,) * len(self.kernel_size)


def then_affine(value: LinearMap, scale: torch.Tensor | float, shift: torch.Tensor | float) -> LinearMap:
    """Apply ``t * scale + shift`` with per-channel (or scalar) ``scale`` and ``shift``."""
    c = value.out_channels
    scale = torch.as_tensor(scale, dtype=torch.float64).to(value.weight.device).reshape(-1).expand(c)
    shift = torch.as_tensor(shift, dtype=torch.float64).to(value.weight.device).reshape(-1).expand(c)
    shape = (c,) + (1,) * (value.weight.dim() - 1)
    sides = tuple((key, matrix * scale[:, None]) for key, matrix in value.sides)
    return replace(value, weight=value.weight * scale.reshape(shape), bias=value.bias * scale + shift, sides=sides)


def batchnorm_scale_shift(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel ``(scale, shift)`` an eval-mode BatchNorm applies."""
    mean = running_mean.detach().to(torch.float64)
    inv_std = torch.rsqrt(running_var.detach().to(torch.float64) + eps)
    gamma = torch.ones_like(mean) if weight is None else weight.detach().to(torch.float64)
    beta = torch.zeros_like(mean) if bias is None else bias.detach().to(torch.float64)
    scale = gamma * inv_std
    return scale, beta - mean * scale


def crop(value: LinearMap, leading: Ints) -> LinearMap:
    """Drop ``leading`` elements at the start of each spatial dim (align a skip)."""
    return replace(value, offset=value.footprint.crop(_tuple(leading, value.dims)).offset)


def _place(value: LinearMap, offset: Ints, size: Ints) -> torch.Tensor:
    """``value.weight`` zero-padded into a kernel of ``size`` that starts at ``offset``."""
    pads: list[int] = []
    for d in reversed(range(value.dims)):
        before = value.offset[d] - offset[d]
        after = size[d] - before - value.kernel_size[d]
        pads.extend([before, after])
    return F.pad(value.weight, pads)


def _common_frame(values: list[LinearMap], kind: str) -> tuple[Ints, Ints]:
    frame = Footprint.combine([v.footprint for v in values], kind)
    return frame.offset, frame.kernel


def add(*values: LinearMap) -> LinearMap:
    """Sum of maps of one span input: kernels summed at their aligned offsets."""
    if len({(v.out_channels, v.in_channels) for v in values}) != 1:
        raise ValueError(
            "channel mismatch in add: operands have (out, in) channels "
            f"{[(v.out_channels, v.in_channels) for v in values]}"
        )
    offset, size = _common_frame(list(values), "add")
    weight = sum(_place(v, offset, size) for v in values)
    connectivity = values[0].connectivity.clone()
    for v in values[1:]:
        connectivity |= v.connectivity
    sides: dict[Hashable, torch.Tensor] = {}
    for v in values:
        for key, matrix in v.sides:
            sides[key] = sides[key] + matrix if key in sides else matrix
    return LinearMap(weight, sum(v.bias for v in values), values[0].stride, offset, connectivity, tuple(sides.items()))


def cat(*values: LinearMap) -> LinearMap:
    """Channel concatenation of maps of one span input."""
    if len({v.in_channels for v in values}) != 1:
        raise ValueError("cannot cat maps of different span inputs")
    offset, size = _common_frame(list(values), "cat")
    weight = torch.cat([_place(v, offset, size) for v in values], dim=0)
    connectivity = torch.cat([v.connectivity for v in values], dim=0)
    widths = {key: matrix.shape[1] for v in values for key, matrix in v.sides}
    sides = tuple(
        (key, torch.cat([dict(v.sides).get(key, v.bias.new_zeros(v.out_channels, width)) for v in values]))
        for key, width in widths.items()
    )
    return LinearMap(weight, torch.cat([v.bias for v in values]), values[0].stride, offset, connectivity, sides)


def add_side(value: LinearMap, key: Hashable) -> LinearMap:
    """``value + s`` for a side bias ``s`` of ``value.out_channels`` channels, one value per sample
    and channel, computed outside the span (named by ``key``): a term ``I @ s``."""
    eye = torch.eye(value.out_channels, dtype=value.bias.dtype, device=value.bias.device)
    sides = dict(value.sides)
    sides[key] = sides[key] + eye if key in sides else eye
    return replace(value, sides=tuple(sides.items()))


def coarsest_groups(connectivity: torch.Tensor) -> int:
    """The largest ``g`` for which ``connectivity`` is ``g``-block-diagonal (1 if none)."""
    c_out, c_in = connectivity.shape
    common = math.gcd(c_out, c_in)
    for g in sorted((d for d in range(2, common + 1) if common % d == 0), reverse=True):
        if not (group_connectivity(c_out, c_in, g) | ~connectivity.cpu()).all():
            continue
        return g
    return 1


def to_conv(value: LinearMap, padding: Ints, *, dtype: torch.dtype = torch.float32, bias: bool = True) -> ConvParams:
    """Read ``value`` back as one conv on the *unpadded* span input.

    ``padding`` is the span's total front padding ``P`` (the layout ``value`` was
    built in); the conv's own padding is ``P - offset`` per dim.
    """
    padding = _tuple(padding, value.dims)
    own = tuple(p - o for p, o in zip(padding, value.offset))
    if any(p < 0 for p in own):
        raise ValueError(f"span output starts before its padded input (padding {padding}, offset {value.offset})")
    groups = coarsest_groups(value.connectivity)
    weight = value.weight
    if groups > 1:
        c_out, c_in = weight.shape[:2]
        per_out, per_in = c_out // groups, c_in // groups
        weight = torch.cat(
            [weight[g * per_out : (g + 1) * per_out, g * per_in : (g + 1) * per_in] for g in range(groups)]
        )
    return ConvParams(
        weight=weight.to(dtype).contiguous(),
        bias=value.bias.to(dtype) if bias else None,
        stride=value.stride,
        padding=own,
        dilation=(1,) * value.dims,
        groups=groups,
    )


def fold_affine(conv: ConvParams, scale, shift) -> ConvParams:
    """``conv(x) * scale + shift`` as one conv (per-channel or scalar scale and shift)."""
    c = conv.out_channels
    scale = torch.as_tensor(scale, dtype=torch.float64).reshape(-1).expand(c)
    shift = torch.as_tensor(shift, dtype=torch.float64).reshape(-1).expand(c)
    w = conv.weight.detach().to(torch.float64) * scale.reshape((c,) + (1,) * (conv.weight.dim() - 1))
    b = torch.zeros(c, dtype=torch.float64) if conv.bias is None else conv.bias.detach().to(torch.float64)
    return replace(conv, weight=w.to(conv.weight.dtype), bias=(b * scale + shift).to(conv.weight.dtype))
