"""LayerMerge's Tables 1–2 in miniature: test accuracy against measured speed-up on trained networks (issue #14).

On *cluttered shapes* (``paper_mini_data.py``: a seeded, generated 32×32 colour
10-class task) a ResNet-style and a MobileNetV2-style network are trained and
cached (``paper_mini_models.py``). Each is compressed with ``fxmerge.compress`` by
three methods — ``layermerge`` (activations and convs), ``depth`` (activations only,
Kim et al. 2023), ``layer`` (whole convs only) — at three latency targets, all with
the paper's importance estimator (one switch: :data:`IMPORTANCE`) on disjoint
holdout-train / holdout-val splits and the closed latency loop on onnxruntime CPU.
Every compressed model gets the same fine-tuning budget (SGD, cosine, distillation
from the original plus the labels) under three seeds, is merged exactly, and is
scored on the test split. Its speed-up over the original (BatchNorm folded in both)
is measured independently of fxmerge's timers (``paper_mini_report.measure_speedup``:
ONNX exports, fresh ONNX Runtime sessions, interleaved blocks, spinning off).

Writes ``benchmarks/results/paper_mini.json`` and ``paper_mini.png`` (accuracy against
measured speed-up, one line per method) and prints a markdown table for RESULTS.md.

    python benchmarks/paper_mini.py             # the full benchmark (≤ 60 min on 2 cores, 1 thread)
    python benchmarks/paper_mini.py --quick     # smoke test: one model, one target, one seed; temporary output
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import common
import paper_mini_data as data_mod
import paper_mini_models as models
import paper_mini_report as report
import torch

import fxmerge
from fxmerge.api import TargetUnreachable
from fxmerge.importance import ESTIMATORS
from fxmerge.solver import InfeasibleBudget
from fxmerge.train import finetune

# The paper's importance estimator; "finetune" (fxmerge's cheaper variant) where "paper" is not available.
IMPORTANCE = "paper" if "paper" in ESTIMATORS else "finetune"
METHODS = ("layermerge", "depth", "layer")
MODELS = ["resnet", "mobilenetv2"]
QUICK_MODELS = ["resnet"]
MODEL_CACHE = common.REPO / ".fxmerge-cache" / "paper_mini"
BACKEND = "onnxruntime"
SIZE = 32
ROUNDS = 10


@dataclass(frozen=True)
class Settings:
    sizes: dict[str, int]  # samples per split
    train: models.TrainConfig
    targets: dict[str, tuple[str, ...]]  # per model
    seeds: tuple[int, ...]  # fine-tuning seeds
    finetune_samples: int  # the fine-tuning budget: one epoch over this many training samples
    finetune_lr: float = 0.005  # chosen by paper_mini_pilot.py on the validation split (RESULTS.md)
    finetune_batch: int = 64
    holdout_batch: int = 32  # importance: one epoch over holdout-train at this batch size
    importance_lr: float = 0.02
    max_kernel: int = 7
    rules: str = "general"
    data_seed: int = 0
    train_threads: int = os.cpu_count() or 1  # torch threads while fine-tuning (the timing uses --threads)


FULL = Settings(
    sizes={"train": 10000, "holdout_train": 500, "holdout_val": 500, "val": 2000, "test": 2000},
    train=models.TrainConfig(epochs=8),
    # three targets every method reaches (above each model's slowest method floor, measured: depth on the
    # ResNet ≈ 91%, layer on the MobileNetV2 ≈ 88%), then one beyond that range
    targets={"resnet": ("98%", "95%", "92%", "80%"), "mobilenetv2": ("97%", "93%", "89%", "70%")},
    seeds=(0, 1, 2),
    finetune_samples=8000,
)
QUICK = Settings(
    sizes={"train": 1000, "holdout_train": 100, "holdout_val": 100, "val": 500, "test": 500},
    train=models.TrainConfig(epochs=2),
    targets={"resnet": ("95%",), "mobilenetv2": ("95%",)},
    seeds=(0,),
    finetune_samples=256,
    max_kernel=5,
)


# --------------------------------------------------------------------------- arguments
def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser, rounds=ROUNDS)
    parser.add_argument(
        "--targets",
        nargs="+",
        default=None,
        help="latency targets for every model, e.g. 90%% 80%% (default: per model, see FULL)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds (default 3; 1 with --quick)")
    parser.add_argument(
        "--importance",
        choices=("paper", "finetune"),
        default=IMPORTANCE,
        help=f"importance estimator (default {IMPORTANCE})",
    )
    parser.add_argument(
        "--model-cache",
        type=Path,
        default=None,
        help=f"trained models and rendered data (default {MODEL_CACHE}; temporary with --quick)",
    )
    args = parser.parse_args(argv)
    if args.size not in (None, SIZE):
        raise SystemExit(f"the networks take {SIZE}×{SIZE} inputs; leave out --size")
    args = common.finish_common_arguments(args, "paper_mini", models=MODELS, quick_models=QUICK_MODELS, rounds=ROUNDS)
    args.size = SIZE
    unknown = sorted(set(args.models) - set(models.ARCHITECTURES))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {sorted(models.ARCHITECTURES)}")
    settings = QUICK if args.quick else FULL
    targets = common.split_list(args.targets)
    if targets:
        settings = replace(settings, targets={name: tuple(targets) for name in models.ARCHITECTURES})
    if args.seeds is not None:
        settings = replace(settings, seeds=tuple(range(args.seeds)))
    args.settings = settings
    if args.model_cache is None:
        args.model_cache = (args.out.parent / "models") if args.quick else MODEL_CACHE
    return args


# --------------------------------------------------------------------------- the original and its facts
def activation_count(span_graph) -> int:
    return sum(1 for p in span_graph.positions if p.activation is not None)


def half_depth_plans(span_graph, count: int = 5) -> list:
    """``count`` depth-only plans (no conv pruned) that each remove half the activations, rounded up.

    ``fxmerge.solve`` with each entry's latency its number of removed activations, a
    budget of that half, and as importance the same count plus a little seeded noise:
    the most activations within the budget (exactly half where a plan can), a
    different plan per seed.
    """
    total = activation_count(span_graph)
    half = -(-total // 2)
    dropped = {e.id: float(len(span_graph.span(e.span).dropped_activations)) for e in span_graph.entries}
    plans = []
    for seed in range(4 * count):
        rng = random.Random(seed)
        importance = {entry: value + 0.01 * rng.random() for entry, value in dropped.items()}
        plan = fxmerge.solve(span_graph, dropped, importance, half + 0.5, method="depth")
        removed = {a for e in plan.chosen(span_graph) for a in span_graph.span(e.span).dropped_activations}
        if plan.entries not in {p.entries for p, _ in plans}:
            plans.append((plan, len(removed)))
        if len(plans) == count:
            break
    return plans


def original_facts(model, folded, data, example, settings: Settings) -> dict:
    """Validation and test accuracy; the validation accuracy with half the activations removed, not fine-tuned."""
    val = models.accuracy(model, data.images["val"], data.labels["val"])
    test = models.accuracy(folded, data.images["test"], data.labels["test"])
    span_graph = fxmerge.analyze(model, example, rules=settings.rules, max_kernel=settings.max_kernel)
    probes = []
    for plan, removed in half_depth_plans(span_graph):
        linear = fxmerge.linearize(model, example, plan, span_graph=span_graph).eval()
        probes.append(
            {
                "activations_removed": removed,
                "val_accuracy": models.accuracy(linear, data.images["val"], data.labels["val"]),
            }
        )
    half = statistics.mean(p["val_accuracy"] for p in probes) if probes else None
    return {
        "val_accuracy": val,
        "test_accuracy": test,
        "convs": len(span_graph.units),
        "activations": activation_count(span_graph),
        "half_activations_probes": probes,
        "half_activations_val_accuracy": half,
        "half_activations_drop_points": None if half is None else 100 * (val - half),
    }


def print_facts(name: str, facts: dict) -> None:
    val, drop = 100 * facts["val_accuracy"], facts["half_activations_drop_points"]
    asked = f" (asked of the ResNet: 80–95%, {'met' if 80 <= val <= 95 else 'NOT met'})" if name == "resnet" else ""
    print(f"{name}: validation accuracy {val:.1f}%{asked}; test accuracy {100 * facts['test_accuracy']:.1f}%")
    if drop is None:
        print(f"{name}: no depth-only plan removes half of the activations")
        return
    removed = sorted({p["activations_removed"] for p in facts["half_activations_probes"]})
    print(
        f"{name}: removing half the activations ({'/'.join(map(str, removed))} of {facts['activations']}, "
        f"{len(facts['half_activations_probes'])} depth-only plans), no fine-tuning: validation accuracy "
        f"{100 * facts['half_activations_val_accuracy']:.1f}%, {drop:.1f} points lost "
        f"(asked: ≥ 20, {'met' if drop >= 20 else 'NOT met'})"
    )


# --------------------------------------------------------------------------- one (model, method, target)
def importance_options(name: str, data, settings: Settings) -> dict:
    """``importance=`` and its options: the paper's estimator on holdout-train / holdout-val."""
    holdout_train = models.batches(data.images["holdout_train"], data.labels["holdout_train"], settings.holdout_batch)
    holdout_val = models.batches(data.images["holdout_val"], data.labels["holdout_val"], 250)
    common_options = {"data": holdout_train, "eval_data": holdout_val, "lr": settings.importance_lr, "seed": 0}
    if name == "paper":
        return {"importance": "paper", "epochs": 1, **common_options}
    return {"importance": "finetune", "steps": len(holdout_train), **common_options}


