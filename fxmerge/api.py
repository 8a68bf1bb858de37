"""``compress``: the whole pipeline in one call.

capture → match → span graph → latency table (+ end-to-end calibration) →
importance table → solve → linearize. The result holds the trainable linearized
model, the plan, a report, and ``merge()`` for the exact deployable model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from fxmerge.analysis import analyze_captured
from fxmerge.capture import capture
from fxmerge.ir import SpanGraph
from fxmerge.plan import Plan


@dataclass(frozen=True)
class ChosenSpan:
    span: str
    option: str
    units: int
    kernel: tuple[int, ...]
    latency_ms: float
    importance: float


@dataclass(frozen=True)
class Report:
    model: str
    backend: str
    method: str
    original_ms: float
    target_ms: float
    predicted_ms: float
    offset_ms: float
    convs_before: int
    convs_after: int
    activations_removed: int
    chosen: tuple[ChosenSpan, ...]
    stage_seconds: tuple[tuple[str, float], ...]
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        data = asdict(self)
        data["stage_seconds"] = dict(self.stage_seconds)
        return data

    def to_markdown(self) -> str:
        lines = [
            f"# fxmerge report: {self.model}",
            "",
            f"- backend: {self.backend}, method: {self.method}",
            f"- original: {self.original_ms:.3f} ms, target: {self.target_ms:.3f} ms, predicted: {self.predicted_ms:.3f} ms",
            f"- convs: {self.convs_before} → {self.convs_after}; activations removed: {self.activations_removed}",
            "",
            "| span | option | convs | merged kernel | latency (ms) | importance |",
            "|---|---|---|---|---|---|",
        ]
        for c in self.chosen:
            if c.units > 1 or c.option != "keep":
                kernel = "×".join(map(str, c.kernel))
                lines.append(f"| {c.span} | {c.option} | {c.units} | {kernel} | {c.latency_ms:.4f} | {c.importance:.4f} |")
        lines += ["", "| stage | seconds |", "|---|---|"]
        lines += [f"| {name} | {seconds:.1f} |" for name, seconds in self.stage_seconds]
        lines += [f"\n{note}" for note in self.notes]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class CompressResult:
    model: torch.fx.GraphModule
    plan: Plan
    report: Report
    span_graph: SpanGraph

    def merge(self) -> torch.fx.GraphModule:
        """The exact merged model (eval mode) of the current — e.g. fine-tuned — ``model``."""
        from fxmerge.passes.merge import merge

        was_training = self.model.training
        self.model.eval()
        try:
            return merge(self.model, self.plan)
        finally:
            self.model.train(was_training)


def parse_target(target_latency, original_ms: float) -> float:
    """Milliseconds from a float (ms) or a string such as ``"60%"`` (of the original)."""
    if isinstance(target_latency, str):
        text = target_latency.strip()
        if text.endswith("%"):
            try:
                fraction = float(text[:-1]) / 100.0
            except ValueError:
                raise ValueError(f"cannot read target {target_latency!r}; use e.g. '60%' or a number of ms") from None
            if not 0 < fraction <= 1.5:
                raise ValueError(f"target {target_latency!r} is outside (0%, 150%]")
            return original_ms * fraction
        if text.endswith("ms"):
            text = text[:-2]
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"cannot read target {target_latency!r}; use e.g. '60%' or a number of ms") from None
    value = float(target_latency)
    if value <= 0:
        raise ValueError(f"target latency must be positive, got {value}")
    return value


def compress(
    model: nn.Module,
    example_input,
    target_latency,
    *,
    backend="auto",
    importance="auto",
    data=None,
    method: str = "layermerge",
    rules: str = "general",
    exclude=None,
    max_kernel: int = 15,
    cache_dir=None,
    progress: bool = True,
    bins: int = 2000,
) -> CompressResult:
    """Choose which activations and convs to remove so the merged model meets ``target_latency``.

    ``target_latency`` is milliseconds end to end on ``backend``, or a string such as
    ``"60%"`` (that fraction of the original model's measured latency). ``importance``
    is an estimator name (``"distortion"``, ``"loss"``, ``"finetune"``, ``"auto"``) or
    a callable ``(model) -> float``; ``data`` feeds it. Fine-tune ``result.model``,
    then call ``result.merge()``.
    """
    from fxmerge.importance import build_importance_table
    from fxmerge.latency import build_latency_table, calibrate, get_backend
    from fxmerge.passes.linearize import linearize
    from fxmerge.solver import solve

    stages: list[tuple[str, float]] = []
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stages.append((name, now - clock))
        clock = now

    captured = capture(model, example_input)
    span_graph = analyze_captured(captured, rules=rules, exclude=exclude, max_kernel=max_kernel)
    lap("analyze")
    notes: list[str] = []
    if not span_graph.units:
        notes.append("nothing to merge: the model has no convolution fxmerge can use")
    timer = get_backend(backend) if isinstance(backend, str) else backend
    latency_dir = None if cache_dir is None else Path(cache_dir) / "latency"
    table = build_latency_table(span_graph, timer, cache_dir=latency_dir, progress=progress)
    keep_all = Plan.keep_all(span_graph)
    table = calibrate(table, _folded(captured, notes), example_input, keep_all.entries, timer)
    lap("latency table")
    original_ms = float(table.original_ms)
    target_ms = parse_target(target_latency, original_ms)
    importance_dir = None if cache_dir is None else Path(cache_dir) / "importance"
    scores = build_importance_table(
        _eval_copy(model), example_input, span_graph, importance, data=data, cache_dir=importance_dir, progress=progress
    )
    lap("importance table")
    plan = solve(span_graph, table, scores, target_ms, method=method, bins=bins)
    lap("solve")
    linearized = linearize(model, example_input, plan, span_graph=span_graph)
    linearized.train(model.training)
    lap("linearize")
    info = dict(plan.info)
    chosen = tuple(
        ChosenSpan(
            span=e.span, option=e.option.id, units=len(span_graph.span(e.span).units),
            kernel=tuple(e.conv.kernel_size), latency_ms=float(table.entries[e.id]),
            importance=float(scores.entries[e.id]),
        )
        for e in plan.chosen(span_graph)
    )
    removed = sum(len(span_graph.span(e.span).dropped_activations) for e in plan.chosen(span_graph))
    report = Report(
        model=span_graph.model, backend=table.backend, method=method, original_ms=original_ms,
        target_ms=target_ms, predicted_ms=float(info.get("predicted_ms", table.predict(plan.entries))),
        offset_ms=float(table.offset_ms), convs_before=len(span_graph.units),
        convs_after=len(plan.entries), activations_removed=removed, chosen=chosen,
        stage_seconds=tuple(stages), notes=tuple(notes),
    )
    return CompressResult(model=linearized, plan=plan, report=report, span_graph=span_graph)


def export_merged(merged: nn.Module, example_input, directory) -> tuple[Path, Path]:
    """Write ``merged.pt2`` (``torch.export``) and ``merged.onnx`` for a merged model into ``directory``.

    The ONNX file comes from the exporter the latency backends use (TorchScript
    exporter, dynamo exporter as the fallback). Returns the two paths.
    """
    from fxmerge.latency.backends import as_inputs, export_onnx

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    inputs = as_inputs(example_input)
    was_training = merged.training
    merged.eval()
    try:
        program = torch.export.export(merged, inputs)
        names = [f"input_{k}" for k, value in enumerate(inputs) if isinstance(value, torch.Tensor)]
        onnx_bytes = export_onnx(merged, inputs, names)
    finally:
        merged.train(was_training)
    pt2 = directory / "merged.pt2"
    torch.export.save(program, pt2)
    onnx_path = directory / "merged.onnx"
    onnx_path.write_bytes(onnx_bytes)
    return pt2, onnx_path


def _folded(captured, notes: list[str]) -> nn.Module:
    """The original network with BatchNorms folded into their convs: what a merged model is compared with.

    Backends that fold BatchNorm themselves (ONNX Runtime, Inductor with freezing,
    TensorRT) time it the same either way; on eager an unfolded original would inflate
    the calibrated offset by the BatchNorms' cost, which no merged model pays.
    """
    from fxmerge.passes.merge import merge

    try:
        return merge(captured.gm)
    except Exception as exc:  # noqa: BLE001 - calibrating on the unfolded graph is still valid
        notes.append(f"original timed without BatchNorm folding ({type(exc).__name__}: {exc})")
        return captured.gm


def _eval_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).eval()
