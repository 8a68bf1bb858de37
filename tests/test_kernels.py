"""Tests for ``fxmerge.kernels``, the exact composition algebra for convolutions.

The bulk is a seeded property test: each id draws a random chain of 2-4 Conv1d or
Conv2d layers (any stride, dilation and grouping, rectangular kernels, with or
without bias, zero padding of any size), interleaved with eval-mode BatchNorms and
sometimes closed by a residual join, merges it through one of the public entry
points and checks the single conv against the chain run with its padding moved in
front of the first conv. The rest are unit tests of the helpers, the contrast with
convs that keep their own padding, and the stated reason for every refusal.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from functools import cache, reduce

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxmerge.kernels import (
    ConvParams,
    add,
    add_side,
    batchnorm_scale_shift,
    cat,
    coarsest_groups,
    crop,
    dense_weight,
    fold_affine,
    group_connectivity,
    identity,
    then_affine,
    then_conv,
    to_conv,
)
from tests.kernel_reference import (
    absorb_skip,
    chain_map,
    check_composable,
    compose,
    conv_params,
    fold_batchnorm,
    run_front_padded,
    span_padding,
    then_batchnorm,
    then_conv_params,
)

N_CASES = 600
TOLERANCE = 1e-5
MAX_STRIDE = 9  # product of the strides of one chain, per spatial dim
MAX_KERNEL = {1: 120, 2: 32}  # merged kernel extent per spatial dim
CONV = {1: nn.Conv1d, 2: nn.Conv2d}
BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
CONV_FN = {1: F.conv1d, 2: F.conv2d}


# ----------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors here are tiny: intra-op threads only cost time (a lot on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|``."""
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / max(scale, 1e-30)


def _eff(kernel: int, dilation: int) -> int:
    return (kernel - 1) * dilation + 1


def _frame(convs: list[nn.Module], dim: int) -> tuple[int, int, int]:
    """(merged kernel extent, total stride, total front padding) of a chain along ``dim``."""
    extent, stride, padding = 1, 1, 0
    for conv in convs:
        extent += (_eff(conv.kernel_size[dim], conv.dilation[dim]) - 1) * stride
        padding += conv.padding[dim] * stride
        stride *= conv.stride[dim]
    return extent, stride, padding


def _out_len(length: int, padding: int, extent: int, stride: int) -> int:
    """Output length of a window of ``extent`` moved by ``stride`` over a padded input (0 if none)."""
    if length + 2 * padding < extent:
        return 0
    return (length + 2 * padding - extent) // stride + 1


def _conv(gen, dims, c_in, c_out, kernel, stride, dilation, padding, groups, bias, dtype=torch.float32):
    conv = CONV[dims](c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    with torch.no_grad():
        fan_in = conv.weight[0].numel()
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / math.sqrt(fan_in))
        if bias:
            conv.bias.copy_(torch.randn(c_out, generator=gen) * 0.5)
    return conv.to(dtype)


def _batchnorm(gen, dims, channels, eps, affine=True, var_low=0.25, dtype=torch.float32):
    bn = BATCHNORM[dims](channels, eps=eps, affine=affine).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=gen))
        bn.running_var.copy_(torch.rand(channels, generator=gen) * 1.5 + var_low)
        if affine:
            sign = torch.where(torch.rand(channels, generator=gen) < 0.2, -1.0, 1.0)
            bn.weight.copy_((torch.rand(channels, generator=gen) + 0.5) * sign)
            bn.bias.copy_(torch.randn(channels, generator=gen))
    return bn.to(dtype)


def _bn_args(bn: nn.Module) -> tuple:
    return bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps


def _run_unpadded(x: torch.Tensor, convs: list[nn.Module], bns: list) -> torch.Tensor:
    """The chain with its total padding in front and every conv run unpadded (own code)."""
    dims = x.dim() - 2
    pads = [_frame(convs, d)[2] for d in range(dims)]
    out = F.pad(x, [p for d in reversed(pads) for p in (d, d)])
    for conv, bn in zip(convs, bns):
        out = CONV_FN[dims](out, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)
        if bn is not None:
            out = bn(out)
    return out


def _params(convs: list[nn.Module]) -> list[ConvParams]:
    return [conv_params(c) for c in convs]


def _affines(bns: list) -> list:
    return [None if bn is None else batchnorm_scale_shift(*_bn_args(bn)) for bn in bns]


def _folded(convs: list[nn.Module], bns: list) -> list[ConvParams]:
    return [
        conv_params(c) if bn is None else fold_batchnorm(conv_params(c), *_bn_args(bn)) for c, bn in zip(convs, bns)
    ]


