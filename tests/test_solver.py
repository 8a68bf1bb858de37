"""The solver against an exhaustive search over every valid plan of small span graphs.

The span graphs are built directly from the ir dataclasses (seeded): chains of units,
residual blocks, two-branch regions with convs on both branches, an occasional nested
region, with random longer spans (some covering whole regions) and
pruning options. The exhaustive search enumerates tilings on its own (it shares no
code with the solver) and uses the same rounded-up bin costs for feasibility, so the
two must agree exactly on the optimum.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from fxmerge.ir import (
    Chain,
    ConvSpec,
    Join,
    Option,
    Parallel,
    Position,
    Span,
    SpanGraph,
    Step,
    Unit,
    entry_id,
    span_id,
)
from fxmerge.plan import Plan, _UniformSampler, chain_spans
from fxmerge.solver import (
    METHODS,
    InfeasibleBudget,
    MissingEntries,
    min_latency,
    plan_importance,
    plan_latency,
    solve,
)

CONV = ConvSpec(
    dims=2,
    in_channels=4,
    out_channels=4,
    kernel_size=(3, 3),
    stride=(1, 1),
    padding=(1, 1),
    dilation=(1, 1),
    groups=1,
    bias=True,
    activation="relu",
    input_shape=(1, 4, 8, 8),
)
MAX_PLANS = 3000


# ---------------------------------------------------------------- span graph builder
@dataclass
class _Cover:
    """What a span crossing some steps of a chain absorbs."""

    units: list[str] = field(default_factory=list)
    joins: list[str] = field(default_factory=list)
    inner: list[str] = field(default_factory=list)  # positions strictly inside, off the chain
    crossable: bool = True

    def extend(self, other: _Cover) -> None:
        self.units += other.units
        self.joins += other.joins
        self.inner += other.inner
        self.crossable = self.crossable and other.crossable


class _Builder:
    def __init__(
        self,
        rng: random.Random,
        *,
        prune_rate: float = 0.4,
        long_spans: int = 2,
        mergeable: float = 0.75,
    ):
        self.rng = rng
        self.mergeable = mergeable
        self.prune_rate = prune_rate
        self.long_spans = long_spans
        self.units: list[Unit] = []
        self.joins: list[Join] = []
        self.positions: list[Position] = []
        self.spans: dict[str, Span] = {}

    def position(self, kind: str) -> str:
        pid = f"p{len(self.positions)}"
        activation = None if kind == "source" else "relu"
        self.positions.append(
            Position(
                id=pid,
                index=len(self.positions),
                kind=kind,
                node=f"n_{pid}",
                activation=activation,
                shape=(1, 4, 8, 8),
            )
        )
        return pid

    def span(self, start: str, end: str, cover: _Cover, extra_options: int) -> None:
        sid = span_id(start, end)
        if sid in self.spans:
            return
        options = [Option(id="keep", pruned=(), conv=CONV)]
        subsets = {()}
        for _ in range(extra_options):
            pruned = tuple(u for u in cover.units if self.rng.random() < 0.5) or (cover.units[0],)
            if pruned not in subsets:
                subsets.add(pruned)
                options.append(Option(id=f"p{len(options) - 1}", pruned=pruned, conv=CONV))
        self.spans[sid] = Span(
            id=sid,
            start=start,
            end=end,
            units=tuple(cover.units),
            joins=tuple(cover.joins),
            dropped_activations=tuple(cover.inner),
            options=tuple(options),
        )

    def unit(self, start: str) -> tuple[str, str]:
        uid = f"u{len(self.units)}"
        end = self.position("unit")
        self.units.append(
            Unit(
                id=uid,
                conv_node=f"conv_{uid}",
                affine_nodes=(),
                activation_node=f"act_{uid}",
                activation="relu",
                conv=CONV,
                input_position=start,
                output_position=end,
                reducible=True,
            )
        )
        self.span(start, end, _Cover(units=[uid]), extra_options=int(self.rng.random() < self.prune_rate))
        return uid, end

    def region(self, source: str, branch_lengths: list[int], nested: bool) -> tuple[Step, str, _Cover]:
        branches, cover = [], _Cover()
        for length in branch_lengths:
            branch, branch_cover = self.chain(source, length, nested=nested)
            branches.append(branch)
            cover.extend(branch_cover)
            cover.inner += list(branch.positions[1:][-1:])
            nested = False
        jid = f"j{len(self.joins)}"
        out = self.position("join")
        operands = tuple(b.positions[-1] for b in branches)
        self.joins.append(
            Join(
                id=jid,
                kind="add",
                node=f"add_{jid}",
                affine_nodes=(),
                activation_node=f"act_{jid}",
                activation="relu",
                operands=operands,
                output_position=out,
            )
        )
        mergeable = self.rng.random() < self.mergeable
        cover.joins.insert(0, jid)
        cover.crossable = cover.crossable and mergeable
        return (
            Step("parallel", region=Parallel(join=jid, branches=tuple(branches), mergeable=mergeable)),
            out,
            cover,
        )

    def chain(self, start: str, length: int, *, nested: bool = False, regions: bool = False) -> tuple[Chain, _Cover]:
        """A chain of ``length`` steps; ``regions`` allows regions, ``nested`` one residual inside."""
        positions, steps, covers = [start], [], []
        for _ in range(length):
            here = positions[-1]
            draw = self.rng.random()
            if nested and draw < 0.5:
                nested = False
                step, end, cover = self.region(here, [self.rng.randint(1, 2), 0], nested=False)
            elif not regions or draw < 0.4:
                uid, end = self.unit(here)
                step, cover = Step("unit", unit=uid), _Cover(units=[uid])
            elif draw < 0.65:  # residual block: convs and an identity skip
                step, end, cover = self.region(here, [self.rng.randint(1, 3), 0], nested=self.rng.random() < 0.25)
            else:  # convs on both branches
                step, end, cover = self.region(here, [self.rng.randint(1, 2), self.rng.randint(1, 2)], nested=False)
            positions.append(end)
            steps.append(step)
            covers.append(cover)
        chain = Chain(positions=tuple(positions), steps=tuple(steps))
        self.add_long_spans(chain, covers)
        total = _Cover()
        for cover in covers:
            total.extend(cover)
        total.inner += list(positions[1:-1])
        return chain, total

    def add_long_spans(self, chain: Chain, covers: list[_Cover]) -> None:
        n = len(chain.positions)
        for _ in range(self.long_spans):
            if n < 2:
                return
            i = self.rng.randrange(n - 1)
            j = self.rng.randrange(i + 1, min(n, i + 4))
            if j == i + 1 and chain.steps[i].kind != "parallel":
                continue  # that would be a single unit's span
            if not all(c.crossable for c in covers[i:j]):
                continue
            cover = _Cover()
            for c in covers[i:j]:
                cover.extend(c)
            cover.inner += list(chain.positions[i + 1 : j])
            self.span(chain.positions[i], chain.positions[j], cover, extra_options=self.rng.randint(0, 2))

    def graph(self, chains: list[Chain]) -> SpanGraph:
        return SpanGraph(
            model="toy",
            rules="general",
            input_shapes=((1, 3, 8, 8),),
            units=tuple(self.units),
            joins=tuple(self.joins),
            positions=tuple(self.positions),
            spans=tuple(self.spans.values()),
            chains=tuple(chains),
            rejections=(),
        )


def random_graph(seed: int) -> SpanGraph:
    rng = random.Random(seed)
    builder = _Builder(rng, prune_rate=rng.choice([0.3, 0.7]), long_spans=rng.randint(3, 8))
    chains = []
    for _ in range(1 if rng.random() < 0.7 else 2):
        if len(builder.positions) >= 8:
            break
        chain, _ = builder.chain(builder.position("source"), rng.randint(2, 5), regions=True)
        chains.append(chain)
    return builder.graph(chains)


# ---------------------------------------------------------------- exhaustive search
ADMITS = {
    "layermerge": lambda span, option: True,
    "depth": lambda span, option: option.pruned == (),
    "layer": lambda span, option: span.joins == () and len(span.units) - len(option.pruned) == 1,
}


def keep_entry(sg: SpanGraph, unit: str) -> str:
    span = sg.single_unit_span(unit)
    return next(entry_id(span.id, o.id) for o in span.options if o.pruned == ())


def tilings(chain: Chain, sg: SpanGraph, method: str) -> list[tuple[str, ...]]:
    """Every tiling of ``chain`` as a tuple of entry ids, by plain recursion."""
    index = {p: k for k, p in enumerate(chain.positions)}
    jumps: dict[int, list[tuple[int, str]]] = {}
    for span in chain_spans(chain, sg):
        i, j = index[span.start], index[span.end]
        for option in span.options:
            if ADMITS[method](span, option):
                jumps.setdefault(i, []).append((j, entry_id(span.id, option.id)))
    memo: dict[int, list[tuple[str, ...]]] = {}

    def from_position(k: int) -> list[tuple[str, ...]]:
        if k == len(chain.positions) - 1:
            return [()]
        if k in memo:
            return memo[k]
        found = []
        for j, entry in jumps.get(k, []):
            found += [(entry, *rest) for rest in from_position(j)]
        step = chain.steps[k]
        if step.kind == "parallel":
            walks = [
                sum(combo, ()) for combo in itertools.product(*(tilings(b, sg, method) for b in step.region.branches))
            ]
            found += [walk + rest for walk in walks for rest in from_position(k + 1)]
        memo[k] = found
        return found

    return from_position(0)


def all_plans(sg: SpanGraph, method: str) -> list[tuple[str, ...]]:
    per_chain = [tilings(chain, sg, method) for chain in sg.chains]
    return [sum(combo, ()) for combo in itertools.product(*per_chain)]


def bin_costs(latency: dict[str, float], offset: float, budget: float, bins: int) -> dict[str, int]:
    width = (budget - offset) / bins * (1 - 1e-9)  # the solver's bins are a hair narrower
    return {e: math.ceil(ms / width) for e, ms in latency.items()}


def random_tables(sg: SpanGraph, rng: random.Random) -> tuple[dict[str, float], dict[str, float], float]:
    latency = {e.id: rng.uniform(0.05, 1.5) for e in sg.entries}
    importance = {e.id: rng.uniform(-0.5, 1.0) for e in sg.entries}
    return latency, importance, rng.choice([0.0, rng.uniform(0.1, 2.0)])


def small_graphs(count: int) -> list[tuple[int, SpanGraph, list[tuple[str, ...]]]]:
    """(seed, span graph, its layermerge plans) for ``count`` graphs of at most 12 positions and few plans."""
    return _graph_pool()[:count]


@functools.cache
def _graph_pool(size: int = 300) -> list[tuple[int, SpanGraph, list[tuple[str, ...]]]]:
    pool, seed = [], 0
    while len(pool) < size:
        sg = random_graph(seed)
        if len(sg.positions) <= 12:
            plans = all_plans(sg, "layermerge")
            if len(plans) <= MAX_PLANS:
                pool.append((seed, sg, plans))
        seed += 1
    return pool


# ---------------------------------------------------------------- tests
def test_generated_graphs_are_consistent():
    kinds = set()
    for seed, sg, plans in small_graphs(120):
        assert len(sg.positions) <= 12
        Plan.keep_all(sg).validate(sg)
        for k in range(3):
            Plan.random(sg, seed=k).validate(sg)
        for entries in plans[:: max(1, len(plans) // 5)]:
            Plan.from_entries(sg, entries)
        assert len(set(plans)) == len(plans)
        sampler = _UniformSampler(sg)
        assert math.prod(sampler._chain_counts(c)[-1] for c in sg.chains) == len(plans), seed
        kinds |= {s.kind for c in sg.chains for s in c.steps}
        kinds |= {
            "nested"
            for c in sg.chains
            for s in c.steps
            if s.kind == "parallel"
            for b in s.region.branches
            for t in b.steps
            if t.kind == "parallel"
        }
        kinds |= {"region-span" for s in sg.spans if s.joins}
    assert kinds >= {"unit", "parallel", "nested", "region-span"}


def test_matches_exhaustive_search():
    cases = feasible = 0
    for seed, sg, layermerge_plans in small_graphs(300):
        rng = random.Random(1000 + seed)
        latency, importance, offset = random_tables(sg, rng)
        if seed % 2:
            table = SimpleNamespace(entries=latency, offset_ms=offset)
        else:  # a plain mapping carries no offset
            table, offset = latency, 0.0
        for method in METHODS:
            plans = layermerge_plans if method == "layermerge" else all_plans(sg, method)
            real = [math.fsum(latency[e] for e in p) for p in plans]
            bins = rng.choice([1000, 1500, 2000])
            if rng.random() < 0.3:  # exactly some plan's latency: on the rounding boundary
                budget = offset + rng.choice(real)
            else:
                budget = offset + rng.uniform(0.9 * min(real), 1.05 * max(real))
            cost = bin_costs(latency, offset, budget, bins)
            fitting = [p for p in plans if sum(cost[e] for e in p) <= bins]
            cases += 1
            if not fitting:
                with pytest.raises(InfeasibleBudget):
                    solve(sg, table, importance, budget, method=method, bins=bins)
                continue
            feasible += 1
            best = max(math.fsum(importance[e] for e in p) for p in fitting)
            plan = solve(sg, table, SimpleNamespace(entries=importance), budget, method=method, bins=bins)
            plan.validate(sg)
            info = dict(plan.info)
            assert info["objective"] == pytest.approx(best, abs=1e-9), (seed, method)
            assert info["objective"] == pytest.approx(plan_importance(plan, importance), abs=1e-12)
            assert info["predicted_ms"] == plan_latency(plan, table)
            assert info["predicted_ms"] <= budget, (seed, method)
            assert info["budget_ms"] == budget
            assert plan.method == method
            assert sum(cost[e] for e in plan.entries) <= bins
            assert tuple(sorted(plan.entries)) in {tuple(sorted(p)) for p in plans}
    print(f"\n{cases} exhaustive cases, {feasible} feasible")
    assert cases >= 900 and feasible >= 450


def test_floor_matches_exhaustive_search():
    """With ``floor_ms``: the most important plan whose rounded cost lies between the floor's bin and the budget."""
    cases = found = 0
    for seed, sg, plans in small_graphs(150):
        rng = random.Random(2000 + seed)
        latency, importance, offset = random_tables(sg, rng)
        table = SimpleNamespace(entries=latency, offset_ms=offset)
        real = sorted(math.fsum(latency[e] for e in p) for p in plans)
        budget = offset + rng.uniform(real[0], 1.05 * real[-1])
        floor = offset + (budget - offset) * rng.uniform(0.6, 0.99)
        bins = 1000
        cost = bin_costs(latency, offset, budget, bins)
        first_bin = math.ceil((floor - offset) / (budget - offset) * bins)
        window = [p for p in plans if first_bin <= sum(cost[e] for e in p) <= bins]
        cases += 1
        if not window:
            with pytest.raises(InfeasibleBudget):
                solve(sg, table, importance, budget, bins=bins, floor_ms=floor)
            continue
        found += 1
        plan = solve(sg, table, importance, budget, bins=bins, floor_ms=floor)
        plan.validate(sg)
        best = max(math.fsum(importance[e] for e in p) for p in window)
        assert dict(plan.info)["objective"] == pytest.approx(best, abs=1e-9), seed
        assert first_bin <= sum(cost[e] for e in plan.entries) <= bins
        assert plan_latency(plan, table) <= budget
    assert cases == 150 and found >= 60, found


