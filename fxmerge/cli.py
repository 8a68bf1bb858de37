"""The ``fxmerge`` command.

    fxmerge inspect torchvision:resnet34
    fxmerge inspect timm:efficientnet_b0 --json
    fxmerge inspect path/to/model.py:build --input-shape 1,3,32,32 --exclude stem
    fxmerge compress torchvision:resnet18 --target 60% --data images/ --out out/
    fxmerge merge torchvision:resnet18 --plan out/plan.json --weights out/linearized.pt --out out/
    fxmerge bench torchvision:resnet18 --merged out/merged.pt2 --rounds 5

``compress`` runs :func:`fxmerge.compress`, fine-tunes on ``--data`` (an ImageFolder
tree, :mod:`fxmerge.data`) and writes the plan, the reports, the fine-tuned
linearized weights and the merged model (``merged.pt2``, ``merged.onnx``); ``merge``
rebuilds the merged model from those files; ``bench`` times a model against its
merged version in alternating rounds.

Subcommands are registered with :func:`command`; shared options (the model spec,
the input shape, the analysis settings) are added with :func:`add_model_arguments`
and turned into a model, an example input and a span graph with
:func:`load_model`, :func:`example_input` and :func:`analyze_args`. Adding a
subcommand is one function for its arguments and one for its body::

    def _count_arguments(parser):
        add_model_arguments(parser)
        parser.add_argument("--json", action="store_true")

    @command("count", "count the convs of a model", _count_arguments)
    def count(args) -> int:
        model = load_model(args.model)
        ...
        return 0

Timing options shared by ``compress`` and ``bench`` come from
:func:`add_backend_arguments`; :func:`latency_backend` turns them into a backend.

Errors the user can fix (a bad model spec, a missing file or package, a model
that cannot be captured, a data folder with the wrong layout, an unreachable
latency target, a plan made for another model) are printed as ``fxmerge: error: ...`` with exit status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import inspect as _inspect
import itertools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import fxmerge
from fxmerge.capture import CaptureError, capture
from fxmerge.data import DataError
from fxmerge.ir import SpanGraph
from fxmerge.latency.backends import BackendUnavailable
from fxmerge.plan import PlanError


class CLIError(Exception):
    """An error the user can fix; printed without a traceback, exit status 2."""


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}
"""Subcommands by name, in registration order."""


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register ``fxmerge NAME``: ``configure(parser)`` adds its arguments, the decorated
    function runs it and returns the exit status (``None`` means 0)."""

    def register(run: Callable[[argparse.Namespace], int | None]):
        COMMANDS[name] = Command(name, help, configure, run)
        return run

    return register


# --------------------------------------------------------------------------- models
MODEL_SEED = 0
"""The torch seed a model is built under (see :func:`load_model`)."""


