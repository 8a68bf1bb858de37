"""Which entries a build evaluates, and the plan that applies one entry alone.

Every estimator measures an entry on the network that applies *only that entry*
(:func:`single_entry_plan`: the entry, and every other unit kept as it is). An entry
whose span holds one unit, absorbs no join and prunes nothing *is* the original
network (:func:`is_identity`): it gets ``Δ = 0`` without being evaluated.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

from fxmerge.ir import ConvSpec, Entry, SpanGraph, entry_id
from fxmerge.plan import Plan, PlanError


def single_entry_plan(span_graph: SpanGraph, entry_id: str) -> Plan:
    """The plan that applies only ``entry_id``: every unit outside its span stays as it is."""
    try:
        entry = span_graph.entry(entry_id)
    except KeyError:
        raise PlanError(f"entry {entry_id!r} is not in the span graph of {span_graph.model!r}") from None
    inside = set(span_graph.span(entry.span).units)
    chosen = [entry_id]
    for unit in span_graph.units:
        if unit.id not in inside:
            keep = span_graph.keep_entry(unit.id)
            if not _exists(span_graph, keep):
                raise PlanError(f"span {span_graph.single_unit_span(unit.id).id!r} has no option that keeps every conv")
            chosen.append(keep)
    return Plan.from_entries(span_graph, chosen, method=f"single_entry({entry_id})")


def is_identity(span_graph: SpanGraph, entry: Entry) -> bool:
    """One unit, nothing pruned, nothing absorbed: the entry is the original network."""
    span = span_graph.span(entry.span)
    return len(span.units) == 1 and not span.joins and not entry.option.pruned


def forced_entries(span_graph: SpanGraph) -> frozenset[str]:
    """Entries every plan holds: a span with one option over units no other span covers.

    Their importance adds the same constant to every plan, so it decides nothing.
    """
    covering = Counter(u for span in span_graph.spans for u in span.units)
    return frozenset(
        entry_id(span.id, span.options[0].id)
        for span in span_graph.spans
        if len(span.options) == 1 and all(covering[u] == 1 for u in span.units)
    )


def conv_flops(spec: ConvSpec) -> float:
    """Multiply-adds of one conv at its real input shape."""
    return float(math.prod(spec.output_shape) * (spec.in_channels // spec.groups) * math.prod(spec.kernel_size))


def entry_cost(span_graph: SpanGraph, entry: Entry, *, from_span: bool = False) -> float:
    """The expected cost of evaluating ``entry``: multiply-adds of the convs its network runs.

    Every unit's conv but the pruned ones; with ``from_span`` only from the span's
    first unit on (estimators that replay the unchanged prefix from a record). Plus
    one, so that no entry is free. Used to balance entries across processes.
    """
    pruned = set(entry.option.pruned)
    units = list(span_graph.units)
    if from_span:
        inside = set(span_graph.span(entry.span).units)
        first = next((k for k, u in enumerate(units) if u.id in inside), 0)
        units = units[first:]
    return 1.0 + sum(conv_flops(u.conv) for u in units if u.id not in pruned)


def select_entries(span_graph: SpanGraph, entries: Iterable[str] | None) -> list[Entry]:
    """The entries of ``span_graph`` named by ``entries`` (all of them for ``None``), each once, in order."""
    if entries is None:
        return list(span_graph.entries)
    ids = list(entries)
    unknown = [e for e in ids if not _exists(span_graph, e)]
    if unknown:
        raise KeyError(
            f"{len(unknown)} requested entries are not in the span graph of {span_graph.model!r} "
            f"(first: {unknown[0]!r})"
        )
    return [span_graph.entry(e) for e in dict.fromkeys(ids)]


def _exists(span_graph: SpanGraph, entry_id: str) -> bool:
    try:
        span_graph.entry(entry_id)
    except KeyError:
        return False
    return True
