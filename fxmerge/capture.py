"""Capture: any model and example input → one normalised, shape-annotated GraphModule.

Three graph shapes reach fxmerge and all become one representation:

1. ``torch.fx.symbolic_trace`` of an eval-mode *copy* of the user's model (the
   user's model is never mutated or re-moded). A submodule that cannot be traced
   becomes a leaf — found by watching which module call raised — and the trace is
   retried; each leaf is reported with the error that made it one.
2. A ``torch.compile`` backend graph: functional ops, with parameters lifted to
   placeholders whose tensors are in ``example_inputs``. Placeholders used as conv
   weights, biases or BatchNorm statistics are turned into ``get_attr`` constants
   (like Inductor's freezing); :class:`Captured.runtime_inputs` says which
   positional inputs remain.
3. ``torch.export``: the exported program's module (ATen ops, parameters as
   attributes).

Shapes and dtypes of every tensor-valued node are recorded in
``node.meta["fxmerge_shape"]`` / ``node.meta["fxmerge_dtype"]`` by running the graph
once on the example inputs.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from fxmerge.ir import Rejection


class CaptureError(RuntimeError):
    """The model cannot be captured at all."""


@dataclass(frozen=True)
class Captured:
    """A normalised GraphModule and what capture learned on the way."""

    gm: torch.fx.GraphModule
    example_inputs: tuple
    form: str  # "symbolic_trace" | "dynamo" | "export"
    leaves: tuple[Rejection, ...]
    runtime_inputs: tuple[int, ...]  # indices of the original placeholders still taken as inputs
    name: str


def as_inputs(example_input) -> tuple:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input)
    raise TypeError(
        f"example_input must be a tensor or a tuple of tensors, got {type(example_input).__name__}"
    )


def model_name(model: nn.Module) -> str:
    return getattr(model, "fxmerge_name", None) or type(model).__name__


# --------------------------------------------------------------------------- tracing
class _LeafTracer(torch.fx.Tracer):
    """A tracer that treats some module paths as leaves and notes which call failed."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.extra_leaves = leaves
        self.failed: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.extra_leaves:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None and name not in self.extra_leaves and not self.is_leaf_module(m, name):
                self.failed = name
            raise


def trace(model: nn.Module, max_leaves: int = 200) -> tuple[torch.fx.GraphModule, tuple[Rejection, ...]]:
    """``symbolic_trace`` with leaf fallback; raises :class:`CaptureError` if the top level fails."""
    leaves: dict[str, str] = {}
    while True:
        tracer = _LeafTracer(set(leaves))
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is reported, not raised raw
            failed = tracer.failed
            if failed is None or failed in leaves or len(leaves) >= max_leaves:
                raise CaptureError(
                    f"cannot trace {type(model).__name__} with torch.fx: {type(exc).__name__}: {exc}. "
                    "The failing code is in the model's own forward (not in a submodule that could be "
                    "kept whole). Make forward traceable (no data-dependent Python control flow), or "
                    "pass a torch.export-ed program instead."
                ) from exc
            leaves[failed] = f"kept whole (untraceable: {type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
            continue
        gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
        return gm, tuple(Rejection(node=name, reason=reason) for name, reason in leaves.items())


# ------------------------------------------------------------------ normalisation
_WEIGHT_ARG_OPS = None