def finetune_batches(data, settings: Settings, seed: int) -> list:
    """The fine-tuning budget under ``seed``: a seeded sample of the training split, shuffled and augmented."""
    generator = torch.Generator().manual_seed(1000 + seed)
    pick = torch.randperm(len(data.labels["train"]), generator=generator)[: settings.finetune_samples]
    images, labels = data.images["train"][pick], data.labels["train"][pick]
    return [(models.augment(x, generator), y) for x, y in models.batches(images, labels, settings.finetune_batch)]


@contextlib.contextmanager
def torch_threads(count: int):
    """Torch runs on ``count`` threads inside the block (fine-tuning), and as before after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def finetune_seeds(result, teacher, data, settings: Settings) -> tuple[list[float], object, float]:
    """Fine-tune a copy of ``result.model`` per seed, merge, test; (accuracies, seed-0 merged model, worst error)."""
    accuracies, first, worst = [], None, 0.0
    for seed in settings.seeds:
        torch.manual_seed(seed)
        random.seed(seed)
        linear = copy.deepcopy(result.model)
        with torch_threads(settings.train_threads):
            finetune(
                linear,
                finetune_batches(data, settings, seed),
                epochs=1,
                lr=settings.finetune_lr,
                teacher=teacher,
                progress=False,
            )
        merged = fxmerge.merge(linear.eval(), result.plan)
        worst = max(worst, common.relative_difference(linear, merged, data.images["test"][:64]))
        accuracies.append(models.accuracy(merged, data.images["test"], data.labels["test"]))
        first = first if first is not None else merged
    return accuracies, first, worst


def compress(model, example, method: str, target: str, data, args, settings: Settings):
    return fxmerge.compress(
        model,
        example,
        target,
        method=method,
        backend=BACKEND,
        threads=args.threads,
        rules=settings.rules,
        max_kernel=settings.max_kernel,
        cache_dir=args.cache_dir,
        progress=args.progress,
        **importance_options(args.importance, data, settings),
    )


def add_stages(phases: dict, rep) -> None:
    """Add a report's stage times (analyze, latency table, importance table, ...) to ``phases``."""
    for stage, seconds in rep.stage_seconds:
        phases[f"compress: {stage}"] = phases.get(f"compress: {stage}", 0.0) + seconds


