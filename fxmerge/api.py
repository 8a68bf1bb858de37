"""The public pipeline: ``analyze``, ``linearize`` and ``compress``.

``compress`` captures the model once and hands that captured graph forward:

    capture → match → span graph (→ paper rules) → latency table (+ calibration on the
    BatchNorm-folded original) → importance table → solve → linearize

The result holds the trainable linearized model, the plan, a report, and
``merge()`` for the exact deployable model.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from fxmerge import distributed
from fxmerge.capture import Captured, capture
from fxmerge.ir import SpanGraph
from fxmerge.loop import LoopOutcome, Measured, Target, clearly_missed, meet_target
from fxmerge.passes import linearize as linearize_pass
from fxmerge.passes.match import match
from fxmerge.passes.merge import merge
from fxmerge.passes.rules import default_max_kernel, default_max_units, paper_rules
from fxmerge.passes.spans import span_graph as build_span_graph
from fxmerge.plan import Plan
from fxmerge.report import ChosenSpan, Report
from fxmerge.solver import InfeasibleBudget, solve_down_to_fastest

RULES = ("general", "paper")


# --------------------------------------------------------------------------- analyze
def analyze_captured(
    captured: Captured,
    *,
    rules: str = "general",
    exclude: tuple[str, ...] | list[str] | None = None,
    max_kernel: int | None = None,
) -> SpanGraph:
    """The span graph of a captured model (match → span graph → rules)."""
    if rules not in RULES:
        raise ValueError(f"unknown rules {rules!r}; choose one of {RULES}")
    max_kernel = default_max_kernel(rules) if max_kernel is None else max_kernel
    if max_kernel is not None and max_kernel < 1:
        raise ValueError(f"max_kernel must be at least 1, got {max_kernel}")
    leaves = {leaf.node: leaf.reason for leaf in captured.leaves}
    matched = match(captured.gm, exclude=tuple(exclude or ()), leaves=leaves)
    shapes = [tuple(t.shape) for t in captured.example_inputs if isinstance(t, torch.Tensor)]
    graph = build_span_graph(
        matched,
        model=captured.name,
        input_shapes=shapes,
        rules=rules,
        max_kernel=max_kernel,
        max_units=default_max_units(rules),
    )
    if rules == "paper":
        graph = paper_rules(graph)
    # a leaf's call sites are already rejected with the leaf's reason; add the leaves never called
    reported = {r.reason for r in graph.rejections}
    leaves_left = tuple(leaf for leaf in captured.leaves if leaf.reason not in reported)
    if leaves_left:
        graph = replace(graph, rejections=graph.rejections + leaves_left)
    return graph


def analyze(
    model: nn.Module,
    example_input,
    *,
    rules: str = "general",
    exclude: tuple[str, ...] | list[str] | None = None,
    max_kernel: int | None = None,
) -> SpanGraph:
    """The span graph of ``model`` at ``example_input``: what fxmerge may merge, and why not elsewhere.

    ``exclude`` lists module names kept out of every span (a prefix matches the
    modules below it); ``max_kernel`` bounds a merged kernel's size (default 15 under
    ``rules="general"``, unbounded under ``"paper"``).
    """
    return analyze_captured(capture(model, example_input), rules=rules, exclude=exclude, max_kernel=max_kernel)


def linearize(
    model: nn.Module,
    example_input,
    plan: Plan,
    *,
    span_graph: SpanGraph | None = None,
    exclude=None,
    max_kernel: int | None = None,
    postnorm: bool | None = None,
) -> torch.fx.GraphModule:
    """The trainable network computing ``plan`` applied to ``model`` (``model`` is left as it is).

    Pass the ``span_graph`` the plan was made for, or the analysis settings it was
    made with; the plan is validated against it. The result is in ``model``'s mode.
    ``postnorm``: a fresh GroupNorm after each span that removed a normalised
    activation (``None``: on under ``rules="paper"``, off under ``"general"``).
    """
    captured = capture(model, example_input)
    if span_graph is None:
        span_graph = analyze_captured(captured, rules=plan.rules, exclude=exclude, max_kernel=max_kernel)
    result = linearize_pass.linearize(captured, span_graph, plan, postnorm=postnorm)
    return result.train(getattr(model, "training", False))


# --------------------------------------------------------------------------- compress
@dataclass(frozen=True)
class CompressResult:
    model: torch.fx.GraphModule
    plan: Plan
    report: Report
    span_graph: SpanGraph

    def merge(self) -> torch.fx.GraphModule:
        """The exact merged model (eval mode) of the current — e.g. fine-tuned — ``model``."""
        was_training = self.model.training
        self.model.eval()
        try:
            return merge(self.model, self.plan)
        finally:
            self.model.train(was_training)


def parse_target(target_latency) -> Target:
    """A :class:`Target` from ``"60%"`` (a share of the original) or milliseconds (``12.5``, ``"12.5ms"``)."""
    if isinstance(target_latency, Target):
        return target_latency
    if isinstance(target_latency, str):
        text = target_latency.strip()
        if text.endswith("%"):
            try:
                fraction = float(text[:-1]) / 100.0
            except ValueError:
                raise ValueError(f"cannot read target {target_latency!r}; use e.g. '60%' or a number of ms") from None
            if not 0 < fraction <= 1.5:
                raise ValueError(f"target {target_latency!r} is outside (0%, 150%]")
            return Target(ratio=fraction)
        try:
            value = float(text.removesuffix("ms"))
        except ValueError:
            raise ValueError(f"cannot read target {target_latency!r}; use e.g. '60%' or a number of ms") from None
    else:
        value = float(target_latency)
    if not value > 0:
        raise ValueError(f"target latency must be a positive number of ms, got {target_latency!r}")
    return Target(ms=value)


class TargetUnreachable(InfeasibleBudget):
    """Even the fastest plan fxmerge can build is slower than the target, as measured.

    ``smallest`` is the smallest achievable target in the unit the user gave: a
    fraction of the original for a ``"%"`` target, milliseconds otherwise.
    """

    def __init__(self, message: str, *, smallest: float, unit: str, **figures) -> None:
        super().__init__(message, **figures)
        self.smallest = smallest
        self.unit = unit


@dataclass(frozen=True)
class LoopSettings:
    """The closed latency loop (``fxmerge.loop``): on by default."""

    enabled: bool = True
    tolerance: float = 0.03
    max_rounds: int = 4


class _Stopwatch:
    def __init__(self) -> None:
        self.stages: list[tuple[str, float]] = []
        self.clock = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.stages.append((name, now - self.clock))
        self.clock = now


def compress(
    model: nn.Module,
    example_input,
    target_latency,
    *,
    backend="auto",
    threads: int | None = None,
    importance="auto",
    data=None,
    method: str = "layermerge",
    rules: str = "general",
    exclude=None,
    max_kernel: int | None = None,
    cache_dir=None,
    progress: bool = True,
    bins: int = 2000,
    closed_loop: bool = True,
    tolerance: float = 0.03,
    max_rounds: int = 4,
    **importance_options,
) -> CompressResult:
    """Choose which activations and convs to remove so the merged model meets ``target_latency``.

    ``target_latency``: milliseconds end to end on ``backend``, or a share of the
    original's measured latency (``"60%"``); ``threads``: the backend's thread count
    (default: the physical cores). ``importance``: an estimator name (``"distortion"``,
    ``"loss"``, ``"finetune"``, ``"paper"``, ``"auto"``) or a callable ``(model) -> float``,
    fed by ``data``; further keywords are its options. With ``closed_loop`` (default)
    each solved plan is merged and timed against the original, and the budget corrected
    until the measured ratio is within ``tolerance`` of the target (at most
    ``max_rounds`` solves; ``fxmerge.loop``). ``cache_dir``: where both tables are cached
    (default: fxmerge's cache directory; ``False``: none). Fine-tune ``result.model``, then merge.
    """
    from fxmerge.importance import build_importance_table
    from fxmerge.latency import get_backend

    target = parse_target(target_latency)
    loop = LoopSettings(closed_loop, float(tolerance), int(max_rounds))
    watch = _Stopwatch()
    captured = capture(model, example_input)
    span_graph = analyze_captured(captured, rules=rules, exclude=exclude, max_kernel=max_kernel)
    watch.lap("analyze")
    notes = [*captured.notes, *(() if span_graph.units else ("nothing to merge: the model has no convolution",))]
    timer = get_backend(backend, threads=threads) if isinstance(backend, str) else backend
    table, folded = _latency_table(captured, span_graph, timer, _subdir(cache_dir, "latency"), progress, notes)
    watch.lap("latency table")
    if target.not_below(table.original_ms):
        return _unchanged(captured, span_graph, table, target, timer, watch, notes, model.training)
    importance_dir = _subdir(cache_dir, "importance")
    scores = build_importance_table(captured, span_graph, importance, data=data, cache_dir=importance_dir,
                                    progress=progress, **importance_options)  # fmt: skip
    watch.lap("importance table")
    choice = distributed.run_on_main(  # under torchrun one process solves and times, every process gets its plan
        lambda: _choose_plan(captured, span_graph, table, scores, target, timer, folded, loop, method, bins)
    )
    watch.lap("solve and measure" if loop.enabled else "solve")
    linearized = linearize_pass.linearize(captured, span_graph, choice.plan).train(model.training)
    watch.lap("linearize")
    report = _report(span_graph, choice, scores, method, target, watch.stages, notes, timer)
    return CompressResult(model=linearized, plan=choice.plan, report=report, span_graph=span_graph)


def _latency_table(captured: Captured, span_graph: SpanGraph, timer, cache_dir, progress: bool, notes: list[str]):
    """The latency table, calibrated on the BatchNorm-folded original; and that original."""
    from fxmerge.latency import build_latency_table, calibrate

    table = build_latency_table(span_graph, timer, cache_dir=cache_dir, progress=progress)
    folded = _folded(captured, notes)
    table = calibrate(table, folded, captured.example_inputs, Plan.keep_all(span_graph).entries, timer)
    if str(table.info.get("weights", "")).startswith("cold"):
        notes.append(f"latency table {table.info['weights']}")
    if "timing" in table.info:  # under torchrun: who timed, and why
        notes.append(
            f"{table.info['timing']}; the plan is solved (and, in the closed loop, timed) by rank 0 "
            "and sent to every rank"
        )
    return table, folded


@dataclass(frozen=True)
class _Choice:
    plan: Plan
    outcome: LoopOutcome | None
    table: object  # the latency table the plan was chosen with (context-corrected by the loop)


def _choose_plan(
    captured, span_graph, table, scores, target: Target, timer, folded, loop: LoopSettings, method: str, bins: int
) -> _Choice:
    """Solve for the target; with the loop on, measure, correct the table and the budget, solve again.

    A plan that misses corrects the table: the original becomes the median of its
    timings beside the plans (:func:`~fxmerge.latency.table.reanchored`), then the
    per-conv context cost is fitted on every plan measured
    (:func:`~fxmerge.latency.table.context_corrected`) for the later solves.
    """
    from fxmerge.latency.compare import Comparator
    from fxmerge.latency.table import context_corrected, reanchored
    from fxmerge.solver import plan_latency

    first = target.ratio * table.original_ms if target.ratio is not None else target.ms
    if not loop.enabled:  # the table is trusted: a target below its fastest plan is infeasible
        from fxmerge.solver import solve

        return _Choice(solve(span_graph, table, scores, first, method=method, bins=bins), None, table)
    comparator = Comparator(folded, captured.example_inputs, timer)
    keep_all, calibrated, fitted = Plan.keep_all(span_graph).entries, table, []
    current, originals = {"table": table}, []

    def measure(plan: Plan) -> Measured:
        merged = merge(linearize_pass.linearize(captured, span_graph, plan, share_parameters=True))
        result = comparator.compare(merged, stop_when=clearly_missed(target, loop.tolerance))
        measured = Measured(result.reference_ms, result.candidate_ms, result.ratio, result.rel_error)
        fitted.append((plan.entries, result.ratio))
        originals.append(result.reference_ms)
        if abs(target.error(measured)) > loop.tolerance:
            anchored = reanchored(calibrated, statistics.median(originals), keep_all)
            current["table"] = context_corrected(anchored, keep_all, fitted)
        return measured

    def solve_at(budget: float, floor: float | None = None) -> Plan:
        return solve_down_to_fastest(
            span_graph, current["table"], scores, budget, method=method, bins=bins, floor_ms=floor
        )

    opening = solve_at(first)
    measured = measure(opening)
    budget_range = _budget_range(span_graph, current["table"], method, first)
    outcome = meet_target(
        solve_at,
        measure,
        target,
        first_budget_ms=first,
        budget_range=budget_range,
        tolerance=loop.tolerance,
        max_rounds=loop.max_rounds,
        seed=[(opening, measured)],
        solve_between=lambda low, high: solve_at(high, low),
        predict=lambda plan: plan_latency(plan, current["table"]),
    )
    too_slow = all(
        target.error(Measured(r.original_ms, r.measured_ms, r.ratio)) > loop.tolerance for r in outcome.rounds
    )
    if too_slow and any(r.budget_ms <= budget_range[0] * (1 + 1e-9) for r in outcome.rounds):
        raise _unreachable(outcome, target, timer)
    return _Choice(outcome.plan, outcome, current["table"])


def _budget_range(span_graph, table, method: str, first: float) -> tuple[float, float]:
    from fxmerge.solver import min_latency

    return min_latency(span_graph, table, method), max(float(table.original_ms), first) * 1.5


def _unreachable(outcome: LoopOutcome, target: Target, timer) -> TargetUnreachable:
    fastest = min(outcome.rounds, key=lambda r: r.ratio)
    where = f"{getattr(timer, 'name', 'the backend')} ({getattr(timer, 'threads', '?')} thread(s))"
    if target.ratio is not None:
        smallest, unit = fastest.ratio, "fraction"
        message = (
            f"target {target.ratio:.0%} cannot be met on {where}: the smallest achievable is "
            f"{fastest.ratio:.1%} of the original, measured on the fastest plan fxmerge can build "
            f"({fastest.measured_ms:.4g} ms against {fastest.original_ms:.4g} ms); "
            f"ask for {math.ceil(fastest.ratio * 100)}% or more"
        )
    else:
        smallest, unit = fastest.measured_ms, "ms"
        message = (
            f"target {target.ms:.4g} ms cannot be met on {where}: the smallest achievable latency is "
            f"{fastest.measured_ms:.4g} ms, measured on the fastest plan fxmerge can build (the original: "
            f"{fastest.original_ms:.4g} ms); ask for {round_up(fastest.measured_ms)} ms or more"
        )
    return TargetUnreachable(
        message,
        smallest=smallest,
        unit=unit,
        budget_ms=fastest.budget_ms,
        min_latency_ms=fastest.measured_ms,
        suggested_ms=fastest.budget_ms,
    )


def round_up(value: float, digits: int = 3) -> str:
    """``value`` rounded up to ``digits`` significant digits, as text (a target that surely suffices)."""
    if not math.isfinite(value) or value <= 0:
        return f"{value:.{digits}g}"
    step = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return f"{math.ceil(value / step) * step:.{digits}g}"


def _unchanged(captured, span_graph, table, target: Target, timer, watch, notes, training) -> CompressResult:
    """A target at or above the original's latency: nothing to remove, the original is returned."""
    plan = Plan.keep_all(span_graph)
    asked = target.describe()
    notes.append(f"target {asked} is not below the original's latency: nothing to compress, the model is unchanged")
    linearized = linearize_pass.linearize(captured, span_graph, plan).train(training)
    ms = target.ms if target.ms is not None else target.ratio * table.original_ms
    report = Report(
        model=span_graph.model,
        backend=table.backend,
        method="keep_all",
        original_ms=float(table.original_ms),
        target_ms=ms,
        predicted_ms=float(table.original_ms),
        offset_ms=float(table.offset_ms),
        convs_before=len(span_graph.units),
        convs_after=len(span_graph.units),
        activations_removed=0,
        chosen=(),
        stage_seconds=tuple(watch.stages),
        notes=tuple(notes),
        threads=getattr(timer, "threads", None),
        coverage=span_graph.coverage,
        target_met=True,
        unchanged=True,
    )
    return CompressResult(model=linearized, plan=plan, report=report, span_graph=span_graph)


def _subdir(cache_dir, kind: str):
    """Where a table of ``kind`` is cached: ``None`` (the default place) and ``False`` (no cache) pass through."""
    return cache_dir if cache_dir is None or cache_dir is False else Path(cache_dir) / kind


def _report(span_graph, choice: _Choice, scores, method, target: Target, stages, notes, timer) -> Report:
    plan, table = choice.plan, choice.table
    chosen = tuple(
        ChosenSpan(
            span=e.span,
            option=e.option.id,
            units=len(span_graph.span(e.span).units),
            kernel=tuple(e.conv.kernel_size),
            latency_ms=float(table.entries[e.id]),
            importance=float(scores.entries[e.id]),
        )
        for e in plan.chosen(span_graph)
    )
    removed = sum(len(span_graph.span(e.span).dropped_activations) for e in plan.chosen(span_graph))
    outcome = choice.outcome
    kept = None if outcome is None else outcome.kept
    if outcome is not None:
        notes = [*notes, f"closed loop: {outcome.why}"]
    context = table.info.get("context_cost")
    if context:
        notes.append(
            f"latency table corrected from end-to-end measurements (the original and {context['plans']} "
            f"plan(s)): each conv costs {context['per_entry_ms']:+.4f} ms inside the model beyond its entry timed alone"
        )
    target_ms = target.ms if target.ms is not None else target.ratio * table.original_ms
    return Report(
        model=span_graph.model,
        backend=table.backend,
        method=method,
        original_ms=float(table.original_ms),
        target_ms=target_ms,
        predicted_ms=float(dict(plan.info)["predicted_ms"]),
        offset_ms=float(table.offset_ms),
        convs_before=len(span_graph.units),
        convs_after=len(plan.entries),
        activations_removed=removed,
        chosen=chosen,
        stage_seconds=tuple(stages),
        notes=tuple(notes),
        threads=getattr(timer, "threads", None),
        coverage=span_graph.coverage,
        rounds=() if outcome is None else outcome.rounds,
        measured_ms=None if kept is None else kept.measured_ms,
        measured_ratio=None if kept is None else kept.ratio,
        target_met=None if outcome is None else outcome.met,
    )


def _folded(captured: Captured, notes: list[str]) -> nn.Module:
    """The original network with BatchNorms folded into their convs: what a merged model is compared with.

    Backends that fold BatchNorm themselves (ONNX Runtime, Inductor with freezing,
    TensorRT) time it the same either way; on eager an unfolded original would inflate
    the calibrated offset by the BatchNorms' cost, which no merged model pays.
    """
    try:
        return merge(captured.gm)
    except Exception as exc:  # noqa: BLE001 - calibrating on the unfolded graph is still valid
        notes.append(f"original timed without BatchNorm folding ({type(exc).__name__}: {exc})")
        return captured.gm
