"""Match: find units (conv → foldable affines → activation?) and joins (add / cat).

This pass reads a normalised GraphModule (see ``fxmerge.capture``) and labels its
nodes; it does not rewrite anything. Decisions are per *node*, never per module:
a module called at two sites gives two units, and ops are recognised by what they
compute — a module class, a function, a tensor method or an ATen op — so the three
graph shapes (``symbolic_trace``, ``torch.compile`` backend graphs, ``torch.export``)
match the same way.

* A **unit** starts at a conv call site and extends through the per-channel affine
  ops that fold into it (eval BatchNorm, a constant scale or shift) while each
  intermediate tensor has a single user, then takes at most one activation from the
  registry in ``fxmerge.activations``.
* A **join** is an ``add`` of two same-shape tensors or a ``cat`` along channels,
  extended the same way by affines and an activation.
* Ops that are the identity in eval mode (dropout, ``nn.Identity``, stochastic
  depth, ``clone``) are transparent.
* Everything else is a *boundary*: its output may start a span (a source position)
  but nothing crosses it. Each boundary is recorded with its reason; nothing
  unknown makes matching fail.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxmerge import activations
from fxmerge.ir import ConvSpec, Join, Position, Rejection, Unit

aten = torch.ops.aten

# ------------------------------------------------------------------ recognisers
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, torch.conv1d: 1, torch.conv2d: 2}
_ATEN_CONV = {aten.conv1d.default: 1, aten.conv2d.default: 2}
_ATEN_CONV_PADDING_STR = {getattr(aten.conv1d, "padding", None): 1, getattr(aten.conv2d, "padding", None): 2}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor}
_CAT_FUNCTIONS = {torch.cat, torch.concat, aten.cat.default}
_TRANSPARENT_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.dropout, torch.clone, aten.dropout.default, aten.clone.default, aten.alias.default,
    aten.dropout_.default, aten.feature_dropout.default, aten.feature_dropout_.default,
}
_ATEN_DROPOUTS = {aten.dropout.default, aten.dropout_.default, aten.feature_dropout.default, aten.feature_dropout_.default}
_TRANSPARENT_METHODS = {"clone", "contiguous"}
_TRANSPARENT_MODULES: tuple[type, ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_TRANSPARENT_MODULE_NAMES = {"DropPath", "StochasticDepth", "DropBlock2d"}

try:  # torchvision's stochastic depth is the identity in eval mode
    from torchvision.ops import StochasticDepth, stochastic_depth

    _TRANSPARENT_MODULES = (*_TRANSPARENT_MODULES, StochasticDepth)
    _TRANSPARENT_FUNCTIONS.add(stochastic_depth)
except ImportError:  # pragma: no cover
    pass


@dataclass(frozen=True)
class ConvInfo:
    node: torch.fx.Node
    input: torch.fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    transposed: bool
    dims: int
    path: str  # module path of the weight's owner, e.g. "layer1.0.conv1"

    @property
    def problem(self) -> str | None:
        """Why this conv cannot be merged with others, or ``None``."""
        if self.transposed:
            return "transposed convolution (upsamples; it cannot be merged)"
        if self.padding_mode != "zeros":
            return f"padding_mode={self.padding_mode!r}: only zero padding can be moved in front of a span"
        if isinstance(self.padding, str):
            return f"padding={self.padding!r}: string padding is resolved by the runtime, not representable here"
        if self.dims not in (1, 2):
            return f"{self.dims}-d convolution: fxmerge merges Conv1d and Conv2d"
        return None


@dataclass(frozen=True)
class AffineInfo:
    node: torch.fx.Node  # the node whose output is the affine result
    input: torch.fx.Node
    scale: torch.Tensor | float
    shift: torch.Tensor | float
    extra_nodes: tuple[torch.fx.Node, ...] = ()  # e.g. the native BN node behind a getitem
    kind: str = "batchnorm"


def _ints(value, dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(int(v) for v in value)
    return value * dims if len(value) == 1 and dims > 1 else value


def _arg(node: torch.fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def fetch(gm: torch.fx.GraphModule, value):
    """The tensor behind a ``get_attr`` node (or the value itself)."""
    if isinstance(value, torch.fx.Node):
        if value.op == "get_attr":
            obj = gm
            for part in value.target.split("."):
                obj = getattr(obj, part)
            return obj
        return None
    return value


def _attr_path(node) -> str | None:
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        path = node.target
        for suffix in (".weight", "_weight"):
            if path.endswith(suffix):
                return path[: -len(suffix)]
        return path
    return None


def modules_of(gm: torch.fx.GraphModule) -> dict[str, nn.Module]:
    cache = gm.__dict__.get("_fxmerge_modules")
    if cache is None:
        cache = dict(gm.named_modules())
        gm.__dict__["_fxmerge_modules"] = cache
    return cache


def conv_info(node: torch.fx.Node, gm: torch.fx.GraphModule) -> ConvInfo | None:
    """Describe ``node`` if it is a convolution, in any of the three graph shapes."""
    if node.op == "call_module":
        module = modules_of(gm).get(node.target)
        if not isinstance(module, nn.modules.conv._ConvNd):
            return None
        dims = module.weight.dim() - 2
        return ConvInfo(
            node=node, input=node.args[0], weight=module.weight,
            bias=module.bias, stride=_ints(module.stride, dims),
            padding=module.padding if isinstance(module.padding, str) else _ints(module.padding, dims),
            dilation=_ints(module.dilation, dims), groups=module.groups, padding_mode=module.padding_mode,
            transposed=module.transposed, dims=dims, path=node.target,
        )
    if node.op != "call_function":
        return None
    target = node.target
    if target in _CONV_FUNCTIONS or target in _ATEN_CONV or (target in _ATEN_CONV_PADDING_STR and target is not None):
        dims = _CONV_FUNCTIONS.get(target) or _ATEN_CONV.get(target) or _ATEN_CONV_PADDING_STR[target]
        weight = fetch(gm, _arg(node, 1, "weight"))
        if not isinstance(weight, torch.Tensor):
            return None
        bias = fetch(gm, _arg(node, 2, "bias"))
        padding = _arg(node, 4, "padding", 0)
        return ConvInfo(
            node=node, input=node.args[0], weight=weight, bias=bias,
            stride=_ints(_arg(node, 3, "stride", 1), dims),
            padding=padding if isinstance(padding, str) else _ints(padding, dims),
            dilation=_ints(_arg(node, 5, "dilation", 1), dims), groups=int(_arg(node, 6, "groups", 1)),
            padding_mode="zeros", transposed=False, dims=dims,
            path=_attr_path(_arg(node, 1, "weight")) or node.name,
        )
    if target is aten.convolution.default:
        weight = fetch(gm, node.args[1])
        if not isinstance(weight, torch.Tensor):
            return None
        dims = weight.dim() - 2
        return ConvInfo(
            node=node, input=node.args[0], weight=weight, bias=fetch(gm, node.args[2]),
            stride=_ints(node.args[3], dims), padding=_ints(node.args[4], dims),
            dilation=_ints(node.args[5], dims), groups=int(node.args[8]), padding_mode="zeros",
            transposed=bool(node.args[6]), dims=dims, path=_attr_path(node.args[1]) or node.name,
        )
    return None


def _bn_scale_shift(mean, var, weight, bias, eps) -> tuple[torch.Tensor, torch.Tensor]:
    from fxmerge.kernels import batchnorm_scale_shift

    return batchnorm_scale_shift(mean, var, weight, bias, eps)


def affine_info(node: torch.fx.Node, gm: torch.fx.GraphModule) -> AffineInfo | None:
    """Describe ``node`` if it is a per-channel affine that folds into a conv (eval only)."""
    if node.op == "call_module":
        module = modules_of(gm).get(node.target)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
            if module.training or module.running_mean is None:
                return None
            scale, shift = _bn_scale_shift(module.running_mean, module.running_var, module.weight, module.bias, module.eps)
            return AffineInfo(node, node.args[0], scale, shift)
        return None
    if node.op == "call_function":
        target = node.target
        if target is F.batch_norm:
            if _arg(node, 5, "training", False):
                return None
            mean, var = fetch(gm, _arg(node, 1, "running_mean")), fetch(gm, _arg(node, 2, "running_var"))
            if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
                return None
            scale, shift = _bn_scale_shift(
                mean, var, fetch(gm, _arg(node, 3, "weight")), fetch(gm, _arg(node, 4, "bias")), _arg(node, 7, "eps", 1e-5)
            )
            return AffineInfo(node, node.args[0], scale, shift)
        if target is aten.batch_norm.default:
            if node.args[5]:
                return None
            mean, var = fetch(gm, node.args[3]), fetch(gm, node.args[4])
            if not isinstance(mean, torch.Tensor):
                return None
            scale, shift = _bn_scale_shift(mean, var, fetch(gm, node.args[1]), fetch(gm, node.args[2]), node.args[7])
            return AffineInfo(node, node.args[0], scale, shift)
        if target is operator.getitem and node.args[1] == 0 and isinstance(node.args[0], torch.fx.Node):
            bn = node.args[0]
            if bn.op == "call_function" and bn.target is aten._native_batch_norm_legit_no_training.default:
                mean, var = fetch(gm, bn.args[3]), fetch(gm, bn.args[4])
                scale, shift = _bn_scale_shift(mean, var, fetch(gm, bn.args[1]), fetch(gm, bn.args[2]), bn.args[6])
                return AffineInfo(node, bn.args[0], scale, shift, extra_nodes=(bn,))
        return _scalar_affine(node)
    if node.op == "call_method" and node.target in ("mul", "div", "add", "sub", "mul_", "div_", "add_", "sub_"):
        return _scalar_affine(node)
    return None


_SCALAR_OPS = {
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul", aten.mul.Tensor: "mul", aten.mul.Scalar: "mul",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div", aten.div.Tensor: "div", aten.div.Scalar: "div",
    operator.add: "add", operator.iadd: "add", aten.add.Scalar: "add", aten.add.Tensor: "add", torch.add: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub", aten.sub.Tensor: "sub", aten.sub.Scalar: "sub",
}


def _scalar_affine(node: torch.fx.Node) -> AffineInfo | None:
    kind = _SCALAR_OPS.get(node.target) if node.op == "call_function" else node.target.rstrip("_")
    if kind is None or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if isinstance(a, torch.fx.Node) and isinstance(b, (int, float)) and not isinstance(b, bool):
        x, c = a, float(b)
    elif isinstance(b, torch.fx.Node) and isinstance(a, (int, float)) and kind in ("mul", "add"):
        x, c = b, float(a)
    else:
        return None
    scale, shift = {"mul": (c, 0.0), "div": (1.0 / c if c else None, 0.0), "add": (1.0, c), "sub": (1.0, -c)}[kind]
    if scale is None:
        return None
    return AffineInfo(node, x, scale, shift, kind=kind)


def is_transparent(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    """Ops that are the identity in eval mode."""
    if node.op == "call_module":
        module = modules_of(gm).get(node.target)
        if isinstance(module, _TRANSPARENT_MODULES):
            return True
        return type(module).__name__ in _TRANSPARENT_MODULE_NAMES and not module.training
    if node.op == "call_function":
        if node.target in _TRANSPARENT_FUNCTIONS:
            if node.target in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout):
                return not _arg(node, 2, "training", False)
            if node.target in _ATEN_DROPOUTS or node.target is torch.dropout:
                return not _arg(node, 2, "train", False)
            return True
        return False
    if node.op == "call_method":
        return node.target in _TRANSPARENT_METHODS and not node.kwargs
    return False


def join_info(node: torch.fx.Node) -> tuple[str, tuple[torch.fx.Node, ...], str | None] | None:
    """``(kind, operands, problem)`` if ``node`` joins several tensors, else ``None``."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS or node.op == "call_method" and node.target in ("add", "add_", "__add__", "__iadd__"):
        operands = node.args[:2]
        if len(operands) != 2 or not all(isinstance(a, torch.fx.Node) for a in operands):
            return None
        problem = None
        alpha = node.kwargs.get("alpha", 1)
        if alpha != 1:
            problem = f"add with alpha={alpha}"
        shapes = [a.meta.get("fxmerge_shape") for a in operands]
        if None not in shapes and shapes[0] != shapes[1]:
            problem = f"add broadcasts {shapes[0]} with {shapes[1]}"
        return "add", tuple(operands), problem
    if node.op == "call_function" and node.target in _CAT_FUNCTIONS:
        tensors = _arg(node, 0, "tensors")
        dim = _arg(node, 1, "dim", 0)
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.fx.Node) for t in tensors):
            return None
        shape = node.meta.get("fxmerge_shape")
        problem = None
        if dim != 1 and (shape is None or dim != 1 - len(shape)):
            problem = f"cat along dim {dim}, not the channel dim"
        return "cat", tuple(tensors), problem
    return None


