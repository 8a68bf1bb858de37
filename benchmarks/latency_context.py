"""Why plans are mispredicted, and whether a per-conv context cost fixes it (issue #12, part 3).

For each model configuration, on onnxruntime CPU (1 thread by default):

1. the latency table (every entry timed alone, the standalone overhead removed) is
   calibrated on the BatchNorm-folded original, as ``compress`` does;
2. a set of plans — the solver's at 70/60/50% of the original, and random plans — is
   merged and each is timed side by side with the original (interleaved blocks,
   ``fxmerge.latency.compare.Comparator``), giving its measured ratio;
3. for every plan, the table's *saving* (the entries of the convs it removes or merges,
   minus the entries it adds) is compared with the saving measured; divided by the
   number of convs the plan removes, the difference is the cost each conv adds inside
   the model beyond its entry (``β``). If ``β`` is the same for every plan, a constant
   per-conv context cost explains the misprediction;
4. the table is corrected with ``β`` fitted on one plan (the solver's 70% plan, as the
   closed loop does with its first plan) and every other plan is predicted again.

Each configuration is analysed with the table timed hot (weights in the caches) and
cold (caches flushed before every timed run; ``build_latency_table(weights=...)``).

    python benchmarks/latency_context.py                       # resnet18@64, mobilenet_v2@224
    python benchmarks/latency_context.py --configs resnet18@64 --random 2 --quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
import torch

import fxmerge
from fxmerge.api import analyze_captured
from fxmerge.capture import capture
from fxmerge.importance import build_importance_table
from fxmerge.latency import build_latency_table, calibrate, get_backend
from fxmerge.latency.compare import Comparator
from fxmerge.latency.table import context_corrected
from fxmerge.loop import Measured
from fxmerge.passes.linearize import linearize
from fxmerge.plan import Plan
from fxmerge.solver import plan_latency, solve_down_to_fastest

CONFIGS = ["resnet18@64", "mobilenet_v2@224"]


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser, rounds=6)
    parser.add_argument("--configs", nargs="+", default=None, help="MODEL@SIZE (default: resnet18@64 mobilenet_v2@224)")
    parser.add_argument("--random", type=int, default=4, help="random plans per model (default 4)")
    parser.add_argument(
        "--weights",
        nargs="+",
        choices=["auto", "cold", "hot"],
        default=["hot", "cold"],
        help="conv timing modes of the table, each analysed in turn (default: hot cold)",
    )
    args = parser.parse_args(argv)
    args = common.finish_common_arguments(args, "latency_context", models=["-"], quick_models=["-"], rounds=6)
    args.configs = common.split_list(args.configs) or (CONFIGS[:1] if args.quick else CONFIGS)
    return args


def plans_of(span_graph, table, scores, random_plans: int) -> list[tuple[str, Plan]]:
    original = float(table.original_ms)
    plans = [
        (f"solver {p:.0%}", solve_down_to_fastest(span_graph, table, scores, p * original)) for p in (0.7, 0.6, 0.5)
    ]
    plans += [(f"random {k}", Plan.random(span_graph, seed=k)) for k in range(random_plans)]
    return plans


def saving(table, keep_all, plan: Plan) -> float:
    return sum(table.entries[e] for e in keep_all) - sum(table.entries[e] for e in plan.entries)


def measure_plans(captured, span_graph, plans, comparator) -> list[dict]:
    rows = []
    for label, plan in plans:
        merged = fxmerge.merge(linearize(captured, span_graph, plan, share_parameters=True))
        result = comparator.compare(merged)
        rows.append(
            {
                "plan": label,
                "entries": list(plan.entries),
                "convs": len(plan.entries),
                "measured_ratio": result.ratio,
                "rel_error": result.rel_error,
                "measured": Measured(result.reference_ms, result.candidate_ms, result.ratio, result.rel_error),
            }
        )
    return rows


def analyse(config: str, weights: str, args) -> dict:
    name, size = config.split("@")
    model, x = common.load_model(name), common.example_input(int(size))
    captured = capture(model, x)
    span_graph = analyze_captured(captured)
    backend = get_backend("onnxruntime", threads=args.threads)
    folded = fxmerge.merge(captured.gm)
    table = build_latency_table(
        span_graph, backend, cache_dir=args.cache_dir / "latency", progress=args.progress, weights=weights
    )
    keep_all = Plan.keep_all(span_graph).entries
    table = calibrate(table, folded, x, keep_all, backend)
    scores = build_importance_table(
        captured, span_graph, "distortion", cache_dir=args.cache_dir / "importance", progress=args.progress
    )
    comparator = Comparator(folded, x, backend, min_rounds=args.rounds, max_rounds=args.rounds + 4)
    rows = measure_plans(captured, span_graph, plans_of(span_graph, table, scores, args.random), comparator)
    original = float(table.original_ms)
    for row in rows:
        plan = Plan.from_entries(span_graph, row["entries"])
        removed = len(keep_all) - row["convs"]
        row["predicted_ratio"] = plan_latency(plan, table) / original
        row["table_saving_ms"] = saving(table, keep_all, plan)
        row["measured_saving_ms"] = (1 - row["measured_ratio"]) * original
        row["beta_ms"] = (row["measured_saving_ms"] - row["table_saving_ms"]) / removed if removed else None
    fit = next(r for r in rows if r["plan"] == "solver 70%")
    corrected = context_corrected(table, keep_all, [(fit["entries"], fit["measured"].ratio)])
    for row in rows:
        row["corrected_ratio"] = plan_latency(Plan.from_entries(span_graph, row["entries"]), corrected) / original
        del row["measured"]
    return {
        "config": config,
        "weights": table.info["weights"],
        "keep_all_convs": len(keep_all),
        "original_ms": original,
        "offset_ms": table.offset_ms,
        "entries_sum_ms": sum(table.entries[e] for e in keep_all),
        "beta_fitted_ms": corrected.info["context_cost"]["per_entry_ms"],
        "plans": rows,
    }


def _error(predicted: float, measured: float) -> float:
    return predicted / measured - 1.0


def markdown(results: list[dict], env: dict) -> str:
    lines = [
        f"`{env['command']}` — onnxruntime CPU, batch 1, {env['cpu']}, {env['date'][:10]}, load average at start "
        f"{env['load_average_at_start']}.",
        "",
    ]
    header = [
        "plan",
        "convs",
        "measured ratio",
        "predicted (table)",
        "error",
        "β from this plan (µs/conv)",
        "predicted (corrected, β fitted on solver 70%)",
        "error",
    ]
    for result in results:
        lines += [
            f"**{result['config']}** (table {result.get('weights', 'hot')}): {result['keep_all_convs']} convs, original {result['original_ms']:.3f} ms, "
            f"entries sum {result['entries_sum_ms']:.3f} ms, offset {result['offset_ms']:.3f} ms, fitted β "
            f"{result['beta_fitted_ms'] * 1e3:+.1f} µs per conv.",
            "",
        ]
        rows = [
            [
                r["plan"],
                r["convs"],
                f"{r['measured_ratio']:.1%}",
                f"{r['predicted_ratio']:.1%}",
                f"{_error(r['predicted_ratio'], r['measured_ratio']):+.1%}",
                "–" if r["beta_ms"] is None else f"{r['beta_ms'] * 1e3:+.1f}",
                f"{r['corrected_ratio']:.1%}",
                f"{_error(r['corrected_ratio'], r['measured_ratio']):+.1%}",
            ]
            for r in result["plans"]
        ]
        lines += [common.markdown_table(header, rows), ""]
        others = [r for r in result["plans"] if r["plan"] != "solver 70%"]
        before = statistics.mean(abs(_error(r["predicted_ratio"], r["measured_ratio"])) for r in others)
        after = statistics.mean(abs(_error(r["corrected_ratio"], r["measured_ratio"])) for r in others)
        lines += [f"Mean |error| over the other plans: {before:.1%} with the table, {after:.1%} corrected.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    env = common.environment(args)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    results = []
    for config in args.configs:
        for weights in args.weights:
            results.append(analyse(config, weights, args))
        common.write_json(args.out, {"benchmark": "latency_context", "environment": env, "results": results})
        print(markdown(results[-1:], env), flush=True)
    common.print_footer(args, env, markdown(results, env), time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
