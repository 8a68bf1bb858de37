"""What ``compress`` tells the user: the chosen spans, the latencies, the stage times.

A :class:`Report` is a frozen value: JSON through :meth:`Report.to_dict`, Markdown
through :meth:`Report.to_markdown`. Nothing here computes; ``fxmerge.api`` fills it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ChosenSpan:
    span: str
    option: str
    units: int
    kernel: tuple[int, ...]
    latency_ms: float
    importance: float


@dataclass(frozen=True)
class Round:
    """One solve of the closed latency loop: the budget it used and what it measured."""

    budget_ms: float
    predicted_ms: float
    measured_ms: float | None
    original_ms: float | None
    ratio: float | None  # measured merged / measured original, timed side by side
    met: bool | None


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
    threads: int | None = None
    coverage: float | None = None  # share of convs inside at least one multi-conv span
    rounds: tuple[Round, ...] = field(default=())
    measured_ms: float | None = None  # the kept plan's merged model, from the closed loop
    measured_ratio: float | None = None  # merged / original, measured side by side
    target_met: bool | None = None
    unchanged: bool = False  # the target was not below the original: nothing was compressed

    def to_dict(self) -> dict:
        data = asdict(self)
        data["stage_seconds"] = dict(self.stage_seconds)
        return data

    def summary_lines(self) -> list[str]:
        threads = f", {self.threads} thread(s)" if self.threads else ""
        lines = [
            f"- backend: {self.backend}{threads}, method: {self.method}",
            f"- original: {self.original_ms:.3f} ms, target: {self.target_ms:.3f} ms, "
            f"predicted: {self.predicted_ms:.3f} ms"
            + (f", measured: {self.measured_ms:.3f} ms" if self.measured_ms is not None else ""),
            f"- convs: {self.convs_before} → {self.convs_after}; activations removed: {self.activations_removed}",
        ]
        if self.coverage is not None:
            lines.append(f"- coverage: {self.coverage:.0%} of convs lie inside at least one multi-conv span")
        if self.measured_ratio is not None:
            lines.append(f"- measured side by side: {self.measured_ratio:.1%} of the original")
        if self.target_met is not None:
            lines.append(f"- target met as measured: {'yes' if self.target_met else 'no'}")
        return lines

    def to_markdown(self) -> str:
        lines = [f"# fxmerge report: {self.model}", "", *self.summary_lines(), ""]
        if self.rounds:
            lines += [
                "| round | budget (ms) | predicted (ms) | measured (ms) | measured ratio | met |",
                "|---|---|---|---|---|---|",
            ]
            for k, r in enumerate(self.rounds, 1):
                measured = "" if r.measured_ms is None else f"{r.measured_ms:.3f}"
                ratio = "" if r.ratio is None else f"{r.ratio:.1%}"
                lines.append(
                    f"| {k} | {r.budget_ms:.3f} | {r.predicted_ms:.3f} | {measured} | {ratio} | "
                    f"{'' if r.met is None else ('yes' if r.met else 'no')} |"
                )
            lines.append("")
        lines += ["| span | option | convs | merged kernel | latency (ms) | importance |", "|---|---|---|---|---|---|"]
        for c in self.chosen:
            if c.units > 1 or c.option != "keep":
                kernel = "×".join(map(str, c.kernel))
                lines.append(
                    f"| {c.span} | {c.option} | {c.units} | {kernel} | {c.latency_ms:.4f} | {c.importance:.4f} |"
                )
        lines += ["", "| stage | seconds |", "|---|---|"]
        lines += [f"| {name} | {seconds:.1f} |" for name, seconds in self.stage_seconds]
        lines += [f"\n{note}" for note in self.notes]
        return "\n".join(lines) + "\n"
