"""How much of each model in the wild fxmerge can merge: coverage over timm, segmentation_models_pytorch
and diffusers models.

    python benchmarks/zoo_coverage.py              # every model below, JSON in benchmarks/results/
    python benchmarks/zoo_coverage.py --models timm:resnet50d smp:Unet --quick

For each model (random weights, BatchNorm statistics randomised, eval mode) it records
how capture went (symbolic trace, or the torch.export fallback), the number of units,
spans and multi-conv spans, the *coverage* (share of convs inside at least one
multi-conv span), the top rejection reasons, and whether the keep-all plan and two
random plans merge exactly (relative error ≤ 1e-4, re-checked in float64 where the
fp32 network itself is ill-conditioned). Not a timing benchmark: the numbers are
structural and do not depend on the machine.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common

from tests.zoo_wild import DIFFUSERS, SMP, TIMM, build


def survey(spec: str, plans: int) -> dict:
    """Capture, analyse and merge one model; every failure is recorded, never raised."""
    import fxmerge
    from fxmerge.capture import capture
    from tests.test_merge import check_model, keep_and_random

    row: dict = {"model": spec}
    started = time.perf_counter()
    try:
        model, inputs = build(spec)
        captured = capture(model, inputs)
        graph = fxmerge.api.analyze_captured(captured)
        reasons = collections.Counter(r.reason.split(":")[0][:80] for r in graph.rejections)
        row.update(
            form=captured.form,
            units=len(graph.units),
            spans=len(graph.spans),
            multi=sum(len(s.units) > 1 for s in graph.spans),
            coverage=graph.coverage,
            top_reasons=reasons.most_common(3),
        )
        check_model(model, inputs if len(inputs) > 1 else inputs[0], keep_and_random(plans))
        row["merge"] = "exact"
    except Exception as exc:  # noqa: BLE001 - a survey records every failure
        row["merge"] = "failed"
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        row["traceback"] = traceback.format_exc(limit=-3)
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="specs such as timm:resnet50d smp:Unet")
    parser.add_argument("--plans", type=int, default=2, help="random plans merged per model (default 2)")
    parser.add_argument("--quick", action="store_true", help="one random plan per model")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "zoo_coverage.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    specs = args.models or [f"timm:{n}" for n in TIMM] + [f"smp:{n}" for n in SMP] + [
        f"diffusers:{n}" for n in DIFFUSERS
    ]
    rows = []
    for spec in specs:
        rows.append(survey(spec, 1 if args.quick else args.plans))
        r = rows[-1]
        print(
            f"{spec:32} {r.get('form', '-'):14} units {r.get('units', '-'):>4} multi {r.get('multi', '-'):>4} "
            f"coverage {r.get('coverage') or 0:5.0%} merge {r['merge']:7} {r['seconds']:6.1f} s "
            f"{r.get('error', '')[:120]}",
            flush=True,
        )
    common.write_json(args.out, {"command": common.command_line(), "rows": rows})
    failed = [r["model"] for r in rows if r["merge"] != "exact"]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} models merge exactly; failed: {failed}")
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