# ---------------------------------------------------------------- case generator
@dataclass
class Case:
    seed: int
    dims: int
    size: tuple[int, ...]
    c_in: int
    convs: list[nn.Module]
    bns: list
    skip: str  # "none" | "identity" | "projection"
    skip_convs: list[nn.Module]
    skip_bns: list
    route: str
    x: torch.Tensor

    def describe(self) -> str:
        def conv_text(c):
            return (
                f"{type(c).__name__}({c.in_channels}->{c.out_channels}, k={c.kernel_size}, s={c.stride}, "
                f"d={c.dilation}, p={c.padding}, g={c.groups}, bias={c.bias is not None})"
            )

        branch = " -> ".join(conv_text(c) + (" -> BN" if bn is not None else "") for c, bn in zip(self.convs, self.bns))
        skip = " -> ".join(conv_text(c) for c in self.skip_convs)
        return f"seed={self.seed} route={self.route} input={tuple(self.x.shape)} branch: {branch} | skip={self.skip} {skip}"


def _grouping(rng: random.Random, c_in: int, family: str, c_out: int | None, multiplier: bool):
    """(groups, out channels) for a conv of ``family`` on ``c_in`` channels."""
    if family == "depthwise" and (c_out is None or c_out % c_in == 0):
        if c_out is None:
            c_out = c_in * (rng.choice([1, 1, 2]) if multiplier and c_in <= 4 else 1)
        return c_in, c_out
    if family in ("grouped", "depthwise"):
        choices = [g for g in range(2, c_in) if c_in % g == 0 and (c_out is None or c_out % g == 0)]
        if choices:
            groups = rng.choice(choices)
            return groups, groups * rng.randint(1, 3) if c_out is None else c_out
    return 1, rng.randint(1, 6) if c_out is None else c_out


