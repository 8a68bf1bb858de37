"""Custom ops that mark spans in a linearized graph.

``linearize`` brackets every span it prepares: ``fxmerge::span_pad`` pads the
span's input (its whole front padding), ``fxmerge::span_crop`` aligns a skip inside
the span (a negative pad), ``fxmerge::span_end`` marks the span's output. They are
real ``torch.library`` custom ops, so they survive ``symbolic_trace``, Dynamo and
``torch.export`` unchanged; that is how ``merge`` finds each span again in any of the
three graph shapes, long after the plan was applied. They are differentiable, so a
linearized model trains normally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("fxmerge::span_pad", mutates_args=())
def span_pad(x: torch.Tensor, pad: list[int], span: str) -> torch.Tensor:
    """Zero-pad ``x`` by ``pad`` (``F.pad`` order): the front padding of span ``span``."""
    return F.pad(x, pad)


@torch.library.custom_op("fxmerge::span_crop", mutates_args=())
def span_crop(x: torch.Tensor, pad: list[int], span: str) -> torch.Tensor:
    """Crop ``x`` by ``-pad`` (``F.pad`` order, non-positive): align a tensor inside a span."""
    return F.pad(x, pad).clone()


@torch.library.custom_op("fxmerge::span_end", mutates_args=())
def span_end(x: torch.Tensor, span: str) -> torch.Tensor:
    """Identity; marks the output of span ``span``."""
    return x.clone()


def _padded_like(x: torch.Tensor, pad: list[int]) -> torch.Tensor:
    shape = list(x.shape)
    for k in range(len(pad) // 2):
        shape[-1 - k] += pad[2 * k] + pad[2 * k + 1]
    return x.new_empty(shape)


@span_pad.register_fake
def _(x, pad, span):
    return _padded_like(x, pad)


@span_crop.register_fake
def _(x, pad, span):
    return _padded_like(x, pad)


@span_end.register_fake
def _(x, span):
    return torch.empty_like(x)


def _setup_pad(ctx, inputs, output):
    ctx.pad = inputs[1]


def _backward_pad(ctx, grad):
    return F.pad(grad, [-p for p in ctx.pad]), None, None


def _backward_end(ctx, grad):
    return grad, None


span_pad.register_autograd(_backward_pad, setup_context=_setup_pad)
span_crop.register_autograd(_backward_pad, setup_context=_setup_pad)
span_end.register_autograd(_backward_end)

SPAN_PAD = torch.ops.fxmerge.span_pad
SPAN_CROP = torch.ops.fxmerge.span_crop
SPAN_END = torch.ops.fxmerge.span_end


def is_marker(node, packet) -> bool:
    """Whether ``node`` calls the custom op ``packet`` (any overload, any graph shape)."""
    if node.op != "call_function":
        return False
    target = node.target
    return target is packet or getattr(target, "overloadpacket", None) is packet
