"""``fxmerge merge MODEL --plan plan.json [--weights linearized.pt] --out DIR``.

Rebuilds the linearized model from the plan (and the fine-tuned weights), merges
it, prints the relative error against the linearized model and writes
``merged.pt2`` and ``merged.onnx``. The analysis settings the plan was made with
are read from the ``report.json`` beside it when not given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from fxmerge.cli.arguments import add_model_arguments, add_plan_defaults
from fxmerge.cli.common import check_exact, output_dir, relative_error, say, write_merged
from fxmerge.cli.models import example_input, load_model
from fxmerge.cli.parser import command
from fxmerge.cli.plans import fill_analysis_settings, plan_for
from fxmerge.passes.merge import merge as merge_spans


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_plan_defaults(parser)
    parser.add_argument("--plan", required=True, type=Path, metavar="PLAN", help="plan.json from fxmerge compress")
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        metavar="PT",
        help="fine-tuned linearized.pt from fxmerge compress (default: the model's own weights)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="where merged.pt2 and merged.onnx are written",
    )


@command(
    "merge",
    "rebuild a compressed model from its plan (and fine-tuned weights); write merged.pt2 and merged.onnx",
    _arguments,
)
def merge_command(args: argparse.Namespace) -> int:
    fill_analysis_settings(args, args.plan)
    model = load_model(args.model)
    x = example_input(args.input_shape)
    out = output_dir(args.out)
    plan, linear = plan_for(args, model, x)
    say(f"merging {len(plan.entries)} span(s) of {plan.model}")
    merged = merge_spans(linear)
    error = relative_error(linear, merged, x)
    check_exact(error)
    write_merged(merged, x, out)
    convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in merged.modules())
    print(f"merged {plan.model}: {len(plan.entries)} convs in the plan, {convs} conv modules in the merged model")
    print(f"merged vs linearized: max|Δ|/max|ref| = {error:.1e}")
    print(f"wrote {out / 'merged.pt2'} and {out / 'merged.onnx'}")
    return 0
