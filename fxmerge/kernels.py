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
  kernel at the matching offset); ``cat`` stacks output channels.

At the end :func:`to_conv` reads the map back as one ``nn.Conv`` applied to the
*unpadded* input with padding ``P - offset``. Grouped and depthwise kernels are
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

    @classmethod
    def from_module(cls, conv: torch.nn.Module) -> ConvParams:
        if isinstance(conv, torch.nn.modules.conv._ConvTransposeNd):
            return cls(
                conv.weight.detach(), None, tuple(conv.stride), (0,), tuple(conv.dilation),
                conv.groups, conv.padding_mode, transposed=True,
            )
        dims = conv.weight.dim() - 2
        if isinstance(conv.padding, str):
            raise ValueError(
                f"conv uses padding={conv.padding!r}; resolve it to explicit integers before composing"
            )
        return cls(
            weight=conv.weight.detach(),
            bias=None if conv.bias is None else conv.bias.detach(),
            stride=_tuple(conv.stride, dims),
            padding=_tuple(conv.padding, dims),
            dilation=_tuple(conv.dilation, dims),
            groups=conv.groups,
            padding_mode=conv.padding_mode,
        )

    def to_module(self) -> torch.nn.Module:
        cls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[self.dims]
        module = cls(
            self.in_channels, self.out_channels, tuple(self.weight.shape[2:]), stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups, bias=self.bias is not None,
        ).to(dtype=self.weight.dtype, device=self.weight.device)
        with torch.no_grad():
            module.weight.copy_(self.weight)
            if self.bias is not None:
                module.bias.copy_(self.bias)
        return module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[self.dims]
        return conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def check_composable(conv: ConvParams) -> None:
    """Raise ``ValueError`` naming why ``conv`` cannot take part in a merge."""
    if conv.transposed:
        raise ValueError("cannot compose a transposed convolution (it upsamples; a merged conv cannot)")
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"cannot compose a conv with padding_mode={conv.padding_mode!r}: only zero padding can be "
            "moved in front of a span"
        )
    if conv.dims not in (1, 2, 3):
        raise ValueError(f"cannot compose a {conv.dims}-d convolution")


