"""The values that travel between fxmerge's stages.

Every stage of the pipeline (capture → match → span graph → tables → solve →
linearize → merge) is a pure function from one of these values to the next. They
are small frozen dataclasses so that a stage can never reach back and mutate what
an earlier stage produced, and so that they serialise to JSON without pickling.

Vocabulary (see docs/ARCHITECTURE.md):

unit      one conv call site, the per-channel affine ops folded into it, and at
          most one activation.
join      an ``add`` or ``cat`` of several tensors, with the affines and the one
          activation that follow it.
position  a tensor where a nonlinearity may be kept: a unit's or join's output, or
          a *source* (a model input or the output of an op fxmerge does not merge).
span      the units and joins between two positions; with every activation strictly
          inside removed it is one affine, translation-equivariant map (one conv).
option    which reducible convs of a span are pruned (replaced by the identity).
entry     one (span, option); the row of the latency and importance tables.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from types import MappingProxyType
from typing import Any, Literal

Shape = tuple[int, ...]


def frozen_mapping(mapping: Mapping | None) -> Mapping:
    """A read-only copy of ``mapping`` (for the dict fields of frozen tables)."""
    return MappingProxyType(dict(mapping or {}))


class FrozenTable:
    """Mixin for frozen dataclasses with read-only mapping fields: they pickle as plain dicts.

    Tables travel between the ranks of a process group (``torch.distributed`` pickles
    them); a ``mappingproxy`` cannot be pickled, so each is sent as a ``dict`` and
    frozen again by ``__post_init__`` on arrival.
    """

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        values = (getattr(self, f.name) for f in fields(self))  # type: ignore[arg-type]
        return type(self), tuple(dict(v) if isinstance(v, MappingProxyType) else v for v in values)


@dataclass(frozen=True)
class ConvSpec:
    """A convolution, complete enough to build and time it without the model.

    ``padding`` is symmetric per spatial dim (what ``nn.Conv2d`` accepts).
    ``activation`` names the activation that follows the conv (a key of the
    activation registry in ``fxmerge.passes.match``) or ``None``.
    ``input_shape`` is the real (N, C, *spatial) shape the conv runs at.
    """

    dims: int
    in_channels: int
    out_channels: int
    kernel_size: Shape
    stride: Shape
    padding: Shape
    dilation: Shape
    groups: int
    bias: bool
    activation: str | None
    input_shape: Shape
    dtype: str = "float32"

    def signature(self) -> str:
        """A stable string key: identical convs share one latency measurement."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @property
    def output_shape(self) -> Shape:
        spatial = tuple(
            (size + 2 * pad - dil * (k - 1) - 1) // s + 1
            for size, pad, dil, k, s in zip(
                self.input_shape[2:], self.padding, self.dilation, self.kernel_size, self.stride
            )
        )
        return (self.input_shape[0], self.out_channels, *spatial)

    @property
    def is_depthwise(self) -> bool:
        return self.groups == self.in_channels and self.groups > 1

    @property
    def element_bytes(self) -> int:
        """Bytes per tensor element of ``dtype``."""
        bits = re.search(r"(\d+)$", self.dtype)  # float32, bfloat16, float64 ...
        return int(bits.group(1)) // 8 if bits else 4

    @property
    def weight_bytes(self) -> int:
        """The size of the conv's weight (and bias) tensors in memory."""
        numel = self.out_channels * (self.in_channels // self.groups) * math.prod(self.kernel_size)
        return (numel + (self.out_channels if self.bias else 0)) * self.element_bytes

    @property
    def traffic_bytes(self) -> int:
        """What one run of the conv reads and writes: its weights, its input and its output."""
        tensors = math.prod(self.input_shape) + math.prod(self.output_shape)
        return self.weight_bytes + tensors * self.element_bytes

    @classmethod
    def of_conv(cls, conv, *, input_shape: Shape, activation: str | None, bias: bool, dtype=None) -> ConvSpec:
        """The spec of a conv given by its geometry (a ``kernels.ConvParams`` or anything with its fields)."""
        return cls(
            dims=len(conv.kernel_size),
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=tuple(conv.kernel_size),
            stride=tuple(conv.stride),
            padding=tuple(conv.padding),
            dilation=tuple(conv.dilation),
            groups=conv.groups,
            bias=bias,
            activation=activation,
            input_shape=tuple(input_shape),
            dtype=str(dtype).replace("torch.", "") if dtype is not None else "float32",
        )

    @classmethod
    def from_dict(cls, data: dict) -> ConvSpec:
        tuples = {"kernel_size", "stride", "padding", "dilation", "input_shape"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in data.items()})


