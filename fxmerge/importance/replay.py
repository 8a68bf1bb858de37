"""Reuse of what does not change: record the original run once, replay it for every entry.

Each calibration batch runs through the captured original graph once, under a
:class:`Recorder` that keeps every node's output by name (cloned, so a later
in-place op cannot change the record). An entry's linearized graph keeps the
captured node names for everything it did not touch; a node whose name, op, target,
arguments (by name) and module or attribute values are those of the original, and
whose inputs are all such nodes, computes exactly what it computed in the original
run (:func:`reusable_nodes`). That is every node not downstream of the span's first
new or rewired node; :class:`Replay` serves those from the record, so only the span
and what follows it is computed per entry. Values handed from the record to a
recomputed node are cloned first, since the record is shared by every entry and the
node may write in place.

:class:`RecordedEstimator` is the base of the estimators that only evaluate
(``distortion`` and ``loss``): it records each batch in ``prepare`` (within a memory
budget, ``cache_mb``; batches beyond it run a full forward) and yields the reference
and entry outputs of every batch. An estimator whose measure is a sum over samples
(``distortion``) sets ``stacks_batches``: its unlabelled batches of one shape are then
concatenated into a single batch when the original network gives the same outputs
for it as for the batches one by one (:func:`stack_batches`: the network treats
samples independently, as an eval-mode CNN does), so each entry runs one larger
forward instead of several small ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx.node import map_arg
from torch.utils._pytree import tree_leaves, tree_map

from fxmerge.capture import Captured
from fxmerge.fxutil import fetch_attr
from fxmerge.importance.base import Estimator
from fxmerge.importance.data import Batch, Data
from fxmerge.importance.entries import entry_cost
from fxmerge.ir import Entry, SpanGraph

_NOT_COMPUTED = ("placeholder", "get_attr", "output")


def clone(value: Any) -> Any:
    """A copy of a tensor; anything else as it is."""
    return value.clone() if isinstance(value, Tensor) else value


class Recorder(torch.fx.Interpreter):
    """Runs the original graph and keeps a copy of every node's output, by node name."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if n.op not in _NOT_COMPUTED:
            self.values[n.name] = tree_map(clone, result)  # before a later in-place op changes it
        return result


class Replay(torch.fx.Interpreter):
    """Runs a linearized graph; nodes in ``reusable`` take their recorded value."""

    def __init__(self, gm: torch.fx.GraphModule, values: Mapping[str, Any], reusable: frozenset[str]) -> None:
        super().__init__(gm)
        self.values = values
        self.reusable = reusable

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.name in self.reusable:
            return self.values[n.name]
        with self._set_current_node(n):
            args = map_arg(n.args, self._load)
            kwargs = map_arg(n.kwargs, self._load)
            return getattr(self, n.op)(n.target, args, kwargs)

    def _load(self, arg: torch.fx.Node) -> Any:
        value = self.env[arg]
        if arg.name in self.reusable or arg.op == "placeholder":
            return tree_map(clone, value)  # shared by every entry: the consumer may write in place
        return value


# --------------------------------------------------------------------------- which nodes are unchanged
def reusable_nodes(gm: torch.fx.GraphModule, original: torch.fx.GraphModule) -> frozenset[str]:
    """Names of ``gm``'s nodes that compute exactly what the same-named node of ``original`` did.

    A node qualifies when it exists in ``original`` under the same name with the same
    op, target and arguments (nodes compared by name), its module or attribute has
    the same values, and every node it reads qualifies (or is a placeholder, or a
    ``get_attr`` of equal value). That excludes everything downstream of the first
    node the rewrite added or changed. Placeholders and ``get_attr`` nodes are never
    served from a record, so they are not in the result.
    """
    before = {n.name: n for n in original.graph.nodes}
    ok: set[str] = set()
    result: set[str] = set()
    for node in gm.graph.nodes:
        old = before.get(node.name)
        if old is None or old.op != node.op or old.target != node.target or node.op == "output":
            continue
        if not _same_source(node, gm, original):
            continue
        if node.op in ("placeholder", "get_attr"):
            ok.add(node.name)
            continue
        if all(a.name in ok for a in node.all_input_nodes) and _same((node.args, node.kwargs), (old.args, old.kwargs)):
            ok.add(node.name)
            result.add(node.name)
    return frozenset(result)


def _same_source(node: torch.fx.Node, gm: torch.fx.GraphModule, original: torch.fx.GraphModule) -> bool:
    """Whether the attribute or module ``node`` reads holds the same values in both graphs."""
    try:
        if node.op == "get_attr":
            return _same(fetch_attr(gm, node.target), fetch_attr(original, node.target))
        if node.op == "call_module":
            return _same_module(gm.get_submodule(node.target), original.get_submodule(node.target))
    except AttributeError:
        return False
    return True


def _same(a, b) -> bool:
    """Structural equality of node arguments, nodes compared by name."""
    if isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node):
        return isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and a.name == b.name
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return (
            isinstance(a, (tuple, list))
            and isinstance(b, (tuple, list))
            and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b))
        )
    if isinstance(a, dict) or isinstance(b, dict):
        return (
            isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
        )
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return _same_tensor(a, b)
    if isinstance(a, slice) and isinstance(b, slice):
        return _same((a.start, a.stop, a.step), (b.start, b.stop, b.step))
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable means different
        return False


