"""Merge: fold every marked linear span into one conv, and BatchNorms into their convs.

Two rewrites, both exact in eval mode:

* **Spans.** ``linearize`` brackets each span between ``fxmerge::span_pad`` and
  ``fxmerge::span_end``. Inside, the graph is made only of unpadded convs,
  per-channel affines, adds, concatenations and crops of the padded input, so the
  span is one affine map of that input. Walking the span's nodes in topological
  order, each node's value is built as a :class:`fxmerge.kernels.LinearMap`; the
  value at ``span_end`` is read back as one conv with padding ``P - offset``
  (``fxmerge.kernels.to_conv``) and replaces the whole span. The activation that
  closes the span stays after it.
* **BatchNorm folding.** A conv whose only user is an eval BatchNorm (or a constant
  scale/shift) absorbs it: ``w' = w * scale``, ``b' = b * scale + shift``.

With no marked spans (a graph ``linearize`` did not produce), only the second rewrite
runs: merging other linear runs can make a model slower (a 1×1 bottleneck followed by
a 1×1 expansion) and, where inner convs keep their own padding, is exact only in the
interior — which runs to merge is the solver's decision, carried by a plan.

All three graph shapes are accepted (``symbolic_trace``, ``torch.compile`` backend
graphs after ``fxmerge.capture.lift_parameters``, ``torch.export`` modules).
"""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import nn

from fxmerge import kernels
from fxmerge.ops import SPAN_CROP, SPAN_END, SPAN_PAD, is_marker
from fxmerge.passes.match import affine_info, conv_info, is_transparent, join_info
from fxmerge.plan import Plan, PlanError


class MergeError(ValueError):
    """A graph cannot be merged as asked."""


