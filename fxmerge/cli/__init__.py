"""The ``fxmerge`` command.

    fxmerge inspect torchvision:resnet34
    fxmerge inspect timm:efficientnet_b0 --json
    fxmerge inspect path/to/model.py:build --input-shape 1,3,32,32 --exclude stem
    fxmerge compress torchvision:resnet18 --target 60% --data images/ --out out/
    fxmerge merge torchvision:resnet18 --plan out/plan.json --weights out/linearized.pt --out out/
    fxmerge bench torchvision:resnet18 --merged out/merged.pt2 --rounds 5

One module per concern:

``parser``     the parser, the command registry (:func:`command`) and the error mapping
``errors``     :class:`CLIError`, the error a user can fix
``models``     MODEL specs → models (:func:`load_model`), input shapes → example inputs
``arguments``  shared argument groups (:func:`add_model_arguments`, :func:`add_backend_arguments`)
``common``     messages, tables, the latency backend (``common.latency_backend``, which
               tests replace), the span graph, exactness checks
``plans``      a plan applied again: analysis settings from ``report.json``, weights
``finetune``   ``compress --data``: image folders, fine-tuning, accuracy
``inspect``, ``compress``, ``merge``, ``bench``: one subcommand each

Adding a subcommand is one module with a function for its arguments and one for
its body, imported below::

    def _arguments(parser):
        add_model_arguments(parser)
        parser.add_argument("--json", action="store_true")

    @command("count", "count the convs of a model", _arguments)
    def count_command(args) -> int:
        model = load_model(args.model)
        ...
        return 0
"""

from fxmerge.cli import bench, compress, inspect, merge  # noqa: F401 - each registers its subcommand
from fxmerge.cli.arguments import add_backend_arguments, add_model_arguments
from fxmerge.cli.common import analyze_args, relative_error
from fxmerge.cli.errors import CLIError
from fxmerge.cli.inspect import format_span_graph, span_graph_dict, summary_line
from fxmerge.cli.models import MODEL_SEED, example_input, format_shape, load_model, parse_shape
from fxmerge.cli.parser import COMMANDS, USER_ERRORS, build_parser, command, is_user_error, main
from fxmerge.cli.plans import load_weights

__all__ = [
    "COMMANDS",
    "MODEL_SEED",
    "USER_ERRORS",
    "CLIError",
    "add_backend_arguments",
    "add_model_arguments",
    "analyze_args",
    "build_parser",
    "command",
    "example_input",
    "format_shape",
    "format_span_graph",
    "is_user_error",
    "load_model",
    "load_weights",
    "main",
    "parse_shape",
    "relative_error",
    "span_graph_dict",
    "summary_line",
]
