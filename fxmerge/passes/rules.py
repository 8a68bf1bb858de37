"""Paper rules: restrict a general span graph to the LayerMerge search space.

``rules="paper"`` reproduces the search space of the reference LayerMerge
implementation (Kim et al., ICML 2024) so that results can be compared with the
paper. It is a filter: it takes the span graph the general rules build (with
options keyed by merged kernel, stride and depthwise-or-not, see
``spans.OPTION_KEYS``, and no bound on kernel size or span length, see
:func:`default_max_kernel` and :func:`default_max_units`) and removes the spans the
paper never considers:

(a) *the table lies on the main path.* Position 0 is the stem's output: the stem
    (the network's first conv, when an activation closes it: the reference's
    position 0 is that activation; a first conv without one, the DDPM U-Net's
    ``conv_in``, reads position 0, the network input, and is an ordinary conv) is
    never inside a multi-unit span and has no entry in the table. A projection
    shortcut (a branch of a residual ``add`` holding a single conv while another
    branch holds more; for an ``add`` kept as it is, a conv from a tensor that also
    reaches the other operand through more than one conv: a U-Net's ``nin_shortcut``)
    is never a choice of its own: it merges only inside a span covering its whole
    block. *Attention projections* (convs feeding only a matrix product, an
    attention's q/k/v, or reading its result, the output projection) and the *head*
    (a conv whose output is the model output) have no entries either. All of them
    keep their single-unit span, so that every plan still covers every unit, but
    :func:`paper_table` (the table proper) leaves them out, as it leaves out units
    kept out of every span (``exclude=``); :func:`outside_table` says which units and why.
(b) *a residual branch taken whole from its block's source is the whole block.*
    The reference has one position after a block's last conv, the block output
    after the add, so the branch alone and the block with its skip absorbed are one
    span: the block. The general rules' branch-only twin is removed.
(c) *no span crosses a break*: the stem's position; for a strided conv inside a
    residual block, its own position (the block output when it is the branch's
    last conv); for a strided conv outside residual blocks followed only by 1×1
    convs up to the next residual block, that block's source (the 1×1 right after a
    strided conv merges with it), otherwise its own position. Spans may still end
    inside a strided block.
(d) *a span holds at most one strided conv, and only 1×1 convs after it*, along
    every path through it (implied by the breaks; kept as a safety net).
(e) *a span that touches a residual block lies inside one of its branches or covers
    the whole block.* The general rules already guarantee this.
(f) *options* are the distinct (merged kernel, stride, depthwise-or-not) results of
    pruning reducible convs (C→C, stride 1) with at least one conv kept, each
    realised by the kept convs with the largest summed ``|weight|``; the general
    enumerator computes them exactly when given the paper key.

Nothing here is architecture-specific: stems, shortcuts, strided convs and residual
sources are read off the chain structure of the span graph, so the rules apply to
any network, with ResNets, MobileNetV2s and the DDPM U-Net giving exactly the
reference's spaces.
"""

from __future__ import annotations

from dataclasses import replace

import networkx as nx

from fxmerge.ir import MODEL_OUTPUT, Chain, Parallel, Rejection, Span, SpanGraph, Step


def paper_rules(graph: SpanGraph) -> SpanGraph:
    """The span graph restricted to the LayerMerge paper's search space (rules a–f above)."""
    structure = _Structure(graph)
    kept: list[Span] = []
    dropped: dict[str, int] = {}
    for span in graph.spans:
        reason = structure.problem(span)
        if reason is None:
            kept.append(span)
        else:
            dropped[reason] = dropped.get(reason, 0) + 1
    covered_joins = {join for span in kept for join in span.joins}
    chains = tuple(_remark(chain, covered_joins) for chain in graph.chains)
    notes = [
        Rejection("<paper rules>", f"{count} span(s) removed: {reason}") for reason, count in sorted(dropped.items())
    ]
    outside = structure.outside()
    table = _table(kept, outside)
    listed = ", ".join(f"{unit} ({why.split(':')[0]})" for unit, why in outside.items()) or "none"
    notes.append(
        Rejection(
            "<paper rules>",
            f"search table: {len(table)} spans, {sum(len(s.options) for s in table)} entries; "
            f"outside it, each with only its own fixed span: {listed}",
        )
    )
    return replace(graph, rules="paper", spans=tuple(kept), chains=chains, rejections=graph.rejections + tuple(notes))


def outside_table(graph: SpanGraph) -> dict[str, str]:
    """Units that have no entries of their own in the paper's table, each with why (rule a)."""
    return _Structure(graph).outside()


def paper_table(graph: SpanGraph) -> tuple[Span, ...]:
    """The spans of the paper's table: every span but those made only of :func:`outside_table` units."""
    return _table(graph.spans, outside_table(graph))


