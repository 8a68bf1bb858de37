"""Span graph: positions, candidate spans, their options, and the chain structure.

The *position graph* has a node per position and an edge per unit (its input
position → its output position) and per join operand (operand → join output).
Its structure is recovered with dominators, with no architecture-specific code:

* a join whose output ``b`` is reached from its immediate dominator ``a`` through a
  single-entry, single-exit region whose operand branches share only ``a`` is a
  :class:`~fxmerge.ir.Parallel` region (a residual block, an Inception module, a
  Fire module); spans may lie inside one branch or cover the whole region (the skip
  is then absorbed into the merged kernel);
* any other join (a DenseNet concatenation, a join fed by a squeeze-excitation
  gate) is kept as it is: its operands are pinned and its output starts new chains;
* a position read by several units that do not meet again (a feature pyramid),
  or by an op outside every span, ends its chain and is pinned.

A span from position ``i`` to ``j`` of one chain exists when every step between them
is a mergeable unit or region and no position strictly inside is pinned, so a span
never cuts a block in half, nor when a side bias inside it is computed from its
input. Its *options* prune subsets of its reducible convs (C→C, stride 1, size
preserving), keeping at least one; options producing the same merged conv (kernel,
stride, groups) are deduplicated, keeping the subset with the largest summed
``|weight|``. The single-unit span of a *droppable* conv (reducible, right after a
nearest-neighbour upsample) also has the *identity* option, which drops it. The merged conv of each option is computed from a weight-free
*footprint* that follows the same algebra as ``fxmerge.kernels``; the reachable
footprints are enumerated exactly, for any number of reducible convs, by a dynamic
program along the span that keeps the heaviest choice per distinct footprint.
"""

from __future__ import annotations

import math
from dataclasses import replace

import networkx as nx

from fxmerge.ir import (
    Chain,
    ConvSpec,
    Join,
    Matched,
    Option,
    Parallel,
    Position,
    Span,
    SpanGraph,
    Step,
    Unit,
    span_id,
)
from fxmerge.kernels import Footprint
from fxmerge.passes.regions import find_regions

MAX_MERGED_PARAMS = 2**26
"""A merged conv with more weights than this (256 MiB in fp32) is never offered: it is
slower than the convs it replaces (RegNetY-128GF's 7392-channel bottlenecks would merge
into 4.9e8-weight 3×3 convs), and composing it would take minutes of float64 work."""

OPTION_KEYS = {
    "general": lambda spec: (spec.kernel_size, spec.stride, spec.groups),
    "paper": lambda spec: (spec.kernel_size, spec.stride, spec.is_depthwise),
}
"""Options of a span that give the same key are one option (the largest summed |weight| wins)."""


def span_graph(
    matched: Matched,
    *,
    model: str,
    input_shapes,
    rules: str = "general",
    max_kernel: int | None = 15,
    max_units: int | None = 12,
) -> SpanGraph:
    """Build the span graph of a matched graph.

    ``rules`` picks how options are deduplicated (:data:`OPTION_KEYS`); the paper's
    restrictions on spans are applied afterwards by ``rules.paper_rules``.
    ``max_kernel`` and ``max_units`` bound a merged kernel's size and a span's units
    (``None``: unbounded; ``rules.default_max_kernel`` / ``default_max_units``).
    """
    units = {u.id: u for u in matched.units}
    joins = {j.id: j for j in matched.joins}
    positions = {p.id: p for p in matched.positions}
    norms = matched.weight_norms
    graph = nx.DiGraph()
    graph.add_nodes_from(positions)
    for unit in matched.units:
        graph.add_edge(unit.input_position, unit.output_position, unit=unit.id)
    for join in matched.joins:
        for operand in join.operands:
            graph.add_edge(operand, join.output_position, join=join.id)

    regions, fixed_joins, rejections = find_regions(graph, joins, positions)
    pinned = {pid: p.pinned for pid, p in positions.items() if p.pinned}
    for join_id in fixed_joins:
        for operand in joins[join_id].operands:
            pinned.setdefault(operand, f"operand of {join_id}, which is not a single-entry region")
    builder = _ChainBuilder(graph, regions, joins, units, pinned)
    chains = builder.build()
    pinned.update(builder.fanout_pinned)

    # regions are mergeable when everything inside is
    spans: list[Span] = []
    enumerator = _SpanEnumerator(units, joins, positions, pinned, max_kernel, max_units, norms, OPTION_KEYS[rules])
    for chain in builder.all_chains:
        spans.extend(enumerator.spans_of(chain))
    position_list = tuple(replace(p, pinned=pinned.get(p.id)) for p in matched.positions)
    chains = tuple(_mark_mergeable(c, enumerator) for c in chains)
    return SpanGraph(
        model=model,
        rules=rules,
        input_shapes=tuple(tuple(s) for s in input_shapes),
        units=matched.units,
        joins=matched.joins,
        positions=position_list,
        spans=tuple(spans),
        chains=chains,
        rejections=matched.rejections + tuple(rejections),
        settings=(("max_kernel", str(max_kernel)), ("max_units", str(max_units))),
    )