def merge(gm: nn.Module, plan: Plan | None = None, *, inplace: bool = False) -> torch.fx.GraphModule:
    """An exact merged copy of ``gm``: marked spans become single convs, BatchNorms fold.

    ``plan`` defaults to the one ``linearize`` attached to ``gm``; when given, the
    spans marked in ``gm`` must be spans that ``plan`` chose.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        gm = torch.fx.symbolic_trace(gm)
    if gm.training or any(m.training for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        raise MergeError(
            "merge needs eval mode: it folds BatchNorm running statistics into the conv weights. "
            "Call model.eval() before merging (the merged model is for inference)."
        )
    plan = plan if plan is not None else getattr(gm, "fxmerge_plan", None)
    if not inplace:
        gm = copy.deepcopy(gm)
    begins = [n for n in gm.graph.nodes if is_marker(n, SPAN_PAD)]
    if plan is not None and begins:
        chosen_spans = {entry.split("|")[0] for entry in plan.entries}
        foreign = sorted({b.args[2] for b in begins} - chosen_spans)
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
    if plan is not None:
        gm.fxmerge_plan = plan
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
    region = sorted(_between(begin, end), key=order.__getitem__)
    channels = _input_channels(begin, region, gm)
    values: dict[torch.fx.Node, kernels.LinearMap] = {begin: kernels.identity(channels, dims)}
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
    merged = kernels.to_conv(values[end.args[0]], padding, dtype=_dtype(gm, region))
    module = merged.to_module()
    name = f"fxmerge_merged_{counter[0]}"
    counter[0] += 1
    gm.add_module(name, module)
    with gm.graph.inserting_before(end):
        conv = gm.graph.call_module(name, (begin.args[0],))
    end.replace_all_uses_with(conv)
    for node in reversed([begin, *region, end]):
        if not node.users:
            gm.graph.erase_node(node)


def _between(begin: torch.fx.Node, end: torch.fx.Node) -> set[torch.fx.Node]:
    reached: set[torch.fx.Node] = set()
    pending = list(begin.users)
    while pending:
        node = pending.pop()
        if node in reached or node is end:
            continue
        reached.add(node)
        pending.extend(node.users)
    ancestors: set[torch.fx.Node] = set()
    pending = [end.args[0]]
    while pending:
        node = pending.pop()
        if node in ancestors or node is begin or not isinstance(node, torch.fx.Node):
            continue
        ancestors.add(node)
        pending.extend(a for a in node.all_input_nodes)
    return reached & ancestors


def _input_channels(begin: torch.fx.Node, region, gm) -> int:
    node = begin
    while isinstance(node, torch.fx.Node):
        for key in ("fxmerge_shape", "val", "example_value", "tensor_meta"):
            meta = node.meta.get(key)
            shape = getattr(meta, "shape", meta)
            if shape is not None and len(shape) > 1:
                return int(shape[1])
        if not (is_marker(node, SPAN_PAD) or is_marker(node, SPAN_END) or is_transparent(node, gm)):
            break
        node = node.args[0] if node.args else None
    for node in region:
        info = conv_info(node, gm)
        if info is not None and _resolve(info.input, gm) is begin:
            return info.weight.shape[1] * info.groups
    raise MergeError("cannot tell how many channels enter the span")


def _resolve(node, gm):
    while isinstance(node, torch.fx.Node) and (is_transparent(node, gm) or is_marker(node, SPAN_CROP)):
        node = node.args[0]
    return node


def _dtype(gm, region) -> torch.dtype:
    for node in region:
        info = conv_info(node, gm)
        if info is not None:
            return info.weight.dtype
    return torch.float32


def _value_of(node: torch.fx.Node, values: dict, gm: torch.fx.GraphModule, span: str) -> kernels.LinearMap:
    def value(arg):
        if arg not in values:
            raise MergeError(f"span {span!r}: {node.name} reads {arg} from outside the span")
        return values[arg]

    info = conv_info(node, gm)
    if info is not None:
        if info.problem is not None:
            raise MergeError(f"span {span!r}: conv {node.name} cannot be merged: {info.problem}")
        if any(p != 0 for p in info.padding):
            raise MergeError(f"span {span!r}: conv {node.name} still pads its input; spans must come from linearize")
        return kernels.then_conv(value(info.input), info.weight, info.bias, info.stride, info.dilation, info.groups)
    affine = affine_info(node, gm)
    if affine is not None:
        return kernels.then_affine(value(affine.input), affine.scale, affine.shift)
    if node.op == "call_function" and node.target is torch.ops.aten._native_batch_norm_legit_no_training.default:
        return value(node.args[0])  # its getitem(0) is the affine
    joined = join_info(node)
    if joined is not None:
        kind, operands, problem = joined
        if problem is not None:
            raise MergeError(f"span {span!r}: {node.name}: {problem}")
        parts = [value(o) for o in operands]
        return kernels.add(*parts) if kind == "add" else kernels.cat(*parts)
    if is_marker(node, SPAN_CROP):
        cut = list(node.args[1])
        dims = len(cut) // 2
        leading = tuple(-cut[2 * (dims - 1 - d)] for d in range(dims))
        return kernels.crop(value(node.args[0]), leading)
    if is_transparent(node, gm):
        return value(node.args[0])
    raise MergeError(f"span {span!r}: {node.format_node()} is not a linear op fxmerge can merge")


# ------------------------------------------------------------------- affines
def _fold_affines(gm: torch.fx.GraphModule, counter: list[int]) -> None:
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph or node.op not in ("call_module", "call_function"):
            continue
        info = conv_info(node, gm)
        if info is None or info.transposed:
            continue
        conv = node
        params = kernels.ConvParams(
            weight=info.weight.detach(), bias=None if info.bias is None else info.bias.detach(),
            stride=info.stride, padding=info.padding, dilation=info.dilation, groups=info.groups,
            padding_mode=info.padding_mode,
        )
        folded_any = False
        last = conv
        while len(last.users) == 1:
            user = next(iter(last.users))
            if is_transparent(user, gm):
                break
            affine = affine_info(user, gm)
            if affine is None and user.op == "call_function" and user.target is torch.ops.aten._native_batch_norm_legit_no_training.default:
                getitems = [u for u in user.users if u.args[1] == 0]
                affine = affine_info(getitems[0], gm) if len(getitems) == 1 else None
            if affine is None or _resolve_native(affine) is not last:
                break
            params = kernels.fold_affine(params, affine.scale, affine.shift)
            last = affine.node
            folded_any = True
        if not folded_any or isinstance(params.padding, str):
            continue
        if params.bias is None:
            params = kernels.ConvParams(params.weight, torch.zeros(params.out_channels, dtype=params.weight.dtype), params.stride, params.padding, params.dilation, params.groups, params.padding_mode)
        module = params.to_module()
        module.padding_mode = info.padding_mode
        name = f"fxmerge_folded_{counter[0]}"
        counter[0] += 1
        gm.add_module(name, module)
        with gm.graph.inserting_before(last):
            new = gm.graph.call_module(name, (info.input,))
        new.meta.update(conv.meta)
        last.replace_all_uses_with(new)
    gm.__dict__.pop("_fxmerge_modules", None)


def _resolve_native(affine) -> torch.fx.Node:
    return affine.input
