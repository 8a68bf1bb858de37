"""A plan from ``fxmerge compress``, applied again: ``merge`` and ``bench --plan``.

A plan is valid only for the span graph it was made on, which depends on the
input shape, ``--exclude`` and ``--max-kernel``; ``compress`` records them in the
``report.json`` it writes beside ``plan.json``, and :func:`fill_analysis_settings`
reads them back for the options the user left unset. :func:`plan_for` loads the
plan and linearizes the model with it; :func:`load_weights` loads fine-tuned
linearized weights, checked key by key.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from fxmerge.api import linearize
from fxmerge.cli.arguments import DEFAULT_INPUT_SHAPE, DEFAULT_MAX_KERNEL
from fxmerge.cli.common import say
from fxmerge.cli.errors import CLIError
from fxmerge.cli.models import format_shape, parse_shape
from fxmerge.plan import Plan, PlanError

ANALYSIS_DEFAULTS = {
    "input_shape": DEFAULT_INPUT_SHAPE,
    "max_kernel": DEFAULT_MAX_KERNEL,
    "exclude": [],
}
"""The analysis options a plan depends on (its rules travel in the plan itself)."""


def fill_analysis_settings(args: argparse.Namespace, plan_path: Path | None) -> None:
    """Fill ``--input-shape``, ``--max-kernel``, ``--exclude`` left unset, from the report beside the plan."""
    unset = [key for key in ANALYSIS_DEFAULTS if getattr(args, key) is None]
    report = plan_path.parent / "report.json" if plan_path is not None else None
    recorded = _recorded_settings(report) if unset and report is not None else {}
    taken = []
    for key in unset:
        value = recorded.get(key, ANALYSIS_DEFAULTS[key])
        if key in recorded:
            shown = (" ".join(value) or "(none)") if isinstance(value, list) else value
            taken.append(f"--{key.replace('_', '-')} {shown}")
        setattr(args, key, _setting(key, value, report))
    if taken:
        say(f"using {', '.join(taken)} from {report}")


def _setting(key: str, value: object, report: Path | None):
    """One recorded setting, as the parsed option would hold it."""
    if key == "input_shape":
        return parse_shape(str(value))
    if key == "exclude":
        if not isinstance(value, list):
            raise CLIError(f"{report}: settings.exclude should be a list of module names, not {value!r}")
        return [str(v) for v in value]
    if value is None and key == "max_kernel":
        return None  # the rule set's default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CLIError(f"{report}: settings.{key} should be an integer, not {value!r}") from None


def _recorded_settings(report: Path) -> dict:
    """The ``settings`` a compress run wrote into ``report.json`` ({} when there are none)."""
    try:
        settings = json.loads(report.read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(settings, dict):
        return {}
    return {key: settings[key] for key in ANALYSIS_DEFAULTS if key in settings}


def load_plan(path: Path) -> Plan:
    """``Plan.load``, with a file that is not a plan reported as such."""
    try:
        return Plan.load(path)
    except (KeyError, TypeError, AttributeError) as exc:
        raise CLIError(f"{path} is not an fxmerge plan ({type(exc).__name__}: {exc})") from exc
    except IsADirectoryError:
        raise CLIError(f"--plan {path} is a directory; give the plan.json inside it") from None


def plan_for(args: argparse.Namespace, model: nn.Module, x) -> tuple[Plan, torch.fx.GraphModule]:
    """Load ``--plan`` and linearize ``model`` with it (and ``--weights`` when given)."""
    plan = load_plan(args.plan)
    try:
        linear = linearize(model, x, plan, exclude=args.exclude, max_kernel=args.max_kernel)
    except PlanError as exc:
        if "stale" not in str(exc):
            raise
        raise CLIError(
            f"{exc}. Use the model (with the same weights: which convs a plan keeps depends on them) and "
            "the --input-shape, --exclude and --max-kernel the plan was made with (fxmerge compress records "
            f"them in report.json beside plan.json); here: --input-shape {format_shape(args.input_shape)}, "
            f"--max-kernel {args.max_kernel}, --exclude {' '.join(args.exclude) or '(none)'}"
        ) from exc
    if getattr(args, "weights", None) is not None:
        load_weights(linear, args.weights)
    return plan, linear.eval()


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state_dict saved by ``fxmerge compress`` (``linearized.pt``) into ``model``, checked."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"no such weights file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        why = str(exc).split(". ")[0].splitlines()[0] if str(exc) else ""
        raise CLIError(
            f"cannot read {path} as weights ({type(exc).__name__}: {why}); "
            "expected a state_dict saved with torch.save, such as linearized.pt from fxmerge compress"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(f"{path} holds a {type(state).__name__}, not a state_dict of tensors")
    problems = _state_problems(model.state_dict(), state)
    if problems:
        raise CLIError(
            f"the weights in {path} do not fit the linearized model: {'; '.join(problems)}; "
            "use the linearized.pt written by fxmerge compress for this model and plan"
        )
    model.load_state_dict(state)


def _state_problems(expected: dict, state: dict) -> list[str]:
    """Missing, unexpected and wrongly shaped keys, three of each named."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [
        f"{k} {tuple(state[k].shape)} (model: {tuple(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", resized)):
        if keys:
            problems.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    return problems