def test_min_latency_matches_exhaustive_search():
    for seed, sg, _ in small_graphs(80):
        rng = random.Random(seed)
        latency, _, offset = random_tables(sg, rng)
        table = SimpleNamespace(entries=latency, offset_ms=offset)
        for method in METHODS:
            fastest = min(math.fsum(latency[e] for e in p) for p in all_plans(sg, method)) + offset
            assert min_latency(sg, table, method=method) == pytest.approx(fastest, abs=1e-9)


def test_infeasible_budget_states_the_minimum_latency():
    for seed, sg, plans in small_graphs(30):
        rng = random.Random(seed)
        latency, importance, offset = random_tables(sg, rng)
        table = SimpleNamespace(entries=latency, offset_ms=offset)
        fastest = min(math.fsum(latency[e] for e in p) for p in plans) + offset
        for budget in (0.5 * fastest, offset - 0.01, fastest * 0.999):
            with pytest.raises(InfeasibleBudget) as caught:
                solve(sg, table, importance, budget)
            assert f"{fastest:.6g}" in str(caught.value)
            assert caught.value.min_latency_ms == pytest.approx(fastest, abs=1e-9)
            assert caught.value.suggested_ms >= fastest
        plan = solve(sg, table, importance, caught.value.suggested_ms)  # the suggestion works
        assert dict(plan.info)["predicted_ms"] <= caught.value.suggested_ms


