"""The timing loop every backend shares, and a description of the host.

A latency measurement is: prepare the module once (export, build a session,
compile), run it a few times to warm caches and finish lazy compilation, then time
single runs and keep the median, the interquartile range and a bound on the
median's relative error. The number of timed runs adapts to the module: timing
stops once the median is known to ``rel_error`` (the half-width of a distribution-free
95% confidence interval of the median, from order statistics, relative to the
median: 1% by default) after at least ``min_runs`` runs, at ``runs`` runs, or once
``max_time_s`` is spent, so one measurement never takes minutes. A measurement that
ends with a wider interval says so in its ``rel_error``.

On CPU each run is timed with :func:`time.perf_counter`; on CUDA with a pair of
CUDA events around the run and a synchronize after it (each run is timed alone,
as at batch-1 deployment, not pipelined behind the previous one).

A policy with ``evict_bytes`` streams through a buffer of that size before every
timed CPU run (untimed): the run then finds its weights in memory rather than in the
caches, as a conv does inside a network whose weights do not fit in the last-level
cache (:func:`last_level_cache_bytes`) — each conv's weights have been evicted by the
rest of the network's since it last ran.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Measurement:
    """The summary of one timed module: milliseconds per run."""

    median_ms: float
    iqr_ms: float
    runs: int
    warmup: int
    batch_size: int
    threads: int
    rel_error: float = 0.0  # half-width of the median's 95% confidence interval, relative to the median

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Measurement:
        return cls(
            median_ms=float(data["median_ms"]),
            iqr_ms=float(data["iqr_ms"]),
            runs=int(data["runs"]),
            warmup=int(data["warmup"]),
            batch_size=int(data["batch_size"]),
            threads=int(data["threads"]),
            rel_error=float(data.get("rel_error", 0.0)),
        )


@dataclass(frozen=True)
class TimingPolicy:
    """How many runs a measurement makes.

    ``warmup`` untimed runs (stopping early, after at least one, once
    ``max_warmup_s`` is spent), then timed runs until ``runs`` are done, or until at
    least ``min_runs`` are done and either the median's relative error is at most
    ``rel_error`` or ``max_time_s`` is spent. ``evict_bytes`` > 0: before each timed
    CPU run, stream through a buffer that large (untimed) so the run starts with cold
    caches.
    """

    warmup: int = 10
    runs: int = 50
    min_runs: int = 5
    max_time_s: float = 1.0
    max_warmup_s: float = 0.5
    rel_error: float = 0.01
    evict_bytes: int = 0

    def __post_init__(self) -> None:
        if self.runs < 1 or self.min_runs < 1 or self.warmup < 0:
            raise ValueError(f"invalid timing policy {self}: need runs >= 1, min_runs >= 1, warmup >= 0")
        if self.evict_bytes < 0:
            raise ValueError(f"invalid timing policy {self}: evict_bytes must be >= 0")


def time_runs(
    step: Callable[[], object],
    policy: TimingPolicy,
    *,
    batch_size: int,
    threads: int,
    cuda: bool = False,
) -> Measurement:
    """Warm ``step`` up, time it according to ``policy`` and summarise."""
    warmed = 0
    start = time.perf_counter()
    while warmed < policy.warmup:
        step()
        warmed += 1
        if cuda:
            torch.cuda.synchronize()
        if time.perf_counter() - start > policy.max_warmup_s:
            break

    times = _timed_cuda(step, policy) if cuda else _timed_cpu(step, policy)
    median, iqr = summarise(times)
    return Measurement(
        median_ms=median,
        iqr_ms=iqr,
        runs=len(times),
        warmup=warmed,
        batch_size=batch_size,
        threads=threads,
        rel_error=median_rel_error(times),
    )


def timed_block(step: Callable[[], object], policy: TimingPolicy, *, cuda: bool = False) -> list[float]:
    """``policy.warmup`` untimed runs, then timed runs by ``policy`` (milliseconds each)."""
    for _ in range(policy.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    return _timed_cuda(step, policy) if cuda else _timed_cpu(step, policy)


def median_rel_error(values: list[float]) -> float:
    """Half-width of a distribution-free ~95% confidence interval of the median, relative to it.

    The interval runs between the order statistics ``n/2 ∓ 0.98·√n`` (the normal
    approximation of the binomial ranks that bracket the median with 95% probability).
    """
    if len(values) < 2:
        return math.inf
    ordered = sorted(values)
    n = len(ordered)
    low = max(0, math.floor(n / 2 - 0.98 * math.sqrt(n)))
    high = min(n - 1, math.ceil(n / 2 + 0.98 * math.sqrt(n)) - 1)
    median = statistics.median(ordered)
    return (ordered[high] - ordered[low]) / (2 * median) if median > 0 else math.inf


def _enough(times: list[float], started: float, policy: TimingPolicy) -> bool:
    count = len(times)
    if count >= policy.runs:
        return True
    if count < policy.min_runs:
        return False
    if time.perf_counter() - started >= policy.max_time_s:
        return True
    return count % 5 == 0 and median_rel_error(times) <= policy.rel_error


def _timed_cpu(step: Callable[[], object], policy: TimingPolicy) -> list[float]:
    times: list[float] = []
    evict = _evictor(policy.evict_bytes)
    started = time.perf_counter()
    while not _enough(times, started, policy):
        evict()
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _evictor(size: int) -> Callable[[], object]:
    """A call that reads ``size`` bytes of its own (pushing everything else out of the caches)."""
    if size <= 0:
        return lambda: None
    buffer = torch.ones(-(-size // 4), dtype=torch.float32)
    return lambda: float(buffer.sum())


def _timed_cuda(step: Callable[[], object], policy: TimingPolicy) -> list[float]:
    times: list[float] = []
    begin = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    while not _enough(times, started, policy):
        begin.record()
        step()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return times


def summarise(times_ms: list[float]) -> tuple[float, float]:
    """Median and interquartile range of a list of run times."""
    if not times_ms:
        raise ValueError("no timed runs")
    if len(times_ms) == 1:
        return times_ms[0], 0.0
    q1, median, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    return median, q3 - q1


# ------------------------------------------------------------------ the host


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads not counted)."""
    cores: set[tuple[str, str]] = set()
    try:
        with open("/proc/cpuinfo") as f:
            physical, core = "0", None
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "physical id":
                    physical = value
                elif key == "core id":
                    core = value
                elif not key and core is not None:
                    cores.add((physical, core))
                    physical, core = "0", None
            if core is not None:
                cores.add((physical, core))
    except OSError:
        pass
    logical = os.cpu_count() or 1
    count = len(cores) or logical
    with contextlib.suppress(AttributeError, OSError):
        count = min(count, len(os.sched_getaffinity(0)))
    return max(1, count)


def last_level_cache_bytes() -> int | None:
    """The size of the CPU's largest cache (Linux sysfs), or ``None`` when unknown."""
    best: tuple[int, int] | None = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = _parse_size((index / "size").read_text().strip())
        except (OSError, ValueError):
            continue
        if best is None or (level, size) > best:
            best = (level, size)
    return best[1] if best else None


def _parse_size(text: str) -> int:
    """``"32768K"`` / ``"32M"`` / ``"512"`` as bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    if text and text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo``, else :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: torch.device) -> str:
    """A human-readable name of ``device``: the CPU or GPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()
