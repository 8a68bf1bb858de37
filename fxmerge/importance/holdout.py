"""The ``paper`` estimator's data: a *holdout-train* and a disjoint *holdout-val* split.

The LayerMerge reference draws both from the training set (50 ImageNet images per
class each) and never touches the validation set. fxmerge draws them from
``data=`` the same way, deterministically:

* a **map-style Dataset** (or a ``DataLoader`` over one: its dataset, batch size and
  collate function are used, its sampler is not) is split *per sample*. The samples
  are put in a seeded random order; when the dataset lists its labels
  (``dataset.targets``, as ``ImageFolder`` and the torchvision datasets do) that order
  interleaves the classes — one sample of each class in turn — so that every prefix
  is class-balanced. ``holdout-val`` is the first ``holdout_val`` samples of that
  order, ``holdout-train`` the next ``holdout_train``: disjoint by construction.
* **any other iterable of batches** (a list, a generator) is split *per batch*: up
  to ``max_batches`` batches are read, put in a seeded random order, and
  ``holdout-val`` takes the first ``holdout_val`` batches, ``holdout-train`` the next.
* with ``eval_data=``, ``data`` is all holdout-train and ``eval_data`` all
  holdout-val (the user's own split, e.g. the reference's file lists).

A size is a count (samples, or batches for an iterable of batches) or a fraction of
what ``data`` holds; ``holdout_train=None`` takes everything ``holdout-val`` left.
Defaults: ``holdout_val=0.5``, ``holdout_train=None`` (an even split), ``seed=0``.
Each split is read once, moved to the model's device and kept in memory for every
entry; the batches stay as the user's data gives them (the ``paper`` estimator reads
``(input, label)`` from them, or hands them whole to ``loss_fn(model, batch)``).
There is no augmentation: every entry trains on the same batches in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from fxmerge.importance.keys import fingerprint


@dataclass
class Holdout:
    """The two splits as lists of batches on the model's device, what they are, and a fingerprint."""

    train: list
    val: list
    description: str
    fingerprint: str


def batch_size_of(batch: Any) -> int:
    """Samples in a batch as the user gave it: the first dimension of its first tensor."""
    for leaf in tree_leaves(batch):
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return 1


def count(size: int | float | None, pool: int, what: str, default: int) -> int:
    """A split size as a count: an int as it is, a float in (0, 1) as that share of ``pool``."""
    if size is None:
        return default
    if isinstance(size, float):
        if not 0 < size < 1:
            raise ValueError(f"{what} must be a count (int) or a fraction in (0, 1), got {size!r}")
        return max(1, round(pool * size))
    if int(size) < 1:
        raise ValueError(f"{what} must be at least 1, got {size!r}")
    return int(size)


