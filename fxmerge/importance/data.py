"""Data for the importance estimators: ``data=`` read once into a list of batches.

``data`` may be an iterable of batches (a DataLoader, a list...), a map-style
Dataset of ``(input, label)`` items (batched by ``batch_size``), a single tensor, or
``None`` (then ``random_batches`` seeded standard-normal batches shaped like the
example input are drawn). A batch is an input batch or an ``(input, label)`` pair;
for a model with k > 1 inputs, a k-tuple of tensors or ``((x1, .., xk), label)``;
or a dict with an input key (``input``, ``image``, ``x``...) and a label key
(``label``, ``target``, ``y``...). Every batch is moved to the model's device and
kept in memory, with a fingerprint for the cache key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from fxmerge.importance.keys import data_fingerprint

INPUT_KEYS = ("input", "inputs", "image", "images", "x")
LABEL_KEYS = ("label", "labels", "target", "targets", "y")


@dataclass
class Batch:
    """One batch: the model's positional inputs, the labels (``None`` when unlabelled), and the
    batch as ``data=`` gave it (on the model's device), which a ``loss_fn`` reads whole."""

    inputs: tuple
    label: Tensor | None
    raw: Any = None

    @property
    def size(self) -> int:
        return int(self.inputs[0].shape[0]) if self.inputs and isinstance(self.inputs[0], Tensor) else 1


@dataclass
class Data:
    """Every batch an estimator reads, whether they carry labels, a description and a fingerprint."""

    batches: list[Batch]
    labelled: bool
    description: str
    fingerprint: str


def device_of(inputs: tuple, module: nn.Module) -> torch.device:
    """The device of the first input tensor, else of the first parameter, else the CPU."""
    for value in inputs:
        if isinstance(value, Tensor):
            return value.device
    for value in module.parameters():
        return value.device
    return torch.device("cpu")


def batch_form(example_inputs: tuple) -> str:
    """What one batch of ``data=`` must look like for a model with these inputs (for messages)."""
    if len(example_inputs) == 1:
        return "a tensor batch x, or a pair (x, label)"
    k = len(example_inputs)
    return f"a {k}-tuple of tensors (x1, .., x{k}), or ((x1, .., x{k}), label)"


def _split(batch, k: int) -> tuple[tuple | None, object]:
    """``(inputs, label)`` of one batch as given, ``inputs`` ``None`` when it cannot be read."""
    if isinstance(batch, Tensor) and k == 1:
        return (batch,), None
    if isinstance(batch, Mapping):
        x = next((batch[key] for key in INPUT_KEYS if key in batch), None)
        if x is None:
            return None, None
        label = next((batch[key] for key in LABEL_KEYS if key in batch), None)
        return (tuple(x) if isinstance(x, (tuple, list)) else (x,)), label
    if isinstance(batch, (tuple, list)):
        items = list(batch)
        if k == 1 and len(items) in (1, 2) and isinstance(items[0], Tensor):
            return (items[0],), (items[1] if len(items) == 2 else None)
        if k > 1 and len(items) == k and all(isinstance(t, Tensor) for t in items):
            return tuple(items), None
        if k > 1 and len(items) == 2 and isinstance(items[0], (tuple, list)) and len(items[0]) == k:
            return tuple(items[0]), items[1]
    return None, None


def parse_batch(batch, example_inputs: tuple, device: torch.device) -> Batch:
    """One batch of ``data=`` as model inputs and labels on ``device``."""
    inputs, label = _split(batch, len(example_inputs))
    if inputs is None or len(inputs) != len(example_inputs):
        raise ValueError(
            f"cannot read a batch of type {type(batch).__name__} as model input: each batch of data= "
            f"must be {batch_form(example_inputs)}"
        )
    inputs = tuple(t.to(device) if isinstance(t, Tensor) else t for t in inputs)
    raw = tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, batch)
    return Batch(inputs, None if label is None else torch.as_tensor(label).to(device), raw)


def _random_data(example_inputs: tuple, count: int, seed: int) -> Data:
    generator = torch.Generator().manual_seed(int(seed))
    batches = []
    for _ in range(max(int(count), 1)):
        inputs = tuple(
            torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
            if isinstance(t, Tensor) and t.is_floating_point()
            else t
            for t in example_inputs
        )
        batches.append(Batch(inputs, None, inputs[0] if len(inputs) == 1 else inputs))
    shapes = [tuple(t.shape) for t in example_inputs if isinstance(t, Tensor)]
    description = (
        f"{len(batches)} random standard-normal batches shaped like example_input {shapes} "
        f"(seed {seed}); no data= given, pass real inputs for a meaningful estimate"
    )
    return Data(batches, False, description, data_fingerprint(batches))


def _source(data, example_inputs: tuple, batch_size: int) -> Iterable:
    if isinstance(data, Tensor):
        return [data]
    if isinstance(data, torch.utils.data.DataLoader):
        return data
    if isinstance(data, torch.utils.data.Dataset):
        return torch.utils.data.DataLoader(data, batch_size=int(batch_size), shuffle=False)
    if isinstance(data, Iterable):
        return data
    raise TypeError(
        f"data must be an iterable of batches (each {batch_form(example_inputs)}), a DataLoader or "
        f"a Dataset; got {type(data).__name__}"
    )


def load_data(
    data,
    example_inputs: tuple,
    device: torch.device,
    *,
    batch_size: int,
    max_batches: int | None,
    random_batches: int,
    seed: int,
) -> Data:
    """Read ``data`` once into a list of batches (or draw random ones when it is ``None``)."""
    if data is None:
        return _random_data(example_inputs, random_batches, seed)
    batches: list[Batch] = []
    for batch in _source(data, example_inputs, batch_size):
        if max_batches is not None and len(batches) >= int(max_batches):
            break
        batches.append(parse_batch(batch, example_inputs, device))
    if not batches:
        raise ValueError("data= yielded no batches")
    labelled = {b.label is not None for b in batches}
    if len(labelled) > 1:
        raise ValueError("data= mixes labelled (input, label) batches with unlabelled ones")
    is_labelled = labelled.pop()
    samples = sum(b.size for b in batches)
    kind = "labelled" if is_labelled else "unlabelled"
    return Data(
        batches,
        is_labelled,
        f"{len(batches)} {kind} batches, {samples} samples",
        data_fingerprint(batches),
    )


def needs_labels(name: str, example_inputs: tuple, loaded: Data | None, what: str = "data") -> str:
    """The message for an estimator that needs labels and got none."""
    got = "no data" if loaded is None or "random" in loaded.description else "unlabelled batches"
    return (
        f"importance estimator {name!r} needs labelled data, got {got}: pass {what}= as an iterable of "
        f"(input, label) batches — e.g. a DataLoader over a Dataset whose items are (input, label) — "
        f"where each batch is {batch_form(example_inputs)} and label holds class indices "
        f"(input batch shaped like {[tuple(t.shape) for t in example_inputs if isinstance(t, Tensor)]}). "
        "Without labels, use estimator='distortion'."
    )
