"""Small hand-built models shared by the tests.

Every model is tiny (a few channels, 16×16 or 32×32 input) so a test that traces,
analyses or runs it takes milliseconds. Each class documents the structure fxmerge
should find in it; the expectations themselves live in the tests
(``test_match.py``, ``test_spans.py``, ``test_capture.py``).

Use :func:`build` to get a model in eval mode with deterministic weights and
non-trivial BatchNorm statistics (so that folding a BatchNorm is not a no-op), and
:func:`example_input` for an input of the right shape::

    from tests.models import build, example_input
    model = build("basic_block")
    x = example_input("basic_block")

``CASES`` maps each name to ``(class, input shape)``; ``TENSOR_CASES`` lists the
models whose single output is a tensor (handy for exactness tests that compare
outputs directly).
"""

from __future__ import annotations

from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CASES",
    "TENSOR_CASES",
    "BasicBlock",
    "Conv1dChain",
    "ConvChain",
    "DepthwiseChain",
    "DictOutput",
    "DownsampleBlock",
    "FunctionalActivations",
    "InceptionModule",
    "InvertedResidual",
    "NamedTupleOutput",
    "ReflectPadding",
    "SharedConv",
    "TopLevelUntraceable",
    "TupleInput",
    "UntraceableChild",
    "build",
    "conv_bn",
    "example_input",
    "randomize_batchnorm",
]


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, relu: bool = True, **kwargs) -> nn.Sequential:
    """``Conv → BatchNorm (→ ReLU)`` with "same" padding, no conv bias."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False, **kwargs),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- chains
class ConvChain(nn.Module):
    """Three ``conv3×3 → bn → relu`` layers, 3 → 8 → 8 → 8 channels, stride 1.

    3 units (``layers.0.0``, ``layers.1.0``, ``layers.2.0``), 4 positions (the input
    and one per unit), no joins. ``layers.1.0`` and ``layers.2.0`` are reducible.
    """

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(conv_bn(3, 8), conv_bn(8, 8), conv_bn(8, 8))

    def forward(self, x):
        return self.layers(x)


class Conv1dChain(nn.Module):
    """Three ``Conv1d(k=3) → BatchNorm1d → ReLU`` layers on a (1, 4, 32) signal."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(4, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8)
        self.c2, self.b2 = nn.Conv1d(8, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8)
        self.c3 = nn.Conv1d(8, 8, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return F.relu(self.c3(x))


class FunctionalActivations(nn.Module):
    """Seven convs (3 → 8, then 8 → 8), each followed by a different activation call.

    ``c1`` ``F.relu`` · ``c2`` ``torch.relu`` · ``c3`` ``x.relu()`` ·
    ``c4`` ``F.relu(x, inplace=True)`` · ``c5`` ``F.silu`` · ``c6`` ``F.hardswish`` ·
    ``c7`` none (the model output).
    """

    ACTIVATIONS = {"c1": "relu", "c2": "relu", "c3": "relu", "c4": "relu", "c5": "silu", "c6": "hardswish", "c7": None}

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        for name in ("c2", "c3", "c4", "c5", "c6", "c7"):
            setattr(self, name, nn.Conv2d(8, 8, 3, padding=1))

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = self.c3(x).relu()
        x = F.relu(self.c4(x), inplace=True)
        x = F.silu(self.c5(x))
        x = F.hardswish(self.c6(x))
        return self.c7(x)


class ReflectPadding(nn.Module):
    """``conv_a → relu → conv_b (padding_mode="reflect") → relu → conv_c → relu``.

    ``conv_b`` is ineligible (only zero padding can move in front of a span), so no
    span merges it with a neighbour: the model has single-unit spans only. (In
    ``torch.compile`` and ``torch.export`` graphs the reflect padding is an explicit
    ``pad`` op before an unpadded conv; the pad is the boundary there.)
    """

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.conv_c = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.conv_a(x))
        x = F.relu(self.conv_b(x))
        return F.relu(self.conv_c(x))