def holdout_order(n: int, seed: int, targets: Sequence[int] | None = None) -> list[int]:
    """``range(n)`` in a seeded random order; with ``targets``, interleaving the classes."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    if targets is None:
        return order
    by_class: dict[int, list[int]] = {}
    for index in order:
        by_class.setdefault(int(targets[index]), []).append(index)
    lists = [by_class[c] for c in sorted(by_class)]
    return [items[k] for k in range(max(map(len, lists), default=0)) for items in lists if k < len(items)]


def split_sizes(pool: int, holdout_train, holdout_val, unit: str) -> tuple[int, int]:
    """``(train, val)`` counts out of ``pool`` items, checked to fit."""
    n_val = count(holdout_val, pool, "holdout_val", default=pool // 2)
    n_train = count(holdout_train, pool, "holdout_train", default=pool - n_val)
    if n_train < 1 or n_val + n_train > pool:
        raise ValueError(
            f"the paper estimator needs disjoint holdout-train ({n_train}) and holdout-val ({n_val}) "
            f"{unit}, but data= holds {pool} {unit}; pass more data or smaller holdout_train/holdout_val"
        )
    return n_train, n_val


def make_holdout(
    data: Any,
    eval_data: Any,
    device: torch.device,
    *,
    holdout_train: int | float | None,
    holdout_val: int | float | None,
    batch_size: int,
    max_batches: int | None,
    seed: int,
) -> Holdout:
    """Holdout-train and holdout-val from the user's ``data`` (see the module docstring)."""
    if eval_data is not None:
        train = _moved(_every_batch(data, batch_size, max_batches), device)
        val = _moved(_every_batch(eval_data, batch_size, max_batches), device)
        how = "data= as holdout-train, eval_data= as holdout-val"
    elif _indexable(data):
        dataset, size, collate = _dataset_of(data, batch_size)
        n_train, n_val = split_sizes(len(dataset), holdout_train, holdout_val, "samples")
        targets = _targets(dataset)
        order = holdout_order(len(dataset), seed, targets)
        val = _moved(_read(dataset, order[:n_val], size, collate), device)
        train = _moved(_read(dataset, order[n_val : n_val + n_train], size, collate), device)
        balance = "class-balanced " if targets is not None else ""
        how = f"{balance}per-sample split of a {len(dataset)}-sample dataset (seed {seed})"
    else:
        batches = _every_batch(data, batch_size, max_batches)
        n_train, n_val = split_sizes(len(batches), holdout_train, holdout_val, "batches")
        order = holdout_order(len(batches), seed)
        val = _moved([batches[k] for k in order[:n_val]], device)
        train = _moved([batches[k] for k in order[n_val : n_val + n_train]], device)
        how = f"per-batch split of {len(batches)} batches (seed {seed})"
    if not train or not val:
        raise ValueError("the paper estimator needs at least one holdout-train and one holdout-val batch")
    description = f"holdout-train {_amount(train)}, holdout-val {_amount(val)}: {how}"
    return Holdout(train, val, description, f"{_fingerprint(train)}/{_fingerprint(val)}")


# --------------------------------------------------------------------------- reading
def _indexable(data: Any) -> bool:
    dataset = data.dataset if isinstance(data, DataLoader) else data
    return (
        isinstance(dataset, Dataset)
        and not isinstance(dataset, IterableDataset)
        and hasattr(dataset, "__len__")
        and (not isinstance(data, DataLoader) or data.batch_size is not None)
    )


def _dataset_of(data: Any, batch_size: int) -> tuple[Dataset, int, Any]:
    """The dataset to split, the batch size and the collate function to batch it with."""
    if isinstance(data, DataLoader):
        return data.dataset, int(data.batch_size), data.collate_fn  # type: ignore[arg-type]
    return data, int(batch_size), None


def _targets(dataset: Dataset) -> list[int] | None:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    values = targets.tolist() if isinstance(targets, Tensor) else list(targets)
    if len(values) != len(dataset) or not all(isinstance(v, int) for v in values):  # type: ignore[arg-type]
        return None
    return values


def _read(dataset: Dataset, indices: list[int], batch_size: int, collate) -> list:
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, collate_fn=collate)
    return list(loader)


def _every_batch(data: Any, batch_size: int, max_batches: int | None) -> list:
    if isinstance(data, Tensor):
        return [data]
    if _indexable(data) and not isinstance(data, DataLoader):
        data = DataLoader(data, batch_size=int(batch_size), shuffle=False)
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be an iterable of batches, a DataLoader or a Dataset; got {type(data).__name__}")
    batches = []
    for batch in data:
        if max_batches is not None and len(batches) >= int(max_batches):
            break
        batches.append(batch)
    if not batches:
        raise ValueError("data= yielded no batches")
    return batches


def _moved(batches: list, device: torch.device) -> list:
    return [tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, b) for b in batches]


def _amount(batches: list) -> str:
    return f"{len(batches)} batches ({sum(batch_size_of(b) for b in batches)} samples)"


def _fingerprint(batches: list) -> str:
    return fingerprint(
        (f"{k}.{j}", leaf) for k, batch in enumerate(batches) for j, leaf in enumerate(tree_leaves(batch))
    )
