"""Argument groups and argument types shared by the subcommands.

``add_model_arguments``    MODEL, ``--input-shape`` and the analysis settings
``add_backend_arguments``  the latency backend and how it times
``add_plan_defaults``      ``merge`` / ``bench --plan``: unset analysis settings are
                           read back from the ``report.json`` beside the plan

The argument types turn a bad value into an argparse error (usage, exit status
2) before any work starts.
"""

from __future__ import annotations

import argparse

from fxmerge.api import parse_target
from fxmerge.cli.errors import CLIError
from fxmerge.cli.models import parse_shape

BACKEND_NAMES = ("auto", "eager", "onnxruntime", "inductor", "tensorrt")
DEFAULT_INPUT_SHAPE = "1,3,224,224"
DEFAULT_MAX_KERNEL = None  # the rule set's own default: 15 under general rules, none under paper


# --------------------------------------------------------------------------- types
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def shape_argument(text: str) -> tuple[tuple[int, ...], ...]:
    try:
        return parse_shape(text)
    except CLIError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def target_argument(text: str) -> str:
    """``--target``: checked now with :func:`fxmerge.api.parse_target`, resolved once the model is timed."""
    try:
        number = float(text.strip().removesuffix("ms"))
    except ValueError:
        number = None
    if number is not None and not number > 0:
        raise argparse.ArgumentTypeError(f"target latency must be positive, got {text!r}")
    try:
        parse_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (e.g. --target 60% or --target 12.5ms)") from None
    return text.strip()


# --------------------------------------------------------------------------- groups
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL and the analysis settings, shared by every subcommand that analyses a model."""
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="torchvision:NAME, timm:NAME, or path/to/file.py:factory (a function returning the model)",
    )
    parser.add_argument(
        "--input-shape",
        default=parse_shape(DEFAULT_INPUT_SHAPE),
        type=shape_argument,
        metavar="SHAPE",
        help=f"example input shape (default {DEFAULT_INPUT_SHAPE}; several inputs: 1,3,224,224;1,3,224,224)",
    )
    parser.add_argument(
        "--rules",
        choices=("general", "paper"),
        default="general",
        help="span rules (default general)",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="NAME",
        help="keep module NAME (and the modules below it) out of every span; repeatable",
    )
    parser.add_argument(
        "--max-kernel",
        type=positive_int,
        default=DEFAULT_MAX_KERNEL,
        metavar="K",
        help="largest merged kernel size (default: 15 under --rules general, no limit under --rules paper)",
    )


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """The latency backend and how it times: shared by ``compress`` and ``bench``."""
    group = parser.add_argument_group("timing")
    group.add_argument(
        "--backend",
        choices=BACKEND_NAMES,
        default="auto",
        help="where latency is measured (default auto: onnxruntime on the CPU; "
        "with --device cuda, tensorrt when installed, else eager)",
    )
    group.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="threads for timing (default: physical cores)",
    )
    group.add_argument(
        "--runs",
        type=positive_int,
        default=50,
        metavar="N",
        help="timed runs per measurement, after up to 10 warm-up runs (default 50; fewer is faster and noisier)",
    )
    group.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="device to time (and fine-tune) on (default: cuda for tensorrt, else cpu)",
    )


def add_plan_defaults(parser: argparse.ArgumentParser) -> None:
    """``merge`` and ``bench --plan``: unset analysis options are read from the compress run's report.json
    (:func:`fxmerge.cli.plans.fill_analysis_settings`)."""
    parser.set_defaults(input_shape=None, max_kernel=None, exclude=None)
    parser.epilog = (
        "--input-shape, --exclude and --max-kernel, when not given, are read from the report.json that "
        "fxmerge compress wrote beside the plan (a plan only fits the analysis it was made with)."
    )
