"""A :class:`~fxmerge.ir.ConvSpec` as a module and an input, ready to time.

The latency of a span option is the latency of the one conv it merges into,
followed by the activation that closes the span. The weights are random (with a
fixed seed, drawn without disturbing the caller's random state): timing does not
depend on their values.
"""

from __future__ import annotations

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
