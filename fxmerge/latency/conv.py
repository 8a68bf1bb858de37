"""A :class:`~fxmerge.ir.ConvSpec` as a module and an input, ready to time.

The latency of a span option is the latency of the one conv it merges into,
followed by the activation that closes the span. The weights are random (with a
fixed seed, drawn without disturbing the caller's random state): timing does not
depend on their values.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fxmerge import activations
from fxmerge.ir import ConvSpec

_CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_SEED = 0


def _dtype(spec: ConvSpec) -> torch.dtype:
    dtype = getattr(torch, spec.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"ConvSpec.dtype {spec.dtype!r} is not a torch dtype")
    return dtype


def conv_module(spec: ConvSpec) -> nn.Module:
    """``Conv{1,2,3}d`` as described by ``spec``, then its activation, in eval mode."""
    if spec.dims not in _CONVS:
        raise ValueError(f"cannot build a {spec.dims}-d convolution (1, 2 or 3 spatial dims)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        conv = _CONVS[spec.dims](
            spec.in_channels,
            spec.out_channels,
            kernel_size=spec.kernel_size,
            stride=spec.stride,
            padding=spec.padding,
            dilation=spec.dilation,
            groups=spec.groups,
            bias=spec.bias,
        )
        module = nn.Sequential(conv, activations.build(spec.activation))
    return module.to(_dtype(spec)).eval()


def spec_input(spec: ConvSpec) -> Tensor:
    """A random input of shape ``spec.input_shape`` and dtype ``spec.dtype``."""
    generator = torch.Generator().manual_seed(_SEED)
    return torch.randn(spec.input_shape, generator=generator, dtype=_dtype(spec))


def null_spec(spec: ConvSpec) -> ConvSpec | None:
    """The cheapest conv with ``spec``'s input and output shapes, or ``None`` if there is none.

    A 1×1 conv with as many groups as both channel counts allow, the same stride and
    activation: timed alone it pays what ``spec`` pays for being alone (the runtime's
    call, the layout reorders of the same input and output tensors) and next to no
    arithmetic, so ``time(spec) − time(null_spec(spec))`` is what ``spec`` costs inside
    a model on runtimes whose standalone overhead is large (ONNX Runtime's NCHWc).
    """
    dims = spec.dims
    spatial = spec.input_shape[2:]
    wanted = spec.output_shape[2:]
    padding = []
    for size, stride, out in zip(spatial, spec.stride, wanted):
        # (size + 2p - 1) // stride + 1 == out for the smallest p >= 0, if any
        p = max(0, -(-((out - 1) * stride + 1 - size) // 2))
        if (size + 2 * p - 1) // stride + 1 != out:
            return None
        padding.append(p)
    null = ConvSpec(
        dims=dims,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        kernel_size=(1,) * dims,
        stride=spec.stride,
        padding=tuple(padding),
        dilation=(1,) * dims,
        groups=math.gcd(spec.in_channels, spec.out_channels),
        bias=spec.bias,
        activation=spec.activation,
        input_shape=spec.input_shape,
        dtype=spec.dtype,
    )
    return None if null == spec else null
