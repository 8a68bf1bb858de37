"""Patterns of several FX nodes that a unit's tail may hold, in any graph form.

``fxmerge.nodes`` recognises one node at a time; a unit's tail (what follows its
conv up to the position) can also hold patterns that span several nodes:

* :func:`activation_site` — the activation that reads a tensor: a registered
  activation, **SiLU written as a product** ``x * sigmoid(x)`` (either operand order;
  the ``sigmoid`` and the ``mul`` together are the activation ``silu``; the sigmoid
  must read the very tensor the product multiplies), or a **normalised activation**:
  a non-affine norm (GroupNorm, LayerNorm, InstanceNorm; module, functional and ATen
  forms, including ``native_group_norm`` / ``native_layer_norm`` behind a ``getitem``)
  followed by an activation, when the norm's input has no other value reader. A norm
  is not a per-channel affine, so it cannot fold into a conv: removing the position
  removes the norm with its activation (fine-tuning recovers).
* :func:`side_bias_site` — a **per-sample side bias**: ``h + b`` where ``b`` is
  ``(N, C, 1, …)`` (or ``(1, C, 1, …)``) broadcast onto ``h`` of ``(N, C, H, …)`` with
  some spatial size above 1, e.g. a diffusion time embedding. Inside a span it is exact: a later conv ``W`` maps a constant-in-space
  ``b`` to ``(Σ_spatial W)·b`` at every output, borders included once the span's
  padding is in front (``fxmerge.kernels``, ``LinearMap.sides``).
* :func:`side_producer` — the ``Linear`` whose ``(N, F)`` output ``b`` only reshapes
  to ``(N, F, 1, …)``: ``merge`` folds the map ``A`` a span applies to ``b`` into it
  (``W' = A·W``, ``b' = A·bias``) when nothing else reads it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxmerge.fxutil import arg, fetch, shape_of, submodule
from fxmerge.nodes import (
    activation_name,
    is_add,
    is_in_place,
    is_mul,
    is_transparent,
    value_readers,
)

aten = torch.ops.aten

_NORM_FUNCTIONS = {
    F.group_norm: "group_norm",
    torch.group_norm: "group_norm",
    aten.group_norm.default: "group_norm",
    F.layer_norm: "layer_norm",
    torch.layer_norm: "layer_norm",
    aten.layer_norm.default: "layer_norm",
    F.instance_norm: "instance_norm",
    torch.instance_norm: "instance_norm",
    aten.instance_norm.default: "instance_norm",
}
_NATIVE_NORMS = {aten.native_group_norm.default: "group_norm", aten.native_layer_norm.default: "layer_norm"}
_VIEW_FUNCTIONS = {
    torch.unsqueeze,
    torch.reshape,
    aten.unsqueeze.default,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
}
_VIEW_METHODS = {"unsqueeze", "view", "reshape"}


# ------------------------------------------------------------------ norms
@dataclass(frozen=True)
class NormSite:
    """A normalisation that is not a per-channel affine: ``node`` is its output."""

    node: torch.fx.Node
    input: torch.fx.Node
    kind: str  # "group_norm" | "layer_norm" | "instance_norm"
    helpers: tuple[torch.fx.Node, ...] = ()  # a native norm behind its getitem(0)


def norm_site(node: torch.fx.Node, gm: torch.fx.GraphModule) -> NormSite | None:
    """Describe ``node`` if it is a GroupNorm, LayerNorm or InstanceNorm that uses the input's statistics."""
    if node.op == "call_module":
        return _norm_module(node, submodule(gm, node.target))
    if node.op != "call_function":
        return None
    if node.target in _NORM_FUNCTIONS:
        kind = _NORM_FUNCTIONS[node.target]
        if kind == "instance_norm" and not arg(node, 5, "use_input_stats", True):
            return None  # running statistics: a per-channel affine, not a norm of the input
        source = arg(node, 0, "input")
        return NormSite(node, source, kind) if isinstance(source, torch.fx.Node) else None
    if node.target in _NATIVE_NORMS:  # described through its only used output, getitem(0)
        firsts = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        others = [u for u in node.users if u not in firsts and u.users]
        return (
            NormSite(firsts[0], node.args[0], _NATIVE_NORMS[node.target], (node,))
            if len(firsts) == 1 and not others
            else None
        )
    return None


