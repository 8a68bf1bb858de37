"""The ``paper`` estimator: LayerMerge's own importance (Kim et al., ICML 2024), as its reference code does it.

Per entry, the network with only that entry applied — its own copy of every
parameter — is fine-tuned for ``epochs`` (1) epoch on *holdout-train*, then measured
on the disjoint *holdout-val* (:mod:`fxmerge.importance.holdout` makes both from
``data=``); ``Δ`` is its change against the original network (not fine-tuned) on the
same holdout-val:

* classification (``metric="accuracy"``, the default without ``loss_fn``):
  ``Δ = acc_entry − acc_orig`` as fractions, so ``I = exp(Δ)`` is the reference's
  ``exp(acc / 100)`` up to the constant factor ``exp(acc_orig / 100)``;
* any other task (``metric="loss"``, the default with ``loss_fn``): the relative loss
  change ``Δ = −(L_entry − L_orig) / L_orig``.

Training follows the reference (``layer_merge/kim24layermerge/importance.py`` of
``snu-mllab/LayerMerge``): SGD with momentum 0.9, Nesterov, weight decay 1e-5, the
user's learning rate (``lr``, default 0.01) decayed per step by a cosine from ``lr``
to 0 over the epoch (``schedule="cos"``; ``"const"`` keeps it), cross-entropy,
BatchNorm in train mode, every parameter trained.

**Spans of one conv are re-initialised and evaluated.** The reference resets the conv
(``reset_parameters``) and its BatchNorm of every span between two consecutive
positions — a span of exactly one conv, whatever it absorbs — before the fine-tune,
and evaluates it like any other entry; so the importance of keeping a conv
unmerged is how well the network recovers that conv from scratch in one epoch.
Here that is every entry whose span holds one unit (with ``reinit_single=True``, the
default): its conv gets ``nn.Conv*.reset_parameters``'s rule and its BatchNorms
``nn.BatchNorm*``'s, in any graph form (:mod:`fxmerge.importance.tuning`). Only the
entries that every plan holds — a one-option span over units no other span covers,
and under ``rules="paper"`` the spans outside the reference's table (the stem, the
projection shortcuts, excluded convs) — get ``Δ = 0`` unevaluated: their importance
is the same in every plan, and the reference has no row for them.

``loss_fn(model, batch) -> scalar`` replaces cross-entropy for a non-classification
task; ``batch`` is one batch of ``data`` as the user gave it (on the model's device),
so a generative model can draw its noise and timesteps inside it — from torch's
global RNG, which is seeded per entry for training and reset to ``seed`` before every
holdout-val evaluation: the original and every entry are measured on the same noise.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from fxmerge.capture import Captured
from fxmerge.importance.base import evaluate, first_tensor, seeded
from fxmerge.importance.data import Batch, needs_labels, parse_batch
from fxmerge.importance.entries import forced_entries
from fxmerge.importance.holdout import Holdout, batch_size_of
from fxmerge.importance.tuning import TrainingEstimator, entry_seed, reset_unit
from fxmerge.ir import Entry, SpanGraph, entry_id
from fxmerge.passes.rules import paper_table
from fxmerge.train import cosine_schedule


def paper_metric(options: Mapping) -> str:
    """``metric``, with ``"auto"`` resolved: accuracy without ``loss_fn``, the loss with one."""
    if options["metric"] != "auto":
        return str(options["metric"])
    return "accuracy" if options["loss_fn"] is None else "loss"


class Paper(TrainingEstimator):
    label = "paper"

    def __init__(
        self,
        captured: Captured,
        span_graph: SpanGraph,
        options: Mapping,
        holdout: Holdout,
        device: torch.device,
    ) -> None:
        super().__init__(captured, span_graph, options, device)
        self.loss_fn = options["loss_fn"]
        self.metric = paper_metric(options)
        self.train_batches = self._readable(holdout.train, labels=self.loss_fn is None)
        self.val_batches = self._readable(holdout.val, labels=self.loss_fn is None or self.metric == "accuracy")
        self.description = holdout.description
        self.data_fingerprint = holdout.fingerprint
        self.free = forced_entries(span_graph) | _outside_table(span_graph)

    def _readable(self, batches: list, *, labels: bool) -> list:
        """The user's batches, or as ``Batch`` (model inputs and labels) when labels are read."""
        if not labels:
            return batches
        parsed = [parse_batch(b, self.captured.example_inputs, self.device) for b in batches]
        if any(b.label is None for b in parsed):
            raise ValueError(
                needs_labels("paper", self.captured.example_inputs, None, what="data")
                + " Or pass loss_fn=(model, batch) -> loss for a task without labels."
            )
        return parsed

    @override
    def is_free(self, entry: Entry) -> bool:
        return entry.id in self.free

    @override
    def loss(self, model: nn.Module, batch) -> Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(model, batch)
        return F.cross_entropy(first_tensor(model(*batch.inputs)), batch.label)

    def score(self, model: nn.Module) -> float:
        """Holdout-val accuracy, or mean loss per sample, of ``model`` in eval mode (RNG at ``seed``)."""
        model.eval()
        with seeded(int(self.options["seed"]), self.device), torch.no_grad():
            if self.metric == "accuracy":
                return evaluate(((model(*b.inputs), b) for b in self.val_batches), "accuracy")
            total = samples = 0.0
            for batch in self.val_batches:
                size = batch.size if isinstance(batch, Batch) else batch_size_of(batch)
                total += float(self.loss(model, batch)) * size
                samples += size
            return total / samples

    @override
    def prepare(self) -> None:
        if self.reference is None:
            self.reference = self.score(self.base)

    @override
    def delta(self, gm: torch.fx.GraphModule, entry: Entry) -> float:
        with seeded(entry_seed(self.options["seed"], entry.id), self.device) as generator:
            span = self.span_graph.span(entry.span)
            if self.options["reinit_single"] and len(span.units) == 1:
                self.reinitialised += reset_unit(gm, self.base, self.span_graph.unit(span.units[0]), generator)
            optimizer = self.optimizer(gm)
            epochs = int(self.options["epochs"])
            schedule = None
            if self.options["schedule"] == "cos":
                schedule = cosine_schedule(optimizer, epochs * len(self.train_batches))
            for _ in range(epochs):
                self.train(gm, self.train_batches, optimizer, schedule)
        return self.change(self.score(gm))

    def change(self, value: float) -> float:
        """``Δ`` of a holdout-val score: the accuracy difference, or the relative loss decrease."""
        assert self.reference is not None, "prepare() first"
        if self.metric == "accuracy":
            return value - self.reference
        scale = self.reference if self.reference > 0 else 1.0
        return -(value - self.reference) / scale


def _outside_table(span_graph: SpanGraph) -> frozenset[str]:
    """Under ``rules="paper"``, the entries of spans the reference's table leaves out."""
    if span_graph.rules != "paper":
        return frozenset()
    table = {span.id for span in paper_table(span_graph)}
    return frozenset(
        entry_id(span.id, option.id) for span in span_graph.spans if span.id not in table for option in span.options
    )