class _ChainBuilder:
    def __init__(self, graph, regions, joins, units, pinned):
        self.graph = graph
        self.regions = regions  # join output -> (source, [(operand, nodes)])
        self.joins = joins
        self.units = units
        self.pinned = pinned
        self.sources: dict[str, list[str]] = {}
        for b, (a, _) in regions.items():
            self.sources.setdefault(a, []).append(b)
        self.join_of = {j.output_position: j.id for j in joins.values()}
        self.fanout_pinned: dict[str, str] = {}
        self.all_chains: list[Chain] = []
        self.visited: set[str] = set()

    def build(self) -> tuple[Chain, ...]:
        heads = [n for n in self.graph.nodes if self.graph.in_degree(n) == 0]
        heads += [b for b in self.join_of if b not in self.regions]
        top: list[Chain] = []
        queue = [(h, None) for h in sorted(heads, key=self._order)]
        started: set[tuple] = set()
        while queue:
            head, first = queue.pop(0)
            if (head, first) in started:
                continue
            started.add((head, first))
            chain, extra = self._walk(head, first=first, stop=None, nodes=None)
            if len(chain.positions) > 1 or first is None and not self.graph.out_degree(head):
                top.append(chain)
            queue.extend(extra)
        return tuple(c for c in top if len(c.positions) > 1)

    def _order(self, node):
        return list(self.graph.nodes).index(node)

    def _unit_edges(self, p, nodes):
        return [
            (q, data["unit"]) for q, data in self.graph[p].items() if "unit" in data and (nodes is None or q in nodes)
        ]

    def _walk(self, start, first, stop, nodes):
        positions, steps, extra = [start], [], []
        p = start
        forced = first
        while p != stop:
            unit_edges = self._unit_edges(p, nodes)
            region_targets = [b for b in self.sources.get(p, []) if nodes is None or b in nodes]
            if forced is not None:
                kind, target = forced
                forced = None
            elif len(region_targets) == 1 and all(q in self._region_nodes(region_targets[0]) for q, _ in unit_edges):
                kind, target = "region", region_targets[0]
            elif len(unit_edges) == 1 and not region_targets:
                kind, target = "unit", unit_edges[0]
            else:
                moves = [("unit", e) for e in unit_edges if not self._inside_region_of(e[0], region_targets)]
                moves += [("region", b) for b in region_targets]
                if len(moves) > 1:
                    self.fanout_pinned.setdefault(p, "read by several branches that do not meet again")
                extra.extend((p, m) for m in moves)
                break
            if kind == "unit":
                q, unit_id = target
                if q in self.visited:
                    break
                steps.append(Step("unit", unit=unit_id))
                positions.append(q)
                self.visited.add(q)
                p = q
            else:
                b = target
                if b in self.visited:
                    break
                region = self._region(p, b)
                steps.append(Step("parallel", region=region))
                positions.append(b)
                self.visited.add(b)
                p = b
        chain = Chain(tuple(positions), tuple(steps))
        self.all_chains.append(chain)
        return chain, extra

    def _region_nodes(self, b):
        _, branches = self.regions[b]
        return set().union(*(nodes for _, nodes in branches))

    def _inside_region_of(self, q, region_targets):
        return any(q in self._region_nodes(b) for b in region_targets)

    def _region(self, a, b) -> Parallel:
        _, branches = self.regions[b]
        chains = []
        for operand, nodes in branches:
            if operand == a:
                chains.append(Chain((a,), ()))
                continue
            entry = next(q for q in self.graph.successors(a) if q in nodes)
            data = self.graph[a][entry]
            first = ("unit", (entry, data["unit"])) if "unit" in data else ("region", entry)
            chain, _ = self._walk(a, first=first, stop=operand, nodes=nodes)
            chains.append(chain)
        return Parallel(join=self.join_of[b], branches=tuple(chains), mergeable=False)


