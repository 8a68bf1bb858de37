"""Timing models against each other: interleaved blocks, ratios per round, a stated error.

On a shared or thermally throttled machine the speed changes over seconds, so
timing model A fully and then model B compares the machine's two states as much
as the models. Here both models are prepared once (exported, a fresh runtime
session each) and timed in alternating *blocks* of runs — A B B A A B … — and every
round gives one ratio ``median(B) / median(A)`` measured under the same
conditions. The result is the median of those ratios, with the relative half-width
of its distribution-free 95% confidence interval (``rel_error``); rounds are added,
up to ``max_rounds``, until that error is within ``rel_error`` or the rounds run out,
and a comparison that stays wider says so (``stable``). A caller that only needs a
verdict passes ``stop_when(comparison so far)``: once it holds (after ``min_rounds``),
more rounds could not change what the caller decides, and timing stops there.

Blocks, rather than single runs in alternation, because a runtime that has just
run one model keeps its worker threads busy for a moment (ONNX Runtime's spinning
threads) and slows the other one's first run; fxmerge's ONNX Runtime sessions also
turn spinning off.

A backend without ``runner`` (a user's own timer with only ``measure``) is compared
by alternating whole measurements instead.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from fxmerge.latency.backends import LatencyBackend, resolve_backend
from fxmerge.latency.timing import median_rel_error


@dataclass(frozen=True)
class Comparison:
    """``candidate`` against ``reference``: each one's median ms and their ratio, from the same rounds."""

    reference_ms: float
    candidate_ms: float
    ratio: float  # candidate / reference
    rel_error: float  # relative half-width of the ratio's 95% interval over rounds
    rounds: int

    @property
    def stable(self) -> bool:
        return self.rel_error <= 0.02


class Comparator:
    """A reference model prepared once; candidates are compared to it in interleaved rounds."""

    def __init__(
        self,
        reference: nn.Module,
        example: Tensor | tuple,
        backend: LatencyBackend | str,
        *,
        min_rounds: int = 4,
        max_rounds: int = 10,
        rel_error: float = 0.01,
        block_ms: float = 200.0,
    ) -> None:
        self.backend = resolve_backend(backend)
        self.example = example
        self.min_rounds, self.max_rounds, self.rel_error = min_rounds, max_rounds, rel_error
        self.block_ms = block_ms
        self.reference = reference
        self._reference_runner = self._runner(reference)

    def _runner(self, module: nn.Module):
        runner = getattr(self.backend, "runner", None)
        if runner is None:
            return None
        was_training = module.training
        module.eval()
        try:
            return runner(module, self.example)
        finally:
            module.train(was_training)

    def compare(self, candidate: nn.Module, stop_when: Callable[[Comparison], bool] | None = None) -> Comparison:
        """Time ``candidate`` against the reference until the ratio is known to ``rel_error``,
        or until ``stop_when`` holds for the rounds so far."""
        candidate_runner = self._runner(candidate)
        if candidate_runner is None or self._reference_runner is None:
            return self._compare_by_measure(candidate, stop_when)
        runs = self._block_size(candidate_runner)
        ratios, reference_ms, candidate_ms = [], [], []
        for k in range(self.max_rounds):
            order = (
                (self._reference_runner, candidate_runner) if k % 2 == 0 else (candidate_runner, self._reference_runner)
            )
            blocks = {id(r): statistics.median(r.block(runs)) for r in order}
            reference_ms.append(blocks[id(self._reference_runner)])
            candidate_ms.append(blocks[id(candidate_runner)])
            ratios.append(candidate_ms[-1] / reference_ms[-1])
            if self._enough(reference_ms, candidate_ms, ratios, stop_when):
                break
        return _summary(reference_ms, candidate_ms, ratios)

    def _enough(self, reference_ms, candidate_ms, ratios, stop_when) -> bool:
        if len(ratios) < self.min_rounds:
            return False
        if median_rel_error(ratios) <= self.rel_error:
            return True
        return stop_when is not None and stop_when(_summary(reference_ms, candidate_ms, ratios))

    def _block_size(self, candidate_runner) -> int:
        """Runs per block: about ``block_ms`` of the slower model, between 3 and 50."""
        probe = max(
            statistics.median(self._reference_runner.block(3, warmup=1)),
            statistics.median(candidate_runner.block(3, warmup=1)),
        )
        return int(min(50, max(3, self.block_ms / max(probe, 1e-6))))

    def _compare_by_measure(self, candidate: nn.Module, stop_when) -> Comparison:
        ratios, reference_ms, candidate_ms = [], [], []
        for k in range(self.max_rounds):
            first, second = (self.reference, candidate) if k % 2 == 0 else (candidate, self.reference)
            timed = {id(m): self.backend.measure(m.eval(), self.example).median_ms for m in (first, second)}
            reference_ms.append(timed[id(self.reference)])
            candidate_ms.append(timed[id(candidate)])
            ratios.append(candidate_ms[-1] / reference_ms[-1])
            if self._enough(reference_ms, candidate_ms, ratios, stop_when):
                break
        return _summary(reference_ms, candidate_ms, ratios)


def _summary(reference_ms: list[float], candidate_ms: list[float], ratios: list[float]) -> Comparison:
    spread = median_rel_error(ratios) if len(ratios) > 1 else float("inf")
    return Comparison(
        reference_ms=statistics.median(reference_ms),
        candidate_ms=statistics.median(candidate_ms),
        ratio=statistics.median(ratios),
        rel_error=0.0 if len(set(ratios)) == 1 else spread,
        rounds=len(ratios),
    )


def side_by_side(
    first: nn.Module,
    second: nn.Module,
    example: Tensor | tuple,
    backend: LatencyBackend | str,
    rounds: int = 5,
    *,
    progress: bool = False,  # noqa: ARG001 - kept for callers; the rounds are short
) -> tuple[float, float]:
    """Median latency in ms of ``first`` and of ``second``, timed in interleaved blocks (at least ``rounds``)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    result = Comparator(first, example, backend, min_rounds=rounds, max_rounds=max(rounds, 10)).compare(second)
    return result.reference_ms, result.candidate_ms


def median_latency(
    model: nn.Module,
    example: Tensor | tuple,
    backend: LatencyBackend | str,
    rounds: int = 5,
    *,
    progress: bool = False,  # noqa: ARG001 - kept for callers; the rounds are short
) -> float:
    """Median latency in ms of ``model`` over ``rounds`` measurements."""
    backend = resolve_backend(backend)
    was_training = model.training
    model.eval()
    try:
        return statistics.median(backend.measure(model, example).median_ms for _ in range(max(1, rounds)))
    finally:
        model.train(was_training)
