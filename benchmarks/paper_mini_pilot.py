"""The pilot behind paper_mini's fine-tuning learning rate, chosen on the validation split (issue #14).

For each model, the cached trained network and one LayerMerge plan (at ``--target``,
compressed as paper_mini does, tables from the cache) are fine-tuned with
paper_mini's recipe — one epoch over ``--samples`` training samples, SGD cosine,
distillation from the original plus the labels, seed 0 — at each learning rate of
``--lrs``; the original network itself gets the same fine-tuning, which shows
whether a rate damages a network that needs no repair. Scored on the *validation*
split, so the test split stays unseen until paper_mini reports on it.

    python benchmarks/paper_mini_pilot.py                 # both models, lr 0.02 / 0.005 / 0.002
    python benchmarks/paper_mini_pilot.py --models resnet --lrs 0.01 0.002 --samples 3000
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace

import common
import paper_mini
import paper_mini_data as data_mod
import paper_mini_models as models
import torch

from fxmerge.train import finetune

LRS = (0.02, 0.005, 0.002)
TARGETS = {"resnet": "92%", "mobilenetv2": "89%"}


def parse(argv=None) -> tuple[argparse.Namespace, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(TARGETS), choices=sorted(models.ARCHITECTURES))
    parser.add_argument("--lrs", nargs="+", type=float, default=list(LRS))
    parser.add_argument("--samples", type=int, default=paper_mini.FULL.finetune_samples)
    parser.add_argument("--target", default=None, help="the plan's latency target (default: per model, see TARGETS)")
    parser.add_argument("--threads", type=int, default=1, help="backend threads (torch trains on train_threads)")
    parser.add_argument("--no-progress", action="store_true")
    own = parser.parse_args(argv)
    shared = ["--models", *own.models, "--threads", str(own.threads), "--out", str(common.RESULTS / "unused.json")]
    bench = paper_mini.parse([*shared, *(["--no-progress"] if own.no_progress else [])])
    bench.settings = replace(bench.settings, finetune_samples=own.samples)
    return own, bench


def val_accuracy_after(network: torch.nn.Module, teacher, data, settings, lr: float) -> float:
    tuned = copy.deepcopy(network).train()
    torch.manual_seed(0)
    with paper_mini.torch_threads(settings.train_threads):
        finetune(tuned, paper_mini.finetune_batches(data, settings, 0), lr=lr, teacher=teacher, progress=False)
    return models.accuracy(tuned.eval(), data.images["val"], data.labels["val"])


def pilot_model(name: str, data, own, bench) -> dict:
    settings = bench.settings
    model, _ = models.trained(
        name, data.images["train"], data.labels["train"], settings.train, data_key=data.key, cache_dir=bench.model_cache
    )
    example = data.images["test"][:1].clone()
    target = own.target or TARGETS[name]
    result = paper_mini.compress(model, example, "layermerge", target, data, bench, settings)
    networks = {"original": model, f"layermerge {target}": result.model}
    rows = []
    for label, network in networks.items():
        before = models.accuracy(network.eval(), data.images["val"], data.labels["val"])
        row = {"network": label, "val_before": before, "val_after": {}}
        for lr in own.lrs:
            started = time.perf_counter()
            row["val_after"][lr] = val_accuracy_after(network, model, data, settings, lr)
            print(
                f"{name} {label}: lr {lr:g} → val {100 * row['val_after'][lr]:.1f}% "
                f"(before {100 * before:.1f}%; {time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        rows.append(row)
    plan = {"convs_after": result.report.convs_after, "activations_removed": result.report.activations_removed}
    return {"target": target, "plan": plan, "rows": rows}


def markdown(results: dict) -> str:
    lrs = results["lrs"]
    header = ["model", "network", "val % before", *(f"lr {lr:g}" for lr in lrs)]
    body = []
    for name, out in results["models"].items():
        for row in out["rows"]:
            after = [f"{100 * row['val_after'][lr]:.1f}" for lr in lrs]
            body.append([name, row["network"], f"{100 * row['val_before']:.1f}", *after])
    return common.markdown_table(header, body)


def main(argv=None) -> int:
    started = time.perf_counter()
    own, bench = parse(argv)
    settings = bench.settings
    data = data_mod.load_splits(settings.sizes, seed=settings.data_seed, cache_dir=bench.model_cache)
    results = {
        "benchmark": "paper_mini_pilot",
        "environment": common.environment(bench),
        "lrs": own.lrs,
        "samples": own.samples,
        "models": {name: pilot_model(name, data, own, bench) for name in own.models},
    }
    results["wall_s"] = time.perf_counter() - started
    out = common.RESULTS / "paper_mini_pilot.json"
    common.write_json(out, results)
    print(f"\n{markdown(results)}\n\nwrote {out}; {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
