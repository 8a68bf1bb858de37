"""The dynamic program that picks a plan: most importance under a latency budget.

Search space
------------
The plans of a span graph are the tilings described in :mod:`fxmerge.plan`: along a
chain, at each position either a chosen span option jumps ahead to the span's end,
or (before a ``"parallel"`` step) every branch of the region is tiled on its own and
the walk lands on the join's output. A plan's predicted latency is the sum of its
entries' latencies plus the latency table's ``offset_ms`` (what no entry accounts
for); its objective is the sum of its entries' importances. ``method`` restricts the options the
solver may choose, never the structure:

``"layermerge"``  every entry (LayerMerge, Kim et al., ICML 2024);
``"depth"``       only options that prune nothing, i.e. activations alone are
                  removed (depth compression, Kim et al., 2023);
``"layer"``       only options that keep exactly one conv and absorb no join, i.e.
                  whole layers are dropped but nothing is merged (layer pruning).

Discretisation, and why the budget is a guarantee
-------------------------------------------------
What the entries may spend, ``A = budget_ms - offset_ms``, is cut into ``bins``
bins of width ``w = A / bins``, and every entry costs ``c_e = ceil(l_e / w)`` bins:
its latency rounded *up*. A plan the program accepts has ``sum c_e <= bins``, so

    sum l_e  <=  sum c_e * w  <=  bins * w  =  A,

i.e. its real, un-rounded predicted latency is within the budget, however many
entries it has. (The bins are made narrower by a relative 1e-9 so that
floating-point rounding in these sums cannot break the inequality.) The reference LayerMerge implementation rounds *down*; each chosen
entry can then hide up to one bin, and its plans can exceed the budget by as many
bins as they have entries. The price of rounding up is the reverse: a plan that fits
only by less than its rounding slack (at most ``len(plan) / bins`` of ``A``) is not
found. The program is exact over the rounded costs.

The program
-----------
Every position carries a curve ``best[b]`` (``b = 0 .. bins``): the most importance
of a partial plan that reaches the position using *at most* ``b`` bins, ``-inf``
where none fits; curves are non-decreasing in ``b``. A chain starts from the curve
of "nothing spent yet", which in this at-most convention is all zeros (the
max-plus δ). An entry edge ``i -> j`` of cost ``c`` and importance ``v`` offers
``best_i[b - c] + v`` to ``j`` (a shift); ``best_j`` is the pointwise maximum
of all offers, and the argmax per ``b`` is kept as the back-pointer.

A parallel region combines its branches by max-plus convolution,
``(f ⊕ g)[b] = max_a f[a] + g[b - a]``, and the result is convolved with the curve
at the region's source. A chain's program is linear in the (max, +) semiring:
running a chain from a start curve ``f`` yields ``f ⊕ h`` where ``h`` is the same
chain run from δ. So instead of convolving, the curve is *threaded*: the first
branch runs from the source's curve, the second from the first one's end curve, and
so on; the last end curve is ``source ⊕ branch₁ ⊕ branch₂ ⊕ …``, exactly. Top-level
chains are threaded the same way. This costs O(entries · bins) in all, instead of
O(bins²) per convolution, and the back-pointers compose without split tables: a
branch's start budget is where the previous branch (or the source) ends.

Backtracking starts at the last top-level position with ``b = bins`` and follows the
back-pointers; a walked region is undone branch by branch in reverse order.

A floor
-------
``floor_ms`` asks for the most important plan whose latency lies between the floor
and the budget (the closed loop uses it when the plans that are best under a budget
jump over its target). The program then starts from δ in the *exactly* convention —
``0`` at ``b = 0``, ``-inf`` elsewhere — so that ``best[b]`` is the most importance
of a plan costing exactly ``b`` bins (shifts and maxima keep that meaning), and
backtracking starts at the best ``b`` between the floor's bin and ``bins`` (the
highest among ties). The budget stays a guarantee; the floor holds on the rounded
costs, so a plan's un-rounded latency may fall under it by its rounding slack.

If no plan fits, :class:`InfeasibleBudget` states the smallest achievable latency
(an exact min-plus program over the un-rounded latencies) and a budget at which the
rounded program is certain to find a plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from fxmerge.ir import Chain, Option, Parallel, Span, SpanGraph, entry_id
from fxmerge.plan import Plan, chain_spans

__all__ = [
    "METHODS",
    "MIN_BINS",
    "InfeasibleBudget",
    "MissingEntries",
    "min_latency",
    "plan_importance",
    "plan_latency",
    "solve",
    "solve_down_to_fastest",
]

METHODS = ("layermerge", "depth", "layer")
MIN_BINS = 1000
# Bins are this much (relatively) narrower than budget / bins, so that floating-point
# rounding in the sums cannot undo the budget guarantee; far below one bin's worth.
_WIDTH_MARGIN = 1e-9


class InfeasibleBudget(ValueError):
    """No plan fits the latency budget.

    ``min_latency_ms`` is the smallest predicted latency any plan of the method can
    reach; ``suggested_ms`` is a budget at which the solver is certain to find a plan
    (``None`` if more bins are needed first).
    """

    def __init__(self, message: str, *, budget_ms: float, min_latency_ms: float, suggested_ms: float | None):
        super().__init__(message)
        self.budget_ms = budget_ms
        self.min_latency_ms = min_latency_ms
        self.suggested_ms = suggested_ms


class MissingEntries(KeyError):
    """A latency or importance table lacks entries the solver needs."""

    def __str__(self) -> str:  # KeyError would print the message's repr
        return str(self.args[0]) if self.args else ""


# ------------------------------------------------------------------ public functions
def solve(
    span_graph: SpanGraph,
    latency_table,
    importance_table,
    budget_ms: float,
    *,
    method: str = "layermerge",
    bins: int = 2000,
    floor_ms: float | None = None,
) -> Plan:
    """The plan of ``span_graph`` with the most importance whose latency fits ``budget_ms``.

    ``latency_table`` has ``.entries`` (entry id -> ms) and optionally ``.offset_ms``,
    or is a plain mapping (offset 0); ``importance_table`` has ``.entries`` or is a
    mapping. The predicted latency of the returned plan (``info["predicted_ms"]``:
    un-rounded entry latencies plus the offset) never exceeds ``budget_ms``; see the
    module docstring for why. With ``floor_ms``, only plans whose rounded latency
    reaches ``floor_ms`` compete (module docstring: *A floor*). Raises
    :class:`InfeasibleBudget` when no plan fits.
    """
    bins = _check_bins(bins)
    programs = _compile(span_graph, method)
    latency, offset = _read_table(latency_table, "latency table")
    importance, _ = _read_table(importance_table, "importance table")
    needed = sorted(set(_entry_ids(programs)))
    _require(latency, needed, "latency table", nonnegative=True)
    _require(importance, needed, "importance table", nonnegative=False)
    budget = float(budget_ms)
    if not math.isfinite(budget):
        raise ValueError(f"budget_ms must be a finite number of milliseconds, got {budget_ms!r}")

    available = budget - offset
    if available < 0:
        raise _infeasible(programs, latency, offset, budget, bins, method)
    cost = _bin_costs(latency, needed, available, bins)
    program = _MaxPlus(cost, {e: float(importance[e]) for e in needed}, bins)

    curve = np.zeros(bins + 1) if floor_ms is None else np.where(np.arange(bins + 1) == 0, 0.0, -np.inf)
    traces = []
    for chain_program in programs:
        curve, trace = program.run(chain_program, curve)
        traces.append(trace)
    remaining = bins if floor_ms is None else _best_bin_above(curve, (float(floor_ms) - offset) / available * bins)
    if curve[remaining] == -np.inf:
        if floor_ms is not None and curve.max() > -np.inf:
            raise _empty_window(float(floor_ms), budget, _fastest(programs, latency)[0] + offset)
        raise _infeasible(programs, latency, offset, budget, bins, method)

    chosen: list[str] = []
    for chain_program, trace in reversed(list(zip(programs, traces))):
        remaining = program.backtrack(chain_program, trace, remaining, chosen)
    info = (
        ("predicted_ms", plan_latency(chosen, latency_table)),
        ("budget_ms", budget),
        ("objective", plan_importance(chosen, importance_table)),
    )
    return Plan.from_entries(span_graph, chosen, method=method, info=info)


def solve_down_to_fastest(
    span_graph: SpanGraph,
    latency_table,
    importance_table,
    budget_ms: float,
    *,
    method: str = "layermerge",
    bins: int = 2000,
    floor_ms: float | None = None,
) -> Plan:
    """:func:`solve`, except that a budget at the fastest plan's latency returns that plan.

    Rounding entry latencies up to bins can make the fastest plan cost a bin more than
    its exact latency; when ``budget_ms`` is there, the budget the infeasibility
    suggests (the smallest that admits the fastest plan after rounding) is used instead.
    """
    options = {"method": method, "bins": bins, "floor_ms": floor_ms}
    try:
        return solve(span_graph, latency_table, importance_table, budget_ms, **options)
    except InfeasibleBudget as exc:
        if exc.suggested_ms is None or exc.suggested_ms <= budget_ms:
            raise
        return solve(span_graph, latency_table, importance_table, exc.suggested_ms, **options)


def min_latency(span_graph: SpanGraph, latency_table, method: str = "layermerge") -> float:
    """The smallest predicted latency (entries plus offset, in ms) a plan of ``method`` can have."""
    programs = _compile(span_graph, method)
    latency, offset = _read_table(latency_table, "latency table")
    _require(latency, sorted(set(_entry_ids(programs))), "latency table", nonnegative=True)
    total, _ = _fastest(programs, latency)
    return total + offset


def plan_latency(plan: Plan | Iterable[str], latency_table) -> float:
    """Predicted latency of a plan (or of entry ids): their latencies plus the table's offset."""
    latency, offset = _read_table(latency_table, "latency table")
    ids = list(plan.entries if isinstance(plan, Plan) else plan)
    _require(latency, ids, "latency table", nonnegative=False)
    return math.fsum(float(latency[e]) for e in ids) + offset


