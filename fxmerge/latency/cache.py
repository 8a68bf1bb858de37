"""The on-disk latency cache: one small JSON file per measurement.

A measurement is keyed by everything that changes its result: the conv's
signature, the backend's name and version, the device's name, the dtype, the
batch size and the thread count. Each file is written as soon as its measurement
finishes, atomically (a temporary file in the same directory, then
:func:`os.replace`), so an interrupted table build loses nothing and a concurrent
reader never sees half a file. An unreadable file is treated as missing.

The default directory is ``$FXMERGE_CACHE_DIR/latency``, else
``$XDG_CACHE_HOME/fxmerge/latency``, else ``~/.cache/fxmerge/latency``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

from fxmerge.latency.backends import LatencyBackend
from fxmerge.latency.timing import Measurement

FORMAT = "fxmerge.latency.measurement/1"


def default_cache_dir() -> Path:
    """Where latency measurements are cached unless told otherwise."""
    root = os.environ.get("FXMERGE_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "latency"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fxmerge" / "latency"


def key_fields(signature: str, backend: LatencyBackend, batch_size: int) -> dict:
    """What a cached measurement must match to be reused."""
    return {
        "signature": signature,
        "backend": backend.name,
        "version": backend.version,
        "device_name": backend.device_name,
        "dtype": str(backend.dtype).removeprefix("torch."),
        "batch_size": int(batch_size),
        "threads": int(backend.threads),
        # a quick, low-run measurement must not stand in for a careful one
        "policy": dataclasses.asdict(policy) if dataclasses.is_dataclass(policy := getattr(backend, "policy", None)) else None,
    }


def cache_key(fields: dict) -> str:
    payload = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


class MeasurementCache:
    """Reads and writes cached measurements in one directory."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).expanduser()

    def path(self, fields: dict) -> Path:
        return self.directory / f"{cache_key(fields)[:40]}.json"

    def get(self, fields: dict) -> Measurement | None:
        """The cached measurement for ``fields``, or ``None``."""
        try:
            data = json.loads(self.path(fields).read_text())
            if data.get("format") != FORMAT or data.get("key") != fields:
                return None
            return Measurement.from_dict(data["measurement"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, fields: dict, measurement: Measurement) -> None:
        """Store ``measurement`` atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = {"format": FORMAT, "key": fields, "measurement": measurement.to_dict()}
        write_atomic(self.path(fields), json.dumps(payload, indent=1, sort_keys=True))


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
