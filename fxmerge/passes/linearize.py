"""Linearize: apply a plan to a captured graph, giving the trainable network that merges exactly.

For every chosen span the rewrite

1. removes the activations strictly inside the span (the activation's output is
   rewired to its input, and its nodes go: a SiLU's ``sigmoid`` and ``mul``; a
   *normalised activation* loses its norm too — a norm is not a per-channel affine,
   so it cannot be folded into the merged conv; fine-tuning recovers);
2. replaces each conv the option prunes, with its BatchNorm and affines, by the
   identity (each removed node's uses are rewired to its input; a side bias of the
   unit stays, added onto the identity). An *identity option* prunes the span's only
   conv: the span is then the identity and gets no markers (nothing to merge);
3. moves the span's padding in front: a margin is computed for every tensor in the
   span, backwards from the span's output (margin 0) — a conv with padding ``p`` and
   stride ``s`` needs ``p + s * m`` on its input to yield margin ``m`` unpadded; a
   tensor read by several ops keeps the largest need and is cropped
   (``fxmerge::span_crop``) for the others, which is how skips inside a span are
   aligned. The span input is padded once (``fxmerge::span_pad``) by its margin and
   every conv in the span runs with padding 0;
4. marks the span's output with ``fxmerge::span_end``;
5. with ``postnorm`` (the default under ``rules="paper"``, off under ``"general"``),
   a span that removed a normalised activation gets a fresh ``GroupNorm(32, C)`` —
   ``GroupNorm(C, C)`` when ``C`` is not a multiple of 32 — with weight 1 and bias 0
   right after its end marker (before a residual add, and before the closing
   activation). It is a new trainable module outside the span: it stays in the
   merged model and does not touch exactness. This is the reference LayerMerge's
   treatment of the DDPM U-Net; its cost is not in the latency table (the merged conv
   is timed alone), so it stays in the calibrated offset like the removed norm did.

A per-sample *side bias* inside the span (``h + b``, ``b`` of shape ``(N, C, 1, …)``
computed outside the span) stays as it is: it adds ``b`` at every position of the
padded tensor, so a later unpadded conv sees it at every tap, and ``merge`` carries
it exactly as ``(Σ_spatial W)·b``.

Why this is the exact-merge contract: after steps 1–3 the span is a composition of
unpadded convs, per-channel affines, adds, concatenations and crops of one zero-padded
input — a single affine, translation-equivariant map — so ``merge`` can replace it
by one conv with no error anywhere, borders included. BatchNorms stay separate
modules and trainable. Spans that hold one unit and prune nothing are left as they
are, so the keep-everything plan returns the original network.

The pass works on a copy of the captured graph: with ``share_parameters=True`` the
result reads the captured model's own modules and tensors and generates its Python
code only when first called (cheap; for evaluating many plans, which the importance
table does by interpretation), otherwise it owns a copy of them (for training).
"""

from __future__ import annotations

import copy
import math
import operator
import re

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx._lazy_graph_module import _LazyGraphModule

from fxmerge.capture import Captured
from fxmerge.fxutil import (
    batched_shape,
    dtype_of,
    forget_shape,
    node_index,
    nodes_between,
    set_shape,
    shape_of,
    tensor_inputs,
)
from fxmerge.ir import Entry, Span, SpanGraph
from fxmerge.nodes import (
    affine_site,
    conv_site,
    is_shape_reader,
    is_transparent,
    reads_size,
    value_readers,
)
from fxmerge.ops import SPAN_CROP, SPAN_END, SPAN_PAD, is_marker
from fxmerge.plan import Plan

_FUNCTIONAL_CONV = {1: F.conv1d, 2: F.conv2d}


def linearize(
    captured: Captured,
    span_graph: SpanGraph,
    plan: Plan,
    *,
    share_parameters: bool = False,
    postnorm: bool | None = None,
) -> torch.fx.GraphModule:
    """A GraphModule computing ``plan`` applied to the captured model, in eval mode.

    ``span_graph`` must be the one ``plan`` was made for (it is validated). The
    captured graph is not modified. ``postnorm`` (step 5; ``None``: on under the
    paper rules, off under the general ones) puts a fresh GroupNorm after each span
    that removed a normalised activation.
    """
    plan.validate(span_graph)
    if share_parameters:  # its Python code is generated on the first call: an interpreter never needs it
        gm = _LazyGraphModule(captured.gm, copy.deepcopy(captured.gm.graph), type(captured.gm).__name__)
    else:
        gm = copy.deepcopy(captured.gm)
    rewriter = _Rewriter(gm, span_graph, span_graph.rules == "paper" if postnorm is None else postnorm)
    for entry in plan.chosen(span_graph):
        span = span_graph.span(entry.span)
        if len(span.units) > 1 or span.joins or entry.option.pruned:
            rewriter.rewrite(span, entry)
    gm.graph.eliminate_dead_code()  # lints the rewritten graph first
    gm.recompile()
    return gm.eval()


