"""The ``loss`` estimator: labelled data, no training.

``Δ = −(loss_entry − loss_orig)`` (cross-entropy), or with ``metric="accuracy"``,
``Δ = acc_entry − acc_orig`` (top-1, as a fraction). The original's value is computed
once from the recorded run (:mod:`fxmerge.importance.replay`), and each entry replays
the unchanged prefix. With ``loss_fn(model, batch)`` (a task without labels, such as
a diffusion model's denoising loss) ``Δ`` is the relative change of its mean,
``−(L_entry − L_orig) / L_orig``, each network evaluated whole with torch's RNG at
``seed`` (the same draws for every entry).
"""

from __future__ import annotations

import torch.fx
from typing_extensions import override

from fxmerge.importance.base import evaluate, mean_batch_loss, relative_drop, signed
from fxmerge.importance.replay import RecordedEstimator
from fxmerge.ir import Entry


class Loss(RecordedEstimator):
    label = "loss"

    @override
    def prepare(self) -> None:
        if self.options["loss_fn"] is None:
            super().prepare()
        elif self.reference is None:
            self.reference = self._user_loss(self.base)

    @override
    def on_recorded(self) -> None:
        self.reference = evaluate(((ref, batch) for batch, ref, _ in self.records), self.options["metric"])

    @override
    def delta(self, gm: torch.fx.GraphModule, entry: Entry) -> float:
        if self.options["loss_fn"] is not None:
            return relative_drop(self._user_loss(gm), self.reference)
        metric = self.options["metric"]
        value = evaluate(((out, batch) for _, out, batch in self.outputs(gm)), metric)
        return signed(metric, value, self.reference)

    def _user_loss(self, model: torch.nn.Module) -> float:
        return mean_batch_loss(model, self.data.batches, self.options["loss_fn"], self.options["seed"])