def plan_importance(plan: Plan | Iterable[str], importance_table) -> float:
    """The solver's objective for a plan (or entry ids): the sum of their importances."""
    importance, _ = _read_table(importance_table, "importance table")
    ids = list(plan.entries if isinstance(plan, Plan) else plan)
    _require(importance, ids, "importance table", nonnegative=False)
    return math.fsum(float(importance[e]) for e in ids)


# ------------------------------------------------------------------ compiled chains
@dataclass(frozen=True)
class _Jump:
    """Arrive from position ``start`` of the same chain through ``entries`` (one span option)."""

    start: int
    entries: tuple[str, ...]


@dataclass(frozen=True)
class _Walk:
    """Arrive from the previous position by tiling each branch of a parallel region."""

    branches: tuple[_Program, ...]


@dataclass(frozen=True)
class _Program:
    """A chain compiled for the program: ``arrivals[j]`` are the ways to reach position j."""

    arrivals: tuple[tuple[_Jump | _Walk, ...], ...]


def _admits(method: str) -> Callable[[Span, Option], bool]:
    if method == "layermerge":
        return lambda _span, _option: True
    if method == "depth":
        return lambda _span, option: not option.pruned
    if method == "layer":
        return lambda span, option: not span.joins and len(span.units) - len(option.pruned) == 1
    raise ValueError(f"unknown method {method!r}; valid methods are {', '.join(map(repr, METHODS))}")


