"""Random network descriptions: a hypothesis strategy, a seeded generator, a replayer.

Every random decision is one call ``source.integer(lo, hi)``, and the generator is
written so that ``lo`` is always the simplest answer (no activation, kernel 1, one
block, no extra op ...). Three sources drive the same code:

* :func:`networks` — a ``hypothesis`` strategy; hypothesis shrinks a failure toward
  ``lo`` everywhere, i.e. toward a smaller network;
* :func:`network_from_seed` — ``random.Random(seed)``: the long run's reproducible
  examples, which record their choices;
* :func:`network_from_choices` — replays recorded choices (clamped to each range, 0
  when exhausted), which is what :func:`tests.fuzz.shrink.shrink` edits.

Whatever the choices, the result is a valid network: shapes are tracked while
drawing, every branch of a multi-branch region realises the same stride and ends
with the same size ("aligned" padding: output = ceil(size / stride)), channels stay
≤ 16, spatial ≤ 16, and about 12 convs at most. ``exclude`` switches features off by
name (see :data:`FEATURES`), e.g. to keep a known library bug out of a run.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from hypothesis import strategies as st

from tests.fuzz.build import INPLACE, OP_KINDS, SPELLINGS
from tests.fuzz.spec import (
    Act,
    Block,
    Boundary,
    Branches,
    Conv,
    Extra,
    Net,
    Op,
    Residual,
    Shape,
    Unit,
    block_out,
)

__all__ = [
    "ACT_KINDS",
    "FEATURES",
    "RandomSource",
    "ReplaySource",
    "draw_net",
    "network_from_choices",
    "network_from_seed",
    "networks",
]

T = TypeVar("T")
Ints = tuple[int, ...]
Stride = Ints | None  # None: free (outside a region); a tuple: exactly that stride, aligned

MAX_CONVS = 12
MAX_CHANNELS = 16
MAX_SIZE = 16
ACT_KINDS = (
    "relu",
    "relu6",
    "leaky_relu",
    "prelu",
    "hardtanh",
    "silu",
    "gelu",
    "hardswish",
    "mish",
    "elu",
    "sigmoid",
    "tanh",
    "xsigmoid",
)
FEATURES = frozenset(
    {
        "conv1d",
        "two_inputs",
        "dict_output",
        "residual",
        "branches",
        "cat",
        "inverted",
        "boundary",
        "op",
        "pre_act",
        "dilation",
        "depthwise",
        "grouped",
        "explicit_pad",
        "same",
        "side_input",
        "side_pooled",
        "iadd",
        "bn",
        "scalar",
        "channel",
        "gn",
        "extra",
        *OP_KINDS,
        *ACT_KINDS,
        "maxpool",
        "avgpool",
        "upsample",
        "se",
        "reshape",
        *{f"spelling:{s}" for spellings in SPELLINGS.values() for s in spellings},
    }
)
"""Names ``exclude`` understands. An ``Extra`` is also known as ``extra:KIND`` and ``extra:KIND@WHERE``."""


class Source(Protocol):
    def integer(self, lo: int, hi: int) -> int: ...


class HypothesisSource:
    def __init__(self, draw):
        self.draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))


class RandomSource:
    """``random.Random(seed)``; ``choices`` records each answer as an offset from ``lo``."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.choices: list[int] = []

    def integer(self, lo: int, hi: int) -> int:
        value = self.rng.randint(lo, hi)
        self.choices.append(value - lo)
        return value


class ReplaySource:
    """Replays recorded offsets, clamped to each range; 0 once they run out."""

    def __init__(self, choices):
        self.choices = list(choices)
        self.used: list[int] = []

    def integer(self, lo: int, hi: int) -> int:
        k = len(self.used)
        value = min(lo + (self.choices[k] if k < len(self.choices) else 0), hi)
        self.used.append(value - lo)
        return value


@dataclass
class Ctx:
    src: Source
    exclude: frozenset[str]
    convs: int = MAX_CONVS
    embed: int = 0
    dims: int = 2

    def int(self, lo: int, hi: int) -> int:
        return self.src.integer(lo, hi) if hi > lo else lo

    def chance(self, percent: int) -> bool:
        """True with ``percent`` % probability; shrinks to False."""
        return self.int(0, 99) >= 100 - percent

    def pick(self, options: Sequence[T]) -> T:
        return options[self.int(0, len(options) - 1)]

    def weighted(self, pairs: Sequence[tuple[T, int]]) -> T:
        """One of ``(option, weight)`` (weights > 0), shrinking toward the first."""
        total = sum(w for _, w in pairs)
        k = self.int(0, total - 1)
        for option, weight in pairs:
            if k < weight:
                return option
            k -= weight
        raise AssertionError("unreachable")

    def ok(self, *names: str) -> bool:
        return not any(n in self.exclude for n in names)


