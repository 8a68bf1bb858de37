"""Properties every generated network must have, in each of the three graph forms.

For each form (``tests.fuzz.forms.FORMS``):

* ``analysis``  — capture and analysis do not raise;
* ``keep_all``  — linearizing the keep-everything plan gives the original network
  (and BatchNorm folding alone keeps it);
* for a few random plans (``Plan.random(sg, seed=k)``):
  ``linearize`` and ``merge`` do not raise; ``exact`` — the merged network equals
  the linearized one (relative error ≤ :data:`TOL`, re-checked in float64 when the
  fp32 network is itself ill-conditioned); ``conv_spec`` — each chosen span's merged
  conv has the kernel, stride, groups, channels and padding its ``Option.conv``
  promised; ``onnx`` — the merged network exports to ONNX and ONNX Runtime agrees;

and across forms, ``same_span_graph``: unit ids, positions, span ids, entry ids and
option convs are identical.

A failure raises :class:`FuzzFailure` (an ``AssertionError``) naming the form and the
property, chained to the original error. Failures matching a :class:`Known`
pattern (a library bug already filed in ``FINDINGS.md`` with an xfail regression
test) are recorded in the :class:`Report` instead, so a run keeps looking for new
bugs.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

import fxmerge
from tests.fuzz.build import build_net, example_inputs
from tests.fuzz.forms import FORMS, FormGraph, merged_convs, onnx_bytes, span_graph_in_form
from tests.fuzz.known import KNOWN, Known
from tests.fuzz.spec import Net

__all__ = ["TOL", "FuzzFailure", "InvalidNetwork", "Report", "check_network", "rel", "structure"]

TOL = 1e-4


class InvalidNetwork(RuntimeError):
    """The generated network does not build or run in eager mode: a generator bug, not a library bug."""


class FuzzFailure(AssertionError):
    """A property failed: ``form`` (or ``"all"``), ``prop``, and the message."""

    def __init__(self, form: str, prop: str, message: str):
        super().__init__(f"[{form}] {prop}: {message}")
        self.form, self.prop, self.message = form, prop, message

    @property
    def signature(self) -> str:
        """What makes two failures the same bug: form, property and error type."""
        cause = self.__cause__
        if isinstance(cause, Mismatch):
            return f"{self.form}/{self.prop}/{cause.form}:{cause.key}"
        kind = type(cause).__name__ if cause is not None and not isinstance(cause, AssertionError) else "mismatch"
        return f"{self.form}/{self.prop}/{kind}"


class Mismatch(AssertionError):
    """Two graph forms disagree on ``key`` of the span graph."""

    def __init__(self, form: str, key: str, message: str):
        super().__init__(message)
        self.form, self.key = form, key


@dataclass
class Report:
    """What one network's check did: known bugs hit, plans and spans checked."""

    known: list[str] = field(default_factory=list)
    plans: int = 0
    merged_spans: int = 0


def rel(actual: Any, expected: Any) -> float:
    """Largest error over the reference's largest magnitude, leaf by leaf (dict / tuple outputs)."""
    got, want = pytree.tree_leaves(actual), pytree.tree_leaves(expected)
    assert len(got) == len(want), f"{len(got)} outputs, expected {len(want)}"
    worst = 0.0
    for a, b in zip(got, want):
        a = torch.as_tensor(a).to(b.dtype)
        assert a.shape == b.shape, f"output shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        scale = float(b.abs().max()) if b.numel() else 0.0
        worst = max(worst, float((a - b).abs().max()) / (scale if scale > 0 else 1.0) if b.numel() else 0.0)
    return worst


def _double(inputs: tuple) -> tuple:
    return tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)


def _run(module, inputs: tuple):
    with torch.no_grad():
        return module(*inputs)


def merge_error(linearized: nn.Module, merged: nn.Module, inputs: tuple) -> float:
    """Relative error of ``merged`` against ``linearized``; in float64 when fp32 is ill-conditioned.

    A random plan can drop so many activations that the network amplifies rounding:
    then its own fp32 and fp64 forwards disagree by more than the tolerance and no
    fp32 merge could match. Such a network is compared in float64 instead.
    """
    reference = _run(linearized, inputs)
    error = rel(_run(merged, inputs), reference)
    if error <= TOL:
        return error
    linear64, inputs64 = copy.deepcopy(linearized).double(), _double(inputs)
    reference64 = _run(linear64, inputs64)
    conditioning = rel(pytree.tree_map(lambda t: t.double(), reference), reference64)
    if conditioning <= error / 10:
        return error  # fp32 is accurate here: the merge error is real
    return rel(_run(fxmerge.merge(linear64), inputs64), reference64)


