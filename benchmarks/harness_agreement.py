"""Do the closed loop's timing and compress_zoo's independent timing agree on the same two models? (issue #12)

Takes the mobilenet_v2@224 60% plan of ``results/compress_zoo.json`` (2 threads), merges
it, and times it against the BatchNorm-folded original ``--repeats`` times with each
harness in turn: fxmerge's ``Comparator`` (what the closed loop uses) against the loop's
folded capture, compress_zoo's ``independent_ratio`` against ``common.folded`` (fx trace
+ merge), and the same against the loop's folded capture. Prints one line per repeat.

    python benchmarks/harness_agreement.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys

import common
import compress_zoo
import torch

import fxmerge
from fxmerge.api import analyze_captured
from fxmerge.capture import capture
from fxmerge.latency import get_backend
from fxmerge.latency.compare import Comparator
from fxmerge.passes.linearize import linearize
from fxmerge.plan import Plan


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = json.loads((common.RESULTS / "compress_zoo.json").read_text())["results"]
    row = next(r for r in rows if r["config"] == "mobilenet_v2@224" and r["threads"] == 2 and r["target"] == "60%")
    model, x = common.load_model("mobilenet_v2"), common.example_input(224)
    captured = capture(model, x)
    span_graph = analyze_captured(captured)
    plan = Plan.from_entries(span_graph, row["plan"])
    merged = fxmerge.merge(linearize(captured, span_graph, plan, share_parameters=True))
    folded_loop, folded_independent = fxmerge.merge(captured.gm), common.folded(model)
    backend = get_backend("onnxruntime", threads=args.threads)
    for k in range(args.repeats):
        loop = Comparator(folded_loop, (x,), backend).compare(merged)
        independent = compress_zoo.independent_ratio(folded_independent, merged, x, args.threads, 7)
        same_original = compress_zoo.independent_ratio(folded_loop, merged, x, args.threads, 7)
        print(
            f"repeat {k}: loop harness {loop.ratio:.3f} (±{loop.rel_error:.3f}, {loop.rounds} rounds)  "
            f"independent {independent['ratio']:.3f} (IQR {independent['ratio_iqr_rel']:.3f})  "
            f"independent on the loop's original {same_original['ratio']:.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