def default_max_kernel(rules: str) -> int | None:
    """The merged-kernel bound a rule set uses unless the user sets one: 15 under the
    general rules, none under the paper's (its search space has no cap)."""
    return None if rules == "paper" else 15


def default_max_units(rules: str) -> int | None:
    """The bound on a span's units: 12 under the general rules, none under the paper's
    (its breaks bound spans; a MobileNetV2 span there holds up to 21 convs)."""
    return None if rules == "paper" else 12


def _table(spans, outside: dict[str, str]) -> tuple[Span, ...]:
    return tuple(span for span in spans if not set(span.units) <= outside.keys())


class _Structure:
    """What the rules need to know about a span graph: stem, shortcuts, residual blocks, breaks."""

    def __init__(self, graph: SpanGraph):
        self.graph = graph
        self.units = {unit.id: unit for unit in graph.units}
        self.positions = {p.id: p for p in graph.positions}
        self.flow = nx.DiGraph()
        self.flow.add_nodes_from(p.id for p in graph.positions)
        for unit in graph.units:
            self.flow.add_edge(unit.input_position, unit.output_position, unit=unit.id)
        for join in graph.joins:
            for operand in join.operands:
                self.flow.add_edge(operand, join.output_position)
        self.index = {p.id: p.index for p in graph.positions}
        self.stem = self._stem()
        self.shortcuts: set[str] = set()
        self.regions: set[str] = set()  # joins of parallel regions
        self.residual_sources: set[str] = set()
        self.residual_units: set[str] = set()  # units inside a branch of a residual block
        self.branch_ends: dict[str, str] = {}  # last position of a residual branch → the block output
        self.whole_branches: set[tuple[str, str]] = set()  # (block source, branch end) of non-empty branches
        for chain in graph.chains:
            self._visit(chain, inside_residual=False)
        self.shortcuts |= self._fixed_shortcuts()
        self.attention = self._attention_projections()
        self.breaks = self._breaks()

    def _stem(self) -> str | None:
        """The network's first conv, when an activation closes it (the reference's position 0)."""
        if not self.graph.units:
            return None
        first = min(self.graph.units, key=lambda u: self.index[u.output_position])
        return first.id if first.activation is not None else None

    # -- structure
    def _visit(self, chain: Chain, inside_residual: bool) -> None:
        for k, step in enumerate(chain.steps):
            if step.kind == "unit" and inside_residual:
                self.residual_units.add(step.unit)
            if step.kind != "parallel" or not isinstance(step.region, Parallel):
                continue
            region = step.region
            self.regions.add(region.join)
            residual = self.graph.join(region.join).kind == "add"
            if residual:
                self._residual_block(region, chain.positions[k], chain.positions[k + 1])
            for branch in region.branches:
                self._visit(branch, inside_residual or residual)

    def _residual_block(self, region: Parallel, source: str, output: str) -> None:
        self.residual_sources.add(source)
        sizes = [self._unit_count(branch) for branch in region.branches]
        for branch, size in zip(region.branches, sizes):
            if size == 1 and max(sizes) > 1:
                self.shortcuts.add(branch.steps[0].unit)
            if branch.steps:
                self.branch_ends[branch.positions[-1]] = output
                self.whole_branches.add((branch.positions[0], branch.positions[-1]))

    def _fixed_shortcuts(self) -> set[str]:
        """Projection shortcuts of residual ``add``s kept as they are (rule a).

        A conv ``u`` is one when its output is an operand of such an add and its input
        also reaches another operand, without passing through ``u``, along a path of
        more than one conv (the block's main branch). Paths here also run through the
        ops between positions (``Position.inputs``: a block's norm and activation).
        """
        flow = self.flow.copy()
        for position in self.graph.positions:
            flow.add_edges_from((source, position.id) for source in position.inputs)
        producer = {unit.output_position: unit for unit in self.graph.units}
        found: set[str] = set()
        for join in self.graph.joins:
            if join.kind != "add" or join.id in self.regions:
                continue
            for operand in join.operands:
                unit = producer.get(operand)
                if unit is None:
                    continue
                others = set(join.operands) - {operand}
                view = nx.restricted_view(flow, [operand], [])
                reach = nx.descendants(view, unit.input_position)
                for other in others & reach:
                    between = (reach & nx.ancestors(view, other)) | {unit.input_position, other}
                    convs = [
                        u for u in self.graph.units if u.input_position in between and u.output_position in between
                    ]
                    if len(convs) > 1:
                        found.add(unit.id)
        return found

    def _attention_projections(self) -> set[str]:
        """Convs that only feed a matrix product (q, k, v) or read its result (rule a)."""
        attention = [p for p in self.graph.positions if p.attention]
        feeding = {source for p in attention for source in p.inputs}
        results = {p.id for p in attention}
        only_feeding = {p for p in feeding if not self.flow.out_degree(p)}  # read by no unit or join
        return {u.id for u in self.graph.units if u.input_position in results or u.output_position in only_feeding}

    def _unit_count(self, chain: Chain) -> int:
        return sum(1 if step.kind == "unit" else 2 for step in chain.steps)

    def _is_strided(self, unit_id: str) -> bool:
        return any(s > 1 for s in self.units[unit_id].conv.stride)

    def _is_pointwise(self, unit_id: str) -> bool:
        conv = self.units[unit_id].conv
        return all(k == 1 for k in conv.kernel_size) and not self._is_strided(unit_id)

    def _units_after(self, position: str, until: str | None = None) -> list[str]:
        """Units on paths leaving ``position`` (up to ``until`` when given)."""
        reach = nx.descendants(self.flow, position) | {position}
        if until is not None:
            reach &= nx.ancestors(self.flow, until) | {until}
        return [
            data["unit"] for a, b, data in self.flow.edges(data=True) if "unit" in data and a in reach and b in reach
        ]

    def _breaks(self) -> dict[str, str]:
        breaks: dict[str, str] = {}
        if self.stem is not None:
            breaks[self.units[self.stem].output_position] = f"the stem {self.stem}'s position"
        for unit in self.graph.units:
            if unit.id == self.stem or unit.id in self.shortcuts or not self._is_strided(unit.id):
                continue
            position, why = self._break_of(unit.id)
            breaks.setdefault(position, why)
        return breaks

    def _break_of(self, unit_id: str) -> tuple[str, str]:
        """Where no span may cross because of strided ``unit_id`` (rule c)."""
        position = self.units[unit_id].output_position
        if unit_id in self.residual_units:
            return self.branch_ends.get(position, position), f"strided {unit_id}'s position (in a residual block)"
        after = nx.descendants(self.flow, position)
        later_sources = sorted(
            (p for p in self.residual_sources if p in after or p == position), key=self.index.__getitem__
        )
        if later_sources and all(self._is_pointwise(u) for u in self._units_after(position, later_sources[0])):
            return later_sources[0], f"the first residual source after strided {unit_id}"
        return position, f"strided {unit_id}'s position"

    def outside(self) -> dict[str, str]:
        """Units with no entries of their own in the table (rule a), in unit order."""
        why: dict[str, str] = {}
        for unit in self.graph.units:
            if unit.id == self.stem:
                why[unit.id] = "the stem: position 0 is its output"
            elif unit.id in self.shortcuts:
                why[unit.id] = "projection shortcut: it merges only inside its whole block"
            elif unit.id in self.attention:
                why[unit.id] = "attention projection: it feeds or reads a matrix product"
            elif self.positions[unit.output_position].pinned == MODEL_OUTPUT:
                why[unit.id] = "the head: its output is the model output"
            elif unit.ineligible is not None:
                why[unit.id] = f"kept out of every span: {unit.ineligible}"
        return why

    # -- the rules, per span
    def problem(self, span: Span) -> str | None:
        if len(span.units) == 1 and not span.joins:
            return None  # every unit keeps its own span: a plan can always leave it as it is
        if self.stem in span.units:
            return "the stem is never inside a span"
        if (span.start, span.end) in self.whole_branches:
            return "a residual branch taken whole from its source is the whole block (its skip absorbed)"
        inner = (nx.descendants(self.flow, span.start) & nx.ancestors(self.flow, span.end)) - {span.start, span.end}
        if any(p in self.breaks for p in inner):
            return "crosses a break (the stem's position, a strided conv's, or the residual source after one)"
        if not self._strides_ok(span):
            return "at most one strided conv per path, and only 1×1 convs after it"
        return None

    def _strides_ok(self, span: Span) -> bool:
        """Along every path through the span: ≤ 1 strided conv, and only 1×1 convs after it."""
        members = set(span.units)
        state: dict[str, int] = {span.start: 0}  # 0: no stride yet; 1: after a strided conv
        order = sorted(
            (nx.descendants(self.flow, span.start) & (nx.ancestors(self.flow, span.end) | {span.end})),
            key=self.index.__getitem__,
        )
        for position in order:
            worst = 0
            for source, _, data in self.flow.in_edges(position, data=True):
                if source not in state:
                    continue
                seen = state[source]
                unit = data.get("unit")
                if unit in members:
                    if seen and not self._is_pointwise(unit):
                        return False
                    if self._is_strided(unit):
                        seen = 1
                worst = max(worst, seen)
            state[position] = worst
        return True


def _remark(chain: Chain, covered_joins: set[str]) -> Chain:
    """Recompute ``Parallel.mergeable``: a region is mergeable when a kept span covers it."""
    steps = []
    for step in chain.steps:
        if step.kind == "parallel" and isinstance(step.region, Parallel):
            region = step.region
            branches = tuple(_remark(branch, covered_joins) for branch in region.branches)
            step = Step("parallel", region=Parallel(region.join, branches, region.join in covered_joins))
        steps.append(step)
    return Chain(chain.positions, tuple(steps))