def test_budget_at_the_minimum_is_reported_when_rounding_leaves_nothing():
    builder = _Builder(random.Random(0), prune_rate=0.0, long_spans=0)
    chain, _ = builder.chain(builder.position("source"), 3)
    sg = builder.graph([chain])
    latency = {e.id: 1.0001 for e in sg.entries}  # 333.33 bins each: 334 rounded up
    fastest = min_latency(sg, latency)
    assert fastest == pytest.approx(3.0003)
    with pytest.raises(InfeasibleBudget) as caught:
        solve(sg, latency, dict.fromkeys(latency, 1.0), fastest * (1 + 1e-7), bins=1000)
    assert "rounded up" in str(caught.value) and f"{fastest:.6g}" in str(caught.value)
    plan = solve(sg, latency, dict.fromkeys(latency, 1.0), caught.value.suggested_ms, bins=1000)
    assert dict(plan.info)["predicted_ms"] <= caught.value.suggested_ms


def test_depth_never_prunes_and_layer_keeps_one_conv_without_joins():
    picked = {"depth": 0, "layer": 0}
    for seed, sg, _ in small_graphs(60):
        rng = random.Random(seed)
        latency, _, offset = random_tables(sg, rng)
        # importance that rewards pruning and merging, so a wrong restriction would show
        importance = {e.id: len(e.option.pruned) + len(sg.span(e.span).units) for e in sg.entries}
        for method in ("depth", "layer"):
            budget = min_latency(sg, latency, method=method) * rng.uniform(1.05, 2.0)
            plan = solve(sg, latency, importance, budget, method=method)
            for entry in plan.chosen(sg):
                span = sg.span(entry.span)
                if method == "depth":
                    assert entry.option.pruned == ()
                else:
                    assert span.joins == () and len(span.units) - len(entry.option.pruned) == 1
                picked[method] += 1
    assert min(picked.values()) > 100


