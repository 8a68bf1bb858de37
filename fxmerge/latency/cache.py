"""The latency cache: one small JSON file per measurement (``fxmerge.cache.EntryCache``).

A measurement is keyed by everything that changes its result: the conv's
signature, the backend's name and version, the device's name, the dtype, the
batch size, the thread count and the timing policy (a quick, low-run measurement
never stands in for a careful one). Each file is written as soon as its measurement
finishes, atomically, so an interrupted table build loses nothing.

The default directory is ``<fxmerge cache root>/latency`` (``fxmerge.cache.cache_root``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from fxmerge.cache import EntryCache, cache_dir
from fxmerge.latency.backends import LatencyBackend
from fxmerge.latency.timing import Measurement, TimingPolicy

FORMAT = "fxmerge.latency.measurement/1"


def default_cache_dir() -> Path:
    """Where latency measurements are cached unless told otherwise."""
    return cache_dir("latency")


def key_fields(signature: str, backend: LatencyBackend, batch_size: int, policy: TimingPolicy | None = None) -> dict:
    """What a cached measurement must match to be reused (``policy``: the one it was timed by,
    default the backend's)."""
    policy = policy or getattr(backend, "policy", None)
    return {
        "signature": signature,
        "backend": backend.name,
        "version": backend.version,
        "device_name": backend.device_name,
        "dtype": str(backend.dtype).removeprefix("torch."),
        "batch_size": int(batch_size),
        "threads": int(backend.threads),
        "policy": dataclasses.asdict(policy) if dataclasses.is_dataclass(policy) else None,
        "settings": dict(getattr(backend, "settings", {}) or {}),
    }


class MeasurementCache:
    """Cached :class:`Measurement` values in one directory."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.entries = EntryCache(directory, FORMAT)
        self.directory = self.entries.directory

    def get(self, fields: dict) -> Measurement | None:
        """The cached measurement for ``fields``, or ``None``."""
        record = self.entries.get(fields)
        try:
            return None if record is None else Measurement.from_dict(record["measurement"])
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, fields: dict, measurement: Measurement) -> None:
        """Store ``measurement`` atomically."""
        self.entries.put(fields, {"measurement": measurement.to_dict()})
