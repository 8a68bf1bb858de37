"""The latency table: milliseconds for every entry (span, option) of a span graph.

:func:`build_latency_table` times the conv each entry merges into, with the
activation that closes its span, at the shape it really runs at. Entries whose
convs are identical (same :meth:`~fxmerge.ir.ConvSpec.signature`) are timed once,
and every measurement goes to an on-disk cache as soon as it is made, so a second
build is free and an interrupted one resumes where it stopped.

A network is more than its convs (pooling, the classifier, framework overhead),
and timing convs one by one does not add up exactly to timing the whole model.
:func:`calibrate` measures the original model once, end to end, and stores the
difference as ``offset_ms``: ``predict(keep_all entries)`` then equals the
measured original latency, and the solver's budget is in the same units as a
latency the user can measure.

**Under a process group** (``torchrun``, :mod:`fxmerge.distributed`; :func:`timing_rule`)
two processes never time on the same kind of device at once — timing on a shared
CPU in parallel would corrupt both numbers. When every rank has its own GPU and all
are of one kind, the distinct convs are split across the ranks, each times its
share on its own GPU, and every rank receives every measurement. Otherwise one rank
per distinct device type (backend, device, device name, threads, dtype) — the lowest
— builds the table, and the others wait and receive it. :func:`calibrate`'s
end-to-end timing of the original is always made by one rank per device type. The
rule applied is stated in the table's ``info["timing"]``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fxmerge import distributed
from fxmerge.cache import cache_dir as resolve_cache_dir
from fxmerge.cache import write_json
from fxmerge.ir import ConvSpec, FrozenTable, SpanGraph, frozen_mapping
from fxmerge.latency.backends import LatencyBackend, resolve_backend
from fxmerge.latency.cache import MeasurementCache, key_fields
from fxmerge.latency.conv import conv_module, null_spec, spec_input
from fxmerge.latency.timing import Measurement, TimingPolicy, last_level_cache_bytes

FORMAT = "fxmerge.latency_table/1"


@dataclass(frozen=True)
class LatencyTable(FrozenTable):
    """Latency in milliseconds of every entry id, on one backend and device.

    ``offset_ms`` is added once to every prediction (see :func:`calibrate`);
    ``original_ms`` is the measured latency of the original model, when known.
    ``measurements`` counts the distinct convs timed or read from the cache.
    ``info`` holds the rest: threads, dtype, batch size, how many measurements were
    made or read from the cache, and the interquartile range of every entry.
    """

    backend: str
    device_name: str
    entries: Mapping[str, float]
    offset_ms: float = 0.0
    original_ms: float | None = None
    measurements: int = 0
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", frozen_mapping({k: float(v) for k, v in self.entries.items()}))
        object.__setattr__(self, "info", frozen_mapping(self.info))

    def __getitem__(self, entry_id: str) -> float:
        return self.entries[entry_id]

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self.entries

    def predict(self, entry_ids: Iterable[str]) -> float:
        """Predicted end-to-end latency (ms) of a network made of ``entry_ids``."""
        total = self.offset_ms
        for entry_id in entry_ids:
            try:
                total += self.entries[entry_id]
            except KeyError:
                raise KeyError(f"entry {entry_id!r} is not in this latency table") from None
        return total

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "backend": self.backend,
            "device_name": self.device_name,
            "offset_ms": self.offset_ms,
            "original_ms": self.original_ms,
            "measurements": self.measurements,
            "entries": dict(self.entries),
            "info": json.loads(json.dumps(dict(self.info))),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> LatencyTable:
        if data.get("format", FORMAT) != FORMAT:
            raise ValueError(f"not a latency table: format {data.get('format')!r}, expected {FORMAT!r}")
        original = data.get("original_ms")
        return cls(
            backend=str(data["backend"]),
            device_name=str(data["device_name"]),
            entries={str(k): float(v) for k, v in data["entries"].items()},
            offset_ms=float(data.get("offset_ms", 0.0)),
            original_ms=None if original is None else float(original),
            measurements=int(data.get("measurements", 0)),
            info=dict(data.get("info", {})),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the table as JSON (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        return cls.from_dict(json.loads(Path(path).read_text()))


# ------------------------------------------------------------------ building


def build_latency_table(
    span_graph: SpanGraph,
    backend: LatencyBackend | str = "auto",
    *,
    cache_dir: str | os.PathLike | None | bool = None,
    progress: bool = True,
    weights: str = "auto",
) -> LatencyTable:
    """Time every entry of ``span_graph`` on ``backend``.

    ``cache_dir``: where measurements are cached (default: see
    :func:`~fxmerge.cache.cache_dir`); ``False`` disables the cache. ``weights``:
    whether convs are timed with their weights in the caches or out of them
    (:func:`entry_policy`).
    """
    backend = resolve_backend(backend)
    directory = resolve_cache_dir("latency", cache_dir)
    cache = None if directory is None else MeasurementCache(directory)
    policy, why = entry_policy(span_graph, backend, weights)
    rule = timing_rule(backend)
    if rule == "leader":
        built = distributed.once_per(
            device_kind(backend), lambda: _build(span_graph, backend, cache, progress, policy, shard=False).to_dict()
        )
        table = LatencyTable.from_dict(built)
    else:
        main = progress and distributed.is_main()
        table = _build(span_graph, backend, cache, main, policy, shard=rule == "shard")
    table = dataclasses.replace(table, info={**table.info, "weights": why})
    if rule == "alone":
        return table
    return dataclasses.replace(table, info={**table.info, "timing": describe_timing(rule, backend)})


def entry_policy(
    span_graph: SpanGraph, backend: LatencyBackend, weights: str = "auto"
) -> tuple[TimingPolicy | None, str]:
    """The timing policy for the table's convs (``None``: the backend's own), and a sentence saying why.

    ``"hot"``: a conv is timed run after run with its weights in the caches.
    ``"cold"`` (CPU only): the caches are flushed before every timed run
    (:attr:`~fxmerge.latency.timing.TimingPolicy.evict_bytes`, twice the last-level
    cache), so the weights come from memory — what a conv pays inside a network that
    reads and writes more per forward pass than that cache holds, where by the time a
    conv runs again the other convs' weights and activations have pushed its own
    weights out. Timed hot, such a network looks far faster than it is wherever reading
    weights costs as much as the arithmetic (small inputs, depthwise-separable
    blocks). ``"auto"``: cold for single-threaded timing on a CPU whose last-level
    cache is smaller than what the convs read and write in one forward pass
    (:attr:`~fxmerge.ir.ConvSpec.traffic_bytes` summed over the units), else hot. With
    several threads the flush leaves the runtime's worker threads idle long enough to
    sleep, and every timed run then also pays their wake-up, which the null conv
    (too small to use them) does not cancel: cold tables predicted 2-thread plans
    10–20% too fast at 224×224 (benchmarks/RESULTS.md), so ``"auto"`` keeps them hot.
    """
    if weights not in ("auto", "cold", "hot"):
        raise ValueError(f"weights={weights!r}: use 'auto', 'cold' or 'hot'")
    llc = last_level_cache_bytes()
    traffic = sum(unit.conv.traffic_bytes for unit in span_graph.units)
    described = f"the convs move {traffic / 2**20:.1f} MB per forward pass"
    can_flush = backend.device == "cpu" and llc is not None and hasattr(backend, "runner")
    if weights == "cold" and not can_flush:
        raise ValueError(
            f"weights='cold' flushes the CPU's caches between runs; not possible with {backend.name} on "
            f"{backend.device} here (cache size {'unknown' if llc is None else 'known'}): use 'hot' or 'auto'"
        )
    if weights == "hot" or (weights == "auto" and not (can_flush and backend.threads == 1 and traffic > llc)):
        return (
            None,
            f"hot: convs timed with their weights cached ({described}; {_why_hot(weights, can_flush, backend)})",
        )
    policy = dataclasses.replace(getattr(backend, "policy", None) or TimingPolicy(), evict_bytes=2 * llc)
    reason = "as asked" if weights == "cold" else f"more than the {llc / 2**20:.0f} MB last-level cache"
    return policy, f"cold: caches flushed before every timed run ({described}; {reason})"


def _why_hot(weights: str, can_flush: bool, backend: LatencyBackend) -> str:
    if weights == "hot":
        return "as asked"
    if not can_flush:
        return "not a CPU, or its cache size is unknown"
    if backend.threads != 1:
        return f"{backend.threads} threads: flushing would time their wake-up too"
    return "it fits in the last-level cache"


def _build(
    span_graph: SpanGraph, backend: LatencyBackend, cache, progress: bool, policy: TimingPolicy | None, *, shard: bool
) -> LatencyTable:
    """The table, timed here (with ``shard``, this rank's share of the convs; every rank gets all)."""
    by_signature: dict[str, ConvSpec] = {}
    timed = [e for e in span_graph.entries if not e.option.identity]
    for entry in timed:
        by_signature.setdefault(entry.conv.signature(), entry.conv)

    bar = tqdm(
        total=len(by_signature),
        desc=f"latency table ({backend.name}, {backend.threads} threads)",
        unit="conv",
        disable=not progress,
        leave=False,
    )
    with bar:
        results, measured, cached = _measure_all(by_signature, backend, cache, bar, policy, shard=shard)

    overhead: dict[str, float] = {}
    if getattr(backend, "standalone_overhead", False):
        overhead = _standalone_overheads(by_signature, backend, cache, progress, policy, shard=shard)
    entries = {
        e.id: 0.0
        if e.option.identity
        # an identity option costs nothing
        else _in_model_ms(results[e.conv.signature()].median_ms, overhead.get(e.conv.signature(), 0.0))
        for e in span_graph.entries
    }
    info = {
        **_backend_info(backend),
        "batch_size": _common(spec.input_shape[0] for spec in by_signature.values()),
        "measured": measured,
        "cached": cached,
        "cache_dir": str(cache.directory) if cache else None,
        "iqr_ms": {e.id: results[e.conv.signature()].iqr_ms for e in timed},
        "span_graph": span_graph.fingerprint,
        "standalone_overhead_ms": {e.id: overhead[e.conv.signature()] for e in timed if e.conv.signature() in overhead},
    }
    return LatencyTable(
        backend=backend.name,
        device_name=backend.device_name,
        entries=entries,
        measurements=len(results),
        info=info,
    )


def _measure_all(
    specs: dict[str, ConvSpec], backend, cache, bar, policy: TimingPolicy | None, *, shard: bool
) -> tuple[dict[str, Measurement], int, int]:
    """Every spec's measurement (cached or timed), and how many were timed and read from the cache.

    With ``shard`` this rank times its share (:func:`~fxmerge.distributed.shard`; each
    measurement costs about the timing policy's time budget, so all weigh the same)
    and every rank receives the rest.
    """
    results: dict[str, Measurement] = {}
    measured = cached = 0
    for signature in distributed.shard(list(specs)) if shard else list(specs):
        measurement, was_cached = _measure_cached(signature, specs[signature], backend, cache, policy)
        measured += not was_cached
        cached += was_cached
        results[signature] = measurement
        bar.set_postfix(measured=measured, cached=cached, refresh=False)
        bar.update()
    if shard:
        gathered = distributed.gather_dicts({k: m.to_dict() for k, m in results.items()})
        results = {k: Measurement.from_dict(gathered[k]) for k in specs}
        counts = distributed.all_gather_object((measured, cached))
        measured, cached = sum(m for m, _ in counts), sum(c for _, c in counts)
    return results, measured, cached


# ------------------------------------------------------------------ process groups
def device_kind(backend: LatencyBackend) -> tuple:
    """What makes two processes' timings interchangeable: backend, device type and name, threads, dtype."""
    return (backend.name, backend.device, backend.device_name, backend.threads, str(backend.dtype))


def _own_gpu(backend: LatencyBackend) -> tuple[str, int] | None:
    """``(host, GPU index)`` the backend times on, or ``None`` when it does not time on a GPU."""
    if getattr(backend, "device", "cpu") != "cuda" or not torch.cuda.is_available():
        return None
    index = getattr(getattr(backend, "torch_device", None), "index", None)
    return socket.gethostname(), torch.cuda.current_device() if index is None else int(index)


def timing_rule(backend: LatencyBackend) -> str:
    """How the processes of a group time on ``backend`` (see the module docstring).

    ``"alone"`` without a process group; ``"shard"`` when every rank has its own GPU
    and all are of one kind; ``"leader"`` otherwise (one rank per device type times).
    Every rank must call it.
    """
    if distributed.world_size() == 1:
        return "alone"
    ranks = distributed.all_gather_object((device_kind(backend), _own_gpu(backend)))
    gpus = [gpu for _, gpu in ranks]
    if len({kind for kind, _ in ranks}) == 1 and None not in gpus and len(set(gpus)) == len(gpus):
        return "shard"
    return "leader"


def describe_timing(rule: str, backend: LatencyBackend) -> str:
    """The timing rule applied, in words (for the table's ``info`` and the report)."""
    world = distributed.world_size()
    if rule == "shard":
        return (
            f"latency table sharded across {world} processes, each timing its share on its own "
            f"{backend.device_name}; the end-to-end timings made by rank 0 alone"
        )
    return (
        f"latency measured by one process per device type ({backend.name} on {backend.device}, "
        f"{backend.device_name}): the lowest rank of each type timed, the other ranks of {world} received "
        "the table; timing in parallel on one device would corrupt the numbers"
    )


def _measure_cached(
    signature: str, spec: ConvSpec, backend, cache, policy: TimingPolicy | None
) -> tuple[Measurement, bool]:
    """``spec`` timed on ``backend`` by ``policy`` (``None``: the backend's), read from ``cache`` when
    there; written as soon as measured."""
    fields = key_fields(signature, backend, spec.input_shape[0], policy)
    measurement = cache.get(fields) if cache else None
    if measurement is not None:
        return measurement, True
    if policy is None:
        measurement = backend.measure(conv_module(spec), spec_input(spec))
    else:
        measurement = backend.runner(conv_module(spec), spec_input(spec)).measure(policy)
    if cache:
        cache.put(fields, measurement)
    return measurement, False


def _in_model_ms(standalone_ms: float, overhead_ms: float) -> float:
    """A conv's cost inside a model; never below 1% of its standalone time (for a conv far
    cheaper than the runtime's call, timing noise can make the difference vanish)."""
    return max(standalone_ms - overhead_ms, 0.01 * standalone_ms)


def _standalone_overheads(
    by_signature: dict[str, ConvSpec],
    backend,
    cache,
    progress: bool,
    policy: TimingPolicy | None,
    *,
    shard: bool = False,
) -> dict[str, float]:
    """Per conv signature, what timing it alone costs beyond its work inside a model.

    Measured as the time of :func:`~fxmerge.latency.conv.null_spec` (same tensors, next
    to no arithmetic), timed once per distinct null conv and cached like any conv.
    """
    nulls = {signature: null_spec(spec) for signature, spec in by_signature.items()}
    distinct = {n.signature(): n for n in nulls.values() if n is not None}
    bar = tqdm(
        total=len(distinct),
        desc=f"standalone overhead ({backend.name})",
        unit="conv",
        disable=not progress,
        leave=False,
    )
    with bar:
        results, _, _ = _measure_all(distinct, backend, cache, bar, policy, shard=shard)
    return {signature: results[n.signature()].median_ms for signature, n in nulls.items() if n is not None}


def _check_same_backend(table: LatencyTable, backend: LatencyBackend) -> None:
    built = (table.backend, table.device_name, table.info.get("threads", backend.threads))
    given = (backend.name, backend.device_name, backend.threads)
    if built != given:
        raise ValueError(
            "calibrate needs the backend the table was built on: table is (backend, device, threads) = "
            f"{built}, got {given}"
        )


def _backend_info(backend: LatencyBackend) -> dict:
    return {
        "backend_version": backend.version,
        "device": backend.device,
        "dtype": str(backend.dtype).removeprefix("torch."),
        "threads": backend.threads,
    }


def _common(values: Iterable[int]) -> int | None:
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


# ------------------------------------------------------------------ end to end


def measure_model(
    model: nn.Module, example_input: Tensor | tuple, backend: LatencyBackend | str = "auto"
) -> Measurement:
    """End-to-end latency of ``model`` on ``backend`` (the model is left unchanged)."""
    backend = resolve_backend(backend)
    was_training = model.training
    model.eval()
    try:
        return backend.measure(model, example_input)
    finally:
        model.train(was_training)


def calibrate(
    table: LatencyTable,
    model: nn.Module,
    example_input: Tensor | tuple,
    keep_all_entry_ids: Iterable[str],
    backend: LatencyBackend | str = "auto",
) -> LatencyTable:
    """``table`` with ``offset_ms`` set so that the keep-all plan predicts the original.

    ``keep_all_entry_ids`` are the entries of ``Plan.keep_all(span_graph)``: the
    original network, unit by unit. ``backend`` must be the one the table was built
    on (by name).
    """
    backend = resolve_backend(backend)
    _check_same_backend(table, backend)
    keep_all = list(keep_all_entry_ids)
    convs_ms = table.predict(keep_all) - table.offset_ms
    original = distributed.once_per(device_kind(backend), lambda: measure_model(model, example_input, backend))
    info = {
        **table.info,
        "calibration": {
            "original_ms": original.median_ms,
            "original_iqr_ms": original.iqr_ms,
            "keep_all_convs_ms": convs_ms,
            "keep_all_entries": len(keep_all),
        },
    }
    return dataclasses.replace(
        table, offset_ms=original.median_ms - convs_ms, original_ms=original.median_ms, info=info
    )


def reanchored(table: LatencyTable, original_ms: float, keep_all_entry_ids: Iterable[str]) -> LatencyTable:
    """``table`` with the original's latency set to ``original_ms`` and the offset re-fitted to it.

    The closed loop times the original beside every plan it measures; the median of
    those timings is the original the measured ratios refer to, and pins it down better
    than the one calibration measurement, which on a busy machine can be 15% off (every
    correction fitted from the ratios would inherit that error).
    """
    keep_all = list(keep_all_entry_ids)
    offset = original_ms - sum(table.entries[e] for e in keep_all)
    info = {**table.info, "original_reanchored_ms": original_ms}
    return dataclasses.replace(table, original_ms=float(original_ms), offset_ms=offset, info=info)


def with_context_cost(
    table: LatencyTable, per_entry_ms: float, keep_all_entry_ids: Iterable[str], evidence: Mapping[str, Any]
) -> LatencyTable:
    """``table`` with ``per_entry_ms`` added to every entry, re-calibrated so keep-all still predicts the original.

    A conv timed alone is not the conv inside a model: the runtime's fixed cost per op
    (dispatch, a kernel launch, memory traffic the standalone-overhead subtraction also
    removed) is paid once per conv that stays, so a plan with fewer convs saves more than
    its entries say. ``per_entry_ms`` is that cost as measured end to end (the two-point
    fit of :func:`context_corrected`, which never passes a negative one). No entry drops
    below 1% of its measured value.
    """
    keep_all = list(keep_all_entry_ids)
    entries = {k: max(v + per_entry_ms, 0.01 * v) for k, v in table.entries.items()}
    if table.original_ms is None:
        raise ValueError("with_context_cost needs a calibrated table (original_ms known): call calibrate first")
    offset = table.original_ms - sum(entries[e] for e in keep_all)
    info = {**table.info, "context_cost": {"per_entry_ms": per_entry_ms, **evidence}}
    return dataclasses.replace(table, entries=entries, offset_ms=offset, info=info)


def context_corrected(
    table: LatencyTable, keep_all_entry_ids: Iterable[str], measured: Iterable[tuple[Iterable[str], float]]
) -> LatencyTable:
    """``table`` with the per-conv cost inside a model fitted from end-to-end measurements.

    Keep-all (``n₀`` entries summing to ``Σ₀``) measures ``t₀``; each measured plan ``i``
    (``nᵢ`` entries, ``Σᵢ``) measures ``tᵢ = ratioᵢ · t₀`` in the same interleaved rounds
    (``measured``: ``(plan entry ids, ratioᵢ)`` pairs). With a cost ``β`` per conv beyond
    its entry, ``t₀ − tᵢ = (Σ₀ − Σᵢ) + (n₀ − nᵢ)·β``; ``β`` is the least-squares fit over
    the plans, ``Σ xᵢyᵢ / Σ xᵢ²`` with ``xᵢ = n₀ − nᵢ`` and ``yᵢ = (t₀ − tᵢ) − (Σ₀ − Σᵢ)``
    (one plan: exact), applied by :func:`with_context_cost`. Plans with as many entries
    as keep-all say nothing about ``β``; with no other, ``table`` comes back.

    A negative fit is not applied (``β = 0``; the fit is kept in the evidence): taking a
    constant off every entry drops the small ones to their 1% floor and moves the rest
    into the offset, so a plan that removes most convs is priced near the original —
    on 2 threads, the next solves after a negative fit measured 11–13% of the original
    for 50–70% asks. A table that prices plans too fast is left to the loop's budget
    correction.
    """
    keep_all = list(keep_all_entry_ids)
    if table.original_ms is None:
        raise ValueError("context_corrected needs a calibrated table (original_ms known): call calibrate first")
    original_ms, keep_all_ms = float(table.original_ms), sum(table.entries[e] for e in keep_all)
    points = []
    for entries, ratio in measured:
        plan = list(entries)
        removed = len(keep_all) - len(plan)
        if removed:
            unexplained = (1.0 - ratio) * original_ms - (keep_all_ms - sum(table.entries[e] for e in plan))
            points.append((removed, unexplained))
    if not points:
        return table
    fitted = sum(x * y for x, y in points) / sum(x * x for x, _ in points)
    evidence = {
        "plans": len(points),
        "keep_all_convs": len(keep_all),
        "convs_removed": [x for x, _ in points],
        "fitted_ms": fitted,
    }
    return with_context_cost(table, max(fitted, 0.0), keep_all, evidence)