def load_model(spec: str) -> nn.Module:
    """Build the model a MODEL spec names, with random weights.

    ``torchvision:NAME``   ``torchvision.models.get_model(NAME, weights=None)`` (no
                           backbone weights either, so nothing is downloaded)
    ``timm:NAME``          ``timm.create_model(NAME, pretrained=False)``
    ``FILE.py:FACTORY``    import FILE by path and call ``FACTORY()``
    ``MODULE:FACTORY``     import MODULE (dotted, on ``sys.path``) and call ``FACTORY()``

    The model is built with torch's CPU generator seeded with :data:`MODEL_SEED`
    (the caller's random state is restored afterwards), so a spec gives the same
    weights every time: ``fxmerge merge`` and ``bench --plan`` rebuild exactly the
    model ``fxmerge compress`` planned for (which convs an option keeps depends on
    the weights).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)
        return _build_model(spec)


def _build_model(spec: str) -> nn.Module:
    if not isinstance(spec, str) or ":" not in spec:
        raise CLIError(
            f"bad model spec {spec!r}: expected torchvision:NAME, timm:NAME or path/to/file.py:factory"
        )
    source, _, name = spec.rpartition(":")
    if source == "torchvision":
        return _torchvision_model(name)
    if source == "timm":
        return _timm_model(name)
    if not name:
        raise CLIError(f"bad model spec {spec!r}: name the factory to call, as in {spec}:build_model")
    if source.endswith(".py") or "/" in source or "\\" in source:
        with _on_path(Path(source).resolve().parent):  # the file may import its neighbours
            module = _import_file(source)
            return _call_factory(module, source, name)
    with _on_path(Path.cwd()):  # as `python -m` would: modules under the working directory
        try:
            module = importlib.import_module(source)
        except ImportError as exc:
            raise CLIError(
                f"bad model spec {spec!r}: cannot import module {source!r} ({exc}); "
                "use torchvision:NAME, timm:NAME or path/to/file.py:factory"
            ) from exc
        return _call_factory(module, source, name)


@contextlib.contextmanager
def _on_path(directory: Path):
    """``directory`` first on ``sys.path`` while importing a model and calling its factory."""
    entry = str(directory)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        sys.path.remove(entry)


def _call_factory(module, source: str, name: str) -> nn.Module:
    factory = getattr(module, name, None)
    if factory is None:
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        hint = difflib.get_close_matches(name, public, n=3)
        raise CLIError(
            f"{source} has no {name!r}" + (f"; did you mean {', '.join(hint)}?" if hint else "")
        )
    if not callable(factory):
        raise CLIError(f"{source}:{name} is not callable (it is a {type(factory).__name__})")
    try:
        _inspect.signature(factory).bind()
    except TypeError as exc:
        raise CLIError(f"{source}:{name} must take no arguments ({exc})") from exc
    except ValueError:  # no signature (a builtin): just call it
        pass
    try:
        model = factory()
    except Exception as exc:
        raise CLIError(f"calling {source}:{name}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise CLIError(f"{source}:{name}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _torchvision_model(name: str) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        hint = difflib.get_close_matches(name, known, n=3)
        raise CLIError(
            f"torchvision has no model {name!r}"
            + (f"; did you mean {', '.join(hint)}?" if hint else "; see torchvision.models.list_models()")
        )
    kwargs = {}
    if "weights_backbone" in _inspect.signature(torchvision.models.get_model_builder(name)).parameters:
        kwargs["weights_backbone"] = None  # segmentation / detection models: no download
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _timm_model(name: str) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise CLIError(f"timm:{name} needs timm, which is not installed: pip install timm") from exc
    try:
        return timm.create_model(name, pretrained=False)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        hint = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise CLIError(f"timm cannot build {name!r}: {exc}" + (f"; did you mean {', '.join(hint)}?" if hint else "")) from exc


def _import_file(path: str):
    file = Path(path)
    if file.suffix != ".py":
        raise CLIError(f"{path} is not a Python file (expected path/to/file.py:factory)")
    if not file.is_file():
        raise CLIError(f"no such file: {path}")
    digest = hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:8]
    stem = re.sub(r"\W", "_", file.stem)
    module_name = f"_fxmerge_user_{stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise CLIError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise CLIError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def parse_shape(text: str) -> tuple[tuple[int, ...], ...]:
    """``"1,3,224,224"`` → ``((1, 3, 224, 224),)``; several inputs are separated by ``;``."""
    shapes = []
    for part in text.split(";"):
        try:
            shape = tuple(int(v) for v in part.replace("x", ",").split(",") if v.strip())
        except ValueError:
            raise CLIError(f"bad input shape {text!r}: expected integers separated by commas, e.g. 1,3,224,224") from None
        if not shape or any(v <= 0 for v in shape):
            raise CLIError(f"bad input shape {text!r}: expected positive integers separated by commas, e.g. 1,3,224,224")
        shapes.append(shape)
    return tuple(shapes)


def _shape_argument(text: str) -> tuple[tuple[int, ...], ...]:
    try:
        return parse_shape(text)
    except CLIError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def example_input(shapes: Sequence[tuple[int, ...]], seed: int = 0):
    """A random example input (a tensor, or a tuple of tensors for several shapes)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = tuple(torch.randn(shape, generator=generator) for shape in shapes)
    return tensors[0] if len(tensors) == 1 else tensors


