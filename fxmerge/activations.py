"""The activation registry: which FX nodes are activations, and how to rebuild one.

An activation is recognised by the op it calls, never by a module path: a module
class (``nn.ReLU``), a function (``F.relu``, ``torch.relu``), a tensor method
(``x.relu()``), or an ATen op (``aten.relu.default`` from ``torch.export``), each
with its in-place form. Users add their own with :func:`register_activation`.

Each registered activation has a *name* (used in span graphs, plans and latency
signatures) and a factory that rebuilds it as a module, for timing a merged conv
with the activation that closes its span.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

aten = torch.ops.aten


@dataclass
class ActivationKind:
    name: str
    factory: Callable[[], nn.Module]
    modules: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    aten_ops: tuple = ()
    extra: dict = field(default_factory=dict)


_REGISTRY: dict[str, ActivationKind] = {}


def register_activation(
    name: str,
    factory: Callable[[], nn.Module],
    *,
    modules: Iterable[type] = (),
    functions: Iterable[Callable] = (),
    methods: Iterable[str] = (),
    aten_ops: Iterable = (),
) -> None:
    """Teach fxmerge a new activation.

    ``factory`` builds a module computing it (used to time merged convs); the other
    arguments list every way it can appear in a graph. Registering a name again
    replaces the earlier entry.
    """
    _REGISTRY[name] = ActivationKind(
        name=name,
        factory=factory,
        modules=tuple(modules),
        functions=tuple(functions),
        methods=tuple(methods),
        aten_ops=tuple(aten_ops),
    )


def _aten(*names: str) -> tuple:
    ops = []
    for name in names:
        packet = getattr(aten, name, None)
        if packet is not None:
            ops.append(packet.default)
    return tuple(ops)


register_activation(
    "relu",
    nn.ReLU,
    modules=[nn.ReLU],
    functions=[F.relu, torch.relu, torch.relu_, F.relu_],
    methods=["relu", "relu_"],
    aten_ops=_aten("relu", "relu_"),
)
register_activation(
    "relu6",
    nn.ReLU6,
    modules=[nn.ReLU6],
    functions=[F.relu6],
    methods=[],
    aten_ops=_aten("relu6", "relu6_"),
)
register_activation(
    "leaky_relu",
    nn.LeakyReLU,
    modules=[nn.LeakyReLU],
    functions=[F.leaky_relu, F.leaky_relu_],
    methods=[],
    aten_ops=_aten("leaky_relu", "leaky_relu_"),
)
register_activation(
    "prelu", nn.PReLU, modules=[nn.PReLU], functions=[F.prelu], aten_ops=_aten("prelu", "_prelu_kernel")
)
register_activation(
    "hardtanh",
    nn.Hardtanh,
    modules=[nn.Hardtanh],
    functions=[F.hardtanh, F.hardtanh_],
    aten_ops=_aten("hardtanh", "hardtanh_"),
)
register_activation(
    "silu",
    nn.SiLU,
    modules=[nn.SiLU],
    functions=[F.silu],
    aten_ops=_aten("silu", "silu_"),
)
register_activation("gelu", nn.GELU, modules=[nn.GELU], functions=[F.gelu], aten_ops=_aten("gelu", "gelu_"))
register_activation(
    "hardswish",
    nn.Hardswish,
    modules=[nn.Hardswish],
    functions=[F.hardswish],
    aten_ops=_aten("hardswish", "hardswish_"),
)
register_activation("mish", nn.Mish, modules=[nn.Mish], functions=[F.mish], aten_ops=_aten("mish", "mish_"))
register_activation(
    "elu",
    nn.ELU,
    modules=[nn.ELU],
    functions=[F.elu, F.elu_],
    aten_ops=_aten("elu", "elu_"),
)
register_activation(
    "sigmoid",
    nn.Sigmoid,
    modules=[nn.Sigmoid],
    functions=[torch.sigmoid, F.sigmoid],
    methods=["sigmoid", "sigmoid_"],
    aten_ops=_aten("sigmoid", "sigmoid_"),
)
register_activation(
    "tanh",
    nn.Tanh,
    modules=[nn.Tanh],
    functions=[torch.tanh, F.tanh],
    methods=["tanh", "tanh_"],
    aten_ops=_aten("tanh", "tanh_"),
)


def classify(node: torch.fx.Node, module: nn.Module | None = None) -> str | None:
    """The registered activation name ``node`` computes, or ``None``.

    ``module`` is the module a ``call_module`` node calls.
    """
    if node.op == "call_module":
        for kind in _REGISTRY.values():
            if kind.modules and isinstance(module, kind.modules):
                return kind.name
        return None
    if node.op == "call_function":
        for kind in _REGISTRY.values():
            if any(node.target is f for f in kind.functions) or any(node.target is op for op in kind.aten_ops):
                return kind.name
        return None
    if node.op == "call_method":
        for kind in _REGISTRY.values():
            if node.target in kind.methods:
                return kind.name
    return None


def build(name: str | None) -> nn.Module:
    """A fresh module computing activation ``name`` (identity for ``None``)."""
    if name is None:
        return nn.Identity()
    try:
        return _REGISTRY[name].factory()
    except KeyError:
        raise KeyError(f"unknown activation {name!r}; register it with fxmerge.register_activation") from None


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)
