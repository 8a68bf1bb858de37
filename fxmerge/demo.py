"""The embedded demo (``make demo``): compress a small residual CNN trained on real digits.

1. trains (or reuses a cached copy of) a small residual CNN on scikit-learn's
   handwritten digits, upsampled to 32×32;
2. ``fxmerge.compress`` to a latency target on the CPU (ONNX Runtime);
3. fine-tunes the linearized model briefly, distilling from the original;
4. merges it exactly, exports ``merged.pt2`` and ``merged.onnx``;
5. prints accuracy before and after, original / predicted / measured latency and
   the measured speed-up (BatchNorm folded in both models, so only depth counts).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fxmerge.latency.compare import side_by_side

CACHE = Path(".fxmerge-cache")


class Block(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out)
            )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class DigitsNet(nn.Module):
    """A small ResNet for 1×32×32 digits."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(Block(width, width), Block(width, width))
        self.layer2 = nn.Sequential(Block(width, 2 * width, 2), Block(2 * width, 2 * width))
        self.layer3 = nn.Sequential(Block(2 * width, 4 * width, 2), Block(4 * width, 4 * width))
        self.head = nn.Linear(4 * width, 10)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def digits(batch_size: int = 64, seed: int = 0):
    """scikit-learn's handwritten digits as 1×32×32 tensors: (train, val) lists of batches."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    split = int(0.8 * len(labels))

    def batches(x, y):
        return [(x[k : k + batch_size], y[k : k + batch_size]) for k in range(0, len(y), batch_size)]

    return batches(images[:split], labels[:split]), batches(images[split:], labels[split:])


def trained_model(train, epochs: int = 4, progress: bool = True) -> nn.Module:
    import io

    from fxmerge.cache import write_atomic
    from fxmerge.train import finetune

    path = CACHE / "demo" / "digitsnet.pt"
    model = DigitsNet()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    finetune(model, train, epochs=epochs, lr=0.05, progress=progress)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    write_atomic(path, buffer.getvalue())
    return model.eval()


def _arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="60%", help="latency target: '60%%' of the original, or ms")
    parser.add_argument("--out", default="fxmerge-out/demo", help="where the merged model and reports go")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="ONNX Runtime threads (default 1: stable on a shared machine)"
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def _compress(model, example, target, backend, val, progress: bool):
    """``fxmerge.compress``; an unreachable target falls back to the smallest one that is reachable."""
    import fxmerge
    from fxmerge.api import TargetUnreachable

    def run(goal):
        return fxmerge.compress(
            model, example, goal, backend=backend, data=val[:4], cache_dir=CACHE, progress=progress, max_kernel=9
        )

    try:
        return run(target)
    except TargetUnreachable as exc:
        print(f"note: {exc}\nnote: compressing to the smallest reachable target instead")
        return run(f"{exc.smallest * 100:.1f}%" if exc.unit == "fraction" else exc.smallest)


def _rows(report, scores, exact: float, original_ms: float, merged_ms: float, out: Path) -> list[tuple[str, str, str]]:
    met = {True: "met", False: "NOT met", None: "not checked"}[report.target_met]
    asked = report.target_ms / report.original_ms
    return [
        ("accuracy (val)", f"{scores[0]:.1%} original", f"{scores[1]:.1%} linearized → {scores[2]:.1%} fine-tuned"),
        ("convs", f"{report.convs_before}", f"{report.convs_after} ({report.activations_removed} activations removed)"),
        (
            f"latency ({report.backend}, {report.threads} thr.)",
            f"{original_ms:.3f} ms",
            f"{merged_ms:.3f} ms ({merged_ms / original_ms:.1%} of the original)",
        ),
        ("target", f"{asked:.0%} of the original", f"{met} as measured by compress ({report.measured_ratio or 0:.1%})"),
        ("speed-up (measured)", "", f"{original_ms / merged_ms:.2f}× (BatchNorm folded in both, timed side by side)"),
        ("merge exactness", "", f"max|Δ|/max|ref| = {exact:.1e}"),
        ("files", str(out), "plan.json report.json report.md linearized.pt merged.pt2 merged.onnx"),
    ]


def _write(result, merged, example, out: Path) -> None:
    import io

    from fxmerge.cache import write_atomic, write_json
    from fxmerge.export import export_merged

    result.plan.save(out / "plan.json")
    write_json(out / "report.json", result.report.to_dict())
    write_atomic(out / "report.md", result.report.to_markdown())
    buffer = io.BytesIO()
    torch.save(result.model.state_dict(), buffer)
    write_atomic(out / "linearized.pt", buffer.getvalue())
    export_merged(merged, example, out)


def main(argv=None) -> int:
    args = _arguments(argv)
    progress = not args.no_progress
    from fxmerge.latency import get_backend
    from fxmerge.passes.merge import merge
    from fxmerge.train import accuracy, finetune

    started = time.perf_counter()
    train, val = digits()
    model = trained_model(train, progress=progress)
    example = torch.randn(1, 1, 32, 32)
    backend = get_backend("onnxruntime", threads=args.threads)
    print(f"timing on {backend.name}, {backend.threads} thread(s); compressing to {args.target}")
    result = _compress(model, example, args.target, backend, val, progress)
    scores = [accuracy(model, val), accuracy(result.model, val)]
    finetune(result.model, train, epochs=args.finetune_epochs, lr=0.01, teacher=model, progress=progress)
    scores.append(accuracy(result.model, val))
    merged = result.merge()
    with torch.no_grad():
        reference, got = result.model.eval()(val[0][0]), merged(val[0][0])
    exact = float((got - reference).abs().max() / reference.abs().max())
    # one measurement, side by side, for every latency in the table
    original_ms, merged_ms = side_by_side(merge(torch.fx.symbolic_trace(model.eval())), merged, example, backend)
    out = Path(args.out)
    _write(result, merged, example, out)
    rows = _rows(result.report, scores, exact, original_ms, merged_ms, out)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':{width}}  {'original':28}  compressed")
    for name, before, after in rows:
        print(f"{name:{width}}  {before:28}  {after}")
    print(f"\ndone in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