def _weight_like_placeholders(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Placeholders used only in parameter slots (conv weight/bias, BN stats)."""
    from fxmerge.passes import match  # local import: match imports capture's helpers

    params: set[torch.fx.Node] = set()
    data: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        slots = match.parameter_slots(node)
        if slots is None:
            continue
        for k, arg in enumerate(node.args):
            if isinstance(arg, torch.fx.Node) and arg.op == "placeholder":
                (params if k in slots else data).add(arg)
        for key, arg in node.kwargs.items():
            if isinstance(arg, torch.fx.Node) and arg.op == "placeholder":
                (params if key in slots else data).add(arg)
    return params - data


def _attr_name(node: torch.fx.Node, taken: set[str]) -> str:
    """A readable, stable attribute path for a lifted parameter placeholder."""
    source = None
    grapharg = node.meta.get("grapharg")
    if grapharg is not None and getattr(grapharg, "source", None) is not None:
        try:
            source = grapharg.source.name()
        except Exception:  # noqa: BLE001
            source = None
    if source:
        parts = re.findall(r"\['([^']+)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]", source)
        tokens = [a or b or c for a, b, c in parts]
        tokens = [t for t in tokens if t not in ("self", "_modules", "_parameters", "_buffers")]
        path = ".".join(tokens)
    else:
        name = re.sub(r"^[lL]_self_", "", node.name)
        name = re.sub(r"(^|_)(modules|parameters|buffers)_", ".", name).strip("._")
        path = name
        # the placeholder's name lost case and characters such as "-" (RegNet's "block1-0"); the
        # module path of its first use keeps them: take it when it names the same tensor
        from fxmerge.passes.match import _clean_path

        stack = node.meta.get("nn_module_stack")
        leaf = re.search(r"_(?:parameters|buffers)_(\w+?)_?$", node.name)
        if stack and leaf:
            owner = list(stack.values())[-1]
            owner = _clean_path(str(owner[0] if isinstance(owner, tuple) else owner))
            candidate = f"{owner}.{leaf.group(1)}" if owner else leaf.group(1)
            if re.sub(r"\W", "_", candidate).lower() == re.sub(r"\W", "_", path).lower():
                path = candidate
    path = path or node.name
    base, k = path, 1
    while path in taken:
        path = f"{base}#{k}"
        k += 1
    taken.add(path)
    return path


def _set_attr(gm: torch.fx.GraphModule, path: str, value: torch.Tensor) -> str:
    """Register ``value`` on ``gm`` under a dotted ``path`` made of plain submodules."""
    safe = [re.sub(r"[^\w\-]", "_", part) for part in path.split(".")]
    module = gm
    for part in safe[:-1]:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    if isinstance(value, nn.Parameter):
        module.register_parameter(safe[-1], value)
    else:
        module.register_buffer(safe[-1], value)
    return ".".join(safe)


def lift_parameters(gm: torch.fx.GraphModule, example_inputs: Sequence) -> tuple[torch.fx.GraphModule, tuple[int, ...]]:
    """Turn parameter placeholders of a ``torch.compile`` graph into ``get_attr`` constants."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = _weight_like_placeholders(gm)
    taken: set[str] = set()
    keep: list[int] = []
    for index, node in enumerate(placeholders):
        if node not in params:
            keep.append(index)
            continue
        value = example_inputs[index]
        if not isinstance(value, torch.Tensor):
            keep.append(index)
            continue
        target = _set_attr(gm, _attr_name(node, taken), value)
        with gm.graph.inserting_after(node):
            attr = gm.graph.get_attr(target)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm, tuple(keep)


def graph_form(gm: torch.fx.GraphModule) -> str:
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            return "export"
    if any(n.op == "placeholder" and "grapharg" in n.meta for n in gm.graph.nodes):
        return "dynamo"
    return "symbolic_trace"


def drop_guards(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove ``torch.export``'s input guard call (``_guards_fn``): it checks, computes nothing."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
            changed = True
    if changed:
        gm.recompile()
    return gm


# ------------------------------------------------------------------ shapes
class _ShapeRecorder(torch.fx.Interpreter):
    def run_node(self, n: torch.fx.Node):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["fxmerge_shape"] = tuple(result.shape)
            n.meta["fxmerge_dtype"] = result.dtype
        elif isinstance(result, (tuple, list)) and result and isinstance(result[0], torch.Tensor):
            n.meta["fxmerge_shape"] = tuple(result[0].shape)
            n.meta["fxmerge_dtype"] = result[0].dtype
        return result


class _Recording(nn.Module):
    """Runs ``gm`` through :class:`_ShapeRecorder` (so ``functional_call`` can swap its tensors)."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *inputs):
        return _ShapeRecorder(self.gm).run(*inputs)


def propagate_shapes(gm: torch.fx.GraphModule, inputs: Sequence) -> None:
    """Record the real shape and dtype of every tensor-valued node.

    The graph runs on the ``meta`` device first (parameters swapped for meta tensors
    with ``torch.func.functional_call``; shapes only, no arithmetic, several times
    faster than running a large model at 224×224 on a CPU). Code that needs real
    values (a kept-whole leaf with data-dependent control flow, an op with no meta
    kernel, a tensor constant that is not a parameter or buffer) makes it run again
    on the real inputs.
    """
    with torch.no_grad():
        try:
            tensors = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
            meta = {f"gm.{name}": t.to("meta") for name, t in tensors.items()}
            meta_inputs = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs]
            torch.func.functional_call(_Recording(gm), meta, tuple(meta_inputs), strict=False)
            return
        except Exception:  # noqa: BLE001 - whatever the meta device cannot do, the real run can
            pass
        _ShapeRecorder(gm).run(*inputs)


# ------------------------------------------------------------------ entry points
def capture(model: nn.Module, example_input) -> Captured:
    """Trace an eval-mode copy of ``model`` and annotate shapes.

    ``model`` may already be a GraphModule (from ``torch.export`` via
    ``ExportedProgram.module()``, or from anywhere else): it is copied, not retraced.
    An ``ExportedProgram`` is accepted too.
    """
    inputs = as_inputs(example_input)
    name = model_name(model)
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        working = copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(f"cannot copy {name} (fxmerge never mutates your model): {exc}") from exc
    working.eval()
    leaves: tuple[Rejection, ...] = ()
    if isinstance(working, torch.fx.GraphModule):
        gm = drop_guards(working)
        form = graph_form(gm)
    else:
        gm, leaves = trace(working)
        form = "symbolic_trace"
        gm._fxmerge_leaves = {leaf.node: leaf.reason for leaf in leaves}
    gm.fxmerge_name = name
    try:
        propagate_shapes(gm, inputs)
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(
            f"running {name} on the example input failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}. "
            f"Check the example input's shape and dtype (got {[tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]})."
        ) from exc
    return Captured(gm, inputs, form, leaves, tuple(range(len(inputs))), name)


def capture_backend_graph(gm: torch.fx.GraphModule, example_inputs: Sequence, name: str = "graph") -> Captured:
    """Normalise a graph handed to a ``torch.compile`` backend (parameters lifted)."""
    gm, keep = lift_parameters(gm, example_inputs)
    runtime = [example_inputs[k] for k in keep]
    fake = any(type(t).__name__ == "FakeTensor" for t in runtime)
    if not fake:
        propagate_shapes(gm, runtime)
    gm.fxmerge_name = name
    return Captured(gm, tuple(runtime), "dynamo", (), keep, name)
