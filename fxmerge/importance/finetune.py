"""The ``finetune`` estimator: a short fine-tune of the entry's network, then its metric change.

The entry-applied network — its own copy of every parameter — is fine-tuned for
``steps`` steps on a training split (cycled, BatchNorm in train mode, every
parameter trained, constant learning rate), then ``Δ`` is its metric change on a
disjoint evaluation split, relative to the original model (not fine-tuned). The
training split is the first ``1 − eval_fraction`` of the batches and the evaluation
split the rest, unless ``eval_data`` gives the evaluation batches (then every batch
of ``data`` trains). With ``reinit_single`` a span that keeps exactly one conv
re-initialises it (Kaiming normal, fan-out, bias zero) first. Each entry trains under
its own seed (:func:`~fxmerge.importance.tuning.entry_seed`), so results do not
depend on the order entries are evaluated in, nor on the process that ran them.

This is a cheaper variant of the LayerMerge reference estimator, which is
``paper`` (:mod:`fxmerge.importance.paper`): one epoch with a cosine schedule,
single-conv spans re-initialised with the default initialisation and evaluated.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import torch
import torch.fx
from torch import Tensor, nn
from typing_extensions import override

from fxmerge.capture import Captured
from fxmerge.fxutil import fetch_attr
from fxmerge.importance.base import evaluate, mean_batch_loss, relative_drop, seeded, signed
from fxmerge.importance.data import Batch, Data
from fxmerge.importance.tuning import TrainingEstimator, conv_parameters, entry_seed
from fxmerge.ir import Entry, SpanGraph


class Finetune(TrainingEstimator):
    label = "finetune"

    def __init__(
        self,
        captured: Captured,
        span_graph: SpanGraph,
        options: Mapping,
        data: Data,
        eval_data: Data | None,
    ) -> None:
        train, evaluation, fingerprint = _split(data, eval_data, options["eval_fraction"])
        device = next((t.device for t in train[0].inputs if isinstance(t, Tensor)), torch.device("cpu"))
        super().__init__(captured, span_graph, options, device)
        self.train_batches, self.eval, self.data_fingerprint = train, evaluation, fingerprint
        samples = sum(b.size for b in self.train_batches), sum(b.size for b in self.eval)
        self.description = (
            f"fine-tune on {len(self.train_batches)} batches ({samples[0]} samples), "
            f"evaluate on {len(self.eval)} batches ({samples[1]} samples)"
        )

    def _metric(self, model: nn.Module) -> float:
        """The evaluation split's accuracy or cross-entropy, or the mean ``loss_fn`` (RNG at ``seed``)."""
        if self.options["loss_fn"] is not None:
            return mean_batch_loss(model, self.eval, self.options["loss_fn"], self.options["seed"])
        model.eval()
        with torch.no_grad():
            return evaluate(((model(*b.inputs), b) for b in self.eval), self.options["metric"])

    @override
    def prepare(self) -> None:
        if self.reference is None:
            self.reference = self._metric(self.base)

    def _reinit(self, gm: torch.fx.GraphModule, entry: Entry, generator: torch.Generator) -> None:
        """Kaiming-normal (fan-out), bias zero, for the one conv a span keeps."""
        span = self.span_graph.span(entry.span)
        kept = [u for u in span.units if u not in entry.option.pruned]
        if len(kept) != 1:
            return
        found = conv_parameters(self.base, self.span_graph.unit(kept[0]).conv_node)
        if found is None:
            return
        weight_path, bias_path = found
        with torch.no_grad():
            nn.init.kaiming_normal_(
                fetch_attr(gm, weight_path),
                mode="fan_out",
                nonlinearity="relu",
                generator=generator,
            )
            if bias_path is not None:
                fetch_attr(gm, bias_path).zero_()
        self.reinitialised += 1

    @override
    def delta(self, gm: torch.fx.GraphModule, entry: Entry) -> float:
        with seeded(entry_seed(self.options["seed"], entry.id), self.device) as generator:
            if self.options["reinit_single"]:
                self._reinit(gm, entry, generator)
            steps = int(self.options["steps"])
            self.train(gm, itertools.islice(itertools.cycle(self.train_batches), steps), self.optimizer(gm))
            value = self._metric(gm)
        assert self.reference is not None, "prepare() first"
        if self.options["loss_fn"] is not None:
            return relative_drop(value, self.reference)
        return signed(self.options["metric"], value, self.reference)


def _split(data: Data, eval_data: Data | None, eval_fraction) -> tuple[list[Batch], list[Batch], str]:
    """Training batches, evaluation batches and the data fingerprint."""
    if eval_data is not None:
        return data.batches, eval_data.batches, f"{data.fingerprint}+{eval_data.fingerprint}"
    n = len(data.batches)
    n_eval = math.ceil(n * float(eval_fraction))
    if n < 2 or n_eval >= n:
        raise ValueError(
            f"finetune needs at least 2 batches to split into a training and an evaluation part "
            f"(got {n}); pass more data, a smaller batch_size, or eval_data="
        )
    return (
        data.batches[: n - n_eval],
        data.batches[n - n_eval :],
        f"{data.fingerprint}/{eval_fraction}",
    )
