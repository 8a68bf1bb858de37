"""Which entry networks compute the same thing: a structural signature of a linearized graph.

Two entries can give the same network up to the span markers. A span that ends just
before a residual ``add`` and the span that ends just after it (with the same
option) both compute ``h + x``: the first reads ``x`` directly, the second through
``span_crop(span_pad(x))``, and the end marker sits on either side of the ``add``.
The signature of a graph is its sequence of computing nodes with every argument
written canonically, after three exact identities:

* ``span_end(x)`` is ``x`` (the marker copies its input);
* ``span_crop(span_pad(x, p), −p)`` is ``x`` (zero padding cropped away again);
* the span name a marker carries is not part of what it computes.

Everything else is compared as it is: the module or tensor a node reads by object
identity (only objects of the captured model are accepted, since those outlive every
entry; anything an entry made itself gives no signature), function targets by
identity, constants by value. Equal signatures therefore mean the same operations on
the same values in the same order, hence bit-identical outputs — with one caveat the
identities introduce: a copy that is dropped changes aliasing, so a graph in which
an in-place op writes into a value that anything else reads gets no signature.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from typing import Any

import torch
import torch.fx
from torch import nn

from fxmerge.nodes import is_in_place
from fxmerge.ops import SPAN_CROP, SPAN_END, SPAN_PAD, is_marker


class _NoSignature(Exception):
    """The graph holds something whose identity cannot be compared across entries."""


def network_signature(gm: torch.fx.GraphModule, base: torch.fx.GraphModule) -> tuple | None:
    """A hashable signature, equal for graphs that compute bit-identical outputs; ``None``
    when ``gm`` reads a module or tensor that is not ``base``'s, holds a tensor constant,
    or writes in place into a value something else reads."""
    owned = {id(m) for m in base.modules()} | {id(t) for t in base.parameters()} | {id(t) for t in base.buffers()}
    canonical: dict[torch.fx.Node, Hashable] = {}
    steps: list[tuple] = []
    mutated: list[Hashable] = []
    try:
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                canonical[node] = _owned(_attribute(gm, node.target), owned)
                continue
            alias = _identity_input(node)
            if alias is not None:
                canonical[node] = canonical[alias]
                continue
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            step = _conv_step(node, module, canonical, owned) or _step(node, module, canonical, owned)
            steps.append(step)
            canonical[node] = ("node", len(steps) - 1)
            if _writes_in_place(node, module):
                mutated.append(canonical[node.args[0]] if node.args and node.args[0] in canonical else None)
    except _NoSignature:
        return None
    readers = Counter(ref for step in steps for ref in _references(step[2:]))
    if any(ref is None or readers[ref] > 1 for ref in mutated):
        return None
    return tuple(steps)


def _step(node: torch.fx.Node, module: nn.Module | None, canonical: dict, owned: set[int]) -> tuple:
    args = node.args[:2] if _is_pad_or_crop(node) else node.args  # drop the span name
    target = _owned(module, owned) if module is not None else node.target
    return (node.op, target, _value(args, canonical), _value(node.kwargs, canonical))


_CONV_FUNCTIONS = {torch.conv1d: 1, torch.conv2d: 2, nn.functional.conv1d: 1, nn.functional.conv2d: 2}
_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2}


def _conv_step(node: torch.fx.Node, module: nn.Module | None, canonical: dict, owned: set[int]) -> tuple | None:
    """A convolution written the same whether a module or a function computes it (``nn.Conv2d``
    calls ``torch.conv2d`` with its own arguments), or ``None`` for any other node."""
    if module is not None:
        dims = _CONV_MODULES.get(type(module))
        if dims is None or module.padding_mode != "zeros" or isinstance(module.padding, str) or node.kwargs:
            return None
        weight, bias = _owned(module.weight, owned), None if module.bias is None else _owned(module.bias, owned)
        rest = (module.stride, module.padding, module.dilation, module.groups)
    else:
        dims = _CONV_FUNCTIONS.get(node.target) if node.op == "call_function" else None
        if dims is None or node.kwargs or len(node.args) != 7 or isinstance(node.args[4], str):
            return None
        _, weight, bias, *rest = node.args
        weight, bias = canonical[weight], None if bias is None else canonical[bias]
    shape = tuple(_value(tuple(a) if isinstance(a, (list, tuple)) else a, canonical) for a in rest)
    return ("conv", dims, canonical[node.args[0]], weight, bias, *shape)


def _owned(obj: Any, owned: set[int]) -> tuple:
    if id(obj) not in owned:
        raise _NoSignature
    return ("object", id(obj))


def _identity_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The node whose value ``node`` copies exactly, if it is an end marker or a crop undoing a pad."""
    if is_marker(node, SPAN_END):
        return node.args[0]
    if is_marker(node, SPAN_CROP):
        padded, crop = node.args[0], node.args[1]
        undone = isinstance(padded, torch.fx.Node) and is_marker(padded, SPAN_PAD)
        if undone and [-p for p in padded.args[1]] == list(crop):
            return padded.args[0]
    return None


def _is_pad_or_crop(node: torch.fx.Node) -> bool:
    return is_marker(node, SPAN_PAD) or is_marker(node, SPAN_CROP)


def _attribute(gm: torch.fx.GraphModule, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _value(value: Any, canonical: dict[torch.fx.Node, Hashable]) -> Hashable:
    if isinstance(value, torch.fx.Node):
        return canonical[value]
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *(_value(v, canonical) for v in value))
    if isinstance(value, dict):
        return ("dict", *((k, _value(v, canonical)) for k, v in sorted(value.items())))
    if isinstance(value, slice):
        return ("slice", _value((value.start, value.stop, value.step), canonical))
    if isinstance(value, torch.Tensor):
        raise _NoSignature
    try:
        hash(value)
    except TypeError:
        raise _NoSignature from None
    return (type(value).__name__, value)


def _references(value: Any) -> list[Hashable]:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "node" and isinstance(value[1], int):
        return [value]
    if isinstance(value, tuple):
        return [ref for part in value for ref in _references(part)]
    return []


def _writes_in_place(node: torch.fx.Node, module: nn.Module | None) -> bool:
    if module is not None:
        return bool(getattr(module, "inplace", False))
    if node.op not in ("call_function", "call_method"):
        return False
    if is_in_place(node) or node.kwargs.get("inplace") is True:
        return True
    functional = getattr(node.target, "__module__", "") == nn.functional.__name__
    return functional and any(arg is True for arg in node.args[1:])
