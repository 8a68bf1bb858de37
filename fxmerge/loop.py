"""The closed latency loop: solve, merge, measure, correct the budget, solve again.

A plan's latency is *predicted* as the sum of its entries' latencies, each timed
alone, plus one calibrated offset. That prediction is good on average and wrong
where it matters: on small inputs a runtime's fixed costs dominate, on a busy machine
the offset absorbs noise, and the plans a solver picks are exactly those the table
thinks cheap. So ``compress`` does not trust it. After each solve the plan is merged
and timed end to end, side by side with the (BatchNorm-folded) original on the same
backend, and the measured ratio is compared with the one asked for:

* within ``tolerance`` (default ±3%) by a margin of the measurement's own
  uncertainty (``|error| + rel_error ≤ tolerance``, so that another timing of the same
  two models lands within tolerance too): done;
* otherwise the budget is corrected from what was measured — linearly between the
  two nearest measured plans that bracket the target; else, when two plans on the same
  side differ by more than their timings' uncertainty, by extrapolating the line
  through them (a secant step: a merged model's latency has a fixed part the table does
  not see, so the measured error shrinks more slowly than the predicted budget, and
  scaling by the ratio alone creeps towards the target); else by the ratio of asked to
  measured — and the solver runs again, for at most ``max_rounds`` plans measured.
  The solver maximises importance within a budget, so a corrected budget can give a
  plan already measured; the budget is then pushed on in the same direction (2%,
  doubling) until a new plan comes, a measured plan on the other side of the target
  comes, or the feasible range ends.
* when the most important plans under a budget jump over the target (one measured
  plan too fast, the next too slow), the loop asks for the most important plan whose
  *predicted* latency lies in a window just under the interpolated budget
  (``solve_between(low, high)``, width the tolerance): a plan that gives up a little
  importance to land on the target. It stops when the window holds no plan or only
  plans already measured.

Of the plans measured, the one kept is the most important plan that meets the target
with that margin; else, of those within tolerance, the one whose miss plus uncertainty
is smallest (not the most important: that is usually the slowest inside the tolerance,
which another timing easily puts outside it); when none is within
tolerance, the one closest to the target (the faster of two equally close): a plan far
faster than asked throws away accuracy the user did not trade, one a little slower says so. Every round
is reported. A target in
milliseconds is checked against the merged model's measured milliseconds the same way.

Nothing here times or solves by itself: it is given ``solve_at(budget_ms) -> Plan``,
optionally ``solve_between(floor_ms, budget_ms) -> Plan``, and ``measure(plan) ->
Measured``, so a deterministic fake can test the loop exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fxmerge.plan import Plan
from fxmerge.report import Round

SOLVES_PER_ROUND = 4
"""Solves allowed per measured round: a solve that returns a plan already measured costs no timing."""

MIN_PUSH = 0.02
"""When the solver returns a plan already measured, the budget moves on by this share, doubling each time."""


@dataclass(frozen=True)
class Measured:
    """A merged plan timed side by side with the original."""

    original_ms: float
    merged_ms: float
    ratio: float  # merged / original, from the same interleaved rounds
    rel_error: float = 0.0  # the ratio's relative uncertainty (95%)


@dataclass(frozen=True)
class Target:
    """What the user asked for: a share of the original (``ratio``) or milliseconds (``ms``)."""

    ratio: float | None = None
    ms: float | None = None

    def error(self, measured: Measured) -> float:
        """Measured over asked, minus one: positive means slower than asked."""
        if self.ratio is not None:
            return measured.ratio / self.ratio - 1.0
        return measured.merged_ms / self.ms - 1.0

    def not_below(self, original_ms: float) -> bool:
        """Whether the target asks for no speed-up at all (100% or more, or the original's ms or more)."""
        return self.ratio >= 1.0 if self.ratio is not None else self.ms >= original_ms

    def describe(self) -> str:
        return f"{self.ratio:.0%} of the original" if self.ratio is not None else f"{self.ms:.4g} ms"


@dataclass(frozen=True)
class LoopOutcome:
    plan: Plan
    rounds: tuple[Round, ...]
    kept: Round  # the round that measured the kept plan
    met: bool
    error: float  # of the kept plan (measured over asked, minus one)
    why: str


def meet_target(
    solve_at: Callable[[float], Plan],
    measure: Callable[[Plan], Measured],
    target: Target,
    *,
    first_budget_ms: float,
    budget_range: tuple[float, float],
    tolerance: float = 0.03,
    max_rounds: int = 4,
    seed: Sequence[tuple[Plan, Measured]] = (),
    solve_between: Callable[[float, float], Plan] | None = None,
    predict: Callable[[Plan], float] | None = None,
) -> LoopOutcome:
    """Solve and measure until the merged model meets ``target`` as measured (see the module docstring).

    ``budget_range`` bounds the predicted budgets tried (the fastest plan's prediction
    and the original's). ``seed`` holds plans already solved and measured (each counts
    as a round); the loop starts from what they say. ``predict(plan)`` is a plan's
    predicted latency under the table the solver uses *now* (the caller may correct
    its table after each measurement); by default, the prediction it was solved with.
    """
    predicted = predict or _predicted
    history: list[tuple[float, Plan, Measured]] = [(_predicted(plan), plan, m) for plan, m in seed]
    measured_plans: dict[tuple[str, ...], Measured] = {plan.entries: m for plan, m in seed}
    why, step, solves = "", 0.0, 0
    met = any(_settled(target, m, tolerance) for _, _, m in history)
    budget = (_next_budget(history, target, budget_range, predicted) if history else None) or _clamp(
        first_budget_ms, budget_range
    )
    while not met and len(history) < max_rounds and solves < SOLVES_PER_ROUND * max_rounds:
        plan, solves = solve_at(budget), solves + 1
        known = measured_plans.get(plan.entries)
        if known is None:
            known = measured_plans[plan.entries] = measure(plan)
            history.append((budget, plan, known))
            met, step = _settled(target, known, tolerance), 0.0
            following = None if met else _next_budget(history, target, budget_range, predicted)
            if following is not None:
                budget = following
                continue
        elif target.error(known) * target.error(history[-1][2]) < 0:
            window = _window_plan(history, target, tolerance, budget_range, solve_between, measured_plans, predicted)
            if window is None:
                why = "the plans the solver picks near the target differ by more than the tolerance"
                break
            budget, plan = window
            known = measured_plans[plan.entries] = measure(plan)
            history.append((budget, plan, known))
            met, step = _settled(target, known, tolerance), 0.0
            budget = _next_budget(history, target, budget_range, predicted) or budget
            continue
        if met:
            break
        step = max(2.0 * step, MIN_PUSH * budget)  # the solver gave a plan already measured: push further
        following = _clamp(budget + (step if target.error(known) < 0 else -step), budget_range)
        if following == budget:
            why = "no budget in the feasible range moves the plan closer to the target"
            break
        budget = following
    return _keep_best(history, target, tolerance, why, max_rounds)


def _settled(target: Target, measured: Measured, tolerance: float) -> bool:
    """Within tolerance even at the far end of the measurement's uncertainty."""
    return abs(target.error(measured)) + measured.rel_error <= tolerance


def clearly_missed(target: Target, tolerance: float) -> Callable[[Any], bool]:
    """A test for a timing in progress (anything with ``reference_ms``, ``candidate_ms``,
    ``ratio`` and ``rel_error``, such as a :class:`~fxmerge.latency.compare.Comparison`):
    whether the plan misses ``target`` by more than ``tolerance`` even at the near end of
    the timing's uncertainty. More rounds would not make it meet the target, so the
    measurement can stop there (the loop solves again either way)."""

    def missed(timing: Any) -> bool:
        measured = Measured(timing.reference_ms, timing.candidate_ms, timing.ratio)
        return abs(target.error(measured)) - timing.rel_error > tolerance

    return missed


def _predicted(plan: Plan) -> float:
    return float(dict(plan.info)["predicted_ms"])


def _next_budget(history, target: Target, budget_range: tuple[float, float], predicted=_predicted) -> float | None:
    """The predicted latency that should measure as asked, from the plans measured so far."""
    points = sorted({(predicted(plan), target.error(m), m.rel_error) for _, plan, m in history})
    below = [p[:2] for p in points if p[1] < 0]  # faster than asked
    above = [p[:2] for p in points if p[1] > 0]  # slower than asked
    if below and above:
        (p_fast, e_fast), (p_slow, e_slow) = max(below), min(above)
        wanted = p_fast + (0 - e_fast) * (p_slow - p_fast) / (e_slow - e_fast)
    else:
        _, plan, measured = history[-1]
        by_ratio = predicted(plan) / (1.0 + target.error(measured))
        wanted = _secant(points) or by_ratio
    wanted = _clamp(wanted, budget_range)
    tried = {round(b, 9) for b, _, _ in history}
    return None if round(wanted, 9) in tried else wanted


SECANT_REACH = 4.0
"""A secant step goes at most this many times as far as the ratio correction would."""


def _secant(points: list[tuple[float, float, float]]) -> float | None:
    """The budget where the line through the two plans closest to the target (all on one
    side of it) reaches it, when their errors differ by more than their uncertainty and
    the line rises (slower plans measure slower); ``None`` otherwise. The step goes the
    way the ratio correction of the closest plan goes, at most :data:`SECANT_REACH` times as far."""
    closest = sorted(points, key=lambda point: abs(point[1]))
    if len(closest) < 2:
        return None
    (p_near, e_near, u_near), (p_far, e_far, u_far) = closest[:2]
    if p_near == p_far or abs(e_near - e_far) <= u_near + u_far:
        return None
    slope = (e_near - e_far) / (p_near - p_far)
    if slope <= 0:
        return None
    step, ratio_step = -e_near / slope, p_near / (1.0 + e_near) - p_near
    if step * ratio_step <= 0:
        return None
    return p_near + max(-SECANT_REACH * abs(ratio_step), min(SECANT_REACH * abs(ratio_step), step))


def _window_plan(
    history, target: Target, tolerance: float, budget_range, solve_between, measured, predicted
) -> tuple | None:
    """``(budget, plan)``: the most important new plan predicted just under the interpolated budget, if any."""
    if solve_between is None:
        return None
    points = sorted({(predicted(plan), target.error(m)) for _, plan, m in history})
    below, above = [p for p in points if p[1] < 0], [p for p in points if p[1] > 0]
    if not (below and above):
        return None
    (p_fast, e_fast), (p_slow, e_slow) = max(below), min(above)
    wanted = _clamp(p_fast + (0 - e_fast) * (p_slow - p_fast) / (e_slow - e_fast), budget_range)
    try:
        plan = solve_between(wanted * (1.0 - tolerance), wanted)
    except ValueError:  # InfeasibleBudget: no plan in the window
        return None
    return None if plan.entries in measured else (wanted, plan)


def _clamp(value: float, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return min(max(value, low), high)


def _keep_best(history, target: Target, tolerance: float, why: str, max_rounds: int) -> LoopOutcome:
    rounds = tuple(
        Round(
            budget_ms=budget,
            predicted_ms=_predicted(plan),
            measured_ms=m.merged_ms,
            original_ms=m.original_ms,
            ratio=m.ratio,
            met=abs(target.error(m)) <= tolerance,
        )
        for budget, plan, m in history
    )

    def objective(item) -> float:
        return float(dict(item[1].info).get("objective", 0.0))

    def closeness(item) -> tuple[float, float]:
        error = target.error(item[2])
        return round(abs(error), 4), error  # 0.01% apart counts as equally close: then the faster

    def surety(item) -> float:  # how far inside the tolerance even a less lucky timing would land
        return abs(target.error(item[2])) + item[2].rel_error

    settled = [item for item in history if _settled(target, item[2], tolerance)]
    met = [item for item in history if abs(target.error(item[2])) <= tolerance]
    if settled:
        chosen = max(settled, key=objective)
    else:
        chosen = min(met, key=surety) if met else min(history, key=closeness)
    error = target.error(chosen[2])
    if met:
        why = f"met: measured {error:+.1%} from {target.describe()} (tolerance ±{tolerance:.0%})"
    else:
        why = why or f"not met within {max_rounds} solve(s)"
        why = (
            f"not met: the kept plan measures {error:+.1%} from {target.describe()}; {why}; {_nearest(history, target)}"
        )
    kept = rounds[next(k for k, item in enumerate(history) if item is chosen)]
    return LoopOutcome(plan=chosen[1], rounds=rounds, kept=kept, met=bool(met), error=error, why=why)


def _nearest(history, target: Target) -> str:
    """The measured plans nearest the target on each side, for a report that says why it was missed."""
    errors = [target.error(m) for _, _, m in history]
    slower = min((e for e in errors if e > 0), default=None)
    faster = max((e for e in errors if e < 0), default=None)
    if slower is not None and faster is not None:
        return f"the nearest plans measured {slower:+.1%} and {faster:+.1%}"
    side = "slower" if faster is None else "faster"
    return f"every plan measured {side} than asked (nearest {slower if faster is None else faster:+.1%})"
