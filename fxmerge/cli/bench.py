"""``fxmerge bench MODEL [--merged merged.pt2 | --plan plan.json]``: time a model and its merged version.

The original is timed with its BatchNorms folded (the form every merged model
has), so only depth differs; with ``--merged`` or ``--plan`` the merged model is
timed against it in alternating rounds (:func:`fxmerge.latency.side_by_side`)
and the speed-up is printed (``--json``: one JSON object).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from fxmerge.capture import capture, drop_guards
from fxmerge.cli.arguments import (
    add_backend_arguments,
    add_model_arguments,
    add_plan_defaults,
    positive_int,
)
from fxmerge.cli.common import backend_of, format_table, relative_error, say, show_progress
from fxmerge.cli.errors import CLIError
from fxmerge.cli.models import example_input, format_shape, load_model
from fxmerge.cli.parser import command
from fxmerge.cli.plans import fill_analysis_settings, plan_for
from fxmerge.latency import LatencyBackend
from fxmerge.latency.compare import median_latency, side_by_side
from fxmerge.passes.merge import merge as merge_spans

ORIGINAL = "original (BatchNorm folded)"
ORIGINAL_EXPORTED = "original (BatchNorm folded, exported)"


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_plan_defaults(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--merged",
        type=Path,
        default=None,
        metavar="PT2",
        help="merged.pt2 from fxmerge compress or merge, timed against MODEL",
    )
    which.add_argument(
        "--plan",
        type=Path,
        default=None,
        metavar="PLAN",
        help="plan.json: build the merged model from MODEL on the fly",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        metavar="PT",
        help="with --plan: fine-tuned linearized.pt (latency does not depend on it)",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=5,
        metavar="N",
        help="alternating timing rounds; the median is reported (default 5)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_backend_arguments(parser)


def load_exported(path: Path) -> tuple[nn.Module, tuple[tuple[int, ...], ...]]:
    """The module of a ``.pt2`` file and the input shapes it was exported for."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"no such file: {path}")
    try:
        program = torch.export.load(path)
    except Exception as exc:
        raise CLIError(f"cannot load {path} with torch.export.load ({type(exc).__name__}: {exc})") from exc
    user_inputs = set(program.graph_signature.user_inputs)
    shapes = tuple(
        tuple(int(v) for v in node.meta["val"].shape)
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in user_inputs and hasattr(node.meta.get("val"), "shape")
    )
    return runnable(program), shapes


def runnable(program: torch.export.ExportedProgram) -> nn.Module:
    """``program.module()`` that the latency backends can run (:func:`fxmerge.capture.drop_guards`)."""
    return drop_guards(program.module(check_guards=False))


def _merged_file(args: argparse.Namespace) -> nn.Module:
    """``--merged``: the exported module; its input shape is ``--input-shape``'s default and must match it."""
    merged, shapes = load_exported(args.merged)
    if args.input_shape is None:
        args.input_shape = shapes
    elif tuple(args.input_shape) != shapes:
        raise CLIError(
            f"{args.merged} was exported for input {format_shape(shapes)}, "
            f"not --input-shape {format_shape(args.input_shape)}"
        )
    return merged


def _models(args: argparse.Namespace) -> tuple[nn.Module, object, list[tuple[str, nn.Module]]]:
    """The model, its example input, and the (label, module) pairs to time: the original first."""
    merged = _merged_file(args) if args.merged is not None else None
    fill_analysis_settings(args, args.plan)
    model = load_model(args.model)
    x = example_input(args.input_shape)
    original = merge_spans(capture(model, x).gm)  # BatchNorm folded: only depth differs
    timed = [(ORIGINAL, original)]
    if args.plan is not None:
        _, linear = plan_for(args, model, x)
        timed.append((f"merged (from {args.plan})", merge_spans(linear)))
    elif merged is not None:
        # run both through the same torch.export runtime (its hooks cost the same in each)
        exported = runnable(torch.export.export(original, x if isinstance(x, tuple) else (x,)))
        timed = [(ORIGINAL_EXPORTED, exported), (str(args.merged), merged)]
    if len(timed) == 2:
        relative_error(original, timed[1][1], x)  # same output shapes, or a clear error
    return model, x, timed


def _time(args: argparse.Namespace, backend: LatencyBackend, x, timed: list[tuple[str, nn.Module]]) -> dict:
    """Median latencies, as the JSON object ``bench --json`` prints."""
    say(
        f"timing on {backend.name} ({backend.device}, {backend.threads} threads), "
        f"input {format_shape(args.input_shape)}, {args.rounds} round(s)"
        + (", alternating original and merged" if len(timed) == 2 else "")
    )
    data = {
        "model": args.model,
        "backend": backend.name,
        "device": backend.device,
        "threads": backend.threads,
        "input_shape": format_shape(args.input_shape),
        "rounds": args.rounds,
        "original": timed[0][0],
    }
    progress = show_progress(args)
    if len(timed) == 1:
        data["original_ms"] = median_latency(timed[0][1], x, backend, args.rounds, progress=progress)
        return data
    first, second = side_by_side(timed[0][1], timed[1][1], x, backend, args.rounds, progress=progress)
    data.update(original_ms=first, merged=timed[1][0], merged_ms=second, speedup=first / second)
    return data


@command("bench", "time a model (BatchNorm folded), and its merged version side by side", _arguments)
def bench_command(args: argparse.Namespace) -> int:
    if args.weights is not None and args.plan is None:
        raise CLIError("--weights goes with --plan (a .pt2 given with --merged already holds its weights)")
    model, x, timed = _models(args)
    backend = backend_of(args)
    data = _time(args, backend, x, timed)
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    rows = [(data["original"], f"{data['original_ms']:.3f} ms")]
    if "merged" in data:
        rows += [
            (data["merged"], f"{data['merged_ms']:.3f} ms"),
            ("speed-up", f"{data['speedup']:.2f}×"),
        ]
    print(
        f"{type(model).__name__} on {backend.name} ({backend.device}, {backend.threads} threads), "
        f"median of {args.rounds} round(s)"
    )
    print(format_table(("model", "latency"), rows))
    return 0
