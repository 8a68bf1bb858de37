"""Paper rules: restrict a general span graph to the LayerMerge search space.

``rules="paper"`` reproduces the search space of the reference LayerMerge
implementation (Kim et al., ICML 2024) so that results can be compared with the
paper. It is a filter: it takes the span graph the general rules build (with
options deduplicated by merged kernel size and depthwise-or-not, see
``spans.OPTION_KEYS``) and removes the spans the paper never considers:

(a) *positions lie on the main path.* A projection shortcut (a branch of a residual
    ``add`` holding a single conv while another branch holds more) is not a choice
    of its own: its only span is the single-unit one that keeps it as it is, and
    otherwise it merges only inside a span covering its whole block.
(b) *the stem is never inside a span*: the first unit of the network keeps its own
    single-unit span.
(c) *a span contains at most one strided conv, and only 1×1 convs after it*, along
    every path through it. No span crosses a *break*: the stem's position and, for
    every strided conv of the main path, its own position, or, when only 1×1 convs
    follow it up to the next residual block, that block's source position.
(d) *a span that touches a residual block lies inside one of its branches or covers
    the whole block.* The general rules already guarantee this.
(e) *options* are the distinct (merged kernel size, depthwise-or-not) results, each
    realised by the kept convs with the largest summed ``|weight|``, with at least
    one conv kept — the general enumerator does this when given the paper key.

Nothing here is architecture-specific: stems, shortcuts, strided convs and residual
sources are read off the chain structure of the span graph, so the rules apply to
any network, with ResNets and MobileNets giving exactly the paper's spaces.
"""

from __future__ import annotations

from dataclasses import replace

import networkx as nx

from fxmerge.ir import Chain, Parallel, Rejection, Span, SpanGraph, Step


def paper_rules(graph: SpanGraph) -> SpanGraph:
    """The span graph restricted to the LayerMerge paper's search space (rules a–e above)."""
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
    notes = tuple(
        Rejection("<paper rules>", f"{count} span(s) removed: {reason}") for reason, count in sorted(dropped.items())
    )
    return replace(graph, rules="paper", spans=tuple(kept), chains=chains, rejections=graph.rejections + notes)


class _Structure:
    """What the rules need to know about a span graph: stem, shortcuts, strided convs, breaks."""

    def __init__(self, graph: SpanGraph):
        self.graph = graph
        self.units = {unit.id: unit for unit in graph.units}
        self.flow = nx.DiGraph()
        self.flow.add_nodes_from(p.id for p in graph.positions)
        for unit in graph.units:
            self.flow.add_edge(unit.input_position, unit.output_position, unit=unit.id)
        for join in graph.joins:
            for operand in join.operands:
                self.flow.add_edge(operand, join.output_position)
        self.index = {p.id: p.index for p in graph.positions}
        self.stem = min(graph.units, key=lambda u: self.index[u.output_position]).id if graph.units else None
        self.shortcuts: set[str] = set()
        self.residual_sources: set[str] = set()
        for chain in graph.chains:
            self._visit(chain)
        self.breaks = self._breaks()

    # -- structure
    def _visit(self, chain: Chain) -> None:
        for k, step in enumerate(chain.steps):
            if step.kind != "parallel" or not isinstance(step.region, Parallel):
                continue
            region = step.region
            if self.graph.join(region.join).kind == "add":
                self.residual_sources.add(chain.positions[k])
                sizes = [self._unit_count(branch) for branch in region.branches]
                for branch, size in zip(region.branches, sizes):
                    if size == 1 and max(sizes) > 1:
                        self.shortcuts.add(branch.steps[0].unit)
            for branch in region.branches:
                self._visit(branch)

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
            data["unit"] for a, b, data in self.flow.edges(data=True)
            if "unit" in data and a in reach and b in reach
        ]

    def _breaks(self) -> dict[str, str]:
        breaks: dict[str, str] = {}
        if self.stem is not None:
            breaks[self.units[self.stem].output_position] = f"the stem {self.stem}'s position"
        for unit in self.graph.units:
            if unit.id == self.stem or unit.id in self.shortcuts or not self._is_strided(unit.id):
                continue
            after = nx.descendants(self.flow, unit.output_position)
            later_sources = sorted(
                (p for p in self.residual_sources if p in after or p == unit.output_position),
                key=self.index.__getitem__,
            )
            if later_sources and all(
                self._is_pointwise(u) for u in self._units_after(unit.output_position, later_sources[0])
            ):
                breaks.setdefault(later_sources[0], f"the first residual source after strided {unit.id}")
            else:
                breaks.setdefault(unit.output_position, f"strided {unit.id}'s position")
        return breaks

    # -- the rules, per span
    def problem(self, span: Span) -> str | None:
        if len(span.units) == 1 and not span.joins:
            return None  # every unit keeps its own span: a plan can always leave it as it is
        if self.stem in span.units:
            return "the stem is never inside a span"
        inner = (nx.descendants(self.flow, span.start) & nx.ancestors(self.flow, span.end)) - {span.start, span.end}
        crossed = sorted(p for p in inner if p in self.breaks)
        if crossed:
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
