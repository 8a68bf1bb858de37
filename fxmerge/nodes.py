"""What one FX node computes, in any of the three graph forms fxmerge accepts.

Passes decide by op kind, never by module path: a conv is an ``nn.Conv*`` module
call, ``F.conv*`` / ``torch.conv*``, or ``aten.conv*`` / ``aten.convolution``; an
eval BatchNorm is a module, ``F.batch_norm``, ``aten.batch_norm`` or
``_native_batch_norm_legit_no_training`` behind a ``getitem``; and so on. The
recognisers here read a node and return a small record, or ``None``:

* :func:`conv_site` — a convolution call site, its input and its :class:`ConvParams`;
* :func:`affine_site` — a per-channel affine that folds into a conv (eval BatchNorm,
  a constant scale or shift);
* :func:`join_site` — an ``add`` of two tensors or a ``cat`` along channels;
* :func:`is_transparent` — the identity in eval mode (dropout, ``Identity``,
  stochastic depth, ``clone``, ``contiguous``);
* :func:`activation_name` — a registered activation (``fxmerge.activations``);
* :func:`is_add`, :func:`is_mul`, :func:`is_in_place` — elementwise ``+`` / ``*`` in any
  spelling, and whether an op writes into its input;
* :func:`is_nearest_upsample` — nearest-neighbour upsampling (module, ``F.interpolate``,
  ``aten.upsample_nearest*``);
* :func:`is_matrix_product` — ``bmm`` / ``matmul`` / ``einsum`` / scaled dot-product attention;
* :func:`parameter_slots` — which arguments of a functional op hold parameters.

Patterns spanning several nodes (SiLU written ``x * sigmoid(x)``, normalised
activations, per-sample side biases) are in ``fxmerge.patterns``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxmerge import activations
from fxmerge.fxutil import arg, fetch, ints, shape_of, submodule
from fxmerge.kernels import ConvParams, batchnorm_scale_shift

aten = torch.ops.aten

_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, torch.conv1d: 1, torch.conv2d: 2}
_ATEN_CONV = {aten.conv1d.default: 1, aten.conv2d.default: 2}
for _packet, _dims in ((aten.conv1d, 1), (aten.conv2d, 2)):
    if hasattr(_packet, "padding"):
        _ATEN_CONV[_packet.padding] = _dims
_NATIVE_BN = aten._native_batch_norm_legit_no_training.default
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
_MUL_FUNCTIONS = {operator.mul, torch.mul, aten.mul.Tensor}
_MUL_METHODS = {"mul", "__mul__", "__rmul__"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, aten.cat.default}
_EVAL_DROPOUT = {F.dropout: 2, F.dropout1d: 2, F.dropout2d: 2, F.dropout3d: 2, F.alpha_dropout: 2}
_ATEN_DROPOUT = {
    torch.dropout,
    aten.dropout.default,
    aten.dropout_.default,
    aten.feature_dropout.default,
    aten.feature_dropout_.default,
}
_IDENTITY_FUNCTIONS = {torch.clone, aten.clone.default, aten.alias.default, F.feature_alpha_dropout}
_TRANSPARENT_METHODS = {"clone", "contiguous"}
_TRANSPARENT_MODULES: tuple[type, ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
)
_TRANSPARENT_MODULE_NAMES = {"DropPath", "StochasticDepth", "DropBlock2d"}

try:  # torchvision's stochastic depth is the identity in eval mode
    from torchvision.ops import StochasticDepth, stochastic_depth

    _TRANSPARENT_MODULES = (*_TRANSPARENT_MODULES, StochasticDepth)
    _IDENTITY_FUNCTIONS.add(stochastic_depth)
except ImportError:  # pragma: no cover
    pass


# ------------------------------------------------------------------ convs
@dataclass(frozen=True)
class ConvSite:
    """One convolution call site: the node, its input, and the conv it applies.

    ``padding`` is kept apart from ``params`` because it may be a string (``"same"``),
    which ``params.padding`` (ints) cannot hold; ``path`` is the module path of the
    weight's owner (``layer1.0.conv1``), the same in every graph form.
    """

    node: torch.fx.Node
    input: torch.fx.Node
    params: ConvParams
    padding: tuple[int, ...] | str
    path: str

    @property
    def dims(self) -> int:
        return self.params.dims

    @property
    def problem(self) -> str | None:
        """Why this conv cannot be merged with others, or ``None``."""
        if self.params.transposed:
            return "transposed convolution (upsamples; it cannot be merged)"
        if self.params.padding_mode != "zeros":
            return f"padding_mode={self.params.padding_mode!r}: only zero padding can be moved in front of a span"
        if isinstance(self.padding, str):
            return f"padding={self.padding!r}: string padding is resolved by the runtime, not representable here"
        if self.dims not in (1, 2):
            return f"{self.dims}-d convolution: fxmerge merges Conv1d and Conv2d"
        return None


def conv_site(node: torch.fx.Node, gm: torch.fx.GraphModule) -> ConvSite | None:
    """Describe ``node`` if it is a convolution, in any of the three graph shapes."""
    if node.op == "call_module":
        module = submodule(gm, node.target)
        if isinstance(module, nn.modules.conv._ConvNd):
            return _module_conv(node, module)
        return None
    if node.op != "call_function":
        return None
    if node.target in _CONV_FUNCTIONS or node.target in _ATEN_CONV:
        return _functional_conv(node, gm)
    if node.target is aten.convolution.default:
        return _aten_convolution(node, gm)
    return None


def _module_conv(node: torch.fx.Node, module: nn.modules.conv._ConvNd) -> ConvSite:
    dims = module.weight.dim() - 2
    padding = module.padding if isinstance(module.padding, str) else ints(module.padding, dims)
    params = ConvParams(
        weight=module.weight,
        bias=module.bias,
        stride=ints(module.stride, dims),
        padding=(0,) * dims if isinstance(padding, str) else padding,
        dilation=ints(module.dilation, dims),
        groups=module.groups,
        padding_mode=module.padding_mode,
        transposed=module.transposed,
    )
    return ConvSite(node, node.args[0], params, padding, node.target)


def _functional_conv(node: torch.fx.Node, gm: torch.fx.GraphModule) -> ConvSite | None:
    weight = fetch(gm, arg(node, 1, "weight"))
    if not isinstance(weight, torch.Tensor):
        return None
    dims = weight.dim() - 2
    padding = arg(node, 4, "padding", 0)
    padding = padding if isinstance(padding, str) else ints(padding, dims)
    params = ConvParams(
        weight=weight,
        bias=fetch(gm, arg(node, 2, "bias")),
        stride=ints(arg(node, 3, "stride", 1), dims),
        padding=(0,) * dims if isinstance(padding, str) else padding,
        dilation=ints(arg(node, 5, "dilation", 1), dims),
        groups=int(arg(node, 6, "groups", 1)),
    )
    return ConvSite(node, node.args[0], params, padding, _weight_owner(arg(node, 1, "weight")) or node.name)


def _aten_convolution(node: torch.fx.Node, gm: torch.fx.GraphModule) -> ConvSite | None:
    weight = fetch(gm, node.args[1])
    if not isinstance(weight, torch.Tensor):
        return None
    dims = weight.dim() - 2
    padding = ints(node.args[4], dims)
    params = ConvParams(
        weight=weight,
        bias=fetch(gm, node.args[2]),
        stride=ints(node.args[3], dims),
        padding=padding,
        dilation=ints(node.args[5], dims),
        groups=int(node.args[8]),
        transposed=bool(node.args[6]),
    )
    return ConvSite(node, node.args[0], params, padding, _weight_owner(node.args[1]) or node.name)


def _weight_owner(node) -> str | None:
    """``layer1.0.conv1`` for a ``get_attr`` of ``layer1.0.conv1.weight``."""
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        path = node.target
        for suffix in (".weight", "_weight"):
            if path.endswith(suffix):
                return path[: -len(suffix)]
        return path
    return None


# ------------------------------------------------------------------ affines
@dataclass(frozen=True)
class AffineSite:
    """A per-channel ``x * scale + shift`` that folds into the conv before it (eval only).

    ``node`` is the node whose output is the affine result; ``helpers`` are nodes that
    belong to it without being it (the native BatchNorm behind a ``getitem``).
    """

    node: torch.fx.Node
    input: torch.fx.Node
    scale: torch.Tensor | float
    shift: torch.Tensor | float
    helpers: tuple[torch.fx.Node, ...] = ()
    kind: str = "batchnorm"


def affine_site(node: torch.fx.Node, gm: torch.fx.GraphModule) -> AffineSite | None:
    """Describe ``node`` if it is a per-channel affine that folds into a conv (eval only).

    A native BatchNorm node itself is described through its only ``getitem(0)``.
    """
    if node.op == "call_module":
        return _batchnorm_module(node, submodule(gm, node.target))
    if node.op == "call_function":
        if node.target is F.batch_norm or node.target is aten.batch_norm.default:
            return _functional_batchnorm(node, gm)
        if node.target is _NATIVE_BN:
            getitems = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
            return affine_site(getitems[0], gm) if len(getitems) == 1 else None
        if node.target is operator.getitem and node.args[1] == 0 and isinstance(node.args[0], torch.fx.Node):
            bn = node.args[0]
            if bn.op == "call_function" and bn.target is _NATIVE_BN:
                scale, shift = _bn(gm, bn.args[3], bn.args[4], bn.args[1], bn.args[2], bn.args[6])
                return AffineSite(node, bn.args[0], scale, shift, helpers=(bn,))
        return _constant_affine(node, gm)
    if node.op == "call_method" and node.target in ("mul", "div", "add", "sub", "mul_", "div_", "add_", "sub_"):
        return _constant_affine(node, gm)
    return None


def _bn(gm, mean, var, weight, bias, eps):
    return batchnorm_scale_shift(fetch(gm, mean), fetch(gm, var), fetch(gm, weight), fetch(gm, bias), eps)


def _batchnorm_module(node: torch.fx.Node, module) -> AffineSite | None:
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(module, nn.SyncBatchNorm):
        return None
    if module.training or module.running_mean is None:
        return None
    scale, shift = batchnorm_scale_shift(
        module.running_mean, module.running_var, module.weight, module.bias, module.eps
    )
    return AffineSite(node, node.args[0], scale, shift)


def _functional_batchnorm(node: torch.fx.Node, gm: torch.fx.GraphModule) -> AffineSite | None:
    if node.target is F.batch_norm:
        if arg(node, 5, "training", False):
            return None
        slots = (
            arg(node, 1, "running_mean"),
            arg(node, 2, "running_var"),
            arg(node, 3, "weight"),
            arg(node, 4, "bias"),
            arg(node, 7, "eps", 1e-5),
        )
    else:  # aten.batch_norm(input, weight, bias, mean, var, training, momentum, eps, cudnn)
        if node.args[5]:
            return None
        slots = (node.args[3], node.args[4], node.args[1], node.args[2], node.args[7])
    if not isinstance(fetch(gm, slots[0]), torch.Tensor) or not isinstance(fetch(gm, slots[1]), torch.Tensor):
        return None
    scale, shift = _bn(gm, *slots)
    return AffineSite(node, node.args[0], scale, shift)


_SCALAR_OPS = {
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    aten.mul.Tensor: "mul",
    aten.mul.Scalar: "mul",
    operator.truediv: "div",
    operator.itruediv: "div",
    torch.div: "div",
    aten.div.Tensor: "div",
    aten.div.Scalar: "div",
    operator.add: "add",
    operator.iadd: "add",
    aten.add.Scalar: "add",
    aten.add.Tensor: "add",
    torch.add: "add",
    operator.sub: "sub",
    operator.isub: "sub",
    torch.sub: "sub",
    aten.sub.Tensor: "sub",
    aten.sub.Scalar: "sub",
}


def _constant_affine(node: torch.fx.Node, gm: torch.fx.GraphModule) -> AffineSite | None:
    """``x * c``, ``x / c``, ``x + c``, ``x - c`` (and ``c * x``, ``c + x``) with a constant ``c``:
    a Python number, or a constant tensor of one value or one value per channel of ``x``."""
    kind = _SCALAR_OPS.get(node.target) if node.op == "call_function" else node.target.rstrip("_")
    if kind is None or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    x = c = None
    if isinstance(a, torch.fx.Node):
        x, c = a, _per_channel_constant(gm, b, a)
    if c is None and isinstance(b, torch.fx.Node) and kind in ("mul", "add"):
        x, c = b, _per_channel_constant(gm, a, b)
    if c is None or (kind == "div" and bool((torch.as_tensor(c) == 0).any())):
        return None
    scale, shift = {"mul": (c, 0.0), "div": (1.0 / c, 0.0), "add": (1.0, c), "sub": (1.0, -c)}[kind]
    return AffineSite(node, x, scale, shift, kind=kind)


def _per_channel_constant(gm: torch.fx.GraphModule, value, x: torch.fx.Node) -> float | torch.Tensor | None:
    """``value`` as a scalar or a per-channel vector of ``x``'s channels, if it is a constant."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, torch.fx.Node) and value.op != "get_attr":
        return None
    tensor = fetch(gm, value)
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        return None
    tensor = tensor.detach().to(torch.float64)
    if tensor.numel() == 1:
        return float(tensor.reshape(()))
    shape = shape_of(x)
    if shape is None:  # inside a linearized span (padded: shapes forgotten), the constant's own shape decides
        per_channel = tensor.dim() >= 2 and tensor.shape[0] == 1 and all(size == 1 for size in tensor.shape[2:])
        return tensor.reshape(-1) if per_channel else None
    if len(shape) < 2 or tensor.dim() > len(shape):
        return None
    padded = (1,) * (len(shape) - tensor.dim()) + tuple(tensor.shape)
    if padded[1] != shape[1] or any(size != 1 for k, size in enumerate(padded) if k != 1):
        return None
    return tensor.reshape(-1)


