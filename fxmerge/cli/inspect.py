"""``fxmerge inspect MODEL``: what fxmerge may merge in a model, and why not elsewhere.

Prints the positions, the candidate spans and the rejected nodes with their
reasons, then one summary line with the *coverage*: the share of convs that lie
inside at least one multi-conv span. When coverage is low the most common
rejection reasons are listed above the summary, so a user sees at once whether
fxmerge found anything to do and, if not, why. ``--json`` prints the same as one
JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import Counter

from fxmerge.cli.arguments import add_model_arguments
from fxmerge.cli.common import analyze_args, format_table
from fxmerge.cli.parser import command
from fxmerge.ir import Span, SpanGraph

LOW_COVERAGE = 0.5
"""Below this coverage, ``inspect`` lists the most common rejection reasons."""

TOP_REASONS = 3


def coverage_text(graph: SpanGraph) -> str:
    """``"67%"``, or ``"-"`` for a model without convs."""
    return "-" if graph.coverage is None else f"{graph.coverage:.0%}"


def is_low_coverage(graph: SpanGraph) -> bool:
    return graph.coverage is not None and graph.coverage < LOW_COVERAGE


def top_reasons(graph: SpanGraph, count: int = TOP_REASONS) -> list[tuple[str, int]]:
    """The ``count`` most common rejection reasons, with how many nodes each rejected."""
    return Counter(r.reason for r in graph.rejections).most_common(count)


def span_graph_dict(graph: SpanGraph, spec: str | None = None) -> dict:
    """A JSON-ready dict of a span graph (what ``fxmerge inspect --json`` prints)."""
    data = {
        "model": graph.model,
        "spec": spec,
        "rules": graph.rules,
        "fingerprint": graph.fingerprint,
        "input_shapes": [list(s) for s in graph.input_shapes],
        "settings": dict(graph.settings),
        "coverage": graph.coverage,
        "units": [dataclasses.asdict(u) for u in graph.units],
        "joins": [dataclasses.asdict(j) for j in graph.joins],
        "positions": [dataclasses.asdict(p) for p in graph.positions],
        "spans": [dataclasses.asdict(s) for s in graph.spans],
        "entries": [dataclasses.asdict(e) for e in graph.entries],
        "chains": [dataclasses.asdict(c) for c in graph.chains],
        "rejections": [{"node": r.node, "reason": r.reason} for r in graph.rejections],
        "top_rejection_reasons": [{"reason": r, "count": n} for r, n in top_reasons(graph)],
    }
    keys = ("units", "joins", "positions", "spans", "entries", "rejections")
    data["summary"] = {key: len(data[key]) for key in keys}
    data["summary"]["coverage_percent"] = None if graph.coverage is None else round(100 * graph.coverage, 1)
    data["summary"]["low_coverage"] = is_low_coverage(graph)
    return data


def summary_line(graph: SpanGraph, seconds: float | None = None) -> str:
    """One line: counts, rejections, coverage (and the analysis time)."""
    multi = sum(len(s.units) > 1 for s in graph.spans)
    text = (
        f"{graph.model}: {len(graph.units)} units, {len(graph.joins)} joins, {len(graph.positions)} positions, "
        f"{len(graph.spans)} spans ({multi} merging several units), {len(graph.entries)} entries, "
        f"{len(graph.rejections)} rejections, coverage {coverage_text(graph)} of convs"
    )
    return text + (f" (analysed in {seconds:.1f} s)" if seconds is not None else "")


def low_coverage_note(graph: SpanGraph) -> str | None:
    """Why little can be merged: the most common rejection reasons (``None`` when coverage is fine)."""
    if not is_low_coverage(graph):
        return None
    head = (
        f"Low coverage: only {coverage_text(graph)} of convs lie inside a span that merges several "
        "(below that, fxmerge has little to remove)."
    )
    reasons, what = top_reasons(graph), "Most common rejection reasons:"
    if not reasons:  # nothing rejected: what keeps spans short is the positions that must stay
        reasons = Counter(p.pinned for p in graph.positions if p.pinned).most_common(TOP_REASONS)
        what = "Nothing was rejected; most common reasons a position must stay:"
    if not reasons:
        return head
    width = len(str(reasons[0][1]))
    lines = [f"  {n:>{width}}× {reason}" for reason, n in reasons]
    return "\n".join([head, what, *lines])


def _keep_kernel(span: Span) -> str:
    for option in span.options:
        if not option.pruned:
            conv = option.conv
            text = "×".join(map(str, conv.kernel_size))
            if any(s != 1 for s in conv.stride):
                stride = conv.stride[:1] if len(set(conv.stride)) == 1 else conv.stride
                text += f" s{'×'.join(map(str, stride))}"
            if conv.groups > 1:
                text += f" g{conv.groups}"
            return text
    return "-"


def format_span_graph(graph: SpanGraph, seconds: float | None = None) -> str:
    """Human-readable tables: positions, spans, rejections, then a one-line summary."""
    positions = format_table(
        ("#", "position", "kind", "activation", "shape", "pinned"),
        [(p.index, p.id, p.kind, p.activation, "×".join(map(str, p.shape)), p.pinned) for p in graph.positions],
    )
    spans = format_table(
        ("span", "units", "options", "merged kernel (keep)"),
        [(s.id, len(s.units), len(s.options), _keep_kernel(s)) for s in graph.spans],
    )
    rejections = format_table(("node", "reason"), [(r.node, r.reason) for r in graph.rejections])
    parts = [
        f"Positions ({len(graph.positions)})\n{positions}",
        f"Spans ({len(graph.spans)})\n{spans}",
        f"Rejected ({len(graph.rejections)})\n{rejections}" if graph.rejections else "Rejected (0)",
        low_coverage_note(graph),
        summary_line(graph, seconds),
    ]
    return "\n\n".join(part for part in parts if part is not None)


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


@command("inspect", "analyse a model: positions, candidate spans, and what cannot be merged", _arguments)
def inspect_command(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    _, _, graph = analyze_args(args)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps(span_graph_dict(graph, spec=args.model), indent=1))
    else:
        print(format_span_graph(graph, seconds))
    return 0
