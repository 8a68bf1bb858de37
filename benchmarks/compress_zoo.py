"""Speed-ups of fxmerge.compress on torchvision models at several latency targets (issue #7).

For each model (random weights, 1×3×SIZE×SIZE) and each target (a fraction of the
original's measured latency), on the onnxruntime CPU backend:

1. ``fxmerge.compress(model, x, target, backend=..., importance="distortion")`` — the
   data-free estimator (no ``data=``: seeded random calibration inputs), which is what
   ``importance="auto"`` picks without data;
2. ``result.merge()``; its output is checked against the linearized model;
3. the merged model and the original, **both with BatchNorm folded**, are timed side by
   side (alternating rounds, fxmerge.demo.side_by_side), so only depth differs.

Every target of one model shares one cache root (``--cache-dir``): the latency table is
measured once, for the first target; later targets only re-measure the original end to
end (calibration) and read the rest from the cache. The script checks this by counting
the cached measurements before and after each ``compress`` call.

Writes benchmarks/results/compress_zoo.json and prints a markdown summary with the
LayerMerge paper's speed-ups beside ours (theirs: PyTorch on a GPU, ImageNet-trained
and fine-tuned; ours: ONNX Runtime on the CPU, random weights, before fine-tuning —
latency does not depend on the weights).

    python benchmarks/compress_zoo.py                        # full run (shared cache)
    python benchmarks/compress_zoo.py --fresh                # tables built from scratch
    python benchmarks/compress_zoo.py --quick                # smoke test, ~1–2 minutes
"""

from __future__ import annotations

import argparse
import time

import common
from tqdm.auto import tqdm

import fxmerge
from fxmerge.demo import side_by_side
from fxmerge.solver import InfeasibleBudget

MODELS = ["resnet34", "mobilenet_v2"]
QUICK_MODELS = ["resnet18"]  # fewest entries: the importance table dominates a smoke run
TARGETS = ["70%", "60%", "50%"]
QUICK_TARGETS = ["80%", "60%"]  # at 64×64 the fixed offset makes 50% infeasible
ROUNDS = 5
BACKEND = "onnxruntime"
IMPORTANCE = "distortion"  # data-free; importance="auto" without data= resolves to it

# LayerMerge (Kim et al., ICML 2024), speed-ups reported on PyTorch GPU, as given in issue #7.
PAPER = {
    ("resnet34", "70%"): "1.36× (at 71%)",
    ("resnet34", "60%"): "1.56×",
    ("resnet34", "50%"): "1.79×",
}
PAPER_RANGE = {"mobilenet_v2": "1.63×–2.49× (range over the paper's targets)"}


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser, rounds=ROUNDS)
    parser.add_argument("--targets", nargs="+", default=None,
                        help=f"latency targets, e.g. 70%% 60%% 50%% (default {_escaped(TARGETS)}; "
                             f"{_escaped(QUICK_TARGETS)} with --quick)")
    args = parser.parse_args(argv)
    args = common.finish_common_arguments(args, "compress_zoo", models=MODELS, quick_models=QUICK_MODELS,
                                          rounds=ROUNDS)
    args.targets = common.split_list(args.targets) or (QUICK_TARGETS if args.quick else TARGETS)
    return args


def _escaped(targets: list[str]) -> str:
    """Targets for an argparse help string (where ``%`` must be doubled)."""
    return " ".join(targets).replace("%", "%%")


def paper(model: str, target: str) -> str:
    return PAPER.get((model, target)) or PAPER_RANGE.get(model, "–")


def run_target(model, x, original_folded, name: str, target: str, backend, args) -> dict:
    latency_dir = args.cache_dir / "latency"
    cached_before = common.count_files(latency_dir)
    row: dict = {"model": name, "target": target, "paper_speedup": paper(name, target)}
    with common.Stopwatch() as t_compress:
        try:
            result = fxmerge.compress(
                model, x, target, backend=backend, importance=IMPORTANCE, cache_dir=args.cache_dir,
                progress=args.progress,
            )
        except InfeasibleBudget as error:
            result = None
            row.update(status="infeasible", error=str(error), min_latency_ms=error.min_latency_ms)
    row["compress_s"] = t_compress.seconds
    row["new_latency_measurements"] = common.count_files(latency_dir) - cached_before
    if result is None:
        return row
    report = result.report
    with common.Stopwatch() as t_merge:
        merged = result.merge()
    row["merge_rel_diff"] = common.relative_difference(result.model.eval(), merged, x)
    with common.Stopwatch() as t_measure:
        original_ms, merged_ms = side_by_side(original_folded, merged, x, backend, rounds=args.rounds)
    fraction = float(target.rstrip("%")) / 100 if target.endswith("%") else None
    row.update(
        status="ok",
        original_ms=report.original_ms,  # measured by compress (calibration), original model
        target_ms=report.target_ms,
        predicted_ms=report.predicted_ms,
        offset_ms=report.offset_ms,
        original_folded_measured_ms=original_ms,
        merged_measured_ms=merged_ms,
        measured_speedup=original_ms / merged_ms,
        predicted_speedup=report.original_ms / report.predicted_ms,
        measured_ratio=merged_ms / original_ms,
        target_fraction=fraction,
        meets_target=None if fraction is None else merged_ms / original_ms <= fraction,
        prediction_err_pct=(report.predicted_ms - merged_ms) / merged_ms * 100.0,
        convs_before=report.convs_before,
        convs_after=report.convs_after,
        activations_removed=report.activations_removed,
        merged_spans=sum(1 for c in report.chosen if c.units > 1),
        stage_seconds=dict(report.stage_seconds),
        merge_s=t_merge.seconds,
        measure_s=t_measure.seconds,
        plan=list(result.plan.entries),
        chosen=[c.__dict__ for c in report.chosen if c.units > 1 or c.option != "keep"],
    )
    return row


