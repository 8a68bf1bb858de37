"""Parallel regions of the position graph: which joins a span may cover whole.

A join whose output ``b`` is reached from its immediate dominator ``a`` through a
single-entry, single-exit region whose operand branches share only ``a`` is a
*region* (a residual block, an Inception module); the span graph then walks it
branch by branch. Any other join is kept as it is, with the reason as a rejection;
so is a region that encloses a join kept as it is. Found with dominators only: no
architecture-specific code.
"""

from __future__ import annotations

import networkx as nx

from fxmerge.ir import Join, Position, Rejection

_ROOT = "__root__"


def find_regions(graph: nx.DiGraph, joins: dict[str, Join], positions: dict[str, Position]):
    """``(regions, fixed, rejections)``: each join's region ``{output: (source, branches)}``, or why it is kept as is.

    ``graph`` is the position graph (an edge per unit and per join operand). A join's
    source is the immediate dominator of its output; each branch is the set of
    positions between the source and one operand.
    """
    rooted = graph.copy()
    for node in list(graph.nodes):
        if graph.in_degree(node) == 0:
            rooted.add_edge(_ROOT, node)
    idom = nx.immediate_dominators(rooted, _ROOT) if len(rooted) > 1 else {}
    regions: dict[str, tuple[str, list[tuple[str, set[str]]]]] = {}
    fixed: list[str] = []
    rejections: list[Rejection] = []
    for join in joins.values():
        b = join.output_position
        a = idom.get(b, _ROOT)
        reason = _region_problem(graph, join, a, b, positions)
        if reason is None:
            descendants = nx.descendants(graph, a)
            branches = []
            for operand in join.operands:
                nodes = {a, operand} | (descendants & nx.ancestors(graph, operand))
                branches.append((operand, nodes))
            regions[b] = (a, branches)
        else:
            fixed.append(join.id)
            rejections.append(Rejection(join.node, f"join kept as it is: {reason}"))
    _demote_enclosing(regions, fixed, rejections, joins)
    return regions, fixed, rejections


def _demote_enclosing(regions: dict, fixed: list[str], rejections: list[Rejection], joins: dict[str, Join]) -> None:
    """A region that holds a join kept as it is cannot be walked branch by branch: keep it as it is too.

    (``(a + b) + c`` after one conv: the inner add is a region, the outer one is not, and
    a residual around both must then not be a region either.) Repeated until nothing changes.
    """
    by_output = {j.output_position: j for j in joins.values()}
    changed = True
    while changed:
        changed = False
        kept = {joins[j].output_position for j in fixed} | {o for j in fixed for o in joins[j].operands}
        for b, (a, branches) in list(regions.items()):
            inside = set().union(*(nodes for _, nodes in branches)) - {a}
            if inside & kept:
                del regions[b]
                fixed.append(by_output[b].id)
                rejections.append(Rejection(by_output[b].node, "join kept as it is: it encloses a join kept as it is"))
                changed = True


def _region_problem(graph, join: Join, a: str, b: str, positions) -> str | None:
    if a == _ROOT:
        return "its operands have no common source position"
    descendants = nx.descendants(graph, a)
    inside = {a, b} | (descendants & nx.ancestors(graph, b))
    for node in inside - {a}:
        if any(pred not in inside for pred in graph.predecessors(node)):
            return f"{node} inside the region is also fed from outside it"
    for node in inside - {a, b}:
        if any(succ not in inside for succ in graph.successors(node)):
            return f"{node} inside the region is also read outside it"
        if positions[node].pinned:
            return f"{node} inside the region is {positions[node].pinned}"
    seen: set[str] = set()
    for operand in join.operands:
        nodes = ({operand} | (descendants & nx.ancestors(graph, operand))) - {a}
        if nodes & seen:
            return "its branches share positions (not series-parallel)"
        seen |= nodes
        if operand != a:
            entries = [s for s in graph.successors(a) if s in nodes]
            if len(entries) != 1:
                return "a branch leaves the source through several edges"
    if len(inside) == 2 and all(o == a for o in join.operands):
        return "a cat of a single tensor" if len(join.operands) == 1 else "joins a tensor with itself"
    return None