@dataclass(frozen=True)
class Unit:
    """One conv call site with what folds into it.

    ``id`` is stable across re-tracing the same model (it is built from the conv's
    module path, and the call index when a module is called at several sites).
    ``reducible``: maps C→C channels with stride 1, so it may be pruned to identity.
    ``ineligible`` says why the unit cannot be merged with others (or ``None``).

    The activation may be a *normalised activation* (``norm`` names the norm: a
    GroupNorm, LayerNorm or InstanceNorm followed by the activation; removing the
    position removes both). ``activation_nodes`` lists every node of the activation
    in graph order (the norm and its helpers, a SiLU's ``sigmoid``); the last one is
    ``activation_node``. ``side_biases`` are the per-sample bias adds of the tail (an
    ``(N, C, 1, 1)`` tensor added onto the conv's output, e.g. a diffusion time
    embedding), ``side_inputs`` the positions their other operands are computed from.
    ``droppable``: the conv may be dropped entirely (the identity option of its
    single-unit span): a reducible conv right after a nearest-neighbour upsample.
    """

    id: str
    conv_node: str
    affine_nodes: tuple[str, ...]
    activation_node: str | None
    activation: str | None
    conv: ConvSpec
    input_position: str
    output_position: str
    reducible: bool
    ineligible: str | None = None
    activation_nodes: tuple[str, ...] = ()
    norm: str | None = None
    side_biases: tuple[str, ...] = ()
    side_inputs: tuple[str, ...] = ()
    droppable: bool = False


@dataclass(frozen=True)
class Join:
    """An ``add`` (residual) or ``cat`` (parallel branches) with what follows it.

    ``activation_nodes``, ``norm``, ``side_biases`` and ``side_inputs`` as in :class:`Unit`.
    """

    id: str
    kind: Literal["add", "cat"]
    node: str
    affine_nodes: tuple[str, ...]
    activation_node: str | None
    activation: str | None
    operands: tuple[str, ...]  # position ids, in argument order
    output_position: str
    ineligible: str | None = None
    activation_nodes: tuple[str, ...] = ()
    norm: str | None = None
    side_biases: tuple[str, ...] = ()
    side_inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Position:
    """A tensor where a nonlinearity may stay.

    ``kind`` is ``"unit"`` or ``"join"`` (the output of that unit or join, after its
    activation) or ``"source"`` (a model input or a boundary op's output: spans may
    start there but nothing produces it inside a span). ``node`` is the FX node whose
    output is this tensor. ``pinned`` says why the tensor must be materialised (used
    by an op outside every span, or :data:`MODEL_OUTPUT`), or ``None``.

    For a source, ``inputs`` are the positions its value is computed from (through
    ops outside every unit and join: a norm, a pool, an attention), and ``attention``
    says whether a matrix product of tensors lies on the way (an attention's output).
    """

    id: str
    index: int
    kind: Literal["unit", "join", "source"]
    node: str
    activation: str | None
    shape: Shape
    pinned: str | None = None
    inputs: tuple[str, ...] = ()
    attention: bool = False


MODEL_OUTPUT = "a model output"
"""``Position.pinned`` of a tensor the model returns."""


@dataclass(frozen=True)
class Option:
    """Which reducible convs of a span are pruned, and the conv the span becomes.

    An ``identity`` option prunes every conv of its span (offered only for a
    :attr:`Unit.droppable` unit): the span becomes the identity, latency 0. Its
    ``conv`` is that identity written as a depthwise 1×1 conv without bias, so that
    every reader of ``Option.conv`` keeps working; nothing is emitted for it.
    """

    id: str
    pruned: tuple[str, ...]  # unit ids replaced by the identity
    conv: ConvSpec  # the merged conv, with the span's closing activation
    identity: bool = False


@dataclass(frozen=True)
class Span:
    """The units and joins between positions ``start`` and ``end``."""

    id: str
    start: str
    end: str
    units: tuple[str, ...]
    joins: tuple[str, ...]  # joins absorbed into the merged kernel
    dropped_activations: tuple[str, ...]  # position ids whose activation is removed
    options: tuple[Option, ...]


@dataclass(frozen=True)
class Entry:
    """One (span, option): a row of the latency and importance tables."""

    id: str
    span: str
    start: str
    end: str
    option: Option

    @property
    def conv(self) -> ConvSpec:
        return self.option.conv


@dataclass(frozen=True)
class Parallel:
    """A multi-branch region between the position before it and the one after it.

    Each branch is a :class:`Chain` whose first position is the region's source; an
    identity branch (a plain skip) has a single position. ``join`` is the join whose
    output is the position after the region. ``mergeable`` says whether a span may
    cover the whole region (every branch linear and the join an add or a cat).
    """

    join: str
    branches: tuple[Chain, ...]
    mergeable: bool


@dataclass(frozen=True)
class Step:
    """What lies between two consecutive positions of a chain.

    ``kind == "unit"``: a single unit edge (``unit`` set); spans may cross it.
    ``kind == "parallel"``: a multi-branch region (``region`` set).
    """

    kind: Literal["unit", "parallel"]
    unit: str | None = None
    region: Parallel | None = None