def line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['model']:>13} {r['target']:>4}: {r['status']}: {r.get('error', '')}"
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in r["stage_seconds"].items())
    return (
        f"{r['model']:>13} {r['target']:>4}: target {r['target_ms']:.2f} ms, predicted {r['predicted_ms']:.2f} ms, "
        f"merged {r['merged_measured_ms']:.2f} ms vs original {r['original_folded_measured_ms']:.2f} ms "
        f"→ {r['measured_speedup']:.2f}× (predicted {r['predicted_speedup']:.2f}×, error "
        f"{r['prediction_err_pct']:+.1f}%); convs {r['convs_before']}→{r['convs_after']}; "
        f"{r['new_latency_measurements']} new latency measurements; {stages}"
    )


def check_cache_reuse(rows: list[dict]) -> dict:
    """For every model, did only the first target pay for the latency table?"""
    verdicts = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        counts = [r["new_latency_measurements"] for r in rows if r["model"] == name]
        later = counts[1:]
        verdicts[name] = {
            "new_measurements_per_target": counts,
            "reused": bool(later) and all(c == 0 for c in later),
        }
    return verdicts


def markdown(rows: list[dict], args, env: dict, reuse: dict) -> str:
    header = ["model", "target", "target (ms)", "predicted (ms)", "merged, measured (ms)", "speed-up (measured)",
              "prediction error", "convs", "LayerMerge paper (GPU)"]
    table = []
    for r in rows:
        if r["status"] != "ok":
            table.append([r["model"], r["target"], "infeasible", common.fmt(r.get("min_latency_ms"), ".2f", " min"),
                          "–", "–", "–", "–", r["paper_speedup"]])
            continue
        table.append([
            r["model"], r["target"], f"{r['target_ms']:.2f}", f"{r['predicted_ms']:.2f}",
            f"{r['merged_measured_ms']:.2f} (original {r['original_folded_measured_ms']:.2f})",
            f"**{r['measured_speedup']:.2f}×**", f"{r['prediction_err_pct']:+.1f}%",
            f"{r['convs_before']}→{r['convs_after']}", r["paper_speedup"],
        ])
    stage_names = list(dict.fromkeys(k for r in rows if r["status"] == "ok" for k in r["stage_seconds"]))
    stages = [[r["model"], r["target"], *(f"{r['stage_seconds'].get(k, 0.0):.1f}" for k in stage_names),
               f"{r['merge_s']:.1f}", f"{r['measure_s']:.0f}", str(r["new_latency_measurements"])]
              for r in rows if r["status"] == "ok"]
    text = [
        "## compress on the model zoo (issue #7)",
        "",
        f"`{env['command']}` — onnxruntime CPU, 1×3×{args.size}×{args.size}, random weights, "
        f"{args.threads} thread(s), importance `{IMPORTANCE}` (data-free), no fine-tuning; merged vs original "
        f"with BatchNorm folded in both, {args.rounds} alternating rounds; {env['cpu']}, {env['date'][:10]}, "
        f"torch {env['versions']['torch']}, onnxruntime {env['versions']['onnxruntime']}.",
        "",
        common.markdown_table(header, table),
        "",
        "Prediction error: compress's predicted latency vs the merged model measured. The paper's speed-ups "
        "are PyTorch on a GPU with trained, fine-tuned networks; ours are ONNX Runtime on this CPU.",
        "",
        "Wall time per stage (s; `result.report.stage_seconds`, then merge and the side-by-side timing):",
        "",
        common.markdown_table(["model", "target", *stage_names, "merge", "timing", "new latency measurements"],
                              stages),
        "",
        "Latency table shared between targets: " + "; ".join(
            f"{name}: {'yes' if v['reused'] else 'NO'} (new measurements per target {v['new_measurements_per_target']})"
            for name, v in reuse.items()
        ) + ".",
    ]
    return "\n".join(text) + "\n"


def main(argv=None) -> int:
    args = parse(argv)
    env = common.environment(args)
    started = time.perf_counter()
    backend = common.make_backend(BACKEND, args)
    print(f"compress zoo: {', '.join(args.models)} at 1×3×{args.size}×{args.size}, targets {' '.join(args.targets)}, "
          f"{backend.name} {backend.version}, {backend.threads} thread(s), {args.rounds} rounds, "
          f"cache {args.cache_dir} ({args.cache_kind})")
    rows: list[dict] = []
    data = {"benchmark": "compress_zoo", "environment": env, "backend": backend.name,
            "backend_version": backend.version, "importance": IMPORTANCE, "results": rows}
    with tqdm(total=len(args.models) * len(args.targets), unit="target", disable=not args.progress) as bar:
        for name in args.models:
            model = common.load_model(name)
            x = common.example_input(args.size)
            original_folded = common.folded(model)
            for target in args.targets:
                bar.set_description(f"{name} {target}")
                rows.append(run_target(model, x, original_folded, name, target, backend, args))
                tqdm.write(line(rows[-1]))
                bar.update()
                common.write_json(args.out, data)  # partial results survive an interruption
    reuse = check_cache_reuse(rows)
    data["latency_cache_reuse"] = reuse
    data["wall_s"] = time.perf_counter() - started
    common.write_json(args.out, data)
    for name, verdict in reuse.items():
        counts = verdict["new_measurements_per_target"]
        state = "reused by later targets" if verdict["reused"] else "NOT reused (later targets measured convs)"
        print(f"latency table, {name}: {state}; new measurements per target: {counts}")
    common.print_footer(args, env, markdown(rows, args, env, reuse), data["wall_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