def test_rounding_up_keeps_the_plan_within_budget():
    builder = _Builder(random.Random(0), prune_rate=0.0, long_spans=0)
    source = builder.position("source")
    chain, cover = builder.chain(source, 2)
    builder.span(chain.positions[0], chain.positions[2], cover, extra_options=0)
    sg = builder.graph([chain])
    u0, u1 = (keep_entry(sg, u.id) for u in sg.units)
    merged = f"{span_id(chain.positions[0], chain.positions[2])}|keep"
    latency = {u0: 5.004, u1: 5.004, merged: 9.0}
    importance = {u0: 1.0, u1: 1.0, merged: 0.5}
    budget, bins = 10.0, 1000
    width = budget / bins
    # rounding down, the two single-unit spans cost 500 + 500 bins and "fit" ...
    assert sum(math.floor(latency[e] / width) for e in (u0, u1)) <= bins
    assert latency[u0] + latency[u1] > budget  # ... but really overshoot the budget
    plan = solve(sg, latency, importance, budget, bins=bins)
    assert plan.entries == (merged,)
    assert dict(plan.info)["predicted_ms"] == 9.0 <= budget
    # with room for them, the better pair is taken
    assert set(solve(sg, latency, importance, 10.02, bins=bins).entries) == {u0, u1}