# ------------------------------------------------------------------ the network
def draw_net(src: Source, exclude: frozenset[str] = frozenset()) -> Net:
    """A random valid network description drawn from ``src``."""
    ctx = Ctx(src, frozenset(exclude))
    ctx.dims = 1 if ctx.ok("conv1d") and ctx.chance(25) else 2
    side = ctx.int(4, 12)
    size = (side,) if ctx.dims == 1 else (side, ctx.int(4, 12) if ctx.chance(25) else side)
    channels = ctx.int(1, 4)
    batch = 1 + ctx.chance(25)
    ctx.embed = 4 if ctx.ok("two_inputs") and ctx.chance(10) else 0
    count = ctx.weighted([(1, 1), (2, 1), (3, 2), (4, 2), (5, 2), (6, 2)])
    blocks, _ = draw_seq(ctx, Shape(channels, size), count, depth=0)
    tap = -1
    fresh = [k for k, b in enumerate(blocks[:-1]) if not isinstance(b, Op)]
    if fresh and ctx.ok("dict_output") and ctx.chance(10):
        tap = ctx.pick(fresh)
    return Net(blocks, channels, size, batch, ctx.embed, tap, seed=ctx.int(0, 999))


@st.composite
def networks(draw: st.DrawFn, exclude: frozenset[str] = frozenset()) -> Net:
    """Hypothesis strategy of network descriptions (shrinks toward small networks)."""
    return draw_net(HypothesisSource(draw), exclude)


def network_from_seed(seed: int, exclude: frozenset[str] = frozenset()) -> tuple[Net, list[int]]:
    """The network of ``seed`` and the choices that made it (for :func:`network_from_choices`)."""
    source = RandomSource(seed)
    return draw_net(source, exclude), source.choices


def network_from_choices(choices: Sequence[int], exclude: frozenset[str] = frozenset()) -> tuple[Net, list[int]]:
    """Replay ``choices``; returns the network and the choices actually used."""
    source = ReplaySource(choices)
    return draw_net(source, exclude), source.used


# ------------------------------------------------------------------ sequences and blocks
def _ones(ctx: Ctx) -> tuple[int, ...]:
    return (1,) * ctx.dims


def draw_seq(
    ctx: Ctx,
    shape: Shape,
    count: int,
    depth: int,
    stride: Stride = None,
    out: int | None = None,
) -> tuple[tuple[Block, ...], Shape]:
    """``count`` blocks. Inside a region (``stride`` given) one block realises ``stride``,
    every conv is aligned, and the last block is a unit with ``out`` channels."""
    carrier = ctx.int(0, count - 1) if stride is not None and any(s > 1 for s in stride) else -1
    blocks: list[Block] = []
    for k in range(count):
        if stride is None and ctx.convs <= 0 and blocks:
            break
        here = None if stride is None else (stride if k == carrier else _ones(ctx))
        if k == count - 1 and out is not None:
            new: tuple[Block, ...] = (draw_unit(ctx, shape, here, out=out, act_percent=40),)
        else:
            new = draw_block(ctx, shape, depth, here)
        for block in new:
            blocks.append(block)
            shape = block_out(block, shape)
    return tuple(blocks), shape


def draw_block(ctx: Ctx, shape: Shape, depth: int, stride: Stride) -> tuple[Block, ...]:
    needs_stride = stride is not None and any(s > 1 for s in stride)
    kinds = [("unit", 8)]
    if depth < 2 and ctx.convs >= 2:
        kinds += [(k, 2) for k in ("residual", "branches") if ctx.ok(k)]
        if ctx.convs >= 3 and ctx.ok("inverted"):
            kinds.append(("inverted", 1))
    if not needs_stride:
        kinds += [(k, 1) for k in ("boundary", "op") if ctx.ok(k)]
    kind = ctx.weighted(kinds)
    if kind == "residual":
        return (draw_residual(ctx, shape, depth, stride),)
    if kind == "branches":
        return (draw_branches(ctx, shape, depth, stride),)
    if kind == "inverted":
        return draw_inverted(ctx, shape, stride)
    if kind == "boundary":
        boundary = draw_boundary(ctx, shape, aligned=stride is not None)
        if boundary is not None:
            return (boundary,)
    if kind == "op":
        return (Op(ctx.pick([k for k in OP_KINDS if ctx.ok(k)])),)
    return (draw_unit(ctx, shape, stride),)


def _free_stride(ctx: Ctx, shape: Shape, percent: int = 20) -> tuple[int, ...]:
    return tuple(2 if s >= 2 and ctx.chance(percent) else 1 for s in shape.size)