class _Rewriter:
    """Rewrites spans one after another; tracks nodes that a rewrite replaced."""

    def __init__(self, gm: torch.fx.GraphModule, span_graph: SpanGraph, postnorm: bool) -> None:
        self.gm = gm
        self.span_graph = span_graph
        self.postnorm = postnorm
        self.nodes = node_index(gm)
        self.replaced: dict[str, torch.fx.Node] = {}  # a removed or replaced node -> what now stands for it

    def node(self, name: str) -> torch.fx.Node:
        node = self.nodes[name]
        while node.name in self.replaced:
            node = self.replaced[node.name]
        return node

    def rewrite(self, span: Span, entry: Entry) -> None:
        sg = self.span_graph
        start = self.node(sg.position(span.start).node)
        start = next((u for u in start.users if is_marker(u, SPAN_END)), start)  # an earlier span's output
        end_activation = _activation_nodes(sg, span.end)
        end_pre = (
            _activation_input(self.node(end_activation[0])) if end_activation else self.node(sg.position(span.end).node)
        )
        for position_id in span.dropped_activations:
            self._drop_activation(_activation_nodes(sg, position_id))
        for unit_id in entry.option.pruned:
            end_pre = self._prune(unit_id, end_pre)
        if set(entry.option.pruned) >= set(span.units):
            return  # the identity option: nothing is left to merge
        region = _own_region(self.gm, nodes_between(start, end_pre), end_pre)
        order = {n: k for k, n in enumerate(self.gm.graph.nodes)}
        region_sorted = sorted(region, key=order.__getitem__)
        for node in region_sorted:
            _out_of_place(node)
            if node is not end_pre:  # the span end keeps its shape: its readers move to the marker below
                _retarget_shape_readers(self.gm, node, start)
        dims = len(sg.position(span.start).shape) - 2
        need, margin = _margins(self.gm, region_sorted, start, end_pre, dims)
        begin = self._pad(span, start, margin[start])
        _connect(self.gm, span, start, begin, need, margin)
        for node in region_sorted:
            forget_shape(node)  # padded: the captured shape no longer holds
            site = conv_site(node, self.gm)
            if site is not None:
                name = node.name
                replacement = _unpad_conv(self.gm, node, site)
                if replacement is not node:  # a module call became a functional conv: later spans may start here
                    self.replaced[name] = replacement
                end_pre = replacement if node is end_pre else end_pre
        with self.gm.graph.inserting_after(end_pre):
            marker = self.gm.graph.call_function(SPAN_END, (end_pre, span.id))
        set_shape(marker, sg.position(span.end).shape, dtype_of(start))
        end_pre.replace_all_uses_with(marker, delete_user_cb=lambda user: user is not marker)
        if self.postnorm and _removes_a_norm(sg, span) and not _norm_of(sg, span.end):
            self._add_postnorm(span, marker)

    def _drop_activation(self, names: tuple[str, ...]) -> None:
        """Rewire an activation's output to its input and erase its nodes (norm, sigmoid, mul)."""
        members = [self.node(name) for name in names]
        members[-1].replace_all_uses_with(_activation_input(members[0]))
        for node in reversed(members):
            if not node.users:
                self.gm.graph.erase_node(node)

    def _add_postnorm(self, span: Span, marker: torch.fx.Node) -> None:
        """A fresh GroupNorm (weight 1, bias 0) reading the span's output (step 5)."""
        shape = self.span_graph.position(span.end).shape
        channels = shape[1]
        parameter = next(iter(self.gm.parameters()), None)
        module = nn.GroupNorm(32 if channels % 32 == 0 else channels, channels, eps=1e-6)
        if parameter is not None:
            module = module.to(device=parameter.device, dtype=parameter.dtype)
        name = "fxmerge_postnorm_" + re.sub(r"\W+", "_", span.id).strip("_")
        while hasattr(self.gm, name):
            name += "_"
        self.gm.add_module(name, module)
        with self.gm.graph.inserting_after(marker):
            norm = self.gm.graph.call_module(name, (marker,))
        set_shape(norm, shape, dtype_of(marker))
        marker.replace_all_uses_with(norm, delete_user_cb=lambda user: user is not norm)

    def _prune(self, unit_id: str, end_pre: torch.fx.Node) -> torch.fx.Node:
        """Replace a unit's conv and affines by the identity; returns the (maybe moved) span end.

        Each removed node's uses read its input instead, so a side bias between them
        stays (added onto the identity).
        """
        unit = self.span_graph.unit(unit_id)
        for name in (*reversed(unit.affine_nodes), unit.conv_node):
            node = self.node(name)
            site = affine_site(node, self.gm) if name != unit.conv_node else None
            source = site.input if site is not None else node.args[0]
            _retarget_shape_readers(self.gm, node, source)
            node.replace_all_uses_with(source)
            self.replaced[node.name] = source
            end_pre = source if end_pre is node else end_pre
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