# --------------------------------------------------------------------- spans
class _SpanEnumerator:
    def __init__(self, units, joins, positions, pinned, max_kernel, max_units, norms, option_key):
        self.units: dict[str, Unit] = units
        self.joins: dict[str, Join] = joins
        self.positions: dict[str, Position] = positions
        self.pinned = pinned
        self.max_kernel = max_kernel
        self.max_units = max_units
        self.norms = norms
        self.option_key = option_key
        self._mergeable: dict[int, bool] = {}

    # -- what a step contains
    def region_units(self, region: Parallel) -> list[str]:
        out = []
        for branch in region.branches:
            for step in branch.steps:
                out.extend(self.step_units(step))
        return out

    def step_units(self, step: Step) -> list[str]:
        return [step.unit] if step.kind == "unit" else self.region_units(step.region)

    def region_joins(self, region: Parallel) -> list[str]:
        out = [region.join]
        for branch in region.branches:
            for step in branch.steps:
                if step.kind == "parallel":
                    out.extend(self.region_joins(step.region))
        return out

    def region_positions(self, region: Parallel) -> list[str]:
        out = []
        for branch in region.branches:
            out.extend(branch.positions[1:])
            for step in branch.steps:
                if step.kind == "parallel":
                    out.extend(self.region_positions(step.region))
        return out

    def mergeable(self, region: Parallel) -> bool:
        key = id(region)
        if key not in self._mergeable:
            join = self.joins[region.join]
            ok = join.ineligible is None
            for branch in region.branches:
                ok = ok and all(p not in self.pinned for p in branch.positions[1:])
                for step in branch.steps:
                    ok = ok and self.crossable(step)
            self._mergeable[key] = ok
        return self._mergeable[key]

    def crossable(self, step: Step) -> bool:
        if step.kind == "unit":
            return self.units[step.unit].ineligible is None
        return self.mergeable(step.region)

    # -- enumeration
    def spans_of(self, chain: Chain) -> list[Span]:
        spans = []
        n = len(chain.positions)
        for i in range(n - 1):
            for j in range(i + 1, n):
                steps = list(chain.steps[i:j])
                if j - i > 1 or steps[0].kind != "unit":
                    if not all(self.crossable(s) for s in steps):
                        break
                    if any(p in self.pinned for p in chain.positions[i + 1 : j]):
                        break
                    if self._side_reads(chain.positions[i], steps):
                        break  # so does every longer span from here: it holds the same side bias
                span = self._span(chain, i, j, steps)
                if span is None:
                    if self._too_big(steps):
                        break
                    continue
                spans.append(span)
        return spans

    def _side_reads(self, start: str, steps: list[Step]) -> bool:
        """Whether a side bias inside the span is computed from the span's input, however indirectly:
        the side's path would then lie inside the span (the side bias must not depend on the span input)."""
        members = [self.units[u] for s in steps for u in self.step_units(s)]
        members += [self.joins[j] for s in steps if s.kind == "parallel" for j in self.region_joins(s.region)]
        return any(start == side or start in self._lineage_of(side) for m in members for side in m.side_inputs)

    def _lineage_of(self, position: str) -> set[str]:
        """Every position ``position``'s value is computed from (memoised per position)."""
        cache = self.__dict__.setdefault("_lineages", {})
        if position not in cache:
            if "_lineage" not in self.__dict__:
                self.__dict__["_lineage"] = _lineage(self.units, self.joins, self.positions)
            cache[position] = nx.ancestors(self.__dict__["_lineage"], position)
        return cache[position]

    def _too_wide(self, fp: Footprint) -> bool:
        return self.max_kernel is not None and any(k > self.max_kernel for k in fp.kernel)

    def _too_big(self, steps) -> bool:
        units = [u for s in steps for u in self.step_units(s)]
        return self._too_many(len(units))

    def _too_many(self, count: int) -> bool:
        return self.max_units is not None and count > self.max_units

    def _span(self, chain: Chain, i: int, j: int, steps: list[Step]) -> Span | None:
        start, end = chain.positions[i], chain.positions[j]
        unit_ids = [u for s in steps for u in self.step_units(s)]
        if not unit_ids or self._too_many(len(unit_ids)):
            return None
        joins = [jid for s in steps if s.kind == "parallel" for jid in self.region_joins(s.region)]
        inner = list(chain.positions[i + 1 : j])
        for s in steps:
            if s.kind == "parallel":
                inner.extend(self.region_positions(s.region))
        inner = [p for p in inner if p != end]
        dropped = tuple(p for p in inner if self.positions[p].activation is not None)
        end_position = self.positions[end]
        start_position = self.positions[start]
        if len(unit_ids) == 1 and not joins:
            unit = self.units[unit_ids[0]]
            options = (Option(id="keep", pruned=(), conv=unit.conv),)
            if unit.droppable:
                options += (_identity_option(unit),)
            return Span(span_id(start, end), start, end, tuple(unit_ids), (), dropped, options)
        options = self._options(steps, unit_ids, start_position, end_position)
        if not options:
            return None
        return Span(span_id(start, end), start, end, tuple(unit_ids), tuple(joins), dropped, tuple(options))

    def _options(self, steps, unit_ids, start: Position, end: Position) -> list[Option]:
        """One option per distinct merged conv (``option_key``), each realised by its heaviest kept subset.

        The merged convs reachable by pruning reducible convs come from a dynamic
        program over the span (:meth:`_reach`), exact for any number of reducible convs.
        Among the choices giving one key the largest summed ``|weight|`` wins, then
        fewer pruned convs, then the earliest pruned ones (:func:`_rank`).
        """
        first = self.units[unit_ids[0]].conv
        channels = start.shape[1] if len(start.shape) > 1 else first.in_channels
        index = {u: k for k, u in enumerate(unit_ids)}
        reach = self._span_reach(steps, start, _start(channels, first.dims), index)
        best: dict[tuple, tuple[tuple, tuple[int, ...], ConvSpec]] = {}
        for (fp, kept), (score, pruned) in reach.items():
            spec = self._merged_conv(fp, start, end, first) if kept else None  # every option keeps a conv
            if spec is None:
                continue
            key, rank = self.option_key(spec), _rank(score, pruned)
            if key not in best or rank > best[key][0]:
                best[key] = (rank, pruned, spec)
        chosen = [(tuple(unit_ids[k] for k in pruned), spec) for _, pruned, spec in best.values()]
        options = []
        for pruned_ids, spec in sorted(chosen, key=lambda c: (len(c[0]), sorted(c[0]))):
            option_id = "keep" if not pruned_ids else "prune:" + "+".join(pruned_ids)
            options.append(Option(id=option_id, pruned=pruned_ids, conv=spec))
        return options

    def _merged_conv(self, fp: Footprint, start: Position, end: Position, first: ConvSpec) -> ConvSpec | None:
        """The conv a reachable footprint becomes, or ``None`` when it is not offered."""
        if self._too_wide(fp) or any(o > 0 for o in fp.offset):
            return None
        dims = first.dims
        spec = ConvSpec(
            dims=dims,
            in_channels=fp.channels_in,
            out_channels=fp.channels_out,
            kernel_size=fp.kernel,
            stride=fp.stride,
            padding=tuple(-o for o in fp.offset),
            dilation=(1,) * dims,
            groups=fp.groups,
            bias=True,
            activation=end.activation,
            input_shape=start.shape,
            dtype=first.dtype,
        )
        if end.shape and spec.output_shape != tuple(end.shape):
            return None
        if spec.out_channels * (spec.in_channels // spec.groups) * math.prod(spec.kernel_size) > MAX_MERGED_PARAMS:
            return None
        return spec

    def _span_reach(self, steps: list[Step], start: Position, states: _Reach, index: dict[str, int]) -> _Reach:
        """:meth:`_reach` of a span, continuing the previous span's when that is a prefix of it:
        spans are enumerated by growing end, so each step is composed once per start."""
        last = self.__dict__.get("_last_reach")  # (start, steps, reach) of the previous span
        if last and last[0] == start.id and len(last[1]) < len(steps) and all(a is b for a, b in zip(last[1], steps)):
            done, states = len(last[1]), last[2]
        else:
            done = 0
        states = self._reach(steps[done:], states, index)
        self.__dict__["_last_reach"] = (start.id, tuple(steps), states)
        return states

    def _reach(self, steps: list[Step], states: _Reach, index: dict[str, int]) -> _Reach:
        """Every footprint ``states`` followed by ``steps`` can become by pruning reducible convs.

        Keyed by (footprint, whether a conv is kept), each with its best (score, pruned
        indices). Exact: what later steps make of a prefix depends only on the
        prefix's footprint, and scores add, so the best prefix per footprint suffices.
        Kernels only grow along a span, so a prefix past ``max_kernel`` is dropped early.
        """
        for step in steps:
            if not states:  # every prefix is past max_kernel: so is every longer span
                return {}
            value = next(iter(states))[0]  # every state has the same channels: pruned convs are C→C
            channels, dims = value.channels_out, len(value.kernel)
            if step.kind == "unit":
                choices = self._unit_choices(self.units[step.unit], index)
            else:
                choices = self._region_reach(step.region, channels, dims, index)
            states = _compose(states, choices, _then)
            states = {key: best for key, best in states.items() if not self._too_wide(key[0])}
        return states

    def _unit_choices(
        self, unit: Unit, index: dict[str, int]
    ) -> dict[tuple[Footprint | None, bool], tuple[float, tuple[int, ...]]]:
        """Keep the conv, or, when it is reducible, prune it (``None``: the identity)."""
        choices = {(Footprint.of_conv(unit.conv), True): (self.norms.get(unit.id, 1.0), ())}
        if unit.reducible:
            choices[(None, False)] = (0.0, (index[unit.id],))
        return choices

    def _region_reach(self, region: Parallel, channels: int, dims: int, index: dict[str, int]) -> _Reach:
        """What a region can become: each branch's reach, joined branch by branch (add or cat)."""
        kind = self.joins[region.join].kind
        joined: _Reach | None = None
        for branch in region.branches:
            reach = self._reach(list(branch.steps), _start(channels, dims), index)
            joined = reach if joined is None else _compose(joined, reach, lambda a, b: _join(a, b, kind))
        return joined or {}


def _lineage(units: dict[str, Unit], joins: dict[str, Join], positions: dict[str, Position]) -> nx.DiGraph:
    """Which positions each position is computed from: a unit's input, a join's operands, a source's
    inputs (through the ops between), and the inputs of side biases."""
    graph = nx.DiGraph()
    graph.add_nodes_from(positions)
    for unit in units.values():
        graph.add_edges_from((p, unit.output_position) for p in (unit.input_position, *unit.side_inputs))
    for join in joins.values():
        graph.add_edges_from((p, join.output_position) for p in (*join.operands, *join.side_inputs))
    for position in positions.values():
        graph.add_edges_from((p, position.id) for p in position.inputs)
    return graph


def _identity_option(unit: Unit) -> Option:
    """The option that drops a :attr:`~fxmerge.ir.Unit.droppable` conv entirely (latency 0).

    Its ``conv`` is the identity as a depthwise 1×1 conv without bias (what every
    reader of ``Option.conv`` can handle); ``identity=True`` says nothing is emitted.
    """
    spec, dims = unit.conv, unit.conv.dims
    channels = spec.out_channels
    conv = replace(
        spec,
        in_channels=channels,
        kernel_size=(1,) * dims,
        stride=(1,) * dims,
        padding=(0,) * dims,
        dilation=(1,) * dims,
        groups=channels,
        bias=False,
    )
    return Option(id=f"prune:{unit.id}", pruned=(unit.id,), conv=conv, identity=True)


_Reach = dict[tuple[Footprint, bool], tuple[float, tuple[int, ...]]]
"""Reachable footprints of a piece of a span: (footprint, a conv kept) → (summed |weight|, pruned unit indices)."""


def _start(channels: int, dims: int) -> _Reach:
    """Nothing composed yet: the identity, no conv kept, nothing pruned."""
    return {(Footprint.identity(channels, dims), False): (0.0, ())}


def _rank(score: float, pruned: tuple[int, ...]) -> tuple:
    """Heavier first, then fewer pruned convs, then the earliest pruned (the order of enumerating subsets)."""
    return (score, -len(pruned), tuple(-k for k in pruned))


def _compose(states: _Reach, choices: dict, combine) -> _Reach:
    """Every state followed by every choice, the best (:func:`_rank`) kept per resulting footprint."""
    out: _Reach = {}
    for (fa, ka), (sa, pa) in states.items():
        for (fb, kb), (sb, pb) in choices.items():
            fp = combine(fa, fb)
            if fp is None:
                continue
            key, value = (fp, ka or kb), (sa + sb, pa + pb)
            if key not in out or _rank(*value) > _rank(*out[key]):
                out[key] = value
    return out


def _then(before: Footprint, after: Footprint | None) -> Footprint:
    return before if after is None else before.then(after)


def _join(a: Footprint, b: Footprint, kind: str) -> Footprint | None:
    try:
        return Footprint.combine([a, b], kind)
    except ValueError:  # branches of different strides: no single conv
        return None


def _mark_mergeable(chain: Chain, enumerator: _SpanEnumerator) -> Chain:
    steps = []
    for step in chain.steps:
        if step.kind == "parallel":
            region = step.region
            branches = tuple(_mark_mergeable(b, enumerator) for b in region.branches)
            step = Step("parallel", region=Parallel(region.join, branches, enumerator.mergeable(region)))
        steps.append(step)
    return Chain(chain.positions, tuple(steps))
