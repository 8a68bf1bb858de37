"""Capture: any model and example input → one normalised, shape-annotated GraphModule.

Capture runs once per ``compress``; every later stage works on the graph it returns.
Three graph shapes reach fxmerge and all become one :class:`Captured` value:

1. ``torch.fx.symbolic_trace`` of an eval-mode *copy* of the user's model (the
   user's model is never mutated or re-moded). Arguments of ``forward`` that the
   example input does not give keep their Python defaults, as constants. A submodule
   that cannot be traced becomes a leaf — found by watching which module call
   raised — and the trace is retried; each leaf is reported with its error. When the
   top-level ``forward`` itself cannot be traced (control flow on input shapes,
   optional arguments tested with ``is None``), capture falls back to
   ``torch.export`` (non-strict, then strict) and says so in ``notes``.
2. A ``torch.compile`` backend graph: functional ops, with parameters lifted to
   placeholders whose tensors are in ``example_inputs``. Placeholders used as conv
   weights, biases or BatchNorm statistics become ``get_attr`` constants (like
   Inductor's freezing); :attr:`Captured.runtime_inputs` says which positional
   inputs remain.
3. ``torch.export``: an ``ExportedProgram`` or its module (ATen ops, parameters as
   attributes), used as it is.

Shapes and dtypes of every tensor-valued node go into the standard
``node.meta["tensor_meta"]`` by running the graph once on the example inputs
(on the meta device when it can).
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils._pytree import tree_leaves, tree_map

from fxmerge.fxutil import as_inputs, clean_path
from fxmerge.ir import Rejection
from fxmerge.nodes import parameter_slots


class CaptureError(RuntimeError):
    """The model cannot be captured at all."""


class MissingArguments(CaptureError):
    """The example input gives fewer arguments than ``forward`` needs."""


@dataclass(frozen=True)
class Captured:
    """A normalised GraphModule and what capture learned on the way.

    ``gm`` belongs to fxmerge (a copy of the user's model); stages that rewrite it
    work on a copy of its graph. ``leaves`` are submodules kept whole, with why;
    ``notes`` say which capture path was taken when it was not the first.
    """

    gm: torch.fx.GraphModule
    example_inputs: tuple
    form: str  # "symbolic_trace" | "dynamo" | "export"
    leaves: tuple[Rejection, ...]
    runtime_inputs: tuple[int, ...]  # indices of the original placeholders still taken as inputs
    name: str
    notes: tuple[str, ...] = ()


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


def _defaults_beyond(model: nn.Module, given: int) -> dict:
    """``forward``'s arguments after the first ``given`` positional ones, with their defaults."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    missing = [p.name for p in positional[given:] if p.default is p.empty]
    if missing:
        raise MissingArguments(
            f"{type(model).__name__}.forward needs argument(s) {missing} that the example input does not "
            f"give ({given} positional input(s)); pass a tuple with one tensor per argument"
        )
    return {p.name: p.default for p in positional[given:]}


def _drop_constant_arguments(graph: torch.fx.Graph, names: set[str]) -> None:
    """Remove the placeholders of constant arguments and the asserts fx added for them."""
    for node in [n for n in graph.nodes if n.op == "placeholder" and n.target.rsplit("_", 1)[0] in names]:
        checks: list[torch.fx.Node] = []
        pending = list(node.users)
        while pending:
            user = pending.pop()
            if user not in checks:
                checks.append(user)
                pending.extend(user.users)
        order = {n: k for k, n in enumerate(graph.nodes)}
        for check in sorted(checks, key=order.__getitem__, reverse=True):
            graph.erase_node(check)
        graph.erase_node(node)


def trace(
    model: nn.Module, given: int = 1, max_leaves: int = 200
) -> tuple[torch.fx.GraphModule, tuple[Rejection, ...]]:
    """``symbolic_trace`` with leaf fallback; raises :class:`CaptureError` if the top level fails."""
    constants = _defaults_beyond(model, given)
    leaves: dict[str, str] = {}
    while True:
        tracer = _LeafTracer(set(leaves))
        try:
            graph = tracer.trace(model, concrete_args=dict(constants) or None)
        except Exception as exc:
            failed = tracer.failed
            if failed is None or failed in leaves or len(leaves) >= max_leaves:
                raise CaptureError(
                    f"cannot trace {type(model).__name__} with torch.fx: {type(exc).__name__}: "
                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                ) from exc
            leaves[failed] = f"kept whole (untraceable: {type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
            continue
        _drop_constant_arguments(graph, set(constants))
        gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
        return gm, tuple(Rejection(node=name, reason=reason) for name, reason in leaves.items())


def _exported(model: nn.Module, inputs: tuple) -> tuple[torch.fx.GraphModule | None, str, list[str]]:
    """``torch.export`` (non-strict, then strict): ``(module or None, which, errors)``.

    Each is tried with a dynamic batch dimension first (see :func:`_batch_dynamic`), so
    that the graph runs at any batch size like the model does (importance estimates
    and fine-tuning run batches, the example input is often one sample), then static.
    """
    errors = []
    for strict in (False, True):
        try:
            program = _batch_dynamic(model, inputs, strict)
            if program is not None:
                return drop_guards(program.module()), f"torch.export (strict={strict}, dynamic batch)", errors
            program = torch.export.export(model, inputs, strict=strict)
        except Exception as exc:  # noqa: BLE001 - each exporter failure is reported together
            errors.append(f"torch.export (strict={strict}): {type(exc).__name__}: {str(exc).strip()[:300]}")
            continue
        return drop_guards(program.module()), f"torch.export (strict={strict})", errors
    return None, "", errors


def _batch_dynamic(model: nn.Module, inputs: tuple, strict: bool) -> torch.export.ExportedProgram | None:
    """``model`` exported with dimension 0 of every tensor input symbolic, or ``None`` when it cannot be.

    A size-1 dimension is always specialised by the exporter, so the export runs on
    the example inputs doubled along dimension 0; the program is kept only when it
    also reproduces the model's output on the example inputs themselves.
    """
    if not inputs or not all(isinstance(a, torch.Tensor) and a.dim() > 0 for a in inputs):
        return None
    doubled = tuple(torch.cat([a, a]) for a in inputs)
    dynamic = tuple({0: torch.export.Dim.AUTO} for _ in inputs)
    try:
        program = torch.export.export(model, doubled, dynamic_shapes=dynamic, strict=strict)
        with torch.no_grad():
            got, want = drop_guards(program.module())(*inputs), model(*inputs)
        same = all(
            isinstance(g, torch.Tensor) and g.shape == w.shape and torch.allclose(g, w, rtol=1e-4, atol=1e-5)
            for g, w in zip(tree_leaves(got), tree_leaves(want), strict=True)
        )
    except Exception:  # noqa: BLE001 - a model that is not batch-polymorphic is exported statically
        return None
    return program if same else None


# ------------------------------------------------------------------ normalisation
def _weight_like_placeholders(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Placeholders used only in parameter slots (conv weight/bias, BN stats)."""
    params: set[torch.fx.Node] = set()
    data: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        slots = parameter_slots(node)
        if slots is None:
            continue
        for key, value in [*enumerate(node.args), *node.kwargs.items()]:
            if isinstance(value, torch.fx.Node) and value.op == "placeholder":
                (params if key in slots else data).add(value)
    return params - data


def _is_module_tensor(node: torch.fx.Node, value) -> bool:
    """Whether a placeholder carries one of the model's own tensors: a parameter, or a tensor
    Dynamo named as a module's parameter or buffer (``l_self_modules_bn_buffers_running_mean_``)."""
    if isinstance(value, nn.Parameter):
        return True
    return isinstance(value, torch.Tensor) and re.search(r"_(parameters|buffers)_", node.name) is not None


def _source_path(node: torch.fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    try:
        name = source.name()
    except Exception:  # noqa: BLE001 - a source Dynamo cannot name: fall back to the node name
        return None
    parts = re.findall(r"\['([^']+)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]", name)
    tokens = [a or b or c for a, b, c in parts]
    return ".".join(t for t in tokens if t not in ("self", "_modules", "_parameters", "_buffers"))


def _name_path(node: torch.fx.Node) -> str:
    """The module path a placeholder's name spells, with case and ``-`` restored from its first use."""
    name = re.sub(r"^[lL]_self_", "", node.name)
    path = re.sub(r"(^|_)(modules|parameters|buffers)_", ".", name).strip("._")
    stack = node.meta.get("nn_module_stack")
    leaf = re.search(r"_(?:parameters|buffers)_(\w+?)_?$", node.name)
    if stack and leaf:
        owner = list(stack.values())[-1]
        owner = clean_path(str(owner[0] if isinstance(owner, tuple) else owner))
        candidate = f"{owner}.{leaf.group(1)}" if owner else leaf.group(1)
        if re.sub(r"\W", "_", candidate).lower() == re.sub(r"\W", "_", path).lower():
            path = candidate
    return path


def _attr_name(node: torch.fx.Node, taken: set[str]) -> str:
    """A readable, stable attribute path for a lifted parameter placeholder."""
    path = _source_path(node) or _name_path(node) or node.name
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
        value = example_inputs[index]
        if not isinstance(value, torch.Tensor) or not (node in params or _is_module_tensor(node, value)):
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
    """An exported program's module as fxmerge uses it: without ``torch.export``'s input guard
    call (``_guards_fn``: it checks, computes nothing), and with ``train()``/``eval()`` allowed
    again (``ExportedProgram.module()`` forbids them on the instance; its graph is already in
    inference form, so the flag changes nothing, but every stage sets it)."""
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
            changed = True
    if changed:
        gm.recompile()
    return gm


# ------------------------------------------------------------------ shapes
def _metadata(value):
    if isinstance(value, torch.Tensor):
        return _extract_tensor_metadata(value)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(_extract_tensor_metadata(v) for v in value)
    return None


class _ShapeRecorder(torch.fx.Interpreter):
    def run_node(self, n: torch.fx.Node):
        result = super().run_node(n)
        meta = _metadata(result)
        if meta is not None:
            n.meta["tensor_meta"] = meta
        return result


class _Recording(nn.Module):
    """Runs ``gm`` through :class:`_ShapeRecorder` (so ``functional_call`` can swap its tensors)."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *inputs):
        return _ShapeRecorder(self.gm).run(*inputs)


def propagate_shapes(gm: torch.fx.GraphModule, inputs: Sequence) -> None:
    """Record the shape and dtype of every tensor-valued node as ``tensor_meta``.

    The graph runs on the ``meta`` device first (parameters swapped for meta tensors
    with ``torch.func.functional_call``; shapes only, several times faster than
    running a large model at 224×224 on a CPU). Code that needs real values (a
    kept-whole leaf with data-dependent control flow, an op with no meta kernel, a
    tensor constant that is not a parameter or buffer) makes it run again on the
    real inputs.
    """
    with torch.no_grad():
        try:
            tensors = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
            meta = {f"gm.{name}": t.to("meta") for name, t in tensors.items()}
            meta_inputs = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, tuple(inputs))
            torch.func.functional_call(_Recording(gm), meta, meta_inputs, strict=False)
            return
        except Exception:  # noqa: BLE001 - whatever the meta device cannot do, the real run can
            pass
        _ShapeRecorder(gm).run(*inputs)


# ------------------------------------------------------------------ entry points
def _graph_module(working: nn.Module, inputs: tuple) -> tuple[torch.fx.GraphModule, str, tuple, tuple]:
    """``(gm, form, leaves, notes)`` for an eval-mode copy of the user's model.

    ``symbolic_trace`` first. When it fails at the top level, or traces only by keeping
    submodules whole (Python control flow on shapes, ``len`` of a proxy), ``torch.export``
    captures the whole model instead if it can; leaves remain the last resort.
    """
    if isinstance(working, torch.fx.GraphModule):
        gm = drop_guards(working)
        return gm, graph_form(gm), (), ()
    try:
        gm, leaves = trace(working, given=len(inputs))
    except MissingArguments:
        raise
    except CaptureError as exc:
        exported, how, errors = _exported(working, inputs)
        if exported is None:
            raise CaptureError(
                f"cannot capture {type(working).__name__}: {exc}; " + "; ".join(errors) + ". Make forward "
                "traceable (no Python control flow on input values), or pass a torch.export-ed program."
            ) from exc
        first = str(exc).split(": ", 1)[-1][:200]
        return (
            exported,
            "export",
            (),
            (f"symbolic_trace of the top-level forward failed ({first}); captured through {how}",),
        )
    if not leaves:
        return gm, "symbolic_trace", (), ()
    exported, how, _ = _exported(working, inputs)
    if exported is None:
        return gm, "symbolic_trace", leaves, ()
    kept = ", ".join(leaf.node for leaf in leaves[:3]) + (", ..." if len(leaves) > 3 else "")
    return (
        exported,
        "export",
        (),
        (f"symbolic_trace could only keep {len(leaves)} submodule(s) whole ({kept}); captured through {how} instead",),
    )


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
    except Exception as exc:
        raise CaptureError(f"cannot copy {name} (fxmerge never mutates your model): {exc}") from exc
    _set_eval(working)
    gm, form, leaves, notes = _graph_module(working, inputs)
    try:
        propagate_shapes(gm, inputs)
    except Exception as exc:
        raise CaptureError(
            f"running {name} on the example input failed: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}. Check the example input's shape "
            f"and dtype (got {[tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]})."
        ) from exc
    return Captured(gm, inputs, form, leaves, tuple(range(len(inputs))), name, notes)


def _set_eval(module: nn.Module) -> None:
    """Eval mode, also for exported modules that forbid ``.eval()`` (their graph is fixed anyway)."""
    try:
        module.eval()
    except (NotImplementedError, RuntimeError):
        for child in module.modules():
            child.training = False


def capture_backend_graph(gm: torch.fx.GraphModule, example_inputs: Sequence, name: str = "graph") -> Captured:
    """Normalise a graph handed to a ``torch.compile`` backend (parameters lifted)."""
    gm, keep = lift_parameters(gm, example_inputs)
    runtime = [example_inputs[k] for k in keep]
    if not any(type(t).__name__ == "FakeTensor" for t in runtime):
        propagate_shapes(gm, runtime)
    return Captured(gm, tuple(runtime), "dynamo", (), keep, name)