def _compile(span_graph: SpanGraph, method: str) -> tuple[_Program, ...]:
    admits = _admits(method)
    return tuple(_compile_chain(chain, span_graph, admits) for chain in span_graph.chains)


def _compile_chain(chain: Chain, span_graph: SpanGraph, admits: Callable[[Span, Option], bool]) -> _Program:
    if len(chain.steps) != len(chain.positions) - 1:
        raise ValueError(
            f"malformed chain starting at {chain.positions[:1]}: {len(chain.positions)} positions "
            f"but {len(chain.steps)} steps"
        )
    index = {p: k for k, p in enumerate(chain.positions)}
    arrivals: list[list[_Jump | _Walk]] = [[] for _ in chain.positions]
    for span in chain_spans(chain, span_graph):
        i, j = index[span.start], index[span.end]
        arrivals[j].extend(_Jump(i, (entry_id(span.id, option.id),)) for option in span.options if admits(span, option))
    for k, step in enumerate(chain.steps):
        if step.kind == "parallel":
            if not isinstance(step.region, Parallel):
                raise ValueError(f"parallel step after {chain.positions[k]!r} has no Parallel region")
            branches = tuple(_compile_chain(b, span_graph, admits) for b in step.region.branches)
            arrivals[k + 1].append(_Walk(branches))
        elif step.kind != "unit":
            raise ValueError(f"unknown step kind {step.kind!r} after {chain.positions[k]!r}")
    return _Program(tuple(tuple(a) for a in arrivals))


