"""Merge: fold every marked linear span into one conv, and BatchNorms into their convs.

Two rewrites, both exact in eval mode:

* **Spans.** ``linearize`` brackets each span between ``fxmerge::span_pad`` and
  ``fxmerge::span_end``. Inside, the graph is made only of unpadded convs,
  per-channel affines, adds, concatenations and crops of the padded input, so the
  span is one affine map of that input. Walking the span's nodes in topological
  order, each node's value is built as a :class:`fxmerge.kernels.LinearMap`; the
  value at ``span_end`` is read back as one conv with padding ``P - offset``
  (``fxmerge.kernels.to_conv``) and replaces the whole span. The activation that
  closes the span stays after it. The new conv's node records the span in
  ``node.meta["fxmerge_span"]``.
* **Side biases.** An ``add`` inside a span whose other operand ``s`` comes from
  outside it, one value per sample and channel (``(N, C, 1, …)``: a diffusion time
  embedding), is carried by the map as a term ``A @ s`` (``kernels.add_side``): with
  the span's padding in front every later conv reads ``s`` at every tap, so it maps
  ``s`` by ``Σ_spatial W`` exactly, borders included. The merged span computes
  ``conv(x) + A @ s``: ``s`` itself when ``A`` is the identity; when ``s`` is a
  ``Linear``'s output only reshaped to ``(N, C, 1, …)`` and nothing else reads it,
  that Linear is replaced by one computing ``A·W``, ``A·bias`` (``A @ (W z + b)``);
  otherwise a bias-free 1×1 conv with weight ``A`` reads ``s``.
* **BatchNorm folding.** A conv whose only user is an eval BatchNorm (or a constant
  scale/shift) absorbs it: ``w' = w * scale``, ``b' = b * scale + shift``.

The markers are the plan's record in the graph: they survive ``symbolic_trace``,
Dynamo and ``torch.export``, so a linearized model merges in any of the three graph
shapes. With no markers (a graph ``linearize`` did not produce) only the folding
runs: merging other linear runs can make a model slower (a 1×1 bottleneck followed
by a 1×1 expansion) and, where inner convs keep their own padding, is exact only in
the interior — which runs to merge is the solver's decision, carried by a plan.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx
from torch import nn

from fxmerge import kernels
from fxmerge.fxutil import nodes_between, shape_of
from fxmerge.ir import parse_entry_id
from fxmerge.nodes import (
    affine_site,
    conv_site,
    is_add,
    is_native_batchnorm,
    is_transparent,
    join_site,
)
from fxmerge.ops import SPAN_CROP, SPAN_END, SPAN_PAD, is_marker
from fxmerge.patterns import side_producer
from fxmerge.plan import Plan, PlanError


class MergeError(ValueError):
    """A graph cannot be merged as asked."""


def merge(gm: nn.Module, plan: Plan | None = None, *, inplace: bool = False) -> torch.fx.GraphModule:
    """An exact merged copy of ``gm``: marked spans become single convs, BatchNorms fold.

    When ``plan`` is given, the spans marked in ``gm`` must be spans it chose.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        gm = torch.fx.symbolic_trace(gm)
    if gm.training or any(m.training for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        raise MergeError(
            "merge needs eval mode: it folds BatchNorm running statistics into the conv weights. "
            "Call model.eval() before merging (the merged model is for inference)."
        )
    if not inplace:
        gm = copy.deepcopy(gm)
    begins = [n for n in gm.graph.nodes if is_marker(n, SPAN_PAD)]
    if plan is not None and begins:
        chosen = {parse_entry_id(entry)[0] for entry in plan.entries}
        foreign = sorted({b.args[2] for b in begins} - chosen)
        if foreign:
            raise PlanError(
                f"the graph holds span(s) {foreign[:3]} that the given plan did not choose; "
                "merge the model with the plan it was linearized with"
            )
    counter = [0]
    for begin in begins:
        _merge_span(gm, begin, counter)
    _fold_affines(gm, counter)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


# ----------------------------------------------------------------------- spans
def _merge_span(gm: torch.fx.GraphModule, begin: torch.fx.Node, counter: list[int]) -> None:
    span = begin.args[2]
    pad = list(begin.args[1])
    dims = len(pad) // 2
    padding = tuple(pad[2 * (dims - 1 - d)] for d in range(dims))
    ends = [n for n in gm.graph.nodes if is_marker(n, SPAN_END) and n.args[1] == span]
    if len(ends) != 1:
        raise MergeError(f"span {span!r} has {len(ends)} end markers; the graph was edited after linearize")
    end = ends[0]
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    region = sorted(nodes_between(begin, end.args[0]), key=order.__getitem__)
    value = _span_map(gm, begin, end, region, dims, span)
    dtype = _dtype(gm, region)
    module = kernels.to_conv(value, padding, dtype=dtype).to_module()
    name = f"fxmerge_merged_{counter[0]}"
    counter[0] += 1
    gm.add_module(name, module)
    with gm.graph.inserting_before(end):
        conv = gm.graph.call_module(name, (begin.args[0],))
        out = conv
        for side, matrix in value.sides:
            out = gm.graph.call_function(operator.add, (out, _side_term(gm, side, matrix, dtype, counter)))
    conv.meta["fxmerge_span"] = span
    end.replace_all_uses_with(out)
    for node in reversed([begin, *region, end]):
        if not node.users:
            gm.graph.erase_node(node)


def _span_map(gm, begin, end, region, dims: int, span: str) -> kernels.LinearMap:
    """The LinearMap at the span's end, built node by node from the padded input."""
    values: dict[torch.fx.Node, kernels.LinearMap] = {begin: kernels.identity(_input_channels(begin, region, gm), dims)}
    # a wide span's maps are large ([C_out, C_in, *k] in float64): keep one only while a reader is pending
    region_set = set(region)
    pending = {node: sum(user in region_set or user is end for user in node.users) for node in [begin, *region]}
    for node in region:
        values[node] = _value_of(node, values, gm, span)
        for arg in node.all_input_nodes:
            if arg in pending:
                pending[arg] -= 1
                if pending[arg] <= 0 and arg is not end.args[0]:
                    values.pop(arg, None)
    return values[end.args[0]]


def _input_channels(begin: torch.fx.Node, region, gm) -> int:
    node = begin
    while isinstance(node, torch.fx.Node):
        shape = shape_of(node)
        if shape is not None and len(shape) > 1:
            return int(shape[1])
        if not (is_marker(node, SPAN_PAD) or is_marker(node, SPAN_END) or is_transparent(node, gm)):
            break
        node = node.args[0] if node.args else None
    for node in region:
        site = conv_site(node, gm)
        if site is not None and _resolve(site.input, gm) is begin:
            return site.params.in_channels
    raise MergeError("cannot tell how many channels enter the span")


def _resolve(node, gm):
    while isinstance(node, torch.fx.Node) and (is_transparent(node, gm) or is_marker(node, SPAN_CROP)):
        node = node.args[0]
    return node


def _dtype(gm, region) -> torch.dtype:
    for node in region:
        site = conv_site(node, gm)
        if site is not None:
            return site.params.weight.dtype
    return torch.float32


def _value_of(node: torch.fx.Node, values: dict, gm: torch.fx.GraphModule, span: str) -> kernels.LinearMap:
    def value(arg):
        if arg not in values:
            raise MergeError(f"span {span!r}: {node.name} reads {arg} from outside the span")
        return values[arg]

    site = conv_site(node, gm)
    if site is not None:
        if site.problem is not None:
            raise MergeError(f"span {span!r}: conv {node.name} cannot be merged: {site.problem}")
        if any(p != 0 for p in site.params.padding):
            raise MergeError(f"span {span!r}: conv {node.name} still pads its input; spans must come from linearize")
        p = site.params
        return kernels.then_conv(value(site.input), p.weight, p.bias, p.stride, p.dilation, p.groups)
    if is_native_batchnorm(node):
        return value(node.args[0])  # its getitem(0) is the affine
    affine = affine_site(node, gm)
    if affine is not None:
        return kernels.then_affine(value(affine.input), affine.scale, affine.shift)
    side = _side_bias(node, values, span)
    if side is not None:
        return kernels.add_side(*side)
    joined = join_site(node, shape_of)
    if joined is not None:
        if joined.problem is not None:
            raise MergeError(f"span {span!r}: {node.name}: {joined.problem}")
        parts = [value(o) for o in joined.operands]
        return kernels.add(*parts) if joined.kind == "add" else kernels.cat(*parts)
    if is_marker(node, SPAN_CROP):
        cut = list(node.args[1])
        dims = len(cut) // 2
        return kernels.crop(value(node.args[0]), tuple(-cut[2 * (dims - 1 - d)] for d in range(dims)))
    if is_transparent(node, gm):
        return value(node.args[0])
    raise MergeError(f"span {span!r}: {node.format_node()} is not a linear op fxmerge can merge")


# ------------------------------------------------------------------- side biases
def _side_bias(node: torch.fx.Node, values: dict, span: str) -> tuple[kernels.LinearMap, torch.fx.Node] | None:
    """``(map, s)`` when ``node`` adds a tensor ``s`` from outside the span onto a tensor of the span."""
    if not is_add(node) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    inside = [a for a in node.args if isinstance(a, torch.fx.Node) and a in values]
    outside = [a for a in node.args if isinstance(a, torch.fx.Node) and a not in values]
    if len(inside) != 1 or len(outside) != 1:
        return None
    value, side = values[inside[0]], outside[0]
    shape = shape_of(side)
    if (
        shape is None
        or len(shape) != value.dims + 2
        or shape[1] != value.out_channels
        or any(s != 1 for s in shape[2:])
    ):
        raise MergeError(
            f"span {span!r}: {node.name} adds {side.name} of shape {shape}; only a side bias of one value "
            f"per sample and channel ((N, {value.out_channels}, 1, ...)) merges exactly"
        )
    return value, side


def _side_term(gm: torch.fx.GraphModule, side: torch.fx.Node, matrix: torch.Tensor, dtype, counter) -> torch.fx.Node:
    """``A @ s`` for side bias ``s`` as a node: ``s`` when ``A`` is the identity, ``s``'s Linear
    refitted to ``A·W``, ``A·bias`` when nothing else reads it, else a bias-free 1×1 conv."""
    c_out, c_side = matrix.shape
    if c_out == c_side and torch.equal(matrix, torch.eye(c_out, dtype=matrix.dtype, device=matrix.device)):
        return side
    name = f"fxmerge_side_{counter[0]}"
    counter[0] += 1
    produced = side_producer(side, gm)
    if produced is not None:
        linear, singletons = produced
        weight = linear.weight.detach()
        bias = linear.bias.detach().double() if linear.bias is not None else weight.new_zeros(c_side).double()
        module = nn.Linear(weight.shape[1], c_out).to(dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            module.weight.copy_(matrix @ weight.double())
            module.bias.copy_(matrix @ bias)
        gm.add_module(name, module)
        term = gm.graph.call_module(name, (linear.input,))
        for _ in range(singletons):
            term = gm.graph.call_function(torch.unsqueeze, (term, -1))
        return term
    dims = len(shape_of(side)) - 2
    weight = matrix.reshape(c_out, c_side, *(1,) * dims)
    module = kernels.ConvParams(weight.to(dtype), None, (1,) * dims, (0,) * dims, (1,) * dims).to_module()
    gm.add_module(name, module)
    return gm.graph.call_module(name, (side,))


# ------------------------------------------------------------------- affines
def _fold_affines(gm: torch.fx.GraphModule, counter: list[int]) -> None:
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph:
            continue
        site = conv_site(node, gm)
        if site is None or site.params.transposed or isinstance(site.padding, str):
            continue
        params, last = _fold_chain(node, site.params, gm)
        if last is node:
            continue
        if params.bias is None:
            params = kernels.ConvParams(
                params.weight,
                torch.zeros(params.out_channels, dtype=params.weight.dtype),
                params.stride,
                params.padding,
                params.dilation,
                params.groups,
                params.padding_mode,
            )
        module = params.to_module()
        module.padding_mode = params.padding_mode
        name = f"fxmerge_folded_{counter[0]}"
        counter[0] += 1
        gm.add_module(name, module)
        with gm.graph.inserting_before(last):
            new = gm.graph.call_module(name, (site.input,))
        new.meta.update(node.meta)
        last.replace_all_uses_with(new)


def _fold_chain(conv: torch.fx.Node, params: kernels.ConvParams, gm):
    """The conv with every affine that is the sole reader of its output folded in, and the last one."""
    params = kernels.ConvParams(
        params.weight.detach(),
        None if params.bias is None else params.bias.detach(),
        params.stride,
        params.padding,
        params.dilation,
        params.groups,
        params.padding_mode,
    )
    last = conv
    while len(last.users) == 1:
        user = next(iter(last.users))
        if is_transparent(user, gm):
            break
        affine = affine_site(user, gm)
        if affine is None or affine.input is not last:
            break
        params = kernels.fold_affine(params, affine.scale, affine.shift)
        last = affine.node
    return params, last
