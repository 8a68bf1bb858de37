"""The adapter: the only place the fuzzer touches fxmerge's non-public API.

fxmerge's internal modules (``fxmerge.api.analyze_captured``,
``fxmerge.capture.capture_backend_graph``, ``fxmerge.export.export_onnx``, the
``fxmerge_merged_{k}`` module names) are being refactored; when one moves, the
fix is here and nowhere else. Everything else in ``tests/fuzz`` uses the public API
(``fxmerge.analyze``, ``Plan``, ``linearize``, ``merge``).

* :func:`span_graph_in_form` — capture a model in one of the three graph forms and
  analyse it: ``"fx"`` (``torch.fx.symbolic_trace``, plain ``fxmerge.analyze``),
  ``"dynamo"`` (the graph a ``torch.compile`` backend receives), ``"export"``
  (``torch.export.export(...).module()``).
* :func:`onnx_bytes` — fxmerge's ONNX exporter (the one ``export_merged`` uses).
* :func:`merged_convs` — which module of a merged graph replaced which span.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import fxmerge

FORMS = ("fx", "dynamo", "export")


@dataclass(frozen=True)
class FormGraph:
    """A model in one graph form: what to run, linearize and merge, and its span graph."""

    form: str
    module: nn.Module  # the model (fx), the backend graph with parameters lifted (dynamo), the exported module
    inputs: tuple  # the inputs ``module`` takes
    span_graph: fxmerge.SpanGraph


def span_graph_in_form(model: nn.Module, inputs: tuple, form: str) -> FormGraph:
    """Capture ``model`` in ``form`` and analyse it with fxmerge's default settings."""
    if form == "fx":
        return FormGraph(form, model, inputs, fxmerge.analyze(model, inputs))
    if form == "export":
        module = torch.export.export(model, inputs).module()
        return FormGraph(form, module, inputs, fxmerge.analyze(module, inputs))
    if form != "dynamo":
        raise ValueError(f"unknown graph form {form!r}; choose one of {FORMS}")
    from fxmerge.api import analyze_captured
    from fxmerge.capture import capture_backend_graph

    graphs = []

    def grab(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=grab, fullgraph=True)(*inputs)
    finally:
        torch._dynamo.reset()
    captured = capture_backend_graph(*graphs[0], name=getattr(model, "fxmerge_name", type(model).__name__))
    return FormGraph(form, captured.gm, tuple(captured.example_inputs), analyze_captured(captured))


def onnx_bytes(module: nn.Module, inputs: tuple) -> tuple[bytes, list[str]]:
    """``module`` exported to ONNX by fxmerge's exporter, and the input names it was given."""
    from fxmerge.export import export_onnx

    names = [f"input_{k}" for k in range(len(inputs))]
    return export_onnx(module, inputs, names), names


def merged_convs(linearized: torch.fx.GraphModule, merged: torch.fx.GraphModule) -> dict[str, nn.Module | None]:
    """Span id → the conv ``merge`` put in its place (``None`` when it is not in ``merged``).

    ``merge`` merges the spans in the order of their ``fxmerge::span_pad`` markers and
    names each conv ``fxmerge_merged_{n}`` with a counter that grows along the way
    (shared with its ``fxmerge_side_{n}`` / ``fxmerge_folded_{n}`` modules), so the
    merged convs sorted by ``n`` are the spans in marker order.
    """
    pad = torch.ops.fxmerge.span_pad
    begins = [
        n
        for n in linearized.graph.nodes
        if n.op == "call_function" and (n.target is pad or getattr(n.target, "overloadpacket", None) is pad)
    ]
    numbered = sorted(
        (int(name.rsplit("_", 1)[1]), module)
        for name, module in merged.named_children()
        if re.fullmatch(r"fxmerge_merged_\d+", name)
    )
    if len(numbered) != len(begins):
        return {node.args[2]: None for node in begins}
    return {node.args[2]: module for node, (_, module) in zip(begins, numbered)}