def _spatial(rng: random.Random, dims: int, same: bool):
    """Per-dim (kernel, stride, dilation, padding); ``same`` keeps the length (stride 1, odd extent)."""
    per_dim = []
    for _ in range(dims):
        if same:
            dilation = rng.randint(1, 3)
            kernel = rng.choice([1, 3, 5] + ([2, 4] if dilation == 2 else []))
            per_dim.append((kernel, 1, dilation, (_eff(kernel, dilation) - 1) // 2))
        else:
            per_dim.append((rng.randint(1, 5), rng.randint(1, 3), rng.randint(1, 3), rng.randint(0, 3)))
    if dims > 1 and rng.random() < 0.25:  # a square conv now and then
        per_dim = [per_dim[0]] * dims
    return [tuple(v[i] for v in per_dim) for i in range(4)]


def _spatial_chain(rng: random.Random, dims: int, n: int, same: bool):
    for _ in range(50):
        chain = [_spatial(rng, dims, same) for _ in range(n)]
        ok = True
        for d in range(dims):
            extent, stride = 1, 1
            for kernel, s, dilation, _pad in chain:
                extent += (_eff(kernel[d], dilation[d]) - 1) * stride
                stride *= s[d]
            ok = ok and extent <= MAX_KERNEL[dims] and stride <= MAX_STRIDE
        if ok:
            return chain
    return [((rng.randint(1, 3),) * dims, (1,) * dims, (1,) * dims, (1,) * dims) for _ in range(n)]


@cache
def _draw(seed: int) -> Case:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    dims = rng.choice([1, 2])
    n = rng.randint(2, 4)
    c_in = rng.randint(1, 8)
    all_depthwise = rng.random() < 0.25
    skip = rng.choices(["none", "identity", "projection"], weights=[0.45, 0.25, 0.3])[0]
    same = skip == "identity"
    spatial = _spatial_chain(rng, dims, n, same)

    convs, bns, channels = [], [], c_in
    for k, (kernel, stride, dilation, padding) in enumerate(spatial):
        family = "depthwise" if all_depthwise else rng.choice(["dense", "depthwise", "grouped"])
        target = c_in if same and k == n - 1 else None
        groups, c_out = _grouping(rng, channels, family, target, multiplier=not same)
        convs.append(_conv(gen, dims, channels, c_out, kernel, stride, dilation, padding, groups, rng.random() < 0.7))
        eps = 10 ** rng.uniform(-5, -1)
        bns.append(_batchnorm(gen, dims, c_out, eps, affine=rng.random() < 0.8) if rng.random() < 0.5 else None)
        channels = c_out

    frames = [_frame(convs, d) for d in range(dims)]
    size = tuple(
        max(1, extent - 2 * padding) + stride * rng.randint(0, 4) + rng.randint(0, stride - 1)
        for extent, stride, padding in frames
    )

    skip_convs, skip_bns = [], []
    if skip == "projection":
        # one conv (1x1 or kxk) or a kxk "same" conv then that one, matching stride and length
        found, smallest = [], rng.random() < 0.5
        for d, (extent, stride, padding) in enumerate(frames):
            target_len = _out_len(size[d], padding, extent, stride)
            options = [
                (k, p) for k in (1, 2, 3, 5, 7) for p in range(7) if _out_len(size[d], p, k, stride) == target_len
            ]
            found.append(None if not options else min(options) if smallest else rng.choice(options))
        if any(f is None for f in found):
            skip = "none"
        else:
            kernel, padding = tuple(f[0] for f in found), tuple(f[1] for f in found)
            stride = tuple(f[1] for f in frames)
            if all_depthwise:
                pre_groups, groups = c_in, c_in
            else:
                pre_groups = 1
                groups = rng.choice([g for g in range(1, c_in + 1) if c_in % g == 0 and channels % g == 0])
            if rng.random() < 0.3:
                skip_convs.append(_conv(gen, dims, c_in, c_in, 3, 1, 1, 1, pre_groups, rng.random() < 0.5))
                skip_bns.append(None)
            skip_convs.append(_conv(gen, dims, c_in, channels, kernel, stride, 1, padding, groups, rng.random() < 0.5))
            eps = 10 ** rng.uniform(-5, -1)
            skip_bns.append(_batchnorm(gen, dims, channels, eps) if rng.random() < 0.5 else None)

    if skip == "none":
        route = rng.choice(["chain_map", "then", "compose"])
    else:
        route = rng.choice(["absorb", "manual"])
    x = torch.randn((2, c_in) + size, generator=gen)
    return Case(seed, dims, size, c_in, convs, bns, skip, skip_convs, skip_bns, route, x)


def _reference(case: Case) -> torch.Tensor:
    out = _run_unpadded(case.x, case.convs, case.bns)
    if case.skip == "identity":
        out = out + case.x
    elif case.skip == "projection":
        out = out + _run_unpadded(case.x, case.skip_convs, case.skip_bns)
    return out


def _merge(case: Case) -> ConvParams:
    params, affines = _params(case.convs), _affines(case.bns)
    if case.route == "chain_map":
        return to_conv(chain_map(params, affines), span_padding(params))
    if case.route == "then":
        value = identity(case.c_in, case.dims)
        for conv, bn in zip(params, case.bns):
            value = then_conv_params(value, conv)
            if bn is not None:
                value = then_batchnorm(value, *_bn_args(bn))
        return to_conv(value, span_padding(params))
    if case.route == "compose":
        return reduce(compose, _folded(case.convs, case.bns))
    if case.route == "absorb":
        skip = _folded(case.skip_convs, case.skip_bns)
        return absorb_skip(_folded(case.convs, case.bns), skip or None)
    # "manual": build the residual map with crop / add
    skip_params = _params(case.skip_convs)
    pad_branch = span_padding(params)
    pad_skip = span_padding(skip_params) if skip_params else (0,) * case.dims
    total = tuple(max(a, b) for a, b in zip(pad_branch, pad_skip))
    branch = chain_map(params, affines, leading=tuple(t - p for t, p in zip(total, pad_branch)))
    lead_skip = tuple(t - p for t, p in zip(total, pad_skip))
    if skip_params:
        shortcut = chain_map(skip_params, _affines(case.skip_bns), leading=lead_skip)
    else:
        shortcut = crop(identity(case.c_in, case.dims), lead_skip)
    return to_conv(add(branch, shortcut), total)


# ------------------------------------------------------------ the property tests
@pytest.mark.parametrize("seed", range(N_CASES))
def test_merged_conv_reproduces_front_padded_chain(seed):
    case = _draw(seed)
    info = case.describe()
    expected = _reference(case)
    merged = _merge(case)
    out = merged.to_module()(case.x) if seed % 2 else merged(case.x)

    assert out.shape == expected.shape, info
    assert out.dtype == torch.float32, info
    assert _rel(out, expected) <= TOLERANCE, info
    assert merged.dilation == (1,) * case.dims, info
    assert merged.stride == tuple(_frame(case.convs, d)[1] for d in range(case.dims)), info

    if case.skip == "none":
        # the library's own reference runner agrees with the hand-written one
        reference = run_front_padded(case.x, _params(case.convs), _affines(case.bns))
        assert _rel(reference, expected) <= TOLERANCE, info
        assert merged.padding == tuple(_frame(case.convs, d)[2] for d in range(case.dims)), info

    factors = case.convs + case.skip_convs
    if all(c.groups == c.in_channels for c in factors):
        assert merged.groups == case.c_in, info  # depthwise in, depthwise out
    if case.c_in > 1 and any(c.groups == 1 for c in factors):
        assert merged.groups == 1, info  # a dense factor connects every channel pair

    if len(case.convs) == 2 and case.skip == "none":
        first, second = case.convs
        for d in range(case.dims):
            k1 = _eff(first.kernel_size[d], first.dilation[d])
            k2 = _eff(second.kernel_size[d], second.dilation[d])
            assert merged.weight.shape[2 + d] == k1 + (k2 - 1) * first.stride[d], info
            assert merged.padding[d] == first.padding[d] + second.padding[d] * first.stride[d], info


def test_generated_cases_cover_every_feature():
    cases = [_draw(seed) for seed in range(N_CASES)]
    convs = [c for case in cases for c in case.convs]
    assert {case.dims for case in cases} == {1, 2}
    assert {len(case.convs) for case in cases} == {2, 3, 4}
    assert {s for c in convs for s in c.stride} == {1, 2, 3}
    assert {d for c in convs for d in c.dilation} == {1, 2, 3}
    assert {p for c in convs for p in c.padding} >= {0, 1, 2, 3}
    assert {c.bias is None for c in convs} == {True, False}
    assert any(c.groups == c.in_channels > 1 for c in convs)  # depthwise
    assert any(c.groups == c.in_channels > 1 and c.out_channels > c.in_channels for c in convs)  # multiplier
    assert any(1 < c.groups < c.in_channels for c in convs)  # general grouped
    assert any(c.groups == 1 and c.in_channels > 1 for c in convs)  # dense
    assert any(isinstance(c, nn.Conv2d) and c.kernel_size[0] != c.kernel_size[1] for c in convs)
    assert any(isinstance(c, nn.Conv2d) and c.stride[0] != c.stride[1] for c in convs)
    assert any(bn is not None for case in cases for bn in case.bns)
    assert any(bn is not None and not bn.affine for case in cases for bn in case.bns)
    assert {case.route for case in cases} == {"chain_map", "then", "compose", "absorb", "manual"}
    assert {(case.skip, case.route) for case in cases if case.skip != "none"} == {
        (skip, route) for skip in ("identity", "projection") for route in ("absorb", "manual")
    }
    assert any(len(case.skip_convs) == 2 for case in cases)
    assert any(any(k > 1 for k in c.kernel_size) for case in cases for c in case.skip_convs)
    assert any(any(s > 1 for s in c.stride) for case in cases for c in case.skip_convs)
    assert any(all(c.groups == c.in_channels > 1 for c in case.convs) and case.skip != "none" for case in cases)
    assert sum(case.skip == "none" for case in cases) > N_CASES // 3


# ---------------------------------------------------- padding: the contrast test
@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("seed", range(4))
def test_own_padding_matches_only_in_the_interior(dims, seed):
    rng = random.Random(1000 + seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    convs, bns, channels = [], [], 3
    for _ in range(rng.randint(2, 3)):
        spatial = _spatial(rng, dims, same=False)
        kernel, dilation, padding = spatial[0], spatial[2], spatial[3]
        c_out = rng.randint(2, 5)
        convs.append(_conv(gen, dims, channels, c_out, kernel, 1, dilation, padding, 1, True))
        bns.append(_batchnorm(gen, dims, c_out, 1e-3) if rng.random() < 0.5 else None)
        channels = c_out
    frames = [_frame(convs, d) for d in range(dims)]
    x = torch.randn((2, 3) + tuple(extent + 4 for extent, _, _ in frames), generator=gen)

    network = x  # the ordinary network: every conv pads its own input
    for conv, bn in zip(convs, bns):
        network = conv(network)
        network = network if bn is None else bn(network)
    params = _params(convs)
    merged = to_conv(chain_map(params, _affines(bns)), span_padding(params))
    out = merged(x)

    assert out.shape == network.shape
    border_gap = _rel(out, network)
    assert border_gap > 1e-3, "own padding should not survive merging at the border"
    interior = (slice(None), slice(None)) + tuple(slice(p, n - p) for (_, _, p), n in zip(frames, out.shape[2:]))
    assert out[interior].numel() > 0
    assert _rel(out[interior], network[interior]) <= TOLERANCE
    # and the front-padded chain is matched everywhere
    assert _rel(out, _run_unpadded(x, convs, bns)) <= TOLERANCE


# --------------------------------------------------------------- refused merges
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("position", [0, 1])
def test_non_zero_padding_mode_is_refused(mode, position):
    convs = [nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)]
    convs[position] = nn.Conv2d(3, 3, 3, padding=1, padding_mode=mode)
    params = _params(convs)
    message = re.escape(f"padding_mode={mode!r}")
    with pytest.raises(ValueError, match=message):
        check_composable(params[position])
    with pytest.raises(ValueError, match=message):
        compose(*params)
    with pytest.raises(ValueError, match=message):
        chain_map(params)
    with pytest.raises(ValueError, match=message):
        absorb_skip(params)
    with pytest.raises(ValueError, match=message):
        then_conv_params(identity(3, 2), params[position])


def test_channel_mismatch_is_refused():
    first = conv_params(nn.Conv2d(3, 4, 3))
    second = conv_params(nn.Conv2d(5, 2, 1))
    with pytest.raises(
        ValueError, match="channel mismatch: the second conv expects 5 input channels, the first produces 4"
    ):
        compose(first, second)
    with pytest.raises(ValueError, match="channel mismatch: the conv expects 5 input channels but its input has 4"):
        chain_map([first, second])
    grouped = nn.Conv2d(6, 6, 1, groups=3)  # expects 6 = 2 * 3 input channels
    with pytest.raises(ValueError, match="expects 6 input channels but its input has 4"):
        then_conv(chain_map([first]), grouped.weight, None, 1, 1, groups=3)
    with pytest.raises(
        ValueError, match=re.escape("channel mismatch in add: operands have (out, in) channels [(4, 3), (3, 3)]")
    ):
        add(chain_map([first]), identity(3, 2))
    with pytest.raises(ValueError, match="channel mismatch in add"):
        absorb_skip([first])  # an identity skip around a block that changes channels


def test_transposed_conv_is_refused():
    transposed = conv_params(nn.ConvTranspose2d(3, 3, 3, stride=2))
    plain = conv_params(nn.Conv2d(3, 3, 3))
    assert transposed.transposed
    message = "cannot compose a transposed convolution"
    with pytest.raises(ValueError, match=message):
        check_composable(transposed)
    with pytest.raises(ValueError, match=message):
        compose(transposed, plain)
    with pytest.raises(ValueError, match=message):
        compose(plain, transposed)
    with pytest.raises(ValueError, match=message):
        chain_map([plain, transposed])
    with pytest.raises(ValueError, match=message):
        then_conv_params(identity(3, 2), transposed)
    transposed_1d = conv_params(nn.ConvTranspose1d(2, 2, 3))
    with pytest.raises(ValueError, match=message):
        compose(conv_params(nn.Conv1d(2, 2, 1)), transposed_1d)


def test_join_of_different_strides_is_refused():
    fine = chain_map([conv_params(nn.Conv2d(3, 3, 3))])
    coarse = chain_map([conv_params(nn.Conv2d(3, 3, 3, stride=2))])
    with pytest.raises(ValueError, match=re.escape("cannot join maps with different strides [(1, 1), (2, 2)]")):
        add(fine, coarse)
    with pytest.raises(ValueError, match="cannot join maps with different strides"):
        cat(coarse, fine)
    rows = chain_map([conv_params(nn.Conv2d(3, 3, 1, stride=(2, 1)))])
    cols = chain_map([conv_params(nn.Conv2d(3, 3, 1, stride=(1, 2)))])
    with pytest.raises(ValueError, match="cannot join maps with different strides"):
        add(rows, cols)
    strided = [conv_params(nn.Conv2d(3, 3, 3, stride=2, padding=1))]
    with pytest.raises(
        ValueError, match=re.escape("residual join of a branch with stride (2, 2) and a skip with stride (1, 1)")
    ):
        absorb_skip(strided)  # identity skip
    with pytest.raises(ValueError, match="the grids do not align"):
        absorb_skip(strided, [conv_params(nn.Conv2d(3, 3, 1, stride=(2, 1)))])


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding_is_refused(padding):
    with pytest.raises(ValueError, match=re.escape(f"padding={padding!r}; resolve it to explicit integers")):
        conv_params(nn.Conv2d(3, 3, 3, padding=padding))
    with pytest.raises(ValueError, match=re.escape(f"padding={padding!r}")):
        conv_params(nn.Conv1d(3, 3, 4, padding=padding))


def test_other_refusals_state_their_reason():
    conv1d = conv_params(nn.Conv1d(3, 3, 3))
    conv2d = conv_params(nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match="cannot compose a 1-d conv with a 2-d conv"):
        compose(conv1d, conv2d)
    with pytest.raises(ValueError, match="cannot compose a 2-d conv with a 1-d span"):
        then_conv_params(identity(3, 1), conv2d)
    with pytest.raises(ValueError, match="an empty chain has no channels"):
        chain_map([])
    with pytest.raises(ValueError, match="cannot cat maps of different span inputs"):
        cat(identity(3, 1), identity(2, 1))
    with pytest.raises(
        ValueError, match=re.escape("span output starts before its padded input (padding (1,), offset (3,))")
    ):
        to_conv(crop(identity(2, 1), (3,)), (1,))


# ------------------------------------------------------------------- unit tests
@pytest.mark.parametrize("conv_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_batchnorm_matches_eval_batchnorm(conv_bias, affine):
    gen = torch.Generator().manual_seed(7)
    conv = _conv(gen, 2, 4, 6, (3, 2), (2, 1), (1, 2), (1, 0), 2, conv_bias)
    bn = _batchnorm(gen, 2, 6, eps=0.05, affine=affine, var_low=0.01)
    x = torch.randn(2, 4, 9, 8, generator=gen)
    expected = bn(conv(x))
    folded = fold_batchnorm(conv_params(conv), *_bn_args(bn))
    assert (folded.stride, folded.padding, folded.dilation, folded.groups) == ((2, 1), (1, 0), (1, 2), 2)
    assert folded.weight.dtype == torch.float32 and folded.bias is not None
    assert _rel(folded(x), expected) <= 1e-6
    # the BatchNorm's own eps is used: folding with the default one is visibly off
    default_eps = fold_batchnorm(conv_params(conv), bn.running_mean, bn.running_var, bn.weight, bn.bias, 1e-5)
    assert _rel(default_eps(x), expected) > 1e-3
    # the same scale and shift through the LinearMap path
    value = then_batchnorm(chain_map([conv_params(conv)]), *_bn_args(bn))
    assert _rel(to_conv(value, (1, 0))(x), expected) <= 1e-6


def test_fold_affine_per_channel_and_scalar():
    gen = torch.Generator().manual_seed(8)
    conv = _conv(gen, 1, 3, 4, 3, 1, 1, 1, 1, False)
    x = torch.randn(2, 3, 10, generator=gen)
    scale, shift = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    per_channel = fold_affine(conv_params(conv), scale, shift)
    assert _rel(per_channel(x), conv(x) * scale[:, None] + shift[:, None]) <= 1e-6
    scalar = fold_affine(conv_params(conv), 2.5, -0.75)
    assert _rel(scalar(x), conv(x) * 2.5 - 0.75) <= 1e-6


def test_batchnorm_alone_is_a_depthwise_one_by_one_conv():
    gen = torch.Generator().manual_seed(9)
    bn = _batchnorm(gen, 2, 5, eps=0.02)
    merged = to_conv(then_batchnorm(identity(5, 2), *_bn_args(bn)), (0, 0))
    x = torch.randn(2, 5, 6, 7, generator=gen)
    assert merged.groups == 5 and tuple(merged.weight.shape) == (5, 1, 1, 1)
    assert _rel(merged(x), bn(x)) <= 1e-6


def test_span_padding_formula():
    # P = sum_k p_k * prod_{j<k} s_j, per dim
    assert span_padding([((1,), (1,)), ((2,), (1,))]) == (3,)
    assert span_padding([((1,), (2,)), ((2,), (3,)), ((1,), (1,))]) == (1 + 2 * 2 + 1 * 6,)
    pairs = [((1, 2), (2, 1)), ((3, 0), (1, 3)), ((1, 1), (2, 2))]
    assert span_padding(pairs) == (1 + 3 * 2 + 1 * 2, 2 + 0 * 1 + 1 * 3)
    convs = [nn.Conv2d(2, 2, 3, stride=(2, 1), padding=(1, 2)), nn.Conv2d(2, 2, 3, stride=(1, 3), padding=(3, 0))]
    convs.append(nn.Conv2d(2, 2, 3, stride=2, padding=1))
    assert span_padding(_params(convs)) == (9, 5)
    assert span_padding(_params(convs[:1])) == (1, 2)
    # chained compose carries the same padding
    assert reduce(compose, _params(convs)).padding == (9, 5)


def test_coarsest_groups():
    assert coarsest_groups(torch.eye(6, dtype=torch.bool)) == 6
    assert coarsest_groups(torch.ones(6, 6, dtype=torch.bool)) == 1
    assert coarsest_groups(group_connectivity(6, 6, 2)) == 2
    assert coarsest_groups(group_connectivity(6, 6, 3)) == 3
    assert coarsest_groups(group_connectivity(8, 4, 4)) == 4  # depthwise with multiplier 2
    assert coarsest_groups(group_connectivity(6, 9, 3)) == 3  # rectangular blocks
    # sparser than 2 blocks but not 4: the largest grouping that covers it
    sparse = group_connectivity(4, 4, 4) | torch.tensor([[0, 1, 0, 0]] * 2 + [[0, 0, 0, 0]] * 2, dtype=torch.bool)
    assert coarsest_groups(sparse) == 2
    # a channel pair across block boundaries forces dense
    crossing = torch.eye(4, dtype=torch.bool)
    crossing[0, 3] = True
    assert coarsest_groups(crossing) == 1
    # two stacked depthwise maps (a cat) are not contiguous blocks
    assert coarsest_groups(torch.cat([torch.eye(3, dtype=torch.bool)] * 2)) == 1
    assert coarsest_groups(torch.ones(5, 7, dtype=torch.bool)) == 1


def test_dense_weight_is_block_diagonal():
    gen = torch.Generator().manual_seed(10)
    weight = torch.randn(6, 2, 3, generator=gen)  # groups=3: 6 in, 6 out, 2 per group
    dense = dense_weight(weight, 3)
    assert dense.shape == (6, 6, 3)
    for g in range(3):
        rows, cols = slice(2 * g, 2 * g + 2), slice(2 * g, 2 * g + 2)
        assert torch.equal(dense[rows, cols], weight[rows])
        mask = torch.ones(6, dtype=torch.bool)
        mask[cols] = False
        assert not dense[rows][:, mask].any()
    x = torch.randn(2, 6, 11, generator=gen)
    assert _rel(F.conv1d(x, dense), F.conv1d(x, weight, groups=3)) <= 1e-6
    depthwise = torch.randn(8, 1, 2, 2, generator=gen)  # multiplier 2 on 4 channels
    expanded = dense_weight(depthwise, 4)
    assert expanded.shape == (8, 4, 2, 2)
    assert torch.equal(expanded.flatten(2).abs().sum(-1) > 0, group_connectivity(8, 4, 4))
    assert dense_weight(weight, 1) is weight


def test_cat_of_branches_with_different_kernels():
    gen = torch.Generator().manual_seed(11)
    small = _conv(gen, 2, 3, 2, 1, 1, 1, 0, 1, True)
    large = _conv(gen, 2, 3, 4, 3, 1, 1, 1, 1, True)
    x = torch.randn(2, 3, 7, 6, generator=gen)
    total = (1, 1)
    # in the layout padded by 1, the 1x1 branch starts one element in
    small_map = chain_map(_params([small]), leading=(1, 1))
    large_map = chain_map(_params([large]))
    assert small_map.offset == (1, 1) and large_map.offset == (0, 0)
    merged = to_conv(cat(small_map, large_map), total)
    assert tuple(merged.weight.shape) == (6, 3, 3, 3)
    assert torch.equal(merged.weight[:2, :, 1, 1], small.weight[:, :, 0, 0])
    assert merged.weight[:2].abs().sum() == merged.weight[:2, :, 1, 1].abs().sum()
    expected = torch.cat([small(x), large(x)], dim=1)
    out = merged(x)
    assert out.shape == expected.shape
    assert _rel(out, expected) <= TOLERANCE


def test_float64_chain_is_exact():
    gen = torch.Generator().manual_seed(12)
    dt = torch.float64
    convs = [
        _conv(gen, 2, 4, 6, (3, 2), (2, 1), (1, 2), (2, 1), 2, True, dt),
        _conv(gen, 2, 6, 6, (1, 3), (1, 2), 1, (0, 3), 6, True, dt),
        _conv(gen, 2, 6, 5, (5, 2), 1, (2, 1), 1, 1, False, dt),
    ]
    bns = [_batchnorm(gen, 2, 6, 1e-3, dtype=dt), None, _batchnorm(gen, 2, 5, 0.1, dtype=dt)]
    params = _params(convs)
    affines = _affines(bns)
    x = torch.randn(2, 4, 23, 19, generator=gen, dtype=dt)
    merged = to_conv(chain_map(params, affines), span_padding(params), dtype=dt)
    expected = _run_unpadded(x, convs, bns)
    assert merged.weight.dtype == dt
    assert merged(x).shape == expected.shape
    assert _rel(merged(x), expected) <= 1e-10
    assert _rel(run_front_padded(x, params, affines), expected) <= 1e-10


def test_map_with_an_offset_keeps_the_rest_of_its_padding():
    # a conv padded by 1 inside a span padded by 3: it starts 2 elements into the span input
    gen = torch.Generator().manual_seed(16)
    conv = _conv(gen, 1, 3, 4, 3, 2, 1, 1, 1, True)
    value = chain_map(_params([conv]), leading=(2,))
    assert value.offset == (2,)
    merged = to_conv(value, (3,))
    assert merged.padding == (1,)
    x = torch.randn(2, 3, 12, generator=gen)
    assert _rel(merged(x), conv(x)) <= TOLERANCE
    # the offset scales with the stride of what it crops
    assert crop(chain_map(_params([conv])), (3,)).offset == (6,)


def test_identity_skip_is_a_dirac_at_the_centre():
    gen = torch.Generator().manual_seed(13)
    convs = [_conv(gen, 2, 4, 4, 3, 1, 1, 1, 1, True), _conv(gen, 2, 4, 4, 3, 1, 1, 1, 1, True)]
    params = _params(convs)
    block = absorb_skip(params)
    branch = to_conv(chain_map(params), span_padding(params))
    assert tuple(block.weight.shape) == (4, 4, 5, 5) and block.padding == (2, 2)
    dirac = torch.zeros(4, 4, 5, 5)
    dirac[range(4), range(4), 2, 2] = 1.0
    assert torch.allclose(block.weight - branch.weight, dirac, atol=1e-6)
    x = torch.randn(2, 4, 8, 9, generator=gen)
    assert _rel(block(x), _run_unpadded(x, convs, [None, None]) + x) <= TOLERANCE


def test_projection_shortcut_lands_at_the_aligned_tap():
    gen = torch.Generator().manual_seed(14)
    convs = [_conv(gen, 2, 3, 5, 3, 2, 1, 1, 1, True), _conv(gen, 2, 5, 5, 3, 1, 1, 1, 1, True)]
    shortcut = _conv(gen, 2, 3, 5, 1, 2, 1, 0, 1, True)
    block = absorb_skip(_params(convs), _params([shortcut]))
    branch = to_conv(chain_map(_params(convs)), span_padding(_params(convs)))
    # branch padding 1 + 1 * 2 = 3, kernel 3 + 2 * 2 = 7: the 1x1 sits at tap 3
    assert tuple(block.weight.shape) == (5, 3, 7, 7) and block.padding == (3, 3) and block.stride == (2, 2)
    placed = torch.zeros(5, 3, 7, 7)
    placed[:, :, 3, 3] = shortcut.weight[:, :, 0, 0]
    assert torch.allclose(block.weight - branch.weight, placed, atol=1e-6)
    x = torch.randn(2, 3, 11, 10, generator=gen)
    expected = _run_unpadded(x, convs, [None, None]) + shortcut(x)
    assert _rel(block(x), expected) <= TOLERANCE


def test_to_module_round_trip():
    gen = torch.Generator().manual_seed(15)
    conv = _conv(gen, 2, 4, 6, (3, 1), (1, 2), (2, 1), (1, 0), 2, True)
    params = conv_params(conv)
    module = params.to_module()
    assert isinstance(module, nn.Conv2d)
    assert (module.stride, module.padding, module.dilation, module.groups) == ((1, 2), (1, 0), (2, 1), 2)
    x = torch.randn(2, 4, 9, 9, generator=gen)
    assert torch.equal(module(x), conv(x))


def test_side_bias_passes_through_later_convs_as_their_spatial_sums():
    """``conv2(affine(conv1(x) + s))`` with ``s`` one value per sample and channel is the merged
    conv plus ``A @ s``, ``A`` the product of the later convs' spatial sums, borders included."""
    gen = torch.Generator().manual_seed(17)
    conv1 = _conv(gen, 2, 3, 6, 3, 1, 1, 1, 1, True)
    conv2 = _conv(gen, 2, 6, 4, (3, 2), 2, (1, 2), (1, 1), 2, True)  # grouped, strided, dilated
    other = _conv(gen, 2, 3, 6, 1, 1, 1, 0, 1, False)
    scale, shift = torch.rand(6, generator=gen) + 0.5, torch.randn(6, generator=gen)
    x, s, t = (
        torch.randn(2, 3, 9, 8, generator=gen),
        torch.randn(2, 6, 1, 1, generator=gen),
        torch.randn(2, 4, 1, 1, generator=gen),
    )
    params = _params([conv1, conv2])
    total = span_padding(params)
    # the span, front-padded: two branches of x added (the 1×1 one cropped to align), plus s, an affine, conv2, plus t
    padded = F.pad(x, [p for p in reversed(total) for _ in range(2)])
    h = F.conv2d(padded, conv1.weight, conv1.bias) + F.conv2d(padded, other.weight)[:, :, 1:-1, 1:-1] + s
    h = h * scale[:, None, None] + shift[:, None, None]
    out = F.conv2d(h, conv2.weight, conv2.bias, stride=conv2.stride, dilation=conv2.dilation, groups=2) + t
    branch = then_conv(identity(3, 2), conv1.weight, conv1.bias, (1, 1), (1, 1))
    skip = crop(then_conv(identity(3, 2), other.weight, None, (1, 1), (1, 1)), (1, 1))
    value = then_affine(add_side(add(branch, skip), "s"), scale, shift)
    value = add_side(then_conv(value, conv2.weight, conv2.bias, conv2.stride, conv2.dilation, 2), "t")
    sides = dict(value.sides)
    assert sorted(sides) == ["s", "t"] and torch.equal(sides["t"], torch.eye(4, dtype=torch.float64))
    merged = to_conv(value, total)
    terms = sum(
        torch.einsum("oc,nc->no", matrix.float(), {"s": s, "t": t}[key].flatten(1)) for key, matrix in sides.items()
    )
    assert _rel(merged(x) + terms[:, :, None, None], out) <= TOLERANCE
    # a cat stacks the terms; a map without a term contributes zeros
    stacked = cat(value, then_conv(branch, conv2.weight, conv2.bias, conv2.stride, conv2.dilation, 2))
    assert dict(stacked.sides)["s"].shape == (8, 6) and not dict(stacked.sides)["s"][4:].any()