def test_large_budget_gives_the_unconstrained_optimum():
    for seed, sg, plans in small_graphs(40):
        rng = random.Random(seed)
        latency, importance, _ = random_tables(sg, rng)
        best = max(math.fsum(importance[e] for e in p) for p in plans)
        plan = solve(sg, latency, importance, 1e6)
        assert dict(plan.info)["objective"] == pytest.approx(best, abs=1e-9)


def test_argument_errors():
    sg = random_graph(3)
    latency = {e.id: 0.5 for e in sg.entries}
    importance = {e.id: 1.0 for e in sg.entries}
    with pytest.raises(ValueError, match="at least 1000"):
        solve(sg, latency, importance, 100.0, bins=999)
    with pytest.raises(ValueError, match="'layermerge', 'depth', 'layer'"):
        solve(sg, latency, importance, 100.0, method="channel")
    with pytest.raises(ValueError, match="'layermerge', 'depth', 'layer'"):
        min_latency(sg, latency, method="channel")
    missing = sg.entries[0].id
    partial = {k: v for k, v in latency.items() if k != missing}
    with pytest.raises(MissingEntries, match="latency table") as caught:
        solve(sg, partial, importance, 100.0)
    assert missing in str(caught.value) and isinstance(caught.value, KeyError)
    with pytest.raises(KeyError, match="importance table"):
        solve(sg, latency, {k: v for k, v in importance.items() if k != missing}, 100.0)
    with pytest.raises(ValueError, match="non-negative"):
        solve(sg, {**latency, missing: -1.0}, importance, 100.0)
    with pytest.raises(ValueError, match="finite"):
        solve(sg, latency, {**importance, missing: math.nan}, 100.0)
    with pytest.raises(ValueError, match="finite"):
        solve(sg, latency, importance, math.inf)
    with pytest.raises(TypeError):
        solve(sg, [1.0], importance, 100.0)
    plan = solve(sg, latency, importance, 1e3, bins=1000)
    assert dict(plan.info)["objective"] == len(plan.entries)


