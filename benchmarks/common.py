"""What the benchmark scripts share: arguments, models, backends, caches and output.

Not a benchmark itself. The scripts run as ``python benchmarks/NAME.py`` (this
directory is then first on ``sys.path``, so ``import common`` finds this file).

Conventions every script follows:

* ``--quick`` is a smoke test: a small input, few plans, few timing rounds, one
  model, and (unless ``--cache-dir`` or ``--out`` are given) a fresh temporary cache
  and a temporary output file, so that low-quality smoke measurements never land in
  the shared latency cache or under ``benchmarks/results/``.
* ``--threads`` (default 1) is the thread count of the latency backend and of
  torch in this process; it is printed and stored in the JSON.
* ``--fresh`` builds latency tables into a new empty cache, for honest build times.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parent.parent

# Timing policies (fxmerge.latency.get_backend keywords). FULL is the library default.
FULL_TIMING = {"runs": 50, "warmup": 10, "min_runs": 5, "max_time_s": 1.0}
QUICK_TIMING = {"runs": 10, "warmup": 2, "min_runs": 3, "max_time_s": 0.2}


def split_list(values: Sequence[str] | None) -> list[str]:
    """``["a,b", "c"]`` → ``["a", "b", "c"]`` (``--models`` takes either form)."""
    out: list[str] = []
    for value in values or ():
        out.extend(v.strip() for v in value.split(",") if v.strip())
    return out


def add_common_arguments(parser: argparse.ArgumentParser, *, rounds: int) -> None:
    parser.add_argument(
        "--models", nargs="+", default=None, metavar="NAME", help="torchvision model names (space- or comma-separated)"
    )
    parser.add_argument("--size", type=int, default=None, help="input height and width (default 224; 64 with --quick)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: small input, one model, few plans and rounds, temporary cache and output",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output (default benchmarks/results/<script>.json; a temporary file with --quick)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache root, holding latency/ and importance/ (default: fxmerge's, ~/.cache/fxmerge "
        "or $FXMERGE_CACHE_DIR; a new temporary one with --quick or --fresh)",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="build latency tables into a new empty cache (honest build times)"
    )
    parser.add_argument("--threads", type=int, default=1, help="backend and torch threads (default 1, for stability)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"alternating timing rounds per comparison (default {rounds}; 2 with --quick)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def finish_common_arguments(
    args: argparse.Namespace, script: str, *, models: list[str], quick_models: list[str], rounds: int
) -> argparse.Namespace:
    """Fill the defaults that depend on ``--quick``; make the cache and output paths."""
    args.models = split_list(args.models) or (quick_models if args.quick else models)
    if args.size is None:
        args.size = 64 if args.quick else 224
    if args.rounds is None:
        args.rounds = 2 if args.quick else rounds
    if args.threads < 1:
        raise SystemExit("--threads must be at least 1")
    args.timing = QUICK_TIMING if args.quick else FULL_TIMING
    args.progress = not args.no_progress
    temporary = None
    if args.out is None:
        if args.quick:
            temporary = Path(tempfile.mkdtemp(prefix=f"fxmerge-{script}-"))
            args.out = temporary / f"{script}.json"
        else:
            args.out = RESULTS / f"{script}.json"
    if args.fresh or (args.quick and args.cache_dir is None):
        if args.cache_dir is not None:
            raise SystemExit("--fresh builds into a new temporary cache; leave out --cache-dir")
        base = temporary or Path(tempfile.mkdtemp(prefix=f"fxmerge-{script}-"))
        args.cache_dir = base / "cache"
        args.cache_kind = "fresh temporary cache"
    elif args.cache_dir is None:
        args.cache_dir = default_cache_root()
        args.cache_kind = "shared cache"
    else:
        args.cache_kind = "given cache"
    args.cache_dir = Path(args.cache_dir).expanduser()
    torch.set_num_threads(args.threads)
    return args


def default_cache_root() -> Path:
    """fxmerge's cache root: the parent of its default latency cache directory."""
    from fxmerge.latency import default_cache_dir

    return default_cache_dir().parent


def command_line() -> str:
    """The command that is running, to paste back into a shell (run from the repository root)."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(Path.cwd())
    return shlex.join(["python", str(script), *sys.argv[1:]])


def environment(args: argparse.Namespace) -> dict:
    """Where and how the run happened."""
    from fxmerge.latency.timing import cpu_name, physical_cores

    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("torchvision", "onnxruntime", "fxmerge"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "load_average_at_start": load,
        "threads": args.threads,
        "versions": versions,
        "command": command_line(),
        "quick": bool(args.quick),
        "input_shape": [1, 3, args.size, args.size],
        "rounds": args.rounds,
        "timing_policy": dict(args.timing),
        "cache_dir": str(args.cache_dir),
        "cache_kind": args.cache_kind,
    }


def load_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A model with random weights (seeded, so plans and caches repeat), in eval mode.

    ``name`` is a torchvision model name or any ``fxmerge`` MODEL spec (``timm:NAME``,
    ``path/to/file.py:factory``); the command line's loader builds it.
    """
    from fxmerge.cli.models import load_model as load

    return load(name if ":" in name else f"torchvision:{name}", seed=seed).eval()


def example_input(size: int, seed: int = 0) -> torch.Tensor:
    """The command line's example input for one ``1×3×size×size`` image."""
    from fxmerge.cli.models import example_input as example

    return example(((1, 3, size, size),), seed=seed)


def make_backend(name: str, args: argparse.Namespace):
    from fxmerge.latency import get_backend

    return get_backend(name, threads=args.threads, **args.timing)


def folded(model: torch.nn.Module) -> torch.fx.GraphModule:
    """The original model with BatchNorm folded into its convs (what a merged model is compared with)."""
    import fxmerge

    return fxmerge.merge(torch.fx.symbolic_trace(model.eval()))


def relative_difference(reference: torch.nn.Module, other: torch.nn.Module, x: torch.Tensor) -> float:
    """``max|other(x) − reference(x)| / max|reference(x)|``."""
    with torch.no_grad():
        want, got = reference(x), other(x)
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def count_files(directory: Path) -> int:
    """Cached measurements in a cache directory (one JSON file each)."""
    return sum(1 for _ in directory.glob("*.json")) if directory.is_dir() else 0


class Stopwatch:
    """``with Stopwatch() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.started = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, data: dict) -> Path:
    """Write ``data`` as strict JSON (NaN and infinities as ``null``), atomically."""
    from fxmerge.cache import write_atomic

    return write_atomic(path, json.dumps(_finite(data), indent=1, default=str, allow_nan=False) + "\n")


def _finite(value):
    """``value`` with NaN and infinities replaced by ``None`` (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def print_footer(args: argparse.Namespace, env: dict, markdown: str, wall_s: float) -> None:
    """The command, where the JSON went, and the markdown summary for RESULTS.md."""
    print()
    print(f"command: {env['command']}")
    print(f"json:    {args.out}")
    print(
        f"wall time: {wall_s:.0f} s; {args.threads} thread(s); {env['cpu']} "
        f"({env['physical_cores']} physical cores); load average at start {env['load_average_at_start']}"
    )
    if args.quick:
        print("QUICK SMOKE RUN: tiny settings, the numbers below are not results")
    print("\n---- markdown summary for benchmarks/RESULTS.md ----\n")
    print(markdown)
    print("---- end of summary ----")


def fmt(value: float | None, spec: str = ".3f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"
