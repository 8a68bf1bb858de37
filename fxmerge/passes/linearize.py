"""Linearize: apply a plan to a model, giving the trainable network that merges exactly.

For every chosen span the rewrite

1. removes the activations strictly inside the span (each activation node's uses
   are rewired to its input);
2. replaces each conv the option prunes, with its BatchNorm and affines, by the
   identity (its output's uses are rewired to its input);
3. moves the span's padding in front: a margin is computed for every tensor in the
   span, backwards from the span's output (margin 0) — a conv with padding ``p`` and
   stride ``s`` needs ``p + s * m`` on its input to yield margin ``m`` unpadded; a
   tensor read by several ops keeps the largest need and is cropped
   (``fxmerge::span_crop``) for the others, which is how skips inside a span are
   aligned. The span input is padded once (``fxmerge::span_pad``) by its margin and
   every conv in the span runs with padding 0;
4. marks the span's output with ``fxmerge::span_end``.

Why this is the exact-merge contract: after steps 1–3 the span is a composition of
unpadded convs, per-channel affines, adds, concatenations and crops of one zero-padded
input — a single affine, translation-equivariant map — so ``merge`` can replace it
by one conv with no error anywhere, borders included. BatchNorms stay separate
modules and trainable. Spans that hold one unit and prune nothing are left as they
are, so the keep-everything plan returns the original network.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxmerge.analysis import analyze_captured
from fxmerge.capture import capture
from fxmerge.ir import Entry, SpanGraph
from fxmerge.ops import SPAN_CROP, SPAN_END, SPAN_PAD, is_marker
from fxmerge.passes.match import conv_info, modules_of
from fxmerge.plan import Plan

_FUNCTIONAL_CONV = {1: F.conv1d, 2: F.conv2d}


def linearize(
    model: nn.Module,
    example_input,
    plan: Plan,
    *,
    span_graph: SpanGraph | None = None,
    exclude=None,
    max_kernel: int = 15,
) -> torch.fx.GraphModule:
    """A trainable GraphModule computing ``plan`` applied to ``model`` (the plan rides along).

    The result carries ``fxmerge_plan`` and ``fxmerge_span_graph`` attributes that
    ``merge`` reads. ``model`` itself is never modified.
    """
    captured = capture(model, example_input)
    if span_graph is None:
        span_graph = analyze_captured(captured, rules=plan.rules, exclude=exclude, max_kernel=max_kernel)
    plan.validate(span_graph)
    gm = captured.gm
    for entry in plan.chosen(span_graph):
        span = span_graph.span(entry.span)
        if len(span.units) == 1 and not span.joins and not entry.option.pruned:
            continue
        _rewrite_span(gm, span_graph, entry)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.fxmerge_plan = plan
    gm.fxmerge_span_graph = span_graph
    gm.train(model.training)
    return gm


def _nodes_by_name(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def _rewrite_span(gm: torch.fx.GraphModule, span_graph: SpanGraph, entry: Entry) -> None:
    span = span_graph.span(entry.span)
    nodes = _nodes_by_name(gm)
    start = nodes[span_graph.position(span.start).node]
    start = next((u for u in start.users if is_marker(u, SPAN_END)), start)  # an earlier span's output
    end_position = span_graph.position(span.end)
    end_activation = _activation_node_of(span_graph, span.end)
    end_out = nodes[end_position.node]
    end_pre = end_out.args[0] if end_activation is not None else end_out

    # 1. activations strictly inside the span
    for position_id in span.dropped_activations:
        name = _activation_node_of(span_graph, position_id)
        node = nodes[name]
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)

    # 2. pruned convs become the identity (their activation, if at the span end, stays)
    for unit_id in entry.option.pruned:
        unit = span_graph.unit(unit_id)
        conv = nodes[unit.conv_node]
        last = nodes[unit.affine_nodes[-1]] if unit.affine_nodes else conv
        if last is end_pre:
            end_pre = conv.args[0]
        last.replace_all_uses_with(conv.args[0])
        for name in (*reversed(unit.affine_nodes), unit.conv_node):
            node = nodes[name]
            if not node.users:
                extra = [a for a in node.args if isinstance(a, torch.fx.Node) and a.op == "call_function" and not a.users]
                gm.graph.erase_node(node)
                for a in extra:
                    if not a.users:
                        gm.graph.erase_node(a)

    # 3. margins, backwards from the span output
    region = _region(start, end_pre)
    order = list(gm.graph.nodes)
    position_of = {n: k for k, n in enumerate(order)}
    region_sorted = sorted(region, key=position_of.__getitem__)
    dims = len(span_graph.position(span.start).shape) - 2
    need: dict[tuple[torch.fx.Node, torch.fx.Node], tuple[int, ...]] = {}
    margin: dict[torch.fx.Node, tuple[int, ...]] = {end_pre: (0,) * dims}
    for node in reversed(region_sorted):
        out_margin = margin.get(node, (0,) * dims)
        info = conv_info(node, gm)
        for arg in _tensor_inputs(node):
            if arg not in region and arg is not start:
                continue
            if info is not None and arg is info.input:
                required = tuple(p + s * m for p, s, m in zip(info.padding, info.stride, out_margin))
            else:
                required = out_margin
            need[(arg, node)] = required
            margin[arg] = tuple(max(a, b) for a, b in zip(margin.get(arg, required), required))

    # 4. emit: pad the span input, crop where a reader needs less, unpad the convs
    total = margin[start]
    pad = [p for m in reversed(total) for p in (m, m)]
    with gm.graph.inserting_after(start):
        begin = gm.graph.call_function(SPAN_PAD, (start, pad, span.id))
    start_shape = span_graph.position(span.start).shape
    begin.meta["fxmerge_shape"] = tuple(start_shape[:2]) + tuple(s + 2 * m for s, m in zip(start_shape[2:], total))
    for (arg, node), required in need.items():
        have = total if arg is start else margin[arg]
        source = begin if arg is start else arg
        if required != have:
            cut = [-(h - r) for h, r in zip(reversed(have), reversed(required)) for _ in range(2)]
            with gm.graph.inserting_before(node):
                source = gm.graph.call_function(SPAN_CROP, (source, cut, span.id))
        node.replace_input_with(arg, source)
    for node in region_sorted:
        node.meta.pop("fxmerge_shape", None)  # padded: the captured shape no longer holds
        info = conv_info(node, gm)
        if info is not None:
            replacement = _unpad_conv(gm, node, info)
            if node is end_pre:
                end_pre = replacement
    with gm.graph.inserting_after(end_pre):
        marker = gm.graph.call_function(SPAN_END, (end_pre, span.id))
    marker.meta["fxmerge_shape"] = end_position.shape
    end_pre.replace_all_uses_with(marker, delete_user_cb=lambda user: user is not marker)


def _activation_node_of(span_graph: SpanGraph, position_id: str) -> str | None:
    position = span_graph.position(position_id)
    if position.kind == "unit":
        return span_graph.unit(position_id).activation_node
    if position.kind == "join":
        return span_graph.join(position_id).activation_node
    return None


def _tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []

    def visit(value):
        if isinstance(value, torch.fx.Node):
            if value.op not in ("get_attr",) and value not in found:
                found.append(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)

    visit(node.args)
    visit(node.kwargs)
    return found


def _region(start: torch.fx.Node, end: torch.fx.Node) -> set[torch.fx.Node]:
    """Nodes on paths from ``start`` (exclusive) to ``end`` (inclusive)."""
    ancestors: set[torch.fx.Node] = set()
    pending = [end]
    while pending:
        node = pending.pop()
        if node in ancestors or node is start:
            continue
        ancestors.add(node)
        pending.extend(_tensor_inputs(node))
    reached: set[torch.fx.Node] = set()
    pending = list(start.users)
    while pending:
        node = pending.pop()
        if node in reached or node not in ancestors:
            continue
        reached.add(node)
        pending.extend(node.users)
    return reached


def _unpad_conv(gm: torch.fx.GraphModule, node: torch.fx.Node, info) -> torch.fx.Node:
    """Run this conv call site unpadded, still using the module's own parameters."""
    dims = info.dims
    if node.op == "call_module":
        module = modules_of(gm)[node.target]
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(f"{node.target}.weight")
            bias = gm.graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
            functional = gm.graph.call_function(
                _FUNCTIONAL_CONV[dims],
                (node.args[0], weight, bias, tuple(info.stride), (0,) * dims, tuple(info.dilation), info.groups),
            )
        functional.meta.update(node.meta)
        node.replace_all_uses_with(functional)
        gm.graph.erase_node(node)
        return functional
    args = list(node.args)
    while len(args) < 5:
        args.append({2: None, 3: 1, 4: 0}[len(args)])
    args[4] = (0,) * dims
    node.args = tuple(args)
    node.kwargs = {k: v for k, v in node.kwargs.items() if k != "padding"}
    return node
