"""How long an importance table takes to build, this tree against an earlier checkout, side by side.

    git worktree add /tmp/fxmerge-before 2f9bcb0       # the tree before the one-capture refactor
    python benchmarks/importance_speed.py --baseline /tmp/fxmerge-before

For each model (random weights, 1×3×224×224) the data-free ``distortion`` importance
table is built from scratch (cache off) by the baseline and by this tree, each in a
fresh subprocess, alternating baseline / current ``--repeats`` times so both see the
same machine; the median wall time of each is reported with the ratio. The timed
part is ``build_importance_table`` alone (capture and analysis happen before).

Entries whose network repeats one already evaluated (``info["repeated_networks"]``) are
counted in the JSON. The search space has grown since the baseline (resnet34: 335 entries then, 409 now), so
each round also builds this tree's table for the baseline's entries only (``entries=``,
the ids the baseline produced): the same work, timed like for like.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import common

MODELS = ["resnet34", "mobilenet_v2"]

CHILD = textwrap.dedent("""
    import inspect, json, sys, time, torch, torchvision
    torch.set_num_threads(int(sys.argv[3]))
    torch.manual_seed(0)
    model = torchvision.models.get_model(sys.argv[1], weights=None).eval()
    x = torch.randn(1, 3, int(sys.argv[2]), int(sys.argv[2]))
    only = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
    from fxmerge.importance import build_importance_table
    if "captured" in inspect.signature(build_importance_table).parameters:
        from fxmerge.api import analyze_captured
        from fxmerge.capture import capture
        captured = capture(model, x)
        graph = analyze_captured(captured)
        kept = [e for e in only if e in {entry.id for entry in graph.entries}] if only is not None else None
        started = time.perf_counter()
        table = build_importance_table(captured, graph, "distortion", entries=kept, cache_dir=False, progress=False)
    else:
        import fxmerge
        graph = fxmerge.analyze(model, x)
        started = time.perf_counter()
        table = build_importance_table(model, x, graph, "distortion", cache_dir=False, progress=False)
    seconds = time.perf_counter() - started
    repeated = table.info.get("repeated_networks", 0)
    print(json.dumps({"seconds": seconds, "entries": len(table.entries), "repeated": repeated, "ids": sorted(table.entries)}))
""")


def run(tree: Path, model: str, size: int, threads: int, only: list[str] | None = None) -> dict:
    """One table build in a fresh process on ``tree`` (``only``: just these entry ids)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    extra = [] if only is None else [json.dumps(only)]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(size), str(threads), *extra],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tree,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout of the earlier tree")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=common.RESULTS / "importance_speed.json")
    args = parser.parse_args(argv)
    current = Path(__file__).resolve().parent.parent
    env = common.environment(
        argparse.Namespace(
            threads=args.threads,
            quick=False,
            size=args.size,
            rounds=args.repeats,
            timing={},
            cache_dir="off",
            cache_kind="off",
        )
    )
    rows = []
    for model in args.models:
        rows.append(compare(model, args, current))
        common.write_json(args.out, {"benchmark": "importance_speed", "environment": env, "results": rows})
    print(
        f"\n`{env['command']}` — {env['cpu']}, {args.threads} thread(s), {args.repeats} alternating runs each, "
        f"load average at start {env['load_average_at_start']}\n\n{markdown(rows)}"
    )
    return 0


def compare(model: str, args, current: Path) -> dict:
    """Baseline, this tree, and this tree on the baseline's entries only, alternating ``args.repeats`` times."""
    labels = ("baseline", "current", "current_same_entries")
    times: dict[str, list[float]] = {label: [] for label in labels}
    entries: dict[str, int] = {}
    repeated: dict[str, int] = {}
    for _ in range(args.repeats):
        before = run(args.baseline, model, args.size, args.threads)
        now = run(current, model, args.size, args.threads)
        same = run(current, model, args.size, args.threads, only=before["ids"])
        for label, result in zip(labels, (before, now, same)):
            times[label].append(result["seconds"])
            entries[label] = result["entries"]
            repeated[label] = result.get("repeated", 0)
            print(f"{model} {label}: {result['seconds']:.1f} s ({result['entries']} entries)", flush=True)
    row = {"model": model, "entries": entries, "repeated_networks": repeated, "seconds": times}
    row.update({f"{label}_s": statistics.median(times[label]) for label in labels})
    row["speedup"] = row["baseline_s"] / row["current_s"]
    row["speedup_same_entries"] = row["baseline_s"] / row["current_same_entries_s"]
    return row


def markdown(rows: list[dict]) -> str:
    return common.markdown_table(
        [
            "model",
            "entries (before / now)",
            "before (s)",
            "now (s)",
            "speed-up",
            "now, the before entries (s)",
            "speed-up",
        ],
        [
            [
                r["model"],
                f"{r['entries']['baseline']} / {r['entries']['current']}",
                f"{r['baseline_s']:.1f}",
                f"{r['current_s']:.1f}",
                f"**{r['speedup']:.2f}×**",
                f"{r['current_same_entries_s']:.1f} ({r['entries']['current_same_entries']} entries)",
                f"**{r['speedup_same_entries']:.2f}×**",
            ]
            for r in rows
        ],
    )


if __name__ == "__main__":
    raise SystemExit(main())
