"""What the training estimators (``finetune``, ``paper``) share.

Both fine-tune each entry's network — its own copy of every parameter — with
:func:`fxmerge.train.train_steps` (fxmerge's one training loop) and measure it
after. They share here:

* :func:`entry_seed` (with :func:`~fxmerge.importance.base.seeded`): each entry trains under its own seed, a
  hash of its id, so a result does not depend on the order entries run in, nor on
  which process of a group ran it; the global RNG (and the CUDA one) is restored after;
* :class:`TrainingEstimator`: the device, the optimizer from the options, the
  supervised loss of a batch, and the parameters made trainable;
* re-initialising one conv call site in any graph form (a module, ``F.conv*`` or
  ``aten.convolution`` on ``get_attr`` weights): :func:`conv_parameters` finds the
  weight and bias, :func:`reset_conv` applies ``nn.Conv*.reset_parameters``'s rule
  (Kaiming-uniform with ``a = √5``, bias uniform in ±1/√fan_in) from a generator, and
  :func:`reset_batchnorms` resets the unit's BatchNorms the way
  ``nn.BatchNorm*.reset_parameters`` does (statistics 0 and 1, weight 1, bias 0).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterable, Mapping

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.node import Node

from fxmerge.capture import Captured
from fxmerge.fxutil import arg, fetch_attr
from fxmerge.importance.base import Estimator, first_tensor
from fxmerge.importance.data import Batch
from fxmerge.ir import SpanGraph, Unit
from fxmerge.nodes import is_native_batchnorm
from fxmerge.train import make_optimizer, train_steps


def entry_seed(seed: int, entry_id: str) -> int:
    """The seed an entry trains under: ``seed`` plus a hash of the entry id."""
    return int(seed) + int(hashlib.sha256(entry_id.encode()).hexdigest()[:8], 16)


class TrainingEstimator(Estimator):
    """An estimator that trains each entry's network before measuring it."""

    def __init__(
        self,
        captured: Captured,
        span_graph: SpanGraph,
        options: Mapping,
        device: torch.device,
    ) -> None:
        super().__init__(captured, span_graph, options)
        self.device = device
        self.reinitialised = 0

    def optimizer(self, gm: nn.Module) -> torch.optim.Optimizer:
        """The optimizer of the options over every parameter of ``gm``, all made trainable."""
        params = list(gm.parameters())
        for p in params:
            p.requires_grad_(True)
        return make_optimizer(
            params,
            self.options.get("optimizer", "sgd"),
            float(self.options["lr"]),
            momentum=float(self.options["momentum"]),
            weight_decay=float(self.options["weight_decay"]),
            nesterov=bool(self.options.get("nesterov", False)),
        )

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The training loss of one batch: ``loss_fn(model, batch)``, else cross-entropy on its labels."""
        if self.options.get("loss_fn") is not None:
            return self.options["loss_fn"](model, batch.raw)
        return F.cross_entropy(first_tensor(model(*batch.inputs)), batch.label)

    def train(self, gm: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, schedule=None) -> int:
        """Train ``gm`` on ``batches`` with :meth:`loss` (:func:`fxmerge.train.train_steps`)."""
        return train_steps(gm, batches, self.loss, optimizer, schedule)

    def stats(self) -> dict:
        return {"reinitialised": self.reinitialised}


# --------------------------------------------------------------------------- re-initialising a unit
def conv_parameters(base: torch.fx.GraphModule, conv_node: str) -> tuple[str, str | None] | None:
    """Attribute paths of a conv call site's weight and bias, in any graph form (``None``: not attributes)."""
    node = _node(base, conv_node)
    if node is None:
        return None
    if node.op == "call_module":
        module = base.get_submodule(node.target)
        bias = f"{node.target}.bias" if getattr(module, "bias", None) is not None else None
        return f"{node.target}.weight", bias
    weight, bias = arg(node, 1, "weight"), arg(node, 2, "bias")
    if not (isinstance(weight, Node) and weight.op == "get_attr"):
        return None
    bias_path = bias.target if isinstance(bias, Node) and bias.op == "get_attr" else None
    return weight.target, bias_path


def reset_conv(weight: Tensor, bias: Tensor | None, generator: torch.Generator) -> None:
    """``nn.Conv*.reset_parameters`` on a bare weight and bias, drawing from ``generator``."""
    fan_in = weight.shape[1] * math.prod(weight.shape[2:])
    with torch.no_grad():
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        if bias is not None and fan_in > 0:
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(bias, -bound, bound, generator=generator)


def reset_unit(gm: torch.fx.GraphModule, base: torch.fx.GraphModule, unit: Unit, generator: torch.Generator) -> bool:
    """Re-initialise ``unit``'s conv (and BatchNorms) in ``gm``, an entry's network of ``base``."""
    found = conv_parameters(base, unit.conv_node)
    if found is None:
        return False
    try:
        weight = fetch_attr(gm, found[0])
        bias = fetch_attr(gm, found[1]) if found[1] is not None else None
    except AttributeError:
        return False
    reset_conv(weight, bias, generator)
    reset_batchnorms(gm, base, unit.affine_nodes)
    return True


_STATS = ("running_mean", "running_var", "weight", "bias")
_BN_SLOTS = {  # argument index of running_mean, running_var, weight, bias (F.batch_norm also by keyword)
    F.batch_norm: (1, 2, 3, 4),
    torch.ops.aten.batch_norm.default: (3, 4, 1, 2),
    torch.ops.aten._native_batch_norm_legit_no_training.default: (3, 4, 1, 2),
}


def reset_batchnorms(gm: torch.fx.GraphModule, base: torch.fx.GraphModule, names: Iterable[str]) -> int:
    """Reset the BatchNorms among ``base``'s nodes ``names`` in ``gm``; how many were reset."""
    done = 0
    for name in names:
        node = _node(base, name)
        source = node.args[0] if node is not None and node.args else None
        if isinstance(source, Node) and is_native_batchnorm(source):
            node = source  # getitem(native batch norm, 0)
        if node is None:
            continue
        if node.op == "call_module":
            module = base.get_submodule(node.target)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                gm.get_submodule(node.target).reset_parameters()
                done += 1
        elif node.op == "call_function" and node.target in _BN_SLOTS:
            done += _reset_functional(gm, node, _BN_SLOTS[node.target])
    return done


def _reset_functional(gm: torch.fx.GraphModule, node: Node, slots: tuple[int, ...]) -> int:
    values = (0.0, 1.0, 1.0, 0.0)  # running mean, running var, weight, bias
    with torch.no_grad():
        for slot, name, value in zip(slots, _STATS, values):
            source = arg(node, slot, name)
            if isinstance(source, Node) and source.op == "get_attr":
                with contextlib.suppress(AttributeError):
                    fetch_attr(gm, source.target).fill_(value)
    return 1


def _node(gm: torch.fx.GraphModule, name: str) -> Node | None:
    return next((n for n in gm.graph.nodes if n.name == name), None)
