"""Frozen descriptions of small random CNNs: what the fuzzer generates, shrinks and prints.

A network is a tree of frozen dataclasses. ``Net`` holds a sequence of blocks; a
block is a conv ``Unit``, a ``Residual`` block, a multi-branch region
(``Branches``), a ``Boundary`` op fxmerge does not merge, or a transparent ``Op``.
``repr`` is valid Python, and :func:`to_source` prints the same expression
indented and without default fields, so a shrunk failure pastes straight into a
regression test::

    from tests.fuzz.spec import *  # noqa: F403
    NET = Net(blocks=(Unit(Conv(8, (3, 3), padding=(1, 1))),))

The module that a description stands for is built by ``tests.fuzz.build``; the
shapes every block sees are computed here (:func:`block_out`), without torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Union

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "Act",
    "Block",
    "Boundary",
    "Branches",
    "Conv",
    "Extra",
    "Net",
    "Op",
    "Residual",
    "Shape",
    "Unit",
    "block_out",
    "conv_out",
    "count_convs",
    "seq_out",
    "to_source",
]


class Shape(NamedTuple):
    """Channels and spatial size of the tensor between two blocks (batch left out)."""

    channels: int
    size: tuple[int, ...]


@dataclass(frozen=True)
class Act:
    """An activation: a registry name (``fxmerge/activations.py``) or ``"xsigmoid"``
    (``x * torch.sigmoid(x)``), written in one of the spellings of ``build.SPELLINGS``."""

    kind: str = "relu"
    spelling: str = "module"


@dataclass(frozen=True)
class Conv:
    """``nn.Conv1d`` / ``nn.Conv2d``. Empty ``stride`` / ``dilation`` mean all ones;
    ``padding`` is per-dim symmetric ints, ``"same"``, or empty (none); ``pad`` is an
    explicit ``F.pad`` in front of the conv (``F.pad`` order: last dim first)."""

    out: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding: tuple[int, ...] | str = ()
    pad: tuple[int, ...] = ()
    bias: bool = True


@dataclass(frozen=True)
class Extra:
    """A transparent op inside a unit, after its ``conv``, ``norm`` or ``act``."""

    kind: str
    where: str = "act"


@dataclass(frozen=True)
class Unit:
    """conv → norm → (per-sample bias) → activation, with transparent extras.

    ``norm``: ``"bn"`` (random statistics), ``"scalar"`` (``y * 1.5 + 0.25``),
    ``"channel"`` (per-channel scale and shift parameters), ``"gn"`` (GroupNorm) or
    ``None``. ``side``: a per-sample (N, C, 1, 1) bias added before the activation,
    from the second input (``"input"``) or from a pooled 1×1 conv of the unit's input
    (``"pooled"``).
    """

    conv: Conv
    norm: str | None = "bn"
    act: Act | None = Act()
    extras: tuple[Extra, ...] = ()
    side: str | None = None


@dataclass(frozen=True)
class Residual:
    """``act(body(t) + skip(t or x))``. ``skip=None`` is the identity (reads ``x``);
    ``pre`` makes it pre-activation (``t = pre(bn(x))``, else ``t = x``); ``add`` is
    the spelling of the sum (``"+"``, ``"torch.add"``, ``"method"``, ``"+="``)."""

    body: tuple[Block, ...]
    skip: Unit | None = None
    pre: Act | None = None
    act: Act | None = None
    add: str = "+"


@dataclass(frozen=True)
class Branches:
    """Parallel branches joined by ``"add"`` or ``"cat"``; an empty branch is the identity."""

    branches: tuple[tuple[Block, ...], ...]
    join: str = "add"
    act: Act | None = None


@dataclass(frozen=True)
class Boundary:
    """An op fxmerge does not merge: ``maxpool`` (stride 2), ``avgpool`` (3/1/1),
    ``upsample`` (nearest, ×2), ``se`` (squeeze-excitation gate with ``hidden``
    channels), ``reshape`` (flatten and unflatten the spatial dims)."""

    kind: str
    hidden: int = 0


@dataclass(frozen=True)
class Op:
    """A transparent op between blocks (``build.OP_KINDS``)."""

    kind: str


Block = Union[Unit, Residual, Branches, Boundary, Op]  # noqa: UP007 - a runtime alias for annotations


@dataclass(frozen=True)
class Net:
    """The whole network: input ``(batch, channels, *size)``, Conv1d when ``size`` has one
    dim. ``embed > 0`` adds a second input ``(batch, embed)``; ``tap >= 0`` makes the
    output a dict ``{"out": ..., "mid": <output of block tap>}``; ``seed`` fixes the
    weights, the BatchNorm statistics and the example inputs."""

    blocks: tuple[Block, ...]
    channels: int = 3
    size: tuple[int, ...] = (8, 8)
    batch: int = 1
    embed: int = 0
    tap: int = -1
    seed: int = 0

    @property
    def dims(self) -> int:
        return len(self.size)

    def to_source(self) -> str:
        return to_source(self)

    def build(self) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        """The ``nn.Module`` (eval mode, seeded weights) and its example inputs."""
        from tests.fuzz.build import build_net, example_inputs

        return build_net(self), example_inputs(self)

    def __str__(self) -> str:
        return to_source(self)


# --------------------------------------------------------------------------- shapes
def _ones(value: tuple[int, ...], dims: int) -> tuple[int, ...]:
    return value if value else (1,) * dims


def conv_out(conv: Conv, shape: Shape) -> Shape:
    """The shape after ``conv`` (its explicit ``pad`` included)."""
    dims = len(shape.size)
    stride, dilation = _ones(conv.stride, dims), _ones(conv.dilation, dims)
    size = []
    for d in range(dims):
        extent = dilation[d] * (conv.kernel[d] - 1) + 1
        total = 0
        if conv.pad:
            total += conv.pad[2 * (dims - 1 - d)] + conv.pad[2 * (dims - 1 - d) + 1]
        if conv.padding == "same":
            total += extent - 1
        elif conv.padding:
            total += 2 * conv.padding[d]
        size.append((shape.size[d] + total - extent) // stride[d] + 1)
    return Shape(conv.out, tuple(size))


def seq_out(blocks: tuple[Block, ...], shape: Shape) -> Shape:
    for block in blocks:
        shape = block_out(block, shape)
    return shape


def block_out(block: Block, shape: Shape) -> Shape:
    """The shape after ``block``."""
    if isinstance(block, Unit):
        return conv_out(block.conv, shape)
    if isinstance(block, Residual):
        return seq_out(block.body, shape)
    if isinstance(block, Branches):
        outs = [seq_out(branch, shape) for branch in block.branches]
        if block.join == "cat":
            return Shape(sum(o.channels for o in outs), outs[0].size)
        return outs[0]
    if isinstance(block, Boundary):
        if block.kind == "maxpool":
            return Shape(shape.channels, tuple(s // 2 for s in shape.size))
        if block.kind == "upsample":
            return Shape(shape.channels, tuple(2 * s for s in shape.size))
    return shape


def count_convs(block: Block | Net) -> int:
    """Conv call sites in a block or network (side-bias and SE convs included)."""
    if isinstance(block, Net):
        return sum(count_convs(b) for b in block.blocks)
    if isinstance(block, Unit):
        return 1 + (block.side == "pooled")
    if isinstance(block, Residual):
        return sum(count_convs(b) for b in block.body) + (block.skip is not None)
    if isinstance(block, Branches):
        return sum(count_convs(b) for branch in block.branches for b in branch)
    if isinstance(block, Boundary):
        return 2 if block.kind == "se" else 0
    return 0


# --------------------------------------------------------------------------- source
def to_source(value: object, indent: int = 0) -> str:
    """``value`` as a Python expression: default fields left out, long calls one field a line."""
    flat = _flat(value)
    if len(flat) + indent <= 96:
        return flat
    pad = "    " * (indent + 1)
    if dataclasses.is_dataclass(value):
        parts = [f"{pad}{name}={to_source(field, indent + 1)}," for name, field in _fields(value)]
        return f"{type(value).__name__}(\n" + "\n".join(parts) + f"\n{'    ' * indent})"
    if isinstance(value, tuple):
        parts = [f"{pad}{to_source(item, indent + 1)}," for item in value]
        return "(\n" + "\n".join(parts) + f"\n{'    ' * indent})"
    return flat


def _fields(value) -> list[tuple[str, object]]:
    out = []
    for field in dataclasses.fields(value):
        current = getattr(value, field.name)
        if field.default is not dataclasses.MISSING and current == field.default:
            continue
        out.append((field.name, current))
    return out


def _flat(value) -> str:
    if dataclasses.is_dataclass(value):
        fields = _fields(value)
        positional = {"Conv": 2, "Unit": 1, "Op": 1, "Boundary": 1, "Extra": 1}.get(type(value).__name__, 0)
        names = [f.name for f in dataclasses.fields(value)]
        parts = []
        for name, field in fields:
            index = names.index(name)
            keep_positional = index < positional and all(n in dict(fields) for n in names[:index])
            parts.append(_flat(field) if keep_positional else f"{name}={_flat(field)}")
        return f"{type(value).__name__}({', '.join(parts)})"
    if isinstance(value, tuple):
        inner = ", ".join(_flat(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)