def _entry_ids(programs: Iterable[_Program]) -> Iterator[str]:
    for program in programs:
        for arrivals in program.arrivals:
            for arrival in arrivals:
                if isinstance(arrival, _Jump):
                    yield from arrival.entries
                else:
                    yield from _entry_ids(arrival.branches)


# ------------------------------------------------------------------ tables
def _read_table(table, what: str) -> tuple[Mapping[str, float], float]:
    entries = getattr(table, "entries", None)
    if isinstance(entries, Mapping):
        return entries, float(getattr(table, "offset_ms", 0.0) or 0.0)
    if isinstance(table, Mapping):
        return table, 0.0
    raise TypeError(
        f"the {what} must be a mapping from entry id to a number, or have such a mapping "
        f"as .entries; got {type(table).__name__}"
    )


def _require(table: Mapping[str, float], ids: list[str], what: str, *, nonnegative: bool) -> None:
    missing = [e for e in ids if e not in table]
    if missing:
        shown = ", ".join(repr(e) for e in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise MissingEntries(
            f"the {what} has no value for {len(missing)} of the {len(ids)} entries needed: {shown}; "
            "it was probably built for another span graph or with other settings"
        )
    for e in ids:
        value = float(table[e])
        if not math.isfinite(value) or (nonnegative and value < 0):
            kind = "a finite, non-negative" if nonnegative else "a finite"
            raise ValueError(f"the {what} gives entry {e!r} the value {value!r}; it must be {kind} number")


def _check_bins(bins) -> int:
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)):
        raise TypeError(f"bins must be an integer, got {bins!r}")
    if bins < MIN_BINS:
        raise ValueError(f"bins must be at least {MIN_BINS} (got {bins}): fewer bins make the rounding loss too large")
    return int(bins)


def _bin_costs(latency: Mapping[str, float], ids: list[str], available: float, bins: int) -> dict[str, int]:
    """Each entry's latency in whole bins of (a hair under) ``available / bins`` ms, rounded up.

    An entry that alone overflows the budget costs ``bins + 1``.
    """
    ms = np.array([float(latency[e]) for e in ids], dtype=float)
    if available > 0:
        width = available / bins * (1 - _WIDTH_MARGIN)
        cost = np.ceil(ms / width)
        cost[cost * width < ms] += 1  # never let a division rounding lose the guarantee
    else:
        cost = np.where(ms == 0, 0.0, np.inf)
    cost = np.minimum(cost, bins + 1).astype(np.int64)
    return dict(zip(ids, cost.tolist()))


# ------------------------------------------------------------------ the max-plus program
@dataclass
class _Trace:
    """Back-pointers of one chain run: ``picks[j][b]`` is the arrival that wins at (j, b)."""

    picks: list[np.ndarray | None]
    walks: dict[tuple[int, int], list[_Trace]] = field(default_factory=dict)


class _MaxPlus:
    """Runs compiled chains on importance curves over ``0 .. bins`` bins."""

    def __init__(self, cost: Mapping[str, int], value: Mapping[str, float], bins: int):
        self.cost = cost
        self.value = value
        self.bins = bins

    def _jump(self, jump: _Jump) -> tuple[int, float]:
        return sum(self.cost[e] for e in jump.entries), math.fsum(self.value[e] for e in jump.entries)

    def run(self, program: _Program, start: np.ndarray) -> tuple[np.ndarray, _Trace]:
        """Thread ``start`` through the chain; return its last position's curve."""
        size = self.bins + 1
        curves: list[np.ndarray] = [start]
        trace = _Trace(picks=[None])
        for j in range(1, len(program.arrivals)):
            arrivals = program.arrivals[j]
            offers = np.full((max(len(arrivals), 1), size), -np.inf)
            for r, arrival in enumerate(arrivals):
                if isinstance(arrival, _Jump):
                    cost, value = self._jump(arrival)
                    if cost <= self.bins:
                        offers[r, cost:] = curves[arrival.start][: size - cost] + value
                else:
                    curve, walked = curves[j - 1], []
                    for branch in arrival.branches:
                        curve, branch_trace = self.run(branch, curve)
                        walked.append(branch_trace)
                    offers[r] = curve
                    trace.walks[(j, r)] = walked
            pick = offers.argmax(axis=0)
            curves.append(offers[pick, np.arange(size)])
            trace.picks.append(pick)
        return curves[-1], trace

    def backtrack(self, program: _Program, trace: _Trace, budget: int, out: list[str]) -> int:
        """Append the winning entries at ``budget`` bins to ``out``; return the budget at the start."""
        j = len(program.arrivals) - 1
        while j > 0:
            r = int(trace.picks[j][budget])
            arrival = program.arrivals[j][r]
            if isinstance(arrival, _Jump):
                out.extend(arrival.entries)
                budget -= self._jump(arrival)[0]
                j = arrival.start
            else:
                for branch, branch_trace in reversed(list(zip(arrival.branches, trace.walks[(j, r)]))):
                    budget = self.backtrack(branch, branch_trace, budget, out)
                j -= 1
        return budget