def fastest(model, example, data, args, settings: Settings, phases: dict) -> dict:
    """Per method, the measured ratio of the fastest plan the closed loop can build (a target of 1%)."""
    floors = {}
    for k, method in enumerate(METHODS):
        started = time.perf_counter()
        try:
            floors[method] = compress(model, example, method, "1%", data, args, settings).report.measured_ratio
        except TargetUnreachable as exc:
            floors[method] = exc.smallest
        phase = "first compress (latency and importance tables, then its loop)" if k == 0 else "fastest-plan probes"
        phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - started
    print(
        "fastest plan, measured: "
        + ", ".join(f"{m} {r:.1%} of the original ({1 / r:.2f}×)" for m, r in floors.items()),
        flush=True,
    )
    return floors


@dataclass
class ModelRun:
    """What every cell of one model shares."""

    model: torch.nn.Module
    folded: torch.nn.Module  # the original with BatchNorm folded: the speed-up reference
    example: torch.Tensor
    data: data_mod.Splits
    args: argparse.Namespace
    phases: dict
    tuned: dict = field(default_factory=dict)  # plan entries -> fine-tuning outcome (identical plans reuse it)


def fine_tuned(run: ModelRun, result, label: str) -> dict:
    """Test accuracy before and after fine-tuning ``result``'s plan, computed once per distinct plan."""
    if result.plan.entries in run.tuned:
        return {**run.tuned[result.plan.entries], "reused": True}
    data, settings = run.data, run.args.settings
    with common.Stopwatch() as clock:
        before = models.accuracy(result.merge(), data.images["test"], data.labels["test"])
        accuracies, merged, error = finetune_seeds(result, run.model, data, settings)
    run.phases["fine-tune and test"] += clock.seconds
    run.tuned[result.plan.entries] = {
        "before": before,
        "accuracies": accuracies,
        "merged": merged,
        "error": error,
        "first": label,
        "reused": False,
    }
    return run.tuned[result.plan.entries]