# --------------------------------------------------------------------- LinearMap
@dataclass(frozen=True)
class LinearMap:
    """``t[o, p] = bias[o] + sum weight[o, i, d] * x[i, p * stride + offset + d]``.

    ``weight`` is dense float64 ``[C_out, C_in, *kernel]``; ``connectivity`` is a
    bool ``[C_out, C_in]`` saying which channel pairs are structurally connected.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    stride: Ints
    offset: Ints
    connectivity: torch.Tensor

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
        combined = _TRANSPOSED[dims](value.weight.transpose(0, 1), transposed, dilation=step, groups=groups).transpose(0, 1)
    spatial_sums = w.flatten(2).sum(-1).reshape(groups, per_out, per_mid)
    new_bias = torch.bmm(spatial_sums, value.bias.reshape(groups, per_mid, 1)).reshape(c_out)
    if bias is not None:
        new_bias = new_bias + bias.detach().to(torch.float64)
    reach = value.connectivity.reshape(groups, per_mid, -1).any(dim=1)  # [g, C_in(span)]
    connectivity = reach.repeat_interleave(per_out, dim=0)
    return LinearMap(
        weight=combined.contiguous(),
        bias=new_bias,
        stride=tuple(s * v for s, v in zip(stride, value.stride)),
        offset=value.offset,
        connectivity=connectivity,
    )


def then_conv_params(value: LinearMap, conv: ConvParams) -> LinearMap:
    """Like :func:`then_conv` for a :class:`ConvParams` (whose padding must already be moved)."""
    check_composable(conv)
    return then_conv(value, conv.weight, conv.bias, conv.stride, conv.dilation, conv.groups)


def then_affine(value: LinearMap, scale: torch.Tensor | float, shift: torch.Tensor | float) -> LinearMap:
    """Apply ``t * scale + shift`` with per-channel (or scalar) ``scale`` and ``shift``."""
    c = value.out_channels
    scale = torch.as_tensor(scale, dtype=torch.float64).to(value.weight.device).reshape(-1).expand(c)
    shift = torch.as_tensor(shift, dtype=torch.float64).to(value.weight.device).reshape(-1).expand(c)
    shape = (c,) + (1,) * (value.weight.dim() - 1)
    return replace(value, weight=value.weight * scale.reshape(shape), bias=value.bias * scale + shift)


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


def then_batchnorm(value: LinearMap, running_mean, running_var, weight, bias, eps: float) -> LinearMap:
    """Apply an eval-mode BatchNorm with its own ``eps``."""
    return then_affine(value, *batchnorm_scale_shift(running_mean, running_var, weight, bias, eps))


def crop(value: LinearMap, leading: Ints) -> LinearMap:
    """Drop ``leading`` elements at the start of each spatial dim (align a skip)."""
    leading = _tuple(leading, value.dims)
    return replace(value, offset=tuple(o + r * s for o, r, s in zip(value.offset, leading, value.stride)))


def _place(value: LinearMap, offset: Ints, size: Ints) -> torch.Tensor:
    """``value.weight`` zero-padded into a kernel of ``size`` that starts at ``offset``."""
    pads: list[int] = []
    for d in reversed(range(value.dims)):
        before = value.offset[d] - offset[d]
        after = size[d] - before - value.kernel_size[d]
        pads.extend([before, after])
    return F.pad(value.weight, pads)


def _common_frame(values: list[LinearMap]) -> tuple[Ints, Ints]:
    strides = {v.stride for v in values}
    if len(strides) != 1:
        raise ValueError(f"cannot join maps with different strides {sorted(strides)}: their grids do not align")
    dims = values[0].dims
    offset = tuple(min(v.offset[d] for v in values) for d in range(dims))
    size = tuple(max(v.offset[d] + v.kernel_size[d] for v in values) - offset[d] for d in range(dims))
    return offset, size


def add(*values: LinearMap) -> LinearMap:
    """Sum of maps of one span input: kernels summed at their aligned offsets."""
    if len({(v.out_channels, v.in_channels) for v in values}) != 1:
        raise ValueError(
            "channel mismatch in add: operands have (out, in) channels "
            f"{[(v.out_channels, v.in_channels) for v in values]}"
        )
    offset, size = _common_frame(list(values))
    weight = sum(_place(v, offset, size) for v in values)
    connectivity = values[0].connectivity.clone()
    for v in values[1:]:
        connectivity |= v.connectivity
    return LinearMap(weight, sum(v.bias for v in values), values[0].stride, offset, connectivity)


def cat(*values: LinearMap) -> LinearMap:
    """Channel concatenation of maps of one span input."""
    if len({v.in_channels for v in values}) != 1:
        raise ValueError("cannot cat maps of different span inputs")
    offset, size = _common_frame(list(values))
    weight = torch.cat([_place(v, offset, size) for v in values], dim=0)
    connectivity = torch.cat([v.connectivity for v in values], dim=0)
    return LinearMap(weight, torch.cat([v.bias for v in values]), values[0].stride, offset, connectivity)


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
            [weight[g * per_out:(g + 1) * per_out, g * per_in:(g + 1) * per_in] for g in range(groups)]
        )
    return ConvParams(
        weight=weight.to(dtype).contiguous(),
        bias=value.bias.to(dtype) if bias else None,
        stride=value.stride,
        padding=own,
        dilation=(1,) * value.dims,
        groups=groups,
    )


# ------------------------------------------------------------- the public helpers
def span_padding(convs: list[ConvParams] | list[tuple[Ints, Ints]]) -> Ints:
    """Total front padding of a chain: ``P = sum_k p_k * prod_{j<k} s_j`` per dim.

    Accepts ConvParams or ``(padding, stride)`` pairs, first conv first.
    """
    pairs = [(c.padding, c.stride) if isinstance(c, ConvParams) else c for c in convs]
    dims = len(pairs[0][0])
    total, scale = [0] * dims, [1] * dims
    for pad, stride in pairs:
        for d in range(dims):
            total[d] += pad[d] * scale[d]
            scale[d] *= stride[d]
    return tuple(total)


def chain_map(
    convs: list[ConvParams], affines: list | None = None, *, leading: Ints | None = None
) -> LinearMap:
    """The LinearMap of a conv chain run unpadded (affines[k] = (scale, shift) after conv k).

    ``leading`` crops that many elements off the start of the chain's *input* first
    (how a chain with less padding than its span is aligned).
    """
    if not convs:
        raise ValueError("an empty chain has no channels; use identity()")
    for conv in convs:
        check_composable(conv)
    value = identity(convs[0].in_channels, convs[0].dims, device=convs[0].weight.device)
    if leading is not None:
        value = crop(value, leading)
    for k, conv in enumerate(convs):
        value = then_conv_params(value, conv)
        if affines and affines[k] is not None:
            value = then_affine(value, *affines[k])
    return value


def compose(first: ConvParams, second: ConvParams) -> ConvParams:
    """One conv equal to ``second(first(x))`` in the padded-in-front layout.

    Exact for any stride, dilation, groups and rectangular kernels; the result has
    kernel ``k1 + (k2 - 1) * s1`` (dilations expanded), stride ``s1 * s2`` and
    padding ``p1 + p2 * s1``. A transposed conv, a non-zero padding mode or a
    channel mismatch raises ``ValueError`` with the reason.
    """
    for conv in (first, second):
        check_composable(conv)
    if first.dims != second.dims:
        raise ValueError(f"cannot compose a {first.dims}-d conv with a {second.dims}-d conv")
    if second.in_channels != first.out_channels:
        raise ValueError(
            f"channel mismatch: the second conv expects {second.in_channels} input channels, "
            f"the first produces {first.out_channels}"
        )
    value = chain_map([first, second])
    return to_conv(
        value, span_padding([first, second]), dtype=first.weight.dtype,
        bias=first.bias is not None or second.bias is not None,
    )


def fold_batchnorm(conv: ConvParams, running_mean, running_var, weight, bias, eps: float) -> ConvParams:
    """``BN(conv(x))`` as one conv (eval-mode BatchNorm, its own ``eps``)."""
    scale, shift = batchnorm_scale_shift(running_mean, running_var, weight, bias, eps)
    return fold_affine(conv, scale, shift)


def fold_affine(conv: ConvParams, scale, shift) -> ConvParams:
    """``conv(x) * scale + shift`` as one conv (per-channel or scalar scale and shift)."""
    c = conv.out_channels
    scale = torch.as_tensor(scale, dtype=torch.float64).reshape(-1).expand(c)
    shift = torch.as_tensor(shift, dtype=torch.float64).reshape(-1).expand(c)
    w = conv.weight.detach().to(torch.float64) * scale.reshape((c,) + (1,) * (conv.weight.dim() - 1))
    b = torch.zeros(c, dtype=torch.float64) if conv.bias is None else conv.bias.detach().to(torch.float64)
    return replace(conv, weight=w.to(conv.weight.dtype), bias=(b * scale + shift).to(conv.weight.dtype))


def absorb_skip(branch: list[ConvParams], skip: list[ConvParams] | None = None) -> ConvParams:
    """One conv equal to ``branch(x) + skip(x)``: a residual block merged whole.

    ``branch`` and ``skip`` are conv chains (``skip=None`` or ``[]`` is the identity);
    the block's padding moves in front of it. The identity becomes a Dirac kernel at
    the tap that aligns it; a projection shortcut's kernel lands at the offset that
    aligns it with the branch.
    """
    skip = skip or []
    dims = branch[0].dims
    pad_branch = span_padding(branch)
    pad_skip = span_padding(skip) if skip else (0,) * dims
    total = tuple(max(a, b) for a, b in zip(pad_branch, pad_skip))
    branch_map = chain_map(branch, leading=tuple(t - p for t, p in zip(total, pad_branch)))
    skip_lead = tuple(t - p for t, p in zip(total, pad_skip))
    if skip:
        skip_map = chain_map(skip, leading=skip_lead)
    else:
        skip_map = crop(identity(branch[0].in_channels, dims), skip_lead)
    if skip_map.stride != branch_map.stride:
        raise ValueError(
            f"residual join of a branch with stride {branch_map.stride} and a skip with stride "
            f"{skip_map.stride}: the grids do not align"
        )
    merged = add(branch_map, skip_map)
    return to_conv(merged, total, dtype=branch[0].weight.dtype)


def run_front_padded(x: torch.Tensor, convs: list[ConvParams], affines: list | None = None) -> torch.Tensor:
    """Reference: the chain with its total padding in front and every conv unpadded."""
    pad = span_padding(convs)
    out = F.pad(x, [p for d in reversed(pad) for p in (d, d)])
    for k, conv in enumerate(convs):
        out = replace(conv, padding=(0,) * conv.dims)(out)
        if affines and affines[k] is not None:
            scale, shift = affines[k]
            shape = (1, -1) + (1,) * conv.dims
            out = out * torch.as_tensor(scale, dtype=out.dtype).reshape(shape) + torch.as_tensor(
                shift, dtype=out.dtype
            ).reshape(shape)
    return out
