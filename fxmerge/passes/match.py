"""Match: find units (conv → foldable affines → activation?) and joins (add / cat).

This pass reads a captured GraphModule and labels its nodes; it does not rewrite
anything. Decisions are per *node*, never per module: a module called at two sites
gives two units, and ops are recognised by what they compute (``fxmerge.nodes``), so
the three graph shapes (``symbolic_trace``, ``torch.compile`` backend graphs,
``torch.export``) match the same way.

It runs in phases:

1. **sites** — walking the graph in order, each conv call site claims a *tail*: the
   per-channel affine ops that fold into it (eval BatchNorm, a constant scale or
   shift) and the per-sample *side biases* added onto it (``h + b`` with ``b`` of shape
   ``(N, C, 1, …)``: a diffusion time embedding), then at most one activation, while
   each tensor has a single reader. The activation may be SiLU written
   ``x * sigmoid(x)`` (its ``sigmoid`` and ``mul`` are one activation) or a *normalised
   activation*: a GroupNorm / LayerNorm / InstanceNorm followed by an activation,
   when nothing else reads the norm's input; the norm then belongs to the unit and
   the position is after the activation (``fxmerge.patterns``). A join (``add`` of two
   same-shape tensors, ``cat`` along channels) claims a tail the same way. Ops that
   are the identity in eval mode are looked through; readers that only inspect a
   tensor's shape, dtype or device (``x.shape``, ``x.dim()``, the asserts built from
   them) are not readers of its values and never split a tail.
2. **positions** — every tail's last node is a position (a tensor where an
   activation may stay); any other tensor a unit or join reads is a *source*. A
   source records the positions it is computed from (through the ops between: a
   norm, a pool, an attention) and whether a matrix product lies on the way.
3. **records** — ``Unit``, ``Join`` and ``Position`` values with stable ids (module
   paths), each position *pinned* when something outside every unit and join reads
   it (a side bias's other operand is such a reader). A reducible conv right after a
   nearest-neighbour upsample is *droppable* (its span gets an identity option).
4. **boundaries** — every other op is reported with why nothing crosses it; nothing
   unknown makes matching fail.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from fxmerge import activations
from fxmerge.fxutil import clean_path, dtype_of, shape_of, submodule
from fxmerge.ir import MODEL_OUTPUT, ConvSpec, Join, Matched, Position, Rejection, Unit
from fxmerge.nodes import (
    AffineSite,
    ConvSite,
    JoinSite,
    activation_name,
    affine_site,
    conv_site,
    is_matrix_product,
    is_nearest_upsample,
    is_shape_reader,
    is_transparent,
    join_site,
    value_readers,
)
from fxmerge.patterns import (
    ActivationSite,
    SideBiasSite,
    activation_site,
    norm_site,
    side_bias_site,
)


@dataclass(frozen=True)
class _Tail:
    """What follows a conv or a join inside its unit: affines, side biases, an activation, the output node."""

    affines: tuple[AffineSite, ...]
    sides: tuple[SideBiasSite, ...]
    act: ActivationSite | None
    last: torch.fx.Node

    @property
    def activation(self) -> torch.fx.Node | None:
        return self.act.output if self.act is not None else None

    @property
    def activation_name(self) -> str | None:
        return self.act.name if self.act is not None else None

    def nodes(self) -> list[torch.fx.Node]:
        out = [n for a in self.affines for n in (a.node, *a.helpers)] + [side.node for side in self.sides]
        return out + (list(self.act.nodes) if self.act is not None else [])


@dataclass(frozen=True)
class _UnitSite:
    id: str
    conv: ConvSite
    tail: _Tail


@dataclass(frozen=True)
class _JoinSite:
    id: str
    join: JoinSite
    tail: _Tail


def match(gm: torch.fx.GraphModule, exclude: tuple[str, ...] = (), leaves: dict[str, str] | None = None) -> Matched:
    """Label the units, joins, positions and boundaries of a captured graph.

    ``exclude`` lists module-path prefixes whose convs stay out of every multi-unit
    span; ``leaves`` maps kept-whole submodules to why (from capture).
    """
    ids = _Ids()
    units, joins, claimed = _find_sites(gm, ids)
    positions = _PositionResolver(gm, units, joins, ids)
    inputs = [positions.resolve(site.conv.input) for site in units]
    operands = [tuple(positions.resolve(o) for o in site.join.operands) for site in joins]
    unit_records = [
        _unit_record(site, source, exclude, positions.side_inputs(site.tail), positions.after_upsample(source))
        for site, source in zip(units, inputs)
    ]
    join_records = [_join_record(site, ops, positions.side_inputs(site.tail)) for site, ops in zip(joins, operands)]
    sides = {side.node for site in [*units, *joins] for side in site.tail.sides}
    position_records = positions.records(gm, claimed, sides)
    rejections = _boundaries(gm, claimed, leaves or {})
    rejections += [Rejection(u.conv_node, u.ineligible) for u in unit_records if u.ineligible]
    rejections += [Rejection(j.node, j.ineligible) for j in join_records if j.ineligible]
    norms = {site.id: float(site.conv.params.weight.detach().abs().sum()) for site in units}
    return Matched(tuple(unit_records), tuple(join_records), position_records, tuple(rejections), norms)


# ------------------------------------------------------------------ phase 1: sites
class _Ids:
    """Stable ids: module paths, ``#k`` for the k-th use of one path; the same in every graph form."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def take(self, label: str) -> str:
        count = self.counts.get(label, 0)
        self.counts[label] = count + 1
        return label if count == 0 else f"{label}#{count}"

    def of(self, prefix: str, node: torch.fx.Node) -> str:
        label = _label(node)
        return self.take(f"{prefix}:{label}" if label else (prefix if prefix != "src" else f"src:{node.name}"))