def run_cell(run: ModelRun, method: str, target: str) -> dict:
    cell, args = {"method": method, "target": target}, run.args
    started = time.perf_counter()
    try:
        result = compress(run.model, run.example, method, target, run.data, args, args.settings)
    except InfeasibleBudget as exc:
        run.phases["compress (tables cached)"] += time.perf_counter() - started
        smallest = getattr(exc, "smallest", None)
        fraction = smallest is not None and getattr(exc, "unit", None) == "fraction"
        short = f"smallest reachable {smallest:.0%}" if fraction else "below the fastest plan"
        print(f"  {method:10s} {target:>4s}: infeasible ({exc})", flush=True)
        return {**cell, "feasible": False, "why": str(exc), "why_short": short, "smallest": smallest}
    run.phases["compress (tables cached)"] += time.perf_counter() - started
    add_stages(run.phases, result.report)
    tuned = fine_tuned(run, result, f"{method} {target}")
    with common.Stopwatch() as clock:
        speed = report.measure_speedup(
            run.folded, tuned["merged"], run.example, threads=args.threads, rounds=args.rounds
        )
    run.phases["speed-up measurement"] += clock.seconds
    rep, accuracies = result.report, tuned["accuracies"]
    cell.update(
        feasible=True,
        speed=speed,
        test_accuracy_before_finetune=tuned["before"],
        test_accuracy={
            "mean": statistics.mean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "seeds": accuracies,
        },
        same_plan_as=tuned["first"] if tuned["reused"] else None,
        merged_vs_linearized_rel_error=tuned["error"],
        convs_after=rep.convs_after,
        activations_removed=rep.activations_removed,
        plan=list(result.plan.entries),
        predicted_ms=rep.predicted_ms,
        loop_measured_ratio=rep.measured_ratio,
        target_met_by_loop=rep.target_met,
        report=rep.to_dict(),
    )
    print_cell(cell, rep)
    return cell


