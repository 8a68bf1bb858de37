"""Fine-tuning helpers for a linearized model: plain supervised training or distillation.

Deliberately ordinary: SGD with momentum (or AdamW), a cosine learning-rate schedule,
cross-entropy on labels, or — with ``teacher=`` and no labels needed — the KL
divergence to the original model's softened outputs (Hinton et al.), or both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def _batches(data: Iterable):
    for batch in data:
        if isinstance(batch, (tuple, list)):
            yield batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            yield batch, None


def finetune(
    model: nn.Module,
    data: Iterable,
    *,
    epochs: int = 1,
    lr: float = 0.01,
    optimizer: str = "sgd",
    weight_decay: float = 1e-4,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    distill_weight: float = 1.0,
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` in place on ``data`` (batches of inputs, or (input, label) pairs).

    With ``teacher``, the loss adds ``distill_weight * T² * KL(teacher/T ‖ model/T)``; batches
    without labels then train on the distillation loss alone.
    """
    from tqdm.auto import tqdm

    if epochs < 0:
        raise ValueError("epochs must be non-negative")
    batches = list(data) if not hasattr(data, "__len__") else data
    steps = max(1, epochs * len(batches))
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose 'sgd' or 'adamw'")
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    if teacher is not None:
        teacher.eval()
    model.train()
    bar = tqdm(total=steps, desc="fine-tune", disable=not progress, leave=False)
    for _ in range(epochs):
        for inputs, labels in _batches(batches):
            outputs = model(inputs)
            loss = outputs.new_zeros(())
            if labels is not None:
                loss = loss + F.cross_entropy(outputs, labels)
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(inputs)
                loss = loss + distill_weight * temperature**2 * F.kl_div(
                    F.log_softmax(outputs / temperature, dim=1), F.log_softmax(target / temperature, dim=1),
                    reduction="batchmean", log_target=True,
                )
            if labels is None and teacher is None:
                raise ValueError("batches have no labels: pass teacher= to distill from the original model")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, data: Iterable) -> float:
    """Top-1 accuracy of ``model`` on (input, label) batches, in eval mode."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for inputs, labels in _batches(data):
        if labels is None:
            raise ValueError("accuracy needs (input, label) batches")
        correct += int((model(inputs).argmax(1) == labels).sum())
        total += len(labels)
    model.train(was_training)
    return correct / max(total, 1)