def _norm_module(node: torch.fx.Node, module) -> NormSite | None:
    if isinstance(module, nn.GroupNorm):
        return NormSite(node, node.args[0], "group_norm")
    if isinstance(module, nn.LayerNorm):
        return NormSite(node, node.args[0], "layer_norm")
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        if module.track_running_stats and not module.training:
            return None
        return NormSite(node, node.args[0], "instance_norm")
    return None


# ------------------------------------------------------------------ activations
@dataclass(frozen=True)
class ActivationSite:
    """The activation reading ``input``: its name, its output node and all of its nodes in graph order.

    ``norm`` names the norm of a normalised activation (its nodes come first), else ``None``.
    """

    name: str
    input: torch.fx.Node
    output: torch.fx.Node
    nodes: tuple[torch.fx.Node, ...]
    norm: str | None = None


def activation_site(current: torch.fx.Node, gm: torch.fx.GraphModule) -> ActivationSite | None:
    """The activation that reads ``current`` (plain, SiLU as a product, or normalised), or ``None``."""
    readers = value_readers(current)
    if len(readers) == 1:
        norm = norm_site(readers[0], gm)
        if norm is not None and norm.input is current:
            between = _transparent_chain(norm.node, gm)  # GroupNorm → Identity → SiLU, as timm writes it
            act = _activation(between[-1] if between else norm.node, gm)
            if act is None:
                return None
            members = (*norm.helpers, norm.node, *between, *act.nodes)
            return ActivationSite(act.name, current, act.output, members, norm.kind)
    return _activation(current, gm)