def _best_bin_above(curve: np.ndarray, floor_bin: float) -> int:
    """The bin from ``floor_bin`` on where ``curve`` (exact-cost importances) is largest; the last of ties."""
    start = min(max(int(math.ceil(floor_bin)), 0), len(curve) - 1)
    window = curve[start:][::-1]
    return len(curve) - 1 - int(window.argmax())


# ------------------------------------------------------------------ infeasibility
def _fastest(programs: Iterable[_Program], latency: Mapping[str, float]) -> tuple[float, int]:
    """(latency, entry count) of the fastest plan, fewest entries among ties; exact."""
    best = (0.0, 0)
    for program in programs:
        best = _fastest_chain(program, latency, best)
    return best


def _fastest_chain(program: _Program, latency: Mapping[str, float], start: tuple[float, int]) -> tuple[float, int]:
    reach = [start]
    for j in range(1, len(program.arrivals)):
        offers = []
        for arrival in program.arrivals[j]:
            if isinstance(arrival, _Jump):
                ms, count = reach[arrival.start]
                offers.append(
                    (
                        ms + math.fsum(float(latency[e]) for e in arrival.entries),
                        count + len(arrival.entries),
                    )
                )
            else:
                here = reach[j - 1]
                for branch in arrival.branches:
                    here = _fastest_chain(branch, latency, here)
                offers.append(here)
        reach.append(min(offers, default=(math.inf, 0)))
    return reach[-1]


def _round_up(value: float, digits: int = 6) -> float:
    """``value`` rounded up to ``digits`` significant digits (never down)."""
    if value <= 0 or not math.isfinite(value):
        return value
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * (1 + 1e-12) * scale) / scale


def _empty_window(floor_ms: float, budget_ms: float, fastest_ms: float) -> InfeasibleBudget:
    return InfeasibleBudget(
        f"no plan's latency lies between {floor_ms:.6g} ms and {budget_ms:.6g} ms",
        budget_ms=budget_ms,
        min_latency_ms=fastest_ms,
        suggested_ms=None,
    )


def _infeasible(
    programs: tuple[_Program, ...],
    latency: Mapping[str, float],
    offset: float,
    budget: float,
    bins: int,
    method: str,
) -> InfeasibleBudget:
    spent, count = _fastest(programs, latency)
    fastest = spent + offset
    if not math.isfinite(fastest):
        return InfeasibleBudget(
            f"no {method!r} plan exists for this span graph (some position cannot be reached "
            "with the options this method allows)",
            budget_ms=budget,
            min_latency_ms=fastest,
            suggested_ms=None,
        )
    # The fastest plan survives rounding once sum ceil(l/w) <= spent/w + count <= bins,
    # i.e. once the budget reaches offset + spent * bins / (bins - count) (w narrowed).
    suggested = _round_up(offset + spent * bins / ((bins - count) * (1 - _WIDTH_MARGIN))) if count < bins else None
    advice = (
        f"ask for a target of at least {suggested:.6g} ms"
        if suggested is not None
        else f"use more than {count} bins and a target above {fastest:.6g} ms"
    )
    if budget < fastest:
        message = (
            f"latency budget {budget:.6g} ms is below the smallest latency a {method!r} plan can have: "
            f"{fastest:.6g} ms ({spent:.6g} ms of spans + {offset:.6g} ms offset); {advice}"
        )
    else:
        message = (
            f"latency budget {budget:.6g} ms is barely above the smallest latency a {method!r} plan can "
            f"have ({fastest:.6g} ms), and with every entry's latency rounded up to whole bins of "
            f"{(budget - offset) / bins:.3g} ms no plan provably fits; {advice} (or pass more bins)"
        )
    return InfeasibleBudget(message, budget_ms=budget, min_latency_ms=fastest, suggested_ms=suggested)
