"""Small helpers for reading torch.fx graphs; every stage uses them, they use no stage.

This module imports nothing of fxmerge, so any module may import it without a cycle:
argument access, attribute fetch, module-path cleaning, int-tuple normalisation,
node shapes from the standard metadata, the nodes between two nodes, and the
example input as a tuple.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx
from torch import nn

Ints = tuple[int, ...]


def as_inputs(example_input: Any) -> tuple:
    """``example_input`` as a tuple of positional arguments (a tensor, tuple or list)."""
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input)
    raise TypeError(f"example_input must be a tensor or a tuple of tensors, got {type(example_input).__name__}")


def ints(value: Any, dims: int) -> Ints:
    """An int or a sequence as a ``dims``-tuple of ints (a 1-sequence is repeated)."""
    if isinstance(value, int):
        return (value,) * dims
    out = tuple(int(v) for v in value)
    return out * dims if len(out) == 1 and dims > 1 else out


def arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of ``node``, or keyword ``name``, or ``default``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def fetch_attr(root: nn.Module, path: str) -> Any:
    """``root.a.b.c`` for ``path == "a.b.c"``."""
    value: Any = root
    for part in path.split("."):
        value = getattr(value, part)
    return value


def fetch(gm: torch.fx.GraphModule, value: Any) -> Any:
    """The tensor behind a ``get_attr`` node, a constant as it is, or ``None`` for other nodes."""
    if isinstance(value, torch.fx.Node):
        return fetch_attr(gm, value.target) if value.op == "get_attr" else None
    return value


def submodule(gm: nn.Module, path: str) -> nn.Module | None:
    """The submodule at ``path``, or ``None``."""
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None


def clean_path(path: str) -> str:
    """A Dynamo source path (``L['self'].layer1[0]._modules['conv']``) as a module path."""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.replace("._modules.", ".").strip(".")


def _first_meta(node: torch.fx.Node, key: str) -> Any:
    """The metadata of a node's (first) tensor under ``key``; tuples of tensors give the first."""
    meta = node.meta.get(key)
    if isinstance(meta, (tuple, list)) and meta and not hasattr(meta, "shape"):
        meta = meta[0]
    return meta


def shape_of(node: Any) -> Ints | None:
    """The shape of a node's tensor from standard metadata (``tensor_meta``, ``val``, ``example_value``)."""
    if not isinstance(node, torch.fx.Node):
        return None
    for key in ("tensor_meta", "val", "example_value"):
        shape = getattr(_first_meta(node, key), "shape", None)
        if shape is not None:
            try:
                return tuple(int(s) for s in shape)
            except TypeError:  # a symbolic size
                return None
    return None


def dtype_of(node: Any) -> torch.dtype | None:
    """The dtype of a node's tensor from standard metadata, or ``None``."""
    if not isinstance(node, torch.fx.Node):
        return None
    for key in ("tensor_meta", "val", "example_value"):
        dtype = getattr(_first_meta(node, key), "dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return None


def set_shape(node: torch.fx.Node, shape: Iterable[int], dtype: torch.dtype | None) -> None:
    """Record ``shape``/``dtype`` as the node's ``tensor_meta`` (dropping stale ``val``s)."""
    from torch.fx.passes.shape_prop import TensorMetadata

    node.meta.pop("val", None)
    node.meta.pop("example_value", None)
    node.meta["tensor_meta"] = TensorMetadata(
        shape=torch.Size(tuple(shape)),
        dtype=dtype or torch.float32,
        requires_grad=False,
        stride=(),
        memory_format=None,
        is_quantized=False,
        qparams={},
    )


def forget_shape(node: torch.fx.Node) -> None:
    """Drop a node's shape metadata (after a rewrite changed it)."""
    for key in ("tensor_meta", "val", "example_value"):
        node.meta.pop(key, None)


def batched_shape(like: torch.Tensor, rest: Iterable[int]) -> torch.Size:
    """``like``'s batch size followed by ``rest``: a tensor's recorded shape, at the batch size running now."""
    return torch.Size((like.shape[0], *rest))


def tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes ``node`` reads, except ``get_attr`` constants, in argument order."""
    return [n for n in node.all_input_nodes if n.op != "get_attr"]


def nodes_between(start: torch.fx.Node, end: torch.fx.Node) -> set[torch.fx.Node]:
    """Nodes on some path from ``start`` (exclusive) to ``end`` (inclusive)."""
    ancestors: set[torch.fx.Node] = set()
    pending = [end]
    while pending:
        node = pending.pop()
        if node in ancestors or node is start:
            continue
        ancestors.add(node)
        pending.extend(tensor_inputs(node))
    reached: set[torch.fx.Node] = set()
    pending = list(start.users)
    while pending:
        node = pending.pop()
        if node in reached or node not in ancestors:
            continue
        reached.add(node)
        pending.extend(node.users)
    return reached


def node_index(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """Nodes by name."""
    return {n.name: n for n in gm.graph.nodes}
