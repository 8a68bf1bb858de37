"""Time fxmerge.solve on the real resnet34 span graph (general rules, 2000 bins).

Latencies and importances are drawn at random (seeded): the DP's cost does not depend
on their values. Prints the median of repeated solves and writes
benchmarks/results/solver_speed.json.

    python benchmarks/solver_speed.py
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

import torch
import torchvision

import fxmerge
from fxmerge.plan import Plan
from fxmerge.solver import min_latency, solve


def main() -> None:
    model = torchvision.models.resnet34().eval()
    started = time.perf_counter()
    sg = fxmerge.analyze(model, torch.randn(1, 3, 224, 224))
    analyze_s = time.perf_counter() - started
    rng = random.Random(0)
    latency = {e.id: rng.uniform(0.05, 2.0) for e in sg.entries}
    importance = {e.id: rng.uniform(0.5, 1.0) for e in sg.entries}
    full = sum(latency[e] for e in Plan.keep_all(sg).entries)
    floor = min_latency(sg, latency)
    rows = []
    for fraction in (0.9, 0.7, 0.5):
        budget = floor + fraction * (full - floor)
        times = []
        for _ in range(7):
            t = time.perf_counter()
            plan = solve(sg, latency, importance, budget, bins=2000)
            times.append(time.perf_counter() - t)
        rows.append({"budget_fraction": fraction, "median_s": statistics.median(times), "spans": len(plan.entries)})
        print(
            f"budget {fraction:.0%} of range: solve median {statistics.median(times) * 1000:.1f} ms, {len(plan.entries)} spans"
        )
    result = {
        "model": "resnet34",
        "positions": len(sg.positions),
        "spans": len(sg.spans),
        "entries": len(sg.entries),
        "bins": 2000,
        "analyze_s": analyze_s,
        "solves": rows,
        "torch_threads": torch.get_num_threads(),
    }
    print(
        f"resnet34: {len(sg.positions)} positions, {len(sg.spans)} spans, {len(sg.entries)} entries; analyze {analyze_s:.1f} s"
    )
    out = Path(__file__).parent / "results" / "solver_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
