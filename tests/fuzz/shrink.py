"""Shrink a seeded failure: edit its recorded choices while the same failure persists.

Hypothesis shrinks the networks it draws itself; a network from
:func:`tests.fuzz.generate.network_from_seed` is shrunk here instead, the same way:
the generator turns any list of choices into a valid network, with 0 the simplest
answer everywhere, so deleting choices and lowering them toward 0 gives smaller
networks. A candidate is kept only when it is smaller (shortlex on the choices it
used) and ``fails`` still holds, so shrinking terminates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from tests.fuzz.generate import network_from_choices
from tests.fuzz.spec import Net

__all__ = ["shrink"]


class _Shrinker:
    def __init__(self, choices: Sequence[int], fails: Callable[[Net], bool], exclude: frozenset[str], budget_s: float):
        self.exclude = exclude
        self.fails = fails
        self.net, self.best = network_from_choices(choices, exclude)
        self.deadline = time.monotonic() + budget_s
        self.tried: set[tuple[int, ...]] = set()

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def attempt(self, candidate: list[int]) -> bool:
        if self.out_of_time():
            return False
        net, used = network_from_choices(candidate, self.exclude)
        key = tuple(used)
        if key in self.tried or (len(used), used) >= (len(self.best), self.best) or net == self.net:
            return False
        self.tried.add(key)
        if not self.fails(net):
            return False
        self.net, self.best = net, used
        return True

    def delete_chunks(self) -> bool:
        improved = False
        for size in (32, 16, 8, 4, 2, 1):
            i = 0
            while i < len(self.best) and not self.out_of_time():
                if self.attempt(self.best[:i] + self.best[i + size :]):
                    improved = True
                else:
                    i += size
        return improved

    def lower_values(self) -> bool:
        improved = False
        i = 0
        while i < len(self.best) and not self.out_of_time():
            value = self.best[i]
            for lower in sorted({0, value // 2, value - 1}):
                if 0 <= lower < value and self.attempt(self.best[:i] + [lower] + self.best[i + 1 :]):
                    improved = True
                    break
            i += 1
        return improved


def shrink(
    choices: Sequence[int],
    fails: Callable[[Net], bool],
    exclude: frozenset[str] = frozenset(),
    *,
    budget_s: float = 120.0,
) -> tuple[Net, list[int]]:
    """The smallest network found (and its choices) for which ``fails`` still holds.

    ``fails`` must be true for ``network_from_choices(choices)``; it should check for
    the *same* failure (form, property, error type), or the shrink drifts to another bug.
    """
    shrinker = _Shrinker(choices, fails, frozenset(exclude), budget_s)
    while not shrinker.out_of_time():
        deleted = shrinker.delete_chunks()
        lowered = shrinker.lower_values()
        if not (deleted or lowered):
            break
    return shrinker.net, shrinker.best
