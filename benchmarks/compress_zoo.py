"""Is the latency target met as measured? fxmerge.compress on torchvision models, checked independently.

For each configuration (model, input size, thread count) and each target (a share of the
original's latency), on the onnxruntime CPU backend with the closed loop on (the default):

1. ``fxmerge.compress(model, x, target, backend=..., threads=..., importance="distortion")``
   (data-free importance: what ``auto`` picks without data);
2. ``result.merge()``, checked against the linearized model;
3. an **independent** timing, sharing no code with fxmerge's timing: the merged model and
   the original, both with BatchNorm folded, exported to ONNX, loaded into fresh ONNX
   Runtime sessions (spinning off, the thread count of the configuration) and timed in
   interleaved blocks of runs (A B B A …, ``--rounds`` pairs); the measured ratio is the
   median over rounds of median(merged block) / median(original block).

The table reports asked, predicted (the first solve), measured by the loop, measured
independently with its spread (the interquartile range of the per-round ratios over their
median: where it passes the tolerance, the host moves one timing of the same two models by
more than the check allows), the miss ``|measured / asked − 1|`` (goal: ≤ 3%), the solves
used and the compress wall time with the loop's share of it (goal: ≤ 25%).

    python benchmarks/compress_zoo.py                 # the whole matrix (about an hour)
    python benchmarks/compress_zoo.py --configs resnet18@64 --threads-list 1
    python benchmarks/compress_zoo.py --quick         # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
import numpy as np
import torch

import fxmerge
from fxmerge.api import TargetUnreachable
from fxmerge.export import export_onnx
from fxmerge.latency.timing import physical_cores

CONFIGS = ["resnet18@224", "resnet34@224", "mobilenet_v2@224", "regnet_x_400mf@224", "resnet18@64"]
QUICK_CONFIGS = ["resnet18@64"]
TARGETS = ["70%", "60%", "50%"]
QUICK_TARGETS = ["70%"]
TOLERANCE = 0.03


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser, rounds=15)
    parser.add_argument("--configs", nargs="+", default=None, help="MODEL@SIZE, e.g. resnet18@64")
    parser.add_argument("--targets", nargs="+", default=None, help="e.g. 70%% 60%% 50%%")
    parser.add_argument(
        "--threads-list", nargs="+", type=int, default=None, help="thread counts (default: 1 and the physical cores)"
    )
    args = parser.parse_args(argv)
    args = common.finish_common_arguments(args, "compress_zoo", models=["-"], quick_models=["-"], rounds=15)
    args.configs = common.split_list(args.configs) or (QUICK_CONFIGS if args.quick else CONFIGS)
    args.targets = common.split_list(args.targets) or (QUICK_TARGETS if args.quick else TARGETS)
    args.threads_list = args.threads_list or ([1] if args.quick else sorted({1, physical_cores()}))
    return args


# --------------------------------------------------------------------------- the independent check
def _session(model, x, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    session = ort.InferenceSession(export_onnx(model.eval(), (x,), ["x"]), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def _block(run, count: int) -> float:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def independent_ratio(original, merged, x, threads: int, rounds: int) -> dict:
    """Merged / original latency from fresh ONNX Runtime sessions timed in interleaved blocks."""
    first, second = _session(original, x, threads), _session(merged, x, threads)
    for run in (first, second):
        for _ in range(5):
            run()
    probe = _block(first, 3)
    count = int(min(40, max(5, 300.0 / max(probe, 1e-3))))  # about 0.3 s per block
    ratios, originals, merges = [], [], []
    for k in range(rounds):
        order = (first, second) if k % 2 == 0 else (second, first)
        timed = {id(run): _block(run, count) for run in order}
        originals.append(timed[id(first)])
        merges.append(timed[id(second)])
        ratios.append(merges[-1] / originals[-1])
    spread = float(np.percentile(ratios, 75) - np.percentile(ratios, 25)) / statistics.median(ratios)
    return {
        "ratio": statistics.median(ratios),
        "original_ms": statistics.median(originals),
        "merged_ms": statistics.median(merges),
        "ratio_iqr_rel": spread,
        "runs_per_block": count,
    }


# --------------------------------------------------------------------------- one row
def run_target(model, x, original, config: str, threads: int, target: str, args) -> dict:
    name = config.split("@")[0]
    row: dict = {"config": config, "model": name, "threads": threads, "target": target}
    cache = args.cache_dir / f"{config}-t{threads}"
    started = time.perf_counter()
    try:
        result = fxmerge.compress(
            model,
            x,
            target,
            backend="onnxruntime",
            threads=threads,
            importance="distortion",
            cache_dir=cache,
            progress=args.progress,
            tolerance=TOLERANCE,
        )
    except TargetUnreachable as error:
        row.update(status="unreachable", error=str(error), smallest=error.smallest)
        return row
    row["compress_s"] = time.perf_counter() - started
    report = result.report
    merged = result.merge()
    row["merge_rel_diff"] = common.relative_difference(result.model.eval(), merged, x)
    check = independent_ratio(original, merged, x, threads, args.rounds)
    asked = float(target.rstrip("%")) / 100
    stages = dict(report.stage_seconds)
    row.update(
        status="ok",
        asked=asked,
        first_predicted_ratio=report.rounds[0].predicted_ms / report.original_ms,
        loop_ratio=report.measured_ratio,
        independent=check,
        miss=check["ratio"] / asked - 1.0,
        met=abs(check["ratio"] / asked - 1.0) <= TOLERANCE,
        loop_met=report.target_met,
        rounds=len(report.rounds),
        loop_rounds=[r.__dict__ for r in report.rounds],
        stage_seconds=stages,
        loop_share=stages.get("solve and measure", 0.0) / row["compress_s"],
        convs=f"{report.convs_before}→{report.convs_after}",
        plan=list(result.plan.entries),
    )
    return row


def line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['config']:>20} t{r['threads']} {r['target']:>4}: {r['status']}: {r.get('error', '')}"
    return (
        f"{r['config']:>20} t{r['threads']} {r['target']:>4}: first predicted {r['first_predicted_ratio']:.1%}, "
        f"loop {r['loop_ratio']:.1%}, independent {r['independent']['ratio']:.1%} (miss {r['miss']:+.1%}), "
        f"{r['rounds']} solve(s), compress {r['compress_s']:.0f} s (loop {r['loop_share']:.0%})"
    )


def markdown(rows: list[dict], env: dict, args) -> str:
    header = [
        "model @ size",
        "threads",
        "asked",
        "predicted (1st solve)",
        "loop measured",
        "independent measured",
        "its spread (IQR)",
        "miss",
        "solves",
        "compress wall (loop share)",
        "convs",
    ]
    table = []
    for r in rows:
        if r["status"] != "ok":
            table.append([r["config"], r["threads"], r["target"], "–", "–", "unreachable", "–", "–", "–", "–", "–"])
            continue
        table.append(
            [
                r["config"],
                r["threads"],
                r["target"],
                f"{r['first_predicted_ratio']:.1%}",
                f"{r['loop_ratio']:.1%}",
                f"**{r['independent']['ratio']:.1%}**",
                f"{r['independent']['ratio_iqr_rel']:.1%}",
                f"{r['miss']:+.1%}",
                r["rounds"],
                f"{r['compress_s']:.0f} s ({r['loop_share']:.0%})",
                r["convs"],
            ]
        )
    ok = [r for r in rows if r["status"] == "ok"]
    met = sum(r["met"] for r in ok)
    return (
        "\n".join(
            [
                f"`{env['command']}` — onnxruntime CPU, batch 1, random weights, importance `distortion`, closed loop "
                f"(tolerance ±{TOLERANCE:.0%}); independent check: fresh ONNX Runtime sessions of the exported models, "
                f"spinning off, {args.rounds} interleaved block pairs; {env['cpu']}, {env['date'][:10]}, torch "
                f"{env['versions']['torch']}, onnxruntime {env['versions']['onnxruntime']}, load average at start "
                f"{env['load_average_at_start']}.",
                "",
                common.markdown_table(header, table),
                "",
                f"{met} of {len(ok)} rows within ±{TOLERANCE:.0%} of the asked ratio as measured independently.",
            ]
        )
        + "\n"
    )


def main(argv=None) -> int:
    args = parse(argv)
    env = common.environment(args)
    started = time.perf_counter()
    rows: list[dict] = []
    data = {"benchmark": "compress_zoo", "environment": env, "results": rows}
    for config in args.configs:
        name, size = config.split("@")
        model, x = common.load_model(name), common.example_input(int(size))
        original = common.folded(model)
        for threads in args.threads_list:
            torch.set_num_threads(threads)
            for target in args.targets:
                rows.append(run_target(model, x, original, config, threads, target, args))
                print(line(rows[-1]), flush=True)
                common.write_json(args.out, data)  # partial results survive an interruption
    data["wall_s"] = time.perf_counter() - started
    common.write_json(args.out, data)
    common.print_footer(args, env, markdown(rows, env, args), data["wall_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
