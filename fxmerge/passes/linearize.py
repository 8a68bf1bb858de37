"""Linearize: apply a plan to a captured graph, giving the trainable network that merges exactly.

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

The pass works on a copy of the captured graph: with ``share_parameters=True`` the
result reads the captured model's own modules and tensors (cheap; for evaluating many
plans), otherwise it owns a copy of them (for training).
"""

from __future__ import annotations

import copy

import torch
import torch.fx
import torch.nn.functional as F

from fxmerge.capture import Captured
from fxmerge.fxutil import (
    dtype_of,
    forget_shape,
    node_index,
    nodes_between,
    set_shape,
    tensor_inputs,
)
from fxmerge.ir import Entry, Span, SpanGraph
from fxmerge.nodes import conv_site
from fxmerge.ops import SPAN_CROP, SPAN_END, SPAN_PAD, is_marker
from fxmerge.plan import Plan

_FUNCTIONAL_CONV = {1: F.conv1d, 2: F.conv2d}


def linearize(
    captured: Captured, span_graph: SpanGraph, plan: Plan, *, share_parameters: bool = False
) -> torch.fx.GraphModule:
    """A GraphModule computing ``plan`` applied to the captured model, in eval mode.

    ``span_graph`` must be the one ``plan`` was made for (it is validated). The
    captured graph is not modified.
    """
    plan.validate(span_graph)
    if share_parameters:
        gm = torch.fx.GraphModule(captured.gm, copy.deepcopy(captured.gm.graph), type(captured.gm).__name__)
    else:
        gm = copy.deepcopy(captured.gm)
    rewriter = _Rewriter(gm, span_graph)
    for entry in plan.chosen(span_graph):
        span = span_graph.span(entry.span)
        if len(span.units) > 1 or span.joins or entry.option.pruned:
            rewriter.rewrite(span, entry)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm.eval()


class _Rewriter:
    """Rewrites spans one after another; tracks nodes that a rewrite replaced."""

    def __init__(self, gm: torch.fx.GraphModule, span_graph: SpanGraph) -> None:
        self.gm = gm
        self.span_graph = span_graph
        self.nodes = node_index(gm)
        self.replaced: dict[str, torch.fx.Node] = {}  # a pruned unit's output -> what now stands for it

    def node(self, name: str) -> torch.fx.Node:
        node = self.nodes[name]
        while node.name in self.replaced:
            node = self.replaced[node.name]
        return node

    def rewrite(self, span: Span, entry: Entry) -> None:
        sg = self.span_graph
        start = self.node(sg.position(span.start).node)
        start = next((u for u in start.users if is_marker(u, SPAN_END)), start)  # an earlier span's output
        end_activation = _activation_node_of(sg, span.end)
        end_pre = self.node(end_activation).args[0] if end_activation else self.node(sg.position(span.end).node)
        for position_id in span.dropped_activations:
            node = self.node(_activation_node_of(sg, position_id))
            node.replace_all_uses_with(node.args[0])
            self.gm.graph.erase_node(node)
        for unit_id in entry.option.pruned:
            end_pre = self._prune(unit_id, end_pre)
        region = nodes_between(start, end_pre)
        order = {n: k for k, n in enumerate(self.gm.graph.nodes)}
        region_sorted = sorted(region, key=order.__getitem__)
        dims = len(sg.position(span.start).shape) - 2
        need, margin = _margins(self.gm, region_sorted, start, end_pre, dims)
        begin = self._pad(span, start, margin[start])
        _connect(self.gm, span, start, begin, need, margin)
        for node in region_sorted:
            forget_shape(node)  # padded: the captured shape no longer holds
            site = conv_site(node, self.gm)
            if site is not None:
                replacement = _unpad_conv(self.gm, node, site)
                end_pre = replacement if node is end_pre else end_pre
        with self.gm.graph.inserting_after(end_pre):
            marker = self.gm.graph.call_function(SPAN_END, (end_pre, span.id))
        set_shape(marker, sg.position(span.end).shape, dtype_of(start))
        end_pre.replace_all_uses_with(marker, delete_user_cb=lambda user: user is not marker)

    def _prune(self, unit_id: str, end_pre: torch.fx.Node) -> torch.fx.Node:
        """Replace a unit's conv and affines by the identity; returns the (maybe moved) span end."""
        unit = self.span_graph.unit(unit_id)
        conv = self.node(unit.conv_node)
        last = self.node(unit.affine_nodes[-1]) if unit.affine_nodes else conv
        source = conv.args[0]
        if last is end_pre:
            end_pre = source
        last.replace_all_uses_with(source)
        self.replaced[last.name] = source
        for name in (*reversed(unit.affine_nodes), unit.conv_node):
            node = self.node(name)
            if node.users:
                continue
            helpers = [a for a in node.args if isinstance(a, torch.fx.Node) and a.op == "call_function"]
            self.gm.graph.erase_node(node)
            for helper in helpers:
                if not helper.users:
                    self.gm.graph.erase_node(helper)
        return end_pre

    def _pad(self, span: Span, start: torch.fx.Node, total: tuple[int, ...]) -> torch.fx.Node:
        pad = [p for m in reversed(total) for p in (m, m)]
        with self.gm.graph.inserting_after(start):
            begin = self.gm.graph.call_function(SPAN_PAD, (start, pad, span.id))
        shape = self.span_graph.position(span.start).shape
        set_shape(begin, (*shape[:2], *(s + 2 * m for s, m in zip(shape[2:], total))), dtype_of(start))
        return begin


