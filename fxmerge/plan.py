"""Plan: which entries (span, option) a compressed model is made of.

A plan tiles the span graph: along every chain, chosen spans follow each other
from the chain's first position to its last; a multi-branch region is either
covered by one chosen span or walked branch by branch. The positions where chosen
spans meet keep their activation; every activation strictly inside a chosen span is
removed, and the convs its option prunes become the identity.

Plans are JSON. Entry ids are built from unit ids (module paths), so they survive
re-tracing the same model; ``fingerprint`` ties a plan to the span graph it was
made for, and :meth:`Plan.validate` says what no longer matches.
"""

from __future__ import annotations

import json
import random as _random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fxmerge.cache import write_json
from fxmerge.ir import Chain, Entry, Parallel, SpanGraph, entry_id, span_id


class PlanError(ValueError):
    """A plan does not fit the span graph it is used with."""


@dataclass(frozen=True)
class Plan:
    model: str
    fingerprint: str
    rules: str
    entries: tuple[str, ...]
    method: str = "layermerge"
    info: tuple[tuple[str, float], ...] = field(default=())

    # ----------------------------------------------------------------- constructors
    @classmethod
    def keep_all(cls, span_graph: SpanGraph) -> Plan:
        """Every unit its own span, nothing pruned: the original network."""
        chosen = [span_graph.keep_entry(u.id) for u in span_graph.units]
        return cls._make(span_graph, chosen, method="keep_all")

    @classmethod
    def random(cls, span_graph: SpanGraph, seed: int = 0) -> Plan:
        """A valid plan drawn uniformly from all valid plans of ``span_graph``."""
        rng = _random.Random(seed)
        sampler = _UniformSampler(span_graph)
        chosen: list[str] = []
        for chain in span_graph.chains:
            chosen.extend(sampler.sample_chain(chain, rng))
        return cls._make(span_graph, chosen, method=f"random(seed={seed})")

    @classmethod
    def from_entries(cls, span_graph: SpanGraph, entry_ids, method: str = "custom", info=()) -> Plan:
        plan = cls._make(span_graph, list(entry_ids), method=method, info=info)
        plan.validate(span_graph)
        return plan

    @classmethod
    def _make(cls, span_graph: SpanGraph, entry_ids, method: str, info=()) -> Plan:
        order = {e.id: k for k, e in enumerate(span_graph.entries)}
        ordered = tuple(sorted(set(entry_ids), key=lambda e: order.get(e, len(order))))
        return cls(
            model=span_graph.model,
            fingerprint=span_graph.fingerprint,
            rules=span_graph.rules,
            entries=ordered,
            method=method,
            info=tuple(info),
        )

    # ------------------------------------------------------------------- queries
    def chosen(self, span_graph: SpanGraph) -> tuple[Entry, ...]:
        by_id = {e.id: e for e in span_graph.entries}
        return tuple(by_id[e] for e in self.entries)

    def kept_positions(self, span_graph: SpanGraph) -> set[str]:
        """Positions that stay materialised (their activation kept)."""
        kept = {p.id for p in span_graph.positions if p.kind == "source"}
        for entry in self.chosen(span_graph):
            kept.add(entry.start)
            kept.add(entry.end)
        kept.update(j.output_position for j in span_graph.joins if not _absorbed(j.id, self, span_graph))
        return kept

    def pruned_units(self, span_graph: SpanGraph) -> set[str]:
        return {u for entry in self.chosen(span_graph) for u in entry.option.pruned}

    # ---------------------------------------------------------------- validation
    def validate(self, span_graph: SpanGraph) -> None:
        """Raise :class:`PlanError` saying what does not match ``span_graph``."""
        if self.model != span_graph.model:
            raise PlanError(
                f"this plan was made for model {self.model!r}, not {span_graph.model!r}; "
                "make a new plan for this model with fxmerge.compress or fxmerge.solve"
            )
        known = {e.id for e in span_graph.entries}
        unknown = [e for e in self.entries if e not in known]
        if unknown:
            raise PlanError(
                f"plan is stale: {len(unknown)} of its entries are not in this span graph "
                f"(first: {unknown[0]!r}); the model or the analysis settings changed since the plan was made"
            )
        if self.fingerprint != span_graph.fingerprint:
            raise PlanError(
                f"plan is stale: made for span graph {self.fingerprint}, this one is "
                f"{span_graph.fingerprint} (same model name, different structure or settings)"
            )
        chosen = self.chosen(span_graph)
        seen_spans: set[str] = set()
        for entry in chosen:
            if entry.span in seen_spans:
                raise PlanError(f"plan chooses two options of span {entry.span!r}")
            seen_spans.add(entry.span)
        covered: dict[str, str] = {}
        for entry in chosen:
            for unit in span_graph.span(entry.span).units:
                if unit in covered:
                    raise PlanError(f"unit {unit!r} is in two chosen spans: {covered[unit]!r} and {entry.span!r}")
                covered[unit] = entry.span
        missing = [u.id for u in span_graph.units if u.id not in covered]
        if missing:
            raise PlanError(f"plan covers no span for unit(s) {missing[:3]}; a plan must cover every unit")
        for chain in span_graph.chains:
            _walk_chain(chain, span_graph, {e.span for e in chosen})

    # ------------------------------------------------------------------ storage
    def to_dict(self) -> dict:
        data = asdict(self)
        data["entries"] = list(self.entries)
        data["info"] = dict(self.info)
        data["format"] = "fxmerge.plan/1"
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        if data.get("format") != "fxmerge.plan/1":
            raise PlanError(f"not an fxmerge plan (format {data.get('format')!r}, expected 'fxmerge.plan/1')")
        return cls(
            model=data["model"],
            fingerprint=data["fingerprint"],
            rules=data["rules"],
            entries=tuple(data["entries"]),
            method=data.get("method", "custom"),
            info=tuple(sorted(data.get("info", {}).items())),
        )

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON, atomically."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"no plan file at {path}") from None
        except json.JSONDecodeError as exc:
            raise PlanError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def describe(self, span_graph: SpanGraph) -> str:
        lines = []
        for entry in self.chosen(span_graph):
            span = span_graph.span(entry.span)
            pruned = f", pruned {', '.join(entry.option.pruned)}" if entry.option.pruned else ""
            lines.append(f"{span.id}: {len(span.units)} conv(s) -> k{entry.conv.kernel_size}{pruned}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- helpers
def _absorbed(join_id: str, plan: Plan, span_graph: SpanGraph) -> bool:
    return any(join_id in span_graph.span(e.span).joins for e in plan.chosen(span_graph))


def chain_spans(chain: Chain, span_graph: SpanGraph) -> list:
    """Spans of ``chain``: both ends on the chain, start before end."""
    index = {p: k for k, p in enumerate(chain.positions)}
    own = []
    for span in span_graph.spans:
        if span.start in index and span.end in index and index[span.start] < index[span.end]:
            own.append(span)
    return own


def _walk_chain(chain: Chain, span_graph: SpanGraph, chosen_spans: set[str]) -> None:
    """Check that chosen spans tile ``chain`` from its first position to its last."""
    by_start: dict[str, list] = {}
    for span in chain_spans(chain, span_graph):
        if span.id in chosen_spans:
            by_start.setdefault(span.start, []).append(span)
    k = 0
    last = len(chain.positions) - 1
    while k < last:
        here = chain.positions[k]
        starting = by_start.get(here, [])
        if len(starting) > 1:
            raise PlanError(f"two chosen spans start at position {here!r}: {[s.id for s in starting]}")
        if starting:
            k = chain.positions.index(starting[0].end)
            continue
        step = chain.steps[k]
        if step.kind == "parallel":
            assert isinstance(step.region, Parallel)
            for branch in step.region.branches:
                _walk_chain(branch, span_graph, chosen_spans)
            k += 1
            continue
        raise PlanError(
            f"no chosen span starts at position {here!r}, so the unit after it is not covered; "
            f"expected a span such as {span_id(here, chain.positions[k + 1])!r}"
        )


class _UniformSampler:
    """Counts the tilings of each chain so a plan can be drawn uniformly."""

    def __init__(self, span_graph: SpanGraph):
        self.span_graph = span_graph
        self._counts: dict[int, list[int]] = {}

    def _region_count(self, region: Parallel) -> int:
        total = 1
        for branch in region.branches:
            total *= self._chain_counts(branch)[-1]
        return total

    def _chain_counts(self, chain: Chain) -> list[int]:
        key = id(chain)
        if key in self._counts:
            return self._counts[key]
        index = {p: k for k, p in enumerate(chain.positions)}
        ending: dict[int, list] = {}
        for span in chain_spans(chain, self.span_graph):
            ending.setdefault(index[span.end], []).append(span)
        counts = [1] + [0] * (len(chain.positions) - 1)
        for j in range(1, len(chain.positions)):
            total = sum(counts[index[s.start]] * len(s.options) for s in ending.get(j, []))
            step = chain.steps[j - 1]
            if step.kind == "parallel":
                total += counts[j - 1] * self._region_count(step.region)
            counts[j] = total
        self._counts[key] = counts
        return counts

    def sample_chain(self, chain: Chain, rng: _random.Random) -> list[str]:
        counts = self._chain_counts(chain)
        index = {p: k for k, p in enumerate(chain.positions)}
        ending: dict[int, list] = {}
        for span in chain_spans(chain, self.span_graph):
            ending.setdefault(index[span.end], []).append(span)
        chosen: list[str] = []
        j = len(chain.positions) - 1
        while j > 0:
            choices = []  # (weight, kind, payload)
            for span in ending.get(j, []):
                for option in span.options:
                    choices.append((counts[index[span.start]], "span", (span, option)))
            step = chain.steps[j - 1]
            if step.kind == "parallel":
                choices.append((counts[j - 1] * self._region_count(step.region), "parallel", step.region))
            kind, payload = _weighted_pick(choices, rng)
            if kind == "span":
                span, option = payload
                chosen.append(entry_id(span.id, option.id))
                j = index[span.start]
            else:
                for branch in payload.branches:
                    chosen.extend(self.sample_chain(branch, rng))
                j -= 1
        return chosen


def _weighted_pick(choices: list, rng: _random.Random) -> tuple:
    """``(kind, payload)`` of one of ``(weight, kind, payload)`` drawn with probability ∝ weight."""
    pick = rng.randrange(sum(weight for weight, _, _ in choices))
    for weight, kind, payload in choices:
        if pick < weight:
            return kind, payload
        pick -= weight
    raise AssertionError("unreachable: pick < total weight")