# ------------------------------------------------------------------ single properties
def check_keep_all(graph: FormGraph) -> None:
    plan = fxmerge.Plan.keep_all(graph.span_graph)
    linear = fxmerge.linearize(graph.module, graph.inputs, plan, span_graph=graph.span_graph).eval()
    original = _run(graph.module, graph.inputs)
    error = rel(_run(linear, graph.inputs), original)
    assert error <= 1e-6, f"keep-all linearization differs from the original by {error:.3g}"
    error = merge_error(linear, fxmerge.merge(linear), graph.inputs)
    assert error <= TOL, f"BatchNorm folding changes the keep-all network by {error:.3g}"


def check_exact(linearized: nn.Module, merged: nn.Module, inputs: tuple) -> None:
    error = merge_error(linearized, merged, inputs)
    assert error <= TOL, f"merged differs from linearized by {error:.3g} (tolerance {TOL})"


def check_conv_specs(graph: FormGraph, plan: fxmerge.Plan, linearized: nn.Module, merged: nn.Module) -> int:
    """Every rewritten span became one conv of the promised shape; returns how many."""
    sg = graph.span_graph
    convs = merged_convs(linearized, merged)
    count = 0
    for entry in plan.chosen(sg):
        span = sg.span(entry.span)
        if len(span.units) == 1 and not span.joins and not entry.option.pruned:
            continue  # left as it is by linearize
        if getattr(entry.option, "identity", False):
            continue  # a dropped conv (after a nearest upsample): nothing is emitted
        module = convs.get(span.id)
        assert module is not None, f"span {span.id} has no merged conv"
        spec = entry.conv
        got = (
            module.in_channels,
            module.out_channels,
            tuple(module.kernel_size),
            tuple(module.stride),
            tuple(module.padding),
            module.groups,
        )
        want = (
            spec.in_channels,
            spec.out_channels,
            tuple(spec.kernel_size),
            tuple(spec.stride),
            tuple(spec.padding),
            spec.groups,
        )
        assert got == want, (
            f"span {entry.id}: merged conv (in, out, kernel, stride, padding, groups) = {got}, promised {want}"
        )
        count += 1
    return count