def print_cell(cell: dict, rep) -> None:
    acc, speed = cell["test_accuracy"], cell["speed"]["speedup"]
    loop = 1 / rep.measured_ratio if rep.measured_ratio else float("nan")
    same = f" (the plan of {cell['same_plan_as']}: its fine-tuning reused)" if cell["same_plan_as"] else ""
    print(
        f"  {cell['method']:10s} {cell['target']:>4s}: speed-up {speed:.2f}× measured (fxmerge's loop: {loop:.2f}×), "
        f"convs {rep.convs_before}→{rep.convs_after}, {rep.activations_removed} activations removed; test "
        f"{100 * cell['test_accuracy_before_finetune']:.1f}% → {100 * acc['mean']:.1f} ± {100 * acc['std']:.1f}% "
        f"after fine-tuning{same}",
        flush=True,
    )


# --------------------------------------------------------------------------- one model
PHASES = (
    "train",
    "original: accuracy and half-activation probe",
    "first compress (latency and importance tables, then its loop)",
    "fastest-plan probes",
    "compress (tables cached)",
    "fine-tune and test",
    "speed-up measurement",
)


def run_model(name: str, data, args) -> dict:
    settings = args.settings
    phases = dict.fromkeys(PHASES, 0.0)
    with common.Stopwatch() as clock:
        model, training = models.trained(
            name,
            data.images["train"],
            data.labels["train"],
            settings.train,
            data_key=data.key,
            cache_dir=args.model_cache,
        )
    phases["train"] = clock.seconds
    example = data.images["test"][:1].clone()
    folded = common.folded(model)
    with common.Stopwatch() as clock:
        facts = original_facts(model, folded, data, example, settings)
    phases["original: accuracy and half-activation probe"] += clock.seconds
    print_facts(name, facts)
    with common.Stopwatch() as clock:
        alone = report.measure_speedup(folded, folded, example, threads=args.threads, rounds=args.rounds)
    phases["speed-up measurement"] += clock.seconds
    original = {
        "test_accuracy": facts["test_accuracy"],
        "latency_ms": alone["original_ms"],
        "convs": facts["convs"],
        "self_speedup": alone["speedup"],
    }
    print(
        f"{name}: original {alone['original_ms']:.3f} ms on onnxruntime (BatchNorm folded); timed against "
        f"itself: {alone['speedup']:.3f}× (the measurement's own bias)"
    )
    floors = fastest(model, example, data, args, settings, phases)
    run = ModelRun(model, folded, example, data, args, phases)
    cells = [run_cell(run, method, target) for target in settings.targets[name] for method in METHODS]
    print(
        f"{name} phases (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in phases.items())
        + (" (training: cached model)" if training["cached"] else ""),
        flush=True,
    )
    return {
        "description": models.DESCRIPTIONS[name],
        "training": training,
        "facts": facts,
        "original": original,
        "fastest_measured_ratio": floors,
        "cells": cells,
        "phases_s": phases,
    }


def orderings(results: dict) -> list[dict]:
    """Per model and target: the methods by mean test accuracy, with their measured speed-ups."""
    out = []
    for name, model in results["models"].items():
        for target in dict.fromkeys(c["target"] for c in model["cells"]):
            cells = [c for c in model["cells"] if c["target"] == target and c.get("feasible")]
            ranked = sorted(cells, key=lambda c: -c["test_accuracy"]["mean"])
            paper_order = [m for m in METHODS if m in {c["method"] for c in cells}]
            out.append(
                {
                    "model": name,
                    "target": target,
                    "by_accuracy": [c["method"] for c in ranked],
                    "accuracy": {c["method"]: c["test_accuracy"]["mean"] for c in cells},
                    "speedup": {c["method"]: c["speed"]["speedup"] for c in cells},
                    "paper_order_holds": [c["method"] for c in ranked] == paper_order,
                    "infeasible": [
                        c["method"] for c in model["cells"] if c["target"] == target and not c.get("feasible")
                    ],
                }
            )
    return out


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [common.markdown_table(report.TABLE_HEADER, report.table_rows(results)), ""]
    for name, model in results["models"].items():
        floors = ", ".join(f"{m} {1 / r:.2f}× ({r:.0%})" for m, r in model["fastest_measured_ratio"].items())
        lines.append(f"- {name}: the fastest plan of each method, as measured by the closed loop: {floors}")
        timing = ", ".join(f"{k} {v:.0f} s" for k, v in model["phases_s"].items() if not k.startswith("compress: "))
        lines.append(f"- {name} wall time per phase: {timing}")
    for o in results["orderings"]:
        ranked = " > ".join(f"{m} {100 * o['accuracy'][m]:.1f}% at {o['speedup'][m]:.2f}×" for m in o["by_accuracy"])
        missing = f"; infeasible: {', '.join(o['infeasible'])}" if o["infeasible"] else ""
        holds = "holds" if o["paper_order_holds"] else "does NOT hold"
        lines.append(f"- {o['model']} at {o['target']}: {ranked}{missing} — the paper's order {holds}")
    lines.append("")
    lines.append(
        f"Importance `{s['importance']}` (holdout-train {s['sizes']['holdout_train']}, holdout-val "
        f"{s['sizes']['holdout_val']}); fine-tuning: {s['finetune_samples']} training samples, 1 epoch, "
        f"lr {s['finetune_lr']}, distillation + labels, seeds {list(s['seeds'])}; rules `{s['rules']}`, "
        f"max kernel {s['max_kernel']}. Speed-up: {results['speedup_measurement']}"
    )
    return "\n".join(lines)


