"""Process groups (``torchrun``): who this process is, its share of the work, how results travel.

fxmerge runs its expensive stages on PyTorch's own distributed engine and nothing
else: ``torchrun`` (any rendezvous it supports, one node or several) starts the
processes, :func:`process_group` joins them, and every stage uses the helpers
below. **Without an initialised process group every helper is a no-op**: one
process, rank 0 of 1, all the work, nothing sent.

* identity: :func:`rank`, :func:`world_size`, :func:`local_rank`, :func:`is_main`,
  and :func:`device` — ``cuda:LOCAL_RANK`` when CUDA is there, else the CPU;
* work: :func:`assign` / :func:`shard` split items across ranks by a deterministic,
  cost-balanced rule (largest first, each to the least-loaded rank; ties by item
  order, then by rank), so every rank computes the same assignment without talking;
* results: :func:`all_gather_object`, :func:`gather_dicts`, :func:`broadcast_object`,
  :func:`broadcast_tensors`,
  :func:`run_on_main` (one rank computes, every rank receives the value or the
  exception) and :func:`once_per` (one rank per distinct key computes, e.g. one
  latency measurement per device type).

Object collectives run on the CPU (gloo) even when the model trains on NCCL:
:func:`process_group` initialises ``cpu:gloo,cuda:nccl`` on a CUDA machine. A rank
that waits for others (the gather after an uneven importance table) waits at most
the group's timeout, :data:`TIMEOUT` for a group made here.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

TIMEOUT = datetime.timedelta(hours=24)
"""How long a collective waits for the slowest rank in a group made by :func:`process_group`."""

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------- who am I
def is_distributed() -> bool:
    """Whether a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes in the group (1 without a group)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``, set by torchrun; 0 without a group)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes files and prints."""
    return rank() == 0


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    """Whether the environment holds a torchrun rendezvous (``RANK``, ``WORLD_SIZE``, ``MASTER_*``)."""
    return all(name in os.environ for name in _TORCHRUN_VARIABLES)


@contextlib.contextmanager
def process_group(timeout: datetime.timedelta = TIMEOUT) -> Iterator[bool]:
    """Join torchrun's process group for the duration; yields whether a group exists.

    Initialises the default group from the environment when torchrun set one up and
    none exists yet (``cpu:gloo,cuda:nccl`` with this rank's GPU made current on a
    CUDA machine, else ``gloo``), and destroys it on exit. A group the caller made
    is used as it is and left alone; without torchrun nothing happens.
    """
    created = False
    if not is_distributed() and launched_by_torchrun() and dist.is_available():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend, timeout=timeout)
        created = True
    try:
        yield is_distributed()
    finally:
        if created and is_distributed():
            dist.destroy_process_group()


# --------------------------------------------------------------------------- the work
def assign(costs: Sequence[float], parts: int) -> list[int]:
    """The part (rank) each item goes to, balancing the summed cost per part.

    Longest processing time first: items by decreasing cost (ties: earlier item
    first), each to the part with the least cost so far (ties: the lower part).
    Deterministic, so every rank computes the same assignment on its own.
    """
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    load = [0.0] * parts
    owner = [0] * len(costs)
    for item in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        part = min(range(parts), key=lambda p: (load[p], p))
        owner[item] = part
        load[part] += float(costs[item])
    return owner


def shard(items: Sequence[T], costs: Sequence[float] | None = None) -> list[T]:
    """This rank's share of ``items`` (in their order), balanced by ``costs`` (default: equal)."""
    if world_size() == 1:
        return list(items)
    if costs is not None and len(costs) != len(items):
        raise ValueError(f"{len(items)} items but {len(costs)} costs")
    owner = assign(list(costs) if costs is not None else [1.0] * len(items), world_size())
    me = rank()
    return [item for item, part in zip(items, owner) if part == me]


# --------------------------------------------------------------------------- the results
def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, by rank (``[obj]`` without a group). Every rank must call it."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_dicts(part: Mapping[str, T]) -> dict[str, T]:
    """The union of every rank's ``part`` (each key held by one rank), on every rank."""
    merged: dict[str, T] = {}
    for each in all_gather_object(dict(part)):
        merged.update(each)
    return merged


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself without a group)."""
    if not is_distributed():
        return obj
    box: list[Any] = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (nothing without a group)."""
    if is_distributed():
        for tensor in tensors:
            dist.broadcast(tensor, src=src)


def barrier() -> None:
    """Wait until every rank is here (nothing without a group)."""
    if is_distributed():
        dist.barrier()


def run_on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run by rank 0 alone; every rank returns its value, or raises its exception."""
    if not is_distributed():
        return fn()
    if not is_main():
        return _unwrap(broadcast_object(None))
    try:
        value = fn()
    except Exception as exc:
        broadcast_object(("error", _portable(exc)))
        raise
    broadcast_object(("ok", value))
    return value


def once_per(key: Hashable, fn: Callable[[], T]) -> T:
    """``fn()`` run once per distinct ``key``: by the lowest rank holding it; its holders receive it.

    Every rank must call it. With one key for all ranks, rank 0 computes and every
    rank receives; ranks holding other keys get their own key's result.
    """
    if not is_distributed():
        return fn()
    keys = all_gather_object(key)
    leader = keys.index(key)
    if rank() != leader:
        return _unwrap(all_gather_object(None)[leader])
    try:
        value = fn()
    except Exception as exc:
        all_gather_object(("error", _portable(exc)))
        raise
    all_gather_object(("ok", value))
    return value


def _portable(exc: Exception) -> bytes:
    """``exc`` pickled so that it can be raised on another rank (as its message when it cannot)."""
    try:
        payload = pickle.dumps(exc)
        pickle.loads(payload)
    except Exception:  # noqa: BLE001 - an exception that cannot travel travels as its message
        payload = pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
    return payload


def _unwrap(outcome: tuple[str, Any]) -> Any:
    """The value rank 0 (or a key's leader) sent, or its exception raised here."""
    status, value = outcome
    if status == "error":
        raise pickle.loads(value)
    return value