def parameter_slots(node: torch.fx.Node) -> set | None:
    """Argument slots of ``node`` that hold parameters (for lifting placeholders)."""
    if node.op != "call_function":
        return None
    target = node.target
    if target in _CONV_FUNCTIONS or target in _ATEN_CONV or target is aten.convolution.default:
        return {1, 2, "weight", "bias"}
    if target is F.batch_norm:
        return {1, 2, 3, 4, "running_mean", "running_var", "weight", "bias"}
    if target in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
        return {1, 2, 3, 4}
    if target in (F.prelu, aten.prelu.default):
        return {1, "weight"}
    return None


# ------------------------------------------------------------------ the pass
@dataclass(frozen=True)
class Matched:
    """Units, joins and positions of one graph, with the nodes behind them."""

    units: tuple[Unit, ...]
    joins: tuple[Join, ...]
    positions: tuple[Position, ...]
    rejections: tuple[Rejection, ...]
    convs: dict  # unit id -> ConvInfo
    affines: dict  # unit or join id -> tuple[AffineInfo, ...]


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "float32"


def _extend(start: torch.fx.Node, gm: torch.fx.GraphModule):
    """Affines and an activation after ``start`` while each tensor has one user."""
    modules = modules_of(gm)
    affines: list[AffineInfo] = []
    activation_node, activation = None, None
    current = start
    while True:
        users = list(current.users)
        if len(users) != 1:
            break
        user = users[0]
        if is_transparent(user, gm):
            current = user
            continue
        if activation_node is None:
            info = affine_info(user, gm)
            if info is not None and info.input is current:
                if info.extra_nodes:
                    # native BN: the getitem is the affine node, the BN node its producer
                    pass
                affines.append(info)
                current = info.node
                continue
            if user.op == "call_function" and user.target is aten._native_batch_norm_legit_no_training.default:
                getitems = [u for u in user.users if u.args[1] == 0]
                if len(getitems) == 1:
                    info = affine_info(getitems[0], gm)
                    if info is not None:
                        affines.append(info)
                        current = info.node
                        continue
            name = _activation_name(user, modules)
            if name is not None and user.args and user.args[0] is current:
                activation_node, activation = user, name
                current = user
                continue
        break
    return affines, activation_node, activation, current