SPEEDUP_HOW = (
    "measured by the benchmark itself, not by fxmerge's timers: both models exported with "
    "fxmerge.export.export_onnx, fresh onnxruntime sessions (CPU, {threads} thread(s), sequential, "
    "spinning off), interleaved blocks of runs, {rounds} rounds; the median of the per-round ratios"
)


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse(argv)
    env = common.environment(args)
    settings = args.settings
    print(
        f"paper_mini: models {args.models}, importance {args.importance}, {args.threads} thread(s), "
        f"load average {env['load_average_at_start']}; fxmerge cache {args.cache_dir} ({args.cache_kind}); "
        f"models and data {args.model_cache}",
        flush=True,
    )
    with common.Stopwatch() as clock:
        data = data_mod.load_splits(settings.sizes, seed=settings.data_seed, cache_dir=args.model_cache)
    print(f"data: {data.sizes()} ({clock.seconds:.0f} s)", flush=True)
    results = {
        "benchmark": "paper_mini",
        "environment": env,
        "settings": {**asdict(settings), "importance": args.importance, "methods": list(METHODS), "backend": BACKEND},
        "data": {
            "name": "cluttered shapes",
            "classes": list(data_mod.CLASSES),
            "splits": data.sizes(),
            "ranges": data.ranges,
            "key": data.key,
            "difficulty": asdict(data_mod.Difficulty()),
            "description": data_mod.__doc__,
        },
        "speedup_measurement": SPEEDUP_HOW.format(threads=args.threads, rounds=args.rounds),
        "data_seconds": clock.seconds,
        "models": {},
    }
    for name in args.models:
        print(f"\n== {name}: {models.DESCRIPTIONS[name]}", flush=True)
        results["models"][name] = run_model(name, data, args)
    results["orderings"] = orderings(results)
    results["wall_s"] = time.perf_counter() - started
    common.write_json(args.out, results)
    png = args.out.with_suffix(".png")
    report.plot(
        results,
        png,
        title=PLOT_TITLE,
        xlabel=PLOT_X.format(threads=args.threads),
        ylabel=PLOT_Y.format(seeds=len(settings.seeds)),
    )
    print(f"\nplot:    {png}")
    common.print_footer(args, env, markdown(results), results["wall_s"])
    return 0


PLOT_TITLE = (
    "LayerMerge vs depth-only vs layer-only, each fine-tuned with the same budget\n"
    "on cluttered shapes (generated 32×32 colour images, 10 classes)"
)
PLOT_X = (
    "measured speed-up over the original (×)\n"
    "onnxruntime CPU, {threads} thread(s), batch 1, BatchNorm folded in both; bars: IQR over rounds"
)
PLOT_Y = "test accuracy (%)\nmean ± std over {seeds} fine-tuning seed(s)"

if __name__ == "__main__":
    sys.exit(main())
