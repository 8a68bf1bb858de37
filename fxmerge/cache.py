"""Files fxmerge writes: the cache directory, atomic writes and the JSON entry cache.

Every file fxmerge writes — a latency measurement, an importance entry, a plan, a
table, a report — is written atomically: a temporary file in the same directory,
flushed and fsynced, then :func:`os.replace`. A reader sees the old file or the new
one, never half of one, and an interrupted run loses nothing it had finished.

Cached values are plain JSON (never pickles): one small file per entry, named by
a hash of the fields that determine the value and holding those fields, so a file
whose key does not match exactly (a hash collision, a format change, a hand edit)
is treated as missing.

The cache root is ``$FXMERGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fxmerge``, else
``~/.cache/fxmerge``; each table has its own subdirectory (``latency``,
``importance``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """Where fxmerge caches tables unless told otherwise."""
    root = os.environ.get("FXMERGE_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fxmerge"


def cache_dir(kind: str, given: str | os.PathLike | bool | None = None) -> Path | None:
    """The directory of cache ``kind``: ``given`` itself, the default for ``None``/``True``,
    or ``None`` (no cache) for ``False``."""
    if given is False:
        return None
    if given is None or given is True:
        return cache_root() / kind
    return Path(given).expanduser()


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> Path:
    """``data`` as JSON at ``path``, atomically (non-JSON values are written with ``str``)."""
    return write_atomic(path, json.dumps(data, indent=indent, default=str) + "\n")


def fields_hash(fields: dict) -> str:
    """A stable hash of a JSON-able dict (the file name of a cache entry)."""
    payload = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


class EntryCache:
    """One JSON file per entry in ``directory``: ``{"format", "key": fields, **payload}``."""

    def __init__(self, directory: str | os.PathLike, format: str) -> None:
        self.directory = Path(directory).expanduser()
        self.format = format

    def path(self, fields: dict) -> Path:
        return self.directory / f"{fields_hash(fields)[:40]}.json"

    def get(self, fields: dict) -> dict | None:
        """The payload stored under exactly ``fields``, or ``None``."""
        try:
            data = json.loads(self.path(fields).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("format") != self.format:
            return None
        if data.get("key") != json.loads(json.dumps(fields)):
            return None
        return data

    def put(self, fields: dict, payload: dict) -> None:
        """Store ``payload`` under ``fields``, atomically."""
        record = {**payload, "format": self.format, "key": fields}
        write_atomic(self.path(fields), json.dumps(record, indent=1, sort_keys=True))