def draw_residual(ctx: Ctx, shape: Shape, depth: int, stride: Stride) -> Residual:
    stride = stride or _free_stride(ctx, shape)
    unit_stride = all(s == 1 for s in stride)
    projection = not unit_stride or ctx.chance(40)
    out = shape.channels if not projection or ctx.chance(50) else ctx.int(1, MAX_CHANNELS)
    pre = draw_act(ctx, inplace_ok=False) if ctx.ok("pre_act") and ctx.chance(20) else None
    body, _ = draw_seq(ctx, shape, ctx.int(1, 3), depth + 1, stride=stride, out=out)
    skip = draw_unit(ctx, shape, stride, out=out, act_percent=10) if projection else None
    act = draw_act(ctx) if ctx.chance(60) else None
    adds = ["+", "torch.add", "method"] + (["+="] if ctx.ok("iadd") else [])
    return Residual(body, skip, pre, act, ctx.pick(adds))


def draw_branches(ctx: Ctx, shape: Shape, depth: int, stride: Stride) -> Branches:
    stride = stride or _free_stride(ctx, shape)
    join = "cat" if ctx.ok("cat") and ctx.chance(40) else "add"
    count = ctx.int(2, 3)
    channels = shape.channels
    identity = -1
    if all(s == 1 for s in stride) and ctx.chance(30) and (join == "add" or channels + count - 1 <= MAX_CHANNELS):
        identity = ctx.int(0, count - 1)
    if join == "add":
        out = channels if identity >= 0 or ctx.chance(50) else ctx.int(1, MAX_CHANNELS)
        widths = [out] * count
    else:
        room = MAX_CHANNELS - (channels if identity >= 0 else 0)
        share = max(1, room // (count - (identity >= 0)))
        widths = [ctx.int(1, share) for _ in range(count)]
    branches = []
    for k in range(count):
        if k == identity:
            branches.append(())
            continue
        blocks, _ = draw_seq(ctx, shape, ctx.int(1, 2), depth + 1, stride=stride, out=widths[k])
        branches.append(blocks)
    act = draw_act(ctx) if ctx.chance(50) else None
    return Branches(tuple(branches), join, act)


def draw_inverted(ctx: Ctx, shape: Shape, stride: Stride) -> tuple[Block, ...]:
    """MobileNetV2's block: 1×1 expand, depthwise k×k (the stride), 1×1 project (+ x)."""
    stride = stride or _free_stride(ctx, shape)
    channels, ones = shape.channels, _ones(ctx)
    hidden = min(MAX_CHANNELS, channels * ctx.int(2, 4))
    residual = all(s == 1 for s in stride) and ctx.chance(70)
    out = channels if residual else ctx.int(1, MAX_CHANNELS)
    act = draw_act(ctx)
    expand = Unit(Conv(hidden, ones, bias=False), "bn", act)
    kernel = (ctx.pick([3, 5]),) * ctx.dims
    padding, pad = draw_padding(ctx, shape.size, kernel, ones, stride, aligned=True)
    depthwise = Unit(Conv(hidden, kernel, stride if stride != ones else (), (), hidden, padding, pad, False), "bn", act)
    project = Unit(Conv(out, ones, bias=False), "bn", None)
    ctx.convs -= 3
    if residual:
        return (Residual((expand, depthwise, project)),)
    return expand, depthwise, project


def draw_boundary(ctx: Ctx, shape: Shape, aligned: bool) -> Boundary | None:
    kinds = ["avgpool", "reshape"]
    if not aligned and all(s >= 2 for s in shape.size):
        kinds.append("maxpool")
    if not aligned and all(2 * s <= MAX_SIZE for s in shape.size):
        kinds.append("upsample")
    if ctx.convs >= 2:
        kinds.append("se")
    kinds = [k for k in kinds if ctx.ok(k)]
    if not kinds:
        return None
    kind = ctx.pick(kinds)
    if kind != "se":
        return Boundary(kind)
    ctx.convs -= 2
    return Boundary("se", ctx.int(1, max(1, shape.channels // 2)))


# ------------------------------------------------------------------ units
def draw_unit(ctx: Ctx, shape: Shape, stride: Stride, out: int | None = None, act_percent: int = 70) -> Unit:
    """A unit; ``stride`` given means aligned padding and exactly that stride."""
    conv = draw_conv(ctx, shape, stride, out)
    ctx.convs -= 1
    after = block_out(Unit(conv), shape)
    # GroupNorm (groups = gcd(C, 4), see build._norm) needs more than one value per group
    gn_ok = math.prod(after.size) * (after.channels // math.gcd(after.channels, 4)) > 1
    kinds = (("bn", 6), ("scalar", 1), ("channel", 1), ("gn", 1 if gn_ok else 0))
    norms = [(None, 3)] + [(n, w) for n, w in kinds if w and ctx.ok(n)]
    norm = ctx.weighted(norms)
    act = draw_act(ctx) if ctx.chance(act_percent) else None
    extras: tuple[Extra, ...] = ()
    if ctx.ok("extra") and ctx.chance(15):
        where = ctx.pick(["act", "conv", "norm"])
        kinds = [k for k in OP_KINDS if ctx.ok(k, f"extra:{k}", f"extra:{k}@{where}")]
        if kinds:
            extras = (Extra(ctx.pick(kinds), where),)
    side = None
    if ctx.chance(6):
        sides = [s for s, ok in (("input", ctx.embed > 0), ("pooled", ctx.convs >= 1)) if ok and ctx.ok(f"side_{s}")]
        side = ctx.pick(sides) if sides else None
        ctx.convs -= side == "pooled"
    return Unit(conv, norm, act, extras, side)


def draw_act(ctx: Ctx, inplace_ok: bool = True) -> Act:
    kinds = [k for k in ACT_KINDS if ctx.ok(k)] or ["relu"]
    kind = ctx.pick(kinds)
    spellings = [s for s in SPELLINGS[kind] if (inplace_ok or s not in INPLACE) and ctx.ok(f"spelling:{s}")]
    return Act(kind, ctx.pick(spellings or [SPELLINGS[kind][0]]))


def _channels(ctx: Ctx, cin: int, out: int | None) -> tuple[int, int]:
    """``(out, groups)``: dense, depthwise (groups = cin) or grouped."""
    modes = [("dense", 6)] + [(m, w) for m, w in (("depthwise", 2), ("grouped", 1)) if ctx.ok(m)]
    mode = ctx.weighted(modes)
    if mode == "depthwise" and cin >= 2:
        multiples = [m for m in (1, 2) if cin * m <= MAX_CHANNELS and (out is None or out == cin * m)]
        if multiples:
            return cin * ctx.pick(multiples), cin
    if mode == "grouped":
        groups = [g for g in range(2, cin) if cin % g == 0 and (out is None or out % g == 0)]
        if groups:
            g = ctx.pick(groups)
            return (out if out is not None else g * ctx.int(1, MAX_CHANNELS // g)), g
    if out is None:
        out = cin if ctx.chance(50) else ctx.int(1, MAX_CHANNELS)
    return out, 1


def draw_conv(ctx: Ctx, shape: Shape, stride: Stride, out: int | None) -> Conv:
    dims = ctx.dims
    sizes = [(1, 3), (3, 5), (2, 1), (5, 2), (4, 1)]
    k = ctx.weighted(sizes)
    kernel = (k,) * dims
    if dims == 2 and ctx.chance(20):
        kernel = (k, ctx.weighted(sizes))
    dilation = (1,) * dims
    if ctx.ok("dilation") and ctx.chance(15):
        dilation = tuple(2 if kd > 1 and ctx.chance(80) else 1 for kd in kernel)
    aligned = stride is not None
    stride = stride if aligned else _free_stride(ctx, shape)
    out, groups = _channels(ctx, shape.channels, out)
    padding, pad = draw_padding(ctx, shape.size, kernel, dilation, stride, aligned)
    ones = (1,) * dims
    return Conv(
        out,
        kernel,
        stride if stride != ones else (),
        dilation if dilation != ones else (),
        groups,
        padding,
        pad,
        bias=ctx.chance(50),
    )


def draw_padding(
    ctx: Ctx,
    size: Ints,
    kernel: Ints,
    dilation: Ints,
    stride: Ints,
    aligned: bool,
) -> tuple[Ints | str, Ints]:
    """``(padding, pad)`` for a conv: symmetric ints, ``"same"``, or an explicit ``F.pad``.

    Aligned: output = ceil(size / stride), so every branch of a region ends the same
    size. Otherwise any total padding from the least that keeps the output non-empty
    up to extent − 1.
    """
    totals = []
    for n, k, d, s in zip(size, kernel, dilation, stride):
        extent = d * (k - 1) + 1
        if aligned:
            least = (-(-n // s) - 1) * s + extent - n
            lo, hi = max(0, least), least + s - 1
        else:
            lo, hi = max(0, extent - n), extent - 1
        totals.append(ctx.int(lo, hi) if ctx.chance(30) else hi)
    extents = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    forms = [("symmetric", 6)]
    if ctx.ok("explicit_pad"):
        forms.append(("explicit", 1))
    if ctx.ok("same") and all(s == 1 for s in stride) and all(t == e - 1 for t, e in zip(totals, extents)):
        forms.append(("same", 1))
    form = ctx.weighted(forms)
    if form == "same":
        return "same", ()
    if form == "symmetric" and all(t % 2 == 0 for t in totals):
        return (tuple(t // 2 for t in totals) if any(totals) else ()), ()
    pad: list[int] = []
    for total in reversed(totals):
        before = ctx.int(0, total)
        pad += [before, total - before]
    return (), (tuple(pad) if any(pad) else ())
