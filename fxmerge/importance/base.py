"""The estimator interface, and the metric helpers the estimators share.

An estimator turns the network of one entry into ``Δ``, a change relative to the
original model (``reference`` is the original's value where one is needed). The
build loop (:mod:`fxmerge.importance.table`) drives it:

1. ``prepare()`` once, before the first entry that is not cached (never if all are);
2. per entry that is not free (``is_free``: by default the entries that are the
   original network), ``network(plan)`` — :func:`~fxmerge.passes.linearize.linearize` of the
   captured graph, sharing the captured model's parameters when the estimator only
   evaluates (``shares_parameters``), its own copy when it trains — then
   ``delta(gm, entry)``; an estimator with ``same_network_same_delta`` (deterministic,
   no training) evaluates each distinct network once
   (:func:`~fxmerge.importance.signature.network_signature`);
3. ``stats()`` for the table's ``info``.

An estimator whose reference costs an evaluation of its own (a user callable)
sets ``caches_reference``: the loop reads that reference from the cache, or stores
it there after ``prepare()`` computed it, like an entry. One with
``needs_cache_key`` is cached only when the build is given a ``cache_key``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from fxmerge.capture import Captured
from fxmerge.importance.data import Batch
from fxmerge.importance.entries import entry_cost, is_identity
from fxmerge.ir import Entry, SpanGraph
from fxmerge.passes.linearize import linearize
from fxmerge.plan import Plan


class Estimator:
    """Computes ``Δ`` of an entry from the network that applies only that entry."""

    label: str = ""
    shares_parameters = False  # evaluation only: the entry's network may share the captured tensors
    caches_reference = False  # the reference costs an evaluation: the loop caches it like an entry
    needs_cache_key = False  # cached only when the build is given a cache_key (which names the estimator)
    same_network_same_delta = False  # Δ depends on the network alone: identical networks share one evaluation
    reference: float | None = None
    repeated = 0  # entries whose network was one already evaluated (counted by the run loop)
    description: str = ""
    data_fingerprint: str | None = None

    def __init__(self, captured: Captured, span_graph: SpanGraph, options: Mapping[str, Any]) -> None:
        self.captured = captured
        self.base = captured.gm
        self.span_graph = span_graph
        self.options = dict(options)

    @property
    def key_label(self) -> str:
        """The estimator's name in cache keys."""
        return self.label

    def network(self, plan: Plan) -> torch.fx.GraphModule:
        """The captured network with ``plan`` applied, in eval mode."""
        return linearize(self.captured, self.span_graph, plan, share_parameters=self.shares_parameters)

    def is_free(self, entry: Entry) -> bool:
        """Whether ``entry`` gets ``Δ = 0`` without an evaluation (default: it is the original network)."""
        return is_identity(self.span_graph, entry)

    def cost(self, entry: Entry) -> float:
        """The expected cost of evaluating ``entry`` (balances entries across processes): its
        network's multiply-adds (:func:`~fxmerge.importance.entries.entry_cost`)."""
        return entry_cost(self.span_graph, entry)

    def prepare(self) -> None:
        """Called before the first entry that is not cached (not at all if all are)."""

    def delta(self, gm: torch.fx.GraphModule, entry: Entry) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def stats(self) -> dict:
        """What the estimator adds to the table's ``info``."""
        return {}


# --------------------------------------------------------------------------- outputs and metrics
def tensors(output: Any) -> list[Tensor]:
    """The floating tensors of a model output (a tensor, tuple, dict...), in order."""
    return [t for t in tree_leaves(output) if isinstance(t, Tensor) and t.is_floating_point()]


def first_tensor(output: Any) -> Tensor:
    """The first floating tensor of a model output (the logits of a classifier)."""
    found = tensors(output)
    if not found:
        raise ValueError(f"the model's output ({type(output).__name__}) holds no floating tensor")
    return found[0]


def evaluate(outputs: Iterable[tuple[Any, Batch]], metric: str) -> float:
    """Mean cross-entropy or top-1 accuracy over ``(output, batch)`` pairs, weighted by batch size."""
    total = count = 0.0
    for output, batch in outputs:
        logits = first_tensor(output)
        n = batch.size
        if metric == "accuracy":
            total += float((logits.argmax(dim=1) == batch.label).sum())
        else:
            total += float(F.cross_entropy(logits, batch.label)) * n
        count += n
    return total / count


def signed(metric: str, value: float, reference: float) -> float:
    """Δ: a higher loss or a lower accuracy is a drop."""
    return -(value - reference) if metric == "loss" else value - reference


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[torch.Generator]:
    """Run under ``torch.manual_seed(seed)`` (the caller's RNG state restored after); yields a
    generator on ``device`` seeded the same way."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield torch.Generator(device=device).manual_seed(seed)


BatchLoss = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> scalar``: the user's loss of one batch as ``data=`` gives it.

One meaning for every estimator that takes it (``loss``, ``finetune``, ``paper``): a
task that is not classification — a diffusion model draws its noise and timesteps
inside it, from torch's global RNG, which fxmerge seeds.
"""


def mean_batch_loss(model: nn.Module, batches: Iterable[Batch], loss_fn: BatchLoss, seed: int) -> float:
    """Mean ``loss_fn(model, batch)`` per sample, eval mode, no grad, torch's RNG at ``seed``.

    The same seed for the original and every entry: each is measured on the same draws.
    """
    model.eval()
    total = samples = 0.0
    device = next((t.device for b in batches for t in b.inputs if isinstance(t, Tensor)), torch.device("cpu"))
    with seeded(int(seed), device), torch.no_grad():
        for batch in batches:
            total += float(loss_fn(model, batch.raw)) * batch.size
            samples += batch.size
    return total / samples


def relative_drop(value: float, reference: float) -> float:
    """Δ of a user loss: its relative change, negated (a higher loss is a drop)."""
    return -(value - reference) / reference if reference else -(value - reference)
