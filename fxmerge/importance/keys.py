"""Cache keys of the importance table: what an entry's Δ depends on, and how it is stored.

Every evaluated entry is one small JSON file in an :class:`~fxmerge.cache.EntryCache`
(format :data:`ENTRY_FORMAT`), named by a hash of its key and holding the key itself.
The key (:func:`entry_key`, plus the entry id) holds everything the value depends on:

* the span graph's fingerprint and the entry id;
* the estimator and its options (:func:`key_options`: callables by qualified name;
  options that never change a result, :data:`NOT_IN_KEY`, are left out);
* a fingerprint of the model's ``state_dict`` values and one of the data;
* the user's ``cache_key`` (which also names a user callable).

Fingerprints hash summary statistics of each tensor — shape, dtype, its float64 sum
and norm printed to 9 digits (so thread counts do not change them) and a strided
sample of about 1024 values — which is cheap for large models and large data.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fxmerge.cache import EntryCache, cache_dir
from fxmerge.ir import SpanGraph

ENTRY_FORMAT = "fxmerge.importance.entry/1"
ORIGINAL = "<original>"  # the entry id of a reference score that costs an evaluation of its own
NOT_IN_KEY = frozenset({"reuse", "cache_mb", "eval_data"})  # never change a result, or enter another way


def default_cache_dir() -> Path:
    """Where importance entries are cached unless told otherwise (``<cache root>/importance``)."""
    directory = cache_dir("importance")
    assert directory is not None  # only ``given=False`` disables a cache
    return directory


def open_cache(given: str | os.PathLike | bool | None) -> EntryCache | None:
    """The entry cache in ``given`` (default directory for ``None``/``True``), or ``None`` for ``False``."""
    directory = cache_dir("importance", given)
    return None if directory is None else EntryCache(directory, ENTRY_FORMAT)


# --------------------------------------------------------------------------- keys
def key_options(options: Mapping[str, Any]) -> dict:
    """The options that decide a result, as JSON values (sorted; callables by qualified name)."""

    def plain(value):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if callable(value):
            return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
        return repr(value)

    return {k: plain(v) for k, v in sorted(options.items()) if k not in NOT_IN_KEY}


def entry_key(
    span_graph: SpanGraph,
    model_state: Mapping[str, Tensor],
    *,
    estimator: str,
    options: Mapping[str, Any],
    data: str | None,
    cache_key: str | None,
) -> dict:
    """The key fields every entry of one build shares (the entry id is added per entry)."""
    return {
        "format": ENTRY_FORMAT,
        "span_graph": span_graph.fingerprint,
        "model": fingerprint(sorted(model_state.items())),
        "estimator": estimator,
        "options": key_options(options),
        "data": data,
        "cache_key": cache_key,
    }


def read_delta(cache: EntryCache | None, fields: dict) -> float | None:
    """The Δ stored under exactly ``fields``, or ``None``."""
    record = cache.get(fields) if cache is not None else None
    if record is None:
        return None
    try:
        return float(record["delta"])
    except (KeyError, TypeError, ValueError):
        return None


def write_delta(cache: EntryCache | None, fields: dict, delta: float, seconds: float) -> None:
    """Store ``delta`` (and how long it took) under ``fields``, atomically; no-op without a cache."""
    if cache is None:
        return
    stored = delta if math.isfinite(delta) else str(delta)  # "nan" / "-inf": JSON has no such numbers
    cache.put(fields, {"delta": stored, "seconds": seconds})


# --------------------------------------------------------------------------- fingerprints
def _digest(h, tensor: Tensor) -> None:
    """Shape, dtype, two float64 sums (rounded, so thread counts do not matter) and a strided sample."""
    t = tensor.detach()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel() == 0:
        return
    if t.is_complex():
        t = torch.view_as_real(t)
    flat = t.reshape(-1)
    if not flat.is_floating_point():
        flat = flat.to(torch.float64)
    sums = (flat.sum(dtype=torch.float64), torch.linalg.vector_norm(flat, dtype=torch.float64))
    h.update(" ".join(f"{float(v):.9g}" for v in sums).encode())
    sample = flat[:: max(1, flat.numel() // 1024)].to(torch.float64).cpu()
    h.update(sample.numpy().tobytes())


def fingerprint(named: Iterable[tuple[str, Any]]) -> str:
    """A hash of summary statistics of every tensor (order- and name-sensitive)."""
    h = hashlib.sha256()
    for name, value in named:
        h.update(f"{name}:".encode())
        if isinstance(value, Tensor):
            _digest(h, value)
        else:
            h.update(repr(value).encode())
    return h.hexdigest()[:32]


def data_fingerprint(batches: Sequence[Any]) -> str:
    """The fingerprint of a list of batches (each with ``inputs`` and ``label``): every tensor, by position."""

    def items():
        for k, batch in enumerate(batches):
            for j, t in enumerate(batch.inputs):
                yield f"{k}.{j}", t
            yield f"{k}.label", batch.label

    return fingerprint(items())
