"""Build the ``nn.Module`` a network description (``tests.fuzz.spec``) stands for.

Every block is its own submodule with a ``forward(x, e)`` (``e`` is the second
input, or ``None``), so module paths — and with them fxmerge's unit ids — are
stable (``blocks.2.body.0.conv``). Weights come from ``torch.manual_seed(net.seed)``;
BatchNorm statistics and affine parameters are then drawn at random so that
folding them is never the identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from tests.fuzz.spec import (
    Act,
    Block,
    Boundary,
    Branches,
    Conv,
    Net,
    Op,
    Residual,
    Shape,
    Unit,
    block_out,
)

__all__ = ["INPLACE", "OP_KINDS", "SPELLINGS", "build_net", "example_inputs"]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d}
_POOL1 = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d}

# ------------------------------------------------------------------ activations
_MODULES: dict[str, Callable[..., nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": lambda **kw: nn.LeakyReLU(0.1, **kw),
    "hardtanh": lambda **kw: nn.Hardtanh(-1.0, 1.0, **kw),
    "silu": nn.SiLU,
    "hardswish": nn.Hardswish,
    "mish": nn.Mish,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}
_FUNCTIONS: dict[tuple[str, str], Callable] = {
    ("relu", "functional"): F.relu,
    ("relu", "torch"): torch.relu,
    ("relu", "method"): lambda x: x.relu(),
    ("relu", "functional_inplace"): lambda x: F.relu(x, inplace=True),
    ("relu", "underscore"): F.relu_,
    ("relu", "method_inplace"): lambda x: x.relu_(),
    ("relu", "torch_inplace"): torch.relu_,
    ("relu6", "functional"): F.relu6,
    ("relu6", "functional_inplace"): lambda x: F.relu6(x, inplace=True),
    ("leaky_relu", "functional"): lambda x: F.leaky_relu(x, 0.1),
    ("leaky_relu", "underscore"): lambda x: F.leaky_relu_(x, 0.1),
    ("hardtanh", "functional"): lambda x: F.hardtanh(x, -1.0, 1.0),
    ("hardtanh", "underscore"): lambda x: F.hardtanh_(x, -1.0, 1.0),
    ("silu", "functional"): F.silu,
    ("silu", "functional_inplace"): lambda x: F.silu(x, inplace=True),
    ("gelu", "functional"): F.gelu,
    ("hardswish", "functional"): F.hardswish,
    ("hardswish", "functional_inplace"): lambda x: F.hardswish(x, inplace=True),
    ("mish", "functional"): F.mish,
    ("mish", "functional_inplace"): lambda x: F.mish(x, inplace=True),
    ("elu", "functional"): F.elu,
    ("elu", "underscore"): F.elu_,
    ("sigmoid", "functional"): F.sigmoid,
    ("sigmoid", "torch"): torch.sigmoid,
    ("sigmoid", "method"): lambda x: x.sigmoid(),
    ("sigmoid", "method_inplace"): lambda x: x.sigmoid_(),
    ("tanh", "functional"): F.tanh,
    ("tanh", "torch"): torch.tanh,
    ("tanh", "method"): lambda x: x.tanh(),
    ("tanh", "method_inplace"): lambda x: x.tanh_(),
    ("xsigmoid", "torch"): lambda x: x * torch.sigmoid(x),
    ("xsigmoid", "method"): lambda x: x * x.sigmoid(),
}
_INPLACE_MODULES = {"relu", "relu6", "leaky_relu", "hardtanh", "silu", "hardswish", "mish", "elu"}

SPELLINGS: dict[str, tuple[str, ...]] = {
    kind: tuple(
        (["module"] if kind in _MODULES or kind == "prelu" else [])
        + (["module_inplace"] if kind in _INPLACE_MODULES else [])
        + [s for (k, s) in _FUNCTIONS if k == kind]
    )
    for kind in [*_MODULES, "prelu", "xsigmoid"]
}
"""The spellings each activation kind can be written in."""

INPLACE = frozenset({"module_inplace", "functional_inplace", "underscore", "method_inplace", "torch_inplace"})
"""Spellings that overwrite their input (used only where nothing else reads it)."""


class ActModule(nn.Module):
    def __init__(self, act: Act, channels: int):
        super().__init__()
        self.spelling = act.spelling
        self.function = _FUNCTIONS.get((act.kind, act.spelling))
        if act.kind == "prelu":
            self.fn = nn.PReLU(channels if channels % 2 == 0 else 1, init=0.2)
        elif act.spelling in ("module", "module_inplace"):
            self.fn = _MODULES[act.kind](**({"inplace": True} if act.spelling == "module_inplace" else {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.function is not None:
            return self.function(x)
        return self.fn(x)


def _act(act: Act | None, channels: int) -> nn.Module | None:
    return None if act is None else ActModule(act, channels)


# ------------------------------------------------------------------ transparent ops
class DropPath(nn.Module):
    """timm-style stochastic depth: the identity in eval mode."""

    def __init__(self, p: float = 0.2):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.p
        return x * keep / (1 - self.p)


OP_KINDS = (
    "identity",
    "dropout",
    "dropout_f",
    "drop_path",
    "stochastic_depth",
    "contiguous",
    "clone",
    "assert_dim",
    "assert_ndim",
    "assert_shape",
)


class OpModule(nn.Module):
    """One transparent op; ``shape`` is what an assert checks."""

    def __init__(self, kind: str, shape: Shape):
        super().__init__()
        self.kind, self.rank, self.channels = kind, len(shape.size) + 2, shape.channels
        modules = {
            "identity": nn.Identity,
            "dropout": lambda: nn.Dropout(0.3),
            "drop_path": DropPath,
            "stochastic_depth": lambda: StochasticDepth(0.2, "row"),
        }
        if kind in modules:
            self.fn = modules[kind]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.kind
        if kind in ("identity", "dropout", "drop_path", "stochastic_depth"):
            return self.fn(x)
        if kind == "dropout_f":
            return F.dropout(x, 0.3, self.training)
        if kind == "contiguous":
            return x.contiguous()
        if kind == "clone":
            return x.clone()
        if kind == "assert_dim":
            torch._assert(x.dim() == self.rank, "rank")
        elif kind == "assert_ndim":
            torch._assert(x.ndim == self.rank, "rank")
        elif kind == "assert_shape":
            assert x.shape[1] == self.channels, "channels"
        return x


# ------------------------------------------------------------------ units
class ChannelAffine(nn.Module):
    def __init__(self, channels: int, dims: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, channels, *([1] * dims)))
        self.shift = nn.Parameter(torch.zeros(1, channels, *([1] * dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _norm(kind: str | None, channels: int, dims: int) -> nn.Module | None:
    if kind == "bn":
        return _BN[dims](channels)
    if kind == "channel":
        return ChannelAffine(channels, dims)
    if kind == "gn":
        return nn.GroupNorm(math.gcd(channels, 4), channels)
    return None


def _conv(conv: Conv, shape: Shape) -> nn.Module:
    dims = len(shape.size)
    return _CONV[dims](
        shape.channels,
        conv.out,
        conv.kernel,
        stride=conv.stride or 1,
        dilation=conv.dilation or 1,
        groups=conv.groups,
        padding=conv.padding or 0,
        bias=conv.bias,
    )


class UnitModule(nn.Module):
    def __init__(self, spec: Unit, shape: Shape, embed: int):
        super().__init__()
        dims, out = len(shape.size), spec.conv.out
        self.spec, self.dims = spec, dims
        self.conv = _conv(spec.conv, shape)
        self.norm = _norm(spec.norm, out, dims)
        self.act = _act(spec.act, out)
        after = block_out(spec, shape)
        self.extras = nn.ModuleList(OpModule(e.kind, after) for e in spec.extras)
        if spec.side == "input":
            self.side = nn.Linear(embed, out)
        elif spec.side == "pooled":
            self.side = _CONV[dims](shape.channels, out, 1)

    def _extras(self, x, where: str):
        for extra, module in zip(self.spec.extras, self.extras):
            if extra.where == where:
                x = module(x)
        return x

    def forward(self, x: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
        source = x
        if self.spec.conv.pad:
            x = F.pad(x, list(self.spec.conv.pad))
        y = self._extras(self.conv(x), "conv")
        if self.spec.norm == "scalar":
            y = y * 1.5 + 0.25
        elif self.norm is not None:
            y = self.norm(y)
        if self.spec.side == "input":
            y = y + self.side(e).reshape(-1, self.spec.conv.out, *([1] * self.dims))
        elif self.spec.side == "pooled":
            y = y + self.side(_POOL1[self.dims](source, 1))
        y = self._extras(y, "norm")
        if self.act is not None:
            y = self.act(y)
        return self._extras(y, "act")


# ------------------------------------------------------------------ blocks
class SeqModule(nn.Module):
    def __init__(self, blocks: tuple[Block, ...], shape: Shape, embed: int):
        super().__init__()
        modules = []
        for block in blocks:
            modules.append(_block(block, shape, embed))
            shape = block_out(block, shape)
        self.blocks = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, e)
        return x


def _add(spelling: str, a, b):
    if spelling == "torch.add":
        return torch.add(a, b)
    if spelling == "method":
        return a.add(b)
    if spelling == "+=":
        a += b
        return a
    return a + b


class ResidualModule(nn.Module):
    def __init__(self, spec: Residual, shape: Shape, embed: int):
        super().__init__()
        self.spec = spec
        self.pre_norm = _BN[len(shape.size)](shape.channels) if spec.pre else None
        self.pre = _act(spec.pre, shape.channels)
        self.body = SeqModule(spec.body, shape, embed)
        self.skip = UnitModule(spec.skip, shape, embed) if spec.skip else None
        self.act = _act(spec.act, block_out(spec, shape).channels)

    def forward(self, x: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
        t = self.pre(self.pre_norm(x)) if self.pre is not None else x
        skip = self.skip(t, e) if self.skip is not None else x
        y = _add(self.spec.add, self.body(t, e), skip)
        return self.act(y) if self.act is not None else y


class BranchesModule(nn.Module):
    def __init__(self, spec: Branches, shape: Shape, embed: int):
        super().__init__()
        self.join = spec.join
        self.branches = nn.ModuleList(SeqModule(b, shape, embed) for b in spec.branches)
        self.act = _act(spec.act, block_out(spec, shape).channels)

    def forward(self, x: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
        outs = [branch(x, e) for branch in self.branches]
        if self.join == "cat":
            y = torch.cat(outs, dim=1)
        else:
            y = outs[0]
            for other in outs[1:]:
                y = y + other
        return self.act(y) if self.act is not None else y


class BoundaryModule(nn.Module):
    def __init__(self, spec: Boundary, shape: Shape):
        super().__init__()
        self.kind, self.dims, self.size = spec.kind, len(shape.size), shape.size
        if spec.kind == "maxpool":
            self.pool = _MAXPOOL[self.dims](2)
        if spec.kind == "se":
            self.reduce = _CONV[self.dims](shape.channels, spec.hidden, 1)
            self.expand = _CONV[self.dims](spec.hidden, shape.channels, 1)

    def forward(self, x: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "maxpool":
            return self.pool(x)
        if self.kind == "avgpool":
            return _AVGPOOL[self.dims](x, 3, 1, 1)
        if self.kind == "upsample":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.kind == "se":
            gate = self.expand(F.relu(self.reduce(_POOL1[self.dims](x, 1))))
            return x * torch.sigmoid(gate)
        if self.dims == 1:  # flatten(2) of (N, C, L) would return x itself, which torch.export then renames
            return x.unflatten(2, (self.size[0], 1)).flatten(2)
        return x.flatten(2).unflatten(2, self.size)


class _OpBlock(OpModule):
    def forward(self, x: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


def _block(block: Block, shape: Shape, embed: int) -> nn.Module:
    if isinstance(block, Unit):
        return UnitModule(block, shape, embed)
    if isinstance(block, Residual):
        return ResidualModule(block, shape, embed)
    if isinstance(block, Branches):
        return BranchesModule(block, shape, embed)
    if isinstance(block, Boundary):
        return BoundaryModule(block, shape)
    assert isinstance(block, Op)
    return _OpBlock(block.kind, shape)


# ------------------------------------------------------------------ the network
class FuzzNet(nn.Module):
    def __init__(self, net: Net):
        super().__init__()
        self.tap = net.tap
        shape = Shape(net.channels, net.size)
        self.blocks = nn.ModuleList()
        for block in net.blocks:
            self.blocks.append(_block(block, shape, net.embed))
            shape = block_out(block, shape)

    def run(self, x: torch.Tensor, e: torch.Tensor | None) -> torch.Tensor | dict[str, torch.Tensor]:
        mid = None
        for k, block in enumerate(self.blocks):
            x = block(x, e)
            if k == self.tap:
                mid = x
        return x if mid is None else {"out": x, "mid": mid}

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        return self.run(x, None)


class FuzzNet2(FuzzNet):
    """The two-input variant: ``e`` is a per-sample embedding ``(batch, embed)``."""

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        return self.run(x, e)


def _randomise(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)

    def uniform(t: torch.Tensor, lo: float, hi: float) -> None:
        t.data.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                uniform(m.running_mean, -0.5, 0.5)
                uniform(m.running_var, 0.5, 1.5)
                uniform(m.weight, 0.5, 1.5)
                uniform(m.bias, -0.5, 0.5)
            elif isinstance(m, nn.GroupNorm):
                uniform(m.weight, 0.5, 1.5)
                uniform(m.bias, -0.5, 0.5)
            elif isinstance(m, ChannelAffine):
                uniform(m.scale, 0.5, 1.5)
                uniform(m.shift, -0.5, 0.5)
            elif isinstance(m, nn.PReLU):
                uniform(m.weight, 0.0, 0.5)


def build_net(net: Net) -> nn.Module:
    """The module ``net`` describes, in eval mode, with seeded weights and statistics."""
    torch.manual_seed(net.seed)
    model = (FuzzNet2 if net.embed else FuzzNet)(net)
    _randomise(model, net.seed)
    model.fxmerge_name = "FuzzNet"
    return model.eval()


def example_inputs(net: Net) -> tuple[torch.Tensor, ...]:
    """Seeded example inputs: ``x`` (and ``e`` when ``net.embed``)."""
    gen = torch.Generator().manual_seed(net.seed + 2)
    x = torch.randn(net.batch, net.channels, *net.size, generator=gen)
    if not net.embed:
        return (x,)
    return x, torch.randn(net.batch, net.embed, generator=gen)