def _activation_name(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """``activations.classify``, with ``hardtanh(0, 6)`` named ``relu6``.

    ``nn.ReLU6`` reaches a ``torch.compile`` graph as ``F.hardtanh(x, 0.0, 6.0)`` and a
    ``torch.export`` graph as ``aten.hardtanh_(x, 0.0, 6.0)``; naming it the same in
    every form keeps span graphs (and latency signatures) identical across forms.
    """
    name = activations.classify(node, modules)
    if name != "hardtanh":
        return name
    if node.op == "call_module":
        module = modules.get(node.target)
        bounds = (getattr(module, "min_val", None), getattr(module, "max_val", None))
    else:
        bounds = (_arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0))
    return "relu6" if bounds == (0.0, 6.0) else name


def _claim(claimed: dict, owner: str, node, affines, activation_node) -> None:
    """Record that ``node``, its affines (and their helper nodes) and its activation belong to ``owner``."""
    claimed[node] = owner
    for affine in affines:
        claimed[affine.node] = owner
        for extra in affine.extra_nodes:
            claimed[extra] = owner
    if activation_node is not None:
        claimed[activation_node] = owner


def match(gm: torch.fx.GraphModule, exclude: tuple[str, ...] = ()) -> Matched:
    """Label the units, joins, positions and boundaries of a captured graph."""
    modules = modules_of(gm)
    nodes = list(gm.graph.nodes)
    convs: dict[str, ConvInfo] = {}
    unit_parts: list[tuple[str, ConvInfo, list[AffineInfo], torch.fx.Node | None, str | None, torch.fx.Node]] = []
    join_parts: list = []
    claimed: dict[torch.fx.Node, str] = {}
    rejections: list[Rejection] = []
    path_counts: dict[str, int] = {}
    label_counts: dict[str, int] = {}

    def stable_id(prefix: str, node: torch.fx.Node) -> str:
        """``prefix:module.path`` (``#k`` for the k-th such node in one module), the same in every form."""
        label = _label(node)
        label = f"{prefix}:{label}" if label else (prefix if prefix != "src" else f"src:{node.name}")
        count = label_counts.get(label, 0)
        label_counts[label] = count + 1
        return label if count == 0 else f"{label}#{count}"

    for node in nodes:
        if node in claimed:
            continue
        info = conv_info(node, gm)
        if info is not None:
            if info.transposed or info.dims not in (1, 2):
                rejections.append(Rejection(node.name, info.problem or "unsupported convolution"))
                continue
            count = path_counts.get(info.path, 0)
            path_counts[info.path] = count + 1
            unit_id = info.path if count == 0 else f"{info.path}#{count}"
            affines, act_node, act, last = _extend(node, gm)
            convs[unit_id] = info
            unit_parts.append((unit_id, info, affines, act_node, act, last))
            _claim(claimed, unit_id, node, affines, act_node)
            continue
        joined = join_info(node)
        if joined is not None:
            kind, operands, problem = joined
            affines, act_node, act, last = _extend(node, gm)
            join_id = stable_id(kind, node)
            join_parts.append((join_id, kind, node, operands, problem, affines, act_node, act, last))
            _claim(claimed, join_id, node, affines, act_node)

    output_nodes: dict[torch.fx.Node, tuple[str, str]] = {}
    for unit_id, _, _, _, _, last in unit_parts:
        output_nodes[last] = ("unit", unit_id)
    for part in join_parts:
        output_nodes[part[-1]] = ("join", part[0])

    positions: dict[str, dict] = {}
    source_ids: dict[torch.fx.Node, str] = {}

    def resolve(node: torch.fx.Node) -> str:
        """The position a consumer of ``node`` reads (through transparent ops)."""
        while node not in output_nodes and is_transparent(node, gm) and node.args and isinstance(node.args[0], torch.fx.Node):
            node = node.args[0]
        if node in output_nodes:
            return output_nodes[node][1]
        if node not in source_ids:
            source_ids[node] = stable_id("src", node)
            positions[source_ids[node]] = {"kind": "source", "node": node, "activation": None}
        return source_ids[node]

    units: list[Unit] = []
    for unit_id, info, affines, act_node, act, last in unit_parts:
        input_position = resolve(info.input)
        problem = info.problem
        if problem is None and any(unit_id == e or unit_id.startswith(e + ".") or unit_id.startswith(e + "#") for e in exclude):
            problem = "excluded by the user"
        input_shape = info.input.meta.get("fxmerge_shape")
        dims = info.dims
        weight_shape = tuple(info.weight.shape)
        padding = info.padding if not isinstance(info.padding, str) else (0,) * dims
        spec = ConvSpec(
            dims=dims, in_channels=weight_shape[1] * info.groups, out_channels=weight_shape[0],
            kernel_size=weight_shape[2:], stride=info.stride, padding=padding, dilation=info.dilation,
            groups=info.groups, bias=info.bias is not None or bool(affines), activation=act,
            input_shape=tuple(input_shape) if input_shape else (), dtype=_dtype_name(info.node.meta.get("fxmerge_dtype")),
        )
        reducible = (
            problem is None
            and spec.in_channels == spec.out_channels
            and all(s == 1 for s in spec.stride)
            and all(2 * p == d * (k - 1) for p, d, k in zip(padding, spec.dilation, spec.kernel_size))
        )
        units.append(
            Unit(
                id=unit_id, conv_node=info.node.name, affine_nodes=tuple(a.node.name for a in affines),
                activation_node=act_node.name if act_node is not None else None, activation=act, conv=spec,
                input_position=input_position, output_position=unit_id, reducible=reducible, ineligible=problem,
            )
        )
        positions[unit_id] = {"kind": "unit", "node": last, "activation": act}

    joins: list[Join] = []
    for join_id, kind, node, operands, problem, affines, act_node, act, last in join_parts:
        operand_positions = tuple(resolve(o) for o in operands)
        if problem is None and len(set(operand_positions)) != len(operand_positions):
            problem = "the same tensor enters the join twice"
        joins.append(
            Join(
                id=join_id, kind=kind, node=node.name, affine_nodes=tuple(a.node.name for a in affines),
                activation_node=act_node.name if act_node is not None else None, activation=act,
                operands=operand_positions, output_position=join_id, ineligible=problem,
            )
        )
        positions[join_id] = {"kind": "join", "node": last, "activation": act}

    # positions read by anything outside units and joins must stay materialised
    consumers: dict[str, list[str]] = {pid: [] for pid in positions}
    for unit in units:
        consumers[unit.input_position].append(unit.id)
    for join in joins:
        for operand in join.operands:
            consumers[operand].append(join.id)
    order = {n: k for k, n in enumerate(nodes)}
    position_list: list[Position] = []
    for pid, data in sorted(positions.items(), key=lambda kv: order[kv[1]["node"]]):
        node = data["node"]
        pinned = _outside_use(node, gm, claimed, output_nodes)
        position_list.append(
            Position(
                id=pid, index=len(position_list), kind=data["kind"], node=node.name, activation=data["activation"],
                shape=tuple(node.meta.get("fxmerge_shape") or ()), pinned=pinned,
            )
        )

    for node in nodes:
        if node in claimed or node.op in ("placeholder", "get_attr", "output") or is_transparent(node, gm):
            continue
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in claimed:
            continue
        if _is_output_container(node):
            continue
        rejections.append(Rejection(node.name, _boundary_reason(node, gm, modules)))
    for unit in units:
        if unit.ineligible:
            rejections.append(Rejection(unit.conv_node, unit.ineligible))
    for join in joins:
        if join.ineligible:
            rejections.append(Rejection(join.node, join.ineligible))

    affine_map = {unit_id: tuple(affines) for unit_id, _, affines, _, _, _ in unit_parts}
    affine_map.update({part[0]: tuple(part[5]) for part in join_parts})
    return Matched(tuple(units), tuple(joins), tuple(position_list), tuple(rejections), convs, affine_map)


