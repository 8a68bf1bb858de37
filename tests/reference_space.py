"""The DDPM reference search space (``ddpm_space.json``) and a readable diff against fxmerge's.

``../shared/reference/ddpm_space.json`` is the LayerMerge search space of the DDPM
CIFAR-10 U-Net (``tests/ddpm_model.py``): its 52 convs numbered in forward order,
the positions that may lose their nonlinearity, and every span with its options.
This module puts both sides in one form and compares them:

* :func:`load_reference` reads the JSON into a :class:`Space`;
* :func:`space_of_graph` turns an fxmerge :class:`~fxmerge.ir.SpanGraph` of the same
  model into a :class:`Space` (span units are conv module paths, the numbers come from
  the reference's ``conv_names``);
* :func:`compare` returns a :class:`SpaceDiff` whose ``summary()`` lists the missing
  and extra spans, the option differences and the removable positions that differ.

A span is keyed by its first and last numbered conv. An option is its merged kernel
size, how many convs of each kind it keeps (``k3_dwFalse: 2`` = two dense 3×3 convs)
and whether it is the *identity* option (every conv dropped; the reference offers it
only for the conv after a nearest-neighbour upsample). fxmerge spans whose convs are
all outside the reference table (attention q/k/v/proj_out, nin shortcuts, conv_out)
are kept apart as ``outside``: the reference gives those convs no entries, so by
default they count as extra spans.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from fxmerge.ir import Option, Span, SpanGraph

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "ddpm_space.json"

__all__ = [
    "REFERENCE",
    "OptionForm",
    "Space",
    "SpaceDiff",
    "SpanForm",
    "compare",
    "load_reference",
    "space_of_graph",
]


@dataclass(frozen=True, order=True)
class OptionForm:
    """One option of a span: merged kernel size, kept convs per kind, identity or not."""

    identity: bool
    kernel: int | tuple[int, ...]
    keeps: tuple[tuple[str, int], ...]  # sorted (kind, count), counts > 0 only

    def __str__(self) -> str:
        if self.identity:
            return "identity"
        kept = ", ".join(f"{kind}×{count}" for kind, count in self.keeps)
        return f"k{self.kernel} ({kept})"


@dataclass(frozen=True)
class SpanForm:
    """A span over the numbered convs: ``convs`` run from ``first`` to ``last``."""

    first: str
    last: str
    convs: tuple[str, ...]  # numbered convs of the span, in conv order
    options: tuple[OptionForm, ...]  # sorted
    extra_units: tuple[str, ...] = ()  # fxmerge units of the span without a number

    @property
    def key(self) -> tuple[str, str]:
        return (self.first, self.last)


@dataclass(frozen=True)
class Space:
    """A search space in reference form."""

    conv_names: tuple[str, ...]  # conv_names[i - 1] is conv number i
    spans: tuple[SpanForm, ...]
    removable: frozenset[str]  # convs whose output position may lose its nonlinearity
    outside: tuple[SpanForm, ...] = ()  # fxmerge spans with no conv in the table

    @property
    def entries(self) -> int:
        return sum(len(s.options) for s in self.spans)

    @property
    def entries_without_identity(self) -> int:
        return sum(1 for s in self.spans for o in s.options if not o.identity)

    def number(self, conv: str) -> int | None:
        return self._numbers.get(conv)

    @cached_property
    def _numbers(self) -> dict[str, int]:
        return {name: index + 1 for index, name in enumerate(self.conv_names)}

    def label(self, span: SpanForm) -> str:
        """``down.0.block.0.conv1 → down.0.block.0.conv2 (#2–#3)``; unnumbered units by name."""
        if not span.convs:
            return " + ".join(span.extra_units)
        numbers = self._numbers
        first, last = numbers[span.first], numbers[span.last]
        where = f"#{first}" if first == last else f"#{first}–#{last}"
        name = span.first if span.first == span.last else f"{span.first} → {span.last}"
        extra = f" + {', '.join(span.extra_units)}" if span.extra_units else ""
        return f"{name} ({where}){extra}"


@dataclass(frozen=True)
class SpaceDiff:
    """What differs between a reference space and an actual one."""

    reference: Space
    actual: Space
    missing: tuple[SpanForm, ...]  # in the reference, not in fxmerge
    extra: tuple[SpanForm, ...]  # in fxmerge over numbered convs, not in the reference
    options: tuple[tuple[SpanForm, SpanForm], ...]  # (reference, actual) with different options
    removable_missing: tuple[str, ...]
    removable_extra: tuple[str, ...]
    outside: tuple[SpanForm, ...] = ()  # fxmerge spans outside the table, when they count as extra
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not (
            self.missing or self.extra or self.outside or self.options or self.removable_missing or self.removable_extra
        )

    def summary(self, limit: int = 12) -> str:
        ref, act = self.reference, self.actual
        lines = [
            f"reference: {len(ref.spans)} spans, {ref.entries} entries ({ref.entries_without_identity} without identity), "
            f"{len(ref.removable)} removable positions",
            f"fxmerge:   {len(act.spans)} spans over the table's convs, {act.entries} entries ({act.entries_without_identity} without identity), "
            f"{len(act.removable)} removable positions; {len(act.outside)} span(s) outside the table"
            + ("" if self.outside or not act.outside else " (not counted)"),
        ]
        lines += [f"note: {note}" for note in self.notes]

        def section(title: str, items: list[str]) -> None:
            lines.append(f"{title} ({len(items)})" + (":" if items else ""))
            lines.extend(f"  {item}" for item in items[:limit])
            if len(items) > limit:
                lines.append(f"  … and {len(items) - limit} more")

        def options(span: SpanForm) -> str:
            return "[" + ", ".join(str(o) for o in span.options) + "]"

        section("missing spans", [f"{ref.label(s)} {options(s)}" for s in self.missing])
        section("extra spans", [f"{act.label(s)} {options(s)}" for s in self.extra])
        if self.outside:
            lines.append(
                f"extra spans outside the table ({len(self.outside)}): " + ", ".join(act.label(s) for s in self.outside)
            )
        section(
            "option differences",
            [f"{ref.label(r)}: reference {options(r)}, fxmerge {options(a)}" for r, a in self.options],
        )
        for title, names in (("missing", self.removable_missing), ("extra", self.removable_extra)):
            listed = ", ".join(f"#{ref.number(n)} {n}" if ref.number(n) else n for n in names)
            lines.append(f"removable positions {title} ({len(names)})" + (f": after {listed}" if names else ""))
        return "\n".join(lines)


def _option_form(kernel, keeps: dict[str, int], identity: bool) -> OptionForm:
    if isinstance(kernel, (tuple, list)):
        kernel = int(kernel[0]) if len(set(kernel)) == 1 else tuple(int(k) for k in kernel)
    counts = tuple(sorted((kind, int(n)) for kind, n in keeps.items() if n))
    return OptionForm(identity=identity, kernel=0 if identity else kernel, keeps=() if identity else counts)


def load_reference(path: str | Path = REFERENCE) -> Space:
    """The reference JSON as a :class:`Space`."""
    data = json.loads(Path(path).read_text())
    names = tuple(data["conv_names"][str(i)] for i in range(1, len(data["conv_names"]) + 1))
    spans = []
    for item in data["span_list"]:
        convs = tuple(names[i - 1] for i in range(item["start"] + 1, item["end"] + 1))
        options = tuple(
            sorted(_option_form(o["kernel"], o["keeps"], bool(o.get("identity", False))) for o in item["options"])
        )
        spans.append(SpanForm(first=convs[0], last=convs[-1], convs=convs, options=options))
    removable = frozenset(names[p - 1] for p in data["removable_positions"])
    return Space(conv_names=names, spans=tuple(spans), removable=removable)


def _kind(graph: SpanGraph, unit_id: str) -> str:
    conv = graph.unit(unit_id).conv
    kernel = conv.kernel_size[0] if len(set(conv.kernel_size)) == 1 else "x".join(map(str, conv.kernel_size))
    return f"k{kernel}_dw{conv.is_depthwise}"


def _is_identity(span: Span, option: Option) -> bool:
    if getattr(option, "identity", False) or option.conv is None:
        return True
    everything_pruned = bool(span.units) and set(option.pruned) >= set(span.units)
    return everything_pruned or 0 in tuple(option.conv.kernel_size)


def _graph_option(graph: SpanGraph, span: Span, option: Option) -> OptionForm:
    if _is_identity(span, option):
        return OptionForm(identity=True, kernel=0, keeps=())
    kept = Counter(_kind(graph, u) for u in span.units if u not in set(option.pruned))
    return _option_form(tuple(option.conv.kernel_size), dict(kept), identity=False)


def _removable(graph: SpanGraph) -> frozenset[str]:
    """Convs (by name, or a position id when no unit produces it) whose output some span drops."""
    producer = {u.output_position: u.id for u in graph.units}
    dropped = {p for span in graph.spans for p in span.dropped_activations}
    return frozenset(producer.get(p, f"position {p}") for p in dropped)


def space_of_graph(graph: SpanGraph, reference: Space) -> Space:
    """fxmerge's span graph of the DDPM model in the reference's form (numbers from ``reference``)."""
    table = frozenset(c for s in reference.spans for c in s.convs)
    order = {name: index for index, name in enumerate(reference.conv_names)}
    spans, outside = [], []
    for span in graph.spans:
        numbered = tuple(sorted((u for u in span.units if u in table), key=order.__getitem__))
        extra = tuple(u for u in span.units if u not in table) + tuple(f"join {j}" for j in span.joins)
        options = tuple(sorted({_graph_option(graph, span, o) for o in span.options}))
        if not numbered:
            units = tuple(span.units) or (span.id,)
            outside.append(SpanForm(first=units[0], last=units[-1], convs=(), options=options, extra_units=units))
            continue
        spans.append(SpanForm(first=numbered[0], last=numbered[-1], convs=numbered, options=options, extra_units=extra))
    spans.sort(key=lambda s: (order[s.first], order[s.last]))
    return Space(
        conv_names=reference.conv_names, spans=tuple(spans), removable=_removable(graph), outside=tuple(outside)
    )


def compare(reference: Space, actual: Space, *, count_outside: bool = True) -> SpaceDiff:
    """Span by span: missing, extra, option differences, removable positions.

    A span matches when it has the same first and last numbered conv, covers the same
    numbered convs and nothing else. With ``count_outside`` (the default) fxmerge spans
    outside the table are extra spans too (the reference gives their convs no entries).
    """
    ours = {s.key: s for s in reference.spans}
    theirs: dict[tuple[str, str], SpanForm] = {}
    extra: list[SpanForm] = []
    notes: list[str] = []
    for span in actual.spans:
        if span.key in theirs:
            notes.append(f"two fxmerge spans cover {actual.label(span)}")
            extra.append(span)
        elif span.key in ours and (span.convs != ours[span.key].convs or span.extra_units):
            extra.append(span)  # same ends, different contents
        else:
            theirs[span.key] = span
    extra += [s for key, s in theirs.items() if key not in ours]
    missing = tuple(s for key, s in ours.items() if key not in theirs)
    options = tuple((s, theirs[key]) for key, s in ours.items() if key in theirs and s.options != theirs[key].options)
    return SpaceDiff(
        reference=reference,
        actual=actual,
        missing=missing,
        extra=tuple(extra),
        options=options,
        removable_missing=tuple(sorted(reference.removable - actual.removable, key=_conv_order(reference))),
        removable_extra=tuple(sorted(actual.removable - reference.removable, key=_conv_order(reference))),
        outside=actual.outside if count_outside else (),
        notes=tuple(notes),
    )


def _conv_order(space: Space):
    numbers = space._numbers
    return lambda name: (numbers.get(name, len(numbers) + 1), name)
