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
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from fxmerge.ir import ConvSpec, SpanGraph
from fxmerge.latency.backends import LatencyBackend, resolve_backend
from fxmerge.latency.cache import MeasurementCache, default_cache_dir, key_fields, write_atomic
from fxmerge.latency.conv import conv_module, null_spec, spec_input
from fxmerge.latency.timing import Measurement

FORMAT = "fxmerge.latency_table/1"


def _frozen(mapping: Mapping | None) -> Mapping:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class LatencyTable:
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
        object.__setattr__(self, "entries", _frozen({k: float(v) for k, v in self.entries.items()}))
        object.__setattr__(self, "info", _frozen(self.info))

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
        write_atomic(path, json.dumps(self.to_dict(), indent=1))

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
) -> LatencyTable:
    """Time every entry of ``span_graph`` on ``backend``.

    ``cache_dir``: where measurements are cached (default: see
    :func:`~fxmerge.latency.cache.default_cache_dir`); ``False`` disables the cache.
    """
    backend = resolve_backend(backend)
    cache = None if cache_dir is False else MeasurementCache(
        default_cache_dir() if cache_dir in (None, True) else cache_dir
    )

    by_signature: dict[str, ConvSpec] = {}
    for entry in span_graph.entries:
        by_signature.setdefault(entry.conv.signature(), entry.conv)

    results: dict[str, Measurement] = {}
    measured = cached = 0
    bar = tqdm(
        total=len(by_signature),
        desc=f"latency table ({backend.name}, {backend.threads} threads)",
        unit="conv",
        disable=not progress,
        leave=False,
    )
    with bar:
        for signature, spec in by_signature.items():
            measurement, was_cached = _measure_cached(signature, spec, backend, cache)
            measured += not was_cached
            cached += was_cached
            results[signature] = measurement
            bar.set_postfix(measured=measured, cached=cached, refresh=False)
            bar.update()

    overhead: dict[str, float] = {}
    if getattr(backend, "standalone_overhead", False):
        overhead = _standalone_overheads(by_signature, backend, cache, progress)
    entries = {e.id: _in_model_ms(results[e.conv.signature()].median_ms, overhead.get(e.conv.signature(), 0.0))
               for e in span_graph.entries}
    info = {
        **_backend_info(backend),
        "batch_size": _common(spec.input_shape[0] for spec in by_signature.values()),
        "measured": measured,
        "cached": cached,
        "cache_dir": str(cache.directory) if cache else None,
        "iqr_ms": {e.id: results[e.conv.signature()].iqr_ms for e in span_graph.entries},
        "span_graph": span_graph.fingerprint,
        "standalone_overhead_ms": {e.id: overhead[e.conv.signature()] for e in span_graph.entries if e.conv.signature() in overhead},
    }
    return LatencyTable(
        backend=backend.name,
        device_name=backend.device_name,
        entries=entries,
        measurements=len(results),
        info=info,
    )


def _measure_cached(signature: str, spec: ConvSpec, backend, cache) -> tuple[Measurement, bool]:
    """``spec`` timed on ``backend``, read from ``cache`` when there; written as soon as measured."""
    fields = key_fields(signature, backend, spec.input_shape[0])
    measurement = cache.get(fields) if cache else None
    if measurement is not None:
        return measurement, True
    measurement = backend.measure(conv_module(spec), spec_input(spec))
    if cache:
        cache.put(fields, measurement)
    return measurement, False


def _in_model_ms(standalone_ms: float, overhead_ms: float) -> float:
    """A conv's cost inside a model; never below 1% of its standalone time (for a conv far
    cheaper than the runtime's call, timing noise can make the difference vanish)."""
    return max(standalone_ms - overhead_ms, 0.01 * standalone_ms)


def _standalone_overheads(by_signature: dict[str, ConvSpec], backend, cache, progress: bool) -> dict[str, float]:
    """Per conv signature, what timing it alone costs beyond its work inside a model.

    Measured as the time of :func:`~fxmerge.latency.conv.null_spec` (same tensors, next
    to no arithmetic), timed once per distinct null conv and cached like any conv.
    """
    nulls = {signature: null_spec(spec) for signature, spec in by_signature.items()}
    distinct = {n.signature(): n for n in nulls.values() if n is not None}
    timed: dict[str, float] = {}
    for signature, spec in tqdm(distinct.items(), desc=f"standalone overhead ({backend.name})", unit="conv",
                                disable=not progress, leave=False):
        timed[signature] = _measure_cached(signature, spec, backend, cache)[0].median_ms
    return {signature: timed[n.signature()] for signature, n in nulls.items() if n is not None}


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
    original = measure_model(model, example_input, backend)
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