def _label(node: torch.fx.Node) -> str:
    """A readable label that is the same in every graph form, or ``""``.

    A module call is labelled with its module path, any other op with the path of
    the module whose forward ran it (``nn_module_stack``; ``""`` at the top level),
    and a graph input with the name of the ``forward`` argument (``torch.compile``
    calls ``x`` ``l_x_``). Node names are never part of a label: they differ between
    ``symbolic_trace``, ``torch.compile`` and ``torch.export``.
    """
    if node.op == "call_module":
        return node.target
    if node.op == "placeholder":
        local = re.fullmatch(r"[lL]_(\w+?)_", node.name)
        return local.group(1) if local and "example_value" in node.meta else node.name
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        path = path[0] if isinstance(path, tuple) else path
        return _clean_path(str(path))
    return ""


def _clean_path(path: str) -> str:
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = path.replace("._modules.", ".").strip(".")
    return path


def _is_output_container(node: torch.fx.Node) -> bool:
    """A namedtuple built only to be returned (``symbolic_trace`` records its constructor)."""
    if node.op != "call_function" or not isinstance(node.target, type) or not issubclass(node.target, tuple):
        return False
    return all(user.op == "output" or _is_output_container(user) for user in node.users)


def _outside_use(node: torch.fx.Node, gm, claimed: dict, output_nodes: dict) -> str | None:
    """Why a position's tensor must stay materialised, or ``None``."""
    pending = list(node.users)
    while pending:
        user = pending.pop()
        if user.op == "output" or _is_output_container(user):
            return "a model output"
        if is_transparent(user, gm) and user not in claimed:
            pending.extend(user.users)
            continue
        if conv_info(user, gm) is not None and user in claimed:
            continue
        if user in claimed and join_info(user) is not None:
            continue
        return f"read by {user.name} (outside every span)"
    return None


def _boundary_reason(node: torch.fx.Node, gm, modules) -> str:
    if node.op == "call_module":
        module = modules.get(node.target)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training:
                return "BatchNorm in training mode"
            return "BatchNorm not directly after a conv or join"
        if activations.classify(node, modules) is not None:
            return "activation not directly after a conv or join"
        leaves = getattr(gm, "_fxmerge_leaves", None) or {}
        if node.target in leaves:
            return leaves[node.target]
        if isinstance(module, torch.fx.GraphModule):
            return "untraceable submodule kept whole"
        return f"{type(module).__name__} is not a conv, affine, activation, join or identity op"
    if activations.classify(node, modules) is not None:
        return "activation not directly after a conv or join"
    if affine_info(node, gm) is not None:
        return "affine op not directly after a conv or join"
    if isinstance(node.target, torch._ops.OpOverload):
        target = node.target.overloadpacket.__name__  # aten.max_pool2d.default -> max_pool2d
    else:
        target = getattr(node.target, "__name__", str(node.target))
    return f"{target} is not a conv, affine, activation, join or identity op"
