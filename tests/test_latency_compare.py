"""Side-by-side comparison: interleaved rounds, a stated error, and stopping once the verdict is known."""

from __future__ import annotations

import itertools

import pytest
from torch import nn

from fxmerge.latency.compare import Comparator, Comparison
from fxmerge.loop import Target, clearly_missed


class FakeRunner:
    """Blocks of fixed times; the candidate's alternate between two values round by round."""

    def __init__(self, times_ms) -> None:
        self.times = itertools.cycle(times_ms)
        self.blocks = 0

    def block(self, runs: int, warmup: int = 2) -> list[float]:
        self.blocks += 1
        value = next(self.times)
        return [value] * runs


class FakeBackend:
    """A backend whose ``runner`` hands out the runner registered for each module."""

    def __init__(self, runners: dict) -> None:
        self.runners = runners

    def runner(self, module, example):
        return self.runners[id(module)]


def comparator(candidate_times) -> tuple[Comparator, nn.Module]:
    reference, candidate = nn.Identity(), nn.Identity()
    backend = FakeBackend({id(reference): FakeRunner([10.0]), id(candidate): FakeRunner(candidate_times)})
    return Comparator(reference, (), backend, min_rounds=4, max_rounds=10, rel_error=0.01), candidate


def test_noisy_rounds_run_to_the_cap_and_say_how_uncertain_they_are():
    # the probe takes one value of the cycle, so rounds alternate 4.5 / 5.5 ms against 10 ms
    compare, candidate = comparator([5.0, 4.5, 5.5])
    result = compare.compare(candidate)
    assert result.rounds == 10
    assert result.ratio == pytest.approx(0.5, abs=0.05)
    assert result.rel_error > 0.05 and not result.stable


def test_steady_rounds_stop_at_the_minimum():
    compare, candidate = comparator([5.0])
    result = compare.compare(candidate)
    assert (result.rounds, result.ratio, result.rel_error) == (4, 0.5, 0.0)


def test_stop_when_ends_timing_once_it_holds():
    compare, candidate = comparator([5.0, 4.5, 5.5])
    seen: list[Comparison] = []

    def decided(comparison: Comparison) -> bool:
        seen.append(comparison)
        return comparison.rounds >= 6

    result = compare.compare(candidate, stop_when=decided)
    assert result.rounds == 6
    assert [c.rounds for c in seen] == [4, 5, 6]  # never asked before min_rounds
    assert compare.compare(candidate, stop_when=lambda comparison: False).rounds == 10


@pytest.mark.parametrize(
    ("ratio", "rel_error", "missed"),
    [
        (0.50, 0.05, True),  # 29% too fast, far beyond the tolerance and the uncertainty
        (0.69, 0.02, False),  # within tolerance
        (0.75, 0.05, False),  # 7% too slow, but the uncertainty reaches into the tolerance
        (0.75, 0.03, True),  # 7% too slow even at the near end of its uncertainty
    ],
)
def test_a_plan_is_clearly_missed_only_beyond_tolerance_and_uncertainty(ratio, rel_error, missed):
    comparison = Comparison(reference_ms=10.0, candidate_ms=10.0 * ratio, ratio=ratio, rel_error=rel_error, rounds=4)
    assert clearly_missed(Target(ratio=0.7), 0.03)(comparison) is missed
    in_ms = Comparison(reference_ms=10.0, candidate_ms=7.0 * ratio / 0.7, ratio=ratio, rel_error=rel_error, rounds=4)
    assert clearly_missed(Target(ms=7.0), 0.03)(in_ms) is missed
