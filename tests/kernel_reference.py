"""Reference compositions built on ``fxmerge.kernels`` for the tests.

These helpers compose whole conv chains, residual blocks and BatchNorms the way a
hand-written merge would; the library itself composes node by node in ``merge``.
The tests use them to check the algebra against chains run with their padding moved
in front of the first conv.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from fxmerge.kernels import (
    ConvParams,
    Ints,
    LinearMap,
    _tuple,
    add,
    batchnorm_scale_shift,
    crop,
    fold_affine,
    identity,
    then_affine,
    then_conv,
    to_conv,
)


def conv_params(conv: torch.nn.Module) -> ConvParams:
    """The tensors and settings of an ``nn.Conv*`` module (transposed convs included)."""
    if isinstance(conv, torch.nn.modules.conv._ConvTransposeNd):
        return ConvParams(
            conv.weight.detach(),
            None,
            tuple(conv.stride),
            (0,),
            tuple(conv.dilation),
            conv.groups,
            conv.padding_mode,
            transposed=True,
        )
    dims = conv.weight.dim() - 2
    if isinstance(conv.padding, str):
        raise ValueError(f"conv uses padding={conv.padding!r}; resolve it to explicit integers before composing")
    return ConvParams(
        weight=conv.weight.detach(),
        bias=None if conv.bias is None else conv.bias.detach(),
        stride=_tuple(conv.stride, dims),
        padding=_tuple(conv.padding, dims),
        dilation=_tuple(conv.dilation, dims),
        groups=conv.groups,
        padding_mode=conv.padding_mode,
    )


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


def then_conv_params(value: LinearMap, conv: ConvParams) -> LinearMap:
    """Like :func:`then_conv` for a :class:`ConvParams` (whose padding must already be moved)."""
    check_composable(conv)
    return then_conv(value, conv.weight, conv.bias, conv.stride, conv.dilation, conv.groups)


def then_batchnorm(value: LinearMap, running_mean, running_var, weight, bias, eps: float) -> LinearMap:
    """Apply an eval-mode BatchNorm with its own ``eps``."""
    return then_affine(value, *batchnorm_scale_shift(running_mean, running_var, weight, bias, eps))


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


def chain_map(convs: list[ConvParams], affines: list | None = None, *, leading: Ints | None = None) -> LinearMap:
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
        value,
        span_padding([first, second]),
        dtype=first.weight.dtype,
        bias=first.bias is not None or second.bias is not None,
    )


def fold_batchnorm(conv: ConvParams, running_mean, running_var, weight, bias, eps: float) -> ConvParams:
    """``BN(conv(x))`` as one conv (eval-mode BatchNorm, its own ``eps``)."""
    scale, shift = batchnorm_scale_shift(running_mean, running_var, weight, bias, eps)
    return fold_affine(conv, scale, shift)


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
