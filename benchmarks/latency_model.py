"""How well does the calibrated latency table predict a merged model's latency? (issue #5)

For each model (random weights, 1×3×SIZE×SIZE) and each CPU backend (onnxruntime,
eager):

1. ``fxmerge.analyze`` → span graph; ``build_latency_table`` times every distinct conv
   (wall time recorded: the issue asks for the resnet34 onnxruntime build at 224,
   batch 1, in under 10 minutes);
2. ``calibrate`` twice: once on the original with BatchNorm folded, which is what the
   keep-all plan merges into and what ``fxmerge.compress`` calibrates on, and once on the
   unfolded original, to show what that choice is worth (on eager an unfolded
   BatchNorm costs time; onnxruntime folds it on export);
3. draws ``--plans`` random valid plans (``Plan.random(sg, seed=k)``) plus the keep-all
   plan; for each, ``merge(linearize(...))`` and times the merged model against the
   BatchNorm-folded original side by side (alternating rounds, fxmerge.latency.compare.side_by_side);
4. compares ``table.predict(plan.entries)`` (which already adds the calibrated
   offset) with the measured merged latency.

Three errors per plan:
  * ``err_folded`` prediction calibrated on the BatchNorm-folded original (as compress
                   does) vs measured: the headline number;
  * ``err``        prediction calibrated on the unfolded original vs measured;
  * ``ratio_err``  predicted merged/original ratio (folded calibration) vs the ratio
                   measured side by side: insensitive to the machine's speed drifting
                   between the calibration and the plan's measurement.

Writes benchmarks/results/latency_model.json and prints a markdown summary.

    python benchmarks/latency_model.py                       # full run (shared cache)
    python benchmarks/latency_model.py --fresh               # honest table build times
    python benchmarks/latency_model.py --quick               # smoke test, ~1 minute
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
from tqdm.auto import tqdm

import fxmerge
from fxmerge.latency import build_latency_table, calibrate
from fxmerge.latency.compare import side_by_side

MODELS = ["resnet18", "resnet34", "mobilenet_v2", "regnet_x_400mf"]
QUICK_MODELS = ["resnet18"]
BACKENDS = ["onnxruntime", "eager"]
ROUNDS = 3
ISSUE_LIMIT_S = 600.0  # issue #5: resnet34 onnxruntime table at 224, batch 1, under 10 minutes


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser, rounds=ROUNDS)
    parser.add_argument("--plans", type=int, default=None, help="random plans per model (default 5; 1 with --quick)")
    parser.add_argument("--backends", nargs="+", default=None, help=f"default: {' '.join(BACKENDS)}")
    args = parser.parse_args(argv)
    args = common.finish_common_arguments(
        args, "latency_model", models=MODELS, quick_models=QUICK_MODELS, rounds=ROUNDS
    )
    if args.plans is None:
        args.plans = 1 if args.quick else 5
    args.backends = common.split_list(args.backends) or BACKENDS
    return args


def plans_of(sg, count: int) -> list:
    return [fxmerge.Plan.keep_all(sg)] + [fxmerge.Plan.random(sg, seed=seed) for seed in range(count)]


def describe(plan, sg) -> dict:
    chosen = plan.chosen(sg)
    return {
        "plan": plan.method,
        "entries": len(plan.entries),
        "merged_spans": sum(1 for e in chosen if len(sg.span(e.span).units) > 1),
        "pruned_convs": len(plan.pruned_units(sg)),
        "activations_removed": sum(len(sg.span(e.span).dropped_activations) for e in chosen),
        "largest_kernel": max((max(e.conv.kernel_size) for e in chosen), default=0),
    }


def percent(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured * 100.0


def run_model(name: str, args: argparse.Namespace, bar: tqdm) -> list[dict]:
    model = common.load_model(name)
    x = common.example_input(args.size)
    with common.Stopwatch() as t_analyze:
        sg = fxmerge.analyze(model, x)
    plans = plans_of(sg, args.plans)
    original_folded = common.folded(model)

    # Build every merged model once; both backends time the same modules.
    merged, built = [], []
    with common.Stopwatch() as t_build:
        for plan in plans:
            linear = fxmerge.linearize(model, x, plan, span_graph=sg).eval()
            m = fxmerge.merge(linear)
            merged.append(m)
            built.append({**describe(plan, sg), "merge_rel_diff": common.relative_difference(linear, m, x)})

    results = []
    for backend_name in args.backends:
        bar.set_description(f"{name} / {backend_name}")
        backend = common.make_backend(backend_name, args)
        cache = args.cache_dir / "latency"
        with common.Stopwatch() as t_table:
            table = build_latency_table(sg, backend, cache_dir=cache, progress=args.progress)
        keep_all = plans[0].entries
        with common.Stopwatch() as t_calibrate:
            as_compress = calibrate(table, model, x, keep_all, backend)
            on_folded = calibrate(table, original_folded, x, keep_all, backend)
        rows = []
        started = time.perf_counter()
        for plan, module, info in zip(plans, merged, built):
            original_ms, merged_ms = side_by_side(original_folded, module, x, backend, rounds=args.rounds)
            predicted = as_compress.predict(plan.entries)
            predicted_folded = on_folded.predict(plan.entries)
            predicted_ratio = predicted_folded / on_folded.original_ms
            measured_ratio = merged_ms / original_ms
            rows.append(
                {
                    **info,
                    "entries_ms": predicted - as_compress.offset_ms,
                    "predicted_ms": predicted,
                    "predicted_folded_ms": predicted_folded,
                    "measured_ms": merged_ms,
                    "original_folded_measured_ms": original_ms,
                    "err_pct": percent(predicted, merged_ms),
                    "err_folded_pct": percent(predicted_folded, merged_ms),
                    "predicted_ratio": predicted_ratio,
                    "measured_ratio": measured_ratio,
                    "ratio_err_pct": percent(predicted_ratio, measured_ratio),
                }
            )
            bar.update()
        measure_s = time.perf_counter() - started
        results.append(
            summarise(
                name,
                backend,
                sg,
                table,
                as_compress,
                on_folded,
                rows,
                {
                    "analyze_s": t_analyze.seconds,
                    "linearize_merge_s": t_build.seconds,
                    "table_build_s": t_table.seconds,
                    "calibrate_s": t_calibrate.seconds,
                    "plan_measurements_s": measure_s,
                },
            )
        )
        tqdm.write(line(results[-1]))
    return results


def summarise(name, backend, sg, table, as_compress, on_folded, rows, seconds) -> dict:
    def stats(key: str) -> dict:
        values = [abs(r[key]) for r in rows]
        random_only = [abs(r[key]) for r in rows if r["plan"] != "keep_all"]
        return {
            "mean_abs": statistics.fmean(values),
            "worst_abs": max(values),
            "random_plans_mean_abs": statistics.fmean(random_only) if random_only else None,
        }

    return {
        "model": name,
        "backend": backend.name,
        "backend_version": backend.version,
        "threads": backend.threads,
        "positions": len(sg.positions),
        "spans": len(sg.spans),
        "table_entries": len(table.entries),
        "distinct_measurements": table.measurements,
        "dedup_ratio": len(table.entries) / max(table.measurements, 1),
        "measured": table.info.get("measured"),
        "cached": table.info.get("cached"),
        "offset_ms": as_compress.offset_ms,
        "offset_folded_ms": on_folded.offset_ms,
        "original_ms": as_compress.original_ms,
        "original_folded_ms": on_folded.original_ms,
        "keep_all_convs_ms": as_compress.info["calibration"]["keep_all_convs_ms"],
        "err_pct": stats("err_pct"),
        "err_folded_pct": stats("err_folded_pct"),
        "ratio_err_pct": stats("ratio_err_pct"),
        "seconds": seconds,
        "plans": rows,
    }


def line(r: dict) -> str:
    return (
        f"{r['model']:>15} {r['backend']:>11}: {r['table_entries']} entries / {r['distinct_measurements']} convs "
        f"({r['dedup_ratio']:.1f}×), table {r['seconds']['table_build_s']:.1f} s "
        f"({r['measured']} measured, {r['cached']} cached); |err| mean {r['err_pct']['mean_abs']:.1f}% "
        f"worst {r['err_pct']['worst_abs']:.1f}%; folded calibration mean {r['err_folded_pct']['mean_abs']:.1f}% "
        f"worst {r['err_folded_pct']['worst_abs']:.1f}%; ratio mean {r['ratio_err_pct']['mean_abs']:.1f}% "
        f"worst {r['ratio_err_pct']['worst_abs']:.1f}%"
    )


def issue_check(results: list[dict], size: int) -> dict | None:
    """The resnet34 onnxruntime table build time (issue #5 limit: 10 minutes at 224, batch 1)."""
    for r in results:
        if r["model"] == "resnet34" and r["backend"] == "onnxruntime":
            seconds = r["seconds"]["table_build_s"]
            honest = r["cached"] == 0
            if not honest:
                verdict = f"not a from-scratch build ({r['cached']} of {r['distinct_measurements']} convs cached): rerun with --fresh"
            elif size != 224:
                verdict = f"built at {size}×{size}, the issue's limit is for 224×224"
            else:
                verdict = "PASS (under 10 minutes)" if seconds < ISSUE_LIMIT_S else "FAIL (10 minutes or more)"
            return {
                "seconds": seconds,
                "measured": r["measured"],
                "cached": r["cached"],
                "size": size,
                "threads": r["threads"],
                "verdict": verdict,
            }
    return None


def markdown(results: list[dict], args, env: dict, check: dict | None) -> str:
    header = [
        "model",
        "backend",
        "entries / distinct convs",
        "table build",
        "offset (ms)",
        f"\\|err\\| mean / worst ({args.plans + 1} plans)",
        "folded calibration",
        "ratio \\|err\\|",
    ]
    rows = []
    for r in results:
        rows.append(
            [
                r["model"],
                r["backend"],
                f"{r['table_entries']} / {r['distinct_measurements']} ({r['dedup_ratio']:.1f}×)",
                f"{r['seconds']['table_build_s']:.0f} s" + ("" if r["cached"] == 0 else f" ({r['cached']} cached)"),
                f"{r['offset_ms']:.2f}",
                f"{r['err_pct']['mean_abs']:.1f}% / {r['err_pct']['worst_abs']:.1f}%",
                f"{r['err_folded_pct']['mean_abs']:.1f}% / {r['err_folded_pct']['worst_abs']:.1f}%",
                f"{r['ratio_err_pct']['mean_abs']:.1f}% / {r['ratio_err_pct']['worst_abs']:.1f}%",
            ]
        )
    text = [
        "## Latency model (issue #5)",
        "",
        f"`{env['command']}` — 1×3×{args.size}×{args.size}, random weights, {args.threads} thread(s), "
        f"keep-all + {args.plans} random plans (`Plan.random(sg, seed=k)`) per model, each merged model "
        f"timed against the BatchNorm-folded original in {args.rounds} alternating rounds; "
        f"{env['cpu']}, {env['date'][:10]}, torch {env['versions']['torch']}, "
        f"onnxruntime {env['versions']['onnxruntime']}.",
        "",
        common.markdown_table(header, rows),
        "",
        "Errors are absolute, over the keep-all and random plans. \\|err\\|: `table.predict(plan.entries)` "
        "with the offset from calibrating on the unfolded original, vs the merged model measured. "
        "Folded calibration (what `compress` does): offset from the BatchNorm-folded original. "
        "Ratio: predicted vs measured merged/original ratio (side by side, immune to drift).",
    ]
    if check is not None:
        text += [
            "",
            f"resnet34 onnxruntime latency table build: **{check['seconds']:.0f} s** "
            f"({check['measured']} convs measured, {check['threads']} thread(s)) — {check['verdict']}.",
        ]
    return "\n".join(text) + "\n"


def main(argv=None) -> int:
    args = parse(argv)
    env = common.environment(args)
    started = time.perf_counter()
    print(
        f"latency model: {', '.join(args.models)} × {', '.join(args.backends)} at 1×3×{args.size}×{args.size}, "
        f"{args.plans} random plans + keep-all, {args.rounds} rounds, {args.threads} thread(s), "
        f"cache {args.cache_dir} ({args.cache_kind})"
    )
    total = len(args.models) * len(args.backends) * (args.plans + 1)
    results: list[dict] = []
    data = {"benchmark": "latency_model", "environment": env, "results": results}
    with tqdm(total=total, unit="plan", disable=not args.progress) as bar:
        for name in args.models:
            results.extend(run_model(name, args, bar))
            common.write_json(args.out, data)  # partial results survive an interruption
    check = issue_check(results, args.size)
    data["resnet34_onnxruntime_table"] = check
    data["wall_s"] = time.perf_counter() - started
    common.write_json(args.out, data)
    if check is not None:
        print("\n" + "=" * 78)
        print(
            f"resnet34 onnxruntime latency table build: {check['seconds']:.1f} s "
            f"({check['seconds'] / 60:.1f} min; {check['measured']} measured, {check['cached']} cached, "
            f"{check['size']}×{check['size']}, {check['threads']} thread(s)) — {check['verdict']}"
        )
        print("=" * 78)
    common.print_footer(args, env, markdown(results, args, env, check), data["wall_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
