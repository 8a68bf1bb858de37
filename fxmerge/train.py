"""Training: fxmerge's one training loop, and fine-tuning a linearized model on one process or many.

* :func:`train_steps` is the loop every trainer in fxmerge runs — :func:`finetune`
  here, and the ``finetune`` and ``paper`` importance estimators: train mode, then
  per batch ``loss_of(model, batch)``, backward, an optimizer step and a schedule step.
* :func:`make_optimizer` (SGD with momentum, optionally Nesterov; Adam; AdamW; or a
  callable ``(params, lr)``) and :func:`cosine_schedule` (per step, from ``lr`` to 0).
* :func:`finetune` is deliberately ordinary: SGD with Nesterov momentum (or AdamW), a
  cosine schedule, cross-entropy on labels, or — with ``teacher=`` and no labels
  needed — the KL divergence to the original model's softened outputs (Hinton et
  al.), or both. :func:`accuracy` is top-1 in eval mode.

Under a ``torch.distributed`` process group (``torchrun``), :func:`finetune` trains
with ``DistributedDataParallel`` — gradients averaged over ranks, each rank on its
share of the data: a ``DistributedSampler`` over the dataset of a given
``DataLoader`` (same batch size, workers and collate function; shuffled when the
loader shuffled) or over a given map-style ``Dataset``, and for any other iterable of
batches every ``world_size``-th batch (padded by wrapping so that every rank takes
the same number of steps); at the end every rank takes rank 0's buffers (BatchNorm
statistics), so all hold the same model. Only rank 0 shows progress; nothing here
writes files.
:func:`accuracy` then counts on each rank's share and sums over ranks. Batches are
moved to the model's device as they are read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler

from fxmerge import distributed

LossOf = Callable[[nn.Module, Any], Tensor]
"""``loss_of(model, batch) -> scalar tensor``: the loss of one batch, differentiable."""


# --------------------------------------------------------------------------- the loop
def make_optimizer(
    params: Iterable[Tensor],
    kind: str | Callable = "sgd",
    lr: float = 0.01,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """``"sgd"`` (with ``momentum``, ``nesterov``), ``"adam"``, ``"adamw"``, or ``kind(params, lr)``."""
    params = list(params)
    if callable(kind):
        return kind(params, lr)
    if kind == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov and momentum > 0
        )
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}; choose 'sgd', 'adam' or 'adamw', or pass a callable (params, lr)")


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Step ``i`` of ``steps`` runs at ``lr · (1 + cos(π i / steps)) / 2``: ``lr`` first, towards 0."""
    total = max(int(steps), 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))


def train_steps(
    model: nn.Module,
    batches: Iterable,
    loss_of: LossOf,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_step: Callable[[Tensor], object] | None = None,
) -> int:
    """One optimizer step per batch of ``batches``, in train mode; returns the number of steps.

    ``on_step(loss)`` is called after each step with the (detached) loss.
    """
    model.train()
    steps = 0
    with torch.enable_grad():
        for batch in batches:
            loss = loss_of(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            steps += 1
            if on_step is not None:
                on_step(loss.detach())
    return steps


# --------------------------------------------------------------------------- fine-tuning
def finetune(
    model: nn.Module,
    data: Iterable | Dataset,
    *,
    epochs: int = 1,
    lr: float = 0.01,
    optimizer: str = "sgd",
    weight_decay: float = 1e-4,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    distill_weight: float = 1.0,
    batch_size: int = 32,
    progress: bool = True,
    loss_fn: LossOf | None = None,
) -> nn.Module:
    """Train ``model`` in place on ``data`` (batches of inputs, or (input, label) pairs).

    ``data`` is an iterable of batches (a list, a ``DataLoader``) or a map-style
    ``Dataset`` of ``(input, label)`` items, batched by ``batch_size``. With
    ``teacher``, the loss adds ``distill_weight * T² * KL(teacher/T ‖ model/T)``;
    batches without labels then train on the distillation loss alone. With
    ``loss_fn(model, batch) -> scalar`` (a task that is not classification, e.g. a
    diffusion model's denoising loss, which draws its own noise), each batch as
    ``data`` gives it is handed to ``loss_fn`` instead. Under a process group,
    trains with DistributedDataParallel (see the module docstring).
    """
    from tqdm.auto import tqdm

    if epochs < 0:
        raise ValueError("epochs must be non-negative")
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"unknown optimizer {optimizer!r}; choose 'sgd' or 'adamw'")
    if loss_fn is not None and teacher is not None:
        raise ValueError("give loss_fn or teacher, not both: a loss_fn computes the whole loss of a batch")
    batches = rank_batches(data, batch_size)
    steps = max(1, epochs * len(batches))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optimizer, lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    schedule = cosine_schedule(opt, steps)
    if teacher is not None:
        teacher.eval()
    loss_of = loss_fn or _supervised(teacher, temperature, distill_weight)
    net = _parallel(model)
    bar = tqdm(total=steps, desc="fine-tune", disable=not (progress and distributed.is_main()), leave=False)

    def shown(loss: Tensor) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.4f}")

    device = _device_of(model)
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        moved = (_whole(b, device) if loss_fn else _moved(b, device) for b in batches)
        train_steps(net, moved, loss_of, opt, schedule, on_step=None if bar.disable else shown)
    bar.close()
    _same_buffers(model)
    model.eval()
    return model