# ------------------------------------------------------------------ joins
@dataclass(frozen=True)
class JoinSite:
    """An ``add`` of two tensors or a ``cat`` along channels; ``problem`` says why it cannot merge."""

    node: torch.fx.Node
    kind: str  # "add" | "cat"
    operands: tuple[torch.fx.Node, ...]
    problem: str | None


def join_site(node: torch.fx.Node, shape_of) -> JoinSite | None:
    """Describe ``node`` if it joins several tensors; ``shape_of(node)`` reads a node's shape."""
    if is_add(node):
        operands = node.args[:2]
        if len(operands) != 2 or not all(isinstance(a, torch.fx.Node) for a in operands):
            return None
        problem = None
        alpha = node.kwargs.get("alpha", 1)
        shapes = [shape_of(a) for a in operands]
        if alpha != 1:
            problem = f"add with alpha={alpha}"
        elif None not in shapes and shapes[0] != shapes[1]:
            problem = f"add broadcasts {shapes[0]} with {shapes[1]}"
        return JoinSite(node, "add", tuple(operands), problem)
    if node.op == "call_function" and node.target in _CAT_FUNCTIONS:
        tensors, dim = arg(node, 0, "tensors"), arg(node, 1, "dim", 0)
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.fx.Node) for t in tensors):
            return None
        shape = shape_of(node)
        problem = None
        if dim != 1 and (shape is None or dim != 1 - len(shape)):
            problem = f"cat along dim {dim}, not the channel dim"
        return JoinSite(node, "cat", tuple(tensors), problem)
    return None


