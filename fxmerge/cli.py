"""The ``fxmerge`` command.

    fxmerge inspect torchvision:resnet34
    fxmerge inspect timm:efficientnet_b0 --json
    fxmerge inspect path/to/model.py:build --input-shape 1,3,32,32 --exclude stem

Subcommands are registered with :func:`command`; shared options (the model spec,
the input shape, the analysis settings) are added with :func:`add_model_arguments`
and turned into a model, an example input and a span graph with
:func:`load_model`, :func:`example_input` and :func:`analyze_args`. Adding a
subcommand is one function for its arguments and one for its body::

    def _bench_arguments(parser):
        add_model_arguments(parser)
        parser.add_argument("--backend", default="eager")

    @command("bench", "time a model on a backend", _bench_arguments)
    def bench(args) -> int:
        model = load_model(args.model)
        ...
        return 0

Errors the user can fix (a bad model spec, a missing file or package, a model
that cannot be captured) are printed as ``fxmerge: error: ...`` with exit status 2;
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
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import fxmerge
from fxmerge.capture import CaptureError
from fxmerge.ir import SpanGraph
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
def load_model(spec: str) -> nn.Module:
    """Build the model a MODEL spec names, with random weights.

    ``torchvision:NAME``   ``torchvision.models.get_model(NAME, weights=None)`` (no
                           backbone weights either, so nothing is downloaded)
    ``timm:NAME``          ``timm.create_model(NAME, pretrained=False)``
    ``FILE.py:FACTORY``    import FILE by path and call ``FACTORY()``
    ``MODULE:FACTORY``     import MODULE (dotted, on ``sys.path``) and call ``FACTORY()``
    """
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


USER_ERRORS = (CLIError, CaptureError, PlanError, ImportError, OSError, ValueError)
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
    if isinstance(exc, ModuleNotFoundError) and exc.name == "fxmerge.passes.rules":
        return "rules='paper' is not available in this version of fxmerge (fxmerge.passes.rules is missing); use --rules general"
    if isinstance(exc, (CLIError, CaptureError, PlanError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
