"""The ``distortion`` estimator: how far an entry moves the model's output, no labels needed.

``Δ = −D`` where ``D`` is the divergence between the original model's output and
the entry's output on calibration inputs: ``KL(softmax(orig) ‖ softmax(entry))``
(mean over samples) for 2-D outputs (classifier logits), relative squared error
``‖entry − orig‖² / ‖orig‖²`` for any other tensor; a tuple or dict output sums the
divergences of its floating tensors. The original's outputs come from the recorded
run (:mod:`fxmerge.importance.replay`), so its reference is 0. Both divergences
are sums over samples, so the calibration batches are run as one stacked batch when
the network treats samples independently (:func:`~fxmerge.importance.replay.stack_batches`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch.fx
import torch.nn.functional as F
from typing_extensions import override

from fxmerge.capture import Captured
from fxmerge.importance.base import tensors
from fxmerge.importance.data import Data
from fxmerge.importance.replay import RecordedEstimator
from fxmerge.ir import Entry, SpanGraph


class Divergence:
    """Accumulates ``KL`` (2-D outputs) or relative squared error over batches, per output tensor."""

    def __init__(self) -> None:
        self.parts: dict[int, list[float]] = {}

    def add(self, reference: Any, output: Any) -> None:
        for k, (ref, out) in enumerate(zip(tensors(reference), tensors(output))):
            part = self.parts.setdefault(k, [0.0, 0.0])
            ref64, out64 = ref.detach().double(), out.detach().double()
            if ref.dim() == 2:
                p = F.log_softmax(ref64, dim=1)
                q = F.log_softmax(out64, dim=1)
                part[0] += float((p.exp() * (p - q)).sum())
                part[1] += ref.shape[0]
            else:
                part[0] += float(((out64 - ref64) ** 2).sum())
                part[1] += float((ref64**2).sum())

    def value(self) -> float:
        return math.fsum(num / den if den > 0 else (0.0 if num == 0 else math.inf) for num, den in self.parts.values())


class Distortion(RecordedEstimator):
    label = "distortion"
    stacks_batches = True  # KL and squared error are sums over samples

    def __init__(self, captured: Captured, span_graph: SpanGraph, options: Mapping, data: Data) -> None:
        super().__init__(captured, span_graph, options, data)
        self.reference = 0.0

    @override
    def delta(self, gm: torch.fx.GraphModule, entry: Entry) -> float:
        divergence = Divergence()
        for reference, output, _ in self.outputs(gm):
            divergence.add(reference, output)
        return -divergence.value()
