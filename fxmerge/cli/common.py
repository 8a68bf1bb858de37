"""What the subcommands share once their arguments are parsed.

Messages (:func:`say`: steps and notes on stderr, so stdout holds only results),
plain-text tables, the latency backend of ``--backend``/``--threads``/``--runs``/
``--device``, the span graph of the model arguments, the output directory, and the
exactness check of a merged model against the model it was merged from.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from fxmerge.api import analyze
from fxmerge.cli.errors import CLIError
from fxmerge.cli.models import example_input, load_model
from fxmerge.export import export_merged
from fxmerge.ir import SpanGraph
from fxmerge.latency import BackendUnavailable, LatencyBackend, get_backend

EXACT = 1e-3
"""A merged model further than this (relative) from its linearized model gets a warning."""


# --------------------------------------------------------------------------- output
def say(message: str) -> None:
    """A step or a note, on stderr so that stdout holds only results."""
    print(f"fxmerge: {message}", file=sys.stderr, flush=True)


def show_progress(args: argparse.Namespace) -> bool:
    """Whether progress bars are wanted (``--no-progress`` turns them off)."""
    return not getattr(args, "no_progress", False)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: left-aligned columns, a dashed rule under the headers, ``-`` for ``None``."""
    cells = [[str(c) for c in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[k]) for row in cells) for k in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def check_output_dir(path: Path) -> Path:
    """``--out``, checked to be usable (not created: a failed run leaves nothing behind)."""
    if path.exists() and not path.is_dir():
        raise CLIError(f"--out {path} exists and is not a directory")
    return path


def output_dir(path: Path) -> Path:
    """``--out``, created when missing."""
    check_output_dir(path).mkdir(parents=True, exist_ok=True)
    return path


def write_merged(merged: nn.Module, x, out: Path) -> None:
    """``merged.pt2`` and ``merged.onnx`` (:func:`fxmerge.export.export_merged`), errors made readable."""
    try:
        export_merged(merged, x, out)
    except Exception as exc:
        raise CLIError(f"exporting the merged model to {out} failed: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- models
def analyze_args(args: argparse.Namespace) -> tuple[nn.Module, object, SpanGraph]:
    """Model, example input and span graph for the options of :func:`~fxmerge.cli.arguments.add_model_arguments`."""
    model = load_model(args.model)
    x = example_input(args.input_shape)
    graph = analyze(model, x, rules=args.rules, exclude=args.exclude, max_kernel=args.max_kernel)
    return model, x, graph


def latency_backend(
    name: str, *, threads: int | None = None, runs: int = 50, device: str | None = None
) -> LatencyBackend:
    """The latency backend for ``--backend``/``--threads``/``--runs``/``--device``."""
    try:
        return get_backend(
            name,
            device=device,
            threads=threads,
            runs=runs,
            warmup=min(10, runs),
            min_runs=min(5, runs),
        )
    except BackendUnavailable as exc:
        raise CLIError(str(exc)) from exc


def backend_of(args: argparse.Namespace) -> LatencyBackend:
    """The backend of the :func:`~fxmerge.cli.arguments.add_backend_arguments` options."""
    return latency_backend(args.backend, threads=args.threads, runs=args.runs, device=args.device)


# --------------------------------------------------------------------------- exactness
def outputs(model: nn.Module, inputs) -> list[torch.Tensor]:
    """The floating-point tensors ``model(inputs)`` returns, in order."""
    with torch.no_grad():
        out = model(*(inputs if isinstance(inputs, tuple) else (inputs,)))
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def relative_error(reference: nn.Module, candidate: nn.Module, inputs) -> float:
    """``max|candidate − reference| / max|reference|`` over every floating-point output."""
    ref, got = outputs(reference, inputs), outputs(candidate, inputs)
    if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got)):
        raise CLIError(
            f"the two models give differently shaped outputs ({[tuple(t.shape) for t in ref]} vs "
            f"{[tuple(t.shape) for t in got]})"
        )
    worst = 0.0
    for a, b in zip(ref, got):
        scale = float(a.abs().max()) if a.numel() else 0.0
        diff = float((b - a).abs().max()) if a.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def check_exact(error: float) -> None:
    """Warn when a merged model is further than :data:`EXACT` from the model it was merged from."""
    if error > EXACT:
        say(
            f"warning: the merged model differs from the linearized one by {error:.1e} (relative); "
            "merging should be exact — please report this with the model and plan"
        )