def _same_tensor(a, b) -> bool:
    if a is b:
        return True
    return (
        isinstance(a, Tensor)
        and isinstance(b, Tensor)
        and a.shape == b.shape
        and a.dtype == b.dtype
        and a.device == b.device
        and torch.equal(a, b)
    )


def _same_module(a: nn.Module, b: nn.Module) -> bool:
    if a is b:
        return True
    if type(a) is not type(b) or repr(a) != repr(b):
        return False
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    sa.update(a.named_buffers())
    sb.update(b.named_buffers())
    return sa.keys() == sb.keys() and all(_same_tensor(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- the estimators' base
class RecordedEstimator(Estimator):
    """Distortion and loss: each batch's original run is recorded once and replayed per entry."""

    shares_parameters = True
    same_network_same_delta = True
    stacks_batches = False

    def __init__(self, captured: Captured, span_graph: SpanGraph, options: Mapping, data: Data) -> None:
        super().__init__(captured, span_graph, options)
        self.data = data
        self.description = data.description
        self.data_fingerprint = data.fingerprint
        self.records: list[tuple[Batch, Any, dict | None]] | None = None
        self.recorded_batches = 0
        self.reused = self.nodes = 0
        self.stacked = False

    def cost(self, entry: Entry) -> float:
        """Only the span and what follows it is computed: the prefix is replayed."""
        return entry_cost(self.span_graph, entry, from_span=True)

    def prepare(self) -> None:
        if self.records is not None:
            return
        budget = float(self.options["cache_mb"]) * 2**20
        used = 0.0
        self.records = []
        batches = self.data.batches
        if self.stacks_batches:
            batches = stack_batches(self.base, batches)
        self.stacked = len(batches) < len(self.data.batches)
        with torch.no_grad():
            for batch in batches:
                values = None
                if self.options["reuse"] and used < budget:
                    recorder = Recorder(self.base)
                    output = recorder.run(*batch.inputs)
                    used += sum(t.nbytes for t in tree_leaves(recorder.values) if isinstance(t, Tensor))
                    values = recorder.values if used <= budget else None
                else:
                    output = self.base(*batch.inputs)
                self.records.append((batch, tree_map(clone, output), values))
        self.recorded_batches = sum(values is not None for _, _, values in self.records)
        self.on_recorded()

    def on_recorded(self) -> None:
        """Called once every batch is recorded (the loss estimator computes its reference here)."""

    def outputs(self, gm: torch.fx.GraphModule) -> Iterator[tuple[Any, Any, Batch]]:
        """``(reference output, entry output, batch)`` for every batch."""
        assert self.records is not None, "prepare() first"
        reusable = reusable_nodes(gm, self.base) if self.options["reuse"] else frozenset()
        self.reused += len(reusable)
        self.nodes += sum(n.op not in _NOT_COMPUTED for n in gm.graph.nodes)
        with torch.no_grad():
            for batch, reference, values in self.records:
                if values is not None and reusable:
                    output = Replay(gm, values, reusable).run(*batch.inputs)
                else:
                    output = gm(*batch.inputs)
                yield reference, output, batch

    def stats(self) -> dict:
        if self.records is None:
            return {}
        return {
            "recorded_batches": self.recorded_batches,
            "stacked_batches": self.stacked,
            "reused_nodes": self.reused / self.nodes if self.nodes else 0.0,
        }


# --------------------------------------------------------------------------- one batch instead of several
def stack_batches(base: torch.fx.GraphModule, batches: list[Batch], rtol: float = 1e-5) -> list[Batch]:
    """``batches`` concatenated into one along dimension 0, when that computes the same outputs.

    Only unlabelled batches whose inputs are all tensors of one shape beyond dimension 0
    are stacked, and only when the original network's output for the stack is the
    concatenation of its outputs for the batches (relative difference ≤ ``rtol`` per
    output tensor); otherwise, or when the stacked forward fails (a graph that baked
    the batch size), the batches come back unchanged.
    """
    if len(batches) < 2 or not _stackable(batches):
        return batches
    inputs = tuple(torch.cat(parts) for parts in zip(*(b.inputs for b in batches)))
    with torch.no_grad():
        try:
            together = base(*inputs)
        except (RuntimeError, ValueError, IndexError, TypeError):
            return batches
        apart = [base(*b.inputs) for b in batches]
    if not _same_outputs(together, apart, rtol):
        return batches
    return [Batch(inputs, None, inputs[0] if len(inputs) == 1 else inputs)]


def _stackable(batches: list[Batch]) -> bool:
    first = batches[0].inputs
    for batch in batches:
        if batch.label is not None or len(batch.inputs) != len(first):
            return False
        for value, reference in zip(batch.inputs, first):
            if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[1:] != reference.shape[1:]:
                return False
            if value.dtype != reference.dtype or value.device != reference.device:
                return False
    return True


def _same_outputs(together: Any, apart: list[Any], rtol: float) -> bool:
    leaves = [tree_leaves(out) for out in apart]
    joined = tree_leaves(together)
    if any(len(parts) != len(joined) for parts in leaves):
        return False
    for k, value in enumerate(joined):
        parts = [part[k] for part in leaves]
        if not isinstance(value, Tensor):
            if any(part != value for part in parts):
                return False
            continue
        if not all(isinstance(p, Tensor) for p in parts) or value.dim() == 0:
            return False
        expected = torch.cat(parts)
        if expected.shape != value.shape:
            return False
        scale = float(expected.double().norm())
        if float((value.double() - expected.double()).norm()) > rtol * max(scale, 1e-30):
            return False
    return True
