"""``analyze``: model + example input → span graph (capture, match, span graph)."""

from __future__ import annotations

import torch
from torch import nn

from fxmerge.capture import Captured, capture
from fxmerge.ir import SpanGraph
from fxmerge.passes.match import match
from fxmerge.passes.spans import span_graph

RULES = ("general", "paper")


def weight_norms(captured: Captured, matched) -> dict[str, float]:
    """Summed ``|weight|`` of every unit's conv (chooses which convs an option keeps)."""
    return {unit_id: float(info.weight.detach().abs().sum()) for unit_id, info in matched.convs.items()}


def analyze_captured(
    captured: Captured,
    *,
    rules: str = "general",
    exclude: tuple[str, ...] | list[str] | None = None,
    max_kernel: int = 15,
) -> SpanGraph:
    if rules not in RULES:
        raise ValueError(f"unknown rules {rules!r}; choose one of {RULES}")
    if max_kernel < 1:
        raise ValueError(f"max_kernel must be at least 1, got {max_kernel}")
    matched = match(captured.gm, exclude=tuple(exclude or ()))
    shapes = [tuple(t.shape) for t in captured.example_inputs if isinstance(t, torch.Tensor)]
    graph = span_graph(
        matched, model=captured.name, input_shapes=shapes, rules=rules, max_kernel=max_kernel,
        weight_norms=weight_norms(captured, matched),
    )
    if rules == "paper":
        from fxmerge.passes.rules import paper_rules

        graph = paper_rules(graph)
    # a leaf's call sites are already rejected with the leaf's reason; add the leaves never called
    reported = {r.reason for r in graph.rejections}
    leaves = tuple(leaf for leaf in captured.leaves if leaf.reason not in reported)
    if leaves:
        from dataclasses import replace

        graph = replace(graph, rejections=graph.rejections + leaves)
    return graph


def analyze(
    model: nn.Module,
    example_input,
    *,
    rules: str = "general",
    exclude: tuple[str, ...] | list[str] | None = None,
    max_kernel: int = 15,
) -> SpanGraph:
    """The span graph of ``model`` at ``example_input``: what fxmerge may merge, and why not elsewhere.

    ``exclude`` lists module names kept out of every span (a prefix matches the
    modules below it); ``max_kernel`` bounds a merged kernel's size.
    """
    return analyze_captured(capture(model, example_input), rules=rules, exclude=exclude, max_kernel=max_kernel)
