"""The ``loss`` estimator: labelled data, no training.

``Δ = −(loss_entry − loss_orig)`` (cross-entropy, or ``loss_fn(output, label)``
returning a batch mean), or with ``metric="accuracy"``, ``Δ = acc_entry − acc_orig``
(top-1, as a fraction). The original's value is computed once from the recorded run
(:mod:`fxmerge.importance.replay`).
"""

from __future__ import annotations

import torch.fx
from typing_extensions import override

from fxmerge.importance.base import evaluate, signed
from fxmerge.importance.replay import RecordedEstimator
from fxmerge.ir import Entry


class Loss(RecordedEstimator):
    label = "loss"

    @override
    def on_recorded(self) -> None:
        self.reference = evaluate(
            ((ref, batch) for batch, ref, _ in self.records),
            self.options["metric"],
            self.options["loss_fn"],
        )

    @override
    def delta(self, gm: torch.fx.GraphModule, entry: Entry) -> float:
        metric = self.options["metric"]
        value = evaluate(
            ((out, batch) for _, out, batch in self.outputs(gm)), metric, self.options["loss_fn"]
        )
        return signed(metric, value, self.reference)