def is_add(node: torch.fx.Node) -> bool:
    """``a + b`` in any spelling (``+``, ``+=``, ``torch.add``, ``Tensor.add(_)``, ``aten.add(_)``)."""
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )


def is_mul(node: torch.fx.Node) -> bool:
    """``a * b`` (out of place) in any spelling."""
    return (node.op == "call_function" and node.target in _MUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in _MUL_METHODS
    )


def is_in_place(node: torch.fx.Node) -> bool:
    """Whether a function, method or ATen op writes into its first argument (``relu_``, ``sigmoid_``)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__.endswith("_")
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


# ------------------------------------------------------------------ resampling, attention
_NEAREST_PACKETS = {getattr(aten, f"upsample_nearest{d}d", None) for d in (1, 2, 3)} - {None}
_MATMUL_FUNCTIONS = {torch.bmm, torch.matmul, torch.mm, torch.baddbmm, torch.einsum, operator.matmul}
_MATMUL_METHODS = {"bmm", "matmul", "mm", "baddbmm", "__matmul__"}
_MATMUL_PACKETS = {
    getattr(aten, name, None)
    for name in (
        "bmm",
        "mm",
        "matmul",
        "baddbmm",
        "einsum",
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
} - {None}


def is_nearest_upsample(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    """Nearest-neighbour upsampling: ``nn.Upsample(mode="nearest")``, ``F.interpolate`` (its default
    mode), ``aten.upsample_nearest*``."""
    if node.op == "call_module":
        module = submodule(gm, node.target)
        return isinstance(module, nn.Upsample) and module.mode == "nearest"
    if node.op != "call_function":
        return False
    if node.target in (F.interpolate, F.upsample):
        return arg(node, 3, "mode", "nearest") == "nearest"
    return node.target is F.upsample_nearest or getattr(node.target, "overloadpacket", None) in _NEAREST_PACKETS


def is_matrix_product(node: torch.fx.Node) -> bool:
    """A product of matrices (``bmm``, ``matmul``, ``einsum``, scaled dot-product attention)."""
    if node.op == "call_method":
        return node.target in _MATMUL_METHODS
    if node.op != "call_function":
        return False
    if node.target in _MATMUL_FUNCTIONS or node.target is F.scaled_dot_product_attention:
        return True
    return getattr(node.target, "overloadpacket", None) in _MATMUL_PACKETS


# ------------------------------------------------------------------ the rest
def is_transparent(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    """Ops that are the identity in eval mode."""
    if node.op == "call_module":
        module = submodule(gm, node.target)
        if isinstance(module, _TRANSPARENT_MODULES):
            return True
        return type(module).__name__ in _TRANSPARENT_MODULE_NAMES and not module.training
    if node.op == "call_function":
        if node.target in _EVAL_DROPOUT:
            return not arg(node, _EVAL_DROPOUT[node.target], "training", False)
        if node.target in _ATEN_DROPOUT:
            return not arg(node, 2, "train", False)
        return node.target in _IDENTITY_FUNCTIONS
    if node.op == "call_method":
        return node.target in _TRANSPARENT_METHODS and not node.kwargs
    return False


def activation_name(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str | None:
    """The registered activation ``node`` computes, with ``hardtanh(0, 6)`` named ``relu6``.

    ``nn.ReLU6`` reaches a ``torch.compile`` graph as ``F.hardtanh(x, 0.0, 6.0)`` and a
    ``torch.export`` graph as ``aten.hardtanh_(x, 0.0, 6.0)``; naming it the same in
    every form keeps span graphs (and latency signatures) identical across forms.
    """
    module = submodule(gm, node.target) if node.op == "call_module" else None
    name = activations.classify(node, module)
    if name != "hardtanh":
        return name
    if module is not None:
        bounds = (getattr(module, "min_val", None), getattr(module, "max_val", None))
    else:
        bounds = (arg(node, 1, "min_val", -1.0), arg(node, 2, "max_val", 1.0))
    return "relu6" if bounds == (0.0, 6.0) else name


def parameter_slots(node: torch.fx.Node) -> set | None:
    """Argument slots of a functional op that hold parameters (for lifting placeholders)."""
    if node.op != "call_function":
        return None
    target = node.target
    if target in _CONV_FUNCTIONS or target in _ATEN_CONV or target is aten.convolution.default:
        return {1, 2, "weight", "bias"}
    if target is F.batch_norm:
        return {1, 2, 3, 4, "running_mean", "running_var", "weight", "bias"}
    if target in (aten.batch_norm.default, _NATIVE_BN):
        return {1, 2, 3, 4}
    if target in (F.prelu, aten.prelu.default):
        return {1, "weight"}
    return None


_SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad", "is_sparse"}
_SHAPE_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "get_device", "is_contiguous"}
_SHAPE_FUNCTIONS = {torch.numel, aten.sym_numel.default, aten.dim.default, aten.sym_storage_offset.default}
for _name in ("sym_size", "sym_stride"):
    _packet = getattr(aten, _name, None)
    if _packet is not None:
        _SHAPE_FUNCTIONS.update(getattr(_packet, o) for o in _packet.overloads())


def is_shape_reader(node: torch.fx.Node) -> bool:
    """Whether ``node`` reads only the shape, dtype or device of its tensor input, never its values.

    ``x.shape``, ``x.ndim``, ``x.size()``, ``x.dim()``, ``aten.sym_size``... Such
    readers (and the comparisons and asserts built on what they return) do not use
    the tensor: they never split a unit nor pin a position.
    """
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _SHAPE_ATTRIBUTES
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    return node.op == "call_function" and node.target in _SHAPE_FUNCTIONS


_SIZE_ATTRIBUTES = {"shape"}
_SIZE_METHODS = {"size", "numel", "nelement"}


def reads_size(node: torch.fx.Node) -> bool:
    """A shape reader whose answer depends on sizes (``x.shape``, ``x.size(1)``, ``x.numel()``),
    not only on rank, dtype or device."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _SIZE_ATTRIBUTES
    if node.op == "call_method":
        return node.target in _SIZE_METHODS
    return node.op == "call_function" and node.target in _SHAPE_FUNCTIONS and node.target is not aten.dim.default


def value_readers(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The users of ``node`` that read its values (shape-only readers left out)."""
    return [user for user in node.users if not is_shape_reader(user)]


def is_native_batchnorm(node: torch.fx.Node) -> bool:
    """The native BatchNorm node of an export graph (its ``getitem(0)`` is the affine)."""
    return node.op == "call_function" and node.target is _NATIVE_BN
