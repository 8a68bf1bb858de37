"""The importance stage on one process versus two (torch.distributed, gloo, CPU): issue #16.

Builds the ``paper`` importance table (one epoch of fine-tuning per entry on a
holdout-train split, accuracy on a holdout-val split) of a small ResNet-style CNN on
seeded, generated 3×32×32 data (10 classes), three ways, each into a fresh empty
cache:

* ``1 process × 1 thread``  — the baseline;
* ``2 processes × 1 thread`` — ``torch.multiprocessing`` spawn, gloo, a file rendezvous;
  the entries are sharded across the two ranks (``fxmerge.distributed``);
* ``1 process × 2 threads`` — the same two cores used by one process instead.

The time is that of ``build_importance_table`` alone: for two processes from a
barrier after both have built the model and read the data to the last rank's
return (process start-up is reported apart). The tables are compared entry by entry
with the one-process, one-thread table.

    python benchmarks/distributed_importance.py           # about 5 minutes on 2 cores
    python benchmarks/distributed_importance.py --quick   # smoke test, temporary output
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # the benchmarks' shared helpers, next to this file

SCRIPT = "distributed_importance"


# --------------------------------------------------------------------------- model and data
def block(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = block(cin, cout, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        skip = x if self.short is None else self.short(x)
        return torch.relu(self.conv2(self.conv1(x)) + skip)


class SmallResNet(nn.Module):
    """A stem and two stages of two basic blocks (16 and 32 channels), for 3×32×32 inputs."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = block(3, 16, 1)
        self.stages = nn.Sequential(Basic(16, 16, 1), Basic(16, 16, 1), Basic(16, 32, 2), Basic(32, 32, 1))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class Generated(torch.utils.data.TensorDataset):
    """Seeded 3×32×32 images: a class-dependent colour and stripe, plus noise. Lists its labels."""

    def __init__(self, n: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % 10
        colour = torch.rand(10, 3, 1, 1, generator=generator)
        rows = torch.arange(32).view(1, 1, 32, 1)
        stripes = torch.sin(rows * (labels.view(-1, 1, 1, 1) + 1) * 0.3)
        images = colour[labels] + 0.5 * stripes + 0.5 * torch.randn(n, 3, 32, 32, generator=generator)
        super().__init__(images, labels)
        self.targets = labels.tolist()


def setup(samples: int):
    from fxmerge.api import analyze_captured
    from fxmerge.capture import capture

    torch.manual_seed(0)
    captured = capture(SmallResNet().eval(), torch.randn(1, 3, 32, 32))
    return captured, analyze_captured(captured), Generated(samples)


def build(captured, span_graph, data, cache: Path, holdout: int) -> dict:
    from fxmerge.importance import build_importance_table

    table = build_importance_table(
        captured,
        span_graph,
        "paper",
        data=data,
        cache_dir=cache,
        progress=False,
        holdout_train=holdout,
        holdout_val=holdout,
        batch_size=32,
        lr=0.05,
    )
    return dict(table.entries), dict(table.info)


# --------------------------------------------------------------------------- the three runs
def one_process(args: argparse.Namespace, threads: int, cache: Path) -> dict:
    torch.set_num_threads(threads)
    load = os.getloadavg()
    captured, span_graph, data = setup(args.samples)
    started = time.perf_counter()
    entries, info = build(captured, span_graph, data, cache, args.holdout)
    seconds = time.perf_counter() - started
    return {
        "processes": 1,
        "threads": threads,
        "seconds": seconds,
        "entries": entries,
        "evaluated": info["evaluated"],
        "load_before": load,
        "load_after": os.getloadavg(),
    }


def _worker(rank: int, root: str, samples: int, holdout: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2)
    try:
        captured, span_graph, data = setup(samples)
        dist.barrier()
        started = time.perf_counter()
        entries, info = build(captured, span_graph, data, Path(root) / "cache", holdout)
        seconds = time.perf_counter() - started
        gathered = [None, None]
        dist.all_gather_object(gathered, {"seconds": seconds, "evaluated_here": info["distributed"]["evaluated_here"]})
        if rank == 0:
            result = {"entries": entries, "evaluated": info["evaluated"], "ranks": gathered}
            Path(root, "result.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def two_processes(args: argparse.Namespace, root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    started = time.perf_counter()
    torch.multiprocessing.spawn(_worker, args=(str(root), args.samples, args.holdout), nprocs=2, join=True)
    total = time.perf_counter() - started
    result = json.loads((root / "result.json").read_text())
    seconds = max(r["seconds"] for r in result["ranks"])
    return {
        "processes": 2,
        "threads": 1,
        "seconds": seconds,
        "with_startup_seconds": total,
        **result,
        "load_before": load,
        "load_after": os.getloadavg(),
    }


# --------------------------------------------------------------------------- output
def summary(runs: list[dict], baseline: dict, entries: int) -> str:
    rows = []
    for run in runs:
        diff = max(abs(run["entries"][k] - baseline["entries"][k]) for k in baseline["entries"])
        rows.append(
            (
                f"{run['processes']} × {run['threads']}",
                f"{run['seconds']:.1f}",
                f"{baseline['seconds'] / run['seconds']:.2f}×",
                "identical" if diff == 0 else f"max |ΔI| {diff:.1e}",
                f"{run['load_before'][0]:.2f} → {run['load_after'][0]:.2f}",
            )
        )
    header = ("processes × threads", "importance stage (s)", "speed-up", "table vs 1 × 1", "load average (1 min)")
    return f"{entries} entries evaluated\n\n" + common.markdown_table(header, rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: small splits, temporary output")
    parser.add_argument(
        "--holdout",
        type=int,
        default=None,
        help="images in holdout-train and in holdout-val (default 256; 32 with --quick)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"JSON output (default benchmarks/results/{SCRIPT}.json)"
    )
    args = parser.parse_args(argv)
    if args.holdout is None:
        args.holdout = 32 if args.quick else 256
    args.samples = 2 * args.holdout
    if args.out is None:
        args.out = (
            Path(tempfile.mkdtemp(prefix=f"fxmerge-{SCRIPT}-")) / f"{SCRIPT}.json"
            if args.quick
            else common.RESULTS / f"{SCRIPT}.json"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    from fxmerge.latency.timing import cpu_name, physical_cores

    args = parse_args(argv)
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_at_start": os.getloadavg(),
        "cpu": cpu_name(),
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "command": common.command_line(),
        "quick": args.quick,
        "holdout_train": args.holdout,
        "holdout_val": args.holdout,
        "estimator": "paper",
        "backend": "gloo",
    }
    work = Path(tempfile.mkdtemp(prefix=f"fxmerge-{SCRIPT}-"))
    baseline = one_process(args, 1, work / "cache-1x1")
    print(f"1 process × 1 thread: {baseline['seconds']:.1f} s", flush=True)
    two = two_processes(args, work / "2x1")
    print(
        f"2 processes × 1 thread: {two['seconds']:.1f} s ({two['with_startup_seconds']:.1f} s with start-up)",
        flush=True,
    )
    threads = one_process(args, 2, work / "cache-1x2")
    print(f"1 process × 2 threads: {threads['seconds']:.1f} s", flush=True)
    runs = [baseline, two, threads]
    markdown = summary(runs, baseline, baseline["evaluated"])
    common.write_json(args.out, {"environment": env, "runs": runs, "summary": markdown})
    print(f"\ncommand: {env['command']}\njson:    {args.out}\n")
    if args.quick:
        print("QUICK SMOKE RUN: tiny settings, the numbers below are not results")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