# --------------------------------------------------------------------------- shared arguments
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL and the analysis settings, shared by every subcommand that analyses a model."""
    parser.add_argument(
        "model", metavar="MODEL",
        help="torchvision:NAME, timm:NAME, or path/to/file.py:factory (a function returning the model)",
    )
    parser.add_argument(
        "--input-shape", default="1,3,224,224", type=_shape_argument, metavar="SHAPE",
        help="example input shape (default 1,3,224,224; several inputs: 1,3,224,224;1,3,224,224)",
    )
    parser.add_argument("--rules", choices=("general", "paper"), default="general", help="span rules (default general)")
    parser.add_argument(
        "--exclude", action="append", default=[], metavar="NAME",
        help="keep module NAME (and the modules below it) out of every span; repeatable",
    )
    parser.add_argument("--max-kernel", type=int, default=15, metavar="K", help="largest merged kernel size (default 15)")


def analyze_args(args: argparse.Namespace) -> tuple[nn.Module, object, SpanGraph]:
    """Model, example input and span graph for the options of :func:`add_model_arguments`."""
    model = load_model(args.model)
    x = example_input(args.input_shape)
    graph = fxmerge.analyze(model, x, rules=args.rules, exclude=args.exclude, max_kernel=args.max_kernel)
    return model, x, graph


# --------------------------------------------------------------------------- inspect
def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def span_graph_dict(graph: SpanGraph, spec: str | None = None) -> dict:
    """A JSON-ready dict of a span graph (what ``fxmerge inspect --json`` prints)."""
    data = {
        "model": graph.model,
        "spec": spec,
        "rules": graph.rules,
        "fingerprint": graph.fingerprint,
        "input_shapes": [list(s) for s in graph.input_shapes],
        "settings": dict(graph.settings),
        "units": [dataclasses.asdict(u) for u in graph.units],
        "joins": [dataclasses.asdict(j) for j in graph.joins],
        "positions": [dataclasses.asdict(p) for p in graph.positions],
        "spans": [dataclasses.asdict(s) for s in graph.spans],
        "entries": [dataclasses.asdict(e) for e in graph.entries],
        "chains": [dataclasses.asdict(c) for c in graph.chains],
        "rejections": [{"node": r.node, "reason": r.reason} for r in graph.rejections],
    }
    data["summary"] = {key: len(data[key]) for key in ("units", "joins", "positions", "spans", "entries", "rejections")}
    return data


def _keep_kernel(span) -> str:
    for option in span.options:
        if not option.pruned:
            conv = option.conv
            text = "×".join(map(str, conv.kernel_size))
            if any(s != 1 for s in conv.stride):
                stride = conv.stride[:1] if len(set(conv.stride)) == 1 else conv.stride
                text += f" s{'×'.join(map(str, stride))}"
            if conv.groups > 1:
                text += f" g{conv.groups}"
            return text
    return "-"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[k]) for row in cells) for k in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_line(graph: SpanGraph, seconds: float | None = None) -> str:
    multi = sum(len(s.units) > 1 for s in graph.spans)
    text = (
        f"{graph.model}: {len(graph.units)} units, {len(graph.joins)} joins, {len(graph.positions)} positions, "
        f"{len(graph.spans)} spans ({multi} merging several units), {len(graph.entries)} entries, "
        f"{len(graph.rejections)} rejections"
    )
    return text + (f" (analysed in {seconds:.1f} s)" if seconds is not None else "")


def format_span_graph(graph: SpanGraph, seconds: float | None = None) -> str:
    """Human-readable tables: positions, spans, rejections, then a one-line summary."""
    positions = _table(
        ("#", "position", "kind", "activation", "shape", "pinned"),
        [(p.index, p.id, p.kind, p.activation, "×".join(map(str, p.shape)), p.pinned) for p in graph.positions],
    )
    spans = _table(
        ("span", "units", "options", "merged kernel (keep)"),
        [(s.id, len(s.units), len(s.options), _keep_kernel(s)) for s in graph.spans],
    )
    rejections = _table(("node", "reason"), [(r.node, r.reason) for r in graph.rejections])
    parts = [
        f"Positions ({len(graph.positions)})\n{positions}",
        f"Spans ({len(graph.spans)})\n{spans}",
        f"Rejected ({len(graph.rejections)})\n{rejections}" if graph.rejections else "Rejected (0)",
        summary_line(graph, seconds),
    ]
    return "\n\n".join(parts)


@command("inspect", "analyse a model: positions, candidate spans, and what cannot be merged", _inspect_arguments)
def inspect(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    _, _, graph = analyze_args(args)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps(span_graph_dict(graph, spec=args.model), indent=1))
    else:
        print(format_span_graph(graph, seconds))
    return 0


# --------------------------------------------------------------------------- shared by compress, merge, bench
BACKEND_NAMES = ("auto", "eager", "onnxruntime", "inductor", "tensorrt")


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """The latency backend and how it times: shared by ``compress`` and ``bench``."""
    group = parser.add_argument_group("timing")
    group.add_argument(
        "--backend", choices=BACKEND_NAMES, default="auto",
        help="where latency is measured (default auto: onnxruntime on the CPU; with --device cuda, tensorrt when installed, else eager)",
    )
    group.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="threads for timing (default: physical cores)")
    group.add_argument(
        "--runs", type=_positive_int, default=50, metavar="N",
        help="timed runs per measurement, after up to 10 warm-up runs (default 50; fewer is faster and noisier)",
    )
    group.add_argument(
        "--device", choices=("cpu", "cuda"), default=None,
        help="device to time (and fine-tune) on (default: cuda for tensorrt, else cpu)",
    )


def latency_backend(name: str, *, threads: int | None = None, runs: int = 50, device: str | None = None):
    """The latency backend for ``--backend``/``--threads``/``--runs``/``--device``."""
    from fxmerge.latency import get_backend

    try:
        return get_backend(name, device=device, threads=threads, runs=runs, warmup=min(10, runs), min_runs=min(5, runs))
    except BackendUnavailable as exc:
        raise CLIError(str(exc)) from exc


def _backend_of(args: argparse.Namespace):
    return latency_backend(args.backend, threads=args.threads, runs=args.runs, device=args.device)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _target_argument(text: str) -> str:
    """``--target``: checked now with :func:`fxmerge.api.parse_target`, resolved once the model is timed."""
    from fxmerge.api import parse_target

    try:
        value = parse_target(text, 1.0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (e.g. --target 60% or --target 12.5ms)") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"target latency must be positive, got {text!r}")
    return text.strip()


def format_shape(shapes: Sequence[tuple[int, ...]]) -> str:
    """The inverse of :func:`parse_shape`: ``((1, 3, 224, 224),)`` → ``"1,3,224,224"``."""
    return ";".join(",".join(map(str, shape)) for shape in shapes)


def _say(message: str) -> None:
    """A step or a note, on stderr so that stdout holds only results."""
    print(f"fxmerge: {message}", file=sys.stderr, flush=True)


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False)


def _output_dir(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise CLIError(f"--out {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _outputs(model: nn.Module, inputs) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    with torch.no_grad():
        out = model(*(inputs if isinstance(inputs, tuple) else (inputs,)))
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def relative_error(reference: nn.Module, candidate: nn.Module, inputs) -> float:
    """``max|candidate − reference| / max|reference|`` over every floating-point output."""
    ref, got = _outputs(reference, inputs), _outputs(candidate, inputs)
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


EXACT = 1e-3
"""A merged model further than this (relative) from its linearized model gets a warning."""


def _check_exact(error: float) -> None:
    if error > EXACT:
        _say(
            f"warning: the merged model differs from the linearized one by {error:.1e} (relative); "
            "merging should be exact — please report this with the model and plan"
        )


def _add_analysis_defaults_from_plan(parser: argparse.ArgumentParser) -> None:
    """``merge`` and ``bench --plan``: unset analysis options are read from the compress run's report.json."""
    parser.set_defaults(input_shape=None, max_kernel=None, exclude=None)
    parser.epilog = (
        "--input-shape, --exclude and --max-kernel, when not given, are read from the report.json that "
        "fxmerge compress wrote beside the plan (a plan only fits the analysis it was made with)."
    )