def onnx_runtime(module: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    """``module``'s outputs computed by ONNX Runtime (fxmerge's exporter, one thread)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        data, names = onnx_bytes(module, inputs)  # the dynamo exporter prints its failures
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    feed = {n: t.detach().numpy() for n, t in zip(names, inputs) if n in wanted}
    return [torch.from_numpy(o) for o in session.run(None, feed)]


class Upstream(RuntimeError):
    """ONNX export or ONNX Runtime fails on the original network too: not fxmerge's doing."""


def check_onnx(merged: nn.Module, original: nn.Module, inputs: tuple) -> None:
    try:
        outputs = onnx_runtime(merged, inputs)
    except Exception as exc:
        try:
            onnx_runtime(original, inputs)
        except Exception as same:  # noqa: BLE001
            raise Upstream(f"the original fails in ONNX too: {type(same).__name__}: {str(same)[:300]}") from exc
        raise
    expected = pytree.tree_leaves(_run(merged, inputs))
    error = rel(outputs, expected)
    if error > TOL:  # as ill-conditioned as the network is in fp32 is still agreement
        exact = pytree.tree_leaves(_run(copy.deepcopy(merged).double(), _double(inputs)))
        conditioning = rel([t.double() for t in expected], exact)
        assert error <= 10 * conditioning, (
            f"ONNX Runtime differs from torch by {error:.3g} (fp32 conditioning {conditioning:.3g})"
        )


def structure(sg: fxmerge.SpanGraph) -> dict[str, list]:
    """What must agree across graph forms."""
    return {
        "unit ids": [u.id for u in sg.units],
        "join ids": [j.id for j in sg.joins],
        "positions": [(p.id, p.kind, p.activation, p.shape, p.pinned is not None) for p in sg.positions],
        "span ids": [s.id for s in sg.spans],
        "entry ids": [e.id for e in sg.entries],
        "option convs": [(e.id, e.conv.signature()) for e in sg.entries],
    }


def check_same_span_graph(graphs: dict[str, FormGraph]) -> None:
    forms = list(graphs)
    reference = structure(graphs[forms[0]].span_graph)
    for form in forms[1:]:
        other = structure(graphs[form].span_graph)
        for key, want in reference.items():
            got = other[key]
            if got != want:
                diff = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                raise Mismatch(
                    form,
                    key,
                    f"{form} differs from {forms[0]} in {key} at index {diff}: "
                    f"{got[diff] if diff < len(got) else '<missing>'} vs {want[diff] if diff < len(want) else '<missing>'}"
                    f" ({len(got)} vs {len(want)} items)",
                )


# ------------------------------------------------------------------ one network
class _Skip(Exception):
    """A known bug was hit: the rest of this plan (or form) is not checked."""


class _Checker:
    def __init__(self, known: tuple[Known, ...]):
        self.known = known
        self.report = Report()

    def guard(self, form: str, prop: str, fn: Callable, *args: Any) -> Any:
        """``fn(*args)``; a known failure is recorded and raises :class:`_Skip`, any other FuzzFailure."""
        try:
            return fn(*args)
        except Upstream:
            self.report.known.append("upstream: the original network fails in ONNX / ONNX Runtime too")
            raise _Skip from None
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            for known in self.known:
                if known.matches(form, prop, text):
                    self.report.known.append(known.finding)
                    raise _Skip from None
            raise FuzzFailure(form, prop, text[:2000]) from exc

    def form(self, model: nn.Module, inputs: tuple, form: str, plans: int, onnx: bool) -> FormGraph | None:
        try:
            graph = self.guard(form, "analysis", span_graph_in_form, model, inputs, form)
        except _Skip:
            return None
        try:
            self.guard(form, "keep_all", check_keep_all, graph)
        except _Skip:
            return graph  # a known bug breaks even the keep-everything plan: random plans would too
        seen: set[tuple[str, ...]] = set()
        for seed in range(plans):
            with contextlib.suppress(_Skip):
                plan = self.guard(form, "random_plan", fxmerge.Plan.random, graph.span_graph, seed)
                if plan.entries not in seen:
                    seen.add(plan.entries)
                    self.plan(graph, plan, onnx=onnx and len(seen) == 1)
        return graph

    def plan(self, graph: FormGraph, plan: fxmerge.Plan, onnx: bool) -> None:
        form, inputs = graph.form, graph.inputs
        linear = self.guard(
            form, "linearize", lambda: fxmerge.linearize(graph.module, inputs, plan, span_graph=graph.span_graph).eval()
        )
        merged = self.guard(form, "merge", fxmerge.merge, linear)
        self.report.plans += 1
        self.guard(form, "exact", check_exact, linear, merged, inputs)
        self.report.merged_spans += self.guard(form, "conv_spec", check_conv_specs, graph, plan, linear, merged)
        if onnx:
            self.guard(form, "onnx", check_onnx, merged, graph.module, inputs)


def check_network(
    net: Net,
    *,
    forms: tuple[str, ...] = FORMS,
    plans: int = 2,
    onnx_forms: tuple[str, ...] = FORMS,
    known: tuple[Known, ...] = KNOWN,
) -> Report:
    """Check every property on ``net``; raises :class:`FuzzFailure` on the first new failure.

    ``plans`` random plans are merged per form; the first one's merged model is also
    run in ONNX Runtime for the forms in ``onnx_forms``.
    """
    try:
        model, inputs = build_net(net), example_inputs(net)
        _run(model, inputs)
    except Exception as exc:
        raise InvalidNetwork(f"{type(exc).__name__}: {exc}") from exc
    checker = _Checker(known)
    graphs = {}
    for form in forms:
        graph = checker.form(model, inputs, form, plans, form in onnx_forms)
        if graph is not None:
            graphs[form] = graph
    if len(graphs) > 1:
        checker.guard("all", "same_span_graph", check_same_span_graph, graphs)
    return checker.report