@dataclass(frozen=True)
class Chain:
    """A series of positions; ``steps[k]`` connects ``positions[k]`` to ``positions[k+1]``.

    Spans of this chain start and end at positions of this chain. A branch chain
    starts at its region's source, which also belongs to the enclosing chain.
    """

    positions: tuple[str, ...]
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class Rejection:
    """A node (or span) fxmerge does not merge, and why."""

    node: str
    reason: str


@dataclass(frozen=True)
class Matched:
    """What ``match`` found in one graph: units, joins, positions and boundaries.

    ``weight_norms`` is the summed ``|weight|`` of every unit's conv, which decides
    which convs an option keeps when several subsets give the same merged conv.
    """

    units: tuple[Unit, ...]
    joins: tuple[Join, ...]
    positions: tuple[Position, ...]
    rejections: tuple[Rejection, ...]
    weight_norms: dict[str, float] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class SpanGraph:
    """Everything the tables and the solver need, without touching the model again.

    ``chains`` are the top-level chains (one per connected piece of the network
    between sources and outputs). ``rules`` is ``"general"`` or ``"paper"``.
    """

    model: str
    rules: str
    input_shapes: tuple[Shape, ...]
    units: tuple[Unit, ...]
    joins: tuple[Join, ...]
    positions: tuple[Position, ...]
    spans: tuple[Span, ...]
    chains: tuple[Chain, ...]
    rejections: tuple[Rejection, ...]
    settings: tuple[tuple[str, str], ...] = field(default=())

    @property
    def entries(self) -> tuple[Entry, ...]:
        cached = self.__dict__.get("_entries")
        if cached is not None:
            return cached
        cached = tuple(
            Entry(id=entry_id(span.id, option.id), span=span.id, start=span.start, end=span.end, option=option)
            for span in self.spans
            for option in span.options
        )
        self.__dict__["_entries"] = cached
        return cached

    def unit(self, unit_id: str) -> Unit:
        return self._index("units")[unit_id]

    def join(self, join_id: str) -> Join:
        return self._index("joins")[join_id]

    def position(self, position_id: str) -> Position:
        return self._index("positions")[position_id]

    def span(self, span_id: str) -> Span:
        return self._index("spans")[span_id]

    def entry(self, entry_id: str) -> Entry:
        return self._index("entries")[entry_id]

    def _index(self, name: str) -> dict:
        cache = self.__dict__.setdefault("_indices", {})
        if name not in cache:
            cache[name] = {item.id: item for item in getattr(self, name)}
        return cache[name]

    @property
    def fingerprint(self) -> str:
        """Hash of the structure (units, positions, spans); plans are checked against it."""
        cached = self.__dict__.get("_fingerprint")
        if cached is not None:
            return cached
        payload = json.dumps(
            {
                "units": [(u.id, u.conv.signature()) for u in self.units],
                "positions": [(p.id, p.shape) for p in self.positions],
                "spans": [s.id for s in self.spans],
            },
            sort_keys=True,
        )
        cached = hashlib.sha256(payload.encode()).hexdigest()[:16]
        self.__dict__["_fingerprint"] = cached
        return cached

    def single_unit_span(self, unit_id: str) -> Span:
        """The span that holds only ``unit_id`` (it exists for every unit)."""
        unit = self.unit(unit_id)
        return self.span(span_id(unit.input_position, unit.output_position))

    @property
    def coverage(self) -> float | None:
        """The share of units that lie inside at least one multi-unit span (``None`` with no units).

        Near 0 means fxmerge found little to merge in this model; the rejections say why.
        """
        if not self.units:
            return None
        covered = {u for span in self.spans if len(span.units) > 1 for u in span.units}
        return len(covered) / len(self.units)

    def keep_entry(self, unit_id: str) -> str:
        """The entry that leaves unit ``unit_id`` exactly as it is (its single-unit span, nothing pruned)."""
        span = self.single_unit_span(unit_id)
        return entry_id(span.id, KEEP)


KEEP = "keep"
"""The option id of a span's keep-everything option (every span of one unit has it)."""


def span_id(start: str, end: str) -> str:
    """The id of the span from position ``start`` to position ``end``."""
    return f"{start}->{end}"


def entry_id(span: str, option: str) -> str:
    """The id of one (span, option): the row key of the latency and importance tables."""
    return f"{span}|{option}"


def parse_entry_id(entry: str) -> tuple[str, str]:
    """``(span id, option id)`` of an entry id."""
    span, sep, option = entry.rpartition("|")
    if not sep:
        raise ValueError(f"not an entry id: {entry!r} (expected 'START->END|OPTION')")
    return span, option