ANALYSIS_DEFAULTS = {"input_shape": "1,3,224,224", "max_kernel": 15, "exclude": []}
"""The analysis options a plan depends on (its rules travel in the plan itself)."""


def _fill_analysis_settings(args: argparse.Namespace, plan_path: Path | None) -> None:
    """Fill ``--input-shape``, ``--max-kernel``, ``--exclude`` left unset.

    A plan is valid only for the span graph it was made on, which depends on those
    options; ``fxmerge compress`` records them in ``report.json`` beside ``plan.json``.
    """
    unset = [key for key in ANALYSIS_DEFAULTS if getattr(args, key) is None]
    report = plan_path.parent / "report.json" if plan_path is not None else None
    recorded = _recorded_settings(report) if unset and report is not None else {}
    taken = []
    for key in unset:
        value = recorded.get(key, ANALYSIS_DEFAULTS[key])
        if key in recorded:
            shown = (" ".join(value) or "(none)") if isinstance(value, list) else value
            taken.append(f"--{key.replace('_', '-')} {shown}")
        if key == "input_shape":
            value = parse_shape(str(value))
        elif key == "max_kernel":
            value = int(value)
        elif key == "exclude":
            value = [str(v) for v in value]
        setattr(args, key, value)
    if taken:
        _say(f"using {', '.join(taken)} from {report}")