def _own_region(gm: torch.fx.GraphModule, region: set[torch.fx.Node], end: torch.fx.Node) -> set[torch.fx.Node]:
    """The span's nodes, with its own copy of every transparent op that a reader outside also reads.

    A source read through an ``Identity`` (or an eval dropout) by both a residual body and
    its skip: the body's span must pad *its* input without changing what the skip reads,
    so the span gets a copy of the op and the original stays outside with its readers.
    """
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    for node in sorted(region, key=order.__getitem__, reverse=True):
        outside = [u for u in value_readers(node) if u not in region]
        if node is end or not outside or not is_transparent(node, gm):
            continue
        with gm.graph.inserting_after(node):
            twin = gm.graph.node_copy(node)
        for reader in [u for u in node.users if u in region]:
            reader.replace_input_with(node, twin)
        region = (region - {node}) | {twin}
    return region


_IN_PLACE = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}
for _name in ("add", "sub", "mul", "div"):
    _IN_PLACE.update(
        {
            getattr(getattr(torch.ops.aten, _name + "_"), overload): getattr(getattr(torch.ops.aten, _name), overload)
            for overload in ("Tensor", "Scalar")
        }
    )


def _out_of_place(node: torch.fx.Node) -> None:
    """An in-place join or affine inside a span computes out of place.

    After pruning, ``a += b`` may read the padded span input itself, which other nodes of
    the span (a skip) read too; written in place it would change what they read.
    """
    if node.op == "call_function" and node.target in _IN_PLACE:
        node.target = _IN_PLACE[node.target]
    elif node.op == "call_method" and node.target in ("add_", "sub_", "mul_", "div_"):
        node.target = node.target.rstrip("_")


def _retarget_shape_readers(gm: torch.fx.GraphModule, node: torch.fx.Node, stand_in: torch.fx.Node) -> None:
    """Shape-only readers of ``node``, a tensor the rewrite removes or pads, read ``stand_in`` instead.

    ``stand_in`` (the span's unpadded input, or a pruned conv's input) has the rank,
    dtype and device of every tensor inside the span, so those readers simply read it;
    readers of sizes (``x.shape``, ``x.size(1)``, ``x.numel()``) get ``node``'s recorded
    shape at the batch size ``stand_in`` runs at. An assert on a tensor inside a span
    then checks what it checked before, and no removed tensor is kept alive by a check.
    """
    shape = shape_of(node)
    for reader in [user for user in node.users if is_shape_reader(user)]:
        if shape is None or not reads_size(reader):
            reader.replace_input_with(node, stand_in)
            continue
        with gm.graph.inserting_before(reader):
            size = gm.graph.call_function(batched_shape, (stand_in, tuple(shape[1:])))
            replacement = _size_answer(gm, reader, size)
        reader.replace_all_uses_with(replacement)
        gm.graph.erase_node(reader)


def _size_answer(gm: torch.fx.GraphModule, reader: torch.fx.Node, size: torch.fx.Node) -> torch.fx.Node:
    """What ``reader`` answers, computed from a ``torch.Size`` node instead of the tensor."""
    target = reader.target
    if target in ("numel", "nelement") or "numel" in str(target):
        return gm.graph.call_function(math.prod, (size,))
    dim = reader.args[1] if len(reader.args) > 1 and target != getattr else reader.kwargs.get("dim")
    return size if dim is None else gm.graph.call_function(operator.getitem, (size, dim))


def _owner(span_graph: SpanGraph, position_id: str):
    """The unit or join whose output is ``position_id`` (``None`` for a source)."""
    position = span_graph.position(position_id)
    if position.kind == "unit":
        return span_graph.unit(position_id)
    if position.kind == "join":
        return span_graph.join(position_id)
    return None


def _activation_nodes(span_graph: SpanGraph, position_id: str) -> tuple[str, ...]:
    """Every node of the activation at a position, in graph order (empty when it has none)."""
    owner = _owner(span_graph, position_id)
    if owner is None or owner.activation_node is None:
        return ()
    return owner.activation_nodes or (owner.activation_node,)


def _norm_of(span_graph: SpanGraph, position_id: str) -> str | None:
    owner = _owner(span_graph, position_id)
    return owner.norm if owner is not None else None


def _removes_a_norm(span_graph: SpanGraph, span: Span) -> bool:
    return any(_norm_of(span_graph, p) for p in span.dropped_activations)


def _activation_input(first: torch.fx.Node) -> torch.fx.Node:
    """What an activation reads: the input of its first node (the norm, the sigmoid, the activation)."""
    return first.args[0] if first.args else first.kwargs["input"]


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
                (
                    node.args[0],
                    weight,
                    bias,
                    list(site.params.stride),
                    zeros,
                    list(site.params.dilation),
                    site.params.groups,
                ),
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
