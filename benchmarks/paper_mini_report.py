"""Measuring and showing ``paper_mini.py``'s results: the speed-up as an outsider measures it, the plot, the table.

**Speed-up.** :func:`measure_speedup` does not use fxmerge's timers: it exports the
original (BatchNorm folded) and the merged model to ONNX with
:func:`fxmerge.export.export_onnx`, opens a fresh ONNX Runtime session for each
(CPU provider, ``intra_op_num_threads`` = the benchmark's threads, sequential
execution, full graph optimisation, ``session.intra_op.allow_spinning = "0"``),
checks both sessions' outputs against PyTorch, and times them in interleaved blocks
of runs — A B, B A, A B, … — each round giving one ratio of block medians; the
speed-up is the median of those ratios, with its interquartile range.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from torch import nn

METHOD_STYLE = {  # colour, marker, label
    "layermerge": ("tab:red", "o", "LayerMerge (activations + layers)"),
    "depth": ("tab:blue", "s", "depth only (activations)"),
    "layer": ("tab:green", "^", "layer only (whole convs)"),
}


# --------------------------------------------------------------------------- speed-up
def _as_tuple(example) -> tuple[torch.Tensor, ...]:
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def ort_runner(module: nn.Module, example, threads: int):
    """A fresh ONNX Runtime session of ``module`` (``example``: a tensor or a tuple of them).

    Returns ``(run, output)`` where ``run()`` does one inference.
    """
    import onnxruntime as ort

    from fxmerge.export import export_onnx

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    was_training = module.training
    module.eval()
    try:
        inputs = _as_tuple(example)
        onnx = export_onnx(module, inputs, [f"input{i}" for i in range(len(inputs))])
    finally:
        module.train(was_training)
    session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    feed = {given.name: value.numpy() for given, value in zip(session.get_inputs(), inputs)}
    return (lambda: session.run(None, feed)), session.run(None, feed)[0]


def _block(run, runs: int) -> float:
    """Median ms of ``runs`` consecutive inferences."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def measure_speedup(
    original: nn.Module, merged: nn.Module, example, *, threads: int, rounds: int, block_s: float = 0.25
) -> dict:
    """``original_ms / merged_ms`` on fresh ONNX Runtime sessions, interleaved blocks (module docstring)."""
    run_a, out_a = ort_runner(original, example, threads)
    run_b, out_b = ort_runner(merged, example, threads)
    with torch.no_grad():
        want_a, want_b = original.eval()(*_as_tuple(example)).numpy(), merged.eval()(*_as_tuple(example)).numpy()
    ort_error = max(
        float(np.abs(out_a - want_a).max() / max(np.abs(want_a).max(), 1e-30)),
        float(np.abs(out_b - want_b).max() / max(np.abs(want_b).max(), 1e-30)),
    )
    for run in (run_a, run_b):
        _block(run, 20)  # warm-up
    probe = max(_block(run_a, 5), _block(run_b, 5))
    runs = int(min(200, max(5, 1e3 * block_s / max(probe, 1e-3))))
    a_ms, b_ms, ratios = [], [], []
    for k in range(rounds):
        order = ((run_a, a_ms), (run_b, b_ms)) if k % 2 == 0 else ((run_b, b_ms), (run_a, a_ms))
        for run, into in order:
            into.append(_block(run, runs))
        ratios.append(a_ms[-1] / b_ms[-1])
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return {
        "original_ms": statistics.median(a_ms),
        "merged_ms": statistics.median(b_ms),
        "speedup": statistics.median(ratios),
        "speedup_q1": q1,
        "speedup_q3": q3,
        "rounds": rounds,
        "runs_per_block": runs,
        "ort_vs_torch_rel_error": ort_error,
    }


# --------------------------------------------------------------------------- plot
def plot(results: dict, path, *, title: str, xlabel: str, ylabel: str) -> None:
    """Test accuracy against measured speed-up: one panel per model, one line per method, the original a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(max(7.0, 6.2 * len(models)), 5.2), squeeze=False)
    for ax, name in zip(axes[0], models):
        _panel(ax, name, results["models"][name], xlabel, ylabel)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panel(ax, name: str, model: dict, xlabel: str, ylabel: str) -> None:
    original = model["original"]
    ax.plot(
        [1.0],
        [100 * original["test_accuracy"]],
        marker="*",
        markersize=15,
        color="black",
        linestyle="none",
        label=f"original ({100 * original['test_accuracy']:.1f}%)",
    )
    for method, (colour, marker, label) in METHOD_STYLE.items():
        cells = sorted(
            (c for c in model["cells"] if c["method"] == method and c.get("feasible")),
            key=lambda c: c["speed"]["speedup"],
        )
        if not cells:
            ax.plot([], [], color=colour, marker=marker, label=f"{label}: no feasible target")
            continue
        x = [c["speed"]["speedup"] for c in cells]
        xerr = [
            [c["speed"]["speedup"] - c["speed"]["speedup_q1"] for c in cells],
            [c["speed"]["speedup_q3"] - c["speed"]["speedup"] for c in cells],
        ]
        y = [100 * c["test_accuracy"]["mean"] for c in cells]
        yerr = [100 * c["test_accuracy"]["std"] for c in cells]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, color=colour, marker=marker, capsize=3, label=label)
        for c, xi, yi in zip(cells, x, y):
            ax.annotate(c["target"], (xi, yi), textcoords="offset points", xytext=(4, -11), fontsize=7, color=colour)
    ax.set_title(f"{name}: {model['description']}", fontsize=8)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


# --------------------------------------------------------------------------- table
def table_rows(results: dict) -> list[list[str]]:
    """One row per model and (target, method), the original first."""
    rows = []
    for name, model in results["models"].items():
        original = model["original"]
        rows.append(
            [
                name,
                "original",
                "–",
                f"1.00× ({original['latency_ms']:.3f} ms)",
                f"**{100 * original['test_accuracy']:.1f}**",
                "–",
                str(original["convs"]),
                "–",
            ]
        )
        for c in model["cells"]:
            if not c.get("feasible"):
                rows.append([name, c["method"], c["target"], f"infeasible: {c['why_short']}", "–", "–", "–", "–"])
                continue
            acc = c["test_accuracy"]
            rows.append(
                [
                    name,
                    c["method"],
                    c["target"],
                    f"{c['speed']['speedup']:.2f}× ({c['speed']['merged_ms']:.3f} ms)",
                    f"**{100 * acc['mean']:.1f} ± {100 * acc['std']:.1f}**",
                    f"{100 * c['test_accuracy_before_finetune']:.1f}",
                    f"{c['convs_after']}" + (f" (plan of {c['same_plan_as']})" if c.get("same_plan_as") else ""),
                    f"{c['activations_removed']}",
                ]
            )
    return rows


TABLE_HEADER = [
    "model",
    "method",
    "target",
    "measured speed-up (merged ms)",
    "test acc. % (mean ± std, 3 seeds)",
    "before fine-tune %",
    "convs",
    "activations removed",
]