def _recorded_settings(report: Path) -> dict:
    """The ``settings`` a compress run wrote into ``report.json`` ({} when there are none)."""
    try:
        settings = json.loads(report.read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(settings, dict):
        return {}
    return {key: settings[key] for key in ANALYSIS_DEFAULTS if key in settings}


def _plan_for(args: argparse.Namespace, model: nn.Module, x) -> tuple[fxmerge.Plan, torch.fx.GraphModule]:
    """Load ``--plan`` and linearize ``model`` with it (and ``--weights`` when given)."""
    plan = fxmerge.Plan.load(args.plan)
    try:
        linear = fxmerge.linearize(model, x, plan, exclude=args.exclude, max_kernel=args.max_kernel)
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
    except Exception as exc:  # noqa: BLE001 - pickle errors have many types
        why = str(exc).split(". ")[0].splitlines()[0] if str(exc) else ""
        raise CLIError(
            f"cannot read {path} as weights ({type(exc).__name__}: {why}); "
            "expected a state_dict saved with torch.save, such as linearized.pt from fxmerge compress"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(f"{path} holds a {type(state).__name__}, not a state_dict of tensors")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [
        f"{k} {tuple(state[k].shape)} (model: {tuple(expected[k].shape)})"
        for k in expected if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or resized:
        problems = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", resized)):
            if keys:
                problems.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise CLIError(
            f"the weights in {path} do not fit the linearized model: {'; '.join(problems)}; "
            "use the linearized.pt written by fxmerge compress for this model and plan"
        )
    model.load_state_dict(state)


# --------------------------------------------------------------------------- compress
def _compress_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--target", required=True, type=_target_argument, metavar="LATENCY",
        help="latency target: milliseconds (12.5 or 12.5ms) or a share of the original model's latency (60%%)",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="where the plan, reports and models are written")
    parser.add_argument(
        "--importance", choices=("auto", "distortion", "loss", "finetune"), default="auto",
        help="importance estimator (default auto: loss with --data, else distortion on random inputs)",
    )
    parser.add_argument("--method", choices=("layermerge", "depth", "layer"), default="layermerge", help="search space (default layermerge)")
    parser.add_argument("--cache-dir", type=Path, default=None, metavar="DIR", help="latency/importance cache (default ~/.cache/fxmerge)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_backend_arguments(parser)
    data = parser.add_argument_group("data and fine-tuning")
    data.add_argument("--data", type=Path, default=None, metavar="DIR", help="image folders DIR/train/CLASS/* and DIR/val/CLASS/*")
    data.add_argument("--finetune-epochs", type=_non_negative_int, default=1, metavar="N", help="fine-tuning epochs with --data (default 1; 0: none)")
    data.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="batch size for fine-tuning and evaluation (default 32)")
    data.add_argument("--lr", type=_positive_float, default=0.01, help="fine-tuning learning rate (SGD, cosine schedule; default 0.01)")
    data.add_argument("--distill", action="store_true", help="also distil from the original model while fine-tuning")
    data.add_argument(
        "--importance-batches", type=_positive_int, default=8, metavar="N",
        help="training batches the importance estimator reads (default 8)",
    )
    data.add_argument("--workers", type=_non_negative_int, default=2, metavar="N", help="data-loading processes (default 2)")


def _image_data(args: argparse.Namespace, model: nn.Module, x):
    """Train/val loaders for ``--data``, checked against the model's input and output."""
    from fxmerge.data import image_folder

    if isinstance(x, tuple) or x.dim() != 4:
        raise CLIError(f"--data needs a model with one image input (--input-shape N,C,H,W), not {format_shape(args.input_shape)}")
    try:
        train, val = image_folder(args.data, tuple(x.shape), args.batch_size, workers=args.workers)
    except DataError as exc:
        raise CLIError(str(exc)) from exc
    classes = train.dataset.classes
    try:
        outputs = _outputs(model.eval(), x)
    except Exception as exc:  # noqa: BLE001 - reported with the shape that caused it
        raise CLIError(
            f"running {type(model).__name__} on an input of shape {format_shape(args.input_shape)} failed "
            f"({type(exc).__name__}: {exc}); check --input-shape"
        ) from exc
    if len(outputs) != 1 or outputs[0].dim() != 2:
        raise CLIError(
            "--data fine-tunes a classifier: the model must return one (batch, classes) tensor, "
            f"it returns {[tuple(t.shape) for t in outputs]}"
        )
    if outputs[0].shape[1] < len(classes):
        raise CLIError(
            f"{args.data} has {len(classes)} classes but the model has only {outputs[0].shape[1]} outputs; "
            "give the model one output per class folder"
        )
    _say(f"data: {len(train.dataset)} training and {len(val.dataset)} validation images, {len(classes)} classes")
    return train, val


def _finetune(args, model: nn.Module, result, train, val, device: str) -> dict[str, float]:
    """Accuracy before, fine-tune ``result.model`` on ``train`` (in place), accuracy after."""
    from fxmerge.data import OnDevice
    from fxmerge.train import accuracy, finetune

    teacher = model.eval() if args.distill else None
    images = len(val.dataset)
    if device != "cpu":
        result.model.to(device)
        train, val = OnDevice(train, device), OnDevice(val, device)
        if teacher is not None:
            teacher.to(device)
    try:
        _say(f"evaluating the original and the linearized model on {images} validation images")
        scores = {"original": accuracy(model.to(device).eval(), val), "linearized": accuracy(result.model, val)}
        if args.finetune_epochs:
            _say(f"fine-tuning the linearized model for {args.finetune_epochs} epoch(s)" + (" with distillation" if teacher is not None else ""))
            finetune(
                result.model, train, epochs=args.finetune_epochs, lr=args.lr, teacher=teacher, progress=_progress(args)
            )
            scores["fine-tuned"] = accuracy(result.model, val)
    finally:
        result.model.to("cpu")
        model.to("cpu")
    return scores


def _accuracy_markdown(scores: dict[str, float], images: int) -> str:
    lines = [f"## Accuracy (top-1, {images} validation images)", "", "| model | accuracy |", "|---|---|"]
    names = {"original": "original", "linearized": "linearized, before fine-tuning", "fine-tuned": "fine-tuned (= merged)"}
    lines += [f"| {names.get(k, k)} | {v:.2%} |" for k, v in scores.items()]
    return "\n".join(lines) + "\n"


COMPRESS_FILES = ("plan.json", "report.json", "report.md", "linearized.pt", "merged.pt2", "merged.onnx")


@command("compress", "compress a model to a latency target; write the plan, reports, and the merged model", _compress_arguments)
def compress(args: argparse.Namespace) -> int:
    from fxmerge.solver import InfeasibleBudget

    started = time.perf_counter()
    if args.data is None and args.importance in ("loss", "finetune"):
        raise CLIError(f"--importance {args.importance} needs labelled data: pass --data DIR (or use --importance distortion)")
    model = load_model(args.model)
    x = example_input(args.input_shape)
    out = _output_dir(args.out)
    notes: list[str] = []
    loaders = _image_data(args, model, x) if args.data is not None else None
    if loaders is None:
        notes.append(
            "no --data: importance was estimated data-free (output distortion on random inputs) and the "
            "linearized model was not fine-tuned; pass --data DIR (DIR/train/CLASS/*, DIR/val/CLASS/*) to do both"
        )
        _say("note: " + notes[-1])
    backend = _backend_of(args)
    importance_data = None
    if loaders is not None:
        _say(f"reading {args.importance_batches} training batch(es) for the importance estimator")
        importance_data = list(itertools.islice(loaders[0], args.importance_batches))
    _say(f"compressing {args.model} to {args.target} on {backend.name} ({backend.device}, {backend.threads} threads)")
    try:
        result = fxmerge.compress(
            model, x, args.target, backend=backend, importance=args.importance, data=importance_data,
            method=args.method, rules=args.rules, exclude=args.exclude, max_kernel=args.max_kernel,
            cache_dir=args.cache_dir, progress=_progress(args),
        )
    except InfeasibleBudget as exc:
        hint = f"--target {_round_up(exc.suggested_ms)}ms or more" if exc.suggested_ms is not None else "a larger --target"
        raise CLIError(
            f"--target {args.target} cannot be met on {backend.name}: the smallest achievable latency is "
            f"{exc.min_latency_ms:.4g} ms; use {hint} ({exc})"
        ) from exc
    scores: dict[str, float] = {}
    if loaders is not None:
        scores = _finetune(args, model, result, *loaders, device=backend.device)
    _say("merging")
    merged = result.merge()
    error = relative_error(result.model.eval(), merged, x)
    _check_exact(error)

    _say(f"writing {', '.join(COMPRESS_FILES)} to {out}")
    report = dataclasses.replace(result.report, notes=result.report.notes + tuple(notes))
    settings = {
        "model": args.model, "input_shape": format_shape(args.input_shape), "rules": args.rules,
        "exclude": list(args.exclude), "max_kernel": args.max_kernel, "target": args.target,
        "backend": backend.name, "device": backend.device, "threads": backend.threads, "runs": args.runs,
        "importance": args.importance, "method": args.method,
        "data": None if args.data is None else str(args.data), "finetune_epochs": args.finetune_epochs if loaders else 0,
        "batch_size": args.batch_size, "lr": args.lr, "distill": args.distill,
    }
    result.plan.save(out / "plan.json")
    record = {**report.to_dict(), "accuracy": scores, "merge_relative_error": error, "settings": settings}
    (out / "report.json").write_text(json.dumps(record, indent=2) + "\n")
    markdown = report.to_markdown()
    if scores:
        markdown += "\n" + _accuracy_markdown(scores, len(loaders[1].dataset))
    (out / "report.md").write_text(markdown)
    torch.save(result.model.state_dict(), out / "linearized.pt")
    export_merged(merged, x, out)

    rows = [
        (f"latency ({report.backend})", f"{report.original_ms:.3f} ms", f"{report.predicted_ms:.3f} ms predicted"),
        ("target", f"{args.target}", f"{report.target_ms:.3f} ms"),
        ("convs", report.convs_before, f"{report.convs_after} ({report.activations_removed} activations removed)"),
    ]
    if scores:
        after = f"{scores['linearized']:.1%} linearized"
        if "fine-tuned" in scores:
            after += f" → {scores['fine-tuned']:.1%} fine-tuned"
        rows.append((f"accuracy (val, {len(loaders[1].dataset)})", f"{scores['original']:.1%}", after))
    rows += [
        ("merge exactness", "", f"max|Δ|/max|ref| = {error:.1e}"),
        ("files", f"{out}/", " ".join(COMPRESS_FILES)),
    ]
    print(_table(("", "original", "compressed"), rows))
    print(f"\nmeasure it: fxmerge bench {args.model} --merged {out / 'merged.pt2'} --backend {backend.name}")
    _say(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def _round_up(value: float, digits: int = 4) -> str:
    """``value`` rounded up to ``digits`` significant digits, as text (a target that surely suffices)."""
    if not math.isfinite(value) or value <= 0:
        return f"{value:.{digits}g}"
    step = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return f"{math.ceil(value / step) * step:.{digits}g}"


def export_merged(merged: nn.Module, x, out: Path) -> None:
    """``merged.pt2`` and ``merged.onnx`` (:func:`fxmerge.api.export_merged`), errors made readable."""
    from fxmerge.api import export_merged as export

    try:
        export(merged, x, out)
    except Exception as exc:  # noqa: BLE001 - an exporter failure: say which file
        raise CLIError(f"exporting the merged model to {out} failed: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- merge
def _merge_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    _add_analysis_defaults_from_plan(parser)
    parser.add_argument("--plan", required=True, type=Path, metavar="PLAN", help="plan.json from fxmerge compress")
    parser.add_argument("--weights", type=Path, default=None, metavar="PT", help="fine-tuned linearized.pt from fxmerge compress (default: the model's own weights)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="where merged.pt2 and merged.onnx are written")


@command("merge", "rebuild a compressed model from its plan (and fine-tuned weights); write merged.pt2 and merged.onnx", _merge_arguments)
def merge(args: argparse.Namespace) -> int:
    _fill_analysis_settings(args, args.plan)
    model = load_model(args.model)
    x = example_input(args.input_shape)
    out = _output_dir(args.out)
    plan, linear = _plan_for(args, model, x)
    _say(f"merging {len(plan.entries)} span(s) of {plan.model}")
    merged = fxmerge.merge(linear)
    error = relative_error(linear, merged, x)
    _check_exact(error)
    export_merged(merged, x, out)
    convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in merged.modules())
    print(f"merged {plan.model}: {len(plan.entries)} convs in the plan, {convs} conv modules in the merged model")
    print(f"merged vs linearized: max|Δ|/max|ref| = {error:.1e}")
    print(f"wrote {out / 'merged.pt2'} and {out / 'merged.onnx'}")
    return 0


# --------------------------------------------------------------------------- bench
def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    _add_analysis_defaults_from_plan(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--merged", type=Path, default=None, metavar="PT2", help="merged.pt2 from fxmerge compress or merge, timed against MODEL")
    which.add_argument("--plan", type=Path, default=None, metavar="PLAN", help="plan.json: build the merged model from MODEL on the fly")
    parser.add_argument("--weights", type=Path, default=None, metavar="PT", help="with --plan: fine-tuned linearized.pt (latency does not depend on it)")
    parser.add_argument("--rounds", type=_positive_int, default=5, metavar="N", help="alternating timing rounds; the median is reported (default 5)")
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
    except Exception as exc:  # noqa: BLE001 - torch.export.load raises many kinds
        raise CLIError(f"cannot load {path} with torch.export.load ({type(exc).__name__}: {exc})") from exc
    user_inputs = set(program.graph_signature.user_inputs)
    shapes = tuple(
        tuple(int(v) for v in node.meta["val"].shape)
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in user_inputs and hasattr(node.meta.get("val"), "shape")
    )
    return runnable(program), shapes


def runnable(program: torch.export.ExportedProgram) -> nn.Module:
    """``program.module()`` that the latency backends can run.

    ``ExportedProgram.module()`` forbids ``train()``/``eval()`` on the instance; the
    graph is already in inference form, so the flag changes nothing, but the timing
    code sets it.
    """
    module = program.module(check_guards=False)
    for name in ("train", "eval"):
        module.__dict__.pop(name, None)
    return module


@command("bench", "time a model (BatchNorm folded), and its merged version side by side", _bench_arguments)
def bench(args: argparse.Namespace) -> int:
    import statistics

    from tqdm.auto import tqdm

    from fxmerge.demo import side_by_side
    from fxmerge.latency import measure_model

    if args.weights is not None and args.plan is None:
        raise CLIError("--weights goes with --plan (a .pt2 given with --merged already holds its weights)")
    merged = label = None
    if args.merged is not None:
        merged, shapes = load_exported(args.merged)
        if args.input_shape is None:
            args.input_shape = shapes
        elif tuple(args.input_shape) != shapes:
            raise CLIError(
                f"{args.merged} was exported for input {format_shape(shapes)}, not --input-shape {format_shape(args.input_shape)}"
            )
        label = str(args.merged)
    _fill_analysis_settings(args, args.plan)
    model = load_model(args.model)
    x = example_input(args.input_shape)
    original = fxmerge.merge(capture(model, x).gm)  # BatchNorm folded: only depth differs
    original_label = "original (BatchNorm folded)"
    if args.plan is not None:
        _, linear = _plan_for(args, model, x)
        merged, label = fxmerge.merge(linear), f"merged (from {args.plan})"
    if merged is not None:
        relative_error(original, merged, x)  # same output shapes, or a clear error
    if args.merged is not None:
        # run both through the same torch.export runtime (its hooks cost the same in each)
        original = runnable(torch.export.export(original, x if isinstance(x, tuple) else (x,)))
        original_label = "original (BatchNorm folded, exported)"
    backend = _backend_of(args)
    _say(
        f"timing on {backend.name} ({backend.device}, {backend.threads} threads), input {format_shape(args.input_shape)}, "
        f"{args.rounds} round(s)" + (", alternating original and merged" if merged is not None else "")
    )
    times: tuple[list[float], list[float]] = ([], [])
    for _ in tqdm(range(args.rounds), desc="bench", disable=not _progress(args), leave=False):
        if merged is None:
            times[0].append(measure_model(original, x, backend).median_ms)
        else:
            first, second = side_by_side(original, merged, x, backend, rounds=1)
            times[0].append(first)
            times[1].append(second)
    data = {
        "model": args.model, "backend": backend.name, "device": backend.device, "threads": backend.threads,
        "input_shape": format_shape(args.input_shape), "rounds": args.rounds,
        "original": original_label, "original_ms": statistics.median(times[0]),
    }
    if merged is not None:
        data.update(merged=label, merged_ms=statistics.median(times[1]))
        data["speedup"] = data["original_ms"] / data["merged_ms"]
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    rows = [(original_label, f"{data['original_ms']:.3f} ms")]
    if merged is not None:
        rows += [(label, f"{data['merged_ms']:.3f} ms"), ("speed-up", f"{data['speedup']:.2f}×")]
    print(f"{type(model).__name__} on {backend.name} ({backend.device}, {backend.threads} threads), "
          f"median of {args.rounds} round(s)")
    print(_table(("model", "latency"), rows))
    return 0


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxmerge",
        description="Make CNNs shallower: latency-aware activation and conv removal with exact kernel merging.",
    )
    parser.add_argument("--version", action="version", version=f"fxmerge {fxmerge.__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        child = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(child)
        child.set_defaults(run=cmd.run)
    return parser


USER_ERRORS = (CLIError, CaptureError, PlanError, DataError, BackendUnavailable, ImportError, OSError, ValueError)
"""Exceptions reported as ``fxmerge: error: ...`` with exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        status = args.run(args)
    except KeyboardInterrupt:
        print("fxmerge: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"fxmerge: error: {_message(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug: say so, briefly
        if args.debug:
            raise
        print(
            f"fxmerge: internal error: {type(exc).__name__}: {exc}\n"
            "(rerun with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
    return int(status or 0)


def _message(exc: BaseException) -> str:
    if isinstance(exc, (CLIError, CaptureError, PlanError, DataError, BackendUnavailable)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