def walk_steps(chain: Chain):
    for step in chain.steps:
        yield step
        if step.kind == "parallel":
            for branch in step.region.branches:
                yield from walk_steps(branch)


# ---------------------------------------------------------------- ResNet-34-sized graph
def resnet_like(blocks: int = 16, seed: int = 0, stage: tuple[int, ...] = (3, 4, 6, 3)) -> SpanGraph:
    """Stem + ``blocks`` basic blocks (two convs and a skip, a 1x1 projection at stage starts).

    Outer spans cover up to four consecutive positions within a stage, with a few
    pruning options each; every block branch has its two-conv span.
    """
    rng = random.Random(seed)
    builder = _Builder(rng, prune_rate=0.5, long_spans=0, mergeable=1.0)
    positions = [builder.position("source")]
    stem, out = builder.unit(positions[0])
    positions.append(out)
    steps, covers = [Step("unit", unit=stem)], [_Cover(units=[stem])]
    starts = set(itertools.accumulate((0, *stage)))
    for b in range(blocks):
        projection = b in starts and b > 0
        step, out, cover = builder.region(positions[-1], [2, 1 if projection else 0], nested=False)
        positions.append(out)
        steps.append(step)
        covers.append(cover)
    chain = Chain(positions=tuple(positions), steps=tuple(steps))
    for branch in (br for s in steps if s.kind == "parallel" for br in s.region.branches if br.steps):
        if len(branch.steps) == 2:
            builder.span(
                branch.positions[0],
                branch.positions[2],
                _Cover(units=[s.unit for s in branch.steps]),
                2,
            )
    stage_of_step = [0] + [sum(b >= s for s in starts if s > 0) for b in range(blocks)]
    for i in range(len(positions) - 1):
        for j in range(i + 2 if steps[i].kind == "unit" else i + 1, min(len(positions), i + 7)):
            if len(set(stage_of_step[i:j])) > 1:
                continue
            cover = _Cover()
            for c in covers[i:j]:
                cover.extend(c)
            builder.span(positions[i], positions[j], cover, extra_options=rng.randint(2, 4))
    return builder.graph([chain])


def test_resnet34_sized_solve_is_fast():
    sg = resnet_like()
    regions = sum(s.kind == "parallel" for c in sg.chains for s in c.steps)
    assert regions == 16
    rng = random.Random(0)
    latency, importance, offset = random_tables(sg, rng)
    table = SimpleNamespace(entries=latency, offset_ms=offset)
    fastest = min_latency(sg, table)
    budget = fastest + 0.4 * (plan_latency(Plan.keep_all(sg), table) - fastest)
    solve(sg, table, importance, budget)  # warm-up (imports, caches)
    start = time.perf_counter()
    plan = solve(sg, table, importance, budget, bins=2000)
    elapsed = time.perf_counter() - start
    print(
        f"\nResNet-34-sized solve: {len(sg.positions)} positions, {len(sg.spans)} spans, "
        f"{len(sg.entries)} entries, {regions} regions, 2000 bins: {elapsed * 1e3:.1f} ms"
    )
    plan.validate(sg)
    assert dict(plan.info)["predicted_ms"] <= budget
    assert elapsed < 5.0