def _transparent_chain(node: torch.fx.Node, gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The identity ops (in eval) that follow ``node``, each the only reader of the one before."""
    chain: list[torch.fx.Node] = []
    while True:
        readers = value_readers(chain[-1] if chain else node)
        if len(readers) != 1 or not is_transparent(readers[0], gm):
            return chain
        chain.append(readers[0])


def _activation(x: torch.fx.Node, gm: torch.fx.GraphModule) -> ActivationSite | None:
    readers = value_readers(x)
    if len(readers) == 2:
        return _silu_product(x, readers, gm)
    if len(readers) != 1:
        return None
    user = readers[0]
    name = activation_name(user, gm)
    if name is None or not user.args or user.args[0] is not x:
        return None
    return ActivationSite(name, x, user, (user,))


def _silu_product(x: torch.fx.Node, readers: list[torch.fx.Node], gm) -> ActivationSite | None:
    """``x * sigmoid(x)`` or ``sigmoid(x) * x``: the sigmoid reads ``x`` and only feeds the product."""
    sigmoids = [r for r in readers if activation_name(r, gm) == "sigmoid" and r.args and r.args[0] is x]
    if len(sigmoids) != 1 or (sigmoids[0].op != "call_module" and is_in_place(sigmoids[0])):
        return None
    sigmoid = sigmoids[0]
    product = next(r for r in readers if r is not sigmoid)
    if not is_mul(product) or product.kwargs or len(product.args) != 2 or value_readers(sigmoid) != [product]:
        return None
    if set(product.args) != {x, sigmoid}:
        return None
    return ActivationSite("silu", x, product, (sigmoid, product))


# ------------------------------------------------------------------ side biases
@dataclass(frozen=True)
class SideBiasSite:
    """``node = input + side`` with ``side`` one value per sample and channel (``(N, C, 1, …)``)."""

    node: torch.fx.Node
    input: torch.fx.Node
    side: torch.fx.Node


def side_bias_site(node: torch.fx.Node, current: torch.fx.Node) -> SideBiasSite | None:
    """Describe ``node`` if it adds a per-sample, per-channel tensor onto ``current``."""
    if not is_add(node) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args
    side = b if a is current else a if b is current else None
    if not isinstance(side, torch.fx.Node) or side is current:
        return None
    main, extra = shape_of(current), shape_of(side)
    if main is None or extra is None or len(main) < 3 or len(extra) != len(main) or shape_of(node) != main:
        return None
    if extra[0] not in (1, main[0]) or extra[1] != main[1] or any(s != 1 for s in extra[2:]):
        return None
    if all(s == 1 for s in main[2:]):
        return None  # nothing is broadcast (a 1×1 feature map): an ordinary add of two tensors
    return SideBiasSite(node, current, side)


@dataclass(frozen=True)
class LinearSite:
    """A ``Linear`` call: its node, its input and its parameters."""

    node: torch.fx.Node
    input: torch.fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None


def linear_site(node: torch.fx.Node, gm: torch.fx.GraphModule) -> LinearSite | None:
    """Describe ``node`` if it is an ``nn.Linear``, ``F.linear`` or ``aten.linear`` with constant parameters."""
    if node.op == "call_module":
        module = submodule(gm, node.target)
        if isinstance(module, nn.Linear):
            return LinearSite(node, node.args[0], module.weight, module.bias)
        return None
    if node.op == "call_function" and node.target in (F.linear, aten.linear.default):
        weight, bias = fetch(gm, arg(node, 1, "weight")), fetch(gm, arg(node, 2, "bias"))
        if isinstance(weight, torch.Tensor) and (bias is None or isinstance(bias, torch.Tensor)):
            return LinearSite(node, node.args[0], weight, bias)
    return None


def side_producer(side: torch.fx.Node, gm: torch.fx.GraphModule) -> tuple[LinearSite, int] | None:
    """The Linear whose ``(N, F)`` output ``side`` is, with ``k`` trailing singleton dims added by
    view-like ops (``[:, :, None, None]``, ``unsqueeze``, ``view``), each node read only once; or ``None``."""
    shape = shape_of(side)
    if shape is None or len(shape) < 3 or any(s != 1 for s in shape[2:]) or len(value_readers(side)) != 1:
        return None
    node = side
    while True:
        linear = linear_site(node, gm)
        if linear is not None:
            return (linear, len(shape) - 2) if shape_of(node) == shape[:2] else None
        source = node.args[0] if node.args else None
        if (
            not isinstance(source, torch.fx.Node)
            or not _adds_singletons(node, source)
            or len(value_readers(source)) != 1
        ):
            return None
        node = source


def _whole_slice(node: torch.fx.Node) -> bool:
    """``aten.slice`` over a whole dimension (``x[:, :, None]`` exported with a dynamic batch keeps it).

    Its recorded output shape equals its input's; on the batch dimension, only an
    open-ended slice is whole at every batch size.
    """
    if not (node.op == "call_function" and node.target is aten.slice.Tensor):
        return False
    source = node.args[0] if node.args else None
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1 :])[:4]
    shape = shape_of(node)
    whole = isinstance(source, torch.fx.Node) and shape is not None and shape == shape_of(source)
    open_ended = end is None or (isinstance(end, int) and end >= 2**31)
    return whole and start in (0, None) and step in (1, None) and (dim != 0 or open_ended)


def _adds_singletons(node: torch.fx.Node, source: torch.fx.Node) -> bool:
    """A view-like op whose output is its input's shape followed by singleton dims."""
    view = (node.op == "call_function" and node.target in _VIEW_FUNCTIONS) or (
        node.op == "call_method" and node.target in _VIEW_METHODS
    )
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple):
        view = all(i is None or i is Ellipsis or i == slice(None) for i in node.args[1])
    view = view or _whole_slice(node)
    before, after = shape_of(source), shape_of(node)
    if not view or before is None or after is None or len(after) < len(before):
        return False
    return after[: len(before)] == before and all(s == 1 for s in after[len(before) :])