def _same_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank: each rank's last forward updated its own."""
    distributed.broadcast_tensors([b.data for b in model.buffers()])


def _supervised(teacher: nn.Module | None, temperature: float, distill_weight: float) -> LossOf:
    """Cross-entropy on the labels, plus distillation from ``teacher`` when given."""

    def loss_of(model: nn.Module, batch: tuple[Tensor, Tensor | None]) -> Tensor:
        inputs, labels = batch
        if labels is None and teacher is None:
            raise ValueError("batches have no labels: pass teacher= to distill from the original model")
        outputs = model(inputs)
        loss = outputs.new_zeros(())
        if labels is not None:
            loss = loss + F.cross_entropy(outputs, labels)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(inputs)
            loss = loss + distill_weight * temperature**2 * F.kl_div(
                F.log_softmax(outputs / temperature, dim=1),
                F.log_softmax(target / temperature, dim=1),
                reduction="batchmean",
                log_target=True,
            )
        return loss

    return loss_of


@torch.no_grad()
def accuracy(model: nn.Module, data: Iterable) -> float:
    """Top-1 accuracy of ``model`` on (input, label) batches, in eval mode (summed over ranks)."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    correct = total = 0
    for inputs, labels in (_moved(b, device) for b in rank_share(data)):
        if labels is None:
            raise ValueError("accuracy needs (input, label) batches")
        correct += int((model(inputs).argmax(1) == labels).sum())
        total += len(labels)
    model.train(was_training)
    counts = distributed.all_gather_object((correct, total))
    correct, total = sum(c for c, _ in counts), sum(t for _, t in counts)
    return correct / max(total, 1)


# --------------------------------------------------------------------------- data and devices
class _Batches:
    """This rank's batches of one epoch; ``set_epoch`` reshuffles a distributed sampler."""

    def __init__(self, source: Iterable, sampler: DistributedSampler | None = None) -> None:
        self.source, self.sampler = source, sampler

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        return iter(self.source)

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)


def _map_style(dataset: Any) -> bool:
    return isinstance(dataset, Dataset) and not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__")


def rank_batches(data: Iterable | Dataset, batch_size: int = 32) -> _Batches:
    """The batches this rank trains on, the same number on every rank (see the module docstring)."""
    world, rank = distributed.world_size(), distributed.rank()
    if isinstance(data, DataLoader) and _map_style(data.dataset) and data.batch_size is not None:
        if world == 1:
            return _Batches(data)
        sampler = DistributedSampler(
            data.dataset,
            num_replicas=world,
            rank=rank,
            shuffle=isinstance(data.sampler, RandomSampler),
            seed=0,
            drop_last=data.drop_last,
        )
        loader = DataLoader(
            data.dataset,
            batch_size=data.batch_size,
            sampler=sampler,
            num_workers=data.num_workers,
            collate_fn=data.collate_fn,
            pin_memory=data.pin_memory,
            drop_last=data.drop_last,
        )
        return _Batches(loader, sampler)
    if _map_style(data) and not isinstance(data, DataLoader):
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)  # type: ignore[arg-type]
        return _Batches(DataLoader(data, batch_size=int(batch_size), sampler=sampler), sampler)  # type: ignore[arg-type]
    batches = list(data) if world > 1 or not hasattr(data, "__len__") else data
    if world == 1:
        return _Batches(batches)
    padded = list(batches) + list(batches)[: (-len(batches)) % world]  # every rank the same step count
    return _Batches(padded[rank::world])


def rank_share(data: Iterable) -> Iterable:
    """This rank's part of ``data`` for evaluation: disjoint across ranks, nothing repeated."""
    world, rank = distributed.world_size(), distributed.rank()
    if world == 1:
        return data
    if isinstance(data, DataLoader) and _map_style(data.dataset) and data.batch_size is not None:
        indices = list(range(rank, len(data.dataset), world))  # type: ignore[arg-type]
        return DataLoader(
            torch.utils.data.Subset(data.dataset, indices),
            batch_size=data.batch_size,
            num_workers=data.num_workers,
            collate_fn=data.collate_fn,
        )
    return list(data)[rank::world]


def _parallel(model: nn.Module) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel under a process group, else itself."""
    if not distributed.is_distributed():
        return model
    device = _device_of(model)
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=bool(unused_parameters(model)),
    )


def unused_parameters(model: nn.Module) -> list[str]:
    """Parameters a GraphModule's graph never reads (a linearized model keeps its pruned convs')."""
    if not isinstance(model, torch.fx.GraphModule):
        return []
    read = {n.target for n in model.graph.nodes if n.op == "get_attr"}
    modules = [n.target for n in model.graph.nodes if n.op == "call_module"]
    return [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and name not in read and not any(name.startswith(f"{m}.") for m in modules)
    ]


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _moved(batch: Any, device: torch.device) -> tuple[Any, Tensor | None]:
    """``(inputs, labels)`` of one batch, on ``device``."""
    if isinstance(batch, (tuple, list)):
        inputs, labels = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        inputs, labels = batch, None
    return _to(inputs, device), _to(labels, device)


def _whole(batch: Any, device: torch.device) -> Any:
    """Every tensor of one batch, as the user's data gives it, on ``device`` (for a ``loss_fn``)."""
    return tree_map(lambda value: _to(value, device), batch)


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, Tensor) else value