def _margins(gm, region_sorted, start, end_pre, dims: int):
    """Backwards from the span output: what each reader needs of each tensor, and each tensor's margin."""
    need: dict[tuple[torch.fx.Node, torch.fx.Node], tuple[int, ...]] = {}
    margin: dict[torch.fx.Node, tuple[int, ...]] = {end_pre: (0,) * dims}
    region = set(region_sorted)
    for node in reversed(region_sorted):
        out_margin = margin.get(node, (0,) * dims)
        site = conv_site(node, gm)
        for arg in tensor_inputs(node):
            if arg not in region and arg is not start:
                continue
            if site is not None and arg is site.input:
                required = tuple(p + s * m for p, s, m in zip(site.params.padding, site.params.stride, out_margin))
            else:
                required = out_margin
            need[(arg, node)] = required
            margin[arg] = tuple(max(a, b) for a, b in zip(margin.get(arg, required), required))
    return need, margin


def _connect(gm, span: Span, start, begin, need, margin) -> None:
    """Readers of the span input read the padded input; a reader needing less reads a crop."""
    total = margin[start]
    for (arg, node), required in need.items():
        have = total if arg is start else margin[arg]
        source = begin if arg is start else arg
        if required != have:
            cut = [-(h - r) for h, r in zip(reversed(have), reversed(required)) for _ in range(2)]
            with gm.graph.inserting_before(node):
                source = gm.graph.call_function(SPAN_CROP, (source, cut, span.id))
        node.replace_input_with(arg, source)


def _activation_node_of(span_graph: SpanGraph, position_id: str) -> str | None:
    position = span_graph.position(position_id)
    if position.kind == "unit":
        return span_graph.unit(position_id).activation_node
    if position.kind == "join":
        return span_graph.join(position_id).activation_node
    return None


def _unpad_conv(gm: torch.fx.GraphModule, node: torch.fx.Node, site) -> torch.fx.Node:
    """Run this conv call site unpadded, still using the module's own parameters."""
    dims = site.dims
    zeros = [0] * dims
    if node.op == "call_module":
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(f"{node.target}.weight")
            bias = gm.graph.get_attr(f"{node.target}.bias") if site.params.bias is not None else None
            functional = gm.graph.call_function(
                _FUNCTIONAL_CONV[dims],
                (node.args[0], weight, bias, list(site.params.stride), zeros, list(site.params.dilation),
                 site.params.groups),
            )
        functional.meta.update(node.meta)
        node.replace_all_uses_with(functional)
        gm.graph.erase_node(node)
        return functional
    args = list(node.args)
    slots = {2: ("bias", None), 3: ("stride", [1] * dims)}  # aten.conv2d takes its stride as a list, never an int
    while len(args) < 4:
        name, default = slots[len(args)]
        args.append(node.kwargs.get(name, default))
    args[4:5] = [zeros]
    node.args = tuple(args)
    node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("bias", "stride", "padding")}
    return node
