"""The importance table and the build that fills it.

:func:`build_importance_table` runs in four steps:

1. **entry selection** (:func:`~fxmerge.importance.entries.select_entries`): the
   entries asked for; those that are the original network get ``I = 1`` for free;
2. **the estimator** (:func:`~fxmerge.importance.factory.make_estimator`): name,
   options and data resolved once;
3. **the cache** (:mod:`fxmerge.importance.keys`): entries already stored under the
   same key are read back; :func:`run_entries` evaluates the others one by one and
   writes each to the cache (atomically) as soon as it is known, so an interrupted
   build resumes with only the missing entries and a repeated one evaluates nothing;
4. **the summary**: the table, with ``info`` saying what was used and done.

**Under a process group** (``torchrun``, :mod:`fxmerge.distributed`) the entries are
independent of each other, so each process evaluates a share: rank 0 reads the cache
and tells every rank what is there; the missing entries are split by
:func:`~fxmerge.distributed.shard`, balanced by the estimator's expected cost per
entry (:meth:`~fxmerge.importance.base.Estimator.cost`: the multiply-adds of the
entry's network); each rank evaluates its share on its own device (a copy of the
model on ``cuda:LOCAL_RANK`` when CUDA is there, else the CPU) and writes each
finished entry to the cache as it goes; then every rank receives every ``Δ``
(``all_gather_object``) and returns the same table. An entry trains under a seed of
its own id, so the table equals a single process's entry by entry (on the same kind
of device and thread count). A rank that dies loses only the entry it was
evaluating: a rerun reads the rest from the cache. The ranks must be given the same
model, data and options (checked: their cache keys must agree).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from fxmerge import distributed
from fxmerge.cache import EntryCache, fields_hash, write_json
from fxmerge.capture import Captured
from fxmerge.importance.base import Estimator
from fxmerge.importance.entries import select_entries, single_entry_plan
from fxmerge.importance.factory import make_estimator
from fxmerge.importance.keys import (
    ORIGINAL,
    entry_key,
    key_options,
    open_cache,
    read_delta,
    write_delta,
)
from fxmerge.importance.signature import network_signature
from fxmerge.ir import Entry, FrozenTable, SpanGraph, frozen_mapping
from fxmerge.plan import PlanError

FORMAT = "fxmerge.importance_table/1"


@dataclass(frozen=True)
class ImportanceTable(FrozenTable):
    """Importance ``I = exp(Δ)`` of every entry id; ``I < 1`` is a drop, ``I == 1`` no change.

    ``estimator`` names how it was estimated; ``info`` holds the options, what data
    was used, the reference value of the original model, how many entries were
    evaluated, read from the cache or free, and the build time.
    """

    estimator: str
    entries: Mapping[str, float]
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", frozen_mapping({str(k): float(v) for k, v in self.entries.items()}))
        object.__setattr__(self, "info", frozen_mapping(self.info))

    def __getitem__(self, entry_id: str) -> float:
        return self.entries[entry_id]

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def delta(self, entry_id: str) -> float:
        """``Δ = log I`` of one entry (``-inf`` for an entry that broke the network)."""
        value = self.entries[entry_id]
        return math.log(value) if value > 0 else -math.inf

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "estimator": self.estimator,
            "entries": dict(self.entries),
            "info": json.loads(json.dumps(dict(self.info), default=str)),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> ImportanceTable:
        if data.get("format") != FORMAT:
            raise ValueError(f"not an importance table: format {data.get('format')!r}, expected {FORMAT!r}")
        return cls(
            estimator=str(data["estimator"]),
            entries={str(k): float(v) for k, v in data["entries"].items()},
            info=dict(data.get("info", {})),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON (atomically)."""
        return write_json(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ImportanceTable:
        return cls.from_dict(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------- build
def build_importance_table(
    captured: Captured,
    span_graph: SpanGraph,
    estimator: str | Callable = "auto",
    *,
    data: Any = None,
    entries: Iterable[str] | None = None,
    cache_dir: str | os.PathLike | bool | None = None,
    cache_key: str | None = None,
    progress: bool = True,
    **options: Any,
) -> ImportanceTable:
    """Estimate ``I = exp(Δ)`` for every entry of ``span_graph`` (see :mod:`fxmerge.importance`).

    ``captured`` is the model as :func:`~fxmerge.capture.capture` gave it, and
    ``span_graph`` its analysis. ``estimator``: ``"auto"``, ``"distortion"``,
    ``"loss"``, ``"finetune"``, ``"paper"``, or a callable ``score(model) -> float``.
    Under a ``torch.distributed`` process group every process must call it with the
    same arguments; the entries are shared out (see the module docstring).

    ``data``: an iterable of batches (a DataLoader, a list...), each an input batch
    or an ``(input, label)`` pair, or a map-style Dataset of ``(input, label)`` items
    (batched by ``batch_size``); read once, up to ``max_batches`` batches, and kept in
    memory (see :mod:`fxmerge.importance.data`). ``entries``: build only these entry
    ids (default: every entry). ``cache_dir``: where entries are cached (default
    ``<cache root>/importance``, see :mod:`fxmerge.cache`); ``False`` disables the
    cache. ``cache_key``: an extra string in every key; a user callable is cached only
    when it is given. ``**options``: the estimator's options, listed with their
    defaults in :mod:`fxmerge.importance.factory`; an unknown one is an error.
    """
    start = time.perf_counter()
    _check_model(captured, span_graph)
    wanted = select_entries(span_graph, entries)
    est = make_estimator(estimator, on_rank_device(captured), span_graph, data, options)
    cache = open_cache(cache_dir) if cache_key is not None or not est.needs_cache_key else None
    key = entry_key(
        span_graph,
        captured.gm.state_dict(),
        estimator=est.key_label,
        options=est.options,
        data=est.data_fingerprint,
        cache_key=cache_key,
    )
    _check_same_key(key)
    todo = [e for e in wanted if not est.is_free(e)]
    found = distributed.broadcast_object(cached_deltas(cache, key, todo) if distributed.is_main() else None)
    missing = [e for e in todo if e.id not in found]
    evaluated, here = _run_share(missing, est, cache, key, len(found), progress)
    table = _summary(span_graph, est, wanted, found, evaluated, cache, time.perf_counter() - start)
    if distributed.world_size() > 1:
        ranks = {"world_size": distributed.world_size(), "evaluated_here": here}
        table = dataclasses.replace(table, info={**table.info, "distributed": ranks})
    return table


def _run_share(
    missing: Sequence[Entry], est: Estimator, cache: EntryCache | None, key: dict, cached: int, progress: bool
) -> tuple[dict[str, float], int]:
    """Every missing entry's ``Δ``, and how many this process evaluated (its share, under a group)."""
    mine = distributed.shard(missing, [est.cost(e) for e in missing])
    shown = progress and distributed.is_main()
    with _progress_bar(cached + len(mine), cached, est.label, enabled=shown) as bar:
        evaluated = run_entries(mine, est, cache, key, on_done=bar.update)
    if distributed.world_size() > 1:
        evaluated = distributed.gather_dicts(evaluated)
        known = [r for r in distributed.all_gather_object(est.reference) if r is not None]
        est.reference = known[0] if known else None  # a process with no share never computed it
    return evaluated, len(mine)


def on_rank_device(captured: Captured) -> Captured:
    """``captured``, or under a process group on a CUDA machine a copy of it on ``cuda:LOCAL_RANK``."""
    if not distributed.is_distributed():
        return captured
    device = distributed.device()
    if device.type != "cuda" or any(t.device == device for t in captured.gm.parameters()):
        return captured
    inputs = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, captured.example_inputs)
    return dataclasses.replace(captured, gm=copy.deepcopy(captured.gm).to(device), example_inputs=inputs)


def _check_same_key(key: dict) -> None:
    """Under a process group, every rank must be building the same table."""
    keys = distributed.all_gather_object(fields_hash(key))
    if len(set(keys)) > 1:
        differ = [r for r, k in enumerate(keys) if k != keys[0]]
        raise ValueError(
            f"the processes are not building the same importance table: rank(s) {differ} differ from rank 0 "
            "in the model's weights, the data, the estimator or its options; give every rank the same ones"
        )


def _progress_bar(total: int, cached: int, label: str, *, enabled: bool) -> tqdm:
    bar = tqdm(
        total=total,
        initial=cached,
        desc=f"importance ({label})",
        unit="entry",
        disable=not enabled,
        leave=False,
    )
    bar.set_postfix(cached=cached, refresh=False)
    return bar


def _summary(
    span_graph: SpanGraph,
    est: Estimator,
    wanted: Sequence[Entry],
    found: Mapping[str, float],
    evaluated: Mapping[str, float],
    cache: EntryCache | None,
    seconds: float,
) -> ImportanceTable:
    """The table of ``wanted``, and ``info``: what was used, and what was evaluated, read or free."""
    deltas = {**found, **evaluated}
    values = {e.id: to_importance(deltas[e.id]) if e.id in deltas else 1.0 for e in wanted}
    info = {
        "span_graph": span_graph.fingerprint,
        "options": key_options(est.options),
        "data": est.description,
        "reference": est.reference,
        "evaluated": len(evaluated),
        "cached": len(found),
        "identity": len(wanted) - len(deltas),
        "repeated_networks": est.repeated,
        "nonfinite": [e.id for e in wanted if e.id in deltas and not math.isfinite(deltas[e.id])],
        "cache_dir": str(cache.directory) if cache else None,
        "seconds": seconds,
        **est.stats(),
    }
    return ImportanceTable(estimator=est.label, entries=values, info=info)


def _check_model(captured: Captured, span_graph: SpanGraph) -> None:
    if not isinstance(captured, Captured):
        raise TypeError(
            f"build_importance_table takes the captured model, got {type(captured).__name__}: pass "
            "fxmerge.capture.capture(model, example_input)"
        )
    if captured.name != span_graph.model:
        raise PlanError(
            f"this span graph was made for model {span_graph.model!r}, not {captured.name!r}; analyze this model first"
        )


def to_importance(delta: float) -> float:
    """``exp(Δ)``; a NaN (a broken network) scores 0, overflow is capped."""
    if math.isnan(delta):
        return 0.0
    return math.exp(min(delta, 50.0))


# --------------------------------------------------------------------------- the run loop
def cached_deltas(cache: EntryCache | None, key: dict, entries: Iterable[Entry]) -> dict[str, float]:
    """``Δ`` of each of ``entries`` already in the cache under ``key``."""
    found = {}
    for entry in entries:
        delta = read_delta(cache, {**key, "entry": entry.id})
        if delta is not None:
            found[entry.id] = delta
    return found


def run_entries(
    entries: Sequence[Entry],
    est: Estimator,
    cache: EntryCache | None,
    key: dict,
    on_done: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Evaluate ``entries`` one by one; each ``Δ`` is written to the cache as soon as it is known.

    Each entry is measured on its own network (:func:`single_entry_plan`), so any
    share of the entries can be evaluated anywhere: the result is the same. When the
    estimator's ``Δ`` depends on the network alone, an entry whose network has the
    signature of one already evaluated takes its ``Δ`` (bit-identical outputs: see
    :mod:`fxmerge.importance.signature`); ``est.repeated`` counts them.
    """
    deltas: dict[str, float] = {}
    by_signature: dict[tuple, float] = {}
    if entries:
        prepare(est, cache, key)
    for entry in entries:
        began = time.perf_counter()
        gm = est.network(single_entry_plan(est.span_graph, entry.id))
        signature = network_signature(gm, est.base) if est.same_network_same_delta else None
        if signature in by_signature:
            delta = by_signature[signature]
            est.repeated += 1
        else:
            delta = float(est.delta(gm, entry))
        if signature is not None:
            by_signature[signature] = delta
        del gm
        write_delta(cache, {**key, "entry": entry.id}, delta, time.perf_counter() - began)
        deltas[entry.id] = delta
        if on_done is not None:
            on_done()
    return deltas


def prepare(est: Estimator, cache: EntryCache | None, key: dict) -> None:
    """Ready ``est`` for its first entry; a reference that costs an evaluation is cached like an entry."""
    fields = {**key, "entry": ORIGINAL}
    if est.caches_reference and est.reference is None:
        est.reference = read_delta(cache, fields)
    computed = est.caches_reference and est.reference is None
    began = time.perf_counter()
    est.prepare()
    if computed and est.reference is not None:
        write_delta(cache, fields, est.reference, time.perf_counter() - began)