class SharedConv(nn.Module):
    """A stem conv, then one 8 → 8 conv module called at two sites with a ReLU between.

    Units: ``stem``, ``conv`` and ``conv#1`` (one unit per call site).
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.stem(x))
        x = self.relu(self.conv(x))
        return self.relu(self.conv(x))


# --------------------------------------------------------------------------- residual blocks
class BasicBlock(nn.Module):
    """A stem ``conv_bn(3, 8)``, then a ResNet basic block with an identity skip.

    ``out = relu(bn2(conv2(relu(bn1(conv1(s))))) + s)`` with ``s`` the stem's output.
    Units ``stem.0``, ``conv1``, ``conv2``; one add join whose region's source is the
    stem's position.
    """

    def __init__(self, channels: int = 8):
        super().__init__()
        self.stem = conv_bn(3, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        s = self.stem(x)
        out = self.relu(self.bn1(self.conv1(s)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + s)


class DownsampleBlock(nn.Module):
    """A stem ``conv_bn(3, 8)``, then a stride-2 basic block 8 → 16 with a 1×1 projection.

    Branch: ``conv1`` (3×3 s2) → bn → relu → ``conv2`` (3×3) → bn.
    Shortcut: ``downsample.0`` (1×1 s2) → ``downsample.1`` (bn). Add, then relu.
    """

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.downsample = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        s = self.stem(x)
        out = self.relu(self.bn1(self.conv1(s)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(s))


class InvertedResidual(nn.Module):
    """MobileNetV2-style: a stem, then expand 1×1 → depthwise 3×3 → project 1×1 (+ skip).

    ``stem`` conv_bn(3, 8) with ReLU6; block: ``expand`` 8 → 32 (bn, relu6),
    ``depthwise`` 32 → 32 groups=32 (bn, relu6), ``project`` 32 → 8 (bn, no activation,
    the linear bottleneck), residual add with the stem's output; then a ``head``
    1×1 conv 8 → 16 with ReLU6.
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
        self.expand = nn.Sequential(nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=True))
        self.depthwise = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=True)
        )
        self.project = nn.Sequential(nn.Conv2d(32, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.depthwise(self.expand(x)))
        return self.head(x)


class DepthwiseChain(nn.Module):
    """A stem conv 3 → 8, then two depthwise 3×3 convs (8 → 8, groups=8) with ReLUs."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.dw1 = conv_bn(8, 8, groups=8)
        self.dw2 = conv_bn(8, 8, groups=8)

    def forward(self, x):
        return self.dw2(self.dw1(self.stem(x)))


class InceptionModule(nn.Module):
    """A stem conv_bn(3, 8), three parallel branches concatenated, then a 1×1 head.

    Branches from the stem's output: ``b1`` 1×1 (8 → 4), ``b3`` 3×3 (8 → 4),
    ``b5`` 5×5 (8 → 4), each conv → bn → relu; ``torch.cat`` along channels (12),
    then ``head`` 1×1 (12 → 8) → bn → relu.
    """

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.b1 = conv_bn(8, 4, kernel=1)
        self.b3 = conv_bn(8, 4, kernel=3)
        self.b5 = conv_bn(8, 4, kernel=5)
        self.head = conv_bn(12, 8, kernel=1)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b3(x), self.b5(x)], dim=1)
        return self.head(x)


# --------------------------------------------------------------------------- inputs and outputs
class DictOutput(nn.Module):
    """A conv chain whose forward returns ``{"features": f, "out": y}``.

    ``f`` (the output of ``body.1.0``) is both a model output and the input of
    ``head``, so its position is pinned.
    """

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 8), conv_bn(8, 8))
        self.head = conv_bn(8, 8)

    def forward(self, x):
        f = self.body(x)
        return {"features": f, "out": self.head(f)}


Pair = namedtuple("Pair", ["left", "right"])


class NamedTupleOutput(nn.Module):
    """Two heads on a shared stem, returned as a ``namedtuple`` ``Pair(left, right)``."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.left = conv_bn(8, 8)
        self.right = conv_bn(8, 4, kernel=1)

    def forward(self, x):
        s = self.stem(x)
        return Pair(self.left(s), self.right(s))


class TupleInput(nn.Module):
    """Takes ``(x, y)`` (two images); ``conv_x(x) + conv_y(y)`` then a conv chain."""

    def __init__(self):
        super().__init__()
        self.conv_x = conv_bn(3, 8)
        self.conv_y = conv_bn(3, 8)
        self.body = nn.Sequential(conv_bn(8, 8), conv_bn(8, 8))

    def forward(self, x, y):
        return self.body(self.conv_x(x) + self.conv_y(y))


# --------------------------------------------------------------------------- tracing failures
class _DataDependent(nn.Module):
    """Data-dependent Python control flow: ``torch.fx`` cannot trace this module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


class UntraceableChild(nn.Module):
    """``pre`` conv_bn → ``gate`` (an untraceable child, kept whole) → ``post`` conv_bn ×2.

    ``gate`` becomes a leaf with a rejection saying why; the two ``post`` convs after
    it still form a span.
    """

    def __init__(self):
        super().__init__()
        self.pre = conv_bn(3, 8)
        self.gate = _DataDependent()
        self.post = nn.Sequential(conv_bn(8, 8), conv_bn(8, 8))

    def forward(self, x):
        return self.post(self.gate(self.pre(x)))


class TopLevelUntraceable(nn.Module):
    """Data-dependent control flow in the model's own forward: capture must fail cleanly."""

    def __init__(self):
        super().__init__()
        self.conv = conv_bn(3, 8)

    def forward(self, x):
        x = self.conv(x)
        if x.mean() > 0:
            return x * 2
        return x


# --------------------------------------------------------------------------- registry
CASES: dict[str, tuple[type[nn.Module], tuple]] = {
    "conv_chain": (ConvChain, (1, 3, 16, 16)),
    "conv1d_chain": (Conv1dChain, (1, 4, 32)),
    "functional_activations": (FunctionalActivations, (1, 3, 16, 16)),
    "reflect_padding": (ReflectPadding, (1, 3, 16, 16)),
    "shared_conv": (SharedConv, (1, 3, 16, 16)),
    "basic_block": (BasicBlock, (1, 3, 16, 16)),
    "downsample_block": (DownsampleBlock, (1, 3, 32, 32)),
    "inverted_residual": (InvertedResidual, (1, 3, 16, 16)),
    "depthwise_chain": (DepthwiseChain, (1, 3, 16, 16)),
    "inception": (InceptionModule, (1, 3, 16, 16)),
    "dict_output": (DictOutput, (1, 3, 16, 16)),
    "namedtuple_output": (NamedTupleOutput, (1, 3, 16, 16)),
    "tuple_input": (TupleInput, ((1, 3, 16, 16), (1, 3, 16, 16))),
    "untraceable_child": (UntraceableChild, (1, 3, 16, 16)),
}
"""name → (model class, input shape; a tuple of shapes for multi-input models)."""

TENSOR_CASES = tuple(name for name in CASES if name not in ("dict_output", "namedtuple_output", "tuple_input"))
"""Models taking one tensor and returning one tensor."""


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (in place)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return model


def build(name: str, seed: int = 0, train: bool = False) -> nn.Module:
    """Model ``name`` of :data:`CASES` with deterministic weights, in eval mode by default."""
    cls, _ = CASES[name]
    torch.manual_seed(seed)
    model = randomize_batchnorm(cls(), seed)
    return model.train(train)


def example_input(name: str, seed: int = 0):
    """A deterministic example input for model ``name`` (a tuple for multi-input models)."""
    _, shape = CASES[name]
    generator = torch.Generator().manual_seed(seed)
    if isinstance(shape[0], tuple):
        return tuple(torch.randn(s, generator=generator) for s in shape)
    return torch.randn(shape, generator=generator)
