"""``fxmerge compress MODEL --target T --out DIR``: compress a model to a latency target.

Runs :func:`fxmerge.api.compress`, fine-tunes the linearized model on ``--data``
(an ImageFolder tree, :mod:`fxmerge.data`) when given, merges it, checks the merge
is exact, and writes :data:`COMPRESS_FILES` into ``DIR``: the plan, the report
(JSON with the settings ``merge`` and ``bench`` read back, and Markdown), the
linearized weights and the merged model (``torch.export`` and ONNX).

Under ``torchrun`` (``torchrun --nproc-per-node N -m fxmerge compress ...``) every
process runs the command: the importance table is sharded across them, the latency
table and the closed loop are timed by one process and sent to the others, the
fine-tune runs with DistributedDataParallel; only rank 0 prints and writes files.
The plan is the one a single process makes (:mod:`fxmerge.distributed`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from fxmerge import distributed
from fxmerge.api import CompressResult, TargetUnreachable, round_up
from fxmerge.api import compress as compress_model
from fxmerge.cache import write_atomic, write_json
from fxmerge.cli.arguments import (
    add_backend_arguments,
    add_model_arguments,
    target_argument,
)
from fxmerge.cli.common import (
    backend_of,
    check_exact,
    check_output_dir,
    format_table,
    output_dir,
    relative_error,
    say,
    show_progress,
    write_merged,
)
from fxmerge.cli.errors import CLIError
from fxmerge.cli.finetune import (
    accuracy_markdown,
    add_data_arguments,
    finetune_and_score,
    image_data,
)
from fxmerge.cli.models import example_input, format_shape, load_model
from fxmerge.cli.parser import command
from fxmerge.latency import LatencyBackend
from fxmerge.report import Report
from fxmerge.solver import InfeasibleBudget

COMPRESS_FILES = (
    "plan.json",
    "report.json",
    "report.md",
    "linearized.pt",
    "merged.pt2",
    "merged.onnx",
)

NO_DATA = (
    "no --data: importance was estimated data-free (output distortion on random inputs) and the "
    "linearized model was not fine-tuned; pass --data DIR (DIR/train/CLASS/*, DIR/val/CLASS/*) to do both"
)


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--target",
        required=True,
        type=target_argument,
        metavar="LATENCY",
        help="latency target: milliseconds (12.5 or 12.5ms) or a share of the original model's latency (60%%)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="where the plan, reports and models are written",
    )
    parser.add_argument(
        "--importance",
        choices=("auto", "distortion", "loss", "finetune", "paper"),
        default="auto",
        help="importance estimator (default auto: loss with --data, else distortion on random inputs; "
        "paper: the LayerMerge reference's, one epoch of fine-tuning per entry)",
    )
    parser.add_argument(
        "--method",
        choices=("layermerge", "depth", "layer"),
        default="layermerge",
        help="search space (default layermerge)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="latency/importance cache (default ~/.cache/fxmerge)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    loop = parser.add_argument_group("closed latency loop (on by default)")
    loop.add_argument(
        "--no-loop",
        action="store_true",
        help="trust the latency table: do not merge and measure each solved plan against the original",
    )
    loop.add_argument(
        "--tolerance",
        type=_fraction,
        default=0.03,
        metavar="F",
        help="how close the measured ratio must come to the target (default 0.03: ±3%%)",
    )
    loop.add_argument("--max-rounds", type=int, default=4, metavar="N", help="solves the loop may make (default 4)")
    add_backend_arguments(parser)
    add_data_arguments(parser)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (0.03 is ±3%), got {text}")
    return value


# --------------------------------------------------------------------------- the run
def _compress(
    args: argparse.Namespace, model: nn.Module, x, backend: LatencyBackend, loaders: tuple | None
) -> CompressResult:
    """:func:`fxmerge.api.compress` with the command's settings; an unreachable target is the user's to raise."""
    importance_data, options = None, {}
    if loaders is not None and args.importance == "paper":
        importance_data, options = _paper_data(args, loaders[0].dataset)
    elif loaders is not None:
        say(f"reading {args.importance_batches} training batch(es) for the importance estimator")
        importance_data = list(itertools.islice(loaders[0], args.importance_batches))
    say(f"compressing {args.model} to {args.target} on {backend.name} ({backend.device}, {backend.threads} threads)")
    try:
        return compress_model(
            model,
            x,
            args.target,
            backend=backend,
            importance=args.importance,
            data=importance_data,
            method=args.method,
            rules=args.rules,
            exclude=args.exclude,
            max_kernel=args.max_kernel,
            cache_dir=args.cache_dir,
            progress=show_progress(args),
            closed_loop=not args.no_loop,
            tolerance=args.tolerance,
            max_rounds=args.max_rounds,
            **options,
        )
    except TargetUnreachable as exc:
        raise CLIError(f"{exc} (use {_larger_target(exc)})") from exc
    except InfeasibleBudget as exc:
        raise CLIError(
            f"--target {args.target} cannot be met on {backend.name} as predicted by the latency table "
            f"(the loop is off): the smallest predicted latency is {exc.min_latency_ms:.4g} ms; "
            f"use {_larger_target(exc)}"
        ) from exc


def _paper_data(args: argparse.Namespace, dataset) -> tuple:
    """``data`` and options of the paper estimator: holdout-train and holdout-val from DIR/train.

    Each split holds ``--importance-batches`` batches of ``--batch-size`` images
    (class-balanced; half the training images each when there are fewer), and each
    entry fine-tunes at ``--lr``.
    """
    per_split = min(args.importance_batches * args.batch_size, len(dataset) // 2)
    if per_split < 1:
        raise CLIError(f"--importance paper needs at least 2 training images in {args.data}/train")
    say(f"paper importance: holdout-train and holdout-val of {per_split} training image(s) each")
    options = {"holdout_train": per_split, "holdout_val": per_split, "batch_size": args.batch_size, "lr": args.lr}
    return dataset, options


def _larger_target(exc: InfeasibleBudget) -> str:
    """A ``--target`` that surely suffices, in the unit the user gave when the loop measured it."""
    if isinstance(exc, TargetUnreachable):
        if exc.unit == "fraction":
            return f"--target {math.ceil(exc.smallest * 100)}% or more"
        return f"--target {round_up(exc.smallest)}ms or more"
    if exc.suggested_ms is not None:
        return f"--target {round_up(exc.suggested_ms)}ms or more"
    return "a larger --target"


def _settings(args: argparse.Namespace, backend: LatencyBackend, fine_tuned: bool) -> dict:
    """What ``report.json`` records of the run (``merge`` and ``bench`` read the analysis settings back)."""
    return {
        "model": args.model,
        "input_shape": format_shape(args.input_shape),
        "rules": args.rules,
        "exclude": list(args.exclude),
        "max_kernel": args.max_kernel,
        "target": args.target,
        "backend": backend.name,
        "device": backend.device,
        "threads": backend.threads,
        "runs": args.runs,
        "importance": args.importance,
        "method": args.method,
        "data": None if args.data is None else str(args.data),
        "finetune_epochs": args.finetune_epochs if fine_tuned else 0,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "distill": args.distill,
    }


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """What a compress run produced, ready to be written and summarised."""

    result: CompressResult
    report: Report
    merged: nn.Module
    error: float
    scores: dict[str, float]
    val_images: int


def _write_files(out: Path, x, outcome: _Outcome, settings: dict) -> None:
    """:data:`COMPRESS_FILES` into ``out``, each written atomically."""
    say(f"writing {', '.join(COMPRESS_FILES)} to {out}")
    outcome.result.plan.save(out / "plan.json")
    record = {
        **outcome.report.to_dict(),
        "accuracy": outcome.scores,
        "merge_relative_error": outcome.error,
        "settings": settings,
    }
    write_json(out / "report.json", record)
    markdown = outcome.report.to_markdown()
    if outcome.scores:
        markdown += "\n" + accuracy_markdown(outcome.scores, outcome.val_images)
    write_atomic(out / "report.md", markdown)
    weights = io.BytesIO()
    torch.save(outcome.result.model.state_dict(), weights)
    write_atomic(out / "linearized.pt", weights.getvalue())
    write_merged(outcome.merged, x, out)


def _latency_after(report: Report) -> str:
    text = f"{report.predicted_ms:.3f} ms predicted"
    kept = next((r for r in report.rounds if r.measured_ms == report.measured_ms), None)
    if kept is not None:
        text += f", {kept.measured_ms:.3f} ms measured against {kept.original_ms:.3f} ms for the original in the same rounds"
    return text


def _summary(args: argparse.Namespace, out: Path, outcome: _Outcome) -> str:
    """The table ``compress`` prints: latency, target, convs, accuracy, exactness, files."""
    report, scores = outcome.report, outcome.scores
    met = {True: "met as measured", False: "NOT met as measured", None: "not measured (--no-loop)"}
    ratio = "" if report.measured_ratio is None else f", {report.measured_ratio:.1%} of the original"
    rows = [
        (
            f"latency ({report.backend}, {report.threads} threads)",
            f"{report.original_ms:.3f} ms",
            _latency_after(report),
        ),
        ("target", f"{args.target} = {report.target_ms:.3f} ms", f"{met[report.target_met]}{ratio}"),
        (
            "convs",
            report.convs_before,
            f"{report.convs_after} ({report.activations_removed} activations removed)",
        ),
    ]
    if scores:
        after = f"{scores['linearized']:.1%} linearized"
        if "fine-tuned" in scores:
            after += f" → {scores['fine-tuned']:.1%} fine-tuned"
        rows.append((f"accuracy (val, {outcome.val_images})", f"{scores['original']:.1%}", after))
    rows += [
        ("merge exactness", "", f"max|Δ|/max|ref| = {outcome.error:.1e}"),
        ("files", f"{out}/", " ".join(COMPRESS_FILES)),
    ]
    return format_table(("", "original", "compressed"), rows)


@command(
    "compress",
    "compress a model to a latency target; write the plan, reports, and the merged model",
    _arguments,
)
def compress_command(args: argparse.Namespace) -> int:
    with distributed.process_group(), _quiet_unless_main():
        return _compress_command(args)


@contextlib.contextmanager
def _quiet_unless_main():
    """Under torchrun only rank 0 prints: the other ranks' stdout and stderr go nowhere."""
    if distributed.is_main():
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def _compress_command(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.data is None and args.importance in ("loss", "finetune", "paper"):
        raise CLIError(
            f"--importance {args.importance} needs labelled data: pass --data DIR (or use --importance distortion)"
        )
    model = load_model(args.model)
    x = example_input(args.input_shape)
    out = check_output_dir(args.out)  # created only when there is something to write
    notes: tuple[str, ...] = ()
    loaders = image_data(args, model, x) if args.data is not None else None
    if loaders is None:
        notes = (NO_DATA,)
        say("note: " + NO_DATA)
    backend = backend_of(args)
    result = _compress(args, model, x, backend, loaders)
    if result.report.unchanged:
        print(f"{result.report.notes[-1]}; no files written")
        return 0
    device = str(distributed.device()) if distributed.is_distributed() else backend.device
    scores = finetune_and_score(args, model, result.model, *loaders, device=device) if loaders is not None else {}
    if not distributed.is_main():
        return 0  # rank 0 merges, checks and writes
    say("merging")
    merged = result.merge()
    error = relative_error(result.model.eval(), merged, x)
    check_exact(error)
    report = dataclasses.replace(result.report, notes=result.report.notes + notes)
    val_images = len(loaders[1].dataset) if loaders is not None else 0
    outcome = _Outcome(result, report, merged, error, scores, val_images)
    _write_files(output_dir(out), x, outcome, _settings(args, backend, fine_tuned=loaders is not None))
    print(_summary(args, out, outcome))
    print(f"\nmeasure it: fxmerge bench {args.model} --merged {out / 'merged.pt2'} --backend {backend.name}")
    say(f"done in {time.perf_counter() - started:.1f} s")
    return 0