def _find_sites(gm: torch.fx.GraphModule, ids: _Ids):
    units: list[_UnitSite] = []
    joins: list[_JoinSite] = []
    claimed: dict[torch.fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node in claimed:
            continue
        conv = conv_site(node, gm)
        if conv is not None and not conv.params.transposed and conv.dims in (1, 2):
            site = _UnitSite(ids.take(conv.path), conv, _tail(node, gm))
            units.append(site)
            _claim(claimed, site.id, node, site.tail)
            continue
        joined = join_site(node, shape_of) if conv is None else None
        if joined is not None:
            join = _JoinSite(ids.of(joined.kind, node), joined, _tail(node, gm))
            joins.append(join)
            _claim(claimed, join.id, node, join.tail)
    return units, joins, claimed


def _claim(claimed: dict, owner: str, node: torch.fx.Node, tail: _Tail) -> None:
    claimed[node] = owner
    for member in tail.nodes():
        claimed[member] = owner


def _tail(start: torch.fx.Node, gm: torch.fx.GraphModule) -> _Tail:
    """Affines, side biases and one activation after ``start`` while each tensor has one value
    reader (a SiLU product reads its input twice, through its sigmoid and its mul)."""
    affines: list[AffineSite] = []
    sides: list[SideBiasSite] = []
    act: ActivationSite | None = None
    current = start
    while True:
        readers = value_readers(current)
        if len(readers) == 1 and is_transparent(readers[0], gm):
            current = readers[0]
            continue
        if act is not None:
            break
        if len(readers) == 1:
            affine = affine_site(readers[0], gm)
            if affine is not None and affine.input is current:
                affines.append(affine)
                current = affine.node
                continue
            side = side_bias_site(readers[0], current)
            if side is not None:
                sides.append(side)
                current = side.node
                continue
        act = activation_site(current, gm)
        if act is None:
            break
        current = act.output
    return _Tail(tuple(affines), tuple(sides), act, current)


# ------------------------------------------------------------------ phase 2: positions
class _PositionResolver:
    """Which position each tensor a unit or join reads is; sources are made on demand."""

    def __init__(self, gm, units: list[_UnitSite], joins: list[_JoinSite], ids: _Ids) -> None:
        self.gm = gm
        self.ids = ids
        self.order = {n: k for k, n in enumerate(gm.graph.nodes)}
        self.outputs: dict[torch.fx.Node, str] = {}
        self.kinds: dict[str, tuple[str, torch.fx.Node, str | None]] = {}
        for site in units:
            self._add(site.id, "unit", site.tail)
        for site in joins:
            self._add(site.id, "join", site.tail)

    def _add(self, pid: str, kind: str, tail: _Tail) -> None:
        self.outputs[tail.last] = pid
        self.kinds[pid] = (kind, tail.last, tail.activation_name)

    def resolve(self, node: torch.fx.Node) -> str:
        """The position a consumer of ``node`` reads (looking through transparent ops)."""
        while node not in self.outputs and is_transparent(node, self.gm) and isinstance(node.args[0], torch.fx.Node):
            node = node.args[0]
        if node not in self.outputs:
            pid = self.ids.of("src", node)
            self.outputs[node] = pid
            self.kinds[pid] = ("source", node, None)
        return self.outputs[node]

    def upstream(self, starts) -> tuple[tuple[str, ...], bool]:
        """The positions the values of ``starts`` are computed from, in graph order, and whether
        a matrix product lies on the way (walking back through every op that is no position)."""
        found: set[str] = set()
        product = False
        seen: set[torch.fx.Node] = set()
        pending = list(starts)
        while pending:
            node = pending.pop()
            if node in seen:
                continue
            seen.add(node)
            if node in self.outputs:
                found.add(self.outputs[node])
            elif node.op != "get_attr" and not is_shape_reader(node):
                product = product or is_matrix_product(node)
                pending.extend(node.all_input_nodes)
        ranked = sorted(found, key=lambda pid: self.order[self.kinds[pid][1]])
        return tuple(ranked), product

    def side_inputs(self, tail: _Tail) -> tuple[str, ...]:
        """The positions a tail's side biases are computed from."""
        return self.upstream([side.side for side in tail.sides])[0] if tail.sides else ()

    def after_upsample(self, pid: str) -> bool:
        """Whether position ``pid`` is the output of a nearest-neighbour upsample."""
        kind, node, _ = self.kinds[pid]
        return kind == "source" and is_nearest_upsample(node, self.gm)

    def records(self, gm, claimed: dict, sides: set[torch.fx.Node]) -> tuple[Position, ...]:
        ranked = sorted(self.kinds.items(), key=lambda item: self.order[item[1][1]])
        records = []
        for index, (pid, (kind, node, act)) in enumerate(ranked):
            inputs, product = self.upstream(node.all_input_nodes) if kind == "source" else ((), False)
            records.append(
                Position(
                    id=pid,
                    index=index,
                    kind=kind,
                    node=node.name,
                    activation=act,
                    shape=shape_of(node) or (),
                    pinned=_outside_use(node, gm, claimed, sides),
                    inputs=inputs,
                    attention=product and bool(inputs),
                )
            )
        return tuple(records)


def _outside_use(node: torch.fx.Node, gm, claimed: dict, sides: set[torch.fx.Node]) -> str | None:
    """Why a position's tensor must stay materialised, or ``None``."""
    pending = list(value_readers(node))
    while pending:
        user = pending.pop()
        if user.op == "output" or _is_output_container(user):
            return MODEL_OUTPUT
        if is_transparent(user, gm) and user not in claimed:
            pending.extend(value_readers(user))
            continue
        if user in sides:
            return f"read as a side bias by {user.name} (outside every span)"
        if user in claimed and (conv_site(user, gm) is not None or join_site(user, shape_of) is not None):
            continue
        return f"read by {user.name} (outside every span)"
    return None


# ------------------------------------------------------------------ phase 3: records
def _unit_record(
    site: _UnitSite, input_position: str, exclude: tuple[str, ...], side_inputs: tuple[str, ...], after_upsample: bool
) -> Unit:
    conv, tail = site.conv, site.tail
    problem = conv.problem
    if problem is None and any(site.id == e or site.id.startswith((e + ".", e + "#")) for e in exclude):
        problem = "excluded by the user"
    params = conv.params
    spec = ConvSpec.of_conv(
        params,
        input_shape=shape_of(conv.input) or (),
        activation=tail.activation_name,
        bias=params.bias is not None or bool(tail.affines) or bool(tail.sides),
        dtype=dtype_of(conv.node),
    )
    reducible = (
        problem is None
        and spec.in_channels == spec.out_channels
        and all(s == 1 for s in spec.stride)
        and all(2 * p == d * (k - 1) for p, d, k in zip(spec.padding, spec.dilation, spec.kernel_size))
    )
    return Unit(
        id=site.id,
        conv_node=conv.node.name,
        affine_nodes=tuple(a.node.name for a in tail.affines),
        activation_node=tail.activation.name if tail.activation is not None else None,
        activation=tail.activation_name,
        conv=spec,
        input_position=input_position,
        output_position=site.id,
        reducible=reducible,
        ineligible=problem,
        **_tail_fields(tail, side_inputs),
        droppable=reducible and after_upsample,
    )


def _join_record(site: _JoinSite, operands: tuple[str, ...], side_inputs: tuple[str, ...]) -> Join:
    problem = site.join.problem
    if problem is None and len(set(operands)) != len(operands):
        problem = "the same tensor enters the join twice"
    tail = site.tail
    return Join(
        id=site.id,
        kind=site.join.kind,
        node=site.join.node.name,
        affine_nodes=tuple(a.node.name for a in tail.affines),
        activation_node=tail.activation.name if tail.activation is not None else None,
        activation=tail.activation_name,
        operands=operands,
        output_position=site.id,
        ineligible=problem,
        **_tail_fields(tail, side_inputs),
    )


def _tail_fields(tail: _Tail, side_inputs: tuple[str, ...]) -> dict:
    """The fields :class:`Unit` and :class:`Join` share about a tail's activation and side biases."""
    return {
        "activation_nodes": tuple(n.name for n in tail.act.nodes) if tail.act is not None else (),
        "norm": tail.act.norm if tail.act is not None else None,
        "side_biases": tuple(side.node.name for side in tail.sides),
        "side_inputs": side_inputs,
    }


def _label(node: torch.fx.Node) -> str:
    """A readable label that is the same in every graph form, or ``""``.

    A module call is labelled with its module path, any other op with the path of
    the module whose forward ran it (``nn_module_stack``; ``""`` at the top level),
    and a graph input with the name of the ``forward`` argument (``torch.compile``
    calls ``x`` ``l_x_``). Node names are never part of a label: they differ between
    ``symbolic_trace``, ``torch.compile`` and ``torch.export``.
    """
    if node.op == "call_module":
        return node.target
    if node.op == "placeholder":
        local = re.fullmatch(r"[lL]_(\w+?)_", node.name)
        return local.group(1) if local and "example_value" in node.meta else node.name
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        return clean_path(str(path[0] if isinstance(path, tuple) else path))
    return ""


# ------------------------------------------------------------------ phase 4: boundaries
def _is_output_container(node: torch.fx.Node) -> bool:
    """A namedtuple built only to be returned (``symbolic_trace`` records its constructor)."""
    if node.op != "call_function" or not isinstance(node.target, type) or not issubclass(node.target, tuple):
        return False
    return all(user.op == "output" or _is_output_container(user) for user in node.users)


def _boundaries(gm: torch.fx.GraphModule, claimed: dict, leaves: dict[str, str]) -> list[Rejection]:
    """Every unclaimed op that computes a tensor, with why nothing crosses it."""
    found = []
    for node in gm.graph.nodes:
        if node in claimed or node.op in ("placeholder", "get_attr", "output") or is_transparent(node, gm):
            continue
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in claimed:
            continue
        if _is_output_container(node) or is_shape_reader(node) or shape_of(node) is None:
            continue  # namedtuple outputs, shape checks and other non-tensor values cross nothing
        found.append(Rejection(node.name, _boundary_reason(node, gm, leaves)))
    return found


def _boundary_reason(node: torch.fx.Node, gm, leaves: dict[str, str]) -> str:
    norm = norm_site(node, gm)
    if norm is not None:
        return (
            f"{norm.kind} kept: a norm is removable only as a normalised activation (directly "
            "followed by an activation, reading a tensor nothing else reads, after a conv or join)"
        )
    if node.op == "call_module":
        module = submodule(gm, node.target)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return "BatchNorm in training mode" if module.training else "BatchNorm not directly after a conv or join"
        if activations.classify(node, module) is not None:
            return "activation not directly after a conv or join"
        if node.target in leaves:
            return leaves[node.target]
        if isinstance(module, torch.fx.GraphModule):
            return "untraceable submodule kept whole"
        return f"{type(module).__name__} is not a conv, affine, activation, join or identity op"
    if activation_name(node, gm) is not None:
        return "activation not directly after a conv or join"
    if affine_site(node, gm) is not None:
        return "affine op not directly after a conv or join"
    if isinstance(node.target, torch._ops.OpOverload):
        target = node.target.overloadpacket.__name__  # aten.max_pool2d.default -> max_pool2d
    else:
        target = getattr(node.target, "__name__", str(node.target))
    return f"{target} is not a conv, affine, activation, join or identity op"
